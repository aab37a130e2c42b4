"""The phases of an organization move, as plain functions over a :class:`MoveContext`.

Airflow operators call these (one per task) and so does the CLI; they know nothing of Airflow.
Every phase reads and writes its state in :mod:`orgmover.tracking`, so it can be retried and
resumes from what is recorded. Invariants:

* preflight and dry run change nothing anywhere;
* rows are copied only while the org is in maintenance owned by this migration;
* the route moves to the target only after validation passed, in one compare-and-set that also
  lifts maintenance, so an org is never half-routed;
* a failure before the switch lifts maintenance and leaves the route on the source (``release``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg

from orgmover import report
from orgmover.catalog import Catalog, load_dictionary, read_catalog, read_foreign_keys
from orgmover.cells import Cell, check_cell_name
from orgmover.cells import release as release_connection
from orgmover.errors import (ClassificationError, ConfigError, OrgMoverError, PreflightError, StateError,
                             ValidationFailed, is_transient)
from orgmover.pgcopy import (INTEGER_TYPES, Progress, apply_deletions, check_shared_matches, chunk_bounds, copy_chunk,
                             bind, delete_absent, delete_org_rows, key_collisions, key_filter, key_types, org_keys, org_stats,
                             remap_tables, row_transformer, rows_through, sync_changed_rows, sync_keys, sync_shared_table)
from orgmover.plan import Plan, Planner, TablePlan, qi
from orgmover.topology import NotFound, TopologyClient, VersionConflict
from orgmover.tracking import Tracking
from orgmover.validation import encrypted_diff, fk_violations

log = logging.getLogger("orgmover.mover")
# seconds the window waits for transactions that were writing on the source when maintenance went on
# (migration option ``writers_timeout``); Vitess's SwitchTraffic waits 30 s for the target to catch up
WRITERS_TIMEOUT = 30.0
# seconds the window's last catch-up pass may take and writes still be blocked after it (migration option
# ``max_lag_seconds``): the writes made during it are what the window syncs; like Vitess's
# --max-replication-lag-allowed (30 s), a switch is not started while the target lags further behind
MAX_LAG = 30.0


@dataclass
class MoveContext:
    tracking: Tracking
    topology: TopologyClient
    resolve_cell: Callable[[str], Cell]
    dictionary_dir: Path
    reports_dir: Path
    log: Callable[[str], None] = field(default=log.info)
    chunk_rows: int = field(default_factory=lambda: int(os.environ.get("ORGMOVER_CHUNK_ROWS", "20000")))
    plans: dict = field(default_factory=dict, repr=False)
    bounds: dict = field(default_factory=dict, repr=False)  # migration id -> chunk bounds per table (as plans)
    # migration id -> the route version at which this context blocked the org's writes itself
    blocked: dict = field(default_factory=dict, repr=False)

    # cell name -> the cell, resolved once per context (and per resolver: a context copied with another
    # resolver starts empty); in Airflow each resolution reads connections through the API server
    cells: dict = field(default_factory=dict, init=False, repr=False)

    def cell(self, name: str) -> Cell:
        got = self.cells.get((self.resolve_cell, name))
        if got is None:
            got = self.cells[(self.resolve_cell, name)] = self.resolve_cell(check_cell_name(name))
        return got

    def owner(self, mid: int) -> str:
        return f"orgmover-migration-{mid}"


# ------------------------------------------------------------------------------------------ helpers
def _root_table(plan_or_dict: dict) -> tuple[str, str]:
    for e in plan_or_dict.values():
        if e.sharding_key and len(e.sharding_key) == 1:
            col, ref = next(iter(e.sharding_key.items()))
            if ref == e.table_name:
                return e.table_name, col
    raise ConfigError("the table dictionary names no sharding root (a table whose sharding_key points at itself)")


def _catalog_and_plan(conn: psycopg.Connection, dictionary: dict, org_id: int) -> tuple[Catalog, Plan]:
    catalog = read_catalog(conn)
    return catalog, Planner(catalog, dictionary, conn).build(org_id)


def load_plan(ctx: MoveContext, mid: int) -> Plan:
    """The migration's plan (read once per process: a plan does not change after the plan phase)."""
    cached = ctx.plans.get(mid)
    if cached is not None:
        return cached
    m = ctx.tracking.get(mid, plan=True)
    if not m["plan"]:
        raise StateError(f"migration {mid} has no plan yet; run the plan phase first")
    ctx.plans[mid] = Plan.from_dict(m["plan"])
    return ctx.plans[mid]


def _phase(ctx: MoveContext, mid: int, phase: str):
    class _P:
        def __enter__(self):
            ctx.tracking.phase_started(mid, phase)
            return self

        def __exit__(self, et, ev, tb):
            ctx.tracking.phase_finished(mid, phase, "failed" if et else "succeeded")
            if et is not None:
                ctx.tracking.event(mid, "error", f"{phase}: {ev}")
            return False
    return _P()


# ------------------------------------------------------------------------------------------ preflight
@dataclass
class PreflightResult:
    migration_id: int | None
    problems: list[str]
    notes: list[str]
    plan: Plan | None = None
    route_version: int | None = None
    moving_back: int | None = None      # the earlier move (target -> source) whose copy on the target is replaced
    value_maps: dict | None = None      # the mappings used (given, or inverted from the move being undone)


def run_checks(ctx: MoveContext, org_id: int, source: str, target: str, value_maps: dict | None = None) -> PreflightResult:
    """All read-only preflight checks. Returns problems instead of raising, for the dry-run report."""
    problems: list[str] = []
    notes: list[str] = []
    if not isinstance(org_id, int) or isinstance(org_id, bool) or org_id < 1:
        return PreflightResult(None, [f"organization id must be a positive integer, got {org_id!r}"], notes)
    try:
        check_cell_name(source)
        check_cell_name(target)
    except ConfigError as e:
        return PreflightResult(None, [str(e)], notes)
    if source == target:
        return PreflightResult(None, [f"source and target are the same cell ({source})"], notes)
    known = {c["name"] for c in ctx.topology.cells()}
    for name, role in ((source, "source"), (target, "target")):
        if name not in known:
            problems.append(f"unknown {role} cell {name!r}: the Topology Service knows {', '.join(sorted(known)) or 'no cells'}")
    if problems:
        return PreflightResult(None, problems, notes)
    try:
        src_cell, dst_cell = ctx.cell(source), ctx.cell(target)
        src, dst = src_cell.connect(), dst_cell.connect()
    except ConfigError as e:
        return PreflightResult(None, [str(e)], notes)
    with src, dst:
        dictionary = load_dictionary(ctx.dictionary_dir)
        src_cat, dst_cat = read_catalog(src), read_catalog(dst)
        if src_cat.schema_version != dst_cat.schema_version:
            problems.append(f"schema versions differ: {source} is at {src_cat.schema_version}, "
                            f"{target} is at {dst_cat.schema_version}; migrate both cells to the same version first")
        elif src_cat.fingerprint() != dst_cat.fingerprint():
            diff = sorted({t for t, _ in src_cat.fingerprint()} ^ {t for t, _ in dst_cat.fingerprint()})
            problems.append(f"schemas differ although both are at version {src_cat.schema_version}"
                            + (f" (tables only on one side: {', '.join(diff)})" if diff else " (column definitions differ)"))
        root, root_col = _root_table(dictionary)
        if not src.execute(f"SELECT 1 FROM {qi(root)} WHERE {qi(root_col)} = %s", (org_id,)).fetchone():
            problems.append(f"organization {org_id} does not exist on source cell {source}")
        route_version = None
        try:
            route = ctx.topology.route(org_id)
            route_version = route["version"]
            if route["cell"] != source:
                problems.append(f"organization {org_id} is routed to cell {route['cell']}, not to source {source}"
                                + (" (already moved)" if route["cell"] == target else ""))
        except NotFound:
            route = None
            problems.append(f"organization {org_id} has no route in the Topology Service")
        active = ctx.tracking.active_for_org(org_id)
        if active and (active["source_cell"], active["target_cell"]) != (source, target):
            problems.append(f"organization {org_id} has an unfinished migration #{active['id']} "
                            f"({active['source_cell']} -> {active['target_cell']}, {active['state']}); "
                            f"roll it back first (orgmover rollback {active['id']})")
            active = None
        if route and route.get("maintenance") and (not active or route.get("maintenance_owner") != ctx.owner(active["id"])):
            problems.append(f"organization {org_id} is in maintenance held by {route.get('maintenance_owner') or 'someone else'}")
        # moving back: an earlier move of the org from the target to the source left its copy on the target
        # (not cleaned yet); that copy is replaced, as the source has the org's rows as they are now
        back = ctx.tracking.move_left_behind(org_id, target, source) if not active else None
        if back and value_maps is None and (back.get("options") or {}).get("value_maps"):
            value_maps, problem = _inverted_maps(back["options"]["value_maps"])
            if problem:
                problems.append(f"moving back migration #{back['id']}: {problem}; configure a mapping")
            else:
                notes.append(f"moving back migration #{back['id']}: its mappings inverted: {value_maps}")
        plan = None
        try:
            _, plan = _catalog_and_plan(src, dictionary, org_id)
            plan.apply_value_maps(value_maps)
        except ClassificationError as e:
            problems.extend(e.problems)
        if plan is not None and not problems:
            problems.extend(check_shared_matches(src, dst, plan))
            adopt = active is not None
            left = 0
            for tp in plan.of("org"):
                n, sample = key_collisions(src, dst, tp, ignore_org_rows=back is not None)
                if n and adopt:
                    notes.append(f"{tp.table}: {n} rows already on the target from migration #{active['id']}; "
                                 f"they are replaced")
                elif n:
                    problems.append(f"id collision: {n} rows of organization {org_id} in {tp.table} already exist on "
                                    f"{target} (keys {', '.join(sample)})"
                                    + (" and are not the organization's" if back else ""))
                if back:
                    left += int(dst.execute(f"SELECT count(*) FROM {qi(tp.table)} t WHERE {tp.where}").fetchone()[0])
            if back:
                notes.append(f"moving organization {org_id} back: {left:,} of its rows are still on {target} from "
                             f"migration #{back['id']} (switched {back['switched_at']:%Y-%m-%d %H:%M:%S} UTC); they are "
                             f"replaced by the rows as they are on {source} now")
        return PreflightResult(active["id"] if active else None, problems, notes, plan, route_version,
                               back["id"] if back else None, value_maps)


def _inverted_maps(maps: dict) -> tuple[dict, str | None]:
    out: dict = {}
    for table, vm in maps.items():
        inv = {}
        for k, v in vm.items():
            if v in inv:
                return {}, f"the mapping of {table} sends {inv[v]!r} and {k!r} to {v!r}, so it cannot be inverted"
            inv[v] = k
        out[table] = inv
    return out, None


def _driven_elsewhere(org_id: int, m: dict) -> PreflightError:
    return PreflightError(f"organization {org_id} is being moved by run {m['dag_run_id']!r} (migration #{m['id']}, "
                          f"{m['state']}), which is still running: one run drives a migration. Wait for that run "
                          f"to end, or mark it failed, then trigger again; nothing was changed")


def preflight(ctx: MoveContext, org_id: int, source: str, target: str, run_id: str | None = None,
              value_maps: dict | None = None, run_alive: Callable[[str], bool] | None = None) -> int:
    """Run every check; on success create (or adopt an unfinished) migration. Changes no cell.
    ``value_maps`` maps shared rows matched on one column, e.g. {"shards": {"storage-2": "default"}}.
    One run drives a migration: an unfinished one is adopted only when the run that drove it has ended
    (``run_alive(run_id)`` says whether a run is still queued or running; without it, any run adopts);
    two runs at the same instant, exactly one gets it and the other the same refusal."""
    ctx.tracking.ensure_schema()  # the mover's own tables, upgraded in place (idempotent), once per run
    res = run_checks(ctx, org_id, source, target, value_maps)
    for n in res.notes:
        ctx.log(n)
    if res.problems:
        raise PreflightError(res.problems)
    if res.migration_id is not None:
        m = ctx.tracking.get(res.migration_id)
        other = m["dag_run_id"]
        if other and other != run_id and run_alive is not None and run_alive(other):
            raise _driven_elsewhere(org_id, m)
        adopted = ctx.tracking.adopt(m["id"], other, run_id)
        if adopted is None:  # another run adopted it between the read and the compare-and-set
            raise _driven_elsewhere(org_id, ctx.tracking.get(m["id"]))
        m = adopted
        if other != run_id:
            ctx.tracking.event(m["id"], "info", f"adopted by run {run_id} from run {other} (ended): resuming ({m['state']})")
        ctx.log(f"resuming migration #{m['id']} of organization {org_id} ({m['state']})")
    else:
        try:
            m = ctx.tracking.create(org_id, source, target, run_id)
        except psycopg.errors.UniqueViolation:  # another run created one at the same instant
            active = ctx.tracking.active_for_org(org_id)
            if active is None:
                raise
            raise _driven_elsewhere(org_id, active) from None
        ctx.tracking.event(m["id"], "info", f"created by run {run_id}")
        ctx.log(f"created migration #{m['id']}: organization {org_id} {source} -> {target}")
    opts = dict(m.get("options") or {})
    if res.value_maps is not None:
        opts["value_maps"] = res.value_maps
    if res.moving_back:
        opts["moves_back"] = res.moving_back
    if opts != (m.get("options") or {}):
        ctx.tracking.update(m["id"], options=opts)
    ctx.tracking.phase_started(m["id"], "preflight")
    ctx.tracking.phase_finished(m["id"], "preflight")
    return m["id"]


