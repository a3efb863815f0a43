"""Peak training memory per configuration: full AdamW, full CAME, LoRA, 8-bit AdamW, ZeRO-2, ZeRO-3.

    python -m bench.memory               # proportional model (bench/models.py) on CPU
    python -m bench.memory --quick       # the tiny model on a tiny clip (what tests/test_bench.py runs)
    python -m bench.memory --gpu         # real 2b/5b dimensions on GPUs, against the goals below

Every configuration runs in fresh processes (one, or two through `accelerate launch` for ZeRO) that
build the pieces `cogfun train` builds — `distributed.make_accelerator`, the transformer with
gradient checkpointing, `optim.select_trainable`/`make_optimizer`, `distributed.prepare` — and run
optimizer steps of `compute_loss` on random latents with bf16 autocast, batch 1 per process. The
first step allocates the optimizer state, so the peak covers weights, gradients, optimizer state
and activations together.

CPU: the figure is the process's peak resident memory above its resident memory just before the
model is built (imports, the accelerator and the process group excluded), read from the kernel's
high-water mark (VmHWM, reset at that point through /proc/self/clear_refs); under ZeRO the largest
rank's. The clip defaults to 17x256x384 so a step takes seconds on two cores: the weights and
optimizer state dominate there, which is what the configurations change. CPU offload cannot save
CPU memory, so it is measured with --gpu only.

GPU (--gpu): random weights of the real 2b-InP / 5b-InP transformers, a 49x480x720 clip
(13x60x90 latents, 17,550 video tokens + 226 text tokens), `torch.cuda.max_memory_allocated` per
process, against the goals of issue 12 (5b LoRA <= 18 GB, 2b full <= 30 GB, 5b full under ZeRO-3
over 2 GPUs <= 24 GB per GPU). Configurations that need more GPUs than there are are reported as
skipped.

Lines are `name: value` (MB on CPU, GB on GPU), each configuration with its ratio to full AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
GB = 1024**3
MB = 1024**2

# name -> (settings, DeepSpeed config file or None, processes)
CPU_CONFIGS: dict[str, tuple[dict[str, Any], str | None, int]] = {
    "full_adamw": ({}, None, 1),
    "full_came": ({"use_came": True}, None, 1),
    "lora": ({"lora": True}, None, 1),
    "adamw_8bit": ({"use_8bit_adam": True}, None, 1),
    "zero2_adamw": ({}, "zero_stage2_config.json", 2),
    "zero3_adamw": ({}, "zero_stage3_config.json", 2),
}
QUICK_CONFIGS = ("full_adamw", "full_came", "lora", "adamw_8bit")

# name -> (model, settings, DeepSpeed config or None, processes, goal GB or None)
GPU_CONFIGS: dict[str, tuple[str, dict[str, Any], str | None, int, float | None]] = {
    "2b_full_adamw": ("2b", {}, None, 1, 30.0),
    "2b_full_came": ("2b", {"use_came": True}, None, 1, None),
    "2b_lora": ("2b", {"lora": True}, None, 1, None),
    "5b_lora": ("5b", {"lora": True}, None, 1, 18.0),
    "5b_full_adamw_8bit": ("5b", {"use_8bit_adam": True}, None, 1, None),
    "5b_full_zero3_adamw": ("5b", {}, "zero_stage3_config.json", 2, 24.0),
    "5b_full_zero3_offload_adamw": ("5b", {}, "zero_stage3_offload_config.json", 2, 24.0),
}


def real_transformer_config(kind: str) -> dict[str, Any]:
    """The real CogVideoX-Fun 2b-InP or (V1.1) 5b-InP transformer config."""
    from bench.models import REAL_2B_TRANSFORMER

    if kind == "2b":
        return dict(REAL_2B_TRANSFORMER)
    return {
        **REAL_2B_TRANSFORMER,
        "num_attention_heads": 48,
        "num_layers": 42,
        "use_rotary_positional_embeddings": True,
    }


# ---------------------------------------------------------------- worker (one training process)


def rss_bytes() -> int:
    """This process's resident memory now (bench/validation.py reads it too)."""
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM: the most resident memory since the start or the last `reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def random_batch(tcfg: dict[str, Any], latents: list[int], gen: Any, device: Any) -> dict[str, Any]:
    """A one-sample inpaint batch of random latents shaped for the transformer config `tcfg`."""
    import torch

    frames, h, w = latents
    batch = {
        "latents": torch.randn(1, frames, 16, h, w, generator=gen),
        "inpaint_latents": torch.randn(1, frames, 17, h, w, generator=gen),
        "prompt_embeds": torch.randn(
            1, tcfg["max_text_seq_length"], tcfg["text_embed_dim"], generator=gen
        ),
    }
    return {k: v.to(device) for k, v in batch.items()}


def noise_scheduler() -> Any:
    """The CogVideoX training noise schedule (v-prediction, zero-SNR), built without a model."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def warm_up(spec: dict[str, Any], device: Any) -> None:
    """One step of a one-block copy of the model on a one-frame clip, so the code and allocator
    arenas the first step pages in are not counted as the configuration's memory."""
    import torch
    from cogfun.train.loss import compute_loss
    from diffusers import CogVideoXTransformer3DModel

    tcfg = {**spec["transformer"], "num_layers": 1}
    model = CogVideoXTransformer3DModel.from_config(tcfg).to(device)
    model.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        batch = random_batch(tcfg, [1, *spec["latents"][1:]], gen, device)
        compute_loss(model, batch, noise_scheduler(), generator=gen).loss.backward()
    del model, batch


def worker(spec: dict[str, Any]) -> None:
    import torch
    from cogfun.train import distributed, lora_train, optim
    from cogfun.train.config import TrainConfig
    from cogfun.train.loss import compute_loss
    from diffusers import CogVideoXTransformer3DModel

    settings = spec["settings"]
    gpu = spec["gpu"]
    with tempfile.TemporaryDirectory() as out:
        acc = distributed.make_accelerator(
            output_dir=Path(out),
            logging_dir="logs",
            gradient_accumulation_steps=1,
            mixed_precision="bf16",
            report_to="none",
        )
        cfg = TrainConfig(
            lora=settings.get("lora", False),
            rank=spec["rank"],
            network_alpha=spec["rank"] // 2,
            mixed_precision="bf16",
            use_came=settings.get("use_came", False),
        )
        warm_up(spec, acc.device)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        base = rss_bytes()
        reset = reset_peak()
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel.from_config(spec["transformer"])
        if cfg.lora:
            lora_train.add_adapters(cfg, model)
        model.enable_gradient_checkpointing()
        model.train()
        trainable = lora_train.TRAINABLE if cfg.lora else ["."]
        groups = optim.select_trainable(model, trainable, [], 1e-4)
        optimizer = optim.make_optimizer(
            groups,
            use_came=cfg.use_came,
            lr=1e-4,
            betas=(0.9, 0.999),
            weight_decay=3e-2,
            eps=1e-10,
            use_8bit_adam=settings.get("use_8bit_adam", False),
            cpu_offload=distributed.offloads_optimizer(acc),
        )
        trained = sum(p.numel() for g in groups for p in g["params"])  # before ZeRO splits them
        scheduler = optim.make_lr_scheduler(
            "constant", optimizer, warmup_steps=0, total_steps=10, num_processes=acc.num_processes
        )
        distributed.configure_deepspeed(acc, max_grad_norm=0.05, use_came=cfg.use_came)
        model, optimizer, scheduler = distributed.prepare(acc, model, optimizer, scheduler)
        noise = noise_scheduler()
        gen = torch.Generator().manual_seed(acc.process_index)
        for _ in range(spec["steps"]):
            batch = random_batch(spec["transformer"], spec["latents"], gen, acc.device)
            with acc.autocast():
                loss = compute_loss(model, batch, noise, generator=gen).loss
            acc.backward(loss)
            distributed.clip_gradients(
                acc, [p for g in groups for p in g["params"]], lambda n: 0.05
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result = {
            "rank": acc.process_index,
            "trained": trained,
            "peak_bytes": (torch.cuda.max_memory_allocated() if gpu else peak_rss() - base),
            "hwm_reset": reset,
        }
        print("MEMORY-RESULT " + json.dumps(result), flush=True)
        acc.wait_for_everyone()
        acc.end_training()


# ---------------------------------------------------------------- parent


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def measure(spec: dict[str, Any], ds_config: str | None, nproc: int, threads: int) -> list[dict]:
    """Run one configuration in fresh processes; one result per rank."""
    # Run as the module `bench.memory` (the ROOT that _env puts on PYTHONPATH holds `bench`).
    me = ["bench.memory", "--worker", json.dumps(spec)]
    if ds_config is None:
        cmd = [sys.executable, "-m", *me]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--num_processes", str(nproc), "--num_machines", "1"]
        cmd += ["--main_process_port", str(port), "--dynamo_backend", "no", "--use_deepspeed"]
        cmd += ["--deepspeed_config_file", str(CONFIG_DIR / ds_config), "--mixed_precision", "bf16"]
        cmd += ["--module", *me]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=1800)
    results = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("MEMORY-RESULT ")
    ]
    if proc.returncode != 0 or len(results) != nproc:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-4000:]}")
    return results


def _tiny_transformer_config() -> dict[str, Any]:
    from cogfun.testing.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_model(Path(tmp) / "tiny", variant="2b-inp", seed=0)
        return json.loads((folder / "transformer" / "config.json").read_text())


def cpu_run(args: argparse.Namespace) -> None:
    from bench.models import proportional_transformer_config

    if args.quick:
        tconfig, model, names = _tiny_transformer_config(), "tiny", list(QUICK_CONFIGS)
        frames, height, width, rank = 5, 64, 64, 4
    else:
        tconfig, model, names = proportional_transformer_config(), "proportional", list(CPU_CONFIGS)
        frames, height, width = args.frames, args.height, args.width
        rank = 8  # 128 scaled as the proportional model's widths are (1920 -> 128)
    if args.configs:
        names = args.configs.split(",")
    latents = ((frames - 1) // 4 + 1, height // 8, width // 8)
    p = tconfig["patch_size"]
    if height % (8 * p) or width % (8 * p):
        sys.exit(f"--height/--width: multiples of {8 * p} (the VAE's 8 x the patch size {p})")
    print(f"model: {model}")
    print(f"clip: {frames}x{height}x{width}")
    print(f"video_tokens: {latents[0] * (latents[1] // p) * (latents[2] // p)}")
    print(f"lora_rank: {rank}")
    peaks: dict[str, float] = {}
    for name in names:
        settings, ds_config, nproc = CPU_CONFIGS[name]
        spec = dict(
            settings=settings,
            transformer=tconfig,
            latents=latents,
            rank=rank,
            steps=args.steps,
            gpu=False,
        )
        results = measure(spec, ds_config, nproc, threads=max(1, args.threads // nproc))
        peaks[name] = max(r["peak_bytes"] for r in results) / MB
        print(f"{name}_trained_params: {results[0]['trained']}")
        print(f"{name}_processes: {nproc}")
        print(f"{name}_peak_mb: {peaks[name]:.1f}")
        if not all(r["hwm_reset"] for r in results):
            print(f"{name}_note: peak includes imports (VmHWM could not be reset)")
    if "full_adamw" in peaks:
        for name, value in peaks.items():
            print(f"{name}_ratio: {value / peaks['full_adamw']:.3f}")


def gpu_run(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device (run it on a GPU machine)")
    gpus = torch.cuda.device_count()
    print(f"device: {torch.cuda.get_device_name(0)} x {gpus}")
    print("clip: 49x480x720")
    print("video_tokens: 17550")
    names = args.configs.split(",") if args.configs else list(GPU_CONFIGS)
    peaks: dict[str, float] = {}
    for name in names:
        kind, settings, ds_config, nproc, goal = GPU_CONFIGS[name]
        if nproc > gpus:
            print(f"{name}_peak_gb: skipped (needs {nproc} GPUs, found {gpus})")
            continue
        spec = dict(
            settings=settings,
            transformer=real_transformer_config(kind),
            latents=(13, 60, 90),
            rank=128,
            steps=args.steps,
            gpu=True,
        )
        results = measure(spec, ds_config, nproc, threads=args.threads)
        peaks[name] = max(r["peak_bytes"] for r in results) / GB
        print(f"{name}_trained_params: {results[0]['trained']}")
        print(f"{name}_peak_gb: {peaks[name]:.2f}")
        if goal is not None:
            print(f"{name}_goal_gb: {goal}")
            print(f"{name}_within_goal: {'yes' if peaks[name] <= goal else 'no'}")
    for kind in ("2b", "5b"):
        full = peaks.get(f"{kind}_full_adamw")
        for name, value in peaks.items():
            if full and name.startswith(kind):
                print(f"{name}_ratio: {value / full:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, single-process configs")
    parser.add_argument("--gpu", action="store_true", help="real 2b/5b dimensions on CUDA GPUs")
    parser.add_argument("--configs", default="", help="comma-separated subset of the configs")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    known = GPU_CONFIGS if args.gpu else CPU_CONFIGS
    unknown = [n for n in filter(None, args.configs.split(",")) if n not in known]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    gpu_run(args) if args.gpu else cpu_run(args)


if __name__ == "__main__":
    main()
