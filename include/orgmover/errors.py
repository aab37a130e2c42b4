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
