"""The real 2b-InP transformer training step and VAE encode on one GPU, with random weights.

    python -m bench.gpu                      # CUDA, real sizes
    python -m bench.gpu --peak-tflops 989    # override the device's peak dense bf16 TFLOPS
    python -m bench.gpu --reduced            # tiny sizes on the CPU (what the tests run)

Transformer: CogVideoX-Fun-2b-InP dimensions (30 layers, 30 heads x 64 = 1920 wide, 33 input
channels, text 226 x 4096), one sample of 13 x 64 x 64 latents = 49 x 512 x 512 pixels = 13,312
video tokens + 226 text tokens; fp32 weights, bf16 autocast, gradient checkpointing, AdamW. The
model FLOPs of one step (forward + backward, no recomputation, counted by FlopCounterMode on the
meta device) divided by the measured step time and by the device's peak bf16 FLOPS give the
model FLOPs utilisation (`mfu`). VAE: the real 2b VAE config in bf16 encoding 49 x 512 x 512 clips
(`vae_frames_per_s`).

Figures, one `name: value` line each: `transformer_step_s` (median), `transformer_step_tflops`,
`peak_tflops`, `mfu`, `transformer_peak_mem_gb`, `vae_encode_s`, `vae_frames_per_s`,
`vae_peak_mem_gb`, and `online_step_ratio_estimate` = (step + 2 VAE encodes) ÷ step, the
inpaint original's step over cogfun's by these two measured parts (decode and T5 left out).
`--vae-variants` (default `eager,channels_last`; `compile` too if asked) times each VAE encode
variant on the same weights and clip: `vae_frames_per_s_<v>`, `vae_speedup_<v>` over eager, and
`vae_max_abs_diff_<v>`, the largest difference of its posterior mean from eager's (0 means the
store bytes would not change).

Only torch and diffusers are needed (no cogfun install, zarr, decord or deepspeed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.flops import transformer_flops
from bench.models import (
    REAL_2B_TRANSFORMER,
    REAL_2B_VAE,
    build_transformer,
    build_vae,
    proportional_transformer_config,
    proportional_vae_config,
)

# Dense bf16 tensor-core peaks (no sparsity), TFLOPS, from NVIDIA's data sheets; matched in order
# against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` after `warmup` unmeasured calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def transformer_step(
    config: dict[str, Any], latent: tuple[int, int, int], device: torch.device
) -> Callable[[], None]:
    """One training step closure: (1, F, 33, h, w) input, 16-channel velocity-like MSE target."""
    torch.manual_seed(0)
    with device:
        model = build_transformer(config)
    model.train()
    model.enable_gradient_checkpointing()
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, **fused)
    f, h, w = latent
    x = torch.randn(1, f, config["in_channels"], h, w, device=device)
    target = torch.randn(1, f, config["out_channels"], h, w, device=device)
    text = torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"], device=device)
    t = torch.randint(0, 1000, (1,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)
        loss = torch.nn.functional.mse_loss(pred[0].float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


VAE_VARIANTS = ("eager", "channels_last", "compile")


def vae_encode(
    config: dict[str, Any], clip: tuple[int, int, int], device: torch.device, variant: str = "eager"
) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """One bf16 encode + posterior sample of a (1, 3, F, H, W) clip, as the original runs it, and
    a function returning the posterior mean (to compare variants). Variants: `eager`;
    `channels_last` (weights and input in channels_last_3d); `compile` (torch.compile of the
    encoder). Same seed, same weights and input for every variant."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the original casts the whole VAE
    try:
        with device:
            vae = build_vae(config).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device).manual_seed(1)
    x = torch.rand(1, 3, *clip, device=device, dtype=torch.bfloat16, generator=gen) * 2 - 1
    if variant == "channels_last":
        for param in vae.parameters():  # Module.to refuses the VAE's 4-D (Conv2d) weights
            if param.dim() == 5:
                param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif variant == "compile":
        vae.encoder = torch.compile(vae.encoder)
    elif variant != "eager":
        raise ValueError(f"unknown VAE variant {variant!r} (one of {', '.join(VAE_VARIANTS)})")

    def encode() -> None:
        with torch.no_grad():
            vae.encode(x).latent_dist.sample()

    def mean() -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(x).latent_dist.mean.float()

    return encode, mean


