"""Errors of orgmover. Every error a person sees says what is wrong and what was left unchanged."""


class OrgMoverError(Exception):
    """Base class for all orgmover errors."""


class ConfigError(OrgMoverError):
    """Bad configuration or input (unknown cell, bad parameters)."""


class PreflightError(OrgMoverError):
    """A preflight check failed; nothing was changed on any cell."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("preflight failed, nothing was changed:\n  - " + "\n  - ".join(self.problems))


class ClassificationError(PreflightError):
    """A table cannot be classified by the dictionary or the schema."""


class CopyError(OrgMoverError):
    """Copying rows failed."""


class ValidationFailed(OrgMoverError):
    """Source and target differ; the route was not switched."""


class StateError(OrgMoverError):
    """The migration is not in a state that allows the requested step."""


class TransientError(OrgMoverError):
    """A failure a retry may not meet: a system that did not answer, a writer still running. The task's
    retries (with backoff) take it; nothing it touched was left half done."""


class Unreachable(TransientError, ConfigError):
    """A cell's PostgreSQL (or another system) did not answer: transient for a retry; a ConfigError too,
    since a wrong host or port gives the same answer (the message names the system and the address)."""


# SQLSTATE classes and codes a retry may not meet: connection exceptions (08), serialization failure and
# deadlock (40001, 40P01), lock not available (55P03), the server shutting down or starting (57P01-57P03),
# out of resources (53), a statement cancelled by a timeout (57014)
_TRANSIENT_SQLSTATE = ("08", "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53", "57014")


def is_transient(e: BaseException) -> bool:
    """Whether the error, or one it was raised from, is one a retry may not meet. The one place that
    decides it: operators let these take the task's retries and fail at once on every other orgmover
    error (a preflight refusal, a validation difference, bad configuration, a state that forbids the step).

    Transient: :class:`TransientError`; PostgreSQL connection failures and the SQLSTATEs above; the
    Topology Service unreachable or answering 5xx or 429; HTTP transport errors; OS timeouts and
    connection errors. A preflight refusal or a validation difference is final whatever caused it."""
    import httpx
    import psycopg

    from orgmover.topology.client import TopologyError, Unavailable

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (PreflightError, ValidationFailed)):
            return False
        if isinstance(e, (TransientError, TimeoutError, ConnectionError, Unavailable, httpx.TransportError)):
            return True
        if isinstance(e, TopologyError) and (e.status == 429 or (e.status or 0) >= 500):
            return True
        if isinstance(e, psycopg.Error):
            if e.sqlstate is None and isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
                return True  # a connection refused or lost: no answer from the server, so no SQLSTATE
            if e.sqlstate and e.sqlstate.startswith(_TRANSIENT_SQLSTATE):
                return True
        e = e.__cause__ or e.__context__
    return False
