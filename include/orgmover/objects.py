"""Object storage replication between cells: S3-compatible and GCS stores, streaming and verified.

What a cell keeps in object storage (artifacts, LFS objects, uploads, packages, ...) is addressed by
ids, oids and dates only (see ``artifact_path``, ``lfs_path``, ``package_path``), so an object keeps
its key when it moves to another cell: replication is "make the target bucket hold the same bytes
under the same keys".

* ``ObjectStore`` is the small interface both back ends implement: ``list``, ``list_page`` (one listing
  request from a key on), ``head``, ``read`` (an iterator of chunks), ``write`` (from an iterator of
  chunks: S3 streamed PUT or multipart upload / GCS resumable upload above ``PART_SIZE``), ``delete``,
  ``ensure_bucket`` and ``checksum``. ``list_infos`` gives many keys' infos from listings (the
  replication scan's fingerprints) instead of a HEAD each.
* Every object we write carries our own ``sha256`` (and, when known before the upload, ``md5``) in
  its user metadata, so a multipart object, whose S3 ETag is not an MD5, can still be verified
  without reading it back. When the sha256 is only known at the end of a multipart upload (a source
  without our metadata, as GitLab writes them) it is recorded by a server-side part-for-part copy of
  the object onto itself. Metadata that no longer matches the content (an object overwritten by
  someone else with the old metadata) is detected through the store's own MD5 where there is one
  and then ignored.
* ``sync_objects`` lists both sides at once and decides from the listings where it can (equal
  sha256, equal MD5, equal multipart ETag), asks HEAD where it cannot, and streams only as a last
  resort. It copies what is missing or different in a thread pool: small objects in one request,
  large ones through a bounded pipe (a reader thread feeding the uploader, a few MiB in flight, never a
  whole object in memory): on S3 up to ``SINGLE_PUT_MAX`` in one streamed PUT (a multipart upload
  costs the server a second pass over the bytes), above it an S3 multipart source part for part in its
  own layout when that layout is uniform (the target gets the same ETag, so later passes compare
  listings only). Each copy is checked in flight against the source's sha256/MD5 before the object is
  committed (a streamed PUT holds its last piece back until the check passed; the source's MD5 goes as
  Content-MD5, which the server checks). Reads are presigned GETs on a plain connection pool, outside
  botocore's per-request pipeline. Transient errors
  (5xx, 429, connection errors, a source that changed while it was read) are retried with
  exponential backoff; ``delete_extra`` deletes target objects the source no longer has.
  ``verify_objects`` compares checksums; ``sync_object``/``object_checksum`` do one object, for a
  Geo-like per-object registry.
* ``LocalS3`` / ``LocalGCS`` run moto's S3 server and gcp-storage-emulator as local processes
  (127.0.0.1, no Docker) for the dev environment and the tests.

The store clients make one attempt per request (botocore ``total_max_attempts=1``, google
``retry=None``): retrying is this module's job (``_retry``), so a caller sees one policy, and the
tests can prove it. This module does not import Airflow.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import http.client
import io
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orgmover.errors import OrgMoverError
from orgmover.localpg import pid_alive as _alive

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # objects above this are multipart (S3) / resumable (GCS) uploads, in parts of this size
READ_CHUNK = 1 * MiB  # pieces a read yields; the copy pipe holds PIPE_DEPTH of them
PIPE_DEPTH = 2
MAX_PARTS = 10_000  # S3's limit on parts per upload
MAX_BACKOFF = 30.0

META_SHA256 = "sha256"  # user metadata we write on every object
META_MD5 = "md5"
META_SRC_ETAG = "src-etag"  # the source object's ETag when the copy was made (identity of multipart sources)

_MD5_RE = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG_RE = re.compile(r"[0-9a-f]{32}-(\d+)")
MAX_MIMIC_PART = 32 * MiB  # largest source part size we copy part for part (the part is buffered)
SINGLE_PUT_MAX = 64 * MiB  # S3: objects above PART_SIZE up to this go in one streamed PUT, not multipart
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------- errors
class ObjectStoreError(OrgMoverError):
    """An object store operation failed."""


class ObjectNotFound(ObjectStoreError):
    """The object does not exist."""


class ChecksumMismatch(ObjectStoreError):
    """The bytes read or written do not match the expected checksum (nothing was committed)."""


class SourceChanged(ObjectStoreError):
    """The source object changed while it was being read (size differs); retried."""


class TransientHTTPError(ObjectStoreError):
    """A 5xx/429 answer from a request made by this module itself."""


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it.

    ``md5`` is the hex MD5 of the content when the store exposes it (S3 single-part ETag, GCS md5Hash,
    or our metadata); ``sha256`` is our metadata when it is still trustworthy. ``etag`` is the store's
    opaque version (S3 ETag, GCS etag), ``src_etag`` the source ETag recorded when we copied it here.
    """

    key: str
    size: int
    md5: str | None = None
    sha256: str | None = None
    etag: str | None = None
    src_etag: str | None = None


def _b64md5(hex_md5: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_md5)).decode()


def _etag_md5(etag: str | None) -> str | None:
    """The ETag as an MD5 when it is one (single-part upload), else None."""
    if not etag:
        return None
    e = etag.strip('"').lower()
    return e if _MD5_RE.fullmatch(e) else None


def _trusted(meta: Mapping[str, str], actual_md5: str | None) -> tuple[str | None, str | None]:
    """(sha256, md5) from our metadata, or (None, ...) when the metadata does not describe the content."""
    sha = (meta.get(META_SHA256) or "").lower() or None
    mmd5 = (meta.get(META_MD5) or "").lower() or None
    if sha and not _SHA256_RE.fullmatch(sha):
        sha = None
    if mmd5 and not _MD5_RE.fullmatch(mmd5):
        mmd5 = None
    if actual_md5 and mmd5 and actual_md5 != mmd5:
        return None, actual_md5  # overwritten by someone who kept our old metadata
    return sha, actual_md5 or (mmd5 if sha else None)


class _Digests:
    def __init__(self, md5: bool = True) -> None:
        self.md5 = hashlib.md5() if md5 else None
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data) -> None:
        if self.md5 is not None:
            self.md5.update(data)
        self.sha256.update(data)
        self.size += len(data)


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytearray]:
    """Regroup a stream of pieces into parts of exactly ``size`` bytes (the last may be shorter)."""
    buf = bytearray()
    for c in chunks:
        if not c:
            continue
        mv = memoryview(c)
        while len(mv):
            take = min(size - len(buf), len(mv))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) == size:
                yield buf
                buf = bytearray()
    if buf:
        yield buf


def _read_whole(key: str, chunks: Iterable[bytes], size: int) -> bytearray:
    """A small object's bytes (at most ``size`` + one chunk read: a longer stream is an error)."""
    data = bytearray()
    for c in chunks:
        data += c
        if len(data) > size:
            break
    _check_total(key, len(data), size)
    return data


def _check_total(key: str, got: int, size: int) -> None:
    if got != size:
        raise SourceChanged(f"{key}: the source gave {got} bytes, {size} were expected (changed while read?)")


def _check_expected(key: str, d: _Digests, sha256: str | None, md5: str | None) -> None:
    if sha256 and d.sha256.hexdigest() != sha256.lower():
        raise ChecksumMismatch(f"{key}: sha256 of the bytes read is {d.sha256.hexdigest()}, expected {sha256}")
    if md5 and d.md5 is not None and d.md5.hexdigest() != md5.lower():
        raise ChecksumMismatch(f"{key}: md5 of the bytes read is {d.md5.hexdigest()}, expected {md5}")


