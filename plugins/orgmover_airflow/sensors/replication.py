"""ReplicationSensor: waits until every repository, object and image of the org is synced and verified.

Each poke drives one replication pass (so retries scheduled with Geo's backoff happen) and checks the
registry; in ``reschedule`` mode the worker slot is free between pokes. After ``max_wait_seconds`` it
fails with a readable list of what is not synced and why (last error, retries, missing on source).
"""

from __future__ import annotations

import time
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from orgmover import mover
from orgmover_airflow.operators.move import OrgMoveBaseOperator


class ReplicationSensor(OrgMoveBaseOperator, BaseSensorOperator):
    template_fields = ("migration_id",)
    ui_color = "#fff8e1"

    def __init__(self, *, max_wait_seconds: float = 3600, **kwargs: Any):
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 15)
        super().__init__(**kwargs)
        self.max_wait_seconds = max_wait_seconds

    def poke(self, context: Any) -> bool:
        ctx = self.move_context()
        m = ctx.tracking.get(self.mid)
        started = (m.get("options") or {}).get("replication_wait_started")
        if started is None:
            started = time.time()
            ctx.tracking.update(self.mid, options={**(m.get("options") or {}), "replication_wait_started": started})
        mover.replicate(ctx, self.mid, max_passes=1)
        done, stuck, status = mover.replication_state(ctx, self.mid)
        for kind, s in status.items():
            self.log.info("%s: %s%% synced, %s%% verified (%s/%s)", kind, s[f"{kind}_synced_in_percentage"],
                          s[f"{kind}_verified_in_percentage"], s["verified"], s["total"])
        if done:
            return True
        if time.time() - started > self.max_wait_seconds:
            raise AirflowFailException(f"not everything was synced and verified within {self.max_wait_seconds:.0f}s:\n{stuck}")
        self.log.info("%s", stuck)
        return False

    def execute(self, context: Any):
        return BaseSensorOperator.execute(self, context)
