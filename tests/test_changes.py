"""Change capture (orgmover.changes) against a real PostgreSQL 18 with wal_level=logical: the keys of
rows written after the slot opened, for awkward tables and values; and the write window of a real
move with the slot and, when the slot is gone, with the fallback scan."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from orgmover import changes, mover
from orgmover.errors import StateError, ValidationFailed
from orgmover.cli import run_move
from verify import check_move, snapshot


@pytest.fixture()
def scratch(devenv):
    """A database of its own on the legacy cluster, with a capture slot; dropped afterwards."""
    legacy = devenv.load()["cells"][0]
    cluster = devenv.cluster("legacy", legacy["port"])
    name = "capture_test"
    cluster.create_database(name)
    dsn = cluster.uri(name)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""
            CREATE TABLE "Odd Table" (id bigint PRIMARY KEY, "Title" text, tags text[], at timestamptz, big text);
            CREATE TABLE pairs (a integer, b text, v text, PRIMARY KEY (a, b));
            CREATE TABLE builds (id bigint, partition_id integer, name text, PRIMARY KEY (id, partition_id))
              PARTITION BY LIST (partition_id);
            CREATE TABLE builds_100 PARTITION OF builds FOR VALUES IN (100);
            CREATE TABLE builds_101 PARTITION OF builds FOR VALUES IN (101);
            CREATE TABLE keyless (u integer NOT NULL UNIQUE, v text);
            CREATE TABLE wiped (id bigint PRIMARY KEY);
            CREATE TABLE other (id bigint PRIMARY KEY);
            INSERT INTO "Odd Table" VALUES (1, 'before', '{a}', now(), repeat('x', 100000));
            INSERT INTO keyless VALUES (1, 'a'), (2, 'b');
            INSERT INTO wiped VALUES (1);
            INSERT INTO pairs VALUES (7, 'it''s', 'v');
        """)
        slot = "orgmover_capture_test"
        changes.create_slot(c, slot)
        yield c, slot
        changes.drop_slot(c, slot)
    with psycopg.connect(cluster.uri("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name}")


def test_keys_of_rows_written_after_the_slot(scratch):
    c, slot = scratch
    c.execute("""INSERT INTO "Odd Table" VALUES (2, 'it''s "quoted" : UPDATE: x', '{"a b",c}', now(), NULL)""")
    c.execute("""UPDATE "Odd Table" SET "Title" = 'after' WHERE id = 1""")  # big (toasted) column unchanged
    c.execute("""UPDATE "Odd Table" SET id = 3 WHERE id = 2""")  # a key update: both keys count
    c.execute("INSERT INTO pairs VALUES (8, 'with space', 'v'), (9, 'x''y', NULL)")
    c.execute("DELETE FROM pairs WHERE a = 7")
    c.execute("INSERT INTO builds VALUES (10, 100, 'a'), (11, 101, 'b')")
    c.execute("UPDATE builds SET name = 'c' WHERE id = 11")
    c.execute("UPDATE keyless SET v = 'changed' WHERE u = 1")
    c.execute("DELETE FROM keyless WHERE u = 2")  # no key data in a delete: the table needs the scan
    c.execute("TRUNCATE wiped")
    c.execute("INSERT INTO other VALUES (1)")  # not asked for
    c.execute("BEGIN; INSERT INTO pairs VALUES (99, 'rolled back', NULL); ROLLBACK")
    tables = {"Odd Table": ["id"], "pairs": ["a", "b"], "builds": ["id", "partition_id"], "keyless": ["u"], "wiped": ["id"]}
    got = changes.read_changes(c, slot, tables)
    assert got.of("Odd Table") == {("1",), ("2",), ("3",)}
    assert got.of("pairs") == {("7", "it's"), ("8", "with space"), ("9", "x'y")}
    assert got.of("builds") == {("10", "100"), ("11", "101")}  # partitions count for their parent
    assert got.of("keyless") == {("1",)}
    assert set(got.rescan) == {"keyless", "wiped"}
    assert "DELETE" in got.rescan["keyless"] and "truncated" in got.rescan["wiped"]
    assert "other" not in got.keys
    # reading does not consume: a retried window task sees the same keys
    assert changes.read_changes(c, slot, tables).keys == got.keys


def test_a_partition_created_while_the_read_waits_for_writers_counts_for_its_table(scratch):
    """A read learns the schema's partitions with the slot's status, in one statement. A partition
    created after that statement and written before the point the read goes up to (here: while the
    read waits for a writer, as in the window) is looked up after the stream, not missed."""
    c, slot = scratch
    tables = {"builds": ["id", "partition_id"], "pairs": ["a", "b"]}
    got: dict = {}
    with psycopg.connect(c.info.dsn, autocommit=True) as writer, psycopg.connect(c.info.dsn, autocommit=True) as reader:
        writer.execute("BEGIN")
        writer.execute("INSERT INTO pairs VALUES (50, 'in flight', NULL)")  # holds a transaction id: the read waits for it
        thread = threading.Thread(target=lambda: got.update(read=changes.read_changes(reader, slot, tables, writers_timeout=30,
                                                                                      ignore=["other"])))
        thread.start()
        deadline = time.monotonic() + 30
        # its first statement (the slot, the partitions, the writers) is done: it polls for the writer's end
        while not c.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s AND query LIKE "
                            "'SELECT NOT EXISTS (SELECT FROM pg_snapshot_xip%%')", (reader.info.backend_pid,)).fetchone()[0]:
            assert time.monotonic() < deadline and thread.is_alive(), "the read did not wait for the writer"
            time.sleep(0.01)
        c.execute("CREATE TABLE builds_102 PARTITION OF builds FOR VALUES IN (102)")
        c.execute("INSERT INTO builds VALUES (12, 102, 'new partition')")
        c.execute("INSERT INTO other VALUES (5)")  # ignored
        writer.execute("COMMIT")
        thread.join(30)
    assert got["read"].of("builds") == {("12", "102")}
    assert got["read"].of("pairs") == {("50", "in flight")}
    assert got["read"].waited > 0 and "other" not in got["read"].keys


