"""The training data path: BucketBatchSampler properties, and the DataLoader over a real small store."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter

import numpy as np
import pytest
from cogfun.train.data import BucketBatchSampler, StoreBatchDataset, make_dataloader

UNEVEN = {
    "f13_h8_w8": np.arange(7),  # 3 batches of 3 (3, 3, 1)
    "f1_h16_w16": np.array([2, 5, 9, 11]),  # 2 batches (3, 1), slots not contiguous
    "f3_h8_w12": np.array([0]),  # 1 batch of 1
}  # 6 batches in all


def _all_ranks(bucket_slots, batch_size, world, epoch=0, seed=3):
    samplers = [BucketBatchSampler(bucket_slots, batch_size, seed, world, r) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


def test_batches_never_mix_buckets_and_cover_every_slot():
    sampler = BucketBatchSampler(UNEVEN, batch_size=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    seen = Counter()
    for name, slots in batches:
        assert name in UNEVEN
        assert set(slots) <= set(UNEVEN[name].tolist())  # all from the batch's own bucket
        assert 1 <= len(slots) <= 3
        seen.update((name, s) for s in slots)
    expected = {(n, int(s)) for n, sl in UNEVEN.items() for s in sl}
    assert set(seen) == expected and all(c == 1 for c in seen.values())
    # Partial batches are kept: sizes per bucket are exactly ceil-chunks of the bucket.
    sizes = sorted((n, len(s)) for n, s in batches)
    assert sizes == sorted(
        [("f13_h8_w8", 3), ("f13_h8_w8", 3), ("f13_h8_w8", 1)]
        + [("f1_h16_w16", 3), ("f1_h16_w16", 1), ("f3_h8_w12", 1)]
    )


def test_same_seed_same_order_and_reshuffle_per_epoch():
    a = BucketBatchSampler(UNEVEN, 2, seed=7)
    b = BucketBatchSampler(
        {k: UNEVEN[k] for k in reversed(UNEVEN)}, 2, seed=7
    )  # dict order irrelevant
    assert a.epoch_batches(0) == b.epoch_batches(0)
    a.set_epoch(4)
    assert list(a) == b.epoch_batches(4)
    big = {"x": np.arange(40), "y": np.arange(40)}
    s = BucketBatchSampler(big, 4, seed=7)
    assert s.epoch_batches(0) != s.epoch_batches(1)  # order and contents reshuffled
    assert [set(x) for _, x in s.epoch_batches(0)] != [set(x) for _, x in s.epoch_batches(1)]
    assert BucketBatchSampler(big, 4, seed=8).epoch_batches(0) != s.epoch_batches(0)
    # seed + epoch is the stream, as in the original.
    assert BucketBatchSampler(big, 4, seed=8).epoch_batches(0) == s.epoch_batches(1)


@pytest.mark.parametrize(
    ("bucket_slots", "batch_size", "world"),
    [
        (UNEVEN, 3, 2),  # 6 batches over 2
        (UNEVEN, 3, 4),  # 6 over 4 -> pad 2
        (UNEVEN, 2, 3),  # 4 + 2 + 1 = 7 over 3 -> pad 2
        ({"a": np.arange(5)}, 2, 2),  # 3 batches over 2 -> pad 1
        ({"a": np.arange(5)}, 2, 3),  # 3 over 3
        ({"a": np.arange(1)}, 4, 3),  # 1 batch over 3 ranks -> every rank gets it
        ({"a": np.arange(10), "b": np.arange(3)}, 4, 2),  # 3 + 1 over 2
    ],
)
def test_every_rank_gets_the_same_number_of_disjoint_batches(bucket_slots, batch_size, world):
    n_global = sum(math.ceil(len(s) / batch_size) for s in bucket_slots.values())
    for epoch in (0, 1):
        samplers, per_rank = _all_ranks(bucket_slots, batch_size, world, epoch)
        counts = {len(b) for b in per_rank}
        assert counts == {math.ceil(n_global / world)} == {len(s) for s in samplers}
        # The ranks' batches interleave back into the global list; the first n_global are distinct,
        # the rest are repeats of the head (padding).
        merged = [per_rank[i % world][i // world] for i in range(world * len(per_rank[0]))]
        assert merged == samplers[0].global_batches(epoch)
        unique = merged[:n_global]
        pairs = [(n, s) for n, slots in unique for s in slots]
        assert len(pairs) == len(set(pairs)) == sum(len(s) for s in bucket_slots.values())
        assert merged[n_global:] == [unique[i % n_global] for i in range(len(merged) - n_global)]


def test_disjoint_across_ranks_without_padding():
    slots = {"a": np.arange(12), "b": np.arange(100, 108)}
    _, per_rank = _all_ranks(slots, 2, 2)  # 6 + 4 = 10 batches, even
    r0 = {(n, s) for n, sl in per_rank[0] for s in sl}
    r1 = {(n, s) for n, sl in per_rank[1] for s in sl}
    assert not r0 & r1 and len(r0 | r1) == 20


def test_set_position_skips_to_the_tail_and_then_runs_whole_epochs():
    s = BucketBatchSampler(UNEVEN, 2, seed=1, num_replicas=2, rank=1)
    full = s.epoch_batches(3)
    for k in range(len(full) + 1):
        s.set_position(3, k)
        assert s.epoch == 3
        assert list(s) == full[k:]
        assert list(s) == full  # the skip applies to one pass only
    with pytest.raises(ValueError, match="batches_done 5 is outside 0..4"):
        s.set_position(0, 5)


def test_state_is_plain_json_and_resumes_exactly():
    s = BucketBatchSampler(UNEVEN, 2, seed=11, num_replicas=2, rank=0)
    s.set_epoch(2)
    state = json.loads(json.dumps(s.state_dict(batches_done=3)))
    assert state == {
        "epoch": 2,
        "batches_done": 3,
        "seed": 11,
        "batch_size": 2,
        "num_replicas": 2,
        "num_samples": 12,
    }
    resumed = BucketBatchSampler(UNEVEN, 2, seed=11, num_replicas=2, rank=0)
    resumed.load_state_dict(state)
    assert list(resumed) == s.epoch_batches(2)[3:]
    other = BucketBatchSampler(UNEVEN, 2, seed=11, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="num_replicas: saved 2, now 3"):
        other.load_state_dict(state)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="no samples"):
        BucketBatchSampler({"a": np.array([], dtype=np.int64)}, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(UNEVEN, 0, 0)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        BucketBatchSampler(UNEVEN, 2, 0, num_replicas=2, rank=2)


# ---- the DataLoader over a real store ----

K = 2  # mask variants per sample
C = 4  # latent channels (moments: 2C stored)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A finalized inpaint store of random bf16 tensors (no VAE): 7 + 4 samples in 2 buckets, some
    all-masked variants. Returns (path, expected) with expected[(bucket, slot)] the written tensors."""
    import torch
    from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write

    plan = StorePlan(
        buckets=[
            BucketPlan(
                "f5_h16_w16",
                17,
                128,
                128,
                5,
                16,
                16,
                [RowPlan(1 + i % 2, {"file": f"v{i}.mp4"}) for i in range(7)],
            ),
            BucketPlan(
                "f1_h8_w8",
                1,
                64,
                64,
                1,
                8,
                8,
                [RowPlan(i % 3, {"file": f"i{i}.png"}) for i in range(4)],
            ),
        ],
        captions=["", "a cat", "a dog"],
    )
    layout = StoreLayout(C, "moments", K, text_len=6, text_dim=8)
    path = tmp_path_factory.mktemp("store") / "latents.zarr"
    w = open_for_write(
        path,
        settings={"test": 1},
        attrs={"scaling_factor": 1.15},
        plan=plan,
        layout=layout,
        create=True,
    )
    gen = torch.Generator().manual_seed(0)
    embeds = [torch.randn(6, 8, generator=gen).bfloat16() for _ in plan.captions]
    for i, embed in enumerate(embeds):
        w.write_caption(i, embed)
    expected = {}
    for b in plan.buckets:
        n, lat = len(b.rows), (b.latent_frames, 2 * C, b.latent_h, b.latent_w)
        shared = torch.randn(*lat, generator=gen).bfloat16()
        w.write_all_masked(b.name, shared)
        latents = torch.randn(n, *lat, generator=gen).bfloat16()
        masks = (
            torch.rand(n, K, b.latent_frames, 1, b.latent_h, b.latent_w, generator=gen) > 0.5
        ).bfloat16()
        masked = torch.randn(n, K, *lat, generator=gen).bfloat16()
        flags = torch.zeros(n, K, dtype=torch.bool)
        flags[1, 0] = flags[2, 1] = True
        w.write_samples(b.name, list(range(n)), latents, masks, masked, flags)
        for s in range(n):
            variants = torch.where(flags[s][:, None, None, None, None], shared, masked[s])
            expected[(b.name, s)] = {
                "latents": latents[s],
                "masks": masks[s],
                "masked_latents": variants,  # the reader substitutes the bucket's shared latent
                "all_masked": flags[s],
                "caption": b.rows[s].caption,
                "caption_embed": embeds[b.rows[s].caption],
            }
    w.finalize()
    return path, expected


