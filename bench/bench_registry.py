"""Container image replication benchmark: orgmover.registry.sync_repository against skopeo, in the same run.

Three real distribution registries on 127.0.0.1 (Debian ``docker-registry``): the source cell's,
orgmover's target and skopeo's target (both targets start empty). The source is seeded with
``--repos`` repositories x ``--tags`` tags (GitLab paths, base layers shared by every repository,
one multi-architecture OCI index, one big layer that goes through chunked upload). Then:

  (a) initial sync of every repository into an empty registry
        orgmover: sync_repository() per repository, one client per registry
        skopeo:   `skopeo sync --all --preserve-digests --src docker --dest docker
                   --src-tls-verify=false --dest-tls-verify=false <src>/<repo> <dst>/<parent>` per repository
  (b) incremental re-sync of every repository after 2 new tags were pushed at the source

Both targets are then checked with verify_repository (every tag's digest identical to the source).
Needs: apt-get install -y docker-registry skopeo.
Run: .venv/bin/python bench/bench_registry.py [--repos 20 --tags 3 --layer-size 256000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orgmover.localpg import free_port
from orgmover.registry import (
    LocalRegistry,
    RegistryClient,
    container_repository_path,
    make_layer,
    push_image,
    push_index,
    registry_binary,
    sync_repository,
    verify_repository,
)
from orgmover.report import table


def skopeo_binary() -> str:
    found = shutil.which("skopeo")
    if not found:
        raise SystemExit("skopeo is not installed: apt-get install -y skopeo")
    return found


def skopeo_sync(skopeo: str, src: LocalRegistry, dst: LocalRegistry, repo: str) -> None:
    parent = repo.rsplit("/", 1)[0] if "/" in repo else ""
    dest = f"127.0.0.1:{dst.port}" + (f"/{parent}" if parent else "")
    cmd = [skopeo, "--insecure-policy", "sync", "--all", "--preserve-digests", "--src", "docker", "--dest", "docker",
           "--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times", "3",
           f"127.0.0.1:{src.port}/{repo}", dest]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"skopeo sync failed for {repo}:\n{' '.join(cmd)}\n{r.stderr[-2000:]}")


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return time.monotonic() - t, r


def seed(client: RegistryClient, args) -> dict[str, list[str]]:
    """{repo: [tags]}: ``args.repos`` GitLab-style repositories, ``args.tags`` tags each."""
    rng = random.Random(20240611)
    base = [make_layer(rng, 4 * args.layer_size), make_layer(rng, args.layer_size)]  # in every repository
    repos = [container_repository_path(f"bench-org/group{i % 4}/proj{i:02d}", "app" if i % 3 == 0 else "")
             for i in range(args.repos)]
    seeds = {repo: random.Random(i) for i, repo in enumerate(repos)}

    def one(repo: str) -> tuple[str, list[str]]:
        r = seeds[repo]
        tags = []
        for t in range(args.tags):
            tag = f"v{t + 1}"
            if repo == repos[0] and t == args.tags - 1:
                push_index(client, repo, tag, r, layers=2, layer_size=args.layer_size, shared_layers=base)
            elif repo == repos[1] and t == 0:
                push_image(client, repo, tag, r, layers=1, layer_size=args.big_layer_mb * 1024 * 1024,
                           shared_layers=base)
            else:
                push_image(client, repo, tag, r, layers=args.layers, layer_size=args.layer_size, shared_layers=base)
            tags.append(tag)
        return repo, tags

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, repos))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=20)
    ap.add_argument("--tags", type=int, default=3)
    ap.add_argument("--layers", type=int, default=3, help="new layers per image (plus 2 shared base layers)")
    ap.add_argument("--layer-size", type=int, default=256_000)
    ap.add_argument("--big-layer-mb", type=int, default=24, help="one image with a layer this big (chunked upload)")
    ap.add_argument("--workers", type=int, default=8, help="orgmover: parallel blob copies per repository")
    ap.add_argument("--keep", action="store_true", help="keep the registries' directory")
    args = ap.parse_args()

    registry_binary()
    skopeo = skopeo_binary()
    root = Path(tempfile.mkdtemp(prefix="orgmover-bench-registry-"))
    regs = {n: LocalRegistry(root / n, free_port()) for n in ("source", "orgmover", "skopeo")}
    try:
        for r in regs.values():
            r.start()
        src = RegistryClient(regs["source"].url)
        print(f"seeding {args.repos} repositories x {args.tags} tags on {regs['source'].url}", flush=True)
        t_seed, repos = timed(seed, src, args)
        n_tags = sum(map(len, repos.values()))
        print(f"  seeded {n_tags} tags in {t_seed:.1f}s", flush=True)

        def orgmover_all() -> list[dict]:
            dst = RegistryClient(regs["orgmover"].url)
            try:
                return [sync_repository(src, dst, repo, workers=args.workers) for repo in repos]
            finally:
                dst.close()

        def skopeo_all() -> None:
            for repo in repos:
                skopeo_sync(skopeo, regs["source"], regs["skopeo"], repo)

        print("(a) initial sync into empty registries", flush=True)
        t_om, stats = timed(orgmover_all)
        t_sk, _ = timed(skopeo_all)
        copied = sum(s["blobs_copied"] for s in stats)
        mounted = sum(s["blobs_mounted"] for s in stats)
        mb = sum(s["bytes"] for s in stats) / 1e6
        manifests = sum(s["manifests"] for s in stats)

        print("(b) 2 new tags at the source, incremental re-sync", flush=True)
        rng = random.Random(99)
        names = list(repos)
        for repo in (names[2], names[-1]):
            push_image(src, repo, "new", rng, layers=1, layer_size=args.layer_size)
        t_om2, stats2 = timed(orgmover_all)
        t_sk2, _ = timed(skopeo_all)
        copied2 = sum(s["blobs_copied"] for s in stats2)
        tags2 = sum(s["tags_copied"] for s in stats2)

        print("verifying both targets against the source", flush=True)
        dst_om, dst_sk = RegistryClient(regs["orgmover"].url), RegistryClient(regs["skopeo"].url)
        bad_om = [f"{r}:{t}" for r in repos for t in verify_repository(src, dst_om, r)]
        bad_sk = [f"{r}:{t}" for r in repos for t in verify_repository(src, dst_sk, r)]
        stored_om = sum(1 for _ in (regs["orgmover"].data_dir / "docker/registry/v2/blobs").rglob("data"))
        stored_sk = sum(1 for _ in (regs["skopeo"].data_dir / "docker/registry/v2/blobs").rglob("data"))

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "-"

        goal = "no slower than the peer (<= 1.00x)"
        rows = [
            [f"(a) initial sync, {len(repos)} repos / {n_tags} tags / {mb:.0f} MB",
             f"{t_om:.2f}s", f"{t_sk:.2f}s", ratio(t_om, t_sk), goal],
            [f"(b) incremental re-sync after 2 new tags", f"{t_om2:.2f}s", f"{t_sk2:.2f}s", ratio(t_om2, t_sk2), goal],
            ["tags whose digest differs from the source", str(len(bad_om)), str(len(bad_sk)), "-", "0 for both"],
            ["blobs+manifests stored on the target", str(stored_om), str(stored_sk), "-", "equal"],
        ]
        print()
        print(table(["measure", "orgmover", "baseline skopeo", "ratio", "goal"], rows))
        print()
        print(f"orgmover (a): {copied} blobs pulled+pushed ({mb:.1f} MB), {mounted} mounted from another target "
              f"repository, {manifests} manifests; (b): {copied2} blobs copied, {tags2} tags written; "
              f"{args.workers} parallel blob copies per repository, repositories one after the other "
              f"(skopeo: one `skopeo sync` process per repository, its own layer parallelism).")
        if bad_om or bad_sk:
            print(f"MISMATCH orgmover={bad_om[:5]} skopeo={bad_sk[:5]}")
            return 1
        return 0
    finally:
        for r in regs.values():
            r.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())
