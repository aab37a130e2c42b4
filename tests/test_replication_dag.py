"""The replicate task group: the deferrable sensor's trigger on its own (asyncio, real state database),
and the org_move DAG (dag.test, real cells and storage) where one object cannot sync: the run fails at
``replicate.wait_synced_and_verified`` with a readable list naming it, nothing is switched; once the
object is back, the retry due by Geo's backoff completes the wait (sensor -> trigger -> sensor)."""

from __future__ import annotations

import asyncio
import random
import time

import psycopg
import pytest
from airflow.sdk._shared.module_loading import import_string
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from orgmover import mover
from orgmover.replication import FAILED, Registry, Replicable

pytestmark = pytest.mark.e2e


def _event(trigger, timeout: float = 60.0) -> tuple[dict, float]:
    """Run a trigger the way the triggerer does (rebuilt from its serialized form): its first event."""
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)
    t0 = time.monotonic()

    async def first():
        return await asyncio.wait_for(anext(rebuilt.run()), timeout)

    ev = asyncio.run(first())
    return ev.payload, time.monotonic() - t0


def _db_now(ctx) -> float:
    with ctx.tracking.conn() as c:
        return c.execute("SELECT extract(epoch FROM now())::float8 AS t").fetchone()["t"]


@pytest.fixture()
def registry(devenv, ctx):
    m = ctx.tracking.create(910000000 + random.randint(0, 10**6), "legacy", "cell-1", "replication-dag-test")
    yield Registry(ctx.tracking, m["id"], retry_delay=lambda n, missing: 4 * 3600.0 if missing else 1.5)
    ctx.tracking.update(m["id"], state="rolled_back")


def _sync_all(reg: Registry, kind: str) -> None:
    for r in reg.claim(kind, limit=1000):
        assert reg.mark_synced(kind, r["key"], r["generation"])
        reg.mark_verified(kind, r["key"], "sum", "sum", True)


# ------------------------------------------------------------------------------------------ the trigger alone
def test_trigger_fires_complete_when_every_row_is_synced_and_verified(registry, ctx):
    from orgmover_airflow.triggers import ReplicationTrigger

    registry.register([Replicable("object", f"uploads:k{i}", 10, f"fp{i}") for i in range(3)]
                      + [Replicable("repository", "default:@hashed/aa/bb.git", None, "refs")])
    _sync_all(registry, "object")
    _sync_all(registry, "repository")
    trig = ReplicationTrigger(migration_id=registry.mid, deadline=_db_now(ctx) + 60, poke_interval=0.2)
    ev, took = _event(trig)
    assert ev["status"] == "complete" and took < 5
    assert ev["kinds"] == {"object": {"total": 3, "synced": 3, "verified": 3, "failed": 0},
                           "repository": {"total": 1, "synced": 1, "verified": 1, "failed": 0}}


def test_trigger_times_out_with_a_report_naming_what_is_stuck(registry, ctx):
    from orgmover_airflow.triggers import ReplicationTrigger

    registry.register([Replicable("object", "uploads:ok", 10, "a"), Replicable("object", "uploads:ghost/avatar.png", 10, None),
                       Replicable("container_repository", "grp/app", None, "d")])
    _sync_all(registry, "container_repository")
    claimed = {r["key"]: r for r in registry.claim("object")}
    registry.mark_synced("object", "uploads:ok", claimed["uploads:ok"]["generation"])
    registry.mark_verified("object", "uploads:ok", "x", "x", True)
    registry.mark_failed("object", "uploads:ghost/avatar.png", "missing on the source: uploads/ghost/avatar.png",
                         missing_on_primary=True)  # next retry in 4 h: nothing for a worker to do before the deadline
    now = _db_now(ctx)
    trig = ReplicationTrigger(migration_id=registry.mid, deadline=now + 1.5, poke_interval=0.3, started=now - 100)
    ev, took = _event(trig)
    assert ev["status"] == "timeout" and 1.0 < took < 10, (ev, took)
    report = ev["report"]
    assert report.startswith("1 items not synced and verified after 10")  # waited ~101.5 s since `started`
    line = next(x for x in report.splitlines() if "uploads:ghost/avatar.png" in x)
    assert "failed, 1 retries, missing on source, next retry" in line and "missing on the source: uploads/ghost/avatar.png" in line
    assert "uploads:ok" not in report and "grp/app" not in report
    assert "object 1/2 synced, 1/2 verified, 1 failed" in report and "container_repository 1/1 synced" in report
    assert ev["kinds"]["object"] == {"total": 2, "synced": 1, "verified": 1, "failed": 1}


