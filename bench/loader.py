"""Training data loader benchmark: throughput against a raw zarr read, and open cost at 1k vs 100k.

    python -m bench.loader                      # builds its stores under the temp dir, prints figures
    python -m bench.loader --workdir W --workers 2 --repeats 3

Figures (one `name: value` line each, defined in docs/performance.md):
- `loader_vs_raw_read`: samples/s of `make_dataloader` (default reader threads, batched reads,
  checksums) over one epoch, divided by samples/s of one tight single-process loop that reads
  each sample's arrays with zarr and turns the uint16 bits into bf16 tensors. Both read the same store, alternated `--repeats`
  times after a warm-up pass (page cache warm for both); medians are reported, with the spread.
  `loader_samples_per_s_processes` is the same loader with worker processes, alternated with it.
- `bytes_read_per_step_all_variants`, `bytes_read_per_step_picked` (and their `_ratio`): bytes
  read from the store's files (counted through `cogfun.common.store.chunks.read_chunk_bytes`) per
  training batch over one epoch of the throughput store, by a loader that reads every one of the
  K mask variants (before) and by one that reads only the variant each step draws (after:
  `cogfun.train.picks`, as `cogfun train` does); `real2b_bytes_read_per_step_*` the same on the
  real-scale store below.
- `real2b_samples_per_s` (and `_processes`, `real2b_mb_per_s`): the loader over `--real-samples`
  samples of the real 2b-InP's sizes (13x60x90 latent moments, 4 masked-video variants, a
  226x4096 caption), batch 4: what one rank's loader can feed a real training step.
- `open_s_1k`, `open_s_100k`, `rss_mb_1k`, `rss_mb_100k`: seconds and the training process's RSS
  from `make_dataloader` (which opens the store) to the first batch, each in a fresh process after
  imports, on stores of 1,000 and 100,000 small samples written in bulk through the store module.

The stores are reused from `--workdir` when they are already complete (building the 100k store
takes minutes: the store keeps one chunk file per sample per array).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from cogfun.common.store import (
    SCHEMA_VERSION,
    BucketPlan,
    RowPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    open_for_write,
    open_store,
)

K = 4  # mask variants per sample, precompute's default
C = 16  # VAE latent channels; moments store 2C
TEXT = (15, 256)  # proportional T5: 15 tokens x 256
WRITE_CHUNK = 256  # samples per write_samples call


def make_plan(buckets: dict[str, tuple[int, int, int, int]], n_captions: int) -> StorePlan:
    """`buckets`: name -> (frames, height, width, rows); captions cycle over n_captions texts."""
    plan = []
    for name, (f, h, w, n) in buckets.items():
        rows = [RowPlan(1 + i % n_captions, {"file": f"{name}/{i}"}) for i in range(n)]
        plan.append(BucketPlan(name, f, h, w, (f - 1) // 4 + 1, h // 8, w // 8, rows))
    return StorePlan(plan, [""] + [f"caption {i}" for i in range(n_captions)])


def build_store(
    path: Path, plan: StorePlan, masks: int, seed: int = 0, text: tuple[int, int] = TEXT
) -> float:
    """Write every planned sample with random bf16 tensors through the store module; seconds taken.
    A complete store at `path` with the same buckets and counts, in today's layout, is reused
    (returns 0.0); anything else there (an older or interrupted bench store) is removed first."""
    try:
        reader = open_store(path)
        counts = {n: len(i.slots) for n, i in reader.buckets.items()}
        current = reader.root_attrs.get("schema_version") == SCHEMA_VERSION
        if current and counts == {b.name: len(b.rows) for b in plan.buckets}:
            return 0.0
    except StoreError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    layout = StoreLayout(C, "moments", masks, *text)
    settings = {"bench": "loader", "seed": seed, "masks": masks, "text": list(text)}
    writer = open_for_write(
        path,
        settings=settings,
        attrs={"scaling_factor": 1.15258426},
        plan=plan,
        layout=layout,
        create=True,
    )
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(plan.captions)):
        writer.write_caption(i, torch.randn(*text, generator=gen).bfloat16())
    for b in plan.buckets:
        chunk = min(WRITE_CHUNK, len(b.rows))
        lat = (b.latent_frames, 2 * C, b.latent_h, b.latent_w)
        # One random block reused for every write: content does not change read cost, and fresh
        # random tensors for 100k samples would dominate the build time.
        block = torch.randn(chunk, *lat, generator=gen).bfloat16()
        extra: tuple = ()
        if masks:
            writer.write_all_masked(b.name, torch.randn(*lat, generator=gen).bfloat16())
            m = (torch.rand(chunk, masks, lat[0], 1, *lat[2:], generator=gen) > 0.5).bfloat16()
            mv = torch.randn(chunk, masks, *lat, generator=gen).bfloat16()
            flags = torch.zeros(chunk, masks, dtype=torch.bool)
            flags[::7, 0] = True  # some all-masked variants, as precompute stores them
            extra = (m, mv, flags)
        for start in range(0, len(b.rows), chunk):
            n = min(chunk, len(b.rows) - start)
            writer.write_samples(
                b.name, range(start, start + n), block[:n], *(x[:n] for x in extra)
            )
    writer.finalize()
    return time.perf_counter() - t0


# ---- throughput: raw zarr loop vs the training loader ----


def raw_read(path: Path) -> tuple[int, float]:
    """One tight single-process pass: every stored sample's arrays read one by one with zarr and
    turned into tensors (bf16 from the uint16 bits). Returns (samples, seconds)."""
    import zarr

    t0 = time.perf_counter()
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    n = 0
    for name in root.attrs["buckets"]:
        group = root[f"buckets/{name}"]
        arrays = [group[a] for a in ("latents", "masks", "masked_latents") if a in group]
        flags = group["all_masked"] if "all_masked" in group else None
        slots = np.flatnonzero(np.asarray(group["done"][:]))
        for s in slots:
            sample = [torch.from_numpy(a[int(s)]).view(torch.bfloat16) for a in arrays]
            if flags is not None:
                sample.append(torch.from_numpy(flags[int(s)].astype(bool)))
            n += 1
    return n, time.perf_counter() - t0


def loader_epochs(
    path: Path, workers: int, batch_size: int, epochs: int, backend: str = "threads"
) -> list[float]:
    """Samples/s of `make_dataloader` for each of `epochs` timed epochs after one warm-up epoch
    (worker start-up excluded: persistent workers live for the whole run)."""
    from cogfun.train.data import make_dataloader

    loader, sampler = make_dataloader(
        path, batch_size, workers, seed=0, rank=0, world=1, backend=backend
    )
    rates = []
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch["slots"]) for batch in loader)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    del loader
    return rates


def bytes_per_step(path: Path, batch_size: int, picked: bool) -> float:
    """Store bytes read per batch over one epoch of training's way through the loader
    (`follow`, one batch a step), every mask variant read or (`picked`) only the step's."""
    from cogfun.common.store import chunks
    from cogfun.train.data import make_dataloader
    from cogfun.train.picks import VariantPicker
    from cogfun.train.state import TrainingState

    picker = VariantPicker(0, 0, 1, "moments", K) if picked else None
    loader, sampler = make_dataloader(path, batch_size, 0, 0, 0, 1, picker=picker)
    state = TrainingState(batches_per_epoch=len(sampler), order=sampler.order())
    real, counted = chunks.read_chunk_bytes, []

    def count(file: str, start: int = 0, length: int | None = None) -> bytes | None:
        data = real(file, start, length)
        counted.append(len(data or b""))
        return data

    chunks.read_chunk_bytes = count  # the benchmark's counter, never the product's
    try:
        stream = loader.follow(state)
        for _ in range(len(sampler)):
            next(stream)
    finally:
        chunks.read_chunk_bytes = real
    return sum(counted) / len(sampler)


