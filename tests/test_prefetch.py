"""The training loaders' endless stream (prefetch across epochs), for both backends (reader threads,
worker processes), and the worker processes' one-buffer batch handoff."""

from __future__ import annotations

import pytest
import torch
from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write
from cogfun.train.data import make_dataloader
from cogfun.train.prefetch import pack_batch, unpack_batch


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two buckets (7 and 4 samples), normal mode, each latent filled with its slot number."""
    path = tmp_path_factory.mktemp("prefetch") / "s.zarr"
    plan = StorePlan(
        [
            BucketPlan("f5_h16_w16", 5, 16, 16, 2, 2, 2, [RowPlan(1, {"i": i}) for i in range(7)]),
            BucketPlan("f1_h8_w8", 1, 8, 8, 1, 1, 1, [RowPlan(1, {"i": i}) for i in range(4)]),
        ],
        ["", "a caption"],
    )
    layout = StoreLayout(2, "moments", 0, 3, 4)
    w = open_for_write(path, settings={}, attrs={}, plan=plan, layout=layout, create=True)
    for i in range(2):
        w.write_caption(i, torch.zeros(3, 4))
    for b in plan.buckets:
        n = len(b.rows)
        slots = torch.arange(n, dtype=torch.bfloat16).view(n, 1, 1, 1, 1) + 1
        shape = (n, b.latent_frames, 4, b.latent_h, b.latent_w)
        w.write_samples(b.name, range(n), slots.expand(*shape))
    w.finalize()
    return path


def _keys(batches) -> list[tuple[str, list[int]]]:
    return [(b["bucket"], list(b["slots"])) for b in batches]


def test_pack_round_trip_keeps_bytes_dtypes_order_and_shares_one_buffer():
    batch = {
        "latents": torch.randn(2, 3, 4).bfloat16(),
        "masks": None,
        "all_masked": torch.tensor([[True, False]]),
        "caption": torch.tensor([3, 0]),
        "bucket": "f1_h8_w8",
        "slots": [4, 1],
    }
    for as_tensor in (False, True):
        out = unpack_batch(pack_batch(batch, as_tensor=as_tensor))
        assert list(out) == list(batch)
        assert out["masks"] is None and out["bucket"] == "f1_h8_w8" and out["slots"] == [4, 1]
        for key in ("latents", "all_masked", "caption"):
            assert out[key].dtype == batch[key].dtype and torch.equal(out[key], batch[key])
        base = out["latents"].untyped_storage().data_ptr()
        assert out["caption"].untyped_storage().data_ptr() == base  # views of one buffer


BACKEND_WORKERS = [("threads", 0), ("threads", 2), ("processes", 0), ("processes", 2)]


@pytest.mark.parametrize(("backend", "workers"), BACKEND_WORKERS)
def test_each_pass_is_one_epoch_of_the_sampler(store, backend, workers):
    loader, sampler = make_dataloader(store, 3, workers, seed=7, rank=0, world=1, backend=backend)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert _keys(batches) == sampler.epoch_batches(epoch)
        for b in batches:
            want = torch.tensor(b["slots"], dtype=torch.float32) + 1
            assert torch.equal(b["latents"].float()[:, 0, 0, 0, 0], want)  # the right samples


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_stream_continues_across_epochs_and_restarts_elsewhere(store, backend):
    loader, sampler = make_dataloader(store, 2, 2, seed=3, rank=0, world=1, backend=backend)
    sampler.set_epoch(0)
    list(loader)
    assert loader.stream_start == (0, 0)  # where the stream was (re)started
    sampler.set_epoch(1)  # where the stream already is: no restart
    first = next(iter(loader))
    assert loader.stream_start == (0, 0) and _keys([first]) == sampler.epoch_batches(1)[:1]
    sampler.set_position(1, 1)  # exactly where the last pass stopped: still no restart
    rest = list(loader)
    assert loader.stream_start == (0, 0) and _keys(rest) == sampler.epoch_batches(1)[1:]
    sampler.set_position(0, 4)  # elsewhere: the stream restarts there
    assert _keys(loader) == sampler.epoch_batches(0)[4:]
    assert loader.stream_start == (0, 4)
    assert _keys(loader) == sampler.epoch_batches(0)  # no set_epoch: the same epoch again
    assert len(loader) == len(sampler) == 6


@pytest.mark.parametrize(("backend", "workers"), BACKEND_WORKERS)
def test_follow_starts_where_the_state_stands_and_advances_it(store, backend, workers):
    """Training's way through the loader: from a `TrainingState`'s position on, epoch after epoch,
    each batch counted in the state as it is handed out; the sampler's own position is not used."""
    from cogfun.train.state import TrainingState

    loader, sampler = make_dataloader(store, 2, workers, seed=5, rank=0, world=1, backend=backend)
    n = len(sampler)
    state = TrainingState(batches_per_epoch=n, order=sampler.order(), epoch=1, batches_done=n - 2)
    sampler.set_position(0, 3)  # by-hand position: not training's
    stream = loader.follow(state)
    got = [next(stream) for _ in range(2)]
    assert _keys(got) == sampler.epoch_batches(1)[n - 2 :]
    assert state.position == (1, n) and state.epoch_ended
    third = next(stream)
    assert _keys([third]) == sampler.epoch_batches(2)[:1] and state.position == (2, 1)
    assert loader.stream_start == (1, n - 2)  # one stream, read ahead across the epoch end
    assert loader.next_position == (2, 1)
    assert _keys(loader) == sampler.epoch_batches(0)[3:]  # the by-hand pass is still there


