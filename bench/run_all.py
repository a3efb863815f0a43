"""Every benchmark, one `name: value` line per figure, then docs/performance.md and its plots.

    python -m bench.run_all                  # every figure, about 10 minutes on 2 CPU cores
    python -m bench.run_all --full           # larger runs, more rounds, the precompute knob sweep
    python -m bench.run_all --quick --docs D # smallest sizes (smoke test), report written into D

Run from the repository root (`bench` is a package there, not an installed one). Each benchmark
runs as its own subprocess (`python -m bench.<name>`), one after another, so one's
memory, threads and worker processes never touch another's; run_all parses the `name: value`
lines each prints (docs/performance.md defines the figures). Each subprocess's full output is
kept under `--workdir` (logs/<name>.out and .err). A benchmark that fails or times out is
reported as such, its figures as `n/a`, and the others still run; the exit code is then 1.

The report (`bench/perf_report.py`) replaces the generated part of `<docs>/performance.md`, between
its `run_all` markers, so the hand-written notes around it stay; plots go beside it as PNG.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.perf_report import FIGURES, write_report

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Bench:
    """One sub-benchmark: its module (`bench.<name>`), the arguments of each mode, its time limit."""

    name: str
    args: dict[str, list[str]]  # mode ("quick", "default", "full") -> arguments
    timeout_s: dict[str, int] = field(default_factory=lambda: {"quick": 300, "default": 600})
    needs_cuda: bool = False


def benches(threads: int) -> list[Bench]:
    """The sub-benchmarks in run order. Sizes: the proportional model (docs/performance.md) for
    timings that compare stages, the tiny model where only the data path or the scaling shape
    matters."""
    t = ["--threads", str(threads)]
    quick_train = ["--tiny", "--clips", "1", "--frames", "5", "--size", "16", "--wait-size", "16"]
    quick_train += ["--epoch-samples", "4", "--rounds", "1", "--steps", "1", "--workers", "1"]
    quick_train += ["--wait-steps", "2", "--wait-warmup", "2", "--wait-rounds", "1"]
    tiny_pre = ["--model", "tiny", "--frames", "5", "--size", "32", "--source", "48x64"]
    return [
        Bench("flops", {"quick": [], "default": [], "full": []}),
        Bench(
            "loader",
            {
                "quick": ["--videos", "4", "--images", "4", "--large", "300", "--repeats", "1"]
                + ["--real-samples", "4"],
                "default": ["--repeats", "5"],  # open_s medians of 5 fresh processes
                "full": ["--repeats", "7"],
            },
        ),
        Bench(
            "train",
            {
                "quick": quick_train + t,
                "default": t,
                "full": t + ["--rounds", "8", "--wait-steps", "60", "--epoch-samples", "128"],
            },
            {"quick": 300, "default": 900, "full": 1800},
        ),
        Bench(
            "precompute",
            {
                "quick": tiny_pre + ["--videos", "1", "--images", "1"],
                "default": [],
                "full": ["--videos", "8", "--images", "4"],
            },
        ),
        Bench(
            "knobs",
            {
                "quick": tiny_pre + ["--videos", "1", "--rounds", "1"],
                "default": ["--rounds", "1"],
                "full": ["--rounds", "2", "--sweep"],
            },
            {"quick": 300, "default": 600, "full": 1800},
        ),
        Bench(
            "scale",
            {
                "quick": ["--sizes", "1,2,3", "--frames", "5", "--size", "32"],
                "default": [],
                "full": ["--sizes", "32,64,128"],
            },
        ),
        Bench(
            "incremental",
            {
                "quick": ["--clips", "6", "--added", "2", "--frames", "5", "--size", "32"],
                "default": [],
                "full": ["--clips", "120", "--added", "12"],
            },
        ),
        Bench(
            "store_layout",
            {
                "quick": ["--shards", "1,3", "--shard-samples", "16"],
                "default": [],
                "full": ["--shards", "2,10"],
            },
        ),
        Bench(
            "object_store",
            {
                "quick": ["--quick"],
                "default": [],
                "full": ["--samples", "512", "--repeats", "5", "--steps", "100", "--rounds", "4"],
            },
        ),
        Bench("gpu", {"quick": [], "default": [], "full": []}, needs_cuda=True),
    ]


def parse_figures(stdout: str) -> dict[str, str]:
    """`name: value ...` lines -> {name: value text}; a later line wins."""
    out = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name and " " not in name.strip() and not name.startswith("["):
            out[name.strip()] = value.strip()
    return out


def number(text: str | None) -> float | None:
    """The leading number of a figure's text ('0.874  (spread 15%)' -> 0.874), else None."""
    if not text:
        return None
    try:
        return float(text.split()[0].rstrip(",;"))
    except ValueError:
        return None


