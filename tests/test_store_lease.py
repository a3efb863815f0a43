"""The one-writer lock on an object store (a lease beside the store) and locally (flock)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from cogfun.common.store import StoreError, StoreLock, live_writer
from cogfun.common.store.location import location
from cogfun.common.store.lock import lease_ttl_s, lock_path

ME = f"pid {os.getpid()} on {socket.gethostname()}"


@pytest.fixture
def store(s3_server, s3_bucket):
    """A store URL's Location on the test server (requests retried briefly)."""
    return location(f"s3://{s3_bucket}/runs/latents.zarr", s3_server.options(retries=2))


def lease_of(store) -> dict:
    return json.loads(lock_path(store).read())


def write_lease(store, holder: str, expires_in: float) -> None:
    lease = {"holder": holder, "token": "someone-else", "expires": time.time() + expires_in}
    lock_path(store).write(json.dumps(lease).encode())


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_a_second_writer_is_refused_naming_the_holder_until_release(store):
    assert str(lock_path(store)) == str(store.parent / ".latents.zarr.lock")
    lock = StoreLock(store)
    lease = lease_of(store)
    assert lease["holder"] == ME and len(lease["token"]) == 32
    assert 55 < lease["expires"] - time.time() <= 60  # the default TTL
    assert live_writer(store) == ME
    with pytest.raises(StoreError) as refused:
        StoreLock(store, wait_s=0)
    message = str(refused.value)
    assert f"{store} is being written by another precompute right now ({ME})" in message
    assert "if that process is dead, rerun after " in message
    assert lease_of(store)["token"] == lease["token"]  # the refused writer changed nothing
    lock.check()
    assert not lock.lost
    lock.release()
    assert lock_path(store).read() is None
    assert live_writer(store) is None
    with pytest.raises(StoreError, match="released"):
        lock.check()
    StoreLock(store, wait_s=0).release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store):
    write_lease(store, f"pid {dead_pid()} on {socket.gethostname()}", expires_in=3600)
    assert live_writer(store) is None
    lock = StoreLock(store, wait_s=0)
    assert lease_of(store)["holder"] == ME and lease_of(store)["token"] != "someone-else"
    lock.release()
    # The same pid on another host is judged alive until its lease expires.
    pid = dead_pid()
    write_lease(store, f"pid {pid} on elsewhere", expires_in=3600)
    assert live_writer(store) == f"pid {pid} on elsewhere"
    with pytest.raises(
        StoreError, match=r"on elsewhere\): wait .* rerun after .*\(in 3[56]\d\d s\)"
    ):
        StoreLock(store, wait_s=0)


def test_an_expired_lease_is_taken_over(store):
    write_lease(store, "pid 1 on elsewhere", expires_in=-1)
    assert live_writer(store) is None
    lock = StoreLock(store, wait_s=0)
    assert lease_of(store)["holder"] == ME
    lock.release()


def test_of_two_writers_taking_over_an_expired_lease_exactly_one_wins(store):
    write_lease(store, "pid 1 on elsewhere", expires_in=-1)
    start = threading.Barrier(2)
    won, refused = [], []

    def take() -> None:
        start.wait()
        try:
            won.append(StoreLock(store, wait_s=0))
        except StoreError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 1
    assert f"right now ({ME})" in refused[0]
    assert lease_of(store)["token"] == won[0]._lease.token
    won[0].release()


def test_the_heartbeat_renews_the_lease(store, monkeypatch):
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "1")
    lock = StoreLock(store)
    first = lease_of(store)
    assert 0.5 < first["expires"] - time.time() <= 1
    time.sleep(1.5)  # past the first expiry: only renewals keep it
    renewed = lease_of(store)
    assert renewed["token"] == first["token"] and renewed["expires"] > first["expires"] + 1
    assert live_writer(store) == ME
    lock.check()
    lock.release()


def test_a_stolen_lease_is_lost_and_check_names_the_thief(store, monkeypatch, caplog):
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "1")
    lock = StoreLock(store)
    write_lease(store, "pid 4242 on thief-host", expires_in=60)
    with caplog.at_level(logging.ERROR, logger="cogfun.common.store.lock"):
        deadline = time.monotonic() + 5
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lock.lost
    assert "taken over by pid 4242 on thief-host" in caplog.text
    with pytest.raises(StoreError, match="lost its writer lease to pid 4242 on thief-host"):
        lock.check()
    lock.release()  # not ours any more: left alone
    assert lease_of(store)["holder"] == "pid 4242 on thief-host"


def test_release_deletes_only_our_own_lease(store):
    lock = StoreLock(store)  # the default TTL: no renewal notices the theft before release
    write_lease(store, "pid 4242 on thief-host", expires_in=60)
    lock.release()
    assert lease_of(store)["holder"] == "pid 4242 on thief-host"


def test_an_unreachable_store_fails_check_after_expiry_and_recovers(s3_server, store, monkeypatch):
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "1")
    lock = StoreLock(store)
    s3_server.stop()
    try:
        time.sleep(1.2)
        with pytest.raises(StoreError, match="expired and could not be renewed"):
            lock.check()
    finally:
        s3_server.start()
    lock.check()  # nobody took it over meanwhile: the renewal on our version succeeds
    assert not lock.lost and lease_of(store)["holder"] == ME
    lock.release()


