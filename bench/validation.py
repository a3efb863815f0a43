"""Peak memory and time of one validation round of `cogfun train`, against a training step.

    python -m bench.validation            # proportional model (bench/models.py) on CPU
    python -m bench.validation --quick    # the tiny model on a tiny clip (what tests/test_bench.py runs)
    python -m bench.validation --gpu      # real 2b transformer and VAE dimensions on one CUDA GPU

Two fresh processes:

1. **train + validation**: builds what `cogfun train` builds (`distributed.make_accelerator` with bf16
   mixed precision, the transformer in fp32 with gradient checkpointing, AdamW through
   `optim.make_optimizer`, `distributed.prepare`), runs `--steps` optimizer steps of `compute_loss`
   on random latents, then one round of `cogfun.train.validation.run_validation` (the VAE loaded,
   `--prompts` prompts sampled with classifier-free guidance at `--inference-steps` DDIM steps,
   decoded the Fun way, written as mp4, the VAE released), as training runs it between two steps;
2. **VAE decode alone**: the VAE loaded in bf16 and one `fun_decode` of the validation video's
   latents: what the decode itself needs.

Figures: the training peak, the peak during the validation round (both from the same base: the
process before the model is built), how far the round goes above the training peak, the decode's own
peak, and the time of a training step (mean after the first, which allocates the optimizer state)
against the round's. The goal (issue 11): validation adds no more than the VAE decode's own memory to
the training peak, because T5 is never held and the VAE lives only inside the round.

CPU: peaks are resident memory (the kernel's high-water mark VmHWM, reset through
/proc/self/clear_refs), in MB. GPU (--gpu): `torch.cuda.max_memory_allocated`, in GB.
Lines are `name: value`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2
GB = 1024**3


# ---------------------------------------------------------------- workers (fresh processes)


def _peaks(gpu: bool):
    """(reset, read) of the peak meter: VmHWM above `base`, or CUDA's max allocated."""
    from bench.memory import peak_rss, reset_peak

    if gpu:
        import torch

        return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated
    return reset_peak, peak_rss


def _current(gpu: bool) -> int:
    from bench.memory import rss_bytes

    if gpu:
        import torch

        return torch.cuda.memory_allocated()
    return rss_bytes()


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def _prompts_file(folder: Path, tcfg: dict[str, Any], count: int) -> Path:
    """Random prompt embeddings of the transformer's text width and length (the encode-prompts
    format), so no T5 is built: training never holds T5 during validation either."""
    import torch
    from cogfun.common.sample_inputs import save_prompt_embeds

    gen = torch.Generator().manual_seed(1)
    shape = (count, tcfg["max_text_seq_length"], tcfg["text_embed_dim"])
    embeds = torch.randn(shape, generator=gen)
    negative = torch.randn((1, *shape[1:]), generator=gen)
    texts = [f"prompt {i}" for i in range(count)]
    return save_prompt_embeds(folder / "prompts.safetensors", texts, embeds, "", negative, "bench")


