"""org_cleanup and org_rollback: the after-move operations on one migration (thin DAGs).

* org_cleanup deletes a moved organization's rows from the source cell, refusing unless the route
  points at the target, validation passed and the retention period since the switch is over.
* org_rollback removes an unfinished migration's rows from the target (the org stays on the source).
"""

from __future__ import annotations

from airflow.sdk import DAG, Param

from orgmover_airflow.operators import CleanupSourceOperator, RollbackOperator

with DAG(dag_id="org_cleanup", schedule=None, catchup=False, render_template_as_native_obj=True,
         tags=["orgmover"], doc_md=__doc__,
         params={"migration_id": Param(type="integer", minimum=1, title="Migration id"),
                 "retention_hours": Param(168, type="number", minimum=0, title="Retention (hours since the switch)")}):
    CleanupSourceOperator(task_id="cleanup_source", migration_id="{{ params.migration_id }}",
                          retention_hours="{{ params.retention_hours }}", retries=0)

with DAG(dag_id="org_rollback", schedule=None, catchup=False, render_template_as_native_obj=True,
         tags=["orgmover"], doc_md=__doc__,
         params={"migration_id": Param(type="integer", minimum=1, title="Migration id")}):
    RollbackOperator(task_id="rollback", migration_id="{{ params.migration_id }}", retries=0)
