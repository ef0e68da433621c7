"""Object storage: `s3://bucket/prefix` on AWS S3 or any S3-compatible store (MinIO, Ceph,
SeaweedFS, R2, GCS's S3 interface), through boto3.

Why boto3: it is the reference client, it reads the ecosystem's configuration with no
toolkit-specific setting (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`, `AWS_PROFILE` and `~/.aws`), does multipart uploads several parts at once
(s3transfer), and sends conditional PUTs (`If-None-Match: *`) for the writer's lock.

Every request has a timeout (connect 10 s, read 60 s). Failures that a store recovers
from (connection refused or reset, timeouts, 5xx, 503 SlowDown and other throttling, a
body cut short) are retried with exponential backoff and jitter for up to the retry budget:
`PREP_S3_RETRY_SECONDS` (default 300 s, enough for a store restart); then one StoreError
naming the store and the object. Errors a retry cannot mend (no such bucket, access
refused, a wrong key) are said at once. A custom endpoint is addressed path-style
(`http://host:port/bucket/key`), which MinIO, Ceph and SeaweedFS expect.
"""

from __future__ import annotations

import functools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from prep.errors import PrepError

T = TypeVar("T")
RETRY_SECONDS = 300.0
PART = 16 << 20  # ranged GETs and multipart uploads: 16 MiB parts
PARALLEL = 8  # parts in flight per object
_RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                    "RequestLimitExceeded", "TooManyRequests"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled",
               "InvalidToken", "ExpiredToken"}


class StoreError(PrepError):
    """The store cannot give what is asked (stayed away past the retry budget, refused
    access, an object missing or unlike its digest): the run stops, never skips it."""


def is_store_url(value: str | os.PathLike) -> bool:
    return os.fspath(value).startswith("s3://")


@dataclass(frozen=True)
class StoreURL:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the bucket's top

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}" if name else str(self)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str) -> StoreURL:
    """`s3://bucket/prefix` -> StoreURL; anything else is refused with the reason."""
    m = re.fullmatch(r"s3://([^/]+)(?:/(.*))?", url)
    if not m or not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{2,62}", m[1]):
        raise PrepError(f"{url}: not an s3://BUCKET/PREFIX URL (bucket names are 3-63 "
                        "lowercase letters, digits, '.', '-')")
    prefix = (m[2] or "").rstrip("/")
    if prefix.startswith("/") or "//" in prefix:
        raise PrepError(f"{url}: an empty path segment ('//') in the prefix")
    if {".", ".."} & set(prefix.split("/")):
        raise PrepError(f"{url}: a '.' or '..' segment in the prefix (stores and their clients "
                        "resolve them differently: name the prefix itself)")
    return StoreURL(m[1], prefix)


def retry_budget() -> float:
    """Seconds a failing request is retried: PREP_S3_RETRY_SECONDS, default 300."""
    raw = os.environ.get("PREP_S3_RETRY_SECONDS", "")
    try:
        return float(raw) if raw else RETRY_SECONDS
    except ValueError:
        raise PrepError(f"PREP_S3_RETRY_SECONDS={raw!r}: not a number of seconds") from None


