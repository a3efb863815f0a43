"""The training loader's endless stream (prefetch across epochs) and one-buffer batch handoff."""

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


@pytest.mark.parametrize("workers", [0, 2])
def test_each_pass_is_one_epoch_of_the_sampler(store, workers):
    loader, sampler = make_dataloader(store, 3, workers, seed=7, rank=0, world=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert _keys(batches) == sampler.epoch_batches(epoch)
        for b in batches:
            want = torch.tensor(b["slots"], dtype=torch.float32) + 1
            assert torch.equal(b["latents"].float()[:, 0, 0, 0, 0], want)  # the right samples


def test_stream_continues_across_epochs_and_restarts_elsewhere(store):
    loader, sampler = make_dataloader(store, 2, 2, seed=3, rank=0, world=1)
    sampler.set_epoch(0)
    list(loader)
    assert loader._stream.start == (0, 0)  # where the stream was (re)started
    sampler.set_epoch(1)  # where the stream already is: no restart
    first = next(iter(loader))
    assert loader._stream.start == (0, 0) and _keys([first]) == sampler.epoch_batches(1)[:1]
    sampler.set_position(1, 1)  # exactly where the last pass stopped: still no restart
    rest = list(loader)
    assert loader._stream.start == (0, 0) and _keys(rest) == sampler.epoch_batches(1)[1:]
    sampler.set_position(0, 4)  # elsewhere: the stream restarts there
    assert _keys(loader) == sampler.epoch_batches(0)[4:]
    assert loader._stream.start == (0, 4)
    assert _keys(loader) == sampler.epoch_batches(0)  # no set_epoch: the same epoch again
    assert len(loader) == len(sampler) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_read_ends_the_stream_and_a_new_pass_starts_afresh(
    store, workers, tmp_path, monkeypatch
):
    from cogfun.train import data

    loader, sampler = make_dataloader(store, 4, workers, seed=0, rank=0, world=1)
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
    assert loader._live[0] is None
    sampler.set_epoch(0)
    assert _keys(loader) == sampler.epoch_batches(0)


def test_a_process_exits_cleanly_with_its_receiver_thread_running(store):
    """The receiver thread is stopped and joined at exit: no abort inside torch at shutdown
    (without that, a process whose loader was just dropped aborted in about 1 run of 3)."""
    import subprocess
    import sys

    code = (
        "from cogfun.train.data import make_dataloader\n"
        f"loader, sampler = make_dataloader({str(store)!r}, 2, 2, seed=0, rank=0, world=1)\n"
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