def train_worker(spec: dict[str, Any]) -> None:
    import torch
    from cogfun.common import sample_inputs as si
    from cogfun.common.models import load_transformer
    from cogfun.train import distributed, optim
    from cogfun.train.loss import compute_loss
    from cogfun.train.validation import Validation, run_validation
    from diffusers import CogVideoXTransformer3DModel

    from bench.memory import noise_scheduler, random_batch, warm_up

    gpu, model_dir = spec["gpu"], Path(spec["model"])
    reset, read = _peaks(gpu)
    with tempfile.TemporaryDirectory() as out:
        acc = distributed.make_accelerator(
            output_dir=Path(out),
            logging_dir="logs",
            gradient_accumulation_steps=1,
            mixed_precision="bf16",
            report_to="none",
        )
        tcfg = json.loads((model_dir / "transformer" / "config.json").read_text())
        warm_up({"transformer": tcfg, "latents": spec["latents"]}, acc.device)
        loaded = si.load_prompt_embeds(_prompts_file(Path(out), tcfg, spec["prompts"]))

        def validation(size: si.SampleSize, steps: int, folder: str) -> Validation:
            return Validation(
                model_dir=model_dir,
                out_dir=Path(out) / folder,
                prompts=loaded.prompts[:1] if folder == "warm" else loaded.prompts,
                embeds=loaded.embeds,
                negative=loaded.negative_embeds,
                every_steps=1,
                every_epochs=0,
                size=size,
                num_inference_steps=steps,
                seed=0,
            )

        # A round on a one-block model and a one-frame 16x16 video first, so the code, codec and
        # allocator arenas a first round pages in are not counted as the round's memory.
        warm = CogVideoXTransformer3DModel.from_config({**tcfg, "num_layers": 1}).to(acc.device)
        run_validation(validation(si.SampleSize(1, 16, 16), 1, "warm"), acc, warm, None, 0)
        del warm
        _sync(gpu)
        base = 0 if gpu else _current(gpu)
        reset()
        torch.manual_seed(0)
        model = load_transformer(model_dir, dtype=torch.float32)
        model.enable_gradient_checkpointing()
        model.train()
        groups = optim.select_trainable(model, ["."], [], 1e-4)
        optimizer = optim.make_optimizer(
            groups,
            use_came=False,
            lr=1e-4,
            betas=(0.9, 0.999),
            weight_decay=3e-2,
            eps=1e-10,
            use_8bit_adam=False,
            cpu_offload=False,
        )
        model, optimizer = acc.prepare(model, optimizer)
        noise = noise_scheduler()
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            batch = random_batch(tcfg, spec["latents"], gen, acc.device)
            with acc.autocast():
                loss = compute_loss(model, batch, noise, generator=gen).loss
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(gpu)
            times.append(time.perf_counter() - start)
        train_peak = read() - base

        v = validation(si.SampleSize(*spec["video"]), spec["inference_steps"], "validation")
        held = _current(gpu) - base  # weights, optimizer state: what training keeps between steps
        reset()
        start = time.perf_counter()
        row = run_validation(v, acc, model, None, spec["steps"])
        _sync(gpu)
        validation_s = time.perf_counter() - start
        validation_peak = read() - base
        result = {
            "train_peak": train_peak,
            "held": held,
            "validation_peak": validation_peak,
            "step_s": times,
            "validation_s": validation_s,
            "videos": row["validation_videos"],
            "failed": row["validation_failed"],
        }
        print("VALIDATION-RESULT " + json.dumps(result), flush=True)
        acc.end_training()


