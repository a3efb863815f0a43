"""Real `cogfun` commands on one GPU, every figure printed as a `name: value` line.

    python -m bench.gpu_check --prepare --workdir .whl/stores   # here, on the CPU (gpu_wheels.sh)
    python -m bench.gpu_check [--stores .whl/stores]            # on the GPU (gpu_check.sh)
    python -m bench.gpu_check --precompute                      # on the GPU, needs PyAV
    python -m bench.gpu_check --cpu-reduced                     # all of it here, small sizes

`--prepare` writes what the training steps read, so the GPU machine needs no PyAV (35 MB, more than
a device call can carry beside the rest): the tiny model and its store (4 generated clips), and a
store at the real 2b text width (226 x 4096 captions, 16-channel latents, 9 x 256 x 256 clips, one
mask variant) encoded by a small VAE and a one-layer T5 4096 wide.

The run: (1) `cogfun train` 3 steps on the tiny store (`tiny_*`: losses, samples/s, the set-up line
the run logged); (2) the same under `accelerate launch --use_deepspeed --deepspeed_config_file
config/zero_stage2_config.json --num_processes 1` (`zero2_*`); (3) `cogfun train` 3 steps of a
transformer at the real 2b width (30 heads x 64, text 4096, `--wide-layers` of the real 30 layers,
random weights) on the wide store (`wide_*`). `--precompute`: `cogfun precompute` of generated
49 x 512 x 512 clips through the real 2b VAE (random weights, bf16) and a one-layer T5 4096 wide,
with the recommended 4 mask variants (`precompute_*`: samples/s and video frames/s, model loading
included). With `--cpu-reduced` everything runs here: the wide transformer is bench/models.py's
proportional one, clips are 9 x 64 x 64. bench/gpu.py gives the full 30-layer step's MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG = ROOT / "config" / "zero_stage2_config.json"


def say(name: str, value: object) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def cogfun() -> list[str]:
    return [sys.executable, "-c", "from cogfun.app.cli import main; main()"]


def run(cmd: list[str], label: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    say(f"{label}_wall_s", time.perf_counter() - start)
    if res.returncode != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label}: exit {res.returncode}: {' '.join(cmd[3:])}")
    return res


def train_flags(store: Path, model: Path, out: Path, steps: int, batch: int) -> list[str]:
    return [
        "train",
        "--latents",
        str(store),
        "--model",
        str(model),
        "--output-dir",
        str(out),
        "--max-train-steps",
        str(steps),
        "--train-batch-size",
        str(batch),
        "--checkpointing-steps",
        "1000",  # only the final save
        "--lr-warmup-steps",
        "1",
        "--report-to",
        "none",
        "--progress",
        "log",
        "--mixed-precision",
        "bf16",
    ]


def report_train(label: str, res: subprocess.CompletedProcess, out: Path) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    say(f"{label}_steps", len(rows))
    # float(): a non-finite loss is the string "nan"/"inf" in metrics.jsonl
    say(f"{label}_losses", " ".join(f"{float(r['loss']):.4f}" for r in rows))
    later = rows[1:] or rows  # the first step pays for allocation and autotuning
    say(f"{label}_samples_per_s", sum(r["samples_per_s"] for r in later) / len(later))
    say(f"{label}_grad_norm_last", float(rows[-1]["grad_norm"]))
    setup = [line for line in res.stderr.splitlines() if "process(es)" in line]
    say(f"{label}_setup", setup[0].split("accelerate: ", 1)[-1] if setup else "?")


def write_wide_model(
    folder: Path, *, small: bool, vae: str, t5: bool, weights: bool, layers: int
) -> Path:
    """Random weights in the diffusers layout: the transformer (and T5) at the real 2b widths or
    (`small`) bench/models.py's proportional ones; `vae` "real" (the 2b VAE), "small" or "" (none);
    `weights` False writes only the transformer's config.json (all that precompute reads of it)."""
    import torch
    from cogfun.testing import tiny

    from bench.models import (
        PROPORTIONAL_T5,
        REAL_2B_TRANSFORMER,
        REAL_2B_VAE,
        build_transformer,
        build_vae,
        proportional_transformer_config,
        proportional_vae_config,
        t5_config,
    )

    torch.manual_seed(0)
    if t5:
        from transformers import T5EncoderModel

        vocab = tiny.write_tokenizer(folder / "tokenizer")
        width = PROPORTIONAL_T5["d_model"] if small else REAL_2B_TRANSFORMER["text_embed_dim"]
        config = t5_config(vocab, d_model=width, d_kv=64, num_heads=4, d_ff=256, num_layers=1)
        T5EncoderModel(config).save_pretrained(str(folder / "text_encoder"))
    cfg = proportional_transformer_config() if small else dict(REAL_2B_TRANSFORMER)
    cfg["num_layers"] = layers
    if not weights:
        (folder / "transformer").mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "CogVideoXTransformer3DModel", **cfg}
    else:
        build_transformer(cfg).save_pretrained(str(folder / "transformer"))
        config = json.loads((folder / "transformer" / "config.json").read_text())
    config["add_noise_in_inpaint_model"] = False  # as real Fun V1.1 checkpoints carry it
    tiny.write_json(folder / "transformer" / "config.json", config)
    if vae:
        build_vae(REAL_2B_VAE if vae == "real" else proportional_vae_config()).save_pretrained(
            str(folder / "vae")
        )
    tiny.write_pipeline_files(folder, "2b-inp")
    return folder


