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
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from orgmover import git, objects, registry
from orgmover.plan import Plan
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


# ------------------------------------------------------------------------------------------ dry run
@dataclass
class KindEstimate:
    """What one data type of an org holds on the source and what replicating it will take, from a measured
    sample: ``seconds = factor * (per_item * items + per_byte * bytes)``, sequential (the replication runs
    several workers per data type, so it takes less)."""

    name: str
    items: int
    bytes: int
    missing: int = 0          # referenced by the rows, absent from the source storage
    detail: str = ""          # e.g. repositories by role, image tags
    sampled: int = 0
    sample_bytes: int = 0
    sample_seconds: float = 0.0
    per_item: float = 0.0     # seconds per item, fitted on the sample (+ the registry's bookkeeping)
    per_byte: float = 0.0     # seconds per byte, fitted on the sample
    factor: float = 1.0       # what the sample could not do (a dry run writes nothing on the target)
    how: str = ""
    samples: list = field(default_factory=list)  # (bytes, seconds) of each sampled item

    @property
    def seconds(self) -> float:
        return self.factor * (self.per_item * self.items + self.per_byte * self.bytes)


def _spread(items: list, k: int) -> list:
    """Up to ``k`` items spread over a sorted list, its first and last included."""
    if len(items) <= k:
        return list(items)
    picked = [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)] if k > 1 else [items[-1]]
    out, seen = [], set()
    for it in picked:
        if id(it) not in seen:
            seen.add(id(it))
            out.append(it)
    return out


