"""cogfun.common.transformer against the original CogVideoX-Fun goldens (golden README §1-8).

The rotary (5b) and V1.5 cases are in test_transformer_rotary.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cogfun.common.rope import rope_crop
from cogfun.common.transformer import (
    FunPatchEmbed,
    fun_pos_embedding,
    load_transformer,
    rotary_embedding,
    transformer_forward,
)
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import CogVideoXPatchEmbed
from safetensors.torch import load_file

CASES = ["f3_h8w8", "f13_h8w12", "f1_h16w16"]

# The golden model's widths and the real 2b base grid (README §1).
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=1,
    out_channels=16,
)


@pytest.fixture(scope="module")
def golden_model(golden_dir: Path) -> CogVideoXTransformer3DModel:
    return load_transformer(golden_dir / "transformer_2b_inp", dtype=torch.float32)


def _case(golden_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / f"loss_case_{name}.safetensors")


def _save_tiny(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(**{**TINY, **overrides}).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_original(golden_model, golden_dir, name):
    case = _case(golden_dir, name)
    with torch.no_grad():
        pred = transformer_forward(
            golden_model,
            case["noisy_latents"],
            case["prompt_embeds"],
            case["timesteps"],
            case["inpaint_latents"],
        )
    assert pred.shape == case["model_pred"].shape
    torch.testing.assert_close(pred, case["model_pred"], atol=1e-5, rtol=1e-5)


def test_load_keeps_fun_keys_and_installs_positions(golden_model):
    assert isinstance(golden_model.patch_embed, FunPatchEmbed)
    assert golden_model.add_noise_in_inpaint_model is False
    assert golden_model.config["add_noise_in_inpaint_model"] is False
    assert golden_model.dtype == torch.float32
    assert sum(p.numel() for p in golden_model.parameters()) == 62_656


def test_model_folder_layout_and_missing_folder(golden_dir, tmp_path):
    shutil.copytree(golden_dir / "transformer_2b_inp", tmp_path / "model" / "transformer")
    model = load_transformer(tmp_path / "model")
    assert model.config.in_channels == 33
    with pytest.raises(FileNotFoundError, match="no transformer found"):
        load_transformer(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "key", ["f13_h30_w45", "f3_h4_w4", "f13_h16_w24", "f13_h4_w6", "f1_h8_w8", "d1920_f2_h4_w6"]
)
def test_pos_table_matches_original(golden_dir, key):
    golden = load_file(golden_dir / "pos_embed_2b.safetensors")[key]  # (F, hp, wp, D)
    f, hp, wp, dim = golden.shape
    config = json.loads((golden_dir / "transformer_2b_inp" / "config.json").read_text())
    if dim == 1920:  # the real 2b width: only the config is needed, not a 1920-wide model
        config.update(num_attention_heads=30, attention_head_dim=64)
    table = fun_pos_embedding(config, f, 2 * hp, 2 * wp)
    assert table.shape == (f * hp * wp, dim)
    torch.testing.assert_close(table, golden.reshape(-1, dim), atol=1e-6, rtol=0)


def test_diffusers_table_differs_off_base_grid(golden_dir):
    """Why FunPatchEmbed exists: diffusers' regenerated table only matches on the base grid."""
    tables = load_file(golden_dir / "pos_embed_2b.safetensors")
    plain = CogVideoXPatchEmbed(
        embed_dim=32, text_embed_dim=32, use_learned_positional_embeddings=False
    )
    for key, golden in tables.items():
        f, hp, wp, dim = golden.shape
        if dim != 32:
            continue
        regenerated = plain._get_positional_embeddings(2 * hp, 2 * wp, (f - 1) * 4 + 1)[0, 226:]
        diff = (regenerated - golden.reshape(-1, dim)).abs().max().item()
        if key == "f13_h30_w45":
            assert diff < 1e-6
        else:
            assert diff > 0.5, key


def test_patch_embed_adds_fun_table(golden_model, golden_dir):
    """The table a plain forward adds is the original's (captured as in README §4)."""
    golden = load_file(golden_dir / "pos_embed_2b.safetensors")["f3_h4_w4"]
    embed = golden_model.patch_embed
    text = torch.zeros(1, 226, 32)
    video = torch.zeros(1, 3, 33, 8, 8)  # (B, F, C, h, w)
    with torch.no_grad():
        out = embed(text, video)[0]  # (226 + 48, 32)
        # Zero inputs: text slots get only the projection bias, video tokens bias + table.
        torch.testing.assert_close(out[:226], embed.text_proj.bias.expand(226, -1))
        video_part = out[226:] - embed.proj.bias
    torch.testing.assert_close(video_part, golden.reshape(-1, 32), atol=1e-6, rtol=0)


def test_too_many_frames_is_refused(golden_model):
    with pytest.raises(ValueError, match="exceed the 13 latent frames"):
        fun_pos_embedding(golden_model.config, 14, 8, 8)


def test_wrong_channel_count_is_refused(golden_model, golden_dir):
    case = _case(golden_dir, "f3_h8w8")
    with pytest.raises(ValueError, match="takes 33 input channels but got 16"):
        transformer_forward(
            golden_model, case["noisy_latents"], case["prompt_embeds"], case["timesteps"]
        )


