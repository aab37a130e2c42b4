"""A cell's non-database storage and the replication handlers of an organization's data in it.

A cell has Gitaly-like storages (named like its ``shards`` rows, each a root of bare repositories at
GitLab's hashed paths), object storage (one bucket per object type, on S3 or GCS, chosen per cell
and type) and an OCI registry. :class:`CellStorage` describes them; it comes from the deployment's
configuration (Airflow connection extras) or the local dev environment.

Handlers (see :mod:`orgmover.replication`) list the org's items from its database rows, with the
same plan predicates the row copy uses, so every repository, object and image the rows reference is
replicated and verified:

* ``repository``: project repositories (+ wiki, design), snippet and group wiki repositories, object
  pools; synced with :func:`orgmover.git.sync_repository` (pools first, forks keep sharing), verified
  with Gitaly's checksum;
* ``object``: uploads, LFS objects, job artifacts, package files at GitLab's paths; verified by SHA-256;
* ``container_repository``: images at the project's path; copied by digest, verified by tag digests.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from orgmover import git, objects, registry
from orgmover.plan import Plan, qi
from orgmover.replication import MissingOnSource, Replicable

OBJECT_TYPES = ("uploads", "lfs", "artifacts", "packages")


@dataclass
class CellStorage:
    git_storages: dict[str, str] = field(default_factory=dict)          # storage name -> root directory
    object_stores: dict[str, dict] = field(default_factory=dict)        # type -> {"kind": s3|gcs, "endpoint", "bucket"}
    registry_url: str | None = None

    def storage(self, name: str) -> git.GitStorage:
        if name not in self.git_storages:
            raise MissingOnSource(f"no Git storage named {name!r} is configured for this cell")
        return git.GitStorage(name, self.git_storages[name])

    def store(self, object_type: str) -> objects.ObjectStore:
        c = self.object_stores[object_type]
        if c.get("kind") == "gcs":
            return objects.GCSStore(c["endpoint"], c["bucket"])
        return objects.S3Store(c["endpoint"], c["bucket"], c.get("access_key", "test"), c.get("secret_key", "test"))

    def registry(self) -> registry.RegistryClient:
        return registry.RegistryClient(self.registry_url)

    def to_dict(self) -> dict:
        return {"git_storages": self.git_storages, "object_stores": self.object_stores, "registry_url": self.registry_url}

    @classmethod
    def from_dict(cls, d: dict | None) -> "CellStorage":
        d = d or {}
        return cls(dict(d.get("git_storages") or {}), dict(d.get("object_stores") or {}), d.get("registry_url"))


def _rows(conn: psycopg.Connection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


# ------------------------------------------------------------------------------------------ repositories
class RepositoryHandler:
    kind = "repository"

    def __init__(self, src_conn: psycopg.Connection, plan: Plan, src: CellStorage, dst: CellStorage):
        self.conn, self.plan, self.src, self.dst = src_conn, plan, src, dst
        self.shard_map = plan.tables["shards"].value_map if "shards" in plan.tables else {}

    def _target_storage(self, name: str) -> str:
        return self.shard_map.get(name, name)

    def scan(self) -> list[Replicable]:
        p = self.plan.tables
        items: list[Replicable] = []

        def add(storage: str, disk_path: str, suffix: str, role: str, pool: str | None = None, required: bool = True):
            try:
                path = self.src.storage(storage).repo(disk_path, suffix)
            except MissingOnSource:  # registered anyway: its sync fails with the reason, the move cannot pass
                if required:
                    items.append(Replicable(self.kind, f"{storage}:{disk_path}{suffix}", None, None,
                                            {"storage": storage, "disk_path": disk_path, "suffix": suffix, "role": role, "pool": pool}))
                return
            if not path.exists() and not required:
                return
            items.append(Replicable(self.kind, f"{storage}:{disk_path}{suffix}", None, git.refs_fingerprint(path),
                                    {"storage": storage, "disk_path": disk_path, "suffix": suffix, "role": role, "pool": pool}))

        pools = {}
        if "pool_repositories" in p:
            for pid, disk, shard in _rows(self.conn, f"SELECT t.id, t.disk_path, s.name FROM pool_repositories t "
                                                     f"JOIN shards s ON s.id = t.shard_id WHERE {p['pool_repositories'].where}"):
                pools[pid] = (shard, disk)
                add(shard, disk, ".git", "pool")
        for disk, shard, pool_id in _rows(self.conn, f"SELECT t.disk_path, s.name, pr.pool_repository_id FROM project_repositories t "
                                                    f"JOIN shards s ON s.id = t.shard_id JOIN projects pr ON pr.id = t.project_id "
                                                    f"WHERE {p['project_repositories'].where}"):
            pool = f"{pools[pool_id][0]}:{pools[pool_id][1]}" if pool_id in pools else None
            add(shard, disk, ".git", "project", pool)
            add(shard, disk, ".wiki.git", "wiki", required=False)
            add(shard, disk, ".design.git", "design", required=False)
        for table in ("snippet_repositories", "group_wiki_repositories"):
            if table in p:
                for disk, shard in _rows(self.conn, f"SELECT t.disk_path, s.name FROM {table} t JOIN shards s ON s.id = t.shard_id "
                                                    f"WHERE {p[table].where}"):
                    add(shard, disk, ".git", table.removesuffix("_repositories"))
        return items

    def _paths(self, item: Replicable) -> tuple[Path, Path]:
        m = item.meta
        return (self.src.storage(m["storage"]).repo(m["disk_path"], m["suffix"]),
                self.dst.storage(self._target_storage(m["storage"])).repo(m["disk_path"], m["suffix"]))

    def sync(self, item: Replicable) -> int:
        src, dst = self._paths(item)
        if not src.exists():
            raise MissingOnSource(str(src))
        src_pool = dst_pool = None
        if item.meta.get("pool"):
            storage, disk = item.meta["pool"].split(":", 1)
            src_pool = self.src.storage(storage).repo(disk)
            dst_pool = self.dst.storage(self._target_storage(storage)).repo(disk)
        res = git.sync_repository(src, dst, src_pool=src_pool, dst_pool=dst_pool)
        return int(res.get("bytes") or 0)

    def checksums(self, item: Replicable) -> tuple[str | None, str | None]:
        src, dst = self._paths(item)
        return git.repository_checksum(src), git.repository_checksum(dst)

    @staticmethod
    def equal(a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and git.checksums_equal(a, b)


# ------------------------------------------------------------------------------------------ objects
def object_keys(conn: psycopg.Connection, plan: Plan) -> list[tuple[str, str, int | None]]:
    """(object type, key at GitLab's path, size) of every object the org's rows reference."""
    p = plan.tables
    out: list[tuple[str, str, int | None]] = []
    for path, size in _rows(conn, f"SELECT t.path, t.size FROM uploads t WHERE {p['uploads'].where}"):
        out.append(("uploads", path, size))
    for oid, size in _rows(conn, f"SELECT t.oid, t.size FROM lfs_objects t WHERE {p['lfs_objects'].where}"):
        out.append(("lfs", objects.lfs_path(oid), size))
    for pid, created, job, aid, file, size in _rows(
            conn, f"SELECT t.project_id, t.created_at, t.job_id, t.id, coalesce(t.file, 'artifacts.zip'), t.size "
                  f"FROM p_ci_job_artifacts t WHERE {p['p_ci_job_artifacts'].where}"):
        out.append(("artifacts", objects.artifact_path(pid, created, job, aid, file), size))
    for pid, pkg, fid, name, size in _rows(
            conn, f"SELECT pp.project_id, t.package_id, t.id, t.file_name, t.size FROM packages_package_files t "
                  f"JOIN packages_packages pp ON pp.id = t.package_id WHERE {p['packages_package_files'].where}"):
        out.append(("packages", objects.package_path(pid, pkg, fid, name), size))
    return out


class ObjectHandler:
    kind = "object"

    def __init__(self, src_conn: psycopg.Connection, plan: Plan, src: CellStorage, dst: CellStorage):
        self.conn, self.plan, self.src, self.dst = src_conn, plan, src, dst
        self._stores: dict[tuple[str, str], objects.ObjectStore] = {}

    def _store(self, side: str, t: str) -> objects.ObjectStore:
        if (side, t) not in self._stores:
            self._stores[(side, t)] = (self.src if side == "src" else self.dst).store(t)
        return self._stores[(side, t)]

    def scan(self, workers: int = 8) -> list[Replicable]:
        """Every object the rows reference, fingerprinted from listings of the source buckets (size + ETag; a
        listing request covers up to 1000 keys) rather than a HEAD per object; object types in parallel."""
        refs = object_keys(self.conn, self.plan)
        by_type: dict[str, list[str]] = {}
        for t, key, _ in refs:
            by_type.setdefault(t, []).append(key)
        for t in by_type:
            self._store("src", t)  # made here, not concurrently in the threads
        counts = {t: {} for t in by_type}

        def one(t: str) -> tuple[str, dict]:
            return t, objects.list_infos(self._store("src", t), by_type[t], workers=max(1, workers // len(by_type)),
                                         counts=counts[t])

        with ThreadPoolExecutor(max(1, len(by_type))) as ex:
            infos = dict(ex.map(one, by_type))
        self.list_counts = {k: sum(c.get(k, 0) for c in counts.values()) for k in ("list_requests", "heads")}
        items, seen = [], set()
        for t, key, size in refs:
            if (t, key) in seen:  # an LFS object several rows reference
                continue
            seen.add((t, key))
            info = infos[t].get(key)
            items.append(Replicable(self.kind, f"{t}:{key}", info.size if info else size, objects.fingerprint(info),
                                    {"type": t, "key": key}))
        return items

    def sync(self, item: Replicable) -> int:
        t, key = item.meta["type"], item.meta["key"]
        res = objects.sync_object(self._store("src", t), self._store("dst", t), key)
        if res.get("error"):
            if res.get("action") == "missing_on_source":
                raise MissingOnSource(f"{t}/{key}")
            raise objects.ObjectStoreError(str(res["error"]))
        return int(res.get("bytes") or 0)

    def checksums(self, item: Replicable) -> tuple[str | None, str | None]:
        t, key = item.meta["type"], item.meta["key"]
        return objects.object_checksum(self._store("src", t), key), objects.object_checksum(self._store("dst", t), key, deep=True)


# ------------------------------------------------------------------------------------------ container images
def container_paths(conn: psycopg.Connection, plan: Plan) -> list[str]:
    """Registry paths of the org's container repositories (rows whose name no registry accepts, which
    therefore have no image, are left out)."""
    where = plan.tables["container_repositories"].where
    out = []
    for path, name in _rows(conn, f"SELECT r.path, t.name FROM container_repositories t JOIN routes r ON r.source_type = 'Project' "
                                  f"AND r.source_id = t.project_id WHERE {where} ORDER BY 1, 2"):
        try:
            out.append(registry.container_repository_path(path, name))
        except Exception:  # noqa: BLE001 - an invalid name cannot hold an image
            continue
    return out


class ContainerHandler:
    kind = "container_repository"

    def __init__(self, src_conn: psycopg.Connection, plan: Plan, src: CellStorage, dst: CellStorage):
        self.conn, self.plan = src_conn, plan
        self.src, self.dst = src.registry(), dst.registry()

    def _digests(self, client: registry.RegistryClient, repo: str) -> str | None:
        try:
            tags = client.tags(repo)
        except registry.RegistryError as e:
            if e.status == 404:
                return None
            raise
        pairs = sorted((t, (client.head_manifest(repo, t) or registry.ManifestRef("", "", 0)).digest) for t in tags)
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()

    def scan(self, workers: int = 8) -> list[Replicable]:
        """Each image repository's tags and their manifest digests (one tags list + one HEAD per tag), repositories
        in parallel (HTTP round trips, not CPU)."""
        paths = container_paths(self.conn, self.plan)
        with ThreadPoolExecutor(max(1, workers)) as ex:
            digests = list(ex.map(lambda p: self._digests(self.src, p), paths))
        return [Replicable(self.kind, path, None, d, {"path": path}) for path, d in zip(paths, digests)]

    def sync(self, item: Replicable) -> int:
        res = registry.sync_repository(self.src, self.dst, item.key)
        return int(res.get("bytes") or 0)

    def checksums(self, item: Replicable) -> tuple[str | None, str | None]:
        return self._digests(self.src, item.key), self._digests(self.dst, item.key)


def scan_all(hs: list) -> list[tuple[object, list[Replicable]]]:
    """``[(handler, handler.scan())]``, the handlers scanning at the same time: their costs are round trips
    to different servers (the file system, the object store, the registry), which overlap."""
    if len(hs) <= 1:
        return [(h, h.scan()) for h in hs]
    with ThreadPoolExecutor(len(hs), thread_name_prefix="scan") as ex:
        return list(zip(hs, ex.map(lambda h: h.scan(), hs)))


def handlers(src_conn: psycopg.Connection, plan: Plan, src: CellStorage, dst: CellStorage) -> list:
    out = []
    if src.git_storages:
        out.append(RepositoryHandler(src_conn, plan, src, dst))
    if src.object_stores:
        out.append(ObjectHandler(src_conn, plan, src, dst))
    if src.registry_url:
        out.append(ContainerHandler(src_conn, plan, src, dst))
    return out


# ------------------------------------------------------------------------------------------ seeding
def seed_storage(conn: psycopg.Connection, cell: CellStorage, org_ids: list[int], seed: int = 42,
                 max_object_bytes: int = 256 << 10) -> dict[str, int]:
    """Create, for the given organizations' rows on a cell, their repositories (branches, tags, MR refs,
    keep-around refs, some wikis; object pools with forks sharing them), their objects at GitLab's
    paths, and their container images (several tags, a multi-architecture index, shared layers).
    Deterministic for a seed; objects are capped at ``max_object_bytes`` to keep local cells small."""
    import random

    from orgmover.catalog import load_dictionary
    from orgmover.gitlab import db_docs_dir
    from orgmover.plan import Planner
    from orgmover.catalog import read_catalog

    rng = random.Random(seed)
    counts = {"repositories": 0, "objects": 0, "images": 0}
    catalog, dictionary = read_catalog(conn), load_dictionary(db_docs_dir())
    stores = {t: cell.store(t) for t in cell.object_stores}
    for s in stores.values():
        s.ensure_bucket()
    reg = cell.registry() if cell.registry_url else None
    shared_layers = [registry.make_layer(random.Random(seed), 48_000)] if reg else []
    for org in org_ids:
        plan = Planner(catalog, dictionary, conn).build(org)
        p = plan.tables
        pools = {pid: (shard, disk, src) for pid, disk, shard, src in _rows(
            conn, f"SELECT t.id, t.disk_path, s.name, t.source_project_id FROM pool_repositories t "
                  f"JOIN shards s ON s.id = t.shard_id WHERE {p['pool_repositories'].where}")}
        repos = _rows(conn, f"SELECT t.project_id, t.disk_path, s.name, pr.pool_repository_id, pr.forked_from_project_id "
                            f"FROM project_repositories t JOIN shards s ON s.id = t.shard_id JOIN projects pr ON pr.id = t.project_id "
                            f"WHERE {p['project_repositories'].where} ORDER BY t.project_id")
        for project_id, disk, shard, pool_id, forked_from in repos:
            path = cell.storage(shard).repo(disk)
            if path.exists():
                continue
            if pool_id in pools and forked_from:
                pshard, pdisk, source_id = pools[pool_id]
                pool = cell.storage(pshard).repo(pdisk)
                if not pool.exists():  # the pool's source may be another org's project: seed it too
                    src_disk, src_shard = conn.execute(
                        "SELECT r.disk_path, s.name FROM project_repositories r JOIN shards s ON s.id = r.shard_id "
                        "WHERE r.project_id = %s", (source_id,)).fetchone()
                    src_path = cell.storage(src_shard).repo(src_disk)
                    if not src_path.exists():
                        git.seed_repository(src_path, rng, commits=12, branches=2, tags=2)
                        counts["repositories"] += 1
                    git.create_pool_from(src_path, pool)
                    counts["repositories"] += 1
                src_disk, src_shard = conn.execute(
                    "SELECT r.disk_path, s.name FROM project_repositories r JOIN shards s ON s.id = r.shard_id "
                    "WHERE r.project_id = %s", (pools[pool_id][2],)).fetchone()
                git.create_fork(pool, cell.storage(src_shard).repo(src_disk), path, rng)
            else:
                git.seed_repository(path, rng, commits=rng.randint(5, 15), branches=rng.randint(1, 3), tags=rng.randint(1, 3),
                                    merge_request_refs=2, keep_around=1)
                if pool_id in pools:  # the pool's source project: its pool exists even when its forks are elsewhere
                    pool = cell.storage(pools[pool_id][0]).repo(pools[pool_id][1])
                    if not pool.exists():
                        git.create_pool_from(path, pool)
                        counts["repositories"] += 1
                if rng.random() < 0.3:
                    git.seed_repository(cell.storage(shard).repo(disk, ".wiki.git"), rng, commits=3, branches=0, tags=0,
                                        merge_request_refs=0, keep_around=0)
                    counts["repositories"] += 1
            counts["repositories"] += 1
        for table in ("snippet_repositories", "group_wiki_repositories"):
            for disk, shard in _rows(conn, f"SELECT t.disk_path, s.name FROM {table} t JOIN shards s ON s.id = t.shard_id "
                                           f"WHERE {p[table].where}"):
                path = cell.storage(shard).repo(disk)
                if not path.exists():
                    git.seed_repository(path, rng, commits=3, branches=0, tags=0, merge_request_refs=0, keep_around=0)
                    counts["repositories"] += 1
        by_type: dict[str, list[tuple[str, int]]] = {}
        for t, key, size in object_keys(conn, plan):
            if t in stores:
                by_type.setdefault(t, []).append((key, max(1, min(int(size or 1024), max_object_bytes))))
        for t, items in by_type.items():
            fresh = [(k, n) for k, n in items if stores[t].head(k) is None]
            objects.seed_objects(stores[t], rng, fresh)
            counts["objects"] += len(fresh)
        if reg:
            for i, path in enumerate(container_paths(conn, plan)):
                if i == 0:
                    registry.push_index(reg, path, "latest", rng, shared_layers=shared_layers, layer_size=16_000)
                else:
                    registry.push_image(reg, path, "latest", rng, layers=2, layer_size=16_000, shared_layers=shared_layers)
                registry.push_image(reg, path, f"v{rng.randint(1, 9)}.0", rng, layers=1, layer_size=8_000,
                                    shared_layers=shared_layers)
                counts["images"] += 2
    return counts