def test_missing_slot_is_reported_not_ignored(scratch):
    c, _ = scratch
    with pytest.raises(changes.CaptureUnavailable, match="does not exist"):
        changes.read_changes(c, "orgmover_no_such_slot", {"pairs": ["a", "b"]})


def _slots(dsn):
    with psycopg.connect(dsn) as c:
        return {r[0] for r in c.execute("SELECT slot_name FROM pg_replication_slots")}


def _change_org(dsn, org_id, other_org_id):
    """While the org is writable: edit a note, add an event, delete a label link, and move one event
    to another organization's project (it must leave the target; the other org's rows stay)."""
    with psycopg.connect(dsn) as c:
        proj = "SELECT id FROM projects WHERE organization_id = %s ORDER BY id LIMIT 1"
        c.execute(f"UPDATE notes SET note = 'edited in the copy phase ' || %s WHERE id = (SELECT min(id) FROM notes "
                  f"WHERE project_id IN ({proj}))", (str(org_id), org_id))
        c.execute(f"INSERT INTO events (project_id, author_id, action, target_type) SELECT project_id, author_id, 9, "
                  f"'Capture' FROM events WHERE project_id IN ({proj}) LIMIT 1", (org_id,))
        c.execute("DELETE FROM label_links WHERE id = (SELECT min(l.id) FROM label_links l JOIN labels b ON "
                  "b.id = l.label_id JOIN projects p ON p.id = b.project_id WHERE p.organization_id = %s)", (org_id,))
        moved = c.execute(f"UPDATE events SET project_id = ({proj}) WHERE id = (SELECT max(id) FROM events WHERE "
                          f"project_id IN ({proj}) AND target_type IS DISTINCT FROM 'Capture') RETURNING id",
                          (other_org_id, org_id)).fetchone()[0]
    return moved


@pytest.mark.parametrize("org_name, slot", [("xi", "kept"), ("omicron", "lost")])
def test_window_with_and_without_the_capture_slot(devenv, seeded, ctx, org_name, slot):
    org, other = seeded[org_name], seeded["iota"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    legacy_key = devenv.resolve_cell("legacy").db_key_base
    dst_before = snapshot(dst_dsn, devenv.resolve_cell("cell-1").db_key_base)
    seen = {}

    def before_window(mid):
        name = changes.slot_name(mid)
        assert name in _slots(src_dsn)  # opened before the pre-copy
        data, text = mover.summary(ctx, mid)  # what `orgmover show` prints: the slots and the WAL they keep
        assert {s["slot"] for s in data["capture_slots"]} == {name, name + "_target"}
        assert "change capture slots still open" in text and "of WAL retained" in text
        if slot == "lost":  # e.g. invalidated by max_slot_wal_keep_size, or dropped by a release
            with psycopg.connect(src_dsn, autocommit=True) as c:
                changes.drop_slot(c, name)
            assert mover.catch_up(ctx, mid) == {"passes": []}  # nothing to catch up from: the window scans
        seen["moved"] = _change_org(src_dsn, org.id, other.id)
        seen["src"] = snapshot(src_dsn, legacy_key)

    mid = run_move(ctx, org.id, "legacy", "cell-1", before_window=before_window)
    m = ctx.tracking.get(mid)
    assert m["state"] == "completed"
    assert changes.slot_name(mid) not in _slots(src_dsn)  # never left behind to hold the source's WAL
    details = {t["table_name"]: t["sync_detail"] for t in ctx.tracking.tables(mid) if t["sync_detail"]}
    modes = {d["mode"] for d in details.values()}
    assert modes == ({"captured"} if slot == "kept" else {"scan"})
    assert details["notes"]["changed"] == 1 and details["events"]["changed"] == 1
    if slot == "kept":
        assert details["events"]["absent_keys"] == [[str(seen["moved"])]]
        assert sum(1 for d in details.values() if d.get("keys")) == 3  # only the tables written to were read
    expected = dict(org.rows)
    expected["label_links"] -= 1
    after_src = snapshot(src_dsn, legacy_key)
    assert check_move(seen["src"], after_src, dst_before, snapshot(dst_dsn, devenv.resolve_cell("cell-1").db_key_base),
                      expected) == []
    with psycopg.connect(dst_dsn) as c:
        assert c.execute("SELECT count(*) FROM events WHERE id = %s", (seen["moved"],)).fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM notes WHERE note = %s", (f"edited in the copy phase {org.id}",)).fetchone()[0] == 1


def _confirmed(dsn, slot):
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                         (slot,)).fetchone()[0]


