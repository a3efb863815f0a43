"""Precompute time against dataset size, and what a stored sample costs on disk.

    python -m bench.scale                     # tiny model, 12 / 24 / 48 clips, ~1 min
    python -m bench.scale --sizes 2,4,8 --frames 5 --size 32      # seconds (what the tests run)

Three datasets of the same kind of clip (each the first n of one generated set, captions cycling
over 4 texts, so captions repeat) are precomputed with cogfun's defaults (decode workers, 4 mask
variants) and the tiny model, each into a fresh store, in this process.

Figures (one `name: value` line each):
- `precompute_s_<n>`: encode wall time (first model load to the last write) for n clips, and
  `precompute_ms_per_sample_<n>`; `precompute_linear_r2` of a straight-line fit of time on n
  (1 = exactly linear) and `precompute_growth_<big>_vs_<small>` (time ratio; linear = size ratio,
  less when a fixed cost such as the models' first call is amortised);
- `bytes_per_sample`, `compression_ratio` (raw payload ÷ disk bytes, `cogfun inspect --json`'s)
  of the largest store;
- `caption_dedup_bytes_with`, `caption_dedup_bytes_without`, `caption_dedup_saving`: that store's
  disk bytes as written (each distinct caption embedded once) and computed as if every sample
  kept its own caption embedding (the embedding's stored size x samples instead of x captions);
  `caption_dedup_saving_real_2b`: the same computation with the real 2b-InP's raw sizes
  (T5 226 x 4096 bf16 per caption; 49x512x512 moments + 4 mask variants per sample) at this
  dataset's captions-per-sample ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CAPTIONS = ["a red ball rolling", "a dog on the beach", "a boat on a lake", "a bird over a city"]


def write_clips(root: Path, n: int, frames: int, side: int) -> Path:
    """n clips (one `frames`-frame stride-3 clip each) with captions cycling over CAPTIONS."""
    from cogfun.testing.media import write_video

    rows = []
    for i in range(n):
        write_video(root / f"v{i:03d}.mp4", 3 * frames + 3, side, side + side // 2, seed=i)
        rows.append({"file_path": f"v{i:03d}.mp4", "text": CAPTIONS[i % 4], "type": "video"})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


def precompute(model: Path, data: Path, meta: Path, out: Path, frames: int, size: int) -> float:
    """Encode wall seconds of one precompute with cogfun's defaults at this clip shape."""
    return precompute_run(model, data, meta, out, frames, size)[0].encode_s


def precompute_run(model: Path, data: Path, meta: Path, out: Path, frames: int, size: int) -> tuple:
    """One precompute with cogfun's defaults at this clip shape: (its Outcome, whole wall s)."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run_precompute

    cfg = PrecomputeConfig(
        data=data,
        meta=meta,
        model=model,
        out=out,
        image_sample_size=size,
        video_sample_size=size,
        token_sample_size=size,
        video_sample_n_frames=frames,
        progress="none",
    )
    start = time.perf_counter()
    outcome = run_precompute(cfg)
    if outcome.code != 0:
        raise RuntimeError(f"precompute of {data} into {out} stored nothing")
    return outcome, time.perf_counter() - start


def store_bytes(path: Path) -> dict[str, float]:
    """Disk bytes per sample, compression ratio and the caption-dedup computation of one store."""
    from cogfun.common.store import open_store
    from cogfun.common.store.io import disk_bytes

    reader = open_store(path)
    s = reader.summary()
    samples, written = s["samples"], s["captions"]["written"]
    captions = disk_bytes(path / "captions")  # embeddings, texts and checksums together
    per_caption = captions / written
    # Without dedup every sample keeps its own embedding; the empty caption (dropout) stays too.
    without = s["bytes"] + per_caption * (samples + 1 - written)
    return {
        "samples": samples,
        "captions_written": written,
        "bytes_per_sample": s["bytes"] / samples,
        "compression_ratio": s["compression_ratio"],
        "caption_dedup_bytes_with": float(s["bytes"]),
        "caption_dedup_bytes_without": without,
        "caption_dedup_saving": without / s["bytes"],
        "caption_dedup_saving_real_2b": real_2b_saving(samples, written),
    }


def real_2b_saving(samples: int, captions: int) -> float:
    """(bytes without dedup) / (bytes with) for the real 2b-InP's raw sizes, K = 4 variants."""
    f, c2, h, w, k = 13, 32, 64, 64, 4  # 49x512x512 moments: (13, 2*16, 64, 64)
    sample = 2 * (f * c2 * h * w + k * f * h * w + k * f * c2 * h * w)  # latents, masks, masked
    caption = 2 * 226 * 4096
    return (samples * (sample + caption)) / (samples * sample + captions * caption)


def linear_fit(sizes: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """(intercept s, slope s/sample, r^2) of seconds ~ a + b * size."""
    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (intercept + slope * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return float(intercept), float(slope), 1.0 - residual / total if total else 1.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="12,24,48", help="three dataset sizes (clips)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip (4k+1)")
    p.add_argument("--size", type=int, default=64, help="bucket edge in pixels (x16)")
    args = p.parse_args(argv)
    sizes = sorted(int(v) for v in args.sizes.split(","))
    from cogfun.common.progress import setup_logging
    from cogfun.testing.tiny import write_tiny_model

    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-scale-"))
    try:
        model = write_tiny_model(work / "model")
        data = write_clips(work / "data", max(sizes), args.frames, args.size)
        rows = json.loads((data / "metadata.json").read_text())
        seconds = []
        for n in sizes:
            meta = data / f"meta_{n}.json"
            meta.write_text(json.dumps(rows[:n]))
            seconds.append(
                precompute(model, data, meta, work / f"s{n}.zarr", args.frames, args.size)
            )
        clip = f"{args.frames}x{args.size}x{args.size}"
        print(f"model: tiny; clips {clip}; captions cycling over {len(CAPTIONS)} texts")
        for n, s in zip(sizes, seconds, strict=True):
            print(f"precompute_s_{n}: {s:.3f}")
            print(f"precompute_ms_per_sample_{n}: {1000 * s / n:.1f}")
        intercept, slope, r2 = linear_fit(sizes, seconds)
        print(f"precompute_fit: {intercept:.3f} s + {1000 * slope:.1f} ms x samples")
        print(f"precompute_linear_r2: {r2:.4f}")
        print(f"precompute_growth_{sizes[-1]}_vs_{sizes[0]}: {seconds[-1] / seconds[0]:.3f}")
        for name, value in store_bytes(work / f"s{sizes[-1]}.zarr").items():
            print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