def simulated_wait(path: Path, workers: int, batch_size: int, step_ms: float, steps: int) -> float:
    """Share of time a consumer that busies the CPU for `step_ms` per batch (a stand-in for the
    training step, on the same cores as the workers) spends waiting for the next batch. The first
    batch (worker start-up, measured by open_s) is not counted."""
    from cogfun.train.data import make_dataloader

    loader, sampler = make_dataloader(path, batch_size, workers, seed=0, rank=0, world=1)
    a = torch.randn(192, 192)
    wait = total = 0.0
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        it = iter(loader)
        while done < steps:
            t0 = time.perf_counter()
            if next(it, None) is None:
                break
            t1 = time.perf_counter()
            while time.perf_counter() - t1 < step_ms / 1000:
                a = torch.tanh(a @ a)
            if epoch or done:
                wait, total = wait + t1 - t0, total + time.perf_counter() - t0
            done += 1
        epoch += 1
    del loader
    return wait / total


def _median_spread(values: list[float]) -> tuple[float, float]:
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med else 0.0


# ---- open cost: measured in a fresh process per store ----


def open_probe(path: Path, workers: int, batch_size: int) -> dict:
    """Seconds and RSS from make_dataloader (the store open) to the first batch, this process."""
    import psutil
    from cogfun.train.data import make_dataloader

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    loader, _ = make_dataloader(path, batch_size, workers, seed=0, rank=0, world=1)
    batch = next(iter(loader))
    seconds = time.perf_counter() - t0
    rss = proc.memory_info().rss
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    assert batch["latents"].shape[0] == batch_size
    return {
        "open_s": seconds,
        "rss_mb": rss / 2**20,
        "rss_delta_mb": (rss - rss0) / 2**20,
        "workers_rss_mb": children / 2**20,
    }