# ------------------------------------------------------------------------------------------ plan
def make_plan(ctx: MoveContext, mid: int) -> list[str]:
    """Plan every table, record it, and return the org tables to copy (the map of the copy phase)."""
    m = ctx.tracking.get(mid)
    with _phase(ctx, mid, "plan"):
        with ctx.cell(m["source_cell"]).connect() as src:
            catalog, plan = _catalog_and_plan(src, load_dictionary(ctx.dictionary_dir), m["organization_id"])
            plan.apply_value_maps((m.get("options") or {}).get("value_maps"))
            for tp in plan.tables.values():
                if tp.strategy != "skip":
                    tp.est_rows, tp.est_bytes = org_stats(src, tp)
            ctx.tracking.update(mid, plan=plan.to_dict())
            ctx.plans[mid] = plan
            ctx.tracking.init_tables(mid, [(t.table, t.strategy) for t in plan.tables.values() if t.strategy != "skip"])
            for tp in plan.of("org"):
                first = catalog[tp.table].column(tp.key[0])
                column = tp.key[0] if first is not None and first.type in INTEGER_TYPES else None
                bounds = chunk_bounds(src, tp, column, ctx.chunk_rows) if column and tp.est_rows > ctx.chunk_rows else []
                if not ctx.tracking.chunks(mid, tp.table):
                    ctx.tracking.update_table(mid, tp.table, chunk_column=column)
                    ctx.tracking.init_chunks(mid, tp.table, bounds)
        if m["state"] == "created":
            ctx.tracking.transition(mid, "planned", ("created",))
        rows = sum(t.est_rows for t in plan.of("org"))
        ctx.log(f"plan: {len(plan.of('org'))} org tables ({rows:,} rows), {len(plan.of('shared'))} shared, "
                f"{len(plan.of('skip'))} never copied")
    return sorted(t.table for t in plan.of("org"))


