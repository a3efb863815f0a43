"""The store's direct chunk-file path (bulk writes, reads, done flags) against zarr's own."""

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
    StoreLayout,
    StorePlan,
    open_for_write,
    open_store,
)
from cogfun.common.store import chunks as store_chunks
from cogfun.common.store.chunks import chunk_files

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


def _write(path: Path, n: int, bulk: bool) -> None:
    layout = StoreLayout(4, "moments", K, 3, 4)
    w = open_for_write(path, settings={"s": 1}, attrs={}, plan=_plan(n), layout=layout, create=True)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        w.write_caption(i, torch.randn(3, 4, generator=g))
    w.write_all_masked(BUCKET, torch.randn(2, 8, 2, 2, generator=g))
    lat, masks, masked, flags = _arrays(n)
    if bulk:
        w.write_samples(BUCKET, range(n), lat, masks, masked, flags)
    else:
        for i in range(n):
            w.write_sample(BUCKET, i, lat[i], masks[i], masked[i], flags[i])
    w.finalize()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("c.*"))}


def test_bulk_write_leaves_the_same_files_as_zarr(tmp_path):
    _write(tmp_path / "zarr.zarr", 12, bulk=False)
    _write(tmp_path / "bulk.zarr", 12, bulk=True)
    by_zarr, by_bulk = _files(tmp_path / "zarr.zarr"), _files(tmp_path / "bulk.zarr")
    assert by_zarr.keys() == by_bulk.keys()
    assert by_zarr == by_bulk  # byte for byte, chunk for chunk
    # zarr writes no file for an all-zero chunk: neither does the bulk path.
    assert f"buckets/{BUCKET}/latents/c.3.0.0.0.0" not in by_bulk
    assert f"buckets/{BUCKET}/masks/c.5.0.0.0.0.0" not in by_bulk
    a, b = open_store(tmp_path / "zarr.zarr"), open_store(tmp_path / "bulk.zarr")
    assert a.digest() == b.digest() and b.verify() == []
    assert not list((tmp_path / "bulk.zarr").rglob("*.partial"))


def test_direct_reads_equal_zarr_reads(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    r = open_store(tmp_path / "s.zarr")
    slots = np.asarray([7, 3, 11, 0])
    direct = r.read_rows(BUCKET, slots)
    arrays = r._bucket_arrays(BUCKET)
    for name in ("latents", "masks", "all_masked"):
        via_zarr = np.stack([np.asarray(arrays[name][int(s)]) for s in slots])
        assert direct[name].dtype == via_zarr.dtype
        np.testing.assert_array_equal(direct[name], via_zarr)
    checksum = r._files[BUCKET]["checksum"]
    np.testing.assert_array_equal(checksum.read_flags(), np.asarray(arrays["checksum"][:]))
    assert r.read_batch(BUCKET, [3])["latents"].abs().sum() == 0  # missing file: the fill value


def test_bulk_write_puts_every_array_before_any_checksum(tmp_path, monkeypatch):
    order: list[str] = []
    real = store_chunks.ChunkFiles.write

    def record(self, row, value):
        order.append(Path(self.folder).name)
        real(self, row, value)

    monkeypatch.setattr(store_chunks.ChunkFiles, "write", record)
    _write(tmp_path / "s.zarr", 40, bulk=True)
    # Done flags not read first, so every slot's flag is cleared, then 4 arrays, then checksums.
    assert order[:40] == ["checksum"] * 40 and order[-40:] == ["checksum"] * 40
    assert len(order) == 40 * 6 and "checksum" not in order[40:-40]


def test_damaged_chunks_are_named(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    folder = tmp_path / "s.zarr" / "buckets" / BUCKET
    (folder / "latents" / "c.4.0.0.0.0").unlink()
    blob = (folder / "masked_latents" / "c.6.0.0.0.0.0").read_bytes()
    (folder / "masked_latents" / "c.6.0.0.0.0.0").write_bytes(blob[: len(blob) // 2])
    r = open_store(tmp_path / "s.zarr")
    with pytest.raises(DamagedSample, match=r"4 \(source clip4\.mp4\): its contents do not match"):
        r.read_batch(BUCKET, [4])
    with pytest.raises(DamagedSample, match=r"6 \(source clip6\.mp4\): a chunk file is unreadable"):
        r.read_batch(BUCKET, [2, 6])
    assert sorted(s for _, s, _ in r.verify()) == [4, 6]


def test_done_flags_skip_partial_and_unreadable_files(tmp_path):
    _write(tmp_path / "s.zarr", 12, bulk=True)
    folder = tmp_path / "s.zarr" / "buckets" / BUCKET / "checksum"
    (folder / "c.2").write_bytes(b"\x01\x02")  # torn: not 8 bytes
    (folder / "c.9").unlink()
    (folder / "c.9.123-456.partial").write_bytes(b"\x01" * 8)  # an interrupted write's temp file
    flags = chunk_files(json.loads((folder / "zarr.json").read_text()), folder).read_flags()
    assert np.flatnonzero(flags == 0).tolist() == [2, 9]


def test_other_layouts_fall_back_to_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    group.create_array("sharded", shape=(8, 4), chunks=(1, 4), shards=(4, 4), dtype="uint16")
    group.create_array("nested", shape=(8, 4), chunks=(1, 4), dtype="uint16")  # '/' chunk keys
    group.create_array("rows2", shape=(8, 4), chunks=(2, 4), dtype="uint16")
    for name in ("sharded", "nested", "rows2"):
        meta = json.loads((tmp_path / "g" / name / "zarr.json").read_text())
        assert chunk_files(meta, tmp_path / "g" / name) is None, name


def test_rewrite_clears_old_files(tmp_path):
    """Writing zeros over a stored row removes its file, as zarr does (no stale bytes left)."""
    _write(tmp_path / "s.zarr", 12, bulk=True)
    folder = tmp_path / "s.zarr" / "buckets" / BUCKET / "latents"
    meta = json.loads((folder / "zarr.json").read_text())
    files = chunk_files(meta, folder)
    assert os.path.exists(files.path(1))
    files.write(1, np.zeros(files.row_shape, dtype=np.uint16))
    assert not os.path.exists(files.path(1))
    files.write(1, np.ones(files.row_shape, dtype=np.uint16))
    np.testing.assert_array_equal(files.read(1), 1)


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
