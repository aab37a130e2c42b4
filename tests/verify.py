"""An independent checker for moves: full snapshots of both cells, compared row by row.

It does not use the mover's plan, predicates or checksums. What an organization owns comes from
the seed generator's own record (rows it created per table); cell-specific values are compared by
meaning, with rules written here from the schema: shard ids by shard name, LFS object ids by oid,
pool ids by disk path, encrypted columns by their plaintext under each cell's key.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass

import psycopg

from orgmover import secrets

# cell-local rows identified by something else than their id
NATURAL_KEYS = {"lfs_objects": ["oid"], "pool_repositories": ["disk_path"], "shards": ["name"]}
# per-cell tables nobody moves
CELL_TABLES = {"application_settings", "geo_nodes", "schema_migrations", "ar_internal_metadata"}
SEPARATE_IV = {"ci_variables": [("encrypted_value", "encrypted_value_iv")],
               "ci_group_variables": [("encrypted_value", "encrypted_value_iv")],
               "users": [("encrypted_otp_secret", "encrypted_otp_secret_iv")]}
EMBEDDED_IV = {"namespaces": ["runners_token_encrypted"], "projects": ["runners_token_encrypted"],
               "deploy_tokens": ["token_encrypted"]}


def _keys(conn) -> dict[str, list[str]]:
    rows = conn.execute("""
        SELECT c.relname, array_agg(a.attname ORDER BY k.ord)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_index i ON i.indrelid = c.oid AND (i.indisprimary OR i.indisunique)
        JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
        GROUP BY c.relname, i.indexrelid, i.indisprimary ORDER BY c.relname, i.indisprimary DESC, i.indexrelid""").fetchall()
    out: dict[str, list[str]] = {}
    for t, cols in rows:
        out.setdefault(t, list(cols))
    return out


@dataclass
class Snapshot:
    tables: dict[str, dict[str, dict]]  # table -> key text -> normalized row

    def keys(self, table: str) -> set[str]:
        return set(self.tables.get(table, {}))


def snapshot(dsn: str, db_key_base: str) -> Snapshot:
    key = secrets.key_from_db_key_base(db_key_base)
    with psycopg.connect(dsn) as c:
        c.execute("SET TimeZone = 'UTC'")
        keys = _keys(c)
        shards = dict(c.execute("SELECT id, name FROM shards").fetchall())
        lfs = dict(c.execute("SELECT id, oid FROM lfs_objects").fetchall())
        pools = dict(c.execute("SELECT id, disk_path FROM pool_repositories").fetchall())
        out: dict[str, dict[str, dict]] = {}
        for table, kcols in keys.items():
            kcols = NATURAL_KEYS.get(table, kcols)
            rows = {}
            for (doc,) in c.execute(f'SELECT row_to_json(t)::text FROM "{table}" t'):
                r = json.loads(doc)
                if "shard_id" in r:
                    r["shard_id"] = shards.get(r["shard_id"], r["shard_id"])
                if table == "lfs_objects_projects":
                    r["lfs_object_id"] = lfs.get(r["lfs_object_id"])
                if table == "projects" and r.get("pool_repository_id") is not None:
                    r["pool_repository_id"] = pools.get(r["pool_repository_id"])
                if table in NATURAL_KEYS:
                    r.pop("id", None)
                    r.pop("created_at", None)
                for col, ivcol in SEPARATE_IV.get(table, []):
                    if r.get(col) is not None:
                        r[col] = secrets.decrypt(key, r[col], r[ivcol]).decode()
                    r.pop(ivcol, None)
                for col in EMBEDDED_IV.get(table, []):
                    if r.get(col) is not None:
                        r[col] = secrets.decrypt_embedded(key, r[col]).decode()
                rows[json.dumps([r[k] for k in kcols], default=str)] = r
            out[table] = rows
    return Snapshot(out)


def check_move(src_before: Snapshot, src_after: Snapshot, dst_before: Snapshot, dst_after: Snapshot,
               org_rows: dict[str, int]) -> list[str]:
    """Problems (empty = the move is right): source untouched, target's other rows untouched, the org's
    rows (as many per table as the seed created) on the target exactly as on the source."""
    problems = []
    for table, rows in src_before.tables.items():
        if src_after.tables.get(table) != rows:
            problems.append(f"source table {table} changed")
    for table, rows in dst_before.tables.items():
        after = dst_after.tables.get(table, {})
        for k, r in rows.items():
            if after.get(k) != r:
                problems.append(f"target {table} row {k} (not the org's) changed or vanished")
                break
    for table, after in dst_after.tables.items():
        if table in CELL_TABLES:
            continue
        new = set(after) - dst_before.keys(table)
        expected = org_rows.get(table)
        if expected is not None and len(new) != expected:
            problems.append(f"{table}: {len(new)} new rows on the target, the seed created {expected} for the org")
        for k in new:
            if src_after.tables.get(table, {}).get(k) != after[k]:
                problems.append(f"{table} row {k} on the target differs from the source: "
                                f"{src_after.tables.get(table, {}).get(k)} != {after[k]}")
                break
    return problems


def check_storage(src_cell, dst_cell, org_id: int) -> tuple[list[str], dict]:
    """Independently: every repository of the org has the same refs on both cells, every object the same
    bytes, every image tag the same manifest digest. Items are listed with SQL written here."""
    import hashlib
    import subprocess

    from orgmover import objects, registry

    problems, counts = [], {"repositories": 0, "objects": 0, "tags": 0}
    with psycopg.connect(src_cell.dsn) as c:
        repos = c.execute("SELECT r.disk_path, s.name FROM project_repositories r JOIN projects p ON p.id = r.project_id "
                          "JOIN shards s ON s.id = r.shard_id WHERE p.organization_id = %s", (org_id,)).fetchall()
        uploads = [r[0] for r in c.execute(
            "SELECT u.path FROM uploads u WHERE (u.model_type = 'Project' AND u.model_id IN (SELECT id FROM projects WHERE "
            "organization_id = %s)) OR (u.model_type = 'Namespace' AND u.model_id IN (SELECT id FROM namespaces WHERE "
            "organization_id = %s))", (org_id, org_id))]
        lfs = [r[0] for r in c.execute("SELECT DISTINCT l.oid FROM lfs_objects l JOIN lfs_objects_projects a ON "
                                       "a.lfs_object_id = l.id JOIN projects p ON p.id = a.project_id WHERE p.organization_id = %s",
                                       (org_id,))]
        images = c.execute("SELECT r.path, cr.name FROM container_repositories cr JOIN projects p ON p.id = cr.project_id "
                           "JOIN routes r ON r.source_type = 'Project' AND r.source_id = p.id WHERE p.organization_id = %s",
                           (org_id,)).fetchall()

    def refs(path):
        if not path.exists():
            return None
        return subprocess.run(["git", "-C", str(path), "for-each-ref", "--format=%(objectname) %(refname)"],
                              capture_output=True, text=True, check=True).stdout

    for disk, shard in repos:
        for suffix in (".git", ".wiki.git"):
            a = refs(Path(src_cell.storage.git_storages[shard]) / f"{disk}{suffix}")
            b = refs(Path(dst_cell.storage.git_storages[shard]) / f"{disk}{suffix}")
            if a is None and suffix != ".git":
                continue
            counts["repositories"] += 1
            if a != b or not a:
                problems.append(f"repository {shard}:{disk}{suffix}: refs differ")

    def body(store, key):
        return hashlib.sha256(b"".join(store.read(key))).hexdigest()

    for t, keys in (("uploads", uploads), ("lfs", [objects.lfs_path(o) for o in lfs])):
        s, d = src_cell.storage.store(t), dst_cell.storage.store(t)
        for k in keys:
            counts["objects"] += 1
            if body(s, k) != body(d, k):
                problems.append(f"object {t}/{k}: bytes differ")
    sr, dr = src_cell.storage.registry(), dst_cell.storage.registry()
    for path, name in images:
        repo = f"{path}/{name}".lower() if name else path.lower()
        try:
            tags = sr.tags(repo)
        except Exception:  # noqa: BLE001 - a name no registry accepts has no image
            continue
        for tag in tags:
            counts["tags"] += 1
            a, b = sr.head_manifest(repo, tag), dr.head_manifest(repo, tag)
            if b is None or a.digest != b.digest:
                problems.append(f"image {repo}:{tag}: digest differs on the target")
    return problems, counts