def _fit(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(seconds per item, seconds per byte) of ``t = a + b * bytes`` by least squares on the sample, both kept
    >= 0; with one sample, or samples of one size, all of it is per item."""
    if not samples:
        return 0.0, 0.0
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    var = sum((x - mx) ** 2 for x, _ in samples)
    if n < 2 or var == 0:
        return my, 0.0
    b = max(0.0, sum((x - mx) * (y - my) for x, y in samples) / var)
    a = my - b * mx
    if a < 0:  # the sample's cost is all in its bytes
        return 0.0, sum(y for _, y in samples) / max(1, sum(x for x, _ in samples))
    return a, b


def _dir_bytes(path: Path) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


def estimate(src_conn: psycopg.Connection, plan: Plan, src: CellStorage, dst: CellStorage, *, samples: int = 4,
             per_item_overhead: float = 0.0, workers: int = 8) -> list[KindEstimate]:
    """Counts and bytes per data type (repositories; objects per type; container images) of the org on the
    source, and the time their first replication will take, extrapolated from a short measured sample of
    each type (up to ``samples`` items spread over the sizes, timed one by one). Read-only on both cells:

    * repositories: the sample is synced into a temporary directory (what the replication does, into a
      scratch target) and checksummed on both sides; factor 1;
    * objects: each sampled object is looked up (HEAD) and read with its SHA-256 on the source, and looked
      up on the target (where it is absent: a read-only request that measures the target's latency); its
      time counts the copy (HEAD + read on the source, HEAD + write on the target) and the verification
      (a read on the target), a target request moving the bytes at the source's measured rate;
    * images: the sample repositories' tags, manifests and blobs are read from the source; a copy also
      pushes them: factor 2.

    ``per_item_overhead`` (the registry's bookkeeping per item, measured by the caller) is added per item."""
    import tempfile
    import time
    from collections import Counter

    out: list[KindEstimate] = []
    if src.git_storages:
        h = RepositoryHandler(src_conn, plan, src, dst)
        items = h.scan()
        paths = {}
        for it in items:
            if it.fingerprint is not None:
                paths[it.key] = src.storage(it.meta["storage"]).repo(it.meta["disk_path"], it.meta["suffix"])
        size = {k: _dir_bytes(p) for k, p in paths.items()}
        roles = Counter(it.meta.get("role") for it in items)
        e = KindEstimate("repository", len(items), sum(size.values()), len(items) - len(paths),
                         ", ".join(f"{n} {r}" for r, n in sorted(roles.items())), factor=1.0,
                         how="synced into a scratch directory and checksummed on both sides")
        candidates = sorted((it for it in items if it.key in paths and not it.meta.get("pool")), key=lambda i: size[i.key])
        timed = []
        with tempfile.TemporaryDirectory(prefix="orgmover-dry-run-") as tmp:
            for n, it in enumerate(_spread(candidates, samples)):
                t0 = time.monotonic()
                target = Path(tmp) / f"sample-{n}.git"
                git.sync_repository(paths[it.key], target)
                git.repository_checksum(paths[it.key])
                git.repository_checksum(target)
                timed.append((size[it.key], time.monotonic() - t0))
        out.append(_finish(e, timed, per_item_overhead))
    if src.object_stores:
        h = ObjectHandler(src_conn, plan, src, dst)
        by_type: dict[str, list[Replicable]] = {}
        for it in h.scan(workers=workers):
            by_type.setdefault(it.meta["type"], []).append(it)
        for t in sorted(by_type):
            items = by_type[t]
            present = sorted((it for it in items if it.fingerprint is not None), key=lambda i: i.size or 0)
            e = KindEstimate(f"object: {t}", len(items), sum(it.size or 0 for it in present), len(items) - len(present),
                             how="per object: a HEAD and a read (SHA-256) on the source, a HEAD on the target (absent "
                                 "there: read-only); counted as the copy's HEAD + read on the source and, on the "
                                 "target, HEAD + write and the verification's read (each a target request moving the "
                                 "bytes at the source's rate)")
            store, target, timed = h._store("src", t), (h._store("dst", t) if t in dst.object_stores else None), []
            picked = _spread(present, samples)
            for s_ in [store] + ([target] if target is not None and picked else []):  # clients and connections made
                s_.head(picked[0].meta["key"]) if picked else None                  # before the clock starts
            for it in picked:
                key = it.meta["key"]
                t0 = time.monotonic()
                store.head(key)
                t1 = time.monotonic()
                objects.object_checksum(store, key, deep=True)
                t2 = time.monotonic()
                if target is not None:
                    target.head(key)
                t3 = time.monotonic()
                head_src, read, head_dst = t1 - t0, t2 - t1, t3 - t2
                timed.append((it.size or 0, head_src + read + head_dst + 2 * (head_dst + max(0.0, read - head_src))))
            out.append(_finish(e, timed, per_item_overhead))
    if src.registry_url:
        client = src.registry()
        paths = container_paths(src_conn, plan)

        with ThreadPoolExecutor(max(1, workers)) as ex:
            per_repo = dict(zip(paths, ex.map(lambda p: registry.repository_blobs(client, p), paths)))
        unique: dict[str, int] = {}
        for _, found in per_repo.values():
            unique.update(found)
        e = KindEstimate("container_repository", len(paths), sum(unique.values()),
                         detail=f"{sum(n for n, _ in per_repo.values())} tags, {len(unique)} distinct blobs", factor=2.0,
                         how="tags, manifests and blobs read from the source; x2: the copy pushes them")
        timed = []
        for path in _spread(sorted((p for p in paths if per_repo[p][0]), key=lambda p: sum(per_repo[p][1].values())),
                            samples):
            t0 = time.monotonic()
            _, found = registry.repository_blobs(client, path)
            for digest in found:
                for _ in client.get_blob(path, digest):
                    pass
            timed.append((sum(found.values()), time.monotonic() - t0))
        out.append(_finish(e, timed, per_item_overhead))
    return out


def _finish(e: KindEstimate, timed: list[tuple[int, float]], per_item_overhead: float) -> KindEstimate:
    e.samples = list(timed)
    e.sampled, e.sample_bytes, e.sample_seconds = len(timed), sum(b for b, _ in timed), sum(t for _, t in timed)
    e.per_item, e.per_byte = _fit(timed)
    e.per_item += per_item_overhead / max(e.factor, 1e-9)  # bookkeeping is not multiplied by the factor
    return e


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