def test_catch_up_syncs_while_writable_and_the_window_has_only_what_came_after(devenv, seeded, ctx):
    """After the pre-copy and the baseline the org keeps being written. A catch-up, writes still
    allowed, syncs those rows, refreshes the baseline and confirms the slot past them (the next read
    starts there). A sync killed right after reading the slot (keys recorded, slot advanced, nothing
    written) loses nothing: the next sync takes the keys from tracking. The window then syncs and
    compares only what was written after the catch-up, and the move is exact."""
    org, other = seeded["upsilon"], seeded["iota"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    legacy_key, cell1_key = devenv.resolve_cell("legacy").db_key_base, devenv.resolve_cell("cell-1").db_key_base
    dst_before = snapshot(dst_dsn, cell1_key)
    mid = mover.preflight(ctx, org.id, "legacy", "cell-1", "catch-up")
    try:
        mover.copy_tables(ctx, mid, (mover.make_plan(ctx, mid), mover.prepare_target(ctx, mid))[0])
        mover.precopy_done(ctx, mid)
        moved = _change_org(src_dsn, org.id, other.id)
        opts = ctx.tracking.get(mid)["options"]
        slot, marks = opts["capture_slot"], opts["baseline_lsn"]
        confirmed = _confirmed(src_dsn, slot)

        res = mover.catch_up(ctx, mid)
        assert res["passes"][0]["rows"] == 2  # the edited note and the new event; the deletions applied
        assert not devenv.topology().route(org.id)["maintenance"]  # writes were never blocked
        with psycopg.connect(dst_dsn) as c:
            assert c.execute("SELECT count(*) FROM notes WHERE note = %s", (f"edited in the copy phase {org.id}",)).fetchone()[0] == 1
            assert c.execute("SELECT count(*) FROM events WHERE id = %s", (moved,)).fetchone()[0] == 0
        assert _confirmed(src_dsn, slot) > confirmed
        opts = ctx.tracking.get(mid)["options"]
        lsn = lambda s: int(s.split("/")[0], 16) << 32 | int(s.split("/")[1], 16)  # noqa: E731
        assert lsn(opts["baseline_lsn"]["src"]) >= lsn(opts["capture_synced_lsn"]) > lsn(marks["src"])
        assert lsn(opts["baseline_lsn"]["dst"]) > lsn(marks["dst"])  # the catch-up's own writes are in the baseline

        with psycopg.connect(src_dsn) as c:  # written after the catch-up
            edited = c.execute("UPDATE issues SET title = 'after the catch-up' WHERE id = (SELECT min(i.id) FROM issues i "
                               "JOIN namespaces n ON n.id = i.namespace_id WHERE n.organization_id = %s) RETURNING id",
                               (org.id,)).fetchone()[0]
        plan = mover.load_plan(ctx, mid)
        # a sync task that dies right after its read: the keys are recorded, the slot is past them
        mover._captured_changes(ctx, ctx.tracking.get(mid), ctx.cell("legacy"), plan)
        with psycopg.connect(src_dsn, autocommit=True) as c:
            assert changes.read_changes(c, slot, {"issues": ["id"]}).keys == {}

        mover.maintenance_on(ctx, mid)
        # a catch-up is for the copy phase: in the window it refuses before reading or writing anything
        before = snapshot(src_dsn, legacy_key), snapshot(dst_dsn, cell1_key), _confirmed(src_dsn, slot)
        with pytest.raises(StateError, match="in its write window: catching up is for the copy phase"):
            mover.catch_up(ctx, mid)
        assert (snapshot(src_dsn, legacy_key), snapshot(dst_dsn, cell1_key), _confirmed(src_dsn, slot)) == before
        mover.sync_all(ctx, mid)
        details = {t["table_name"]: t["sync_detail"] for t in ctx.tracking.tables(mid) if t["strategy"] == "org"}
        assert details["issues"]["keys"] == 1 and details["issues"]["changed"] == 1
        assert all(d.get("changed") == 0 for t, d in details.items() if t != "issues")  # the rest was caught up
        seen_src = snapshot(src_dsn, legacy_key)
        mover.validate_all(ctx, mid)
        validated = {t["table_name"]: t["validation_detail"] for t in ctx.tracking.tables(mid)}
        assert validated["issues"]["incremental"]["written_rows_compared"] == 1  # only what came after the refresh
        assert validated["notes"]["incremental"]["written_rows_compared"] == 0
        mover.go_no_go(ctx, mid)
        mover.switchover(ctx, mid)
    except Exception:
        mover.release(ctx, mid)
        raise
    with psycopg.connect(dst_dsn) as c:
        assert c.execute("SELECT title FROM issues WHERE id = %s", (edited,)).fetchone()[0] == "after the catch-up"
    expected = dict(org.rows)
    expected["label_links"] -= 1
    assert check_move(seen_src, snapshot(src_dsn, legacy_key), dst_before, snapshot(dst_dsn, cell1_key), expected) == []


def _first_issue(dsn: str, org_id: int) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT min(i.id) FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                         "WHERE n.organization_id = %s", (org_id,)).fetchone()[0]


