"""Reference Topology Service: cells and organization routes, stored in PostgreSQL.

A small implementation of the HTTP API documented in ``docs/topology-api.md``.
It holds the cells of a GitLab Cells deployment and the route of every
organization to one cell, and answers ``classify`` for an HTTP router.
Route changes are compare-and-set on a per-organization ``version`` so that a
move (cell change) and its maintenance window can never be lost or applied twice.

Run it with::

    python -m orgmover.topology.server --dsn postgresql://... --port 8080 --token-file tokens.txt
"""

import argparse
import hmac
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Annotated, Any

import psycopg
import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["SCHEMA_SQL", "ApiError", "create_app", "ensure_schema", "main"]

log = logging.getLogger(__name__)

MAX_INT4 = 2**31 - 1
MAX_INT8 = 2**63 - 1
CELL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
TOKEN_ENV = "ORGMOVER_TOPOLOGY_TOKEN"

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS topology;

CREATE TABLE IF NOT EXISTS topology.cells (
    id             integer PRIMARY KEY,
    name           text UNIQUE NOT NULL,
    address        text NOT NULL,
    session_prefix text,
    sequence_min   bigint NOT NULL,
    sequence_max   bigint NOT NULL,
    CONSTRAINT cells_sequence_range_valid CHECK (sequence_min <= sequence_max)
);

