"""Bad input gets a clear error and changes nothing (real cells, real Topology Service)."""

from __future__ import annotations

import psycopg
import pytest

from orgmover import mover
from orgmover.errors import PreflightError
from verify import snapshot


@pytest.fixture()
def unchanged(devenv, seeded, ctx):
    """Asserts, after the test, that no cell, route or migration record changed."""
    def state():
        cells = {n: snapshot(devenv.resolve_cell(n).dsn, devenv.resolve_cell(n).db_key_base).tables for n in ("legacy", "cell-1")}
        routes = {o.id: devenv.topology().route(o.id) for o in seeded.values()}
        with ctx.tracking.conn() as c:
            migrations = c.execute("SELECT id, state, updated_at FROM orgmover.migrations ORDER BY id").fetchall()
        return cells, routes, migrations
    before = state()
    yield
    assert state() == before


def _fails(ctx, org, source, target) -> str:
    with pytest.raises(PreflightError) as e:
        mover.preflight(ctx, org, source, target, "test")
    return str(e.value)


def test_unknown_organization(ctx, seeded, unchanged):
    msg = _fails(ctx, 987654321, "legacy", "cell-1")
    assert "organization 987654321 does not exist on source cell legacy" in msg
    assert "organization 987654321 has no route in the Topology Service" in msg


def test_unknown_cell(ctx, seeded, unchanged):
    msg = _fails(ctx, seeded["alpha"].id, "legacy", "nowhere")
    assert "unknown target cell 'nowhere'" in msg and "legacy" in msg and "cell-1" in msg
    assert "invalid cell name" in _fails(ctx, seeded["alpha"].id, "legacy", "Bad Name!")


def test_source_equals_target(ctx, seeded, unchanged):
    assert "source and target are the same cell (legacy)" in _fails(ctx, seeded["alpha"].id, "legacy", "legacy")


def test_org_not_routed_to_source(ctx, seeded, unchanged):
    msg = _fails(ctx, seeded["alpha"].id, "cell-1", "legacy")
    assert f"organization {seeded['alpha'].id} is routed to cell legacy, not to source cell-1" in msg


def test_org_already_moved(devenv, ctx, seeded):
    org = seeded["zeta"].id
    topo = devenv.topology()
    r = topo.route(org)
    moved = topo.update_route(org, r["version"], cell="cell-1")  # as if an earlier move switched it
    try:
        assert "(already moved)" in _fails(ctx, org, "legacy", "cell-1")
    finally:
        topo.update_route(org, moved["version"], cell="legacy")
    assert ctx.tracking.latest_for_org(org) is None


def test_schema_version_mismatch(devenv, ctx, seeded, unchanged):
    dst = devenv.resolve_cell("cell-1").dsn
    with psycopg.connect(dst) as c:
        c.execute("INSERT INTO schema_migrations (version) VALUES ('20991231000000')")
    try:
        msg = _fails(ctx, seeded["alpha"].id, "legacy", "cell-1")
    finally:
        with psycopg.connect(dst) as c:
            c.execute("DELETE FROM schema_migrations WHERE version = '20991231000000'")
    assert "schema versions differ: legacy is at 20261101000000, cell-1 is at 20991231000000" in msg


def test_id_collision_on_target(devenv, ctx, seeded, unchanged):
    org = seeded["eta"]
    src, dst = devenv.resolve_cell("legacy").dsn, devenv.resolve_cell("cell-1").dsn
    with psycopg.connect(src) as s:
        issue_id = s.execute("SELECT min(i.id) FROM issues i JOIN namespaces n ON n.id = i.namespace_id "
                             "WHERE n.organization_id = %s", (org.id,)).fetchone()[0]
    with psycopg.connect(dst) as c:  # a stray row with one of the org's ids, owned by nobody we know
        c.execute("SET session_replication_role = replica")
        c.execute("INSERT INTO issues (id, namespace_id, iid, title) VALUES (%s, -1, 1, 'stray')", (issue_id,))
    try:
        msg = _fails(ctx, org.id, "legacy", "cell-1")
    finally:
        with psycopg.connect(dst) as c:
            c.execute("DELETE FROM issues WHERE id = %s", (issue_id,))
    assert f"id collision: 1 rows of organization {org.id} in issues already exist on cell-1 (keys ({issue_id}))" in msg


def test_unclassifiable_table(devenv, ctx, seeded, unchanged):
    for cell in ("legacy", "cell-1"):
        with psycopg.connect(devenv.resolve_cell(cell).dsn) as c:
            c.execute("CREATE TABLE widgets (id bigserial PRIMARY KEY, label text)")
    try:
        msg = _fails(ctx, seeded["alpha"].id, "legacy", "cell-1")
    finally:
        for cell in ("legacy", "cell-1"):
            with psycopg.connect(devenv.resolve_cell(cell).dsn) as c:
                c.execute("DROP TABLE widgets")
    assert "table widgets: cannot tell which organization its rows belong to" in msg


def test_exempt_table_without_strategy_is_an_error(devenv, ctx, seeded, tmp_path, unchanged):
    import shutil

    from orgmover import gitlab

    docs = tmp_path / "docs"
    shutil.copytree(gitlab.db_docs_dir(), docs)
    text = (docs / "geo_nodes.yml").read_text().replace("org_mover:\n  strategy: skip\n", "")
    (docs / "geo_nodes.yml").write_text(text)
    ctx.dictionary_dir = docs
    msg = _fails(ctx, seeded["alpha"].id, "legacy", "cell-1")
    assert "table geo_nodes: gitlab_main_cell_local table without an org_mover.strategy" in msg


def test_dag_refuses_unknown_org_and_changes_nothing(org_move_dag, seeded, unchanged):
    from test_org_move_e2e import run

    dr = run(org_move_dag, organization_id=987654321)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "failed"
    assert states["preflight.check"] == "failed"
    assert states["window.cutover"] == "upstream_failed"


def test_dag_params_are_validated(org_move_dag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        org_move_dag.test(run_conf={"organization_id": 0, "source_cell": "legacy", "target_cell": "cell-1"})


def test_a_mapping_that_sends_two_storages_to_one_is_not_inverted():
    """Moving back inverts the first move's mappings; one that merged two storages into one cannot say
    where each repository came from, so preflight asks for a mapping instead of guessing (the pure
    function: the rest of that path is tests/test_pg_mover.py's move back)."""
    inverted, problem = mover._inverted_maps({"shards": {"nfs-01": "default", "nfs-02": "storage-2"}})
    assert problem is None and inverted == {"shards": {"default": "nfs-01", "storage-2": "nfs-02"}}
    inverted, problem = mover._inverted_maps({"shards": {"nfs-01": "default", "nfs-02": "default"}})
    assert inverted == {}
    assert problem == "the mapping of shards sends 'nfs-01' and 'nfs-02' to 'default', so it cannot be inverted"