class Store:
    """One bucket/prefix. The boto3 client is made on first use in each process (a Store
    pickles without it, for loader workers)."""

    def __init__(self, url: str | StoreURL, retry_for: float | None = None):
        self.where = parse_url(url) if isinstance(url, str) else url
        self.retry_for = retry_budget() if retry_for is None else retry_for
        # the AWS_* settings of the process that named the store: a loader worker started
        # from a forkserver has the environment of the server's start, not of this moment
        self.settings = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        self._client = None
        # a file shared by the processes of a node (shards.cache sets it): when the store
        # was first seen away, so their requests share one retry budget
        self.away: Outage | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> botocore.client.BaseClient:  # noqa: F821 - boto3 is imported late
        if self._client is None:
            self._client = shared_client(self.settings)
        return self._client

    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    # --- requests, each retried within the budget -----------------------------------------
    def call(self, name: str, what: str, fn: Callable[[], T]) -> T:
        """fn() with retries; `name` (an object name or "") and `what` go into errors."""
        from botocore.exceptions import ClientError, NoCredentialsError

        deadline, delay, tries = time.monotonic() + self.retry_for, 0.5, 0
        while True:
            tries += 1
            try:
                result = fn()
                if self.away is not None:
                    self.away.clear()
                return result
            except Exception as raised:
                # boto3's transfers wrap the request's error (S3UploadFailedError, raised
                # while handling it: the request's own is its __context__, not __cause__):
                # judge the request's own, or a 503 SlowDown on an upload is never retried
                exc = raised
                if type(raised).__name__ == "S3UploadFailedError":
                    exc = raised.__cause__ or raised.__context__ or raised
                if isinstance(exc, NoCredentialsError):
                    raise StoreError(
                        f"{self.where.url(name)}: no credentials for the store while {what}; "
                        "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                        "(~/.aws)") from None
                if isinstance(exc, ClientError):
                    why = self._judge(exc, name, what)
                elif _transient(exc):  # connection refused / reset, timeouts, short bodies
                    why = f"{type(exc).__name__}: {str(exc)[:160]}"
                else:
                    raise
            if self.away is not None:  # another process of the node may have waited before
                deadline = min(deadline, self.away.since(self.retry_for) + self.retry_for)
            if time.monotonic() + delay > deadline:
                raise StoreError(
                    f"{self.where.url(name)}: the store at {self.endpoint()} did not answer "
                    f"while {what} for {self.retry_for:.0f} s ({tries} tries; last: {why}); "
                    "PREP_S3_RETRY_SECONDS sets how long to retry") from None
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 15.0)

    def _judge(self, exc: Exception, name: str, what: str) -> str:
        """A store's error answer: raise the ones a retry cannot mend, else say why to
        retry."""
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _AUTH_CODES or status in (401, 403):
            raise StoreError(
                f"{self.where.url(name)}: the store refused access ({code}) while {what}; "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE") from None
        if code == "NoSuchBucket":
            raise StoreError(f"{self.where}: no bucket {self.where.bucket!r} at "
                             f"{self.endpoint()}; create it first") from None
        if code in ("NoSuchKey", "404") or status == 404:
            raise StoreError(f"{self.where.url(name)}: missing from the store while {what}; "
                             f"`prep verify {self.where}` lists what is missing, a rerun of "
                             "`prep shard` rewrites it") from None
        if not (code in _RETRYABLE_CODES or status >= 500 or status == 429):
            message = str(exc.response.get("Error", {}).get("Message", ""))[:200]
            raise StoreError(f"{self.where.url(name)}: the store answered {code or status} "
                             f"({message}) while {what}") from None
        return code or str(status)

    def get(self, name: str) -> bytes | None:
        """The object's bytes; None when it does not exist."""
        got = self.get_unless(name, None)
        return None if got is None else got[1]

    def get_unless(self, name: str, etag: str | None) -> tuple[str, bytes] | str | None:
        """One request: the object's (ETag, bytes); just `etag` again when the object still
        has that ETag (a conditional GET, If-None-Match: nothing downloaded); None when it
        does not exist."""
        from botocore.exceptions import ClientError

        def fetch() -> tuple[str, bytes] | str | None:
            extra = {"IfNoneMatch": etag} if etag else {}
            try:
                r = self.client.get_object(Bucket=self.where.bucket, Key=self.where.key(name),
                                           **extra)
            except self.client.exceptions.NoSuchKey:
                return None
            except ClientError as exc:
                if etag and exc.response.get("Error", {}).get("Code") in ("304", "NotModified"):
                    return etag
                raise
            return r.get("ETag", ""), r["Body"].read()
        return self.call(name, "reading it", fetch)

    def head(self, name: str) -> dict | None:
        """{"size", "etag"} of an object; None when it does not exist."""
        from botocore.exceptions import ClientError

        def ask() -> dict | None:
            try:
                r = self.client.head_object(Bucket=self.where.bucket, Key=self.where.key(name))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return {"size": r["ContentLength"], "etag": r.get("ETag", "")}
        return self.call(name, "asking for its size", ask)

    def put(self, name: str, data: bytes, only_new: bool = False) -> bool:
        """Write an object. `only_new`: a conditional PUT (If-None-Match: *); False when the
        object exists already (nothing written)."""
        from botocore.exceptions import ClientError

        def send() -> bool:
            extra = {"IfNoneMatch": "*"} if only_new else {}
            try:
                self.client.put_object(Bucket=self.where.bucket, Key=self.where.key(name),
                                       Body=data, **extra)
            except ClientError as exc:
                if only_new and exc.response.get("Error", {}).get("Code") in (
                        "PreconditionFailed", "ConditionalRequestConflict", "412"):
                    return False
                raise
            return True
        return self.call(name, "writing it", send)

    def upload(self, name: str, path: str | os.PathLike) -> None:
        """Upload a local file; a large one goes up in PART-sized parts, PARALLEL at once."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                             max_concurrency=PARALLEL, use_threads=True)
        self.call(name, "uploading it", lambda: self.client.upload_file(
            os.fspath(path), self.where.bucket, self.where.key(name), Config=cfg))

    def download(self, name: str, fd: int, size: int) -> None:
        """Write the object (of `size` bytes) into the open file `fd` at offset 0, in ranged
        GETs of PART bytes, PARALLEL at once; each range retried on its own."""
        ranges = [(o, min(o + PART, size)) for o in range(0, size, PART)] or [(0, 0)]

        def part(span: tuple[int, int]) -> None:
            lo, hi = span
            if hi == lo:
                return

            def fetch() -> None:
                body = self.client.get_object(Bucket=self.where.bucket,
                                              Key=self.where.key(name),
                                              Range=f"bytes={lo}-{hi - 1}")["Body"].read()
                if len(body) != hi - lo:
                    raise _ShortRead(f"{len(body)} of {hi - lo} bytes")
                os.pwrite(fd, body, lo)
            self.call(name, f"reading bytes {lo}-{hi - 1}", fetch)

        if len(ranges) == 1:
            part(ranges[0])
            return
        with ThreadPoolExecutor(min(PARALLEL, len(ranges))) as pool:
            list(pool.map(part, ranges))

    def list(self) -> dict[str, dict]:
        """{name under the prefix: {"size", "etag"}} of every object under the prefix."""
        base = self.where.key("")

        def walk() -> dict[str, dict]:
            found = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.where.bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    found[obj["Key"][len(base):]] = {"size": obj["Size"],
                                                     "etag": obj.get("ETag", "")}
            return found
        return self.call("", "listing the prefix", walk)

    def delete(self, names: list[str]) -> None:
        for name in names:
            self.call(name, "deleting it", lambda n=name: self.client.delete_object(
                Bucket=self.where.bucket, Key=self.where.key(n)))

    def stream(self, name: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, read range by range (each range retried)."""
        info = self.head(name)
        if info is None:
            raise StoreError(f"{self.where.url(name)}: missing from the store")
        for lo in range(0, info["size"], PART):
            hi = min(lo + PART, info["size"])

            def fetch(lo: int = lo, hi: int = hi) -> bytes:
                body = self.client.get_object(Bucket=self.where.bucket,
                                              Key=self.where.key(name),
                                              Range=f"bytes={lo}-{hi - 1}")["Body"].read()
                if len(body) != hi - lo:
                    raise _ShortRead(f"{len(body)} of {hi - lo} bytes")
                return body
            data = self.call(name, f"reading bytes {lo}-{hi - 1}", fetch)
            for i in range(0, len(data), chunk):
                yield data[i : i + chunk]


class Outage:
    """A file that says since when the store has failed to answer (the first failure any
    process of the node saw; removed on the next answer), so that the processes of a node
    stop within one retry budget of it, not each after a full budget of their own, in turn
    (a worker waiting on the prefetch's download, then trying on its own)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def since(self, budget: float) -> float:
        """time.monotonic() of the first failure: this one when it is the first. A mark
        older than `budget` (+ 30 s) is left from an earlier outage or run (every process
        of that outage stopped by then): this failure starts a new one."""
        now_wall, now = time.time(), time.monotonic()
        try:
            with open(self.path) as f:
                first = float(f.read())
            if 0 <= now_wall - first <= budget + 30:
                return now - (now_wall - first)
        except (OSError, ValueError):
            pass
        try:  # a new mark (written whole, then moved in place: no reader sees half)
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "w") as f:
                f.write(repr(now_wall))
            os.replace(tmp, self.path)
        except OSError:  # the cache folder cannot be written: this process alone
            pass
        return now

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _ShortRead(Exception):
    """A body shorter than the range asked for (a connection cut mid-body)."""


def _transient(exc: BaseException) -> bool:
    """Whether a failure is one a store recovers from (retry) rather than a code error."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                            ConnectTimeoutError, IncompleteReadError, ResponseStreamingError,
                            ConnectionError, TimeoutError, Urllib3Error, _ShortRead))


