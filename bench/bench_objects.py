"""Object storage benchmark: ``orgmover.objects.sync_objects`` against its peers, measured in the same run
on two local S3 servers (moto, one process each, 127.0.0.1). Run: .venv/bin/python bench/bench_objects.py

Seeds N objects (GitLab-shaped keys: artifacts, LFS objects, packages; mostly small, some of a few MiB,
a few large multipart ones) in a bucket of server A, then copies them to server B with

  orgmover   sync_objects(workers=4): both listings, compare, streaming copy checked in flight (objects up to
             64 MiB in one PUT, larger ones part for part)
  boto3 loop a plain sequential get_object / put_object loop (whole objects in memory, no compare)
  rclone     `rclone sync` between the two endpoints (when the rclone binary is installed:
             apt-get install -y rclone), --transfers 4 --checkers 8 --fast-list (one recursive listing instead
             of a listing per "directory" of the hashed paths), once with its default compare (size +
             modification time, a HEAD per object) and once with --checksum (size + MD5)

Measures: (a) a full copy into empty buckets; (b) after rewriting 1% of the objects on A (same keys and
sizes, new bytes), a re-sync of each tool's target (the boto3 loop has no compare, so it copies everything
again: that is what such a loop costs); (c) a re-sync with nothing changed. Each measure runs --rounds
times with the tools interleaved (the order rotates) and keeps each tool's best round, which damps the
noise of a shared machine. Every target is verified against the source after every run (a tool that
missed a change is flagged in the table).
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
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import boto3
from botocore.config import Config

from orgmover.localpg import free_port
from orgmover.objects import (
    PART_SIZE,
    MiB,
    LocalS3,
    S3Store,
    artifact_path,
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


def empty(store: S3Store) -> None:
    keys = [i.key for i in store.list()]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(store.delete, keys))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=300)
    ap.add_argument("--large", type=int, default=5, help="objects of 12..40 MiB (multipart)")
    ap.add_argument("--changed", type=float, default=0.01, help="share of objects rewritten before each re-sync")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per measure, tools interleaved; best round kept")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    objs = plan_objects(args.objects, args.large, rng)
    total = sum(s for _, s in objs)
    root = Path(tempfile.mkdtemp(prefix="orgmover-bench-objects-"))
    a, b = LocalS3(root / "a", free_port()), LocalS3(root / "b", free_port())
    rclone = shutil.which("rclone")
    env = None
    try:
        a.start()
        b.start()
        src = S3Store(a.endpoint, "src")
        src.single_put_max = PART_SIZE  # the large source objects are multipart uploads, as GitLab writes them
        src.ensure_bucket()
        t, _ = timed(seed_objects, src, rng, objs, workers=4)
        print(f"seeded {len(objs)} objects, {total / MiB:.0f} MiB ({args.large} of 12..40 MiB) in {t:.1f}s "
              f"on {a.endpoint}; targets on {b.endpoint}; {args.rounds} rounds per measure", flush=True)
        if rclone:
            env = rclone_env(a.endpoint, b.endpoint)

        # the tools: name -> (title, run(target bucket)); every target is checked after every run
        tools = {
            "orgmover": ("orgmover", lambda bucket: sync_objects(src, S3Store(b.endpoint, bucket), workers=args.workers)),
            "boto3": ("boto3 get/put loop", lambda bucket: naive_copy(a.endpoint, "src", b.endpoint, bucket)),
        }
        if rclone:
            tools["rclone"] = ("rclone sync", lambda bucket: rclone_sync(rclone, env, "src", bucket))
            tools["rclone-c"] = ("rclone sync --checksum", lambda bucket: rclone_sync(rclone, env, "src", bucket, "--checksum"))
        best: dict[tuple[str, str], float] = {}
        missed: dict[tuple[str, str], int] = {}

        def run(measure: str, name: str, bucket: str) -> None:
            t, _ = timed(tools[name][1], bucket)
            bad = verify_objects(src, S3Store(b.endpoint, bucket))
            if bad:  # a tool that did not notice a change: reported, not fatal
                missed[(measure, name)] = max(missed.get((measure, name), 0), len(bad))
                print(f"  {name}: {len(bad)} objects differ from the source after its run, e.g. {bad[:2]}", flush=True)
            best[(measure, name)] = min(best.get((measure, name), float("inf")), t)
            print(f"  {measure:<10} {name:<9} {t:6.2f}s", flush=True)

        def order(r: int) -> list[str]:
            names = list(tools)
            return names[r % len(names):] + names[:r % len(names)]

        # (a) full copy into empty buckets
        for r in range(args.rounds):
            for name in order(r):
                bucket = f"{name}-full-{r}"
                S3Store(b.endpoint, bucket).ensure_bucket()
                run("full", name, bucket)
                if r:  # keep round 0's copies as the targets of the re-syncs, free the others
                    empty(S3Store(b.endpoint, bucket))

        # (b) 1% rewritten on the source (same keys, new bytes, same sizes), then each target re-synced;
        # the boto3 loop has no compare, so it copies everything again
        k = max(1, round(len(objs) * args.changed))
        changed_mib = []
        for r in range(args.rounds):
            changed = rng.sample(objs, k)
            changed_mib.append(sum(n for _, n in changed) / MiB)
            seed_objects(src, random.Random(args.seed + 1 + r), changed)
            for name in order(r):
                run("changed", name, f"{name}-full-0")

        # (c) nothing changed
        for r in range(args.rounds):
            for name in order(r):
                if name != "boto3":
                    run("unchanged", name, f"{name}-full-0")
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)

    labels = {"full": f"full copy ({len(objs)} objects, {total / MiB:.0f} MiB)",
              "changed": f"re-sync, {k} of {len(objs)} changed (~{sum(changed_mib) / len(changed_mib):.1f} MiB)",
              "unchanged": "re-sync, nothing changed"}
    out = []
    for measure in ("full", "changed", "unchanged"):
        om = best[(measure, "orgmover")]
        for name, (title, _) in tools.items():
            if name == "orgmover" or (measure, name) not in best:
                continue
            base = best[(measure, name)]
            if name == "boto3" and measure == "changed":
                title += " (no compare: copies all)"
            if (measure, name) in missed:
                title += f" (missed {missed[(measure, name)]} changes)"
            ratio = om / base
            out.append([labels[measure], f"{om:.2f}s", f"{title}: {base:.2f}s", f"{ratio:.2f}x", "no slower than the peer",
                        "yes" if ratio <= 1.0 else "NO"])
    print()
    print(table(["measure", "orgmover", "baseline", "ratio", "goal", "met"], out, align="lrrrll"))
    if not rclone:
        print("\n(rclone not installed: apt-get install -y rclone to add it as a peer)")
    print(f"\nbest of {args.rounds} interleaved rounds each; machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
          f"both S3 servers are moto (Python) processes on this machine, so client CPU competes with them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
