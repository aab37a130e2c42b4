"""Shared fixtures: real local cells (PostgreSQL 18 x3, the Topology Service) started by the project
itself in a temporary ORGMOVER_HOME, and an isolated Airflow home for ``dag.test``.

Airflow reads its configuration at import time, so the environment is set here, before any test
module imports airflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="orgmover-tests-"))
os.environ["AIRFLOW_HOME"] = str(_TMP / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ["ORGMOVER_TASK_RETRIES"] = "0"  # failures are asserted, not retried
os.environ["ORGMOVER_REPLICATION_POKE"] = "1"
os.environ["ORGMOVER_REPORTS_DIR"] = str(_TMP / "reports")
os.environ.setdefault("XDG_RUNTIME_DIR", str(_TMP / "run"))
Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)

# The organizations every test session seeds on the legacy cell (name, rows). Tests that move an
# organization each use their own, so they do not depend on their order.
TEST_ORGS = [("alpha", 700), ("beta", 4000), ("gamma", 2500), ("delta", 1500), ("epsilon", 900),
             ("zeta", 1200), ("eta", 800), ("theta", 600), ("iota", 60000), ("kappa", 1500), ("lambda", 1500),
             ("mu", 1200), ("nu", 900),
             ("xi", 1000), ("omicron", 800), ("pi", 700), ("rho", 1500), ("sigma", 1500), ("tau", 1200),
             ("upsilon", 1000), ("phi", 700), ("chi", 700), ("psi", 1500),
             ("omega", 700),  # omega: tests/test_replication_dag.py (the sensor's timeout)
             ("aleph", 700), ("beth", 700),
             ("gimel", 700), ("dalet", 700),  # gimel, dalet: writers still running when maintenance goes on
             ("he", 700),
             # tests/test_real_airflow_safety.py: one each, moved by Airflow's own scheduler
             ("kaf", 1500), ("lamed", 900), ("mem", 900), ("nun", 900), ("samekh", 900), ("ayin", 900),
             ("pe", 900), ("tsadi", 3000), ("qof", 700)]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    return _TMP


@pytest.fixture(scope="session")
def devenv(tmp_root):
    """Two real cells (legacy = cell 0, cell-1), the control cluster and the Topology Service."""
    from orgmover.devenv import DevEnv

    env = DevEnv(tmp_root / "cells")
    env.up(ncells=2, log=lambda *_: None)
    os.environ.update(env.airflow_connections())
    yield env
    env.down(destroy=True, log=lambda *_: None)


@pytest.fixture(scope="session")
def seeded(devenv):
    """The test organizations, seeded on legacy and routed there: {name: SeededOrg}."""
    from orgmover.seed import OrgSpec, seed

    cell = devenv.resolve_cell("legacy")
    orgs = seed(cell.dsn, [OrgSpec(n, r) for n, r in TEST_ORGS], db_key_base=cell.db_key_base, seed=7, log=lambda *_: None)
    topo = devenv.topology()
    for o in orgs:
        topo.create_route(o.id, "legacy")
    # their repositories, objects and images (not for the 60k-row org, which only the copy tests use)
    import psycopg

    from orgmover.storage import seed_storage

    with psycopg.connect(cell.dsn) as c:
        seed_storage(c, cell.storage, [o.id for o in orgs if o.path != "iota"], seed=7, max_object_bytes=4096)
    return {o.path: o for o in orgs}


@pytest.fixture(scope="session")
def airflow_db(tmp_root):
    """An isolated Airflow metadata DB (SQLite) for dag.test."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy())
    return True


@pytest.fixture(scope="session")
def org_move_dag(airflow_db, devenv):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["org_move"]


@pytest.fixture()
def ctx(devenv, tmp_root):
    return devenv.context(reports_dir=tmp_root / "reports", log=lambda *_: None)


@pytest.fixture(scope="session")
def airflow_deployment(devenv, seeded, tmp_root):
    """Airflow's own components (api-server, scheduler, dag-processor, triggerer) against the local
    cells, driven through the REST API: tests/airflow_deployment.py."""
    from airflow_deployment import AirflowDeployment

    deployment = AirflowDeployment(devenv, tmp_root / "airflow-deployment")
    deployment.start()
    yield deployment
    deployment.stop()