def copy_groups(ctx: MoveContext, mid: int, max_groups: int = 4, group_bytes: int = 32 << 20) -> list[list[str]]:
    """The org tables to pre-copy, in groups of about equal size (the plan's estimated bytes, the largest
    table first into the lightest group): one group per ``group_bytes`` up to ``max_groups``. Each group
    is one task of the DAG, so a small org is one task start, not one per table, and a big one a few
    tasks side by side (each copies its tables with two workers)."""
    import heapq

    plan = load_plan(ctx, mid)
    tables = sorted(plan.of("org"), key=lambda t: (-(t.est_bytes or 0), t.table))
    total = sum(t.est_bytes or 0 for t in tables)
    n = max(1, min(max_groups, len(tables), -(-total // max(1, group_bytes))))
    heap = [(0, i, []) for i in range(n)]
    for t in tables:
        size, i, names = heapq.heappop(heap)
        names.append(t.table)
        heapq.heappush(heap, (size + (t.est_bytes or 0), i, names))
    return [sorted(names) for _, _, names in sorted(heap, key=lambda g: g[1]) if names]


# ------------------------------------------------------------------------------------------ dry run
def measure_throughput(conn: psycopg.Connection, plan: Plan, sample_bytes: int = 8 << 20) -> float:
    """Bytes/s of streaming the org's largest table out of the source (a short sample)."""
    tables = sorted(plan.of("org"), key=lambda t: t.est_bytes, reverse=True)
    if not tables or tables[0].est_bytes == 0:
        return 0.0
    tp = tables[0]
    n, t0 = 0, time.monotonic()
    with conn.cursor() as cur:
        with cur.copy(f"COPY ({tp.select_sql()}) TO STDOUT (FORMAT binary)") as cp:
            for data in cp:
                n += len(data)
                if n >= sample_bytes:
                    break
    return n / max(time.monotonic() - t0, 1e-6)


def _storage_estimate(ctx: MoveContext, source: str, target: str, plan: Plan, rate: float) -> str:
    """Per non-database data type (repositories, objects per type, container images): items, bytes, what is
    missing on the source, and the first replication's time extrapolated from a short sample measured now
    (see :func:`orgmover.storage.estimate`; read-only on both cells). ``rate`` (the rows' streaming rate) is
    not used: storage has its own costs."""
    from orgmover import report as rep
    from orgmover.storage import estimate

    src_cell, dst_cell = ctx.cell(source), ctx.cell(target)
    if src_cell.storage is None or dst_cell.storage is None:
        return ""
    t0 = time.monotonic()
    for _ in range(5):  # the registry's bookkeeping: about 3 round trips to the state database per item
        with ctx.tracking.conn() as c:
            c.execute("SELECT 1")
    bookkeeping = 3 * (time.monotonic() - t0) / 5
    try:
        with src_cell.connect() as src:
            kinds = estimate(src, plan, src_cell.storage, dst_cell.storage, per_item_overhead=bookkeeping)
    except Exception as e:  # noqa: BLE001 - the dry run reports it instead of failing
        return f"\nNon-database data could not be measured: {type(e).__name__}: {e}\n"
    if not kinds:
        return ""
    rows = []
    for k in kinds:
        sample = (f"{k.sampled} ({rep.fmt_bytes(k.sample_bytes)}) in {k.sample_seconds:.2f}s" if k.sampled else "none")
        rows.append([k.name, f"{k.items:,}", rep.fmt_bytes(k.bytes), f"{k.missing:,}" if k.missing else "-", sample,
                     f"{k.per_item * 1000:.1f} ms + {rep.fmt_bytes(1 / k.per_byte) + '/s' if k.per_byte else '-'}",
                     f"x{k.factor:g}", f"{k.seconds:.1f}s"])
    total = sum(k.seconds for k in kinds)
    lines = ["", "Non-database data (replicated before the write window, then verified):",
             rep.table(["data type", "items", "bytes", "missing", "measured sample", "per item + rate", "factor",
                        "estimate"], rows, "lrrrrrrr"), ""]
    lines += [f"  {k.name}: {k.detail}" for k in kinds if k.detail]
    lines += [f"  sample of {k.name}: {k.how}" for k in kinds]
    lines += [f"  per item includes the registry's bookkeeping, measured: {bookkeeping * 1000:.1f} ms",
              "",
              f"Estimated first replication: {total:.1f}s one item after the other (before the write window; the "
              f"window only syncs what changed since). It runs up to 4 workers per data type: how much that saves "
              f"depends on how many requests the stores and registries serve at once, and on free CPU."]
    missing = sum(k.missing for k in kinds)
    if missing:
        lines.append(f"{missing} items referenced by the organization's rows are missing on the source storage: "
                     f"the move would not pass until they are restored or their rows removed.")
    return "\n".join(lines) + "\n"


def dry_run(ctx: MoveContext, org_id: int, source: str, target: str,
            value_maps: dict | None = None) -> tuple[Path, list[str]]:
    """Check and plan without changing anything; write a readable report. Returns (path, problems)."""
    res = run_checks(ctx, org_id, source, target, value_maps)
    rate = 0.0
    if res.plan is not None:
        with ctx.cell(source).connect() as src:
            for tp in res.plan.tables.values():
                if tp.strategy != "skip":
                    tp.est_rows, tp.est_bytes = org_stats(src, tp)
            rate = measure_throughput(src, res.plan)
    text = report.dry_run_report(org_id, source, target, res.plan, res.problems, res.notes, rate)
    if res.plan is not None:
        text += _storage_estimate(ctx, source, target, res.plan, rate)
    ctx.reports_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.reports_dir / f"dry-run-org-{org_id}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.txt"
    path.write_text(text)
    ctx.log(text)
    return path, res.problems


# ------------------------------------------------------------------------------------------ quiesce
def maintenance_on(ctx: MoveContext, mid: int, m: dict | None = None) -> dict:
    """Block the org's writes: maintenance on in the Topology Service, owned by this migration.
    ``m``: the migration as just read (the write window reads it before it blocks). Returns it as it
    is after."""
    m = m or ctx.tracking.get(mid)
    org = m["organization_id"]
    block = dict(maintenance=True, maintenance_owner=ctx.owner(mid), reason=f"moving to {m['target_cell']}")
    with _phase(ctx, mid, "quiesce"):
        new = None
        seen = (m.get("options") or {}).get("open_route_version")
        if seen is not None and m["state"] in ("copied", "failed"):
            try:  # unchanged since the catch-up saw it on the source, writable: blocked without reading it again
                new = ctx.topology.update_route(org, seen, **block)
            except VersionConflict:
                pass  # changed since: read and checked below
        if new is None:
            route = ctx.topology.route(org)
            if route["cell"] != m["source_cell"]:
                raise StateError(f"organization {org} is routed to {route['cell']}, expected {m['source_cell']}")
            if route["maintenance"]:
                if route.get("maintenance_owner") != ctx.owner(mid):
                    raise StateError(f"organization {org} is in maintenance held by {route.get('maintenance_owner')}")
                ctx.log(f"organization {org} already in maintenance for migration #{mid} (window {m['maintenance_window']})")
                if route["version"] == m["route_version"]:
                    ctx.blocked[mid] = route["version"]
                return m
            new = ctx.topology.update_route(org, route["version"], **block)
        ctx.blocked[mid] = new["version"]
        # a new window: what changed since the pre-copy is synced and everything validated again in it
        m = ctx.tracking.transition(mid, "quiesced", ("copied", "failed", "quiesced", "validating", "validated"),
                                    maintenance_window=m["maintenance_window"] + 1,
                                    maintenance_started_at=datetime.now(timezone.utc), maintenance_ended_at=None,
                                    route_version=new["version"], error=None)
        ctx.tracking.event(mid, "info", f"maintenance on (route version {new['version']})")
        ctx.log(f"organization {org}: writes blocked, maintenance on (route version {new['version']})")
    return m


def _require_maintenance(ctx: MoveContext, m: dict) -> None:
    """The org is in maintenance for this migration: read from the Topology Service, unless this context
    blocked the writes itself at the route version the migration recorded (the window in one task);
    either way the switch refuses a route that changed under the migration."""
    if m["route_version"] is not None and ctx.blocked.get(m["id"]) == m["route_version"]:
        return
    route = ctx.topology.route(m["organization_id"])
    if not route["maintenance"] or route.get("maintenance_owner") != ctx.owner(m["id"]):
        raise StateError(f"organization {m['organization_id']} is not in maintenance for migration #{m['id']}; "
                         f"rows are only copied while writes are blocked (re-run from the quiesce step)")


# ------------------------------------------------------------------------------------------ copy
def _transformer(src, dst, plan: Plan, tp, src_cell: Cell, dst_cell: Cell):
    if not tp.needs_transform:
        return None
    return row_transformer(tp, tp.columns, remap_tables(src, dst, plan, tp), src_cell.key, dst_cell.key)


def _chunking(ctx: MoveContext, mid: int, table: str) -> tuple[str | None, list[int]]:
    return ctx.tracking.table(mid, table)["chunk_column"], _bounds(ctx, mid).get(table, [])


def copy_shared_rows(ctx: MoveContext, mid: int, in_window: bool = False, phase: str | None = None) -> None:
    """Make the shared rows the org references (users, LFS objects, pools; shards must match) exist
    on the target. Before the first copy, record the source's oldest running transaction: every row
    written from then on is synced again in the write window."""
    m = ctx.tracking.get(mid)
    if in_window:
        _require_maintenance(ctx, m)
    plan = load_plan(ctx, mid)
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    ctx.tracking.phase_started(mid, phase or ("sync" if in_window else "copy"))
    with src_cell.connect() as src, dst_cell.connect() as dst:
        if m["precopy_xmin"] is None:
            _open_capture(ctx, mid, src)
            xmin = src.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()[0]
            ctx.tracking.update(mid, precopy_xmin=xmin)
            ctx.log(f"pre-copy starts at source transaction {xmin}: rows written from now on are synced in the write window")
        if not in_window and phase != "catch_up":
            ctx.tracking.update(mid, state="copying")
        for tp in plan.shared_in_order():
            res = sync_shared_table(src, dst, plan, tp, src_cell.key, dst_cell.key, logger=ctx.log)
            ctx.tracking.update_table(mid, tp.table, state="copied", rows_copied=res["inserted"])


def _open_capture(ctx: MoveContext, mid: int, src) -> None:
    """Open the change-capture slot on the source before the first row is copied (see orgmover.changes)."""
    from orgmover import changes

    name = changes.slot_name(mid)
    try:
        lsn = changes.create_slot(src, name)
    except changes.CaptureUnavailable as e:
        ctx.log(f"change capture unavailable on the source ({e}); the write window will scan the rows "
                f"written since the pre-copy instead")
        return
    ctx.tracking.merge_options(mid, capture_slot=name, capture_lsn=lsn)
    ctx.log(f"change capture: replication slot {name} from {lsn}: rows written from now on are re-copied by key "
            f"in the write window")


def _close_capture(ctx: MoveContext, m: dict) -> None:
    """Drop the capture slots (source, and the target's for validation): a slot keeps its cell's WAL.
    A resumed migration falls back to the scan and to a full validation."""
    from orgmover import changes

    opts = m.get("options") or {}
    for key, cell in (("capture_slot", m["source_cell"]), ("capture_target_slot", m["target_cell"])):
        name = opts.get(key)
        if not name:
            continue
        try:
            with ctx.cell(cell).connect() as c:
                if changes.drop_slot(c, name):
                    ctx.log(f"change capture: replication slot {name} on {cell} dropped")
        except Exception as e:  # never block a switch or a release on it; say so loudly
            ctx.tracking.event(m["id"], "warning", f"could not drop replication slot {name} on {cell}: {e}; "
                                                   f"drop it by hand, it retains WAL")
            ctx.log(f"WARNING: could not drop replication slot {name} on {cell}: {e}")


def prepare_target(ctx: MoveContext, mid: int) -> None:
    m = ctx.tracking.get(mid)
    opts = m.get("options") or {}
    if opts.get("moves_back") and not opts.get("left_copy_removed"):
        _remove_left_copy(ctx, m, opts["moves_back"])
    copy_shared_rows(ctx, mid, in_window=False)


def _remove_left_copy(ctx: MoveContext, m: dict, back_id: int) -> None:
    """Moving an org back: delete the copy the earlier move left on this migration's target (its rows
    as of that switch), before the pre-copy writes the rows as they are now. Done once: a retried
    task must not delete rows the pre-copy wrote since."""
    back = ctx.tracking.get(back_id)
    org = m["organization_id"]
    route = ctx.topology.route(org)
    if back["state"] != "completed" or back["source_cleaned_at"] is not None or route["cell"] != m["source_cell"]:
        raise StateError(f"migration #{m['id']} moves organization {org} back (undoing #{back_id}), but #{back_id} is "
                         f"{back['state']}{', cleaned' if back['source_cleaned_at'] else ''} and the org is routed to "
                         f"{route['cell']}; nothing was deleted")
    plan = load_plan(ctx, m["id"])
    with ctx.cell(m["target_cell"]).connect() as dst, ctx.cell(m["source_cell"]).connect() as src:
        counts = delete_org_rows(dst, plan, logger=ctx.log, source=src)
    ctx.tracking.merge_options(m["id"], left_copy_removed=sum(counts.values()))
    ctx.tracking.update(back_id, source_cleaned_at=datetime.now(timezone.utc))
    ctx.tracking.merge_options(back_id, moved_back_by=m["id"])
    ctx.tracking.event(back_id, "info", f"moved back by migration #{m['id']}: the copy on {m['target_cell']} "
                                        f"({sum(counts.values())} rows) was replaced")
    ctx.log(f"moving organization {org} back: removed the {sum(counts.values()):,} rows migration #{back_id} left on "
            f"{m['target_cell']}; the pre-copy writes the rows as they are on {m['source_cell']} now")


def copy_table(ctx: MoveContext, mid: int, table: str, _shared: tuple | None = None) -> dict:
    """Pre-copy one org table chunk by chunk while the org is still writable. Each chunk is one
    target transaction and is recorded when done, so a killed or retried task resumes at the first
    chunk not recorded as copied, with no duplicate and no missing row. (``_shared``: the migration,
    plan and a connection factory, from :func:`copy_tables`.)"""
    m, plan, connections = _shared or (ctx.tracking.get(mid), load_plan(ctx, mid), None)
    tp = plan.tables.get(table)
    if tp is None or tp.strategy != "org":
        raise StateError(f"{table} is not an org table of migration #{mid}")
    if m["precopy_xmin"] is None:
        raise StateError(f"migration #{mid}: shared rows not copied yet (run prepare_target first)")
    column, chunks = ctx.tracking.copy_state(mid, table)
    todo = [c for c in chunks if c["state"] != "copied"]
    if not todo:
        done = sum(c["rows"] for c in chunks)
        ctx.log(f"{table}: all {len(chunks)} chunks already copied ({done:,} rows)")
        return {"table": table, "rows": done, "skipped": True}
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    progress = Progress(f"copy {table}", tp.est_rows, tp.est_bytes, logger=ctx.log)
    t0 = time.monotonic()
    if len(todo) < len(chunks):
        ctx.log(f"{table}: resuming at chunk {todo[0]['chunk_no'] + 1} of {len(chunks)}")
    rows = sum(c["rows"] for c in chunks if c["state"] == "copied")
    nbytes = sum(c["bytes"] for c in chunks if c["state"] == "copied")
    try:
        with contextlib.ExitStack() as stack:
            if connections is None:
                src, dst = stack.enter_context(src_cell.connect()), stack.enter_context(dst_cell.connect())
            else:
                src, dst = connections()
            transform = _transformer(src, dst, plan, tp, src_cell, dst_cell)
            for i, c in enumerate(todo):
                # the table's own state in the same transaction as its first and its last chunk's
                ctx.tracking.update_chunk(mid, table, c["chunk_no"], state="copying", attempts=c["attempts"] + 1,
                                          table_fields={"state": "copying", "error": None} if i == 0 else None)
                before = progress.bytes
                n = copy_chunk(src, dst, plan, tp, column, c["lo"], c["hi"], transform, progress,
                               fresh=c["attempts"] == 0 and c["state"] == "pending")
                rows, nbytes = rows + n, nbytes + progress.bytes - before
                done = {"state": "copied", "rows_copied": rows, "bytes_copied": nbytes,
                        "copy_seconds": time.monotonic() - t0} if i == len(todo) - 1 else None
                ctx.tracking.update_chunk(mid, table, c["chunk_no"], state="copied", rows=n, bytes=progress.bytes - before,
                                          table_fields=done)
    except Exception as e:
        ctx.tracking.update_table(mid, table, state="failed", error=str(e)[:2000])
        raise
    ctx.log(progress.line(final=True) + f" in {len(todo)} chunks")
    return {"table": table, "rows": rows, "bytes": nbytes}


def copy_tables(ctx: MoveContext, mid: int, tables: list[str], workers: int = 2) -> list[dict]:
    """Pre-copy several tables at once, the largest first; each worker keeps one connection per cell
    for all its tables (what the DAG's mapped copy tasks do across workers; the CLI and the benchmark
    use this)."""
    import threading

    m, plan = ctx.tracking.get(mid), load_plan(ctx, mid)
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    local, opened, lock = threading.local(), [], threading.Lock()

    def connections():
        c = getattr(local, "c", None)
        if c is None or any(x.closed or x.broken for x in c):
            c = local.c = (src_cell.connect(), dst_cell.connect())
            with lock:
                opened.extend(c)
        return c

    order = sorted(tables, key=lambda t: -(plan.tables[t].est_bytes or 0))
    try:
        with ThreadPoolExecutor(max(1, workers)) as ex:
            return list(ex.map(lambda t: copy_table(ctx, mid, t, (m, plan, connections)), order))
    finally:
        for c in opened:
            release_connection(c)  # kept for the next step of this task when clean


def sync_shared(ctx: MoveContext, mid: int) -> None:
    copy_shared_rows(ctx, mid, in_window=True)


def sync_all(ctx: MoveContext, mid: int, workers: int = 4, writable: bool = False,
             later: list[Callable[[], bool]] | None = None, m: dict | None = None,
             foreign_keys: Catalog | None = None) -> list[str] | None:
    """The write window's work in one task: shared rows, every table's changes since the pre-copy
    (tables in parallel, each worker with its own connections), deletions, foreign keys. Returns the
    tables to validate. One task instead of one per table: in the window, per-task overhead is writes
    blocked for nothing.

    ``writable``: the same while the org is still writable (:func:`catch_up`): only the changes since
    the last sync, no foreign-key check (a row may arrive before its parent; the window checks);
    returns None when there is no usable capture slot (nothing was done). ``later``: the foreign-key
    check is appended to it instead of run (:func:`write_window` runs it while validating). ``m``: the
    migration as the window has it, instead of reading it again; ``foreign_keys``: the target's,
    read before the block (:func:`_prepare_window`)."""
    import queue

    m = m or ctx.tracking.get(mid)
    if writable:
        route = ctx.topology.route(m["organization_id"])
        if route["maintenance"] or m["state"] not in ("copied", "failed"):
            raise StateError(f"migration #{mid} is {m['state']}{' in its write window' if route['maintenance'] else ''}: "
                             f"catching up is for the copy phase, after the pre-copy")
    plan = load_plan(ctx, mid)
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    t0 = time.monotonic()
    # meanwhile: the target's foreign keys (for their check) and, in the window, that writes are blocked
    # (checked before anything is written; reading the slot and recording what it holds loses nothing)
    background = ThreadPoolExecutor(2)

    def target_catalog():
        with dst_cell.connect() as c:
            return read_foreign_keys(c)

    catalog_future = background.submit(target_catalog) if not writable and later is None and foreign_keys is None \
        else None  # later: the check reads it
    blocked = background.submit(_require_maintenance, ctx, m) if not writable else None
    background.shutdown(wait=False)
    # what was written since the last sync (the pre-copy, or the last catch-up); in the window, up to after
    # the transactions that were writing when the writes were blocked (they may still commit org rows)
    writers = None if writable else float((m.get("options") or {}).get("writers_timeout", WRITERS_TIMEOUT))
    try:
        # in the window the slot is not advanced (a round trip that decodes again, with writes blocked): the
        # switch drops it, and a retried window's read merges what this one recorded
        captured = _captured_changes(ctx, m, src_cell, plan, after=(m.get("options") or {}).get("capture_synced_lsn"),
                                     writers_timeout=writers, move_slot=writable)
        if captured is None and writers is not None:  # the scan below must see them committed too
            from orgmover.changes import wait_for_writers

            with src_cell.connect() as c:
                wait_for_writers(c, writers)
    finally:
        if blocked is not None:
            blocked.result()
    if writable and captured is None:
        ctx.log("no change capture: nothing to catch up; the write window scans the rows written since the pre-copy")
        return None
    if _needs_shared_sync(plan, captured):
        copy_shared_rows(ctx, mid, in_window=not writable, phase="catch_up" if writable else "sync")
    else:  # a new reference to a shared row not on the target yet shows in the foreign-key check, which syncs them then
        ctx.tracking.phase_started(mid, "catch_up" if writable else "sync")
        ctx.log("shared rows: none written on the source since the last sync, no changed row remaps one")
    rows = {t["table_name"]: t for t in ctx.tracking.tables(mid, ["strategy", "state", "chunk_column"])}
    org_tables = sorted(t for t in rows if rows[t]["strategy"] == "org")
    not_copied = [t for t in org_tables if rows[t]["state"] != "copied"]
    if not_copied:
        raise StateError(f"tables not pre-copied: {', '.join(sorted(not_copied))}; re-run the copy phase")
    results: dict[str, dict] = {}
    work = []
    for t in org_tables:
        if captured is not None and t not in captured.rescan and not captured.of(t):
            results[t] = {"mode": "captured", "changed": 0, "absent_keys": []}
        else:
            work.append(t)
    # one (source, target) connection pair per worker, opened at once
    pool: queue.SimpleQueue = queue.SimpleQueue()
    opened: list = []
    n = min(max(1, workers), len(work))
    if n:
        with ThreadPoolExecutor(n) as ex:
            for pair in ex.map(lambda _: (src_cell.connect(), dst_cell.connect()), range(n)):
                opened.extend(pair)
                pool.put(pair)

    def one(table: str) -> tuple[str, dict]:
        tp = plan.tables[table]
        src, dst = pair = pool.get()
        try:
            if captured is not None and table not in captured.rescan:
                keys = captured.of(table)
                # rows that join the org on the target are recorded before it commits: their children follow
                hook = (lambda new: ctx.tracking.add_entered(mid, table, new)) if plan.children(table) else None
                res = sync_keys(src, dst, tp, keys, _transformer(src, dst, plan, tp, src_cell, dst_cell), logger=ctx.log,
                                entered=hook)
                return table, {"mode": "captured", "keys": len(keys), **res}
            if captured is not None:
                ctx.log(f"sync {table}: {captured.rescan[table]}: scanning the rows written since the pre-copy")
            column, bounds = rows[table]["chunk_column"], _bounds(ctx, mid).get(table, [])
            with dst_cell.connect() as dst2:
                return table, {"mode": "scan", **sync_changed_rows(src, dst, plan, tp, column, bounds, m["precopy_xmin"],
                                                                   _transformer(src, dst, plan, tp, src_cell, dst_cell),
                                                                   logger=ctx.log, dst_counts_conn=dst2)}
        finally:
            pool.put(pair)

    try:
        if work:
            with ThreadPoolExecutor(n) as ex:
                results.update(ex.map(one, work))
        if captured is not None:
            with src_cell.connect() as src, dst_cell.connect() as dst:
                for table, n_rows in _follow_entered(ctx, mid, plan, captured, src, dst, src_cell, dst_cell).items():
                    r = results.setdefault(table, {"mode": "captured", "changed": 0, "absent_keys": []})
                    r["changed"] += n_rows
                    r["joined_with_parent"] = n_rows
    finally:
        for c in opened:
            release_connection(c)  # kept for the next step of this task when clean
    recorded = {table: {"sync_detail": res} if writable else {"synced_in_window": m["maintenance_window"], "sync_detail": res}
                for table, res in results.items()}
    ctx.tracking.update_tables(mid, recorded)
    ctx.log(f"synced {len(results)} tables in {time.monotonic() - t0:.2f}s: "
            f"{sum(r['changed'] for r in results.values()):,} rows written since the {'last sync' if writable else 'pre-copy'}")
    # what sync_deletions reads, as just recorded (only sync_all writes sync_detail, of the org's tables)
    now = {t: {"strategy": r["strategy"], "synced_in_window": None, "sync_detail": None, **recorded.get(t, {})}
           for t, r in rows.items()}
    out = sync_deletions(ctx, mid, m, captured, catalog_future.result() if catalog_future else foreign_keys, writable,
                         later, now)
    if captured is not None:  # later syncs start from here
        ctx.tracking.merge_options(mid, capture_synced_lsn=captured.upto,
                                   **({"open_route_version": route["version"]} if writable and route["cell"] == m["source_cell"]
                                      else {}))
    return out


def _follow_children(plan: Plan, start: dict[str, set[tuple]], captured,
                     find: Callable[[TablePlan, dict, TablePlan, list[tuple]], set[tuple]]) -> dict[str, set[tuple]]:
    """Walk down from the rows ``start`` (keys per table) through every table's parent edges
    (``Plan.children``): ``find(child, edge, parent, keys)`` gives the child rows to follow, and their
    own children are followed in turn. Rows written since the pre-copy (``captured``) are synced on
    their own and not followed. Returns the keys found per table."""
    found: dict[str, set[tuple]] = {}
    queue = sorted((t, set(keys)) for t, keys in start.items() if keys)
    while queue:
        table, keys = queue.pop(0)
        for child, edge in plan.children(table):
            rows = find(child, edge, plan.tables[table], sorted(keys)) - captured.of(child.table) - found.get(child.table, set())
            if rows:
                found.setdefault(child.table, set()).update(rows)
                queue.append((child.table, rows))
    return found


def _follow_entered(ctx: MoveContext, mid: int, plan: Plan, captured, src, dst, src_cell: Cell, dst_cell: Cell) -> dict[str, int]:
    """Rows that joined the org on the target in the window (recorded by :func:`sync_keys`, kept until
    done) bring the rows that belong to the org through them: a project moved into one of the org's
    groups during the pre-copy brings its issues, their notes, and so on down, though none of those
    was written. New rows are found too; their children are new, captured and synced already, so
    each costs one lookup per child table. Returns rows copied per table."""
    pending = ctx.tracking.entered(mid)
    if not pending:
        return {}
    t0 = time.monotonic()
    joined = _follow_children(plan, pending, captured,
                              lambda child, edge, parent, keys: rows_through(src, child, edge, parent, keys))
    copied: dict[str, int] = {}
    for table, keys in sorted(joined.items()):
        child = plan.tables[table]
        copied[table] = sync_keys(src, dst, child, keys, _transformer(src, dst, plan, child, src_cell, dst_cell),
                                  logger=ctx.log)["changed"]
        captured.keys.setdefault(table, set()).update(keys)  # written by the window: foreign keys checked
    ctx.tracking.clear_entered(mid, list(pending))
    if copied:
        ctx.log(f"rows that joined the organization with a parent since the pre-copy, copied in "
                f"{time.monotonic() - t0:.2f}s: " + ", ".join(f"{t} {n:,}" for t, n in sorted(copied.items())))
    return copied


def _follow_leaving(src, dst, plan: Plan, absent: dict[str, list[tuple]], captured) -> dict[str, set[tuple]]:
    """Rows that leave the org with a parent (a project moved to another organization takes its issues
    along, though none of them was written): found on the target through the keys of the parents that
    are no longer the org's, before anything is deleted; a row the source still has as the org's
    (it also belongs through another parent) stays. Returns keys to delete per table."""
    def gone(child: TablePlan, edge: dict, parent: TablePlan, keys: list[tuple]) -> set[tuple]:
        candidates = rows_through(dst, child, edge, parent, keys, org=False) - captured.of(child.table)
        return candidates - org_keys(src, child, candidates) if candidates else set()

    return _follow_children(plan, {t: set(keys) for t, keys in absent.items()}, captured, gone)


def _needs_shared_sync(plan: Plan, captured) -> bool:
    if captured is None or captured.rescan:
        return True
    return any(plan.tables[t].strategy == "shared" or plan.tables[t].remaps for t, keys in captured.keys.items() if keys)


def _captured_changes(ctx: MoveContext, m: dict, cell: Cell, plan: Plan, slot_option: str = "capture_slot",
                      after: str | None = None, drained: bool = False, advance: bool = True,
                      writers_timeout: float | None = None, move_slot: bool = True):
    """The keys written on ``cell`` (the source, or with ``slot_option="capture_target_slot"`` the
    target) since the read that went up to ``after`` (None: since the slot was created), from the
    change-capture slot: what it holds now is read, recorded in tracking, and the slot advanced
    past it, so the next read starts there (its cost follows what was written since, not since the
    pre-copy, however long that took and whatever else the cell wrote); what was recorded before
    is merged in. ``drained``: only what was recorded, without reading the slot. ``advance=False``:
    the slot is only read (nothing recorded, the next read sees the same again). None when there
    is no usable slot (never opened, dropped by a release, invalidated): then every table is scanned
    (validated in full). ``writers_timeout``: read up to after the transactions writing when the read
    began (:func:`orgmover.changes.wait_for_writers`). ``move_slot=False``: recorded, but the slot not
    advanced (the next read of it sees this one's changes again, and merges them)."""
    from orgmover import changes

    name = (m.get("options") or {}).get(slot_option)
    if not name:
        return None
    if not drained:
        t0 = time.monotonic()
        try:
            with cell.connect() as c:
                got = changes.read_changes(c, name, {t: tp.key for t, tp in plan.tables.items() if tp.strategy != "skip"},
                                           writers_timeout=writers_timeout,
                                           ignore=[t for t, tp in plan.tables.items() if tp.strategy == "skip"])
                # recorded before the slot forgets it; when this read started at ``after`` it is all there is
                # since, otherwise what was recorded since ``after`` is read back in the same transaction
                if after is not None and got.start == after:
                    if got.changes and advance:
                        ctx.tracking.add_captured(m["id"], name, got)
                    out = got
                elif advance:
                    out = ctx.tracking.captured(m["id"], name, after, add=got if got.changes else None)
                else:
                    out = ctx.tracking.captured(m["id"], name, after).update(got)
                if advance and move_slot:
                    changes.advance(c, name, got.upto)
        except changes.CaptureUnavailable as e:
            ctx.log(f"change capture on {cell.name}: {e}; scanning the rows written since the pre-copy instead")
            return None
        ctx.log(f"change capture on {cell.name}: {got.changes:,} row changes in the plan's tables since the last read "
                f"({sum(len(k) for k in got.keys.values()):,} keys in {len(got.keys)} tables) read in {time.monotonic() - t0:.2f}s"
                + (f", after waiting {got.waited:.2f}s for transactions writing when maintenance went on" if got.waited else ""))
        out.upto = got.upto
        return out
    return ctx.tracking.captured(m["id"], name, after)


def sync_deletions(ctx: MoveContext, mid: int, m: dict, captured, catalog: Catalog | None, writable: bool = False,
                   later: list[Callable[[], bool]] | None = None, rows: dict | None = None) -> list[str]:
    """The end of :func:`sync_all`: apply the source's deletions to the target, then check foreign keys;
    returns the tables to validate. With the captured changes, the check reads only the rows written
    since the pre-copy and the children of the rows the window deleted. ``writable`` (a catch-up before
    the window): deletions only. ``later``: the check is appended to it instead of run. ``rows``: each
    table's strategy, synced_in_window and sync_detail as :func:`sync_all` just recorded them."""
    plan = load_plan(ctx, mid)
    if rows is None:
        rows = {t["table_name"]: t for t in ctx.tracking.tables(mid, ["strategy", "synced_in_window", "sync_detail"])}
    stale = [t for t, r in rows.items() if r["strategy"] == "org" and r["synced_in_window"] != m["maintenance_window"]]
    if stale and not writable:
        raise StateError(f"tables not synced in this maintenance window: {', '.join(sorted(stale))}")
    todo = []
    for t, r in sorted(rows.items()):
        chunks = (r["sync_detail"] or {}).get("chunks_to_reconcile") or []
        if r["strategy"] == "org" and chunks:
            column, bounds = _chunking(ctx, mid, t)
            todo.append((plan.tables[t], column, bounds, chunks))
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    joined: dict[str, int] = {}
    with dst_cell.connect() as dst:
        if todo:
            with src_cell.connect() as src:
                _, lacking = apply_deletions(src, dst, plan, todo, logger=ctx.log)
                # rows the scan cannot see: the org's now on the source though not written (they joined with
                # a parent, e.g. the issues of a project transferred into the org), found by comparing keys
                for t, keys in sorted(lacking.items()):
                    tp = plan.tables[t]
                    joined[t] = sync_keys(src, dst, tp, set(keys), _transformer(src, dst, plan, tp, src_cell, dst_cell),
                                          logger=ctx.log)["changed"]
            if joined:
                ctx.log("rows that joined the organization with a parent since the pre-copy, copied: "
                        + ", ".join(f"{t} {n:,}" for t, n in sorted(joined.items())))
                ctx.tracking.update_tables(mid, {t: {"sync_detail": {**(rows[t]["sync_detail"] or {}), "joined_with_parent": n}}
                                                 for t, n in joined.items()})
        by_key = [(plan.tables[t], key_types(dst, plan.tables[t]), [tuple(k) for k in r["sync_detail"]["absent_keys"]])
                  for t, r in sorted(rows.items()) if r["strategy"] == "org" and (r["sync_detail"] or {}).get("absent_keys")]
        leaving: dict[str, set[tuple]] = {}
        if captured is not None and by_key:
            with src_cell.connect() as src:
                leaving = _follow_leaving(src, dst, plan, {tp.table: keys for tp, _, keys in by_key}, captured)
            if leaving:
                ctx.log("rows that left the organization with a parent since the pre-copy, deleted on the target: "
                        + ", ".join(f"{t} {len(k):,}" for t, k in sorted(leaving.items())))
        gone = delete_absent(dst, plan, by_key, logger=ctx.log,
                             leaving=[(plan.tables[t], key_types(dst, plan.tables[t]), sorted(k)) for t, k in sorted(leaving.items())])
    if writable:
        ctx.tracking.phase_finished(mid, "catch_up")
        return []
    # the pre-copy's foreign keys were checked before the window; here only what the window touched:
    # tables with rows written or deleted, and tables referencing a table with deletions
    deleted = {tp.table for tp, *_ in todo} | {t for t, n in gone.items() if n}
    changed = {t for t, r in rows.items() if (r["sync_detail"] or {}).get("changed")} | deleted | set(joined)

    def check() -> bool:
        """The foreign keys of the rows the window touched, resolved on the target; True when shared
        rows had to be synced for them (a written row references one the target lacked)."""
        # every row written since the pre-copy (by catch-ups too), not only since the last sync
        since_copy = captured if captured is None or not (m.get("options") or {}).get("capture_synced_lsn") else \
            _captured_changes(ctx, m, src_cell, plan, drained=True)
        written = changed | ({t for t, keys in since_copy.keys.items() if keys and plan.tables[t].strategy == "org"}
                             if since_copy is not None else set())
        with dst_cell.connect() as dst:
            cat = catalog or read_foreign_keys(dst)
            touched = written | {t for t in plan.tables if any(fk.ref_table in deleted for fk in cat[t].foreign_keys)}
            only = _touched_rows(dst, plan, cat, rows, since_copy, touched, {tp.table for tp, *_ in todo}, leaving)
            problems = fk_violations(dst, plan, cat, tables=touched, only=only)
        synced = bool(problems) and not _needs_shared_sync(plan, captured)
        if synced:
            ctx.log("a written row references a shared row the target lacks: syncing shared rows, then checking again")
            sync_shared(ctx, mid)
            check_foreign_keys(ctx, mid, touched, only, catalog=cat)
        elif problems:
            raise ValidationFailed("foreign keys of the organization's rows are broken on the target:\n  - "
                                   + "\n  - ".join(problems))
        else:
            ctx.log(f"foreign keys of the rows the window touched on {m['target_cell']}: all resolved")
        return synced

    if later is None:
        check()
    else:
        later.append(check)
    ctx.tracking.phase_finished(mid, "sync", then="validate")  # finished by go_no_go
    return sorted(t for t, p in plan.tables.items() if p.strategy != "skip")


def _touched_rows(dst, plan: Plan, catalog: Catalog, rows: dict, captured, touched: set[str],
                  scan_deleted: set[str], leaving: dict[str, set[tuple]] | None = None) -> dict[str, str]:
    """Predicates (over alias t) narrowing the foreign-key check of a touched table to the rows the
    window wrote and the rows referencing the keys it deleted (``leaving``: deleted with a parent
    too), when the captured changes tell them. A table deleted from by the fallback scan leaves its
    children checked in full."""
    if captured is None:
        return {}
    leaving = leaving or {}
    parts: dict[str, list[str]] = {}
    full: set[str] = set()
    types = {}

    def typ(tp):
        if tp.table not in types:
            types[tp.table] = key_types(dst, tp)
        return types[tp.table]

    for t in touched:
        tp, r = plan.tables[t], rows.get(t) or {}
        detail = r.get("sync_detail") or {}
        if detail.get("mode") != "captured":
            full.add(t)
            continue
        absent = {tuple(k) for k in detail.get("absent_keys") or []}
        written = sorted(k for k in captured.of(t) if k not in absent)
        if written:
            parts.setdefault(t, []).append(bind(dst, *key_filter(tp.key, typ(tp), written)))
    for t in touched:
        for fk in catalog[t].foreign_keys:
            parent = plan.tables.get(fk.ref_table)
            if parent is None or fk.ref_table not in touched:
                continue
            pdetail = (rows.get(fk.ref_table) or {}).get("sync_detail") or {}
            gone = [tuple(k) for k in pdetail.get("absent_keys") or []] + sorted(leaving.get(fk.ref_table, ()))
            if fk.ref_table in scan_deleted or pdetail.get("mode") != "captured":
                full.add(t)
            elif gone and list(fk.ref_columns) == list(parent.key):
                parts.setdefault(t, []).append(bind(dst, *key_filter(list(fk.columns), typ(parent), gone)))
            elif gone:
                full.add(t)
    # a captured table with nothing written and no deleted parent has nothing to check: "false"
    return {t: " OR ".join(f"({p})" for p in parts.get(t, [])) or "false" for t in touched if t not in full}


def check_foreign_keys(ctx: MoveContext, mid: int, tables: set[str] | None = None, only: dict[str, str] | None = None,
                       catalog: Catalog | None = None) -> None:
    """Every foreign key of the org's rows (of ``tables``, default all; of ``only``'s rows where given)
    on the target points at an existing row."""
    m = ctx.tracking.get(mid)
    plan = load_plan(ctx, mid)
    with ctx.cell(m["target_cell"]).connect() as dst:
        problems = fk_violations(dst, plan, catalog or read_foreign_keys(dst), tables=tables, only=only)
    if problems:
        raise ValidationFailed("foreign keys of the organization's rows are broken on the target:\n  - " + "\n  - ".join(problems))
    ctx.log(f"foreign keys of organization {m['organization_id']} on {m['target_cell']}: all resolved")


def precopy_done(ctx: MoveContext, mid: int) -> None:
    """After the pre-copy: every foreign key resolved on the target, and the baseline checksums."""
    m = ctx.tracking.get(mid)
    pending = [t["table_name"] for t in ctx.tracking.tables(mid) if t["strategy"] == "org" and t["state"] != "copied"]
    if pending:
        raise StateError(f"tables not pre-copied: {', '.join(pending)}")
    check_foreign_keys(ctx, mid)
    prevalidate(ctx, mid)
    if m["state"] == "copying":
        ctx.tracking.update(mid, state="copied")
    ctx.tracking.phase_finished(mid, "copy")


# ------------------------------------------------------------------------------------------ validate

def _chunk_sums_both(src_cell: Cell, dst_cell: Cell, plan: Plan, tables: list[str], chunking: dict,
                     only: dict[str, list[int]] | None = None) -> tuple[dict, dict]:
    """Per table, {chunk: (rows, checksum)} on each cell (all chunks, or ``only[table]``'s), each cell
    on its own connection, the two cells in parallel."""
    from orgmover.validation import chunk_checksums

    only = only or {}
    # two connections per cell, the tables dealt largest first so both get about half the bytes
    lanes: list[list[str]] = [[], []]
    load = [0, 0]
    for t in sorted(tables, key=lambda t: -(plan.tables[t].est_bytes or 0)):
        i = load.index(min(load))
        lanes[i].append(t)
        load[i] += plan.tables[t].est_bytes or 1

    def side(cell, source, names):
        with cell.connect() as c:
            return {t: chunk_checksums(c, plan.tables[t], source, *chunking[t], only=only.get(t)) for t in names}

    with ThreadPoolExecutor(4) as ex:
        fs = [ex.submit(side, src_cell, True, lane) for lane in lanes]
        fd = [ex.submit(side, dst_cell, False, lane) for lane in lanes]
        return {k: v for f in fs for k, v in f.result().items()}, {k: v for f in fd for k, v in f.result().items()}


def _bounds(ctx: MoveContext, mid: int) -> dict[str, list[int]]:
    """Every table's chunk bounds, read once per process: the plan phase records them all, and they do
    not change after it (:func:`make_plan` keeps them)."""
    if mid not in ctx.bounds:
        ctx.bounds[mid] = ctx.tracking.chunk_bounds(mid)
    return ctx.bounds[mid]


def _chunking_of(ctx: MoveContext, mid: int, plan: Plan, rows: dict, tables: list[str]) -> dict:
    """Per table, its chunk column and chunk bounds."""
    bounds = _bounds(ctx, mid)
    return {t: (rows[t]["chunk_column"], bounds.get(t, [])) if plan.tables[t].strategy == "org" else (None, [])
            for t in tables}


def prevalidate(ctx: MoveContext, mid: int) -> dict:
    """Checksums per chunk of every org table on both cells after the pre-copy, while the org is still
    writable: the baseline of the write window's validation, which then re-checks only the chunks
    written since (found by change capture) and the chunks that differed here."""
    m, plan = ctx.tracking.get(mid), load_plan(ctx, mid)
    rows = {t["table_name"]: t for t in ctx.tracking.tables(mid)}
    # org tables per chunk; shared tables whose referenced rows are copied (users, LFS objects, pools) whole
    org = sorted(t for t, r in rows.items() if r["strategy"] == "org"
                 or (r["strategy"] == "shared" and plan.tables[t].insert_missing))
    chunking = _chunking_of(ctx, mid, plan, rows, org)
    _open_target_capture(ctx, mid)
    marks = _baseline_marks(ctx, mid, plan)  # read before the checksums: what is written after is read later
    t0 = time.monotonic()
    n, differ, settled = _record_baseline(ctx, m, plan, rows, chunking, {t: None for t in org}, marks)
    ctx.log(f"baseline checksums of {n} chunks in {len(org)} tables in {time.monotonic() - t0:.2f}s ({_differ(differ, settled)})")
    return {"tables": len(org), "chunks_differ": differ, "rows_differ": settled}


def _differ(chunks: int, rows: int) -> str:
    return (f"{chunks} chunks differ (written since their copy; checksummed again in the window)"
            + (f", {rows} rows differ (written since their copy; compared by key in the window)" if rows else ""))


def _record_baseline(ctx: MoveContext, m: dict, plan: Plan, rows: dict, chunking: dict,
                     redo: dict[str, list[int] | None], marks: dict) -> tuple[int, int]:
    """Checksum on both cells the chunks ``redo`` names per table (None: all of them; the others keep
    their recorded checksums), compare the secrets decrypted (the checksums leave them out), record
    that as the tables' baseline, then ``marks`` as its starting points (in that order: a task killed
    in between leaves the older, earlier points, so the window compares more, never less). Returns
    (chunks checksummed, chunks whose checksums differ between the cells, rows that differ).

    Where an org table's chunk differs (rows written on the source since they were last synced), the
    keys of the rows that differ are looked up (while the org is writable) and recorded with the
    baseline, up to 1,000 per chunk: the window compares those rows by key, like the rows written
    since the baseline, instead of checksumming the whole chunk again. That is enough: every other
    row of the chunk was equal on both cells when looked up, and any row written since then is in
    the change stream read from ``marks`` (read before the checksums), so it is compared too."""
    from orgmover.pgcopy import bucket_sql
    from orgmover.validation import differing_keys

    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    at = datetime.now(timezone.utc).isoformat()
    tables = sorted(redo)
    src, dst = _chunk_sums_both(src_cell, dst_cell, plan, tables, chunking,
                                {t: c for t, c in redo.items() if c is not None})
    updates, differ, settled_rows = {}, 0, 0
    with src_cell.connect() as s, dst_cell.connect() as d:
        for t in tables:
            tp = plan.tables[t]
            old = rows[t].get("baseline") if redo[t] is not None else None
            new = {"at": at}
            for side, sums in (("src", src[t]), ("dst", dst[t])):
                kept = {k: v for k, v in old[side].items() if int(k) not in redo[t]} if old else {}
                new[side] = {**kept, **{str(k): list(v) for k, v in sums.items()}}
            new["settled"] = {}  # chunk -> keys of the rows that differ (a differing chunk is always checksummed again)
            column, lows = chunking[t]
            for k in sorted({k for k in set(new["src"]) | set(new["dst"]) if new["src"].get(k) != new["dst"].get(k)}, key=int):
                keys = differing_keys(s, d, tp, f"{bucket_sql(column, lows)} = {int(k)}" if column and lows else "true") \
                    if tp.strategy == "org" else None
                if keys is None:
                    differ += 1
                else:
                    new["settled"][k] = [list(x) for x in keys]
                    settled_rows += len(keys)
            if tp.encrypted:
                new["secrets_equal"] = encrypted_diff(s, d, tp, src_cell.key, dst_cell.key).ok
            updates[t] = {"baseline": {**(old or {}), **new}}
    ctx.tracking.update_tables(m["id"], updates)
    ctx.tracking.merge_options(m["id"], baseline_lsn=marks)
    return sum(len(v) for v in src.values()), differ, settled_rows


def _captured_both(ctx: MoveContext, m: dict, plan: Plan, marks: dict | None = None, advance: bool = True) -> tuple:
    """:func:`_captured_changes` of the source's and the target's slots, read at the same time, each
    since its point in ``marks`` ({"src": lsn, "dst": lsn}; none: since the slot was created)."""
    marks = marks or {}
    with ThreadPoolExecutor(2) as ex:
        f_src = ex.submit(_captured_changes, ctx, m, ctx.cell(m["source_cell"]), plan, "capture_slot", marks.get("src"),
                          advance=advance)
        f_dst = ex.submit(_captured_changes, ctx, m, ctx.cell(m["target_cell"]), plan, "capture_target_slot",
                          marks.get("dst"), advance=advance)
        return f_src.result(), f_dst.result()


def _baseline_marks(ctx: MoveContext, mid: int, plan: Plan) -> dict:
    """Read both cells' capture slots up to now (recorded, the slots advanced): the points a baseline
    taken right after starts from. In the window, the rows written on either cell since these points
    are compared row by row; what was written before them is in the baseline's checksums."""
    src, dst = _captured_both(ctx, ctx.tracking.get(mid), plan)
    return {"src": src.upto if src is not None else None, "dst": dst.upto if dst is not None else None}


def refresh_baseline(ctx: MoveContext, mid: int) -> dict:
    """While the org is writable (after a catch-up): checksum again, on both cells, the chunks
    written since the baseline (on either cell) and those that differed in it, and move the
    baseline's starting points to now. The window then compares row by row only what is written
    after this, not everything since the first baseline."""
    from bisect import bisect_right

    m, plan = ctx.tracking.get(mid), load_plan(ctx, mid)
    marks = (m.get("options") or {}).get("baseline_lsn")
    rows = {t["table_name"]: t for t in ctx.tracking.tables(mid)}
    based = sorted(t for t, r in rows.items() if r.get("baseline"))
    if not marks or not based or (m.get("options") or {}).get("capture_slot") is None:
        return {"chunks": 0}
    written, on_target = _captured_both(ctx, m, plan, marks)  # since the baseline, read up to now before the checksums
    if written is None or on_target is None:
        return {"chunks": 0}
    new_marks = {"src": written.upto, "dst": on_target.upto}
    written.update(on_target)
    chunking = _chunking_of(ctx, mid, plan, rows, based)
    redo: dict[str, list[int]] = {}
    for t in based:
        tp, base = plan.tables[t], rows[t]["baseline"]
        keys = written.of(t)
        column, lows = chunking[t]
        chunks = {int(k) for k in set(base["src"]) | set(base["dst"]) if base["src"].get(k) != base["dst"].get(k)}
        if t in written.rescan or (keys and (tp.strategy == "shared" or column not in tp.key or not lows)):
            chunks |= set(range(len(lows) + 1))  # written where no key tells the chunk: all of them
        elif keys:
            i = tp.key.index(column)
            chunks |= {bisect_right(lows, int(k[i])) for k in keys}
        if chunks:
            redo[t] = sorted(chunks)
    if not redo:
        ctx.tracking.merge_options(mid, baseline_lsn=new_marks)
        return {"chunks": 0}
    t0 = time.monotonic()
    _, differ, settled = _record_baseline(ctx, m, plan, rows, chunking, redo, new_marks)
    n = sum(len(c) for c in redo.values())
    ctx.log(f"baseline refreshed: {n} chunks in {len(redo)} tables checksummed again in {time.monotonic() - t0:.2f}s "
            f"({_differ(differ, settled)})")
    return {"chunks": n, "tables": len(redo), "differ": differ, "rows_differ": settled}


def catch_up(ctx: MoveContext, mid: int, max_passes: int = 5, settle_seconds: float = 2.0) -> dict:
    """After the pre-copy, while the org is still writable: sync what was written since (from the
    capture slot, like the window but without blocking writes) and refresh the validation baseline,
    pass after pass until one takes less than ``settle_seconds`` (the writes keep coming; each pass
    has less to do) or ``max_passes``. Like Vitess and Ghostferry, which apply the change stream
    continuously: the write window then has only the last seconds' writes to sync and compare, and
    its reads of the slots start where the last pass stopped, whatever the cell wrote meanwhile."""
    passes = []
    for i in range(max(1, max_passes)):
        t0 = time.monotonic()
        if sync_all(ctx, mid, writable=True) is None:  # no usable capture slot: the window scans instead
            break
        rows = _rows_synced(ctx, mid)
        base = refresh_baseline(ctx, mid)
        took = time.monotonic() - t0
        passes.append({"rows": rows, "chunks_rechecked": base["chunks"], "seconds": round(took, 3)})
        ctx.log(f"catch-up pass {i + 1}: {rows:,} rows synced, {base['chunks']} baseline chunks checksummed again, "
                f"in {took:.2f}s")
        if took < settle_seconds:
            break
    ctx.tracking.event(mid, "info", f"caught up in {len(passes)} passes: "
                                    + ", ".join(f"{p['rows']:,} rows in {p['seconds']:.2f}s" for p in passes) if passes
                       else "catch-up skipped: no usable change-capture slot (the window scans instead)")
    return {"passes": passes}


def readiness(ctx: MoveContext, mid: int, caught_up: dict) -> tuple[str, Path]:
    """What a person approves, while the org is still writable, after the catch-up: the rows and tables
    copied, the storage items synced and verified, the validation baseline (every chunk checksummed on
    both cells), the expected write pause, and the path of this text as a report. The window that follows
    syncs, validates again and switches without waiting for anyone; if its validation differs from this,
    nothing is switched and maintenance is lifted."""
    m, plan = ctx.tracking.get(mid), load_plan(ctx, mid)
    tables = [t for t in ctx.tracking.tables(mid) if t["strategy"] == "org"]
    chunks = differ = settled = 0
    for t in tables:
        base = t.get("baseline") or {}
        keys = set(base.get("src") or {}) | set(base.get("dst") or {})
        chunks += len(keys)
        differ += sum(1 for k in keys if (base.get("src") or {}).get(k) != (base.get("dst") or {}).get(k))
        settled += sum(len(v) for v in (base.get("settled") or {}).values())
    _, _, storage = replication_state(ctx, mid)
    passes = caught_up.get("passes") or []
    last = passes[-1]["seconds"] if passes else None
    lines = [f"Move organization {m['organization_id']} from {m['source_cell']} to {m['target_cell']} "
             f"(migration #{mid}, run {m['dag_run_id']})",
             "",
             f"Rows copied:      {sum(t['rows_copied'] or 0 for t in tables):,} in {len(tables)} tables "
             f"(plan: {sum(tp.est_rows for tp in plan.of('org')):,} rows; {len(plan.of('shared'))} shared tables)",
             "Storage items:    " + (", ".join(f"{k} {v['verified']:,}/{v['total']:,} verified" for k, v in sorted(storage.items()))
                                     or "none")]
    if chunks:
        lines.append(f"Validation:       baseline of {chunks:,} chunks checksummed on both cells: "
                     + ("all match" if not differ else f"{differ:,} differ ({settled:,} rows written since, "
                                                         f"compared by key in the window)"))
    else:
        lines.append("Validation:       no baseline (no change capture): the window checksums every chunk")
    if last is not None:
        lines.append(f"Catch-up:         {len(passes)} passes, the last {passes[-1]['rows']:,} rows in {last:.2f}s")
    pause = "about 1 s" if last is None or last < 0.5 else f"about {last + 0.5:.1f} s"
    lines += [f"Expected write pause: {pause} (maintenance on, the last writes synced, validated, route switched)",
              "",
              "Approve: writes are blocked only then, and the route is switched if the window's validation",
              "passes; if it differs, nothing is switched and maintenance is lifted. Reject: nothing is blocked,",
              "the organization stays on the source (a later run resumes or rollback removes the copy)."]
    path = ctx.reports_dir / f"migration-{mid}-approval.txt"
    lines.insert(1, f"Report: {path}")
    text = "\n".join(lines) + "\n"
    ctx.reports_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text, path


def _open_target_capture(ctx: MoveContext, mid: int) -> None:
    """A slot on the target too, before the baseline: whatever writes the org's tables there after it
    (the window's sync, or anyone else) marks those chunks for re-checking."""
    from orgmover import changes

    m = ctx.tracking.get(mid)
    name = changes.slot_name(mid) + "_target"
    try:
        with ctx.cell(m["target_cell"]).connect() as dst:
            changes.create_slot(dst, name)
    except changes.CaptureUnavailable as e:
        ctx.log(f"change capture unavailable on the target ({e}); the window's validation will check every chunk")
        return
    ctx.tracking.merge_options(mid, capture_target_slot=name)


def _incremental_chunks(plan: Plan, rows: dict, chunking: dict, captured, m: dict) -> dict[str, list[int]]:
    """Per org table validated incrementally, the chunks to checksum again: those that differed in the
    baseline, unless the keys of the rows that differed were recorded with it (those rows, like the
    rows written since, are compared by key). Tables without a baseline, or synced by the fallback
    scan, are left out (checked in full)."""
    out: dict[str, list[int]] = {}
    window_captured = all((r.get("sync_detail") or {}).get("mode") == "captured"
                          and r.get("synced_in_window") == m["maintenance_window"]
                          for r in rows.values() if r["strategy"] == "org")
    for t, (column, lows) in chunking.items():
        tp, r = plan.tables[t], rows[t]
        base = r.get("baseline")
        if not base or t in captured.rescan or not window_captured:
            continue
        if tp.strategy == "shared":
            # a shared table stands as in the baseline when it was equal then and none of its rows was
            # written since on either cell (new references from written rows: the window's foreign-key check)
            if not captured.of(t) and base["src"] == base["dst"]:
                out[t] = []
            continue
        bs, bd, settled = base["src"], base["dst"], base.get("settled") or {}
        out[t] = sorted({int(k) for k in set(bs) | set(bd) if bs.get(k) != bd.get(k) and k not in settled})
    return out


def validate_all(ctx: MoveContext, mid: int, full: bool | None = None, again: bool = False, m: dict | None = None) -> dict:
    """Validate every table in one task: each cell computes all checksums on its own connection, the two
    cells in parallel; row-level diffs and secret comparisons only where needed.

    In the write window, with a baseline from :func:`prevalidate` and the captured changes, only the
    chunks written since (and those that differed in the baseline) are checksummed again; the others'
    checksums from the baseline stand, since nothing wrote to them on either cell. ``full`` (or the
    migration option ``full_validation``, or ``ORGMOVER_FULL_VALIDATION=1``) checks every chunk; ``again``
    re-checks tables that already passed in this window. ``m``: the migration as the window has it
    (:func:`write_window`), instead of reading it again."""
    from orgmover.pgcopy import bucket_sql
    from orgmover.validation import TableValidation, lookup_validation, row_diff, total

    m = m or ctx.tracking.get(mid)
    plan = load_plan(ctx, mid)
    if full is None:
        full = bool((m.get("options") or {}).get("full_validation")) or os.environ.get("ORGMOVER_FULL_VALIDATION") == "1"
    reads = ThreadPoolExecutor(1)
    # in the window, what was written since the baseline on either cell, read while the rest is looked up;
    # only read: the window's last read (a retry reads the same again; the slots go with the switch)
    written_since = reads.submit(_captured_both, ctx, m, plan, (m.get("options") or {}).get("baseline_lsn"), advance=False) \
        if not full and m["maintenance_window"] else None
    reads.shutdown(wait=False)
    rows = {t["table_name"]: t for t in ctx.tracking.tables(mid, ["strategy", "chunk_column", "baseline", "sync_detail",
                                                                 "synced_in_window", "validated_in_window", "validation_state"])}
    todo = [t for t, r in sorted(rows.items()) if again or not (r["validated_in_window"] == m["maintenance_window"]
                                                                and r["validation_state"] == "passed")]
    if m["state"] == "quiesced":
        ctx.tracking.update(mid, state="validating")
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])

    lookups = [t for t in todo if plan.tables[t].strategy == "shared" and not plan.tables[t].insert_missing]
    summed = [t for t in todo if t not in lookups]
    chunking = _chunking_of(ctx, mid, plan, rows, summed)
    t0 = time.monotonic()
    only: dict[str, list[int]] = {}
    if written_since is not None:
        captured, on_target = written_since.result()
        if captured is not None and on_target is not None:
            captured.update(on_target)  # written on either cell since the baseline
            only = _incremental_chunks(plan, rows, chunking, captured, m)
            for t in only:  # and the rows that differed in the baseline
                for keys in (rows[t]["baseline"].get("settled") or {}).values():
                    captured.keys.setdefault(t, set()).update(tuple(k) for k in keys)
    # secrets compared decrypted over whole tables (no baseline to lean on): in Python, so meanwhile
    secret_tables = [t for t in todo if plan.tables[t].encrypted and not (t in only and rows[t]["baseline"].get("secrets_equal"))]

    def whole_secrets() -> dict[str, dict]:
        with src_cell.connect() as s, dst_cell.connect() as d:
            return {t: encrypted_diff(s, d, plan.tables[t], src_cell.key, dst_cell.key).to_dict() for t in secret_tables}

    secrets_pool = ThreadPoolExecutor(1)
    secrets_future = secrets_pool.submit(whole_secrets) if secret_tables else None
    secrets_pool.shutdown(wait=False)
    src_sums, dst_sums = _chunk_sums_both(src_cell, dst_cell, plan, summed, chunking, only)
    whole = secrets_future.result() if secrets_future is not None else {}
    for t, chunks in only.items():  # the chunks not re-checked keep their baseline checksums
        base = rows[t]["baseline"]
        settled = base.get("settled") or {}
        for sums, side in ((src_sums, "src"), (dst_sums, "dst")):
            # a chunk that differed only in rows now compared by key stands as the source's on both sides
            kept = {int(k): (int(v[0]), v[1]) for k, v in base[side].items() if int(k) not in chunks and k not in settled}
            kept.update({int(k): (int(v[0]), v[1]) for k, v in base["src"].items() if k in settled})
            sums[t] = {**kept, **sums[t]}
    if only:
        n_all = sum(len(set(src_sums[t]) | set(dst_sums[t])) for t in only)
        n_keys = sum(len(captured.of(t)) for t in only)
        ctx.log(f"validation in the window: {len(only)} tables against their baseline: {n_keys:,} rows written since "
                f"compared row by row, {sum(len(c) for c in only.values())} of {n_all} chunks checksummed again "
                f"(differing in the baseline); {len(summed) - len(only)} tables checked in full")

    def compare_written(t: str) -> tuple[str, str, dict]:
        """The rows of ``t`` written since the baseline, on either cell, compared by key."""
        tp = plan.tables[t]
        with src_cell.connect() as s, dst_cell.connect() as d:
            cond = bind(s, *key_filter(tp.key, key_types(s, tp), sorted(captured.of(t))))
            return t, cond, row_diff(s, d, tp, picked=cond).to_dict()

    def look_up(t: str):
        with src_cell.connect() as s, dst_cell.connect() as d:
            return lookup_validation(s, d, plan.tables[t])

    written_rows: dict[str, tuple[str, dict]] = {}
    with ThreadPoolExecutor(5) as ex:  # four tables at a time and the lookups, each on its own connections (mostly waiting)
        looked = {t: ex.submit(look_up, t) for t in todo if t in lookups}
        for t, cond, diff in ex.map(compare_written, [t for t in todo if t in only and captured.of(t)] if only else []):
            written_rows[t] = (cond, diff)
        looked = {t: f.result() for t, f in looked.items()}
    bad = 0
    pending: dict[str, dict] = {}
    flushed = time.monotonic()
    with src_cell.connect() as s, dst_cell.connect() as d:
        for t in todo:
            tp = plan.tables[t]
            if t in lookups:
                res = looked[t]
                sn, dn, ss, ds = res.source_rows, res.target_rows, res.source_checksum, res.target_checksum
            else:
                (sn, ss), (dn, ds) = total(src_sums[t]), total(dst_sums[t])
                res = TableValidation(t, tp.strategy, sn, dn, ss, ds)
            written = None
            if t in written_rows:  # the rows written since the baseline, on either cell
                written, res.written = written_rows[t]
            if t in whole:
                res.encrypted = whole[t]
            elif tp.encrypted and written:  # secrets of rows unchanged since a baseline where they were equal stand
                res.encrypted = encrypted_diff(s, d, tp, src_cell.key, dst_cell.key, picked=written).to_dict()
            if (sn, ss) != (dn, ds) and t not in lookups:
                # the row diff reads only the chunks whose checksums differ
                sc, dc = src_sums[t], dst_sums[t]
                differ = sorted(k for k in set(sc) | set(dc) if sc.get(k) != dc.get(k))
                column, chunk_lo = chunking[t]
                narrow = f"{bucket_sql(column, chunk_lo)} IN ({', '.join(map(str, differ))})" if column and chunk_lo else "true"
                diff = row_diff(s, d, tp, narrow=narrow).to_dict()
                diff["matching"] += sum(sc[k][0] for k in sc if k not in differ)
                diff["chunks"] = {"total": len(set(sc) | set(dc)), "differ": len(differ),
                                  "differing_ranges": [_chunk_range(column, chunk_lo, k) for k in differ[:10]]}
                res.diff = diff
            if t in only:
                res_detail_incremental = {"rechecked_chunks": len(only[t]), "baseline_at": rows[t]["baseline"]["at"],
                                          "written_rows_compared": len(captured.of(t)),
                                          "rows_differing_in_baseline": sum(len(k) for k in (rows[t]["baseline"].get("settled")
                                                                                             or {}).values())}
            else:
                res_detail_incremental = None
            bad += not res.ok
            detail = res.to_dict()
            if res_detail_incremental:
                detail["incremental"] = res_detail_incremental
            pending[t] = dict(source_rows=sn, target_rows=dn, source_checksum=ss, target_checksum=ds,
                              validation_state="passed" if res.ok else "failed", validation_detail=detail,
                              validated_in_window=m["maintenance_window"])
            if time.monotonic() - flushed > 1.0:  # recorded as it goes (a re-run resumes), in few transactions
                ctx.tracking.update_tables(mid, pending)
                pending, flushed = {}, time.monotonic()
            if not res.ok:
                ctx.log(f"validate {t}: MISMATCH {res.to_dict()}")
    ctx.tracking.update_tables(mid, pending)
    ctx.log(f"validated {len(todo)} tables in {time.monotonic() - t0:.2f}s: {len(todo) - bad} match, {bad} differ")
    return {"tables": len(todo), "differ": bad}


def _chunk_range(column: str | None, lows: list[int], k: int) -> str:
    """Readable key range of chunk ``k`` (width_bucket numbering: 0 below the first bound)."""
    if not column or not lows:
        return "whole table"
    lo = lows[k - 1] if k >= 1 else None
    hi = lows[k] if k < len(lows) else None
    return f"{column} in [{'-inf' if lo is None else lo}, {'+inf' if hi is None else hi})"


def go_no_go(ctx: MoveContext, mid: int, replication: dict | None = None, m: dict | None = None) -> Path:
    """Aggregate validation; write the readable validation report; fail on any difference.
    ``replication``: the status of a final storage pass that just verified everything, and ``m`` the
    migration (both as the write window has them), instead of reading them again."""
    m = m or ctx.tracking.get(mid)
    tables = [t for t in ctx.tracking.tables(mid, ["strategy", "validated_in_window", "validation_state", "validation_detail",
                                                   "source_rows", "target_rows", "source_checksum", "target_checksum"])
              if t["strategy"] in ("org", "shared")]  # not the baselines: the report does not show them
    pending = [t["table_name"] for t in tables if t["validated_in_window"] != m["maintenance_window"]]
    failed = [t for t in tables if t["validation_state"] == "failed"]
    text = report.validation_report(m, tables)
    repl_done, repl_report, repl_status = replication_state(ctx, mid) if replication is None else (True, "", replication)
    if repl_status:
        text += "\nNon-database data (synced / verified / total):\n" + "\n".join(
            f"  {k:<22} {v['synced']:>6} / {v['verified']:>6} / {v['total']:>6}  ({v['bytes']:,} bytes)"
            for k, v in repl_status.items()) + "\n" + ("" if repl_done else repl_report + "\n")
    ctx.reports_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.reports_dir / f"migration-{mid}-validation.txt"
    path.write_text(text)
    ok = not pending and not failed and (not repl_status or repl_done)
    validation = {"ok": not pending and not failed, "report": str(path), "failed": [t["table_name"] for t in failed],
                  "pending": pending}
    if not ok:
        ctx.tracking.update(mid, validation=validation)
    ctx.log(text)
    if pending:
        raise ValidationFailed(f"tables not validated: {', '.join(pending)} (report: {path})")
    if repl_status and not repl_done:
        raise ValidationFailed(f"repositories, objects or images are not all synced and verified (report: {path})")
    if failed:
        raise ValidationFailed(f"{len(failed)} tables differ between cells: "
                               f"{', '.join(t['table_name'] for t in failed)}; route not switched (report: {path})")
    ctx.tracking.transition(mid, "validated", ("validating", "quiesced", "validated"), validation=validation)
    ctx.tracking.phase_finished(mid, "validate")
    return path


# ------------------------------------------------------------------------------------------ switchover
def switchover(ctx: MoveContext, mid: int) -> dict:
    """Route the org to the target and lift maintenance in one compare-and-set."""
    m = ctx.tracking.get(mid)
    org = m["organization_id"]
    if m["state"] == "completed":
        return ctx.topology.route(org)
    with _phase(ctx, mid, "switchover"):
        if m["state"] not in ("validated", "switching"):
            raise StateError(f"migration #{mid} is {m['state']}; only a validated migration is switched")
        switch = dict(cell=m["target_cell"], maintenance=False, reason=f"moved from {m['source_cell']} by migration #{mid}")
        new = None
        if m["state"] == "validated" and m["route_version"] is not None:
            ctx.tracking.transition(mid, "switching", ("validated", "switching"))
            try:  # unchanged since maintenance went on for this window: switched without reading it again
                new = ctx.topology.update_route(org, m["route_version"], **switch)
            except VersionConflict:
                pass  # changed since: read and checked below
        if new is None:
            route = ctx.topology.route(org)
            if route["cell"] == m["target_cell"] and not route["maintenance"]:
                new = route  # an earlier attempt switched and lost the answer
            else:
                if route["cell"] != m["source_cell"] or route.get("maintenance_owner") != ctx.owner(mid):
                    raise StateError(f"route of organization {org} changed under the migration: {route}")
                ctx.tracking.transition(mid, "switching", ("validated", "switching"))
                try:
                    new = ctx.topology.update_route(org, route["version"], **switch)
                except VersionConflict as e:
                    raise StateError(f"route of organization {org} changed concurrently: {e.current}") from e
        ctx.blocked.pop(mid, None)
        now = datetime.now(timezone.utc)
        ctx.tracking.transition(mid, "completed", ("switching", "validated"), switched_at=now, maintenance_ended_at=now,
                                route_version=new["version"])
        ctx.tracking.event(mid, "info", f"routed to {m['target_cell']} (route version {new['version']}), maintenance off")
        _close_capture(ctx, m)
        ctx.log(f"organization {org} now routed to {m['target_cell']} (route version {new['version']}); writes open")
    return new


def _prepare_window(ctx: MoveContext, m: dict, per_cell: int = 8) -> Catalog:
    """Before writes are blocked: the plan and the chunk bounds loaded, and a window's worth of connections to
    each cell opened and kept idle for it (:class:`orgmover.cells._Idle`), each having read the catalog
    entries of the plan's tables once. Otherwise the window pays for backend starts (3-5 ms each) and each
    backend's first look at every table it touches, inside the write pause (in the DAG, the window's task
    starts with no connection at all). Returns the target's foreign keys, for the window's check of the rows
    it touched (read here, they cost nothing while writes are blocked)."""
    plan = load_plan(ctx, m["id"])
    _bounds(ctx, m["id"])
    touch = "; ".join(f"SELECT FROM {qi(t)} LIMIT 0" for t, tp in sorted(plan.tables.items()) if tp.strategy != "skip")
    cells = [ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])]

    def opened(cell: Cell):
        c = cell.connect()
        if touch:
            c.execute(touch)
        return c

    def target_foreign_keys():
        with cells[1].connect() as c:
            return read_foreign_keys(c)

    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(opened, c) for c in cells for _ in range(per_cell)]
        fks = ex.submit(target_foreign_keys)
    for f in futures:  # every one opened is given back, also when another failed (which then fails the task)
        if f.exception() is None:
            release_connection(f.result())
    for f in futures:
        f.result()
    return fks.result()


