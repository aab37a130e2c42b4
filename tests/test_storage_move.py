"""Repositories, objects and images move with the org (real git, real S3 + GCS emulators, real OCI
registries), checked independently; changes made on the source after the first replication pass
(a push, a deleted branch, a new upload, a new image tag) are on the target after the move."""

from __future__ import annotations

import random
import subprocess

import psycopg

from orgmover import git, objects, registry
from orgmover.cli import run_move
from verify import check_storage


def test_storage_moves_with_the_org_including_late_changes(devenv, seeded, ctx):
    org = seeded["epsilon"]
    src_cell, dst_cell = devenv.resolve_cell("legacy"), devenv.resolve_cell("cell-1")
    late = {}

    def registry_rows(mid):
        with ctx.tracking.conn() as c:
            return {(r["kind"], r["key"]): r for r in c.execute(
                "SELECT kind, key, generation, last_synced_at, verified_at, state, verification_state "
                "FROM orgmover.replicables WHERE migration_id = %s", (mid,))}

    def change_the_source(mid):
        late["before"] = registry_rows(mid)
        with psycopg.connect(src_cell.dsn) as c:
            disk, shard = c.execute("SELECT r.disk_path, s.name FROM project_repositories r JOIN projects p ON p.id = r.project_id "
                                    "JOIN shards s ON s.id = r.shard_id WHERE p.organization_id = %s AND p.pool_repository_id "
                                    "IS NULL ORDER BY r.id LIMIT 1", (org.id,)).fetchone()
            upload = c.execute("SELECT u.path FROM uploads u JOIN projects p ON u.model_type = 'Project' AND u.model_id = p.id "
                               "WHERE p.organization_id = %s ORDER BY u.id LIMIT 1", (org.id,)).fetchone()[0]
            path, name = c.execute("SELECT r.path, cr.name FROM container_repositories cr JOIN routes r ON r.source_type = "
                                   "'Project' AND r.source_id = cr.project_id JOIN projects p ON p.id = cr.project_id "
                                   "WHERE p.organization_id = %s ORDER BY cr.id LIMIT 1", (org.id,)).fetchone()
        repo = src_cell.storage.storage(shard).repo(disk)
        branches = [r for r in git.list_refs(repo) if r.startswith("refs/heads/feature")]
        if branches:
            subprocess.run(["git", "-C", str(repo), "update-ref", "-d", branches[0]], check=True)
            late["deleted"] = (shard, disk, branches[0])
        head = git.list_refs(repo)["refs/heads/main"]
        subprocess.run(["git", "-C", str(repo), "update-ref", "refs/heads/late-push", head], check=True)
        late["pushed"] = (shard, disk)
        data = b"a new version of the upload, written after the first pass"
        src_cell.storage.store("uploads").write(upload, iter([data]), len(data))
        late["upload"] = (upload, data)
        image = registry.container_repository_path(path, name)
        registry.push_image(src_cell.storage.registry(), image, "late-tag", random.Random(5), layers=1, layer_size=4000)
        late["image"] = image

    mid = run_move(ctx, org.id, "legacy", "cell-1", before_window=change_the_source)
    assert ctx.tracking.get(mid)["state"] == "completed"
    problems, counts = check_storage(src_cell, dst_cell, org.id)
    assert problems == [] and counts["repositories"] > 0 and counts["objects"] > 0 and counts["tags"] > 0
    shard, disk = late["pushed"]
    refs = git.list_refs(dst_cell.storage.storage(shard).repo(disk))
    assert "refs/heads/late-push" in refs
    if "deleted" in late:
        assert late["deleted"][2] not in git.list_refs(dst_cell.storage.storage(late["deleted"][0]).repo(late["deleted"][1]))
    key, data = late["upload"]
    assert b"".join(dst_cell.storage.store("uploads").read(key)) == data
    assert "late-tag" in dst_cell.storage.registry().tags(late["image"])
    # cell-1 keeps artifacts on GCS: the org's artifacts went from S3 to the GCS emulator
    assert isinstance(dst_cell.storage.store("artifacts"), objects.GCSStore)
    assert any(True for _ in dst_cell.storage.store("artifacts").list())
    # the window pass synced and verified what changed, and nothing else
    after = registry_rows(mid)
    resynced = {k for k, r in after.items() if k not in late["before"] or r["last_synced_at"] != late["before"][k]["last_synced_at"]}
    assert resynced == {("repository", f"{shard}:{disk}.git"), ("object", f"uploads:{key}"),
                        ("container_repository", late["image"])}, resynced
    assert all(r["state"] == 2 and r["verification_state"] == 2 for r in after.values())
    report = (ctx.reports_dir / f"migration-{mid}-validation.txt").read_text()
    assert "Non-database data" in report and "repository" in report and "container_repository" in report