def _last_issue(dsn: str, org_id: int) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT max(i.id) FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                         "WHERE n.organization_id = %s", (org_id,)).fetchone()[0]


def _caught_up(ctx, org, run_id: str) -> int:
    """A migration of ``org`` from legacy to cell-1, pre-copied and caught up (released if that fails)."""
    mid = mover.preflight(ctx, org.id, "legacy", "cell-1", run_id)
    try:
        mover.copy_tables(ctx, mid, (mover.make_plan(ctx, mid), mover.prepare_target(ctx, mid))[0])
        mover.precopy_done(ctx, mid)
        mover.catch_up(ctx, mid)
    except Exception:
        mover.release(ctx, mid)
        raise
    return mid


def test_the_write_window_in_one_call_from_the_route_the_catch_up_saw(devenv, seeded, ctx):
    """The window is one call (one DAG task): maintenance on, sync, validate, go/no-go; here without the
    switch (a person approves first), so the org stays blocked on the source, validated. Maintenance
    goes on by a compare-and-set against the route version the catch-up saw; a route changed since
    (another owner's maintenance) is read again and refused, changing nothing; so is a window whose
    target cell cannot be reached (before writes are blocked). Rows written after the catch-up task are
    synced by the window's last catch-up pass, while the org is still writable; when that pass takes
    longer than ``max_lag_seconds`` the window is refused with nothing blocked. Then the window has
    nothing left to sync or compare row by row."""
    import dataclasses
    from pathlib import Path

    from orgmover.errors import ConfigError
    from orgmover.localpg import free_port

    org = seeded["aleph"]
    topo = devenv.topology()
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    keys = devenv.resolve_cell("legacy").db_key_base, devenv.resolve_cell("cell-1").db_key_base
    mid = _caught_up(ctx, org, "one-window")
    try:
        seen = ctx.tracking.get(mid)["options"]["open_route_version"]
        assert seen == topo.route(org.id)["version"]
        cells_before = snapshot(src_dsn, keys[0]), snapshot(dst_dsn, keys[1])

        unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/gitlab"
        cut_off = dataclasses.replace(ctx, resolve_cell=lambda name: dataclasses.replace(
            devenv.resolve_cell(name), dsn=unreachable) if name == "cell-1" else devenv.resolve_cell(name))
        with pytest.raises(ConfigError, match="cell cell-1: PostgreSQL is not reachable"):
            mover.write_window(cut_off, mid)
        route = topo.route(org.id)
        assert route["version"] == seen and not route["maintenance"] and ctx.tracking.get(mid)["state"] == "copied"

        held = topo.update_route(org.id, seen, maintenance=True, maintenance_owner="someone-else", reason="test")
        with pytest.raises(StateError, match="in maintenance held by someone-else"):
            mover.write_window(ctx, mid)
        assert topo.route(org.id) == held and ctx.tracking.get(mid)["state"] == "copied"
        assert (snapshot(src_dsn, keys[0]), snapshot(dst_dsn, keys[1])) == cells_before
        released = topo.update_route(org.id, held["version"], maintenance=False, reason="test done")
        first, last = _first_issue(src_dsn, org.id), _last_issue(src_dsn, org.id)
        with psycopg.connect(src_dsn) as c:  # written after the catch-up
            c.execute("UPDATE issues SET title = 'after the catch-up' WHERE id = %s", (first,))
        # the window's last catch-up pass, while the org is writable: when it takes longer than allowed,
        # the window is refused before anything is blocked (writes outpace the catch-up)
        ctx.tracking.merge_options(mid, max_lag_seconds=0)
        with pytest.raises(StateError, match=r"writes outpace the catch-up: its last pass synced \d+ rows .* Nothing was blocked"):
            mover.write_window(ctx, mid)
        route = topo.route(org.id)
        assert route["version"] == released["version"] and not route["maintenance"]
        assert ctx.tracking.get(mid)["state"] == "copied"
        ctx.tracking.merge_options(mid, max_lag_seconds=30)
        with psycopg.connect(src_dsn) as c:
            c.execute("UPDATE issues SET title = 'after the refused window' WHERE id = %s", (last,))

        out = mover.write_window(ctx, mid, switch=False)
        assert out["switched"] is False and "RESULT: PASSED" in Path(out["report"]).read_text()
        assert {"maintenance_on", "sync", "validate", "go_no_go", "total", "caught_up_before"} <= set(out["seconds"])
        route = topo.route(org.id)
        assert route["cell"] == "legacy" and route["maintenance"] and route["maintenance_owner"] == ctx.owner(mid)
        assert ctx.tracking.get(mid)["state"] == "validated"
        # both rows were synced before writes were blocked: the window had nothing left to sync or compare
        assert out["last_pass"][0]["rows"] == 1 and out["rows_synced_in_window"] == 0
        details = {t["table_name"]: t["sync_detail"] for t in ctx.tracking.tables(mid) if t["strategy"] == "org"}
        assert all(d["changed"] == 0 for d in details.values())
        assert ctx.tracking.table(mid, "issues")["validation_detail"]["incremental"]["written_rows_compared"] == 0
        mover.switchover(ctx, mid)
    except Exception:
        mover.release(ctx, mid)
        raise
    route = topo.route(org.id)
    assert route["cell"] == "cell-1" and not route["maintenance"]
    with psycopg.connect(dst_dsn) as c:
        assert c.execute("SELECT title FROM issues WHERE id = ANY(%s) ORDER BY id", ([first, last],)).fetchall() == \
            [("after the catch-up",), ("after the refused window",)]
    # the window's task retried after it switched (its answer lost): done, nothing changes
    assert mover.write_window(ctx, mid)["switched"] is True and topo.route(org.id) == route


