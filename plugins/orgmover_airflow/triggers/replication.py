"""ReplicationTrigger: waits in the triggerer until a migration's replication registry is complete.

It only reads: every ``poke_interval`` it queries ``orgmover.replicables`` in the mover's state
database (Airflow connection ``orgmover_state``, the same one :class:`MoverStateHook` uses) with
psycopg's async client, and fires one event:

* ``{"status": "complete"}``: every replicable of the migration is synced and verified;
* ``{"status": "retry_due"}``: work is due that only a worker can do (a failed row whose Geo backoff
  ``retry_at`` has passed, or a row back in pending); fired at most once per ``poke_interval``;
* ``{"status": "timeout", "report": ...}``: the deadline (epoch seconds, on the state database's clock)
  passed; the report lists what is not synced and verified, with each item's state, retries and last error.

Every event carries per data type counts (``kinds``). The sync work itself is done by worker tasks
(:class:`orgmover_airflow.sensors.ReplicationSensor` runs a pass on ``retry_due`` and defers again).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timezone
from typing import Any, AsyncIterator

import psycopg
from airflow.triggers.base import BaseTrigger, TriggerEvent
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

STATE_NAMES = {0: "pending", 1: "started", 2: "synced", 3: "failed"}  # orgmover.replication's sync states
VERIFICATION_NAMES = {0: "pending", 1: "started", 2: "succeeded", 3: "failed", 4: "disabled"}

# per data type: counts, what is due for a worker now, and when the next scheduled retry is due
STATUS_SQL = """
SELECT kind, count(*) AS total,
       count(*) FILTER (WHERE state = 2) AS synced,
       count(*) FILTER (WHERE state = 2 AND verification_state = 2) AS verified,
       count(*) FILTER (WHERE state = 3) AS failed,
       count(*) FILTER (WHERE state = 0 OR (state = 3 AND (retry_at IS NULL OR retry_at <= now()))) AS due,
       extract(epoch FROM min(retry_at) FILTER (WHERE state = 3 AND retry_at > now()) - now())::float8 AS next_retry_in,
       extract(epoch FROM now())::float8 AS db_now
FROM orgmover.replicables WHERE migration_id = %s GROUP BY kind ORDER BY kind
"""

STUCK_SQL = """
SELECT kind, key, state, verification_state, retry_count, retry_at, last_sync_failure, verification_failure,
       missing_on_primary, count(*) OVER () AS stuck
