"""The Geo-like registry against the real state database, driven by a real handler that replicates
files between two directories (the data kinds' own handlers are tested in their modules)."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from orgmover.replication import (FAILED, PENDING, SYNCED, MissingOnSource, Registry, Replicable, backoff_seconds,
                                  wait_until_complete)


class FileHandler:
    kind = "file"

    def __init__(self, src: Path, dst: Path):
        self.src, self.dst, self.fail_next = src, dst, 0

    def scan(self):
        return [Replicable("file", p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(self.src.iterdir())]

    def sync(self, item):
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("storage answered 503")
        if not (self.src / item.key).exists():
            raise MissingOnSource(item.key)
        shutil.copyfile(self.src / item.key, self.dst / item.key)
        return item.size or 0

    def checksums(self, item):
        def h(p):
            return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
        return h(self.src / item.key), h(self.dst / item.key)


@pytest.fixture()
def registry(devenv, ctx):
    m = ctx.tracking.create(900000000 + random.randint(0, 10**6), "legacy", "cell-1", "replication-test")
    yield Registry(ctx.tracking, m["id"], retry_delay=lambda n, missing: 0.0 if not missing else 3600.0)
    ctx.tracking.update(m["id"], state="rolled_back")


def _rows(reg):
    with reg.t.conn() as c:
        return {r["key"]: r for r in c.execute("SELECT * FROM orgmover.replicables WHERE migration_id = %s", (reg.mid,))}


def test_geo_backoff_formula():
    rng = random.Random(1)
    assert 15 <= backoff_seconds(0, rng=rng) <= 45
    assert backoff_seconds(3, rng=random.Random(2)) >= 3 ** 4 + 15
    assert backoff_seconds(50) == 3600 and backoff_seconds(50, missing_on_primary=True) == 4 * 3600


def test_sync_verify_retry_and_change_during_sync(registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(bytes([i]) * (1000 + i))
    h = FileHandler(src, dst)
    assert registry.register(h.scan()) == {"new": 5, "changed": 0}
    h.fail_next = 2  # the storage fails for a while: recorded, retried, then synced
    assert wait_until_complete(registry, [h], timeout=20, poll=0.05)
    rows = _rows(registry)
    assert all(r["state"] == SYNCED and r["verification_state"] == 2 for r in rows.values())
    assert registry.status()["file"]["file_synced_in_percentage"] == 100.0

    # a change on the source after the pass: the re-scan sends the row back to pending
    (src / "f1").write_bytes(b"changed")
    assert registry.register(h.scan()) == {"new": 0, "changed": 1}
    assert _rows(registry)["f1"]["state"] == PENDING

    # a change while a sync is running: the compare-and-set refuses to mark it synced
    claimed = registry.claim("file")
    assert [r["key"] for r in claimed] == ["f1"]
    (src / "f1").write_bytes(b"changed again")
    registry.register(h.scan())
    assert registry.mark_synced("file", "f1", claimed[0]["generation"]) is False
    assert _rows(registry)["f1"]["state"] == PENDING
    assert wait_until_complete(registry, [h], timeout=10, poll=0.05)
    assert (dst / "f1").read_bytes() == b"changed again"


def test_corrupted_target_goes_back_to_pending_and_is_resynced(registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    h = FileHandler(src, dst)
    registry.register(h.scan())
    registry.run(h)
    (dst / "a").write_bytes(b"rot")  # corruption on the target
    row = registry.claim("file") or []
    assert row == []  # synced rows are not claimed again by themselves
    src_sum, dst_sum = h.checksums(Replicable("file", "a"))
    registry.mark_verified("file", "a", src_sum, dst_sum, src_sum == dst_sum)
    r = _rows(registry)["a"]
    assert r["checksum_mismatch"] and r["state"] == PENDING and "checksum mismatch" in r["verification_failure"]
    registry.run(h)
    assert (dst / "a").read_bytes() == b"a" * 100 and registry.complete()


def test_a_target_that_keeps_corrupting_does_not_loop_forever(registry, tmp_path):
    """Each sync lands damaged (e.g. a faulty target store): after a few re-syncs in one run the item
    is marked failed with its checksums and waits for its backoff; the run returns."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    (src / "b").write_bytes(b"b" * 100)

    class Rotting(FileHandler):
        def sync(self, item):
            n = super().sync(item)
            if item.key == "a":
                (self.dst / "a").write_bytes(b"rot")
            return n

    h = Rotting(src, dst)
    registry.register(h.scan())
    counts = registry.run(h)
    rows = _rows(registry)
    assert counts["mismatch"] == 3 and rows["a"]["state"] == FAILED and rows["a"]["checksum_mismatch"]
    assert "checksum mismatch after 3 syncs" in rows["a"]["last_sync_failure"]
    assert rows["b"]["state"] == SYNCED and rows["b"]["verification_state"] == 2
    assert not registry.complete() and "a" in registry.stuck_report()


def test_timeout_gives_a_readable_list_of_what_is_stuck(registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "ok").write_bytes(b"1")
    h = FileHandler(src, dst)
    items = h.scan() + [Replicable("file", "ghost", 10, "x")]  # referenced, but missing on the source
    registry.register(items)
    assert wait_until_complete(registry, [h], timeout=0.5, poll=0.1) is False
    report = registry.stuck_report()
    assert "1 items not synced and verified" in report
    assert "ghost" in report and "missing on source" in report and "failed" in report
    assert _rows(registry)["ghost"]["state"] == FAILED


def test_register_in_bulk_sends_back_only_what_changed(registry):
    """register reads the registered fingerprints once and writes only new and changed rows: unchanged rows keep
    their state (synced and verified), changed ones go back to pending with a new generation, an item listed
    twice counts once, other kinds are left alone."""
    items = [Replicable("blob", f"k{i:05d}", 10, f"fp{i}", {"n": i}) for i in range(3000)]
    registry.register([Replicable("other", "k00000", 1, "x")])
    assert registry.register(items + items[:5]) == {"new": 3000, "changed": 0}
    with registry.t.conn() as c:
        c.execute("UPDATE orgmover.replicables SET state = 2, verification_state = 2 WHERE migration_id = %s", (registry.mid,))
    assert registry.register(items) == {"new": 0, "changed": 0}
    moved = {f"k{i:05d}" for i in range(0, 3000, 500)}
    again = [Replicable("blob", it.key, 11, "new-" + it.fingerprint, {"n": -1}) if it.key in moved else it for it in items]
    again += [Replicable("blob", "k99998", 1, "a"), Replicable("blob", "k99999", 1, None)]
    assert registry.register(again) == {"new": 2, "changed": len(moved)}
    with registry.t.conn() as c:
        blob = {r["key"]: r for r in c.execute("SELECT * FROM orgmover.replicables WHERE migration_id = %s AND kind = 'blob'",
                                               (registry.mid,))}
        other = c.execute("SELECT * FROM orgmover.replicables WHERE migration_id = %s AND kind = 'other'",
                          (registry.mid,)).fetchone()
    for key in moved:
        r = blob[key]
        assert (r["state"], r["verification_state"], r["generation"], r["size"], r["meta"]) == (PENDING, 0, 1, 11, {"n": -1})
    assert all(r["state"] == SYNCED and r["generation"] == 0 for k, r in blob.items() if k not in moved and k < "k9")
    assert blob["k99998"]["state"] == PENDING and blob["k99999"]["fingerprint"] is None
    assert other["state"] == SYNCED and other["fingerprint"] == "x"
    assert registry.register([]) == {"new": 0, "changed": 0}
