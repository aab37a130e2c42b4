"""Validation: prove the organization's rows on the target are the rows on the source.

Per table and per chunk (the copy's primary-key ranges), both cells compute the row count and an
order-independent checksum (the sum of a 64-bit hash of each row's text) of exactly the org's rows,
in one scan per table, the two cells in parallel. Columns that legitimately
differ between cells are compared by meaning instead of bytes:

* remapped references (``shard_id``, ``lfs_object_id``...) are compared through the referenced
  row's match key (shard name, LFS oid), computed by SQL on each cell;
* encrypted columns are decrypted with each cell's key and compared as plaintext digests, in
  memory, in primary-key order.

On a mismatch :func:`row_diff` streams ``(key, row hash)`` of the chunks that differ from both cells in key order and
merges them, like Vitess VDiff: counts of matching, mismatched, missing-on-target and
extra-on-target rows with sample keys. Memory stays flat; rows are never held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import psycopg

from orgmover.catalog import Catalog
from orgmover.plan import Plan, TablePlan, qi, ql
from orgmover.secrets import ColumnSpec, SecretError


def _encrypted_columns(tp: TablePlan) -> set[str]:
    out = set()
    for s in tp.encrypted:
        out.add(s["column"])
        if s.get("iv_column"):
            out.add(s["iv_column"])
    return out


def _mapped(expr: str, value_map: dict) -> str:
    """``expr`` with configured source -> target values substituted (source side only)."""
    if not value_map:
        return expr
    whens = " ".join(f"WHEN {ql(k)} THEN {ql(v)}" for k, v in sorted(value_map.items()))
    return f"(CASE ({expr})::text {whens} ELSE ({expr})::text END)"


def row_exprs(tp: TablePlan, source: bool = False) -> list[str]:
    """SQL expressions (over alias t) whose text is compared between cells. On the source side,
    configured value mappings are applied so both cells produce the same text."""
    enc = _encrypted_columns(tp)
    remap = {r.column: r for r in tp.remaps}
    cols = tp.compare_columns if tp.strategy == "shared" else tp.columns
    exprs = []
    for c in cols:
        if c in enc:
            continue
        r = remap.get(c)
        if r is not None:
            m = ", ".join(_mapped(f"r.{qi(x)}", r.value_map if source else {}) for x in r.match_on)
            exprs.append(f"(SELECT ROW({m})::text FROM {qi(r.table)} r WHERE r.{qi(r.ref_column)} = t.{qi(c)})")
        elif tp.strategy == "shared" and c in tp.match_on and source:
            exprs.append(_mapped(f"t.{qi(c)}", tp.value_map))
        else:
            exprs.append(f"t.{qi(c)}")
    return exprs


def identity(tp: TablePlan) -> list[str]:
    """Columns that identify a row on both cells."""
    return tp.match_on if tp.strategy == "shared" else tp.key


def checksum_sql(tp: TablePlan, source: bool = False, bucket: str = "0", narrow: str | None = None) -> str:
    """Per chunk (``bucket``: an SQL expression giving a row's chunk number), the row count and the
    sum of the rows' 64-bit hashes, in one scan (of the rows ``narrow`` selects, when given)."""
    where = tp.where if narrow is None else f"({tp.where}) AND ({narrow})"
    # sum(bigint) accumulates in 128-bit integers (exact, no overflow): much cheaper than a numeric per row
    return (f"SELECT {bucket}, count(*), coalesce(sum(hashtextextended(ROW({', '.join(row_exprs(tp, source))})::text, 0)), 0)"
            f"::text FROM {qi(tp.table)} t WHERE {where} GROUP BY 1")


def chunk_checksums(conn: psycopg.Connection, tp: TablePlan, source: bool = False,
                    column: str | None = None, bounds: list[int] | None = None,
                    only: list[int] | None = None) -> dict[int, tuple[int, str]]:
    """{chunk number: (rows, checksum)} of the org's rows of one table (chunks as in the copy);
    ``only``: just these chunks, read through their key ranges (an empty chunk is left out)."""
    from orgmover.pgcopy import bucket_sql, range_sql

    narrow = None
    if only is not None:
        if not only:
            return {}
        edges = [None, *(bounds or []), None]
        narrow = " OR ".join(f"({range_sql(column, edges[k], edges[k + 1])})" for k in only) if column and bounds else "true"
    return {int(b): (int(n), s)
            for b, n, s in conn.execute(checksum_sql(tp, source, bucket_sql(column, bounds or []), narrow))}


def total(chunks: dict[int, tuple[int, str]]) -> tuple[int, str]:
    """The table's (rows, checksum) from its chunks'."""
    return sum(n for n, _ in chunks.values()), str(sum(int(s) for _, s in chunks.values()))


def table_checksum(conn: psycopg.Connection, tp: TablePlan, source: bool = False) -> tuple[int, str]:
    return total(chunk_checksums(conn, tp, source))


@dataclass
class DiffResult:
    matching: int = 0
    mismatched: int = 0
    missing_on_target: int = 0
    extra_on_target: int = 0
    samples: dict[str, list[str]] = field(default_factory=lambda: {"mismatched": [], "missing_on_target": [], "extra_on_target": []})

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing_on_target or self.extra_on_target)

    def to_dict(self) -> dict:
        return asdict(self)


