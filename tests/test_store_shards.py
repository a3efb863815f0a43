"""The store's shard files (schema 2) against plain zarr: what cogfun seals zarr reads, what zarr
writes cogfun reads; staging order, damage, done flags, and schema-1 stores read as they are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cogfun.common.store import (
    BucketPlan,
    DamagedSample,
    RowPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    open_for_write,
    open_store,
)
from cogfun.common.store import chunks as store_chunks
from cogfun.common.store.chunks import chunk_files
from cogfun.common.store.shards import shard_files
from cogfun.testing.store_files import chunk_range, drop_chunk, flip_byte, schema1_copy

BUCKET = "f5_h16_w16"
K = 2


def _plan(n: int) -> StorePlan:
    rows = [RowPlan(1 + i % 2, {"file": f"clip{i}.mp4"}) for i in range(n)]
    return StorePlan([BucketPlan(BUCKET, 5, 16, 16, 2, 2, 2, rows)], ["", "a cat", "a dog"])


def _arrays(n: int) -> tuple[torch.Tensor, ...]:
    """Sample tensors with an all-zero latent, an all-zero mask and all-masked variants: the
    cases where zarr writes no file or shares one latent."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(n, 2, 8, 2, 2, generator=g).bfloat16()  # (B, F_lat, 2C, h, w)
    lat[3] = 0
    masks = (torch.rand(n, K, 2, 1, 2, 2, generator=g) > 0.5).bfloat16()  # (B, K, F_lat, 1, h, w)
    masks[5] = 0
    masked = torch.randn(n, K, 2, 8, 2, 2, generator=g).bfloat16()
    flags = torch.zeros(n, K, dtype=torch.bool)
    flags[::3, 0] = True
    return lat, masks, masked, flags


def _open(path: Path, n: int, shard_samples: int = 5):
    """The writer of a store of n samples (created, or resumed)."""
    return open_for_write(
        path,
        settings={"s": 1},
        attrs={},
        plan=_plan(n),
        layout=StoreLayout(4, "moments", K, 3, 4),
        create=True,
        shard_samples=shard_samples,
    )


def _started(path: Path, n: int, shard_samples: int = 5):
    """`_open`'s writer with the captions and the all-masked latents written."""
    w = _open(path, n, shard_samples)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        w.write_caption(i, torch.randn(3, 4, generator=g))
    w.write_all_masked(BUCKET, torch.randn(2, 8, 2, 2, generator=g))
    return w


def _write(path: Path, n: int, bulk: bool, shard_samples: int = 5, order=None) -> None:
    w = _started(path, n, shard_samples)
    lat, masks, masked, flags = _arrays(n)
    if bulk:
        w.write_samples(BUCKET, range(n), lat, masks, masked, flags)
    else:
        for i in order or range(n):
            w.write_sample(BUCKET, i, lat[i], masks[i], masked[i], flags[i])
    w.finalize()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("c.*"))}


def _group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path / "buckets" / BUCKET), mode="r")


