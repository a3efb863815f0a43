"""Per-sample forward FLOPs of the VAE, T5 and the transformer, and the cost ratios between them.

    python -m bench.flops                    # the proportional benchmark model at 49x128x128
    python -m bench.flops --model DIR        # any model folder (configs read from its parts)
    python -m bench.flops --real             # the real 2b-InP at 49x512x512 (T5-XXL, 226 tokens)

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add, matmuls,
convolutions and attention only) on the meta device: no weights are allocated and nothing is
computed, so even the real 1.7 B transformer and the real VAE at 49x512x512 count in seconds.

Figures (one `name: value` line each, defined in docs/performance.md):
- `cost_ratio_t5`, `cost_ratio_transformer`: T5 forward and transformer forward FLOPs per sample
  divided by one VAE encode (the real 2b-InP: 0.019 and 0.69; goal: within 2x of those);
- `online_compute_ratio`: FLOPs of the original's online step (two VAE encodes, T5, transformer
  forward + backward) over the transformer step alone; `..._ckpt` counts the forward recomputed by
  gradient checkpointing in both (the compute-only bound of the speedup from precomputing).

Only torch and diffusers are imported at module level (transformers lazily, for T5), so
`bench/gpu.py` can use this module on a machine without the rest of cogfun's dependencies.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.models import (
    PROPORTIONAL_T5,
    PROPORTIONAL_TEXT_LEN,
    REAL_2B_TRANSFORMER,
    REAL_2B_VAE,
    build_transformer,
    build_vae,
    proportional_transformer_config,
    proportional_vae_config,
    t5_config,
)

# t5-v1_1-xxl, the real CogVideoX text encoder.
REAL_T5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
REAL_T5_VOCAB = 32128
REAL_TEXT_LEN = 226
TARGET_RATIOS = {"cost_ratio_t5": 0.019, "cost_ratio_transformer": 0.69}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn` runs (forward, and backward if it calls it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def vae_encode_flops(vae_config: dict[str, Any], frames: int, height: int, width: int) -> int:
    """One VAE encode of a (1, 3, F, H, W) clip."""
    with torch.device("meta"):
        vae = build_vae(vae_config)
    x = torch.empty(1, 3, frames, height, width, device="meta")
    with torch.no_grad():
        return count_flops(lambda: vae.encode(x))


def t5_flops(widths: dict[str, int], text_len: int, vocab_size: int = REAL_T5_VOCAB) -> int:
    """One T5 encoder forward over `text_len` tokens (vocab size costs nothing: a lookup)."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(t5_config(vocab_size, **widths))
    ids = torch.zeros(1, text_len, dtype=torch.long, device="meta")
    with torch.no_grad():
        return count_flops(lambda: model(ids))


def transformer_flops(
    config: dict[str, Any], latent_frames: int, latent_h: int, latent_w: int, backward: bool = False
) -> int:
    """One transformer forward (or forward + backward, no recomputation) on one sample."""
    with torch.device("meta"):
        model = build_transformer(config)
    model.train(backward)
    x = torch.empty(1, latent_frames, config["in_channels"], latent_h, latent_w, device="meta")
    text = torch.empty(1, config["max_text_seq_length"], config["text_embed_dim"], device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")

    def run() -> None:
        out = model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        if backward:
            out.float().square().mean().backward()

    if backward:
        return count_flops(run)
    with torch.no_grad():
        return count_flops(run)


@dataclass(frozen=True)
class Costs:
    vae_encode: int
    t5: int
    transformer_forward: int
    transformer_fwd_bwd: int

    def figures(self) -> dict[str, float]:
        step = self.transformer_fwd_bwd
        online = 2 * self.vae_encode + self.t5 + step  # inpaint: the video and the masked video
        recompute = self.transformer_forward  # gradient checkpointing reruns each block's forward
        return {
            "vae_encode_gflop": self.vae_encode / 1e9,
            "t5_gflop": self.t5 / 1e9,
            "transformer_forward_gflop": self.transformer_forward / 1e9,
            "transformer_fwd_bwd_gflop": step / 1e9,
            "cost_ratio_t5": self.t5 / self.vae_encode,
            "cost_ratio_transformer": self.transformer_forward / self.vae_encode,
            "online_compute_ratio": online / step,
            "online_compute_ratio_ckpt": (online + recompute) / (step + recompute),
        }


def model_costs(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any],
    t5_widths: dict[str, int],
    frames: int,
    height: int,
    width: int,
    text_len: int,
) -> Costs:
    """Per-sample costs at a (frames, height, width) pixel clip with `text_len` text tokens."""
    f_lat, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    return Costs(
        vae_encode=vae_encode_flops(vae_config, frames, height, width),
        t5=t5_flops(t5_widths, text_len),
        transformer_forward=transformer_flops(transformer_config, f_lat, h, w),
        transformer_fwd_bwd=transformer_flops(transformer_config, f_lat, h, w, backward=True),
    )


def proportional_costs(frames: int = 49, height: int = 128, width: int = 128) -> Costs:
    return model_costs(
        proportional_transformer_config(),
        proportional_vae_config(),
        PROPORTIONAL_T5,
        frames,
        height,
        width,
        PROPORTIONAL_TEXT_LEN,
    )


def real_costs(frames: int = 49, height: int = 512, width: int = 512) -> Costs:
    return model_costs(
        REAL_2B_TRANSFORMER, REAL_2B_VAE, REAL_T5, frames, height, width, REAL_TEXT_LEN
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a model folder in the diffusers layout")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _init_args(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def folder_costs(model_dir: Path, frames: int, height: int, width: int) -> Costs:
    """Costs of a model folder's transformer, VAE and T5, read from their config.json files."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    transformer = _init_args(
        CogVideoXTransformer3DModel, _read_config(model_dir / "transformer" / "config.json")
    )  # drops Fun-only keys such as add_noise_in_inpaint_model
    vae = _init_args(AutoencoderKLCogVideoX, _read_config(model_dir / "vae" / "config.json"))
    t5 = _read_config(model_dir / "text_encoder" / "config.json")
    widths = {k: t5[k] for k in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers")}
    return model_costs(
        transformer, vae, widths, frames, height, width, transformer["max_text_seq_length"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="count a model folder instead")
    parser.add_argument("--real", action="store_true", help="the real 2b-InP at 49x512x512")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, help="pixels (default 128; 512 with --real)")
    parser.add_argument("--width", type=int, help="pixels (default 128; 512 with --real)")
    args = parser.parse_args(argv)
    side = 512 if args.real else 128
    h, w = args.height or side, args.width or side
    if args.model is not None:
        costs, what = folder_costs(args.model, args.frames, h, w), str(args.model)
    elif args.real:
        costs, what = real_costs(args.frames, h, w), "real 2b-InP"
    else:
        costs, what = proportional_costs(args.frames, h, w), "proportional"
    print(f"model: {what} at {args.frames}x{h}x{w}")
    for name, value in costs.figures().items():
        print(f"{name}: {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
