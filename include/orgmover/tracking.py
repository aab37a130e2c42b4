"""The mover's own state: migrations, their phases, per-table progress and validation results.

Lives in a PostgreSQL database of the project's own (never Airflow's metadata DB), so any task can
be retried or re-run and resume from what is recorded here. One *active* migration per
organization is enforced by a partial unique index.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orgmover.errors import StateError

ACTIVE_STATES = ("created", "planned", "quiesced", "copying", "copied", "validating", "validated", "switching", "failed")
FINAL_STATES = ("completed", "rolled_back")

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS orgmover;
CREATE TABLE IF NOT EXISTS orgmover.migrations (
  id bigserial PRIMARY KEY,
  organization_id bigint NOT NULL,
  source_cell text NOT NULL,
  target_cell text NOT NULL,
  state text NOT NULL DEFAULT 'created',
  dag_run_id text,
  plan jsonb,
  maintenance_window integer NOT NULL DEFAULT 0,
  maintenance_started_at timestamptz,
  maintenance_ended_at timestamptz,
  switched_at timestamptz,
  route_version bigint,
  validation jsonb,
  summary jsonb,
  error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_active_per_org ON orgmover.migrations (organization_id)
  WHERE state NOT IN ('completed', 'rolled_back');
CREATE TABLE IF NOT EXISTS orgmover.phases (
  migration_id bigint NOT NULL REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  phase text NOT NULL,
  attempt integer NOT NULL DEFAULT 1,
  state text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  PRIMARY KEY (migration_id, phase)
);
CREATE TABLE IF NOT EXISTS orgmover.tables (
  migration_id bigint NOT NULL REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  table_name text NOT NULL,
  strategy text NOT NULL,
  state text NOT NULL DEFAULT 'pending',
  copied_in_window integer,
  rows_copied bigint NOT NULL DEFAULT 0,
  bytes_copied bigint NOT NULL DEFAULT 0,
  copy_seconds double precision,
  source_rows bigint,
  target_rows bigint,
  source_checksum text,
  target_checksum text,
  validation_state text NOT NULL DEFAULT 'pending',
  validation_detail jsonb,
  error text,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (migration_id, table_name)
);
ALTER TABLE orgmover.migrations ADD COLUMN IF NOT EXISTS precopy_xmin bigint;
ALTER TABLE orgmover.migrations ADD COLUMN IF NOT EXISTS source_cleaned_at timestamptz;
ALTER TABLE orgmover.migrations ADD COLUMN IF NOT EXISTS options jsonb;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS chunk_column text;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS validated_in_window integer;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS synced_in_window integer;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS sync_detail jsonb;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS baseline jsonb;
ALTER TABLE orgmover.tables ADD COLUMN IF NOT EXISTS entered_keys jsonb;
CREATE TABLE IF NOT EXISTS orgmover.chunks (
  migration_id bigint NOT NULL REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  table_name text NOT NULL,
  chunk_no integer NOT NULL,
  lo bigint,
  hi bigint,
  state text NOT NULL DEFAULT 'pending',
  rows bigint NOT NULL DEFAULT 0,
  bytes bigint NOT NULL DEFAULT 0,
  attempts integer NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (migration_id, table_name, chunk_no)
);
-- keys read from a change-capture slot, recorded before the slot is advanced past them (nothing read
-- is lost if a task dies in between: the next read sees the same changes again)
CREATE TABLE IF NOT EXISTS orgmover.captured_changes (
  migration_id bigint NOT NULL REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  slot text NOT NULL,
  upto_lsn pg_lsn NOT NULL,
  at timestamptz NOT NULL DEFAULT now(),
  changes bigint NOT NULL,
  keys jsonb NOT NULL,
  PRIMARY KEY (migration_id, slot, upto_lsn)
);
CREATE TABLE IF NOT EXISTS orgmover.events (
  id bigserial PRIMARY KEY,
  migration_id bigint REFERENCES orgmover.migrations(id) ON DELETE CASCADE,
  at timestamptz NOT NULL DEFAULT now(),
  level text NOT NULL,
  message text NOT NULL
);
"""