CREATE TABLE IF NOT EXISTS topology.organization_routes (
    organization_id    bigint PRIMARY KEY,
    cell_id            integer NOT NULL REFERENCES topology.cells (id),
    version            bigint NOT NULL DEFAULT 1,
    maintenance        boolean NOT NULL DEFAULT false,
    maintenance_owner  text,
    maintenance_reason text,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS topology.route_history (
    id                bigserial PRIMARY KEY,
    organization_id   bigint NOT NULL,
    version           bigint NOT NULL,
    cell_id           integer NOT NULL,
    maintenance       boolean NOT NULL,
    maintenance_owner text,
    reason            text,
    changed_at        timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX IF NOT EXISTS route_history_organization_version
    ON topology.route_history (organization_id, version);
"""

# Serialises concurrent ensure_schema() calls (CREATE ... IF NOT EXISTS is not race-free).
_SCHEMA_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('orgmover.topology.ensure_schema'))"

_ROUTE_SQL = """
SELECT r.organization_id, c.name AS cell, r.cell_id, c.address, r.version, r.maintenance,
       r.maintenance_owner, r.maintenance_reason, r.updated_at
  FROM topology.organization_routes r
  JOIN topology.cells c ON c.id = r.cell_id
 WHERE r.organization_id = %s
"""

_HISTORY_SQL = """
SELECT h.organization_id, h.version, c.name AS cell, h.cell_id, h.maintenance,
       h.maintenance_owner, h.reason, h.changed_at
  FROM topology.route_history h
  LEFT JOIN topology.cells c ON c.id = h.cell_id
 WHERE h.organization_id = %s
 ORDER BY h.version, h.id
"""

Row = dict[str, Any]
Cursor = psycopg.Cursor[Row]


class ApiError(Exception):
    """An error answered as ``{"error": code, "message": message, **extra}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        """Render as a JSON response."""
        body = {"error": self.code, "message": self.message, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------- request bodies


class SequenceRange(BaseModel):
    """Inclusive range of database sequence values owned by one cell."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=0, le=MAX_INT8)
    max: int = Field(ge=1, le=MAX_INT8)

    @model_validator(mode="after")
    def _ordered(self) -> "SequenceRange":
        if self.min > self.max:
            raise ValueError("sequence_range.min must be <= sequence_range.max")
        return self


class CellIn(BaseModel):
    """Body of ``PUT /v1/cells/{name}``."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=0, le=MAX_INT4)
    address: str = Field(min_length=1)
    session_prefix: str | None = None
    sequence_range: SequenceRange


class RouteIn(BaseModel):
    """Body of ``PUT /v1/organizations/{org_id}/route``."""

    model_config = ConfigDict(extra="forbid")

    cell: str = Field(min_length=1)
    reason: str | None = None


class RoutePatch(BaseModel):
    """Body of ``PATCH /v1/organizations/{org_id}/route`` (compare-and-set)."""

    model_config = ConfigDict(extra="forbid")

    expected_version: int = Field(ge=1, le=MAX_INT8)
    cell: str | None = Field(default=None, min_length=1)
    maintenance: bool | None = None
    maintenance_owner: str | None = None
    reason: str | None = None


OrgId = Annotated[int, Path(ge=1, le=MAX_INT8, description="GitLab organization id")]
CellName = Annotated[str, Path(pattern=CELL_NAME_PATTERN, description="cell name")]


# --------------------------------------------------------------------------- database helpers


def ensure_schema(dsn: str) -> None:
    """Create the ``topology`` schema and its tables if they do not exist (idempotent)."""
    with psycopg.connect(dsn, autocommit=False) as conn:
        with conn.transaction():
            conn.execute(_SCHEMA_LOCK_SQL)
            conn.execute(SCHEMA_SQL)


class _Database:
    """The service's connections: a small pool, opened on first use (a request then costs no backend
    start); a connection is checked before it is handed out, so a restarted database is reconnected.
    When the database is down, a request waits at most ``timeout`` seconds and gets a 503."""

    def __init__(self, dsn: str, max_size: int = 8, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self._pool = ConnectionPool(dsn, min_size=1, max_size=max_size, open=False, timeout=timeout,
                                    kwargs={"autocommit": False, "row_factory": dict_row, "connect_timeout": 5},
                                    check=ConnectionPool.check_connection, name="topology")
        self._lock = threading.Lock()
        self._opened = False

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A dict-row cursor inside one transaction."""
        if not self._opened:
            with self._lock:
                if not self._opened:
                    self._pool.open(wait=False)
                    self._opened = True
        with self._pool.connection() as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    yield cur

    def close(self) -> None:
        if self._opened:
            self._pool.close()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _cell_json(row: Row) -> Row:
    return {
        "id": row["id"],
        "name": row["name"],
        "address": row["address"],
        "session_prefix": row["session_prefix"],
        "sequence_range": {"min": row["sequence_min"], "max": row["sequence_max"]},
    }


def _route_json(row: Row) -> Row:
    return {**row, "updated_at": _iso(row["updated_at"])}


def _history_json(row: Row) -> Row:
    return {**row, "changed_at": _iso(row["changed_at"])}


def _find_cell(cur: Cursor, name: str) -> Row | None:
    cur.execute("SELECT * FROM topology.cells WHERE name = %s", (name,))
    return cur.fetchone()


def _require_cell_for_route(cur: Cursor, name: str) -> Row:
    """Resolve a cell named in a route body; unknown → 422 ``unknown_cell``."""
    cell = _find_cell(cur, name)
    if cell is None:
        raise ApiError(422, "unknown_cell", f"cell {name!r} is not registered", cell=name)
    return cell


def _find_route(cur: Cursor, org_id: int) -> Row | None:
    cur.execute(_ROUTE_SQL, (org_id,))
    row = cur.fetchone()
    return _route_json(row) if row is not None else None


def _require_route(cur: Cursor, org_id: int) -> Row:
    route = _find_route(cur, org_id)
    if route is None:
        raise _unknown_organization(org_id)
    return route


def _unknown_organization(org_id: int) -> ApiError:
    return ApiError(
        404,
        "unknown_organization",
        f"organization {org_id} has no route",
        organization_id=org_id,
    )


def _record_history(cur: Cursor, org_id: int, reason: str | None) -> None:
    """Append the route's current state to ``route_history``."""
    cur.execute(
        """
        INSERT INTO topology.route_history
               (organization_id, version, cell_id, maintenance, maintenance_owner, reason, changed_at)
        SELECT organization_id, version, cell_id, maintenance, maintenance_owner, %s, updated_at
          FROM topology.organization_routes
         WHERE organization_id = %s
        """,
        (reason, org_id),
    )


# --------------------------------------------------------------------------- application


def _check_tokens(tokens: Sequence[str]) -> list[bytes]:
    cleaned = [t.strip() for t in tokens]
    if not cleaned or any(not t for t in cleaned):
        raise ValueError("at least one non-empty API token is required")
    return [t.encode() for t in cleaned]


def create_app(dsn: str, tokens: list[str]) -> FastAPI:
    """Build the Topology Service application backed by the PostgreSQL database ``dsn``.

    ``tokens`` are the accepted bearer tokens for ``/v1/...`` (at least one).
    The schema is not created here: call :func:`ensure_schema` first.
    """
    accepted = _check_tokens(tokens)
    db = _Database(dsn)
    bearer = HTTPBearer(auto_error=False, description="one of the configured API tokens")

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing bearer token", headers=challenge)
        presented = credentials.credentials.encode()
        matched = False
        for token in accepted:  # no early exit: compare against every token
            matched |= hmac.compare_digest(presented, token)
        if not matched:
            raise ApiError(401, "unauthorized", "invalid bearer token", headers=challenge)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        db.close()

    app = FastAPI(
        title="Topology Service (orgmover reference implementation)",
        version="1",
        description="Cells and organization routes; see docs/topology-api.md.",
        lifespan=lifespan,
    )
    v1 = [Depends(require_token)]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(
            f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in details
        )
        return ApiError(422, "invalid_request", summary or "invalid request", details=details).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return ApiError(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=dict(exc.headers) if exc.headers else None,
        ).response()

    @app.exception_handler(psycopg.OperationalError)
    async def _db_down(_: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return ApiError(503, "database_unavailable", "the topology database is unavailable").response()

    # ---- health

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Liveness and database check; no authentication."""
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            log.warning("health check failed: %s", exc)
            body = {"status": "unavailable", "error": "database_unavailable",
                    "message": "the topology database is unavailable"}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    # ---- cells

    @app.get("/v1/cells", dependencies=v1, tags=["cells"])
    def list_cells() -> Row:
        """All cells, ordered by id."""
        with db.transaction() as cur:
            cur.execute("SELECT * FROM topology.cells ORDER BY id")
            return {"cells": [_cell_json(r) for r in cur.fetchall()]}

    @app.get("/v1/cells/{name}", dependencies=v1, tags=["cells"])
    def get_cell(name: CellName) -> Row:
        """One cell by name."""
        with db.transaction() as cur:
            cell = _find_cell(cur, name)
        if cell is None:
            raise ApiError(404, "unknown_cell", f"cell {name!r} is not registered", cell=name)
        return _cell_json(cell)

    @app.put("/v1/cells/{name}", dependencies=v1, tags=["cells"])
    def put_cell(name: CellName, body: CellIn, response: Response) -> Row:
        """Create or update a cell (idempotent); 201 when created, 200 otherwise."""
        seq = body.sequence_range
        with db.transaction() as cur:
            # Self-conflicting lock: one cell writer at a time, readers and FK checks unaffected.
            cur.execute("LOCK TABLE topology.cells IN SHARE ROW EXCLUSIVE MODE")
            existing = _find_cell(cur, name)
            if existing is not None and existing["id"] != body.id:
                raise ApiError(
                    409, "cell_id_conflict",
                    f"cell {name!r} already has id {existing['id']}; a cell's id cannot change",
                    cell=_cell_json(existing),
                )
            cur.execute("SELECT * FROM topology.cells WHERE id = %s AND name <> %s", (body.id, name))
            other = cur.fetchone()
            if other is not None:
                raise ApiError(
                    409, "cell_id_conflict",
                    f"cell id {body.id} is already used by cell {other['name']!r}",
                    cell=_cell_json(other),
                )
            cur.execute(
                """
                SELECT * FROM topology.cells
                 WHERE name <> %s AND sequence_min <= %s AND sequence_max >= %s
                 ORDER BY id LIMIT 1
                """,
                (name, seq.max, seq.min),
            )
            overlap = cur.fetchone()
            if overlap is not None:
                raise ApiError(
                    409, "sequence_range_overlap",
                    f"sequence range {seq.min}..{seq.max} overlaps cell {overlap['name']!r} "
                    f"({overlap['sequence_min']}..{overlap['sequence_max']})",
                    cell=_cell_json(overlap),
                )
            params = (body.address, body.session_prefix, seq.min, seq.max, name)
            if existing is None:
                cur.execute(
                    """
                    INSERT INTO topology.cells (address, session_prefix, sequence_min, sequence_max, name, id)
                    VALUES (%s, %s, %s, %s, %s, %s) RETURNING *
                    """,
                    (*params, body.id),
                )
                response.status_code = 201
            else:
                cur.execute(
                    """
                    UPDATE topology.cells
                       SET address = %s, session_prefix = %s, sequence_min = %s, sequence_max = %s
                     WHERE name = %s RETURNING *
                    """,
                    params,
                )
            row = cur.fetchone()
            assert row is not None
            return _cell_json(row)

    # ---- routes

    @app.get("/v1/organizations/{org_id}/route", dependencies=v1, tags=["routes"])
    def get_route(org_id: OrgId) -> Row:
        """The organization's route."""
        with db.transaction() as cur:
            return _require_route(cur, org_id)

    @app.put("/v1/organizations/{org_id}/route", dependencies=v1, tags=["routes"])
    def create_route(org_id: OrgId, body: RouteIn, response: Response) -> Row:
        """Create a route (201); the same route again is a no-op (200); another cell is 409."""
        with db.transaction() as cur:
            cell = _require_cell_for_route(cur, body.cell)
            cur.execute(
                """
                INSERT INTO topology.organization_routes (organization_id, cell_id)
                VALUES (%s, %s)
                ON CONFLICT (organization_id) DO NOTHING
                RETURNING organization_id
                """,
                (org_id, cell["id"]),
            )
            created = cur.fetchone() is not None
            if created:
                _record_history(cur, org_id, body.reason or "created")
                response.status_code = 201
            route = _require_route(cur, org_id)
            if not created and route["cell_id"] != cell["id"]:
                raise ApiError(
                    409, "route_exists",
                    f"organization {org_id} is already routed to cell {route['cell']!r}; "
                    "move it with PATCH (compare-and-set)",
                    current=route,
                )
            return route

    @app.patch("/v1/organizations/{org_id}/route", dependencies=v1, tags=["routes"])
    def update_route(org_id: OrgId, body: RoutePatch) -> Row:
        """Compare-and-set: apply the given fields iff the version is ``expected_version``."""
        with db.transaction() as cur:
            cell = _require_cell_for_route(cur, body.cell) if body.cell is not None else None
            cur.execute(
                "SELECT * FROM topology.organization_routes WHERE organization_id = %s FOR UPDATE",
                (org_id,),
            )
            locked = cur.fetchone()
            if locked is None:
                raise _unknown_organization(org_id)
            if locked["version"] != body.expected_version:
                raise ApiError(
                    409, "version_conflict",
                    f"organization {org_id} route is at version {locked['version']}, "
                    f"not the expected {body.expected_version}",
                    current=_require_route(cur, org_id),
                )
            cell_id = cell["id"] if cell is not None else locked["cell_id"]
            maintenance = locked["maintenance"] if body.maintenance is None else body.maintenance
            owner = (
                body.maintenance_owner
                if "maintenance_owner" in body.model_fields_set
                else locked["maintenance_owner"]
            )
            maintenance_reason = locked["maintenance_reason"]
            if body.maintenance is True and body.reason is not None:
                maintenance_reason = body.reason
            if not maintenance:
                owner = maintenance_reason = None
            cur.execute(
                """
                UPDATE topology.organization_routes
                   SET cell_id = %s, maintenance = %s, maintenance_owner = %s,
                       maintenance_reason = %s, version = version + 1, updated_at = now()
                 WHERE organization_id = %s
                """,
                (cell_id, maintenance, owner, maintenance_reason, org_id),
            )
            _record_history(cur, org_id, body.reason)
            return _require_route(cur, org_id)

    @app.get("/v1/organizations/{org_id}/route/history", dependencies=v1, tags=["routes"])
    def route_history(org_id: OrgId) -> Row:
        """Every version of the route, oldest first."""
        with db.transaction() as cur:
            _require_route(cur, org_id)
            cur.execute(_HISTORY_SQL, (org_id,))
            return {"history": [_history_json(r) for r in cur.fetchall()]}

    @app.get("/v1/classify", dependencies=v1, tags=["routing"])
    def classify(
        organization_id: Annotated[int, Query(ge=1, le=MAX_INT8)],
    ) -> Row:
        """Where an HTTP router should send a request for this organization."""
        with db.transaction() as cur:
            route = _require_route(cur, organization_id)
        return {
            "action": "proxy",
            "cell": route["cell"],
            "cell_id": route["cell_id"],
            "address": route["address"],
            "version": route["version"],
            "maintenance": route["maintenance"],
            "writes_blocked": route["maintenance"],
        }

    return app


# --------------------------------------------------------------------------- CLI


def _read_token_file(path: str) -> list[str]:
    """Tokens, one per line; blank lines and lines starting with ``#`` are ignored."""
    with open(path, encoding="utf-8") as fh:
        return [s for s in (line.strip() for line in fh) if s and not s.startswith("#")]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ensure the schema, then serve with uvicorn."""
    parser = argparse.ArgumentParser(
        prog="python -m orgmover.topology.server",
        description="Reference Topology Service (cells and organization routes).",
    )
    parser.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", action="append", help="accepted bearer token (repeatable)")
    auth.add_argument("--token-file", help="file with accepted bearer tokens, one per line")
    args = parser.parse_args(argv)

    if args.token:
        tokens = list(args.token)
    elif args.token_file:
        tokens = _read_token_file(args.token_file)
    elif os.environ.get(TOKEN_ENV):
        tokens = [os.environ[TOKEN_ENV]]
    else:
        parser.error(f"an API token is required: --token, --token-file or ${TOKEN_ENV}")
    try:
        app = create_app(args.dsn, tokens)
    except ValueError as exc:
        parser.error(str(exc))

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_schema(args.dsn)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
