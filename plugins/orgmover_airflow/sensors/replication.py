"""ReplicationSensor: waits until every repository, object and image of the org is synced and verified.

Deferrable (default): ``execute`` runs one replication pass on the worker (what is pending, or failed
and due: retries scheduled with Geo's backoff), returns if everything is synced and verified, else
defers to :class:`~orgmover_airflow.triggers.ReplicationTrigger`, which only reads the registry in the
triggerer. On its event ``execute_complete`` finishes (``complete``), runs another pass and defers
again (``retry_due``: a failed row's ``retry_at`` has come), or fails (``timeout``).

``deferrable=False`` keeps the ``reschedule`` sensor: each poke runs a pass and checks; the worker
slot is free between pokes.

Either way ``max_wait_seconds`` is measured from the first start of the wait in this DAG run (kept in
the migration's options, so task retries do not reset it; a new run, or clearing the task after a
timeout, waits afresh), and a timeout fails the task, without retries, with a readable list of what is
not synced and why (state, retries, missing on source, next retry, last error), also recorded as an
error event of the migration.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from orgmover import mover
from orgmover_airflow.operators.move import OrgMoveBaseOperator, classified_errors
from orgmover_airflow.triggers.replication import STUCK_SQL, ReplicationTrigger, format_stuck

# how long past the deadline Airflow itself gives up on the deferral if the triggerer never answers
_DEFER_MARGIN = 300.0


class ReplicationSensor(OrgMoveBaseOperator, BaseSensorOperator):
    template_fields = ("migration_id",)
    ui_color = "#fff8e1"

    def __init__(self, *, max_wait_seconds: float = 3600, deferrable: bool = True, report_limit: int = 50,
                 **kwargs: Any):
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 15)
        super().__init__(**kwargs)
        self.max_wait_seconds = float(max_wait_seconds)
        self.deferrable = deferrable
        self.report_limit = report_limit

    # ------------------------------------------------------------------ one worker pass
    def _pass(self, context: Any) -> tuple[dict | None, float, float]:
        """Sync and verify what is due; (summary if everything is synced and verified else None, start of
        the wait, seconds waited). Fails the task once the wait is over."""
        ctx = self.move_context()
        run_id = context.get("run_id")
        started, _ = mover.replication_wait_started(ctx, self.mid, run_id)
        status = mover.replicate_due(ctx, self.mid)
        for kind, s in status.items():
            self.log.info("%s: %s%% synced, %s%% verified (%s/%s)", kind, s[f"{kind}_synced_in_percentage"],
                          s[f"{kind}_verified_in_percentage"], s["verified"], s["total"])
        if all(s["verified"] == s["total"] for s in status.values()):
            return _summary(status), started, 0.0
        _, waited = mover.replication_wait_started(ctx, self.mid, run_id)
        report = self._report(ctx, status, waited)
        if waited >= self.max_wait_seconds:
            self._timed_out(ctx, report)
        self.log.info("waited %.0fs of %.0fs:\n%s", waited, self.max_wait_seconds, report)
        return None, started, waited

    def _report(self, ctx: mover.MoveContext, status: dict, waited: float) -> str:
        with ctx.tracking.conn() as c:
            rows = c.execute(STUCK_SQL, (self.mid, self.report_limit)).fetchall()
        return format_stuck(rows, status, waited)

    def _timed_out(self, ctx: mover.MoveContext, report: str):
        msg = f"not everything was synced and verified within {self.max_wait_seconds:.0f}s:\n{report}"
        ctx.tracking.event(self.mid, "error", f"replication wait timed out: {msg}")
        mover.replication_wait_reset(ctx, self.mid)
        raise AirflowFailException(msg)

    # ------------------------------------------------------------------ deferrable
    def execute(self, context: Any):
        if not self.deferrable:
            return BaseSensorOperator.execute(self, context)
        with classified_errors(self.log):
            self._fence(context)
            return self._pass_then_defer(context)

    def _pass_then_defer(self, context: Any):
        summary, started, waited = self._pass(context)
        if summary is not None:
            return summary
        self.defer(trigger=ReplicationTrigger(migration_id=self.mid, deadline=started + self.max_wait_seconds,
                                              poke_interval=self.poke_interval, state_conn_id=self.state_conn_id,
                                              started=started, report_limit=self.report_limit),
                   method_name="execute_complete",
                   timeout=timedelta(seconds=max(0.0, self.max_wait_seconds - waited) + _DEFER_MARGIN))

    def execute_complete(self, context: Any, event: dict | None = None):
        event = event or {}
        status = event.get("status")
        with classified_errors(self.log):
            if status == "complete":
                for kind, s in (event.get("kinds") or {}).items():
                    self.log.info("%s: %s/%s synced, %s/%s verified", kind, s["synced"], s["total"], s["verified"], s["total"])
                return _summary(event.get("kinds") or {})
            if status == "retry_due":
                self.log.info("retries due (%s items): another pass", event.get("due"))
                return self._pass_then_defer(context)
            if status == "timeout":
                self._timed_out(self.move_context(), event.get("report") or "(no report)")
        raise AirflowException(f"unexpected event from the replication trigger: {event!r}")

    # ------------------------------------------------------------------ reschedule mode
    def poke(self, context: Any) -> bool | PokeReturnValue:
        with classified_errors(self.log):
            summary, _, _ = self._pass(context)
        return PokeReturnValue(True, summary) if summary is not None else False


def _summary(status: dict) -> dict:
    return {k: {"total": v["total"], "synced": v["synced"], "verified": v["verified"]} for k, v in status.items()}
