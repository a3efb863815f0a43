"""Training from a store on S3 against the same store on local disk.

    python -m bench.object_store                 # about 3 minutes on 2 CPU cores
    python -m bench.object_store --quick         # seconds: the smallest sizes (tests)

An S3-compatible server (moto's server mode, `cogfun.testing.s3`) runs in its own process on
127.0.0.1: every request is real HTTP, but with no network between, so the figures show what
cogfun's read path costs, not what a remote region adds (a real S3 request takes ~10-30 ms more:
the loader's reads run ahead and in parallel so that this latency hides behind the step).

A store is written to local disk, then copied object by object under an S3 prefix: the same bytes.

Figures (one `name: value` line each):
- `disk_loader_samples_per_s`, `s3_loader_samples_per_s`: samples/s of the training loader
  (`make_dataloader`, default reader threads, checksums verified) over one epoch after a warm-up
  epoch, alternated `--repeats` times, medians; `s3_vs_disk_loader` their ratio;
- `s3_cached_loader_samples_per_s`: the same from S3 with `--cache-dir` (the warm-up epoch filled
  the cache: later epochs read local files);
- `disk_data_wait_fraction`, `s3_data_wait_fraction`: `cogfun train` of the tiny model (default
  reader threads) on a precomputed store for `--steps` steps, from disk and from S3 (alternated):
  the summed time the step waited for its batch over the summed step time, after `--warmup` steps
  (goal < 0.02); `s3_cached_data_wait_fraction` from S3 with a fresh `--cache-dir` (the first
  epoch fills it). The S3 server is Python (moto) on the same 2 cores as the trainer: each
  request costs CPU the step needs, which a real S3 endpoint does not take from the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def upload(local: Path, url: str, options: dict) -> int:
    """Copy every file of the store at `local` under `url`, byte for byte; returns the count."""
    from cogfun.common.store import location

    dest = location(url, options)
    n = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (dest / str(path.relative_to(local))).write(path.read_bytes())
            n += 1
    return n


def loader_rate(store: object, batch_size: int, cache_dir: Path | None = None) -> float:
    """Samples/s of the training loader over one epoch, after one warm-up epoch."""
    from cogfun.train.data import make_dataloader

    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else None
    loader, sampler = make_dataloader(store, batch_size, 2, seed=0, rank=0, world=1, cache=cache)
    rate = 0.0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch["slots"]) for batch in loader)
        rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def wait_fraction(args: list[str], out: Path, warmup: int) -> tuple[float, float]:
    """Run `cogfun train ARGS`; (data wait / step time after `warmup` steps, median step s)."""
    from cogfun.train.metrics import read_metrics

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [str(BIN / "cogfun"), *args], env=env, capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        raise RuntimeError(f"cogfun train failed:\n{res.stderr[-3000:]}")
    rows = read_metrics(out / "metrics.jsonl")[warmup:]
    wait = sum(r["data_wait_s"] for r in rows) / sum(r["step_time_s"] for r in rows)
    return wait, statistics.median(r["step_time_s"] for r in rows)


def default_workers() -> int:
    """`cogfun train`'s default reader threads (what a user gets without the flag)."""
    import dataclasses

    from cogfun.train.config import TrainConfig

    return next(
        f.default for f in dataclasses.fields(TrainConfig) if f.name == "dataloader_num_workers"
    )


def main(argv: list[str] | None = None) -> int:
    from cogfun.testing.runs import train_args
    from cogfun.testing.s3 import ServerProcess
    from cogfun.testing.tiny import write_tiny_model

    from bench.loader import K, build_store, make_plan
    from bench.scale import precompute_run, write_clips

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest sizes")
    p.add_argument("--samples", type=int, default=128, help="17x128x128 samples, loader store")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=8, help="clips of the training store")
    p.add_argument("--steps", type=int, default=40, help="training steps of each wait run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternated wait runs of each store")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.clips, args.steps, args.rounds = 8, 1, 2, 6, 1
        args.warmup = 2
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-s3-"))
    server = ServerProcess()
    try:
        options = server.options()
        from cogfun.common.store import location

        bucket = server.make_bucket()
        local = work / "loader.zarr"
        build_store(local, make_plan({"f5_h16_w16": (17, 128, 128, args.samples)}, 8), masks=K)
        url = f"s3://{bucket}/loader.zarr"
        files = upload(local, url, options)
        remote = location(url, options)
        print(f"store: {args.samples} samples, K={K}, {files} files")
        disk, s3, cached = [], [], []
        for r in range(args.repeats):
            disk.append(loader_rate(local, args.batch_size))
            s3.append(loader_rate(remote, args.batch_size))
            cached.append(loader_rate(remote, args.batch_size, work / f"cache{r}"))
        d, s, c = (statistics.median(v) for v in (disk, s3, cached))
        print(f"disk_loader_samples_per_s: {d:.1f}")
        print(f"s3_loader_samples_per_s: {s:.1f}")
        print(f"s3_cached_loader_samples_per_s: {c:.1f}")
        print(f"s3_vs_disk_loader: {s / d:.3f}")

        model = write_tiny_model(work / "model")
        data = write_clips(work / "clips", args.clips, 9, 64)
        train_store = work / "train.zarr"
        precompute_run(model, data, data / "metadata.json", train_store, 9, 64)
        train_url = f"s3://{bucket}/train.zarr"
        upload(train_store, train_url, options)
        names = ("disk", "s3", "s3_cached")
        waits: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        workers = default_workers()
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                out = work / f"train_{name}_{r}"
                store = train_store if name == "disk" else train_url
                flags = train_args(store, model, out, max_train_steps=args.steps,
                                   checkpointing_steps=10_000, train_batch_size=2,
                                   dataloader_num_workers=workers)  # fmt: skip
                if name != "disk":
                    flags += ["--storage-options", json.dumps(options)]
                if name == "s3_cached":  # a fresh cache each run: its first epoch fills it
                    flags += ["--cache-dir", str(work / f"train_cache_{r}")]
                waits[name].append(wait_fraction(flags, out, args.warmup))
        for name, got in waits.items():
            print(f"{name}_data_wait_fraction: {statistics.median(w for w, _ in got):.4f}")
            print(f"{name}_step_ms: {statistics.median(m for _, m in got) * 1e3:.1f}")
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
