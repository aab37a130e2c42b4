"""Operators of the org_move DAG. Each is thin: it builds a MoveContext from the hooks (cells,
Topology Service, mover state) and calls one phase of :mod:`orgmover.mover`. XComs stay small
(ids, table names, report paths); everything else is in the mover's state database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from orgmover import gitlab, mover
from orgmover.errors import ConfigError, OrgMoverError, PreflightError, StateError, is_transient
from orgmover_airflow.hooks import CellHook, MoverStateHook, TopologyHook


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


@contextlib.contextmanager
def classified_errors(log):
    """Errors classified once (:func:`orgmover.errors.is_transient`): a transient one takes the task's
    retries, with their backoff; any other orgmover error fails the task at once (a retry cannot fix it)."""
    try:
        yield
    except Exception as e:
        if is_transient(e):
            log.warning("transient failure, the task's retries take it: %s", e)
            raise
        if isinstance(e, OrgMoverError):
            raise AirflowFailException(str(e)) from e
        raise


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

    # whether the task works for the run that drives the migration (every task of org_move but preflight);
    # the after-move DAGs (cleanup, rollback) act on a migration whatever run drove it
    driven_by_run = True

    def _fence(self, context: Any, ctx: mover.MoveContext | None = None) -> None:
        """One run drives a migration: a task of another run (one cleared after a newer run adopted the
        migration) stops before it changes anything."""
        if not self.driven_by_run or self.mid is None or "run_id" not in context:
            return
        m = (ctx or self.move_context()).tracking.get(self.mid)
        if m["dag_run_id"] not in (None, context["run_id"]):
            raise StateError(f"migration #{self.mid} is driven by run {m['dag_run_id']!r}, not this run "
                             f"({context['run_id']!r}): this task changes nothing")

    def execute(self, context: Any):
        with classified_errors(self.log):
            self._fence(context)
            return self.run_phase(context)


class PreflightOperator(OrgMoveBaseOperator):
    """Checks everything, changes nothing. A real move creates (or adopts an unfinished) migration and
    returns its id; a dry run writes the readable report and returns None (failing if the move would be
    refused). A run's conf with a key the DAG does not know is refused before anything runs; so is a run
    for an organization whose migration another run, still running, drives."""

    template_fields = ("organization_id", "source_cell", "target_cell", "dry_run", "shard_map")
    ui_color = "#fff4e5"
    driven_by_run = False  # it decides which run drives the migration

    def __init__(self, *, organization_id: Any, source_cell: str, target_cell: str, dry_run: Any = False,
                 shard_map: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.organization_id, self.source_cell, self.target_cell, self.dry_run = organization_id, source_cell, target_cell, dry_run
        self.shard_map = shard_map

    def _check_conf(self, context: Any) -> None:
        dag_run = context.get("dag_run")
        known = set(self.dag.params) if self.has_dag() else set()
        unknown = sorted(set(getattr(dag_run, "conf", None) or {}) - known) if known else []
        if unknown:
            raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in the run's conf: "
                              f"{', '.join(map(repr, unknown))}; {self.dag_id} knows {', '.join(sorted(known))}. "
                              f"Nothing was checked or changed")

    @staticmethod
    def _run_alive(context: Any):
        ti, dag_id = context["ti"], context["dag"].dag_id if context.get("dag") else None
        getter = getattr(ti, "get_dagrun_state", None)
        if getter is None or dag_id is None:
            return None

        def alive(run_id: str) -> bool:
            try:
                return getter(dag_id, run_id) in ("queued", "running")
            except Exception:  # the run was deleted: it drives nothing
                return False
        return alive

    def run_phase(self, context: Any):
        self._check_conf(context)
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
        return mover.preflight(ctx, org, self.source_cell, self.target_cell, run_id, maps, run_alive=self._run_alive(context))


class PlanOperator(OrgMoveBaseOperator):
    """Plans every table; returns the org tables to copy in a few groups sized by the plan's bytes
    (:func:`orgmover.mover.copy_groups`): the copy phase maps over the groups."""

    def run_phase(self, context: Any):
        ctx = self.move_context()
        mover.make_plan(ctx, self.mid)
        return mover.copy_groups(ctx, self.mid)


class PrepareTargetOperator(OrgMoveBaseOperator):
    """Clears rows of an earlier window from the target and copies the shared rows the org references."""

    def run_phase(self, context: Any):
        mover.prepare_target(self.move_context(), self.mid)


class CopyTablesOperator(OrgMoveBaseOperator):
    """Pre-copies a group of tables (mapped over the plan's groups), two at a time, each chunk by chunk
    (resumable: a retry copies only the chunks not recorded as copied). Returns rows and bytes copied."""

    template_fields = ("migration_id", "tables")
    ui_color = "#e6f4ea"

    def __init__(self, *, tables: list[str], workers: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.tables, self.workers = tables, workers

    def run_phase(self, context: Any):
        done = mover.copy_tables(self.move_context(), self.mid, list(self.tables), workers=self.workers)
        return {"tables": len(done), "rows": sum(d.get("rows", 0) for d in done if isinstance(d, dict))}


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
        """Also pushes (XCom ``approval``) the readable text a person approves before writes are blocked."""
        ctx = self.move_context()
        done = mover.catch_up(ctx, self.mid, self.max_passes, self.settle_seconds)
        text, _ = mover.readiness(ctx, self.mid, done)
        context["ti"].xcom_push(key="approval", value=text)
        return {"passes": len(done["passes"]), "rows": sum(p["rows"] for p in done["passes"])}


class WriteWindowOperator(OrgMoveBaseOperator):
    """The write window in one task (between tasks, writes would stay blocked while the scheduler
    starts the next): maintenance on, rows and storage synced at once, foreign keys checked while the
    rows are validated, go/no-go (the readable report), then the route switched (unless ``switch`` is
    false: the CLI's step-by-step move). Whatever fails once maintenance is on, the window lifts it
    before the task ends; a retry runs a new window (a killed one's retry resumes in its maintenance)."""

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

    driven_by_run = False

    def run_phase(self, context: Any):
        counts = mover.rollback(self.move_context(), self.mid)
        return sum(counts.values())


class CleanupSourceOperator(OrgMoveBaseOperator):
    """Deletes a moved org's rows from the source once the route points at the target, validation
    passed and the retention period is over; refuses otherwise."""

    template_fields = ("migration_id", "retention_hours")
    driven_by_run = False

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
