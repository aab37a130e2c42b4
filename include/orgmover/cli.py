"""``orgmover`` command line: local cells, seed data, and moves without Airflow (same domain code).

  orgmover dev up|down|status [--json]       local cells, Topology Service, mover state
  orgmover seed [--large-rows N]             GitLab-shaped organizations on the legacy cell, routed there
  orgmover move ORG --from CELL --to CELL    run every phase in this process (what the DAG runs as tasks)
  orgmover dry-run ORG --from CELL --to CELL readable report, changes nothing
  orgmover rollback MIGRATION                remove an unfinished migration's rows from the target
  orgmover show MIGRATION                    the summary of a migration
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from orgmover.errors import OrgMoverError


def _env(args):
    from orgmover.devenv import DevEnv, default_home

    return DevEnv(default_home() if not getattr(args, "home", None) else __import__("pathlib").Path(args.home).resolve())


def cmd_dev(args) -> int:
    env = _env(args)
    if args.action == "up":
        st = env.up(ncells=args.cells, log=(lambda *_: None) if args.json else print)
    elif args.action == "down":
        env.down(destroy=args.destroy)
        return 0
    else:
        st = env.status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        for c in st["cells"]:
            print(f"cell {c['name']:8} id {c['id']}  {'up  ' if c['running'] else 'DOWN'}  {c['uri']}")
        print(f"topology          {'up  ' if st['topology']['running'] else 'DOWN'}  {st['topology']['url']}")
        print(f"mover state       {'up  ' if st['state_db']['running'] else 'DOWN'}  {st['state_db']['uri']}")
        print(f"airflow env       {st['airflow_env']}")
    return 0


def cmd_seed(args) -> int:
    from orgmover.seed import OrgSpec, default_orgs, seed

    env = _env(args)
    cell = env.resolve_cell(args.cell)
    orgs = default_orgs(args.large_rows) if not args.org else [OrgSpec(name=n, rows=int(r)) for n, r in (o.split(":") for o in args.org)]
    t0 = time.monotonic()
    seeded = seed(cell.dsn, orgs, db_key_base=cell.db_key_base, seed=args.seed)
    topo = env.topology()
    for o in seeded:
        topo.create_route(o.id, args.cell)
        print(f"organization {o.id:>15} {o.path:12} {sum(o.rows.values()):>9,} rows  routed to {args.cell}")
    print(f"seeded {len(seeded)} organizations in {time.monotonic() - t0:.1f}s")
    return 0


def run_move(ctx, org: int, source: str, target: str, run_id: str = "cli", before_window=None,
             value_maps: dict | None = None) -> int:
    """Every phase in order, as the DAG runs them; release on failure. Returns the migration id."""
    from orgmover import mover

    mid = mover.preflight(ctx, org, source, target, run_id, value_maps)
    try:
        tables = mover.make_plan(ctx, mid)
        mover.prepare_target(ctx, mid)
        mover.copy_tables(ctx, mid, tables)
        mover.precopy_done(ctx, mid)
        mover.replicate(ctx, mid)
        mover.catch_up(ctx, mid)
        # before_window(mid): writes that land after the window's last catch-up pass, right before the block
        mover.write_window(ctx, mid, before_block=(lambda: before_window(mid)) if before_window else None)
    except Exception as e:
        ctx.tracking.update(mid, error=str(e)[:4000])
        mover.release(ctx, mid)
        raise
    return mid


def cmd_move(args) -> int:
    from orgmover import mover

    ctx = _env(args).context()
    mid = run_move(ctx, args.org, args.source, args.target)
    print(mover.summary(ctx, mid)[1])
    return 0


def cmd_dry_run(args) -> int:
    from orgmover import mover

    path, problems = mover.dry_run(_env(args).context(log=lambda *_: None), args.org, args.source, args.target)
    print(path.read_text())
    print(f"report: {path}")
    return 1 if problems else 0


def cmd_copy_table(args) -> int:
    from orgmover import mover

    res = mover.copy_table(_env(args).context(), args.migration, args.table)
    print(f"{res['table']}: {res['rows']:,} rows copied")
    return 0


def cmd_cleanup(args) -> int:
    from orgmover import mover

    counts = mover.cleanup_source(_env(args).context(), args.migration, args.retention_hours * 3600)
    print(f"migration #{args.migration}: {sum(counts.values()):,} rows deleted from the source")
    return 0


def cmd_rollback(args) -> int:
    from orgmover import mover

    counts = mover.rollback(_env(args).context(), args.migration)
    print(f"migration #{args.migration} rolled back: {sum(counts.values()):,} rows removed from the target")
    return 0


def cmd_show(args) -> int:
    from orgmover import mover

    print(mover.summary(_env(args).context(), args.migration)[1])
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orgmover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="local environment directory (default $ORGMOVER_HOME or ./.orgmover)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dev", help="local cells")
    d.add_argument("action", choices=["up", "down", "status"])
    d.add_argument("--json", action="store_true")
    d.add_argument("--cells", type=int, default=2)
    d.add_argument("--destroy", action="store_true", help="with down: remove data directories too")
    d.set_defaults(fn=cmd_dev)
    s = sub.add_parser("seed", help="seed GitLab-shaped organizations")
    s.add_argument("--cell", default="legacy")
    s.add_argument("--large-rows", type=int, default=120_000)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--org", action="append", help="name:rows (repeatable); default: the demo's five orgs")
    s.set_defaults(fn=cmd_seed)
    for name, fn in (("move", cmd_move), ("dry-run", cmd_dry_run)):
        m = sub.add_parser(name)
        m.add_argument("org", type=int)
        m.add_argument("--from", dest="source", required=True)
        m.add_argument("--to", dest="target", required=True)
        m.set_defaults(fn=fn)
    c = sub.add_parser("copy-table", help="pre-copy one table of a planned migration (resumable)")
    c.add_argument("migration", type=int)
    c.add_argument("table")
    c.set_defaults(fn=cmd_copy_table)
    cl = sub.add_parser("cleanup", help="delete a moved org's rows from the source (guarded)")
    cl.add_argument("migration", type=int)
    cl.add_argument("--retention-hours", type=float, default=168.0)
    cl.set_defaults(fn=cmd_cleanup)
    r = sub.add_parser("rollback")
    r.add_argument("migration", type=int)
    r.set_defaults(fn=cmd_rollback)
    sh = sub.add_parser("show")
    sh.add_argument("migration", type=int)
    sh.set_defaults(fn=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except OrgMoverError as e:
        print(f"orgmover: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