@pytest.mark.parametrize(("backend", "workers"), BACKEND_WORKERS)
def test_a_failed_read_ends_the_stream_and_a_new_pass_starts_afresh(
    store, backend, workers, tmp_path, monkeypatch
):
    from cogfun.train import data

    loader, sampler = make_dataloader(store, 4, workers, seed=0, rank=0, world=1, backend=backend)
    bad = sampler.epoch_batches(0)[1]
    marker = tmp_path / "failed_once"  # a file: workers are other processes
    real = data.StoreBatchDataset.__getitem__

    def flaky(self, batch):
        if (batch[0], list(batch[1])) == bad and not marker.exists():
            marker.touch()
            raise OSError("disk hiccup")
        return real(self, batch)

    monkeypatch.setattr(data.StoreBatchDataset, "__getitem__", flaky)
    sampler.set_epoch(0)
    with pytest.raises(OSError, match="disk hiccup"):
        list(loader)
    assert loader.next_position is None  # no stream runs: the next pass starts one
    sampler.set_epoch(0)
    assert _keys(loader) == sampler.epoch_batches(0)


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_process_exits_cleanly_with_its_loader_threads_running(store, backend):
    """The loader's threads are stopped at exit: no abort inside torch at shutdown (without
    that, a process whose worker-process loader was just dropped aborted in about 1 run of 3)."""
    import subprocess
    import sys

    code = (
        "from cogfun.train.data import make_dataloader\n"
        f"loader, sampler = make_dataloader({str(store)!r}, 2, 2, seed=0, rank=0, world=1, "
        f"backend={backend!r})\n"
        "batch = next(iter(loader))\n"
        "print('got', batch['bucket'])\n"
        "del loader, sampler, batch\n"  # its thread now stops and shuts the workers down
    )
    for _ in range(3):  # the abort this guards against was intermittent
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("got f") and "terminate called" not in proc.stderr


def test_reader_threads_read_ahead_in_order_and_at_most_ahead(store, monkeypatch):
    """Reads run on the loader's threads, never more than `ahead` batches past the consumer,
    and come out in the sampler's order whatever order the threads finish in."""
    import threading
    import time

    from cogfun.train import data

    loader, sampler = make_dataloader(store, 1, 3, seed=2, rank=0, world=1, prefetch_factor=2)
    assert loader.ahead == 6
    real = data.StoreBatchDataset.__getitem__
    started, threads = [], set()

    def slow_first(self, batch):
        started.append(batch)
        threads.add(threading.current_thread().name)
        if len(started) == 1:
            time.sleep(0.2)  # the first batch finishes last
        return real(self, batch)

    monkeypatch.setattr(data.StoreBatchDataset, "__getitem__", slow_first)
    sampler.set_epoch(0)
    it = iter(loader)
    first = next(it)
    time.sleep(0.2)  # let the threads run as far ahead as they may
    assert len(started) == 1 + loader.ahead  # the one taken, and `ahead` after it
    rest = list(it)
    assert _keys([first, *rest]) == sampler.epoch_batches(0)  # the sampler's order
    assert threads and all(name.startswith("cogfun-read") for name in threads)


