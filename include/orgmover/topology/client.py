"""HTTP client for the Topology Service API (``docs/topology-api.md``).

The mover talks to the Topology Service only through this client, so any
implementation of the documented API can be swapped in.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "Conflict",
    "NotFound",
    "TopologyClient",
    "TopologyError",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
]

#: Fields :meth:`TopologyClient.update_route` may change.
ROUTE_FIELDS = frozenset({"cell", "maintenance", "maintenance_owner", "reason"})

_RETRYABLE_STATUS = frozenset({502, 503, 504})


class TopologyError(Exception):
    """Base error. ``status`` is the HTTP status (None if no response), ``code`` the
    API error code (e.g. ``"unknown_cell"``), ``payload`` the decoded error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.payload: dict[str, Any] = payload or {}


class Unauthorized(TopologyError):
    """Missing or wrong API token (401)."""


class NotFound(TopologyError):
    """Unknown organization (404) or unknown cell (404, or 422 when named in a route body)."""


class Conflict(TopologyError):
    """The request conflicts with the current state (409), e.g. ``route_exists``,
    ``sequence_range_overlap``, ``cell_id_conflict``."""


class VersionConflict(Conflict):
    """Compare-and-set failed: the route is not at ``expected_version``.

    ``current`` is the route as the server saw it when rejecting the update.
    """

    @property
    def current(self) -> dict[str, Any]:
        """The current route."""
        current = self.payload.get("current")
        return current if isinstance(current, dict) else {}