_CLIENTS: dict[tuple, object] = {}  # AWS_* settings -> this process's client for them
_CLIENTS_LOCK = threading.Lock()


def shared_client(settings: dict[str, str]) -> botocore.client.BaseClient:  # noqa: F821
    """One client per process for each set of AWS_* settings, shared by its Stores and
    threads (boto3's clients are thread-safe): a trainer's start named the store three times
    (rows, cache, manifest), and each new client cost ~0.1 s of CPU before the first batch."""
    key = tuple(sorted(settings.items()))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = make_client(settings)
        return _CLIENTS[key]


def make_client(env: dict[str, str] | None = None) -> botocore.client.BaseClient:  # noqa: F821
    """A boto3 S3 client from the standard configuration: the AWS_* variables of `env`
    (default: this process's environment), then ~/.aws. Path-style addressing when an
    endpoint is set (MinIO, Ceph, SeaweedFS)."""
    import boto3
    import botocore.parsers
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import NoCredentialsError, ProfileNotFound

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")} if env is None else env
    custom = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    cfg = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 1},
                 max_pool_connections=2 * PARALLEL,
                 s3={"addressing_style": "path"} if custom else None)
    try:
        core = botocore.session.Session()
        core.register_component("data_loader", _models())
        # timestamps (a listing's LastModified) stay text: none is read here, and dateutil
        # took ~0.5 ms an object (0.5 s to list ImageNet's 1,088 shards)
        parsers = botocore.parsers.ResponseParserFactory()
        parsers.set_parser_defaults(timestamp_parser=str)
        core.register_component("response_parser_factory", parsers)
        session = boto3.session.Session(botocore_session=core, profile_name=env.get("AWS_PROFILE"))
        return session.client(
            "s3", config=cfg, endpoint_url=custom or None,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    except (NoCredentialsError, ProfileNotFound) as exc:
        raise StoreError(f"object storage: {exc}") from None


@functools.cache
def _models() -> botocore.loaders.Loader:  # noqa: F821 - boto3 is imported late
    """botocore's loader of service models, one per process: every client made here shares
    its parsed S3 model (a client from a fresh session parses it again, ~0.15 s of CPU)."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def load_models() -> None:
    """Import boto3 and parse the S3 model now, with no request made (see shards.s3_preload)."""
    make_client({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "-",
                 "AWS_SECRET_ACCESS_KEY": "-", "AWS_REGION": "us-east-1"})
