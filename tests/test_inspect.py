"""`cogfun inspect`: the tables, `--json` (only JSON on stdout) and `--verify` exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cogfun.app.cli import app
from cogfun.common.store import (
    BucketPlan,
    RowPlan,
    StoreLayout,
    StorePlan,
    open_for_write,
    open_store,
)
from cogfun.testing.store_files import chunk_range
from typer.testing import CliRunner

LAYOUT = StoreLayout(
    latent_channels=4, latent_format="moments", masks_per_sample=1, text_len=5, text_dim=6
)
SETTINGS = {"seed": 42, "video_sample_size": 256, "vae": {"sha256": "feed"}}
BUCKET = "f2_h4_w6"


def _t(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def build_store(path: Path, *, finalize: bool = True) -> Path:
    """A 3-row video bucket (2 stored, 1 failed) and a 1-row image bucket, with one failure recorded."""
    video = BucketPlan(
        BUCKET, 5, 32, 48, 2, 4, 6, [RowPlan(1, {"file": f"v{i}.mp4"}) for i in range(3)]
    )
    image = BucketPlan("f1_h2_w2", 1, 16, 16, 1, 2, 2, [RowPlan(0, {"file": "a.png"})])
    plan = StorePlan([video, image], ["", "a red kite"])
    w = open_for_write(
        path,
        settings=SETTINGS,
        attrs={"scaling_factor": 0.7},
        plan=plan,
        layout=LAYOUT,
        create=True,
    )
    for i in range(2):
        w.write_caption(i, _t((5, 6), i))
    for s in (0, 1):
        w.write_sample(
            BUCKET,
            s,
            _t((2, 8, 4, 6), s),
            _t((1, 2, 1, 4, 6), 10 + s),
            _t((1, 2, 8, 4, 6), 20 + s),
            [False],
        )
    w.write_sample(
        "f1_h2_w2", 0, _t((1, 8, 2, 2), 5), _t((1, 1, 1, 2, 2), 6), _t((1, 1, 8, 2, 2), 7), [False]
    )
    w.record_failure("row 2", "clips/v2.mp4", "truncated mp4: moov atom not found", 2)
    if finalize:
        w.finalize()
    return path


runner = CliRunner()


def test_inspect_prints_tables(tmp_path):
    store = build_store(tmp_path / "latents.zarr")
    result = runner.invoke(app, ["inspect", str(store)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (BUCKET, "32x48", "2x4x4x6", "f1_h2_w2", "total (2 buckets)", "3 of 4 planned", "video_sample_size",
                 "vae.sha256", "clips/v2.mp4", "truncated mp4: moov atom not found", "compression ratio",
                 open_store(store).fingerprint):  # fmt: skip
        assert text in out, text
    row = next(line for line in out.splitlines() if BUCKET in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][:6] == [
        BUCKET,
        "32x48",
        "5",
        "2x4x4x6",
        "2",
        "3",
    ]


def test_inspect_json_has_the_promised_keys(tmp_path):
    store = build_store(tmp_path / "latents.zarr")
    result = runner.invoke(app, ["inspect", str(store), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # stdout is the JSON object and nothing else
    reader = open_store(store)
    assert data["samples"] == 3 and data["planned"] == 4
    assert [
        (b["name"], b["count"], b["frames"], b["height"], b["width"]) for b in data["buckets"]
    ] == [
        (BUCKET, 2, 5, 32, 48),
        ("f1_h2_w2", 1, 1, 16, 16),
    ]
    assert data["buckets"][0]["latent_shape"] == [2, 4, 4, 6] and data["buckets"][0]["bytes"] > 0
    assert data["failed"] == [
        {
            "key": "row 2",
            "file": "clips/v2.mp4",
            "reason": "truncated mp4: moov atom not found",
            "row": 2,
        }
    ]
    assert data["fingerprint"] == reader.fingerprint and len(data["fingerprint"]) == 64
    assert data["digest"] == reader.digest() and len(data["digest"]) == 64
    assert data["settings"] == SETTINGS and data["status"] == "complete"
    assert data["bytes"] > sum(b["bytes"] for b in data["buckets"]) > 0
    assert data["compression_ratio"] == pytest.approx(data["raw_bytes"] / data["bytes"])
    # raw payload: bf16 arrays + all_masked byte + caption index + checksums (the sample's and
    # its one variant's) per sample, embeddings
    video = (2 * 8 * 4 * 6 + 2 * 4 * 6 + 2 * 8 * 4 * 6) * 2 + 1 + 8 + 2 * 8
    image = (8 * 2 * 2 + 2 * 2 + 8 * 2 * 2) * 2 + 1 + 8 + 2 * 8
    assert data["raw_bytes"] == 2 * video + image + 2 * 5 * 6 * 2


def test_inspect_verify_exit_codes(tmp_path):
    store = build_store(tmp_path / "latents.zarr")
    ok = runner.invoke(app, ["inspect", str(store), "--verify"])
    assert (
        ok.exit_code == 0 and "intact (3 samples checked)" in ok.stdout
    )  # a recorded failure is not damage
    path, offset, length = chunk_range(store, BUCKET, "masks", 1)  # bytes blosc cannot decode
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + b"x" * length + raw[offset + length :])
    bad = runner.invoke(app, ["inspect", str(store), "--verify"])
    assert bad.exit_code == 1
    damaged_rows = bad.stdout.split("Damaged samples (1)")[1]
    assert BUCKET in damaged_rows and "v1.mp4" in damaged_rows and "unreadable" in damaged_rows
    assert "1 damaged sample(s)" in bad.stderr
    data = json.loads(runner.invoke(app, ["inspect", str(store), "--verify", "--json"]).stdout)
    assert data["intact"] is False and [(d["bucket"], d["slot"]) for d in data["damaged"]] == [
        (BUCKET, 1)
    ]
    assert (
        data["digest"] is None
        and "damaged sample f2_h4_w6/1 (source v1.mp4)" in data["digest_error"]
    )


def test_inspect_unfinished_and_missing_stores(tmp_path):
    store = build_store(tmp_path / "partial.zarr", finalize=False)
    shown = runner.invoke(app, ["inspect", str(store), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "writing"
    assert "still running or was interrupted" in shown.stderr
    assert runner.invoke(app, ["inspect", str(store), "--verify"]).exit_code == 1
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing.zarr"), "--json"])
    assert missing.exit_code == 2 and missing.stdout == ""
    assert "nothing.zarr/zarr.json is missing" in missing.stderr
