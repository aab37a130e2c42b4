"""The DAGs under a real Airflow deployment (api-server, scheduler, dag-processor, triggerer,
LocalExecutor), driven through the REST API as a user's automation would."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_airflow


def test_a_dry_run_through_the_rest_api_checks_and_changes_nothing(airflow_deployment, devenv, seeded):
    org = seeded["alpha"]
    route = devenv.topology().route(org.id)
    run_id = airflow_deployment.trigger("org_move", {"organization_id": org.id, "source_cell": "legacy",
                                                     "target_cell": "cell-1", "dry_run": True})
    state = airflow_deployment.wait_run("org_move", run_id)
    states = airflow_deployment.states("org_move", run_id)
    assert state == "success", (states, airflow_deployment.task_log("org_move", run_id, "preflight.check", 1))
    # preflight checked, the short circuit (is_move) skipped the move; release, the teardown of
    # preflight, still ran
    ran = {t: states.pop(t) for t in ("preflight.check", "preflight.is_move", "release")}
    assert ran == dict.fromkeys(ran, "success") and set(states.values()) == {"skipped"}, (ran, states)
    assert devenv.topology().route(org.id) == route
