"""Storage replication in the write window: the in-window pass (``mover.replicate_final``) against the first
full pass (``mover.replicate`` before the window), measured in the same run on local cells.
Run: .venv/bin/python bench/bench_storage_window.py [--rows 20000]

Starts its own cells under .orgmover/bench-storage (PostgreSQL, moto S3, GCS emulator, two docker-registry),
seeds one demo-sized organization (Globex: 20k rows and its repositories, objects and images, like
`make demo`), copies its rows, then:

  first pass       mover.replicate: scan, register, sync and verify everything (until converged)
  a few changes    a push (new branch), a deleted branch, a rewritten upload, a new upload (row + object),
                   a new image tag, all on the source, after the first pass
  window pass      maintenance on, rows synced, then mover.replicate_final (timed alone)
  unchanged pass   mover.replicate_final again with nothing changed

then checks the target independently (tests/verify.py: refs of every repository, bytes of every upload and LFS
object, digest of every tag) and prints one table; the goal is a window pass <= 0.1x the first full pass. The
table also compares the dry run's estimate of the first pass (storage.estimate, from a sample measured just
before it) with the real one. A second table times each data kind's scan (what the window pass costs when nothing changed).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", str(ROOT / ".orgmover" / "run"))
Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(ROOT / "tests"))

from orgmover import git, mover, registry  # noqa: E402
from orgmover.devenv import DevEnv  # noqa: E402
from orgmover.replication import Registry  # noqa: E402
from orgmover.report import table  # noqa: E402
from orgmover.seed import OrgSpec, seed  # noqa: E402
from orgmover.storage import estimate, handlers, seed_storage  # noqa: E402
from verify import check_storage  # noqa: E402


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return time.monotonic() - t, r


def change_the_source(cell, org_id: int) -> list[str]:
    """A few changes like an org that keeps working: returns what was done."""
    done = []
    with psycopg.connect(cell.dsn) as c:
        repos = c.execute("SELECT r.disk_path, s.name FROM project_repositories r JOIN projects p ON p.id = r.project_id "
                          "JOIN shards s ON s.id = r.shard_id WHERE p.organization_id = %s AND p.pool_repository_id IS NULL "
                          "ORDER BY r.id LIMIT 2", (org_id,)).fetchall()
        up_id, upload = c.execute("SELECT u.id, u.path FROM uploads u JOIN projects p ON u.model_type = 'Project' "
                                  "AND u.model_id = p.id WHERE p.organization_id = %s ORDER BY u.id LIMIT 1", (org_id,)).fetchone()
        new_upload = f"{random.Random(3).getrandbits(128):032x}/late-file.txt"
        c.execute("INSERT INTO uploads (size, path, checksum, model_id, model_type, uploader, secret, mount_point, store, "
                  "created_at) SELECT 40, %s, checksum, model_id, model_type, uploader, secret, mount_point, store, now() "
                  "FROM uploads WHERE id = %s", (new_upload, up_id))
        path, name = c.execute("SELECT r.path, cr.name FROM container_repositories cr JOIN routes r ON r.source_type = "
                               "'Project' AND r.source_id = cr.project_id JOIN projects p ON p.id = cr.project_id "
                               "WHERE p.organization_id = %s ORDER BY cr.id LIMIT 1", (org_id,)).fetchone()
    (disk, shard), (disk2, shard2) = repos[0], repos[1]
    repo = cell.storage.storage(shard).repo(disk)
    head = git.list_refs(repo)["refs/heads/main"]
    subprocess.run(["git", "-C", str(repo), "update-ref", "refs/heads/late-push", head], check=True)
    done.append("a pushed branch")
    repo2 = cell.storage.storage(shard2).repo(disk2)
    branches = sorted(r for r in git.list_refs(repo2) if r.startswith("refs/heads/feature"))
    if branches:
        subprocess.run(["git", "-C", str(repo2), "update-ref", "-d", branches[0]], check=True)
        done.append("a deleted branch")
    data = b"a new version of the upload, written after the first pass"
    cell.storage.store("uploads").write(upload, iter([data]), len(data))
    done.append("a rewritten upload")
    data = b"a file uploaded after the first pass.....\n"[:40]
    cell.storage.store("uploads").write(new_upload, iter([data]), len(data))
    done.append("a new upload")
    image = registry.container_repository_path(path, name)
    registry.push_image(cell.storage.registry(), image, "late-tag", random.Random(5), layers=1, layer_size=4000)
    done.append("a new image tag")
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="rows of the organization (Globex in the demo: 20k)")
    ap.add_argument("--home", default=str(ROOT / ".orgmover" / "bench-storage"))
    ap.add_argument("--max-object-bytes", type=int, default=2048, help="objects are capped at this size (demo: 2048)")
    ap.add_argument("--verbose", action="store_true", help="print the mover's log with timestamps")
    ap.add_argument("--keep", action="store_true", help="leave the cells running (and their data) at the end")
    args = ap.parse_args()

    t0 = time.monotonic()
    log = (lambda m: print(f"  [{time.monotonic() - t0:7.2f}s] {m}", flush=True)) if args.verbose else (lambda *_: None)
    env = DevEnv(Path(args.home))
    env.down(destroy=True, log=lambda *_: None)
    env.up(ncells=2, log=lambda *_: None)
    try:
        ctx = env.context(log=log)
        legacy, cell1 = env.resolve_cell("legacy"), env.resolve_cell("cell-1")
        org = seed(legacy.dsn, [OrgSpec("Globex", args.rows)], db_key_base=legacy.db_key_base, seed=42, log=lambda *_: None)[0]
        env.topology().create_route(org.id, "legacy")
        with psycopg.connect(legacy.dsn) as c:
            t_seed, counts = timed(seed_storage, c, legacy.storage, [org.id], seed=42, max_object_bytes=args.max_object_bytes)
        print(f"seeded {org.path}: {org.total:,} rows, {counts} in {t_seed:.1f}s", flush=True)

        mid = mover.preflight(ctx, org.id, "legacy", "cell-1", "bench-storage")
        tables = mover.make_plan(ctx, mid)
        mover.prepare_target(ctx, mid)
        for t in tables:
            mover.copy_table(ctx, mid, t)
        mover.precopy_done(ctx, mid)

        # the dry run's estimate of the first pass (from a sample measured now), to compare with the real one
        with legacy.connect() as src:
            t_est, kinds = timed(estimate, src, mover.load_plan(ctx, mid), legacy.storage, cell1.storage)
        est = sum(k.seconds for k in kinds)
        print(f"dry-run estimate of the first pass: {est:.1f}s one item after the other "
              f"({', '.join(f'{k.name} {k.seconds:.1f}s' for k in kinds)}), measured in {t_est:.1f}s", flush=True)

        t_first, status = timed(mover.replicate, ctx, mid)
        items = {k: v["total"] for k, v in status.items()}
        print(f"first full pass: {t_first:.2f}s for {items}", flush=True)

        changes = change_the_source(legacy, org.id)
        mover.maintenance_on(ctx, mid)
        t_rows, _ = timed(mover.sync_all, ctx, mid)
        t_final, _ = timed(mover.replicate_final, ctx, mid)
        print(f"window pass ({', '.join(changes)}): {t_final:.2f}s (rows synced before it in {t_rows:.2f}s)", flush=True)
        t_same, _ = timed(mover.replicate_final, ctx, mid)
        print(f"window pass, nothing changed: {t_same:.2f}s", flush=True)

        problems, checked = check_storage(legacy, cell1, org.id)
        if problems:
            print("TARGET DIFFERS FROM THE SOURCE:\n  " + "\n  ".join(problems[:20]))
            return 1
        print(f"independent check: {checked} identical on both cells", flush=True)

        # each kind's scan + register, nothing changed (the floor of the window pass)
        plan = mover.load_plan(ctx, mid)
        reg = Registry(ctx.tracking, mid)
        scans = []
        with legacy.connect() as src:
            for h in handlers(src, plan, legacy.storage, cell1.storage):
                t_scan, found = timed(h.scan)
                t_reg, r = timed(reg.register, found)
                scans.append([h.kind, f"{len(found):,}", f"{t_scan:.3f}s", f"{t_reg:.3f}s", f"{r['new']} new, {r['changed']} changed"])
        mover.release(ctx, mid)
    finally:
        if not args.keep:
            env.down(destroy=True, log=lambda *_: None)

    goal = "<= 0.1x"
    rows = [
        [f"window pass, {len(changes)} changes", f"{t_final:.2f}s", f"first full pass: {t_first:.2f}s",
         f"{t_final / t_first:.3f}x", goal + ("  ok" if t_final / t_first <= 0.1 else "  MISSED")],
        ["window pass, nothing changed", f"{t_same:.2f}s", f"first full pass: {t_first:.2f}s",
         f"{t_same / t_first:.3f}x", goal + ("  ok" if t_same / t_first <= 0.1 else "  MISSED")],
    ]
    rows.append(["dry-run estimate of the first pass", f"{est:.1f}s (sequential)", f"first full pass: {t_first:.2f}s",
                 f"{est / t_first:.2f}x", "the right order of magnitude"])
    print()
    print(table(["measure", "orgmover", "baseline (same run)", "ratio", "goal"], rows, "lrrrl"))
    print()
    print(table(["data kind", "items", "scan", "register", "found"], scans, "lrrrl"))
    print(f"\n{items}; changes: {', '.join(changes)}; machine: {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
