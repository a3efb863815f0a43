"""`python -m bench.run_all`: figure parsing, the report (table, markers, plots) and a whole --quick run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import perf_report, run_all

ROOT = Path(__file__).resolve().parent.parent

# Every figure docs/performance.md defines for run_all to print (precompute_s_<n> for 3 sizes), and
# the real-scale loader figure.
HEADLINE = [
    "loader_vs_raw_read",
    "data_wait_fraction",
    "real2b_samples_per_s",
    "train_speedup_vs_online",
    "train_peak_rss_ratio",
    "cost_ratio_t5",
    "cost_ratio_transformer",
    "precompute_samples_per_s",
    "precompute_overlap",
    "vae_mini_batch_1_samples_per_s",
    "vae_mini_batch_4_samples_per_s",
    "bytes_per_sample",
    "compression_ratio",
    "caption_dedup_bytes_with",
    "caption_dedup_bytes_without",
    "open_s_1k",
    "open_s_100k",
    "rss_mb_1k",
    "rss_mb_100k",
    "precompute_linear_r2",
    "threads",
]


def _lines(stdout: str) -> dict[str, str]:
    return {
        k: v
        for k, _, v in (line.partition(": ") for line in stdout.splitlines())
        if not k[:1] == "#"
    }


def test_parse_figures_takes_name_value_lines_only():
    text = (
        "threads: 2  workers: 2\nloader_vs_raw_read: 0.874  (spread 15%)\n[warn] x: y\nnot a line"
    )
    figures = run_all.parse_figures(text)
    assert figures == {"threads": "2  workers: 2", "loader_vs_raw_read": "0.874  (spread 15%)"}
    assert run_all.number(figures["loader_vs_raw_read"]) == 0.874
    assert run_all.number("decode 0.2 s") is None and run_all.number(None) is None


def test_headline_lists_every_figure_with_na_for_missing():
    figures = {"loader_vs_raw_read": "0.9", "precompute_s_16": "2.0", "precompute_s_4": "0.7"}
    lines = dict(run_all.headline(figures, threads=2))
    assert lines["loader_vs_raw_read"] == "0.9" and lines["data_wait_fraction"] == "n/a"
    assert lines["threads"] == "2"
    names = [n for n, _ in run_all.headline(figures, threads=2)]
    assert names.index("precompute_s_4") + 1 == names.index("precompute_s_16")  # by size
    assert set(HEADLINE) <= set(names)


def test_report_keeps_notes_outside_markers_and_checks_goals(tmp_path):
    figures = {
        "loader_vs_raw_read": "1.9",
        "data_wait_fraction": "0.05",
        "open_s_1k": "0.10",
        "open_s_100k": "0.12",
        "rss_mb_1k": "230",
        "rss_mb_100k": "400",
        "precompute_s_8": "1.0",
        "precompute_s_16": "1.9",
        "precompute_s_32": "3.8",
        "precompute_linear_r2": "0.999",
        "online_step_ms": "700",
        "store_step_ms": "350",
        "train_speedup_vs_online": "2.0",
    }
    lines = run_all.headline(figures, threads=2)
    context = {
        "command": "python -m bench.run_all --quick",
        "mode": "quick",
        "cores": 2,
        "threads": 2,
        "cuda": "none",
        "load_avg_start": 1.0,
        "load_avg_end": 1.5,
        "total_s": 12.0,
        "statuses": {"loader": "ok", "gpu": "skipped (no CUDA device)"},
    }
    doc = tmp_path / "performance.md"
    doc.write_text(
        f"# Perf\n\nintro\n\n{perf_report.BEGIN}\nold\n{perf_report.END}\n\n## Notes\nkept\n"
    )
    perf_report.write_report(tmp_path, figures, lines, context)
    text = doc.read_text()
    assert text.startswith("# Perf\n\nintro\n") and text.endswith("## Notes\nkept\n")
    assert "old" not in text
    rows = {
        r.split("|")[1].strip(" `"): r.split("|")[4].strip()
        for r in text.splitlines()
        if r.startswith("| `")
    }
    assert rows["loader_vs_raw_read"] == "yes" and rows["data_wait_fraction"] == "**no**"
    assert rows["open_s_100k"] == "yes" and rows["rss_mb_100k"] == "**no**"  # 400 > 1.5 x 230
    assert rows["cost_ratio_t5"] == "not measured"
    for png in ("perf_train_step.png", "perf_precompute_scale.png", "perf_open.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    assert not (tmp_path / "perf_loader.png").exists()  # its figures were not measured


@pytest.mark.slow
def test_quick_run_prints_every_figure_and_writes_the_report(tmp_path):
    repo_doc = ROOT / "docs" / "performance.md"
    before = repo_doc.stat().st_mtime_ns if repo_doc.exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick"]
        + ["--docs", str(tmp_path / "docs"), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = _lines(proc.stdout)
    for name in HEADLINE:
        assert name in figures, f"{name} missing from:\n{proc.stdout}"
        assert math.isfinite(float(figures[name])), (name, figures[name])
    sizes = [k for k in figures if k.startswith("precompute_s_")]
    assert len(sizes) == 3, sizes
    assert float(figures["threads"]) >= 1 and 0 < float(figures["data_wait_fraction"]) < 1
    text = (tmp_path / "docs" / "performance.md").read_text()
    assert "| `loader_vs_raw_read` |" in text and "python -m bench.run_all --quick" in text
    assert (tmp_path / "docs" / "perf_train_step.png").stat().st_size > 1000
    assert (tmp_path / "work" / "logs" / "loader.out").read_text().count("loader_vs_raw_read") == 1
    after = repo_doc.stat().st_mtime_ns if repo_doc.exists() else None
    assert before == after  # the repo's docs/ are left alone
    logs = tmp_path / "work" / "logs"
    _check_train(_lines((logs / "train.out").read_text()))
    _check_incremental(_lines((logs / "incremental.out").read_text()))
    _check_store_layout(_lines((logs / "store_layout.out").read_text()))
    _check_object_store(_lines((logs / "object_store.out").read_text()))


TRAIN_FIGURES = [
    "threads", "workers", "online_step_ms", "store_step_ms", "train_speedup_vs_online",
    "train_speedup_vs_online_min", "train_speedup_vs_online_max", "train_speedup_vs_online_best",
    "online_share_decode",
    "online_share_vae", "online_share_t5", "online_share_transformer", "online_peak_mb",
    "store_peak_mb", "train_peak_rss_ratio", "online_maxrss_mb", "store_maxrss_mb",
    "data_wait_fraction", "data_wait_fraction_processes", "data_wait_fraction_all_cores",
    "data_wait_threads", "store_processes_step_ms",
    "store_processes_peak_mb", "train_peak_rss_ratio_processes",
    "train_speedup_vs_online_processes",
]  # fmt: skip


def _check_train(fig: dict[str, str]) -> None:
    """bench.train --quick (run_all's: tiny model, one 5x16x16 clip, 1 worker)."""
    missing = [name for name in TRAIN_FIGURES if name not in fig]
    assert not missing, f"figures not printed: {missing}"
    value = {k: float(fig[k].split()[0]) for k in TRAIN_FIGURES}
    assert value["threads"] >= 1 and value["workers"] == 1
    assert fig["model"] == "tiny" and fig["clip"] == "5x16x16"
    assert value["online_step_ms"] > 0 and value["store_step_ms"] > 0
    speedup = value["online_step_ms"] / value["store_step_ms"]
    assert value["train_speedup_vs_online"] == pytest.approx(speedup, rel=1e-3)
    low, high = value["train_speedup_vs_online_min"], value["train_speedup_vs_online_max"]
    assert 0 < low <= high and value["train_speedup_vs_online_best"] > 0
    shares = [value[f"online_share_{p}"] for p in ("decode", "vae", "t5", "transformer")]
    assert all(0 <= s <= 1 for s in shares[:3]) and math.isclose(sum(shares), 1, abs_tol=1e-3)
    assert value["online_peak_mb"] > 50 and value["store_peak_mb"] > 50
    ratio = value["store_peak_mb"] / value["online_peak_mb"]
    assert value["train_peak_rss_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert 0 <= value["data_wait_fraction"] < 1 and 0 <= value["data_wait_fraction_processes"] < 1
    # Worker processes are counted in their way's memory: the threads way has none.
    assert float(fig["store_workers_peak_mb"]) == 0 < float(fig["store_processes_workers_peak_mb"])
    ratio = value["store_processes_peak_mb"] / value["online_peak_mb"]
    assert value["train_peak_rss_ratio_processes"] == pytest.approx(ratio, rel=1e-3)


def _check_incremental(fig: dict[str, str]) -> None:
    """bench.incremental --quick: 6 clips, then clip 0 dropped, clip 1 recaptioned and 2 added:
    the update encodes the 3 new or changed rows, reuses the other 4 and retires 2 (clip 0 and
    clip 1's old caption), and ends with a fresh store's digest."""
    got = (fig["update_encoded"], fig["update_reused"], fig["update_retired"])
    assert got == ("3", "4", "2"), fig
    assert fig["update_equals_fresh"] == "1"
    update, full = float(fig["update_s"]), float(fig["full_encode_s"])
    # Printed to 3 decimals: within their rounding.
    slack = 0.0005 / full + update * 0.0005 / full**2 + 0.0005
    assert abs(float(fig["update_vs_full"]) - update / full) <= slack


def _check_store_layout(fig: dict[str, str]) -> None:
    """bench.store_layout --quick: 16 samples a shard, stores of 1 and 3 shards: the larger adds 2
    shards x 5 per-sample arrays (the captions fit one shard in both) for 32 samples; one file per
    sample per array and per caption in the schema-1 copy."""
    assert fig["samples"] == "16 and 48"
    assert float(fig["files_per_sample"].split()[0]) == pytest.approx(2 * 5 / 32)
    assert float(fig["files_per_sample_schema1"]) > 5
    assert float(fig["file_reduction"]) > 3 and 0 < float(fig["open_s"]) < 5


def _check_object_store(fig: dict[str, str]) -> None:
    """bench.object_store --quick: the loader from the local S3 server and from disk, and training
    from both (and from S3 through a cache folder): every figure measured, rates positive, wait
    fractions between 0 and 1, the ratio the ratio of the rates printed."""
    kinds = ("disk", "s3", "s3_cached")
    names = [f"{k}_{f}" for k in kinds for f in ("loader_samples_per_s", "data_wait_fraction")]
    names += [f"{k}_step_ms" for k in kinds] + ["s3_vs_disk_loader"]
    value = {k: float(fig[k].split()[0]) for k in names}
    rates = ("disk_loader_samples_per_s", "s3_loader_samples_per_s")
    assert all(value[k] > 0 for k in (*rates, "s3_cached_loader_samples_per_s"))
    assert value["s3_vs_disk_loader"] == pytest.approx(value[rates[1]] / value[rates[0]], abs=2e-3)
    for name in ("disk", "s3", "s3_cached"):
        assert 0 <= value[f"{name}_data_wait_fraction"] < 1 and value[f"{name}_step_ms"] > 0
