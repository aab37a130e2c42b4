"""`make demo`: start the local cells, seed GitLab-shaped organizations, move the largest one with the
real org_move DAG (`airflow dags test`), and print the result.

Everything lives under .orgmover/demo (reset at every run) and .orgmover/airflow; nothing needs root
or Docker. Run it again at will.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".orgmover" / "demo"
BIN = Path(sys.executable).parent
T0 = time.monotonic()


def step(msg: str) -> None:
    print(f"\n==> [{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def main() -> int:
    os.environ.update({
        "ORGMOVER_HOME": str(HOME),
        "AIRFLOW_HOME": str(ROOT / ".orgmover" / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "ORGMOVER_REPORTS_DIR": str(HOME / "reports"),
        "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR") or str(ROOT / ".orgmover" / "run"),
    })
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)
    from orgmover.devenv import DevEnv
    from orgmover.seed import default_orgs, seed

    env = DevEnv(HOME)
    step("resetting the demo cells under .orgmover/demo")
    env.down(destroy=True, log=lambda *_: None)
    step("starting local cells: PostgreSQL 18 x3 (legacy = cell 0, cell-1, control) and the Topology Service")
    st = env.up(ncells=2)
    step("seeding GitLab-shaped organizations on the legacy cell")
    legacy = env.resolve_cell("legacy")
    orgs = seed(legacy.dsn, default_orgs(120_000), db_key_base=legacy.db_key_base, seed=42)
    topo = env.topology()
    for o in orgs:
        topo.create_route(o.id, "legacy")
    # the org to move: Globex (20k rows) with every data kind; Initech (120k rows) stays on the cell
    big = next(o for o in orgs if o.path == "globex")
    step(f"creating {big.path}'s Git repositories (and the pool it forks from), objects (S3; cell-1 keeps artifacts "
         f"on GCS) and container images")
    import psycopg

    from orgmover.storage import seed_storage

    with psycopg.connect(legacy.dsn) as c:
        print(seed_storage(c, legacy.storage, [big.id], seed=42, max_object_bytes=2048))
    step("preparing Airflow (metadata DB in .orgmover/airflow)")
    os.environ.update(env.airflow_connections())
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = {"organization_id": big.id, "source_cell": "legacy", "target_cell": "cell-1"}
    step(f"moving organization {big.id} ({big.path}, {big.total:,} rows) with the org_move DAG: "
         f"airflow dags test org_move -c '{json.dumps(conf)}'")
    log = HOME / "logs" / "org_move.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([str(BIN / "airflow"), "dags", "test", "org_move", "-c", json.dumps(conf)],
                            stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"DAG run finished in {time.monotonic() - t:.1f}s (full log: {log})")
    ctx = env.context(reports_dir=HOME / "reports", log=lambda *_: None)
    m = ctx.tracking.latest_for_org(big.id)
    if rc != 0 or m is None or m["state"] != "completed":
        print(f"the move did not complete (see {log})", file=sys.stderr)
        if m is not None:
            print(env.context().tracking.get(m["id"])["error"], file=sys.stderr)
        return 1
    from orgmover import mover

    step("result")
    print(mover.summary(ctx, m["id"])[1])
    vr = HOME / "reports" / ("migration-%d-validation.txt" % m["id"])
    text = vr.read_text()
    if "Non-database data" in text:
        print(text[text.index("Non-database data"):].rstrip())
    print(f"validation report: {vr}")
    others = [o for o in orgs if o.id != big.id]
    print("other organizations still routed to: " + ", ".join(f"{o.path}={topo.route(o.id)['cell']}" for o in others))
    print(f"\nlocal cells keep running: {BIN / 'orgmover'} --home {HOME} dev status | down")
    print(f"make demo took {time.monotonic() - T0:.0f}s (install not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
