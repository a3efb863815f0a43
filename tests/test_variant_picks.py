"""The loader reads only the mask variants each training step draws (`cogfun.train.picks`): the
same draws and losses as reading every variant, exactly the drawn variants read, fewer bytes, and a
step that refuses a batch whose read variants miss its draw."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from cogfun.common.store import chunks as store_chunks
from cogfun.common.store import open_store
from cogfun.testing.store_files import drop_chunk
from cogfun.train import loop
from cogfun.train import setup as train_setup
from cogfun.train.data import StoreBatchDataset, make_dataloader
from cogfun.train.loop import step_seed, tile_batch
from cogfun.train.loss import prepare_batch
from cogfun.train.picks import VariantPicker
from train_support import K, make_store, metrics, run_in_process, transformer_only_model

TILES = {"f5_h8_w8": 2, "f1_h8_w12": 1}  # one bucket tiled, one not


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    return make_store(root), transformer_only_model(root, tiny_model_dir)


def _picker(accumulation: int = 2, tiles: dict | None = None) -> VariantPicker:
    return VariantPicker(
        seed=42, rank=0, accumulation=accumulation, latent_format="moments", variants=K,
        tiles=TILES if tiles is None else tiles,
    )  # fmt: skip


def _prepare(raw: dict, at: tuple[int, int], tiles: int) -> dict:
    """What the training step at `at` makes of `raw` (loop.train_step's draws, on the CPU)."""
    generator = torch.Generator().manual_seed(step_seed(42, 0, *at))
    embed = lambda c: torch.zeros(c.shape[0], 226, 32)  # noqa: E731 (no text needed)
    return prepare_batch(tile_batch(raw, tiles), embed, "inpaint", 1.0, generator)


def test_the_picks_are_the_steps_draws_one_variant_per_tiled_copy(shared):
    store, _ = shared
    dataset = StoreBatchDataset(store, picker=_picker())
    for bucket, slots in (("f5_h8_w8", [0, 3, 5]), ("f1_h8_w12", [2, 1])):
        for at in ((0, 0), (0, 1), (7, 1)):
            raw = dataset[(bucket, slots, at)]
            read = raw["variants_read"]  # (B, K)
            drawn = _prepare(raw, at, TILES[bucket])["variant"].view(TILES[bucket], len(slots))
            for i in range(len(slots)):
                assert read[i].nonzero().flatten().tolist() == sorted(set(drawn[:, i].tolist()))
            full = dataset[(bucket, slots)]  # no position: every variant
            assert "variants_read" not in full
            for name in ("masks", "masked_latents"):
                got, want = raw[name].view(torch.uint16), full[name].view(torch.uint16)
                assert torch.equal(got[read], want[read]) and not got[~read].any()


def test_a_normal_mode_run_reads_no_variant(shared):
    store, _ = shared
    picker = VariantPicker(seed=1, rank=0, accumulation=1, latent_format="moments", variants=0)
    raw = StoreBatchDataset(store, picker=picker)[("f5_h8_w8", [1, 2], (3, 0))]
    assert not raw["variants_read"].any() and not raw["masked_latents"].view(torch.uint16).any()


def test_a_wrong_pick_stops_the_step(shared):
    store, _ = shared
    reader = open_store(store)
    slots, at = [0, 1, 2, 3], (5, 1)
    picks = _picker(tiles={}).picks("f5_h8_w8", reader.buckets["f5_h8_w8"].latent_shape, 4, at)
    wrong = [[1 - p for p in chosen] for chosen in picks]  # K = 2: the other variant
    raw = reader.read_batch("f5_h8_w8", slots, variants=wrong)
    with pytest.raises(RuntimeError, match="fell out of step with the trainer's draw"):
        _prepare(raw, at, 1)
    _prepare(reader.read_batch("f5_h8_w8", slots, variants=picks), at, 1)  # the right ones pass


def test_the_loaders_hand_each_batch_its_position(shared):
    """follow() counts positions on from the state's step (accumulation 2), across the epoch end,
    with threads, processes and several stores alike; a pass by hand reads every variant."""
    from cogfun.train.state import TrainingState

    store, _ = shared
    ways = [
        ("threads", 2, store),
        ("processes", 1, store),
        ("threads", 0, [(store, 1), (store, 2)]),
    ]
    for backend, workers, stores in ways:
        loader, sampler = make_dataloader(
            stores, 2, workers, 42, 0, 1, backend=backend, picker=_picker(tiles={})
        )
        n = len(sampler)
        state = TrainingState(batches_per_epoch=n, order=sampler.order(), global_step=3)
        state.batches_done = n - 1
        stream = loader.follow(state)
        for k in range(3):  # the epoch's last batch, then two of the next
            raw = next(stream)
            assert (raw["variants_read"].sum(1) == 1).all()  # untiled: one variant a sample
            _prepare(raw, (3 + k // 2, k % 2), 1)  # the guard: the drawn variant was read
        assert state.position == (1, 2)
        sampler.set_epoch(0)
        assert all("variants_read" not in b for b in loader)


def _tiles_one_bucket(monkeypatch):
    real = train_setup.run_tile_factors

    def one_tiled(cfg, stores):
        cfg, _ = real(cfg, stores)
        return cfg, dict(TILES)

    monkeypatch.setattr(train_setup, "run_tile_factors", one_tiled)


def _watch_reads(monkeypatch) -> tuple[list, list]:
    """(per step: the rows' read and drawn variants), (bytes of every chunk read)."""
    steps, counted = [], []
    real_prepare, real_read = loop.prepare_batch, store_chunks.read_chunk_bytes

    def spy(raw, *args, **kw):
        out = real_prepare(raw, *args, **kw)
        if "variants_read" in raw:
            steps.append((list(raw["slots"]), raw["variants_read"].clone(), out["variant"].clone()))
        return out

    def count(path, start=0, length=None):
        data = real_read(path, start, length)
        counted.append(len(data or b""))
        return data

    monkeypatch.setattr(loop, "prepare_batch", spy)
    monkeypatch.setattr(store_chunks, "read_chunk_bytes", count)
    return steps, counted


def _read_exactly_the_draws(steps: list) -> None:
    for slots, read, drawn in steps:
        for slot in set(slots):
            rows = [r for r, s in enumerate(slots) if s == slot]  # its tiled copies
            want = sorted({int(drawn[r]) for r in rows})
            assert all(read[r].nonzero().flatten().tolist() == want for r in rows)


def test_a_run_reading_only_the_picks_trains_as_one_reading_every_variant(
    shared, tmp_path, monkeypatch
):
    """Gradient accumulation 2, one bucket tiled x2, a resume mid-epoch and a run across the
    epoch end: the losses of a run that reads every variant, step for step, and every batch read
    exactly the variants its step drew."""
    store, model = shared
    _tiles_one_bucket(monkeypatch)
    kw = dict(latents=store, model=model, gradient_accumulation_steps=2, checkpointing_steps=2)
    kw.update(auto_tile_batch_size=True)
    steps, counted = _watch_reads(monkeypatch)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=2, **kw)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=4, **kw)  # resumed at step 2
    assert len(steps) == 8  # 4 optimizer steps x 2 micro-steps, every one read by the picker
    counted.clear()
    run_in_process(output_dir=tmp_path / "straight", max_train_steps=4, **kw)
    picked_bytes = sum(counted)
    assert len(steps) == 16
    _read_exactly_the_draws(steps)
    assert any(r.sum() < r.numel() for _, r, _ in steps)  # the untiled bucket: 1 of 2 variants
    with monkeypatch.context() as off:
        off.setattr(train_setup, "VariantPicker", SimpleNamespace(for_run=lambda *a: None))
        counted.clear()
        run_in_process(output_dir=tmp_path / "every", max_train_steps=4, **kw)
    assert len(steps) == 16 and picked_bytes < sum(counted)
    runs = [metrics(tmp_path / name) for name in ("split", "straight", "every")]
    assert [r["step"] for r in runs[0]] == [1, 2, 3, 4] and runs[0][-1]["epoch"] == 1
    for key in ("loss", "grad_norm", "samples"):
        assert [r[key] for r in runs[0]] == [r[key] for r in runs[1]] == [r[key] for r in runs[2]]


def test_a_batch_skip_damaged_empties_restarts_the_picks(shared, tmp_path, monkeypatch):
    """Every sample of a batch damaged: --skip-damaged drops the batch, the next batch trains at
    its position, and the loader reads the variants for that one (reads ahead are read again)."""
    store, model = shared
    _, sampler = make_dataloader(store, 2, 0, 42, 0, 1)
    bucket, slots = next(b for b in sampler.epoch_batches(0)[1:] if len(b[1]) == 2)
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    for slot in slots:
        drop_chunk(damaged, bucket, "latents", slot)
    kw = dict(latents=damaged, model=model, gradient_accumulation_steps=2, max_train_steps=3)
    kw.update(skip_damaged=True, dataloader_num_workers=2)
    steps, _ = _watch_reads(monkeypatch)
    run_in_process(output_dir=tmp_path / "picked", **kw)
    assert len(steps) == 6
    _read_exactly_the_draws(steps)
    with monkeypatch.context() as off:
        off.setattr(train_setup, "VariantPicker", SimpleNamespace(for_run=lambda *a: None))
        run_in_process(output_dir=tmp_path / "every", **kw)
    got, want = metrics(tmp_path / "picked"), metrics(tmp_path / "every")
    assert [(r["loss"], r["samples"]) for r in got] == [(r["loss"], r["samples"]) for r in want]
