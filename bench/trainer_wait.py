"""Data wait inside `cogfun train` itself, reader threads versus worker processes.

    python -m bench.trainer_wait                 # tiny model, 8 workers, batch 1, 150 steps
    python -m bench.trainer_wait --workdir W     # keep the model and store in W (reused)

`bench/train.py` measures the loader through its own training harness; this runs the real
command (`cogfun train --dataloader-backend threads|processes`) on the tiny model's store, once
per backend and torch thread count (OMP_NUM_THREADS), alternated, and reads its
`metrics.jsonl`: the sum of `data_wait_s` ÷ the sum of `step_time_s` over the steps after
`--skip` (which drain what was read ahead while the loader started). One `name: value` line per
figure: `trainer_wait_fraction_<backend>_t<threads>` and `trainer_wait_ms_<backend>_t<threads>`
(median wait per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.train_setup import build_setup

BACKENDS = ("threads", "processes")


def run_trainer(
    args: argparse.Namespace, store: Path, model: Path, out: Path, backend: str, threads: int
) -> dict[str, float]:
    """One `cogfun train` run; its wait fraction and median wait per step (ms)."""
    cogfun = Path(sys.executable).with_name("cogfun")
    command = [
        str(cogfun), "train", "--mode", "inpaint", "--latents", str(store), "--model", str(model),
        "--output-dir", str(out), "--max-train-steps", str(args.steps), "--train-batch-size", "1",
        "--dataloader-num-workers", str(args.workers), "--dataloader-backend", backend,
        "--report-to", "none", "--progress", "none", "--checkpointing-steps", "100000",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.skip :]
    wait = sum(r["data_wait_s"] for r in rows) / sum(r["step_time_s"] for r in rows)
    return {"fraction": wait, "ms": statistics.median(r["data_wait_s"] for r in rows) * 1e3}


def measure(args: argparse.Namespace, workdir: Path) -> None:
    setup = build_setup(workdir, True, 4, 64, 49, 80, 64, args.threads[-1])
    for threads in args.threads:
        for i, backend in enumerate(BACKENDS if threads % 2 else reversed(BACKENDS)):
            out = workdir / f"run_{backend}_t{threads}_{i}"
            got = run_trainer(args, setup.store, setup.model, out, backend, threads)
            print(f"trainer_wait_fraction_{backend}_t{threads}: {got['fraction']:.4f}")
            print(f"trainer_wait_ms_{backend}_t{threads}: {got['ms']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="model, store and runs (default: a temp dir)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--skip", type=int, default=40, help="first steps left out")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument(
        "--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2],
        help="torch thread counts to run (comma-separated)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        p.error("--skip must be below --steps")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        measure(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="cogfun-bench-trainer-") as tmp:
            measure(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