def test_the_window_waits_for_transactions_writing_when_maintenance_went_on(devenv, seeded, ctx):
    """A request that began writing before the org's writes were blocked commits after maintenance is
    on. The window's sync waits for it before it reads the change stream: read before it commits,
    its row would be missed, and lost with the switch."""
    import threading

    org = seeded["gimel"]
    topo = devenv.topology()
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    issue = _first_issue(src_dsn, org.id)
    mid = _caught_up(ctx, org, "in-flight")
    failed: list[BaseException] = []

    def window():
        try:
            mover.write_window(ctx, mid)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            failed.append(e)

    try:
        with psycopg.connect(src_dsn) as writer:  # a transaction, writing before maintenance goes on
            writer.execute("UPDATE issues SET title = 'committed in the window' WHERE id = %s", (issue,))
            running = threading.Thread(target=window)
            running.start()
            deadline = time.monotonic() + 30
            while not topo.route(org.id)["maintenance"] and time.monotonic() < deadline and running.is_alive():
                time.sleep(0.05)
            time.sleep(0.5)
            assert running.is_alive() and not failed, failed  # waiting for the writer, nothing switched
            route = topo.route(org.id)
            assert route["cell"] == "legacy" and route["maintenance"]
            writer.commit()
        running.join(60)
        assert not running.is_alive() and not failed, failed
    except Exception:
        mover.release(ctx, mid)
        raise
    assert topo.route(org.id)["cell"] == "cell-1"
    with psycopg.connect(dst_dsn) as c:
        assert c.execute("SELECT title FROM issues WHERE id = %s", (issue,)).fetchone()[0] == "committed in the window"
    events = [e["message"] for e in ctx.tracking.events(mid)]
    assert ctx.tracking.get(mid)["state"] == "completed", events


def test_a_writer_still_running_after_the_timeout_fails_the_window_and_a_retry_syncs_it(devenv, seeded, ctx):
    """A transaction still writing after the wait fails the window with its pid and statement; nothing
    is synced, and the window lifts maintenance before it raises (the org writable on the source). Once
    the writer has committed, the retried window syncs its row and switches."""
    org = seeded["dalet"]
    topo = devenv.topology()
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    key = devenv.resolve_cell("cell-1").db_key_base
    issue = _first_issue(src_dsn, org.id)
    mid = _caught_up(ctx, org, "long-writer")
    ctx.tracking.merge_options(mid, writers_timeout=1)
    try:
        before = snapshot(dst_dsn, key)
        with psycopg.connect(src_dsn) as writer:
            writer.execute("UPDATE issues SET title = 'a long transaction' WHERE id = %s", (issue,))
            with pytest.raises(changes.WritersStillRunning,
                               match=rf"still running after 1s: transaction \d+ \(pid {writer.info.backend_pid}, idle in "
                                     rf"transaction in database gitlab\w* since .*: UPDATE issues SET title"):
                mover.write_window(ctx, mid)
            route = topo.route(org.id)
            # the window lifted maintenance before it raised: the org writable on the source, the migration failed
            assert route["cell"] == "legacy" and not route["maintenance"] and route["maintenance_owner"] is None
            assert ctx.tracking.get(mid)["state"] == "failed" and "still running" in ctx.tracking.get(mid)["error"]
            assert snapshot(dst_dsn, key) == before
            writer.commit()
        out = mover.write_window(ctx, mid)
    except Exception:
        mover.release(ctx, mid)
        raise
    assert out["switched"] and topo.route(org.id)["cell"] == "cell-1"
    with psycopg.connect(dst_dsn) as c:
        assert c.execute("SELECT title FROM issues WHERE id = %s", (issue,)).fetchone()[0] == "a long transaction"


