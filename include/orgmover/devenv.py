"""Local cells without Docker: ``orgmover dev up | down | status``.

Starts, idempotently and tracking only what it started:

* a *control* PostgreSQL cluster holding the Topology Service's database and the mover's state;
* one PostgreSQL 18 cluster per cell (``legacy`` = cell 0, ``cell-1`` = cell 1, ...), wal_level=logical,
  with the GitLab-shaped schema and each cell's own id range for every sequence;
* the reference Topology Service (HTTP, bearer token) with the cells registered.

Everything lives under ``$ORGMOVER_HOME`` (default ``./.orgmover``): data directories, logs,
``state.json`` (ports, tokens, keys, pids) and ``airflow.env`` (the Airflow connections the DAG uses,
as ``AIRFLOW_CONN_*`` variables).
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orgmover import gitlab
from orgmover.cells import Cell, conn_id_for, key_conn_id_for
from orgmover.errors import ConfigError
from orgmover.localpg import PgCluster, free_ports
from orgmover.localpg import pid_alive as _alive

CELL_DB = "gitlabhq_production"
CELL_NAMES = ["legacy", "cell-1", "cell-2", "cell-3"]


def default_home() -> Path:
    return Path(os.environ.get("ORGMOVER_HOME") or Path.cwd() / ".orgmover").resolve()


@dataclass
class DevEnv:
    home: Path

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    def load(self) -> dict:
        if not self.state_file.exists():
            raise ConfigError(f"no local cells under {self.home}: run `orgmover dev up` first")
        return json.loads(self.state_file.read_text())

    def add_git_storage(self, cell: str, storage: str) -> Path:
        """Declare one more Git storage for a cell (its root directory is created)."""
        state = self.load()
        extra = state.setdefault("extra_git_storages", {}).setdefault(cell, [])
        if storage not in extra:
            extra.append(storage)
        self._save(state)
        root = self.home / "git" / cell / storage
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def _new_state(self, ncells: int) -> dict:
        ports = iter(free_ports(4 + 2 * ncells))  # distinct: two services never race for one port
        return {
            "control": {"port": next(ports)},
            "cells": [{"name": CELL_NAMES[i], "id": i, "port": next(ports),
                       "db_key_base": pysecrets.token_hex(32)} for i in range(ncells)],
            "topology": {"port": next(ports), "token": pysecrets.token_urlsafe(24), "pid": None},
            "s3": {"port": next(ports)},
            "gcs": {"port": next(ports)},
            "registries": {CELL_NAMES[i]: next(ports) for i in range(ncells)},
        }

    def cluster(self, name: str, port: int) -> PgCluster:
        return PgCluster(self.home / "pg" / name, port)

    # ------------------------------------------------------------------ derived endpoints
    def control_uri(self, state: dict, db: str) -> str:
        return self.cluster("control", state["control"]["port"]).uri(db)

    def cell_uri(self, cell: dict) -> str:
        return self.cluster(cell["name"], cell["port"]).uri(CELL_DB)

    def topology_url(self, state: dict) -> str:
        return f"http://127.0.0.1:{state['topology']['port']}"

    def cell_storage(self, state: dict, name: str):
        """The cell's storage: Git storages named like its shards, one bucket per object type on the local
        S3 server (cell-1 keeps its artifacts on the GCS emulator: S3 -> GCS moves are exercised), its registry."""
        from orgmover.storage import OBJECT_TYPES, CellStorage

        if "s3" not in state:
            return CellStorage()
        stores = {t: {"kind": "s3", "endpoint": f"http://127.0.0.1:{state['s3']['port']}", "bucket": f"{name}-{t}"}
                  for t in OBJECT_TYPES}
        if name == "cell-1":
            stores["artifacts"] = {"kind": "gcs", "endpoint": f"http://127.0.0.1:{state['gcs']['port']}", "bucket": f"{name}-artifacts"}
        names = list(gitlab.SHARDS) + list(state.get("extra_git_storages", {}).get(name, []))
        return CellStorage({s: str(self.home / "git" / name / s) for s in names}, stores,
                           f"http://127.0.0.1:{state['registries'][name]}")

    def resolve_cell(self, name: str) -> Cell:
        state = self.load()
        for c in state["cells"]:
            if c["name"] == name:
                return Cell(name=name, dsn=self.cell_uri(c), db_key_base=c["db_key_base"], id=c["id"],
                            sequence_range=gitlab.sequence_range(c["id"]), storage=self.cell_storage(state, name))
        raise ConfigError(f"unknown cell {name!r}: the local environment has {', '.join(c['name'] for c in state['cells'])}")

    def topology(self):
        from orgmover.topology import TopologyClient

        state = self.load()
        return TopologyClient(self.topology_url(state), state["topology"]["token"])

    def tracking(self):
        from orgmover.tracking import Tracking

        return Tracking(self.control_uri(self.load(), "orgmover"))

    def context(self, reports_dir: Path | None = None, log=print):
        from orgmover.mover import MoveContext

        return MoveContext(tracking=self.tracking(), topology=self.topology(), resolve_cell=self.resolve_cell,
                           dictionary_dir=gitlab.db_docs_dir(), reports_dir=reports_dir or self.home / "reports", log=log)

    # ------------------------------------------------------------------ lifecycle
    def up(self, ncells: int = 2, log=print) -> dict:
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else self._new_state(ncells)
        self._save(state)
        control = self.cluster("control", state["control"]["port"])
        control.start()
        control.create_database("topology")
        control.create_database("orgmover")
        for c in state["cells"]:
            pg = self.cluster(c["name"], c["port"])
            pg.start()
            pg.create_database(CELL_DB)
            gitlab.install_schema(self.cell_uri(c), c["id"], c["name"])
            log(f"cell {c['name']} (id {c['id']}): PostgreSQL 18 at {self.cell_uri(c)}")
        self._start_storage(state, log)
        self._start_topology(state)
        topo = self.topology()
        for c in state["cells"]:
            lo, hi = gitlab.sequence_range(c["id"])
            topo.put_cell(c["name"], c["id"], f"https://{c['name']}.gitlab.example.com", lo, hi, session_prefix=f"cell{c['id']}")
        from orgmover.tracking import Tracking

        Tracking(self.control_uri(state, "orgmover")).ensure_schema()
        self.write_env(state)
        log(f"topology service at {self.topology_url(state)}; mover state at {self.control_uri(state, 'orgmover')}")
        log(f"Airflow connections: source {self.home / 'airflow.env'}")
        return self.status()

    def _start_storage(self, state: dict, log=print) -> None:
        """Per cell: Git storage directories, object buckets (one local S3 server, one GCS emulator), an OCI registry."""
        if "s3" not in state:
            return
        from orgmover.objects import LocalGCS, LocalS3
        from orgmover.registry import LocalRegistry

        LocalS3(self.home / "s3", state["s3"]["port"]).start()
        LocalGCS(self.home / "gcs", state["gcs"]["port"]).start()
        for c in state["cells"]:
            LocalRegistry(self.home / "registry" / c["name"], state["registries"][c["name"]]).start()
            st = self.cell_storage(state, c["name"])
            for root in st.git_storages.values():
                Path(root).mkdir(parents=True, exist_ok=True)
            for t in st.object_stores:
                st.store(t).ensure_bucket()
        log(f"storage: Git storages under {self.home / 'git'}, S3 :{state['s3']['port']}, GCS :{state['gcs']['port']}, "
            f"registries " + ", ".join(f"{n} :{p}" for n, p in state["registries"].items()))

    def _start_topology(self, state: dict) -> None:
        t = state["topology"]
        if t.get("pid") and _alive(t["pid"]) and self._topology_healthy(state):
            return
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        token_file = self.home / "topology.token"
        token_file.write_text(t["token"] + "\n")
        token_file.chmod(0o600)
        with open(logs / "topology.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orgmover.topology.server", "--dsn", self.control_uri(state, "topology"),
                 "--host", "127.0.0.1", "--port", str(t["port"]), "--token-file", str(token_file)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t["pid"] = proc.pid
        self._save(state)
        deadline = time.monotonic() + 30
        while not self._topology_healthy(state):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"topology service did not start; see {logs / 'topology.log'}")
            time.sleep(0.2)

    def _topology_healthy(self, state: dict) -> bool:
        from orgmover.topology import TopologyClient

        return TopologyClient(self.topology_url(state), state["topology"]["token"], timeout=2, retries=0).health()

    def down(self, destroy: bool = False, log=print) -> None:
        if not self.state_file.exists():
            log(f"nothing to stop under {self.home}")
            return
        state = self.load()
        pid = state["topology"].get("pid")
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            log(f"topology service (pid {pid}) stopped")
        state["topology"]["pid"] = None
        self._save(state)
        if "s3" in state:
            from orgmover.objects import LocalGCS, LocalS3
            from orgmover.registry import LocalRegistry

            for srv in [LocalS3(self.home / "s3", state["s3"]["port"]), LocalGCS(self.home / "gcs", state["gcs"]["port"])] + \
                    [LocalRegistry(self.home / "registry" / n, p) for n, p in state["registries"].items()]:
                srv.stop()
            log("object storage and registries stopped")
        for name, port in [("control", state["control"]["port"])] + [(c["name"], c["port"]) for c in state["cells"]]:
            pg = self.cluster(name, port)
            if destroy:
                pg.destroy()
            else:
                pg.stop()
            log(f"postgres {name} stopped" + (" and removed" if destroy else ""))
        if destroy:
            import shutil

            for d in ("git", "s3", "gcs", "registry"):
                shutil.rmtree(self.home / d, ignore_errors=True)
            self.state_file.unlink(missing_ok=True)

    def status(self) -> dict:
        state = self.load()
        cells = []
        for c in state["cells"]:
            pg = self.cluster(c["name"], c["port"])
            cells.append({"name": c["name"], "id": c["id"], "uri": self.cell_uri(c), "running": pg.running(),
                          "connection_id": conn_id_for(c["name"]), "sequence_range": list(gitlab.sequence_range(c["id"]))})
        control = self.cluster("control", state["control"]["port"])
        return {
            "home": str(self.home),
            "cells": cells,
            "topology": {"url": self.topology_url(state), "running": self._topology_healthy(state),
                         "pid": state["topology"].get("pid")},
            "state_db": {"uri": self.control_uri(state, "orgmover"), "running": control.running()},
            "airflow_env": str(self.home / "airflow.env"),
        }

    def airflow_connections(self, state: dict | None = None) -> dict[str, str]:
        """AIRFLOW_CONN_* variables (JSON form) for every connection the DAG needs."""
        state = state or self.load()
        env: dict[str, str] = {}

        def put(conn_id: str, value: dict) -> None:
            env["AIRFLOW_CONN_" + conn_id.upper()] = json.dumps(value)

        for c in state["cells"]:
            put(conn_id_for(c["name"]), {"conn_type": "postgres", "host": "127.0.0.1", "port": c["port"],
                                         "login": "postgres", "schema": CELL_DB,
                                         "extra": {"storage": self.cell_storage(state, c["name"]).to_dict()}})
            put(key_conn_id_for(c["name"]), {"conn_type": "generic", "password": c["db_key_base"]})
        put("orgmover_topology", {"conn_type": "http", "host": "127.0.0.1", "port": state["topology"]["port"],
                                  "schema": "http", "password": state["topology"]["token"]})
        put("orgmover_state", {"conn_type": "postgres", "host": "127.0.0.1", "port": state["control"]["port"],
                               "login": "postgres", "schema": "orgmover"})
        return env

    def write_env(self, state: dict) -> Path:
        path = self.home / "airflow.env"
        lines = [f"export {k}='{v}'" for k, v in sorted(self.airflow_connections(state).items())]
        lines.append(f"export ORGMOVER_REPORTS_DIR='{self.home / 'reports'}'")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

