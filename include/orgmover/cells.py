"""Cells: how the mover reaches one cell's PostgreSQL and its encryption key.

A cell is known to the Topology Service (id, name, address, sequence range); its database is
reached through a DSN that the deployment provides (an Airflow connection ``orgmover_cell_<name>``,
or the local dev environment). The cell's ``db_key_base`` (for re-encrypting secrets) comes from a
separate secret (``orgmover_cell_<name>_key``) so it can live in a secrets backend.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg.pq import TransactionStatus

from orgmover.errors import ConfigError, Unreachable

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_cell_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"invalid cell name {name!r}: use lowercase letters, digits, '-' and '_'")
    return name


def conn_id_for(cell: str) -> str:
    """Airflow connection id holding a cell's PostgreSQL: orgmover_cell_<name> ('-' becomes '_')."""
    return "orgmover_cell_" + check_cell_name(cell).replace("-", "_")


def key_conn_id_for(cell: str) -> str:
    return conn_id_for(cell) + "_key"


SESSION = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
           "SET extra_float_digits = 1; SET bytea_output = 'hex'")


def fetched(cur: psycopg.Cursor, size: int):
    """The rows of an executed (server-side) cursor, ``size`` at a time: a list per fetch, no cursor
    call per row."""
    while rows := cur.fetchmany(size):
        yield from rows


class _Idle:
    """Connections a task closed cleanly, kept a few seconds for its next ``Cell.connect`` to the same
    cell: in the write window a task opens a dozen connections, and each new one costs a backend start
    (3-5 ms). Only autocommit connections outside a transaction are kept; one whose server closed it
    (its socket is readable while idle), or idle longer than ``ORGMOVER_PG_IDLE_SECONDS`` (default 10,
    0 turns keeping off), is closed instead. A forked child forgets its parent's."""

    limit = 8  # per DSN

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conns: dict[str, list[tuple[float, "CellConnection"]]] = {}
        self.pid = os.getpid()

    @staticmethod
    def seconds() -> float:
        return float(os.environ.get("ORGMOVER_PG_IDLE_SECONDS", "10"))

    def get(self, dsn: str) -> "CellConnection | None":
        now = time.monotonic()
        while True:
            with self.lock:
                if self.pid != os.getpid():  # sockets shared with the parent: never used here
                    self.conns, self.pid = {}, os.getpid()
                stack = self.conns.get(dsn)
                if not stack:
                    return None
                since, conn = stack.pop()
            conn._om_idle = False
            if now - since <= self.seconds() and _healthy(conn):
                return conn
            conn._discard()

    def put(self, dsn: str, conn: "CellConnection") -> bool:
        if self.seconds() <= 0 or os.getpid() != self.pid or not _healthy(conn):
            return False
        with self.lock:
            stack = self.conns.setdefault(dsn, [])
            if len(stack) >= self.limit:
                return False
            stack.append((time.monotonic(), conn))
            conn._om_idle = True
        return True


def _healthy(conn: psycopg.Connection) -> bool:
    if conn.closed or conn.broken or not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        return False
    try:  # an idle connection has nothing to read unless the server closed it (or sent a notice)
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


_idle = _Idle()


class CellConnection(psycopg.Connection):
    """A connection to a cell. Leaving its ``with`` block without an error (or :func:`release`) keeps it
    for the next ``Cell.connect`` of this process when it is clean (see :class:`_Idle`); ``close()``
    closes it. Give a connection back once, by one of the two."""

    _om_dsn: str | None = None
    _om_idle = False

    def _discard(self) -> None:
        self._om_dsn, self._om_idle = None, False
        super().close()

    def _keep(self) -> bool:
        return self._om_dsn is not None and not self.closed and _idle.put(self._om_dsn, self)

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self._om_idle or (exc_type is None and self._keep()):
            return
        super().__exit__(exc_type, exc_val, exc_tb)  # commits or rolls back, then closes


def release(conn: psycopg.Connection) -> bool:
    """Done with a connection from ``Cell.connect`` (outside a ``with`` block): kept for reuse when it is
    clean, else closed. Returns whether it was kept."""
    if isinstance(conn, CellConnection) and conn._keep():
        return True
    conn.close()
    return False


@dataclass
class Cell:
    name: str
    dsn: str = field(repr=False)
    db_key_base: str | None = field(default=None, repr=False)
    id: int | None = None
    sequence_range: tuple[int, int] | None = None
    storage: object = None  # orgmover.storage.CellStorage: Git storages, object stores, registry

    def connect(self, **kw) -> psycopg.Connection:
        """A connection with the session settings every mover query relies on (UTC, ISO dates).

        Autocommit: a read is its own statement and every ``with conn.transaction()`` block is a real
        transaction that commits at its end (never a savepoint inside a transaction left open by an
        earlier read), which is what makes a copied chunk durable exactly when it is recorded."""
        kw.setdefault("autocommit", True)
        keep = kw == {"autocommit": True}
        if keep:
            conn = _idle.get(self.dsn)
            if conn is not None:
                conn._om_dsn = self.dsn
                return conn
        try:
            conn = CellConnection.connect(self.dsn, connect_timeout=10, **kw)
        except psycopg.OperationalError as e:
            raise Unreachable(f"cell {self.name}: PostgreSQL is not reachable ({str(e).strip().splitlines()[0]})") from e
        conn.execute(SESSION)
        if not kw.get("autocommit"):
            conn.commit()
        if keep:
            conn._om_dsn = self.dsn
        return conn

    @property
    def key(self) -> bytes | None:
        from orgmover.secrets import key_from_db_key_base

        return key_from_db_key_base(self.db_key_base) if self.db_key_base else None
