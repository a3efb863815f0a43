"""One live writer per store: a lock beside the store (`.NAME.lock`): flock locally, a lease on an
object store.

Private helper of `cogfun.common.store`. Precompute's first process holds the lock from before the
store is created until it exits, so a second precompute into the same store is refused instead
of racing it (two creators would delete each other's half-built store), and a reader can tell a
store that is being written right now from one whose writer was interrupted (`live_writer`).

Local stores: an advisory flock on `.NAME.lock`, which holds "pid N on HOST". The kernel drops the
lock when the holder dies, `kill -9` included, so a stale lock never blocks a rerun. flock needs a
local filesystem (on NFS it may not exclude other machines).

Object stores have no locks, so the writer holds a *lease*: the object `.NAME.lock` beside the
store, JSON `{"holder": "pid N on HOST", "token": <uuid>, "expires": <unix time>, "machine": ...}`.

- Taking it: a conditional create (`If-None-Match: *`); of two writers exactly one succeeds. An
  existing lease may be taken over when it has expired, or when its holder is on this machine and
  that pid is gone (a `kill -9` and a rerun on the same machine resume at once); the takeover is a
  conditional replace (`If-Match` on the ETag just read), so of two takers exactly one wins. Any
  other lease refuses the new writer, naming the holder and when its lease expires. A lease that
  is not valid JSON was not written by cogfun and is taken over.
- Keeping it: a daemon thread renews it (moves `expires` TTL ahead, a conditional replace on the
  last version) every TTL/3. TTL is `LEASE_TTL_S` (60 s), or `COGFUN_LEASE_TTL_S` seconds.
- Losing it: a writer that stalls (or loses the network) for longer than the TTL lets its lease
  expire, and another writer may then take it over. The stalled writer finds that at its next
  renewal or `check()`: `lost` turns true, an error is logged, and `check()` raises StoreError
  naming the new holder, so it stops before sealing or finalizing anything. `check()` also renews
  at once when less than half the TTL is left, and raises when the lease has expired without a
  renewal (the store could not be reached), as another writer may hold it by then.
- Releasing it: `release()` (also run at process exit) stops the thread and deletes the lease if
  the token in it is still ours.
- The other processes of a multi-process precompute hold no lease of their own: process 0 hands
  them its lease's `token`, and each checks with a `LeaseWatch` before its own seals that the
  lease still carries that token and has not expired (the object read at most every TTL/6), so a
  takeover stops every process of the old run, not only process 0.

Limits: expiry compares the holder's clock with the taker's, so clocks across machines must agree
to well within the TTL. "This machine" is the host name plus the boot id and pid namespace when
Linux provides them; a dead holder whose pid has been reused, or one on another machine, is waited
for until its lease expires. A check passes a writer for at least half the TTL: a single write
that outlasts that, after a stall, can still land after a takeover.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from cogfun.common.store.location import Location, location
from cogfun.common.store.schema import StoreError

log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0
TTL_ENV = "COGFUN_LEASE_TTL_S"
_HOLDER = re.compile(r"pid (\d+) on (.+)")


def lock_path(store: str | Path | Location) -> Location:
    """The lock beside `store`: `.NAME.lock` in the store's parent folder (or prefix)."""
    loc = location(store)
    return loc.parent / f".{loc.name}.lock"


