"""The one place that talks to object storage: S3 and S3-compatible stores (MinIO, Ceph, R2, GCS's S3
interface), through obstore (Rust ``object_store``; chosen by measurement: about a fifth of boto3's
CPU per small read, reads overlap on threads without the GIL, 15 ms to import).

Errors: a missing object is :class:`ObjectMissing` (the sample is bad). Connection errors, timeouts,
throttling (429) and 5xx are retried with exponential backoff inside obstore, ``StoreConfig.tries``
times in all, and then raise :class:`StoreUnavailable` naming the URL and the reason; so do a missing
bucket, refused credentials and anything else that is the store's fault rather than the sample's.
Messages are short, and keys and secrets are blanked out of them.

Credentials, region and endpoint follow the AWS conventions: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``),
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``). Without keys in the environment, a named profile
(``AWS_PROFILE``) or a shared config or credentials file is resolved by botocore's chain (static keys,
SSO, ``credential_process``, assume-role, then container and instance roles), imported only then;
otherwise obstore's own chain finds web-identity (EKS IRSA), container (ECS task, EKS pod identity) or
instance (EC2) roles.

Processes: a store is made lazily in the process that uses it and kept there (:func:`store_for`).
obstore runs requests on a runtime whose threads do not survive ``fork``: a process forked after its
parent made a request would hang on its first one, so that is refused with an error instead. Workers
fork from a forkserver that never reads objects, so each starts its own runtime.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import InvalidPathError

from stoker.server.data.locators import ObjectMissing, StoreUnavailable
from stoker.server.data.store_access import connection_settings, failure_reason, redact
from stoker.server.data.store_config import StoreConfig

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "StoreConfig",
    "clear_stores",
    "configure_stores",
    "parse_s3_url",
    "read_object",
    "store_for",
]

log = logging.getLogger(__name__)

# S3's rules, plus upper case and '_' that some S3-compatible stores (and old buckets) allow.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_LIST_PAGE = 1000
_OBSTORE_ERRORS = (ObstoreError, OSError, ValueError)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` to ``(bucket, key)``; the key may be empty (a bucket or a prefix)."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"{url!r}: {bucket!r} is not a bucket name")
    return bucket, key


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """An object's key, size in bytes, and ETag (without quotes; empty if the store gave none)."""

    key: str
    size: int
    etag: str


@dataclass
class _Process:
    """This process's stores. Per process by nature, so module state: a fork starts a fresh one."""

    stores: dict[tuple[str, StoreConfig], ObjectStore] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: bool = False  # a client was made here: obstore's runtime threads live in this process
    forked_after_use: bool = False
    config: StoreConfig | None = None
    """What :func:`store_for` uses unless told otherwise (:func:`configure_stores`)."""


_process = _Process()


def _after_fork_in_child() -> None:
    global _process
    _process = _Process(forked_after_use=_process.used or _process.forked_after_use, config=_process.config)


os.register_at_fork(after_in_child=_after_fork_in_child)


def configure_stores(config: StoreConfig) -> None:
    """Set this process's store settings (the server's ``s3_*`` settings; workers set them at start)."""
    _process.config = config


def store_for(bucket: str, config: StoreConfig | None = None) -> ObjectStore:
    """This process's store for ``bucket`` (one per bucket and config, made on first use)."""
    chosen = config or _process.config
    if chosen is None:
        raise RuntimeError("object storage is not configured in this process: call configure_stores() first")
    key = (bucket, chosen)
    with _process.lock:
        store = _process.stores.get(key)
        if store is None:
            store = _process.stores[key] = ObjectStore(bucket, key[1])
        return store


def clear_stores() -> None:
    """Close and forget this process's stores (their settings are read again on next use)."""
    with _process.lock:
        stores = list(_process.stores.values())
        _process.stores.clear()
    for store in stores:
        store.close()


def read_object(url: str, start: int = 0, length: int = -1) -> bytes:
    """The bytes of ``s3://bucket/key`` (``length`` from ``start``; -1: to the end)."""
    bucket, key = parse_s3_url(url)
    return store_for(bucket).get(key, start, length)


