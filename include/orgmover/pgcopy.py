"""Copy an organization's rows between two cells with COPY streaming.

* Plain tables: ``COPY (SELECT ... WHERE <org predicate>) TO STDOUT (FORMAT binary)`` on the source
  streams straight into ``COPY t (...) FROM STDIN (FORMAT binary)`` on the target; rows are never
  held in memory, only one buffer at a time.
* Tables with columns to rewrite (remapped references to shared rows, encrypted secrets) go
  through the text format row by row: decrypt with the source key, encrypt with the target key
  (fresh IV), in memory only.
* Each table is one target transaction with ``session_replication_role = replica`` (foreign keys
  are checked for the org's rows afterwards, see :mod:`orgmover.validation`): a failure leaves
  nothing of that table behind, so a retry starts clean.
* Shared rows (users, lfs_objects, pool_repositories, shards) are matched on the target by their
  ``match_on`` columns; missing ones are inserted, existing ones reused.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import psycopg

from orgmover.errors import CopyError, PreflightError
from orgmover.plan import Plan, TablePlan, qi, ql
from orgmover.secrets import ColumnSpec

log = logging.getLogger("orgmover.pgcopy")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Logs rows/bytes done, rate and ETA at most every ``every`` seconds."""

    def __init__(self, label: str, total_rows: int = 0, total_bytes: int = 0, every: float = 5.0,
                 logger: Callable[[str], None] | None = None):
        self.label, self.total_rows, self.total_bytes, self.every = label, total_rows, total_bytes, every
        self.rows = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.logger = logger or log.info

    def add(self, rows: int = 0, nbytes: int = 0) -> None:
        self.rows += rows
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.logger(self.line())

    def line(self, final: bool = False) -> str:
        el = max(time.monotonic() - self.start, 1e-6)
        rate = self.bytes / el
        eta = ""
        if not final and self.total_bytes and rate > 0:
            eta = f", ETA {max(self.total_bytes - self.bytes, 0) / rate:.0f}s"
        rows = f"{self.rows:,} rows" + (f"/{self.total_rows:,}" if self.total_rows and not final else "")
        return f"{self.label}: {rows}, {_fmt_bytes(self.bytes)} in {el:.1f}s ({_fmt_bytes(rate)}/s{eta})"


@dataclass
class CopyResult:
    table: str
    rows: int
    bytes: int
    seconds: float


