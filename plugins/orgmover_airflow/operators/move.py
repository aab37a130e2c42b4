"""Operators of the org_move DAG. Each is thin: it builds a MoveContext from the hooks (cells,
Topology Service, mover state) and calls one phase of :mod:`orgmover.mover`. XComs stay small
(ids, table names, report paths); everything else is in the mover's state database."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from orgmover import gitlab, mover
from orgmover.errors import ConfigError, PreflightError, StateError, ValidationFailed
from orgmover_airflow.hooks import CellHook, MoverStateHook, TopologyHook

# errors that a retry cannot fix: fail at once instead of retrying
_FINAL = (PreflightError, ConfigError, ValidationFailed, StateError)


def _flag(value: Any, name: str) -> bool:
    """A yes/no DAG parameter in a templated field: a bool, or its rendering ("True", "false", "1", "0")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "", "none"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


class OrgMoveBaseOperator(BaseOperator):
    """Common wiring. ``migration_id`` is templated (from the preflight task's XCom)."""

    template_fields: Sequence[str] = ("migration_id",)
    ui_color = "#e8f0fe"

    def __init__(self, *, migration_id: Any = None, state_conn_id: str = "orgmover_state",
                 topology_conn_id: str = "orgmover_topology", dictionary_dir: str | None = None,
                 reports_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.migration_id = migration_id
        self.state_conn_id = state_conn_id
        self.topology_conn_id = topology_conn_id
        self.dictionary_dir = dictionary_dir
        self.reports_dir = reports_dir

    def move_context(self) -> mover.MoveContext:
        reports = self.reports_dir or os.environ.get("ORGMOVER_REPORTS_DIR") or \
            str(Path(os.environ.get("AIRFLOW_HOME", ".")) / "orgmover-reports")
        dictionary = self.dictionary_dir or os.environ.get("ORGMOVER_DICTIONARY_DIR") or str(gitlab.db_docs_dir())
        return mover.MoveContext(
            tracking=MoverStateHook(self.state_conn_id).get_conn(),
            topology=TopologyHook(self.topology_conn_id).get_conn(),
            resolve_cell=lambda name: CellHook(cell=name).get_cell(),
            dictionary_dir=Path(dictionary), reports_dir=Path(reports), log=self.log.info)

    @property
    def mid(self) -> int | None:
        return None if self.migration_id in (None, "", "None") else int(self.migration_id)

    def run_phase(self, context: Any):
        raise NotImplementedError

    def execute(self, context: Any):
        try:
            return self.run_phase(context)
        except _FINAL as e:
            raise AirflowFailException(str(e)) from e


class _TableOperator(OrgMoveBaseOperator):
    """A phase over one table (mapped over the plan's tables; the UI names each by its table)."""

    template_fields = ("migration_id", "table")
    ui_color = "#e6f4ea"

    def __init__(self, *, table: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.table = table


class PreflightOperator(OrgMoveBaseOperator):
    """Checks everything, changes nothing. A real move creates (or resumes) a migration and returns
    its id; a dry run writes the readable report and returns None (failing if the move would be refused)."""

    template_fields = ("organization_id", "source_cell", "target_cell", "dry_run", "shard_map")
    ui_color = "#fff4e5"

    def __init__(self, *, organization_id: Any, source_cell: str, target_cell: str, dry_run: Any = False,
                 shard_map: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.organization_id, self.source_cell, self.target_cell, self.dry_run = organization_id, source_cell, target_cell, dry_run
        self.shard_map = shard_map

    def run_phase(self, context: Any):
        org = int(self.organization_id)
        dry = _flag(self.dry_run, "dry_run")
        maps = {"shards": dict(self.shard_map)} if self.shard_map else None
        ctx = self.move_context()
        if dry:
            path, problems = mover.dry_run(ctx, org, self.source_cell, self.target_cell, maps)
            context["ti"].xcom_push(key="report", value=str(path))
            if problems:
                raise PreflightError(problems + [f"dry-run report: {path}"])
            return None
        run_id = context["run_id"] if "run_id" in context else None
        return mover.preflight(ctx, org, self.source_cell, self.target_cell, run_id, maps)


class PlanOperator(OrgMoveBaseOperator):
    """Plans every table; returns the org tables to copy (the copy phase maps over them)."""

    def run_phase(self, context: Any):
        return mover.make_plan(self.move_context(), self.mid)


class PrepareTargetOperator(OrgMoveBaseOperator):
    """Clears rows of an earlier window from the target and copies the shared rows the org references."""

    def run_phase(self, context: Any):
        mover.prepare_target(self.move_context(), self.mid)


class CopyTableOperator(_TableOperator):
    """Pre-copies one table's org rows chunk by chunk (resumable)."""

    def run_phase(self, context: Any):
        return mover.copy_table(self.move_context(), self.mid, self.table)


class PrecopyDoneOperator(OrgMoveBaseOperator):
    """Checks that every table was pre-copied before the write window opens."""

    def run_phase(self, context: Any):
        mover.precopy_done(self.move_context(), self.mid)


class CatchUpOperator(OrgMoveBaseOperator):
    """Right before the write window, the org still writable: syncs what was written since the
    pre-copy (from the capture slot) and refreshes the validation baseline, pass after pass until a
    pass is short, so the window only has the last seconds' writes to sync and compare."""

    ui_color = "#fff4d6"

    def __init__(self, *, max_passes: int = 5, settle_seconds: float = 2.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_passes, self.settle_seconds = max_passes, settle_seconds

    def run_phase(self, context: Any):
        return mover.catch_up(self.move_context(), self.mid, self.max_passes, self.settle_seconds)


class WriteWindowOperator(OrgMoveBaseOperator):
    """The write window in one task (between tasks, writes would stay blocked while the scheduler
    starts the next): maintenance on, rows and storage synced at once, foreign keys checked while the
    rows are validated, go/no-go (the readable report), then the route switched unless ``switch`` is
    false (a person approves first). Setup of the maintenance window: the ``release`` teardown lifts
    maintenance if it fails. A retry resumes: each step records its progress."""

    ui_color = "#fde2e1"
    template_fields = ("migration_id", "switch", "full", "max_lag", "writers_timeout")

    def __init__(self, *, switch: bool | str = True, full: bool | str = False, max_lag: float | str | None = None,
                 writers_timeout: float | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.switch, self.full, self.max_lag, self.writers_timeout = switch, full, max_lag, writers_timeout

    def run_phase(self, context: Any):
        seconds = lambda v: None if v in (None, "", "None") else float(v)  # noqa: E731
        return mover.write_window(self.move_context(), self.mid, switch=_flag(self.switch, "switch"),
                                  full=_flag(self.full, "full") or None, max_lag=seconds(self.max_lag),
                                  writers_timeout=seconds(self.writers_timeout))


class SwitchoverOperator(OrgMoveBaseOperator):
    """Routes the org to the target and lifts maintenance in one compare-and-set."""

    ui_color = "#d2e3fc"

    def run_phase(self, context: Any):
        route = mover.switchover(self.move_context(), self.mid)
        return {"cell": route["cell"], "version": route["version"]}


class SummaryOperator(OrgMoveBaseOperator):
    def run_phase(self, context: Any):
        data, text = mover.summary(self.move_context(), self.mid)
        self.log.info("\n%s", text)
        return {k: data[k] for k in ("migration_id", "state", "rows", "bytes", "maintenance_seconds", "validation_ok")}


class ReleaseOperator(OrgMoveBaseOperator):
    """Teardown of the maintenance window: an unfinished migration lifts maintenance, route unchanged."""

    ui_color = "#fde2e1"

    def run_phase(self, context: Any):
        return mover.release(self.move_context(), self.mid)


class RollbackOperator(OrgMoveBaseOperator):
    """Removes an unfinished migration's rows from the target (the org stays on the source)."""

    def run_phase(self, context: Any):
        counts = mover.rollback(self.move_context(), self.mid)
        return sum(counts.values())


class CleanupSourceOperator(OrgMoveBaseOperator):
    """Deletes a moved org's rows from the source once the route points at the target, validation
    passed and the retention period is over; refuses otherwise."""

    template_fields = ("migration_id", "retention_hours")

    def __init__(self, *, retention_hours: Any = 168, **kwargs: Any):
        super().__init__(**kwargs)
        self.retention_hours = retention_hours

    def run_phase(self, context: Any):
        counts = mover.cleanup_source(self.move_context(), self.mid, float(self.retention_hours) * 3600)
        return sum(counts.values())


class ReplicateScanOperator(OrgMoveBaseOperator):
    """Scans the source and registers every repository, object and image of the org in the replication
    registry; returns what needs syncing as batches (key ranges of about ``batch_size`` rows per data
    type, env ``ORGMOVER_REPLICATION_BATCH``, default 200) for the mapped ``sync_batch`` task."""

    ui_color = "#fff8e1"

    def __init__(self, *, batch_size: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def run_phase(self, context: Any):
        return mover.replication_batches(self.move_context(), self.mid, self.batch_size)


class ReplicateBatchOperator(OrgMoveBaseOperator):
    """Syncs and verifies one batch (mapped over the scan's batches): only its rows that are pending, or
    failed and due; the others are skipped. Returns counts."""

    ui_color = "#fff8e1"

    def __init__(self, *, batch: dict, workers: int = 4, **kwargs: Any):
        super().__init__(**kwargs)
        self.batch = batch  # not templated: keys are paths that may contain anything
        self.workers = workers

    def run_phase(self, context: Any):
        return mover.replicate_batch(self.move_context(), self.mid, self.batch, workers=self.workers)


class ReplicateOperator(OrgMoveBaseOperator):
    """Repositories, objects and images of the org: register, sync, verify, re-scan until converged
    (in the DAG: after the batches, syncs what changed on the source since the scan)."""

    ui_color = "#fff8e1"

    def run_phase(self, context: Any):
        status = mover.replicate(self.move_context(), self.mid)
        return {k: {"total": v["total"], "synced": v["synced"], "verified": v["verified"]} for k, v in status.items()}