def _check_batch(batch, expected):
    import torch

    bucket, slots = batch["bucket"], batch["slots"]
    assert (
        batch["latents"].dtype == torch.bfloat16 and batch["masked_latents"].dtype == torch.bfloat16
    )
    assert batch["latents"].shape[0] == len(slots) == batch["caption"].shape[0]
    for i, s in enumerate(slots):
        want = expected[(bucket, s)]
        for key in ("latents", "masks", "masked_latents", "all_masked"):
            assert torch.equal(batch[key][i], want[key]), (bucket, s, key)  # bit-exact
        assert int(batch["caption"][i]) == want["caption"]
        assert torch.equal(batch["caption_embeds"][i], want["caption_embed"])  # read by the loader
    assert batch["caption_embeds"].shape == (len(slots), 6, 8)


BACKEND_WORKERS = [("threads", 0), ("threads", 2), ("processes", 0), ("processes", 2)]


@pytest.mark.parametrize(("backend", "num_workers"), BACKEND_WORKERS)
def test_dataloader_returns_every_sample_bit_exact(small_store, backend, num_workers):
    path, expected = small_store
    loader, sampler = make_dataloader(
        path, batch_size=3, num_workers=num_workers, seed=5, rank=0, world=1, backend=backend
    )
    assert len(loader) == len(sampler) == 3 + 2  # ceil(7/3) + ceil(4/3)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert [(b["bucket"], b["slots"]) for b in batches] == sampler.epoch_batches(epoch)
        for batch in batches:
            _check_batch(batch, expected)
        seen.append(sorted((b["bucket"], s) for b in batches for s in b["slots"]))
    assert seen[0] == seen[1] == sorted(expected)
    shapes = {
        b: tuple(next(x for x in batches if x["bucket"] == b)["masks"].shape[1:])
        for b in ("f5_h16_w16", "f1_h8_w8")
    }
    assert shapes == {"f5_h16_w16": (K, 5, 1, 16, 16), "f1_h8_w8": (K, 1, 1, 8, 8)}