def test_trigger_fires_when_a_retry_is_due_not_before(registry, ctx):
    from orgmover_airflow.triggers import ReplicationTrigger

    registry.register([Replicable("object", "uploads:flaky", 10, "a")])
    registry.claim("object")
    registry.mark_failed("object", "uploads:flaky", "ObjectStoreError: 503 Slow Down")  # retry in 1.5 s
    trig = ReplicationTrigger(migration_id=registry.mid, deadline=_db_now(ctx) + 60, poke_interval=0.2)
    ev, took = _event(trig)
    assert ev["status"] == "retry_due" and ev["due"] == 1 and 1.0 < took < 5, (ev, took)
    with ctx.tracking.conn() as c:
        r = c.execute("SELECT state, retry_at <= now() AS due FROM orgmover.replicables WHERE migration_id = %s",
                      (registry.mid,)).fetchone()
    assert r["state"] == FAILED and r["due"]
    # a row back in pending is work for a worker too, but a pass at most once per poke interval
    registry.register([Replicable("object", "uploads:flaky", 10, "changed")])
    ev, took = _event(ReplicationTrigger(migration_id=registry.mid, deadline=_db_now(ctx) + 60, poke_interval=1.0))
    assert ev["status"] == "retry_due" and 0.9 < took < 5, (ev, took)


# ------------------------------------------------------------------------------------------ the DAG
def run(dag, **conf):
    """dag.test with every param given: a DAG object keeps the params of its previous dag.test run."""
    return dag.test(run_conf={"source_cell": "legacy", "target_cell": "cell-1", "dry_run": False,
                              "require_approval": False, "shard_map": {}, "full_validation": False, **conf})


def _states(dr) -> dict[str, str]:
    return {(ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else "")): ti.state for ti in dr.get_task_instances()}


@pytest.fixture()
def short_wait_dag(airflow_db, devenv, monkeypatch):
    """org_move parsed with a short replication wait and small batches (both read from the environment)."""
    from airflow.dag_processing.dagbag import DagBag

    from conftest import ROOT

    monkeypatch.setenv("ORGMOVER_REPLICATION_WAIT", "6")
    monkeypatch.setenv("ORGMOVER_REPLICATION_BATCH", "4")
    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["org_move"]
    assert dag.get_task("replicate.wait_synced_and_verified").max_wait_seconds == 6
    return dag