def vae_variants(
    config: dict[str, Any],
    clip: tuple[int, int, int],
    device: torch.device,
    variants: list[str],
    encodes: int,
) -> dict[str, float]:
    """frames/s of each variant, and its largest difference from eager's posterior mean (a
    variant that changes results changes store bytes: precompute would fingerprint it)."""
    figures: dict[str, float] = {}
    reference = None
    for variant in ["eager", *[v for v in variants if v != "eager"]]:
        _reset_peak(device)
        encode, mean = vae_encode(config, clip, device, variant)
        times = timed(encode, device, 1, encodes)  # the warm-up call compiles
        got = mean()
        reference = got if reference is None else reference
        figures[f"vae_frames_per_s_{variant}"] = clip[0] / statistics.median(times)
        figures[f"vae_max_abs_diff_{variant}"] = float((got - reference).abs().max())
        figures[f"vae_peak_mem_gb_{variant}"] = _peak_gb(device)
    eager = figures["vae_frames_per_s_eager"]
    for variant in variants:
        if variant != "eager":
            figures[f"vae_speedup_{variant}"] = figures[f"vae_frames_per_s_{variant}"] / eager
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reduced", action="store_true", help="tiny sizes on the CPU (for tests)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOPS")
    p.add_argument("--steps", type=int, default=5, help="measured transformer steps")
    p.add_argument("--encodes", type=int, default=3, help="measured VAE encodes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--vae-variants",
        default="eager,channels_last",
        help=f"comma-separated VAE encode variants to compare ({', '.join(VAE_VARIANTS)}; "
        "compile takes minutes on the real VAE)",
    )
    args = p.parse_args(argv)
    variants = [v for v in args.vae_variants.split(",") if v]
    unknown = sorted(set(variants) - set(VAE_VARIANTS))
    if unknown:
        p.error(f"--vae-variants: unknown {', '.join(unknown)} (one of {', '.join(VAE_VARIANTS)})")

    if args.reduced:
        device = torch.device("cpu")
        config = {**proportional_transformer_config(), "num_layers": 2}
        latent, clip, vae_config = (3, 8, 8), (9, 64, 64), proportional_vae_config()
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --reduced for the CPU version")
        device = torch.device("cuda")
        config, vae_config = REAL_2B_TRANSFORMER, REAL_2B_VAE
        latent, clip = (13, 64, 64), (49, 512, 512)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    flops = transformer_flops(config, *latent, backward=True)
    _reset_peak(device)
    step_times = timed(transformer_step(config, latent, device), device, args.warmup, args.steps)
    step_s = statistics.median(step_times)
    step_mem = _peak_gb(device)
    _reset_peak(device)  # the transformer and its optimizer are freed before the VAE runs
    vae_times = timed(vae_encode(vae_config, clip, device)[0], device, 1, args.encodes)
    vae_s = statistics.median(vae_times)
    vae_peak = _peak_gb(device)
    compared = vae_variants(vae_config, clip, device, variants, args.encodes)

    achieved = flops / step_s / 1e12
    figures: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "video_tokens": tokens,
        "text_tokens": config["max_text_seq_length"],
        "transformer_step_flops": f"{flops:.4g}",
        "transformer_step_s": step_s,
        "transformer_step_s_min": min(step_times),
        "transformer_step_s_max": max(step_times),
        "transformer_step_tflops": achieved,
        "peak_tflops": peak if peak is not None else "unknown (pass --peak-tflops)",
        "mfu": achieved / peak if peak else float("nan"),
        "transformer_peak_mem_gb": step_mem,
        "vae_clip": "x".join(map(str, clip)),
        "vae_encode_s": vae_s,
        "vae_frames_per_s": clip[0] / vae_s,
        "vae_peak_mem_gb": vae_peak,
        "online_step_ratio_estimate": (step_s + 2 * vae_s) / step_s,
        **compared,
    }
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