def _org_rows(tp: TablePlan, columns: str, narrow: str = "true", picked: str | None = None) -> str:
    """SELECT ``columns`` of the org's rows of ``tp`` (alias t): all, those ``narrow`` selects (e.g. some
    chunks), or the few a key filter ``picked`` selects (looked up by key, see TablePlan.picked_sql)."""
    if picked is not None:
        return tp.picked_sql(picked, columns)
    where = tp.where if narrow == "true" else f"({tp.where}) AND ({narrow})"
    return f"SELECT {columns} FROM {qi(tp.table)} t WHERE {where}"


def _keyed_hashes(conn: psycopg.Connection, tp: TablePlan, batch: int = 10000, source: bool = False,
                  narrow: str = "true", picked: str | None = None, key_columns: bool = False):
    """(key as text, row hash) of the org's rows in key order; with ``key_columns``, then each key column
    as text (as the change stream writes them). Streamed ``batch`` rows at a time by one statement (no
    cursor to declare, fetch from and close: a diff of the few rows written since the baseline is a
    handful of round trips with writes blocked); the connection runs nothing else until it is read."""
    vm = tp.value_map if (source and tp.strategy == "shared") else {}
    key = "ROW(" + ", ".join(_mapped(f"t.{qi(c)}", vm) if vm else f"t.{qi(c)}" for c in identity(tp)) + ")::text"
    also = "".join(f", t.{qi(c)}::text" for c in identity(tp)) if key_columns else ""
    sql = (_org_rows(tp, f"{key} AS k, hashtextextended(ROW({', '.join(row_exprs(tp, source))})::text, 0) AS h{also}",
                     narrow, picked)
           + f" ORDER BY {key} COLLATE \"C\"")
    with conn.cursor() as cur:
        yield from cur.stream(sql, size=batch)


def _merge_diff(src_iter, dst_iter, samples: int, differing: list | None = None) -> DiffResult:
    """Merge two (key, hash, ...) streams in key order; ``differing``: each differing row appended to it."""
    res = DiffResult()
    s, d = next(src_iter, None), next(dst_iter, None)

    def sample(kind: str, row: tuple) -> None:
        if len(res.samples[kind]) < samples:
            res.samples[kind].append(row[0])
        if differing is not None:
            differing.append(row)

    while s is not None or d is not None:
        if d is None or (s is not None and s[0].encode() < d[0].encode()):
            res.missing_on_target += 1
            sample("missing_on_target", s)
            s = next(src_iter, None)
        elif s is None or d[0].encode() < s[0].encode():
            res.extra_on_target += 1
            sample("extra_on_target", d)
            d = next(dst_iter, None)
        else:
            if s[1] == d[1]:
                res.matching += 1
            else:
                res.mismatched += 1
                sample("mismatched", s)
            s, d = next(src_iter, None), next(dst_iter, None)
    return res