def run_probe(path: Path, workers: int, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "bench.loader", "--probe", str(path), "--workers", str(workers)]
    out = subprocess.run(
        cmd + ["--batch-size", str(batch_size)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


REAL_2B_BUCKET = (49, 480, 720)  # frames, height, width: 13 x 60 x 90 latents
REAL_2B_TEXT = (226, 4096)  # T5-XXL


def real_scale(args: argparse.Namespace) -> None:
    """The loader on samples of the real 2b-InP's sizes (moments, K=4 masks, T5-XXL captions:
    ~25 MB a sample before compression): can one rank's loader feed a real training step? Both
    backends, alternated, `--workers` workers, batch 4."""
    f, h, w = REAL_2B_BUCKET
    plan = make_plan({f"f{(f - 1) // 4 + 1}_h{h // 8}_w{w // 8}": (f, h, w, args.real_samples)}, 4)
    path = args.workdir / f"real2b_{args.real_samples}.zarr"
    build_s = build_store(path, plan, masks=K, text=REAL_2B_TEXT)
    print(f"store_build_s_real2b: {build_s:.1f}  ({args.real_samples} samples, reused if 0.0)")
    b = plan.buckets[0]
    latent = b.latent_frames * 2 * C * b.latent_h * b.latent_w * 2  # bf16 moments
    mask = b.latent_frames * b.latent_h * b.latent_w * 2
    sample_mb = (latent * (1 + K) + mask * K + K + REAL_2B_TEXT[0] * REAL_2B_TEXT[1] * 2) / 1e6
    rates: dict[str, list[float]] = {"threads": [], "processes": []}
    for _ in range(max(1, args.repeats // 2)):
        for backend, got in rates.items():
            got += loader_epochs(path, args.workers, 4, epochs=1, backend=backend)
    threads = statistics.median(rates["threads"])
    print(f"real2b_sample_mb: {sample_mb:.1f}  (latents, {K} masks and masked latents, caption)")
    print(f"real2b_samples_per_s: {threads:.1f}  ({args.workers} reader threads, batch 4)")
    print(f"real2b_mb_per_s: {threads * sample_mb:.0f}")
    print(f"real2b_samples_per_s_processes: {statistics.median(rates['processes']):.1f}")
    every, picked = (bytes_per_step(path, 4, p) for p in (False, True))
    print(f"real2b_bytes_read_per_step_all_variants: {every:.0f}  (batch 4)")
    print(f"real2b_bytes_read_per_step_picked: {picked:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cogfun_bench_loader"
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the loader figure"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--videos", type=int, default=192, help="49x128x128 samples in the throughput store"
    )
    ap.add_argument(
        "--images", type=int, default=192, help="1x128x128 samples in the throughput store"
    )
    ap.add_argument("--step-ms", type=float, default=100.0, help="simulated step time (CPU busy)")
    ap.add_argument(
        "--large", type=int, default=100_000, help="samples in the large open-cost store"
    )
    ap.add_argument(
        "--real-samples",
        type=int,
        default=16,
        help="samples of the real 2b-InP's sizes (~25 MB each) in the real-scale store (0: skip)",
    )
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    # More workers than cores is measured on purpose (workers4); torch warns about it each time.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.probe:
        print(json.dumps(open_probe(args.probe, args.workers, args.batch_size)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"threads: {torch.get_num_threads()}  workers: {args.workers}  batch: {args.batch_size}")
    store = args.workdir / f"throughput_{args.videos}x{args.images}.zarr"
    plan = make_plan(
        {"f13_h16_w16": (49, 128, 128, args.videos), "f1_h16_w16": (1, 128, 128, args.images)}, 8
    )
    build_s = build_store(store, plan, masks=K)
    n_samples = args.videos + args.images
    print(f"store_build_s_throughput: {build_s:.1f}  ({n_samples} samples, K={K}, reused if 0.0)")

    raw_read(store)  # warm the page cache for both sides
    raw_rates, loader_rates, process_rates = [], [], []
    for _ in range(args.repeats):  # alternate: this machine's speed drifts over minutes
        n, seconds = raw_read(store)
        raw_rates.append(n / seconds)
        loader_rates += loader_epochs(store, args.workers, args.batch_size, epochs=1)
        process_rates += loader_epochs(
            store, args.workers, args.batch_size, epochs=1, backend="processes"
        )
    raw, raw_spread = _median_spread(raw_rates)
    loader, loader_spread = _median_spread(loader_rates)
    procs, procs_spread = _median_spread(process_rates)
    print(f"raw_read_samples_per_s: {raw:.1f}  (spread {raw_spread:.0%})")
    print(f"loader_samples_per_s: {loader:.1f}  (spread {loader_spread:.0%})")
    print(f"loader_samples_per_s_processes: {procs:.1f}  (spread {procs_spread:.0%})")
    for w in sorted({0, 1, 2, 4} - {args.workers}):
        rate = statistics.median(loader_epochs(store, w, args.batch_size, epochs=2))
        print(f"loader_samples_per_s_workers{w}: {rate:.1f}")
    print(f"loader_vs_raw_read: {loader / raw:.3f}")
    every, picked = (bytes_per_step(store, args.batch_size, p) for p in (False, True))
    print(
        f"bytes_read_per_step_all_variants: {every:.0f}  (batch {args.batch_size}, K={K}: before)"
    )
    print(f"bytes_read_per_step_picked: {picked:.0f}  (the variant each step draws: after)")
    print(f"bytes_read_per_step_ratio: {picked / every:.3f}")
    wait = simulated_wait(store, args.workers, args.batch_size, args.step_ms, steps=120)
    print(f"data_wait_fraction_sim: {wait:.4f}  (consumer busy {args.step_ms:.0f} ms per batch)")
    if args.real_samples:
        real_scale(args)

    small = make_plan({"f1_h8_w8": (1, 64, 64, 1000)}, 4)
    large = make_plan({"f1_h8_w8": (1, 64, 64, args.large)}, 4)
    # Named by size: runs of other sizes (run_all --quick) keep their own stores.
    paths = {
        "1k": args.workdir / "open_1000.zarr",
        "100k": args.workdir / f"open_{args.large}.zarr",
    }
    for label, p in (("1k", small), ("100k", large)):
        seconds = build_store(paths[label], p, masks=0)
        print(f"store_build_s_{label}: {seconds:.1f}  (reused if 0.0)")
    probes: dict[str, list[dict]] = {"1k": [], "100k": []}
    for _ in range(args.repeats):
        for label in probes:
            probes[label].append(run_probe(paths[label], args.workers, args.batch_size))
    for key, name in (("open_s", "open_s"), ("rss_mb", "rss_mb"), ("rss_delta_mb", "rss_delta_mb")):
        for label, runs in probes.items():
            med, spread = _median_spread([r[key] for r in runs])
            print(f"{name}_{label}: {med:.3f}  (spread {spread:.0%})")
    for label, runs in probes.items():
        print(f"workers_rss_mb_{label}: {statistics.median(r['workers_rss_mb'] for r in runs):.1f}")
    ratio = statistics.median(r["open_s"] for r in probes["100k"]) / statistics.median(
        r["open_s"] for r in probes["1k"]
    )
    print(f"open_s_ratio_100k_vs_1k: {ratio:.2f}")


if __name__ == "__main__":
    main()
