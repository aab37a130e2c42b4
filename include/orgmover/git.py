"""Gitaly-like repository storages and repository replication with real ``git``.

Everything runs ``git -C <repo> ...`` in a subprocess (no network, no terminal prompts); nothing here
imports Airflow. What this module knows about GitLab (see docs/gitlab-data-model.md, section 5):

- hashed storage: a repository's disk path depends only on its container id, so it is the same on
  the source and on the target storage (:func:`hashed_disk_path`);
- Gitaly's repository checksum (CalculateChecksum), used to verify a replica (:func:`repository_checksum`);
- object pools: forks share objects through a pool repository named in ``objects/info/alternates``.

Replication (:func:`sync_repository`) is incremental and idempotent: it copies ALL refs (branches,
tags, merge-request, keep-around, environment, pipeline refs, ...), applies forced updates, removes
refs deleted on the source and copies HEAD's symbolic target; pool members are re-pointed at the pool
on the target storage. Syncs of the same target repository are serialized with ``flock`` on its
directory (threads and processes), so forks sharing one pool may be synced concurrently.

The seeding helpers (:func:`seed_repository`, :func:`create_pool_from`, :func:`create_fork`) write
deterministic repositories quickly with ``git fast-import`` (one process for all commits).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orgmover.errors import OrgMoverError

__all__ = [
    "GitError", "GitTimeout", "GitStorage", "ZERO_CHECKSUM", "CHECKSUM_REF_PREFIXES", "hashed_disk_path", "sha256_hex",
    "repository_checksum", "refs_fingerprint", "checksums_equal", "list_refs", "alternates_of", "is_repository", "sync_repository",
    "seed_repository", "create_pool_from", "create_fork", "count_objects", "fsck_connectivity",
]

ZERO_CHECKSUM = "0" * 40
# Gitaly's CalculateChecksum keeps HEAD and the refs under these prefixes.
CHECKSUM_REF_PREFIXES = ("refs/heads/", "refs/tags/", "refs/keep-around/", "refs/merge-requests/",
                         "refs/environments/", "refs/notes/")
HASHED_PREFIXES = ("@hashed", "@groups", "@snippets", "@pools")

# Environment variables that would make git look at another repository than the one named by -C.
_REPO_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
             "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES", "GIT_QUARANTINE_PATH")
# Options every git call gets: no prompts, no auto-gc inside a replica being written, file transport allowed.
_BASE_OPTS = ["-c", "protocol.file.allow=always", "-c", "gc.auto=0", "-c", "maintenance.auto=false",
              "-c", "core.quotePath=false"]


class GitError(OrgMoverError):
    """A git command failed; the message names the command, the repository and git's stderr."""

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None):
        self.stderr = stderr
        self.returncode = returncode
        super().__init__(message + (f"\ngit said: {stderr.strip()}" if stderr.strip() else ""))


class GitTimeout(GitError):
    """A git command or a whole sync ran out of its time budget (the git process was killed)."""


# ----------------------------------------------------------------------------------------------- paths

def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hashed_disk_path(prefix: str, container_id: int) -> str:
    """GitLab hashed storage: ``<prefix>/<h[0:2]>/<h[2:4]>/<h>`` with ``h = sha256_hex(str(id))``.

    Append ``.git`` (project, group wiki, snippet, pool), ``.wiki.git`` or ``.design.git``.
    """
    if prefix not in HASHED_PREFIXES:
        raise ValueError(f"unknown hashed-storage prefix {prefix!r}; expected one of {', '.join(HASHED_PREFIXES)}")
    if isinstance(container_id, bool) or not isinstance(container_id, int) or container_id <= 0:
        raise ValueError(f"container id must be a positive integer, got {container_id!r}")
    h = sha256_hex(str(container_id))
    return f"{prefix}/{h[0:2]}/{h[2:4]}/{h}"


class GitStorage:
    """A named repository storage (a Gitaly storage): a directory holding hashed repositories."""

    def __init__(self, name: str, root: Path | str):
        self.name = name
        self.root = Path(root)

    def repo(self, disk_path: str, suffix: str = ".git") -> Path:
        if not disk_path or disk_path.startswith("/") or ".." in Path(disk_path).parts:
            raise ValueError(f"bad disk path {disk_path!r}: must be relative and inside storage {self.name!r}")
        return self.root / f"{disk_path}{suffix}"

    def project(self, project_id: int, kind: str = "") -> Path:
        """The project repository (kind ``""``), its wiki (``"wiki"``) or its design repository (``"design"``)."""
        suffix = {"": ".git", "wiki": ".wiki.git", "design": ".design.git"}[kind]
        return self.repo(hashed_disk_path("@hashed", project_id), suffix)

    def pool(self, pool_id: int) -> Path:
        return self.repo(hashed_disk_path("@pools", pool_id))

    def __repr__(self) -> str:
        return f"GitStorage({self.name!r}, {str(self.root)!r})"


# -------------------------------------------------------------------------------------------- running git

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _REPO_ENV}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true", SSH_ASKPASS="true", LC_ALL="C", LANGUAGE="C",
               GIT_PROTOCOL_FROM_USER="0")
    return env


class _Deadline:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise GitTimeout(f"timed out after {self.timeout:g}s while {what}")
        return left


def _cmd(repo: Path | None, args: tuple[str, ...]) -> list[str]:
    return ["git"] + (["-C", str(repo)] if repo is not None else []) + _BASE_OPTS + list(args)


