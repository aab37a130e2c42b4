"""Topology Service: client for the documented HTTP API, plus a reference server.

The server (``orgmover.topology.server``) is not imported here, so using the
client needs neither FastAPI nor psycopg.
"""

from orgmover.topology.client import (
    Conflict,
    NotFound,
    TopologyClient,
    TopologyError,
    Unauthorized,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "Conflict",
    "NotFound",
    "TopologyClient",
    "TopologyError",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
]
