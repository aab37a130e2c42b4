"""TopologyHook: the Topology Service (Airflow connection ``orgmover_topology``, type http; the
bearer token is the connection's password)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from orgmover.errors import ConfigError
from orgmover.topology import TopologyClient


class TopologyHook(BaseHook):
    conn_name_attr = "topology_conn_id"
    default_conn_name = "orgmover_topology"
    conn_type = "http"
    hook_name = "orgmover Topology Service"

    def __init__(self, topology_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.topology_conn_id = topology_conn_id

    def get_conn(self) -> TopologyClient:
        try:
            c = self.get_connection(self.topology_conn_id)
        except Exception as e:
            raise ConfigError(f"no Airflow connection {self.topology_conn_id!r} for the Topology Service") from e
        scheme = c.schema or "http"
        base = c.host if (c.host or "").startswith("http") else f"{scheme}://{c.host}{':' + str(c.port) if c.port else ''}"
        return TopologyClient(base, c.password or "", timeout=float((c.extra_dejson or {}).get("timeout", 10)))

    def test_connection(self) -> tuple[bool, str]:
        ok = self.get_conn().health()
        return ok, "healthy" if ok else "not reachable"
