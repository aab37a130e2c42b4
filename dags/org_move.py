"""org_move: move one GitLab organization from one cell to another.

preflight -> plan -> pre-copy and replication (org writable) -> catch-up [-> a person approves, the org
still writable] -> the write window in one task (maintenance on, sync what changed, validate, go/no-go,
switch). Whatever fails once maintenance is on, the window lifts it and the route stays on the source;
``release``, the teardown of the whole run (its setup is preflight), lifts what a killed window left and
marks an unfinished migration failed, for a later run to resume. One run drives a migration. A dry run
stops after preflight with a readable report and changes nothing. Thin file: the work is in
``orgmover`` and ``orgmover_airflow``.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param, TaskGroup, TriggerRule

from orgmover_airflow.operators import (CatchUpOperator, CopyTablesOperator, PlanOperator, PrecopyDoneOperator,
                                        PreflightOperator, PrepareTargetOperator, ReleaseOperator, ReplicateOperator,
                                        SummaryOperator, WriteWindowOperator)
from orgmover_airflow.operators.move import ReplicateBatchOperator, ReplicateScanOperator
from orgmover_airflow.sensors import ReplicationSensor

MID = "{{ ti.xcom_pull(task_ids='preflight.check') }}"
CELL = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-z0-9][a-z0-9_-]*$"}


class ApprovalGate(BaseBranchOperator):
    """Goes through the human approval only when the run asks for it (before writes are blocked)."""

    def choose_branch(self, context):
        return "approval.approve" if context["params"].get("require_approval") else "window.cutover"


with DAG(
    dag_id="org_move",
    description="Move one organization's data between cells, verified, then switch its route",
    schedule=None,
    catchup=False,
    max_active_runs=8,
    render_template_as_native_obj=True,
    tags=["orgmover", "cells"],
    default_args={"retries": int(os.environ.get("ORGMOVER_TASK_RETRIES", "2")), "retry_delay": timedelta(seconds=10), "retry_exponential_backoff": True},
    params={
        "organization_id": Param(type="integer", minimum=1, title="Organization id",
                                 description="The organization to move (organizations.id)"),
        "source_cell": Param(type="string", title="Source cell", description="Cell the organization is routed to now",
                             **{k: v for k, v in CELL.items() if k != "type"}),
        "target_cell": Param(type="string", title="Target cell", description="Cell to move the organization to",
                             **{k: v for k, v in CELL.items() if k != "type"}),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Check and plan only, write a report, change nothing"),
        "require_approval": Param(False, type="boolean", title="Require approval",
                                  description="Wait for a person to approve the move after the catch-up, while the org "
                                              "is still writable; the window then runs without waiting"),
        "full_validation": Param(False, type="boolean", title="Full validation in the window",
                                 description="Checksum every chunk of every table while writes are blocked, instead of "
                                             "comparing only the rows written since the baseline taken after the pre-copy"),
        "max_lag_seconds": Param(30, type="number", minimum=0, title="Max lag before the window",
                                 description="The write window does not block writes when its last catch-up pass, "
                                             "while the org is writable, takes longer than this: the writes made "
                                             "meanwhile would all be synced with writes blocked (retry later)"),
        "writers_timeout_seconds": Param(30, type="number", minimum=0, title="Wait for running writers",
                                         description="With writes blocked, how long to wait for transactions that "
                                                     "were writing on the source when maintenance went on, before the "
                                                     "window fails naming them (nothing synced)"),
        "shard_map": Param({}, type="object", title="Storage mapping",
                           description="Source Gitaly storage name -> target storage name, for storages the target "
                                       "names differently (same names need no entry)"),
    },
    doc_md=__doc__,
) as dag:
    with TaskGroup("preflight", tooltip="checks, no changes") as g_pre:
        check = PreflightOperator(task_id="check", organization_id="{{ params.organization_id }}",
                                  source_cell="{{ params.source_cell }}", target_cell="{{ params.target_cell }}",
                                  dry_run="{{ params.dry_run }}", shard_map="{{ params.shard_map }}", retries=0)
        is_move = ShortCircuitOperator(task_id="is_move", python_callable=lambda dry_run: not dry_run,
                                       op_kwargs={"dry_run": "{{ params.dry_run }}"})
        check >> is_move

    with TaskGroup("plan", tooltip="how every table's org rows are selected") as g_plan:
        plan = PlanOperator(task_id="plan", migration_id=MID)

    with TaskGroup("copy", tooltip="pre-copy while the org is writable: COPY streaming, resumable chunks") as g_copy:
        prepare = PrepareTargetOperator(task_id="shared_rows", migration_id=MID)
        # a few tasks sized by the plan's bytes, not one per table: a task start costs about a second
        copies = CopyTablesOperator.partial(
            task_id="copy_tables", migration_id=MID, max_active_tis_per_dag=4,
            map_index_template="{{ task.tables | length }} tables: {{ task.tables[:3] | join(', ') }}"
                               "{{ ', ...' if task.tables | length > 3 else '' }}").expand(tables=plan.output)
        precopied = PrecopyDoneOperator(task_id="precopy_done", migration_id=MID)
        prepare >> copies >> precopied

    with TaskGroup("replicate", tooltip="repositories, objects, images: Geo-like registry, synced and verified") as g_repl:
        scan = ReplicateScanOperator(task_id="scan", migration_id=MID)
        batches = ReplicateBatchOperator.partial(
            task_id="sync_batch", migration_id=MID, max_active_tis_per_dag=4,
            map_index_template="{{ task.batch.kind }} {{ task.batch.no }}/{{ task.batch.of }}").expand(batch=scan.output)
        # runs when there was no batch (nothing to sync: the mapped task is skipped), not after a failure
        converge = ReplicateOperator(task_id="converge", migration_id=MID, trigger_rule=TriggerRule.NONE_FAILED)
        replicated = ReplicationSensor(task_id="wait_synced_and_verified", migration_id=MID,
                                       max_wait_seconds=int(os.environ.get("ORGMOVER_REPLICATION_WAIT", "3600")),
                                       poke_interval=int(os.environ.get("ORGMOVER_REPLICATION_POKE", "15")))
        scan >> batches >> converge >> replicated

    with TaskGroup("quiesce", tooltip="catch up while writable: the window then has only the last seconds' writes") as g_quiesce:
        # the rows written since the pre-copy synced and the baseline refreshed right before the window
        catch = CatchUpOperator(task_id="catch_up", migration_id=MID)

    with TaskGroup("approval", tooltip="a person approves, the org still writable (require_approval)") as g_approval:
        gate = ApprovalGate(task_id="approval_gate")
        approve = ApprovalOperator(
            task_id="approve",
            subject="Move organization {{ params.organization_id }} to cell {{ params.target_cell }}?",
            body="{{ ti.xcom_pull(task_ids='quiesce.catch_up', key='approval') }}",
            fail_on_reject=True, response_timeout=timedelta(hours=2), retries=0)
        gate >> approve

    # the write window is ONE task: between tasks, writes would stay blocked while the scheduler starts
    # the next one (seconds each). Inside: maintenance on, rows and storage synced at once, foreign keys
    # checked while the rows are validated, go/no-go (readable report), the route switched; whatever fails
    # in it, it lifts maintenance before it ends. A retry (2 s later) runs a new window
    with TaskGroup("window", tooltip="writes blocked: maintenance on, sync, validate, go/no-go, switch") as g_window:
        cutover = WriteWindowOperator(task_id="cutover", migration_id=MID, switch=True,
                                      full="{{ params.full_validation }}", max_lag="{{ params.max_lag_seconds }}",
                                      writers_timeout="{{ params.writers_timeout_seconds }}",
                                      trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
                                      retry_delay=timedelta(seconds=2), retry_exponential_backoff=False)
        summary = SummaryOperator(task_id="summary", migration_id=MID)
        cutover >> summary

    # teardown of the whole run (setup: preflight, which creates or adopts the migration): runs once
    # everything else is done, whatever failed (the run's state is its other tasks': a failed window fails it)
    release = ReleaseOperator(task_id="release", migration_id=MID, retries=5, retry_delay=timedelta(seconds=5)
                              ).as_teardown(setups=check)

    is_move >> plan >> prepare
    precopied >> scan
    replicated >> catch >> gate
    [gate, approve] >> cutover
    summary >> release