def _start(repo: Path | None, *args: str, stdin: bool = False) -> subprocess.Popen:
    try:
        return subprocess.Popen(_cmd(repo, args), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    except FileNotFoundError:
        raise GitError("the git executable was not found on PATH") from None


class _Watchdog:
    """Kills git processes that outlive their timeout. One shared daemon thread, started on first use (and again
    in a forked child): a thread per git call would cost a thread start on every short git command, and
    ``communicate(timeout=...)`` ends in a sleep-and-poll wait loop; both add milliseconds under load."""

    TICK = 0.05

    def __init__(self) -> None:
        self._init()
        os.register_at_fork(after_in_child=self._init)

    def _init(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, tuple[float, subprocess.Popen, threading.Event]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, p: subprocess.Popen, timeout: float) -> threading.Event:
        killed = threading.Event()
        with self._lock:
            self._procs[id(p)] = (time.monotonic() + timeout, p, killed)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="orgmover-git-watchdog", daemon=True)
                self._thread.start()
        return killed

    def unwatch(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs.pop(id(p), None)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                expired = [(p, ev) for end, p, ev in self._procs.values() if end <= now]
            for p, ev in expired:
                ev.set()
                try:
                    p.kill()
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


def _finish(p: subprocess.Popen, repo: Path | None, args: tuple[str, ...], input: bytes | None = None,
            timeout: float | None = 600, ok: tuple[int, ...] = (0,), what: str = "") -> subprocess.CompletedProcess:
    killed = _WATCHDOG.watch(p, timeout) if timeout is not None else None
    try:
        out, err = p.communicate(input)
    finally:
        if killed is not None:
            _WATCHDOG.unwatch(p)
    if killed is not None and killed.is_set():
        raise GitTimeout(f"git {_sub(args)} timed out after {timeout:g}s{_on(repo)}{_what(what)}",
                         stderr=(err or b"").decode(errors="replace"))
    if p.returncode not in ok:
        raise GitError(f"git {_sub(args)} failed with exit code {p.returncode}{_on(repo)}{_what(what)}",
                       stderr=err.decode(errors="replace"), returncode=p.returncode)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _git(repo: Path | None, *args: str, input: bytes | None = None, timeout: float | None = 600,
         ok: tuple[int, ...] = (0,), what: str = "") -> subprocess.CompletedProcess:
    p = _start(repo, *args, stdin=input is not None)
    return _finish(p, repo, args, input=input, timeout=timeout, ok=ok, what=what)


def _sub(args: tuple[str, ...]) -> str:
    """The git subcommand of ``args`` (skipping ``-c key=value`` options)."""
    it = iter(args)
    for a in it:
        if a == "-c":
            next(it, None)
        elif not a.startswith("-"):
            return a
    return " ".join(args[:1])


def _on(repo: Path | None) -> str:
    return f" on {repo}" if repo is not None else ""


def _what(what: str) -> str:
    return f" ({what})" if what else ""


def is_repository(path: Path | str) -> bool:
    """A bare repository (HEAD, objects/ and refs/ present); cheap, no subprocess."""
    p = Path(path)
    return (p / "HEAD").is_file() and (p / "objects").is_dir() and (p / "refs").is_dir()


def _require_repo(repo: Path, role: str = "repository") -> None:
    if not is_repository(repo):
        why = "does not exist" if not repo.exists() else "is not a bare git repository"
        raise GitError(f"{role} {repo} {why}")


# --------------------------------------------------------------------------------------------- reading

def _read_head(repo: Path) -> str | None:
    """HEAD as stored: ``ref: refs/heads/main`` (symbolic) or an object id (detached)."""
    try:
        return (repo / "HEAD").read_text().strip() or None
    except FileNotFoundError:
        return None


_FOR_EACH_REF = ("for-each-ref", "--format=%(objectname) %(refname)")


def _parse_refs(out: bytes) -> dict[str, str]:
    refs = {}
    for line in out.decode().splitlines():
        oid, _, name = line.partition(" ")
        refs[name] = oid
    return refs


def _for_each_ref(repo: Path, timeout: float | None = 600) -> dict[str, str]:
    return _parse_refs(_git(repo, *_FOR_EACH_REF, timeout=timeout, what="listing refs").stdout)


def _for_each_ref_both(a: Path, b: Path, timeout: float | None = 600) -> tuple[dict[str, str], dict[str, str]]:
    """The refs of two repositories, listed by two concurrent git processes."""
    procs = [(_start(a, *_FOR_EACH_REF), a), (_start(b, *_FOR_EACH_REF), b)]
    results, error = [], None
    for p, repo in procs:  # reap both, report the first failure
        try:
            results.append(_parse_refs(_finish(p, repo, _FOR_EACH_REF, timeout=timeout, what="listing refs").stdout))
        except GitError as e:
            error = error or e
    if error is not None:
        raise error
    return results[0], results[1]


def _count_refs_files(repo: Path) -> int:
    """Number of refs of a files-backend repository (packed-refs + loose refs), without running git."""
    names = set()
    try:
        for line in (repo / "packed-refs").read_text().splitlines():
            if line and line[0] not in "#^":
                names.add(line.split(" ", 1)[1])
    except FileNotFoundError:
        pass
    root = repo / "refs"
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".lock"):
                names.add(os.path.relpath(os.path.join(d, f), repo))
    return len(names)


def list_refs(repo: Path | str) -> dict[str, str]:
    """Every ref of ``repo`` (``refs/...`` -> object id) plus ``"HEAD"`` -> HEAD as stored, i.e. its
    symbolic target ``"ref: refs/heads/main"`` (or an object id when HEAD is detached).

    Two repositories with equal ``list_refs`` have the same refs, values and default branch. Raises
    :class:`GitError` when ``repo`` is not a repository.
    """
    repo = Path(repo)
    _require_repo(repo)
    refs = _for_each_ref(repo)
    head = _read_head(repo)
    if head is not None:
        refs["HEAD"] = head
    return refs


def _checksum_of_lines(lines: list[str]) -> int:
    acc = 0
    for line in lines:
        oid, _, ref = line.partition(" ")
        if ref == "HEAD" or ref.startswith(CHECKSUM_REF_PREFIXES):
            acc ^= int.from_bytes(hashlib.sha1(f"{oid} {ref}".encode()).digest(), "big")
    return acc