FROM orgmover.replicables WHERE migration_id = %s AND NOT (state = 2 AND verification_state = 2)
ORDER BY kind, key LIMIT %s
"""


def format_stuck(rows: list[dict], kinds: dict[str, dict], waited: float | None = None) -> str:
    """A readable list of what is not synced and verified (``rows`` from STUCK_SQL), one line per item."""
    if not rows:
        return "everything is synced and verified"
    total = rows[0]["stuck"]
    head = f"{total} items not synced and verified" + (f" after {waited:.0f}s" if waited is not None else "")
    head += f" (first {len(rows)} listed)" if total > len(rows) else ""
    lines = [head + ":"]
    for r in rows:
        state = STATE_NAMES.get(r["state"], str(r["state"]))
        if r["state"] == 2:
            state = f"synced, verification {VERIFICATION_NAMES.get(r['verification_state'], r['verification_state'])}"
        extra = [f"{r['retry_count']} retries"]
        if r["missing_on_primary"]:
            extra.append("missing on source")
        if r["state"] == 3 and r["retry_at"] is not None:
            extra.append(f"next retry {r['retry_at'].astimezone(timezone.utc):%H:%M:%S} UTC")
        why = r["last_sync_failure"] or r["verification_failure"] or (
            "synced, not verified yet" if r["state"] == 2 else "not attempted yet")
        lines.append(f"  {r['kind']:<22} {r['key']}  {state}, {', '.join(extra)}: {why}")
    lines.append("status: " + "; ".join(f"{k} {v['synced']}/{v['total']} synced, {v['verified']}/{v['total']} verified, "
                                        f"{v['failed']} failed" for k, v in kinds.items()))
    return "\n".join(lines)


async def registry_status(conn: psycopg.AsyncConnection, migration_id: int) -> dict[str, dict]:
    """{kind: {total, synced, verified, failed, due, next_retry_in}} of one migration."""
    cur = await conn.execute(STATUS_SQL, (migration_id,))
    return {r["kind"]: {k: r[k] for k in ("total", "synced", "verified", "failed", "due", "next_retry_in", "db_now")}
            for r in await cur.fetchall()}


async def stuck_report(conn: psycopg.AsyncConnection, migration_id: int, kinds: dict[str, dict], limit: int = 50,
                       waited: float | None = None) -> str:
    cur = await conn.execute(STUCK_SQL, (migration_id, limit))
    return format_stuck(await cur.fetchall(), kinds, waited)


class ReplicationTrigger(BaseTrigger):
    """Fires when migration ``migration_id`` is complete, has work due, or ``deadline`` (epoch seconds) passed."""

    def __init__(self, *, migration_id: int, deadline: float, poke_interval: float = 15.0,
                 state_conn_id: str = "orgmover_state", started: float | None = None, report_limit: int = 50):
        super().__init__()
        self.migration_id = int(migration_id)
        self.deadline = float(deadline)
        self.poke_interval = float(poke_interval)
        self.state_conn_id = state_conn_id
        self.started = started  # when the whole wait began (for the report), epoch seconds
        self.report_limit = int(report_limit)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("orgmover_airflow.triggers.replication.ReplicationTrigger",
                {"migration_id": self.migration_id, "deadline": self.deadline, "poke_interval": self.poke_interval,
                 "state_conn_id": self.state_conn_id, "started": self.started, "report_limit": self.report_limit})

    async def _dsn(self) -> str:
        from airflow.sdk import BaseHook

        c = await BaseHook.aget_connection(self.state_conn_id)
        # the same mapping as MoverStateHook.get_conn
        return make_conninfo(host=c.host or "127.0.0.1", port=c.port or 5432, user=c.login or None,
                             password=c.password or None, dbname=c.schema or "orgmover")

    def _event(self, status: str, kinds: dict[str, dict], **extra: Any) -> dict:
        return {"status": status, "migration_id": self.migration_id,
                "kinds": {k: {f: v[f] for f in ("total", "synced", "verified", "failed")} for k, v in kinds.items()},
                **extra}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self._wait())

    async def _wait(self) -> dict:
        dsn = await self._dsn()
        t0 = time.monotonic()
        conn: psycopg.AsyncConnection | None = None
        try:
            while True:
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row,
                                                                     connect_timeout=10)
                    kinds = await registry_status(conn, self.migration_id)
                    # the deadline is on the state database's clock (the wait's start was recorded with it)
                    now = next(iter(kinds.values()))["db_now"] if kinds else time.time()
                    if all(v["verified"] == v["total"] for v in kinds.values()):
                        return self._event("complete", kinds)
                    due = sum(v["due"] for v in kinds.values())
                    elapsed = time.monotonic() - t0
                    if now >= self.deadline:
                        waited = now - self.started if self.started is not None else None
                        return self._event("timeout", kinds, report=await stuck_report(
                            conn, self.migration_id, kinds, self.report_limit, waited))
                    if due and elapsed >= self.poke_interval:  # a worker pass at most once per poke interval
                        return self._event("retry_due", kinds, due=due)
                    waits = [self.poke_interval, self.deadline - now + 0.05]
                    if due:
                        waits.append(self.poke_interval - elapsed)
                    else:
                        upcoming = [v["next_retry_in"] for v in kinds.values() if v["next_retry_in"] is not None]
                        if upcoming:
                            waits.append(max(min(upcoming) + 0.05, self.poke_interval - elapsed))
                    self.log.info("migration %s: %s", self.migration_id, "; ".join(
                        f"{k} {v['verified']}/{v['total']} verified, {v['failed']} failed" for k, v in kinds.items()))
                except psycopg.OperationalError as e:  # the state database is briefly unreachable: keep waiting
                    if conn is not None:
                        await conn.close()
                        conn = None
                    if time.time() >= self.deadline:
                        return self._event("timeout", {}, report=f"the replication registry could not be read: {e}")
                    self.log.warning("migration %s: cannot read the replication registry (%s); retrying", self.migration_id, e)
                    waits = [self.poke_interval, self.deadline - time.time()]
                await asyncio.sleep(max(min(waits), 0.05))
        finally:
            if conn is not None:
                await conn.close()

