"""orgmover.registry against real distribution registries (Debian's ``docker-registry``).

Two registry processes (the source cell's and the target cell's) are started by this module on
free ports. The only fake part is the failure injection in ``FlakyProxy``: a tiny threaded HTTP
proxy in front of a real registry that answers 503 to its first N requests and then forwards.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orgmover import registry as reg
from orgmover.errors import ConfigError, OrgMoverError
from orgmover.localpg import free_port
from orgmover.registry import (
    OCI_INDEX,
    LocalRegistry,
    RegistryClient,
    RegistryError,
    container_repository_path,
    make_layer,
    push_image,
    push_index,
    registry_binary,
    sync_repository,
    verify_repository,
)

# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_bin() -> Path:
    try:
        return registry_binary()
    except ConfigError:
        # only when the binary is absent: Debian's distribution registry
        subprocess.run(["apt-get", "install", "-y", "docker-registry"], capture_output=True)
    try:
        return registry_binary()
    except ConfigError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def registries(registry_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("registries")
    started = []
    try:
        for name in ("source", "target", "third"):
            started.append(LocalRegistry(root / name, free_port()).start())
        yield dict(zip(("source", "target", "third"), started))
    finally:
        for r in started:
            r.stop()


# GitLab paths: project full path + image name (0..2 components)
WEB = container_repository_path("Acme/Web")                       # acme/web (the project's root image)
API = container_repository_path("acme/backend/api", "server")     # acme/backend/api/server
CLI = container_repository_path("acme/tools", "cli/ci")           # acme/tools/cli/ci
REPOS = [WEB, API, CLI]


@pytest.fixture(scope="module")
def seeded(registries):
    """Several repositories with several tags, an alias tag, a multi-arch index and layers shared
    between repositories. Returns {repo: {tag: digest}}."""
    src = RegistryClient(registries["source"].url)
    rng = random.Random(20240611)
    base = [make_layer(rng, 96_000), make_layer(rng, 48_000)]  # shared by every repository
    out: dict[str, dict[str, str]] = {r: {} for r in REPOS}
    out[WEB]["v1"] = push_image(src, WEB, "v1", rng, shared_layers=base)
    out[WEB]["v2"] = push_image(src, WEB, "v2", rng, shared_layers=base, layers=2)
    src.put_manifest(WEB, "latest", *src.get_manifest(WEB, "v2")[:2])  # alias of v2
    out[WEB]["latest"] = out[WEB]["v2"]
    out[WEB]["multi"] = push_index(src, WEB, "multi", rng, shared_layers=base[:1])
    amd64 = json.loads(src.get_manifest(WEB, "multi")[1])["manifests"][0]["digest"]
    src.put_manifest(WEB, "multi-amd64", *src.get_manifest(WEB, amd64)[:2])  # a tag on a child of the index
    out[WEB]["multi-amd64"] = amd64
    out[API]["v1"] = push_image(src, API, "v1", rng, shared_layers=base, layers=1)
    out[API]["v2"] = push_image(src, API, "v2", rng, shared_layers=base, layers=1)
    out[API]["v3"] = push_image(src, API, "v3", rng, shared_layers=base[:1], layers=2)
    out[CLI]["stable"] = push_image(src, CLI, "stable", rng, shared_layers=base, layers=1)
    out[CLI]["edge"] = push_image(src, CLI, "edge", rng, shared_layers=base[1:], layers=2, layer_size=20_000)
    src.close()
    return out


def _blob_digests(client: RegistryClient, repo: str, ref: str) -> set[str]:
    """Every blob digest (config + layers) a tag needs, through an index's children."""
    media_type, body, _ = client.get_manifest(repo, ref)
    doc = json.loads(body)
    if media_type == OCI_INDEX:
        return set().union(*(_blob_digests(client, repo, m["digest"]) for m in doc["manifests"]))
    return {doc["config"]["digest"]} | {layer["digest"] for layer in doc["layers"]}


@pytest.fixture(scope="module")
def synced(registries, seeded):
    """The first sync of every repository into the empty target (one target client, so blobs
    already copied into one target repository are mounted into the next ones)."""
    src = RegistryClient(registries["source"].url)
    dst = RegistryClient(registries["target"].url)
    stats = [sync_repository(src, dst, repo) for repo in REPOS]
    yield {"stats": stats, "src": src, "dst": dst}
    src.close()
    dst.close()


