"""A real Airflow deployment for the ``real_airflow`` test tier.

Airflow's own components (api-server, scheduler, dag-processor, triggerer; LocalExecutor) run as
subprocesses against the test session's local cells, with their metadata DB on the control cluster,
and tests drive them through the REST API as a user's automation would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from orgmover.devenv import DevEnv
from orgmover.localpg import free_ports

ROOT = Path(__file__).resolve().parents[1]
DAG_IDS = ("org_move", "org_cleanup", "org_rollback")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
USER, PASSWORD = "admin", "admin"
ANSWER_DELAY = 3.0  # seconds: a few scheduler loops (see answer)
# bound to every record of a task's log: left out of task_log's lines
LOG_CONTEXT = {"dag_id", "run_id", "task_id", "map_index", "try_number", "ti_id", "filename", "lineno"}


class AirflowApiError(AssertionError):
    """An HTTP error from the REST API, with the method, path, status and Airflow's own message."""

    def __init__(self, response: httpx.Response):
        self.response = response
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if not isinstance(detail, str):
            detail = json.dumps(detail, indent=1)
        super().__init__(f"{response.request.method} {response.request.url.path} -> {response.status_code}: {detail}")


class AirflowDeployment:
    """Airflow 3 with its components as separate processes, each in its own process group."""

    def __init__(self, devenv: DevEnv, home: Path):
        self.home = Path(home)
        self.logs = self.home / "logs-components"
        self.port, log_port, trigger_log_port = free_ports(3)
        self.url = f"http://127.0.0.1:{self.port}"
        state = devenv.load()
        self.control = devenv.cluster("control", state["control"]["port"])
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            # psycopg 3: the URI's plain postgresql:// would mean psycopg2 to SQLAlchemy
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.control.uri("airflow").replace("postgresql://", "postgresql+psycopg://", 1),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),  # signs log-server requests
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),  # API and task tokens, every component
            # fixed log-server ports would clash with any other Airflow on the machine
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_log_port),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # a small run on 2 cores: parse soon, schedule the next task soon
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "ORGMOVER_TASK_RETRIES": "3",
            "ORGMOVER_REPLICATION_POKE": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self._http = httpx.Client(base_url=self.url, timeout=30)
        self._token: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120) -> None:
        """Create and migrate the metadata DB, start the components, wait until they are healthy and
        the project's DAGs are parsed without import errors; on failure stop everything and raise
        with the tail of the component logs."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
        try:
            self.control.create_database("airflow")
            with open(self.logs / "db-migrate.log", "wb") as out:
                if subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT).returncode:
                    raise RuntimeError("airflow db migrate failed:\n" + self.component_logs_tail())
            for name in COMPONENTS:
                args = ["--port", str(self.port)] if name == "api-server" else []
                with open(self.logs / f"{name}.log", "wb") as out:
                    self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", name, *args], env=self.env,
                                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        why = "not started"
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited:\n" + self.component_logs_tail())
            try:
                why = self._not_ready()
            except (httpx.HTTPError, AirflowApiError) as e:
                why = repr(e)
            if not why:
                return
            time.sleep(1)
        raise RuntimeError(f"Airflow not ready within {timeout:.0f} s ({why}):\n" + self.component_logs_tail())

    def _not_ready(self) -> str:
        """Why the deployment is not ready yet ('' when it is)."""
        health = self._http.get("/api/v2/monitor/health").raise_for_status().json()
        sick = [c for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                if (health.get(c) or {}).get("status") != "healthy"]
        if sick:
            return "unhealthy: " + ", ".join(sick)
        errors = self.get("/api/v2/importErrors")["import_errors"]
        if errors:  # may be a file saved half-way: wait for the next parse
            return "DAG import errors:\n" + "\n".join(f"{e['filename']}: {e['stack_trace']}" for e in errors)
        listed = {d["dag_id"] for d in self.get("/api/v2/dags", params={"limit": 100})["dags"]}
        missing = sorted(set(DAG_IDS) - listed)
        return "DAGs not listed yet: " + ", ".join(missing) if missing else ""

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM every component's process group, SIGKILL what is left after ``timeout``; idempotent."""
        for p in self.procs.values():
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(p, signal.SIGKILL)  # also the group's children (executor workers, tasks)
            p.wait()
        self.procs.clear()
        self._http.close()

    @staticmethod
    def _signal(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def component_logs_tail(self, n: int = 80) -> str:
        """The last ``n`` lines of each component's log, for failure messages."""
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"----- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """One authenticated call (bearer token from /auth/token, fetched again on 401); the raw response."""
        headers = kw.pop("headers", {})
        for _ in range(2):
            if self._token is None:
                r = self._http.post("/auth/token", json={"username": USER, "password": PASSWORD})
                if r.is_error:
                    raise AirflowApiError(r)
                self._token = r.json()["access_token"]
            r = self._http.request(method, path, headers={"Authorization": f"Bearer {self._token}", **headers}, **kw)
            if r.status_code != 401:
                return r
            self._token = None
        return r

    def call(self, method: str, path: str, **kw):
        """An authenticated call's JSON body; :class:`AirflowApiError` (Airflow's message) on an HTTP error."""
        r = self.request(method, path, **kw)
        if r.is_error:
            raise AirflowApiError(r)
        return r.json()

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def trigger_raw(self, dag_id: str, conf: dict) -> httpx.Response:
        """POST a new run of ``dag_id`` with ``conf``; the response as is (for tests of rejected input)."""
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})

    def trigger(self, dag_id: str, conf: dict) -> str:
        """Start a run of ``dag_id`` with ``conf``; its run id."""
        r = self.trigger_raw(dag_id, conf)
        if r.is_error:
            raise AirflowApiError(r)
        return r.json()["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        """The API's DAG run object."""
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300, states=("success", "failed")) -> str:
        """Poll the run until its state is one of ``states``; that state."""
        deadline = time.monotonic() + timeout
        while (state := self.run(dag_id, run_id)["state"]) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout} s; tasks: {self.states(dag_id, run_id)}")
            time.sleep(0.5)
        return state

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """Every task instance of the run (mapped ones too, all pages) by ``task_id`` or ``task_id[map_index]``."""
        out: dict[str, dict] = {}
        while True:
            page = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                            params={"limit": 100, "offset": len(out)})
            for ti in page["task_instances"]:
                out[ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")] = ti
            if not page["task_instances"] or len(out) >= page["total_entries"]:
                return out

    def states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``task_instances`` reduced to each one's state."""
        return {k: ti["state"] for k, ti in self.task_instances(dag_id, run_id).items()}

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states, timeout: float = 300) -> dict:
        """Poll until the task instance (``task_id`` or ``task_id[map_index]``) is in one of ``states``;
        its TI object. Raises if the run finishes first without it getting there."""
        deadline = time.monotonic() + timeout
        while True:
            ti = self.task_instances(dag_id, run_id).get(task_id)
            if ti and ti["state"] in states:
                return ti
            run_state = self.run(dag_id, run_id)["state"]
            if run_state in ("success", "failed") or time.monotonic() > deadline:
                raise TimeoutError(f"{task_id} is {ti and ti['state']}, not {'/'.join(states)} (run {run_state}); "
                                   f"tasks: {self.states(dag_id, run_id)}")
            time.sleep(0.5)

    def clear_failed(self, dag_id: str, run_id: str) -> dict:
        """Clear the run's failed task instances (the UI's "Clear" with "only failed"), for them to run again."""
        return self.call("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances",
                         json={"dry_run": False, "only_failed": True, "dag_run_id": run_id})

    def pending_approvals(self, dag_id: str = "~", run_id: str = "~") -> list[dict]:
        """The human-in-the-loop requests not answered yet (``~``: any DAG / any run)."""
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/hitlDetails",
                        params={"response_received": False})["hitl_details"]

    def answer(self, dag_id: str, run_id: str, task_id: str, options: list[str], map_index: int = -1) -> dict:
        """Answer a human-in-the-loop request with ``options`` (e.g. ``["Approve"]``).

        Not sooner than ANSWER_DELAY after the request was made: an answer within the scheduler loop
        that saw the task defer resumes it before the scheduler drains the deferring exit's executor
        event, and Airflow 3.3.2 then fails the resumed task as "killed externally" (state mismatch;
        the race of apache/airflow#72716)."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"
        asked = datetime.fromisoformat(self.get(path)["created_at"].replace("Z", "+00:00"))
        time.sleep(max(0.0, (asked - datetime.now(timezone.utc)).total_seconds() + ANSWER_DELAY))
        return self.call("PATCH", path, json={"chosen_options": options})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task instance's log for one try, one line per record: time, level, logger, message, extras."""
        body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        params={"full_content": True, "map_index": map_index}, headers={"Accept": "application/json"})
        lines = []
        for rec in body["content"]:
            if isinstance(rec, str):
                lines.append(rec)
                continue
            rec = {k: v for k, v in rec.items() if k not in LOG_CONTEXT}
            head = " ".join(str(rec.pop(k)) for k in ("timestamp", "level", "logger") if rec.get(k))
            event = rec.pop("event", "")
            extras = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in rec.items())
            lines.append(" ".join(s for s in (head, str(event), extras) if s))
        return "\n".join(lines)

    @staticmethod
    def task_pid(ti_id: str) -> int | None:
        """The OS pid of the running task process: it titles itself ``airflow worker -- <ti uuid>``."""
        title = f"airflow worker -- {ti_id}"
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().replace(b"\0", b" ").strip().decode(errors="replace") == title:
                    return int(cmdline.parent.name)
            except OSError:
                continue
        return None
