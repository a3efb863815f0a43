"""The "proportional" benchmark model: CogVideoX-Fun-2b-InP scaled down so its costs keep the real ratios.

A tiny model makes every stage nearly free, so its timings say nothing about where a real run spends
its time. This model scales every width and token/voxel count of the real 2b-InP by about 1/15, so
the per-sample forward costs VAE (one encode) : T5 : transformer stay near the real 1 : 0.019 : 0.69
(docs/performance.md, "The proportional benchmark model"; `bench/flops.py` measures them):

    transformer  30 layers, 2 heads x 64, time_embed_dim 32, text_embed_dim 256, 15 text tokens,
                 in 33 / out 16, patch 2, no rotary, sample 60x90x49             (~7.55 M params)
    VAE          block_out_channels (8,16,16,32), 3 layers per block, GroupNorm 4, 16 latent
                 channels, temporal compression 4, scaling 1.15258426               (~0.91 M)
    T5           d_model 256, d_kv 64, 4 heads, d_ff 640 gated-gelu, 24 layers      (~18.2 M)

`write_proportional_model(out)` writes it as a full model folder in the diffusers layout, exactly
like `cogfun.testing.tiny.write_tiny_model` (same tokenizer, scheduler JSON and model_index), so
precompute and training load it through the same code as a real checkpoint. The config builders
need only torch + diffusers (+ transformers for T5), so `bench/gpu.py` and `bench/flops.py` use them
on machines without the rest of cogfun's dependencies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

PROPORTIONAL_TEXT_LEN = 15  # T5 tokens, also the transformer's max_text_seq_length
PROPORTIONAL_T5 = dict(d_model=256, d_kv=64, num_heads=4, d_ff=640, num_layers=24)
VAE_SCALING_2B = 1.15258426

# The real CogVideoX-Fun-2b-InP transformer (transformer/config.json of the released model).
REAL_2B_TRANSFORMER = dict(
    num_attention_heads=30,
    attention_head_dim=64,
    in_channels=33,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=30,
    dropout=0.0,
    attention_bias=True,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    patch_size_t=None,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
    patch_bias=True,
)

# The real 2b VAE (vae/config.json of the released model); the rest are AutoencoderKLCogVideoX
# defaults.
REAL_2B_VAE = dict(
    block_out_channels=(128, 256, 256, 512),
    layers_per_block=3,
    norm_num_groups=32,
    latent_channels=16,
    temporal_compression_ratio=4,
    scaling_factor=VAE_SCALING_2B,
)


def proportional_transformer_config() -> dict[str, Any]:
    """The real 2b-InP layout with widths and text length scaled down (same base grid 60x90x49)."""
    return {
        **REAL_2B_TRANSFORMER,
        "num_attention_heads": 2,
        "attention_head_dim": 64,
        "time_embed_dim": 32,
        "text_embed_dim": PROPORTIONAL_T5["d_model"],
        "max_text_seq_length": PROPORTIONAL_TEXT_LEN,
    }


def proportional_vae_config() -> dict[str, Any]:
    return {
        **REAL_2B_VAE,
        "block_out_channels": (8, 16, 16, 32),
        "norm_num_groups": 4,
    }


def t5_config(vocab_size: int, **widths: int) -> Any:
    """A T5 encoder config (gated-gelu, no dropout, no cache) with the given widths."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **widths,
    )


def build_transformer(config: dict[str, Any]) -> Any:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(**config)


def build_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(**config)


def write_proportional_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the proportional benchmark model folder (random weights) and returns its path.

    Same layout, tokenizer, scheduler and seeding scheme as the tiny model; existing part folders
    under `out_dir` are replaced.
    """
    # tiny.py's folder helpers, reused: one tokenizer/scheduler/seeding scheme for every generated
    # model folder.
    from cogfun.testing import tiny

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for part in tiny.PARTS:
        if (out / part).exists():
            shutil.rmtree(out / part)

    vocab_size = tiny.write_tokenizer(out / "tokenizer")
    with tiny.seeded(seed, "text_encoder"):
        from transformers import T5EncoderModel

        encoder = T5EncoderModel(t5_config(vocab_size, **PROPORTIONAL_T5)).eval()
    encoder.save_pretrained(str(out / "text_encoder"))
    tiny.normalize_json(out / "text_encoder" / "config.json")

    with tiny.seeded(seed, "transformer"):
        transformer = build_transformer(proportional_transformer_config())
    transformer.save_pretrained(str(out / "transformer"))
    config_path = out / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["add_noise_in_inpaint_model"] = False  # as real Fun V1.1 checkpoints carry it
    tiny.write_json(config_path, config)

    with tiny.seeded(seed, "vae"):
        vae = build_vae(proportional_vae_config())
    vae.save_pretrained(str(out / "vae"))
    tiny.normalize_json(out / "vae" / "config.json")

    tiny.write_pipeline_files(out, "2b-inp")
    return out


def parameter_counts(model_dir: str | Path) -> dict[str, int]:
    """Parameters per part of a written model folder, read from the safetensors headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for part in ("transformer", "vae", "text_encoder"):
        total = 0
        for file in sorted((Path(model_dir) / part).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
        counts[part] = total
    return counts
