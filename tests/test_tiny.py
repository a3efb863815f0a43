"""`cogfun tiny-model`: the folder it writes loads with plain diffusers/transformers, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from cogfun.app.cli import app
from cogfun.testing.tiny import VARIANTS, write_tiny_model
from typer.testing import CliRunner

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory) -> dict[str, Path]:
    """One folder per variant, each written through the CLI."""
    root = tmp_path_factory.mktemp("tiny_cli")
    runner = CliRunner()
    out = {}
    for variant in VARIANTS:
        target = root / variant
        result = runner.invoke(
            app, ["tiny-model", str(target), "--variant", variant, "--seed", "0"]
        )
        assert result.exit_code == 0, result.output
        assert f"wrote tiny {variant} model to {target}" in result.output
        out[variant] = target
    return out


def test_help_lists_tiny_model_and_version():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "tiny-model" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == "cogfun 0.1.0"
    result = runner.invoke(app, ["tiny-model", "--help"])
    assert result.exit_code == 0
    assert "--variant" in result.output and "--seed" in result.output
    for variant in VARIANTS:
        assert variant in result.output


def test_unknown_variant_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--variant", "7b"])
    assert result.exit_code != 0
    assert "7b" in result.output
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="7b"):
        write_tiny_model(tmp_path / "m", variant="7b")


def test_layout_and_model_index(cli_models):
    for root in cli_models.values():
        assert sorted(p.name for p in root.iterdir()) == sorted([*PARTS, "model_index.json"])
        index = json.loads((root / "model_index.json").read_text())
        assert index["_class_name"] == "CogVideoXPipeline"
        assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
        assert index["vae"] == ["diffusers", "AutoencoderKLCogVideoX"]
        assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
        assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
        assert index["scheduler"] == ["diffusers", "CogVideoXDDIMScheduler"]
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        # The V1.5 layout keeps the real head dim of 64 (its RoPE split), so it is a bit bigger.
        assert total < (3_000_000 if root.name == "v15-5b-inp" else 2_000_000)


# (variant, in_channels, rotary, VAE scaling, head dim, time embed dim, (frames, h, w) sample,
#  patch_size_t, add_noise_in_inpaint_model)
LAYOUTS = [
    ("2b-inp", 33, False, 1.15258426, 16, 32, (49, 60, 90), None, False),
    ("2b", 16, False, 1.15258426, 16, 32, (49, 60, 90), None, False),
    ("5b-inp", 33, True, 0.7, 16, 32, (49, 60, 90), None, False),
    ("v15-5b-inp", 33, True, 0.7, 64, 16, (81, 300, 300), 2, True),
]


def test_layouts_cover_every_variant():
    assert [row[0] for row in LAYOUTS] == list(VARIANTS)


@pytest.mark.parametrize(
    "variant,in_channels,rotary,scaling,head_dim,time_dim,sample,patch_t,add_noise", LAYOUTS
)
def test_plain_from_pretrained(
    cli_models,
    variant,
    in_channels,
    rotary,
    scaling,
    head_dim,
    time_dim,
    sample,
    patch_t,
    add_noise,
):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    root = cli_models[variant]
    transformer = CogVideoXTransformer3DModel.from_pretrained(root, subfolder="transformer")
    cfg = transformer.config
    assert cfg.in_channels == in_channels
    assert cfg.out_channels == 16
    assert cfg.use_rotary_positional_embeddings is rotary
    assert cfg.use_learned_positional_embeddings is False
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (2, 2, head_dim)
    assert (cfg.sample_frames, cfg.sample_height, cfg.sample_width) == sample
    assert cfg.patch_size == 2 and cfg.patch_size_t == patch_t
    assert cfg.patch_bias is (patch_t is None)
    assert cfg.spatial_interpolation_scale == 1.875 and cfg.temporal_interpolation_scale == 1.0
    assert (cfg.text_embed_dim, cfg.max_text_seq_length, cfg.time_embed_dim) == (32, 226, time_dim)
    inner = 2 * head_dim
    if patch_t is None:
        assert transformer.patch_embed.proj.weight.shape == (inner, in_channels, 2, 2)
    else:  # CogVideoX 1.5: a Linear over (c, t, y, x) per token, 33 * 2 * 2 * 2 = 264 inputs
        assert transformer.patch_embed.proj.weight.shape == (inner, in_channels * 8)
        assert transformer.proj_out.weight.shape == (16 * 8, inner)
    raw = json.loads((root / "transformer" / "config.json").read_text())
    assert raw["add_noise_in_inpaint_model"] is add_noise

    vae = AutoencoderKLCogVideoX.from_pretrained(root, subfolder="vae")
    assert vae.config.scaling_factor == scaling
    assert vae.config.latent_channels == 16 and vae.config.temporal_compression_ratio == 4

    encoder = T5EncoderModel.from_pretrained(root, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    assert encoder.config.d_model == 32 and encoder.config.feed_forward_proj == "gated-gelu"
    assert len(tokenizer) <= encoder.config.vocab_size
    ids = tokenizer("a dog is running on the beach").input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id == 2
    states = encoder(torch.tensor([ids])).last_hidden_state
    assert states.shape == (1, len(ids), 32)
    assert torch.isfinite(states).all()


def test_v15_layout_equals_golden_config(cli_models, golden_dir):
    """The tiny V1.5 transformer config is the golden V1.5 one (tests/golden/README.md §11)."""
    ours = json.loads((cli_models["v15-5b-inp"] / "transformer" / "config.json").read_text())
    golden = json.loads((golden_dir / "transformer_v15_inp" / "config.json").read_text())
    keys = set(golden) - {"_diffusers_version"}
    assert {k: ours[k] for k in keys} == {k: golden[k] for k in keys}
    # Newer diffusers also writes the CogVideoX 1.5 I2V field, unset.
    assert {k: ours[k] for k in set(ours) - set(golden)} == {"ofs_embed_dim": None}


def test_v15_loads_and_trains_through_cogfun(cli_models):
    """load_transformer accepts it; videos (even latent frames) and images (1 frame) both run."""
    from cogfun.common.models import load_transformer
    from cogfun.common.transformer import transformer_forward

    model = load_transformer(cli_models["v15-5b-inp"])
    assert model.add_noise_in_inpaint_model is True
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 226, 32, generator=gen)
    for frames in (2, 1):
        noisy = torch.randn(2, frames, 16, 8, 12, generator=gen)
        inpaint = torch.randn(2, frames, 17, 8, 12, generator=gen)
        pred = transformer_forward(model, noisy, text, torch.tensor([10, 900]), inpaint)
        assert pred.shape == (2, frames, 16, 8, 12)
        assert torch.isfinite(pred).all()
        pred.square().mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_vae_real_compression(cli_models):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(cli_models["2b-inp"], subfolder="vae").eval()
    clip = torch.rand(1, 3, 9, 64, 64) * 2 - 1  # (B, C, F, H, W)
    with torch.no_grad():
        posterior = vae.encode(clip).latent_dist
    assert posterior.mean.shape == (1, 16, 3, 8, 8)
    assert torch.isfinite(posterior.mean).all()


def test_transformer_forward_shapes(cli_models):
    from diffusers import CogVideoXTransformer3DModel

    for variant in ("2b-inp", "5b-inp"):
        model = CogVideoXTransformer3DModel.from_pretrained(
            cli_models[variant], subfolder="transformer"
        )
        latents = torch.randn(1, 3, 33, 8, 8)  # (B, F_lat, 16 + 1 + 16, h, w)
        rotary = None
        if variant == "5b-inp":
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            # (cos, sin), each (F_lat * h/2 * w/2, head_dim)
            rotary = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)
            assert rotary[0].shape == (3 * 4 * 4, 16)
        with torch.no_grad():
            out = model(
                hidden_states=latents,
                encoder_hidden_states=torch.randn(1, 226, 32),
                timestep=torch.tensor([500]),
                image_rotary_emb=rotary,
                return_dict=False,
            )[0]
        assert out.shape == (1, 3, 16, 8, 8)


def test_scheduler_config(cli_models, golden_dir):
    golden = json.loads((golden_dir / "scheduler_2b" / "scheduler_config.json").read_text())
    for variant, root in cli_models.items():
        cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        expected = dict(golden, snr_shift_scale=3.0 if variant.startswith("2b") else 1.0)
        assert cfg == expected


def test_same_seed_same_bytes(cli_models, tmp_path):
    again = write_tiny_model(tmp_path / "again", variant="2b-inp", seed=0)
    assert _digests(again) == _digests(cli_models["2b-inp"])
    v15 = write_tiny_model(tmp_path / "v15", variant="v15-5b-inp", seed=0)
    assert _digests(v15) == _digests(cli_models["v15-5b-inp"])
    # Rewriting into an existing folder gives the same bytes too (stale part folders are replaced).
    (again / "tokenizer" / "spiece.model").write_bytes(b"stale")
    write_tiny_model(again, variant="2b-inp", seed=0)
    assert _digests(again) == _digests(cli_models["2b-inp"])


def test_other_seed_other_weights(cli_models, tmp_path):
    other = _digests(write_tiny_model(tmp_path / "s1", variant="2b-inp", seed=1))
    base = _digests(cli_models["2b-inp"])
    assert other.keys() == base.keys()
    for name in other:
        if name.endswith(".safetensors"):
            assert other[name] != base[name], name
        else:  # configs, tokenizer and scheduler do not depend on the seed
            assert other[name] == base[name], name


def test_writing_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_model(tmp_path / "m", variant="2b", seed=5)
    assert torch.equal(torch.rand(3), expected)