def differing_keys(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan, narrow: str,
                   limit: int = 1000) -> list[tuple[str, ...]] | None:
    """The keys (text values, as the change stream writes them) of the org's rows ``narrow`` selects that
    differ between the cells: changed, missing on the target or extra there. None when there are more
    than ``limit`` (the diff stops reading)."""
    found: list = []

    class Enough(Exception):
        pass

    def bounded(it):
        for row in it:
            if len(found) > limit:
                raise Enough
            yield row

    src_rows = _keyed_hashes(src, tp, source=True, narrow=narrow, key_columns=True)
    dst_rows = _aside(_keyed_hashes(dst, tp, narrow=narrow, key_columns=True))
    try:
        _merge_diff(bounded(src_rows), bounded(dst_rows), 0, found)
    except Enough:
        return None
    finally:
        dst_rows.close()
        src_rows.close()  # ends its stream (the rest of the query cancelled) when the diff stopped early
    return [tuple(row[2:]) for row in found] if len(found) <= limit else None


def row_diff(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan, samples: int = 10,
             narrow: str = "true", picked: str | None = None) -> DiffResult:
    """Row-level diff of the org's rows of one table (streamed merge in key order); ``narrow``: only
    the rows of the chunks whose checksums differ (rows outside it matched by chunk checksum and are
    not counted); ``picked``: only the rows of a key filter (the rows written since the baseline)."""
    return _merge_diff(_keyed_hashes(src, tp, source=True, narrow=narrow, picked=picked),
                       _aside(_keyed_hashes(dst, tp, narrow=narrow, picked=picked)), samples)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def _aside(it: Iterator, depth: int = 10_000, batch: int = 500) -> Iterator:
    """``it`` read by a thread of its own, handed over through a bounded queue in lists of up to
    ``batch`` items: the other cell's query runs at the same time as this one's (a diff reads both
    cells), memory stays bounded by ``depth`` items."""
    import itertools
    import queue
    import threading

    q: queue.Queue = queue.Queue(max(1, depth // batch))
    stop, end = threading.Event(), object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            while part := list(itertools.islice(it, batch)):
                if not put(part):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            put(_Raised(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # its transaction ends in the thread that opened it

    worker = threading.Thread(target=run, name="om-diff-aside", daemon=True)
    worker.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, _Raised):
                raise x.error
            yield from x
    finally:
        stop.set()
        worker.join()


def _plain_digests(conn: psycopg.Connection, tp: TablePlan, key: bytes | None, narrow: str = "true",
                   picked: str | None = None):
    """(key as text, digest of the decrypted values) of the org's rows in key order, streamed as
    :func:`_keyed_hashes`."""
    specs = [ColumnSpec.from_doc(s) for s in tp.encrypted]
    cols = []
    for s in specs:
        cols.append(f"t.{qi(s.column)}")
        cols.append(f"t.{qi(s.iv_column)}" if s.iv_column else "NULL")
    keyexpr = "ROW(" + ", ".join(f"t.{qi(c)}" for c in identity(tp)) + ")::text"
    sql = _org_rows(tp, f"{keyexpr}, {', '.join(cols)}", narrow, picked) + f" ORDER BY {keyexpr} COLLATE \"C\""
    with conn.cursor() as cur:
        for row in cur.stream(sql, size=5000):
            h = hashlib.sha256()
            for i, spec in enumerate(specs):
                try:
                    plain = spec.decrypt(key, row[1 + 2 * i], row[2 + 2 * i])
                except SecretError:
                    plain = b"\x00undecryptable"
                h.update(b"\x01" if plain is None else b"\x02" + len(plain).to_bytes(8, "big") + plain)
            yield row[0], h.hexdigest()


def encrypted_diff(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan, src_key: bytes | None,
                   dst_key: bytes | None, samples: int = 10, narrow: str = "true", picked: str | None = None) -> DiffResult:
    """Compare encrypted columns by their plaintext (decrypted with each cell's own key); ``narrow`` or
    ``picked`` (a key filter): only these rows (e.g. the ones written since the baseline)."""
    if not tp.encrypted:
        return DiffResult()
    if src_key is None or dst_key is None:
        raise SecretError(f"{tp.table} has encrypted columns but a cell key is not configured")
    return _merge_diff(_plain_digests(src, tp, src_key, narrow, picked),
                       _aside(_plain_digests(dst, tp, dst_key, narrow, picked)), samples)


@dataclass
class TableValidation:
    table: str
    strategy: str
    source_rows: int
    target_rows: int
    source_checksum: str
    target_checksum: str
    encrypted: dict | None = None
    diff: dict | None = None
    written: dict | None = None  # incremental validation: the rows written since the baseline, compared by key

    @property
    def ok(self) -> bool:
        def clean(d):
            return d is None or not (d["mismatched"] or d["missing_on_target"] or d["extra_on_target"])
        return (self.source_rows == self.target_rows and self.source_checksum == self.target_checksum
                and clean(self.encrypted) and clean(self.written))

    def to_dict(self) -> dict:
        # shallow: its dicts are plain already (DiffResult.to_dict) and this object's alone
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ok"] = self.ok
        return d


def fk_violations(conn: psycopg.Connection, plan: Plan, catalog: Catalog, samples: int = 3,
                  tables: set[str] | None = None, only: dict[str, str] | None = None) -> list[str]:
    """Foreign keys of the org's rows (and shared rows) that point at no row on this cell. ``only``
    replaces the org predicate of some tables by a narrower one over alias ``t`` (e.g. the keys the write
    window wrote); other tables of ``tables`` are checked in full."""
    problems = []
    for tp in plan.tables.values():
        if tp.strategy == "skip" or (tables is not None and tp.table not in tables):
            continue
        # rows narrowed by key are the org's by construction (written by the window, or pointing at its rows)
        where = tp.where if not only or tp.table not in only else f"({only[tp.table]})"
        checks, named = [], []
        for fk in catalog[tp.table].foreign_keys:
            parent = plan.tables.get(fk.ref_table)
            if parent is None or parent.strategy == "skip":
                continue
            if tp.strategy == "shared" and parent.strategy == "org":
                continue  # e.g. pool_repositories.source_project_id may point at another org's project
            notnull = " AND ".join(f"t.{qi(c)} IS NOT NULL" for c in fk.columns)
            match = " AND ".join(f"p.{qi(rc)} = t.{qi(c)}" for c, rc in zip(fk.columns, fk.ref_columns))
            key = "ROW(" + ", ".join(f"t.{qi(c)}" for c in tp.key) + ")::text"
            checks.append(f"(SELECT {len(checks)} AS fk, {key} AS k FROM {qi(tp.table)} t WHERE {where} AND {notnull} "
                          f"AND NOT EXISTS (SELECT 1 FROM {qi(fk.ref_table)} p WHERE {match}) LIMIT {samples + 1})")
            named.append(fk)
        if not checks:
            continue
        found: dict[int, list[str]] = {}
        for i, k in conn.execute(" UNION ALL ".join(checks)):  # one round trip per table
            found.setdefault(i, []).append(k)
        for i, fk in enumerate(named):
            rows = found.get(i)
            if rows:
                problems.append(f"{tp.table}.{','.join(fk.columns)} -> {fk.ref_table}: rows "
                                f"{', '.join(rows[:samples])}{' and more' if len(rows) > samples else ''} "
                                f"reference a missing row")
    return problems


def lookup_validation(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan) -> TableValidation:
    """A looked-up shared table (e.g. shards) is never written: it is valid when every row the org
    references on the source has its (mapped) match on the target. The referencing columns are compared
    by that match key in their own tables' checksums."""
    from orgmover.pgcopy import missing_matches

    match = ", ".join(f"t.{qi(c)}" for c in tp.match_on)
    values = {tuple(tp.value_map.get(str(v), v) for v in row)
              for row in src.execute(f"SELECT DISTINCT {match} FROM {qi(tp.table)} t WHERE {tp.where}")}
    missing = missing_matches(src, dst, tp)
    digest = hashlib.sha256(repr(sorted(map(str, values))).encode()).hexdigest()[:16]
    res = TableValidation(tp.table, tp.strategy, len(values), len(values) - len(missing), digest,
                          digest if not missing else "missing")
    if missing:
        res.diff = DiffResult(matching=len(values) - len(missing), missing_on_target=len(missing),
                              samples={"mismatched": [], "missing_on_target": missing[:10], "extra_on_target": []}).to_dict()
    return res