def test_a_chunk_that_differs_in_the_baseline_is_compared_by_the_keys_that_differ(devenv, seeded, ctx):
    """A baseline taken while the org writes has chunks that differ (rows written after their last sync).
    The keys of the rows that differ are recorded with it, so the window compares those rows by key
    instead of checksumming the chunk again; the rows of the chunk written after the baseline are in
    the change stream and compared too (here one changed on the target behind the mover's back, which
    the window reports with its key)."""
    org = seeded["he"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    first, last = _first_issue(src_dsn, org.id), _last_issue(src_dsn, org.id)
    mid = _caught_up(ctx, org, "settled")
    seen = {}

    def written_after_the_last_pass():
        with psycopg.connect(src_dsn) as c:  # not synced yet when the baseline is refreshed: its chunk differs
            c.execute("UPDATE issues SET title = 'differs in the baseline' WHERE id = %s", (first,))
        seen["refresh"] = mover.refresh_baseline(ctx, mid)
        seen["settled"] = ctx.tracking.table(mid, "issues")["baseline"]["settled"]
        with psycopg.connect(dst_dsn) as c:  # after the baseline, behind the mover's back
            c.execute("UPDATE issues SET title = 'changed on the target' WHERE id = %s", (last,))

    try:
        with pytest.raises(ValidationFailed):
            mover.write_window(ctx, mid, before_block=written_after_the_last_pass)
        assert seen["refresh"]["rows_differ"] == 1 and seen["refresh"]["differ"] == 0
        assert [[str(first)]] in seen["settled"].values()
        detail = ctx.tracking.table(mid, "issues")["validation_detail"]
        # no chunk checksummed again: the row that differed in the baseline and the one written on the
        # target since were compared by key; the first matches (synced in the window), the other not
        assert detail["incremental"]["rechecked_chunks"] == 0 and detail["incremental"]["rows_differing_in_baseline"] == 1
        assert detail["incremental"]["written_rows_compared"] == 2
        assert detail["written"]["matching"] == 1 and detail["written"]["mismatched"] == 1
        assert detail["written"]["samples"]["mismatched"] == [f"({last})"]
        route = devenv.topology().route(org.id)  # not switched, and maintenance lifted by the window itself
        assert route["cell"] == "legacy" and not route["maintenance"]
        # the lookup of the keys that differ, as the baseline does it: more than its limit gives none
        from orgmover.validation import differing_keys

        issues = mover.load_plan(ctx, mid).tables["issues"]
        with psycopg.connect(src_dsn, autocommit=True) as s, psycopg.connect(dst_dsn, autocommit=True) as d:
            assert differing_keys(s, d, issues, "true", limit=1) == [(str(last),)]
            assert differing_keys(s, d, issues, "true", limit=0) is None
    finally:
        mover.release(ctx, mid)
    mover.rollback(ctx, mid)


def test_no_sync_or_switch_while_writes_are_not_blocked(devenv, seeded, ctx, tmp_root):
    """The window's steps check that the org's writes are blocked for this migration: a sync run with
    the org writable is refused before it writes anything. A context that blocked the writes itself
    does not ask the Topology Service again in the same window, but the switch does: if maintenance
    was lifted behind the mover's back meanwhile (writes may have happened), it refuses and the route
    stays on the source."""
    org = seeded["beth"]
    topo = devenv.topology()
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    keys = devenv.resolve_cell("legacy").db_key_base, devenv.resolve_cell("cell-1").db_key_base
    mid = _caught_up(ctx, org, "not-blocked")
    try:
        with psycopg.connect(src_dsn) as c:
            c.execute("UPDATE issues SET title = 'written while writable' WHERE id = %s", (_first_issue(src_dsn, org.id),))
        before = snapshot(dst_dsn, keys[1])
        with pytest.raises(StateError, match=f"not in maintenance for migration #{mid}"):
            mover.sync_all(ctx, mid)
        assert snapshot(dst_dsn, keys[1]) == before

        mover.maintenance_on(ctx, mid)
        route = topo.route(org.id)
        topo.update_route(org.id, route["version"], maintenance=False, reason="lifted by hand")
        another_task = devenv.context(reports_dir=tmp_root / "reports", log=lambda *_: None)
        with pytest.raises(StateError, match=f"not in maintenance for migration #{mid}"):
            mover.sync_all(another_task, mid)
        assert snapshot(dst_dsn, keys[1]) == before

        mover.sync_all(ctx, mid)
        mover.validate_all(ctx, mid)
        mover.go_no_go(ctx, mid)
        with pytest.raises(StateError, match="changed under the migration"):
            mover.switchover(ctx, mid)
    finally:
        mover.release(ctx, mid)
    route = topo.route(org.id)
    assert route["cell"] == "legacy" and not route["maintenance"]
    mover.rollback(ctx, mid)


def test_a_target_row_changed_before_the_catch_up_is_still_found_in_the_window(devenv, seeded, ctx):
    """The catch-up moves the baseline forward; a row changed on the target behind the mover's back
    before it is in the target's slot, so its chunk is checksummed again (and differs, the row's key
    recorded) rather than being taken into the new baseline as equal: the window finds it, with its key."""
    org = seeded["chi"]
    dst_dsn = devenv.resolve_cell("cell-1").dsn
    mid = mover.preflight(ctx, org.id, "legacy", "cell-1", "catch-up-rot")
    try:
        mover.copy_tables(ctx, mid, (mover.make_plan(ctx, mid), mover.prepare_target(ctx, mid))[0])
        mover.precopy_done(ctx, mid)
        with psycopg.connect(dst_dsn) as c:
            bad = c.execute("UPDATE merge_requests SET title = 'bit rot' WHERE id = (SELECT min(m.id) FROM merge_requests m "
                            "JOIN projects p ON p.id = m.target_project_id WHERE p.organization_id = %s) RETURNING id",
                            (org.id,)).fetchone()[0]
        assert mover.catch_up(ctx, mid)["passes"][0]["chunks_rechecked"] >= 1
        base = ctx.tracking.table(mid, "merge_requests")["baseline"]
        assert base["src"] != base["dst"]  # the new baseline knows that chunk differs, and which row
        assert list(base["settled"].values()) == [[[str(bad)]]]
        mover.maintenance_on(ctx, mid)
        mover.sync_all(ctx, mid)
        with pytest.raises(ValidationFailed, match="1 tables differ between cells: merge_requests"):
            mover.validate_all(ctx, mid)
            mover.go_no_go(ctx, mid)
        diff = ctx.tracking.table(mid, "merge_requests")["validation_detail"]["written"]  # compared by key
        assert diff["mismatched"] == 1 and diff["samples"]["mismatched"] == [f"({bad})"]
    finally:
        mover.release(ctx, mid)
    assert devenv.topology().route(org.id)["cell"] == "legacy"
    mover.rollback(ctx, mid)


def test_window_validation_uses_the_baseline_and_still_catches_any_write(devenv, seeded, ctx):
    """After the pre-copy both cells' chunks are checksummed (the baseline) and a slot opens on the
    target too. In the window only rows written since, on either cell, are compared (row by row):
    a row changed on the target behind the mover's back is found, with its key."""
    org = seeded["pi"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    seen = {}

    def before_window(mid):
        assert changes.slot_name(mid) + "_target" in _slots(dst_dsn)
        base = {t["table_name"]: t["baseline"] for t in ctx.tracking.tables(mid) if t["strategy"] == "org"}
        assert base["issues"]["src"] == base["issues"]["dst"]
        with psycopg.connect(dst_dsn) as c:
            seen["bad"] = c.execute("UPDATE merge_requests SET title = 'bit rot' WHERE id = (SELECT min(m.id) FROM "
                                    "merge_requests m JOIN projects p ON p.id = m.target_project_id WHERE "
                                    "p.organization_id = %s) RETURNING id", (org.id,)).fetchone()[0]
        with psycopg.connect(src_dsn) as c:
            c.execute("UPDATE issues SET title = title || ' (edited)' WHERE id = (SELECT min(i.id) FROM issues i "
                      "JOIN namespaces n ON n.id = i.namespace_id WHERE n.organization_id = %s)", (org.id,))

    with pytest.raises(ValidationFailed, match="1 tables differ between cells: merge_requests"):
        run_move(ctx, org.id, "legacy", "cell-1", before_window=before_window)
    m = ctx.tracking.latest_for_org(org.id)
    detail = {t["table_name"]: t["validation_detail"] for t in ctx.tracking.tables(m["id"])}
    assert detail["merge_requests"]["incremental"]["written_rows_compared"] == 1
    assert detail["merge_requests"]["written"]["mismatched"] == 1
    assert detail["merge_requests"]["written"]["samples"]["mismatched"] == [f"({seen['bad']})"]
    assert detail["issues"]["incremental"]["written_rows_compared"] == 1 and detail["issues"]["ok"]
    assert detail["notes"]["incremental"]["written_rows_compared"] == 0 and detail["notes"]["ok"]
    report = (ctx.reports_dir / f"migration-{m['id']}-validation.txt").read_text()
    assert f"merge_requests: rows written since the baseline: mismatched 1 (keys ({seen['bad']}))" in report
    assert devenv.topology().route(org.id)["cell"] == "legacy"
    # released: both slots dropped; a rollback cleans the target
    assert changes.slot_name(m["id"]) not in _slots(src_dsn)
    assert changes.slot_name(m["id"]) + "_target" not in _slots(dst_dsn)
    mover.rollback(ctx, m["id"])


def _transfer_project(c, project_id: int, to_org: int) -> int:
    """A project moved to a group of another organization, the way a transfer does it: its row and its
    project namespace change, and what pointed outside the project is unlinked (milestones of its old
    group, deploy keys of the old organization); the rest of its issues, their notes, labels,
    pipelines... are not written."""
    for table in ("issues", "merge_requests"):
        c.execute(f"UPDATE {table} SET milestone_id = NULL WHERE {'project_id' if table == 'issues' else 'target_project_id'} = %s "
                  "AND milestone_id IN (SELECT id FROM milestones WHERE group_id IS NOT NULL)", (project_id,))
    c.execute("DELETE FROM deploy_keys_projects WHERE project_id = %s", (project_id,))
    group = c.execute("SELECT min(id) FROM namespaces WHERE organization_id = %s AND type = 'Group'", (to_org,)).fetchone()[0]
    pns = c.execute("UPDATE projects SET namespace_id = %s, organization_id = %s WHERE id = %s RETURNING project_namespace_id",
                    (group, to_org, project_id)).fetchone()[0]
    c.execute("UPDATE namespaces SET organization_id = %s, parent_id = %s WHERE id = %s", (to_org, group, pns))
    return pns


def _rows_of_project(c, project_id: int, pns: int) -> dict[str, list]:
    """The project's row and some of the rows that belong to the org only through it (never written by
    the transfer), as whole rows in key order."""
    out = {}
    for table, where in (("projects", "id = %(p)s"), ("namespaces", "id = %(n)s"), ("issues", "namespace_id = %(n)s"),
                         ("notes", "noteable_type = 'Issue' AND noteable_id IN (SELECT id FROM issues WHERE namespace_id = %(n)s)"),
                         ("labels", "project_id = %(p)s"),
                         ("label_links", "label_id IN (SELECT id FROM labels WHERE project_id = %(p)s)"),
                         ("merge_requests", "target_project_id = %(p)s"), ("p_ci_builds", "project_id = %(p)s")):
        # secrets are re-encrypted for the target cell and pools are cell-local: compared elsewhere, by meaning
        out[table] = [r[0] for r in c.execute(f"SELECT (to_jsonb(t) - 'runners_token_encrypted' - 'pool_repository_id')::text "
                                              f"FROM {table} t WHERE {where} ORDER BY 1",
                                              {"p": project_id, "n": pns})]
    return out


@pytest.mark.parametrize("org_name, slot", [("rho", "kept"), ("psi", "lost")])
def test_rows_follow_a_parent_that_joins_or_leaves_the_org_in_the_copy_phase(devenv, seeded, ctx, monkeypatch, org_name, slot):
    """While the org is writable, one project is transferred into it from another organization and one
    out of it. Only the projects and their project namespaces are written; everything under them
    (issues, their notes, labels, label links, merge requests, pipelines' builds) changes organization
    with them. The window copies what joined and deletes what left; the validation, checking every
    chunk of every table here, finds both cells equal. With the capture slot (joined rows followed
    from their parents' keys) and without it (the fallback scan: found where the org's row counts per
    chunk differ between the cells)."""
    monkeypatch.setenv("ORGMOVER_FULL_VALIDATION", "1")
    org, other = seeded[org_name], seeded["sigma"]
    src_dsn, dst_dsn = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    seen = {}
    busiest = ("SELECT p.id FROM projects p JOIN issues i ON i.project_id = p.id WHERE p.organization_id = %s "
               "GROUP BY p.id ORDER BY count(*) DESC, p.id LIMIT 1")

    def before_window(mid):
        with psycopg.connect(src_dsn) as c:
            joining = c.execute(busiest, (other.id,)).fetchone()[0]
            leaving = c.execute(busiest, (org.id,)).fetchone()[0]
            seen["joining"] = (joining, _transfer_project(c, joining, org.id))
            seen["leaving"] = (leaving, _transfer_project(c, leaving, other.id))
        if slot == "lost":
            with psycopg.connect(src_dsn, autocommit=True) as c:
                changes.drop_slot(c, changes.slot_name(mid))
        with psycopg.connect(dst_dsn) as c:  # the leaving project was pre-copied, the joining one was not
            assert _rows_of_project(c, *seen["leaving"])["issues"]
            assert not _rows_of_project(c, *seen["joining"])["projects"]

    mid = run_move(ctx, org.id, "legacy", "cell-1", before_window=before_window)
    assert ctx.tracking.get(mid)["state"] == "completed"
    with psycopg.connect(src_dsn) as s, psycopg.connect(dst_dsn) as d:
        joined_src, joined_dst = _rows_of_project(s, *seen["joining"]), _rows_of_project(d, *seen["joining"])
        assert joined_src["issues"] and joined_src["notes"] and joined_src["label_links"]
        assert joined_dst == joined_src  # everything under the joining project came along, as it is on the source
        left = _rows_of_project(d, *seen["leaving"])
        assert all(rows == [] for rows in left.values()), {t: len(r) for t, r in left.items()}
    detail = {t["table_name"]: t["sync_detail"] for t in ctx.tracking.tables(mid) if t["sync_detail"]}
    # the issues not unlinked from a group milestone were not written: they followed their project namespace
    assert 0 < detail["issues"]["joined_with_parent"] <= len(joined_src["issues"])
    written = detail["issues"]["keys"] if slot == "kept" else detail["issues"]["changed"]
    assert detail["issues"]["joined_with_parent"] + written >= len(joined_src["issues"])
    assert {d["mode"] for d in detail.values()} == ({"captured"} if slot == "kept" else {"scan"})
    assert all(t["validation_detail"].get("incremental") is None for t in ctx.tracking.tables(mid)
               if t["validation_detail"])  # checked in full: every chunk, not only the rows written
