"""Incremental updates: precompute reruns with an edited metadata file encode only the rows that
are new or changed, keep every other sample's bytes, stop serving rows that are gone, and leave a
store equal (by digest) to a fresh store of the final metadata, whichever edits led there."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset
from cogfun.testing.runs import OPTS as RUN_OPTS

pytestmark = pytest.mark.slow

# vae_mini_batch 1 (the original's usual value): each sample's encoding is its own, so a sample
# encoded in an update is bit for bit the one a fresh store encodes.
OPTS = {**RUN_OPTS, "vae_mini_batch": 1, "shard_samples": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("incremental") / "data"
    make_sample_dataset(root, n_videos=4, n_images=3, seed=3)
    return root


def _meta(data: Path, rows: list[dict], name: str) -> Path:
    path = data / name
    path.write_text(json.dumps(rows))
    return path


def _run(data: Path, meta: Path, model: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run(PrecomputeConfig(data=data, meta=meta, model=model, out=out, **OPTS))
    return code, capsys.readouterr().err


def _stored(err: str) -> int:
    return int(re.search(r"stored (\d+) samples in", err)[1])


def _sums(store: Path) -> dict[tuple[str, str], int]:
    """Each served sample's checksum, by (bucket, key)."""
    r = open_store(store)
    out = {}
    for name, info in r.buckets.items():
        keys, flags = r.row_keys(name), r.done_flags(name)
        for slot in info.slots:
            out[(name, keys[slot])] = int(flags[slot])
    return out


def test_an_edited_dataset_encodes_only_what_changed(dataset, tiny_model_dir, tmp_path, capsys):
    rows = json.loads((dataset / "metadata.json").read_text())
    assert [r["type"] for r in rows].count("video") == 4
    out = tmp_path / "s.zarr"
    first = _meta(dataset, rows, "first.json")
    code, err = _run(dataset, first, tiny_model_dir, out, capsys)
    assert code == 0
    before = _sums(out)
    # Edits: the first video's caption changes, the last image goes, a new video row comes.
    edited = [dict(r) for r in rows[:-1]]
    edited[0]["text"] = "a different caption"
    edited.append({**rows[1], "text": "the second video, captioned again"})
    final = _meta(dataset, edited, "final.json")
    code, err = _run(dataset, final, tiny_model_dir, out, capsys)
    assert code == 0
    # Two video rows are new (2 variants each); nothing else is encoded.
    assert _stored(err) == 4, err
    update = open_store(out).root_attrs["last_update"]
    assert update == {"added": 4, "reused": len(before) - 3, "retired": 3, "restored": 0}
    assert re.search(r"4 samples added, \d+ reused, 3 retired", err)
    summary = open_store(out).summary()  # what `cogfun inspect --json` prints
    assert summary["last_update"] == update and summary["retired"] == 3
    assert summary["samples"] == summary["planned"] == len(before) + 1
    after = _sums(out)
    kept = set(before) & set(after)
    assert len(kept) == len(before) - 3 and {k: after[k] for k in kept} == {
        k: before[k] for k in kept
    }
    # A fresh store of the final metadata holds the same samples.
    fresh = tmp_path / "fresh.zarr"
    assert _run(dataset, final, tiny_model_dir, fresh, capsys)[0] == 0
    assert open_store(fresh).digest() == open_store(out).digest()
    assert open_store(out).verify() == []
    # Another way to the same metadata (first the new row, then the rest): the same samples.
    other = tmp_path / "other.zarr"
    step = _meta(dataset, [*rows, edited[-1]], "step.json")
    assert _run(dataset, step, tiny_model_dir, other, capsys)[0] == 0
    code, err = _run(dataset, final, tiny_model_dir, other, capsys)
    assert code == 0 and _stored(err) == 2  # only the recaptioned row: 2 variants
    assert open_store(other).digest() == open_store(fresh).digest()
    # Rerunning with the same metadata encodes nothing and changes nothing.
    digest = open_store(out).digest()
    code, err = _run(dataset, final, tiny_model_dir, out, capsys)
    assert code == 0 and _stored(err) == 0 and open_store(out).digest() == digest


def test_a_touched_file_is_encoded_again(dataset, tiny_model_dir, tmp_path, capsys):
    """A sample's key holds its file's size and mtime: a file rewritten in place is new."""
    data = Path(shutil.copytree(dataset, tmp_path / "data"))
    rows = json.loads((data / "metadata.json").read_text())
    meta = _meta(data, rows, "m.json")
    out = tmp_path / "s.zarr"
    assert _run(data, meta, tiny_model_dir, out, capsys)[0] == 0
    image = next(r for r in rows if r["type"] == "image")
    path = data / image["file_path"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, err = _run(data, meta, tiny_model_dir, out, capsys)
    assert code == 0 and _stored(err) == 1
    update = open_store(out).root_attrs["last_update"]
    assert (update["added"], update["retired"]) == (1, 1)