def run_bench(bench: Bench, mode: str, logs: Path) -> tuple[dict[str, str], str]:
    """Run one benchmark subprocess; (figures, status) where status is 'ok' or why not."""
    cmd = [sys.executable, "-m", f"bench.{bench.name}", *bench.args[mode]]
    timeout = bench.timeout_s.get(mode, bench.timeout_s["default"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    name = bench.name
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        code = None
    seconds = time.perf_counter() - start
    (logs / f"{name}.out").write_text(stdout)
    (logs / f"{name}.err").write_text(stderr)
    if code is None:
        status = f"timed out after {timeout} s"
    elif code != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        status = f"exit {code}: {tail[0][:200]}"
    else:
        status = "ok"
    figures = parse_figures(stdout)
    figures[f"{name}_wall_s"] = f"{seconds:.1f}"
    return figures, status


def collect(mode: str, logs: Path, threads: int, cuda: bool) -> tuple[dict[str, str], dict]:
    """Run every benchmark of `mode`; all their figures (prefix-free) and each one's status."""
    figures: dict[str, str] = {}
    statuses: dict[str, str] = {}
    for bench in benches(threads):
        name = bench.name
        if bench.needs_cuda and not cuda:
            statuses[name] = "skipped (no CUDA device)"
            continue
        print(f"# running python -m bench.{name} {' '.join(bench.args[mode])}", flush=True)
        got, statuses[name] = run_bench(bench, mode, logs)
        if statuses[name] != "ok":
            print(f"# bench.{name}: {statuses[name]} (see {logs / name}.err)", flush=True)
        for key, value in got.items():
            figures.setdefault(key, value)  # the first benchmark to print a name owns it
    return figures, statuses


def headline(figures: dict[str, str], threads: int) -> list[tuple[str, str]]:
    """The figures docs/performance.md defines, in order, with `n/a` for any not measured."""
    out = []
    for fig in FIGURES:
        for name in fig.names(figures):
            value = number(figures.get(name))
            out.append((name, "n/a" if value is None else f"{value:.4g}"))
    out.append(("threads", str(threads)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smallest sizes: a smoke test")
    mode.add_argument("--full", action="store_true", help="larger runs, knob sweep")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the report goes")
    p.add_argument("--workdir", type=Path, help="logs (default: a new temp folder)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    run_mode = "quick" if args.quick else "full" if args.full else "default"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cogfun-bench-all-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    figures, statuses = collect(run_mode, logs, args.threads, cuda)
    lines = headline(figures, args.threads)
    for name, value in lines:
        print(f"{name}: {value}")
    total = time.perf_counter() - start
    print(f"total_s: {total:.0f}")
    context = {
        "mode": run_mode,
        "command": " ".join(["python -m bench.run_all", *(argv or sys.argv[1:])]),
        "cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "cuda": torch.cuda.get_device_name(0) if cuda else "none",
        "load_avg_start": load,
        "load_avg_end": os.getloadavg()[0],
        "total_s": total,
        "statuses": statuses,
        "logs": str(logs),
    }
    report = write_report(args.docs, figures, lines, context)
    print(f"# wrote {report} and its plots; logs in {logs}")
    return 0 if all(s == "ok" or s.startswith("skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