class ObjectStore:
    """One bucket. Thread-safe: many reads may be in flight at once. Its HTTP clients are made on
    first use, in the process that uses them; :func:`store_for` hands out one per process."""

    def __init__(self, bucket: str, config: StoreConfig) -> None:
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not a bucket name")
        self.bucket = bucket
        self.config = config
        self._lock = threading.Lock()
        self._clients: dict[bool, Any] = {}  # streaming? -> obstore S3Store
        self._endpoint = "default"

    def url(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    def _client(self, streaming: bool = False) -> Any:
        if _process.forked_after_use:
            raise RuntimeError(
                f"object store for {self.bucket!r} used in process {os.getpid()}, forked after its parent made "
                "requests: obstore cannot run there (fork before any request, or use spawn or forkserver)"
            )
        with self._lock:
            client = self._clients.get(streaming)
            if client is None:
                client = self._clients[streaming] = self._make_client(streaming)
            return client

    def _make_client(self, streaming: bool) -> Any:
        from obstore.store import S3Store

        config = self.config
        # obstore's runtime (one per process, started by the first request) runs a thread per core by
        # default: with a worker process per core, cores squared threads. Two carry a worker's reads,
        # which wait on the network; TOKIO_WORKER_THREADS set by the operator still wins.
        os.environ.setdefault("TOKIO_WORKER_THREADS", "2")
        kwargs, source = connection_settings()
        self._endpoint = redact(kwargs.get("endpoint", "AWS"))
        options: dict[str, Any] = {"connect_timeout": timedelta(seconds=config.connect_timeout_s)}
        if streaming:  # a shard may take minutes: bound the silences, not the whole
            options["timeout"] = timedelta(days=1)
            options["read_timeout"] = timedelta(seconds=config.read_timeout_s)
        else:
            options["timeout"] = timedelta(seconds=config.request_timeout_s)
        if str(kwargs.get("endpoint", "")).startswith("http://"):
            options["allow_http"] = True  # the operator named a plain-HTTP endpoint (a local MinIO)
        retry = {
            "max_retries": config.tries - 1,
            "backoff": {
                "init_backoff": timedelta(seconds=config.backoff_s),
                "max_backoff": timedelta(seconds=config.backoff_s * 2 ** max(config.tries - 2, 0)),
                "base": 2,
            },
            "retry_timeout": timedelta(seconds=config.retry_timeout_s),
        }
        try:
            client = S3Store(self.bucket, client_options=options, retry_config=retry, **kwargs)
        except _OBSTORE_ERRORS as exc:
            raise StoreUnavailable(f"{self.url('')}: cannot configure the store: {failure_reason(exc)}") from None
        _process.used = True
        log.debug(
            "store s3://%s: endpoint %s, region %s, credentials from %s%s",
            self.bucket, self._endpoint, kwargs.get("region", "default"), source, " (streaming)" if streaming else "",
        )  # fmt: skip
        return client

    def _failure(self, exc: BaseException, key: str, action: str) -> Exception:
        """The exception to raise for obstore's ``exc``: missing object or unavailable store."""
        url, reason, text = self.url(key), failure_reason(exc), str(exc)
        if isinstance(exc, FileNotFoundError):
            if "NoSuchBucket" in text or ("NoSuchKey" not in text and not self._bucket_exists()):
                return StoreUnavailable(f"{url}: bucket {self.bucket!r} does not exist or cannot be listed: {reason}")
            return ObjectMissing(f"{url}: no such object")
        if "416 Range Not Satisfiable" in text:
            return ObjectMissing(f"{url}: the range starts past the end of the object (changed since indexed?)")
        if isinstance(exc, InvalidPathError) or (isinstance(exc, ValueError) and "parse path" in text):
            # obstore cannot address keys with empty, '.' or '..' segments or a trailing '/'
            return ObjectMissing(f"{url}: key not supported: {reason}")
        tries = re.search(r"\bretries: (\d+)", text)
        after = f" after {int(tries.group(1)) + 1} tries" if tries else ""
        log.debug("%s %s failed%s: %s", action, url, after, reason)
        return StoreUnavailable(f"{action} {url} failed{after}: {reason}")

    def _bucket_exists(self) -> bool:
        # A HEAD's 404 has no body to tell a missing key from a missing bucket: ask for one page.
        try:
            next(iter(obstore.list(self._client(), None, chunk_size=1)), None)
        except _OBSTORE_ERRORS:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, across all pages. A prefix that
        ends at a '/' lists that folder; otherwise the listing starts at the enclosing folder."""
        folder = prefix.rpartition("/")[0]
        previous = ""
        try:
            for chunk in obstore.list(self._client(), folder or None, chunk_size=_LIST_PAGE):
                for meta in chunk:
                    key = meta["path"]
                    if not key.startswith(prefix):
                        if key > prefix:
                            return  # keys come sorted: past the prefix's run
                        continue
                    if key <= previous:
                        raise StoreUnavailable(f"list {self.url(prefix)}: keys out of order at {key!r}")
                    previous = key
                    yield ObjectInfo(key, meta["size"], _unquote(meta.get("e_tag")))
        except (InvalidPathError, ValueError) as exc:
            # keys (or a prefix) with empty, '.' or '..' segments: obstore cannot address them
            raise ValueError(f"list {self.url(prefix)}: {failure_reason(exc)}") from None
        except _OBSTORE_ERRORS as exc:
            raise self._failure(exc, prefix, "list") from None

    def head(self, key: str) -> ObjectInfo:
        """The object's size and ETag."""
        try:
            meta = obstore.head(self._client(), key)
        except _OBSTORE_ERRORS as exc:
            raise self._failure(exc, key, "head") from None
        return ObjectInfo(key, meta["size"], _unquote(meta.get("e_tag")))

    def get(self, key: str, start: int = 0, length: int = -1) -> bytes:
        """The object's bytes, or ``length`` of them from ``start`` (-1: to the end). A range that
        the object does not hold in full is :class:`ObjectMissing`: the sample cannot be read."""
        if start < 0 or length < -1:
            raise ValueError(f"{self.url(key)}: bad range start={start} length={length}")
        if length == 0:
            return b""
        try:
            if length > 0:
                data = bytes(obstore.get_range(self._client(), key, start=start, length=length))
            else:
                options: Any = {"range": {"offset": start}} if start else None
                data = bytes(obstore.get(self._client(), key, options=options).bytes())
        except _OBSTORE_ERRORS as exc:
            raise self._failure(exc, key, "get") from None
        if length > 0 and len(data) != length:
            raise ObjectMissing(f"{self.url(key)}: {length} bytes at {start} asked, the object ends after {len(data)}")
        return data

    def open_stream(self, key: str, chunk_bytes: int = 1 << 20) -> io.BufferedReader:
        """The object as a binary file read front to back in one request (for ``tarfile`` in stream
        mode, or lines of a manifest). A failure midway raises :class:`StoreUnavailable`: it is not
        resumed, the caller starts over."""
        try:
            result = obstore.get(self._client(streaming=True), key)
            size = int(result.meta["size"])
            chunks = iter(result.stream(min_chunk_size=chunk_bytes))
        except _OBSTORE_ERRORS as exc:
            raise self._failure(exc, key, "get") from None
        return io.BufferedReader(_Stream(self, key, chunks, size), chunk_bytes)

    def close(self) -> None:
        """Drop the HTTP clients (and their pooled connections); a later call makes new ones."""
        with self._lock:
            self._clients.clear()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return ObjectStore, (self.bucket, self.config)  # rebuilt, never shared, in another process

    def __repr__(self) -> str:
        return f"ObjectStore(bucket={self.bucket!r}, endpoint={self._endpoint!r})"


def _unquote(etag: str | None) -> str:
    return (etag or "").strip('"')


class _Stream(io.RawIOBase):
    """obstore's chunks of one GET as a raw binary file; checks the object arrived whole."""

    def __init__(self, store: ObjectStore, key: str, chunks: Iterator[Any], size: int) -> None:
        self._store, self._key, self._chunks, self._size = store, key, chunks, size
        self._chunk = memoryview(b"")
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed stream")
        while not self._chunk:
            try:
                self._chunk = memoryview(next(self._chunks))
            except StopIteration:
                if self._position != self._size:
                    raise StoreUnavailable(
                        f"get {self._store.url(self._key)}: stream ended at {self._position} of {self._size} bytes"
                    ) from None
                return 0
            except _OBSTORE_ERRORS as exc:
                raise self._store._failure(exc, self._key, "stream") from None
        count = min(len(buffer), len(self._chunk))
        memoryview(buffer).cast("B")[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        self._position += count
        return count

    def close(self) -> None:
        self._chunks = iter(())  # drops obstore's stream and its connection
        self._chunk = memoryview(b"")
        super().close()