def test_a_killed_writer_is_taken_over_at_once_on_the_same_host(s3_server, store):
    code = (
        "import json, sys, time\n"
        "from cogfun.common.store import StoreLock\n"
        "from cogfun.common.store.location import location\n"
        "lock = StoreLock(location(sys.argv[1], json.loads(sys.argv[2])))\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(store), json.dumps(s3_server.options())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert live_writer(store) == f"pid {holder.pid} on {socket.gethostname()}"
    finally:
        holder.kill()
        holder.wait()
    assert live_writer(store) is None
    StoreLock(store, wait_s=0).release()


def test_the_ttl_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "2.5")
    assert lease_ttl_s() == 2.5
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "soon")
    with pytest.raises(StoreError, match="COGFUN_LEASE_TTL_S='soon': expected a number"):
        lease_ttl_s()


def test_local_stores_keep_the_flock(tmp_path):
    out = tmp_path / "local.zarr"
    lock = StoreLock(out)
    assert (tmp_path / ".local.zarr.lock").read_text() == ME
    assert live_writer(out) == ME
    with pytest.raises(StoreError, match=r"being written by another precompute right now \(pid "):
        StoreLock(out, wait_s=0)
    lock.check()
    assert not lock.lost
    lock.release()
    assert live_writer(out) is None
    StoreLock(str(out), wait_s=0).release()


def test_a_writer_whose_lease_was_taken_stops_before_sealing_or_finalizing(store, monkeypatch):
    """What precompute wires up (`writer.guard = lock.check`): once another writer holds the
    lease (it expired while this writer stalled), the old writer neither seals a shard nor marks
    the store complete."""
    import torch
    from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write

    plan = StorePlan(
        [BucketPlan("f1_h2_w2", 1, 16, 16, 1, 2, 2, [RowPlan(1, {"file": "a.png"})])], ["", "x"]
    )
    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "1")
    lock = StoreLock(store)
    w = open_for_write(
        store,
        settings={"s": 1},
        attrs={},
        plan=plan,
        layout=StoreLayout(4, "moments", 0, 3, 4),
        create=True,
    )
    w.guard = lock.check
    for i in range(2):
        w.write_caption(i, torch.ones(3, 4))
    w.write_sample("f1_h2_w2", 0, torch.ones(1, 8, 2, 2))
    write_lease(store, "pid 4242 on thief-host", expires_in=60)
    time.sleep(0.6)  # past half the TTL: the next check renews, and finds the lease taken
    with pytest.raises(StoreError, match="pid 4242 on thief-host"):
        w.seal("f1_h2_w2", 0)
    with pytest.raises(StoreError, match="pid 4242 on thief-host"):
        w.finalize()
    from cogfun.common.store import open_store

    assert open_store(store, allow_incomplete=True).status == "writing"
    assert not [k for k, _ in store.walk() if "/latents/c." in k]  # no shard was sealed
    lock.release()


def test_the_other_processes_watch_process_0s_lease(store, s3_server, monkeypatch):
    """A precompute's other processes check process 0's lease by its token (`LeaseWatch`, what
    precompute gives their writers as `guard`): passing while it is held, at most one read per
    TTL/6, then failing on a takeover or an expired lease, naming the holder."""
    from cogfun.common.store.lock import LeaseWatch, token_from_ints, token_to_ints

    monkeypatch.setenv("COGFUN_LEASE_TTL_S", "1.2")
    lock = StoreLock(store)
    assert token_from_ints(token_to_ints(lock.token)) == lock.token
    assert all(0 <= v < 2**32 for v in token_to_ints(lock.token))  # fit Ranks' int64 broadcast
    watch = LeaseWatch(store, lock.token)
    s3_server.requests.clear()
    watch.check()
    watch.check()  # within TTL/6 of the first: no request
    # (the lock's own heartbeat PUTs may come in between: only reads are counted)
    assert [m for m, p in s3_server.requests if p.endswith(".lock") and m == "GET"] == ["GET"]
    write_lease(store, "pid 4242 on thief-host", expires_in=60)
    time.sleep(0.25)  # past TTL/6 (0.2 s)
    with pytest.raises(StoreError, match=r"taken over by pid 4242 on thief-host; this process"):
        watch.check()
    lock_path(store).write(b"not json")
    with pytest.raises(StoreError, match="lease was replaced by an object cogfun did not write"):
        LeaseWatch(store, lock.token).check()
    lock_path(store).delete()
    with pytest.raises(StoreError, match=r"lease is gone \(process 0 released it as it ended"):
        LeaseWatch(store, lock.token).check()
    lease = {"holder": ME, "token": lock.token, "expires": time.time() - 1}
    lock_path(store).write(json.dumps(lease).encode())
    with pytest.raises(StoreError, match="writer lease expired at .* without a renewal"):
        LeaseWatch(store, lock.token).check()
    lock.release()
    again = StoreLock(store, wait_s=0)  # free again: a new lease
    assert again.token != lock.token
    again.release()