def decode_worker(spec: dict[str, Any]) -> None:
    import torch
    from cogfun.common.fun_vae import fun_decode
    from cogfun.common.models import load_vae
    from cogfun.common.sampling import latent_frames

    gpu = spec["gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    reset, read = _peaks(gpu)
    frames, height, width = spec["video"]
    latents = torch.randn(1, 16, latent_frames(frames), height // 8, width // 8)
    warm = load_vae(Path(spec["model"]), dtype=torch.bfloat16).to(device)
    fun_decode(warm, torch.randn(1, 16, 1, 2, 2, device=device))  # pages the code in, as above
    del warm
    _sync(gpu)
    base = 0 if gpu else _current(gpu)
    reset()
    start = time.perf_counter()
    vae = load_vae(Path(spec["model"]), dtype=torch.bfloat16).to(device)
    video = fun_decode(vae, latents.to(device))
    _sync(gpu)
    result = {"peak": read() - base, "seconds": time.perf_counter() - start}
    assert video.shape[2] == frames, video.shape
    print("VALIDATION-RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def _run_worker(kind: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.validation", f"--{kind}-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("VALIDATION-RESULT ")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"the {kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[0].split(" ", 1)[1])


def _model_folder(kind: str, root: Path) -> Path:
    """The model folder the workers load: tiny, proportional, or the proportional folder with the
    real 2b transformer config and VAE (random weights) for --gpu."""
    if kind == "tiny":
        from cogfun.testing.tiny import write_tiny_model

        return write_tiny_model(root / "tiny", variant="2b-inp", seed=0)
    from bench.models import REAL_2B_VAE, build_vae, write_proportional_model

    folder = write_proportional_model(root / "proportional", seed=0)
    if kind == "real-2b":
        import shutil

        import torch

        from bench.memory import real_transformer_config
        from bench.models import build_transformer

        torch.manual_seed(0)
        shutil.rmtree(folder / "transformer")
        build_transformer(real_transformer_config("2b")).save_pretrained(folder / "transformer")
        shutil.rmtree(folder / "vae")
        build_vae(REAL_2B_VAE).save_pretrained(folder / "vae")
    return folder


def run(args: argparse.Namespace) -> None:
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device (run it on a GPU machine)")
        kind, unit, scale = "real-2b", "gb", GB
        clip = (args.frames or 49, args.height or 480, args.width or 720)
        print(f"device: {torch.cuda.get_device_name(0)}")
    elif args.quick:
        kind, unit, scale = "tiny", "mb", MB
        clip = (args.frames or 5, args.height or 64, args.width or 64)
    else:
        kind, unit, scale = "proportional", "mb", MB
        clip = (args.frames or 17, args.height or 256, args.width or 384)
    frames, height, width = clip
    if height % 16 or width % 16 or (frames - 1) % 4:
        sys.exit("--frames must be 4k+1 and --height/--width multiples of 16")
    latents = [(frames - 1) // 4 + 1, height // 8, width // 8]
    from diffusers.utils.logging import disable_progress_bar
    from transformers.utils.logging import disable_progress_bar as quiet_transformers

    disable_progress_bar()  # the "Writing model shards" bars on stderr
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(_model_folder(kind, Path(tmp)))
        spec = dict(
            gpu=args.gpu,
            model=model,
            latents=latents,
            video=list(clip),
            steps=args.steps,
            prompts=args.prompts,
            inference_steps=args.inference_steps,
        )
        train = _run_worker("train", spec, args.threads)
        decode = _run_worker("decode", spec, args.threads)
    steps = train["step_s"][1:] or train["step_s"]
    step_s = sum(steps) / len(steps)
    above = train["validation_peak"] - train["train_peak"]
    print(f"model: {kind}")
    print(f"clip: {frames}x{height}x{width}")
    print(f"validation_prompts: {args.prompts}")
    print(f"validation_inference_steps: {args.inference_steps}")
    print(f"validation_videos: {train['videos']}")
    print(f"validation_failed: {train['failed']}")
    print(f"train_peak_{unit}: {train['train_peak'] / scale:.2f}")
    print(f"train_held_{unit}: {train['held'] / scale:.2f}")
    print(f"validation_peak_{unit}: {train['validation_peak'] / scale:.2f}")
    print(f"validation_above_train_peak_{unit}: {above / scale:.2f}")
    print(f"vae_decode_peak_{unit}: {decode['peak'] / scale:.2f}")
    print(f"within_goal: {'yes' if above <= decode['peak'] else 'no'}")
    print(f"train_step_s: {step_s:.3f}")
    print(f"validation_s: {train['validation_s']:.3f}")
    print(f"vae_decode_s: {decode['seconds']:.3f}")
    print(f"validation_vs_train_step: {train['validation_s'] / step_s:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on a 5x64x64 clip")
    parser.add_argument("--gpu", action="store_true", help="real 2b dimensions on one CUDA GPU")
    parser.add_argument("--frames", type=int, default=0, help="clip frames (train and validation)")
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="training steps before the round")
    parser.add_argument("--prompts", type=int, default=1, help="validation prompts in the round")
    parser.add_argument("--inference-steps", type=int, default=4, help="sampler steps per video")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    parser.add_argument("--decode-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_worker:
        train_worker(json.loads(args.train_worker))
    elif args.decode_worker:
        decode_worker(json.loads(args.decode_worker))
    else:
        run(args)


if __name__ == "__main__":
    main()
