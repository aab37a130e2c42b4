"""Container images: replicate one cell's OCI registry repositories into another cell's registry.

Everything goes through the OCI distribution API (``/v2/``), the way the GitLab data model (§8)
describes it: a registry path follows the project's full path; blobs are content addressed and
deduplicated by digest; images are copied *by digest* -- first the blobs the target lacks (HEAD
first; a cross-repository mount when another repository of the *same* target registry already
holds the blob, otherwise pulled from the source and pushed, streamed), then the manifests by
digest (children of an index before the index), then the tags.

Parts:

* :class:`LocalRegistry` -- a real distribution registry (Debian package ``docker-registry``) on
  127.0.0.1 with filesystem storage, for tests, the bench and local cells.
* :class:`RegistryClient` -- a small httpx client of the distribution API with retries.
* :func:`sync_repository` / :func:`verify_repository` -- the replication and its check.
* :func:`container_repository_path` -- GitLab's rule from project path + image name to registry path.
* :func:`push_image` / :func:`push_index` / :func:`make_layer` -- deterministic seeding helpers.

This module does not import Airflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from orgmover.errors import ConfigError, OrgMoverError

__all__ = [
    "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "OCI_INDEX", "OCI_MANIFEST", "MANIFEST_MEDIA_TYPES",
    "LocalRegistry", "ManifestRef", "RegistryClient", "RegistryError", "container_repository_path",
    "make_layer", "push_image", "push_index", "registry_binary", "sync_repository",
    "verify_repository",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
IMAGE_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
_DIGEST_RE = re.compile(r"^(sha256|sha512):[0-9a-f]{64,128}$")


class RegistryError(OrgMoverError):
    """A registry request failed (after retries), or content does not match its digest.

    ``status`` is the HTTP status (None for connection errors and local checks), ``body`` the
    response text (shortened)."""

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None,
                 method: str | None = None, url: str | None = None):
        self.status = status
        self.body = body
        self.method = method
        self.url = url
        text = message
        if method and url:
            text = f"{method} {url}: {message}"
        if status is not None:
            text += f" (HTTP {status})"
        if body:
            text += f": {body}"
        super().__init__(text)


class DigestMismatch(RegistryError):
    """Content read from a registry does not hash to the digest it was asked for."""


def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _hasher(digest: str):
    algorithm = digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512"):
        raise RegistryError(f"unsupported digest algorithm in {digest!r}")
    return hashlib.new(algorithm)


def _is_digest(ref: str) -> bool:
    return bool(_DIGEST_RE.match(ref))


# ---------------------------------------------------------------------------------------------
# A local registry process
# ---------------------------------------------------------------------------------------------

DEBIAN_BINARY = Path("/usr/bin/docker-registry")


def registry_binary() -> Path:
    """The distribution registry binary: ``$ORGMOVER_REGISTRY_BIN``, ``docker-registry`` (Debian,
    /usr/bin/docker-registry) or ``registry`` (upstream name) on PATH."""
    env = os.environ.get("ORGMOVER_REGISTRY_BIN")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return Path(env)
        raise ConfigError(f"ORGMOVER_REGISTRY_BIN={env!r} is not an executable file")
    for name in ("docker-registry", "registry"):
        found = shutil.which(name)
        if found:
            return Path(found)
    if DEBIAN_BINARY.exists():
        return DEBIAN_BINARY
    raise ConfigError(
        "the container registry binary is not installed: install Debian's distribution registry with "
        "`apt-get install -y docker-registry` (provides /usr/bin/docker-registry), or put the upstream "
        "`registry` binary on PATH, or set ORGMOVER_REGISTRY_BIN to its path")


class LocalRegistry:
    """A distribution v2 registry on ``127.0.0.1:port`` storing under ``root`` (no auth, deletes on).

    ``root/config.yml`` is generated, data lives in ``root/data``, the log in ``root/registry.log``
    and the process id in ``root/registry.pid``. ``start()`` is idempotent (it adopts a registry it
    started earlier from the same root); ``stop()`` ends only that recorded process."""

    def __init__(self, root: Path, port: int):
        self.root = Path(root)
        self.port = int(port)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    @property
    def pid_path(self) -> Path:
        return self.root / "registry.pid"

    def config(self) -> dict:
        return {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": secrets.token_hex(16)},
        }

    def _pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        try:  # the pid may have been reused by another program
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.config_path).encode() not in cmdline:
                return None
        except OSError:
            pass
        return pid

    def answers(self) -> bool:
        try:
            r = httpx.get(self.url + "/v2/", timeout=1.0)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def running(self) -> bool:
        return self._pid() is not None and self.answers()

    def start(self, timeout: float = 20.0) -> LocalRegistry:
        if self.running():
            return self
        binary = registry_binary()
        if self.answers():
            raise RegistryError(f"port {self.port} already serves a registry that is not ours ({self.root})")
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: the registry reads it as its configuration file.
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen([str(binary), "serve", str(self.config_path)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        finally:
            log.close()
        self.pid_path.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RegistryError(f"the registry on port {self.port} exited with code {self._proc.returncode}; "
                                    f"log {self.log_path}:\n{self._log_tail()}")
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RegistryError(f"the registry on port {self.port} did not answer /v2/ within {timeout:.0f}s; "
                            f"log {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        pid = self._pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc is not None:
                    if self._proc.poll() is not None:
                        break
                else:
                    try:
                        os.kill(pid, 0)
                    except OSError:
                        break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if self._proc is not None:
                    self._proc.wait(5)
        self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestRef:
    """What a HEAD on a manifest says: media type, digest, size."""

    media_type: str
    digest: str
    size: int


class RegistryClient:
    """Client of the OCI distribution API of one registry (``base_url`` like ``http://127.0.0.1:5000``).

    Requests that fail with a 5xx/429 status or a connection error are retried ``retries`` times
    with exponential backoff (``backoff`` seconds, doubled each time, ``Retry-After`` honoured).
    Blob uploads at most ``chunk_size`` bytes are monolithic (POST + PUT); bigger ones are sent in
    PATCH chunks of ``chunk_size`` (so at most one chunk is in memory), then closed with PUT.
    The client is safe to use from several threads.

    ``blob_locations`` remembers, for this registry, one repository known to hold each blob (seen
    by HEAD or pushed by this client): the source of cross-repository mounts. ``headers`` are sent
    with every request (e.g. a static ``Authorization``); the token challenge of an authenticating
    registry is not implemented."""

    def __init__(self, base_url: str, timeout: float = 30, retries: int = 5, backoff: float = 0.5, *,
                 chunk_size: int = 8 * 1024 * 1024, max_connections: int = 32, headers: dict | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.chunk_size = int(chunk_size)
        self.blob_locations: dict[str, str] = {}
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers,
                                  limits=httpx.Limits(max_connections=max_connections,
                                                      max_keepalive_connections=max_connections))
        self.requests = 0  # requests sent, retries included (for benches and tests)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _abs(self, location: str) -> str:
        return str(httpx.URL(self.base_url + "/").join(location))

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None:
            ra = resp.headers.get("Retry-After")
            if ra and ra.isdigit():
                return min(float(ra), 30.0)
        return min(self.backoff * (2 ** attempt), 30.0) * (1 + random.random() * 0.1)

    @staticmethod
    def _retryable(status: int) -> bool:
        return status >= 500 or status == 429

    def _error(self, method: str, url: str, resp: httpx.Response, message: str = "unexpected answer",
               cls: type[RegistryError] = RegistryError) -> RegistryError:
        try:
            body = resp.text[:500]
        except Exception:  # noqa: BLE001 - a streamed body that was not read
            body = ""
        return cls(message, status=resp.status_code, body=body.strip(), method=method, url=url)

    def _gave_up(self, method: str, url: str, last: httpx.Response | Exception | None) -> RegistryError:
        """The error after the last retry: the last answer, or the last transport error."""
        if isinstance(last, httpx.Response):
            return self._error(method, url, last, f"still failing after {self.retries + 1} attempts")
        return RegistryError(f"{type(last).__name__}: {last} (after {self.retries + 1} attempts)", method=method, url=url)

    def _request(self, method: str, url: str, *, expect: tuple[int, ...] = (200,), allow: tuple[int, ...] = (),
                 headers: dict | None = None, params: dict | None = None,
                 content: bytes | None = None) -> httpx.Response:
        """One request with retries; ``content`` must be bytes so it can be sent again. ``params``
        are added to the query of ``url`` (upload locations carry their own state in it)."""
        if params:
            url = str(httpx.URL(url).copy_merge_params(params))
            params = None
        last: httpx.Response | Exception | None = None
        for attempt in range(self.retries + 1):
            self._count()
            try:
                resp = self._http.request(method, url, headers=headers, params=params, content=content)
            except httpx.TransportError as e:
                last = e
                resp = None
            else:
                if resp.status_code in expect or resp.status_code in allow:
                    return resp
                if not self._retryable(resp.status_code):
                    raise self._error(method, url, resp)
                last = resp
            if attempt < self.retries:
                time.sleep(self._delay(attempt, resp))
        raise self._gave_up(method, url, last)

    @contextlib.contextmanager
    def _stream(self, method: str, url: str, headers: dict | None = None,
                expect: tuple[int, ...] = (200,)) -> Iterator[httpx.Response]:
        last: httpx.Response | Exception | None = None
        for attempt in range(self.retries + 1):
            self._count()
            resp = None
            try:
                resp = self._http.send(self._http.build_request(method, url, headers=headers), stream=True,
                                       follow_redirects=True)
            except httpx.TransportError as e:
                last = e
            else:
                if resp.status_code in expect:
                    try:
                        yield resp
                    finally:
                        resp.close()
                    return
                resp.read()
                resp.close()
                if not self._retryable(resp.status_code):
                    raise self._error(method, url, resp)
                last = resp
            if attempt < self.retries:
                time.sleep(self._delay(attempt, resp))
        raise self._gave_up(method, url, last)

    def _paged(self, path: str, key: str) -> list[str]:
        out: list[str] = []
        url = self._url(path)
        params: dict | None = {"n": 1000}
        while url:
            resp = self._request("GET", url, params=params, allow=(404,))
            if resp.status_code == 404:
                return []
            out.extend(resp.json().get(key) or [])
            link = resp.links.get("next", {}).get("url")
            url, params = (self._abs(link), None) if link else ("", None)
        return out

    # -- listing -------------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            return self._request("GET", self._url("/v2/"), allow=(401,)).status_code == 200
        except RegistryError:
            return False

    def catalog(self) -> list[str]:
        """All repository names (``/v2/_catalog``, paginated)."""
        return self._paged("/v2/_catalog", "repositories")

    def tags(self, repo: str) -> list[str]:
        """The tags of ``repo`` (paginated); [] when the repository does not exist."""
        return self._paged(f"/v2/{repo}/tags/list", "tags")

    # -- manifests -----------------------------------------------------------------------------

    def head_manifest(self, repo: str, ref: str) -> ManifestRef | None:
        """Media type, digest and size of a manifest by tag or digest; None when it does not exist."""
        url = self._url(f"/v2/{repo}/manifests/{ref}")
        resp = self._request("HEAD", url, headers={"Accept": _ACCEPT}, allow=(404,))
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("Docker-Content-Digest")
        if not digest:
            if _is_digest(ref):
                digest = ref
            else:  # no digest header: fall back to GET and hash
                media_type, body, digest = self.get_manifest(repo, ref)
                return ManifestRef(media_type, digest, len(body))
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return ManifestRef(media_type, digest, int(resp.headers.get("Content-Length", "0") or 0))

    def get_manifest(self, repo: str, ref: str) -> tuple[str, bytes, str]:
        """``(media_type, body, digest)`` of a manifest (OCI/Docker image manifest, OCI index, Docker
        manifest list). ``digest`` is the digest of the exact bytes; they must match ``ref`` when it
        is a digest, and the registry's ``Docker-Content-Digest`` otherwise (else
        :class:`DigestMismatch`: the stored manifest is corrupt)."""
        url = self._url(f"/v2/{repo}/manifests/{ref}")
        resp = self._request("GET", url, headers={"Accept": _ACCEPT})
        body = resp.content
        expected = ref if _is_digest(ref) else resp.headers.get("Docker-Content-Digest")
        digest = _digest_of(body, expected.split(":", 1)[0] if expected else "sha256")
        if expected and digest != expected:
            raise DigestMismatch(f"manifest content hashes to {digest}, expected {expected}", method="GET", url=url)
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in MANIFEST_MEDIA_TYPES:
            try:
                media_type = json.loads(body).get("mediaType") or media_type
            except ValueError:
                pass
        if media_type not in MANIFEST_MEDIA_TYPES:
            raise RegistryError(f"unsupported manifest media type {media_type!r} (supported: {_ACCEPT})",
                                method="GET", url=url)
        return media_type, body, digest

    def put_manifest(self, repo: str, ref: str, media_type: str, body: bytes) -> str:
        """Store a manifest under a tag or its digest; returns the digest."""
        url = self._url(f"/v2/{repo}/manifests/{ref}")
        resp = self._request("PUT", url, headers={"Content-Type": media_type}, content=bytes(body), expect=(201, 200))
        return resp.headers.get("Docker-Content-Digest") or _digest_of(body)

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest by digest (the registry removes every tag pointing at it). False if absent."""
        if not _is_digest(digest):
            raise ValueError(f"delete_manifest needs a digest, not {digest!r} (use delete_tag)")
        resp = self._request("DELETE", self._url(f"/v2/{repo}/manifests/{digest}"), expect=(202, 200), allow=(404,))
        return resp.status_code != 404

    def delete_tag(self, repo: str, tag: str, *, siblings: Iterable[str] | None = None) -> bool:
        """Remove one tag, keeping the manifest's other tags. False if the tag does not exist.

        Registries implementing OCI distribution 1.1 delete a tag with ``DELETE .../manifests/<tag>``.
        The distribution 2.x registry does not; then the manifest is deleted by digest (which drops
        all its tags), put back by digest (untagged: an index listing it stays whole, exactly as
        after a real tag deletion) and tagged again with the other tags that pointed at it
        (``siblings`` when the caller knows them, else found by a HEAD of every tag). Blobs are not
        touched. In that fallback the other tags are briefly absent."""
        cur = self.head_manifest(repo, tag)
        if cur is None:
            return False
        url = self._url(f"/v2/{repo}/manifests/{tag}")
        resp = self._request("DELETE", url, expect=(202, 200), allow=(400, 404, 405))
        if resp.status_code in (200, 202):
            return True
        if siblings is None:
            siblings = [t for t in self.tags(repo) if t != tag
                        and (h := self.head_manifest(repo, t)) is not None and h.digest == cur.digest]
        siblings = [t for t in siblings if t != tag]
        media_type, body, _ = self.get_manifest(repo, cur.digest)
        self.delete_manifest(repo, cur.digest)
        self.put_manifest(repo, cur.digest, media_type, body)
        for t in siblings:
            self.put_manifest(repo, t, media_type, body)
        return True

    # -- blobs ---------------------------------------------------------------------------------

    def _remember(self, digest: str, repo: str) -> None:
        self.blob_locations.setdefault(digest, repo)

    def head_blob(self, repo: str, digest: str) -> bool:
        """Whether ``repo`` holds the blob (blobs are linked per repository)."""
        resp = self._request("HEAD", self._url(f"/v2/{repo}/blobs/{digest}"), expect=(200, 307), allow=(404,))
        if resp.status_code == 404:
            return False
        self._remember(digest, repo)
        return True

    def get_blob(self, repo: str, digest: str, *, chunk_size: int | None = None,
                 verify: bool = True) -> Iterator[bytes]:
        """Stream a blob in chunks (as they arrive, or of ``chunk_size`` bytes). A connection lost
        mid-way is resumed with a Range request from the last byte received;
        with ``verify`` the content is checked against ``digest`` at the end (:class:`DigestMismatch`)."""
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        h = _hasher(digest) if verify else None
        received = 0
        failures = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else None
            try:
                with self._stream("GET", url, headers=headers, expect=(206,) if received else (200,)) as resp:
                    for chunk in resp.iter_bytes(chunk_size):
                        received += len(chunk)
                        if h is not None:
                            h.update(chunk)
                        yield chunk
                break
            except httpx.TransportError as e:
                failures += 1
                if failures > self.retries:
                    raise RegistryError(f"download interrupted at byte {received}: {e}", method="GET", url=url) from e
                time.sleep(self._delay(failures - 1, None))
        if h is not None and f"{digest.split(':', 1)[0]}:{h.hexdigest()}" != digest:
            raise DigestMismatch(f"blob content does not hash to {digest}", method="GET", url=url)

    def _start_upload(self, repo: str, params: dict | None = None) -> httpx.Response:
        return self._request("POST", self._url(f"/v2/{repo}/blobs/uploads/"), params=params, expect=(202, 201),
                             headers={"Content-Length": "0"})

    def _cancel_upload(self, location: str) -> None:
        with contextlib.suppress(RegistryError):
            self._request("DELETE", self._abs(location), expect=(204, 200, 202), allow=(404,))

    def put_blob(self, repo: str, digest: str, chunks: Iterable[bytes], size: int | None = None) -> int:
        """Upload a blob from an iterable of byte chunks; returns the number of bytes.

        ``size`` at most ``chunk_size``: monolithic (POST, then PUT with the content and the
        digest). Larger or unknown: POST, PATCH pieces of ``chunk_size`` with ``Content-Range``
        (each retried on its own), then PUT with the digest. The content is hashed on the way and
        the upload is cancelled (:class:`DigestMismatch`) if it does not match ``digest``."""
        h = _hasher(digest)
        resp = self._start_upload(repo)
        location = resp.headers["Location"]
        total = 0
        try:
            if size is not None and size <= self.chunk_size:
                data = b"".join(chunks)
                total = len(data)
                h.update(data)
                self._check_upload(digest, h, total, size)
                resp = self._request("PUT", self._abs(location), params={"digest": digest}, content=data,
                                     headers={"Content-Type": "application/octet-stream"}, expect=(201,))
            else:
                buf = bytearray()

                def send(piece: bytes) -> None:
                    nonlocal location, total
                    r = self._request("PATCH", self._abs(location), content=piece, expect=(202, 204),
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Range": f"{total}-{total + len(piece) - 1}"})
                    location = r.headers.get("Location", location)
                    total += len(piece)

                for chunk in chunks:
                    h.update(chunk)
                    buf += chunk
                    while len(buf) >= self.chunk_size:
                        send(bytes(buf[:self.chunk_size]))
                        del buf[:self.chunk_size]
                if buf:
                    send(bytes(buf))
                self._check_upload(digest, h, total, size)
                resp = self._request("PUT", self._abs(location), params={"digest": digest}, expect=(201,),
                                     headers={"Content-Length": "0"})
        except BaseException:
            self._cancel_upload(location)
            raise
        self._remember(digest, repo)
        return total

    @staticmethod
    def _check_upload(digest: str, h, total: int, size: int | None) -> None:
        got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if got != digest:
            raise DigestMismatch(f"content to upload hashes to {got}, expected {digest}")
        if size is not None and total != size:
            raise DigestMismatch(f"content to upload has {total} bytes, expected {size}")

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount of a blob from ``from_repo`` of this same registry (no data moves).
        False when the registry could not mount (it then opened an upload, which is cancelled)."""
        resp = self._start_upload(repo, params={"mount": digest, "from": from_repo})
        if resp.status_code == 201:
            self._remember(digest, repo)
            return True
        if "Location" in resp.headers:
            self._cancel_upload(resp.headers["Location"])
        return False


# ---------------------------------------------------------------------------------------------
# Replication
# ---------------------------------------------------------------------------------------------

def _children(media_type: str, body: bytes) -> list[dict]:
    """Descriptors an index references (child manifests)."""
    return list(json.loads(body).get("manifests") or [])


def _blobs(media_type: str, body: bytes) -> list[dict]:
    """Descriptors of the blobs an image manifest references: config, then layers. Foreign layers
    (descriptors with ``urls``, stored outside the registry) are not copied."""
    doc = json.loads(body)
    out = [doc["config"]] if doc.get("config") else []
    out += [d for d in doc.get("layers") or [] if not d.get("urls")]
    return out


def repository_blobs(client: RegistryClient, repo: str) -> tuple[int, dict[str, int]]:
    """(tags, {digest: size} of every blob the tags reference, through indexes) of a repository, read
    only; (0, {}) for a repository the registry does not have."""
    try:
        tags = client.tags(repo)
    except RegistryError as e:
        if e.status == 404:
            return 0, {}
        raise
    found: dict[str, int] = {}
    todo, seen = list(tags), set()
    while todo:
        media_type, body, digest = client.get_manifest(repo, todo.pop())
        if digest in seen:
            continue
        seen.add(digest)
        if media_type in INDEX_MEDIA_TYPES:
            todo += [c["digest"] for c in _children(media_type, body)]
        else:
            for d in _blobs(media_type, body):
                found[d["digest"]] = int(d.get("size") or 0)
    return len(tags), found


def _same_registry(a: RegistryClient, b: RegistryClient) -> bool:
    return httpx.URL(a.base_url) == httpx.URL(b.base_url)


def sync_repository(src: RegistryClient, dst: RegistryClient, src_repo: str, dst_repo: str | None = None,
                    delete_extra_tags: bool = True, *, workers: int = 8, log=None) -> dict:
    """Make ``dst_repo`` on ``dst`` hold exactly the tags of ``src_repo`` on ``src``, by digest.

    For every source tag whose digest differs on the target (or is missing there): the manifest is
    read by digest; an index brings its child manifests (by digest); every image manifest brings
    its config and layer blobs. Blobs are copied only when the target repository lacks them (HEAD
    first); a blob another repository of the target registry holds is mounted (when ``src`` and
    ``dst`` are the same registry, from ``src_repo``; else from ``dst.blob_locations``), other blobs
    are streamed from the source into the target. Then child manifests, the manifests by digest,
    and last the tag. Target tags absent at the source are removed when ``delete_extra_tags``.

    A tag already pointing at the source digest is left alone (the registry only accepts a
    manifest whose blobs it holds, so its blobs are there). Returns counts::

        {"repository", "source_repository", "tags", "tags_copied", "tags_unchanged", "tags_deleted",
         "manifests", "blobs_copied", "blobs_mounted", "blobs_skipped", "bytes", "seconds"}
    """
    dst_repo = dst_repo or src_repo
    t0 = time.monotonic()
    say = log or (lambda *_: None)
    stats = {"repository": dst_repo, "source_repository": src_repo, "tags": 0, "tags_copied": 0,
             "tags_unchanged": 0, "tags_deleted": 0, "manifests": 0, "blobs_copied": 0, "blobs_mounted": 0,
             "blobs_skipped": 0, "bytes": 0, "seconds": 0.0}
    same = _same_registry(src, dst)
    src_tags = sorted(src.tags(src_repo))
    dst_tags = set(dst.tags(dst_repo))

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="registry-sync") as pool:
        # 1. which tags need work: source digest vs target digest
        def resolve(tag: str):
            head = src.head_manifest(src_repo, tag)
            cur = dst.head_manifest(dst_repo, tag) if head is not None and tag in dst_tags else None
            return tag, head, cur

        src_digest: dict[str, str] = {}
        todo: list[tuple[str, str]] = []
        for tag, head, cur in pool.map(resolve, src_tags):
            if head is None:  # deleted at the source meanwhile
                continue
            src_digest[tag] = head.digest
            if cur is not None and cur.digest == head.digest:
                stats["tags_unchanged"] += 1
            else:
                todo.append((tag, head.digest))
        stats["tags"] = len(src_digest)

        # 2. manifests to copy (tops by digest, children first), blobs they need
        tops: dict[str, tuple[str, bytes]] = {}
        tops_present: set[str] = set()
        children: dict[str, tuple[str, bytes]] = {}
        blobs: dict[str, int] = {}

        def fetch_top(digest: str):
            media_type, body, _ = src.get_manifest(src_repo, digest)
            present = dst.head_manifest(dst_repo, digest) is not None
            return digest, media_type, body, present

        def visit(digest: str, media_type: str, body: bytes, present: bool, level: int = 0) -> None:
            if present:
                return
            if media_type in INDEX_MEDIA_TYPES:
                if level > 4:
                    raise RegistryError(f"{src_repo}@{digest}: indexes nested too deeply")
                for child in _children(media_type, body):
                    d = child["digest"]
                    if d in children or d in tops or dst.head_manifest(dst_repo, d) is not None:
                        continue  # already planned, or on the target (with its blobs)
                    c_type, c_body, _ = src.get_manifest(src_repo, d)
                    visit(d, c_type, c_body, False, level + 1)
                    children[d] = (c_type, c_body)  # post-order: an index after its own children
            else:
                for desc in _blobs(media_type, body):
                    blobs.setdefault(desc["digest"], int(desc.get("size", -1)))

        for digest, media_type, body, present in pool.map(fetch_top, sorted({d for _, d in todo})):
            tops[digest] = (media_type, body)
            if present:
                tops_present.add(digest)  # only the tag is missing on the target
            visit(digest, media_type, body, present)

        # 3. blobs
        def copy_blob(item: tuple[str, int]) -> tuple[str, int]:
            digest, size = item
            if dst.head_blob(dst_repo, digest):
                return "skipped", 0
            candidates = [src_repo] if same and src_repo != dst_repo else []
            known = dst.blob_locations.get(digest)
            if known and known != dst_repo and known not in candidates:
                candidates.append(known)
            for c in candidates:
                if dst.mount_blob(dst_repo, digest, c):
                    return "mounted", 0
            for attempt in (1, 2):
                try:
                    n = dst.put_blob(dst_repo, digest, src.get_blob(src_repo, digest, verify=False),
                                     size if size >= 0 else None)
                    return "copied", n
                except DigestMismatch as e:
                    raise RegistryError(f"{src_repo}: blob {digest} is corrupt on the source: {e}") from e
                except RegistryError:
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        for outcome, n in pool.map(copy_blob, sorted(blobs.items())):
            stats[f"blobs_{outcome}"] += 1
            stats["bytes"] += n

        # 4. manifests by digest (children before their index), then the tags
        def put_digest(item):
            digest, (media_type, body) = item
            dst.put_manifest(dst_repo, digest, media_type, body)

        # the registry accepts an index only once it holds the manifests it lists: image manifests
        # first (in parallel), then the indexes, each after the indexes it lists
        pending = dict(children)
        pending.update((d, v) for d, v in tops.items() if d not in tops_present)
        list(pool.map(put_digest, [(d, v) for d, v in pending.items() if v[0] not in INDEX_MEDIA_TYPES]))
        indexes = {d: v for d, v in pending.items() if v[0] in INDEX_MEDIA_TYPES}
        while indexes:
            ready = [d for d, (mt, body) in indexes.items()
                     if not any(c["digest"] in indexes for c in _children(mt, body))]
            if not ready:
                raise RegistryError(f"{src_repo}: indexes that list each other: {sorted(indexes)}")
            for d in ready:
                put_digest((d, indexes.pop(d)))
        stats["manifests"] = len(pending)

        # Tags: the distribution registry's filesystem storage rewrites a manifest's link file on
        # every PUT (truncate + write), and a PUT of an index reads its children's link files. So the
        # tags of one digest are written one after the other, and index tags after all image tags.
        by_digest: dict[str, list[str]] = {}
        for tag, digest in todo:
            by_digest.setdefault(digest, []).append(tag)

        def put_tags(digest: str) -> None:
            media_type, body = tops[digest]
            for tag in by_digest[digest]:
                dst.put_manifest(dst_repo, tag, media_type, body)

        list(pool.map(put_tags, [d for d in by_digest if tops[d][0] not in INDEX_MEDIA_TYPES]))
        list(pool.map(put_tags, [d for d in by_digest if tops[d][0] in INDEX_MEDIA_TYPES]))
        stats["tags_copied"] = len(todo)

    # 5. tags gone at the source
    if delete_extra_tags:
        for tag in sorted(dst_tags - set(src_digest)):
            cur = dst.head_manifest(dst_repo, tag)
            siblings = [t for t, d in src_digest.items() if cur is not None and d == cur.digest]
            if dst.delete_tag(dst_repo, tag, siblings=siblings):
                stats["tags_deleted"] += 1

    stats["seconds"] = round(time.monotonic() - t0, 3)
    say(f"{src_repo} -> {dst_repo}: {stats}")
    return stats


def verify_repository(src: RegistryClient, dst: RegistryClient, src_repo: str, dst_repo: str | None = None, *,
                      deep: bool = True, workers: int = 8) -> list[str]:
    """Source tags (sorted) that are missing on the target or whose target manifest differs.

    The target manifest is read (GET) and hashed, so a manifest corrupted in the target's storage
    is found even when the tag still names the right digest. With ``deep``, every child manifest of
    an index is read and hashed too, and every blob the manifests reference must be present in the
    target repository (HEAD; blob *content* is not re-hashed)."""
    dst_repo = dst_repo or src_repo

    def check_manifest(media_type: str, body: bytes, level: int = 0) -> bool:
        if media_type in INDEX_MEDIA_TYPES:
            for child in _children(media_type, body):
                c_type, c_body, _ = dst.get_manifest(dst_repo, child["digest"])
                if level > 4 or not check_manifest(c_type, c_body, level + 1):
                    return False
            return True
        return all(dst.head_blob(dst_repo, d["digest"]) for d in _blobs(media_type, body))

    def check(tag: str) -> str | None:
        head = src.head_manifest(src_repo, tag)
        if head is None:
            return None
        try:
            media_type, body, digest = dst.get_manifest(dst_repo, tag)
        except RegistryError:
            return tag  # missing (404) or unreadable/corrupt
        if digest != head.digest:
            return tag
        if deep:
            try:
                if not check_manifest(media_type, body):
                    return tag
            except RegistryError:
                return tag
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="registry-verify") as pool:
        return sorted(t for t in pool.map(check, src.tags(src_repo)) if t is not None)


# ---------------------------------------------------------------------------------------------
# GitLab's path rule
# ---------------------------------------------------------------------------------------------

# GitLab's Gitlab::Regex.container_repository_name_regex (the distribution's path component rule)
_PATH_RE = re.compile(r"^[a-z0-9]+(?:(?:[._/]|__|-*)[a-z0-9])*$")
IMAGE_NAME_LEVELS = 3  # ContainerRegistry::Path::LEVELS_SUPPORTED
_MAX_PATH_COMPONENTS = 20  # Namespace::NUMBER_OF_ANCESTORS_ALLOWED (components must stay below it)


def container_repository_path(project_full_path: str, name: str = "") -> str:
    """Registry path of a ``container_repositories`` row: ``<project full path>/<name>``, lowercased
    (``name`` empty -> the project path itself, the project's root image).

    "At most 3 levels" (data model §8) is GitLab's ``ContainerRegistry::Path::LEVELS_SUPPORTED = 3``:
    GitLab finds the project of a registry path among the path's 3 longest prefixes, so an image
    path has at most 3 levels counting the project path as the first -- ``group/project``,
    ``group/project/a``, ``group/project/a/b`` -- i.e. ``name`` has at most 2 components. The path
    follows the project's route (not its id), must match GitLab's repository name pattern and have
    fewer than 20 components. Raises :class:`~orgmover.errors.ConfigError` otherwise."""
    project = project_full_path.strip("/")
    name = (name or "").strip("/")
    path = "/".join(p for p in (project, name) if p).lower()
    name_levels = len(name.split("/")) if name else 0
    if not project or "/" not in project:
        raise ConfigError(f"project full path {project_full_path!r} must be <namespace>/<project>")
    if name_levels > IMAGE_NAME_LEVELS - 1:
        raise ConfigError(f"image name {name!r} of {project_full_path!r} has {name_levels} levels; GitLab allows "
                          f"at most {IMAGE_NAME_LEVELS} image levels counting the project path "
                          f"(a name of at most {IMAGE_NAME_LEVELS - 1} components)")
    if len(path.split("/")) >= _MAX_PATH_COMPONENTS:
        raise ConfigError(f"registry path {path!r} has too many components (GitLab: fewer than {_MAX_PATH_COMPONENTS})")
    if not _PATH_RE.match(path):
        raise ConfigError(f"registry path {path!r} is not a valid container repository name")
    return path


# ---------------------------------------------------------------------------------------------
# Deterministic seeding
# ---------------------------------------------------------------------------------------------

def make_layer(rng: random.Random, size: int = 64_000, name: str | None = None) -> bytes:
    """A deterministic uncompressed tar layer holding one file of ``size`` random bytes."""
    data = rng.randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name or f"data/{rng.getrandbits(64):016x}.bin")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = "root"
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _ensure_blob(client: RegistryClient, repo: str, data: bytes) -> dict:
    digest = _digest_of(data)
    if not client.head_blob(repo, digest):
        client.put_blob(repo, digest, [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)] or [b""],
                        len(data))
    return {"digest": digest, "size": len(data)}


def push_image(client: RegistryClient, repo: str, tag: str | None, rng: random.Random, layers: int = 3,
               layer_size: int = 64_000, shared_layers: list[bytes] | None = None,
               platform: tuple[str, str] = ("linux", "amd64")) -> str:
    """Push an OCI image: ``shared_layers`` (blobs from :func:`make_layer`, pass the same ones to
    several repositories to share them) then ``layers`` new random tar layers of ``layer_size``
    bytes, an OCI config and an OCI image manifest, tagged ``tag`` (``None``: by digest only).
    Deterministic for a given ``rng`` state. Returns the manifest digest."""
    blobs = list(shared_layers or []) + [make_layer(rng, layer_size) for _ in range(layers)]
    descs = [dict(_ensure_blob(client, repo, b), mediaType=OCI_LAYER_TAR) for b in blobs]
    os_, arch = platform
    config = _canonical({
        "architecture": arch, "os": os_, "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"orgmover.seed": f"{rng.getrandbits(32):08x}"}},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},  # uncompressed: diff_id = digest
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "orgmover seed"} for _ in descs],
    })
    cdesc = dict(_ensure_blob(client, repo, config), mediaType=OCI_CONFIG)
    manifest = _canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": descs})
    return _put_tagged(client, repo, tag, OCI_MANIFEST, manifest)


def _put_tagged(client: RegistryClient, repo: str, tag: str | None, media_type: str, manifest: bytes) -> str:
    digest = _digest_of(manifest)
    client.put_manifest(repo, digest, media_type, manifest)
    if tag:
        client.put_manifest(repo, tag, media_type, manifest)
    return digest


def push_index(client: RegistryClient, repo: str, tag: str, rng: random.Random,
               platforms: Iterable[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")), layers: int = 2,
               layer_size: int = 64_000, shared_layers: list[bytes] | None = None) -> str:
    """Push a multi-architecture OCI index: one image per platform (by digest), then the index
    tagged ``tag``. Returns the index digest."""
    entries = []
    for os_, arch in platforms:
        digest = push_image(client, repo, None, rng, layers=layers, layer_size=layer_size,
                            shared_layers=shared_layers, platform=(os_, arch))
        ref = client.head_manifest(repo, digest)
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": ref.size,
                        "platform": {"architecture": arch, "os": os_}})
    index = _canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    return _put_tagged(client, repo, tag, OCI_INDEX, index)
