"""Where a store's files live: a local folder, or a prefix of an object store (s3://, gs://, az://).

Private helper of `cogfun.common.store` (import `Location`, `location` from there). Every byte the
store reads or writes goes through a `Location`, so the store's rules hold the same way on both:

- `write(data)` replaces a file *whole*: locally through a temporary name and a rename, on an
  object store with one PUT (a large file is a multipart upload, which only appears when it is
  completed). A reader never sees half a file, on either.
- `create(data)` writes a file only when none exists (a hard link locally, a conditional PUT
  `If-None-Match: *` on an object store) and says whether it did: the writer lease
  (`lock.py`) is built on it and on `replace(data, version)` (`If-Match` on the ETag).
- Nothing is ever appended to or rewritten in part, and nothing is renamed on an object store.

URLs are the ones obstore understands (`s3://bucket/prefix`, `gs://`, `az://`, `abfs://`, ...);
anything else (or `file://`) is a local path. Credentials, endpoint and region come from the usual
environment variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_REGION`, ...) and from
storage options (`--storage-options` JSON): obstore's configuration keys (`endpoint`, `region`,
`access_key_id`, ...; fsspec's `endpoint_url`, `key`, `secret` are accepted too), `client_options`,
`retry_config`, and cogfun's own `retries` (attempts in all for a failing request, default 6) and
`retry_backoff_s` (the first pause, doubled after each try; default 0.5 s).

An object store's transient failures (a dropped connection, a 5xx, a timeout) are retried with
that backoff, each retry logged; after the last, `ObjectStoreIOError` (an OSError) names the object,
the attempts and the reason. A missing object is FileNotFoundError (or None from `read`), never an
I/O error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from cogfun.common.store.schema import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "adl")
_default_options: dict = {}


def set_default_options(options: dict | None) -> None:
    """The storage options every `location()` without options of its own uses (the CLI sets them
    from `--storage-options`)."""
    global _default_options
    _default_options = dict(options or {})


def parse_options(text: str | None, flag: str = "--storage-options") -> dict:
    """`--storage-options` JSON as a dict; an unparsable value or a non-object is refused by name."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # The text is not echoed: it may hold credentials.
        raise StoreError(f"{flag}: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise StoreError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def location(where: str | Path | Location, options: dict | None = None) -> Location:
    """The Location of a local path or an object-store URL (with `options`, else the defaults)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where) if isinstance(where, os.PathLike) else str(where)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" not in text:
        return Location(_LOCAL, os.path.abspath(os.path.expanduser(text)) if text else "")
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in OBJECT_SCHEMES:
        raise StoreError(
            f"{text}: unsupported URL scheme {scheme!r} (object stores: "
            f"{', '.join(s + '://' for s in OBJECT_SCHEMES)}; or a local path)"
        )
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StoreError(f"{text}: the URL names no bucket")
    from cogfun.common.store.objects import ObjectFS

    fs = ObjectFS.get(
        f"{scheme.lower()}://{bucket}", dict(options if options is not None else _default_options)
    )
    return Location(fs, key.strip("/"))


class Location:
    """A file or folder of a store, local or on an object store. Cheap to make (`loc / "name"`),
    hashable, picklable (an object store's copy reconnects with the same options)."""

    __slots__ = ("fs", "key")

    def __init__(self, fs: Any, key: str):  # LocalFS or objects.ObjectFS
        self.fs = fs
        self.key = key

    # ---- names ----

    def __truediv__(self, name: str) -> Location:
        name = str(name)
        return Location(self.fs, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.fs.local:
            return Location(self.fs, os.path.dirname(self.key))
        return Location(self.fs, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def sibling(self, name: str) -> Location:
        """`name` in the same folder."""
        return self.parent / name

    @property
    def local(self) -> bool:
        return self.fs.local

    def cached(self, folder: str | Path, namespace: str, max_bytes: int | None = None) -> Location:
        """This Location with its reads kept in a local cache folder (`cache.py`); local
        Locations are returned as they are (they are local already)."""
        if self.fs.local:
            return self
        from cogfun.common.store.cache import CachedFS

        try:
            return Location(CachedFS(self.fs, str(folder), namespace, max_bytes), self.key)
        except OSError as exc:  # the cache folder cannot be made: read without it
            log.warning("cache folder %s unusable (%s): reading %s uncached", folder, exc, self)
            return self

    @property
    def path(self) -> Path:
        """The local path (a local Location only)."""
        if not self.fs.local:
            raise StoreError(f"{self} is on an object store, not a local path")
        return Path(self.key)

    def __str__(self) -> str:
        return self.key if self.fs.local else f"{self.fs.root}/{self.key}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __fspath__(self) -> str:
        if not self.fs.local:
            raise TypeError(f"{self} is on an object store: it has no local path")
        return self.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self.fs is other.fs and self.key == other.key

    def __hash__(self) -> int:
        return hash((id(self.fs), self.key))

    def __reduce__(self) -> tuple:
        return (location, (str(self), None if self.fs.local else self.fs.options))

    # ---- reads ----

    def read(self, start: int = 0, length: int | None = None) -> bytes | None:
        """`length` bytes from `start` (a negative start counts from the end; a file shorter than
        that is read whole), the whole file by default; None when it does not exist."""
        return self.fs.read(self.key, start, length)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Several (start, length) ranges of one file, fetched together (an object store merges
        near ranges into fewer requests); None when the file does not exist."""
        return self.fs.read_ranges(self.key, ranges)

    def read_text(self) -> str | None:
        data = self.read()
        return None if data is None else data.decode("utf-8")

    def read_versioned(self) -> tuple[bytes, str] | None:
        """The file's bytes and its version (ETag; locally its mtime and size), or None."""
        return self.fs.read_versioned(self.key)

    def exists(self) -> bool:
        """A file, or a folder with anything in it."""
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return self.fs.size(self.key) is not None

    def is_dir(self) -> bool:
        return self.fs.is_dir(self.key)

    def size(self) -> int | None:
        return self.fs.size(self.key)

    def listdir(self) -> list[str]:
        """Names directly in this folder (files and folders; [] when there is none)."""
        return self.fs.listdir(self.key)

    def walk(self) -> Iterator[tuple[str, int]]:
        """(key relative to this folder, size) of every file below it."""
        return self.fs.walk(self.key)

    # ---- writes ----

    def write(self, data: bytes | bytearray | memoryview | Iterable[bytes] | None) -> None:
        """Replace the file whole with `data` (bytes, or pieces streamed one after another);
        None removes it (no error when it is missing)."""
        if data is None:
            self.fs.delete(self.key)
        else:
            self.fs.write(self.key, data)

    def write_text(self, text: str) -> None:
        self.write(text.encode("utf-8"))

    def create(self, data: bytes) -> bool:
        """Write the file only if it does not exist; False (nothing written) when it does."""
        return self.fs.create(self.key, data)

    def replace(self, data: bytes, version: str) -> str | None:
        """Replace the file only if it is still at `version` (from `read_versioned`): its new
        version, or None when another writer changed it first."""
        return self.fs.replace(self.key, data, version)

    def delete(self) -> None:
        self.fs.delete(self.key)

    def delete_many(self, names: list[str]) -> None:
        """Remove the files `names` in this folder (those there are): on an object store, bulk
        requests (S3's DeleteObjects: 1000 keys each) instead of one request a file."""
        keys = [f"{self.key}/{n}" if self.key else n for n in names]
        if keys:
            self.fs.delete_many(keys)

    def delete_tree(self) -> None:
        """Remove this folder and everything in it."""
        self.fs.delete_tree(self.key)

    def mkdir(self) -> None:
        """Make the folder (and its parents) locally; object stores have no folders."""
        if self.fs.local:
            os.makedirs(self.key, exist_ok=True)

    # ---- zarr ----

    def zarr_store(self, read_only: bool = False) -> Any:
        """A zarr store rooted here: the local path, or a zarr ObjectStore over this prefix."""
        if self.fs.local:
            return self.key
        from zarr.storage import ObjectStore

        return ObjectStore(self.fs.prefixed(self.key), read_only=read_only)


class LocalFS:
    """Local files: plain syscalls (pathlib costs ~10 us a file; a shard read is a few)."""

    local = True
    root = ""

    def read(self, key: str, start: int, length: int | None) -> bytes | None:
        try:
            with open(key, "rb") as f:
                if start < 0:  # from the end; a file shorter than that is read whole (damage)
                    f.seek(-min(-start, os.fstat(f.fileno()).st_size), os.SEEK_END)
                elif start:
                    f.seek(start)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        try:
            fd = os.open(key, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return [os.pread(fd, length, start) for start, length in ranges]
        finally:
            os.close(fd)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(key, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), f"{st.st_mtime_ns}-{st.st_size}"
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def size(self, key: str) -> int | None:
        try:
            st = os.stat(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if not os.path.isdir(key) else None

    def is_dir(self, key: str) -> bool:
        return os.path.isdir(key)

    def listdir(self, key: str) -> list[str]:
        try:
            return os.listdir(key)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, key: str) -> Iterator[tuple[str, int]]:
        for folder, _, names in os.walk(key):
            for name in names:
                full = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    yield os.path.relpath(full, key), os.stat(full).st_size

    def _tmp(self, key: str) -> str:
        return f"{key}.{os.getpid()}-{threading.get_ident()}.partial"

    def write(self, key: str, data: Any) -> None:
        tmp = self._tmp(key)
        pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
            os.replace(tmp, key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        tmp = self._tmp(key)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, key)  # atomic, and fails when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        current = self.read_versioned(key)
        if current is None or current[1] != version:
            return None
        self.write(key, data)
        found = self.read_versioned(key)
        return None if found is None else found[1]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key)

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def delete_tree(self, key: str) -> None:
        import shutil

        shutil.rmtree(key, ignore_errors=True)
        self.delete(key)


_LOCAL = LocalFS()
