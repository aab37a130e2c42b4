"""orgmover.seed against a real local PostgreSQL cluster (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import psycopg
import pytest

from orgmover import secrets
from orgmover.errors import ConfigError
from orgmover.gitlab import install_schema, sequence_range
from orgmover.localpg import PgCluster, free_port
from orgmover.seed import ORG_TABLES, OrgSpec, default_orgs, org_path, seed

KEY_BASE = "test-db-key-base-0123456789abcdef-cell0"
OTHER_KEY_BASE = "another-cell-key-base-fedcba9876543210"
# the demo's orgs, with a smaller "large" org to keep the test quick
SPECS = default_orgs(large_rows=20_000)
# tables whose contents install_schema writes with now(): not part of the seed's determinism
NOT_SEEDED = {"schema_migrations", "application_settings"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = PgCluster(tmp_path_factory.mktemp("seed") / "pg", free_port())
    c.start()
    try:
        yield c
    finally:
        c.destroy()


def _fresh_db(cluster: PgCluster, name: str, cell_id: int = 0) -> str:
    cluster.create_database(name)
    uri = cluster.uri(name)
    install_schema(uri, cell_id=cell_id, cell_name="legacy" if cell_id == 0 else f"cell-{cell_id}")
    return uri


@pytest.fixture(scope="module")
def seeded(cluster):
    uri = _fresh_db(cluster, "seed_a")
    lines: list[str] = []
    result = seed(uri, SPECS, db_key_base=KEY_BASE, seed=42, log=lines.append)
    return uri, result, lines


def q(uri: str, sql: str, params=None):
    with psycopg.connect(uri) as c:
        return c.execute(sql, params).fetchall()


def one(uri: str, sql: str, params=None):
    return q(uri, sql, params)[0][0]


def table_digests(uri: str) -> dict[str, tuple[int, str]]:
    with psycopg.connect(uri) as c:
        tables = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1")]
        out = {}
        for t in tables:
            if t in NOT_SEEDED:
                continue
            out[t] = c.execute(
                f'SELECT count(*), coalesce(md5(string_agg(x::text, E\'\\n\' ORDER BY x::text)), \'\') FROM "{t}" x'
            ).fetchone()
        return out


# ---------------------------------------------------------------------------------------------


def test_log_and_result_shape(seeded):
    uri, result, lines = seeded
    assert [r.path for r in result] == [org_path(s.name) for s in SPECS]
    assert len(lines) == len(SPECS)
    for r, line in zip(result, lines):
        assert "\n" not in line and r.path in line and "rows" in line and "s" in line
        assert set(r.rows) <= set(ORG_TABLES)
        assert r.rows["organizations"] == 1
        assert one(uri, "SELECT path FROM organizations WHERE id = %s", (r.id,)) == r.path


def test_deterministic_for_a_seed(cluster, seeded):
    uri_a, result_a, _ = seeded
    uri_b = _fresh_db(cluster, "seed_b")
    # seed the second cell in another interpreter with another hash seed: no dependence on set order
    code = ("import json, sys; from orgmover.seed import seed, default_orgs; "
            f"r = seed(sys.argv[1], default_orgs(large_rows={SPECS[3].rows}), db_key_base={KEY_BASE!r}, seed=42, "
            "log=lambda _: None); print(json.dumps([[o.id, o.path, o.rows, o.shared_rows] for o in r]))")
    out = subprocess.run([sys.executable, "-c", code, uri_b], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert [[r.id, r.path, r.rows, r.shared_rows] for r in result_a] == json.loads(out.strip().splitlines()[-1])
    da, db = table_digests(uri_a), table_digests(uri_b)
    assert da.keys() == db.keys()
    differing = [t for t in da if da[t] != db[t]]
    assert not differing, f"tables differ between two seeds with the same seed: {differing}"
    assert sum(n for n, _ in da.values()) > 40_000


def test_another_seed_gives_other_data(cluster):
    specs = [OrgSpec("Alpha", 500), OrgSpec("Beta", 500)]
    u1, u2 = _fresh_db(cluster, "seed_s1"), _fresh_db(cluster, "seed_s2")
    seed(u1, specs, db_key_base=KEY_BASE, seed=1, log=lambda _: None)
    seed(u2, specs, db_key_base=KEY_BASE, seed=2, log=lambda _: None)
    d1, d2 = table_digests(u1), table_digests(u2)
    assert d1["issues"] != d2["issues"] and d1["notes"] != d2["notes"]


# rows of one org per table, found through the sharding keys (the way a mover selects them)
ORG_ROWS_SQL = {
    "organizations": "SELECT count(*) FROM organizations WHERE id = %(o)s",
    "organization_users": "SELECT count(*) FROM organization_users WHERE organization_id = %(o)s",
    "namespaces": "SELECT count(*) FROM namespaces WHERE organization_id = %(o)s",
    "namespace_settings": "SELECT count(*) FROM namespace_settings s JOIN namespaces n ON n.id = s.namespace_id WHERE n.organization_id = %(o)s",
    "projects": "SELECT count(*) FROM projects WHERE organization_id = %(o)s",
    "project_repositories": "SELECT count(*) FROM project_repositories r JOIN projects p ON p.id = r.project_id WHERE p.organization_id = %(o)s",
    "routes": "SELECT count(*) FROM routes r JOIN namespaces n ON n.id = r.namespace_id WHERE n.organization_id = %(o)s",
    "members": "SELECT count(*) FROM members m JOIN namespaces n ON n.id = m.member_namespace_id WHERE n.organization_id = %(o)s",
    "project_authorizations": "SELECT count(*) FROM project_authorizations a JOIN projects p ON p.id = a.project_id WHERE p.organization_id = %(o)s",
    "issues": "SELECT count(*) FROM issues i JOIN namespaces n ON n.id = i.namespace_id WHERE n.organization_id = %(o)s",
    "merge_requests": "SELECT count(*) FROM merge_requests m JOIN projects p ON p.id = m.target_project_id WHERE p.organization_id = %(o)s",
    "notes": """SELECT count(*) FROM notes x LEFT JOIN projects p ON p.id = x.project_id
                LEFT JOIN snippets s ON x.noteable_type = 'Snippet' AND s.id = x.noteable_id
                WHERE p.organization_id = %(o)s OR (x.project_id IS NULL AND s.organization_id = %(o)s)""",
    "label_links": """SELECT count(*) FROM label_links ll JOIN labels l ON l.id = ll.label_id
                      LEFT JOIN projects p ON p.id = l.project_id LEFT JOIN namespaces g ON g.id = l.group_id
                      WHERE coalesce(p.organization_id, g.organization_id) = %(o)s""",
    "events": """SELECT count(*) FROM events e LEFT JOIN projects p ON p.id = e.project_id LEFT JOIN namespaces g ON g.id = e.group_id
                 WHERE coalesce(p.organization_id, g.organization_id) = %(o)s""",
    "push_event_payloads": "SELECT count(*) FROM push_event_payloads x JOIN events e ON e.id = x.event_id JOIN projects p ON p.id = e.project_id WHERE p.organization_id = %(o)s",
    "p_ci_pipelines": "SELECT count(*) FROM p_ci_pipelines x JOIN projects p ON p.id = x.project_id WHERE p.organization_id = %(o)s",
    "p_ci_builds": "SELECT count(*) FROM p_ci_builds x JOIN projects p ON p.id = x.project_id WHERE p.organization_id = %(o)s",
    "p_ci_job_artifacts": "SELECT count(*) FROM p_ci_job_artifacts x JOIN projects p ON p.id = x.project_id WHERE p.organization_id = %(o)s",
    "snippets": "SELECT count(*) FROM snippets s LEFT JOIN projects p ON p.id = s.project_id WHERE coalesce(p.organization_id, s.organization_id) = %(o)s",
    "lfs_objects_projects": "SELECT count(*) FROM lfs_objects_projects x JOIN projects p ON p.id = x.project_id WHERE p.organization_id = %(o)s",
    "uploads": """SELECT count(*) FROM uploads u
                  LEFT JOIN projects p ON u.model_type = 'Project' AND p.id = u.model_id
                  LEFT JOIN namespaces n ON u.model_type = 'Namespace' AND n.id = u.model_id
                  LEFT JOIN notes x ON u.model_type = 'Note' AND x.id = u.model_id
                  LEFT JOIN projects np ON np.id = x.project_id
                  WHERE coalesce(p.organization_id, n.organization_id, np.organization_id) = %(o)s""",
    "keys": "SELECT count(*) FROM keys WHERE organization_id = %(o)s",
    "personal_access_tokens": "SELECT count(*) FROM personal_access_tokens WHERE organization_id = %(o)s",
    "protected_branches": """SELECT count(*) FROM protected_branches b LEFT JOIN projects p ON p.id = b.project_id
                             LEFT JOIN namespaces n ON n.id = b.namespace_id WHERE coalesce(p.organization_id, n.organization_id) = %(o)s""",
}


def test_rows_per_org_match_spec_and_database(seeded):
    uri, result, _ = seeded
    for spec, r in zip(SPECS, result):
        assert abs(r.total - spec.rows) <= 0.3 * spec.rows, (spec, r.total)
        for table, sql in ORG_ROWS_SQL.items():
            assert one(uri, sql, {"o": r.id}) == r.rows.get(table, 0), (r.path, table)
        # the big tables are the big ones
        big = sorted(r.rows, key=r.rows.get, reverse=True)[:6]
        assert "notes" in big and "issues" in big, big
    # everything the seed returned is everything in the org-owned tables
    with psycopg.connect(uri) as c:
        for table in ORG_TABLES:
            assert c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == sum(r.rows.get(table, 0) for r in result), table


def test_group_trees_namespaces_and_routes(seeded):
    uri, result, _ = seeded
    for r in result:
        depth = one(uri, "SELECT max(cardinality(traversal_ids)) FROM namespaces WHERE organization_id = %s AND type = 'Group'", (r.id,))
        assert 2 <= depth <= 3
        # traversal_ids = parent's traversal_ids || id, and parents are in the same org
        assert one(uri, """SELECT count(*) FROM namespaces n LEFT JOIN namespaces p ON p.id = n.parent_id
                           WHERE n.organization_id = %s AND (n.traversal_ids <> coalesce(p.traversal_ids, '{}') || n.id
                                 OR p.organization_id <> n.organization_id)""", (r.id,)) == 0
        # one project namespace per project, in the same org, under the project's namespace
        assert one(uri, """SELECT count(*) FROM projects p JOIN namespaces n ON n.id = p.project_namespace_id
                           WHERE p.organization_id = %s AND n.type = 'Project' AND n.parent_id = p.namespace_id
                             AND n.organization_id = p.organization_id""", (r.id,)) == r.rows["projects"]
        # user namespaces only for the org's home users, who are all org users
        assert one(uri, """SELECT count(*) FROM namespaces n LEFT JOIN organization_users ou
                             ON ou.user_id = n.owner_id AND ou.organization_id = n.organization_id
                           WHERE n.organization_id = %s AND n.type = 'User' AND ou.id IS NULL""", (r.id,)) == 0
    # every group, user namespace and project has its route; project routes point at the project namespace
    assert one(uri, """SELECT count(*) FROM namespaces n LEFT JOIN routes r ON r.source_type = 'Namespace' AND r.source_id = n.id
                       WHERE n.type IN ('Group', 'User') AND (r.id IS NULL OR r.namespace_id <> n.id)""") == 0
    assert one(uri, """SELECT count(*) FROM projects p LEFT JOIN routes r ON r.source_type = 'Project' AND r.source_id = p.id
                       LEFT JOIN routes pr ON pr.source_type = 'Namespace' AND pr.source_id = p.namespace_id
                       WHERE r.id IS NULL OR r.namespace_id <> p.project_namespace_id OR r.path <> pr.path || '/' || p.path""") == 0
    assert one(uri, "SELECT count(*) FROM redirect_routes WHERE source_type IN ('Namespace', 'Project')") > 0
    assert one(uri, "SELECT count(*) FROM redirect_routes rr JOIN routes r ON r.path = rr.path") == 0
    # members point at the group or at the project's project namespace
    assert one(uri, """SELECT count(*) FROM members m LEFT JOIN projects p ON m.source_type = 'Project' AND p.id = m.source_id
                       WHERE NOT ((m.source_type = 'Namespace' AND m.type = 'GroupMember' AND m.member_namespace_id = m.source_id)
                               OR (m.source_type = 'Project' AND m.type = 'ProjectMember' AND m.member_namespace_id = p.project_namespace_id))""") == 0
    # issues live in their project's namespace
    assert one(uri, "SELECT count(*) FROM issues i JOIN projects p ON p.id = i.project_id WHERE i.namespace_id <> p.project_namespace_id") == 0
    assert one(uri, "SELECT count(*) FROM issues WHERE project_id IS NULL") == 0


def test_repositories_use_hashed_paths_on_named_shards(seeded):
    uri, _, _ = seeded
    shards = dict(q(uri, "SELECT id, name FROM shards"))
    rows = q(uri, "SELECT r.project_id, r.disk_path, r.shard_id, p.repository_storage FROM project_repositories r JOIN projects p ON p.id = r.project_id")
    used = set()
    for pid, path, shard_id, storage in rows:
        h = hashlib.sha256(str(pid).encode()).hexdigest()
        assert path == f"@hashed/{h[:2]}/{h[2:4]}/{h}"
        assert shards[shard_id] == storage
        used.add(storage)
    assert used == {"default", "storage-2"}
    for prefix, sql in (("@snippets", "SELECT snippet_id, disk_path FROM snippet_repositories"),
                        ("@groups", "SELECT group_id, disk_path FROM group_wiki_repositories"),
                        ("@pools", "SELECT id, disk_path FROM pool_repositories")):
        got = q(uri, sql)
        assert got
        for cid, path in got:
            h = hashlib.sha256(str(cid).encode()).hexdigest()
            assert path == f"{prefix}/{h[:2]}/{h[2:4]}/{h}"


def test_cross_org_references(seeded):
    uri, result, _ = seeded
    # a user in at least two orgs (and members of groups there)
    assert one(uri, "SELECT count(*) FROM (SELECT user_id FROM organization_users GROUP BY 1 HAVING count(*) >= 2) x") > 0
    assert one(uri, """SELECT count(*) FROM members m JOIN namespaces n ON n.id = m.member_namespace_id
                       JOIN namespaces h ON h.owner_id = m.user_id AND h.type = 'User'
                       WHERE h.organization_id <> n.organization_id""") > 0
    # an LFS object linked from projects of two orgs
    assert one(uri, """SELECT count(*) FROM (SELECT x.lfs_object_id FROM lfs_objects_projects x JOIN projects p ON p.id = x.project_id
                       GROUP BY 1 HAVING count(DISTINCT p.organization_id) >= 2) s""") > 0
    # each org (but the first) has a fork of a project of the previous org, sharing its pool
    forks = q(uri, """SELECT f.organization_id, u.organization_id, f.pool_repository_id, u.pool_repository_id,
                             pr.source_project_id, u.id, f.repository_storage, s.name
                      FROM projects f JOIN projects u ON u.id = f.forked_from_project_id
                      JOIN pool_repositories pr ON pr.id = f.pool_repository_id JOIN shards s ON s.id = pr.shard_id
                      WHERE f.organization_id <> u.organization_id""")
    pairs = {(a, b) for a, b, *_ in forks}
    ids = [r.id for r in result]
    assert pairs == {(ids[i + 1], ids[i]) for i in range(len(ids) - 1)}
    for _, _, fork_pool, up_pool, source, up_id, storage, shard in forks:
        assert fork_pool == up_pool and source == up_id and storage == shard
    # an intra-org fork too (the medium and large orgs)
    assert one(uri, """SELECT count(*) FROM projects f JOIN projects u ON u.id = f.forked_from_project_id
                       WHERE f.organization_id = u.organization_id AND f.pool_repository_id = u.pool_repository_id""") >= 1


def test_notes_labels_events_and_ci(seeded):
    uri, result, _ = seeded
    for r in result:
        types = dict(q(uri, """SELECT noteable_type, count(*) FROM notes x JOIN projects p ON p.id = x.project_id
                               WHERE p.organization_id = %s GROUP BY 1""", (r.id,)))
        assert types.get("Issue", 0) > 0 and types.get("MergeRequest", 0) > 0, (r.path, types)
        parts = one(uri, """SELECT count(DISTINCT b.partition_id) FROM p_ci_builds b JOIN projects p ON p.id = b.project_id
                           WHERE p.organization_id = %s""", (r.id,))
        assert parts >= 2, r.path
    assert {x for (x,) in q(uri, "SELECT DISTINCT partition_id FROM p_ci_pipelines")} == {100, 101, 102}
    assert one(uri, "SELECT count(*) FROM notes WHERE noteable_type = 'Snippet'") > 0
    # polymorphic targets exist and belong to the same project
    assert one(uri, """SELECT count(*) FROM notes x LEFT JOIN issues i ON x.noteable_type = 'Issue' AND i.id = x.noteable_id
                       LEFT JOIN merge_requests m ON x.noteable_type = 'MergeRequest' AND m.id = x.noteable_id
                       LEFT JOIN snippets s ON x.noteable_type = 'Snippet' AND s.id = x.noteable_id
                       WHERE coalesce(i.project_id, m.target_project_id, s.project_id) IS DISTINCT FROM x.project_id""") == 0
    assert one(uri, """SELECT count(*) FROM label_links ll LEFT JOIN issues i ON ll.target_type = 'Issue' AND i.id = ll.target_id
                       LEFT JOIN merge_requests m ON ll.target_type = 'MergeRequest' AND m.id = ll.target_id
                       WHERE i.id IS NULL AND m.id IS NULL""") == 0
    assert {t for (t,) in q(uri, "SELECT DISTINCT target_type FROM label_links")} == {"Issue", "MergeRequest"}
    # push events have payloads, event authors are authorized on the project
    assert one(uri, "SELECT count(*) FROM events e LEFT JOIN push_event_payloads x ON x.event_id = e.id WHERE (e.action = 5) <> (x.event_id IS NOT NULL)") == 0
    assert one(uri, """SELECT count(*) FROM events e LEFT JOIN project_authorizations a ON a.project_id = e.project_id AND a.user_id = e.author_id
                       WHERE e.project_id IS NOT NULL AND a.user_id IS NULL""") == 0
    assert one(uri, "SELECT count(*) FROM events WHERE group_id IS NOT NULL AND project_id IS NULL") > 0
    # CI children are in their parent's partition and project
    assert one(uri, "SELECT count(*) FROM p_ci_builds b JOIN p_ci_pipelines p ON p.id = b.commit_id AND p.partition_id = b.partition_id WHERE p.project_id <> b.project_id") == 0
    assert one(uri, "SELECT count(*) FROM p_ci_job_artifacts a JOIN p_ci_builds b ON b.id = a.job_id AND b.partition_id = a.partition_id WHERE a.project_id <> b.project_id") == 0
    # uploads of all three model types, all pointing at existing rows
    assert {t for (t,) in q(uri, "SELECT DISTINCT model_type FROM uploads")} == {"Project", "Namespace", "Note"}
    assert one(uri, """SELECT count(*) FROM uploads u LEFT JOIN projects p ON u.model_type = 'Project' AND p.id = u.model_id
                       LEFT JOIN namespaces n ON u.model_type = 'Namespace' AND n.id = u.model_id
                       LEFT JOIN notes x ON u.model_type = 'Note' AND x.id = u.model_id
                       WHERE p.id IS NULL AND n.id IS NULL AND x.id IS NULL""") == 0
    # both project and group level milestones, labels, protected branches, hooks; personal and project snippets
    for t, a, b in (("milestones", "project_id", "group_id"), ("labels", "project_id", "group_id"),
                    ("protected_branches", "project_id", "namespace_id"), ("web_hooks", "project_id", "group_id"),
                    ("snippets", "project_id", "organization_id")):
        assert one(uri, f"SELECT count(*) FROM {t} WHERE {a} IS NOT NULL") > 0, t
        assert one(uri, f"SELECT count(*) FROM {t} WHERE {a} IS NULL AND {b} IS NOT NULL") > 0, t
    assert one(uri, "SELECT count(*) FROM keys WHERE type = 'DeployKey' AND organization_id IS NOT NULL") == one(uri, "SELECT count(*) FROM keys")


def test_awkward_values(seeded):
    uri, _, _ = seeded
    checks = {
        "backslash, newline and tab in text": r"SELECT count(*) FROM issues WHERE description LIKE '%\\%' AND description LIKE E'%\n%'",
        "literal \\N in text": r"SELECT count(*) FROM notes WHERE note LIKE '%\\N%'",
        "tab in text": r"SELECT count(*) FROM notes WHERE strpos(note, E'\t') > 0",
        "unicode": "SELECT count(*) FROM issues WHERE title LIKE '%日本語%'",
        "empty string": "SELECT count(*) FROM labels WHERE description = ''",
        "NULL in nullable text": "SELECT count(*) FROM issues WHERE description IS NULL",
        "jsonb in builds": "SELECT count(*) FROM p_ci_builds WHERE options -> 'variables' ->> 'BACKSLASH' = E'\\\\'",
        "jsonb in namespace_settings": "SELECT count(*) FROM namespace_settings WHERE settings -> 'nested' ->> 'newline' = E'a\\nb\\tc'",
        "bytea sha in payloads": "SELECT count(*) FROM push_event_payloads WHERE length(commit_to) = 20",
        "NULL bytea in payloads": "SELECT count(*) FROM push_event_payloads WHERE commit_from IS NULL",
        "bytea sha256": "SELECT count(*) FROM p_ci_job_artifacts WHERE length(file_sha256) = 32",
        "text[] scopes": "SELECT count(*) FROM personal_access_tokens WHERE cardinality(scopes) >= 2",
        "empty text[]": "SELECT count(*) FROM personal_access_tokens WHERE scopes = '{}'",
        "numeric": "SELECT count(*) FROM issues WHERE time_estimate <> trunc(time_estimate)",
        "dates": "SELECT count(*) FROM milestones WHERE due_date IS NOT NULL",
        "microseconds": "SELECT count(*) FROM notes WHERE extract(microseconds FROM created_at)::bigint % 1000000 <> 0",
        "invited member without user": "SELECT count(*) FROM members WHERE user_id IS NULL",
    }
    missing = [name for name, sql in checks.items() if one(uri, sql) == 0]
    assert not missing, missing
    # nothing is timestamped with the time of seeding
    assert one(uri, "SELECT count(*) FROM issues WHERE created_at > '2027-01-01'") == 0


def test_encrypted_values_decrypt_with_the_cell_key_only(seeded):
    uri, _, _ = seeded
    key, other = secrets.key_from_db_key_base(KEY_BASE), secrets.key_from_db_key_base(OTHER_KEY_BASE)
    separate = q(uri, "SELECT encrypted_value, encrypted_value_iv FROM ci_variables UNION ALL "
                      "SELECT encrypted_value, encrypted_value_iv FROM ci_group_variables UNION ALL "
                      "SELECT encrypted_otp_secret, encrypted_otp_secret_iv FROM users WHERE encrypted_otp_secret IS NOT NULL")
    embedded = [v for (v,) in q(uri, "SELECT runners_token_encrypted FROM namespaces WHERE runners_token_encrypted IS NOT NULL "
                                     "UNION ALL SELECT runners_token_encrypted FROM projects WHERE runners_token_encrypted IS NOT NULL "
                                     "UNION ALL SELECT token_encrypted FROM deploy_tokens")]
    assert len(separate) > 20 and len(embedded) > 20
    assert one(uri, "SELECT count(*) FROM users WHERE encrypted_otp_secret IS NOT NULL") > 0
    for value, iv in separate:
        secrets.decrypt(key, value, iv)
        with pytest.raises(secrets.SecretError):
            secrets.decrypt(other, value, iv)
    plain = set()
    for value in embedded:
        plain.add(secrets.decrypt_embedded(key, value))
        with pytest.raises(secrets.SecretError):
            secrets.decrypt_embedded(other, value)
    assert any(p.startswith(b"GR1348941") for p in plain) and any(p.startswith(b"gldt-") for p in plain)
    # IVs are not reused
    ivs = [iv for _, iv in separate]
    assert len(set(ivs)) == len(ivs)


def test_ids_are_in_the_cells_sequence_range(cluster, seeded):
    uri, _, _ = seeded
    lo, hi = sequence_range(0)

    def check(dsn: str, lo: int, hi: int) -> int:
        checked = 0
        with psycopg.connect(dsn) as c:
            tables = [r[0] for r in c.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'id' "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1")]
            for t in tables:
                mn, mx, cnt = c.execute(f"SELECT min(id), max(id), count(*) FROM {t}").fetchone()
                if cnt:
                    assert lo <= mn and mx <= hi, (t, mn, mx)
                    checked += 1
        return checked

    assert check(uri, lo, hi) >= 40
    # in another cell, every id (and thus every reference) is in that cell's range
    uri1 = _fresh_db(cluster, "seed_cell1", cell_id=1)
    res = seed(uri1, [OrgSpec("Cell One Co", 400), OrgSpec("Cell One Two", 400)], db_key_base=KEY_BASE, log=lambda _: None)
    lo1, hi1 = sequence_range(1)
    assert all(r.id >= lo1 for r in res)
    assert check(uri1, lo1, hi1) >= 40
    assert one(uri1, "SELECT min(user_id) FROM organization_users") >= lo1


def test_existing_org_is_refused_and_nothing_changes(seeded):
    uri, _, _ = seeded
    before = one(uri, "SELECT count(*) FROM users")
    with pytest.raises(ConfigError):
        seed(uri, [OrgSpec("Brand New", 300), SPECS[0]], db_key_base=KEY_BASE, log=lambda _: None)
    with pytest.raises(ConfigError):
        seed(uri, [OrgSpec("Same", 300), OrgSpec("same", 300)], db_key_base=KEY_BASE, log=lambda _: None)
    assert one(uri, "SELECT count(*) FROM users") == before
    assert one(uri, "SELECT count(*) FROM organizations WHERE path = 'brand-new'") == 0


def test_seeding_more_orgs_later_in_the_same_cell(cluster):
    uri = _fresh_db(cluster, "seed_twice")
    first = seed(uri, [OrgSpec("First", 300), OrgSpec("Second", 300)], db_key_base=KEY_BASE, log=lambda _: None)
    later = seed(uri, [OrgSpec("Third", 300), OrgSpec("Fourth", 300)], db_key_base=KEY_BASE, log=lambda _: None)
    assert len({r.id for r in first + later}) == 4
    # the shared LFS objects exist once per cell and are linked from all four orgs
    assert one(uri, """SELECT max(n) FROM (SELECT count(DISTINCT p.organization_id) n FROM lfs_objects_projects x
                       JOIN projects p ON p.id = x.project_id GROUP BY x.lfs_object_id) s""") == 4


def test_default_orgs():
    specs = default_orgs(large_rows=123_456)
    assert len(specs) == 5
    assert sorted(s.rows for s in specs) == [300, 3_000, 3_000, 20_000, 123_456]
    assert len({s.path for s in specs}) == 5
