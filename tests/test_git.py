"""Gitaly-like storages and repository replication (orgmover.git), with real git in temporary directories."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orgmover.errors import OrgMoverError
from orgmover.git import (ZERO_CHECKSUM, GitError, GitStorage, GitTimeout, alternates_of, checksums_equal,
                          count_objects, create_fork, create_pool_from, fsck_connectivity, hashed_disk_path, list_refs,
                          refs_fingerprint, repository_checksum, seed_repository, sync_repository)

ENV = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "T",
       "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_AUTHOR_DATE": "1700000000 +0000",
       "GIT_COMMITTER_DATE": "1700000000 +0000", "GIT_TERMINAL_PROMPT": "0"}


def git(repo: Path, *args: str, input: str | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=ENV,
                          input=input).stdout.strip()


def new_commit(repo: Path, parent: str, msg: str) -> str:
    """A commit on top of ``parent`` changing one file (what a push would bring)."""
    blob = git(repo, "hash-object", "-w", "--stdin", input=f"{msg}\n")
    base = git(repo, "rev-parse", f"{parent}^{{tree}}")
    # merge the one-file tree into the parent's tree
    entries = git(repo, "ls-tree", base).splitlines()
    entries = [e for e in entries if not e.endswith("\tpushed.txt")] + [f"100644 blob {blob}\tpushed.txt"]
    tree = git(repo, "mktree", input="\n".join(entries) + "\n")
    return git(repo, "commit-tree", tree, "-p", parent, "-m", msg)


def independent_checksum(repo: Path) -> str:
    """Gitaly's CalculateChecksum written again from the doc, on `git show-ref --head` output."""
    p = subprocess.run(["git", "-C", str(repo), "show-ref", "--head"], capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr
    keep = re.compile(r"^(HEAD|refs/(heads|tags|keep-around|merge-requests|environments|notes)/)")
    acc = 0
    for line in p.stdout.splitlines():
        oid, ref = line.split(" ", 1)
        if keep.match(ref):
            acc ^= int(hashlib.sha1(f"{oid} {ref}".encode()).hexdigest(), 16)
    if acc == 0:
        return "0" * 40
    return acc.to_bytes(20, "big").lstrip(b"\0").hex()


def assert_same(src: Path, dst: Path) -> None:
    assert list_refs(dst) == list_refs(src)
    assert checksums_equal(repository_checksum(src), repository_checksum(dst))
    assert repository_checksum(dst) == independent_checksum(dst)


@pytest.fixture()
def seeded(tmp_path) -> Path:
    repo = tmp_path / "src" / "project.git"
    seed_repository(repo, random.Random(42), commits=30, branches=3, tags=3, merge_request_refs=3, keep_around=2,
                    lfs_pointer=True, environments=1, pipelines=1)
    return repo


# ------------------------------------------------------------------------------------------------ paths

def test_hashed_disk_path_and_storage(tmp_path):
    h1 = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
    assert hashlib.sha256(b"1").hexdigest() == h1
    assert hashed_disk_path("@hashed", 1) == f"@hashed/6b/86/{h1}"
    for prefix in ("@groups", "@snippets", "@pools"):
        assert hashed_disk_path(prefix, 1) == f"{prefix}/6b/86/{h1}"
    h2 = hashlib.sha256(b"2").hexdigest()
    assert hashed_disk_path("@hashed", 2) == f"@hashed/{h2[:2]}/{h2[2:4]}/{h2}"
    with pytest.raises(ValueError):
        hashed_disk_path("@nope", 1)
    with pytest.raises(ValueError):
        hashed_disk_path("@hashed", 0)
    st = GitStorage("default", tmp_path)
    assert st.repo(hashed_disk_path("@hashed", 1)) == tmp_path / f"@hashed/6b/86/{h1}.git"
    assert st.repo(hashed_disk_path("@hashed", 1), ".wiki.git").name == f"{h1}.wiki.git"
    assert st.project(1, "design").name == f"{h1}.design.git"
    assert st.pool(1) == tmp_path / f"@pools/6b/86/{h1}.git"
    with pytest.raises(ValueError):
        st.repo("../escape")


# --------------------------------------------------------------------------------------------- checksum

def test_checksum_empty_missing_and_independent(tmp_path, seeded):
    empty = tmp_path / "empty.git"
    git(tmp_path, "init", "--bare", "-q", str(empty))
    assert repository_checksum(empty) == ZERO_CHECKSUM == independent_checksum(empty)
    assert repository_checksum(tmp_path / "missing.git") is None
    cs = repository_checksum(seeded)
    assert cs == independent_checksum(seeded) and cs != ZERO_CHECKSUM
    # refs outside the checksummed namespaces do not count; the ones inside do
    git(seeded, "update-ref", "refs/pipelines/999", "refs/heads/main")
    assert repository_checksum(seeded) == cs
    git(seeded, "update-ref", "refs/notes/commits", "refs/heads/main")
    assert repository_checksum(seeded) != cs and repository_checksum(seeded) == independent_checksum(seeded)
    # Gitaly drops leading zero bytes: compare as numbers
    assert checksums_equal("00" + "ab" * 19, "ab" * 19) and checksums_equal(ZERO_CHECKSUM, "0")
    assert not checksums_equal(cs, None) and checksums_equal(None, None)


def test_seeded_repository_has_all_ref_kinds_and_is_deterministic(tmp_path, seeded):
    refs = list_refs(seeded)
    assert refs["HEAD"] == "ref: refs/heads/main"
    kinds = {r.split("/")[1] for r in refs if r != "HEAD"}
    assert kinds == {"heads", "tags", "merge-requests", "keep-around", "environments", "pipelines"}
    assert sum(r.startswith("refs/heads/feature-") for r in refs) == 3
    assert all(re.fullmatch(r"refs/merge-requests/\d+/head", r) for r in refs if r.startswith("refs/merge-requests/"))
    for r in refs:
        if r.startswith("refs/keep-around/"):
            assert r.rsplit("/", 1)[1] == refs[r]
            # kept only by its keep-around ref
            assert git(seeded, "branch", "--contains", refs[r]) == ""
    tag_types = {git(seeded, "cat-file", "-t", refs[r]) for r in refs if r.startswith("refs/tags/")}
    assert tag_types == {"commit", "tag"}  # lightweight and annotated
    assert int(git(seeded, "rev-list", "--count", "main")) >= 30
    assert "git-lfs.github.com/spec/v1" in git(seeded, "cat-file", "-p", "main:assets/model.bin")
    fsck_connectivity(seeded)
    again = tmp_path / "again.git"
    seed_repository(again, random.Random(42), commits=30, branches=3, tags=3, merge_request_refs=3, keep_around=2,
                    lfs_pointer=True, environments=1, pipelines=1)
    assert list_refs(again) == refs


# ------------------------------------------------------------------------------------------ replication

@pytest.mark.parametrize("how", ["clone", "pack", "into-empty"])
def test_full_sync(tmp_path, seeded, how):
    dst = tmp_path / "dst" / "@hashed" / "project.git"
    if how == "into-empty":
        git(tmp_path, "init", "--bare", "-q", "-b", "main", str(dst))
    res = sync_repository(seeded, dst, local_clone=(how != "pack"))
    assert_same(seeded, dst)
    n = len(list_refs(seeded)) - 1
    assert (res["created"], res["updated"], res["deleted"]) == (n, 0, 0)
    assert res["method"] == ("fetch" if how == "into-empty" else "clone") and res["bytes"] > 0
    assert alternates_of(dst) is None
    fsck_connectivity(dst)
    # the target does not remember the source (clone --mirror's remote is dropped)
    assert subprocess.run(["git", "-C", str(dst), "config", "--get-regexp", "^remote\\."],
                          capture_output=True).stdout == b""


@pytest.mark.parametrize("local", [True, False])
def test_fresh_copy_without_git_clone_is_complete(tmp_path, seeded, local):
    """A fresh target is written by this module (object files hard-linked, or one pack from pack-objects |
    index-pack) instead of git clone: git's full fsck passes, refs (a symbolic one too) and HEAD are the
    source's, a pack without its index in the source is ignored like git ignores it, and a copy interrupted
    midway (its marker left behind) is made again from scratch."""
    from orgmover.git import _PARTIAL

    git(seeded, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    git(seeded, "symbolic-ref", "HEAD", "refs/heads/feature-1")
    git(seeded, "pack-refs", "--all")
    git(seeded, "update-ref", "refs/heads/loose-one", list_refs(seeded)["refs/heads/feature-2"])
    (seeded / "objects" / "pack" / "pack-0123456789abcdef0123456789abcdef01234567.pack").write_bytes(b"PACK junk")
    dst = tmp_path / "dst.git"
    res = sync_repository(seeded, dst, local_clone=local)
    assert res["method"] == "clone" and res["created"] == len(list_refs(seeded)) - 1
    assert not (dst / _PARTIAL).exists()
    assert_same(seeded, dst)
    assert git(dst, "symbolic-ref", "HEAD") == "refs/heads/feature-1"
    git(dst, "fsck", "--full", "--strict", "--no-progress")
    assert git(dst, "config", "core.bare") == "true"
    if local:  # hard links to the source's immutable object files
        packs = [p for p in (dst / "objects" / "pack").iterdir() if p.suffix == ".pack"]
        assert packs and all(p.stat().st_nlink > 1 for p in packs)
    # interrupted: the marker and half the files of a copy are there; the next sync starts again
    broken = tmp_path / "broken.git"
    broken.mkdir()
    (broken / _PARTIAL).touch()
    (broken / "HEAD").write_text("ref: refs/heads/main\n")
    (broken / "objects").mkdir()
    (broken / "refs").mkdir()
    res = sync_repository(seeded, broken, local_clone=local)
    assert res["new_repository"] and res["method"] == "clone" and not (broken / _PARTIAL).exists()
    assert_same(seeded, broken)
    fsck_connectivity(broken)


def test_repositories_this_module_does_not_write_itself_are_cloned_by_git(tmp_path, seeded):
    """A shallow source (or reftable, extensions, a partial clone) is left to git clone, and still synced."""
    shallow = tmp_path / "shallow.git"
    subprocess.run(["git", "clone", "--bare", "--depth", "1", "-q", f"file://{seeded}", str(shallow)], check=True,
                   capture_output=True)
    assert (shallow / "shallow").exists()
    for local in (True, False):
        dst = tmp_path / f"dst-{local}.git"
        res = sync_repository(shallow, dst, local_clone=local)
        assert res["new_repository"] and list_refs(dst) == list_refs(shallow)


def test_incremental_sync(tmp_path, seeded):
    dst = tmp_path / "dst.git"
    sync_repository(seeded, dst)
    refs = list_refs(seeded)
    main, f2 = refs["refs/heads/main"], refs["refs/heads/feature-2"]
    pushed = new_commit(seeded, main, "pushed")
    git(seeded, "update-ref", "refs/heads/main", pushed, main)                        # new commit pushed
    rewritten = new_commit(seeded, f"{f2}~1", "rewritten")
    git(seeded, "update-ref", "refs/heads/feature-2", rewritten, f2)                  # force-push
    git(seeded, "update-ref", "-d", "refs/heads/feature-3")                           # deleted branch
    git(seeded, "tag", "-a", "-m", "new", "v9.0.0", pushed)                           # new tag
    git(seeded, "update-ref", "-d", "refs/tags/v1.0.0")                               # deleted tag
    assert not checksums_equal(repository_checksum(seeded), repository_checksum(dst))
    res = sync_repository(seeded, dst)
    assert (res["created"], res["updated"], res["deleted"]) == (1, 2, 2)
    assert res["method"] == "fetch" and not res["new_repository"]
    assert_same(seeded, dst)
    fsck_connectivity(dst)
    again = sync_repository(seeded, dst)
    assert (again["created"], again["updated"], again["deleted"], again["bytes"]) == (0, 0, 0, 0)
    assert again["method"] == "noop"


def test_refs_fingerprint_changes_with_every_kind_of_ref_update(tmp_path, seeded):
    """The cheap change detector of the replication passes (read from the ref files, no git process): every
    update a user can make to refs changes it, and reading it changes nothing."""
    assert refs_fingerprint(tmp_path / "nothing.git") is None
    seen = {refs_fingerprint(seeded)}
    assert refs_fingerprint(seeded) in seen  # stable while nothing changes
    refs = list_refs(seeded)
    main, f2 = refs["refs/heads/main"], refs["refs/heads/feature-2"]

    def changed(step: str) -> None:
        fp = refs_fingerprint(seeded)
        assert fp not in seen, f"fingerprint unchanged after {step}"
        seen.add(fp)

    pushed = new_commit(seeded, main, "pushed")
    git(seeded, "update-ref", "refs/heads/main", pushed, main)
    changed("a push")
    git(seeded, "update-ref", "refs/heads/feature-2", new_commit(seeded, f"{f2}~1", "rewritten"), f2)
    changed("a force-push")
    git(seeded, "pack-refs", "--all")  # every ref into packed-refs: then updates rewrite packed-refs or add loose refs
    changed("pack-refs")
    git(seeded, "update-ref", "-d", "refs/heads/feature-3")  # a packed ref deleted: packed-refs rewritten
    changed("deleting a packed branch")
    git(seeded, "update-ref", "-d", "refs/tags/v1.0.0")
    changed("deleting a tag")
    git(seeded, "tag", "-a", "-m", "new", "v9.0.0", pushed)
    changed("a new annotated tag")
    git(seeded, "update-ref", "refs/merge-requests/99/head", pushed)
    changed("a new merge-request ref")
    git(seeded, "symbolic-ref", "HEAD", "refs/heads/feature-2")
    changed("a new default branch")
    # a copy with the same refs has the same fingerprint when its ref files are alike (a fresh mirror packs
    # its refs, so it differs from a source with loose refs: a sync that finds nothing to do, never a miss)
    dst = tmp_path / "dst.git"
    sync_repository(seeded, dst)
    git(seeded, "pack-refs", "--all")
    git(dst, "pack-refs", "--all")
    assert list_refs(dst) == list_refs(seeded)
    assert refs_fingerprint(dst) == refs_fingerprint(seeded)


def test_sync_handles_ref_renames_head_changes_and_deletions_only(tmp_path, seeded):
    dst = tmp_path / "dst.git"
    sync_repository(seeded, dst)
    # a branch replaced by a directory of the same name (refs/heads/feature-1 -> refs/heads/feature-1/x)
    f1 = list_refs(seeded)["refs/heads/feature-1"]
    git(seeded, "update-ref", "-d", "refs/heads/feature-1")
    git(seeded, "update-ref", "refs/heads/feature-1/x", f1)
    git(seeded, "symbolic-ref", "HEAD", "refs/heads/feature-2")  # default branch changed
    res = sync_repository(seeded, dst)
    assert (res["created"], res["updated"], res["deleted"]) == (1, 1, 1)
    assert_same(seeded, dst)
    git(seeded, "update-ref", "-d", "refs/pipelines/1001")  # only a deletion: no fetch needed
    res = sync_repository(seeded, dst)
    assert (res["created"], res["updated"], res["deleted"], res["method"]) == (0, 0, 1, "delete")
    assert_same(seeded, dst)


def test_sync_of_an_empty_source_empties_the_target(tmp_path, seeded):
    dst = tmp_path / "dst.git"
    sync_repository(seeded, dst)
    for ref in list_refs(seeded):
        if ref != "HEAD":
            git(seeded, "update-ref", "-d", ref)
    sync_repository(seeded, dst)
    assert list_refs(dst) == {"HEAD": "ref: refs/heads/main"}
    assert repository_checksum(dst) == ZERO_CHECKSUM


def test_corrupted_target_is_detected_and_fixed(tmp_path, seeded):
    dst = tmp_path / "dst.git"
    sync_repository(seeded, dst)
    refs = list_refs(seeded)
    git(dst, "update-ref", "refs/heads/main", refs["refs/heads/feature-1"])   # a ref changed on the target
    git(dst, "update-ref", "refs/merge-requests/77/head", refs["refs/heads/main"])  # a stray ref
    assert not checksums_equal(repository_checksum(seeded), repository_checksum(dst))
    res = sync_repository(seeded, dst)
    assert (res["created"], res["updated"], res["deleted"]) == (0, 1, 1)
    assert_same(seeded, dst)


def test_errors(tmp_path, seeded):
    dst = tmp_path / "dst.git"
    with pytest.raises(GitError, match=r"source repository .*missing\.git does not exist.*left unchanged") as e:
        sync_repository(tmp_path / "missing.git", dst)
    assert isinstance(e.value, OrgMoverError)
    assert not dst.exists()
    with pytest.raises(GitError, match="src_pool and dst_pool go together"):
        sync_repository(seeded, dst, src_pool=seeded)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(GitError, match="not empty"):
        sync_repository(seeded, tmp_path / "junk")
    # a source missing objects: git's stderr is in the message
    sync_repository(seeded, dst)
    new = new_commit(seeded, "main", "will be lost")
    git(seeded, "update-ref", "refs/heads/main", new)
    obj = seeded / "objects" / new[:2] / new[2:]
    obj.unlink()
    with pytest.raises(GitError, match=r"(?s)git fetch.*failed.*git said:") as e:
        sync_repository(seeded, dst)
    assert e.value.stderr


# ------------------------------------------------------------------------------------------------ pools

@pytest.fixture()
def pooled(tmp_path, seeded):
    """source + pool + two forks on the source storage."""
    src = GitStorage("default", tmp_path / "src")
    pool = src.pool(1)
    create_pool_from(seeded, pool)
    forks = [src.project(100 + i) for i in range(2)]
    for i, f in enumerate(forks):
        create_fork(pool, seeded, f, random.Random(i), extra_commits=2)
    return seeded, pool, forks


def test_pool_and_forks_on_source(pooled):
    source, pool, forks = pooled
    assert alternates_of(source) == pool.absolute()
    assert count_objects(source)["in-pack"] + count_objects(source)["count"] == 0
    for f in forks:
        assert alternates_of(f) == pool.absolute()
        assert 0 < count_objects(f)["count"] + count_objects(f)["in-pack"] <= 12
        assert list_refs(f)["refs/heads/main"] != list_refs(source)["refs/heads/main"]
        fsck_connectivity(f)


def test_sync_fork_with_pools(tmp_path, pooled):
    source, pool, forks = pooled
    tgt = GitStorage("cell-1", tmp_path / "tgt")
    tpool = tgt.pool(1)
    for i, f in enumerate(forks):
        # a fresh fork: local clone re-pointed at the target pool, or (pack protocol) clone --reference <target pool>
        res = sync_repository(f, tgt.project(100 + i), src_pool=pool, dst_pool=tpool, local_clone=(i == 0))
        assert res["pool"] is not None and res["method"] == "clone" and res["created"] == len(list_refs(f)) - 1
    res = sync_repository(source, tgt.project(1), src_pool=pool, dst_pool=tpool)
    for f, t in [(source, tgt.project(1))] + [(f, tgt.project(100 + i)) for i, f in enumerate(forks)]:
        assert alternates_of(t) == tpool.absolute()  # the TARGET pool, never the source's
        assert not (t / "objects" / "info" / "alternates").read_text().startswith("/")  # relative, like Gitaly
        own = count_objects(t)
        assert own["count"] + own["in-pack"] <= 12, own
        fsck_connectivity(t)
        assert_same(f, t)
    fsck_connectivity(tpool)
    assert_same(pool, tpool)
    # a push to a fork, then an incremental sync; objects only the fork has land in the fork
    fork = forks[0]
    main = list_refs(fork)["refs/heads/main"]
    git(fork, "update-ref", "refs/heads/main", new_commit(fork, main, "fork push"), main)
    res = sync_repository(fork, tgt.project(100), src_pool=pool, dst_pool=tpool)
    assert (res["created"], res["updated"], res["deleted"]) == (0, 1, 0) and res["pool"]["method"] == "noop"
    assert_same(fork, tgt.project(100))
    fsck_connectivity(tgt.project(100))
    # a caller that synced the pool itself skips the per-member pool check
    res = sync_repository(fork, tgt.project(100), src_pool=pool, dst_pool=tpool, sync_pool=False)
    assert res["pool"] is None and res["method"] == "noop"
    with pytest.raises(GitError, match="target pool .* does not exist"):
        sync_repository(fork, tgt.project(555), src_pool=pool, dst_pool=tmp_path / "nopool.git", sync_pool=False)


def test_fresh_fork_clone_falls_back_to_fetch_when_the_target_pool_lacks_objects(tmp_path, pooled):
    source, pool, forks = pooled
    # the source pool no longer references feature-2's own commits, yet still holds them and the forks use them
    f2 = list_refs(pool)["refs/heads/feature-2"]
    git(pool, "update-ref", "-d", "refs/heads/feature-2")
    git(pool, "update-ref", "-d", "refs/merge-requests/2/head")
    tpool = tmp_path / "tgt" / "pool.git"
    sync_repository(pool, tpool, local_clone=False)  # fetched: only what the pool's refs reach
    assert subprocess.run(["git", "-C", str(tpool), "cat-file", "-e", f2], capture_output=True).returncode != 0
    dst = tmp_path / "tgt" / "fork.git"
    res = sync_repository(forks[0], dst, src_pool=pool, dst_pool=tpool)
    assert res["method"] == "fetch" and res["new_repository"]
    assert alternates_of(dst) == tpool.absolute()
    fsck_connectivity(dst)
    assert_same(forks[0], dst)


def test_fresh_fork_clone_checked_against_a_fetched_target_pool(tmp_path, pooled):
    from orgmover.git import _objects_cover

    source, pool, forks = pooled
    copied, fetched = tmp_path / "tgt" / "copied.git", tmp_path / "tgt" / "fetched.git"
    sync_repository(pool, copied)                      # local clone: the very same object files
    sync_repository(pool, fetched, local_clone=False)  # pack protocol: other packs, same objects
    assert _objects_cover(copied, pool) and not _objects_cover(fetched, pool)
    for tpool in (copied, fetched):  # no check needed / git's connectivity check passes
        dst = tpool.with_suffix(".fork.git")
        res = sync_repository(forks[0], dst, src_pool=pool, dst_pool=tpool, sync_pool=False)
        assert res["method"] == "clone" and alternates_of(dst) == tpool.absolute()
        fsck_connectivity(dst)
        assert_same(forks[0], dst)


def test_target_moved_to_another_pool_is_copied_afresh(tmp_path, pooled):
    _, pool, forks = pooled
    dst = tmp_path / "tgt" / "fork.git"
    sync_repository(forks[0], dst, src_pool=pool, dst_pool=tmp_path / "tgt" / "pool-a.git")
    res = sync_repository(forks[0], dst, src_pool=pool, dst_pool=tmp_path / "tgt" / "pool-b.git")
    assert res["new_repository"] and alternates_of(dst) == (tmp_path / "tgt" / "pool-b.git").absolute()
    fsck_connectivity(dst)
    assert_same(forks[0], dst)


def test_sync_fork_without_pools_is_self_contained(tmp_path, pooled):
    _, pool, forks = pooled
    dst = tmp_path / "standalone.git"
    sync_repository(forks[0], dst)
    assert alternates_of(dst) is None
    assert_same(forks[0], dst)
    fsck_connectivity(dst)
    with pytest.raises(GitError, match="borrows objects from"):
        sync_repository(forks[0], tmp_path / "x.git", src_pool=forks[1], dst_pool=tmp_path / "p.git")


def test_concurrent_syncs_sharing_a_pool(tmp_path, pooled):
    source, pool, forks = pooled
    tgt = GitStorage("cell-1", tmp_path / "tgt")
    jobs = [(source, tgt.project(1))] + [(f, tgt.project(100 + i)) for i, f in enumerate(forks)]
    jobs = jobs * 2  # the same targets twice, concurrently: serialized by the per-repository lock
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda j: sync_repository(j[0], j[1], src_pool=pool, dst_pool=tgt.pool(1)), jobs))
    assert sum(r["new_repository"] for r in results) == 3
    for s, t in jobs:
        assert_same(s, t)
        fsck_connectivity(t)


