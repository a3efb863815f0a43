"""The Zarr store: round trips, resume, fingerprints, digest, several writers (damage:
tests/test_store_damage.py)."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cogfun.common.store import (
    SCHEMA_VERSION,
    BucketPlan,
    FingerprintMismatch,
    RowPlan,
    StoreError,
    StorePlan,
    fingerprint,
    open_for_write,
    open_store,
)
from cogfun.common.store import chunks as store_chunks
from store_support import (
    ATTRS,
    CAPTIONS,
    IMAGE,
    LAYOUT,
    NORMAL,
    SETTINGS,
    VIDEO,
    bf16,
    bits,
    caption,
    make_plan,
    sample,
    shared,
    write_store,
)


def test_round_trip_is_bit_exact_with_every_shape(tmp_path):
    store, plan = tmp_path / "s.zarr", make_plan()
    write_store(store, plan)
    r = open_store(store)
    assert list(r.buckets) == [VIDEO, IMAGE]
    assert r.buckets[VIDEO].slots.tolist() == [0, 1, 2, 3, 4]
    assert (r.buckets[VIDEO].frames, r.buckets[VIDEO].height, r.buckets[VIDEO].width) == (5, 32, 48)
    assert r.buckets[VIDEO].latent_shape == (2, 4, 4, 6)
    assert r.settings == SETTINGS and r.attrs == ATTRS and r.scaling_factor == 0.7
    assert r.layout == LAYOUT and r.fingerprint == fingerprint(SETTINGS)
    for s in range(5):
        got, want = r.read_sample(VIDEO, s), sample(plan, VIDEO, s)
        assert got["latents"].dtype == torch.bfloat16 and got["latents"].shape == (2, 8, 4, 6)
        assert got["masks"].shape == (2, 2, 1, 4, 6) and got["masked_latents"].shape == (
            2,
            2,
            8,
            4,
            6,
        )
        assert got["all_masked"].tolist() == want["all_masked"].tolist()
        assert got["caption"] == s % 3
        assert np.array_equal(bits(got["latents"]), bits(want["latents"]))
        assert np.array_equal(bits(got["masks"]), bits(want["masks"]))
        expect_masked = want["masked_latents"].clone()
        if s == 0:  # the all-masked variant reads back as the bucket's shared latent
            expect_masked[0] = shared(plan, VIDEO)
        assert np.array_equal(bits(got["masked_latents"]), bits(expect_masked))
    batch = r.read_batch(VIDEO, [3, 0, 3])
    assert batch["latents"].shape == (3, 2, 8, 4, 6) and batch["caption"].tolist() == [0, 0, 0]
    assert batch["all_masked"].tolist() == [[False, False], [True, False], [False, False]]
    assert np.array_equal(bits(batch["latents"][0]), bits(sample(plan, VIDEO, 3)["latents"]))
    assert r.provenance(VIDEO, 2) == {"file": "clips/v2.mp4", "frames": [0, 3, 6, 9, 12]}
    # Shapes on disk, from each array's metadata.
    shapes = {
        p.parent.name: json.loads(p.read_text())["shape"]
        for p in (store / "buckets" / VIDEO).glob("*/zarr.json")
    }
    assert shapes["latents"] == [5, 2, 8, 4, 6] and shapes["masks"] == [5, 2, 2, 1, 4, 6]
    assert shapes["masked_latents"] == [5, 2, 2, 8, 4, 6] and shapes["all_masked"] == [5, 2]
    assert shapes["all_masked_latents"] == [2, 8, 4, 6]
    assert shapes["caption"] == shapes["provenance"] == [5]
    assert shapes["checksum"] == [5, 3]  # the sample's checksum, then one per mask variant
    emb = json.loads((store / "captions" / "embeddings" / "zarr.json").read_text())
    # Schema 2: captions sharded 1024 to a file, one inner chunk per caption.
    assert emb["shape"] == [3, 6, 8]
    assert emb["chunk_grid"]["configuration"]["chunk_shape"] == [1024, 6, 8]
    assert emb["codecs"][0]["configuration"]["chunk_shape"] == [1, 6, 8]
    root = json.loads((store / "zarr.json").read_text())["attributes"]
    assert root["status"] == "complete" and root["schema_version"] == SCHEMA_VERSION
    assert root["counts"] == {VIDEO: 5, IMAGE: 2}


def test_captions_are_stored_once_and_the_empty_caption_first(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    r = open_store(store)
    assert r.caption_texts() == CAPTIONS
    for i in range(3):
        assert np.array_equal(bits(r.caption_embedding(i)), bits(caption(i)))
    assert [r.read_sample(VIDEO, s)["caption"] for s in (1, 4)] == [1, 1]  # two rows, one embedding
    bad = StorePlan(make_plan().buckets, ["a cat", ""])
    with pytest.raises(StoreError, match="empty caption"):
        open_for_write(
            tmp_path / "x", settings=SETTINGS, attrs={}, plan=bad, layout=LAYOUT, create=True
        )
    dup = StorePlan(make_plan().buckets, ["", "a cat", "a cat"])
    with pytest.raises(StoreError, match="distinct"):
        open_for_write(
            tmp_path / "y", settings=SETTINGS, attrs={}, plan=dup, layout=LAYOUT, create=True
        )


def test_normal_mode_store_holds_no_masks(tmp_path):
    store, plan = tmp_path / "n.zarr", make_plan(3)
    w = write_store(store, plan, layout=NORMAL)
    with pytest.raises(StoreError, match="normal-mode"):
        w.write_sample(VIDEO, 0, **sample(plan, VIDEO, 0, LAYOUT))
    got = open_store(store).read_sample(VIDEO, 1)
    assert got["masks"] is None and got["masked_latents"] is None and got["all_masked"] is None
    assert got["latents"].shape == (2, 2, 4, 6)
    assert np.array_equal(bits(got["latents"]), bits(sample(plan, VIDEO, 1, NORMAL)["latents"]))


def test_write_checks_shapes_and_all_masked_order(tmp_path):
    plan = make_plan()
    w = open_for_write(
        tmp_path / "s", settings=SETTINGS, attrs={}, plan=plan, layout=LAYOUT, create=True
    )
    good = sample(plan, VIDEO, 1)
    with pytest.raises(
        StoreError, match=r"latents of sample f2_h4_w6/1: expected shape \(2, 8, 4, 6\)"
    ):
        w.write_sample(VIDEO, 1, **{**good, "latents": good["latents"][:, :4]})
    with pytest.raises(StoreError, match="slot 9 is outside bucket f2_h4_w6"):
        w.write_sample(VIDEO, 9, **good)
    with pytest.raises(StoreError, match="write_all_masked"):
        w.write_sample(VIDEO, 0, **sample(plan, VIDEO, 0))
    assert not w.done_slots(VIDEO).any()


def test_done_slots_resume_and_finalize(tmp_path):
    store, plan = tmp_path / "s.zarr", make_plan()
    w = open_for_write(store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True)
    w.write_all_masked(VIDEO, shared(plan, VIDEO))
    for s in (0, 3):
        w.write_sample(VIDEO, s, **sample(plan, VIDEO, s))
    assert w.done_slots(VIDEO).tolist() == [True, False, False, True, False]
    with pytest.raises(StoreError, match="still running or was interrupted"):
        open_store(store)
    partial = open_store(store, allow_incomplete=True)
    assert partial.status == "writing" and partial.buckets[VIDEO].slots.tolist() == [0, 3]
    # Reopen (a rerun): same settings resume; what was done stays done.
    w2 = open_for_write(
        store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True
    )
    assert w2.done_slots(VIDEO).tolist() == [True, False, False, True, False]
    assert w2.has_all_masked(VIDEO) and not w2.caption_done(0)
    for s in np.flatnonzero(~w2.done_slots(VIDEO)):
        w2.write_sample(VIDEO, int(s), **sample(plan, VIDEO, int(s)))
    with pytest.raises(StoreError, match="caption embeddings never written"):
        w2.finalize()
    for i in range(3):
        w2.write_caption(i, caption(i))
    w2.finalize()
    r = open_store(store)
    assert (
        r.buckets[VIDEO].slots.tolist() == [0, 1, 2, 3, 4] and r.buckets[IMAGE].slots.tolist() == []
    )
    write_store(
        tmp_path / "ref.zarr", plan, order=lambda slots: [x for x in slots if x[0] == VIDEO]
    )
    assert r.digest() == open_store(tmp_path / "ref.zarr").digest()
    # Reopening a complete store for writing marks it unfinished until the next finalize.
    open_for_write(store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(store)


def test_a_rewrite_that_dies_half_way_reads_as_not_done(tmp_path, monkeypatch):
    store, plan = tmp_path / "s.zarr", make_plan()
    write_store(store, plan, finalize=False)
    w = open_for_write(store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True)

    class Killed(Exception):
        pass

    real = store_chunks.put

    def dies_writing_latents(path, data):  # the process dies mid-rewrite, done flag cleared
        if "/latents/" in str(path):
            raise Killed
        real(path, data)

    monkeypatch.setattr(store_chunks, "put", dies_writing_latents)
    with pytest.raises(Killed):
        w.write_sample(VIDEO, 2, **sample(plan, VIDEO, 2))
    monkeypatch.setattr(store_chunks, "put", real)
    assert w.done_slots(VIDEO).tolist() == [True, True, False, True, True]
    assert open_store(store, allow_incomplete=True).verify() == []  # not done is not damage
    w.write_sample(VIDEO, 2, **sample(plan, VIDEO, 2))  # the rerun redoes it
    w.finalize()
    write_store(tmp_path / "ref.zarr", plan)
    assert open_store(store).digest() == open_store(tmp_path / "ref.zarr").digest()


def test_different_fingerprint_is_refused_naming_each_key(tmp_path):
    store, plan = tmp_path / "s.zarr", make_plan()
    write_store(store, plan)
    other = {**SETTINGS, "seed": 43, "vae": {"dtype": "fp32", "sha": "abc"}, "tiling": True}
    with pytest.raises(FingerprintMismatch) as exc:
        open_for_write(store, settings=other, attrs=ATTRS, plan=plan, layout=LAYOUT, create=False)
    assert exc.value.diff == {
        "seed": (42, 43),
        "vae.dtype": ("bf16", "fp32"),
        "tiling": (None, True),
    }
    message = str(exc.value)
    assert "seed: 42 -> 43" in message and 'vae.dtype: "bf16" -> "fp32"' in message
    assert "tiling: (absent) -> true" in message and str(store) in message
    with pytest.raises(FingerprintMismatch, match="plan"):
        open_for_write(
            store, settings=SETTINGS, attrs=ATTRS, plan=make_plan(4), layout=LAYOUT, create=False
        )
    with pytest.raises(StoreError, match="no store at"):
        open_for_write(
            tmp_path / "none", settings=SETTINGS, attrs={}, plan=plan, layout=LAYOUT, create=False
        )


def test_digest_ignores_order_and_compression_but_not_contents(tmp_path):
    plan = make_plan()
    write_store(tmp_path / "a", plan)
    write_store(
        tmp_path / "b",
        plan,
        order=lambda slots: slots[::-1],
        compression={"cname": "lz4", "clevel": 1, "shuffle": "noshuffle"},
    )
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    assert a.digest() == b.digest()
    assert a.summary()["bytes"] != b.summary()["bytes"]  # the compression really differs
    w = open_for_write(
        tmp_path / "b", settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True
    )
    changed = sample(plan, VIDEO, 2)
    changed["latents"].view(torch.uint16)[0, 0, 0, 0] ^= 1  # one bit of one value
    w.write_sample(VIDEO, 2, **changed)
    w.finalize()
    assert open_store(tmp_path / "b").digest() != a.digest()


def test_failures_are_recorded_once_per_key(tmp_path):
    store = tmp_path / "s.zarr"
    w = write_store(store)
    w.record_failure("row 7", "clips/bad.mp4", "truncated file", 7)
    w.record_failure("row 7", "clips/bad.mp4", "truncated file", 7)
    w.record_failure("meta row 2", "metadata.json", "missing file_path", 2)
    w.record_failure("row 9", "x.mp4", "gone", None)
    expected = [
        {"key": "meta row 2", "file": "metadata.json", "reason": "missing file_path", "row": 2},
        {"key": "row 7", "file": "clips/bad.mp4", "reason": "truncated file", "row": 7},
        {"key": "row 9", "file": "x.mp4", "reason": "gone", "row": None},
    ]
    assert open_store(store).failures() == expected
    w.clear_failure("row 9")
    assert [f["key"] for f in open_store(store).failures()] == ["meta row 2", "row 7"]
    assert open_store(store).verify() == []  # recorded failures are not damage


def test_reader_pickles_by_reopening(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    copy = pickle.loads(pickle.dumps(open_store(store)))
    assert copy.buckets[VIDEO].slots.tolist() == [0, 1, 2, 3, 4]
    assert copy.read_sample(VIDEO, 1)["caption"] == 1


def _bulk_store(path: Path, n: int) -> None:
    rows = [RowPlan(0, {"file": f"{i}.png"}) for i in range(n)]
    plan = StorePlan([BucketPlan("f1_h2_w2", 1, 16, 16, 1, 2, 2, rows)], [""])
    w = open_for_write(path, settings={}, attrs={}, plan=plan, layout=NORMAL, create=True)
    w.write_caption(0, torch.zeros(3, 4))
    assert not w.done_slots("f1_h2_w2").any()  # also spares the writes clearing done flags
    w.write_samples("f1_h2_w2", np.arange(n), bf16((n, 1, 2, 2, 2), n))
    w.finalize()


def test_open_reads_no_sample_chunks(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    _bulk_store(tmp_path / "small", 200)
    _bulk_store(tmp_path / "big", 2000)
    keys: list[str] = []
    real_get = LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    reads = []
    for name in ("small", "big"):
        keys.clear()
        r = open_store(tmp_path / name)
        reads.append(sorted(keys))
        assert len(r.buckets["f1_h2_w2"].slots) == (200 if name == "small" else 2000)
    assert reads[0] == reads[1]  # the same handful of files whatever the sample count
    assert [k for k in reads[1] if "/c." in k] == ["buckets/f1_h2_w2/done/c.0"]


def _write_half(path: str, parity: int) -> None:
    """Child process: write every slot of the given parity (numpy bits only: no torch threads)."""
    plan = make_plan(12)
    w = open_for_write(path, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=False)
    for b in plan.buckets:
        for s in range(parity, len(b.rows), 2):
            w.write_sample(
                b.name,
                s,
                **{
                    k: v.numpy() if k == "all_masked" else bits(v)
                    for k, v in sample(plan, b.name, s).items()
                },
            )


@pytest.mark.slow
def test_two_processes_writing_disjoint_slots_lose_nothing(tmp_path):
    plan = make_plan(12)
    store = tmp_path / "two.zarr"
    w = open_for_write(store, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=LAYOUT, create=True)
    for i in range(3):
        w.write_caption(i, caption(i))
    for b in plan.buckets:
        w.write_all_masked(b.name, shared(plan, b.name))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_half, args=(str(store), parity)) for parity in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(w.done_slots(b.name).all() for b in plan.buckets)
    w.finalize()
    write_store(tmp_path / "one.zarr", plan)
    two = open_store(store)
    assert two.verify() == [] and sum(len(b.slots) for b in two.buckets.values()) == 14
    assert two.digest() == open_store(tmp_path / "one.zarr").digest()
