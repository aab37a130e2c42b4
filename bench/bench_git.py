"""Repository replication benchmark (orgmover.git.sync_repository), each number against a baseline measured in
the same run on the same repositories. Run: .venv/bin/python bench/bench_git.py [--repos 40] [--commits 60]

  (1) initial copy of all repositories into an empty target storage, sequential and with 4 threads
        vs  a loop of `git clone --mirror` (the peer); and through the pack protocol (a copy between hosts)
        vs  a loop of `git clone --mirror --no-local`
  (2) incremental re-sync of all repositories after a few pushes (new commits, a force-push, a deleted
      branch, a new and a deleted tag, a push to a fork)
        vs  a second `git clone --mirror` loop (and `--no-local`), and vs `git fetch --prune` in each mirror

orgmover syncs like the DAG would schedule it: the pools first, then every repository with sync_pool=False.
A fresh target is written by orgmover itself: the object files hard-linked and the refs copied (local), or one
pack from `git pack-objects --revs` on the source indexed by `git index-pack --stdin` on the target (pack
protocol, between hosts), instead of `git clone` (see orgmover.git._clone_fresh); the peer keeps `git clone`.

Some repositories use object pools: every group of 8 projects has one pool source, two forks and five plain
projects. sync_repository keeps the forks on the TARGET pool; `clone --mirror` of a fork points it at the
SOURCE pool (its alternates are copied), so the peer does less work there than a real move needs.
Each measure is the median of --rounds rounds (after a warm-up). Sequential copies are timed repository by
repository, orgmover and the peer alternately first, so load from elsewhere on the machine hits both alike;
parallel runs and re-syncs are timed as whole runs, who goes first alternating between rounds. At the end every target is checked against its source
(refs, HEAD, Gitaly checksum, git fsck --connectivity-only on a sample).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from orgmover.git import (GitStorage, checksums_equal, create_fork, create_pool_from, fsck_connectivity, list_refs,
                          repository_checksum, seed_repository, sync_repository)
from orgmover.report import table

ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "B", "GIT_AUTHOR_EMAIL": "b@example.com",
       "GIT_COMMITTER_NAME": "B", "GIT_COMMITTER_EMAIL": "b@example.com", "PATH": "/usr/bin:/bin:/usr/local/bin"}


def git(repo: Path | None, *args: str, input: str | None = None) -> str:
    cmd = ["git"] + (["-C", str(repo)] if repo else []) + list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, input=input, env=ENV).stdout.strip()


def build_source(root: Path, n: int, commits: int, seed: int) -> list[tuple[Path, Path | None, str]]:
    """n projects on storage `root`; returns [(repo, pool or None, disk-relative name)]; pools are not in the list."""
    st = GitStorage("src", root)
    rng = random.Random(seed)
    repos: list[tuple[Path, Path | None, str]] = []
    pid = 0
    while len(repos) < n:
        pid += 1
        group_pos = (pid - 1) % 8
        if group_pos == 0 and len(repos) + 3 <= n:  # a pool source and two forks
            src = st.project(pid)
            seed_repository(src, rng, commits=commits, branches=4, tags=3, merge_request_refs=6, keep_around=2,
                            lfs_pointer=True, environments=1, pipelines=2)
            pool = st.pool(pid)
            create_pool_from(src, pool)
            repos.append((src, pool, str(src.relative_to(root))))
            for k in (1, 2):
                fork = st.project(10_000 + pid * 10 + k)
                create_fork(pool, src, fork, rng, extra_commits=3)
                repos.append((fork, pool, str(fork.relative_to(root))))
            pid += 2
        else:
            src = st.project(pid)
            seed_repository(src, rng, commits=rng.randint(commits // 2, commits * 2), branches=rng.randint(1, 6),
                            tags=rng.randint(1, 4), merge_request_refs=rng.randint(0, 8), keep_around=rng.randint(0, 3),
                            lfs_pointer=rng.random() < 0.3, environments=rng.randint(0, 2), pipelines=rng.randint(0, 3))
            repos.append((src, None, str(src.relative_to(root))))
    return repos


def jobs_for(repos, src_root: Path, dst_root: Path):
    out = []
    for repo, pool, rel in repos:
        dpool = dst_root / pool.relative_to(src_root) if pool is not None else None
        out.append((repo, dst_root / rel, pool, dpool))
    return out


def orgmover_sync(jobs, workers: int = 1, local_clone: bool = True) -> list[dict]:
    """Like the DAG would: each pool once, before its members (which then pass sync_pool=False)."""
    pools = sorted({(sp, dp) for _, _, sp, dp in jobs if sp is not None})

    def pool(p):
        return sync_repository(p[0], p[1], local_clone=local_clone)

    def one(j):
        src, dst, sp, dp = j
        return sync_repository(src, dst, src_pool=sp, dst_pool=dp, local_clone=local_clone, sync_pool=False)

    if workers == 1:
        return [pool(p) for p in pools] + [one(j) for j in jobs]
    with ThreadPoolExecutor(workers) as ex:
        # pools first, then plain repositories, and each pool's members as soon as their pool is done
        pool_futs = {ex.submit(pool, p): p for p in pools}
        futs = [ex.submit(one, j) for j in jobs if j[2] is None]
        for f in as_completed(pool_futs):
            f.result()
            futs += [ex.submit(one, j) for j in jobs if (j[2], j[3]) == pool_futs[f]]
        return [f.result() for f in pool_futs] + [f.result() for f in futs]


def mirror_clone_loop(repos, src_root: Path, dst_root: Path, workers: int = 1, no_local: bool = False) -> None:
    """The peer: `git clone --mirror` of every pool and every repository."""
    pools = sorted({p for _, p, _ in repos if p is not None})
    pairs = [(p, dst_root / p.relative_to(src_root)) for p in pools] + [(r, dst_root / rel) for r, _, rel in repos]

    def one(pair):
        pair[1].parent.mkdir(parents=True, exist_ok=True)
        git(None, "clone", "--mirror", "--quiet", *(["--no-local"] if no_local else []), str(pair[0]), str(pair[1]))

    if workers == 1:
        for pair in pairs:
            one(pair)
    else:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, pairs))


def paired_sequential(repos, src_root: Path, ours_root: Path, peer_root: Path, local: bool = True,
                      flip: bool = False) -> dict[str, dict[str, float]]:
    """Sequential initial copy, orgmover and the peer timed repository by repository, alternately first, so a
    load change on the machine hits both: {kind: {"ours": s, "peer": s}} for kinds plain, pool, member."""
    pools = sorted({p for _, p, _ in repos if p is not None})
    units = [("pool", p, None, str(p.relative_to(src_root))) for p in pools]
    units += [("plain" if p is None else "member", r, p, rel) for r, p, rel in repos]
    out = {k: {"ours": 0.0, "peer": 0.0} for k in ("plain", "pool", "member")}
    for i, (kind, src, pool, rel) in enumerate(units):
        def ours():
            dp = ours_root / pool.relative_to(src_root) if pool is not None else None
            sync_repository(src, ours_root / rel, src_pool=pool, dst_pool=dp, local_clone=local, sync_pool=False)

        def peer():
            (peer_root / rel).parent.mkdir(parents=True, exist_ok=True)
            git(None, "clone", "--mirror", "--quiet", *([] if local else ["--no-local"]), str(src), str(peer_root / rel))

        for name, fn in ((("ours", ours), ("peer", peer)) if (i % 2 == 0) != flip else (("peer", peer), ("ours", ours))):
            out[kind][name] += timed(fn)[0]
    return out


def mirror_fetch_loop(repos, src_root: Path, dst_root: Path) -> None:
    pools = sorted({p for _, p, _ in repos if p is not None})
    for p in [dst_root / p.relative_to(src_root) for p in pools] + [dst_root / rel for _, _, rel in repos]:
        git(p, "fetch", "--prune", "--quiet", "origin")


def push_changes(repos, rng: random.Random, round_no: int) -> str:
    """A few pushes, like an organization that keeps working during the pre-copy: new commits, a force-push, a
    deleted branch with a new tag, a deleted tag (each on another plain repository), a push to a fork."""
    plain = [r for r, p, _ in repos if p is None]
    picks = rng.sample(plain, min(6, len(plain)))
    for i, repo in enumerate(picks):
        refs = list_refs(repo)
        main = refs["refs/heads/main"]
        features = sorted(r for r in refs if r.startswith("refs/heads/feature-"))
        tags = sorted(r for r in refs if r.startswith("refs/tags/"))
        if i == 3 and features:  # force-push: a feature branch rewritten
            br = features[0]
            git(repo, "update-ref", br, _commit(repo, f"{refs[br]}~1", f"rewrite {round_no}"), refs[br])
        elif i == 4 and features:  # a deleted branch and a new tag
            git(repo, "update-ref", "-d", features[-1])
            git(repo, "tag", "-a", "-m", "release", f"v9.{round_no}.0", main)
        elif i == 5 and tags:  # a deleted tag
            git(repo, "update-ref", "-d", tags[0])
        else:  # new commits
            git(repo, "update-ref", "refs/heads/main", _commit(repo, main, f"push {round_no}.{i}"), main)
    fork = rng.choice([r for r, p, _ in repos if p is not None])
    main = list_refs(fork)["refs/heads/main"]
    git(fork, "update-ref", "refs/heads/main", _commit(fork, main, f"fork push {round_no}"), main)
    return f"{len(picks) + 1} of {len(repos)} repositories changed"


def _commit(repo: Path, parent: str, msg: str) -> str:
    blob = git(repo, "hash-object", "-w", "--stdin", input=msg + "\n" + "x" * 2000 + "\n")
    entries = [e for e in git(repo, "ls-tree", f"{parent}^{{tree}}").splitlines() if not e.endswith("\tpushed.txt")]
    tree = git(repo, "mktree", input="\n".join(entries + [f"100644 blob {blob}\tpushed.txt"]) + "\n")
    return git(repo, "commit-tree", tree, "-p", parent, "-m", msg)


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return time.monotonic() - t, r


def verify(repos, src_root: Path, dst_root: Path, fsck_sample: int = 8) -> int:
    bad = []
    for i, (repo, pool, rel) in enumerate(repos):
        dst = dst_root / rel
        if list_refs(dst) != list_refs(repo) or not checksums_equal(repository_checksum(repo), repository_checksum(dst)):
            bad.append(rel)
        if i < fsck_sample or pool is not None:
            fsck_connectivity(dst)
    if bad:
        raise SystemExit(f"VERIFY FAILED: {len(bad)} targets differ from their source: {bad[:5]}")
    return len(repos)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=40)
    ap.add_argument("--commits", type=int, default=60, help="commits on main per repository (plain ones vary 0.5x-2x)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--raw", action="store_true", help="also print every round's timings")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orgmover-bench-git-", dir=a.dir))
    try:
        src_root = work / "src"
        t, repos = timed(build_source, src_root, a.repos, a.commits, a.seed)
        npool = len({p for _, p, _ in repos if p is not None})
        nfork = sum(1 for r, p, _ in repos if p is not None) - npool
        size = subprocess.run(["du", "-sk", str(src_root)], capture_output=True, text=True).stdout.split()[0]
        print(f"seeded {len(repos)} repositories ({npool} pools, {nfork} forks, {int(size) / 1024:.1f} MiB) "
              f"with fast-import in {t:.2f}s\n", flush=True)

        m: dict[str, list[float]] = {k: [] for k in
                                     ("seq", "par", "mirror", "mirror_par", "pack", "mirror_nolocal",
                                      "inc", "inc_mirror", "inc_fetch", "inc_mirror_nolocal")}
        rng = random.Random(a.seed + 1)
        changed = ""
        split: dict[tuple[str, str], list[tuple[float, float]]] = {}
        # warm-up (page cache, git's own start-up), not measured
        orgmover_sync(jobs_for(repos, src_root, work / "warm" / "t"))
        mirror_clone_loop(repos, src_root, work / "warm" / "m")
        shutil.rmtree(work / "warm")
        for rnd in range(a.rounds):
            d = work / f"r{rnd}"
            t1, t2, t3, mm, mp, mn = (d / x for x in ("t1", "t2", "t3", "m1", "m2", "m3"))
            # sequential: paired repository by repository; parallel: whole runs, who goes first alternates
            for key, peer_key, target, peer_dir, local in (("seq", "mirror", t1, mm, True),
                                                          ("pack", "mirror_nolocal", t3, mn, False)):
                kinds = paired_sequential(repos, src_root, target, peer_dir, local, flip=rnd % 2 == 1)
                m[key].append(sum(k["ours"] for k in kinds.values()))
                m[peer_key].append(sum(k["peer"] for k in kinds.values()))
                for kind, v in kinds.items():
                    split.setdefault((key, kind), []).append((v["ours"], v["peer"]))
            par = [(lambda: orgmover_sync(jobs_for(repos, src_root, t2), a.workers), "par"),
                   (lambda: mirror_clone_loop(repos, src_root, mp, a.workers), "mirror_par")]
            for fn, key in (par if rnd % 2 == 0 else par[::-1]):
                m[key].append(timed(fn)[0])
            verify(repos, src_root, t2, fsck_sample=2)
            verify(repos, src_root, t3, fsck_sample=2)
            changed = push_changes(repos, rng, rnd)
            shutil.rmtree(mp)
            shutil.rmtree(mn)
            incs = [(lambda: orgmover_sync(jobs_for(repos, src_root, t1)), "inc"),
                    (lambda: mirror_clone_loop(repos, src_root, mp), "inc_mirror"),
                    (lambda: mirror_fetch_loop(repos, src_root, mm), "inc_fetch"),
                    (lambda: mirror_clone_loop(repos, src_root, mn, 1, True), "inc_mirror_nolocal")]
            for fn, key in (incs if rnd % 2 == 0 else incs[::-1]):
                m[key].append(timed(fn)[0])
            verified = verify(repos, src_root, t1)
            noop = orgmover_sync(jobs_for(repos, src_root, t1))
            assert all(r["created"] + r["updated"] + r["deleted"] == 0 for r in noop), "second sync was not a no-op"
            shutil.rmtree(d)

        med = {k: statistics.median(v) for k, v in m.items()}
        if a.raw:
            for k, v in m.items():
                print(f"  {k:20s} " + " ".join(f"{x:.3f}" for x in v))
        n = len(repos)
        goal = "<= 1.00 (no slower than the peer)"

        def row(measure, ours, peer, peer_name):
            # each round's ratio compares runs made next to each other; the median of those ratios is the verdict
            ratios = sorted(o / p for o, p in zip(m[ours], m[peer]))
            r = round(statistics.median(ratios), 2)
            return [measure, f"{med[ours]:.2f}s", f"{med[peer]:.2f}s {peer_name}",
                    f"{r:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})", goal + ("  ok" if r <= 1.0 else "  MISSED")]

        rows = [
            row(f"(1) initial copy, {n} repos, sequential", "seq", "mirror", "clone --mirror loop"),
            row(f"(1) initial copy, {n} repos, {a.workers} threads", "par", "mirror", "clone --mirror loop"),
            row(f"(1) initial copy, {n} repos, {a.workers} threads", "par", "mirror_par",
                f"clone --mirror, {a.workers} threads"),
            row(f"(1) initial copy via pack protocol, sequential", "pack", "mirror_nolocal",
                "clone --mirror --no-local loop"),
            row(f"(2) incremental re-sync ({changed})", "inc", "inc_mirror", "2nd clone --mirror loop"),
            row(f"(2) incremental re-sync ({changed})", "inc", "inc_fetch", "fetch --prune in each mirror"),
            row(f"(2) incremental re-sync ({changed})", "inc", "inc_mirror_nolocal",
                "2nd clone --mirror --no-local loop"),
        ]
        print(table(["measure", "orgmover", "baseline (same run)", "ratio (range)", "goal"], rows, "lrrrl"))
        counts = {"plain": sum(p is None for _, p, _ in repos), "pool": npool, "member": npool + nfork}
        parts = []
        for key, label in (("seq", "local"), ("pack", "pack protocol")):
            cells = []
            for kind in ("plain", "pool", "member"):
                ours = statistics.median(o for o, _ in split[(key, kind)])
                peer = statistics.median(p for _, p in split[(key, kind)])
                cells.append(f"{counts[kind]} {kind}: {ours:.2f}s vs {peer:.2f}s ({ours / peer:.2f})")
            parts.append(f"  sequential initial copy ({label}), orgmover vs peer by kind: " + "; ".join(cells))
        print("\n" + "\n".join(parts))
        print(f"\ntimes: medians of {a.rounds} rounds; ratio: median (and range) of the per-round ratios.\n"
              f"Every round verified {verified} targets against their sources (refs, HEAD, Gitaly checksum, fsck of "
              f"pooled repos), and a second sync was a no-op.")
        print(f"pools: {npool} pools synced first; forks' alternates point at the target pool "
              f"(clone --mirror of a fork keeps pointing at the SOURCE pool).")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