def test_drop_origin_edits_config_or_falls_back_to_git(tmp_path):
    from orgmover.git import _Deadline, _drop_origin

    repo = tmp_path / "r.git"
    git(tmp_path, "init", "--bare", "-q", str(repo))
    git(repo, "config", "core.logAllRefUpdates", "false")
    base = (repo / "config").read_text()
    variants = ['[remote "origin"]\n\turl = /x\n\tfetch = +refs/*:refs/*\n\tmirror = true\n',
                '[remote "origin"] # odd\n\turl = /x\n[remote "other"]\n\turl = /y\n']
    for extra in variants:
        (repo / "config").write_text(base + extra + "[gc]\n\tauto = 0\n")
        _drop_origin(repo, _Deadline(30))
        remotes = subprocess.run(["git", "-C", str(repo), "config", "--get-regexp", r"^remote\."],
                                 capture_output=True, text=True).stdout
        assert "origin" not in remotes and git(repo, "config", "gc.auto") == "0"
        assert git(repo, "config", "core.logAllRefUpdates") == "false" and not (repo / "config.lock").exists()
    assert "remote.other.url /y" in remotes  # the fallback (git config --remove-section) kept the other remote


def test_timeouts(tmp_path, seeded):
    from orgmover.git import _git

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # git blocks opening it: nobody writes
    with pytest.raises(GitTimeout, match=r"git hash-object timed out after 0.3s"):
        _git(None, "hash-object", str(fifo), timeout=0.3)
    with pytest.raises(GitTimeout, match="timed out"):
        sync_repository(seeded, tmp_path / "dst.git", timeout=0)
