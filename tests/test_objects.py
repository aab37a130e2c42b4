"""orgmover.objects against real local object stores: two moto S3 servers and a gcp-storage-emulator,
started by this module on free ports (no Docker, no mocks of the stores).

The only simulated thing is a server that fails for a while: moto and the emulator cannot be told to
answer 503, so a small threaded HTTP proxy (below) sits in front of a real target, answers 503 to the
first N requests and forwards everything else unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import random
import threading
import tracemalloc
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orgmover.localpg import free_port, free_ports
from orgmover.objects import (
    MiB,
    PART_SIZE,
    GCSStore,
    LocalGCS,
    LocalS3,
    ObjectInfo,
    S3Store,
    artifact_path,
    fingerprint,
    lfs_path,
    list_infos,
    object_checksum,
    package_path,
    seed_objects,
    sync_object,
    sync_objects,
    verify_objects,
)

_names = itertools.count()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    p = free_ports(3)
    s = {"s3a": LocalS3(root / "s3a", p[0]), "s3b": LocalS3(root / "s3b", p[1]), "gcs": LocalGCS(root / "gcs", p[2])}
    try:
        for srv in s.values():
            srv.start()
        yield s
    finally:
        for srv in s.values():
            srv.stop()


def bucket(servers, kind: str):
    """A fresh bucket on the source S3 ("src"), the other S3 ("s3") or the GCS emulator ("gcs")."""
    name = f"b{next(_names)}-{kind}"
    store = {"src": lambda: S3Store(servers["s3a"].endpoint, name),
             "s3": lambda: S3Store(servers["s3b"].endpoint, name),
             "gcs": lambda: GCSStore(servers["gcs"].endpoint, name)}[kind]()
    store.ensure_bucket()
    return store


def content(store, key: str) -> bytes:
    return b"".join(store.read(key))


def objects_of(store) -> dict[str, bytes]:
    return {i.key: content(store, i.key) for i in store.list()}


OID = hashlib.sha256(b"lfs object").hexdigest()
MIXED = [  # (key, size): empty, small, around a part, one multipart object (> 8 MiB), GitLab paths
    ("a/empty", 0),
    ("a/small", 1000),
    ("a/medium", 300_001),
    ("a/exactly-one-part", PART_SIZE),
    ("b/multipart", 2 * PART_SIZE + 12_345),
    (artifact_path(42, date(2024, 5, 17), 1001, 7, "artifacts.zip"), 70_000),
    (lfs_path(OID), 5000),
    (package_path(42, 9, 11, "pkg-1.0.0.tgz"), 123_456),
]


# --------------------------------------------------------------------------------------------- paths
def test_gitlab_paths():
    h = hashlib.sha256(b"42").hexdigest()
    assert artifact_path(42, date(2024, 5, 7), 1001, 7, "artifacts.zip") == \
        f"{h[:2]}/{h[2:4]}/{h}/2024_05_07/1001/7/artifacts.zip"
    assert artifact_path(42, "2024-05-07", 1001, 7, "metadata.gz") == f"{h[:2]}/{h[2:4]}/{h}/2024_05_07/1001/7/metadata.gz"
    assert lfs_path(OID) == f"{OID[:2]}/{OID[2:4]}/{OID[4:]}"
    assert package_path(42, 9, 11, "a.tgz") == f"{h[:2]}/{h[2:4]}/{h}/packages/9/files/11/a.tgz"
    with pytest.raises(ValueError):
        lfs_path("not-an-oid")


def test_local_servers_are_idempotent(servers):
    for srv in servers.values():
        pid = srv.pid()
        srv.start()  # already running and answering: nothing new is started
        assert srv.pid() == pid and srv.answers()
        assert srv.endpoint == f"http://127.0.0.1:{srv.port}"


def test_local_gcs_stops_by_pid_and_keeps_its_data_on_disk(tmp_path):
    srv = LocalGCS(tmp_path / "gcs", free_port(), default_bucket="kept")
    srv.start()
    try:
        pid = srv.pid()
        store = GCSStore(srv.endpoint, "kept")
        store.write("k", iter([b"persist"]), 7)
        srv.stop()
        assert not srv.running() and not srv.answers(timeout=0.5) and srv.pid() is None
        srv.start()
        assert srv.pid() != pid and content(GCSStore(srv.endpoint, "kept"), "k") == b"persist"
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------- sync
@pytest.mark.parametrize("target", ["s3", "s3-multipart", "gcs"])
def test_sync_mixed_sizes_incremental_changes_and_deletions(servers, target):
    src, dst = bucket(servers, "src"), bucket(servers, target.removesuffix("-multipart"))
    if target == "s3-multipart":  # every object above PART_SIZE in parts (by default: one PUT up to 64 MiB)
        dst.single_put_max = PART_SIZE
    seeded = seed_objects(src, random.Random(1), MIXED)
    assert {k: v.size for k, v in seeded.items()} == dict(MIXED)

    r = sync_objects(src, dst)
    assert (r["copied"], r["failed"], r["bytes"]) == (len(MIXED), 0, sum(n for _, n in MIXED)), r
    want = objects_of(src)
    assert objects_of(dst) == want  # byte for byte, every key
    for key, info in seeded.items():
        assert hashlib.sha256(want[key]).hexdigest() == info.sha256
        assert object_checksum(dst, key) == info.sha256  # from metadata, also for the large object
    etag = dst.head("b/multipart").etag
    if target == "s3-multipart":
        assert etag.strip('"').endswith("-3"), etag  # really a multipart upload (3 parts of <= 8 MiB)
    elif target == "s3":  # one streamed PUT: its ETag is the content's MD5
        assert etag == hashlib.md5(want["b/multipart"]).hexdigest(), etag

    r = sync_objects(src, dst)
    assert (r["copied"], r["skipped"], r["failed"]) == (0, len(MIXED), 0), r

    # same key, new bytes: same size (caught by the checksum) and a new size
    seed_objects(src, random.Random(2), [("a/medium", 300_001), ("b/multipart", PART_SIZE + 1)])
    r = sync_objects(src, dst)
    assert (r["copied"], r["skipped"]) == (2, len(MIXED) - 2), r
    assert objects_of(dst) == objects_of(src)

    # deletions: only with delete_extra, only under the prefix
    src.delete("a/small")
    src.delete("b/multipart")
    r = sync_objects(src, dst)
    assert r["deleted"] == 0 and dst.head("a/small") is not None and dst.head("b/multipart") is not None
    r = sync_objects(src, dst, prefix="a/", delete_extra=True)
    assert r["deleted"] == 1 and dst.head("a/small") is None and dst.head("b/multipart") is not None, r
    r = sync_objects(src, dst, delete_extra=True)
    assert (r["deleted"], r["copied"], r["failed"]) == (1, 0, 0), r
    assert objects_of(dst) == objects_of(src)


def test_sync_selected_keys_and_missing_on_source(servers):
    src, dst = bucket(servers, "src"), bucket(servers, "s3")
    seed_objects(src, random.Random(3), [("k/1", 10), ("k/2", 20), ("k/3", 30)])
    results = []
    r = sync_objects(src, dst, keys=["k/1", "k/3", "k/gone"], on_result=results.append)
    assert (r["copied"], r["failed"]) == (2, 1) and "not found on the source" in r["failures"]["k/gone"], r
    assert {x["key"]: x["action"] for x in results} == {"k/1": "copied", "k/3": "copied", "k/gone": "missing_on_source"}
    assert dst.head("k/2") is None

    one = sync_object(src, dst, "k/2")
    assert one["action"] == "copied" and one["sha256"] == hashlib.sha256(content(src, "k/2")).hexdigest()
    assert sync_object(src, dst, "k/2")["action"] == "skipped"
    src.delete("k/2")
    assert sync_object(src, dst, "k/2")["action"] == "missing_on_source" and dst.head("k/2") is not None
    assert sync_object(src, dst, "k/2", delete_missing=True)["action"] == "deleted" and dst.head("k/2") is None


@pytest.mark.parametrize("target", ["s3", "gcs"])
def test_corrupted_target_is_reported_and_fixed(servers, target):
    src, dst = bucket(servers, "src"), bucket(servers, target)
    seed_objects(src, random.Random(4), [("c/ok", 5000), ("c/rot", 5000), ("c/stale-meta", 7000), ("c/gone", 10),
                                         ("c/big", PART_SIZE + 5)])
    assert sync_objects(src, dst)["failed"] == 0
    assert verify_objects(src, dst) == []

    # out-of-band damage on the target, behind the mover's back
    other = random.Random(5).randbytes(5000)
    stale = random.Random(6).randbytes(7000)
    meta = {"sha256": object_checksum(src, "c/stale-meta"), "md5": hashlib.md5(content(src, "c/stale-meta")).hexdigest()}
    if target == "s3":
        dst.client.put_object(Bucket=dst.bucket, Key="c/rot", Body=other)
        dst.client.put_object(Bucket=dst.bucket, Key="c/stale-meta", Body=stale, Metadata=meta)  # keeps the old sha256
    else:
        dst.client.bucket(dst.bucket).blob("c/rot").upload_from_string(other)
        b = dst.client.bucket(dst.bucket).blob("c/stale-meta")
        b.metadata = meta
        b.upload_from_string(stale)
    dst.delete("c/gone")
    assert object_checksum(dst, "c/rot") == hashlib.sha256(other).hexdigest()  # no metadata: streamed
    assert object_checksum(dst, "c/stale-meta") == hashlib.sha256(stale).hexdigest()  # stale metadata ignored

    assert verify_objects(src, dst) == ["c/gone", "c/rot", "c/stale-meta"]
    assert verify_objects(src, dst, keys=["c/ok", "c/rot"], deep=True) == ["c/rot"]

    r = sync_objects(src, dst)
    assert (r["copied"], r["skipped"], r["failed"]) == (3, 2, 0), r
    assert verify_objects(src, dst) == [] and verify_objects(src, dst, deep=True) == []
    assert objects_of(dst) == objects_of(src)


def test_objects_written_by_gitlab_itself(servers):
    """Source objects without our metadata (as GitLab writes them): a multipart one with 5 MiB parts and a
    single-part one. Up to SINGLE_PUT_MAX the large one is copied in one PUT (its ETag is then its MD5, the
    source's ETag is kept in its metadata): a later pass decides from the listings and one HEAD on the target.
    Above it, the S3 copy keeps the multipart layout (same ETag) and gains our sha256: later passes decide
    from the two listings alone (requests counted through a pass-through proxy)."""
    src, dst, gdst = bucket(servers, "src"), bucket(servers, "s3"), bucket(servers, "gcs")
    rnd = random.Random(9)
    big, small = rnd.randbytes(12 * MiB + 777), rnd.randbytes(4321)
    c = src.client
    up = c.create_multipart_upload(Bucket=src.bucket, Key="n/big")["UploadId"]
    parts = []
    for n, off in enumerate(range(0, len(big), 5 * MiB), start=1):
        r = c.upload_part(Bucket=src.bucket, Key="n/big", UploadId=up, PartNumber=n, Body=big[off:off + 5 * MiB])
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    c.complete_multipart_upload(Bucket=src.bucket, Key="n/big", UploadId=up, MultipartUpload={"Parts": parts})
    c.put_object(Bucket=src.bucket, Key="n/small", Body=small)
    assert src.head("n/big").sha256 is None and src.head("n/big").md5 is None  # nothing to compare with

    counter = FlakyProxy(servers["s3b"].port, fail_first=0)
    try:
        via = S3Store(counter.endpoint, dst.bucket)
        assert sync_objects(src, via)["copied"] == 2
        assert content(dst, "n/big") == big and content(dst, "n/small") == small
        s, d = src.head("n/big"), dst.head("n/big")
        assert d.etag == hashlib.md5(big).hexdigest() and d.src_etag == s.etag, (s, d)  # one PUT
        before = counter.requests
        r = sync_objects(src, via)
        assert (r["copied"], r["skipped"]) == (0, 2) and counter.requests - before == 2  # listing + target HEAD

        parts = bucket(servers, "s3")
        via = S3Store(counter.endpoint, parts.bucket)
        via.single_put_max = 8 * MiB
        assert sync_objects(src, via)["copied"] == 2
        s, d = src.head("n/big"), parts.head("n/big")
        assert d.etag == s.etag and d.etag.endswith("-3"), (s, d)  # part for part: the same ETag
        assert d.sha256 == hashlib.sha256(big).hexdigest()  # recorded although the source had none
        before = counter.requests
        r = sync_objects(src, via)
        assert (r["copied"], r["skipped"]) == (0, 2) and counter.requests - before == 1  # the listing only
    finally:
        counter.close()
    assert verify_objects(src, dst) == [] and verify_objects(src, dst, deep=True) == []
    assert verify_objects(src, parts) == [] and content(parts, "n/big") == big

    assert sync_objects(src, gdst)["copied"] == 2
    assert gdst.head("n/big").sha256 == hashlib.sha256(big).hexdigest() and content(gdst, "n/big") == big
    r = sync_objects(src, gdst)
    assert (r["copied"], r["skipped"]) == (0, 2), r
    assert verify_objects(src, gdst) == []


# --------------------------------------------------------------------------------------------- retries
class FlakyProxy:
    """Answers 503 to the first ``fail_first`` requests, then forwards to ``target`` (host, port)."""

    def __init__(self, target_port: int, fail_first: int, deny=None):
        self.target_port = target_port
        self.fail_first = fail_first
        self.deny = deny  # (method, path) -> True: answered 403 AccessDenied, like a policy without that right
        self.requests = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.failed < proxy.fail_first
                    proxy.failed += fail
                denied = proxy.deny is not None and proxy.deny(self.command, self.path)
                if denied or fail:
                    msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                           b"<Message>no such right</Message></Error>" if denied else
                           b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                           b"<Message>flaky proxy</Message></Error>")
                    self.send_response(403 if denied else 503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
                conn.request(self.command, self.path, body=body if n else None, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    while chunk := resp.read(256 * 1024):
                        self.wfile.write(chunk)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("target", ["s3", "gcs"])
def test_transient_server_errors_are_retried(servers, target):
    src, direct = bucket(servers, "src"), bucket(servers, target)
    seed_objects(src, random.Random(7), [(f"r/{i:02d}", 1000 * i) for i in range(12)] + [("r/big", PART_SIZE + 99)])
    port = servers["s3b" if target == "s3" else "gcs"].port

    # no retries: the first requests fail and are reported per key, with the error text
    proxy = FlakyProxy(port, fail_first=3)
    try:
        via = S3Store(proxy.endpoint, direct.bucket) if target == "s3" else GCSStore(proxy.endpoint, direct.bucket)
        r = sync_objects(src, via, keys=[f"r/{i:02d}" for i in range(12)], retries=0, workers=1)
        # (google-cloud-storage may spend one of the 503s on its own background bucket lookup)
        assert 1 <= r["failed"] <= 3 and r["copied"] + r["failed"] == 12, r
        assert all("503" in e for e in r["failures"].values()), r["failures"]
    finally:
        proxy.close()

    # the server fails for a while (5 answers), sync retries with backoff and ends synced
    proxy = FlakyProxy(port, fail_first=5)
    try:
        via = S3Store(proxy.endpoint, direct.bucket) if target == "s3" else GCSStore(proxy.endpoint, direct.bucket)
        r = sync_objects(src, via, retries=5, backoff=0.02, workers=4)
        assert r["failed"] == 0 and proxy.failed == 5, (r, proxy.failed)
        assert r["copied"] + r["skipped"] == 13
    finally:
        proxy.close()
    assert verify_objects(src, direct) == []
    assert objects_of(direct) == objects_of(src)


# --------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("target", ["s3", "gcs"])
def test_memory_stays_bounded_on_a_64_mib_object(servers, target):
    size = 64 * MiB
    src, dst = bucket(servers, "src"), bucket(servers, target)
    info = seed_objects(src, random.Random(8), [("m/huge", size)])["m/huge"]
    tracemalloc.start()
    try:
        r = sync_object(src, dst, "m/huge")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r["action"] == "copied", r
    assert peak < size * 3 / 8, f"peak {peak / MiB:.1f} MiB while copying a {size // MiB} MiB object"
    assert object_checksum(dst, "m/huge", deep=True) == info.sha256  # recomputed by streaming the target


@pytest.mark.parametrize("size", [1000, PART_SIZE + 4096, 2 * PART_SIZE + 5])
@pytest.mark.parametrize("single_put_max", [64 * MiB, PART_SIZE])
def test_bytes_that_do_not_match_are_never_committed(servers, size, single_put_max):
    """Whatever the upload (one buffered PUT, one streamed PUT, multipart), bytes that do not match the
    expected sha256, or a source that ends early or gives more, fail the write and leave the target as it
    was: the streamed PUT holds its last piece back until the check passed, so the server never has the
    whole body."""
    from orgmover.objects import ChecksumMismatch, SourceChanged

    dst = bucket(servers, "s3")
    dst.single_put_max = single_put_max
    rnd = random.Random(size)
    old, good = rnd.randbytes(size), rnd.randbytes(size)
    bad = bytearray(good)
    bad[-1] ^= 1  # the very last byte differs
    dst.write("x/obj", iter([old]), size)

    def pieces(b):
        return (bytes(b[i:i + MiB]) for i in range(0, len(b), MiB))

    sha = hashlib.sha256(good).hexdigest()
    with pytest.raises(ChecksumMismatch):
        dst.write("x/obj", pieces(bad), size, sha)
    with pytest.raises(SourceChanged):
        dst.write("x/obj", pieces(good[:-1]), size, sha)
    with pytest.raises(SourceChanged):
        dst.write("x/obj", pieces(good + b"!"), size, sha)
    assert content(dst, "x/obj") == old and dst.head("x/obj").size == size
    info = dst.write("x/obj", pieces(good), size, sha)
    assert content(dst, "x/obj") == good and info.sha256 == sha and dst.head("x/obj").sha256 == sha


def test_a_flaky_source_is_read_again_and_a_missing_object_is_reported(servers):
    """Reads go by presigned GET outside botocore's pipeline: a 503 from the source is retried like any other
    transient error, a missing object is ObjectNotFound (missing on the source), stored bytes are streamed as
    stored (a gzip object is not decompressed), and the copy is checked against the source's MD5 by the target."""
    direct, dst = bucket(servers, "src"), bucket(servers, "s3")
    gz = b"\x1f\x8b" + random.Random(1).randbytes(3000)
    direct.client.put_object(Bucket=direct.bucket, Key="f/log.gz", Body=gz, ContentEncoding="gzip",
                             ContentType="text/plain")
    seed_objects(direct, random.Random(2), [(f"f/{i}", 5000 + i) for i in range(6)])
    proxy = FlakyProxy(servers["s3a"].port, fail_first=4)
    try:
        src = S3Store(proxy.endpoint, direct.bucket)
        r = sync_objects(src, dst, keys=[f"f/{i}" for i in range(6)] + ["f/log.gz", "f/missing"], retries=5,
                         backoff=0.02, workers=2)
        assert proxy.failed == 4 and r["copied"] == 7 and r["failed"] == 1, r
        assert "not found on the source" in r["failures"]["f/missing"]
        assert b"".join(dst.read("f/log.gz")) == gz
        assert dst.read("f/log.gz").headers["content_encoding"] == "gzip"
    finally:
        proxy.close()
    assert verify_objects(direct, dst, deep=True) == []


@pytest.mark.parametrize("kind", ["src", "gcs"])
def test_list_infos_fingerprints_from_listings(servers, kind):
    """The replication scan reads fingerprints from listings: where the org's keys are dense a request covers
    up to 1000 of them, where they are sparse among other objects never more requests than keys; missing keys
    are None; a listed fingerprint equals the one a HEAD gives (also for a multipart object), and a rewrite
    with the same size changes it."""
    store = bucket(servers, kind)
    rnd = random.Random(20)
    dense = [artifact_path(7, date(2024, 1, 1 + i % 28), 1000 + i, i, "artifacts.zip") for i in range(600)]
    sparse = [artifact_path(100 + p, date(2024, 2, 1), 5000 + p, p, "artifacts.zip") for p in range(0, 400, 16)]
    foreign = [artifact_path(100 + p, date(2024, 2, 1), 5000 + p, p, "artifacts.zip") for p in range(400) if p % 16]
    seed_objects(store, rnd, [(k, 40) for k in dense + sparse + foreign], workers=4 if kind == "src" else 1)
    big = "big/multipart.bin"
    seed_objects(store, rnd, [(big, PART_SIZE + 1000)])
    missing = ["0-missing/one", dense[5] + ".missing", "zz/missing"]

    c1: dict = {}
    infos = list_infos(store, dense + missing, counts=c1)
    assert set(infos) == set(dense + missing) and all(infos[k] is None for k in missing)
    assert all(infos[k] is not None and infos[k].size == 40 for k in dense)
    assert c1["heads"] == 0 and 1 <= c1["list_requests"] <= 6, c1  # 3 runs of ~200 keys, not 603 HEADs

    c2: dict = {}
    infos = list_infos(store, sparse + [big], counts=c2)
    assert c2["heads"] == 0 and c2["list_requests"] <= len(sparse) + 1, c2
    for k in sparse + [big]:
        assert fingerprint(infos[k]) == fingerprint(store.head(k)) is not None, k
    assert infos[big].size == PART_SIZE + 1000

    before = fingerprint(store.head(sparse[3]))
    seed_objects(store, random.Random(21), [(sparse[3], 40)])  # same key, same size, new bytes
    after = list_infos(store, [sparse[3]])[sparse[3]]
    assert fingerprint(after) != before and fingerprint(after) == fingerprint(store.head(sparse[3]))


def test_list_infos_without_the_right_to_list_looks_up_each_key(servers):
    """Credentials that may read objects but not list the bucket: the scan falls back to a HEAD per key."""
    direct = bucket(servers, "src")
    seed_objects(direct, random.Random(3), [(f"d/{i}", 10 + i) for i in range(5)])
    proxy = FlakyProxy(servers["s3a"].port, fail_first=0, deny=lambda method, path: "list-type=2" in path)
    try:
        store = S3Store(proxy.endpoint, direct.bucket)
        counts: dict = {}
        infos = list_infos(store, [f"d/{i}" for i in range(5)] + ["d/missing"], counts=counts)
        assert counts == {"list_requests": 0, "heads": 6}, counts
        assert infos["d/missing"] is None and [infos[f"d/{i}"].size for i in range(5)] == [10, 11, 12, 13, 14]
    finally:
        proxy.close()


def test_object_info_shape():
    i = ObjectInfo("k", 3, None, None)
    assert (i.key, i.size, i.md5, i.sha256, i.etag, i.src_etag) == ("k", 3, None, None, None, None)


def test_source_object_vanishing_during_a_sync(servers):
    """A key listed (or named) that is gone by the time it is copied is reported as missing on the source,
    or deleted on the target with delete_extra; nothing else fails."""
    src, dst = bucket(servers, "src"), bucket(servers, "s3")
    seed_objects(src, random.Random(10), [("v/keep", 100), ("v/gone", 200)])
    assert sync_objects(src, dst)["copied"] == 2
    seed_objects(src, random.Random(11), [("v/gone", 200)])  # changed, then deleted before it is copied
    listed = {i.key: i for i in src.list()}
    src.delete("v/gone")
    from orgmover.objects import _sync_key

    r = _sync_key(src, dst, "v/gone", listed["v/gone"], dst.head("v/gone"), True, False)
    assert r["action"] == "missing_on_source" and dst.head("v/gone") is not None
    r = _sync_key(src, dst, "v/gone", listed["v/gone"], dst.head("v/gone"), True, True)
    assert r["action"] == "deleted" and dst.head("v/gone") is None


def test_gcs_as_source_and_http_headers_kept(servers):
    """S3 -> GCS -> S3: GCS read as a source (small and multipart-sized), and the objects' Content-Type,
    Content-Encoding, Content-Disposition and Cache-Control survive both hops."""
    src, mid, back = bucket(servers, "src"), bucket(servers, "gcs"), bucket(servers, "s3")
    rnd = random.Random(12)
    bodies = {"h/avatar.png": rnd.randbytes(3000), "h/trace.log.gz": rnd.randbytes(PART_SIZE + 4097),
              "h/plain": rnd.randbytes(10)}
    headers = {"h/avatar.png": dict(ContentType="image/png", CacheControl="max-age=60",
                                    ContentDisposition='inline; filename="avatar.png"'),
               "h/trace.log.gz": dict(ContentType="text/plain", ContentEncoding="gzip")}
    for k, body in bodies.items():
        src.client.put_object(Bucket=src.bucket, Key=k, Body=body, **headers.get(k, {}))
    assert sync_objects(src, mid)["copied"] == 3
    assert sync_objects(mid, back)["copied"] == 3
    assert objects_of(back) == objects_of(mid) == objects_of(src) == bodies
    assert verify_objects(src, back) == [] and verify_objects(mid, back, deep=True) == []
    for k, want in headers.items():
        got = back.client.head_object(Bucket=back.bucket, Key=k)
        assert {h: got.get(h) for h in want} == want, (k, got)
        g = mid.client.bucket(mid.bucket).get_blob(k)
        assert (g.content_type, g.content_encoding, g.cache_control, g.content_disposition) == tuple(
            want.get(h) for h in ("ContentType", "ContentEncoding", "CacheControl", "ContentDisposition")), k
    r = sync_objects(mid, back)
    assert (r["copied"], r["skipped"]) == (0, 3), r


def test_which_errors_are_retried():
    import requests
    from botocore.exceptions import ClientError, EndpointConnectionError
    from google.api_core import exceptions as gexc

    from orgmover.objects import ChecksumMismatch, ObjectNotFound, SourceChanged, is_transient

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(client_error(503, "SlowDown")) and is_transient(client_error(500, "InternalError"))
    assert is_transient(client_error(429, "TooManyRequests"))
    assert not is_transient(client_error(404, "NoSuchKey")) and not is_transient(client_error(403, "AccessDenied"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(requests.exceptions.ConnectionError("refused")) and is_transient(ConnectionResetError())
    assert is_transient(gexc.ServiceUnavailable("x")) and is_transient(gexc.TooManyRequests("x"))
    assert not is_transient(gexc.NotFound("x")) and not is_transient(gexc.Forbidden("x"))
    assert is_transient(ChecksumMismatch("x")) and is_transient(SourceChanged("x"))
    assert not is_transient(ObjectNotFound("x")) and not is_transient(ValueError("x"))
