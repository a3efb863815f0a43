"""`cogfun demo` runs every stage and lays out W/model, W/data, W/latents.zarr, W/output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, "-c", "from cogfun.app.cli import main; main()"]
    res = subprocess.run(
        [*cmd, "demo", "--workdir", str(work), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "model" / "model_index.json").is_file()
    assert (work / "data" / "metadata.json").is_file()
    rows = [
        json.loads(line) for line in (work / "output" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in rows)
    assert (work / "output" / "checkpoint-4" / "transformer" / "config.json").is_file()
    assert (work / "output" / "loss.png").stat().st_size > 1000
    summary = subprocess.run(
        [*cmd, "inspect", str(work / "latents.zarr"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    info = json.loads(summary.stdout)
    assert info["samples"] == 7 and info["failed"] == []
    assert "Everything is under" in res.stderr
