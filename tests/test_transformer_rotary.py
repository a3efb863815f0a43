"""Rotary (5b) and V1.5 (`patch_size_t` 2) transformers against the original's goldens.

tests/golden/README.md sections 9-11: RoPE tables on the original's grids, the forward through
`load_transformer` + `transformer_forward`, the V1.5 one-frame pad and the refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cogfun.common.rope import rope_crop, rope_grid
from cogfun.common.transformer import load_transformer, rotary_embedding, transformer_forward
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import CogVideoXPatchEmbed, get_3d_rotary_pos_embed
from safetensors import safe_open
from safetensors.torch import load_file


def _case(golden_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / f"loss_case_{name}.safetensors")


ROTARY_CASES = [
    "5b_f3_h8w8",
    "5b_f5_h12w8",
    "5b_f1_h16w16",
    "5b_f2_h8w12",
    "v15_f4_h8w12",
    "v15_f2_h12w8",
    "v15_f1_h8w8",
]
OFF_ORIGIN = ["5b_f3_h8w8", "5b_f5_h12w8", "5b_f1_h16w16"]


def _meta(golden_dir: Path, name: str) -> dict:
    with safe_open(golden_dir / f"loss_case_{name}.safetensors", "pt") as f:
        return f.metadata()


def _config(golden_dir: Path, folder: str) -> dict:
    return json.loads((golden_dir / folder / "config.json").read_text())


@pytest.mark.parametrize("name", ROTARY_CASES)
def test_rope_tables_match_original(golden_dir, name):
    meta = _meta(golden_dir, name)
    rope = json.loads(meta["rope"])
    f_lat, h, w = json.loads(meta["latent_grid_F_h_w"])
    config = _config(golden_dir, meta["transformer"])
    case = _case(golden_dir, name)
    cos, sin = rotary_embedding(config, f_lat, h, w)
    assert cos.shape == sin.shape == case["rope_cos"].shape
    assert cos.shape[0] == rope["temporal_size"] * rope["grid_h_w"][0] * rope["grid_h_w"][1]
    torch.testing.assert_close(cos, case["rope_cos"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, case["rope_sin"], atol=1e-6, rtol=0)
    if rope["grid_type"] == "linspace":
        assert [list(c) for c in rope_crop(tuple(rope["grid_h_w"]), 30, 45)] == rope["crop"]
    else:  # slice: V1.5, ceil(F / 2) temporal positions, bounded by sample size / patch
        assert rope["temporal_size"] == -(-f_lat // 2)
        assert rope["max_size"] == [config["sample_height"] // 2, config["sample_width"] // 2]


@pytest.mark.parametrize("name", ["5b_f2_h8w12", *OFF_ORIGIN])
def test_diffusers_rope_grid_differs_off_origin(golden_dir, name):
    """Why cogfun builds its own grid: diffusers' agrees only when the crop starts at 0 (README §10)."""
    rope = json.loads(_meta(golden_dir, name)["rope"])
    case = _case(golden_dir, name)
    crop = tuple(tuple(c) for c in rope["crop"])
    cos, sin = get_3d_rotary_pos_embed(64, crop, tuple(rope["grid_h_w"]), rope["temporal_size"])
    diff = max((cos - case["rope_cos"]).abs().max(), (sin - case["rope_sin"]).abs().max())
    if crop[0] == (0, 0):
        assert diff < 1e-6
    else:
        assert diff > 0.5


def test_rope_positions_off_origin(golden_dir):
    """Columns 8..38 over 4 patches: the original's 8, 15.5, 23, 30.5, not 8, 14.83, 21.67, 28.5."""
    config = _config(golden_dir, "transformer_5b_inp")
    frames, rows, cols = rope_grid(config, 3, 8, 8)
    assert frames.tolist() == [0.0, 1.0, 2.0]
    assert rows.tolist() == [0.0, 7.5, 15.0, 22.5]
    assert cols.tolist() == [8.0, 15.5, 23.0, 30.5]


