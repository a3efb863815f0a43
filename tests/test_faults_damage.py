"""Damaged stores, on a real precompute store: a deleted, truncated or altered chunk or shard file
of any array is named by `cogfun inspect --verify` (exit 1), each sample it held and no other; an edited or missing `zarr.json`, a newer schema
and a store that a live precompute is still writing are refused with a message saying so (what
training's `open_store` does too)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cogfun.common.store import SCHEMA_VERSION, DamagedSample, StoreError, open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.faults import BIN, hook_env, read_log
from cogfun.testing.runs import (
    OPTS,
    compare,
    fault_dataset,
    inspect_json,
    precompute_args,
    snapshot,
)
from cogfun.testing.store_files import shard_file, shard_rows


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("damage")
    data = fault_dataset(root / "data")
    out = root / "ref.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)) == 0
    return out


def _copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "s.zarr"))


def _chunks(store: Path, rel: str) -> list[Path]:
    folder = store / rel
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one bit of the last bytes: inside the compressed payload, or the raw value
        path.write_bytes(raw[:-3] + bytes([raw[-3] ^ 0x10]) + raw[-2:])


SAMPLE_ARRAYS = ("latents", "masks", "masked_latents", "all_masked", "checksum")


def _target(store: Path, array: str, how: str) -> tuple[str, Path, set]:
    """The first chunk or shard file of `array` on disk, and which (bucket, slot) entries
    `--verify` must name once it is damaged: a shard file deleted loses the samples it holds
    data of; truncated or altered (its index's crc32c), every sample it covers."""
    reader = open_store(store)
    for bucket, info in reader.buckets.items():
        if array == "captions/embeddings":
            i = int(reader.read_sample(bucket, int(info.slots[0]))["caption"])
            rows, stored = shard_rows(store, "captions", "embeddings", i)
            needed = {0} | {
                int(reader.read_sample(b, int(s))["caption"])
                for b, inf in reader.buckets.items()
                for s in inf.slots
            }
            hit = stored if how == "delete" else rows
            return (
                bucket,
                shard_file(store, "captions", "embeddings", i),
                {("captions", c) for c in hit if c in needed},
            )
        files = _chunks(store, f"buckets/{bucket}/{array}")
        if not files:
            continue
        if array in SAMPLE_ARRAYS:
            rows, stored = shard_rows(store, bucket, array, int(info.slots[0]))
            hit = set(stored if how == "delete" else rows) & set(info.slots.tolist())
            if not hit:
                continue
            return (
                bucket,
                shard_file(store, bucket, array, int(info.slots[0])),
                {(bucket, s) for s in hit},
            )
        if array == "all_masked_latents":
            flags = reader.read_batch(bucket, info.slots)["all_masked"].any(dim=1).numpy()
            if not flags.any():
                continue
            return bucket, files[0], {(bucket, int(s)) for s in info.slots[np.flatnonzero(flags)]}
        return bucket, files[0], set()  # plan-level arrays: whatever of that bucket they name
    raise AssertionError(f"no chunk of {array} in {store}")


ARRAYS = [
    *SAMPLE_ARRAYS,
    "all_masked_latents",
    "captions/embeddings",
    "provenance",
    "provenance_hash",
    "caption",
]


@pytest.mark.parametrize("how", ["delete", "truncate", "alter"])
@pytest.mark.parametrize("array", ARRAYS)
def test_a_damaged_chunk_is_named_by_inspect_verify(store, tmp_path, array, how):
    case = _copy(store, tmp_path)
    bucket, chunk, expected = _target(case, array, how)
    _damage(chunk, how)
    code, data, err = inspect_json(case, "--verify")
    assert code == 1, err
    named = {(d["bucket"], d["slot"]) for d in data["damaged"]}
    assert data["intact"] is False and named, err
    assert "damaged sample(s)" in err
    assert {b for b, _ in named} <= {bucket, "captions"}  # nothing else is blamed
    if expected:
        assert named == expected, (named, expected)
    if array in SAMPLE_ARRAYS:  # each reason names the source file of its sample
        for d in data["damaged"]:
            assert open_store(store).provenance(bucket, d["slot"])["file"] in d["reason"]
    if array in (*SAMPLE_ARRAYS, "captions/embeddings"):
        assert data["digest"] is None and "damaged sample" in data["digest_error"]
    # Training's reads refuse a damaged sample and still read every other bucket.
    reader = open_store(case)
    for b, slot in expected - {e for e in expected if e[0] == "captions"}:
        with pytest.raises(DamagedSample):
            reader.read_sample(b, slot)
    for b, info in reader.buckets.items():
        if b != bucket:
            reader.read_batch(b, info.slots)


@pytest.mark.parametrize("how", ["delete", "truncate", "alter"])
def test_a_damaged_done_index_refuses_the_store(store, tmp_path, how):
    case = _copy(store, tmp_path)
    bucket = next(iter(open_store(case).buckets))
    _damage(_chunks(case, f"buckets/{bucket}/done")[0], how)
    code, data, err = inspect_json(case, "--verify")
    assert code == 2 and data is None
    assert f"buckets/{bucket}/done: the done index" in err
    with pytest.raises(StoreError, match="the done index"):
        open_store(case)


def _edit(rel: str, change):
    def apply(case: Path) -> None:
        path = case / rel
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return apply


def _settings(meta: dict) -> dict:
    return meta["attributes"]["settings"]


def _first_bucket(case: Path) -> str:
    return json.loads((case / "zarr.json").read_text())["attributes"]["buckets"][0]


METADATA = {  # what is done to the store, inspect's exit code, the message
    "root zarr.json not JSON": (
        lambda c: (c / "zarr.json").write_text("{ edited"),
        2,
        "zarr.json is unreadable or was edited",
    ),
    "root zarr.json missing": (lambda c: (c / "zarr.json").unlink(), 2, "zarr.json is missing"),
    "newer schema": (
        _edit("zarr.json", lambda m: m["attributes"].update(schema_version=SCHEMA_VERSION + 1)),
        2,
        "written by a newer cogfun",
    ),
    "settings edited": (
        _edit("zarr.json", lambda m: _settings(m)["vae"].update(scaling_factor=0.5)),
        2,
        "`settings` does not match the store's `fingerprint`",
    ),
    "fingerprint edited": (
        _edit("zarr.json", lambda m: m["attributes"].update(fingerprint="0" * 64)),
        2,
        "`settings` does not match the store's `fingerprint`",
    ),
    "bucket list edited": (
        _edit("zarr.json", lambda m: m["attributes"]["buckets"].pop()),
        2,
        "counts recorded at finalize",
    ),
    "layout edited": (
        _edit("zarr.json", lambda m: m["attributes"]["layout"].update(latent_channels=8)),
        2,
        "bucket attributes edited",
    ),
    "status edited to writing": (
        _edit("zarr.json", lambda m: m["attributes"].update(status="writing")),
        1,
        "still running or was interrupted",
    ),
    "bucket zarr.json missing": (
        lambda c: (c / "buckets" / _first_bucket(c) / "zarr.json").unlink(),
        2,
        "zarr.json is missing",
    ),
    "bucket size edited": (
        lambda c: _edit(
            f"buckets/{_first_bucket(c)}/zarr.json", lambda m: m["attributes"].update(height=8)
        )(c),
        2,
        "bucket attributes edited",
    ),
    "array dtype edited": (
        lambda c: _edit(
            f"buckets/{_first_bucket(c)}/latents/zarr.json", lambda m: m.update(data_type="int16")
        )(c),
        1,
        "does not match the schema",
    ),
}


@pytest.mark.parametrize("case_name", list(METADATA))
def test_edited_or_missing_metadata_is_refused(store, tmp_path, case_name):
    change, exit_code, message = METADATA[case_name]
    case = _copy(store, tmp_path)
    change(case)
    code, data, err = inspect_json(case, "--verify")
    assert code == exit_code, err
    shown = err if data is None else err + json.dumps(data["damaged"])
    assert message in shown, shown
    with pytest.raises(StoreError, match=message.replace("`", ".")):  # what training opens with
        reader = open_store(case)
        for b, info in reader.buckets.items():
            reader.read_batch(b, info.slots)


@pytest.mark.slow
def test_a_store_a_live_precompute_is_writing(store, tmp_path, tiny_model_dir):
    """A precompute paused before a sample write: readers say it is being written now (not
    'interrupted'), a second precompute is refused; once it is killed the rerun finishes it."""
    data, out, log = store.parent / "data", tmp_path / "live.zarr", tmp_path / "live.log"
    args = precompute_args(data, tiny_model_dir, out)
    proc = subprocess.Popen(
        [str(BIN / "cogfun"), *args],
        env=hook_env(tmp_path, "pause:1:/latents/.staged/", log=log),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not read_log(log) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and read_log(log), "precompute never reached the pause"
        with pytest.raises(StoreError, match=rf"writing it right now \(pid {proc.pid} on "):
            open_store(out)
        code, summary, err = inspect_json(out, "--verify")
        assert code == 1 and summary["status"] == "writing"
        assert f"a precompute is writing it right now (pid {proc.pid} on " in err
        second = PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)
        assert run(second) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(StoreError, match="still running or was interrupted"):
        open_store(out)
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)) == 0
    assert compare(snapshot(store), snapshot(out)) == (0, 0, True)


def test_a_second_precompute_is_refused_naming_the_writer(store, tmp_path, tiny_model_dir, capsys):
    from cogfun.common.store import StoreLock

    out = tmp_path / "locked.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cogfun.common.store import StoreLock; import time; "
            f"lock = StoreLock({str(out)!r}); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = PrecomputeConfig(data=store.parent / "data", model=tiny_model_dir, out=out, **OPTS)
        assert run(cfg) == 2
        err = capsys.readouterr().err
        assert f"being written by another precompute right now (pid {holder.pid} on " in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    lock = StoreLock(out)  # the holder died: its lock went with it
    lock.release()