def precompute(model: Path, data: Path, out: Path, side: int, frames: int, masks: int) -> float:
    """`cogfun precompute` (in this process) of every clip into one bucket; returns seconds."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run as run_precompute

    from bench.train_setup import STRIDE

    text_len = json.loads((model / "transformer" / "config.json").read_text())[
        "max_text_seq_length"
    ]
    config = PrecomputeConfig(
        data=data,
        model=model,
        out=out,
        image_sample_size=side,
        video_sample_size=side,
        token_sample_size=side,
        video_sample_stride=STRIDE,
        video_sample_n_frames=frames,
        random_hw_adapt=False,
        training_with_video_token_length=False,
        random_frame_crop=False,
        tokenizer_max_length=text_len,
        masks_per_sample=masks,
        decode_workers=0,
        progress="none",
    )
    start = time.perf_counter()
    if run_precompute(config) != 0:
        raise SystemExit(f"precompute of {data} into {out} failed (see its log above)")
    return time.perf_counter() - start


def prepare(stores: Path, reduced: bool) -> None:
    """The tiny model, its store and the wide store, written on this CPU for the GPU run."""
    from bench.train_setup import write_clips

    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir(parents=True)
    run([*cogfun(), "tiny-model", str(stores / "tiny-model")], "tiny_model")
    write_clips(stores / "tiny-data", 4, 9, 64)
    took = precompute(stores / "tiny-model", stores / "tiny-data", stores / "tiny.zarr", 64, 9, 4)
    say("tiny_precompute_s", took)
    # The wide store's captions are 226 x 4096 (the real text width; `reduced`: the proportional
    # 15 x 256); its latents come from the small VAE (16 channels, as the real one's).
    encoders = stores / "wide-encoders"
    write_wide_model(encoders, small=reduced, vae="small", t5=True, weights=False, layers=2)
    side = 64 if reduced else 256
    write_clips(stores / "wide-data", 1, 9, side)
    took = precompute(encoders, stores / "wide-data", stores / "wide.zarr", side, 9, 1)
    say("wide_store_precompute_s", took)
    for scratch in ("tiny-data", "wide-data", "wide-encoders"):  # keep the carry small
        shutil.rmtree(stores / scratch)


def train_checks(stores: Path, work: Path, reduced: bool, wide_layers: int) -> None:
    tiny_model, tiny_store = stores / "tiny-model", stores / "tiny.zarr"
    out = work / "tiny-out"
    res = run([*cogfun(), *train_flags(tiny_store, tiny_model, out, 3, 2)], "tiny_train")
    report_train("tiny", res, out)

    # ZeRO-2 on one process, launched as the README says (console scripts beside python).
    def script(name: str) -> str:
        beside = Path(sys.executable).with_name(name)
        return str(beside) if beside.is_file() else (shutil.which(name) or name)

    head = [script("accelerate"), "launch", "--num_processes", "1", "--num_machines", "1"]
    head += ["--use_deepspeed", "--deepspeed_config_file", str(DS_CONFIG)]
    head += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "29517"]
    out = work / "zero2-out"
    flags = train_flags(tiny_store, tiny_model, out, 3, 2)
    res = run([*head, script("cogfun"), *flags], "zero2_train")
    report_train("zero2", res, out)

    start = time.perf_counter()
    wide = write_wide_model(
        work / "wide-model",
        small=reduced,
        vae="",
        t5=False,
        weights=True,
        layers=2 if reduced else wide_layers,
    )
    say("wide_model_write_s", time.perf_counter() - start)
    out = work / "wide-out"
    res = run([*cogfun(), *train_flags(stores / "wide.zarr", wide, out, 3, 1)], "wide_train")
    report_train("wide", res, out)


def precompute_check(work: Path, reduced: bool, clips: int) -> None:
    from bench.train_setup import write_clips

    start = time.perf_counter()
    model = write_wide_model(
        work / "precompute-model",
        small=reduced,
        vae="small" if reduced else "real",
        t5=True,
        weights=False,
        layers=2,
    )
    say("precompute_model_write_s", time.perf_counter() - start)
    frames, side = (9, 64) if reduced else (49, 512)
    write_clips(work / "precompute-data", clips, frames, side)
    took = precompute(model, work / "precompute-data", work / "precompute.zarr", side, frames, 4)
    say("precompute_clip", f"{frames}x{side}x{side}, 4 mask variants")
    say("precompute_samples_per_s", clips / took)
    say("precompute_video_frames_per_s", clips * frames / took)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-reduced", action="store_true", help="everything on the CPU, small sizes")
    p.add_argument("--prepare", action="store_true", help="write the stores (on the CPU)")
    p.add_argument("--precompute", action="store_true", help="only the precompute check")
    p.add_argument("--stores", type=Path, default=Path(".whl/stores"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cogfun-gpu-check"))
    p.add_argument(
        "--wide-layers", type=int, default=2, help="transformer layers of the wide model"
    )
    p.add_argument("--clips", type=int, default=4, help="generated clips of the precompute check")
    args = p.parse_args(argv)
    import torch

    reduced = args.cpu_reduced
    if args.prepare:
        prepare(args.workdir, reduced)
        return 0
    if not reduced and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu-reduced for the CPU version")
    say("device", torch.cuda.get_device_name(0) if not reduced else "cpu")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if reduced:
        prepare(work / "stores", reduced=True)
        train_checks(work / "stores", work, True, 2)
        precompute_check(work, True, args.clips)
    elif args.precompute:
        precompute_check(work, False, args.clips)
    else:
        train_checks(args.stores, work, False, args.wide_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