def lease_ttl_s() -> float:
    """The lease TTL in seconds: `COGFUN_LEASE_TTL_S` when set, else `LEASE_TTL_S`."""
    text = os.environ.get(TTL_ENV, "").strip()
    if not text:
        return LEASE_TTL_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise StoreError(f"{TTL_ENV}={text!r}: expected a number of seconds > 0")
    return value


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _machine() -> str:
    """This machine's boot and pid namespace, so a host name shared by two machines (or
    containers) does not make one judge the other's pids."""
    parts = []
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _parse(data: bytes) -> dict | None:
    """A lease's fields, or None when it is not a lease cogfun wrote."""
    try:
        lease = json.loads(data)
        found = {
            "holder": str(lease["holder"]),
            "token": str(lease["token"]),
            "expires": float(lease["expires"]),
            "machine": str(lease.get("machine", "")),
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return found


def _is_free(lease: dict | None, now: float) -> bool:
    """Whether a lease may be taken over: unreadable, expired, or its holder is a pid on this
    machine that is gone."""
    if lease is None or lease["expires"] <= now:
        return True
    match = _HOLDER.fullmatch(lease["holder"])
    if match is None or match.group(2) != socket.gethostname():
        return False
    if lease["machine"] and lease["machine"] != _machine():
        return False
    return not _pid_alive(int(match.group(1)))


def _when(expires: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
    return f"{stamp} (in {max(0.0, expires - time.time()):.0f} s)"


class StoreLock:
    """Held while a precompute writes `store`; `release()` (or process exit) lets it go. On an
    object store it is a lease: `lost` and `check()` say whether it is still ours."""

    def __init__(self, store: str | Path | Location, wait_s: float = 2.0):
        self.store = location(store)
        self._fd: int | None = None
        self._lease: _Lease | None = None
        if self.store.local:
            self._flock(wait_s)
        else:
            self._lease = _Lease(self.store, wait_s)

    def _flock(self, wait_s: float) -> None:
        path = lock_path(self.store).path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s  # a reader's brief shared probe must not refuse us
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(self._fd)
                self._fd = None
                raise StoreError(
                    f"{self.store} is being written by another precompute right now "
                    f"({holder or 'unknown process'}): wait for it to finish, or write to "
                    "another --out"
                ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _holder().encode(), 0)

    @property
    def token(self) -> str | None:
        """The lease's token (32 hex digits), for the run's other processes' `LeaseWatch`; None
        for a local flock."""
        return None if self._lease is None else self._lease.token

    @property
    def lost(self) -> bool:
        """True once another writer has taken this lease over (a flock is never lost)."""
        return self._lease is not None and self._lease.lost is not None

    def check(self) -> None:
        """Raise StoreError unless this process still holds the store: call it before a write
        that must not race another writer (sealing, finalizing)."""
        if self._lease is not None:
            self._lease.check()
        elif self._fd is None:
            raise StoreError(f"{self.store}: the writer lock was released")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
        if self._lease is not None:
            self._lease.release()


class _Lease:
    """The object-store lease of one StoreLock (see the module doc)."""

    def __init__(self, store: Location, wait_s: float):
        self.store = store
        self.path = lock_path(store)
        self.ttl = lease_ttl_s()
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # the holder that took it over
        self._pid = os.getpid()
        self._expires = 0.0
        self._version = ""
        self._error = ""
        self._released = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._acquire(wait_s)
        self._thread = threading.Thread(
            target=self._beat, name=f"cogfun-lease {self.path}", daemon=True
        )
        self._thread.start()
        atexit.register(self.release)

    def _payload(self) -> tuple[bytes, float]:
        expires = round(time.time() + self.ttl, 3)
        lease = {
            "holder": _holder(),
            "token": self.token,
            "expires": expires,
            "machine": _machine(),
        }
        return json.dumps(lease).encode(), expires

    def _acquire(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        for _ in range(1000):  # every pass makes a request; a pass ends in a change or a wait
            payload, expires = self._payload()
            if self.path.create(payload):
                found = self.path.read_versioned()
                if found is not None and (_parse(found[0]) or {}).get("token") == self.token:
                    self._version, self._expires = found[1], expires
                    return
                continue  # taken over between the create and the read: look again
            found = self.path.read_versioned()
            if found is None:
                continue  # released between the create and the read
            lease = _parse(found[0])
            if lease is not None and lease["token"] == self.token:  # a retried write of ours
                self._version, self._expires = found[1], lease["expires"]
                return
            if _is_free(lease, time.time()):
                version = self.path.replace(payload, found[1])
                if version is not None:
                    self._version, self._expires = version, expires
                    if lease is not None:
                        log.info(
                            "%s: took over the writer lease of %s", self.store, lease["holder"]
                        )
                    return
                continue  # another writer changed it first: look again
            assert lease is not None
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"{self.store} is being written by another precompute right now "
                    f"({lease['holder']}): wait for it to finish, or write to another --out; "
                    f"if that process is dead, rerun after {_when(lease['expires'])}, "
                    "when its lease expires"
                )
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        raise StoreError(f"{self.path}: the writer lease keeps changing; try again")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._renew()
            if self.lost is not None:
                return

    def _renew(self) -> None:
        """Move `expires` ahead, on the condition that the lease is still at our last version."""
        with self._mutex:
            if self._released or self.lost is not None:
                return
            payload, expires = self._payload()
            try:
                version = self.path.replace(payload, self._version)
                if version is None:  # changed since our last write: ours still, or taken
                    found = self.path.read_versioned()
                    lease = None if found is None else _parse(found[0])
                    if lease is None or lease["token"] != self.token:
                        holder = "nobody: it was deleted" if found is None else "another writer"
                        self.lost = lease["holder"] if lease is not None else holder
                        log.error(
                            "%s: the writer lease was taken over by %s; this process stops "
                            "writing the store",
                            self.store,
                            self.lost,
                        )
                        return
                    version, expires = found[1], lease["expires"]  # a retried write of ours
            except OSError as exc:
                self._error = str(exc)
                log.warning(
                    "%s: could not renew the writer lease (%s); it expires at %s",
                    self.store,
                    exc,
                    _when(self._expires),
                )
                return
            self._version, self._expires, self._error = version, expires, ""

    def check(self) -> None:
        if self._released:
            raise StoreError(f"{self.store}: the writer lease was released")
        if self.lost is None and time.time() > self._expires - self.ttl / 2:
            self._renew()
        if self.lost is not None:
            raise StoreError(
                f"{self.store}: this precompute lost its writer lease to {self.lost} (it expired "
                f"before it was renewed, TTL {self.ttl:g} s: this process stalled, lost the "
                "network, or the clocks disagree); stopping so that two writers never write "
                "the store at once"
            )
        if time.time() >= self._expires:
            raise StoreError(
                f"{self.store}: the writer lease expired and could not be renewed "
                f"({self._error or 'no renewal in time'}); stopping, as another writer may hold "
                "it now"
            )

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if self._released:
                return
            self._released = True
        atexit.unregister(self.release)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if os.getpid() != self._pid or self.lost is not None:
            return  # a forked child's copy, or no longer ours
        try:
            found = self.path.read_versioned()
            ours = found is not None and (_parse(found[0]) or {}).get("token") == self.token
            if ours and time.time() < self._expires:  # expired: another writer may take it now
                self.path.delete()
        except OSError as exc:
            log.warning(
                "%s: could not delete the writer lease (%s); it expires at %s",
                self.store,
                exc,
                _when(self._expires),
            )


class LeaseWatch:
    """What the other processes of a precompute check before their seals: that the lease process
    0 holds (`token`) is still in place and unexpired. The lease object is read at most every
    TTL/6 seconds; a read that fails is tolerated until the last expiry seen has passed."""

    def __init__(self, store: str | Path | Location, token: str):
        self.store = location(store)
        self.path = lock_path(self.store)
        self.token = token
        self.ttl = lease_ttl_s()
        self._next = 0.0  # time.monotonic() of the next read
        self._expires = time.time() + self.ttl / 2  # until a read says otherwise

    def check(self) -> None:
        if time.monotonic() < self._next and time.time() < self._expires:
            return
        try:
            found = self.path.read()
        except OSError as exc:
            if time.time() < self._expires:  # the next seals pass without a read till TTL/6
                log.warning("%s: could not read the writer lease (%s)", self.store, exc)
                self._next = time.monotonic() + self.ttl / 6
                return
            raise StoreError(
                f"{self.store}: the writer lease could not be read ({exc}) and has expired "
                "since it was last seen; stopping, as another writer may hold it now"
            ) from exc
        lease = None if found is None else _parse(found)
        if lease is None or lease["token"] != self.token:
            if found is None:
                what = "is gone (process 0 released it as it ended, or it was deleted)"
            elif lease is None:
                what = "was replaced by an object cogfun did not write"
            else:
                what = f"was taken over by {lease['holder']}"
            raise StoreError(
                f"{self.store}: process 0's writer lease {what}; this process stops so that two "
                "writers never write the store at once"
            )
        if time.time() >= lease["expires"]:
            raise StoreError(
                f"{self.store}: process 0's writer lease expired at {_when(lease['expires'])} "
                "without a renewal; stopping, as another writer may take it now"
            )
        self._expires = lease["expires"]
        self._next = time.monotonic() + self.ttl / 6


def token_to_ints(token: str) -> list[int]:
    """A lease token (32 hex digits) as 4 ints of 32 bits (`Ranks.broadcast` sends ints)."""
    return [int(token[i : i + 8], 16) for i in range(0, 32, 8)]


def token_from_ints(values: list[int]) -> str:
    return "".join(f"{v:08x}" for v in values)


def live_writer(store: str | Path | Location) -> str | None:
    """Who holds `store`'s writer lock now ("pid N on HOST"), or None when no live process does
    (on an object store: no lease, an expired one, or one of a dead pid on this machine)."""
    path = lock_path(store)
    if not path.local:
        data = path.read()
        if data is None:
            return None
        lease = _parse(data)
        return None if lease is None or _is_free(lease, time.time()) else lease["holder"]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a live process"
    finally:
        os.close(fd)  # also drops the probe's shared lock at once
    return None
