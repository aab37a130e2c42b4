"""Safe under a real Airflow deployment: Airflow's own API server, scheduler, DAG processor and triggerer
(LocalExecutor) started by the session (tests/airflow_deployment.py), driven only through the REST API,
as an SRE's automation would. Each test asserts on both cells, the route and its maintenance flag in the
Topology Service, and the mover's state, not only on task states.

Faults are real: a transaction held open on the source (a writer still running when maintenance goes
on), the target's PostgreSQL stopped, the Topology Service stopped, the window's task process killed
with SIGKILL. Nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from verify import check_move, snapshot

pytestmark = pytest.mark.real_airflow

DAG = "org_move"
ISSUE_OF_ORG = ("SELECT min(i.id) FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                "WHERE n.organization_id = %s")


def _snap(devenv, cell):
    c = devenv.resolve_cell(cell)
    return snapshot(c.dsn, c.db_key_base)


def _conf(org, **extra):
    return {"organization_id": org.id, "source_cell": "legacy", "target_cell": "cell-1", **extra}


def _wait(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class HeldWriter:
    """A transaction on the source that wrote one of the org's rows and stays open (as a slow request of
    the application would) until rolled back: the window waits for it with writes blocked. Started while
    the run waits for its approval (after the pre-copy: creating the capture slot waits for running
    transactions, as PostgreSQL's logical slots do)."""

    def __init__(self, devenv, org):
        self.conn = psycopg.connect(devenv.resolve_cell("legacy").dsn)
        issue = self.conn.execute(ISSUE_OF_ORG, (org.id,)).fetchone()[0]
        self.conn.execute("UPDATE issues SET title = title || ' (held)' WHERE id = %s", (issue,))

    def rollback(self):
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def _start_with_a_held_writer(af, devenv, org, **conf) -> tuple[str, HeldWriter]:
    """A run that waits for approval, a writer held open on the source, then the approval: the window
    opens with the writer still running."""
    run_id = af.trigger(DAG, _conf(org, require_approval=True, **conf))
    _wait(lambda: af.pending_approvals(DAG, run_id), 240, "the approval to be asked")
    writer = HeldWriter(devenv, org)
    af.answer(DAG, run_id, "approval.approve", ["Approve"])
    return run_id, writer


def _blocked(devenv, org):
    return devenv.topology().route(org.id)["maintenance"]


def _assert_on_source_and_writable(devenv, ctx, org, src_before):
    route = devenv.topology().route(org.id)
    assert route["cell"] == "legacy" and route["maintenance"] is False and route["maintenance_owner"] is None, route
    assert _snap(devenv, "legacy").tables == src_before.tables  # the source is as it was
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "failed", m["state"]
    return m


def _assert_moved(devenv, ctx, org, before):
    problems = check_move(before[0], _snap(devenv, "legacy"), before[1], _snap(devenv, "cell-1"), org.rows)
    assert problems == []
    route = devenv.topology().route(org.id)
    assert route["cell"] == "cell-1" and route["maintenance"] is False, route
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "completed" and m["validation"]["ok"] is True
    return m


def _failed_log(af, run_id, task_id, try_number=1):
    return af.task_log(DAG, run_id, task_id, try_number)


# ---------------------------------------------------------------------------------------------- approval
def test_approval_while_writable_then_the_window_runs_without_waiting(airflow_deployment, devenv, seeded, ctx):
    """The person approves a validated, caught-up move while the org is still writable; the body is
    readable text. After the answer the window runs (sync, validate, switch) without anyone."""
    af, org = airflow_deployment, seeded["kaf"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    run_id = af.trigger(DAG, _conf(org, require_approval=True))
    pending = _wait(lambda: af.pending_approvals(DAG, run_id), 240, "the approval to be asked")
    route = devenv.topology().route(org.id)
    assert route["cell"] == "legacy" and route["maintenance"] is False  # writable while the person reads
    body = pending[0]["body"]
    for line in ("Rows copied:", "Storage items:", "Validation:", "Report:", "Expected write pause:"):
        assert line in body, body
    assert "{" not in body and "'" not in body.split("Report:")[0], body  # text, not a Python dict
    m = ctx.tracking.latest_for_org(org.id)
    assert (ctx.reports_dir / f"migration-{m['id']}-approval.txt").read_text() == body
    af.answer(DAG, run_id, "approval.approve", ["Approve"])
    assert af.wait_run(DAG, run_id, 180) == "success", af.task_instances(DAG, run_id)
    _assert_moved(devenv, ctx, org, before)


def test_a_window_that_differs_from_what_was_approved_switches_nothing_and_lifts_maintenance(
        airflow_deployment, devenv, seeded, ctx):
    """Approved while every check matched; then a row changes on the target behind the mover's back: the
    window's validation differs, nothing is switched, maintenance is lifted, and the task fails at once
    (a difference is final: no retry)."""
    af, org = airflow_deployment, seeded["lamed"]
    src_before = _snap(devenv, "legacy")
    run_id = af.trigger(DAG, _conf(org, require_approval=True))
    _wait(lambda: af.pending_approvals(DAG, run_id), 240, "the approval to be asked")
    with psycopg.connect(devenv.resolve_cell("cell-1").dsn) as c:
        c.execute("UPDATE issues SET title = 'changed on the target' WHERE id = (%s)" % ISSUE_OF_ORG, (org.id,))
    af.answer(DAG, run_id, "approval.approve", ["Approve"])
    assert af.wait_run(DAG, run_id, 180) == "failed"
    tis = af.task_instances(DAG, run_id)
    assert tis["window.cutover"]["state"] == "failed" and tis["window.cutover"]["try_number"] == 1, tis["window.cutover"]
    assert tis["release"]["state"] == "success"
    m = _assert_on_source_and_writable(devenv, ctx, org, src_before)
    assert "differ" in m["error"] and m["maintenance_window"] == 1
    assert "tables differ between cells: issues" in _failed_log(af, run_id, "window.cutover")


# ---------------------------------------------------------------------------------------------- window faults
def test_writers_still_running_lift_maintenance_and_the_retry_moves_the_org(airflow_deployment, devenv, seeded, ctx):
    """A transaction still writing when maintenance goes on outlasts writers_timeout_seconds: the window
    lifts maintenance at once (the org writable again, route on the source) and fails as transient; once
    the writer is gone, the task's own retry moves the org. No clear, no person."""
    af, org = airflow_deployment, seeded["mem"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    run_id, writer = _start_with_a_held_writer(af, devenv, org, writers_timeout_seconds=3)
    try:
        _wait(lambda: _blocked(devenv, org), 240, "maintenance on")
        t0 = time.monotonic()
        _wait(lambda: not _blocked(devenv, org), 20, "maintenance lifted after the writers' timeout", every=0.05)
        blocked_for = time.monotonic() - t0
        assert blocked_for < 3 + 5, blocked_for  # its own timeout and the lift, no person
        assert devenv.topology().route(org.id)["cell"] == "legacy"
        assert ctx.tracking.latest_for_org(org.id)["state"] == "failed"
    finally:
        writer.rollback()
    assert af.wait_run(DAG, run_id, 180) == "success"
    tis = af.task_instances(DAG, run_id)
    assert tis["window.cutover"]["try_number"] >= 2  # the retry did it
    assert "writing when the write window blocked" in _failed_log(af, run_id, "window.cutover") or \
        "still running" in _failed_log(af, run_id, "window.cutover")
    m = _assert_moved(devenv, ctx, org, before)
    assert any("maintenance lifted" in e["message"] for e in ctx.tracking.events(m["id"]))


def test_target_unreachable_inside_the_window_lifts_maintenance(airflow_deployment, devenv, seeded, ctx):
    """The target's PostgreSQL stops while the window waits with writes blocked: the window lifts
    maintenance and the route stays on the source; the retries fail while it is down, the run ends
    failed and names the cell; once it is back, a new run resumes the migration and moves the org."""
    af, org = airflow_deployment, seeded["nun"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    target = devenv.cluster("cell-1", next(c["port"] for c in devenv.load()["cells"] if c["name"] == "cell-1"))
    run_id, writer = _start_with_a_held_writer(af, devenv, org, writers_timeout_seconds=15)
    try:
        _wait(lambda: _blocked(devenv, org), 240, "maintenance on")
        target.stop()
        writer.rollback()
        t0 = time.monotonic()
        _wait(lambda: not _blocked(devenv, org), 30, "maintenance lifted", every=0.1)
        assert time.monotonic() - t0 < 15 + 5
        assert af.wait_run(DAG, run_id, 180) == "failed"
    finally:
        writer.rollback()
        if not target.running():
            target.start()
            target.wait_ready()
    m = _assert_on_source_and_writable(devenv, ctx, org, before[0])
    assert "cell-1" in m["error"] and "not reachable" in m["error"], m["error"]
    tis = af.task_instances(DAG, run_id)
    assert tis["window.cutover"]["state"] == "failed" and tis["window.cutover"]["try_number"] > 1  # retried
    # the run has ended: a new run adopts the migration and completes it
    run2 = af.trigger(DAG, _conf(org))
    assert af.wait_run(DAG, run2, 240) == "success", af.task_instances(DAG, run2)
    assert _assert_moved(devenv, ctx, org, before)["id"] == m["id"]


def test_topology_service_unreachable_for_a_while(airflow_deployment, devenv, seeded, ctx):
    """The Topology Service stops while the window has writes blocked, so the switch cannot be made:
    the window keeps trying to lift maintenance until the service is back (8 s later), lifts it, and the
    task's retry then moves the org. The route is never half-switched."""
    af, org = airflow_deployment, seeded["samekh"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    state = devenv.load()
    run_id, writer = _start_with_a_held_writer(af, devenv, org, writers_timeout_seconds=15)
    try:
        _wait(lambda: _blocked(devenv, org), 240, "maintenance on")
        os.killpg(devenv.load()["topology"]["pid"], signal.SIGTERM)
        _wait(lambda: not devenv._topology_healthy(state), 10, "the Topology Service to stop")
        writer.rollback()
        time.sleep(8)
        devenv._start_topology(devenv.load())
        assert af.wait_run(DAG, run_id, 240) == "success", af.task_instances(DAG, run_id)
    finally:
        writer.rollback()
        devenv._start_topology(devenv.load())
    m = _assert_moved(devenv, ctx, org, before)
    messages = [e["message"] for e in ctx.tracking.events(m["id"])]
    assert any("maintenance lifted" in x for x in messages), messages
    assert af.task_instances(DAG, run_id)["window.cutover"]["try_number"] >= 2


def test_window_task_killed_with_sigkill(airflow_deployment, devenv, seeded, ctx):
    """The window's task process is killed (SIGKILL) with writes blocked: nothing in it can react. Its retry,
    two seconds after Airflow sees it die, resumes the window; the org is never blocked longer than the
    window's own timeouts plus one retry delay (and a task start), and the move completes."""
    af, org = airflow_deployment, seeded["ayin"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    timeout = 6
    run_id, writer = _start_with_a_held_writer(af, devenv, org, writers_timeout_seconds=timeout)
    try:
        _wait(lambda: _blocked(devenv, org), 240, "maintenance on")
        t0 = time.monotonic()
        ti = af.task_instances(DAG, run_id)["window.cutover"]
        pid = _wait(lambda: af.task_pid(ti["id"]), 10, "the window's task process")
        os.kill(pid, signal.SIGKILL)
        writer.rollback()
        _wait(lambda: not _blocked(devenv, org), 60, "writes open again", every=0.1)
        assert time.monotonic() - t0 < 2 * timeout + 2 + 15  # this window's and its retry's timeouts, the delay, a start
        assert af.wait_run(DAG, run_id, 240) == "success", af.task_instances(DAG, run_id)
    finally:
        writer.rollback()
    _assert_moved(devenv, ctx, org, before)
    assert af.task_instances(DAG, run_id)["window.cutover"]["try_number"] >= 2


# ---------------------------------------------------------------------------------------------- one run per migration
def test_one_run_drives_a_migration(airflow_deployment, devenv, seeded, ctx):
    """Two runs for one org at the same instant: exactly one proceeds, the other is refused in preflight
    naming it. A third, while the first is running, gets the same refusal. The move completes once."""
    af, org = airflow_deployment, seeded["pe"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    runs: list[str] = []
    barrier = threading.Barrier(2)

    def trigger():
        barrier.wait()
        runs.append(af.trigger(DAG, _conf(org)))

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prefl = {r: af.wait_task(DAG, r, "preflight.check", ("success", "failed"), 120)["state"] for r in runs}
    assert sorted(prefl.values()) == ["failed", "success"], prefl
    winner = next(r for r, s in prefl.items() if s == "success")
    loser = next(r for r, s in prefl.items() if s == "failed")
    assert f"is being moved by run {winner!r}" in _failed_log(af, loser, "preflight.check")
    third = af.trigger(DAG, _conf(org))
    assert af.wait_task(DAG, third, "preflight.check", ("success", "failed"), 120)["state"] == "failed"
    assert f"is being moved by run {winner!r}" in _failed_log(af, third, "preflight.check")
    assert af.wait_run(DAG, winner, 240) == "success"
    for r in (loser, third):
        assert af.wait_run(DAG, r, 60) == "failed"
        print("release of a refused run:", af.task_instances(DAG, r)["release"]["state"])
    m = _assert_moved(devenv, ctx, org, before)
    assert m["dag_run_id"] == winner


# ---------------------------------------------------------------------------------------------- transient errors
def test_target_postgres_stopped_mid_copy_the_run_completes_by_itself(airflow_deployment, devenv, seeded, ctx):
    """The target's PostgreSQL stops for about 15 s while the copy runs: the copy fails as transient,
    takes its retries with backoff, and the run completes with no clear: no row duplicated or missing."""
    af, org = airflow_deployment, seeded["tsadi"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    target = devenv.cluster("cell-1", next(c["port"] for c in devenv.load()["cells"] if c["name"] == "cell-1"))
    run_id = af.trigger(DAG, _conf(org))
    try:
        af.wait_task(DAG, run_id, "copy.copy_tables[0]", ("running",), 240)
        target.stop()
        time.sleep(15)
    finally:
        target.start()
        target.wait_ready()
    assert af.wait_run(DAG, run_id, 300) == "success", af.task_instances(DAG, run_id)
    tis = af.task_instances(DAG, run_id)
    assert max(ti["try_number"] for k, ti in tis.items() if k.startswith("copy.")) >= 2  # retried, not cleared
    _assert_moved(devenv, ctx, org, before)


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_conf_key_is_refused_before_anything_runs(airflow_deployment, devenv, seeded, ctx):
    af, org = airflow_deployment, seeded["qof"]
    route = devenv.topology().route(org.id)
    run_id = af.trigger(DAG, _conf(org, dry_runn=True))
    assert af.wait_run(DAG, run_id, 120) == "failed"
    log = _failed_log(af, run_id, "preflight.check")
    assert "unknown key in the run's conf: 'dry_runn'" in log and "org_move knows " in log and "dry_run" in log
    assert "Traceback" not in log.split("unknown key")[0][-200:]
    assert devenv.topology().route(org.id) == route and ctx.tracking.latest_for_org(org.id) is None


def test_rollback_of_a_completed_move_names_a_command_that_works(airflow_deployment, devenv, seeded, ctx):
    """The rollback DAG refuses a migration that switched, and says how to move the org back: a command
    the CLI accepts."""
    from orgmover import cli

    af, org = airflow_deployment, seeded["kaf"]  # moved by the approval test
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "completed"
    run_id = af.trigger("org_rollback", {"migration_id": m["id"]})
    assert af.wait_run("org_rollback", run_id, 120) == "failed"
    log = af.task_log("org_rollback", run_id, "rollback", 1)
    command = f"orgmover move {org.id} --from cell-1 --to legacy"
    assert command in log
    args = cli.parser().parse_args(command.split()[1:])
    assert (args.org, args.source, args.target) == (org.id, "cell-1", "legacy")
    assert devenv.topology().route(org.id)["cell"] == "cell-1" and ctx.tracking.get(m["id"])["state"] == "completed"