@pytest.mark.parametrize("name", ROTARY_CASES)
def test_rotary_forward_matches_original(golden_dir, name):
    meta = _meta(golden_dir, name)
    case = _case(golden_dir, name)
    model = load_transformer(golden_dir / meta["transformer"])
    with torch.no_grad():
        pred = transformer_forward(
            model,
            case["noisy_latents"],
            case["prompt_embeds"],
            case["timesteps"],
            case["inpaint_latents"],
        )
    assert pred.shape == case["model_pred"].shape
    torch.testing.assert_close(pred, case["model_pred"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def v15_model(golden_dir: Path) -> CogVideoXTransformer3DModel:
    return load_transformer(golden_dir / "transformer_v15_inp")


def test_v15_loads_with_linear_patch_embed(v15_model):
    assert v15_model.config.patch_size_t == 2
    assert v15_model.add_noise_in_inpaint_model is True
    assert type(v15_model.patch_embed) is CogVideoXPatchEmbed  # rotary: no sin-cos table
    assert v15_model.patch_embed.proj.weight.shape == (128, 33 * 2 * 2 * 2)
    assert sum(p.numel() for p in v15_model.parameters()) == 511_136


def test_v15_image_is_padded_with_a_zero_frame(v15_model, golden_dir):
    """The pad is a zero frame on noisy AND inpaint latents; only frame 0 comes back (README §11)."""
    case = _case(golden_dir, "v15_f1_h8w8")
    hidden = torch.cat([case["noisy_latents"], case["inpaint_latents"]], dim=2)  # (3, 1, 33, 8, 8)
    padded = torch.cat([hidden, torch.zeros_like(hidden)], dim=1)
    with torch.no_grad():
        by_hand = v15_model(
            hidden_states=padded,
            encoder_hidden_states=case["prompt_embeds"],
            timestep=case["timesteps"],
            image_rotary_emb=(case["rope_cos"], case["rope_sin"]),
            return_dict=False,
        )[0]
        ours = transformer_forward(
            v15_model,
            case["noisy_latents"],
            case["prompt_embeds"],
            case["timesteps"],
            case["inpaint_latents"],
        )
    assert by_hand.shape == (3, 2, 16, 8, 8) and ours.shape == (3, 1, 16, 8, 8)
    torch.testing.assert_close(ours, by_hand[:, :1], atol=0, rtol=0)


def test_v15_odd_frame_count_is_refused(v15_model):
    noisy = torch.zeros(1, 3, 16, 8, 8)
    with pytest.raises(ValueError, match="3 latent frames cannot be patched .*patch_size_t 2"):
        transformer_forward(
            v15_model,
            noisy,
            torch.zeros(1, 226, 32),
            torch.tensor([1]),
            torch.zeros(1, 3, 17, 8, 8),
        )


def test_v15_grid_larger_than_sample_size_is_refused(golden_dir):
    config = _config(golden_dir, "transformer_v15_inp")  # 300 x 300 latent: 150 x 150 patches
    assert rotary_embedding(config, 2, 300, 8)[0].shape == (150 * 4, 64)
    with pytest.raises(ValueError, match=r"larger than this model's rotary grid of 150x150"):
        rotary_embedding(config, 2, 302, 8)


def test_patch_size_t_without_rotary_is_refused(golden_dir, tmp_path):
    config = _config(golden_dir, "transformer_v15_inp")
    folder = tmp_path / "odd"
    shutil.copytree(golden_dir / "transformer_v15_inp", folder)
    config["use_rotary_positional_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="patch_size_t 2 .*without use_rotary_positional"):
        load_transformer(folder)


def test_v15_in_channels_16_to_33_zero_init(golden_dir, tmp_path):
    """The Linear patch embed widens per channel: its inputs are (c, t, y, x) with c slowest."""
    config = {k: v for k, v in _config(golden_dir, "transformer_v15_inp").items() if k[0] != "_"}
    config.pop("add_noise_in_inpaint_model")
    torch.manual_seed(3)
    CogVideoXTransformer3DModel(**{**config, "in_channels": 16}).save_pretrained(tmp_path / "t2v")
    plain = load_transformer(tmp_path / "t2v")
    grown = load_transformer(tmp_path / "t2v", in_channels=33)
    old, new = plain.patch_embed.proj.weight, grown.patch_embed.proj.weight
    assert old.shape == (128, 16 * 8) and new.shape == (128, 33 * 8)
    assert grown.config.in_channels == 33
    torch.testing.assert_close(new.reshape(128, 33, 8)[:, :16], old.reshape(128, 16, 8))
    assert torch.count_nonzero(new.reshape(128, 33, 8)[:, 16:]) == 0

    # Any conditioning leaves the output unchanged only if the zero block sits exactly on the
    # inpaint channels' inputs.
    gen = torch.Generator().manual_seed(4)
    noisy = torch.randn(2, 2, 16, 8, 12, generator=gen)
    inpaint = torch.randn(2, 2, 17, 8, 12, generator=gen)
    text = torch.randn(2, 226, 32, generator=gen)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = transformer_forward(plain, noisy, text, t)
        got = transformer_forward(grown, noisy, text, t, inpaint)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