# --- the failure injection (the only fake part) ----------------------------------------------------


class FlakyProxy:
    """HTTP proxy in front of a real registry: 503 to the first ``fail_first`` requests, then forwards
    each request unchanged (Host included, so upload locations point back at the proxy). With
    ``cut_blob_downloads``, the first N whole-blob downloads are cut off half-way."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "date", "server", "content-length"}

    def __init__(self, upstream_port: int, fail_first: int = 0, cut_blob_downloads: int = 0):
        self.upstream_port = upstream_port
        self.fail_first = fail_first
        self.cut_blob_downloads = cut_blob_downloads  # drop the connection half-way through N blob GETs
        self.cut = 0
        self.resumed = 0  # downloads answered 206 to a Range request
        self.failed = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes

            def log_message(self, *args):  # quiet
                pass

            def handle_any(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            fail = self.failed < self.fail_first
            if fail:
                self.failed += 1
            else:
                self.forwarded += 1
        if fail:
            data = b'{"errors":[{"code":"UNAVAILABLE","message":"injected failure"}]}'
            h.send_response(503)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in self.HOP - {"content-length"}}
            conn.request(h.command, h.path, body=body if length else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in self.HOP:
                    h.send_header(k, v)
            h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD"
                          else str(len(data)))
            h.end_headers()
            with self._lock:
                cut = (h.command == "GET" and "/blobs/sha256:" in h.path and "Range" not in h.headers
                       and resp.status == 200 and self.cut < self.cut_blob_downloads)
                self.cut += cut
                self.resumed += h.command == "GET" and "Range" in h.headers and resp.status == 206
            if cut:
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
            elif h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()


# --- tests -----------------------------------------------------------------------------------------


def test_container_repository_path_follows_gitlab_rule():
    assert container_repository_path("Acme/Web") == "acme/web"
    assert container_repository_path("Acme/Web", "") == "acme/web"
    assert container_repository_path("acme/sub/Proj", "Worker") == "acme/sub/proj/worker"
    assert container_repository_path("acme/sub/proj", "a/b") == "acme/sub/proj/a/b"  # 3 levels: proj, a, b
    with pytest.raises(ConfigError, match="at most 3 image levels"):
        container_repository_path("acme/proj", "a/b/c")
    with pytest.raises(ConfigError):
        container_repository_path("acme/proj", "bad name!")
    with pytest.raises(ConfigError):
        container_repository_path("proj-without-namespace")


def test_missing_binary_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ORGMOVER_REGISTRY_BIN", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="ORGMOVER_REGISTRY_BIN"):
        registry_binary()
    monkeypatch.delenv("ORGMOVER_REGISTRY_BIN")
    monkeypatch.setattr(reg.shutil, "which", lambda name: None)
    monkeypatch.setattr(reg, "DEBIAN_BINARY", tmp_path / "docker-registry")
    with pytest.raises(ConfigError, match="apt-get install -y docker-registry"):
        registry_binary()


def test_local_registry_start_is_idempotent(registries):
    r = registries["source"]
    pid = r._pid()
    assert r.start() is r and r._pid() == pid and r.running()
    assert RegistryClient(r.url).ping()


def test_first_sync_copies_every_tag_by_digest(registries, seeded, synced):
    src, dst = synced["src"], synced["dst"]
    for repo, tags in seeded.items():
        assert sorted(dst.tags(repo)) == sorted(tags)
        for tag, digest in tags.items():
            assert dst.head_manifest(repo, tag).digest == digest
        assert verify_repository(src, dst, repo) == []
    assert set(dst.catalog()) >= set(REPOS)
    # the multi-arch index and both of its platform manifests are there, by digest
    media_type, body, digest = dst.get_manifest(WEB, "multi")
    assert media_type == OCI_INDEX and digest == seeded[WEB]["multi"]
    archs = sorted(m["platform"]["architecture"] for m in json.loads(body)["manifests"])
    assert archs == ["amd64", "arm64"]
    # blobs read back from the target hash to their digests
    for repo, tags in seeded.items():
        for digest in set().union(*(_blob_digests(dst, repo, t) for t in tags)):
            h = hashlib.sha256()
            for chunk in dst.get_blob(repo, digest, verify=False):
                h.update(chunk)
            assert "sha256:" + h.hexdigest() == digest


def test_shared_layers_are_copied_once(seeded, synced):
    src = synced["src"]
    per_repo = {repo: set().union(*(_blob_digests(src, repo, t) for t in tags)) for repo, tags in seeded.items()}
    unique = set().union(*per_repo.values())
    stats = synced["stats"]
    assert sum(s["blobs_copied"] for s in stats) == len(unique)  # every blob crossed the network once
    assert sum(s["blobs_mounted"] for s in stats) == sum(map(len, per_repo.values())) - len(unique)
    assert sum(s["blobs_mounted"] for s in stats) >= 4  # the shared base layers, mounted into API and CLI
    assert all(s["blobs_skipped"] == 0 for s in stats)
    assert [s["tags_copied"] for s in stats] == [len(seeded[r]) for r in REPOS]
    # manifests: WEB has v1, v2 (= latest), the index and its 2 children (one also tagged)
    assert stats[0]["manifests"] == 5


def test_second_sync_copies_nothing(registries, seeded, synced):
    src = RegistryClient(registries["source"].url)
    dst = RegistryClient(registries["target"].url)  # a fresh client: no memory of the first sync
    for repo in REPOS:
        s = sync_repository(src, dst, repo)
        assert (s["blobs_copied"], s["blobs_mounted"], s["manifests"], s["bytes"], s["tags_copied"]) == (0, 0, 0, 0, 0)
        assert s["tags_unchanged"] == len(seeded[repo])


def test_resync_reflects_new_and_deleted_tags(registries, seeded, synced):
    src, dst = synced["src"], synced["dst"]
    rng = random.Random(7)
    new = push_image(src, WEB, "v3", rng, layers=1)  # a new tag with one new layer
    assert src.delete_tag(API, "v1")  # a tag deleted at the source
    assert src.delete_tag(WEB, "latest")  # an alias deleted: v2 (same digest) must survive
    assert src.delete_tag(WEB, "multi-amd64")  # a tag on an index child: the index must stay whole
    assert sorted(src.tags(WEB)) == ["multi", "v1", "v2", "v3"]
    assert verify_repository(src, src, WEB) == []
    s_web = sync_repository(src, dst, WEB)
    s_api = sync_repository(src, dst, API)
    assert s_web["tags_copied"] == 1 and s_web["tags_deleted"] == 2
    assert s_web["blobs_copied"] == 2 and s_web["manifests"] == 1  # new layer + new config; base layers skipped
    assert s_api["tags_deleted"] == 1 and s_api["blobs_copied"] == 0
    assert dst.head_manifest(WEB, "v3").digest == new
    assert sorted(dst.tags(WEB)) == ["multi", "v1", "v2", "v3"]
    assert dst.get_manifest(WEB, seeded[WEB]["multi-amd64"])[2] == seeded[WEB]["multi-amd64"]  # untagged, kept
    assert dst.head_manifest(WEB, "v2").digest == seeded[WEB]["v2"]
    assert sorted(dst.tags(API)) == ["v2", "v3"]
    assert verify_repository(src, dst, WEB) == [] and verify_repository(src, dst, API) == []
    assert not sync_repository(src, dst, WEB, delete_extra_tags=False)["tags_copied"]


def test_same_registry_rename_mounts_instead_of_copying(seeded, synced):
    src = synced["src"]
    s = sync_repository(src, src, CLI, "moved/tools/cli/ci")
    assert s["blobs_copied"] == 0 and s["bytes"] == 0 and s["blobs_mounted"] > 0
    assert verify_repository(src, src, CLI, "moved/tools/cli/ci") == []


def test_large_blobs_stream_in_patch_chunks(registries):
    src = RegistryClient(registries["source"].url, chunk_size=256 * 1024)
    dst = RegistryClient(registries["target"].url, chunk_size=256 * 1024)
    rng = random.Random(3)
    digest = push_image(src, "acme/big", "v1", rng, layers=1, layer_size=1_500_000)
    s = sync_repository(src, dst, "acme/big")
    assert s["blobs_copied"] == 2 and s["bytes"] > 1_500_000
    assert dst.head_manifest("acme/big", "v1").digest == digest
    assert verify_repository(src, dst, "acme/big") == []
    for d in _blob_digests(dst, "acme/big", "v1"):
        assert "sha256:" + hashlib.sha256(b"".join(dst.get_blob("acme/big", d))).hexdigest() == d


def test_put_blob_refuses_content_that_does_not_match_its_digest(registries):
    dst = RegistryClient(registries["third"].url)
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(reg.DigestMismatch):
        dst.put_blob("acme/refused", wrong, [b"some ", b"content"], 12)
    assert not dst.head_blob("acme/refused", wrong)


def test_sync_retries_a_target_that_fails_for_a_while(registries, seeded, synced):
    src = synced["src"]
    third = registries["third"]
    with FlakyProxy(third.port, fail_first=8) as proxy:
        dst = RegistryClient(proxy.url, retries=10, backoff=0.002)
        stats = [sync_repository(src, dst, repo) for repo in (WEB, API)]
        assert proxy.failed == 8 and proxy.forwarded > 20
    assert all(s["tags_copied"] == s["tags"] for s in stats)
    direct = RegistryClient(third.url)
    assert verify_repository(src, direct, WEB) == [] and verify_repository(src, direct, API) == []


def test_a_download_cut_off_midway_resumes_with_a_range_request(registries, seeded, synced):
    with FlakyProxy(registries["source"].port, cut_blob_downloads=3) as proxy:
        src = RegistryClient(proxy.url, retries=3, backoff=0.002)
        dst = RegistryClient(registries["third"].url)
        s = sync_repository(src, dst, CLI, "resumed/cli", workers=1)
        assert proxy.cut == 3 and proxy.resumed == 3  # each cut download continued where it stopped
    assert s["blobs_copied"] > 3 and s["tags_copied"] == len(seeded[CLI])
    assert verify_repository(synced["src"], dst, CLI, "resumed/cli") == []


def test_a_target_that_keeps_failing_raises_a_clear_error(registries, seeded, synced):
    with FlakyProxy(registries["third"].port, fail_first=10**6) as proxy:
        dst = RegistryClient(proxy.url, retries=2, backoff=0.01)
        with pytest.raises(RegistryError) as err:
            sync_repository(synced["src"], dst, CLI)
        assert proxy.failed == 3  # 1 + 2 retries of the first request, then it gave up
    assert err.value.status == 503 and "injected failure" in str(err.value) and "3 attempts" in str(err.value)
    assert isinstance(err.value, OrgMoverError)


def test_verify_detects_missing_and_corrupt_manifests(registries, seeded, synced):
    src, dst = synced["src"], synced["dst"]
    assert verify_repository(src, dst, CLI) == []
    # missing: a tag removed on the target only
    assert dst.delete_tag(CLI, "edge")
    assert verify_repository(src, dst, CLI) == ["edge"]
    assert sync_repository(src, dst, CLI)["tags_copied"] == 1  # a re-sync repairs it
    assert verify_repository(src, dst, CLI) == []
    # corrupt: the stored manifest bytes of "stable" changed in the target's storage
    hexd = seeded[CLI]["stable"].split(":", 1)[1]
    data = registries["target"].data_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data.write_bytes(data.read_bytes() + b" ")
    assert dst.head_manifest(CLI, "stable").digest == seeded[CLI]["stable"]  # the tag still names the digest
    assert verify_repository(src, dst, CLI) == ["stable"]
    with pytest.raises(reg.DigestMismatch):
        dst.get_manifest(CLI, "stable")
    # a corrupt child of an index is found by the deep check
    child = json.loads(dst.get_manifest(WEB, "multi")[1])["manifests"][1]["digest"].split(":", 1)[1]
    data = registries["target"].data_dir / "docker/registry/v2/blobs/sha256" / child[:2] / child / "data"
    data.write_bytes(data.read_bytes() + b"\n")
    assert verify_repository(src, dst, WEB) == ["multi"]
    assert verify_repository(src, dst, WEB, deep=False) == []
