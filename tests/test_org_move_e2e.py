"""End to end: the real org_move DAG (dag.test) against real local cells, checked independently
(tests/verify.py) of the mover's own validation."""

from __future__ import annotations

import psycopg
import pytest

from verify import check_move, check_storage, snapshot

pytestmark = pytest.mark.e2e


def _snap(devenv, cell):
    c = devenv.resolve_cell(cell)
    return snapshot(c.dsn, c.db_key_base)


def run(dag, **conf):
    """dag.test with every param given: a DAG object keeps the params of its previous dag.test run."""
    return dag.test(run_conf={"source_cell": "legacy", "target_cell": "cell-1", "dry_run": False,
                              "require_approval": False, "shard_map": {}, "full_validation": False, **conf})


def _states(dr) -> dict[str, str]:
    return {(ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else "")): ti.state for ti in dr.get_task_instances()}


def test_move_org_with_the_dag(devenv, seeded, org_move_dag, ctx):
    org = seeded["beta"]  # owns a fork of alpha's project through alpha's pool repository
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"))
    dr = run(org_move_dag, organization_id=org.id)
    assert dr.state == "success", _states(dr)
    problems = check_move(before[0], _snap(devenv, "legacy"), before[1], _snap(devenv, "cell-1"), org.rows)
    assert problems == []
    route = devenv.topology().route(org.id)
    assert route["cell"] == "cell-1" and route["maintenance"] is False and route["maintenance_owner"] is None
    storage_problems, counts = check_storage(devenv.resolve_cell("legacy"), devenv.resolve_cell("cell-1"), org.id)
    assert storage_problems == [] and min(counts.values()) > 0, counts
    states = _states(dr)
    assert states["replicate.wait_synced_and_verified"] == "success" and states["window.cutover"] == "success"
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "completed" and m["validation"]["ok"] is True
    # the window re-copied captured keys only and validated against the baseline taken after the pre-copy
    tables = {t["table_name"]: t for t in ctx.tracking.tables(m["id"])}
    assert tables["issues"]["sync_detail"]["mode"] == "captured"
    assert "incremental" in tables["issues"]["validation_detail"]
    summary = (ctx.reports_dir / f"migration-{m['id']}-summary.txt").read_text()
    assert "validation:       PASSED" in summary and "route now:        cell cell-1" in summary
    # the pool repository of alpha's project, shared by beta's fork, is on the target too
    with psycopg.connect(devenv.resolve_cell("cell-1").dsn) as c:
        assert c.execute("SELECT count(*) FROM projects p JOIN pool_repositories r ON r.id = p.pool_repository_id "
                         "WHERE p.organization_id = %s AND p.forked_from_project_id IS NOT NULL", (org.id,)).fetchone()[0] >= 1


def test_the_write_window_is_one_task_and_release_the_teardown_of_the_run(org_move_dag):
    """Writes are blocked from the start to the end of one task: the catch-up and the approval (while the
    org is writable) before it, the summary after it; no task boundary inside the window. ``release`` is
    the teardown of the whole run, its setup the preflight that creates or adopts the migration: it runs
    whatever failed (the window's own failure too, which a teardown of the window would not) and fails
    the run through its other tasks (a teardown does not decide the run's state)."""
    tasks = org_move_dag.task_dict
    cutover = tasks["window.cutover"]
    assert {t.task_id for t in cutover.upstream_list} == {"approval.approval_gate", "approval.approve"}
    assert [t.task_id for t in tasks["approval.approval_gate"].upstream_list] == ["quiesce.catch_up"]
    assert {t.task_id for t in cutover.downstream_list} == {"window.summary"}
    assert tasks["preflight.check"].is_setup and tasks["release"].is_teardown and not cutover.is_setup
    assert [t.task_id for t in tasks["release"].upstream_list if t.is_setup] == ["preflight.check"]
    assert cutover.switch is True and cutover.retry_delay.total_seconds() == 2
    assert "catch_up" in tasks["approval.approve"].body and "approval" in tasks["approval.approve"].body
    # the window's limits come from the run's parameters (the operator hands them to the window as seconds)
    env = org_move_dag.get_template_env(force_sandboxed=False)
    assert cutover.render_template(cutover.max_lag, {"params": {"max_lag_seconds": 12}}, jinja_env=env) == 12
    assert cutover.render_template(cutover.writers_timeout, {"params": {"writers_timeout_seconds": 5}}, jinja_env=env) == 5
    assert {"max_lag_seconds", "writers_timeout_seconds"} <= set(org_move_dag.params)