class Unavailable(TopologyError):
    """The service could not be reached or answered 5xx.

    ``may_have_applied`` is True when a non-GET request was sent but its response
    was lost (timeout, dropped connection): its outcome is unknown, re-read the state.
    """

    def __init__(self, message: str, *, may_have_applied: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.may_have_applied = may_have_applied


class TopologyClient:
    """Synchronous client for the Topology Service.

    GET requests are retried ``retries`` times (exponential backoff starting at
    ``backoff`` seconds) on connection errors and 502/503/504. Writes are never
    retried: see :meth:`update_route` for how to recover from a lost response.
    Usable as a context manager; :meth:`close` releases the connection pool.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        *,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._retries = max(0, retries)
        self._backoff = backoff
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the underlying HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> TopologyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ API

    def health(self) -> bool:
        """True if ``GET /healthz`` answers ``{"status": "ok"}``; never raises, never retries."""
        try:
            response = self._http.get("/healthz")
            return response.status_code == 200 and response.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def cells(self) -> list[dict[str, Any]]:
        """All cells, ordered by id."""
        cells: list[dict[str, Any]] = self._call("GET", "/v1/cells")["cells"]
        return cells

    def cell(self, name: str) -> dict[str, Any]:
        """One cell; :class:`NotFound` if unknown."""
        return self._call("GET", f"/v1/cells/{_seg(name)}")

    def put_cell(
        self,
        name: str,
        id: int,  # noqa: A002 - the API field is called "id"
        address: str,
        sequence_min: int,
        sequence_max: int,
        session_prefix: str | None = None,
    ) -> dict[str, Any]:
        """Create or update a cell (idempotent). :class:`Conflict` on overlapping
        sequence ranges or an id used by another cell."""
        body = {
            "id": id,
            "address": address,
            "session_prefix": session_prefix,
            "sequence_range": {"min": sequence_min, "max": sequence_max},
        }
        return self._call("PUT", f"/v1/cells/{_seg(name)}", json=body)

    def route(self, org_id: int) -> dict[str, Any]:
        """The organization's route; :class:`NotFound` if it has none."""
        return self._call("GET", f"/v1/organizations/{int(org_id)}/route")

    def create_route(self, org_id: int, cell: str) -> dict[str, Any]:
        """Create the organization's route to ``cell`` (idempotent for the same cell).

        :class:`Conflict` (``route_exists``) if it is routed to another cell,
        :class:`NotFound` if the cell is unknown.
        """
        return self._call("PUT", f"/v1/organizations/{int(org_id)}/route", json={"cell": cell})

    def update_route(self, org_id: int, expected_version: int, **fields: Any) -> dict[str, Any]:
        """Compare-and-set the route; returns the new route (version + 1).

        ``fields``: ``cell`` (name), ``maintenance`` (bool), ``maintenance_owner``
        (str or None), ``reason`` (str, recorded in the history; also the
        maintenance reason when turning maintenance on). All given fields are
        applied atomically, only if the route is still at ``expected_version``;
        otherwise :class:`VersionConflict` is raised with ``.current``.

        This request is never retried. If it raises :class:`Unavailable` with
        ``may_have_applied=True`` (the response was lost), read the route with
        :meth:`route`: still at ``expected_version`` means it was not applied and
        may be sent again; ``expected_version + 1`` with the requested fields
        (e.g. ``maintenance_owner`` set to your unique owner id) means it was
        applied; anything else means another writer changed the route and the
        caller must re-decide from the current state.
        """
        unknown = set(fields) - ROUTE_FIELDS
        if unknown:
            raise TypeError(f"update_route() got unexpected field(s): {', '.join(sorted(unknown))}")
        body = {"expected_version": expected_version, **fields}
        return self._call("PATCH", f"/v1/organizations/{int(org_id)}/route", json=body)

    def history(self, org_id: int) -> list[dict[str, Any]]:
        """Every version of the route, oldest first."""
        history: list[dict[str, Any]] = self._call(
            "GET", f"/v1/organizations/{int(org_id)}/route/history"
        )["history"]
        return history

    def classify(self, org_id: int) -> dict[str, Any]:
        """Routing decision for an HTTP router: cell, address, ``writes_blocked``."""
        return self._call("GET", "/v1/classify", params={"organization_id": int(org_id)})

    # ------------------------------------------------------------------ plumbing

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        response = self._send(method, path, json=json, params=params)
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise TopologyError(
                    f"{method} {response.request.url}: invalid JSON in response",
                    status=response.status_code,
                ) from exc
        raise _error_for(method, response)

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None,
        params: dict[str, Any] | None,
    ) -> httpx.Response:
        attempts = 1 + (self._retries if method == "GET" else 0)
        url = f"{self.base_url}{path}"
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            try:
                response = self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                if not last:
                    self._sleep(attempt)
                    continue
                not_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                may_have_applied = method != "GET" and not not_sent
                hint = "; its outcome is unknown: re-read the state" if may_have_applied else ""
                raise Unavailable(
                    f"{method} {url}: topology service unreachable "
                    f"({type(exc).__name__}: {exc}){hint}",
                    may_have_applied=may_have_applied,
                ) from exc
            if response.status_code in _RETRYABLE_STATUS and not last:
                response.close()
                self._sleep(attempt)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _sleep(self, attempt: int) -> None:
        if self._backoff > 0:
            time.sleep(self._backoff * 2**attempt)


def _seg(value: str) -> str:
    """Quote one URL path segment."""
    return quote(value, safe="")


def _error_for(method: str, response: httpx.Response) -> TopologyError:
    """Map an error response to the matching exception."""
    try:
        decoded = response.json()
    except ValueError:
        decoded = None
    payload: dict[str, Any] = (
        decoded if isinstance(decoded, dict) else {"message": response.text[:500]}
    )
    status = response.status_code
    code = payload.get("error") if isinstance(payload.get("error"), str) else None
    detail = payload.get("message") or response.reason_phrase
    message = f"{method} {response.request.url}: {status} {code or 'error'}: {detail}"
    kwargs: dict[str, Any] = {"status": status, "code": code, "payload": payload}
    if status == 401:
        return Unauthorized(message, **kwargs)
    if status == 404 or (status == 422 and code == "unknown_cell"):
        return NotFound(message, **kwargs)
    if status == 409:
        if code == "version_conflict":
            return VersionConflict(message, **kwargs)
        return Conflict(message, **kwargs)
    if status >= 500:
        return Unavailable(message, may_have_applied=method != "GET", **kwargs)
    return TopologyError(message, **kwargs)