def _rows_synced(ctx: MoveContext, mid: int) -> int:
    """Rows the last sync (catch-up pass or window) wrote to the org's tables."""
    return sum((t["sync_detail"] or {}).get("changed", 0) for t in ctx.tracking.tables(mid, ["strategy", "sync_detail"])
               if t["strategy"] == "org")


@contextlib.contextmanager
def _no_pauses():
    """While writes are blocked: the cyclic garbage collector off (reference counting still frees almost
    everything), and the interpreter handing its lock between threads every 0.5 ms instead of 5 (a
    thread whose answer came back from a cell does not wait behind another thread's Python work); both
    back as they were after it."""
    was = gc.isenabled()
    gc.disable()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if was:
            gc.enable()


def _last_catch_up(ctx: MoveContext, m: dict, settle: float = 0.25, max_passes: int = 3) -> list[dict]:
    """Right before writes are blocked, while the org is writable: :func:`catch_up` passes until one
    takes under ``settle`` seconds, then one sync alone, so the window syncs and compares only what is
    written during that last pass, not what came since the catch-up task (in the DAG, the seconds the
    scheduler takes between tasks). Refused, with nothing blocked, when the last pass took longer than the
    migration's ``max_lag_seconds``: writes are outpacing the catch-up, and the window would block
    them for about as long. Skipped when the org is in maintenance already (a retried window) or
    there is no capture slot (the window scans)."""
    mid = m["id"]
    if m["state"] not in ("copied", "failed") or not (m.get("options") or {}).get("capture_slot"):
        return []
    if ctx.topology.route(m["organization_id"])["maintenance"]:
        return []  # blocked already (this migration's retried window, or another owner: maintenance_on says)
    limit = float((m.get("options") or {}).get("max_lag_seconds", MAX_LAG))
    passes = catch_up(ctx, mid, max_passes, settle)["passes"]
    if not passes:  # the slot is gone: the window scans
        return passes
    # and a last sync alone (no checksums: the fewer rows written during it are compared by key in the
    # window, as those written after it): the shorter the last pass, the less is left for the window
    t0 = time.monotonic()
    if sync_all(ctx, mid, writable=True) is not None:
        passes.append({"rows": _rows_synced(ctx, mid), "seconds": round(time.monotonic() - t0, 3), "sync_only": True})
    ctx.log("last catch-up before writes are blocked: " + ", ".join(f"{p['rows']:,} rows in {p['seconds']:.2f}s" for p in passes))
    if passes[-1]["seconds"] > limit:
        raise StateError(f"migration #{mid}: writes outpace the catch-up: its last pass synced {passes[-1]['rows']:,} rows "
                         f"in {passes[-1]['seconds']:.1f}s (max_lag_seconds {limit:g}); a window now would block the "
                         f"org's writes about that long. Nothing was blocked; retry when the org writes less, or "
                         f"raise max_lag_seconds")
    return passes


