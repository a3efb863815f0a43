"""Random-weight miniature CogVideoX-Fun model folders (`cogfun tiny-model`).

The folder has exactly the diffusers layout of a real checkpoint (`transformer/ vae/ text_encoder/
tokenizer/ scheduler/ model_index.json`) and real architectures with tiny widths, so every test and
the demo load it through the same code as a real model:

    cogfun tiny-model /tmp/tiny --variant 2b-inp --seed 0

Only the widths are small. The transformer keeps the real 2b sin-cos base grid (60x90 latent, 49
frames -> 13x30x45 patches) so the Fun positional interpolation is exercised; the VAE keeps the real
8x spatial / 4x temporal compression and 16 latent channels. `v15-5b-inp` is the CogVideoX-Fun V1.5
layout (`patch_size_t` 2, rotary, head dim 64, 300x300 latent cap, `add_noise_in_inpaint_model`
true) with the 5b-family VAE scaling 0.7. Same seed, same bytes: every part's
weights come from a seed derived from (seed, part), and every JSON is written with sorted keys.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

VARIANTS = ("2b-inp", "2b", "5b-inp", "v15-5b-inp")

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

T5_D_MODEL = 32
MAX_TEXT_LEN = 226


@dataclass(frozen=True)
class _Variant:
    in_channels: int  # 33 = 16 noisy + 1 mask + 16 masked-video latents (inpaint); 16 plain
    rotary: bool  # 5b uses RoPE; 2b a fixed sin-cos table
    vae_scaling: float
    # In the shipped scheduler JSON; DDPMScheduler ignores it (tests/golden/README.md section 9).
    snr_shift_scale: float
    # CogVideoX 1.5 fields (tests/golden/README.md section 11); the defaults are the 1.0 layout.
    patch_size_t: int | None = None
    head_dim: int = 16
    time_embed_dim: int = 32
    sample_hwf: tuple[int, int, int] = (60, 90, 49)  # latent height, latent width, pixel frames
    add_noise_in_inpaint_model: bool = False


_VARIANTS: dict[str, _Variant] = {
    "2b-inp": _Variant(in_channels=33, rotary=False, vae_scaling=1.15258426, snr_shift_scale=3.0),
    "2b": _Variant(in_channels=16, rotary=False, vae_scaling=1.15258426, snr_shift_scale=3.0),
    "5b-inp": _Variant(in_channels=33, rotary=True, vae_scaling=0.7, snr_shift_scale=1.0),
    # Mirrors golden/transformer_v15_inp: a Linear patch embed over 2 latent frames, a real head dim
    # of 64 (RoPE split 16:24:24) and the 300x300 latent cap of the shipped V1.5 config.
    "v15-5b-inp": _Variant(
        in_channels=33,
        rotary=True,
        vae_scaling=0.7,
        snr_shift_scale=1.0,
        patch_size_t=2,
        head_dim=64,
        time_embed_dim=16,
        sample_hwf=(300, 300, 81),
        add_noise_in_inpaint_model=True,
    ),
}
assert tuple(_VARIANTS) == VARIANTS

# Words a caption is likely to use; each becomes a whole-word piece so short test captions give a few
# real ids. Single characters (with and without the word-start marker) cover any other ASCII text, so
# nothing maps to unk.
_WORDS = """
a an the of in on at to and or with by for from into over under near through across between
is are was be being his her its their this that these those it he she they we you i
man woman person people child boy girl dog cat bird horse fish car bus train boat plane bike
tree trees flower grass water river sea ocean lake sky cloud clouds sun moon snow rain fire
city street road house room table chair window door wall field forest mountain beach park
walking running sitting standing flying swimming driving playing talking looking moving dancing
jumping eating holding smiling falling rolling turning riding camera view shot scene video clip
slowly quickly gently red blue green yellow white black brown orange pink purple gray golden
small large big little tall short long old young new bright dark light warm cold soft beautiful
close up wide aerial slow motion background foreground left right top bottom front back side
day night morning evening sunset sunrise time frame frames high quality detailed cinematic
one two three four five six seven eight nine ten first last next other some many all each
""".split()

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+=*#@_[]"


def _part_seed(seed: int, part: str) -> int:
    """Independent, collision-free seed per part (63 bits: torch.manual_seed's safe range)."""
    digest = hashlib.sha256(f"cogfun-tiny:{seed}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextmanager
def seeded(seed: int, part: str) -> Iterator[None]:
    """Seed torch's global RNG for one part's init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_part_seed(seed, part))
        yield


def write_json(path: Path, obj: dict) -> None:
    """Writes `obj` indented with sorted keys: the same object always gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _vocab() -> list[tuple[str, float]]:
    """T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces with unigram log-probabilities."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {piece for piece, _ in vocab}
    # Whole words score far above spelling them out, so the unigram Viterbi prefers them.
    pieces = [(f"▁{w}", -4.0) for w in _WORDS]
    pieces += [(f"▁{c}", -9.0) for c in _CHARS] + [(c, -10.0) for c in _CHARS]
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return vocab


def write_tokenizer(folder: Path) -> int:
    """Saves a T5 unigram tokenizer (no sentencepiece model needed); returns its vocab size."""
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=_vocab(), extra_ids=0, model_max_length=MAX_TEXT_LEN)
    tok.save_pretrained(str(folder))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        normalize_json(folder / name)
    return len(tok)


def normalize_json(path: Path) -> None:
    """Rewrites a saved JSON with sorted keys, so file bytes never depend on dict insertion order."""
    if path.is_file():
        write_json(path, json.loads(path.read_text()))


def _write_text_encoder(folder: Path, vocab_size: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with seeded(seed, "text_encoder"):
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(folder))
    normalize_json(folder / "config.json")


def _transformer_config(spec: _Variant) -> dict:
    # Mirrors golden/transformer_2b_inp/config.json: real 2b layout, tiny widths (the V1.5 variant:
    # golden/transformer_v15_inp/config.json).
    sample_height, sample_width, sample_frames = spec.sample_hwf
    return dict(
        num_attention_heads=2,
        attention_head_dim=spec.head_dim,
        in_channels=spec.in_channels,
        out_channels=16,
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embed_dim=spec.time_embed_dim,
        text_embed_dim=T5_D_MODEL,
        num_layers=2,
        dropout=0.0,
        attention_bias=True,
        sample_width=sample_width,
        sample_height=sample_height,
        sample_frames=sample_frames,
        patch_size=2,
        patch_size_t=spec.patch_size_t,
        temporal_compression_ratio=4,
        max_text_seq_length=MAX_TEXT_LEN,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=spec.rotary,
        use_learned_positional_embeddings=False,
        # V1.5 ships false; its Linear patch embed has a bias either way.
        patch_bias=spec.patch_size_t is None,
    )


def _write_transformer(folder: Path, spec: _Variant, seed: int) -> None:
    from diffusers import CogVideoXTransformer3DModel

    with seeded(seed, "transformer"):
        model = CogVideoXTransformer3DModel(**_transformer_config(spec))
    model.save_pretrained(str(folder))
    # Real Fun checkpoints carry this key (true from V1.1); plain diffusers ignores it with a warning.
    config = json.loads((folder / "config.json").read_text())
    config["add_noise_in_inpaint_model"] = spec.add_noise_in_inpaint_model
    write_json(folder / "config.json", config)


def _write_vae(folder: Path, spec: _Variant, seed: int) -> None:
    from diffusers import AutoencoderKLCogVideoX

    with seeded(seed, "vae"):
        model = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=16,
            temporal_compression_ratio=4,
            scaling_factor=spec.vae_scaling,
        )
    model.save_pretrained(str(folder))
    normalize_json(folder / "config.json")


def _scheduler_config(spec: _Variant) -> dict:
    # The shipped CogVideoXDDIMScheduler JSON (golden/scheduler_2b/scheduler_config.json).
    return {
        "_class_name": "CogVideoXDDIMScheduler",
        "_diffusers_version": "0.31.0",
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "snr_shift_scale": spec.snr_shift_scale,
        "timestep_spacing": "trailing",
        "set_alpha_to_one": True,
        "clip_sample": False,
        "sample_max_value": 1.0,
        "steps_offset": 0,
    }


_MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline",
    "_diffusers_version": "0.31.0",
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}


def write_pipeline_files(out_dir: str | Path, variant: str = "2b-inp") -> None:
    """Writes `scheduler/scheduler_config.json` and `model_index.json` of a `variant` model folder.

    Public with `write_tokenizer`, `seeded`, `write_json` and `normalize_json` so that every
    generated model folder (the benchmarks' proportional and wide models too) shares one tokenizer,
    scheduler and seeding scheme.
    """
    out = Path(out_dir)
    write_json(out / "scheduler" / "scheduler_config.json", _scheduler_config(_VARIANTS[variant]))
    write_json(out / "model_index.json", _MODEL_INDEX)


def write_tiny_model(out_dir: str | Path, variant: str = "2b-inp", seed: int = 0) -> Path:
    """Writes a tiny random-weight model folder and returns its path.

    Existing part folders under `out_dir` are replaced (a stale file from an earlier write would
    change what loads and break "same seed, same bytes"); nothing else in `out_dir` is touched.
    """
    if variant not in _VARIANTS:
        raise ValueError(
            f"unknown tiny-model variant {variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    spec = _VARIANTS[variant]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"tiny-model output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if (out / part).exists():
            shutil.rmtree(out / part)

    vocab_size = write_tokenizer(out / "tokenizer")
    _write_text_encoder(out / "text_encoder", vocab_size, seed)
    _write_transformer(out / "transformer", spec, seed)
    _write_vae(out / "vae", spec, seed)
    write_pipeline_files(out, variant)
    return out
