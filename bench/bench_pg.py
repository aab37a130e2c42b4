"""PostgreSQL benchmark of the mover on local cells, each number against a baseline measured in the
same run. Run: `make bench` (or .venv/bin/python bench/bench_pg.py --filler-rows 10000000).

  (a) pre-copy of a 100k-row org          vs  raw `psql COPY (<org query>) TO STDOUT | psql COPY ... FROM STDIN`
  (b) write window with 1% of it changed  vs  a full re-copy of the org (the pre-copy). The org keeps
      writing (an application thread, 500 rows/s in transactions of 5 rows, each committed only if the
      Topology Service says the org is not in maintenance) from the catch-up task on; the window task
      starts once 1% of the org was written since, and the writes go on until it blocks them. The window
      syncs and compares what came after its last catch-up pass.
  (b') the same, but 1% of the org written in one burst right after the window's last catch-up pass,
      just before the block: all of it synced and compared inside the window (the worst case)
  (c) validation (checksums, both cells)  vs  a plain scan streaming the same rows from both cells
  (d) moving a 1k-row org from a cell of ~N rows vs from a cell of ~100k rows
  (e) peak memory (RSS) of a copy worker on the largest table of a large org vs a small org
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", str(ROOT / ".orgmover" / "run"))
Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)

from orgmover import gitlab, mover  # noqa: E402
from orgmover.cli import run_move  # noqa: E402
from orgmover.devenv import DevEnv  # noqa: E402
from orgmover.localpg import bin_dir  # noqa: E402
from orgmover.plan import qi  # noqa: E402
from orgmover.report import table  # noqa: E402
from orgmover.seed import OrgSpec, seed  # noqa: E402


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return time.monotonic() - t, r


def precopy(ctx, mid, tables):
    mover.prepare_target(ctx, mid)
    mover.copy_tables(ctx, mid, tables)


def window(ctx, mid, before_block=None):
    """As the DAG's window task runs it: connections prepared and a last catch-up pass while the org is
    still writable (not counted), then writes blocked: maintenance on, the changes synced, the org
    validated (the rows written since the baseline), go/no-go. The route switch after it (one
    compare-and-set, which lifts maintenance) is left out here so the org can be validated again for
    (c). Returns (seconds writes were blocked, the window's answer)."""
    out = mover.write_window(ctx, mid, switch=False, before_block=before_block)
    return out["seconds"]["total"], out


def _parts(out: dict) -> str:
    took = out["seconds"]
    return (f"block {took['maintenance_on']:.2f}, sync {took['sync']:.2f} ({out['rows_synced_in_window']:,} rows), "
            f"validate {took['validate']:.2f}, go {took['go_no_go']:.2f}; before the block: prepared "
            f"{took['prepared_before']:.2f}, last catch-up {took['caught_up_before']:.2f}")


def _write_steadily(dsn: str, topology_url: str, token: str, org_id: int, rate: float, batch: int,
                    committed, refused, error, stop) -> None:
    """The application's loop (in its own process): see :class:`SteadyWriter`."""
    from orgmover.topology import TopologyClient

    try:
        with psycopg.connect(dsn) as c, TopologyClient(topology_url, token) as topology:
            ns = "SELECT id FROM namespaces WHERE organization_id = %s"
            keys = [("issues", "title", r[0]) for r in c.execute(
                f"SELECT id FROM issues WHERE namespace_id IN ({ns}) ORDER BY random() LIMIT 2000", (org_id,))]
            keys += [("notes", "note", r[0]) for r in c.execute(
                f"SELECT n.id FROM notes n JOIN issues i ON n.noteable_type = 'Issue' AND i.id = n.noteable_id "
                f"WHERE i.namespace_id IN ({ns}) ORDER BY random() LIMIT 2000", (org_id,))]
            c.commit()
            t0, i = time.monotonic(), 0
            while True:
                table, column, _ = keys[i % len(keys)]
                ids = [k[2] for k in keys[i % len(keys): i % len(keys) + batch] if k[0] == table]
                with c.transaction() as tx:
                    c.execute(f"UPDATE {table} SET {column} = left(coalesce({column}, ''), 200) || ' (w)' "
                              f"WHERE id = ANY(%s)", (ids,))
                    if topology.route(org_id)["maintenance"]:
                        refused.value += len(ids)
                        raise psycopg.Rollback(tx)
                if refused.value:  # idle (not exiting: an interpreter's exit takes CPU) until the benchmark is done
                    stop.wait()
                    return
                committed.value += len(ids)
                i += batch
                time.sleep(max(0.0, t0 + committed.value / rate - time.monotonic()))
    except Exception as e:  # noqa: BLE001 (reported by the benchmark)
        error.put(repr(e))


class SteadyWriter:
    """The application: edits the org's issues and notes at ``rate`` rows/s, ``batch`` rows a transaction,
    until the org is in maintenance. Each transaction writes, then asks the Topology Service, and commits
    only when the org is not in maintenance (otherwise rolls back and stops): the application's side of
    the window's wait for transactions writing when maintenance goes on. A process of its own, as the
    application's workers are: a thread of the benchmark would compete with the window for the
    interpreter's lock, which the mover's task does not share with GitLab's processes."""

    def __init__(self, dsn: str, topology_url: str, token: str, org_id: int, rate: float = 500.0, batch: int = 5):
        ctx = multiprocessing.get_context("spawn")
        self.rate = rate
        self._committed, self._refused, self._error, self._stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Queue(), ctx.Event()
        self._process = ctx.Process(target=_write_steadily, daemon=True,
                                    args=(dsn, topology_url, token, org_id, rate, batch, self._committed, self._refused,
                                          self._error, self._stop))

    def start(self) -> None:
        self._process.start()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Let it end once it was refused (it stops writing then, and waits for this)."""
        self._stop.set()
        self._process.join(timeout)

    @property
    def refused(self) -> int:
        return self._refused.value

    @property
    def committed(self) -> int:
        return self._committed.value

    @property
    def error(self) -> str | None:
        return None if self._error.empty() else self._error.get()


def raw_pipe(src_dsn: str, dst_dsn: str, plan) -> int:
    """psql | psql per table, the same rows, into an empty copy of the schema."""
    psql = str(bin_dir() / "psql")
    n = 0
    for tp in plan.of("org"):
        cols = ", ".join(qi(c) for c in tp.columns)
        out = subprocess.Popen([psql, "-X", "-q", src_dsn, "-c", f"COPY ({tp.select_sql()}) TO STDOUT (FORMAT binary)"],
                               stdout=subprocess.PIPE)
        res = subprocess.run([psql, "-X", "-v", "ON_ERROR_STOP=1", dst_dsn, "-c", "SET session_replication_role = replica",
                              "-c", f"COPY {qi(tp.table)} ({cols}) FROM STDIN (FORMAT binary)"],
                             stdin=out.stdout, capture_output=True, text=True)
        out.wait()
        if res.returncode:
            raise SystemExit(f"raw pipe failed for {tp.table}: {res.stderr}")
        n += int(res.stdout.split()[-1])
    return n


def plain_scan(src_dsn: str, dst_dsn: str, plan) -> None:
    def scan(dsn):
        with psycopg.connect(dsn) as c, c.cursor() as cur:
            for tp in plan.tables.values():
                if tp.strategy == "skip":
                    continue
                with cur.copy(f"COPY ({tp.select_sql()}) TO STDOUT") as cp:
                    for _ in cp:
                        pass
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(scan, [src_dsn, dst_dsn]))


def change_one_percent(dsn: str, org_id: int, rows: int) -> int:
    n = max(rows // 100, 1)
    per = n // 4
    with psycopg.connect(dsn) as c:
        ns = "SELECT id FROM namespaces WHERE organization_id = %s"
        c.execute(f"UPDATE issues SET title = title || ' (edited)' WHERE id IN (SELECT id FROM issues WHERE namespace_id IN ({ns}) "
                  f"ORDER BY random() LIMIT {per})", (org_id,))
        c.execute(f"UPDATE notes SET note = coalesce(note, '') || ' (edited)' WHERE id IN (SELECT n.id FROM notes n "
                  f"JOIN issues i ON n.noteable_type = 'Issue' AND i.id = n.noteable_id WHERE i.namespace_id IN ({ns}) "
                  f"ORDER BY random() LIMIT {per})", (org_id,))
        c.execute(f"DELETE FROM label_links WHERE id IN (SELECT l.id FROM label_links l JOIN labels b ON b.id = l.label_id "
                  f"JOIN projects p ON p.id = b.project_id WHERE p.organization_id = %s ORDER BY random() LIMIT {per})", (org_id,))
        c.execute(f"INSERT INTO events (project_id, author_id, action, target_type) SELECT project_id, author_id, 5, 'Bench' "
                  f"FROM events WHERE project_id IN (SELECT id FROM projects WHERE organization_id = %s) LIMIT {n - 3 * per}",
                  (org_id,))
    return n


def peak_rss_of_copy(home: Path, mid: int, table_name: str) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "orgmover.cli", "--home", str(home), "copy-table", str(mid), table_name],
                            stdout=subprocess.DEVNULL)
    p, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    if proc.returncode:
        raise SystemExit(f"copy-table failed with {proc.returncode}")
    return peak / (1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--org-rows", type=int, default=100_000)
    ap.add_argument("--filler-rows", type=int, default=10_000_000, help="rows on the busy source cell for (d)")
    ap.add_argument("--home", default=str(ROOT / ".orgmover" / "bench"))
    ap.add_argument("--only", default="abcde", help="which measures to run, e.g. abc")
    ap.add_argument("--verbose", action="store_true", help="print the mover's log lines")
    ap.add_argument("--keep", action="store_true", help="leave the cells running afterwards (for a look)")
    args = ap.parse_args()
    env = DevEnv(Path(args.home))
    env.down(destroy=True, log=lambda *_: None)
    env.up(ncells=2, log=lambda *_: None)
    t_start = time.monotonic()
    ctx = env.context(log=(lambda msg: print(f"  | {time.monotonic() - t_start:8.2f} {msg}", flush=True))
                      if args.verbose else (lambda *_: None))
    ctx.chunk_rows = 20_000
    # PostgreSQL only: the cells' repositories, buckets and registries are left out (bench_git, bench_objects
    # and bench_registry measure those)
    ctx.resolve_cell = lambda name, _r=env.resolve_cell: dataclasses.replace(_r(name), storage=None)
    legacy = env.resolve_cell("legacy")
    topo = env.topology()
    print(f"seeding a {args.org_rows:,}-row org and two 1k-row orgs", flush=True)
    orgs = seed(legacy.dsn, [OrgSpec("bench-a", args.org_rows), OrgSpec("small-one", 1000), OrgSpec("small-two", 1000),
                             OrgSpec("bench-b", args.org_rows)],
                db_key_base=legacy.db_key_base, seed=1, log=lambda *_: None)
    for o in orgs:
        topo.create_route(o.id, "legacy")
    a, s1, s2, b = orgs
    rows = []

    # (a) pre-copy vs raw pipe
    mid = mover.preflight(ctx, a.id, "legacy", "cell-1", "bench")
    tables = mover.make_plan(ctx, mid)
    plan = mover.load_plan(ctx, mid)
    t_copy, _ = timed(precopy, ctx, mid, tables)
    t_fk, _ = timed(mover.precopy_done, ctx, mid)  # foreign-key check and baseline checksums, reported apart
    raw_db = "raw_target"
    cell1 = env.load()["cells"][1]
    env.cluster("cell-1", cell1["port"]).create_database(raw_db)
    raw_dsn = env.cluster("cell-1", cell1["port"]).uri(raw_db)
    gitlab.install_schema(raw_dsn, 1, "cell-1")
    t_raw, raw_rows = timed(raw_pipe, legacy.dsn, raw_dsn, plan)
    rows.append(["(a) org copy throughput", f"{a.total / t_copy:,.0f} rows/s ({t_copy:.2f}s)",
                 f"raw psql|psql: {raw_rows / t_raw:,.0f} rows/s ({t_raw:.2f}s)", f"{t_raw / t_copy:.2f}x", ">= 1.0x"])
    rows.append(["    then foreign keys + baseline checksums", f"{t_fk:.2f}s", "(org writable)", "", ""])

    # (b) write window with 1% changed vs full re-copy; as in the DAG, the catch-up task first (here with
    # nothing to sync but the raw pipe's writes on the target cell, which the target slot saw); the org
    # writes all along, and the window task starts once 1% of it was written since
    mover.catch_up(ctx, mid)
    state = env.load()
    writer = SteadyWriter(legacy.dsn, env.topology_url(state), state["topology"]["token"], a.id)
    writer.start()
    while writer.committed < a.total // 100 and writer.is_alive():
        time.sleep(0.01)
    t_win, out = window(ctx, mid)
    refused = writer.refused
    writer.join(30)
    if writer.error or writer.is_alive() or not refused:
        raise SystemExit(f"the application process failed: {writer.error or 'still writing after the block'}")
    rows.append(["(b) write window, 1% changed, writes go on", f"{t_win:.2f}s ({_parts(out)})",
                 f"full re-copy: {t_copy:.2f}s", f"{t_win / t_copy:.3f}x", "<= 0.1x"])
    rows.append([f"    {writer.committed:,} rows written at {writer.rate:.0f}/s", "until the block", "", "", ""])

    # (c) validation (every chunk of every table, both cells) vs plain scan
    t_val, _ = timed(mover.validate_all, ctx, mid, full=True, again=True)
    t_scan, _ = timed(plain_scan, legacy.dsn, env.resolve_cell("cell-1").dsn, plan)
    rows.append(["(c) validation of the org (both cells)", f"{t_val:.2f}s", f"plain scan: {t_scan:.2f}s",
                 f"{t_scan / t_val:.2f}x speed", ">= 0.8x"])
    mover.go_no_go(ctx, mid)
    mover.switchover(ctx, mid)

    # (b') 1% in one burst after the window's last catch-up pass: all of it inside the window
    m_b = mover.preflight(ctx, b.id, "legacy", "cell-1", "bench-burst")
    t_copy_b, _ = timed(precopy, ctx, m_b, mover.make_plan(ctx, m_b))
    mover.precopy_done(ctx, m_b)
    mover.catch_up(ctx, m_b)
    burst = {}
    t_win_b, out_b = window(ctx, m_b, lambda: burst.setdefault("rows", change_one_percent(legacy.dsn, b.id, b.total)))
    rows.insert(4, [f"(b') {burst['rows']:,} rows (1%) in one burst", f"{t_win_b:.2f}s ({_parts(out_b)})",
                    f"full re-copy: {t_copy_b:.2f}s", f"{t_win_b / t_copy_b:.3f}x", "(worst case)"])
    mover.release(ctx, m_b)
    mover.rollback(ctx, m_b)
    if not set(args.only) & set("de"):
        print()
        print(table(["measure", "orgmover", "baseline (same run)", "ratio", "goal"], rows))
        if not args.keep:
            env.down(destroy=True, log=lambda *_: None)
        return 0

    # (d) cost follows the org, not the cell
    with psycopg.connect(legacy.dsn) as c:
        cell_rows_small = sum(r[0] for r in c.execute(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r'"))
    t_small_cell, _ = timed(run_move, ctx, s1.id, "legacy", "cell-1")
    print(f"seeding filler organizations up to {args.filler_rows:,} rows on the source cell", flush=True)
    filler, left, i = [], args.filler_rows, 0
    while left > 0:
        n = min(1_000_000, left)
        filler += seed(legacy.dsn, [OrgSpec(f"filler-{i}", n)], db_key_base=legacy.db_key_base, seed=100 + i, log=lambda *_: None)
        left, i = left - n, i + 1
    with psycopg.connect(legacy.dsn, autocommit=True) as c:
        c.execute("ANALYZE")
    for o in filler:
        topo.create_route(o.id, "legacy")
    t_big_cell, _ = timed(run_move, ctx, s2.id, "legacy", "cell-1")
    rows.append([f"(d) move a 1k-row org", f"from a {args.filler_rows / 1e6:.0f}M-row cell: {t_big_cell:.2f}s",
                 f"from a {max(cell_rows_small, a.total) / 1e3:.0f}k-row cell: {t_small_cell:.2f}s",
                 f"{t_big_cell / t_small_cell:.2f}x", "<= 2x"])

    # (b2) the same number of changed rows in a 10x larger org: the window follows the changes, not the org
    big = max(filler, key=lambda o: o.total)
    m_big = mover.preflight(ctx, big.id, "legacy", "cell-1", "bench-b2")
    tabs_big = mover.make_plan(ctx, m_big)
    t_copy_big, _ = timed(precopy, ctx, m_big, tabs_big)
    mover.precopy_done(ctx, m_big)
    mover.catch_up(ctx, m_big)
    burst_big = {}  # as many rows as in (b'), in one burst after the last pass
    t_win_big, out_big = window(ctx, m_big, lambda: burst_big.setdefault("rows", change_one_percent(legacy.dsn, big.id, a.total)))
    rows.insert(5, [f"(b2) same {burst_big['rows']:,}-row burst, {big.total / 1e6:.1f}M-row org",
                    f"{t_win_big:.2f}s ({_parts(out_big)})",
                    f"full re-copy: {t_copy_big:.2f}s", f"{t_win_big / t_copy_big:.3f}x", "<= 0.1x"])
    mover.release(ctx, m_big)
    mover.rollback(ctx, m_big)

    # (e) peak memory of a copy worker on the largest table
    def rss_for(org):
        m = mover.preflight(ctx, org.id, "legacy", "cell-1", "bench-rss")
        tabs = mover.make_plan(ctx, m)
        mover.prepare_target(ctx, m)
        p = mover.load_plan(ctx, m)
        largest = max(tabs, key=lambda t: p.tables[t].est_bytes)
        mb = peak_rss_of_copy(Path(args.home), m, largest)
        mover.rollback(ctx, m)
        return largest, p.tables[largest].est_rows, mb
    t_big, n_big, mb_big = rss_for(big)
    extra = seed(legacy.dsn, [OrgSpec("rss-small", 3000)], db_key_base=legacy.db_key_base, seed=999, log=lambda *_: None)[0]
    topo.create_route(extra.id, "legacy")
    t_small, n_small, mb_small = rss_for(extra)
    rows.append([f"(e) copy worker peak RSS, {t_big}", f"{n_big:,} rows: {mb_big:.0f} MiB", f"{n_small:,} rows: {mb_small:.0f} MiB",
                 f"{mb_big / mb_small:.2f}x", "flat, < 300 MiB"])

    print()
    print(table(["measure", "orgmover", "baseline (same run)", "ratio", "goal"], rows))
    if not args.keep:
        env.down(destroy=True, log=lambda *_: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