def test_two_ranks_read_disjoint_halves(small_store):
    path, expected = small_store
    per_rank = []
    for rank in (0, 1):
        loader, sampler = make_dataloader(
            path, batch_size=2, num_workers=0, seed=1, rank=rank, world=2
        )
        per_rank.append([(b["bucket"], tuple(b["slots"])) for b in loader])
    # ceil(7/2) + ceil(4/2) = 6 batches: 3 each, no padding, so the ranks' samples are disjoint.
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    samples = [{(n, s) for n, sl in r for s in sl} for r in per_rank]
    assert not samples[0] & samples[1] and samples[0] | samples[1] == set(expected)


def test_dataset_never_carries_an_open_store(small_store):
    path, _ = small_store
    ds = StoreBatchDataset(path)
    fresh = pickle.dumps(ds)  # what a spawned worker receives
    assert b"StoreReader" not in fresh
    ds[("f1_h8_w8", [0])]
    assert ds.reader() is ds.reader()  # opened once in this process and kept
    assert pickle.dumps(ds) == fresh  # still only the path and options, no open store


def _damage(store_path, bucket, slot, tmp_path):
    """A copy of the store with one sample's latents chunk dropped from its shard (zarr then
    reads fill zeros)."""
    import shutil

    from cogfun.testing.store_files import drop_chunk

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(store_path, copy)
    drop_chunk(copy, bucket, "latents", slot)
    return copy


@pytest.mark.parametrize(("backend", "num_workers"), BACKEND_WORKERS)
def test_damaged_sample_stops_with_its_name(small_store, tmp_path, backend, num_workers):
    path, _ = small_store
    damaged = _damage(path, "f5_h16_w16", 4, tmp_path)
    loader, _ = make_dataloader(
        damaged, batch_size=7, num_workers=num_workers, seed=0, rank=0, world=1, backend=backend
    )
    # In a worker, torch re-raises the worker's exception as a RuntimeError carrying its message.
    with pytest.raises(Exception, match=r"damaged sample f5_h16_w16/4\b"):
        list(loader)


def test_skip_damaged_drops_only_that_sample(small_store, tmp_path, caplog):
    path, expected = small_store
    damaged = _damage(path, "f5_h16_w16", 4, tmp_path)
    loader, _ = make_dataloader(
        damaged, batch_size=7, num_workers=0, seed=0, rank=0, world=1, skip_damaged=True
    )
    with caplog.at_level("WARNING", logger="cogfun.train.data"):
        batches = {b["bucket"]: b for b in loader}
    assert sorted(batches["f5_h16_w16"]["slots"]) == [0, 1, 2, 3, 5, 6]
    assert batches["f5_h16_w16"]["latents"].shape == (6, 5, 2 * C, 16, 16)
    assert sorted(batches["f1_h8_w8"]["slots"]) == [0, 1, 2, 3]
    for batch in batches.values():
        _check_batch(batch, expected)
    assert "f5_h16_w16/4" in caplog.text
    # A batch whose every sample is damaged comes out empty (B = 0), with the bucket's shapes.
    ds = StoreBatchDataset(damaged, skip_damaged=True)
    empty = ds[("f5_h16_w16", [4])]
    assert empty["slots"] == [] and empty["latents"].shape == (0, 5, 2 * C, 16, 16)


@pytest.mark.parametrize(("backend", "num_workers"), BACKEND_WORKERS)
def test_loader_leaves_the_global_rng_alone(small_store, backend, num_workers):
    import torch

    path, _ = small_store
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loader, _ = make_dataloader(
        path, batch_size=2, num_workers=num_workers, seed=0, rank=0, world=1, backend=backend
    )
    assert sum(len(b["slots"]) for b in loader) == 11
    assert torch.equal(torch.rand(3), expected)