def test_in_channels_16_to_33_zero_init(tmp_path):
    src = _save_tiny(tmp_path / "t2v", in_channels=16)
    plain = load_transformer(src)
    grown = load_transformer(src, in_channels=33)
    weight = grown.patch_embed.proj.weight  # (D, 33, 2, 2)
    assert weight.shape[1] == 33 and grown.config.in_channels == 33
    torch.testing.assert_close(weight[:, :16], plain.patch_embed.proj.weight, atol=0, rtol=0)
    assert torch.count_nonzero(weight[:, 16:]) == 0
    assert isinstance(grown.patch_embed, FunPatchEmbed)

    # Zero extra channels: any conditioning leaves the output of the 16-channel model unchanged.
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 2, 16, 8, 12, generator=gen)
    inpaint = torch.randn(2, 2, 17, 8, 12, generator=gen)
    text = torch.randn(2, 226, 32, generator=gen)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = transformer_forward(plain, noisy, text, t)
        got = transformer_forward(grown, noisy, text, t, inpaint)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    # The saved model is a plain 33-channel diffusers folder.
    grown.save_pretrained(tmp_path / "inp")
    reloaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "inp")
    assert reloaded.config.in_channels == 33
    torch.testing.assert_close(reloaded.patch_embed.proj.weight, weight, atol=0, rtol=0)


def test_save_pretrained_round_trip(golden_model, golden_dir, tmp_path):
    golden_model.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["add_noise_in_inpaint_model"] is False
    plain = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "saved")
    assert type(plain.patch_embed) is CogVideoXPatchEmbed
    ours, theirs = golden_model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key

    case = _case(golden_dir, "f13_h8w12")
    again = load_transformer(tmp_path / "saved")
    with torch.no_grad():
        pred = transformer_forward(
            again,
            case["noisy_latents"],
            case["prompt_embeds"],
            case["timesteps"],
            case["inpaint_latents"],
        )
    torch.testing.assert_close(pred, case["model_pred"], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_output_and_grads(golden_dir):
    case = _case(golden_dir, "f3_h8w8")
    args = (
        case["noisy_latents"],
        case["prompt_embeds"],
        case["timesteps"],
        case["inpaint_latents"],
    )
    grads = []
    for checkpointing in (False, True):
        model = load_transformer(golden_dir / "transformer_2b_inp").train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        pred = transformer_forward(model, *args)
        torch.testing.assert_close(pred, case["model_pred"], atol=1e-5, rtol=1e-5)
        pred.square().mean().backward()
        grads.append(model.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_rotary_config(tmp_path):
    folder = _save_tiny(
        tmp_path / "rope", in_channels=33, use_rotary_positional_embeddings=True, num_layers=2
    )
    model = load_transformer(folder)
    assert type(model.patch_embed) is CogVideoXPatchEmbed  # no sin-cos table with RoPE
    cos, sin = rotary_embedding(model.config, 3, 8, 12, device="cpu")
    assert cos.shape == sin.shape == (3 * 4 * 6, 16)
    # Temporal positions 0..F_lat-1: frame 0 of the temporal band (first 4 dims) is angle 0.
    assert torch.all(cos[:24, :4] == 1) and torch.all(sin[:24, :4] == 0)

    gen = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 3, 16, 8, 12, generator=gen)
    inpaint = torch.randn(2, 3, 17, 8, 12, generator=gen)
    text = torch.randn(2, 226, 32, generator=gen)
    with torch.no_grad():
        pred = transformer_forward(model, noisy, text, torch.tensor([5, 900]), inpaint)
        no_rope = model(
            hidden_states=torch.cat([noisy, inpaint], 2),
            encoder_hidden_states=text,
            timestep=torch.tensor([5, 900]),
            return_dict=False,
        )[0]
    assert pred.shape == (2, 3, 16, 8, 12) and torch.isfinite(pred).all()
    assert (pred - no_rope).abs().max() > 1e-3  # the rotary embedding is really passed


def test_rotary_none_for_2b(golden_model):
    assert rotary_embedding(golden_model.config, 3, 8, 8) is None


@pytest.mark.parametrize("grid", [(30, 45), (4, 6), (8, 8), (16, 24), (24, 8), (1, 45)])
def test_rope_crop_region_matches_diffusers(grid):
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    assert rope_crop(grid, 30, 45) == get_resize_crop_region_for_grid(grid, 45, 30)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_close_to_fp32_golden(golden_dir, autocast):
    """Pure bf16 weights, or fp32 weights under bf16 autocast: ~1e-2 relative (README caveats)."""
    case = _case(golden_dir, "f13_h8w12")
    dtype = torch.float32 if autocast else torch.bfloat16
    model = load_transformer(golden_dir / "transformer_2b_inp", dtype=dtype)
    args = (
        case["noisy_latents"],
        case["prompt_embeds"],
        case["timesteps"],
        case["inpaint_latents"],
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = transformer_forward(model, *args)
    assert pred.dtype == torch.bfloat16
    error = (pred.float() - case["model_pred"]).norm() / case["model_pred"].norm()
    assert error < 2e-2