def test_sensor_times_out_with_a_readable_list_then_a_due_retry_completes(devenv, seeded, short_wait_dag, ctx, capsys):
    from orgmover_airflow.sensors import ReplicationSensor

    org = seeded["omega"]
    src_cell = devenv.resolve_cell("legacy")
    with psycopg.connect(src_cell.dsn) as c:
        upload = c.execute("SELECT u.path FROM uploads u JOIN projects p ON u.model_type = 'Project' AND u.model_id = p.id "
                           "WHERE p.organization_id = %s ORDER BY u.id LIMIT 1", (org.id,)).fetchone()[0]
    store = src_cell.storage.store("uploads")
    data = b"".join(store.read(upload))
    store.delete(upload)  # referenced by the org's rows, gone from the source's object storage
    route_before = devenv.topology().route(org.id)
    mid = None
    try:
        dr = run(short_wait_dag, organization_id=org.id)
        states = _states(dr)
        assert dr.state == "failed", states
        assert [t for t, s in states.items() if s == "failed"] == ["replicate.wait_synced_and_verified"], states
        batches = [t for t in states if t.startswith("replicate.sync_batch[")]
        assert len(batches) > 3 and all(states[t] == "success" for t in batches), states  # several batches per kind
        assert states["replicate.scan"] == states["replicate.converge"] == "success"
        assert states["window.cutover"] == "upstream_failed" and states["window.summary"] == "upstream_failed"
        # nothing was switched: same route, same version, never in maintenance
        assert devenv.topology().route(org.id) == route_before
        m = ctx.tracking.latest_for_org(org.id)
        mid = m["id"]
        assert m["state"] not in ("quiesced", "validated", "completed") and m["maintenance_window"] == 0
        # the readable list: in the task's failure and in the migration's events
        msg = next(e["message"] for e in ctx.tracking.events(mid) if "replication wait timed out" in e["message"])
        assert "not everything was synced and verified within 6s:\n1 items not synced and verified after " in msg
        line = next(x for x in msg.splitlines() if f"uploads:{upload}" in x)
        assert "object" in line and "failed, 1 retries, missing on source" in line and f"missing on the source: uploads/{upload}" in line
        assert "repository" in msg and "container_repository" in msg  # status of every data type
        # dag.test prints the task's failure (structlog, stdout); it was raised on the trigger's timeout event
        failure = capsys.readouterr().out
        assert "AirflowFailException: not everything was synced and verified within 6s" in failure
        assert f"uploads:{upload}" in failure and "in execute_complete" in failure
        status = mover.replication_state(ctx, mid)[2]
        assert status["object"]["verified"] == status["object"]["total"] - 1
        assert status["repository"]["verified"] == status["repository"]["total"] > 0

        # deferrable=False keeps the reschedule sensor: a poke runs a pass and says not yet
        rescheduling = ReplicationSensor(task_id="wait_r", migration_id=mid, max_wait_seconds=60, deferrable=False)
        assert rescheduling.mode == "reschedule" and rescheduling.poke({"run_id": "manual-poke"}) is False

        # the object is back; its retry comes due (Geo's backoff, shortened here): the sensor defers, the
        # trigger fires at the retry time, the next pass syncs it and the wait completes
        store.write(upload, iter([data]), len(data))
        with ctx.tracking.conn() as c:
            c.execute("UPDATE orgmover.replicables SET retry_at = now() + interval '2 seconds' WHERE migration_id = %s "
                      "AND state = %s", (mid, FAILED))
        sensor = ReplicationSensor(task_id="wait", migration_id=mid, max_wait_seconds=60, poke_interval=1)
        context = {"run_id": ctx.tracking.get(mid)["dag_run_id"]}  # a task of the run that drives the migration
        with pytest.raises(AirflowFailException, match=r"is driven by run .*not this run \('another-run'\)"):
            sensor.execute({"run_id": "another-run"})  # one of another run stops before it changes anything
        with pytest.raises(TaskDeferred) as deferred:
            sensor.execute(context)  # the retry is not due yet: hand the wait to the trigger
        assert deferred.value.method_name == "execute_complete"
        ev, took = _event(deferred.value.trigger)
        assert ev["status"] == "retry_due", ev
        done = sensor.execute_complete(context, event=ev)
        assert done["object"]["verified"] == done["object"]["total"] == status["object"]["total"], done
        assert mover.replication_state(ctx, mid)[0] is True
        poked = rescheduling.poke({"run_id": "manual-poke"})
        assert poked.is_done and poked.xcom_value == done
        assert b"".join(devenv.resolve_cell("cell-1").storage.store("uploads").read(upload)) == data
    finally:
        if store.head(upload) is None:
            store.write(upload, iter([data]), len(data))
        if mid is not None:
            mover.rollback(ctx, mid)  # the target's rows of the unfinished move go; the route never moved
    assert devenv.topology().route(org.id)["cell"] == "legacy"