def test_sealed_shards_are_what_plain_zarr_reads(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    r, group = open_store(tmp_path / "s.zarr"), _group(tmp_path / "s.zarr")
    slots = np.asarray([7, 3, 11, 0, 5])
    direct = r.read_rows(BUCKET, slots)
    for name in ("latents", "masks", "all_masked"):
        via_zarr = np.asarray(group[name].get_orthogonal_selection((slots,)))
        assert direct[name].dtype == via_zarr.dtype
        np.testing.assert_array_equal(direct[name], via_zarr)
    lat, masks, masked, flags = _arrays(12)
    # All-masked variants are stored as zeros (the reader substitutes the shared latent).
    kept = np.where(
        flags.numpy()[..., None, None, None, None], 0, masked.view(torch.uint16).numpy()
    )
    np.testing.assert_array_equal(np.asarray(group["masked_latents"][:]), kept)
    np.testing.assert_array_equal(np.asarray(group["latents"][:]), lat.view(torch.uint16).numpy())
    # 12 samples, 5 a shard: 3 files per array, whatever the sample count.
    assert sorted(
        p.name for p in (tmp_path / "s.zarr/buckets" / BUCKET / "latents").glob("c.*")
    ) == [
        "c.0.0.0.0.0",
        "c.1.0.0.0.0",
        "c.2.0.0.0.0",
    ]
    # An all-zero chunk is left out of its shard (zarr's empty chunk) and reads as zeros.
    _, offset, _ = _range_or_empty(tmp_path / "s.zarr", "latents", 3)
    assert offset is None and r.read_batch(BUCKET, [3])["latents"].abs().sum() == 0
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    assert not [p for p in (tmp_path / "s.zarr").rglob(".staged/*")]  # every staged file sealed


def _range_or_empty(store: Path, array: str, row: int):
    try:
        return chunk_range(store, BUCKET, array, row)
    except AssertionError:
        return None, None, None


def test_shards_zarr_writes_are_read_by_the_store_path(tmp_path):
    """A sharded array written by zarr itself (same codecs) reads the same through ShardFiles,
    whole rows and single mask variants."""
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    blosc = [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    kw = dict(dtype="uint16", fill_value=0, compressors=blosc)
    kw["chunk_key_encoding"] = {"name": "default", "separator": "."}
    rows = group.create_array("rows", shape=(10, 3, 4), chunks=(1, 3, 4), shards=(4, 3, 4), **kw)
    parts = group.create_array(
        "parts", shape=(10, 3, 2, 4), chunks=(1, 1, 2, 4), shards=(4, 3, 2, 4), **kw
    )
    g = np.random.default_rng(0)
    data = g.integers(0, 60000, size=(10, 3, 4), dtype=np.uint16)
    data[6] = 0
    rows[:] = data
    pdata = g.integers(0, 60000, size=(10, 3, 2, 4), dtype=np.uint16)
    pdata[2, 1] = 0
    parts[:] = pdata
    open_rows = shard_files(
        json.loads((tmp_path / "g/rows/zarr.json").read_text()), tmp_path / "g/rows"
    )
    open_parts = shard_files(
        json.loads((tmp_path / "g/parts/zarr.json").read_text()), tmp_path / "g/parts"
    )
    assert (open_rows.shard_rows, open_rows.parts) == (4, 1)
    assert (open_parts.shard_rows, open_parts.parts) == (4, 3)
    np.testing.assert_array_equal(open_rows.read_many(range(10)), data)
    np.testing.assert_array_equal(open_parts.read_many(range(10)), pdata)
    picks = [0, 2, 1, 1, 0, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(
        open_parts.read_many(range(10), picks)[:, 0], pdata[np.arange(10), picks]
    )


def test_staging_puts_every_array_before_any_checksum(tmp_path, monkeypatch):
    order: list[str] = []
    real = store_chunks.put

    def record(path, data):
        parts = Path(path).parts
        if ".staged" in parts and BUCKET in parts:  # the samples' (not the captions')
            order.append(parts[parts.index(".staged") - 1])
        real(path, data)

    monkeypatch.setattr(store_chunks, "put", record)
    _write(tmp_path / "s.zarr", 40, bulk=True, shard_samples=64)
    staged = order
    # Done flags cleared (40), the 4 arrays (masks and masked_latents per variant), checksums.
    assert staged[:40] == ["checksum"] * 40 and staged[-40:] == ["checksum"] * 40
    assert len(staged) == 40 * (2 + 1 + 2 * K + 1) and "checksum" not in staged[40:-40]


def test_damaged_chunks_are_named(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    drop_chunk(tmp_path / "s.zarr", BUCKET, "latents", 4)
    path, offset, length = chunk_range(tmp_path / "s.zarr", BUCKET, "masked_latents", 6, part=1)
    raw = path.read_bytes()  # the chunk's compressed bytes cut short: blosc cannot decode them
    path.write_bytes(raw[:offset] + raw[offset : offset + length // 2] * 2 + raw[offset + length :])
    r = open_store(tmp_path / "s.zarr")
    with pytest.raises(DamagedSample, match=r"4 \(source clip4\.mp4\): its contents do not match"):
        r.read_batch(BUCKET, [4])
    with pytest.raises(DamagedSample, match=r"6 \(source clip6\.mp4\)"):
        r.read_batch(BUCKET, [2, 6])
    assert sorted(s for _, s, _ in r.verify()) == [4, 6]


def test_done_flags_of_a_torn_or_missing_shard_count_as_not_done(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    folder = tmp_path / "s.zarr" / "buckets" / BUCKET / "checksum"
    (folder / "c.0.0").write_bytes((folder / "c.0.0").read_bytes()[:-7])  # torn: no index
    (folder / "c.2.0").unlink()
    (folder / "c.2.0.123-456.partial").write_bytes(b"\x01" * 8)  # an interrupted write's temp
    flags = shard_files(json.loads((folder / "zarr.json").read_text()), folder).read_flags()
    assert np.flatnonzero(flags == 0).tolist() == [0, 1, 2, 3, 4, 10, 11]


def test_other_layouts_fall_back_to_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    group.create_array("sharded", shape=(8, 4), chunks=(1, 4), shards=(4, 4), dtype="uint16")
    group.create_array("nested", shape=(8, 4), chunks=(1, 4), dtype="uint16")  # '/' chunk keys
    group.create_array("rows2", shape=(8, 4), chunks=(2, 4), dtype="uint16")
    group.create_array("split", shape=(8, 4), chunks=(1, 2), shards=(4, 4), dtype="uint16")
    for name in ("sharded", "nested", "rows2", "split"):
        meta = json.loads((tmp_path / "g" / name / "zarr.json").read_text())
        assert chunk_files(meta, tmp_path / "g" / name) is None, name
        if name != "sharded":
            assert shard_files(meta, tmp_path / "g" / name) is None, name
    meta = json.loads((tmp_path / "g" / "sharded" / "zarr.json").read_text())
    assert shard_files(meta, tmp_path / "g" / "sharded") is None  # '/' keys: zarr reads it


def test_shard_bytes_do_not_depend_on_write_order(tmp_path):
    """Shards are assembled in row order from staged chunks: the same samples written in another
    order (or sealed, then resealed on a rerun) give the same files, byte for byte."""
    _write(tmp_path / "a.zarr", 12, bulk=False)
    _write(tmp_path / "b.zarr", 12, bulk=False, order=[11, 3, 7, 0, 1, 2, 4, 5, 6, 8, 9, 10])
    _write(tmp_path / "c.zarr", 12, bulk=True)
    files = [_files(tmp_path / f"{x}.zarr") for x in "abc"]
    assert files[0] == files[1] == files[2]


def test_a_schema_1_store_reads_as_it_is(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    old = schema1_copy(tmp_path / "s.zarr", tmp_path / "old.zarr")
    assert (old / "buckets" / BUCKET / "latents" / "c.7.0.0.0.0").is_file()  # a file a sample
    a, b = open_store(tmp_path / "s.zarr"), open_store(old)
    assert b.root_attrs["schema_version"] == 1 and b.verify() == []
    assert a.digest() == b.digest()
    for name in ("latents", "masks", "masked_latents", "all_masked"):
        np.testing.assert_array_equal(
            a.read_rows(BUCKET, np.arange(12))[name], b.read_rows(BUCKET, np.arange(12))[name]
        )
    with pytest.raises(StoreError, match="older cogfun.*write to a new store"):
        open_for_write(
            old,
            settings={"s": 1},
            attrs={},
            plan=_plan(12),
            layout=StoreLayout(4, "moments", K, 3, 4),
            create=True,
        )


@pytest.mark.parametrize("compressed", [True, False])
def test_read_chunk_of_a_multi_row_array_matches_zarr(tmp_path, compressed):
    """Arrays chunked by several rows (the plan's caption and provenance_hash) are read a chunk
    at a time, the last chunk included (zarr stores it whole); a missing chunk is the fill value."""
    path = tmp_path / "rows.zarr"
    blosc = [zarr.codecs.BloscCodec(cname="zstd", clevel=3)] if compressed else None
    arr = zarr.create_array(
        str(path),
        shape=(10,),
        chunks=(4,),
        dtype="int64",
        fill_value=0,
        compressors=blosc,
        chunk_key_encoding={"name": "default", "separator": "."},  # as the store's arrays
    )
    values = np.arange(10, dtype=np.int64) * 7 + 1
    values[4:8] = 0  # an all-fill chunk: zarr writes no file
    arr[:] = values
    meta = json.loads((path / "zarr.json").read_text())
    assert chunk_files(meta, path) is None  # one-row access refuses a multi-row chunking
    files = chunk_files(meta, path, multi_row=True)
    assert files is not None and files.chunk_rows == 4
    assert not os.path.exists(files.path(1))
    got = np.concatenate([files.read_chunk(c) for c in range(3)])
    assert got.shape == (12,) and np.array_equal(got[:10], np.asarray(arr[:]))


def test_reading_only_the_picked_variants(tmp_path, monkeypatch):
    """`variants` reads the latents and just the mask variants asked for, each verified against
    its own checksum; the others come back as zeros and are never read."""
    _write(tmp_path / "s.zarr", 12, bulk=True)
    r = open_store(tmp_path / "s.zarr")
    slots, picks = [0, 4, 7], [[1], [0], [0, 1]]
    full = r.read_batch(BUCKET, slots)
    part = r.read_batch(BUCKET, slots, variants=picks)
    read = part["variants_read"]
    assert read.tolist() == [[False, True], [True, False], [True, True]]
    assert torch.equal(part["latents"].view(torch.uint16), full["latents"].view(torch.uint16))
    for name in ("masks", "masked_latents"):
        got, want = part[name].view(torch.uint16), full[name].view(torch.uint16)
        assert torch.equal(got[read], want[read])  # all-masked ones substituted as in a full read
        assert not got[~read].any()
    # Bytes read: about half the variant bytes (4 of 6 variants here), never the unpicked ones.
    counted: list[int] = []
    real = store_chunks.read_chunk_bytes

    def count(path, start=0, length=None):
        data = real(path, start, length)
        counted.append(len(data or b""))
        return data

    monkeypatch.setattr(store_chunks, "read_chunk_bytes", count)
    open_store(tmp_path / "s.zarr").read_batch(BUCKET, [5], variants=[[0]])
    one = sum(counted)
    counted.clear()
    open_store(tmp_path / "s.zarr").read_batch(BUCKET, [5])
    assert 0 < one < sum(counted)
    monkeypatch.setattr(store_chunks, "read_chunk_bytes", real)
    # Damage in a variant a step does not use is not read; in one it uses, it is named.
    flip_byte(tmp_path / "s.zarr", BUCKET, "masked_latents", 5, part=1)
    r = open_store(tmp_path / "s.zarr")
    assert r.read_batch(BUCKET, [5], variants=[[0]])["variants_read"].tolist() == [[True, False]]
    with pytest.raises(DamagedSample, match=r"5 \(source clip5\.mp4\)"):
        r.read_batch(BUCKET, [5], variants=[[1]])
    with pytest.raises(DamagedSample):
        r.read_batch(BUCKET, [5])
    with pytest.raises(StoreError, match="variant 2 is outside 0..1"):
        r.read_batch(BUCKET, [4], variants=[[2]])


def test_a_seal_killed_while_unstaging_loses_nothing(tmp_path, monkeypatch):
    """The seal wrote every shard and then died after removing only the first array's staged
    files. The staged done flags go first, so the store then reads (and a rerun seals) every
    sample from its new shards; the other order read the sample's chunks as zeros and a rerun
    sealed those zeros over the good copy."""
    from cogfun.common.store.shards import ShardFiles

    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    _write(ref, 6, bulk=True, shard_samples=8)
    w = _started(out, 6, shard_samples=8)
    w.write_samples(BUCKET, range(6), *_arrays(6))
    real, calls = ShardFiles.unstage, []

    def dies_after_the_first(self, rows):
        calls.append(self.folder.name)
        real(self, rows)
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(ShardFiles, "unstage", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        w.seal(BUCKET, 0)
    monkeypatch.setattr(ShardFiles, "unstage", real)
    assert calls == ["checksum"]
    assert open_store(out, allow_incomplete=True).verify() == []
    _open(out, 6).finalize()  # seals the shard again from what is left
    assert not list(out.rglob(".staged/*"))
    assert open_store(out).digest() == open_store(ref).digest()
