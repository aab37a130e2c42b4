"""The PostgreSQL mover against real cells, without Airflow: change sync in the write window,
row-level diff of a corrupted target row, rollback, and a real copy process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from orgmover import mover
from orgmover.cli import run_move
from orgmover.errors import ValidationFailed
from verify import check_move, snapshot


def _snap(devenv, cell):
    c = devenv.resolve_cell(cell)
    return snapshot(c.dsn, c.db_key_base)


def _org_count(dsn, sql, org_id) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute(sql, (org_id,)).fetchone()[0]


ISSUES_OF_ORG = "SELECT count(*) FROM issues i JOIN namespaces n ON n.id = i.namespace_id WHERE n.organization_id = %s"


def test_changes_after_precopy_are_synced_in_the_window(devenv, seeded, ctx):
    org = seeded["kappa"]
    src_dsn = devenv.resolve_cell("legacy").dsn
    dst_before = _snap(devenv, "cell-1")
    changes = {}

    def write_while_writable(mid):
        # the org is still writable: an update, an insert, a delete (with its notes) happen after the pre-copy
        with psycopg.connect(src_dsn) as c:
            ids = [r[0] for r in c.execute("SELECT i.id FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                                           "WHERE n.organization_id = %s ORDER BY i.id", (org.id,))]
            c.execute("UPDATE issues SET title = 'edited after the pre-copy', updated_at = now() WHERE id = %s", (ids[0],))
            gone = c.execute("DELETE FROM notes WHERE noteable_type = 'Issue' AND noteable_id = %s", (ids[-1],)).rowcount
            c.execute("DELETE FROM label_links WHERE target_type = 'Issue' AND target_id = %s", (ids[-1],))
            c.execute("DELETE FROM issues WHERE id = %s", (ids[-1],))
            i = c.execute("SELECT namespace_id, project_id, author_id FROM issues WHERE id = %s", (ids[0],)).fetchone()
            c.execute("INSERT INTO notes (noteable_type, noteable_id, project_id, author_id, note) VALUES "
                      "('Issue', %s, %s, %s, 'written after the pre-copy')", (ids[0], i[1], i[2]))
            changes["deleted_notes"] = gone
        changes["src"] = _snap(devenv, "legacy")

    mid = run_move(ctx, org.id, "legacy", "cell-1", before_window=write_while_writable)
    assert ctx.tracking.get(mid)["state"] == "completed"
    details = {t["table_name"]: t["sync_detail"] for t in ctx.tracking.tables(mid) if t["sync_detail"]}
    assert details["issues"]["changed"] == 1 and details["notes"]["changed"] == 1
    # the window knew the written keys from the change-capture slot: no table was scanned
    assert {d["mode"] for d in details.values()} == {"captured"}
    assert details["issues"]["absent_keys"] and not details["events"].get("absent_keys")
    # the window re-copied only the rows written since the pre-copy, not the org
    assert sum(d["changed"] for d in details.values()) < 10
    expected = dict(org.rows)
    expected["issues"] -= 1
    expected["notes"] += 1 - changes["deleted_notes"]
    expected.pop("label_links")  # the deleted issue's label links are gone too (checked row by row below)
    assert check_move(changes["src"], _snap(devenv, "legacy"), dst_before, _snap(devenv, "cell-1"), expected) == []
    with psycopg.connect(devenv.resolve_cell("cell-1").dsn) as c:
        assert c.execute("SELECT count(*) FROM issues WHERE title = 'edited after the pre-copy'").fetchone()[0] == 1
    assert _org_count(devenv.resolve_cell("cell-1").dsn, ISSUES_OF_ORG, org.id) == org.rows["issues"] - 1


def test_corrupted_target_row_is_reported_with_its_key_and_rollback(devenv, seeded, ctx, monkeypatch):
    monkeypatch.setenv("ORGMOVER_FULL_VALIDATION", "1")  # every chunk (tests/test_changes.py: the incremental one)
    org = seeded["lambda"]
    dst_dsn = devenv.resolve_cell("cell-1").dsn
    corrupted = {}
    ctx.chunk_rows = 40  # several chunks per table: the checksums per chunk locate the damage

    def corrupt_target(mid):
        with psycopg.connect(dst_dsn) as c:
            iid = c.execute("SELECT min(i.id) FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                            "WHERE n.organization_id = %s", (org.id,)).fetchone()[0]
            c.execute("UPDATE issues SET title = 'bit rot' WHERE id = %s", (iid,))
            corrupted["id"] = iid

    with pytest.raises(ValidationFailed, match="1 tables differ between cells: issues"):
        run_move(ctx, org.id, "legacy", "cell-1", before_window=corrupt_target)
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "failed"
    detail = ctx.tracking.table(m["id"], "issues")["validation_detail"]["diff"]
    assert detail["mismatched"] == 1 and detail["missing_on_target"] == 0 and detail["extra_on_target"] == 0
    assert detail["samples"]["mismatched"] == [f"({corrupted['id']})"]
    assert detail["matching"] == org.rows["issues"] - 1
    assert detail["chunks"]["total"] > 1 and detail["chunks"]["differ"] == 1  # only that chunk was diffed row by row
    report = (ctx.reports_dir / f"migration-{m['id']}-validation.txt").read_text()
    assert "RESULT: FAILED" in report and f"mismatched 1 (keys ({corrupted['id']}))" in report
    assert f"chunks: 1 of {detail['chunks']['total']} differ (id in [-inf, " in report
    route = devenv.topology().route(org.id)
    assert route["cell"] == "legacy" and route["maintenance"] is False

    counts = mover.rollback(ctx, m["id"])
    assert counts["issues"] == org.rows["issues"]
    assert _org_count(dst_dsn, ISSUES_OF_ORG, org.id) == 0
    assert ctx.tracking.get(m["id"])["state"] == "rolled_back"
    assert ctx.tracking.active_for_org(org.id) is None


def test_a_dangling_reference_on_the_target_stops_the_window(devenv, seeded, ctx):
    """The window checks the foreign keys of the rows it wrote: an issue edited on the source whose
    milestone vanished from the target (deleted behind the mover's back, triggers off) is named
    with its key and the broken key, and nothing else of the table is blamed; the route stays."""
    org = seeded["phi"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    seen = {}

    def break_target(mid):
        with psycopg.connect(src_dsn) as c:
            seen["issue"], seen["milestone"] = c.execute(
                "UPDATE issues SET title = 'edited' WHERE id = (SELECT min(i.id) FROM issues i JOIN namespaces n ON "
                "n.id = i.namespace_id WHERE n.organization_id = %s AND i.milestone_id IS NOT NULL) "
                "RETURNING id, milestone_id", (org.id,)).fetchone()
        with psycopg.connect(dst_dsn) as c:
            c.execute("SET session_replication_role = replica")
            c.execute("DELETE FROM milestones WHERE id = %s", (seen["milestone"],))

    with pytest.raises(ValidationFailed) as e:
        run_move(ctx, org.id, "legacy", "cell-1", before_window=break_target)
    msg = str(e.value)
    assert "foreign keys of the organization's rows are broken on the target" in msg
    assert f"issues.milestone_id -> milestones: rows ({seen['issue']}) reference a missing row" in msg
    assert msg.count("reference a missing row") == 1  # the issue's other keys resolve
    assert devenv.topology().route(org.id)["cell"] == "legacy"
    m = ctx.tracking.latest_for_org(org.id)
    assert m["state"] == "failed"
    mover.rollback(ctx, m["id"])
    assert _org_count(dst_dsn, ISSUES_OF_ORG, org.id) == 0


def test_kill_9_mid_chunk_then_resume(devenv, seeded, ctx, tmp_root):
    """A real `orgmover copy-table` process is killed with SIGKILL while it copies; re-running resumes
    at the first chunk not recorded, with no duplicate and no missing row."""
    org = seeded["iota"]
    ctx.chunk_rows = 250
    mid = mover.preflight(ctx, org.id, "legacy", "cell-1", "kill-test")
    mover.make_plan(ctx, mid)
    mover.prepare_target(ctx, mid)
    table = "notes"
    chunks = ctx.tracking.chunks(mid, table)
    assert len(chunks) > 20
    env = dict(os.environ, ORGMOVER_HOME=str(devenv.home))
    killed_mid_chunk = 0
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "orgmover.cli", "--home", str(devenv.home), "copy-table",
                                 str(mid), table], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = sum(c["state"] == "copied" for c in ctx.tracking.chunks(mid, table))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(c["state"] == "copied" for c in ctx.tracking.chunks(mid, table)) >= start + 2:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            break  # finished before we could kill it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        states = [c["state"] for c in ctx.tracking.chunks(mid, table)]
        if "copying" in states:
            killed_mid_chunk += 1
            if killed_mid_chunk >= 2:
                break
    assert killed_mid_chunk >= 1, "the copy process was never killed inside a chunk"
    res = mover.copy_table(ctx, mid, table)  # the retry
    chunks = ctx.tracking.chunks(mid, table)
    assert all(c["state"] == "copied" for c in chunks)
    assert any(c["attempts"] > 1 for c in chunks)
    sql = ("SELECT id, md5(n::text) FROM notes n WHERE noteable_type IN ('Issue', 'MergeRequest', 'Snippet') "
           "AND id = ANY(%s) ORDER BY id")
    with psycopg.connect(devenv.resolve_cell("legacy").dsn) as s, psycopg.connect(devenv.resolve_cell("cell-1").dsn) as d:
        plan = mover.load_plan(ctx, mid)
        where = plan.tables[table].where
        src_ids = [r[0] for r in s.execute(f"SELECT t.id FROM notes t WHERE {where}")]
        src_rows = s.execute(sql, (src_ids,)).fetchall()
        dst_rows = d.execute(sql, (src_ids,)).fetchall()
        dup = d.execute("SELECT count(*) - count(DISTINCT id) FROM notes").fetchone()[0]
    assert len(src_rows) == org.rows["notes"] == res["rows"]
    assert dst_rows == src_rows and dup == 0
    mover.rollback(ctx, mid)


def test_cleanup_of_the_source_is_guarded(devenv, seeded, ctx):
    from orgmover.errors import StateError

    org = seeded["mu"]
    src_dsn = devenv.resolve_cell("legacy").dsn
    mid = run_move(ctx, org.id, "legacy", "cell-1")
    with pytest.raises(StateError, match="the retention period has not passed"):
        mover.cleanup_source(ctx, mid, retention_seconds=3600)
    # the route moved back by hand (say, an emergency): cleanup refuses
    topo = devenv.topology()
    r = topo.route(org.id)
    back = topo.update_route(org.id, r["version"], cell="legacy")
    with pytest.raises(StateError, match="routed to legacy, not to the target cell-1"):
        mover.cleanup_source(ctx, mid, retention_seconds=0)
    topo.update_route(org.id, back["version"], cell="cell-1")
    assert _org_count(src_dsn, ISSUES_OF_ORG, org.id) == org.rows["issues"]

    others_before = {n: _snap(devenv, "legacy").tables for n in ["x"]}["x"]
    with psycopg.connect(src_dsn) as c:
        shared_lfs = c.execute(
            "SELECT DISTINCT l.id FROM lfs_objects l JOIN lfs_objects_projects a ON a.lfs_object_id = l.id "
            "JOIN projects p ON p.id = a.project_id WHERE p.organization_id = %s AND EXISTS (SELECT 1 FROM "
            "lfs_objects_projects b JOIN projects q ON q.id = b.project_id WHERE b.lfs_object_id = l.id "
            "AND q.organization_id <> %s)", (org.id, org.id)).fetchall()
    assert shared_lfs, "the seed links some LFS objects from several orgs"
    counts = mover.cleanup_source(ctx, mid, retention_seconds=0)
    assert counts["issues"] == org.rows["issues"] and sum(counts.values()) == org.total
    assert _org_count(src_dsn, ISSUES_OF_ORG, org.id) == 0
    with psycopg.connect(src_dsn) as c:  # LFS objects other orgs use are still there
        left = c.execute("SELECT count(*) FROM lfs_objects WHERE id = ANY(%s)", ([r[0] for r in shared_lfs],)).fetchone()[0]
    assert left == len(shared_lfs)
    after = _snap(devenv, "legacy").tables
    for table, rows in after.items():  # nothing but the org's rows disappeared
        assert set(rows) <= set(others_before[table])
        assert len(others_before[table]) - len(rows) == org.rows.get(table, 0)
    assert mover.cleanup_source(ctx, mid, retention_seconds=0) == {}  # done once


def test_a_chunk_is_durable_when_copy_chunk_returns(devenv, seeded, ctx):
    """Rows of a chunk (here of a table whose rows are rewritten: LFS ids remapped) are committed when
    copy_chunk returns, before its connection closes: recording the chunk as copied is then true."""
    from orgmover.pgcopy import Progress, copy_chunk, remap_tables, row_transformer

    org = seeded["theta"]
    mid = mover.preflight(ctx, org.id, "legacy", "cell-1", "durability-test")
    mover.make_plan(ctx, mid)
    mover.prepare_target(ctx, mid)
    plan = mover.load_plan(ctx, mid)
    tp = plan.tables["lfs_objects_projects"]
    assert tp.needs_transform
    src_cell, dst_cell = devenv.resolve_cell("legacy"), devenv.resolve_cell("cell-1")
    with src_cell.connect() as src, dst_cell.connect() as dst:
        transform = row_transformer(tp, tp.columns, remap_tables(src, dst, plan, tp), src_cell.key, dst_cell.key)
        ids = [r[0] for r in src.execute(f"SELECT t.id FROM lfs_objects_projects t WHERE {tp.where}")]
        n = copy_chunk(src, dst, plan, tp, "id", None, None, transform, Progress("t"), fresh=True)
        with psycopg.connect(dst_cell.dsn) as other:  # another session sees the rows now
            seen = other.execute("SELECT count(*) FROM lfs_objects_projects WHERE id = ANY(%s)", (ids,)).fetchone()[0]
    assert n == org.rows["lfs_objects_projects"] == seen
    mover.rollback(ctx, mid)


def test_storage_without_a_match_needs_a_mapping(devenv, seeded, ctx):
    from orgmover.errors import PreflightError

    org = seeded["nu"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    with psycopg.connect(src_dsn) as c:  # one repository of the org lives on a storage cell-1 does not have
        shard = c.execute("INSERT INTO shards (name) VALUES ('nfs-legacy-01') RETURNING id").fetchone()[0]
        repo, disk, old = c.execute(
            "UPDATE project_repositories r SET shard_id = %s FROM shards s WHERE s.id = (SELECT shard_id FROM project_repositories "
            "WHERE id = r.id) AND r.id = (SELECT min(r2.id) FROM project_repositories r2 JOIN projects p ON p.id = r2.project_id "
            "WHERE p.organization_id = %s AND p.pool_repository_id IS NULL) RETURNING r.project_id, r.disk_path, s.name",
            (shard, org.id)).fetchone()
    new_root = devenv.add_git_storage("legacy", "nfs-legacy-01")  # and the repository really moves there
    old_path = devenv.resolve_cell("legacy").storage.storage(old).repo(disk)
    (new_root / disk).parent.mkdir(parents=True, exist_ok=True)
    old_path.rename(new_root / f"{disk}.git")
    with pytest.raises(PreflightError, match="shards: name = nfs-legacy-01 is used by the organization on the source but "
                                             "has no match on the target cell; add it to the target or configure a mapping"):
        mover.preflight(ctx, org.id, "legacy", "cell-1", "mapping-test")
    assert ctx.tracking.latest_for_org(org.id) is None

    mid = run_move(ctx, org.id, "legacy", "cell-1", value_maps={"shards": {"nfs-legacy-01": "storage-2"}})
    assert ctx.tracking.get(mid)["validation"]["ok"] is True
    with psycopg.connect(dst_dsn) as c:
        name = c.execute("SELECT s.name FROM project_repositories r JOIN shards s ON s.id = r.shard_id "
                         "WHERE r.project_id = %s", (repo,)).fetchone()[0]
    assert name == "storage-2"
    assert devenv.topology().route(org.id)["cell"] == "cell-1"


def test_moving_back_after_the_switch_replaces_the_copy_left_on_the_source(devenv, seeded, ctx, monkeypatch):
    """After the switch, writes go to the target. Moving the org back is a move in the other direction:
    preflight accepts the copy the first move left on the old source (only rows that are the org's),
    the copy is replaced by the rows as they are now, with the same short write window; the first
    move's cleanup then has nothing left to delete."""
    from orgmover.errors import PreflightError, StateError

    monkeypatch.setenv("ORGMOVER_FULL_VALIDATION", "1")  # every chunk of every table compared in the window
    org = seeded["tau"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    fwd = run_move(ctx, org.id, "legacy", "cell-1")
    with pytest.raises(StateError, match="Move it back with a move in the other direction"):
        mover.rollback(ctx, fwd)
    with psycopg.connect(dst_dsn) as c:  # the org lives on cell-1 now
        edited = c.execute("UPDATE issues SET title = 'edited after the switch' WHERE id = (SELECT min(i.id) FROM issues i "
                           "JOIN namespaces n ON n.id = i.namespace_id WHERE n.organization_id = %s) RETURNING id",
                           (org.id,)).fetchone()[0]
        added = c.execute("INSERT INTO events (project_id, author_id, action, target_type) SELECT e.project_id, e.author_id, "
                          "5, 'After' FROM events e JOIN projects p ON p.id = e.project_id WHERE p.organization_id = %s "
                          "ORDER BY e.id LIMIT 1 RETURNING id", (org.id,)).fetchone()[0]
        removed = c.execute("DELETE FROM label_links WHERE id = (SELECT min(l.id) FROM label_links l JOIN labels b ON "
                            "b.id = l.label_id JOIN projects p ON p.id = b.project_id WHERE p.organization_id = %s) "
                            "RETURNING id", (org.id,)).fetchone()[0]
    # a row of another organization on the old source with the key of one of the org's rows: a real collision
    with psycopg.connect(src_dsn) as c:
        c.execute("INSERT INTO events (id, project_id, author_id, action, target_type) SELECT %s, e.project_id, "
                  "e.author_id, 1, 'Squatter' FROM events e JOIN projects p ON p.id = e.project_id "
                  "WHERE p.organization_id <> %s ORDER BY e.id LIMIT 1", (added, org.id))
    with pytest.raises(PreflightError, match=rf"1 rows of organization {org.id} in events already exist on legacy "
                                             rf"\(keys \({added}\)\) and are not the organization's"):
        mover.preflight(ctx, org.id, "cell-1", "legacy")
    assert ctx.tracking.latest_for_org(org.id)["id"] == fwd  # refused: no migration was created
    with psycopg.connect(src_dsn) as c:
        c.execute("DELETE FROM events WHERE id = %s AND target_type = 'Squatter'", (added,))
    legacy_before = _snap(devenv, "legacy").tables

    # the left copy is removed only while the org is still routed to the cell it moves back from
    back = mover.preflight(ctx, org.id, "cell-1", "legacy")
    mover.make_plan(ctx, back)
    topo = devenv.topology()
    r = topo.route(org.id)
    moved = topo.update_route(org.id, r["version"], cell="legacy")
    with pytest.raises(StateError, match="nothing was deleted"):
        mover.prepare_target(ctx, back)
    assert _snap(devenv, "legacy").tables == legacy_before
    topo.update_route(org.id, moved["version"], cell="cell-1")

    assert run_move(ctx, org.id, "cell-1", "legacy") == back  # the same migration, resumed
    m = ctx.tracking.get(back)
    assert m["state"] == "completed" and m["options"]["moves_back"] == fwd and m["options"]["left_copy_removed"] > 0
    assert devenv.topology().route(org.id)["cell"] == "legacy"
    legacy_after = _snap(devenv, "legacy").tables
    # on the old source, exactly the writes made on cell-1 after the switch differ; every other row, the
    # org's (rewritten from cell-1) and other organizations' (untouched), is as it was
    diff = {}
    for table in set(legacy_before) | set(legacy_after):
        b, a = legacy_before.get(table, {}), legacy_after.get(table, {})
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if changed:
            diff[table] = changed
    assert diff == {"issues": [f"[{edited}]"], "events": [f"[{added}]"], "label_links": [f"[{removed}]"]}
    assert legacy_after["issues"][f"[{edited}]"]["title"] == "edited after the switch"
    assert f"[{removed}]" not in legacy_after["label_links"]
    # the first move's copy was replaced: its cleanup has nothing to delete, and moving back is not offered twice
    assert ctx.tracking.get(fwd)["source_cleaned_at"] is not None
    assert mover.cleanup_source(ctx, fwd, retention_seconds=0) == {}
    assert ctx.tracking.move_left_behind(org.id, "legacy", "cell-1") is None