def _window_steps(ctx: MoveContext, mid: int, m: dict, full: bool | None, foreign_keys, took: dict) -> Path:
    """The window's work while writes are blocked, before the switch: the rows and the storage synced at
    once, the foreign keys of what the sync touched checked while the rows are validated, go/no-go.
    Returns the report's path; raises when anything differs or is not synced."""
    checks: list[Callable[[], bool]] = []
    t = time.monotonic()
    with ThreadPoolExecutor(1) as ex:  # rows and storage are independent: both at once
        storage = ex.submit(replicate_final, ctx, mid)
        # sync_all writes none of the migration's fields the later steps read
        sync_all(ctx, mid, later=checks, m=m, foreign_keys=foreign_keys)
        took["sync"] = time.monotonic() - t
        t = time.monotonic()
        with ThreadPoolExecutor(1) as fk:  # checks read the target only, so they run while it is validated
            pending = [fk.submit(c) for c in checks]
            validate_all(ctx, mid, full=full, m=m)
            synced_shared = any([f.result() for f in pending])
        if synced_shared:  # the checks wrote shared rows the validation may have read half-written: again
            validate_all(ctx, mid, full=full, again=True, m=m)
        took["validate"] = time.monotonic() - t
        t = time.monotonic()
        storage_status = storage.result()  # all synced and verified (it raises otherwise)
        took["storage_wait"] = time.monotonic() - t
    t = time.monotonic()
    report_path = go_no_go(ctx, mid, replication=storage_status, m=m)
    took["go_no_go"] = time.monotonic() - t
    return report_path


