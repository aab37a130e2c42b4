"""Geo-like replication of an organization's non-database data: one registry row per replicable
(repository, object, container repository) in the mover's state database, with GitLab Geo's states
and rules (see gitlab-data-model.md §6):

* sync states pending 0, started 1, synced 2, failed 3; verification pending 0, started 1,
  succeeded 2, failed 3, disabled 4;
* a failure schedules a retry with Geo's backoff ``retry_count**4 + 15 + random(0..30) * (retry_count + 1)``
  seconds, capped at 1 h (4 h when the resource is missing on the source);
* marking synced is a compare-and-set on the row's *generation*: a re-scan that sees the source
  changed bumps the generation and sends the row back to pending, so a sync that started before the
  change cannot mark it synced;
* verification compares the checksums of both sides; a mismatch sends the row back to pending.

A :class:`Handler` knows one data kind: how to list the org's items on the source (with a cheap
fingerprint for change detection), sync one item, and checksum it on either side.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from orgmover.tracking import Tracking

log = logging.getLogger("orgmover.replication")

PENDING, STARTED, SYNCED, FAILED = 0, 1, 2, 3
V_PENDING, V_STARTED, V_SUCCEEDED, V_FAILED, V_DISABLED = 0, 1, 2, 3, 4
STATE_NAMES = {PENDING: "pending", STARTED: "started", SYNCED: "synced", FAILED: "failed"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS orgmover.replicables (
  migration_id bigint NOT NULL REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  kind text NOT NULL,
  key text NOT NULL,
  size bigint,
  meta jsonb,
  fingerprint text,
  generation integer NOT NULL DEFAULT 0,
  state smallint NOT NULL DEFAULT 0,
  retry_count integer NOT NULL DEFAULT 0,
  retry_at timestamptz,
  last_synced_at timestamptz,
  last_sync_failure text,
  verification_state smallint NOT NULL DEFAULT 0,
  source_checksum text,
  target_checksum text,
  checksum_mismatch boolean NOT NULL DEFAULT false,
  verified_at timestamptz,
  verification_failure text,
  missing_on_primary boolean NOT NULL DEFAULT false,
  PRIMARY KEY (migration_id, kind, key)
);
"""


def backoff_seconds(retry_count: int, missing_on_primary: bool = False, rng: random.Random | None = None) -> float:
    """Geo's retry delay after ``retry_count`` failures."""
    r = (rng or random).randint(0, 30)
    delay = retry_count ** 4 + 15 + r * (retry_count + 1)
    return float(min(delay, 4 * 3600 if missing_on_primary else 3600))


@dataclass
class Replicable:
    kind: str
    key: str
    size: int | None = None
    fingerprint: str | None = None  # changes when the source item changes (refs digest, etag, manifest digests)
    meta: dict = field(default_factory=dict)


class MissingOnSource(Exception):
    """The item is referenced by the database but absent from the source storage."""


class Handler(Protocol):
    kind: str

    def scan(self) -> list[Replicable]: ...

    def sync(self, item: Replicable) -> int: ...

    def checksums(self, item: Replicable) -> tuple[str | None, str | None]: ...


MAX_MISMATCHES_PER_RUN = 3  # re-syncs of one item in one run before it waits for its backoff


_SCHEMA_READY: set[str] = set()


