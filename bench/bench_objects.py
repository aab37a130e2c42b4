"""Object storage benchmark: ``orgmover.objects.sync_objects`` against its peers, measured in the same run
on two local S3 servers (moto, one process each, 127.0.0.1). Run: .venv/bin/python bench/bench_objects.py

Seeds N objects (GitLab-shaped keys: artifacts, LFS objects, packages; mostly small, some of a few MiB,
a few large multipart ones) in a bucket of server A, then copies them to server B with

  orgmover   sync_objects(workers=4): listing + compare + streaming copy + in-flight checks
  boto3 loop a plain sequential get_object / put_object loop (whole objects in memory, no compare)
  rclone     `rclone sync` between the two endpoints (when the rclone binary is installed:
             apt-get install -y rclone), --transfers 4 --checkers 8 --fast-list (one recursive listing instead
             of a listing per "directory" of the hashed paths), once with its default compare (size +
             modification time, a HEAD per object) and once with --checksum (size + MD5)

and, after rewriting 1% of the objects on A, an incremental re-sync of each target (the boto3 loop has
no compare, so it copies everything again: that is what such a loop costs), then a re-sync with
nothing changed. Every target is verified against the source after every step.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import boto3
from botocore.config import Config

from orgmover.objects import (
    MiB,
    LocalS3,
    S3Store,
    artifact_path,
    free_port,
    lfs_path,
    package_path,
    seed_objects,
    sync_objects,
    verify_objects,
)
from orgmover.report import table


def plan_objects(n: int, large: int, rng: random.Random) -> list[tuple[str, int]]:
    """GitLab-shaped keys; sizes: ~85% 1 KiB..256 KiB (log-uniform), ~15% 256 KiB..6 MiB, ``large`` 12..40 MiB."""
    out = []
    for i in range(n):
        if i < large:
            size = rng.randint(12 * MiB, 40 * MiB)
        elif rng.random() < 0.15:
            size = int(2 ** rng.uniform(18, 22.6))
        else:
            size = int(2 ** rng.uniform(10, 18))
        kind = i % 3
        if kind == 0:
            key = artifact_path(rng.randint(1, 5000), date(2024, 1, 1) + timedelta(days=rng.randint(0, 600)),
                                rng.randint(1, 10**7), i, "artifacts.zip")
        elif kind == 1:
            key = lfs_path("%064x" % rng.getrandbits(256))
        else:
            key = package_path(rng.randint(1, 5000), rng.randint(1, 10**6), i, f"pkg-{i}.tgz")
        out.append((key, size))
    return out


def naive_copy(src_endpoint: str, src_bucket: str, dst_endpoint: str, dst_bucket: str) -> int:
    """The baseline: list, then get_object + put_object for every object, one after the other."""
    cfg = Config(s3={"addressing_style": "path"})
    kw = dict(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1", config=cfg)
    s = boto3.client("s3", endpoint_url=src_endpoint, **kw)
    d = boto3.client("s3", endpoint_url=dst_endpoint, **kw)
    n = 0
    for page in s.get_paginator("list_objects_v2").paginate(Bucket=src_bucket):
        for o in page.get("Contents", ()):
            body = s.get_object(Bucket=src_bucket, Key=o["Key"])["Body"].read()
            d.put_object(Bucket=dst_bucket, Key=o["Key"], Body=body)
            n += len(body)
    return n


def rclone_env(a: str, b: str) -> dict[str, str]:
    # AWS_CA_BUNDLE (set on some machines) makes rclone's AWS SDK fail on plain-HTTP endpoints
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    for name, ep in (("A", a), ("B", b)):
        p = f"RCLONE_CONFIG_{name}_"
        env.update({p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENDPOINT": ep, p + "ACCESS_KEY_ID": "test",
                    p + "SECRET_ACCESS_KEY": "test", p + "REGION": "us-east-1", p + "FORCE_PATH_STYLE": "true"})
    return env


def rclone_sync(rclone: str, env: dict, src_bucket: str, dst_bucket: str, *extra: str) -> None:
    subprocess.run([rclone, "sync", f"A:{src_bucket}", f"B:{dst_bucket}", "--transfers", "4", "--checkers", "8",
                    "--fast-list", "--s3-no-check-bucket", "-q", *extra], env=env, check=True)


def timed(fn, *a, **kw):
    t = time.monotonic()
    r = fn(*a, **kw)
    return time.monotonic() - t, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=300)
    ap.add_argument("--large", type=int, default=5, help="objects of 12..40 MiB (multipart)")
    ap.add_argument("--changed", type=float, default=0.01, help="share of objects rewritten before the re-sync")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    objs = plan_objects(args.objects, args.large, rng)
    total = sum(s for _, s in objs)
    root = Path(tempfile.mkdtemp(prefix="orgmover-bench-objects-"))
    a, b = LocalS3(root / "a", free_port()), LocalS3(root / "b", free_port())
    rclone = shutil.which("rclone")
    rows: list[list] = []
    try:
        a.start()
        b.start()
        src = S3Store(a.endpoint, "src")
        targets = {"om": S3Store(b.endpoint, "dst-orgmover"), "naive": S3Store(b.endpoint, "dst-boto3"),
                   "rclone": S3Store(b.endpoint, "dst-rclone")}
        for s in (src, *targets.values()):
            s.ensure_bucket()
        t, _ = timed(seed_objects, src, rng, objs, workers=4)
        print(f"seeded {len(objs)} objects, {total / MiB:.0f} MiB ({args.large} of 12..40 MiB) in {t:.1f}s "
              f"on {a.endpoint}; targets on {b.endpoint}", flush=True)
        env = rclone_env(a.endpoint, b.endpoint) if rclone else None

        missed: dict[str, int] = {}

        def check(name: str) -> None:
            bad = verify_objects(src, targets[name])
            if bad:  # a peer that did not notice a change: reported, not fatal
                missed[name] = len(bad)
                print(f"{name}: {len(bad)} objects differ from the source after its sync, e.g. {bad[:2]}", flush=True)

        peers = [("rclone sync", "rclone", ()), ("rclone sync --checksum", "rclone-c", ("--checksum",))] if rclone else []
        for _, name, _ in peers[1:]:
            targets[name] = S3Store(b.endpoint, f"dst-{name}")
            targets[name].ensure_bucket()

        def run_peers(label: str) -> None:
            for title, name, extra in peers:
                t, _ = timed(rclone_sync, rclone, env, "src", targets[name].bucket, *extra)
                check(name)
                rows.append([label, t_om, title + (f" (missed {missed[name]})" if name in missed else ""), t])

        # (a) full copy
        t_om, r = timed(sync_objects, src, targets["om"], workers=args.workers)
        assert r["failed"] == 0 and r["copied"] == len(objs), r
        check("om")
        t_naive, _ = timed(naive_copy, a.endpoint, "src", b.endpoint, "dst-boto3")
        check("naive")
        label = f"full copy ({len(objs)} objects, {total / MiB:.0f} MiB)"
        rows.append([label, t_om, "boto3 get/put loop", t_naive])
        run_peers(label)

        # (b) 1% rewritten on the source (same keys, new bytes, same sizes), then re-sync each target
        k = max(1, round(len(objs) * args.changed))
        changed = rng.sample(objs, k)
        seed_objects(src, random.Random(args.seed + 1), changed)
        label = f"re-sync, {k} of {len(objs)} changed ({sum(s for _, s in changed) / MiB:.1f} MiB)"
        t_om, r = timed(sync_objects, src, targets["om"], workers=args.workers)
        assert r["failed"] == 0 and r["copied"] == k, r
        check("om")
        t_naive, _ = timed(naive_copy, a.endpoint, "src", b.endpoint, "dst-boto3")
        check("naive")
        rows.append([label, t_om, "boto3 loop (no compare: copies all)", t_naive])
        run_peers(label)

        # (c) nothing changed
        t_om, r = timed(sync_objects, src, targets["om"], workers=args.workers)
        assert r["copied"] == 0 and r["failed"] == 0, r
        run_peers("re-sync, nothing changed")
        assert "om" not in missed
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)

    out = []
    for measure, om, peer, base in rows:
        ratio = om / base
        out.append([measure, f"{om:.2f}s", f"{peer}: {base:.2f}s", f"{ratio:.2f}x", "no slower than the peer",
                    "yes" if ratio <= 1.0 else "NO"])
    print()
    print(table(["measure", "orgmover", "baseline", "ratio", "goal", "met"], out, align="lrrrll"))
    if not rclone:
        print("\n(rclone not installed: apt-get install -y rclone to add it as a peer)")
    print(f"\nmachine: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
          f"both S3 servers are moto processes on this machine, so their speed bounds every tool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