def _format_checksum(n: int) -> str:
    # Gitaly: hex.EncodeToString(bigInt.Bytes()), which drops leading zero bytes; no refs -> 40 zeros.
    return ZERO_CHECKSUM if n == 0 else n.to_bytes((n.bit_length() + 7) // 8, "big").hex()


def repository_checksum(repo: Path | str) -> str | None:
    """Gitaly's CalculateChecksum of ``repo``; ``None`` when the repository does not exist.

    ``git show-ref --head``; keep HEAD and refs under heads/, tags/, keep-around/, merge-requests/,
    environments/, notes/; SHA-1 of ``"<oid> <refname>"`` read as a big integer; XOR of all. Printed like
    Gitaly (hex of the integer's bytes, leading zero bytes dropped), 40 zeros without refs. Compare
    checksums with :func:`checksums_equal`.
    """
    repo = Path(repo)
    if not is_repository(repo):
        return None
    p = _git(repo, "show-ref", "--head", ok=(0, 1), what="calculating the checksum")  # 1: no refs at all
    return _format_checksum(_checksum_of_lines(p.stdout.decode().splitlines()))


def refs_fingerprint(repo: Path | str) -> str | None:
    """A cheap identity of the repository's refs, read from its files without running git: SHA-256 over HEAD,
    ``packed-refs`` and every loose ref (name and content), or, for the reftable backend, over HEAD and
    ``reftable/tables.list`` (tables are immutable, the list changes with every update). ``None`` when
    ``repo`` is not a repository.

    Any ref update (push, force-push, new or deleted branch or tag, a changed default branch) changes it; a
    change that leaves the refs as they were may change it too (``git pack-refs`` moves loose refs into
    ``packed-refs``), which only costs a sync that finds nothing to do. For change detection between passes;
    verification uses :func:`repository_checksum`."""
    repo = Path(repo)
    if not is_repository(repo):
        return None
    h = hashlib.sha256()

    def add(name: str, path: Path) -> None:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        h.update(b"%d:%s\0%d:" % (len(name), name.encode(), len(data)) + data)

    add("HEAD", repo / "HEAD")
    if (repo / "reftable").is_dir():
        add("reftable/tables.list", repo / "reftable" / "tables.list")
        return "reftable:" + h.hexdigest()
    add("packed-refs", repo / "packed-refs")
    loose = []
    for d, dirs, files in os.walk(repo / "refs"):
        for f in files:
            if not f.endswith(".lock"):
                loose.append(os.path.join(d, f))
    for f in sorted(loose):
        add(os.path.relpath(f, repo), Path(f))
    return h.hexdigest()


def checksums_equal(a: str | None, b: str | None) -> bool:
    """Compare two checksums as numbers (Gitaly drops leading zero bytes); ``None`` (no repository) only
    equals ``None``."""
    if a is None or b is None:
        return a is None and b is None
    return int(a, 16) == int(b, 16)


def alternates_of(repo: Path | str) -> Path | None:
    """The repository whose objects ``repo`` borrows (its object pool), from ``objects/info/alternates``;
    ``None`` without alternates. Relative entries are resolved against ``repo/objects`` like git does.
    Returns the pool *repository* (the alternate object directory without its trailing ``objects``)."""
    repo = Path(repo)
    try:
        text = (repo / "objects" / "info" / "alternates").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        objdir = Path(os.path.normpath(repo / "objects" / line))
        return objdir.parent if objdir.name == "objects" else objdir
    return None


def count_objects(repo: Path | str) -> dict[str, int]:
    """``git count-objects -v`` as integers (count, size, in-pack, packs, size-pack, ... ; sizes in KiB)."""
    out = _git(Path(repo), "count-objects", "-v").stdout.decode()
    res = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        try:
            res[k.strip()] = int(v.strip())
        except ValueError:
            pass
    return res


def fsck_connectivity(repo: Path | str, timeout: float = 600) -> None:
    """``git fsck --connectivity-only``; raises :class:`GitError` when objects are missing."""
    _git(Path(repo), "fsck", "--connectivity-only", "--no-progress", timeout=timeout, what="checking connectivity")


def _objects_size(repo: Path) -> int:
    """Bytes of the repository's own object files (loose and packed, not its pool's)."""
    total = 0
    stack = [repo / "objects"]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != "info":
                            stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------------------------------ replication

@contextmanager
def _locked(path: Path, deadline: _Deadline) -> Iterator[None]:
    """Exclusive ``flock`` on the directory ``path`` (created if missing); works across threads and processes."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    pause = 0.001
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                deadline.left(f"waiting for another sync of {path}")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _set_alternates(repo: Path, pool: Path) -> bool:
    """Point ``repo``'s alternates at ``pool`` (relative path, like Gitaly). True when it changed."""
    info = repo / "objects" / "info"
    info.mkdir(parents=True, exist_ok=True)
    want = os.path.relpath(pool / "objects", repo / "objects") + "\n"
    f = info / "alternates"
    try:
        if f.read_text() == want:
            return False
    except FileNotFoundError:
        pass
    tmp = info / "alternates.orgmover-tmp"
    tmp.write_text(want)
    os.replace(tmp, f)
    return True


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def sync_repository(src: Path | str, dst: Path | str, *, src_pool: Path | str | None = None,
                    dst_pool: Path | str | None = None, timeout: float = 600, local_clone: bool = True,
                    sync_pool: bool = True) -> dict:
    """Replicate repository ``src`` into ``dst`` (bare; created when missing). Incremental and idempotent.

    All refs are copied (forced updates applied), refs missing on the source are deleted on the target,
    HEAD's symbolic target is copied. When the source borrows objects from a pool, pass ``src_pool`` (its
    pool) and ``dst_pool`` (the pool on the target storage): the pool is synced first (same function), and
    the target's ``objects/info/alternates`` points at ``dst_pool`` (relative path, like Gitaly) before
    anything is fetched, so objects in the pool are not copied into the target repository. Without pools, a
    source that borrows objects is copied self-contained (the target never points at the source's storage).

    How: an equal target costs two concurrent ``git for-each-ref`` and nothing else; an existing target is
    updated with ``git fetch --prune --force <src> '+refs/*:refs/*'`` (prune first, so a branch replaced by a
    directory of the same name works) or, when refs were only deleted, ``git update-ref --stdin``; a fresh
    target is made with ``git clone --mirror --local`` (object files copied, or hard-linked on the same file
    system; a pool member's clone is re-pointed at ``dst_pool`` and checked with git's connectivity check,
    falling back to init + fetch). ``local_clone=False`` makes fresh copies go through the pack protocol
    (``clone --no-local``, with ``--reference <dst_pool>`` for pool members), like a copy between hosts.
    ``sync_pool=False`` skips the pool's sync, for a caller that has just synced the pool itself (one pool
    sync for all its members, instead of one no-op check per member).

    Returns ``{"created", "updated", "deleted"}`` (refs; HEAD counts as updated when its target changed),
    ``"bytes"`` (size of the object files written, approximate), ``"new_repository"``, ``"method"``
    (``"noop"``, ``"clone"``, ``"fetch"`` or ``"delete"``), ``"seconds"`` and ``"pool"`` (the pool's result or
    None). Counts are computed from the refs listed before the fetch: a push racing the sync is fetched but
    counted on the next sync. Raises :class:`GitError` (with git's stderr) on failure; the target is then
    left as it was or partially updated, and a re-sync completes it.
    """
    t0 = time.monotonic()
    src, dst = Path(src).absolute(), Path(dst).absolute()
    deadline = _Deadline(timeout)
    if (src_pool is None) != (dst_pool is None):
        raise GitError(f"sync of {src}: src_pool and dst_pool go together (got src_pool={src_pool}, "
                       f"dst_pool={dst_pool}); nothing was changed")
    if not is_repository(src):
        why = "does not exist" if not src.exists() else "is not a bare git repository"
        raise GitError(f"cannot sync: source repository {src} {why}; target {dst} was left unchanged")
    if dst.exists() and _same_path(src, dst):
        raise GitError(f"cannot sync {src} onto itself")
    borrowed = alternates_of(src)
    pool_result = None
    src_pool = Path(src_pool).absolute() if src_pool is not None else None
    dst_pool = Path(dst_pool).absolute() if dst_pool is not None else None
    if src_pool is not None:
        if borrowed is not None and not _same_path(borrowed, src_pool):
            raise GitError(f"cannot sync {src}: it borrows objects from {borrowed}, not from src_pool={src_pool}; "
                           f"target {dst} was left unchanged")
        if not sync_pool and not is_repository(dst_pool):
            raise GitError(f"cannot sync {src}: sync_pool=False but the target pool {dst_pool} does not exist; "
                           f"target {dst} was left unchanged")
    if src_pool is not None and sync_pool:
        pool_result = sync_repository(src_pool, dst_pool, timeout=deadline.left(f"syncing pool {src_pool}"),
                                      local_clone=local_clone)

    with _locked(dst, deadline):
        src_head = _read_head(src)
        if (dst / _PARTIAL).exists():  # a fresh copy of ours that was interrupted: made again from scratch
            _empty_dir(dst)
        exists = is_repository(dst)
        if not exists and any(dst.iterdir()):
            raise GitError(f"cannot sync into {dst}: the directory exists, is not empty and is not a git repository; "
                           f"it was left unchanged")
        if exists and dst_pool is not None:
            old_pool = alternates_of(dst)
            if old_pool is not None and not _same_path(old_pool, dst_pool):
                # borrowed from another pool: the new pool may lack what it borrowed; a replica, so copy it afresh
                _empty_dir(dst)
                exists = False
        result = {"created": 0, "updated": 0, "deleted": 0, "bytes": 0, "new_repository": not exists,
                  "method": "noop", "seconds": 0.0, "pool": pool_result}

        if not exists and _clone_fresh(src, dst, dst_pool, local_clone and (dst_pool is not None or borrowed is None),
                                        deadline, borrowed=borrowed):
            result.update(created=_count_refs_files(dst), method="clone", bytes=_objects_size(dst))
            if _read_head(dst) != src_head:
                _copy_head(dst, src_head, deadline)
            result["seconds"] = time.monotonic() - t0
            return result

        if not exists:  # only when a fresh clone's check failed; dst is empty again
            branch = src_head[5:].removeprefix("refs/heads/") if src_head and src_head.startswith("ref: ") else "main"
            _git(None, "init", "--bare", "--quiet", f"--initial-branch={branch}", str(dst),
                 timeout=deadline.left(f"creating {dst}"), what="creating the target repository")
            src_refs, dst_refs = _for_each_ref(src, timeout=deadline.left(f"listing refs of {src}")), {}
        else:
            src_refs, dst_refs = _for_each_ref_both(src, dst, timeout=deadline.left(f"listing refs of {src} and {dst}"))
        if dst_pool is not None:
            _set_alternates(dst, dst_pool)

        created = [r for r in src_refs if r not in dst_refs]
        updated = [r for r in src_refs if r in dst_refs and dst_refs[r] != src_refs[r]]
        deleted = [r for r in dst_refs if r not in src_refs]
        before = _objects_size(dst) if exists else 0
        if created or updated:
            _git(dst, "-c", "fetch.showForcedUpdates=false", "fetch", "--prune", "--force", "--quiet", "--no-tags",
                 "--no-write-fetch-head", "--no-auto-gc", "--no-recurse-submodules", "--", str(src),
                 "+refs/*:refs/*", timeout=deadline.left(f"fetching {src}"), what=f"fetching from {src}")
            result["method"] = "fetch"
        elif deleted:
            stdin = "".join(f"delete {r} {dst_refs[r]}\n" for r in deleted).encode()
            _git(dst, "update-ref", "--stdin", input=stdin, timeout=deadline.left(f"deleting refs in {dst}"),
                 what="deleting refs removed on the source")
            result["method"] = "delete"
        if _read_head(dst) != src_head:
            _copy_head(dst, src_head, deadline)
            if exists:
                updated.append("HEAD")
        result.update(created=len(created), updated=len(updated), deleted=len(deleted),
                      bytes=max(0, _objects_size(dst) - before) if result["method"] == "fetch" else 0,
                      seconds=time.monotonic() - t0)
        return result


def _clone_fresh(src: Path, dst: Path, dst_pool: Path | None, local: bool, deadline: _Deadline,
                 borrowed: Path | None = None) -> bool:
    """Make the fresh target ``dst``. True when done; False (``dst`` empty again) when the caller must init +
    fetch instead.

    ``local``: the source's own object files are hard-linked (copied across file systems; they are immutable)
    and its refs copied, in this process (:func:`_link_copy`, what ``git clone --mirror --local`` does, without
    its two git processes); a repository it cannot read that way (reftable, extensions, shallow, partial
    clone) goes through ``git clone --mirror --local``. A pool member's copy (git copies the SOURCE's alternates) is then pointed at the
    target pool and checked: complete without a check when the source borrowed nothing, or when every object
    file of the source's pool (``borrowed``) is also in the target pool (pack names are content hashes, loose
    objects are named by id; a pool copied by a local clone has the very same files); otherwise git's
    connectivity check over the member's own history (``rev-list --objects --all --not --alternate-refs``),
    which fails when the source relied on objects its pool holds but does not reference: then the caller
    fetches. Not ``local`` (a copy between hosts): one pack of exactly the objects the refs need, made by
    ``git pack-objects`` on the source and indexed by ``git index-pack`` on the target (:func:`_pack_copy`),
    without the objects the target pool already holds for a pool member; or else ``clone --no-local`` through
    the pack protocol, with ``--reference <dst_pool>`` for a pool member so the pool's objects are not sent.
    """
    what = f"cloning {src}"
    if local:
        if not _link_copy(src, dst, deadline):
            _git(None, "clone", "--mirror", "--quiet", "--local", "--", str(src), str(dst),
                 timeout=deadline.left(what), what=what)
            _drop_origin(dst, deadline)
    elif _pack_copy(src, dst, dst_pool, deadline):
        return True
    elif dst_pool is not None:
        _git(None, "clone", "--mirror", "--quiet", "--no-local", "--reference", str(dst_pool), "--", str(src),
             str(dst), timeout=deadline.left(what), what=what)
        _set_alternates(dst, dst_pool)  # relative, like Gitaly (clone wrote an absolute path)
        _drop_origin(dst, deadline)
        return True
    else:
        _git(None, "clone", "--mirror", "--quiet", "--no-local", "--", str(src), str(dst),
             timeout=deadline.left(what), what=what)
        _drop_origin(dst, deadline)
    if dst_pool is None:
        return True
    _set_alternates(dst, dst_pool)
    if borrowed is None or _objects_cover(dst_pool, borrowed):
        return True
    try:
        _git(dst, "rev-list", "--objects", "--all", "--not", "--alternate-refs", "--quiet",
             timeout=deadline.left(f"checking {dst}"), what="checking the clone against the target pool")
        return True
    except GitTimeout:
        raise
    except GitError:
        _empty_dir(dst)
        return False


# ---------------------------------------------------------------------------- fresh copies without git clone

_PARTIAL = "orgmover-partial"  # in a fresh target while this module writes it; removed when the copy is complete
_BARE_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"
_PACK_FILES = (".idx", ".rev", ".bitmap", ".mtimes")  # kept with their pack (not .keep, not temporary files)


class _Vanished(Exception):
    """A source file went away while it was copied (a concurrent repack): the copy is redone by git."""


def _plain_files_repository(repo: Path) -> bool:
    """A bare repository this module may read and write without git: files ref backend, format 0, no
    extensions, not shallow, not a partial clone, not a worktree."""
    if (repo / "reftable").exists() or (repo / "shallow").exists() or (repo / "commondir").exists():
        return False
    try:
        cfg = (repo / "config").read_text()
    except OSError:
        return False
    low = cfg.lower()
    if "[extensions" in low or "repositoryformatversion = 1" in low or "partialclone" in low:
        return False
    try:
        return not any(n.endswith(".promisor") for n in os.listdir(repo / "objects" / "pack"))
    except FileNotFoundError:
        return True


def _snapshot_refs(repo: Path) -> tuple[list[tuple[str, bytes]], bytes | None, bytes] | None:
    """(loose refs as (path relative to ``repo``, content), packed-refs content or None, HEAD content), read
    loose refs first: a ref git packs meanwhile is then still found in packed-refs. None when ``repo`` is
    not a plain files-backend repository (see :func:`_plain_files_repository`)."""
    if not _plain_files_repository(repo):
        return None
    loose = []
    for d, _, files in os.walk(repo / "refs"):
        for f in files:
            if f.endswith(".lock"):
                continue
            path = os.path.join(d, f)
            try:
                loose.append((os.path.relpath(path, repo), Path(path).read_bytes()))
            except FileNotFoundError:  # deleted (or packed) meanwhile: packed-refs, read below, has it if it still exists
                continue
    try:
        packed = (repo / "packed-refs").read_bytes()
    except FileNotFoundError:
        packed = None
    try:
        head = (repo / "HEAD").read_bytes()
    except FileNotFoundError:
        return None
    return sorted(loose), packed, head


def _is_oid(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def _resolve_snapshot(snap: tuple[list[tuple[str, bytes]], bytes | None, bytes]) -> dict[str, str] | None:
    """refname -> object id of a :func:`_snapshot_refs` snapshot (loose refs win over packed ones; symbolic
    refs resolved, dangling ones left out). None when a ref file cannot be understood."""
    loose, packed, _ = snap
    values: dict[str, str] = {}
    for line in (packed or b"").decode(errors="replace").splitlines():
        if not line or line[0] in "#^":
            continue
        oid, _, name = line.partition(" ")
        if not _is_oid(oid) or not name.startswith("refs/"):
            return None
        values[name] = oid
    for rel, content in loose:
        values[rel.replace(os.sep, "/")] = content.decode(errors="replace").strip()
    out: dict[str, str] = {}
    for name, v in values.items():
        for _ in range(6):  # a symbolic ref: its target's value (git copies symbolic refs by value too)
            if not v.startswith("ref: "):
                break
            v = values.get(v[5:].strip(), "")
        if _is_oid(v):
            out[name] = v
        elif v and not v.startswith("ref: "):
            return None  # not an object id: a ref file this module does not understand
    return out


def _object_files(repo: Path) -> list[str]:
    """The repository's own object files, relative to ``objects/``: loose objects first, then every complete
    pack (``.pack`` with its ``.idx``) and its ``.rev``/``.bitmap``/``.mtimes``. Loose objects are listed
    before the packs, so an object a concurrent repack moves from a loose file into a new pack is in one or
    the other; a file deleted before it is copied makes the copy fail (and be redone by git)."""
    objdir = repo / "objects"
    out = []
    with os.scandir(objdir) as it:
        fanout = sorted(e.name for e in it if len(e.name) == 2 and e.is_dir(follow_symlinks=False))
    for d in fanout:
        try:
            out += [f"{d}/{n}" for n in os.listdir(objdir / d) if not n.startswith("tmp")]
        except FileNotFoundError:
            continue
    try:
        names = set(os.listdir(objdir / "pack"))
    except FileNotFoundError:
        names = set()
    for n in sorted(names):
        if n.startswith("pack-") and n.endswith(".pack") and n[:-5] + ".idx" in names:
            out += [f"pack/{n[:-5]}{ext}" for ext in (".pack",) + _PACK_FILES if n[:-5] + ext in names]
    return out


def _start_fresh(dst: Path, head: bytes) -> None:
    for sub in ("objects/pack", "objects/info", "refs/heads", "refs/tags"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    (dst / _PARTIAL).touch()
    (dst / "config").write_text(_BARE_CONFIG)
    (dst / "HEAD").write_bytes(head)


def _link_copy(src: Path, dst: Path, deadline: _Deadline) -> bool:
    """A fresh local copy of ``src`` into the empty ``dst`` without git: refs read first (loose, then
    packed-refs), then the object files hard-linked (copied when the link fails, e.g. across file systems),
    then the refs written; HEAD as in the source; ``src``'s alternates are not copied (the caller points a
    pool member at its target pool). False, with ``dst`` empty again, when ``src`` is not a plain
    files-backend repository or a file vanished meanwhile: the caller then lets git clone it."""
    deadline.left(f"copying {src}")
    snap = _snapshot_refs(src)
    if snap is None:
        return False
    loose, packed, head = snap
    try:
        files = _object_files(src)
        _start_fresh(dst, head)
        link = True
        for i, rel in enumerate(files):
            if i % 256 == 255:
                deadline.left(f"copying {src}")
            a, b = src / "objects" / rel, dst / "objects" / rel
            if "/" in rel and not rel.startswith("pack/"):
                b.parent.mkdir(exist_ok=True)
            try:
                if link:
                    try:
                        os.link(a, b)
                        continue
                    except FileNotFoundError:
                        raise
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                            raise
                        link = False
                shutil.copyfile(a, b)
            except FileNotFoundError as e:
                raise _Vanished(str(a)) from e
        for rel, content in loose:
            p = dst / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        if packed is not None:
            (dst / "packed-refs").write_bytes(packed)
        (dst / _PARTIAL).unlink()
        return True
    except GitTimeout:
        _empty_dir(dst)
        raise
    except (_Vanished, OSError):
        _empty_dir(dst)
        return False


def _pack_copy(src: Path, dst: Path, dst_pool: Path | None, deadline: _Deadline) -> bool:
    """A fresh copy of ``src`` into the empty ``dst`` as between hosts, in one pack: the refs are read from the
    files (one snapshot), ``git pack-objects --revs`` on the source packs exactly the objects they reach
    (minus what the refs of ``dst_pool``, the target pool, reach: the target borrows those) and ``git
    index-pack --stdin`` on the target indexes it; then the refs are written (one sorted packed-refs) and HEAD
    copied. Two git processes instead of ``clone --no-local``'s three and its ref negotiation. False, with
    ``dst`` empty again, when a repository is not plain (see :func:`_plain_files_repository`) or git refused:
    the caller then clones."""
    snap = _snapshot_refs(src)
    refs = _resolve_snapshot(snap) if snap is not None else None
    pool_snap = _snapshot_refs(dst_pool) if dst_pool is not None else None
    have = _resolve_snapshot(pool_snap) if pool_snap is not None else ({} if dst_pool is None else None)
    if refs is None or have is None:
        return False
    head = snap[2]
    tips = set(refs.values())
    detached = head.decode(errors="replace").strip()
    if _is_oid(detached):
        tips.add(detached)
    try:
        _start_fresh(dst, head)
        if dst_pool is not None:
            _set_alternates(dst, dst_pool)
        if tips:
            revs = "".join(f"{o}\n" for o in sorted(tips)) + "".join(f"^{o}\n" for o in sorted(set(have.values())))
            _pack_pipe(src, dst, revs.encode(), deadline)
        if refs:
            (dst / "packed-refs").write_bytes(("# pack-refs with: sorted \n" + "".join(
                f"{refs[n]} {n}\n" for n in sorted(refs, key=lambda n: n.encode()))).encode())
        (dst / _PARTIAL).unlink()
        return True
    except GitTimeout:
        _empty_dir(dst)
        raise
    except (GitError, OSError):
        _empty_dir(dst)
        return False


def _pack_pipe(src: Path, dst: Path, revs: bytes, deadline: _Deadline) -> None:
    """``git -C src pack-objects --revs --stdout < revs | git -C dst index-pack --stdin``, both under the deadline."""
    what = f"copying the objects of {src}"
    pack_args = ("pack-objects", "--revs", "--stdout", "-q", "--delta-base-offset")
    index_args = ("index-pack", "--stdin")
    with tempfile.TemporaryFile() as err1, tempfile.TemporaryFile() as err2:
        try:
            pk = subprocess.Popen(_cmd(src, pack_args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err1,
                                  env=_env())
        except FileNotFoundError:
            raise GitError("the git executable was not found on PATH") from None
        ix = subprocess.Popen(_cmd(dst, index_args), stdin=pk.stdout, stdout=subprocess.DEVNULL, stderr=err2, env=_env())
        pk.stdout.close()
        timeout = deadline.left(what)
        killed = [_WATCHDOG.watch(pk, timeout), _WATCHDOG.watch(ix, timeout)]
        try:
            try:
                pk.stdin.write(revs)
                pk.stdin.close()
            except BrokenPipeError:
                pass
            ix.wait()
            pk.wait()
        finally:
            _WATCHDOG.unwatch(pk)
            _WATCHDOG.unwatch(ix)
        if any(k.is_set() for k in killed):
            raise GitTimeout(f"{what} timed out after {timeout:g}s")
        for p, args, err, repo in ((pk, pack_args, err1, src), (ix, index_args, err2, dst)):
            if p.returncode != 0:
                err.seek(0)
                raise GitError(f"git {args[0]} failed with exit code {p.returncode}{_on(repo)} ({what})",
                               stderr=err.read().decode(errors="replace"), returncode=p.returncode)


def _objects_cover(have: Path, need: Path) -> bool:
    """True when repository ``have`` holds every object file of repository ``need`` (same pack names, same loose
    object paths) and ``need`` borrows from nowhere else: then ``have``'s objects include all of ``need``'s.
    Only directory listings are read; any doubt answers False."""
    if (need / "objects" / "info" / "alternates").exists():
        return False
    src, dst = need / "objects", have / "objects"
    try:
        with os.scandir(src) as it:
            for d in it:
                if d.name == "pack":
                    names = [f.name for f in os.scandir(d.path) if f.name.endswith(".pack")]
                elif len(d.name) == 2 and d.is_dir(follow_symlinks=False):
                    names = [f.name for f in os.scandir(d.path)]
                else:
                    continue
                if names and not all(os.path.exists(dst / d.name / n) for n in names):
                    return False
    except OSError:
        return False
    return True


def _drop_origin(dst: Path, deadline: _Deadline) -> None:
    """Forget the remote ``origin`` (the source's path) that ``clone --mirror`` wrote into the fresh target's config,
    so the replica does not point back at the source storage.

    Not ``git remote remove``: with the mirror refspec it would delete every ref. The section is cut from the
    config under git's own lock protocol (``config.lock`` created exclusively, then renamed over ``config``),
    which saves a git process per repository; anything unexpected falls back to
    ``git config --remove-section remote.origin``.
    """
    cfg, lock = dst / "config", dst / "config.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        fd = None
    if fd is not None:
        try:
            with os.fdopen(fd, "w") as out:
                fd = None
                kept, skipping = [], False
                for line in cfg.read_text().splitlines(keepends=True):
                    if line.lstrip().startswith("["):
                        skipping = line.strip() == '[remote "origin"]'
                    if not skipping:
                        kept.append(line)
                if any(line.lstrip().startswith("[remote") for line in kept):
                    raise ValueError("unexpected remote section")
                out.write("".join(kept))
                os.fchmod(out.fileno(), os.stat(cfg).st_mode & 0o777)
            os.replace(lock, cfg)
            return
        except (OSError, ValueError):
            if fd is not None:
                os.close(fd)
            lock.unlink(missing_ok=True)
    _git(dst, "config", "--remove-section", "remote.origin", ok=(0, 128), timeout=deadline.left(f"configuring {dst}"),
         what="removing the clone's remote")


def _empty_dir(path: Path) -> None:
    for child in list(path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _copy_head(dst: Path, src_head: str | None, deadline: _Deadline) -> None:
    if not src_head:
        return
    if src_head.startswith("ref: "):
        _git(dst, "symbolic-ref", "HEAD", src_head[5:], timeout=deadline.left("setting HEAD"), what="copying HEAD")
    else:
        _git(dst, "update-ref", "--no-deref", "HEAD", src_head, timeout=deadline.left("setting HEAD"),
             what="copying the detached HEAD")


# --------------------------------------------------------------------------------------------- seeding

_EPOCH = 1_600_000_000  # fixed author/committer dates: the same rng seed gives the same object ids
_AUTHORS = [("Ada Lovelace", "ada@example.com"), ("Grace Hopper", "grace@example.com"),
            ("Linus Torvalds", "linus@example.com"), ("Margaret Hamilton", "margaret@example.com")]


class _Stream:
    """Builds a ``git fast-import`` stream."""

    def __init__(self, rng: random.Random, t0: int = _EPOCH):
        self.rng = rng
        self.buf = bytearray(b"feature done\n")
        self.mark = 0
        self.t = t0

    def _data(self, payload: bytes) -> None:
        self.buf += b"data %d\n" % len(payload) + payload + b"\n"

    def _who(self) -> bytes:
        name, mail = self.rng.choice(_AUTHORS)
        self.t += 60 * self.rng.randint(1, 600)
        return f"{name} <{mail}> {self.t} +0000".encode()

    def commit(self, ref: str, parent: str | None, message: str, files: dict[str, bytes],
               merge: str | None = None) -> str:
        self.mark += 1
        who = self._who()
        self.buf += f"commit {ref}\nmark :{self.mark}\n".encode()
        self.buf += b"author " + who + b"\ncommitter " + who + b"\n"
        self._data(message.encode())
        if parent:
            self.buf += f"from {parent}\n".encode()
        if merge:
            self.buf += f"merge {merge}\n".encode()
        for path, content in files.items():
            self.buf += f"M 100644 inline {path}\n".encode()
            self._data(content)
        return f":{self.mark}"

    def reset(self, ref: str, target: str) -> None:
        self.buf += f"reset {ref}\nfrom {target}\n\n".encode()

    def annotated_tag(self, name: str, target: str, message: str) -> None:
        self.buf += f"tag {name}\nfrom {target}\ntagger ".encode() + self._who() + b"\n"
        self._data(message.encode())

    def content(self, lines: int) -> bytes:
        return "".join(f"{self.rng.getrandbits(64):016x} {self.rng.choice(_WORDS)}\n" for _ in range(lines)).encode()

    def change(self, files: list[str], max_files: int = 12) -> dict[str, bytes]:
        """Modify 1-3 files, sometimes adding a new one."""
        out = {}
        if len(files) < max_files and (not files or self.rng.random() < 0.3):
            files.append(f"src/module_{len(files):02d}.txt")
            out[files[-1]] = self.content(self.rng.randint(5, 40))
        for path in self.rng.sample(files, min(len(files), self.rng.randint(1, 3))):
            out[path] = self.content(self.rng.randint(5, 40))
        return out

    def run(self, repo: Path, marks: Path | None = None) -> None:
        self.buf += b"done\n"
        args = ["fast-import", "--quiet", "--date-format=raw", "--force"]
        if marks is not None:
            args.append(f"--export-marks={marks}")
        _git(repo, *args, input=bytes(self.buf), what="writing seed commits")


_WORDS = ["alpha", "beta", "gamma", "delta", "merge", "request", "pipeline", "runner", "issue", "epic", "cell",
          "organization", "namespace", "project", "wiki", "design", "snippet", "pool", "fork", "gitaly"]


def _lfs_pointer(rng: random.Random) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{rng.getrandbits(256):064x}\n"
            f"size {rng.randint(1_000, 50_000_000)}\n").encode()


def seed_repository(path: Path | str, rng: random.Random, *, commits: int = 20, branches: int = 3, tags: int = 2,
                    merge_request_refs: int = 2, keep_around: int = 1, lfs_pointer: bool = False,
                    environments: int = 0, pipelines: int = 0) -> None:
    """Create the bare repository ``path`` (must not exist or be empty) with deterministic content.

    ``commits`` commits on ``main`` (plus a merge of the first branch when there are branches), ``branches``
    branches ``feature-<n>`` forked from main with 1-3 commits each, ``tags`` tags alternating lightweight
    and annotated, ``refs/merge-requests/<iid>/head`` on branch tips, ``refs/keep-around/<sha>`` on commits
    reachable from no other ref, optional ``refs/environments/production/deployments/<n>`` and
    ``refs/pipelines/<n>``; HEAD -> refs/heads/main. With ``lfs_pointer`` the first commit adds a
    ``.gitattributes`` and an LFS pointer file. Fixed dates: the same ``rng`` state gives the same object ids.
    Three git processes in all (init, fast-import, update-ref).
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise GitError(f"cannot seed {path}: it exists and is not empty; it was left unchanged")
    if commits < 1:
        raise ValueError("commits must be >= 1")
    _git(None, "init", "--bare", "--quiet", "--initial-branch=main", str(path), what="creating a seed repository")
    s = _Stream(rng)
    files: list[str] = []
    first = {"README.md": f"# seeded repository {rng.getrandbits(32):08x}\n".encode()}
    first.update(s.change(files))
    if lfs_pointer:
        first[".gitattributes"] = b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
        first["assets/model.bin"] = _lfs_pointer(rng)
    main = [s.commit("refs/heads/main", None, "Initial commit\n", first)]
    split = max(1, commits // 2)
    for i in range(1, split):
        main.append(s.commit("refs/heads/main", main[-1], f"Change {i}: {rng.choice(_WORDS)}\n", s.change(files)))
    tips = []
    for b in range(branches):
        tip = rng.choice(main)
        branch_files = list(files)
        for j in range(rng.randint(1, 3)):
            tip = s.commit(f"refs/heads/feature-{b + 1}", tip, f"feature-{b + 1}: step {j + 1}\n",
                           s.change(branch_files))
        tips.append(tip)
    if tips:
        main.append(s.commit("refs/heads/main", main[-1], "Merge branch 'feature-1' into 'main'\n",
                             s.change(files), merge=tips[0]))
    for i in range(split, commits):
        main.append(s.commit("refs/heads/main", main[-1], f"Change {i}: {rng.choice(_WORDS)}\n", s.change(files)))
    for t in range(tags):
        target = main[min(len(main) - 1, (t + 1) * len(main) // (tags + 1))]
        if t % 2 == 0:
            s.reset(f"refs/tags/v1.{t}.0", target)
        else:
            s.annotated_tag(f"v1.{t}.0", target, f"Release v1.{t}.0\n")
    candidates = tips or main
    for iid in range(1, merge_request_refs + 1):
        s.reset(f"refs/merge-requests/{iid}/head", candidates[(iid - 1) % len(candidates)])
    for n in range(1, environments + 1):
        s.reset(f"refs/environments/production/deployments/{n}", main[-1 - (n - 1) % len(main)])
    for n in range(1, pipelines + 1):
        s.reset(f"refs/pipelines/{1000 + n}", main[-1 - (n - 1) % len(main)])
    dangling = []
    for k in range(keep_around):  # commits only a keep-around ref keeps (e.g. force-pushed away)
        ref = f"refs/keep-around/orgmover-tmp-{k}"
        dangling.append((ref, s.commit(ref, rng.choice(main), f"Rewritten commit {k}\n", s.change(list(files)))))
    if not dangling:
        s.run(path)
        return
    with tempfile.TemporaryDirectory(prefix="orgmover-marks-") as tmp:
        marks = Path(tmp) / "marks"
        s.run(path, marks)
        by_mark = dict(line.split() for line in marks.read_text().splitlines())
    stdin = "".join(f"create refs/keep-around/{by_mark[m]} {by_mark[m]}\ndelete {ref} {by_mark[m]}\n"
                    for ref, m in dangling)
    _git(path, "update-ref", "--stdin", input=stdin.encode(), what="creating keep-around refs")


def create_pool_from(source_repo: Path | str, pool: Path | str) -> None:
    """Make ``pool`` an object pool of ``source_repo`` (GitLab: the pool holds the source's objects; the source
    and its forks borrow them through ``objects/info/alternates``).

    ``git clone --mirror`` of the source into the pool (every ref, so every object stays referenced in the
    pool), alternates of the source -> pool (relative path, like Gitaly), then ``git repack -a -d -l`` in the
    source drops the objects the pool now holds.
    """
    source_repo, pool = Path(source_repo).absolute(), Path(pool).absolute()
    _require_repo(source_repo, "source repository")
    if alternates_of(source_repo) is not None:
        raise GitError(f"{source_repo} already borrows objects from {alternates_of(source_repo)}; nothing was changed")
    if pool.exists() and any(pool.iterdir()):
        raise GitError(f"cannot create pool {pool}: it exists and is not empty; nothing was changed")
    pool.parent.mkdir(parents=True, exist_ok=True)
    _git(None, "clone", "--mirror", "--quiet", "--", str(source_repo), str(pool), what="creating the object pool")
    _set_alternates(source_repo, pool)
    _git(source_repo, "repack", "-a", "-d", "-l", "-q", what="moving the source's objects into the pool")


def create_fork(pool: Path | str, source: Path | str, fork: Path | str, rng: random.Random,
                extra_commits: int = 2) -> None:
    """Create ``fork`` of ``source``: a bare repository borrowing objects from ``pool`` (alternates set before
    anything is fetched, so the source's objects are not copied), with the source's branches and tags, HEAD
    like the source, and ``extra_commits`` commits of its own on ``main``."""
    pool, source, fork = Path(pool).absolute(), Path(source).absolute(), Path(fork).absolute()
    _require_repo(pool, "object pool")
    _require_repo(source, "source repository")
    if fork.exists() and any(fork.iterdir()):
        raise GitError(f"cannot create fork {fork}: it exists and is not empty; nothing was changed")
    head = _read_head(source) or "ref: refs/heads/main"
    branch = head[5:].removeprefix("refs/heads/") if head.startswith("ref: ") else "main"
    _git(None, "init", "--bare", "--quiet", f"--initial-branch={branch}", str(fork), what="creating the fork")
    _set_alternates(fork, pool)
    _git(fork, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-auto-gc", "--", str(source),
         "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", what=f"fetching branches and tags of {source}")
    if extra_commits <= 0:
        return
    s = _Stream(rng, t0=_EPOCH + 86_400 * 365)
    files = [f"fork/notes_{rng.getrandbits(16):04x}.md"]
    parent = f"refs/heads/{branch}^0"
    for i in range(extra_commits):
        parent = s.commit(f"refs/heads/{branch}", parent, f"Fork change {i + 1}\n",
                          {files[0]: s.content(rng.randint(3, 12))})
    s.run(fork)

