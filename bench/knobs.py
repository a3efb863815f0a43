"""Precompute throughput under its speed knobs: `vae_mini_batch`, decode workers, torch threads.

    python -m bench.knobs                     # vae_mini_batch 1 vs 4, proportional model
    python -m bench.knobs --sweep             # also decode workers {0,1,2} x threads {1,2}
    python -m bench.knobs --model tiny --videos 2 --rounds 1     # seconds (what the tests run)

Every run is a full pipelined `cogfun precompute` (decode workers ahead of the VAE, writer thread
behind it) of the same generated clips into a fresh store, in this one process, timed from the
first model load to the last write (`encode_s`). Runs alternate in rounds (A B, then B A: this
machine's speed drifts); the median samples/s of each configuration is printed with its spread.

Figures (one `name: value` line each):
- `vae_mini_batch_1_samples_per_s`, `vae_mini_batch_4_samples_per_s`, `vae_mini_batch_4_vs_1`;
- with `--sweep`: `precompute_samples_per_s_w<workers>_t<threads>` for each pair, `best_workers_t<n>`.

Digests of runs with the same thread count and `vae_mini_batch` must be equal (decode workers do
not change a byte); `digests_equal` says whether they were.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def write_clips(root: Path, videos: int, frames: int, height: int, width: int) -> Path:
    """Clips long enough for one `frames`-frame stride-3 clip + metadata.json."""
    import json

    from cogfun.testing.media import write_video

    rows = []
    for i in range(videos):
        write_video(root / f"v{i:03d}.mp4", 3 * frames + 3, height, width, seed=i)
        rows.append({"file_path": f"v{i:03d}.mp4", "text": f"clip number {i}", "type": "video"})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


def precompute_once(
    work: Path,
    model: Path,
    data: Path,
    shape: tuple[int, int, int],
    *,
    workers: int,
    threads: int,
    mini: int,
) -> tuple[float, str]:
    """One pipelined precompute into a fresh store: (samples/s over encode_s, store digest).
    `shape`: (frames, bucket edge, T5 tokens)."""
    from cogfun.common.store import open_store
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run_precompute

    out = work / f"w{workers}_t{threads}_m{mini}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrecomputeConfig(
        data=data,
        model=model,
        out=out,
        image_sample_size=shape[1],
        video_sample_size=shape[1],
        token_sample_size=shape[1],
        video_sample_n_frames=shape[0],
        tokenizer_max_length=shape[2],
        masks_per_sample=1,  # one extra VAE encode per sample (the default 4 costs 4)
        vae_mini_batch=mini,
        decode_workers=workers,
        threads=threads,
        progress="none",
    )
    outcome = run_precompute(cfg)
    if outcome.code != 0:
        raise RuntimeError(f"precompute into {out} stored nothing")
    digest = open_store(out).digest()
    shutil.rmtree(out, ignore_errors=True)
    return outcome.held / outcome.encode_s, digest


def measure(
    configs: list[tuple[int, int, int]], rounds: int, run
) -> dict[tuple[int, int, int], list[float]]:
    """samples/s of each (workers, threads, mini) config over `rounds`, order reversed each round."""
    rates: dict[tuple[int, int, int], list[float]] = {c: [] for c in configs}
    digests: dict[tuple[int, int], set[str]] = {}
    for r in range(rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:
            rate, digest = run(*c)
            rates[c].append(rate)
            digests.setdefault((c[1], c[2]), set()).add(digest)
            print(
                f"# w{c[0]} t{c[1]} m{c[2]}: {rate:.3f} samples/s, digest {digest[:12]}", flush=True
            )
    for (threads, mini), found in digests.items():
        print(f"digests_t{threads}_m{mini}: {' '.join(sorted(d[:12] for d in found))}")
    print(f"digests_equal: {all(len(d) == 1 for d in digests.values())}")
    return rates


def _line(name: str, values: list[float]) -> float:
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med else 0.0
    print(f"{name}: {med:.3f}  (spread {spread:.0%}, {len(values)} runs)")
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("proportional", "tiny"), default="proportional")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--source", default="360x640", help="HxW of the generated clips")
    p.add_argument("--frames", type=int, default=49, help="frames per clip (4k+1)")
    p.add_argument("--size", type=int, default=128, help="bucket edge in pixels (x16)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="decode workers of the mini-batch pair")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the mini-batch pair")
    p.add_argument("--sweep", action="store_true", help="decode workers x threads grid too")
    args = p.parse_args(argv)
    from cogfun.common.progress import setup_logging

    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-knobs-"))
    try:
        if args.model == "tiny":
            from cogfun.testing.tiny import write_tiny_model

            model, text_len = write_tiny_model(work / "model"), 226
        else:
            from bench.models import PROPORTIONAL_TEXT_LEN, write_proportional_model

            model, text_len = write_proportional_model(work / "model"), PROPORTIONAL_TEXT_LEN
        h, w = (int(v) for v in args.source.split("x"))
        data = write_clips(work / "data", args.videos, args.frames, h, w)
        shape = (args.frames, args.size, text_len)

        def run(workers: int, threads: int, mini: int) -> tuple[float, str]:
            kw = dict(workers=workers, threads=threads, mini=mini)
            return precompute_once(work, model, data, shape, **kw)

        clip = f"{args.frames}x{args.size}x{args.size}"
        print(f"model: {args.model}; clips: {args.videos} x {clip} from {args.source}")
        print(f"cores: {len(os.sched_getaffinity(0))}; masks per sample: 1")
        print(f"threads: {args.threads}; decode workers: {args.workers} (mini-batch pair)")
        pair = [(args.workers, args.threads, 1), (args.workers, args.threads, 4)]
        grid = [(wk, t, 1) for t in (1, 2) for wk in (0, 1, 2)] if args.sweep else []
        configs = pair + [c for c in grid if c not in pair]
        rates = measure(configs, args.rounds, run)
        one = _line("vae_mini_batch_1_samples_per_s", rates[pair[0]])
        four = _line("vae_mini_batch_4_samples_per_s", rates[pair[1]])
        print(f"vae_mini_batch_4_vs_1: {four / one:.3f}")
        for t in (1, 2) if grid else ():
            best = max((0, 1, 2), key=lambda wk: statistics.median(rates[(wk, t, 1)]))
            for wk in (0, 1, 2):
                _line(f"precompute_samples_per_s_w{wk}_t{t}", rates[(wk, t, 1)])
            print(f"best_workers_t{t}: {best}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