# ---------------------------------------------------------------------------- statistics
def org_stats(conn: psycopg.Connection, tp: TablePlan) -> tuple[int, int]:
    """Exact number of the org's rows in a table and their size in bytes."""
    row = conn.execute(f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {qi(tp.table)} t WHERE {tp.where}").fetchone()
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------------------- rewriting rows
def remap_tables(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan, tp: TablePlan) -> dict[str, dict[str, str]]:
    """For each remapped column of ``tp``: source id -> target id of the shared row with the same match key."""
    maps: dict[str, dict[str, str]] = {}
    for r in tp.remaps:
        shared = plan.tables[r.table]
        match = ", ".join(f"s.{qi(c)}" for c in r.match_on)
        src_rows = src.execute(
            f"SELECT s.{qi(r.ref_column)}::text, {match} FROM {qi(r.table)} s "
            f"WHERE s.{qi(r.ref_column)} IN (SELECT t.{qi(r.column)} FROM {qi(tp.table)} t WHERE {tp.where})").fetchall()
        mapping: dict[str, str] = {}
        if r.value_map:
            src_rows = [(row[0], *(r.value_map.get(str(v), v) for v in row[1:])) for row in src_rows]
        if src_rows:
            keys = [tuple(row[1:]) for row in src_rows]
            tgt = {}
            for i in range(0, len(keys), 5000):
                batch = keys[i:i + 5000]
                cond = " OR ".join(["(" + " AND ".join(f"{qi(c)} = %s" for c in r.match_on) + ")"] * len(batch))
                params = [v for k in batch for v in k]
                for row in dst.execute(f"SELECT {qi(r.ref_column)}::text, {', '.join(qi(c) for c in r.match_on)} "
                                       f"FROM {qi(r.table)} WHERE {cond}", params):
                    tgt[tuple(row[1:])] = row[0]
            missing = [k for k in keys if k not in tgt]
            if missing:
                raise CopyError(f"{tp.table}.{r.column}: {len(missing)} referenced {r.table} rows have no match on the "
                                f"target by {', '.join(r.match_on)} (e.g. {missing[0]}); "
                                f"{'configure a mapping' if not shared.insert_missing else 'copy shared rows first'}")
            mapping = {row[0]: tgt[tuple(row[1:])] for row in src_rows}
        maps[r.column] = mapping
    return maps


def row_transformer(tp: TablePlan, columns: list[str], maps: dict[str, dict[str, str]],
                    src_key: bytes | None, dst_key: bytes | None) -> Callable[[tuple], tuple]:
    idx = {c: i for i, c in enumerate(columns)}
    remaps = [(idx[col], m) for col, m in maps.items() if col in idx]
    specs = [ColumnSpec.from_doc(s) for s in tp.encrypted]
    if specs and (src_key is None or dst_key is None):
        raise CopyError(f"{tp.table} has encrypted columns but the key of the source or target cell is not configured")
    enc = [(s, idx[s.column], idx.get(s.iv_column) if s.iv_column else None) for s in specs]

    def transform(row: tuple) -> tuple:
        out = list(row)
        for i, m in remaps:
            v = out[i]
            if v is not None:
                out[i] = m[v]
        for spec, vi, ivi in enc:
            value, iv = spec.reencrypt(src_key, dst_key, out[vi], out[ivi] if ivi is not None else None)
            out[vi] = value
            if ivi is not None:
                out[ivi] = iv
        return tuple(out)

    return transform


# ---------------------------------------------------------------------------- streaming
WRITE_BUFFER = 1 << 20


def stream_rows(src: psycopg.Connection, dst_cur: psycopg.Cursor, select_sql: str, copy_in_sql: str,
                progress: Progress, transform: Callable[[tuple], tuple] | None) -> int:
    """Stream the rows of ``select_sql`` on ``src`` into ``copy_in_sql`` on the target cursor."""
    rows = 0
    with src.cursor() as scur:
        if transform is None:
            with scur.copy(f"COPY ({select_sql}) TO STDOUT (FORMAT binary)") as cin, \
                    dst_cur.copy(f"{copy_in_sql} (FORMAT binary)") as cout:
                # the source yields one small buffer per row: pass them on in ~1 MiB writes
                buf = bytearray()
                for data in cin:
                    buf += data
                    if len(buf) >= WRITE_BUFFER:
                        cout.write(bytes(buf))
                        progress.add(0, len(buf))
                        buf.clear()
                if buf:
                    cout.write(bytes(buf))
                    progress.add(0, len(buf))
            rows = dst_cur.rowcount
            progress.add(rows, 0)
        else:
            with scur.copy(f"COPY ({select_sql}) TO STDOUT") as cin, dst_cur.copy(copy_in_sql) as cout:
                for row in cin.rows():
                    out = transform(row)
                    cout.write_row(out)
                    rows += 1
                    progress.add(1, sum(len(v) for v in out if v is not None) + len(out))
    return rows


def sync_shared_table(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan, tp: TablePlan,
                      src_key: bytes | None = None, dst_key: bytes | None = None,
                      logger: Callable[[str], None] | None = None) -> dict:
    """Make every shared row the org references exist on the target (matched on ``match_on``)."""
    progress = Progress(f"shared {tp.table}", logger=logger)
    if not tp.insert_missing:  # looked up only (e.g. shards): every referenced row must match, maybe through a mapping
        problems = missing_matches(src, dst, tp)
        if problems:
            raise CopyError("; ".join(problems))
        return {"referenced": int(src.execute(f"SELECT count(*) FROM {qi(tp.table)} t WHERE {tp.where}").fetchone()[0]),
                "inserted": 0}
    cols = ", ".join(qi(c) for c in tp.columns)
    match = " AND ".join(f"x.{qi(c)} = s.{qi(c)}" for c in tp.match_on)
    transform = None
    if tp.needs_transform:
        transform = row_transformer(tp, tp.columns, remap_tables(src, dst, plan, tp), src_key, dst_key)
    with src.transaction(), dst.transaction():
        with dst.cursor() as dcur:
            dcur.execute(f"CREATE TEMP TABLE _om_stage (LIKE {qi(tp.table)}) ON COMMIT DROP")
            # a stage row needs a transform (e.g. encryption) only when it is really inserted, but
            # rewriting all referenced rows keeps the code path single; the set is small.
            referenced = stream_rows(src, dcur, tp.select_sql(), f"COPY _om_stage ({cols}) FROM STDIN", progress,
                                     transform if transform else None)
            missing = dcur.execute(f"SELECT {', '.join('s.' + qi(c) for c in tp.match_on)} FROM _om_stage s "
                                   f"WHERE NOT EXISTS (SELECT 1 FROM {qi(tp.table)} x WHERE {match}) LIMIT 6").fetchall()
            inserted = 0
            if missing and not tp.insert_missing:
                raise CopyError(f"{tp.table}: the target cell has no row matching {', '.join(tp.match_on)} = "
                                f"{', '.join(str(m[0] if len(m) == 1 else m) for m in missing[:5])}; configure a mapping")
            if missing:
                dcur.execute("SET LOCAL session_replication_role = replica")
                dcur.execute(f"INSERT INTO {qi(tp.table)} ({cols}) SELECT {cols} FROM _om_stage s "
                             f"WHERE NOT EXISTS (SELECT 1 FROM {qi(tp.table)} x WHERE {match}) ON CONFLICT DO NOTHING")
                inserted = dcur.rowcount
                still = dcur.execute(f"SELECT {', '.join('s.' + qi(c) for c in tp.key)} FROM _om_stage s WHERE NOT EXISTS "
                                     f"(SELECT 1 FROM {qi(tp.table)} x WHERE {match}) LIMIT 5").fetchall()
                if still:
                    raise CopyError(f"{tp.table}: rows {still} could not be inserted on the target: their "
                                    f"{', '.join(tp.key)} is taken by a different row (id collision)")
    (logger or log.info)(f"shared {tp.table}: {referenced} referenced, {inserted} inserted, {referenced - inserted} already on target")
    return {"referenced": referenced, "inserted": inserted}


# ---------------------------------------------------------------------------- preflight helpers
def key_collisions(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan, batch: int = 20000,
                   samples: int = 5, ignore_org_rows: bool = False) -> tuple[int, list]:
    """Org rows whose key already exists on the target. Fast path: no target row in the key range.
    ``ignore_org_rows``: target rows that are this org's (a copy left by an earlier move) do not count."""
    first = qi(tp.key[0])
    lo, hi, n = src.execute(f"SELECT min(t.{first}), max(t.{first}), count(*) FROM {qi(tp.table)} t WHERE {tp.where}").fetchone()
    if not n:
        return 0, []
    in_range = dst.execute(f"SELECT count(*) FROM {qi(tp.table)} t WHERE t.{first} BETWEEN %s AND %s", (lo, hi)).fetchone()[0]
    if not in_range:
        return 0, []
    keyexpr = "ROW(" + ", ".join(f"t.{qi(c)}" for c in tp.key) + ")::text"
    found, sample = 0, []
    with src.transaction(), src.cursor(name="om_keys") as cur:
        cur.itersize = batch
        cur.execute(f"SELECT {keyexpr} FROM {qi(tp.table)} t WHERE {tp.where}")
        while True:
            keys = [r[0] for r in cur.fetchmany(batch)]
            if not keys:
                break
            rows = dst.execute(f"SELECT {keyexpr} FROM {qi(tp.table)} t WHERE t.{first} BETWEEN %s AND %s "
                               f"AND {keyexpr} = ANY(%s)" + (f" AND NOT coalesce({tp.where}, false)" if ignore_org_rows else ""),
                               (lo, hi, keys)).fetchall()
            found += len(rows)
            sample.extend(r[0] for r in rows[: samples - len(sample)])
    return found, sample


def delete_org_rows(conn: psycopg.Connection, plan: Plan, tables: Iterable[str] | None = None,
                    logger: Callable[[str], None] | None = None, source: psycopg.Connection | None = None) -> dict[str, int]:
    """Delete the org's rows of ``tables`` (default: all org tables) from ``conn`` in one transaction.

    The rows to delete are computed for every table first and deleted afterwards, so the predicates
    (which reach through parent tables) see the data as it was. With ``source`` (when cleaning a
    target), the keys of the org's rows on the source are deleted too: after a partial copy a child
    table can be on the target while its parent is not, and the predicate alone would miss it. Keys
    are unique across cells, so these rows can only be the org's.
    """
    names = sorted(tables) if tables is not None else sorted(t.table for t in plan.of("org"))
    counts: dict[str, int] = {}
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for i, name in enumerate(names):
            tp = plan.tables[name]
            keys = ", ".join(f"t.{qi(c)}" for c in tp.key)
            conn.execute(f"CREATE TEMP TABLE _om_del_{i} ON COMMIT DROP AS SELECT {keys} FROM {qi(name)} t WHERE {tp.where}")
            if source is not None:
                with source.cursor() as scur, conn.cursor() as dcur:
                    with scur.copy(f"COPY (SELECT {keys} FROM {qi(name)} t WHERE {tp.where}) TO STDOUT (FORMAT binary)") as cin, \
                            dcur.copy(f"COPY _om_del_{i} FROM STDIN (FORMAT binary)") as cout:
                        for data in cin:
                            cout.write(data)
        for i, name in enumerate(names):
            tp = plan.tables[name]
            cond = " AND ".join(f"t.{qi(c)} = d.{qi(c)}" for c in tp.key)
            cur = conn.execute(f"DELETE FROM {qi(name)} t USING (SELECT DISTINCT * FROM _om_del_{i}) d WHERE {cond}")
            counts[name] = cur.rowcount
    if source is not None:
        source.commit()
    (logger or log.info)(f"deleted {sum(counts.values()):,} rows of organization {plan.organization_id} from {len(names)} tables")
    return counts


def missing_matches(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan) -> list[str]:
    """Referenced rows of a looked-up shared table that have no match on the target (after the mapping)."""
    problems = []
    match = ", ".join(f"t.{qi(c)}" for c in tp.match_on)
    for row in src.execute(f"SELECT DISTINCT {match} FROM {qi(tp.table)} t WHERE {tp.where}").fetchall():
        wanted = tuple(tp.value_map.get(str(v), v) for v in row)
        cond = " AND ".join(f"{qi(c)} = %s" for c in tp.match_on)
        if not dst.execute(f"SELECT 1 FROM {qi(tp.table)} WHERE {cond}", wanted).fetchone():
            shown = row[0] if len(row) == 1 else row
            via = f" (mapped to {wanted[0] if len(wanted) == 1 else wanted})" if wanted != tuple(row) else ""
            problems.append(f"{tp.table}: {', '.join(tp.match_on)} = {shown}{via} is used by the organization on the "
                            f"source but has no match on the target cell; add it to the target or configure a mapping")
    return problems


def check_shared_matches(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan) -> list[str]:
    """Shared rows that must already exist on the target (insert_missing false) and do not."""
    return [p for tp in plan.of("shared") if not tp.insert_missing for p in missing_matches(src, dst, tp)]


__all__ = ["CopyResult", "Progress", "sync_shared_table", "key_collisions", "delete_org_rows",
           "org_stats", "check_shared_matches", "PreflightError"]


# ---------------------------------------------------------------------------- chunks and change sync
INTEGER_TYPES = {"bigint", "integer", "smallint"}
_INTEGERS = re.compile(r"-?[0-9]+(?:,-?[0-9]+)*")


def chunk_bounds(conn: psycopg.Connection, tp: TablePlan, column: str, chunk_rows: int) -> list[int]:
    """Lower bounds of chunks 2..n: every ``chunk_rows``-th value of ``column`` among the org's rows."""
    rows = conn.execute(
        f"SELECT k FROM (SELECT t.{qi(column)} AS k, row_number() OVER (ORDER BY t.{qi(column)}) AS rn "
        f"FROM {qi(tp.table)} t WHERE {tp.where}) s WHERE rn > 1 AND rn % {int(chunk_rows)} = 1 ORDER BY k").fetchall()
    return sorted({r[0] for r in rows})


def range_sql(column: str | None, lo: int | None, hi: int | None, alias: str = "t") -> str:
    parts = []
    if column and lo is not None:
        parts.append(f"{alias}.{qi(column)} >= {int(lo)}")
    if column and hi is not None:
        parts.append(f"{alias}.{qi(column)} < {int(hi)}")
    return " AND ".join(parts) or "true"


def bucket_sql(column: str | None, bounds: list[int], alias: str = "t") -> str:
    """The chunk number of a row: width_bucket over the chunk bounds (0 when the table is one chunk)."""
    if not column or not bounds:
        return "0"
    return f"width_bucket({alias}.{qi(column)}, ARRAY[{', '.join(str(int(b)) for b in bounds)}]::bigint[])"


def _stream_keys(src: psycopg.Connection, dcur: psycopg.Cursor, tp: TablePlan, where: str, temp: str) -> None:
    keys = ", ".join(f"t.{qi(c)}" for c in tp.key)
    dcur.execute(f"CREATE TEMP TABLE {temp} ON COMMIT DROP AS SELECT {keys} FROM {qi(tp.table)} t WITH NO DATA")
    with src.cursor() as scur:
        with scur.copy(f"COPY (SELECT {keys} FROM {qi(tp.table)} t WHERE {where}) TO STDOUT (FORMAT binary)") as cin, \
                dcur.copy(f"COPY {temp} FROM STDIN (FORMAT binary)") as cout:
            for data in cin:
                cout.write(data)


def copy_chunk(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan, tp: TablePlan, column: str | None,
               lo: int | None, hi: int | None, transform: Callable[[tuple], tuple] | None, progress: Progress,
               fresh: bool = False) -> int:
    """Copy one chunk of the org's rows in one target transaction, replacing whatever an earlier,
    interrupted attempt of the same chunk left there (found by the source's keys and by the org
    predicate on the target). Killing the process at any point leaves either the whole chunk or none."""
    rng = range_sql(column, lo, hi)
    where = f"({tp.where}) AND {rng}"
    cols = ", ".join(qi(c) for c in tp.columns)
    match = " AND ".join(f"t.{qi(c)} = k.{qi(c)}" for c in tp.key)
    try:
        src.commit()
        with src.transaction(), dst.transaction():
            with dst.cursor() as dcur:
                dcur.execute("SET LOCAL session_replication_role = replica")
                if not fresh:  # an earlier attempt of this chunk may have committed before it was recorded
                    _stream_keys(src, dcur, tp, where, "_om_chunk_keys")
                    dcur.execute(f"DELETE FROM {qi(tp.table)} t WHERE {rng} AND (({tp.where}) OR EXISTS "
                                 f"(SELECT 1 FROM _om_chunk_keys k WHERE {match}))")
                return stream_rows(src, dcur, f"SELECT {', '.join('t.' + qi(c) for c in tp.columns)} FROM {qi(tp.table)} t "
                                   f"WHERE {where}", f"COPY {qi(tp.table)} ({cols}) FROM STDIN", progress, transform)
    except psycopg.errors.UniqueViolation as e:
        raise CopyError(f"{tp.table}: a row of the organization already exists on the target "
                        f"({e.diag.message_detail or e}); nothing of this chunk was written") from e
    except psycopg.Error as e:
        raise CopyError(f"{tp.table}: copy failed, nothing of this chunk was written: {str(e).strip()}") from e


def modified_sql(xmin: int, alias: str = "t") -> str:
    """Rows written by a transaction at or after ``xmin`` (the oldest transaction that was still
    running when the pre-copy started): they may have changed since they were copied."""
    return f"age({alias}.xmin) <= age('{int(xmin) % (1 << 32)}'::xid)"


def bucket_counts(conn: psycopg.Connection, tp: TablePlan, column: str | None, bounds: list[int]) -> dict[int, int]:
    b = bucket_sql(column, bounds)
    return {int(k): int(n) for k, n in conn.execute(f"SELECT {b}, count(*) FROM {qi(tp.table)} t WHERE {tp.where} GROUP BY 1")}


def sync_changed_rows(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan, tp: TablePlan, column: str | None,
                      bounds: list[int], xmin: int, transform: Callable[[tuple], tuple] | None,
                      logger: Callable[[str], None] | None = None, dst_counts_conn: psycopg.Connection | None = None) -> dict:
    """In the write window: re-copy the org's rows written since the pre-copy started (inserted or
    updated) and find the chunks where rows were deleted on the source.

    One counting scan of the org's rows per cell (in parallel when ``dst_counts_conn`` is given): on the
    source per chunk the rows and the rows written since ``xmin``; on the target per chunk the rows.
    Only chunks with written rows are read again. Then :func:`apply_deletions`, once every table is
    synced (the org predicate on the target must still see their parents), compares the org's keys
    of every chunk: rows no longer the org's on the source are deleted, rows that became the org's
    without being written are returned to copy."""
    progress = Progress(f"sync {tp.table}", logger=logger)
    cols = ", ".join(qi(c) for c in tp.columns)
    match = " AND ".join(f"t.{qi(c)} = s.{qi(c)}" for c in tp.key)
    b = bucket_sql(column, bounds)
    src_sql = (f"SELECT {b}, count(*), count(*) FILTER (WHERE {modified_sql(xmin)}) FROM {qi(tp.table)} t "
               f"WHERE {tp.where} GROUP BY 1")
    if dst_counts_conn is not None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(bucket_counts, dst_counts_conn, tp, column, bounds)
            src_stats = {int(k): (int(n), int(m)) for k, n, m in src.execute(src_sql)}
            dst_counts = fut.result()
        dst_counts_conn.commit()
    else:
        src_stats = {int(k): (int(n), int(m)) for k, n, m in src.execute(src_sql)}
        dst_counts = bucket_counts(dst, tp, column, bounds)
    src.commit()
    dirty = sorted(k for k, (_, m) in src_stats.items() if m)
    changed, new_by_bucket = 0, {}
    if dirty:
        in_dirty = f"{b} IN ({', '.join(str(k) for k in dirty)})" if column and bounds else "true"
        with src.transaction(), dst.transaction():
            with dst.cursor() as dcur:
                dcur.execute("SET LOCAL session_replication_role = replica")
                dcur.execute(f"CREATE TEMP TABLE _om_changed ON COMMIT DROP AS SELECT {cols} FROM {qi(tp.table)} WITH NO DATA")
                changed = stream_rows(src, dcur, f"SELECT {', '.join('t.' + qi(c) for c in tp.columns)} FROM {qi(tp.table)} t "
                                      f"WHERE ({tp.where}) AND {in_dirty} AND {modified_sql(xmin)}",
                                      f"COPY _om_changed ({cols}) FROM STDIN", progress, transform)
                sb = bucket_sql(column, bounds, "s")
                new_by_bucket = {int(k): int(n) for k, n in dcur.execute(
                    f"SELECT {sb}, count(*) FROM _om_changed s WHERE NOT EXISTS "
                    f"(SELECT 1 FROM {qi(tp.table)} t WHERE {match}) GROUP BY 1")}
                dcur.execute(f"DELETE FROM {qi(tp.table)} t USING _om_changed s WHERE {match}")
                dcur.execute(f"INSERT INTO {qi(tp.table)} ({cols}) SELECT {cols} FROM _om_changed")
        src.commit()
    dst_after = {k: dst_counts.get(k, 0) + new_by_bucket.get(k, 0) for k in set(dst_counts) | set(new_by_bucket)}
    src_counts = {k: n for k, (n, _) in src_stats.items()}
    differ = sorted(k for k in set(src_counts) | set(dst_after) if src_counts.get(k, 0) != dst_after.get(k, 0))
    if changed or differ:
        (logger or log.info)(f"sync {tp.table}: {changed:,} rows written since the pre-copy re-copied; "
                             f"{len(differ)} chunks where the org's row counts differ")
    # every chunk's keys are compared by apply_deletions, not only those whose counts differ: rows that
    # joined the org with a parent were not written (the scan does not see them), and a chunk where as
    # many rows joined as left or were deleted counts the same on both cells
    return {"changed": changed, "chunks_to_reconcile": sorted(set(src_counts) | set(dst_after)),
            "chunks_counts_differ": len(differ),
            "extra_on_target": sum(dst_after.get(k, 0) - src_counts.get(k, 0) for k in differ)}


def _delete_staged(dcur: psycopg.Cursor, tables: list[TablePlan]) -> dict[str, int]:
    """Second step of a deletion: every table's rows to delete were staged in ``_om_gone_<i>`` first
    (while the org predicate still saw their parents); delete them now. Returns rows per table."""
    counts = {}
    for i, tp in enumerate(tables):
        match = " AND ".join(f"t.{qi(c)} = g.{qi(c)}" for c in tp.key)
        dcur.execute(f"DELETE FROM {qi(tp.table)} t USING _om_gone_{i} g WHERE {match}")
        counts[tp.table] = counts.get(tp.table, 0) + dcur.rowcount
    return counts


def apply_deletions(src: psycopg.Connection, dst: psycopg.Connection, plan: Plan,
                    todo: list[tuple[TablePlan, str | None, list[int], list[int]]],
                    logger: Callable[[str], None] | None = None) -> tuple[dict[str, int], dict[str, list[tuple]]]:
    """Delete from the target the org's rows that are no longer the org's on the source, in the
    chunks ``todo`` names (table plan, chunk column, bounds, chunk numbers). Every table's rows to
    delete are computed first (the org predicate on the target still sees their parents), then
    deleted, in one transaction. Returns the rows deleted per table, and per table the keys (as
    text) the org has on the source but not on the target in those chunks: rows that joined the
    org with a parent without being written themselves (to copy by key: :func:`sync_keys`)."""
    counts: dict[str, int] = {}
    missing: dict[str, list[tuple]] = {}
    if not todo:
        return counts, missing
    with dst.transaction():
        with dst.cursor() as dcur:
            dcur.execute("SET LOCAL session_replication_role = replica")
            for i, (tp, column, bounds, chunks) in enumerate(todo):
                in_chunks = f"{bucket_sql(column, bounds)} IN ({', '.join(str(int(c)) for c in chunks)})"
                _stream_keys(src, dcur, tp, f"({tp.where}) AND {in_chunks}", f"_om_src_{i}")
                keys = ", ".join(f"t.{qi(c)}" for c in tp.key)
                match = " AND ".join(f"t.{qi(c)} = k.{qi(c)}" for c in tp.key)
                dcur.execute(f"CREATE TEMP TABLE _om_gone_{i} ON COMMIT DROP AS SELECT {keys} FROM {qi(tp.table)} t "
                             f"WHERE ({tp.where}) AND {in_chunks} AND NOT EXISTS (SELECT 1 FROM _om_src_{i} k WHERE {match})")
                lacking = dcur.execute(f"SELECT {', '.join(f'k.{qi(c)}::text' for c in tp.key)} FROM _om_src_{i} k WHERE "
                                       f"NOT EXISTS (SELECT 1 FROM {qi(tp.table)} t WHERE ({tp.where}) AND {match})").fetchall()
                if lacking:
                    missing[tp.table] = [tuple(r) for r in lacking]
            counts = _delete_staged(dcur, [tp for tp, *_ in todo])
    src.commit()
    (logger or log.info)(f"deleted on the target {sum(counts.values()):,} rows deleted on the source since the pre-copy: "
                         + ", ".join(f"{t} {n}" for t, n in counts.items() if n))
    return counts, missing


# ---------------------------------------------------------------------------- sync by captured keys
def key_types(conn: psycopg.Connection, tp: TablePlan) -> list[str]:
    """SQL types of the table's key columns: from the plan, or (a plan recorded without them) the catalog."""
    return tp.key_types or column_types(conn, tp.table, tp.key)


def key_filter(columns: list[str], types: list[str], keys: list[tuple], alias: str = "t") -> tuple[str, list]:
    """SQL (and parameters) true for the rows whose ``columns`` (a key, or a foreign key) are one of
    ``keys`` (text values as captured), written so an index on them is used."""
    if len(columns) == 1:
        values = [k[0] for k in keys]
        if types[0] in INTEGER_TYPES:
            # an array literal: much cheaper to pass than a list of 1M strings (checked in one match)
            literal = ",".join(map(str, values))
            if not values or _INTEGERS.fullmatch(literal):
                return f"{alias}.{qi(columns[0])} = ANY(%s::{types[0]}[])", ["{" + literal + "}"]
        return f"{alias}.{qi(columns[0])} = ANY(%s::{types[0]}[])", [values]
    cols = ", ".join(f"{alias}.{qi(c)}" for c in columns)
    arrays = ", ".join(f"%s::{t}[]" for t in types)
    return f"({cols}) IN (SELECT * FROM unnest({arrays}))", [[k[i] for k in keys] for i in range(len(columns))]


def sync_keys(src: psycopg.Connection, dst: psycopg.Connection, tp: TablePlan, keys: set[tuple],
              transform: Callable[[tuple], tuple] | None, logger: Callable[[str], None] | None = None,
              batch: int = 50_000, entered: Callable[[list[tuple]], None] | None = None) -> dict:
    """In the write window: re-copy the org's rows whose key was written on the source since the
    pre-copy (captured keys), replacing the target's rows with those keys, in one target transaction.
    Keys no longer among the org's rows on the source (deleted, or moved out of the org) are returned
    as ``absent``; they are deleted by :func:`delete_absent` once every table is synced.

    ``entered``: called, before the target commits, with the keys of rows that are the org's on the
    source but were not on the target (new rows, or rows that joined the org, e.g. a project moved
    into one of its groups, whose own rows then follow: :func:`rows_through`)."""
    progress = Progress(f"sync {tp.table}", logger=logger)
    cols = ", ".join(qi(c) for c in tp.columns)
    types = key_types(src, tp)
    kcols = ", ".join(f"t.{qi(c)}::text" for c in tp.key)
    ordered = sorted(keys)
    changed = 0
    new: list[tuple] = []
    with src.transaction(), dst.transaction():
        # the keys still the org's and their rows from one snapshot (a catch-up runs while the org is writable)
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        present: set[tuple] = set()
        for i in range(0, len(ordered), batch):
            cond, params = key_filter(tp.key, types, ordered[i:i + batch])
            present |= {tuple(r) for r in src.execute(tp.picked_sql(cond, kcols), params)}
        now = sorted(present)
        with dst.cursor() as dcur:
            dcur.execute("SET LOCAL session_replication_role = replica")
            if entered is not None and present:
                new = sorted(present - org_keys(dst, tp, present))
                if new:
                    entered(new)
            # every present key deleted before any row is written: a unique value that moved between two
            # of them cannot collide; by key array, which uses the key's index whatever the statistics say
            parts = [key_filter(tp.key, types, now[i:i + batch]) for i in range(0, len(now), batch)]
            for cond, params in parts:
                dcur.execute(f"DELETE FROM {qi(tp.table)} t WHERE {cond}", params)
            for cond, params in parts:  # the org predicate was checked above: the rows by key
                sel = f"SELECT {', '.join('t.' + qi(c) for c in tp.columns)} FROM {qi(tp.table)} t WHERE {bind(src, cond, params)}"
                changed += stream_rows(src, dcur, sel, f"COPY {qi(tp.table)} ({cols}) FROM STDIN", progress, transform)
    absent = sorted(k for k in keys if k not in present)
    (logger or log.info)(f"sync {tp.table}: {len(keys):,} keys written since the pre-copy: {changed:,} rows re-copied, "
                         f"{len(absent):,} gone from the organization on the source")
    out = {"changed": changed, "absent_keys": [list(k) for k in absent]}
    if entered is not None:
        out["entered"] = len(new)
    return out


def org_keys(conn: psycopg.Connection, tp: TablePlan, keys: set[tuple] | list[tuple], batch: int = 50_000) -> set[tuple]:
    """Those of ``keys`` (as text) whose rows are the org's on this cell."""
    keys, out, types = sorted(keys), set(), key_types(conn, tp)
    kcols = ", ".join(f"t.{qi(c)}::text" for c in tp.key)
    for i in range(0, len(keys), batch):
        cond, params = key_filter(tp.key, types, keys[i:i + batch])
        out |= {tuple(r) for r in conn.execute(tp.picked_sql(cond, kcols), params)}
    return out


def column_types(conn: psycopg.Connection, table: str, columns: list[str]) -> list[str]:
    types = dict(conn.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                              "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                              (qi(table),)).fetchall())
    return [types[c] for c in columns]


def rows_through(conn: psycopg.Connection, child: TablePlan, edge: dict, parent: TablePlan, parent_keys: list[tuple],
                 org: bool = True, batch: int = 50_000) -> set[tuple]:
    """Keys (as text) of the rows of ``child`` that hang off the rows ``parent_keys`` of ``parent``
    through ``edge`` (one of ``child.parents``), on this cell: with ``org``, only those the org
    predicate selects (a row may also belong through another parent); without, every such row."""
    keys = sorted(parent_keys)
    if edge["ref_columns"] != parent.key:  # the edge references other columns of the parent: their values
        values: set[tuple] = set()
        cols = ", ".join(f"t.{qi(c)}::text" for c in edge["ref_columns"])
        parent_types = key_types(conn, parent)
        for i in range(0, len(keys), batch):
            cond, params = key_filter(parent.key, parent_types, keys[i:i + batch])
            values |= {tuple(r) for r in conn.execute(f"SELECT DISTINCT {cols} FROM {qi(parent.table)} t WHERE {cond}", params)}
        keys, types = sorted(values), column_types(conn, parent.table, edge["ref_columns"])
    else:
        types = key_types(conn, parent)
    out: set[tuple] = set()
    kcols = ", ".join(f"t.{qi(c)}::text" for c in child.key)
    when = ""
    if edge.get("when"):
        type_col, value = edge["when"]
        when = f" AND t.{qi(type_col)} = {ql(value)}"
    for i in range(0, len(keys), batch):
        cond = bind(conn, *key_filter(edge["columns"], types, keys[i:i + batch])) + when
        sql = child.picked_sql(cond, kcols) if org else f"SELECT {kcols} FROM {qi(child.table)} t WHERE {cond}"
        out |= {tuple(r) for r in conn.execute(sql)}
    return out


def bind(conn: psycopg.Connection, cond: str, params: list) -> str:
    """``cond`` with its ``%s`` placeholders replaced by SQL literals of ``params``."""
    from psycopg import sql as _sql

    parts = cond.split("%s")
    if len(parts) != len(params) + 1:
        raise ValueError("placeholders and parameters differ")
    out = [parts[0]]
    for p, rest in zip(params, parts[1:]):
        out += [_sql.Literal(p).as_string(conn), rest]
    return "".join(out)


def delete_absent(dst: psycopg.Connection, plan: Plan, todo: list[tuple[TablePlan, list[str], list[tuple]]],
                  logger: Callable[[str], None] | None = None,
                  leaving: list[tuple[TablePlan, list[str], list[tuple]]] | None = None) -> dict[str, int]:
    """Delete from the target the org's rows whose keys (``todo``: table plan, key types, keys) are
    no longer the org's on the source. Only rows the org predicate still selects on the target are
    deleted (a key of another organization's row is never touched); every table's rows are found
    first, then deleted, in one transaction. ``leaving``: rows (same form) that left the org with a
    parent, found beforehand by :func:`rows_through`; deleted by key in the same transaction."""
    counts: dict[str, int] = {}
    staged = [(tp, types, keys, True) for tp, types, keys in todo] + [(tp, types, keys, False) for tp, types, keys in leaving or []]
    if not staged:
        return counts
    with dst.transaction():
        with dst.cursor() as dcur:
            dcur.execute("SET LOCAL session_replication_role = replica")
            for i, (tp, types, keys, checked) in enumerate(staged):
                cond, params = key_filter(tp.key, types, keys)
                kcols = ", ".join(f"t.{qi(c)}" for c in tp.key)
                rows = tp.picked_sql(cond, kcols) if checked else f"SELECT {kcols} FROM {qi(tp.table)} t WHERE {cond}"
                dcur.execute(f"CREATE TEMP TABLE _om_gone_{i} ON COMMIT DROP AS {rows}", params)
            counts = _delete_staged(dcur, [tp for tp, *_ in staged])
    (logger or log.info)(f"deleted on the target {sum(counts.values()):,} rows gone from the organization on the source "
                         "since the pre-copy: " + ", ".join(f"{t} {n}" for t, n in counts.items() if n))
    return counts