class Tracking:
    """Thin repository over the orgmover schema. Each method is one short transaction."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection] = []
        self._all: list[psycopg.Connection] = []
        self._but_plan: str | None = None  # the migrations table's columns but the plan

    @contextmanager
    def conn(self, single: bool = False) -> Iterator[psycopg.Connection]:
        """One transaction on a connection of this object's own small pool: kept open between calls and
        shared by threads (a worker thread's first call does not pay for a new connection), one
        connection per call in flight; a broken one is closed and replaced. ``single``: for one
        statement, which is its own transaction (no BEGIN and COMMIT round trips: the write window
        makes a few dozen such calls while the org's writes are blocked)."""
        with self._lock:
            c = self._idle.pop() if self._idle else None
        if c is None or c.closed or c.broken:
            c = psycopg.connect(self.dsn, row_factory=dict_row, connect_timeout=10, autocommit=True)
            with self._lock:
                self._all = [x for x in self._all if not x.closed] + [c]
        try:
            with nullcontext() if single else c.transaction():
                yield c
        except psycopg.OperationalError:
            c.close()
            raise
        finally:
            if not c.closed:
                if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    c.rollback()
                with self._lock:
                    self._idle.append(c)

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
            self._idle.clear()

    def ensure_schema(self) -> None:
        with self.conn() as c:
            c.execute("SELECT pg_advisory_xact_lock(8152370)")
            c.execute(SCHEMA)

    # -------------------------------------------------------------- migrations
    def get(self, mid: int, plan: bool = False) -> dict:
        """The migration's row; its plan (a large document, read once per process by the mover) only
        with ``plan``."""
        with self.conn(single=True) as c:
            cols = "*" if plan else self._columns_but_plan(c)
            row = c.execute(f"SELECT {cols} FROM orgmover.migrations WHERE id = %s", (mid,)).fetchone()
        if row is None:
            raise StateError(f"migration {mid} does not exist")
        return row

    def _columns_but_plan(self, c: psycopg.Connection) -> str:
        """The migrations table's columns but the plan, for reads and RETURNING clauses that do not need
        it (looked up once)."""
        if self._but_plan is None:
            self._but_plan = c.execute(
                "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position) FROM information_schema.columns "
                "WHERE table_schema = 'orgmover' AND table_name = 'migrations' AND column_name <> 'plan'").fetchone()["string_agg"]
        return self._but_plan

    def active_for_org(self, org_id: int) -> dict | None:
        with self.conn(single=True) as c:
            return c.execute("SELECT * FROM orgmover.migrations WHERE organization_id = %s AND state NOT IN "
                             "('completed', 'rolled_back')", (org_id,)).fetchone()

    def move_left_behind(self, org_id: int, source: str, target: str) -> dict | None:
        """The latest completed move of ``org_id`` from ``source`` to ``target`` whose copy on ``source``
        was neither cleaned nor replaced yet (moving the org back replaces it)."""
        with self.conn(single=True) as c:
            return c.execute("SELECT * FROM orgmover.migrations WHERE organization_id = %s AND source_cell = %s AND "
                             "target_cell = %s AND state = 'completed' AND source_cleaned_at IS NULL AND "
                             "(options -> 'moved_back_by') IS NULL ORDER BY id DESC LIMIT 1",
                             (org_id, source, target)).fetchone()

    def latest_for_org(self, org_id: int) -> dict | None:
        with self.conn(single=True) as c:
            return c.execute("SELECT * FROM orgmover.migrations WHERE organization_id = %s ORDER BY id DESC LIMIT 1",
                             (org_id,)).fetchone()

    def create(self, org_id: int, source: str, target: str, run_id: str | None) -> dict:
        with self.conn(single=True) as c:
            return c.execute(
                "INSERT INTO orgmover.migrations (organization_id, source_cell, target_cell, dag_run_id) "
                "VALUES (%s, %s, %s, %s) RETURNING *", (org_id, source, target, run_id)).fetchone()

    def adopt(self, mid: int, from_run: str | None, run_id: str | None) -> dict | None:
        """The migration handed from run ``from_run`` to run ``run_id`` in one compare-and-set; None when
        another run took it meanwhile."""
        with self.conn(single=True) as c:
            return c.execute(f"UPDATE orgmover.migrations SET dag_run_id = %s, error = NULL, updated_at = now() "
                             f"WHERE id = %s AND dag_run_id IS NOT DISTINCT FROM %s RETURNING {self._columns_but_plan(c)}",
                             (run_id, mid, from_run)).fetchone()

    def update(self, mid: int, **fields: Any) -> dict:
        """Set these fields; returns the row without its plan (as :meth:`get`)."""
        if not fields:
            return self.get(mid)
        sets = ", ".join(f"{k} = %({k})s" for k in fields)
        params = {k: (Jsonb(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        params["_id"] = mid
        with self.conn(single=True) as c:
            return c.execute(f"UPDATE orgmover.migrations SET {sets}, updated_at = now() WHERE id = %(_id)s "
                             f"RETURNING {self._columns_but_plan(c)}", params).fetchone()

    def merge_options(self, mid: int, **values: Any) -> None:
        """Set these keys of the migration's options, leaving the others (one statement: no lost update)."""
        with self.conn(single=True) as c:
            c.execute("UPDATE orgmover.migrations SET options = coalesce(options, '{}'::jsonb) || %s, updated_at = now() "
                      "WHERE id = %s", (Jsonb(values), mid))

    def transition(self, mid: int, to: str, allowed_from: tuple[str, ...], **fields: Any) -> dict:
        """Compare-and-set of the migration state; returns the row without its plan."""
        sets = ", ".join([f"{k} = %({k})s" for k in fields] + ["state = %(_to)s", "updated_at = now()"])
        params = {k: (Jsonb(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        params.update(_to=to, _id=mid, _from=[*allowed_from, to])
        with self.conn(single=True) as c:  # the state checked and set in one statement
            row = c.execute(f"UPDATE orgmover.migrations SET {sets} WHERE id = %(_id)s AND state = ANY(%(_from)s) "
                            f"RETURNING {self._columns_but_plan(c)}", params).fetchone()
            if row is not None:
                return row
            row = c.execute("SELECT state FROM orgmover.migrations WHERE id = %s", (mid,)).fetchone()
        if row is None:
            raise StateError(f"migration {mid} does not exist")
        raise StateError(f"migration {mid} is {row['state']}; cannot go to {to} (allowed from {', '.join(allowed_from)})")

    # -------------------------------------------------------------- phases and events
    _STARTED = ("INSERT INTO orgmover.phases (migration_id, phase, state) VALUES (%s, %s, 'running') "
                "ON CONFLICT (migration_id, phase) DO UPDATE SET state = 'running', attempt = orgmover.phases.attempt + 1, "
                "started_at = now(), finished_at = NULL")
    _FINISHED = "UPDATE orgmover.phases SET state = %s, finished_at = now() WHERE migration_id = %s AND phase = %s"

    def phase_started(self, mid: int, phase: str) -> None:
        with self.conn(single=True) as c:
            c.execute(self._STARTED, (mid, phase))

    def phase_finished(self, mid: int, phase: str, state: str = "succeeded", then: str | None = None) -> None:
        """``then``: the next phase started, in the same statement."""
        with self.conn(single=True) as c:
            if then is None:
                c.execute(self._FINISHED, (state, mid, phase))
            else:
                c.execute(f"WITH finished AS ({self._FINISHED}) {self._STARTED}", (state, mid, phase, mid, then))

    def phases(self, mid: int) -> list[dict]:
        with self.conn(single=True) as c:
            return c.execute("SELECT *, extract(epoch FROM (coalesce(finished_at, now()) - started_at)) AS seconds "
                             "FROM orgmover.phases WHERE migration_id = %s ORDER BY started_at", (mid,)).fetchall()

    def event(self, mid: int | None, level: str, message: str) -> None:
        with self.conn(single=True) as c:
            c.execute("INSERT INTO orgmover.events (migration_id, level, message) VALUES (%s, %s, %s)", (mid, level, message))

    def events(self, mid: int) -> list[dict]:
        with self.conn(single=True) as c:
            return c.execute("SELECT * FROM orgmover.events WHERE migration_id = %s ORDER BY id", (mid,)).fetchall()

    # -------------------------------------------------------------- tables
    def init_tables(self, mid: int, tables: list[tuple[str, str]]) -> None:
        with self.conn() as c:
            with c.cursor() as cur:
                cur.executemany("INSERT INTO orgmover.tables (migration_id, table_name, strategy) VALUES (%s, %s, %s) "
                                "ON CONFLICT (migration_id, table_name) DO UPDATE SET strategy = EXCLUDED.strategy",
                                [(mid, t, s) for t, s in tables])

    def table(self, mid: int, name: str) -> dict:
        with self.conn(single=True) as c:
            row = c.execute("SELECT * FROM orgmover.tables WHERE migration_id = %s AND table_name = %s", (mid, name)).fetchone()
        if row is None:
            raise StateError(f"migration {mid} has no table {name} in its plan")
        return row

    def tables(self, mid: int, columns: list[str] | None = None) -> list[dict]:
        """Every table's row (``columns``: only those, with table_name; the large jsonb ones left out
        where the caller does not need them)."""
        cols = "*" if columns is None else ", ".join(["table_name", *columns])
        with self.conn(single=True) as c:
            return c.execute(f"SELECT {cols} FROM orgmover.tables WHERE migration_id = %s ORDER BY table_name", (mid,)).fetchall()

    def update_table(self, mid: int, name: str, **fields: Any) -> None:
        with self.conn(single=True) as c:
            self._update_table(c, mid, name, fields)

    @staticmethod
    def _update_table(c: psycopg.Connection, mid: int, name: str, fields: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = %({k})s" for k in fields)
        params = {k: (Jsonb(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        params.update(_m=mid, _t=name)
        c.execute(f"UPDATE orgmover.tables SET {sets}, updated_at = now() WHERE migration_id = %(_m)s AND table_name = %(_t)s",
                  params)

    def update_tables(self, mid: int, fields_by_table: dict[str, dict[str, Any]]) -> None:
        """Several tables' fields in one transaction."""
        groups: dict[tuple[str, ...], list[dict]] = {}  # tables setting the same fields: one executemany
        for name, fields in fields_by_table.items():
            params = {k: (Jsonb(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
            params.update(_m=mid, _t=name)
            groups.setdefault(tuple(fields), []).append(params)
        with self.conn() as c:
            with c.cursor() as cur:
                for keys, rows in groups.items():
                    sets = ", ".join(f"{k} = %({k})s" for k in keys)
                    cur.executemany(f"UPDATE orgmover.tables SET {sets}, updated_at = now() WHERE migration_id = %(_m)s "
                                    f"AND table_name = %(_t)s", rows)

    # -------------------------------------------------------------- rows that joined the org (write window)
    def add_entered(self, mid: int, table: str, keys: list[tuple]) -> None:
        """Keys of rows that joined the org on the target in the window: their own rows (children) still
        have to follow. Kept until :meth:`clear_entered`, so a retried or later window does it too."""
        with self.conn(single=True) as c:
            c.execute("UPDATE orgmover.tables SET entered_keys = coalesce(entered_keys, '[]'::jsonb) || %s, "
                      "updated_at = now() WHERE migration_id = %s AND table_name = %s",
                      (Jsonb([list(k) for k in keys]), mid, table))

    def entered(self, mid: int) -> dict[str, set[tuple]]:
        with self.conn(single=True) as c:
            rows = c.execute("SELECT table_name, entered_keys FROM orgmover.tables WHERE migration_id = %s "
                             "AND entered_keys IS NOT NULL", (mid,)).fetchall()
        return {r["table_name"]: {tuple(k) for k in r["entered_keys"]} for r in rows}

    def clear_entered(self, mid: int, tables: list[str]) -> None:
        with self.conn(single=True) as c:
            c.execute("UPDATE orgmover.tables SET entered_keys = NULL WHERE migration_id = %s AND table_name = ANY(%s)",
                      (mid, tables))

    # -------------------------------------------------------------- captured changes (slot ledger)
    def add_captured(self, mid: int, slot: str, got) -> None:
        """Record what a read of ``slot`` found (a :class:`orgmover.changes.CapturedChanges` read up to
        ``got.upto``); the slot may be advanced to ``got.upto`` once this commits."""
        with self.conn(single=True) as c:
            self._add_captured(c, mid, slot, got)

    @staticmethod
    def _add_captured(c: psycopg.Connection, mid: int, slot: str, got) -> None:
        c.execute("INSERT INTO orgmover.captured_changes (migration_id, slot, upto_lsn, changes, keys) "
                  "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", (mid, slot, got.upto, got.changes, Jsonb(got.to_json())))

    def captured(self, mid: int, slot: str, after: str | None = None, add=None):
        """Every key recorded from ``slot`` by reads that went past ``after`` (an LSN; None: all), merged;
        ``add``: a read recorded first (:meth:`add_captured`), in the same transaction."""
        from orgmover.changes import CapturedChanges

        out = CapturedChanges()
        with self.conn() as c:
            if add is not None:
                self._add_captured(c, mid, slot, add)
            for r in c.execute("SELECT upto_lsn::text AS upto, changes, keys FROM orgmover.captured_changes WHERE "
                               "migration_id = %s AND slot = %s AND (%s::pg_lsn IS NULL OR upto_lsn > %s::pg_lsn) "
                               "ORDER BY upto_lsn", (mid, slot, after, after)):
                out.update(CapturedChanges.from_json(r["keys"], r["changes"], r["upto"]))
        return out

    # -------------------------------------------------------------- chunks (resumable copy)
    def init_chunks(self, mid: int, table: str, bounds: list[int]) -> None:
        """Chunks [None, b1), [b1, b2), ..., [bn, None) of a table; kept if already planned."""
        edges = [None, *bounds, None]
        with self.conn() as c:
            if c.execute("SELECT 1 FROM orgmover.chunks WHERE migration_id = %s AND table_name = %s LIMIT 1",
                         (mid, table)).fetchone():
                return
            with c.cursor() as cur:
                cur.executemany("INSERT INTO orgmover.chunks (migration_id, table_name, chunk_no, lo, hi) VALUES (%s, %s, %s, %s, %s)",
                                [(mid, table, i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)])

    def chunks(self, mid: int, table: str) -> list[dict]:
        with self.conn(single=True) as c:
            return self._chunks(c, mid, table)

    @staticmethod
    def _chunks(c: psycopg.Connection, mid: int, table: str) -> list[dict]:
        return c.execute("SELECT * FROM orgmover.chunks WHERE migration_id = %s AND table_name = %s ORDER BY chunk_no",
                         (mid, table)).fetchall()

    def chunk_bounds(self, mid: int) -> dict[str, list[int]]:
        """Every table's chunk lower bounds (chunks 2..n), in one query."""
        out: dict[str, list[int]] = {}
        with self.conn(single=True) as c:
            for r in c.execute("SELECT table_name, lo FROM orgmover.chunks WHERE migration_id = %s AND chunk_no > 0 "
                               "ORDER BY table_name, chunk_no", (mid,)):
                out.setdefault(r["table_name"], []).append(r["lo"])
        return out

    def copy_state(self, mid: int, table: str) -> tuple[str | None, list[dict]]:
        """A table's chunk column and its chunks in order, in one transaction."""
        with self.conn() as c:
            row = c.execute("SELECT chunk_column FROM orgmover.tables WHERE migration_id = %s AND table_name = %s",
                            (mid, table)).fetchone()
            if row is None:
                raise StateError(f"migration {mid} has no table {table} in its plan")
            return row["chunk_column"], self._chunks(c, mid, table)

    def update_chunk(self, mid: int, table: str, no: int, table_fields: dict[str, Any] | None = None, **fields: Any) -> None:
        """Update one chunk, and with ``table_fields`` its table, in one transaction (a table recorded as
        copied with its last chunk, never one without the other)."""
        sets = ", ".join(f"{k} = %({k})s" for k in fields)
        with self.conn() as c:
            c.execute(f"UPDATE orgmover.chunks SET {sets}, updated_at = now() WHERE migration_id = %(_m)s "
                      f"AND table_name = %(_t)s AND chunk_no = %(_n)s", {**fields, "_m": mid, "_t": table, "_n": no})
            if table_fields:
                self._update_table(c, mid, table, table_fields)

    def reset_tables(self, mid: int) -> None:
        with self.conn() as c:
            c.execute("UPDATE orgmover.tables SET state = 'pending', copied_in_window = NULL, rows_copied = 0, "
                      "bytes_copied = 0, validation_state = 'pending', validated_in_window = NULL, synced_in_window = NULL, "
                      "entered_keys = NULL, error = NULL WHERE migration_id = %s", (mid,))
            c.execute("UPDATE orgmover.chunks SET state = 'pending', rows = 0, bytes = 0 WHERE migration_id = %s", (mid,))
            c.execute("UPDATE orgmover.migrations SET precopy_xmin = NULL WHERE id = %s", (mid,))


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, indent=2, sort_keys=True)