class Registry:
    """The replication registry of one migration."""

    def __init__(self, tracking: Tracking, migration_id: int, rng: random.Random | None = None,
                 retry_delay: Callable[[int, bool], float] | None = None):
        self.t, self.mid = tracking, migration_id
        self.rng = rng or random.Random()
        self.retry_delay = retry_delay or (lambda n, missing: backoff_seconds(n, missing, self.rng))
        if tracking.dsn not in _SCHEMA_READY:  # once per process: DDL locks the catalog, even when there is nothing to do
            with self.t.conn() as c:
                c.execute(SCHEMA)
            _SCHEMA_READY.add(tracking.dsn)

    # ------------------------------------------------------------------ scanning
    def register(self, items: Iterable[Replicable]) -> dict:
        """Insert new items; an item whose fingerprint changed goes back to pending with a new generation.

        In bulk, so the cost follows what changed: one query reads the registered fingerprints of the
        items' kinds, then the new rows are inserted and the changed ones updated in one pipelined batch
        each (an update applies only while the registered fingerprint still differs)."""
        from psycopg.types.json import Jsonb

        latest: dict[tuple[str, str], Replicable] = {}
        for it in items:
            latest[(it.kind, it.key)] = it  # an item listed twice: the last one counts
        if not latest:
            return {"new": 0, "changed": 0}
        kinds = sorted({k for k, _ in latest})
        with self.t.conn() as c:
            known = {(r["kind"], r["key"]): r["fingerprint"] for r in c.execute(
                "SELECT kind, key, fingerprint FROM orgmover.replicables WHERE migration_id = %s AND kind = ANY(%s)",
                (self.mid, kinds))}
            fresh = [it for k, it in latest.items() if k not in known]
            moved = [it for k, it in latest.items() if k in known and known[k] != it.fingerprint]
            with c.cursor() as cur:
                if fresh:
                    cur.executemany("INSERT INTO orgmover.replicables (migration_id, kind, key, size, meta, fingerprint) "
                                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                    [(self.mid, it.kind, it.key, it.size, Jsonb(it.meta), it.fingerprint) for it in fresh])
                if moved:
                    cur.executemany("UPDATE orgmover.replicables SET fingerprint = %s, size = %s, meta = %s, "
                                    "generation = generation + 1, state = 0, verification_state = 0, retry_at = NULL, "
                                    "missing_on_primary = false WHERE migration_id = %s AND kind = %s AND key = %s "
                                    "AND fingerprint IS DISTINCT FROM %s",
                                    [(it.fingerprint, it.size, Jsonb(it.meta), self.mid, it.kind, it.key, it.fingerprint)
                                     for it in moved])
        return {"new": len(fresh), "changed": len(moved)}

    # ------------------------------------------------------------------ the state machine
    def claim(self, kind: str, limit: int = 100, exclude: list[str] | None = None) -> list[dict]:
        """Pending (or failed and due) rows of ``kind``, marked started (not the keys in ``exclude``)."""
        with self.t.conn() as c:
            return c.execute(
                "UPDATE orgmover.replicables r SET state = 1 FROM (SELECT key FROM orgmover.replicables WHERE migration_id = %s "
                "AND kind = %s AND (state = 0 OR (state = 3 AND (retry_at IS NULL OR retry_at <= now()))) "
                "AND NOT (key = ANY(%s)) ORDER BY key LIMIT %s FOR UPDATE SKIP LOCKED) s "
                "WHERE r.migration_id = %s AND r.kind = %s AND r.key = s.key "
                "RETURNING r.*", (self.mid, kind, list(exclude or []), limit, self.mid, kind)).fetchall()

    def mark_synced(self, kind: str, key: str, generation: int) -> bool:
        """Compare-and-set: only a started row of the same generation becomes synced."""
        with self.t.conn() as c:
            cur = c.execute("UPDATE orgmover.replicables SET state = 2, last_synced_at = now(), last_sync_failure = NULL, "
                            "retry_count = 0, retry_at = NULL, missing_on_primary = false, verification_state = 0 "
                            "WHERE migration_id = %s AND kind = %s AND key = %s AND state = 1 AND generation = %s",
                            (self.mid, kind, key, generation))
            if cur.rowcount == 0:  # changed during the sync: back to pending
                c.execute("UPDATE orgmover.replicables SET state = 0 WHERE migration_id = %s AND kind = %s AND key = %s "
                          "AND state = 1", (self.mid, kind, key))
            return cur.rowcount == 1

    def mark_failed(self, kind: str, key: str, error: str, missing_on_primary: bool = False) -> float:
        with self.t.conn() as c:
            row = c.execute("SELECT retry_count FROM orgmover.replicables WHERE migration_id = %s AND kind = %s AND key = %s "
                            "FOR UPDATE", (self.mid, kind, key)).fetchone()
            n = (row["retry_count"] if row else 0) + 1
            delay = self.retry_delay(n, missing_on_primary)
            c.execute("UPDATE orgmover.replicables SET state = 3, retry_count = %s, retry_at = now() + make_interval(secs => %s), "
                      "last_sync_failure = %s, missing_on_primary = %s WHERE migration_id = %s AND kind = %s AND key = %s",
                      (n, delay, error[:2000], missing_on_primary, self.mid, kind, key))
        return delay

    def mark_verified(self, kind: str, key: str, source: str | None, target: str | None, equal: bool) -> None:
        with self.t.conn() as c:
            if equal:
                c.execute("UPDATE orgmover.replicables SET verification_state = 2, source_checksum = %s, target_checksum = %s, "
                          "checksum_mismatch = false, verified_at = now(), verification_failure = NULL "
                          "WHERE migration_id = %s AND kind = %s AND key = %s", (source, target, self.mid, kind, key))
            else:  # a mismatch is a sync to redo
                c.execute("UPDATE orgmover.replicables SET verification_state = 3, source_checksum = %s, target_checksum = %s, "
                          "checksum_mismatch = true, verified_at = now(), state = 0, "
                          "verification_failure = 'checksum mismatch: source ' || coalesce(%s, 'missing') || ', target ' || "
                          "coalesce(%s, 'missing') WHERE migration_id = %s AND kind = %s AND key = %s",
                          (source, target, source, target, self.mid, kind, key))

    # ------------------------------------------------------------------ driving a handler
    def run(self, handler: Handler, workers: int = 4, equal: Callable[[str | None, str | None], bool] | None = None,
            logger: Callable[[str], None] | None = None) -> dict:
        """One pass: sync every due row of the handler's kind, then verify it. Returns counts."""
        equal = equal or (lambda a, b: a is not None and a == b)
        say = logger or log.info
        counts = {"synced": 0, "failed": 0, "verified": 0, "mismatch": 0, "bytes": 0}

        def one(row: dict) -> None:
            item = Replicable(row["kind"], row["key"], row["size"], row["fingerprint"], row["meta"] or {})
            try:
                counts["bytes"] += handler.sync(item) or 0
            except MissingOnSource as e:
                counts["failed"] += 1
                self.mark_failed(item.kind, item.key, f"missing on the source: {e}", missing_on_primary=True)
                return
            except Exception as e:  # recorded on the row and retried with backoff
                counts["failed"] += 1
                delay = self.mark_failed(item.kind, item.key, f"{type(e).__name__}: {e}")
                say(f"{item.kind} {item.key}: sync failed ({e}); retry in {delay:.0f}s")
                return
            if not self.mark_synced(item.kind, item.key, row["generation"]):
                return
            counts["synced"] += 1
            src, dst = handler.checksums(item)
            ok = equal(src, dst)
            self.mark_verified(item.kind, item.key, src, dst, ok)
            counts["verified" if ok else "mismatch"] += 1
            if not ok:
                with lock:
                    mismatches[item.key] = mismatches.get(item.key, 0) + 1
                    again = mismatches[item.key] >= MAX_MISMATCHES_PER_RUN
                if again:  # the same item keeps differing after a re-sync: stop looping on it, retry with backoff
                    delay = self.mark_failed(item.kind, item.key, f"checksum mismatch after {MAX_MISMATCHES_PER_RUN} "
                                                                  f"syncs in a row: source {src}, target {dst}")
                    say(f"{item.kind} {item.key}: checksums still differ after a re-sync; retry in {delay:.0f}s")

        # one pool for every claimed batch: its threads (and their state-database connections) are reused
        lock = threading.Lock()
        mismatches: dict[str, int] = {}
        with ThreadPoolExecutor(max(1, workers)) as ex:
            while True:
                rows = self.claim(handler.kind, limit=200,
                                  exclude=[k for k, n in mismatches.items() if n >= MAX_MISMATCHES_PER_RUN])
                if not rows:
                    break
                list(ex.map(one, rows))
        say(f"{handler.kind}: {counts['synced']} synced, {counts['verified']} verified, {counts['mismatch']} mismatched, "
            f"{counts['failed']} failed")
        return counts

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, dict]:
        """Per kind, Geo-style: counts and synced/verified percentages."""
        with self.t.conn() as c:
            rows = c.execute("SELECT kind, count(*) AS total, count(*) FILTER (WHERE state = 2) AS synced, "
                             "count(*) FILTER (WHERE state = 3) AS failed, "
                             "count(*) FILTER (WHERE state = 2 AND verification_state = 2) AS verified, "
                             "coalesce(sum(size), 0) AS bytes FROM orgmover.replicables WHERE migration_id = %s "
                             "GROUP BY kind ORDER BY kind", (self.mid,)).fetchall()
        out = {}
        for r in rows:
            total = r["total"] or 1
            out[r["kind"]] = {**r, f"{r['kind']}_synced_in_percentage": round(100.0 * r["synced"] / total, 2),
                              f"{r['kind']}_verified_in_percentage": round(100.0 * r["verified"] / total, 2)}
        return out

    def complete(self) -> bool:
        with self.t.conn() as c:
            return not c.execute("SELECT 1 FROM orgmover.replicables WHERE migration_id = %s AND NOT (state = 2 AND "
                                 "verification_state = 2) LIMIT 1", (self.mid,)).fetchone()

    def stuck_report(self, limit: int = 50) -> str:
        """A readable list of what is not synced and verified, with the last error of each."""
        with self.t.conn() as c:
            rows = c.execute("SELECT kind, key, state, verification_state, retry_count, retry_at, last_sync_failure, "
                             "verification_failure, missing_on_primary FROM orgmover.replicables WHERE migration_id = %s "
                             "AND NOT (state = 2 AND verification_state = 2) ORDER BY kind, key LIMIT %s", (self.mid, limit)).fetchall()
        if not rows:
            return "everything is synced and verified"
        lines = [f"{len(rows)} items not synced and verified{' (first ' + str(limit) + ')' if len(rows) == limit else ''}:"]
        for r in rows:
            why = r["last_sync_failure"] or r["verification_failure"] or "not attempted yet"
            lines.append(f"  {r['kind']:<22} {r['key']}  {STATE_NAMES[r['state']]}, {r['retry_count']} retries"
                         f"{', missing on source' if r['missing_on_primary'] else ''}: {why}")
        return "\n".join(lines)

    def claim_range(self, kind: str, first: str, last: str) -> list[dict]:
        """Like :meth:`claim`, restricted to one batch: pending (or failed and due) rows of ``kind`` with
        ``first <= key <= last``, marked started. Rows in any other state are skipped."""
        with self.t.conn() as c:
            return c.execute(
                "UPDATE orgmover.replicables r SET state = 1 FROM (SELECT key FROM orgmover.replicables WHERE migration_id = %s "
                "AND kind = %s AND key >= %s AND key <= %s AND (state = 0 OR (state = 3 AND (retry_at IS NULL "
                "OR retry_at <= now()))) ORDER BY key FOR UPDATE SKIP LOCKED) s WHERE r.migration_id = %s AND r.kind = %s "
                "AND r.key = s.key RETURNING r.*", (self.mid, kind, first, last, self.mid, kind)).fetchall()


def wait_until_complete(registry: Registry, handlers: list[Handler], timeout: float, poll: float = 1.0,
                        logger: Callable[[str], None] | None = None) -> bool:
    """Drive passes until everything is synced and verified or ``timeout`` passes (then False)."""
    deadline = time.monotonic() + timeout
    while True:
        for h in handlers:
            registry.run(h, logger=logger)
        if registry.complete():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
