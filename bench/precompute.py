"""Precompute throughput: samples/s, where the time goes, and how much the stages overlap.

    python -m bench.precompute                    # proportional model (docs/performance.md), ~2 min
    python -m bench.precompute --model tiny --videos 16 --masks 4 --threads 2 --workers 2

It builds its own model and media in a temporary folder, then encodes the same dataset twice:

1. stages alone: decoding inline (0 workers) and writes inline, so decode, VAE, T5 and write are
   each timed with nothing else running;
2. pipelined: decode workers ahead of the VAE and the writer thread behind it, as
   `cogfun precompute` runs by default.

`overlap` = pipelined encode wall time / (decode + VAE + T5 + write of run 1): below 1 means the
stages overlap (1 = fully serial). Both stores must have the same digest. The encode wall time
runs from the first model load to the last write (imports, planning and store creation excluded).

Defaults suit a 2-core CPU: one torch thread for the encoders and one decode worker, so the
pipelined run has a core for each (more threads than cores slows the VAE down several times
when the cores are shared), and one mask variant per sample to keep it to minutes (each
variant costs one more VAE encode).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from cogfun.common.progress import setup_logging
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run_precompute
from cogfun.testing.media import write_image, write_video
from cogfun.testing.tiny import write_tiny_model

SCALING_2B = 1.15258426


def write_proportional_model(out: Path) -> Path:
    """The VAE, T5 and tokenizer of the proportional model (docs/performance.md: the real 2b
    scaled so per-sample costs keep the real VAE : T5 ratio). Of the transformer only its config.json is
    needed (precompute reads it, never its weights): the tiny 2b-InP one."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    tiny = write_tiny_model(out / "_tiny")
    shutil.copytree(tiny / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    shutil.copy(tiny / "model_index.json", out / "model_index.json")
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny / "transformer" / "config.json", out / "transformer" / "config.json")
    vocab = json.loads((tiny / "text_encoder" / "config.json").read_text())["vocab_size"]
    shutil.rmtree(tiny)
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=3,
        norm_num_groups=4,
        latent_channels=16,
        temporal_compression_ratio=4,
        scaling_factor=SCALING_2B,
    ).save_pretrained(out / "vae")
    config = T5Config(
        vocab_size=vocab,
        d_model=256,
        d_kv=64,
        num_heads=4,
        d_ff=640,
        num_layers=24,
        feed_forward_proj="gated-gelu",
    )
    T5EncoderModel(config).save_pretrained(out / "text_encoder")
    return out


def write_dataset(
    root: Path, videos: int, images: int, height: int, width: int, frames: int = 49
) -> Path:
    """Clips long enough for one `frames`-frame stride-3 clip (150 frames for 49), images,
    metadata.json."""
    rows = []
    for i in range(videos):
        write_video(root / f"v{i:03d}.mp4", 3 * frames + 3, height, width, seed=i)
        rows.append({"file_path": f"v{i:03d}.mp4", "text": f"clip number {i}", "type": "video"})
    for i in range(images):
        write_image(root / f"i{i:03d}.png", height, width, seed=100 + i)
        rows.append({"file_path": f"i{i:03d}.png", "text": f"image number {i}", "type": "image"})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("proportional", "tiny"), default="proportional")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=1, help="decode workers of the pipelined run"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both runs)")
    parser.add_argument("--masks", type=int, default=1, help="--masks-per-sample")
    parser.add_argument("--source", default="360x640", help="HxW of the generated media")
    parser.add_argument("--frames", type=int, default=49, help="frames per clip (4k+1)")
    parser.add_argument("--size", type=int, default=128, help="bucket edge in pixels (x16)")
    args = parser.parse_args()
    setup_logging()

    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-precompute-"))
    try:
        if args.model == "tiny":
            model = write_tiny_model(work / "model")
        else:
            model = write_proportional_model(work / "model")
        # docs/performance.md: 49-frame clips, stride 3, bucket base 128, 15 text tokens. Sources
        # are larger than the bucket (decoded full size, then resized), as real clips are.
        height, width = (int(v) for v in args.source.split("x"))
        data = write_dataset(work / "data", args.videos, args.images, height, width, args.frames)
        base = dict(
            data=data,
            model=model,
            image_sample_size=args.size,
            video_sample_size=args.size,
            token_sample_size=args.size,
            video_sample_n_frames=args.frames,
            tokenizer_max_length=15 if args.model == "proportional" else 226,
            masks_per_sample=args.masks,
            threads=args.threads,
            progress="none",
        )
        runs = {}
        for name, workers, write_async in (("alone", 0, False), ("pipelined", args.workers, True)):
            cfg = PrecomputeConfig(out=work / f"{name}.zarr", decode_workers=workers, **base)
            start = time.perf_counter()
            outcome = run_precompute(cfg, write_async=write_async)
            runs[name] = (outcome, time.perf_counter() - start)
            assert outcome.code == 0, f"{name} run stored nothing"
        alone, pipelined = runs["alone"][0], runs["pipelined"][0]
        stages = {
            k: getattr(alone.stats, f"{k}_ms") / 1000 for k in ("decode", "vae", "t5", "write")
        }
        total_alone = sum(stages.values())
        same = (
            open_store(work / "alone.zarr").digest() == open_store(work / "pipelined.zarr").digest()
        )
        p = pipelined.stats
        print(
            f"model: {args.model}; samples: {pipelined.held}; masks per sample: {args.masks}; "
            f"source media {args.source}"
        )
        print(f"threads: {args.threads}; decode workers (pipelined): {args.workers}")
        print(f"precompute_samples_per_s: {pipelined.held / pipelined.encode_s:.3f}")
        print(f"samples_per_s_stages_alone: {alone.held / alone.encode_s:.3f}")
        for k, v in stages.items():
            print(f"stage_alone_{k}_s: {v:.2f} ({100 * v / total_alone:.0f}%)")
        print(f"stages_alone_sum_s: {total_alone:.2f}")
        print(f"pipelined_encode_wall_s: {pipelined.encode_s:.2f}")
        print(
            f"pipelined_busy_s: decode {p.decode_ms / 1000:.2f} (workers), VAE {p.vae_ms / 1000:.2f}, "
            f"T5 {p.t5_ms / 1000:.2f}, write {p.write_ms / 1000:.2f} (thread), "
            f"VAE waiting for decode {p.wait_ms / 1000:.2f}"
        )
        print(f"precompute_overlap: {pipelined.encode_s / total_alone:.3f}")
        print(
            f"end_to_end_wall_s: alone {runs['alone'][1]:.1f}, pipelined {runs['pipelined'][1]:.1f}"
        )
        print(f"digests_equal: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
