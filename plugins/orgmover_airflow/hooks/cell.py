"""CellHook: one cell's PostgreSQL (Airflow connection ``orgmover_cell_<name>``, type postgres).

The cell's encryption key (``db_key_base``) is the password of a second connection,
``orgmover_cell_<name>_key``, so it can live in a secrets backend and is masked in logs.
"""

from __future__ import annotations

from typing import Any

import psycopg
from airflow.sdk import BaseHook
from psycopg.conninfo import make_conninfo

from orgmover.cells import Cell, conn_id_for, key_conn_id_for
from orgmover.errors import ConfigError


class CellHook(BaseHook):
    conn_name_attr = "cell_conn_id"
    default_conn_name = "orgmover_cell_legacy"
    conn_type = "postgres"
    hook_name = "orgmover cell (PostgreSQL)"

    def __init__(self, cell: str | None = None, cell_conn_id: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.cell = cell
        self.cell_conn_id = cell_conn_id or (conn_id_for(cell) if cell else self.default_conn_name)

    def _dsn(self) -> str:
        try:
            c = self.get_connection(self.cell_conn_id)
        except Exception as e:  # AirflowNotFoundException and friends
            raise ConfigError(f"cell {self.cell or self.cell_conn_id}: no Airflow connection {self.cell_conn_id!r} "
                              f"(declare the cell's PostgreSQL as that connection)") from e
        extra = c.extra_dejson or {}
        params = {k: v for k, v in extra.items() if k in ("sslmode", "sslrootcert", "sslcert", "sslkey", "options",
                                                             "application_name", "target_session_attrs")}
        return make_conninfo(host=c.host or "127.0.0.1", port=c.port or 5432, user=c.login or None,
                             password=c.password or None, dbname=c.schema or "gitlabhq_production", **params)

    def _key(self) -> str | None:
        if not self.cell:
            return None
        try:
            return self.get_connection(key_conn_id_for(self.cell)).password or None
        except Exception:
            return None

    def get_cell(self) -> Cell:
        from orgmover.storage import CellStorage

        extra = self.get_connection(self.cell_conn_id).extra_dejson or {}
        return Cell(name=self.cell or self.cell_conn_id, dsn=self._dsn(), db_key_base=self._key(),
                    storage=CellStorage.from_dict(extra.get("storage")))

    def get_conn(self) -> psycopg.Connection:
        return self.get_cell().connect()

    def test_connection(self) -> tuple[bool, str]:
        try:
            with self.get_conn() as c:
                c.execute("SELECT 1")
            return True, "connected"
        except Exception as e:
            return False, str(e)
