"""Files a store is made of, per sample: the sharded layout (schema 2) against one file per sample
per array (schema 1, cogfun before sharding), on the same samples.

    python -m bench.store_layout                       # 2 and 6 shards of 512 samples, ~1 min
    python -m bench.store_layout --shards 1,3 --shard-samples 16    # seconds (what the tests run)

Two stores of `shards x shard-samples` inpaint samples (K = 4 mask variants, one distinct caption per
sample: the worst case for caption files) is written through the store's own writer with random
bits in place of VAE output, sealed and finalized; then a schema-1 copy of it is made with plain
zarr (`cogfun.testing.store_files.schema1_copy`) of the smaller. The number of files does not depend on the size
of a sample (a shard holds `shard-samples` samples whatever their bytes), so the small latent
shape used here gives the count at real 2b-InP sample sizes too; `shard_mb_real_2b` says how big
one shard file of the largest array is at real size.

Figures (one `name: value` line each):
- `files_per_sample`: the files the larger store adds per sample over the smaller (what a growing
  dataset costs: the metadata files of a bucket are paid once); goal <= 1/64;
- `files_per_sample_whole`: every file of the larger store (metadata included) / its samples;
- `files_per_sample_schema1`: every file of the schema-1 copy / its samples;
- `file_reduction`: schema-1 files / sharded files, same samples;
- `open_s`: `open_store` of the sharded store (reads metadata and the done index only);
- `write_samples_per_s`: samples staged, sealed and finalized per second (random bits, no VAE);
- `shard_mb_real_2b`: raw MB of one `masked_latents` shard file at the real 2b-InP sample shape
  (49 frames at 512x512: 13 x 32 x 64 x 64 moments, 4 variants) and the default shard size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

K = 4
REAL_2B = (13, 32, 64, 64)  # latent frames, moment channels (2 x 16), h, w of 49x512x512


def count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def write_store(out: Path, samples: int, shard_samples: int) -> float:
    """A finalized inpaint store of `samples` random samples; returns the seconds it took."""
    import torch
    from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write

    captions = ["", *(f"caption {i}" for i in range(samples))]
    rows = [RowPlan(1 + i, {"file": f"clip{i}.mp4"}) for i in range(samples)]
    plan = StorePlan([BucketPlan("f2_h16_w16", 5, 128, 128, 2, 16, 16, rows)], captions)
    layout = StoreLayout(4, "moments", K, 8, 16)
    start = time.perf_counter()
    w = open_for_write(
        out,
        settings={"bench": "store_layout"},
        attrs={"scaling_factor": 1.0},
        plan=plan,
        layout=layout,
        create=True,
        shard_samples=shard_samples,
    )
    g = torch.Generator().manual_seed(0)
    for i in range(len(captions)):
        w.write_caption(i, torch.randn(8, 16, generator=g))
    w.write_all_masked("f2_h16_w16", torch.randn(2, 8, 16, 16, generator=g))  # before those
    batch = 64
    for lo in range(0, samples, batch):
        n = min(batch, samples - lo)
        w.write_samples(
            "f2_h16_w16",
            range(lo, lo + n),
            torch.randn(n, 2, 8, 16, 16, generator=g),
            (torch.rand(n, K, 2, 1, 16, 16, generator=g) > 0.5).float(),
            torch.randn(n, K, 2, 8, 16, 16, generator=g),
            torch.arange(n * K).reshape(n, K) % 7 == 0,  # some all-masked variants
        )
        for shard in range(lo // shard_samples, (lo + n) // shard_samples):
            w.seal("f2_h16_w16", shard)  # as precompute does once a shard's samples are staged
    w.finalize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from cogfun.common.store import open_store
    from cogfun.common.store.specs import SHARD_SAMPLES
    from cogfun.testing.store_files import schema1_copy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="2,6", help="shards of the smaller and the larger store")
    p.add_argument("--shard-samples", type=int, default=SHARD_SAMPLES)
    args = p.parse_args(argv)
    small, large = (int(v) * args.shard_samples for v in args.shards.split(","))
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-layout-"))
    try:
        write_store(work / "small.zarr", small, args.shard_samples)
        seconds = write_store(work / "large.zarr", large, args.shard_samples)
        start = time.perf_counter()
        open_store(work / "large.zarr")
        open_s = time.perf_counter() - start
        old = schema1_copy(work / "small.zarr", work / "schema1.zarr")
        files_small, files_large = (
            count_files(work / "small.zarr"),
            count_files(work / "large.zarr"),
        )
        files_old = count_files(old)
        added = (files_large - files_small) / (large - small)
        print(f"samples: {small} and {large}")
        print(f"shard_samples: {args.shard_samples}")
        print(f"files: {files_small} and {files_large}")
        print(f"files_per_sample: {added:.5f}  (goal <= {1 / 64:.5f})")
        print(f"files_per_sample_whole: {files_large / large:.5f}")
        print(f"files_per_sample_schema1: {files_old / small:.5f}")
        print(f"file_reduction: {files_old / files_small:.1f}")
        print(f"open_s: {open_s:.4f}")
        print(f"write_samples_per_s: {large / seconds:.1f}")
        shard_bytes = SHARD_SAMPLES * K * int(np.prod(REAL_2B)) * 2
        print(f"shard_mb_real_2b: {shard_bytes / 2**20:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