# The HTTP headers an object keeps when it is copied (names as google-cloud-storage spells them).
HEADER_FIELDS = ("content_type", "content_encoding", "content_disposition", "cache_control")
_S3_HEADER = {"content_type": "ContentType", "content_encoding": "ContentEncoding",
              "content_disposition": "ContentDisposition", "cache_control": "CacheControl"}
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_S3_HTTP_HEADER = {"content_type": "Content-Type", "content_encoding": "Content-Encoding",
                   "content_disposition": "Content-Disposition", "cache_control": "Cache-Control"}


def _s3_error(status: int, body: bytes, operation: str):
    """An S3 error answer as botocore would raise it (a ClientError with the XML's Code and Message), so
    every caller handles it the same way whichever path made the request."""
    from botocore.exceptions import ClientError

    code = msg = ""
    m = re.search(rb"<Code>([^<]*)</Code>", body or b"")
    if m:
        code = m.group(1).decode(errors="replace")
    m = re.search(rb"<Message>([^<]*)</Message>", body or b"")
    if m:
        msg = m.group(1).decode(errors="replace")
    return ClientError({"Error": {"Code": code or str(status), "Message": msg},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


class ObjectStream:
    """What ``read`` returns: the object's bytes as an iterator of chunks, plus its ``headers``
    (content_type, content_encoding, content_disposition, cache_control; only those it has)."""

    def __init__(self, chunks: Iterator[bytes], headers: Mapping[str, str] | None = None,
                 on_close: Callable[[], None] | None = None):
        self._chunks = chunks
        self.headers = {k: v for k, v in (headers or {}).items() if v}
        self._on_close = on_close

    def __iter__(self) -> ObjectStream:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()
        if self._on_close is not None:  # also when iteration never started (a generator's finally would not run)
            self._on_close()
            self._on_close = None


def _s3_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    h = {_S3_HEADER[k]: v for k, v in (headers or {}).items() if k in _S3_HEADER and v}
    h.setdefault("ContentType", DEFAULT_CONTENT_TYPE)
    return h


# ---------------------------------------------------------------------------------------------- the pipe
class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Cancelled(Exception):
    pass


class Pipe:
    """A memory-bounded pipe: ``produce(sink)`` runs in its own thread and calls ``sink(piece)``, which
    blocks while ``depth`` pieces wait; iterating the pipe yields the pieces. An error in the producer
    is raised in the consumer; closing the pipe (or abandoning the iteration) stops the producer."""

    _END = object()

    def __init__(self, produce: Callable[[Callable[[bytes], None]], Any], depth: int = PIPE_DEPTH, name: str = "pipe"):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    @classmethod
    def from_iter(cls, factory: Callable[[], Iterable[bytes]], depth: int = PIPE_DEPTH, name: str = "pipe") -> Pipe:
        def produce(sink):
            it = factory()
            try:
                for piece in it:
                    sink(piece)
            finally:
                close = getattr(it, "close", None)
                if close:
                    close()

        return cls(produce, depth, name)

    def _sink(self, item) -> None:
        while True:
            if self._cancel.is_set():
                raise _Cancelled()
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, produce) -> None:
        try:
            produce(self._sink)
            self._sink(self._END)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            try:
                self._sink(_Failure(e))
            except _Cancelled:
                pass

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                try:
                    item = self._q.get(timeout=0.5)
                except queue.Empty:
                    if not self._thread.is_alive() and self._q.empty():
                        raise ObjectStoreError("pipe producer ended without finishing") from None
                    continue
                if item is self._END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._cancel.set()
        while True:  # free what is queued so a blocked producer sees the cancel
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)


class _SinkWriter:
    """A write-only file object that groups small writes into pieces of ``piece`` bytes for a sink."""

    def __init__(self, sink: Callable[[bytes], None], piece: int):
        self._sink = sink
        self._piece = piece
        self._buf = bytearray()
        self.written = 0

    def write(self, data) -> int:
        self._buf += data
        self.written += len(data)
        if len(self._buf) >= self._piece:
            self._sink(bytes(self._buf))
            self._buf = bytearray()
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self._buf:
            self._sink(bytes(self._buf))
            self._buf = bytearray()


