"""The store under damage: a dropped or altered chunk inside a shard, a damaged shard (every
sample it holds named, and no other), a lost done flag or caption, edited metadata, a newer
schema."""

from __future__ import annotations

import json

import pytest
from cogfun.common.store import (
    SCHEMA_VERSION,
    DamagedSample,
    StoreError,
    open_store,
)
from cogfun.testing.store_files import drop_chunk, flip_byte, shard_file
from store_support import (
    IMAGE,
    VIDEO,
    write_store,
)


@pytest.mark.parametrize("damage", [drop_chunk, flip_byte], ids=["dropped", "flipped"])
def test_verify_and_reads_catch_a_damaged_chunk(tmp_path, damage):
    store = tmp_path / "s.zarr"
    write_store(store)
    damage(store, VIDEO, "latents", 3)  # one sample's chunk inside its shard file
    r = open_store(store)  # opening does not read samples, so it still works
    damaged = r.verify()
    assert [(b, s) for b, s, _ in damaged] == [(VIDEO, 3)]
    with pytest.raises(DamagedSample) as exc:
        r.read_sample(VIDEO, 3)
    assert (exc.value.bucket, exc.value.slot, exc.value.file) == (VIDEO, 3, "clips/v3.mp4")
    assert "f2_h4_w6/3" in str(exc.value) and "clips/v3.mp4" in str(exc.value)
    with pytest.raises(DamagedSample):
        r.read_batch(VIDEO, [1, 3])
    assert r.read_sample(VIDEO, 2)["latents"].shape == (2, 8, 4, 6)  # the rest stays readable
    with pytest.raises(DamagedSample):
        r.digest()
    assert r.summary()["digest"] is None


@pytest.mark.parametrize("damage", ["truncate", "index", "delete"])
def test_a_damaged_shard_names_each_of_its_samples_and_no_other(tmp_path, damage):
    store = tmp_path / "s.zarr"
    write_store(store, shard_samples=2)  # video shards hold slots {0, 1}, {2, 3}, {4}
    target = shard_file(store, VIDEO, "masked_latents", 3)
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "index":  # a bit of the shard index: its crc32c no longer matches
        target.write_bytes(raw[:-30] + bytes([raw[-30] ^ 1]) + raw[-29:])
    else:
        target.unlink()
    r = open_store(store)
    assert sorted((b, s) for b, s, _ in r.verify()) == [(VIDEO, 2), (VIDEO, 3)]
    with pytest.raises(DamagedSample) as exc:
        r.read_sample(VIDEO, 2)
    assert exc.value.slot == 2 and "clips/v2.mp4" in str(exc.value)
    for slot in (0, 1, 4):
        assert r.read_sample(VIDEO, slot)["masked_latents"].shape == (2, 2, 8, 4, 6)


def test_verify_catches_a_lost_done_flag_and_caption(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    drop_chunk(store, VIDEO, "checksum", 1)
    drop_chunk(store, "captions", "embeddings", 2)
    damaged = {(b, s): reason for b, s, reason in open_store(store).verify()}
    assert set(damaged) == {(VIDEO, 1), ("captions", 2)}
    assert "done flag" in damaged[(VIDEO, 1)] and "checksum" in damaged[("captions", 2)]


def test_store_metadata_damage_and_newer_schema(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    root = store / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="newer cogfun"):
        open_store(store)
    root.write_text("{ edited")
    with pytest.raises(StoreError, match=r"s\.zarr/zarr\.json is unreadable or was edited"):
        open_store(store)
    root.unlink()
    with pytest.raises(StoreError, match=r"s\.zarr/zarr\.json is missing"):
        open_store(store)
    other = tmp_path / "t.zarr"
    write_store(other)
    (other / "buckets" / IMAGE / "zarr.json").unlink()
    with pytest.raises(StoreError, match=r"buckets/f1_h2_w2/zarr\.json is missing"):
        open_store(other)
    (other / "buckets" / IMAGE / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
    )
    with pytest.raises(StoreError, match="bucket attributes missing or edited"):
        open_store(other)