def test_reader_threads_pin_every_tensor_when_asked(monkeypatch):
    """On CUDA each batch is pinned in the reader thread (so `.to(device, non_blocking=True)` is
    asynchronous); the pinning itself is faked here, this machine has no CUDA."""
    from cogfun.train import threaded

    pinned = []

    def fake_pin(self):
        pinned.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = {"latents": torch.zeros(2, 3), "caption": torch.tensor([1, 0]), "bucket": "b"}
    out = threaded.fetch({("b", (0,)): batch}, True, ("b", (0,)))
    assert sorted(pinned) == [(2,), (2, 3)] and out["bucket"] == "b"
    assert torch.equal(out["latents"], batch["latents"]) and out["latents"] is not batch["latents"]
    assert threaded.fetch({("b", (0,)): batch}, False, ("b", (0,))) is batch


def test_a_batch_reads_only_the_plan_chunks_that_hold_its_slots(tmp_path, monkeypatch):
    """Caption indices and provenance hashes come from the plan chunks holding the batch's slots
    (read once each), so a 100k-sample bucket's first batch costs what a 1k one's does."""
    from cogfun.common.store import chunks as store_chunks
    from cogfun.common.store import open_store
    from cogfun.common.store import specs as store_specs

    monkeypatch.setattr(store_specs, "PLAN_CHUNK_ROWS", 3)  # 10 rows: chunks 0-2, 3-5, 6-8, 9
    path = tmp_path / "chunks.zarr"
    rows = [RowPlan(1 + i % 3, {"i": i}) for i in range(10)]
    plan = StorePlan([BucketPlan("f1_h8_w8", 1, 8, 8, 1, 1, 1, rows)], ["", "a", "b", "c"])
    w = open_for_write(
        path,
        settings={},
        attrs={},
        plan=plan,
        layout=StoreLayout(2, "moments", 0, 3, 4),
        create=True,
    )
    for i in range(4):
        w.write_caption(i, torch.full((3, 4), float(i)))
    w.write_samples("f1_h8_w8", range(10), torch.ones(10, 1, 4, 1, 1, dtype=torch.bfloat16))
    w.finalize()
    reads, real = [], store_chunks.ChunkFiles.read_chunk

    def counted(self, index):
        reads.append((self.folder.name, index))
        return real(self, index)

    monkeypatch.setattr(store_chunks.ChunkFiles, "read_chunk", counted)
    reader = open_store(path)
    batch = reader.read_batch("f1_h8_w8", [7, 2, 6])  # chunks 2 and 0, checksums verified
    assert batch["caption"].tolist() == [1 + 7 % 3, 1 + 2 % 3, 1 + 6 % 3]
    plan_arrays = ("caption", "provenance_hash")
    assert sorted(reads) == sorted((a, c) for a in plan_arrays for c in (0, 2))
    assert reader.read_batch("f1_h8_w8", [9, 2])["caption"].tolist() == [1, 1 + 2 % 3]
    assert sorted(reads) == sorted((a, c) for a in plan_arrays for c in (0, 2, 3))  # 0: once


def test_reader_threads_work_on_the_training_process_device(store, monkeypatch):
    """With pinning (CUDA), each reader thread first selects the rank's device: CUDA calls from a
    new thread otherwise go to GPU 0 and open a context there. Faked: this machine has no CUDA."""
    import threading

    from cogfun.train.data import StoreBatchDataset
    from cogfun.train.threaded import ThreadLoader

    chosen = []
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda i: chosen.append((threading.current_thread().name, i))
    )
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    _, sampler = make_dataloader(store, 2, 0, seed=0, rank=0, world=1)
    loader = ThreadLoader(StoreBatchDataset(store), sampler, 2, 2, pin_memory=True, device=3)
    sampler.set_epoch(0)
    assert _keys(loader) == sampler.epoch_batches(0)
    assert chosen and {i for _, i in chosen} == {3}
    assert all(name.startswith("cogfun-read") for name, _ in chosen)