def write_window(ctx: MoveContext, mid: int, switch: bool = True, full: bool | None = None,
                 before_block: Callable[[], None] | None = None, max_lag: float | None = None,
                 writers_timeout: float | None = None) -> dict:
    """The write window in one call (one task of the DAG: between tasks, writes would stay blocked for the
    scheduler): a last catch-up while the org is still writable (:func:`_last_catch_up`);
    ``before_block()``, if given, right after it (tests and the benchmark write there what lands in the
    instant before the block, all of it for the window to sync); maintenance on; the rows and the storage
    synced at once; the foreign keys of what the sync touched checked while the rows are validated;
    go/no-go; and with ``switch`` the route switched, which lifts maintenance. Each step records its
    progress, so a retry resumes. Whatever fails once maintenance is on, the window lifts it before it
    raises, the route left on the source (:func:`lift_maintenance`, retried while the Topology Service does
    not answer); only a process killed inside it leaves maintenance on, for its retry to resume or the run's
    ``release`` task to lift. ``max_lag`` and ``writers_timeout`` (seconds) set the migration's
    ``max_lag_seconds`` and ``writers_timeout`` (kept for retries). Returns the validation report's path,
    whether the route was switched, and the seconds of each part and of the whole window (the part before
    writes are blocked apart)."""
    limits = {k: float(v) for k, v in (("max_lag_seconds", max_lag), ("writers_timeout", writers_timeout)) if v is not None}
    if any(v < 0 for v in limits.values()):
        raise ConfigError(f"negative limits for the write window: {limits}")
    if limits:
        ctx.tracking.merge_options(mid, **limits)
    m = ctx.tracking.get(mid)
    if m["state"] == "completed":  # a retry of a window that switched and then lost its task
        ctx.log(f"migration #{mid} completed already: routed to {m['target_cell']} (route version {m['route_version']})")
        return {"report": (m.get("validation") or {}).get("report"), "switched": True, "seconds": {}}
    t0 = time.monotonic()
    foreign_keys = _prepare_window(ctx, m)
    prepared = time.monotonic() - t0  # writes still open: not part of the window
    t0 = time.monotonic()
    passes = _last_catch_up(ctx, m)
    caught_up = time.monotonic() - t0  # the same
    if before_block is not None:
        before_block()
    m = ctx.tracking.get(mid)  # as the last catch-up left it; then handed through the window's steps
    with _no_pauses():  # no garbage collection (tens of ms with a plan and baselines in memory) until after it
        t0 = time.monotonic()
        took: dict[str, float] = {}
        try:
            m = maintenance_on(ctx, mid, m)
            took["maintenance_on"] = time.monotonic() - t0
            report_path = _window_steps(ctx, mid, m, full, foreign_keys, took)
            if switch:
                t = time.monotonic()
                switchover(ctx, mid)
                took["switch"] = time.monotonic() - t
        except BaseException as e:  # whatever it is (a difference, a cell gone, the task killed): writes open again
            why = f"write window failed: {type(e).__name__}: {e}"
            try:
                done = lift_maintenance(ctx, mid, why)
            except BaseException as lift_error:  # the release task tries again; say both
                ctx.log(f"ERROR: could not lift maintenance after the failed window ({lift_error}); the run's "
                        f"release task retries it")
                raise e from lift_error
            if done == "completed":  # the switch went through and only its answer was lost
                return {"report": (ctx.tracking.get(mid).get("validation") or {}).get("report"), "switched": True,
                        "seconds": {}}
            raise
    took["total"] = time.monotonic() - t0
    ctx.log("write window: " + ", ".join(f"{k} {v:.3f}s" for k, v in took.items())
            + ("" if switch else " (route not switched: waiting for approval)")
            + f"; prepared in {prepared:.3f}s and caught up in {caught_up:.3f}s before writes were blocked")
    took["prepared_before"], took["caught_up_before"] = prepared, caught_up
    return {"report": str(report_path), "switched": switch, "seconds": {k: round(v, 3) for k, v in took.items()},
            "last_pass": passes, "rows_synced_in_window": _rows_synced(ctx, mid)}