# ---------------------------------------------------------------------------------------------- stores
class ObjectStore(ABC):
    """One bucket of an object store."""

    bucket: str
    read_chunk: int = READ_CHUNK
    part_size: int = PART_SIZE

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` (``sha256`` may be None when the listing carries no metadata)."""

    def list_page(self, prefix: str = "", start_at: str | None = None,
                  max_keys: int = 1000) -> tuple[list[ObjectInfo], bool]:
        """One listing request: objects under ``prefix`` whose key is ``>= start_at``, in key order, and
        whether more follow (truncated). Stores without a native way list everything under ``prefix``."""
        infos = sorted((i for i in self.list(prefix) if start_at is None or i.key >= start_at), key=lambda i: i.key)
        return infos, False

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""

    @abstractmethod
    def read(self, key: str) -> ObjectStream:
        """The object's bytes as a stream of chunks (with its HTTP headers); raises ObjectNotFound."""

    @abstractmethod
    def write(self, key: str, chunks: Iterable[bytes], size: int, sha256: str | None = None, *,
              md5: str | None = None, metadata: Mapping[str, str] | None = None,
              part_size: int | None = None, headers: Mapping[str, str] | None = None) -> ObjectInfo:
        """Store exactly ``size`` bytes from ``chunks`` under ``key``, streaming. When ``sha256``/``md5``
        are given the bytes are checked against them before the object is committed (ChecksumMismatch).
        The object gets our ``sha256`` metadata in every case. ``part_size`` asks for that multipart
        layout (S3; ignored elsewhere); ``headers`` (see HEADER_FIELDS) are stored with the object."""

    def part_layout(self, info: ObjectInfo) -> int | None:
        """The uniform part size of a multipart object, when the store can tell (S3), else None."""
        return None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (no error when it does not exist)."""

    @abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist."""

    def checksum(self, key: str, deep: bool = False) -> str | None:
        """The object's SHA-256 (hex): from our metadata when present and trustworthy, else computed by
        streaming the object (always when ``deep``). None when the object does not exist."""
        if not deep:
            info = self.head(key)
            if info is None:
                return None
            if info.sha256:
                return info.sha256
        h = hashlib.sha256()
        try:
            for c in self.read(key):
                h.update(c)
        except ObjectNotFound:
            return None
        return h.hexdigest()

    def describe(self) -> str:
        return f"{type(self).__name__}({self.bucket})"

    def __repr__(self) -> str:
        return self.describe()


_BOTO_LOCK = threading.Lock()
_BOTO_SESSION = None  # a boto3 Session is not thread-safe: clients are made from it under the lock


def _fast_timestamp(value):
    """botocore's timestamp parser without dateutil for the two forms S3 sends: ISO 8601 (listings) and
    RFC 1123 (Last-Modified headers); anything else goes to botocore's own parser."""
    from email.utils import parsedate_to_datetime

    from botocore.utils import parse_timestamp

    if isinstance(value, str):
        try:
            t = _dt.datetime.fromisoformat(value) if value[:1].isdigit() else parsedate_to_datetime(value)
            if t.tzinfo is not None:
                return t
        except (ValueError, TypeError):
            pass
    return parse_timestamp(value)


class _CheckedBody(io.RawIOBase):
    """A request body read from an iterator of chunks, hashed into ``digests`` as it is read one chunk
    ahead; the last piece is handed out only after the total size and the expected digests were checked
    (else the check's error is raised, and kept in ``error``: the request ends before the server has the
    whole body)."""

    def __init__(self, key: str, chunks: Iterable[bytes], size: int, digests: _Digests, sha256: str | None,
                 md5: str | None):
        super().__init__()
        self._key, self._size, self._d, self._sha256, self._md5 = key, size, digests, sha256, md5
        self._it = iter(chunks)
        self._cur = memoryview(b"")
        self.error: BaseException | None = None
        self._ahead = self._fetch()

    def readable(self) -> bool:
        return True

    def _fetch(self):
        for c in self._it:
            if not c:
                continue
            if self._d.size + len(c) > self._size:
                _check_total(self._key, self._d.size + len(c), self._size)
            self._d.update(c)
            return memoryview(c)
        return None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        try:
            if not len(self._cur):
                if self._ahead is None:
                    return b""
                self._cur, self._ahead = self._ahead, self._fetch()
                if self._ahead is None:  # self._cur is the last piece: everything was hashed
                    _check_total(self._key, self._d.size, self._size)
                    _check_expected(self._key, self._d, self._sha256, self._md5)
        except BaseException as e:
            self.error = e
            raise
        take = len(self._cur) if n is None or n < 0 else n
        out, self._cur = bytes(self._cur[:take]), self._cur[take:]
        return out


class S3Store(ObjectStore):
    """A bucket of an S3-compatible store through boto3 (path-style addressing, one attempt per request)."""

    def __init__(self, endpoint_url: str | None, bucket: str, access_key: str | None = "test",
                 secret_key: str | None = "test", region: str = "us-east-1", *, max_attempts: int = 1,
                 max_pool_connections: int = 32, connect_timeout: float = 10, read_timeout: float = 120):
        import boto3
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        cfg = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # also for presigned URLs (botocore would presign with SigV2, which S3 refuses)
            retries={"total_max_attempts": max_attempts, "mode": "standard"},  # 1 = no retry inside botocore
            # Content-MD5 on every PUT/part instead of the newer default CRC trailers, which many
            # S3-compatible servers do not speak.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        with _BOTO_LOCK:  # one session for all stores: a new one reloads the service model (~60 ms)
            global _BOTO_SESSION
            if _BOTO_SESSION is None:
                _BOTO_SESSION = boto3.session.Session()
                # botocore parses every listed object's LastModified with dateutil (~0.15 ms each: most of
                # the client's time in a listing); ISO 8601 is parsed natively, anything else as before
                _BOTO_SESSION._session.get_component("response_parser_factory").set_parser_defaults(
                    timestamp_parser=_fast_timestamp)
            self.client = _BOTO_SESSION.client(
                "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                region_name=region, config=cfg)
        self._client_args = dict(endpoint_url=endpoint_url, aws_access_key_id=access_key,
                                 aws_secret_access_key=secret_key, region_name=region,
                                 config=cfg.merge(Config(s3={"addressing_style": "path", "payload_signing_enabled": False})))
        self._put = None
        self.single_put_max = SINGLE_PUT_MAX
        self._http = None
        self._max_pool = max_pool_connections
        import urllib3

        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        # Over plain HTTP botocore signs every payload's SHA-256, which the server checks: a part then
        # needs no Content-MD5 (an MD5 pass less). Over HTTPS payloads go unsigned and parts carry one.
        self._signed_payload = not str(self.client.meta.endpoint_url).startswith("https")

    @property
    def put_client(self):
        """A client for single-request uploads, which always carry Content-MD5 (checked by the server): their
        payload is not signed, so botocore does not hash the whole object once more over plain HTTP."""
        if self._put is None:
            with _BOTO_LOCK:
                if self._put is None:
                    self._put = _BOTO_SESSION.client("s3", **self._client_args)
        return self._put

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS'}"

    @staticmethod
    def _is_404(e: Exception) -> bool:
        r = getattr(e, "response", None) or {}
        code = str(r.get("Error", {}).get("Code", ""))
        status = r.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("404", "NoSuchKey", "NotFound") or status == 404

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", ()):
                etag = o.get("ETag", "").strip('"')
                yield ObjectInfo(o["Key"], int(o["Size"]), _etag_md5(etag), None, etag)

    def list_page(self, prefix: str = "", start_at: str | None = None,
                  max_keys: int = 1000) -> tuple[list[ObjectInfo], bool]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max(1, min(int(max_keys), 1000))}
        if start_at and len(start_at) > 1:
            # StartAfter is exclusive: the key minus its last character sorts just before it
            kw["StartAfter"] = start_at[:-1]
        r = self.client.list_objects_v2(**kw)
        out = []
        for o in r.get("Contents", ()):
            if start_at is None or o["Key"] >= start_at:
                etag = o.get("ETag", "").strip('"')
                out.append(ObjectInfo(o["Key"], int(o["Size"]), _etag_md5(etag), None, etag))
        return out, bool(r.get("IsTruncated"))

    def _info(self, key: str, r: Mapping[str, Any]) -> ObjectInfo:
        etag = str(r.get("ETag", "")).strip('"')
        meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
        sha, md5 = _trusted(meta, _etag_md5(etag))
        return ObjectInfo(key, int(r["ContentLength"]), md5, sha, etag, meta.get(META_SRC_ETAG))

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if self._is_404(e):
                return None
            raise
        return self._info(key, r)

    def _pool(self):
        """A connection pool for object reads (made on first use, shared by the threads), verifying TLS with
        the CA bundle botocore would use; None when requests to the endpoint must go through a proxy (then
        botocore makes them, with its proxy settings)."""
        if self._http is None:
            import urllib.request
            from urllib.parse import urlsplit

            import urllib3
            from botocore.httpsession import get_cert_path

            url = urlsplit(str(self.client.meta.endpoint_url))
            proxied = bool(urllib.request.getproxies().get(url.scheme)) and not urllib.request.proxy_bypass(
                url.hostname or "")
            with _BOTO_LOCK:
                if self._http is None:
                    tls = ({"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)}
                           if url.scheme == "https" else {})
                    self._http = False if proxied else urllib3.PoolManager(
                        maxsize=self._max_pool, retries=False, timeout=self._timeout, **tls)
        return self._http or None

    def read(self, key: str) -> ObjectStream:
        """A GET by a presigned URL on a plain connection pool: botocore signs it (~0.1 ms), and the response
        is streamed as stored (never decompressed) without going through botocore's request pipeline (~1 ms
        of CPU per request, most of a small object's copy). Through botocore when a proxy is configured."""
        pool = self._pool()
        if pool is None:
            return self._read_via_botocore(key)
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=3600)
        r = pool.request("GET", url, preload_content=False, decode_content=False, redirect=False)
        if r.status != 200:
            body = r.read(decode_content=False)
            r.release_conn()
            err = _s3_error(r.status, body, "GetObject")
            if self._is_404(err):
                raise ObjectNotFound(f"{self.describe()}: no object {key}") from err
            raise err
        headers = {k: r.headers.get(h) for k, h in _S3_HTTP_HEADER.items()}
        complete = [False]
        return ObjectStream(self._stream(r, complete), headers, on_close=lambda: self._done(r, complete[0]))

    def _read_via_botocore(self, key: str) -> ObjectStream:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if self._is_404(e):
                raise ObjectNotFound(f"{self.describe()}: no object {key}") from e
            raise
        body = r["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                while c := body.read(self.read_chunk):
                    yield c
            finally:
                body.close()

        return ObjectStream(chunks(), {k: r.get(v) for k, v in _S3_HEADER.items()}, on_close=body.close)

    @staticmethod
    def _done(r, complete: bool) -> None:
        if not complete:  # abandoned before its end: that connection is not reused
            r.close()
        r.release_conn()

    def _stream(self, r, complete: list) -> Iterator[bytes]:
        try:
            yield from r.stream(self.read_chunk, decode_content=False)
            complete[0] = True
        finally:
            self._done(r, complete[0])

    def write(self, key: str, chunks: Iterable[bytes], size: int, sha256: str | None = None, *,
              md5: str | None = None, metadata: Mapping[str, str] | None = None,
              part_size: int | None = None, headers: Mapping[str, str] | None = None) -> ObjectInfo:
        extra = dict(metadata or {})
        http = _s3_headers(headers)
        if size <= self.part_size:
            md5 = md5.lower() if md5 and _MD5_RE.fullmatch(md5.lower()) else None
            # An expected MD5 (the source's) goes out as Content-MD5: the server checks the bytes against it
            # before it commits them, which spares an MD5 pass here; otherwise it is computed here.
            d = _Digests(md5=md5 is None)
            data = _read_whole(key, chunks, size)
            d.update(data)
            _check_expected(key, d, sha256, None)
            content_md5 = md5 or d.md5.hexdigest()
            meta = {**extra, META_SHA256: d.sha256.hexdigest(), META_MD5: content_md5}
            r = self.put_client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentLength=size,
                                           ContentMD5=_b64md5(content_md5), Metadata=meta, **http)
            etag = str(r.get("ETag", "")).strip('"')
            stored = _etag_md5(etag)
            if stored and stored != content_md5:  # a server that does not check Content-MD5 stored other bytes
                raise ChecksumMismatch(f"{key}: the target stored bytes with MD5 {stored}, expected {content_md5}")
            return ObjectInfo(key, size, content_md5, d.sha256.hexdigest(), etag, extra.get(META_SRC_ETAG))
        if size <= self.single_put_max and not part_size:
            return self._write_single(key, chunks, size, sha256, md5, extra, http)
        return self._write_multipart(key, chunks, size, sha256, md5, extra, part_size, http)

    def _write_single(self, key, chunks, size, sha256, md5, extra, http) -> ObjectInfo:
        """One streamed PUT (a multipart upload costs the server a second pass over the bytes): what is
        known before the body (the expected MD5 as Content-MD5, the server's check; the expected sha256) goes
        in the headers; the body is hashed as it is sent and its last piece held back until the size and the
        expected digests are checked, so a mismatch aborts the request before the server has the whole body
        (nothing is committed). The returned ETag must be the MD5 of what was sent."""
        md5 = md5.lower() if md5 and _MD5_RE.fullmatch(md5.lower()) else None
        d = _Digests(md5=md5 is None)
        meta = dict(extra)
        if sha256:
            meta[META_SHA256] = sha256.lower()
        kw = dict(http)
        if md5:
            meta[META_MD5] = md5
            kw["ContentMD5"] = _b64md5(md5)
        body = _CheckedBody(key, chunks, size, d, sha256, None)
        try:
            r = self.put_client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size, Metadata=meta,
                                           **kw)
        except Exception:
            if body.error is not None:
                raise body.error from None
            raise
        etag = str(r.get("ETag", "")).strip('"')
        sent_md5 = md5 or d.md5.hexdigest()
        stored = _etag_md5(etag)
        if stored and stored != sent_md5:
            raise ChecksumMismatch(f"{key}: the target stored bytes with MD5 {stored}, {sent_md5} was sent")
        # (an object whose sha256 was not known before the upload has none in its metadata: its ETag is its
        # MD5, which later comparisons use; no server-side copy onto itself to add it, as a multipart one needs)
        return ObjectInfo(key, size, sent_md5, d.sha256.hexdigest(), etag, extra.get(META_SRC_ETAG))

    def part_layout(self, info: ObjectInfo) -> int | None:
        m = _MULTIPART_ETAG_RE.fullmatch(info.etag or "")
        if not m:
            return None
        r = self.client.head_object(Bucket=self.bucket, Key=info.key, PartNumber=1)
        part, n = int(r["ContentLength"]), int(m.group(1))  # (a store ignoring PartNumber gives the size: no match)
        if 5 * MiB <= part <= MAX_MIMIC_PART and -(-info.size // part) == n:
            return part
        return None

    def _write_multipart(self, key, chunks, size, sha256, md5, extra, wanted_part, http) -> ObjectInfo:
        part_size = wanted_part if wanted_part and 5 * MiB <= wanted_part <= MAX_MIMIC_PART else self.part_size
        if size > part_size * MAX_PARTS:
            part_size = -(-size // MAX_PARTS // MiB) * MiB + MiB
        meta = dict(extra)
        if sha256:
            meta[META_SHA256] = sha256.lower()
        up = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta, **http)
        upload_id = up["UploadId"]
        # the whole-object MD5 only when it is to be checked: each part has its own for Content-MD5
        d = _Digests(md5=bool(md5))
        parts = []

        def upload(n: int, part) -> dict:
            kw = {} if self._signed_payload else {"ContentMD5": base64.b64encode(hashlib.md5(part).digest()).decode()}
            r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n,
                                        Body=part, ContentLength=len(part), **kw)
            return {"PartNumber": n, "ETag": r["ETag"]}

        # one part uploads while the next is read and hashed: two parts in memory at most
        uploader = ThreadPoolExecutor(1, thread_name_prefix="part-upload")
        try:
            sending = None
            for n, part in enumerate(_rechunk(chunks, part_size), start=1):
                if d.size + len(part) > size:
                    _check_total(key, d.size + len(part), size)
                d.update(part)
                if sending is not None:
                    parts.append(sending.result())
                sending = uploader.submit(upload, n, part)
                del part
            if sending is not None:
                parts.append(sending.result())
            _check_total(key, d.size, size)
            _check_expected(key, d, sha256, md5)
            r = self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
        except BaseException:
            uploader.shutdown(wait=True)  # the part in flight ends before the upload is aborted
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - best effort; a lifecycle rule cleans up the rest
                pass
            raise
        finally:
            uploader.shutdown(wait=False)
        etag = str(r.get("ETag", "")).strip('"')
        sha_hex, md5_hex = d.sha256.hexdigest(), md5.lower() if md5 else None
        if not sha256:
            try:
                self._record_metadata(key, etag, size, part_size, {**extra, META_SHA256: sha_hex}, http)
            except Exception:  # noqa: BLE001 - the object is complete; only the metadata shortcut is missing
                pass
        return ObjectInfo(key, size, md5_hex, sha_hex, etag, extra.get(META_SRC_ETAG))

    def _record_metadata(self, key: str, etag: str, size: int, part_size: int, meta: dict, http: dict) -> None:
        """Give a multipart object new metadata by copying it onto itself part for part on the server
        (the same layout keeps the same ETag; any size), only while it is still the object we wrote."""
        up = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta, **http)
        upload_id = up["UploadId"]
        try:
            parts = []
            for n, off in enumerate(range(0, size, part_size), start=1):
                r = self.client.upload_part_copy(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n,
                                                 CopySource={"Bucket": self.bucket, "Key": key},
                                                 CopySourceIfMatch=f'"{etag}"',
                                                 CopySourceRange=f"bytes={off}-{min(off + part_size, size) - 1}")
                parts.append({"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001
                pass
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if not self._is_404(e):
                raise
        kw: dict[str, Any] = {}
        if self.region and self.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(Bucket=self.bucket, **kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


class GCSStore(ObjectStore):
    """A GCS bucket through google-cloud-storage (anonymous credentials for an emulator), one attempt per
    request. Large objects go through a resumable upload driven here, so nothing is committed before
    all bytes were read and checked."""

    def __init__(self, endpoint_url: str | None, bucket: str, project: str = "test", *, credentials=None,
                 timeout: float = 120):
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.bucket = bucket
        self.project = project
        self.timeout = timeout
        if credentials is None and endpoint_url:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        self._credentials = credentials
        self._local = threading.local()

    def describe(self) -> str:
        return f"gs://{self.bucket} at {self.endpoint_url or 'GCS'}"

    @property
    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            from google.cloud import storage

            opts = {"api_endpoint": self.endpoint_url} if self.endpoint_url else None
            c = storage.Client(project=self.project, credentials=self._credentials, client_options=opts)
            self._local.client = c
        return c

    @property
    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            from google.auth.transport.requests import AuthorizedSession

            s = AuthorizedSession(self.client._credentials)
            self._local.session = s
        return s

    def _bucket(self):
        return self.client.bucket(self.bucket)

    @staticmethod
    def _blob_info(blob) -> ObjectInfo:
        actual = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else None
        meta = {k.lower(): v for k, v in (blob.metadata or {}).items()}
        sha, md5 = _trusted(meta, actual)
        return ObjectInfo(blob.name, int(blob.size or 0), md5, sha, blob.etag, meta.get(META_SRC_ETAG))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for blob in self.client.list_blobs(self.bucket, prefix=prefix or None, retry=None, timeout=self.timeout):
            yield self._blob_info(blob)

    def list_page(self, prefix: str = "", start_at: str | None = None,
                  max_keys: int = 1000) -> tuple[list[ObjectInfo], bool]:
        n = max(1, min(int(max_keys), 1000))
        it = self.client.list_blobs(self.bucket, prefix=prefix or None, start_offset=start_at or None, max_results=n,
                                    retry=None, timeout=self.timeout)
        page = next(it.pages, None)
        blobs = list(page) if page is not None else []
        # filtered and sorted here too: an emulator may ignore startOffset/maxResults and send everything
        out = sorted((self._blob_info(b) for b in blobs if start_at is None or b.name >= start_at), key=lambda i: i.key)
        return out, bool(it.next_page_token)

    def head(self, key: str) -> ObjectInfo | None:
        blob = self._bucket().get_blob(key, retry=None, timeout=self.timeout)
        return None if blob is None else self._blob_info(blob)

    def read(self, key: str) -> ObjectStream:
        from google.api_core.exceptions import NotFound

        blob = self._bucket().get_blob(key, retry=None, timeout=self.timeout)
        if blob is None:
            raise ObjectNotFound(f"{self.describe()}: no object {key}")
        client = self.client
        headers = {k: getattr(blob, k) for k in HEADER_FIELDS}
        # the generation just looked at, at a URL built from our endpoint (not the server's mediaLink)
        pinned = self._bucket().blob(key, generation=blob.generation)

        def produce(sink):
            w = _SinkWriter(sink, self.read_chunk)
            # raw_download: the stored bytes (no gunzip), checked against the stored crc32c/md5
            pinned.download_to_file(w, client=client, raw_download=True, retry=None, timeout=self.timeout)
            w.finish()

        def pieces():
            try:
                yield from Pipe(produce, PIPE_DEPTH, name=f"gcs-read {key}")
            except NotFound as e:  # replaced or deleted since we looked: look again
                raise SourceChanged(f"{self.describe()}: {key} generation {blob.generation} is gone") from e

        return ObjectStream(pieces(), headers)

    def write(self, key: str, chunks: Iterable[bytes], size: int, sha256: str | None = None, *,
              md5: str | None = None, metadata: Mapping[str, str] | None = None,
              part_size: int | None = None, headers: Mapping[str, str] | None = None) -> ObjectInfo:
        extra = dict(metadata or {})
        blob = self._bucket().blob(key)
        headers = dict(headers or {})
        content_type = headers.get("content_type") or DEFAULT_CONTENT_TYPE
        for k in HEADER_FIELDS[1:]:
            if headers.get(k):
                setattr(blob, k, headers[k])
        if size <= self.part_size:
            data = _read_whole(key, chunks, size)
            d = _Digests()
            d.update(data)
            _check_expected(key, d, sha256, md5)
            blob.metadata = {**extra, META_SHA256: d.sha256.hexdigest(), META_MD5: d.md5.hexdigest()}
            blob.upload_from_string(bytes(data), content_type=content_type, checksum="md5",
                                    retry=None, timeout=self.timeout)
            return self._blob_info(blob)
        return self._write_resumable(blob, key, chunks, size, sha256, md5, extra, content_type)

    def _write_resumable(self, blob, key, chunks, size, sha256, md5, extra, content_type) -> ObjectInfo:
        blob.metadata = {**extra, **({META_SHA256: sha256.lower()} if sha256 else {})}
        url = blob.create_resumable_upload_session(content_type=content_type, size=size,
                                                   checksum=None, retry=None, timeout=self.timeout)
        d = _Digests()
        result: dict | None = None
        try:
            for part in _rechunk(chunks, self.part_size):
                if d.size + len(part) > size:
                    _check_total(key, d.size + len(part), size)
                d.update(part)
                if d.size == size:  # the last part: check everything before the object is committed
                    _check_expected(key, d, sha256, md5)
                result = self._put_part(url, part, d.size - len(part), size)
                del part
            _check_total(key, d.size, size)
        except BaseException:
            if result is None:
                self._cancel(url)
            else:  # committed, but the source gave more than ``size`` bytes
                self._delete_quiet(key, result.get("generation"))
            raise
        if result is None:  # size 0 never gets here (small path), so this is defensive
            raise ObjectStoreError(f"{key}: resumable upload did not finish")
        got_md5 = base64.b64decode(result["md5Hash"]).hex() if result.get("md5Hash") else None
        if got_md5 and got_md5 != d.md5.hexdigest():
            self._delete_quiet(key, result.get("generation"))
            raise ChecksumMismatch(f"{key}: the store computed md5 {got_md5}, we sent {d.md5.hexdigest()}")
        sha_hex = d.sha256.hexdigest()
        meta = {**extra, META_SHA256: sha_hex}
        if not sha256:
            try:  # metadata only now known: patch it (no data copy), only on the generation we wrote
                blob.metadata = meta
                blob.patch(if_generation_match=int(result["generation"]), retry=None, timeout=self.timeout)
            except Exception:  # noqa: BLE001 - the object is complete; only the metadata shortcut is missing
                pass
        return ObjectInfo(key, size, got_md5 or d.md5.hexdigest(), sha_hex, result.get("etag"),
                          extra.get(META_SRC_ETAG))

    def _put_part(self, url: str, part, offset: int, size: int, attempts: int = 4) -> dict | None:
        """PUT one part of a resumable upload; resumes from what the server confirmed after a transient
        error. Returns the object resource when the upload is complete, else None."""
        view = memoryview(part)
        end = offset + len(part)
        sent = offset
        failures = 0
        while True:
            try:
                if sent < end:
                    body = view[sent - offset:]
                    r = self._session.put(url, data=bytes(body), allow_redirects=False,
                                          headers={"Content-Range": f"bytes {sent}-{end - 1}/{size}"},
                                          timeout=self.timeout)
                else:  # ask how far it got
                    r = self._session.put(url, data=b"", allow_redirects=False,
                                          headers={"Content-Range": f"bytes */{size}"}, timeout=self.timeout)
                if r.status_code in (200, 201):
                    return r.json()
                if r.status_code == 308:
                    rng = r.headers.get("Range")
                    confirmed = int(rng.rsplit("-", 1)[1]) + 1 if rng else 0
                    if confirmed >= end:
                        return None
                    if confirmed < offset:
                        raise ObjectStoreError(f"resumable upload lost confirmed bytes ({confirmed} < {offset})")
                    sent = confirmed
                    continue
                if r.status_code >= 500 or r.status_code == 429:
                    raise TransientHTTPError(f"resumable upload part: HTTP {r.status_code}: {r.text[:200]}")
                raise ObjectStoreError(f"resumable upload part: HTTP {r.status_code}: {r.text[:500]}")
            except Exception as e:
                failures += 1
                if failures >= attempts or not is_transient(e):
                    raise
                time.sleep(min(MAX_BACKOFF, 0.2 * 2 ** failures))
                sent = end  # next round asks the server what it has

    def _cancel(self, url: str) -> None:
        try:
            self._session.delete(url, timeout=10)
        except Exception:  # noqa: BLE001 - an abandoned session expires by itself
            pass

    def _delete_quiet(self, key: str, generation=None) -> None:
        try:
            self._bucket().blob(key).delete(if_generation_match=int(generation) if generation else None, retry=None)
        except Exception:  # noqa: BLE001
            pass

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._bucket().blob(key).delete(retry=None, timeout=self.timeout)
        except NotFound:
            pass

    def ensure_bucket(self) -> None:
        from google.api_core.exceptions import Conflict

        if self.client.lookup_bucket(self.bucket, retry=None, timeout=self.timeout) is not None:
            return
        try:
            self.client.create_bucket(self.bucket, retry=None, timeout=self.timeout)
        except Conflict:
            pass


# ---------------------------------------------------------------------------------------------- retries
_TRANSIENT_NAMES = {
    # botocore
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "IncompleteReadError", "ResponseStreamingError", "HTTPClientError", "ProxyConnectionError",
    # urllib3 / requests / http.client / google.auth
    "ProtocolError", "ChunkedEncodingError", "IncompleteRead", "RemoteDisconnected", "Timeout",
    "ConnectTimeout", "ReadTimeout", "ConnectionError", "NewConnectionError", "TransportError",
    # google
    "DataCorruption", "ServiceUnavailable", "InternalServerError", "BadGateway", "GatewayTimeout",
    "TooManyRequests", "ServerError",
}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "ExpiredToken", "RequestTimeTooSkewed"}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 5xx/429 answers, connection and timeout errors, a source that changed while read,
    bytes that did not match their checksum in transit."""
    if isinstance(exc, (ChecksumMismatch, SourceChanged, TransientHTTPError, ConnectionError, TimeoutError,
                        http.client.IncompleteRead, http.client.BadStatusLine)):
        return True
    if isinstance(exc, ObjectStoreError):
        return False
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(resp.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES or code.startswith("5")
    code = getattr(exc, "code", None)  # google.api_core exceptions
    if isinstance(code, int) and (code >= 500 or code == 429):
        return True
    status = getattr(resp, "status_code", None)  # requests-based errors (InvalidResponse, HTTPError)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__)


def _retry(fn: Callable[[], Any], retries: int, backoff: float, attempts_out: list | None = None):
    """``fn()`` with up to ``retries`` retries of transient errors, sleeping backoff * 2**n (jittered)."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if attempts_out is not None:
                attempts_out.append(e)
            if attempt >= retries or not is_transient(e):
                raise
            time.sleep(min(MAX_BACKOFF, backoff * 2 ** attempt) * (0.5 + random.random() / 2))
            attempt += 1


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- sync
def _same(si: ObjectInfo, di: ObjectInfo | None) -> bool | None:
    """Does the target hold the source's bytes? None when the infos cannot tell."""
    if di is None or si.size != di.size:
        return False
    if si.sha256 and di.sha256:
        return si.sha256 == di.sha256
    if si.md5 and di.md5:
        return si.md5 == di.md5
    if si.etag and si.etag == di.etag and _MULTIPART_ETAG_RE.fullmatch(si.etag):
        return True  # the same multipart ETag: the same parts' MD5s in the same layout
    if si.etag and di.src_etag:
        return si.etag == di.src_etag or None
    return None


def _copy(src: ObjectStore, dst: ObjectStore, si: ObjectInfo) -> ObjectInfo:
    meta = {META_SRC_ETAG: si.etag} if si.etag else None
    if si.size <= dst.part_size:  # one request on the target: nothing to overlap, read in this thread
        stream = src.read(si.key)
        try:
            return dst.write(si.key, stream, si.size, si.sha256, md5=si.md5, metadata=meta,
                             headers=getattr(stream, "headers", None))
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
    # above the single-PUT size, a multipart source is copied part for part when its layout is uniform, so
    # the target gets the same ETag and later passes compare the two listings without a HEAD (below it, one
    # PUT is cheaper than the parts, and later passes compare the sha256s)
    part = None
    if isinstance(dst, S3Store) and si.size > dst.single_put_max and _MULTIPART_ETAG_RE.fullmatch(si.etag or ""):
        try:
            part = src.part_layout(si)
        except Exception:  # noqa: BLE001 - only an optimization
            part = None
    # large: a reader thread feeds the uploader through a bounded pipe (reads overlap uploads)
    stream = src.read(si.key)
    pipe = Pipe.from_iter(lambda: stream, PIPE_DEPTH, name=f"read {si.key}")
    try:
        return dst.write(si.key, pipe, si.size, si.sha256, md5=si.md5, metadata=meta, part_size=part,
                         headers=getattr(stream, "headers", None))
    finally:
        pipe.close()


def _sync_key(src: ObjectStore, dst: ObjectStore, key: str, si: ObjectInfo | None, di: ObjectInfo | None,
              listed: bool, delete_missing: bool) -> dict:
    """One attempt: head (unless listed), compare, copy when needed."""
    out = {"key": key, "action": "skipped", "bytes": 0, "sha256": None, "error": None}
    try:
        return _compare_and_copy(src, dst, key, si, di, listed, out)
    except ObjectNotFound:  # not on the source (any more): deleted there, or never was
        if delete_missing and dst.head(key) is not None:
            dst.delete(key)
            out["action"] = "deleted"
        else:
            out.update(action="missing_on_source", error="not found on the source")
        return out


def _compare_and_copy(src: ObjectStore, dst: ObjectStore, key: str, si: ObjectInfo | None,
                      di: ObjectInfo | None, listed: bool, out: dict) -> dict:
    def head_src() -> ObjectInfo:
        info = src.head(key)
        if info is None:
            raise ObjectNotFound(f"{src.describe()}: no object {key}")
        return info

    if si is None:
        si, di, listed = head_src(), dst.head(key), False
    verdict = _same(si, di)
    if verdict is None and listed:  # listings carry no metadata (S3): ask the target first (its metadata names
        di = dst.head(key)          # the source version it was copied from), then the source
        verdict = _same(si, di)
        if verdict is None:
            si, listed = head_src(), False
            verdict = _same(si, di)
    if verdict is None:  # no shared digest: compute (streams whatever has no sha256 metadata)
        ssum = src.checksum(key)
        if ssum is None:
            raise ObjectNotFound(f"{src.describe()}: no object {key}")
        verdict = ssum == dst.checksum(key)
        if si.sha256 is None:
            si = ObjectInfo(si.key, si.size, si.md5, ssum, si.etag, si.src_etag)
    if verdict:
        out["sha256"] = si.sha256 or (di.sha256 if di else None)
        return out
    if listed and si.sha256 is None and si.md5 is None:
        # a listed multipart object: its metadata may hold the sha256, which lets the copy be checked
        # in flight (and spares the in-place copy that records it afterwards)
        si = head_src()
    info = _copy(src, dst, si)
    out.update(action="copied", bytes=si.size, sha256=info.sha256)
    return out


def sync_object(src: ObjectStore, dst: ObjectStore, key: str, *, retries: int = 5, backoff: float = 0.5,
                delete_missing: bool = False) -> dict:
    """Make ``dst`` hold the source's object ``key``. Never raises for a store error: returns
    ``{key, action, bytes, sha256, error, attempts}`` with action one of copied, skipped, deleted (source
    gone and ``delete_missing``), missing_on_source (Geo's missing_on_primary) or failed."""
    errors: list = []
    try:
        out = _retry(lambda: _sync_key(src, dst, key, None, None, False, delete_missing), retries, backoff, errors)
    except Exception as e:  # noqa: BLE001 - reported per key
        out = {"key": key, "action": "failed", "bytes": 0, "sha256": None, "error": _err(e)}
    out["attempts"] = len(errors) + (0 if out["action"] == "failed" else 1)
    return out


def object_checksum(store: ObjectStore, key: str, *, deep: bool = False, retries: int = 5,
                    backoff: float = 0.5) -> str | None:
    """The object's SHA-256 hex (metadata, else streamed; always streamed when ``deep``), None if missing."""
    return _retry(lambda: store.checksum(key, deep=deep), retries, backoff)


def fingerprint(info: ObjectInfo | None) -> str | None:
    """A cheap identity of the object's current version: its size and the store's ETag (MD5 when the store has
    no ETag). The same whether ``info`` came from a listing or a HEAD; None for a missing object."""
    if info is None:
        return None
    return f"{info.size}:{info.etag or info.md5 or ''}"


def _forbidden(e: BaseException) -> bool:
    """A 403 (S3 AccessDenied, GCS Forbidden)."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 or \
            str(resp.get("Error", {}).get("Code", "")) in ("AccessDenied", "403")
    return getattr(e, "code", None) == 403


def list_infos(store: ObjectStore, keys: Iterable[str], *, workers: int = 8, run_keys: int = 256,
               retries: int = 5, backoff: float = 0.5, counts: dict | None = None) -> dict[str, ObjectInfo | None]:
    """What ``store`` knows about each of ``keys`` (None: no such object), from bucket listings instead of a
    HEAD per key.

    The keys are sorted and cut into runs of about ``run_keys`` consecutive keys, listed in ``workers``
    threads. A run is read with a skip-scan under the common prefix of its keys: each listing request starts
    at the run's first key not yet resolved and resolves every key up to the last one it returned (all of
    them when the listing says it is complete). Where the keys are dense (an org's project directories) a run
    costs one request per 1000 keys; where they are sparse among other objects (content-addressed LFS objects
    of a whole cell) every request still resolves at least one key, so a run never costs more requests than
    it has keys. Credentials that may not list the bucket (403) get a HEAD per key. ``counts`` (when given)
    gets ``list_requests`` and ``heads`` added."""
    ks = sorted(set(keys))
    out: dict[str, ObjectInfo | None] = {}
    if not ks:
        return out
    nruns = -(-len(ks) // max(1, run_keys))
    size = -(-len(ks) // nruns)
    runs = [ks[i:i + size] for i in range(0, len(ks), size)]
    lock = threading.Lock()

    def scan(run: list[str]) -> None:
        prefix = os.path.commonprefix([run[0], run[-1]])
        res: dict[str, ObjectInfo | None] = {}
        requests = heads = i = 0
        while i < len(run):
            start, left = run[i], len(run) - i
            # as many entries as keys left (plus a margin): where the keys are dense one request does the run
            try:
                page, truncated = _retry(lambda: store.list_page(prefix, start, max_keys=min(1000, left + 16 + left // 16)),
                                         retries, backoff)
            except Exception as e:
                if not _forbidden(e):
                    raise
                break  # credentials that may read objects but not list the bucket: one HEAD per key

            requests += 1
            listed = {p.key: p for p in page}
            if not truncated:
                for k in run[i:]:
                    res[k] = listed.get(k)
                i = len(run)
                break
            if not page or page[-1].key < start:
                break  # no progress (a store that ignored the start): the rest one by one
            last = page[-1].key
            while i < len(run) and run[i] <= last:
                res[run[i]] = listed.get(run[i])
                i += 1
        for k in run[i:]:
            res[k] = _retry(lambda: store.head(k), retries, backoff)
            heads += 1
        with lock:
            out.update(res)
            if counts is not None:
                counts["list_requests"] = counts.get("list_requests", 0) + requests
                counts["heads"] = counts.get("heads", 0) + heads

    if len(runs) == 1 or workers <= 1:
        for run in runs:
            scan(run)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(runs)), thread_name_prefix="objlist") as ex:
            list(ex.map(scan, runs))
    return out


def _bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                 on_done: Callable[[Any, Any, BaseException | None], None]) -> None:
    """Run ``fn(item)`` in a pool with at most ``4 * workers`` items in flight (the item stream is lazy)."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="objsync") as ex:
        pending: dict = {}
        limit = max(1, workers) * 4

        def drain(block: bool):
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED, timeout=None if block else 0)
            for f in done:
                item = pending.pop(f)
                e = f.exception()
                on_done(item, None if e else f.result(), e)

        for item in items:
            pending[ex.submit(fn, item)] = item
            if len(pending) >= limit:
                drain(True)
        while pending:
            drain(True)


def sync_objects(src: ObjectStore, dst: ObjectStore, keys: Iterable[str] | None = None, prefix: str = "",
                 delete_extra: bool = False, workers: int = 4, retries: int = 5, backoff: float = 0.5, *,
                 on_result: Callable[[dict], None] | None = None) -> dict:
    """Copy the objects that are missing on ``dst`` or differ (size or checksum), streaming, in ``workers``
    threads, retrying transient errors. ``keys`` limits the work to those keys (each is headed on both
    sides); otherwise both buckets are listed under ``prefix``. With ``delete_extra`` target objects the
    source no longer has are deleted (under ``prefix``, or among ``keys``).

    Returns ``{copied, skipped, deleted, failed, bytes, failures: {key: error}, seconds}``;
    ``on_result`` gets each per-key result (as ``sync_object`` returns it) as it completes."""
    t0 = time.monotonic()
    stats: dict[str, Any] = {"copied": 0, "skipped": 0, "deleted": 0, "failed": 0, "bytes": 0, "failures": {}}
    lock = threading.Lock()

    def record(res: dict) -> None:
        with lock:
            a = res["action"]
            if a in ("copied", "skipped", "deleted"):
                stats[a] += 1
                stats["bytes"] += res.get("bytes") or 0
            else:
                stats["failed"] += 1
                stats["failures"][res["key"]] = res.get("error") or a
        if on_result:
            on_result(res)

    def run(item) -> dict:
        key, si, di, listed = item
        errors: list = []
        first = [True]

        def attempt():
            if first[0]:
                first[0] = False
                return _sync_key(src, dst, key, si, di, listed, delete_extra)
            return _sync_key(src, dst, key, None, None, False, delete_extra)  # fresh look after an error

        try:
            out = _retry(attempt, retries, backoff, errors)
        except Exception as e:  # noqa: BLE001
            out = {"key": key, "action": "failed", "bytes": 0, "sha256": None, "error": _err(e)}
        out["attempts"] = len(errors) + (0 if out["action"] == "failed" else 1)
        return out

    def done(item, res, exc) -> None:
        record(res if exc is None else {"key": item[0], "action": "failed", "bytes": 0, "error": _err(exc)})

    if keys is None:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="objlist") as ex:  # both listings at once
            f_dst = ex.submit(_retry, lambda: list(dst.list(prefix)), retries, backoff)
            f_src = ex.submit(_retry, lambda: list(src.list(prefix)), retries, backoff)
            dst_index = {i.key: i for i in f_dst.result()}
            src_infos = f_src.result()
        src_keys = {i.key for i in src_infos}
        _bounded_map(run, ((i.key, i, dst_index.get(i.key), True) for i in src_infos), workers, done)
        if delete_extra:
            extra = sorted(k for k in dst_index if k not in src_keys)

            def delete(key):
                _retry(lambda: dst.delete(key), retries, backoff)
                return {"key": key, "action": "deleted", "bytes": 0, "sha256": None, "error": None}

            _bounded_map(delete, extra, workers,
                         lambda k, res, exc: record(res if exc is None else
                                                    {"key": k, "action": "failed", "bytes": 0, "error": _err(exc)}))
    else:
        _bounded_map(run, ((k, None, None, False) for k in dict.fromkeys(keys)), workers, done)
    stats["seconds"] = round(time.monotonic() - t0, 3)
    return stats


def verify_objects(src: ObjectStore, dst: ObjectStore, keys: Iterable[str] | None = None, *, prefix: str = "",
                   deep: bool = False, workers: int = 4, retries: int = 3, backoff: float = 0.5) -> list[str]:
    """Keys whose target object is missing or whose content differs from the source's (sorted).

    Compares SHA-256 (our metadata, trusted only while it matches the store's own MD5), else the stores'
    MD5s (or equal multipart ETags: the same MD5 for every part), else SHA-256 computed by streaming.
    ``deep`` streams both sides whatever the metadata says. ``keys=None`` verifies every source object
    under ``prefix``."""
    if keys is None:
        keys = [i.key for i in _retry(lambda: list(src.list(prefix)), retries, backoff)]
    bad: list[str] = []

    def check(key: str) -> bool:
        def once():
            di = dst.head(key)
            si = src.head(key)
            if di is None or si is None or si.size != di.size:
                return False
            if deep:
                return src.checksum(key, deep=True) == dst.checksum(key, deep=True)
            if si.sha256 and di.sha256:
                return si.sha256 == di.sha256
            if si.md5 and di.md5:
                return si.md5 == di.md5
            if si.etag and si.etag == di.etag and _MULTIPART_ETAG_RE.fullmatch(si.etag):
                return True  # the same MD5 for every part
            return src.checksum(key) == dst.checksum(key)

        return _retry(once, retries, backoff)

    def done(key, ok, exc) -> None:
        if exc is not None or not ok:
            bad.append(key)

    _bounded_map(check, dict.fromkeys(keys), workers, done)
    return sorted(bad)


# ---------------------------------------------------------------------------------------------- GitLab paths
def _hashed_project(project_id: int) -> str:
    h = hashlib.sha256(str(int(project_id)).encode()).hexdigest()
    return f"{h[0:2]}/{h[2:4]}/{h}"


def _date_dir(date) -> str:
    if isinstance(date, (_dt.date, _dt.datetime)):
        return date.strftime("%Y_%m_%d")
    s = str(date)
    if re.fullmatch(r"\d{4}[-_]\d{2}[-_]\d{2}", s):
        return s.replace("-", "_")
    raise ValueError(f"not a date: {date!r}")


def artifact_path(project_id: int, date, job_id: int, artifact_id: int, file: str) -> str:
    """``<h[0:2]>/<h[2:4]>/<h>/<YYYY_MM_DD>/<job_id>/<artifact_id>/<file>``, h = sha256(str(project_id))."""
    return f"{_hashed_project(project_id)}/{_date_dir(date)}/{int(job_id)}/{int(artifact_id)}/{file}"


def lfs_path(oid: str) -> str:
    """``<oid[0:2]>/<oid[2:4]>/<oid[4:]>`` (content-addressed, shared between projects)."""
    if not _SHA256_RE.fullmatch(oid or ""):
        raise ValueError(f"not an LFS oid (64 lowercase hex digits): {oid!r}")
    return f"{oid[0:2]}/{oid[2:4]}/{oid[4:]}"


def package_path(project_id: int, package_id: int, package_file_id: int, file_name: str) -> str:
    """``<h[0:2]>/<h[2:4]>/<h>/packages/<package_id>/files/<package_file_id>/<file_name>``."""
    return f"{_hashed_project(project_id)}/packages/{int(package_id)}/files/{int(package_file_id)}/{file_name}"


# ---------------------------------------------------------------------------------------------- seeding
def _content(seed: int, size: int, chunk: int = PART_SIZE) -> Iterator[bytes]:
    r = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield r.randbytes(n)
        left -= n


def seed_objects(store: ObjectStore, rng: random.Random, keys_and_sizes: Iterable[tuple[str, int]], *,
                 workers: int = 1) -> dict[str, ObjectInfo]:
    """Write deterministic pseudo-random content (a function of ``rng``'s state and the order of the keys)
    for each (key, size), streaming; returns {key: ObjectInfo} including each object's sha256."""
    plan = [(k, int(n), rng.getrandbits(64)) for k, n in keys_and_sizes]

    def one(item):
        key, size, seed = item
        h = hashlib.sha256()
        for c in _content(seed, size):
            h.update(c)
        return store.write(key, _content(seed, size), size, h.hexdigest())

    out: dict[str, ObjectInfo] = {}

    def done(item, info, exc):
        if exc is not None:
            raise exc
        out[item[0]] = info

    _bounded_map(one, plan, workers, done)
    return {k: out[k] for k, _, _ in plan}


# ---------------------------------------------------------------------------------------------- local servers
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _LocalServer:
    """A local object store server process: data/logs under ``root``, pid in ``root/server.pid``."""

    marker = ""  # a string of the server's command line (to never signal a recycled pid)
    health_path = "/"

    def __init__(self, root: Path, port: int):
        self.root = Path(root)
        self.port = int(port)
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.root / "server.pid"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if _alive(pid) and self.marker in _cmdline(pid):
            return pid
        return None

    def running(self) -> bool:
        return self.pid() is not None

    def answers(self, timeout: float = 2.0) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        try:
            with opener.open(self.endpoint + self.health_path, timeout=timeout) as r:
                return r.status < 500
        except Exception:  # noqa: BLE001
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Start the server unless it is already running (idempotent); return once it answers."""
        if self.running():
            self._wait_answering(timeout, started=False)
            return
        if self.answers(timeout=1):
            raise OrgMoverError(f"port {self.port} is in use by another process; pick another port for {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.root, env=self._env(),
                                          start_new_session=True)
        self.pidfile.write_text(f"{self._proc.pid}\n")
        self._wait_answering(timeout, started=True)

    def _wait_answering(self, timeout: float, started: bool) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers(timeout=1):
            exited = self._proc.poll() is not None if started and self._proc else not self.running()
            if exited or time.monotonic() > deadline:
                tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
                if started:
                    self.stop()
                raise OrgMoverError(f"{type(self).__name__} on port {self.port} did not start; log:\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process recorded in our pid file (only that one)."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                if self._proc is not None and self._proc.pid == pid:
                    self._proc.poll()  # reap our own child
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class LocalS3(_LocalServer):
    """moto's S3 server (``moto[server]``) on 127.0.0.1:port. Objects live in the process's memory (large
    ones spill to temporary files under ``root/tmp``): a restart empties it."""

    marker = "moto.server"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp)}

    def store(self, bucket: str) -> S3Store:
        return S3Store(self.endpoint, bucket)


class LocalGCS(_LocalServer):
    """gcp-storage-emulator on 127.0.0.1:port, storing on disk under ``root/.cloudstorage`` (kept across
    restarts) or, with ``in_memory``, in the process. It serves one request at a time."""

    marker = "gcp_storage_emulator"
    health_path = "/storage/v1/b?project=test"

    def __init__(self, root: Path, port: int, default_bucket: str | None = None, in_memory: bool = False):
        super().__init__(root, port)
        self.default_bucket = default_bucket
        self.in_memory = in_memory

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
               "--port", str(self.port), "-q"]
        if self.default_bucket:
            cmd += ["--default-bucket", self.default_bucket]
        if self.in_memory:
            cmd.append("--in-memory")
        return cmd

    def _env(self) -> dict[str, str]:
        return {**os.environ, "STORAGE_BASE": str(self.root)}

    def store(self, bucket: str) -> GCSStore:
        return GCSStore(self.endpoint, bucket)
