"""Object-store access for `Location` (s3://, gs://, az://): obstore, with cogfun's retries.

Private helper of `cogfun.common.store` (see location.py for the rules every backend keeps). One
`ObjectFS` per bucket and storage options, shared by the threads of a process; obstore's Rust
client releases the GIL, so reader threads fetch in parallel. Every request goes through `_call`:
a transient failure (a dropped connection, a 5xx, a timeout) is retried `retries` times in all with
a doubling pause, each retry logged; after the last, `ObjectStoreIOError` names the object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from cogfun.common.store.schema import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRIES = 6  # attempts in all: pauses 0.5 + 1 + 2 + 4 + 8 s = 15.5 s before giving up
DEFAULT_BACKOFF_S = 0.5
AZURE_SCHEMES = ("az", "abfs", "abfss", "azure", "adl")  # no suffix ranges there
STREAM_BUFFER = 64 << 20  # a streamed file up to this size is one PUT, retried whole
PART_SIZE = 16 << 20  # multipart upload part size beyond that
_FSSPEC_ALIASES = {
    "endpoint_url": "endpoint",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "region_name": "region",
}
_COGFUN_KEYS = ("retries", "retry_backoff_s")


class ObjectStoreIOError(OSError):
    """A request to an object store kept failing after every retry (or cannot succeed: access
    denied); `attempts` says how many were made."""

    def __init__(self, message: str, attempts: int, code: int = errno.EIO):
        super().__init__(code, message)
        self.attempts = attempts

    def __reduce__(self) -> tuple:
        return (ObjectStoreIOError, (self.strerror, self.attempts, self.errno))


class ObjectFS:
    """One bucket of an object store, through obstore (its Rust client is thread-safe and
    releases the GIL, so reader threads fetch in parallel)."""

    local = False
    _cache: dict[tuple[str, str], ObjectFS] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def get(cls, root: str, options: dict) -> ObjectFS:
        key = (root, json.dumps(options, sort_keys=True, default=str))
        with cls._cache_lock:
            if key not in cls._cache:
                cls._cache[key] = cls(root, options)
            return cls._cache[key]

    def __init__(self, root: str, options: dict):
        self.root = root
        self.options = options
        self.retries = int(options.get("retries", DEFAULT_RETRIES))
        self.backoff_s = float(options.get("retry_backoff_s", DEFAULT_BACKOFF_S))
        if self.retries < 1 or self.backoff_s < 0:
            raise StoreError("storage options: retries must be >= 1 and retry_backoff_s >= 0")
        self._pid = os.getpid()
        self._client = self._connect("")
        self._prefixed: dict[str, Any] = {}
        self.suffix_ranges = root.split("://", 1)[0] not in AZURE_SCHEMES

    @property
    def _store(self) -> Any:
        """This process's client: a forked child (a DataLoader worker) connects anew, since the
        parent's connection pool and runtime threads do not survive a fork."""
        if os.getpid() != self._pid:
            self._pid, self._client, self._prefixed = os.getpid(), self._connect(""), {}
        return self._client

    def _connect(self, key: str, own_retries: bool = False) -> Any:
        """An obstore store for `root/key`. cogfun's own requests go through `_call`, which
        retries with logging, so their client retries once; zarr's requests (metadata, small
        plan arrays: the store's `prefixed` clients, `own_retries`) get the client's retries on
        the same schedule instead."""
        import obstore.store

        config = {
            _FSSPEC_ALIASES.get(k, k): v for k, v in self.options.items() if k not in _COGFUN_KEYS
        }
        client = dict(config.pop("client_options", {}) or {})
        endpoint = str(config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
        if endpoint.startswith("http://"):
            client.setdefault("allow_http", True)
        retry = dict(config.pop("retry_config", {}) or {})
        schedule = self.backoff_s * (2 ** (self.retries - 1) - 1)  # `_call`'s pauses in all
        retry.setdefault("max_retries", self.retries - 1 if own_retries else 1)
        retry.setdefault("retry_timeout", 10 + (2 * schedule if own_retries else 0))
        if not isinstance(retry["retry_timeout"], dt.timedelta):
            retry["retry_timeout"] = dt.timedelta(seconds=float(retry["retry_timeout"]))
        backoff = dict(retry.get("backoff") or {})
        first = self.backoff_s if own_retries else 0.1
        last = self.backoff_s * 2 ** (self.retries - 2) if own_retries else 1.0
        for name, default in (("init_backoff", first), ("max_backoff", max(first, last))):
            value = backoff.get(name, default)
            backoff[name] = (
                value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=float(value))
            )
        backoff.setdefault("base", 2)
        retry["backoff"] = backoff
        url = f"{self.root}/{key}" if key else self.root
        try:
            return obstore.store.from_url(
                url, client_options=client or None, retry_config=retry, **config
            )
        except Exception as exc:
            raise StoreError(f"{url}: cannot configure the object store client: {exc}") from exc

    def prefixed(self, key: str) -> Any:
        self._store  # noqa: B018 (reconnects after a fork, dropping the prefixed clients too)
        if key not in self._prefixed:
            self._prefixed[key] = self._connect(key, own_retries=True)
        return self._prefixed[key]

    # ---- the retry loop every request goes through ----

    def _call(self, what: str, key: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        """`fn()` (one request), tried again after a transient failure; see the module doc."""
        import obstore.exceptions as oe

        attempts = attempts or self.retries
        pause = self.backoff_s
        url = f"{self.root}/{key}"
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except (oe.AlreadyExistsError, oe.PreconditionError):
                raise
            except (oe.PermissionDeniedError, oe.UnauthenticatedError) as exc:
                raise ObjectStoreIOError(
                    f"{what} {url}: access denied ({_first_line(exc)}): check the credentials "
                    "(environment or --storage-options)",
                    attempt,
                    errno.EACCES,
                ) from exc
            except (oe.InvalidPathError, oe.UnknownConfigurationKeyError) as exc:
                raise StoreError(f"{what} {url}: {_first_line(exc)}") from exc
            except (oe.NotSupportedError, NotImplementedError, TypeError, ValueError) as exc:
                # The client refused the request itself: trying again cannot help.
                raise StoreError(
                    f"{what} {url}: this object store does not support it ({_first_line(exc)})"
                ) from exc
            except Exception as exc:  # transient (connection, 5xx, timeout) or a real failure
                status = _status(exc)
                if status == 416:  # a range past the end: the caller's answer, not a failure
                    raise RangeNotSatisfiable(url) from exc
                permanent = status is not None and (
                    400 <= status < 500 and status not in (408, 429) or status == 501
                )
                if attempt == attempts or permanent:
                    raise ObjectStoreIOError(
                        f"{what} {url} failed {attempt} times: {_first_line(exc)}", attempt
                    ) from exc
                log.warning(
                    "%s %s: %s; trying again in %.2f s (attempt %d of %d)",
                    what,
                    url,
                    _first_line(exc),
                    pause,
                    attempt + 1,
                    attempts,
                )
                time.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")

    # ---- operations ----

    def read(self, key: str, start: int, length: int | None) -> bytes | None:
        import obstore

        if start < 0 and not self.suffix_ranges:  # Azure: no suffix ranges; the size first
            size = self.size(key)
            if size is None:
                return None
            start = max(0, size + start)
            length = size - start if length is None else min(length, size - start)
        if start < 0:
            options: dict | None = {"range": {"suffix": -start}}
        elif length is not None:
            if length == 0:
                return b"" if self.size(key) is not None else None
            options = {"range": (start, start + length)}
        elif start:
            options = {"range": {"offset": start}}
        else:
            options = None
        try:
            return bytes(
                self._call(
                    "GET", key, lambda: obstore.get(self._store, key, options=options).bytes()
                )
            )[:length]  # a suffix range (start < 0) has no length of its own
        except FileNotFoundError:
            return None
        except RangeNotSatisfiable:  # from at or past the end: no bytes, as a local read
            return b""

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        import obstore

        if not ranges:
            return []
        starts = [int(s) for s, _ in ranges]
        ends = [int(s) + int(n) for s, n in ranges]
        try:
            out = self._call(
                "GET",
                key,
                lambda: obstore.get_ranges(self._store, key, starts=starts, ends=ends),
            )
        except FileNotFoundError:
            return None
        return [bytes(b) for b in out]

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        import obstore

        def get() -> tuple[bytes, str]:
            result = obstore.get(self._store, key)
            meta = result.meta  # GCS updates conditionally on the generation, S3 on the ETag
            return bytes(result.bytes()), json.dumps([meta["e_tag"], meta.get("version")])

        try:
            return self._call("GET", key, get)
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int | None:
        import obstore

        if not key:
            return None
        try:
            return int(self._call("HEAD", key, lambda: obstore.head(self._store, key))["size"])
        except FileNotFoundError:
            return None

    def is_dir(self, key: str) -> bool:
        import obstore

        prefix = f"{key}/" if key else None
        first = self._call(
            "LIST",
            key,
            lambda: next(iter(obstore.list(self._store, prefix, chunk_size=1)), []),
        )
        return bool(first)

    def listdir(self, key: str) -> list[str]:
        import obstore

        prefix = f"{key}/" if key else None
        found = self._call("LIST", key, lambda: obstore.list_with_delimiter(self._store, prefix))
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]
        names += [o["path"].rsplit("/", 1)[-1] for o in found["objects"]]
        return names

    def walk(self, key: str) -> Iterator[tuple[str, int]]:
        import obstore

        prefix = f"{key}/" if key else None
        cut = len(prefix or "")
        batches = self._call("LIST", key, lambda: list(obstore.list(self._store, prefix)))
        for batch in batches:
            for meta in batch:
                yield meta["path"][cut:], int(meta["size"])

    def write(self, key: str, data: Any) -> None:
        import obstore

        if isinstance(data, bytes | bytearray | memoryview):
            whole = bytes(data)
        else:  # pieces streamed (a shard): held for a retry while they are small
            pieces = iter(data)
            buffered: list[bytes] = []
            size = 0
            for piece in pieces:
                buffered.append(piece)
                size += len(piece)
                if size > STREAM_BUFFER:
                    # Too big to hold for a retry: one multipart upload (its parts are retried
                    # by the client), which appears only when it completes; a failure leaves
                    # the old object and raises.
                    stream = _chain(buffered, pieces)
                    self._call(
                        "PUT",
                        key,
                        lambda stream=stream: obstore.put(
                            self._store, key, stream, chunk_size=PART_SIZE
                        ),
                        attempts=1,
                    )
                    return
            whole = b"".join(buffered)
        self._call("PUT", key, lambda: obstore.put(self._store, key, whole))

    def create(self, key: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        try:
            self._call("PUT", key, lambda: obstore.put(self._store, key, data, mode="create"))
            return True
        except oe.AlreadyExistsError:
            return False
        except oe.PreconditionError:
            return False

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        import obstore
        import obstore.exceptions as oe

        e_tag, generation = json.loads(version)
        mode = {k: v for k, v in (("e_tag", e_tag), ("version", generation)) if v is not None}
        try:
            result = self._call("PUT", key, lambda: obstore.put(self._store, key, data, mode=mode))
        except (oe.PreconditionError, oe.AlreadyExistsError, FileNotFoundError):
            return None
        return json.dumps([result.get("e_tag"), result.get("version")])

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._call("DELETE", key, lambda: obstore.delete(self._store, key))

    def delete_many(self, keys: list[str]) -> None:
        """Delete `keys` (missing ones are no error) in bulk requests of at most 1000 keys, in
        order (obstore sends S3 a DeleteObjects request; stores without one, a request a key)."""
        import obstore

        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]
            what = f"DELETE ({len(part)} objects from)"
            try:
                self._call(what, part[0], lambda part=part: obstore.delete(self._store, part))
            except FileNotFoundError:  # a store that stops at a missing key: the rest one by one
                for key in part:
                    self.delete(key)
            except (ObjectStoreIOError, StoreError) as exc:
                if not isinstance(exc, StoreError) and _status(exc.__cause__) != 501:
                    raise
                # An S3-compatible endpoint without DeleteObjects: a request an object.
                log.info("%s: bulk delete refused (%s); deleting one by one", self.root, exc)
                for key in part:
                    self.delete(key)

    def delete_tree(self, key: str) -> None:
        # Reverse key order: the root `zarr.json` goes first (the prefix stops being a store at
        # once) and a `.creating` marker last (a cleanup cut short is still known for one).
        paths = sorted((f"{key}/{rel}" if key else rel for rel, _ in self.walk(key)), reverse=True)
        self.delete_many(paths)
        self.delete(key)


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest


class RangeNotSatisfiable(Exception):
    """A ranged GET starting at or past the object's end (HTTP 416)."""


def _status(exc: BaseException) -> int | None:
    """The HTTP status an obstore error reports, when it reports one."""
    found = re.search(r"status(?: code)?:? (\d{3})\b", str(exc))
    return int(found.group(1)) if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