def _lift_once(ctx: MoveContext, m: dict, why: str) -> str:
    org, mid = m["organization_id"], m["id"]
    route = ctx.topology.route(org)
    if route["cell"] == m["target_cell"] and m["state"] in ("validated", "switching") and not route["maintenance"]:
        switchover(ctx, mid)  # the switch went through and only its answer was lost: record it
        return "completed"
    if route["maintenance"] and route.get("maintenance_owner") == ctx.owner(mid):
        if route["cell"] != m["source_cell"]:
            raise StateError(f"organization {org} is routed to {route['cell']} while migration #{mid} is {m['state']}")
        ctx.topology.update_route(org, route["version"], maintenance=False, reason=f"migration #{mid} did not complete")
        ctx.tracking.event(mid, "warning", f"maintenance lifted, route stays on {m['source_cell']}: {why}")
        ctx.log(f"organization {org}: maintenance lifted, route stays on {m['source_cell']} ({why})")
    ctx.blocked.pop(mid, None)
    if m["state"] not in ("failed", "created", "planned", "copying", "copied"):  # the window's states
        ctx.tracking.transition(mid, "failed", ("quiesced", "validating", "validated", "switching"),
                                maintenance_ended_at=datetime.now(timezone.utc), error=why)
    return "lifted"


def lift_maintenance(ctx: MoveContext, mid: int, why: str, patience: float = 30.0) -> str:
    """Writes open again after a window that did not complete: this migration's maintenance lifted, the
    route left on the source (``why`` recorded as the migration's error). While the Topology Service or the
    state database does not answer, tried again with backoff for up to ``patience`` seconds. Returns
    "lifted", or "completed" when the route turns out switched already (a switch whose answer was lost)."""
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return _lift_once(ctx, ctx.tracking.get(mid), why)
        except Exception as e:
            if not (is_transient(e) or isinstance(e, VersionConflict)) or time.monotonic() + delay > deadline:
                raise
            ctx.log(f"lifting the maintenance of migration #{mid} failed ({e}); trying again in {delay:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def release(ctx: MoveContext, mid: int | None) -> str:
    """After the run, whatever happened: an unfinished migration lifts its maintenance (the route stays on
    the source), is marked failed, for a later run to resume or a rollback, and drops its capture slots."""
    if mid is None:
        return "no migration"
    m = ctx.tracking.get(mid)
    if m["state"] not in ("completed", "rolled_back"):
        if lift_maintenance(ctx, mid, m["error"] or "the run did not complete") == "completed":
            m = ctx.tracking.get(mid)
    if m["state"] in ("completed", "rolled_back"):
        _close_capture(ctx, m)  # in case the switch could not drop it
        return m["state"]
    with ctx.tracking.conn() as c:
        c.execute("UPDATE orgmover.phases SET state = 'failed', finished_at = now() WHERE migration_id = %s "
                  "AND state = 'running'", (mid,))
    m = ctx.tracking.get(mid)
    if m["state"] != "failed":
        ctx.tracking.transition(mid, "failed", ("created", "planned", "copying", "copied"),
                                error=m["error"] or "the run did not complete")
    if m["maintenance_window"]:  # a window synced from the slots: a resume validates in full
        _close_capture(ctx, m)
        kept = ""
    else:  # failed before any window: the slots serve the resume (a rollback drops them)
        kept = ", capture slots kept for a resume (they retain WAL: resume or roll back)"
    ctx.tracking.event(mid, "warning", f"released: maintenance off, route unchanged, target rows kept for resume or "
                                       f"rollback{kept}")
    return "failed"


def rollback(ctx: MoveContext, mid: int) -> dict[str, int]:
    """Undo an unfinished migration: remove the org's rows from the target; route stays on the source."""
    m = ctx.tracking.get(mid, plan=True)
    if m["state"] == "completed":
        raise StateError(f"migration #{mid} already switched the route to {m['target_cell']}: writes since went there. "
                         f"Move it back with a move in the other direction (orgmover move {m['organization_id']} "
                         f"--from {m['target_cell']} --to {m['source_cell']}, or the org_move DAG with conf "
                         f"{{\"organization_id\": {m['organization_id']}, \"source_cell\": \"{m['target_cell']}\", "
                         f"\"target_cell\": \"{m['source_cell']}\"}}): it replaces the copy left on {m['source_cell']} with the rows as "
                         f"they are now, with the same short write pause")
    if m["state"] == "rolled_back":
        return {}
    route = ctx.topology.route(m["organization_id"])
    if route["cell"] != m["source_cell"]:
        raise StateError(f"organization {m['organization_id']} is routed to {route['cell']}; refusing to delete target rows")
    release(ctx, mid)
    _close_capture(ctx, m)  # release keeps them after a failure before any window; nothing resumes now
    counts: dict[str, int] = {}
    if m["plan"]:
        plan = Plan.from_dict(m["plan"])
        with ctx.cell(m["target_cell"]).connect() as dst, ctx.cell(m["source_cell"]).connect() as src:
            counts = delete_org_rows(dst, plan, logger=ctx.log, source=src)
    ctx.tracking.reset_tables(mid)
    ctx.tracking.transition(mid, "rolled_back", ("failed",))
    ctx.tracking.event(mid, "info", f"rolled back: {sum(counts.values())} rows removed from {m['target_cell']}")
    return counts


def capture_slots(ctx: MoveContext, m: dict) -> list[dict]:
    """The migration's capture slots that still exist, with the WAL each keeps on its cell."""
    from orgmover import changes

    out = []
    opts = m.get("options") or {}
    for key, cell in (("capture_slot", m["source_cell"]), ("capture_target_slot", m["target_cell"])):
        if not opts.get(key):
            continue
        try:
            with ctx.cell(cell).connect() as c:
                kept = changes.retained_bytes(c, opts[key])
        except (OrgMoverError, psycopg.Error):
            continue
        if kept is not None:
            out.append({"cell": cell, "slot": opts[key], "retained_bytes": kept})
    return out


def summary(ctx: MoveContext, mid: int) -> tuple[dict, str]:
    m = ctx.tracking.get(mid)
    tables = ctx.tracking.tables(mid)
    phases = ctx.tracking.phases(mid)
    route = None
    try:
        route = ctx.topology.route(m["organization_id"])
    except OrgMoverError:
        pass
    data, text = report.summary(m, tables, phases, route)
    slots = capture_slots(ctx, m)
    if slots:
        data["capture_slots"] = slots
        text += "change capture slots still open (they keep WAL until the move completes, is released or rolled back):\n" + \
            "".join(f"  {s['cell']:<12} {s['slot']:<40} {'gone' if s['retained_bytes'] is None else report.fmt_bytes(s['retained_bytes']) + ' of WAL retained'}\n"
                    for s in slots)
    ctx.tracking.update(mid, summary=data)
    ctx.reports_dir.mkdir(parents=True, exist_ok=True)
    (ctx.reports_dir / f"migration-{mid}-summary.txt").write_text(text)
    return data, text


# ------------------------------------------------------------------------------------------ cleanup
def cleanup_source(ctx: MoveContext, mid: int, retention_seconds: float, now: datetime | None = None) -> dict[str, int]:
    """Delete the moved org's rows from the source cell, only when it is safe: the migration completed,
    the Topology Service routes the org to the target, validation passed, and the retention period
    since the switch has passed. Shared rows (users, LFS objects, object pools, shards) are kept: other
    organizations of the cell may use them; unreferenced ones are left to the cell's own garbage collection."""
    m = ctx.tracking.get(mid)
    org = m["organization_id"]
    now = now or datetime.now(timezone.utc)
    if m.get("source_cleaned_at"):
        return {}
    refusals = []
    if m["state"] != "completed":
        refusals.append(f"migration #{mid} is {m['state']}, not completed")
    if not (m.get("validation") or {}).get("ok"):
        refusals.append(f"migration #{mid} has no passed validation")
    route = ctx.topology.route(org)
    if route["cell"] != m["target_cell"]:
        refusals.append(f"organization {org} is routed to {route['cell']}, not to the target {m['target_cell']}")
    if m["switched_at"] is not None:
        ready = m["switched_at"].timestamp() + retention_seconds
        if now.timestamp() < ready:
            refusals.append(f"the retention period has not passed: the route switched at {m['switched_at']:%Y-%m-%d %H:%M:%S} UTC, "
                            f"cleanup is allowed from {datetime.fromtimestamp(ready, timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    if refusals:
        raise StateError("refusing to delete organization data from the source, nothing was deleted:\n  - " + "\n  - ".join(refusals))
    plan = load_plan(ctx, mid)
    with ctx.cell(m["source_cell"]).connect() as src:
        counts = delete_org_rows(src, plan, logger=ctx.log)
    with ctx.tracking.conn() as c:
        c.execute("UPDATE orgmover.migrations SET source_cleaned_at = now() WHERE id = %s", (mid,))
    ctx.tracking.event(mid, "info", f"source {m['source_cell']} cleaned: {sum(counts.values())} rows deleted")
    return counts


# ------------------------------------------------------------------------------------------ non-database data
def _replication(ctx: MoveContext, mid: int):
    from orgmover.replication import Registry
    from orgmover.storage import CellStorage

    m = ctx.tracking.get(mid)
    src_cell, dst_cell = ctx.cell(m["source_cell"]), ctx.cell(m["target_cell"])
    src_st = src_cell.storage or CellStorage()
    dst_st = dst_cell.storage or CellStorage()
    return m, Registry(ctx.tracking, mid), src_cell, src_st, dst_st


def replicate(ctx: MoveContext, mid: int, max_passes: int = 5, in_window: bool = False) -> dict:
    """Register the org's repositories, objects and images in the replication registry, sync and verify
    them; re-scan the source and repeat until a scan finds nothing new or changed (converged)."""
    from orgmover.storage import handlers, scan_all

    m, reg, src_cell, src_st, dst_st = _replication(ctx, mid)
    if in_window:
        _require_maintenance(ctx, m)
    plan = load_plan(ctx, mid)
    with src_cell.connect() as src:
        hs = handlers(src, plan, src_st, dst_st)
        if not hs:
            ctx.log("no Git storage, object storage or registry configured for the source cell: nothing to replicate")
            return {}
        for n in range(1, max_passes + 1):
            # cheap fingerprints (refs files, bucket listings, tag digests), registered in bulk: only what
            # is new or changed goes back to pending, and only that is synced and verified below
            found = {"new": 0, "changed": 0}
            t_scan = time.monotonic()
            for h, items in scan_all(hs):
                r = reg.register(items)
                found = {k: found[k] + r[k] for k in found}
            t_sync = time.monotonic()
            for h in hs:
                reg.run(h, equal=getattr(h, "equal", None), logger=ctx.log)
            ctx.log(f"replication pass {n}: {found['new']} new, {found['changed']} changed on the source (scan "
                    f"{t_sync - t_scan:.2f}s, sync and verify {time.monotonic() - t_sync:.2f}s)")
            if not found["new"] and not found["changed"]:  # converged: the registry already had every item as it is
                break
    status = reg.status()
    ctx.log("replication: " + "; ".join(f"{k} {v['synced']}/{v['total']} synced, {v['verified']} verified"
                                        for k, v in status.items()))
    return status


def replication_state(ctx: MoveContext, mid: int) -> tuple[bool, str, dict]:
    """(everything synced and verified, readable report of what is not, status per data type)."""
    from orgmover.replication import Registry

    reg = Registry(ctx.tracking, mid)
    done = reg.complete()
    return done, "" if done else reg.stuck_report(), reg.status()


def replicate_final(ctx: MoveContext, mid: int) -> dict:
    """In the write window: a last pass catches changes made since; anything not synced and verified
    then fails the move before the switch."""
    from orgmover.replication import Registry

    status = replicate(ctx, mid, max_passes=2, in_window=True)
    reg = Registry(ctx.tracking, mid)
    if not reg.complete():
        raise ValidationFailed("repositories, objects or images are not all synced and verified:\n" + reg.stuck_report())
    return status


# ------------------------------------------------------------------------------------------ replication in mapped batches
# The DAG's replicate group: ``replication_batches`` (scan + register, batch descriptors for mapped tasks),
# ``replicate_batch`` (one batch), ``replicate`` (converge), ``replicate_due`` (the sensor's passes).

REPLICATION_MAX_BATCHES = 1000  # below Airflow's [core] max_map_length (1024): batches grow instead


def replication_batches(ctx: MoveContext, mid: int, size: int | None = None,
                        max_batches: int = REPLICATION_MAX_BATCHES) -> list[dict]:
    """Scan the source, register every repository, object and image in the registry, and return what
    still needs work (not synced and verified) as batches of about ``size`` rows per data type:
    ``{"kind", "no", "of", "first", "last", "count"}``, a range of registry keys (small whatever the
    batch size: a mapped task claims the rows of its range)."""
    from orgmover.storage import handlers, scan_all

    size = max(1, int(size or os.environ.get("ORGMOVER_REPLICATION_BATCH", "200")))
    m, reg, src_cell, src_st, dst_st = _replication(ctx, mid)
    plan = load_plan(ctx, mid)
    with src_cell.connect() as src:
        hs = handlers(src, plan, src_st, dst_st)
        if not hs:
            ctx.log("no Git storage, object storage or registry configured for the source cell: nothing to replicate")
            return []
        found = {"new": 0, "changed": 0}
        for h, items in scan_all(hs):  # the data kinds scanned at the same time
            r = reg.register(items)
            found = {k: found[k] + r[k] for k in found}
    kinds = [h.kind for h in hs]
    with ctx.tracking.conn() as c:
        todo = c.execute("SELECT count(*) AS n FROM orgmover.replicables WHERE migration_id = %s AND kind = ANY(%s) "
                         "AND NOT (state = 2 AND verification_state = 2)", (mid, kinds)).fetchone()["n"]
        size = max(size, -(-todo // max(1, max_batches - len(kinds))))
        rows = c.execute(
            "SELECT kind, (rn - 1) / %s AS no, min(key) AS first, max(key) AS last, count(*) AS count FROM ("
            "SELECT kind, key, row_number() OVER (PARTITION BY kind ORDER BY key) AS rn FROM orgmover.replicables "
            "WHERE migration_id = %s AND kind = ANY(%s) AND NOT (state = 2 AND verification_state = 2)) s "
            "GROUP BY kind, no ORDER BY kind, no", (size, mid, kinds)).fetchall()
    of = {k: sum(1 for r in rows if r["kind"] == k) for k in kinds}
    batches = [{"kind": r["kind"], "no": r["no"] + 1, "of": of[r["kind"]], "first": r["first"], "last": r["last"],
                "count": r["count"]} for r in rows]
    ctx.log(f"replication scan: {found['new']} new, {found['changed']} changed on the source; {todo} items to sync "
            f"in {len(batches)} batches of up to {size}")
    return batches


def replicate_batch(ctx: MoveContext, mid: int, batch: dict, workers: int = 4, rounds: int = 3) -> dict:
    """Sync and verify the rows of one batch (see :func:`replication_batches`): only rows of its key range
    that are pending, or failed and due, are claimed; others (synced, started elsewhere, retry not due)
    are skipped. A row sent back to pending during the pass (changed during its sync, checksum mismatch)
    is retried up to ``rounds`` claims; what is left is for the converge pass and the sensor."""
    from orgmover.replication import Registry
    from orgmover.storage import handlers

    class BatchRegistry(Registry):
        """Registry whose ``run`` claims only the batch's rows."""

        claims = 0

        def claim(self, kind: str, limit: int = 100, exclude: list[str] | None = None) -> list[dict]:
            self.claims += 1
            if self.claims > rounds:
                return []
            skip = set(exclude or [])
            rows = self.claim_range(kind, batch["first"], batch["last"])
            for r in rows:  # an item excluded by run() (it keeps differing) goes back to failed, not left started
                if r["key"] in skip:
                    self.mark_failed(kind, r["key"], "checksum mismatch persists")
            return [r for r in rows if r["key"] not in skip]

    m, _, src_cell, src_st, dst_st = _replication(ctx, mid)
    plan = load_plan(ctx, mid)
    reg = BatchRegistry(ctx.tracking, mid)
    with src_cell.connect() as src:
        h = next((h for h in handlers(src, plan, src_st, dst_st) if h.kind == batch["kind"]), None)
        if h is None:
            raise ConfigError(f"cell {m['source_cell']}: no storage configured for {batch['kind']} data")
        counts = reg.run(h, workers=workers, equal=getattr(h, "equal", None), logger=ctx.log)
    ctx.log(f"{batch['kind']} batch {batch.get('no', '?')}/{batch.get('of', '?')} ({batch['first']} .. {batch['last']}): "
            f"{counts['synced']} synced, {counts['verified']} verified, {counts['failed']} failed, {counts['bytes']:,} bytes")
    return counts


def replicate_due(ctx: MoveContext, mid: int) -> dict:
    """One pass without re-scanning the source: sync and verify what is pending or failed and due (retries
    with Geo's backoff). Returns the status per data type."""
    from orgmover.storage import handlers

    m, reg, src_cell, src_st, dst_st = _replication(ctx, mid)
    plan = load_plan(ctx, mid)
    with src_cell.connect() as src:
        for h in handlers(src, plan, src_st, dst_st):
            reg.run(h, equal=getattr(h, "equal", None), logger=ctx.log)
    return reg.status()


def replication_wait_started(ctx: MoveContext, mid: int, run_id: str | None) -> tuple[float, float]:
    """(when the wait for 100% synced and verified began, seconds since), epoch seconds of the state
    database's clock. Recorded in the migration's options on first call so task retries keep counting
    from it; a new DAG run, or a wait ended by :func:`replication_wait_reset`, starts a new one."""
    with ctx.tracking.conn() as c:
        c.execute("UPDATE orgmover.migrations SET options = coalesce(options, '{}'::jsonb) || jsonb_build_object("
                  "'replication_wait', jsonb_build_object('run_id', %s::text, 'started', extract(epoch FROM now()))), "
                  "updated_at = now() WHERE id = %s AND (options -> 'replication_wait' IS NULL "
                  "OR options -> 'replication_wait' ->> 'run_id' IS DISTINCT FROM %s::text)", (run_id, mid, run_id))
        row = c.execute("SELECT (options -> 'replication_wait' ->> 'started')::float8 AS started, "
                        "extract(epoch FROM now())::float8 AS now FROM orgmover.migrations WHERE id = %s", (mid,)).fetchone()
    if row is None or row["started"] is None:
        raise StateError(f"migration {mid} does not exist")
    return row["started"], row["now"] - row["started"]


def replication_wait_reset(ctx: MoveContext, mid: int) -> None:
    """Forget the wait's start (after it timed out: clearing the task in the UI then waits afresh)."""
    with ctx.tracking.conn() as c:
        c.execute("UPDATE orgmover.migrations SET options = options - 'replication_wait', updated_at = now() "
                  "WHERE id = %s", (mid,))
