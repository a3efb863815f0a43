"""A store grown to a new plan (an incremental update): stored rows keep their slots and bytes,
new rows and buckets are added, rows the dataset lost are retired (not served), and the grown
store holds the same samples as a fresh store of the final rows (same digest)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cogfun.common.store import (
    BucketPlan,
    RowPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    open_for_write,
    open_store,
)
from cogfun.common.store.grow import read_plan

LAYOUT = StoreLayout(4, "moments", 2, 3, 4)
SETTINGS = {"seed": 1}
A, B = "f2_h4_w4", "f1_h2_w2"


def _row(key: str, caption: int) -> RowPlan:
    return RowPlan(caption, {"file": f"{key}.mp4"}, key)


def _bucket(name: str, rows: list[RowPlan]) -> BucketPlan:
    f, h = (2, 4) if name == A else (1, 2)
    return BucketPlan(name, 4 * f - 3, 8 * h, 8 * h, f, h, h, rows)


def _sample(bucket: str, key: str) -> dict:
    """A sample's contents: a function of its key alone (as encoding is of the row)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    f, h = (2, 4) if bucket == A else (1, 2)
    return {
        "latents": torch.randn(f, 8, h, h, generator=g).bfloat16(),
        "masks": (torch.rand(2, f, 1, h, h, generator=g) > 0.5).bfloat16(),
        "masked_latents": torch.randn(2, f, 8, h, h, generator=g).bfloat16(),
        "all_masked": torch.tensor([False, False]),
    }


def _fill(path: Path, plan: StorePlan, slots: dict[str, list[int]] | None = None) -> None:
    """Open (create or grow) the store for `plan` and write the given slots (default: all live
    rows not yet done), then finalize."""
    w = open_for_write(
        path, settings=SETTINGS, attrs={}, plan=plan, layout=LAYOUT, create=True, shard_samples=2
    )
    for i, text in enumerate(plan.captions):
        if not w.caption_done(i):
            w.write_caption(
                i, torch.randn(3, 4, generator=torch.Generator().manual_seed(len(text)))
            )
    for b in plan.buckets:
        done = w.done_slots(b.name)
        todo = (
            slots[b.name] if slots else [s for s, r in enumerate(b.rows) if r.live and not done[s]]
        )
        for s in todo:
            w.write_sample(b.name, s, **_sample(b.name, b.rows[s].key))
    w.finalize()


SAMPLE_ARRAYS = ("latents", "masks", "masked_latents", "all_masked", "checksum")


def _shards(path: Path) -> dict[str, bytes]:
    """Every shard file of the buckets' per-sample arrays."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted((path / "buckets").rglob("c.*"))
        if p.parent.name in SAMPLE_ARRAYS
    }


def test_growing_a_store_keeps_rows_adds_new_ones_and_retires_the_gone(tmp_path):
    captions = ["", "a cat", "a dog"]
    first = StorePlan(
        [_bucket(A, [_row("a0", 1), _row("a1", 2), _row("a2", 1), _row("a3", 2)])], captions
    )
    store = tmp_path / "s.zarr"
    _fill(store, first)
    before = _shards(store)
    # The dataset now: a1 gone, a4 new in A, b0 new in a new bucket with a new caption.
    kept = read_plan(store)
    assert [r.key for r in kept.buckets[0].rows] == ["a0", "a1", "a2", "a3"]
    rows = [
        r if r.key != "a1" else RowPlan(r.caption, r.provenance, r.key, False)
        for r in kept.buckets[0].rows
    ]
    grown = StorePlan(
        [_bucket(A, [*rows, _row("a4", 1)]), _bucket(B, [_row("b0", 3)])],
        [*kept.captions, "a bird"],
    )
    _fill(store, grown)
    r = open_store(store)
    assert r.root_attrs["last_update"] == {"added": 2, "reused": 3, "retired": 1, "restored": 0}
    assert r.buckets[A].slots.tolist() == [0, 2, 3, 4] and r.buckets[B].slots.tolist() == [0]
    assert r.buckets[A].planned == 5
    with pytest.raises(StoreError, match="not in the store"):
        r.read_sample(A, 1)  # retired: its bytes stay, it is not served
    # Bucket A's shards 0 (slots 0-1) and 1 (slots 2-3) are the same files, byte for byte
    # (a retired row's bytes stay); shard 2 (slot 4) is new.
    after = _shards(store)
    assert {k: after[k] for k in before} == before
    assert any(k.startswith(f"buckets/{A}/latents/c.2.") for k in after)
    # A fresh store of the final rows: other slots, the same samples.
    fresh_plan = StorePlan(
        [
            _bucket(A, [_row("a0", 1), _row("a2", 1), _row("a3", 2), _row("a4", 1)]),
            _bucket(B, [_row("b0", 3)]),
        ],
        ["", "a cat", "a dog", "a bird"],
    )
    _fill(tmp_path / "fresh.zarr", fresh_plan)
    assert open_store(tmp_path / "fresh.zarr").digest() == r.digest()
    assert r.verify() == []
    # The retired row comes back: its old slot serves again, nothing is encoded for it.
    back = read_plan(store)
    rows = [RowPlan(x.caption, x.provenance, x.key, True) for x in back.buckets[0].rows]
    again = StorePlan([_bucket(A, rows), back.buckets[1]], back.captions)
    _fill(store, again, slots={A: [], B: []})
    r = open_store(store)
    assert r.root_attrs["last_update"]["restored"] == 1 and r.buckets[A].slots.tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_a_plan_that_moves_a_stored_row_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    _fill(store, StorePlan([_bucket(A, [_row("a0", 1), _row("a1", 1)])], ["", "x"]))
    swapped = StorePlan([_bucket(A, [_row("a1", 1), _row("a0", 1)])], ["", "x"])
    with pytest.raises(StoreError, match=r"row 0 \(a0\) is not the plan's row a1"):
        open_for_write(store, settings=SETTINGS, attrs={}, plan=swapped, layout=LAYOUT, create=True)
    with pytest.raises(StoreError, match="captions in place"):
        open_for_write(
            store,
            settings=SETTINGS,
            attrs={},
            plan=StorePlan([_bucket(A, [_row("a0", 1), _row("a1", 1)])], ["", "y"]),
            layout=LAYOUT,
            create=True,
        )
    assert np.array_equal(open_store(store).buckets[A].slots, [0, 1])
