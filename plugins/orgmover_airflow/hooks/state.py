"""MoverStateHook: the mover's own state database (Airflow connection ``orgmover_state``, postgres).
Never Airflow's metadata DB: tasks may not touch it in Airflow 3."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from psycopg.conninfo import make_conninfo

from orgmover.errors import ConfigError
from orgmover.tracking import Tracking


class MoverStateHook(BaseHook):
    conn_name_attr = "state_conn_id"
    default_conn_name = "orgmover_state"
    conn_type = "postgres"
    hook_name = "orgmover state database"

    def __init__(self, state_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.state_conn_id = state_conn_id

    def get_conn(self) -> Tracking:
        try:
            c = self.get_connection(self.state_conn_id)
        except Exception as e:
            raise ConfigError(f"no Airflow connection {self.state_conn_id!r} for the mover's state database") from e
        t = Tracking(make_conninfo(host=c.host or "127.0.0.1", port=c.port or 5432, user=c.login or None,
                                   password=c.password or None, dbname=c.schema or "orgmover"))
        t.ensure_schema()
        return t