def test_yes_no_parameters_as_rendered_and_a_bad_one_refused():
    """The operators read yes/no parameters as Jinja renders them (text unless the DAG renders native
    objects); a value that is neither is a clear error, not a silent no."""
    from orgmover.errors import ConfigError
    from orgmover_airflow.operators.move import _flag

    for value, expected in ((True, True), ("True", True), ("true", True), ("1", True), (1, True),
                            (False, False), ("False", False), ("0", False), ("", False), (None, False)):
        assert _flag(value, "switch") is expected, value
    with pytest.raises(ConfigError, match="switch must be true or false, not 'ture'"):
        _flag("ture", "switch")


def test_dry_run_changes_nothing_and_writes_a_report(devenv, seeded, org_move_dag, ctx):
    org = seeded["gamma"]
    before = (_snap(devenv, "legacy"), _snap(devenv, "cell-1"), devenv.topology().route(org.id))
    dr = run(org_move_dag, organization_id=org.id, dry_run=True)
    assert dr.state == "success", _states(dr)
    states = _states(dr)
    assert states["preflight.check"] == "success"
    assert all(s == "skipped" for t, s in states.items() if not t.startswith("preflight.") and t != "release")
    assert states["release"] == "success"  # the run's teardown: nothing to release (no migration)
    assert (_snap(devenv, "legacy").tables, _snap(devenv, "cell-1").tables) == (before[0].tables, before[1].tables)
    assert devenv.topology().route(org.id) == before[2]
    assert ctx.tracking.latest_for_org(org.id) is None
    reports = sorted(ctx.reports_dir.glob(f"dry-run-org-{org.id}-*.txt"))
    text = reports[-1].read_text()
    assert "Preflight: all checks passed." in text
    assert "notes " in text and "polymorphic noteable_type/noteable_id" in text
    assert f"Organization rows: {org.total:,}" in text
    assert "Estimated copy time" in text
    assert "Non-database data" in text and "repository" in text and "object" in text and "container_repository" in text


def test_failure_in_precopy_then_resume_completes(devenv, seeded, org_move_dag, ctx):
    org = seeded["delta"]
    src_before, dst_before = _snap(devenv, "legacy"), _snap(devenv, "cell-1")
    dst = devenv.resolve_cell("cell-1").dsn
    with psycopg.connect(dst, autocommit=True) as c:  # every insert into merge_requests fails on the target
        c.execute("ALTER TABLE merge_requests ADD CONSTRAINT om_test_break CHECK (id < 0) NOT VALID")
    try:
        dr = run(org_move_dag, organization_id=org.id)
    finally:
        with psycopg.connect(dst, autocommit=True) as c:
            c.execute("ALTER TABLE merge_requests DROP CONSTRAINT om_test_break")
    states = _states(dr)
    assert dr.state == "failed", states
    failed = [t for t, s in states.items() if s == "failed"]
    assert len(failed) == 1 and failed[0].startswith("copy.copy_tables["), states  # a small org: one copy task
    assert states["window.cutover"] == "upstream_failed"
    route = devenv.topology().route(org.id)
    assert route["cell"] == "legacy" and route["maintenance"] is False  # writes were never blocked
    m = ctx.tracking.latest_for_org(org.id)
    assert ctx.tracking.table(m["id"], "merge_requests")["state"] == "failed"
    assert "merge_requests" in ctx.tracking.table(m["id"], "merge_requests")["error"]
    assert _snap(devenv, "legacy").tables == src_before.tables

    # a new run resumes the same migration: tables already copied are not copied again
    dr2 = run(org_move_dag, organization_id=org.id, full_validation=True)
    assert dr2.state == "success", _states(dr2)
    assert ctx.tracking.latest_for_org(org.id)["id"] == m["id"]
    # the capture slot opened by the first run (writes were never blocked, so nothing released it) serves
    # the resumed window; full_validation checked every chunk instead of the baseline's shortcut
    tables = {t["table_name"]: t for t in ctx.tracking.tables(m["id"])}
    assert tables["issues"]["sync_detail"]["mode"] == "captured"
    assert "incremental" not in tables["issues"]["validation_detail"]
    assert check_move(src_before, _snap(devenv, "legacy"), dst_before, _snap(devenv, "cell-1"), org.rows) == []
    assert devenv.topology().route(org.id)["cell"] == "cell-1"
