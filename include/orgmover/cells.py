"""Cells: how the mover reaches one cell's PostgreSQL and its encryption key.

A cell is known to the Topology Service (id, name, address, sequence range); its database is
reached through a DSN that the deployment provides (an Airflow connection ``orgmover_cell_<name>``,
or the local dev environment). The cell's ``db_key_base`` (for re-encrypting secrets) comes from a
separate secret (``orgmover_cell_<name>_key``) so it can live in a secrets backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg

from orgmover.errors import ConfigError

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
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=10, **kw)
        except psycopg.OperationalError as e:
            raise ConfigError(f"cell {self.name}: PostgreSQL is not reachable ({str(e).strip().splitlines()[0]})") from e
        conn.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
                     "SET extra_float_digits = 1; SET bytea_output = 'hex'")
        if not kw.get("autocommit"):
            conn.commit()
        return conn

    @property
    def key(self) -> bytes | None:
        from orgmover.secrets import key_from_db_key_base

        return key_from_db_key_base(self.db_key_base) if self.db_key_base else None
