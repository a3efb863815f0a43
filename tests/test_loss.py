"""cogfun.train.loss: the Stage-2 math against the original's goldens and an independent recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cogfun.common.transformer import load_transformer
from cogfun.train.loss import (
    LossOutput,
    build_inpaint_latents,
    caption_dropout,
    compute_loss,
    draw_t2v_flags,
    load_noise_scheduler,
    pick_variants,
    prepare_batch,
    sample_posterior,
)
from diffusers import CogVideoXTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

CASES = ["f3_h8w8", "f13_h8w12", "f1_h16w16"]
SCALING = 1.15258426


@pytest.fixture(scope="module")
def model(golden_dir: Path) -> CogVideoXTransformer3DModel:
    return load_transformer(golden_dir / "transformer_2b_inp", dtype=torch.float32)


@pytest.fixture(scope="module")
def scheduler(golden_dir: Path):
    return load_noise_scheduler(golden_dir / "scheduler_2b")


def _case(golden_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / f"loss_case_{name}.safetensors")


def test_schedule_matches_original(scheduler, golden_dir, tmp_path):
    golden = load_file(golden_dir / "ddpm_schedule_2b.safetensors")
    for key in ("betas", "alphas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(scheduler, key), golden[key], atol=1e-6, rtol=0)
    assert scheduler.alphas_cumprod[999] == 0  # zero terminal SNR
    assert scheduler.config.prediction_type == "v_prediction"
    # A model folder with scheduler/ works too; a folder without one is refused by name.
    (tmp_path / "model" / "scheduler").mkdir(parents=True)
    cfg = (golden_dir / "scheduler_2b" / "scheduler_config.json").read_text()
    (tmp_path / "model" / "scheduler" / "scheduler_config.json").write_text(cfg)
    assert torch.equal(
        load_noise_scheduler(tmp_path / "model").alphas_cumprod, golden["alphas_cumprod"]
    )
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        load_noise_scheduler(tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_compute_loss_matches_original(model, scheduler, golden_dir, name):
    case = _case(golden_dir, name)
    inpaint = build_inpaint_latents(
        case["mask_latent"], case["masked_video_latents"], case["t2v_flag"], SCALING
    )
    torch.testing.assert_close(inpaint, case["inpaint_latents"], atol=1e-6, rtol=0)
    batch = {
        "latents": case["x0"],
        "prompt_embeds": case["prompt_embeds"],
        "inpaint_latents": inpaint,
    }
    with torch.no_grad():
        out = compute_loss(
            model, batch, scheduler, noise=case["noise"], timesteps=case["timesteps"]
        )
        motion = compute_loss(
            model,
            batch,
            scheduler,
            noise=case["noise"],
            timesteps=case["timesteps"],
            motion_sub_loss=True,
            motion_sub_loss_ratio=0.25,
        )
    assert isinstance(out, LossOutput)
    torch.testing.assert_close(out.noisy_latents, case["noisy_latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.target, case["target"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.model_pred, case["model_pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, case["loss"], rtol=1e-5, atol=0)
    assert torch.equal(out.timesteps, case["timesteps"])
    if "loss_with_motion_sub_0p25" in case:
        torch.testing.assert_close(
            motion.loss, case["loss_with_motion_sub_0p25"], rtol=1e-5, atol=0
        )
    else:  # one latent frame: the motion term does not apply
        assert case["x0"].shape[1] <= 2 and motion.loss == out.loss


# 5b (rotary, off-origin crops) and V1.5 (patch_size_t 2) cases: tests/golden/README.md §10, §11.
ROTARY_CASES = [
    "5b_f3_h8w8",
    "5b_f5_h12w8",
    "5b_f1_h16w16",
    "5b_f2_h8w12",
    "v15_f4_h8w12",
    "v15_f2_h12w8",
    "v15_f1_h8w8",
]


@pytest.mark.parametrize("name", ROTARY_CASES)
def test_compute_loss_matches_original_rotary(golden_dir, name):
    """Called exactly as the 2b cases, with the model and scheduler the case's metadata names."""
    path = golden_dir / f"loss_case_{name}.safetensors"
    case = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model = load_transformer(golden_dir / meta["transformer"], dtype=torch.float32)
    scheduler = load_noise_scheduler(golden_dir / meta["scheduler"])
    assert float(meta["scaling_factor"]) == 0.7
    inpaint = build_inpaint_latents(
        case["mask_latent"], case["masked_video_latents"], case["t2v_flag"], 0.7
    )
    torch.testing.assert_close(inpaint, case["inpaint_latents"], atol=1e-6, rtol=0)
    batch = {
        "latents": case["x0"],
        "prompt_embeds": case["prompt_embeds"],
        "inpaint_latents": inpaint,
    }
    with torch.no_grad():
        out = compute_loss(
            model, batch, scheduler, noise=case["noise"], timesteps=case["timesteps"]
        )
        motion = compute_loss(
            model,
            batch,
            scheduler,
            noise=case["noise"],
            timesteps=case["timesteps"],
            motion_sub_loss=True,
            motion_sub_loss_ratio=0.25,
        )
    torch.testing.assert_close(out.noisy_latents, case["noisy_latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.target, case["target"], atol=1e-6, rtol=0)
    assert out.model_pred.shape == case["model_pred"].shape == case["x0"].shape
    torch.testing.assert_close(out.model_pred, case["model_pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, case["loss"], rtol=1e-5, atol=0)
    if "loss_with_motion_sub_0p25" in case:
        torch.testing.assert_close(
            motion.loss, case["loss_with_motion_sub_0p25"], rtol=1e-5, atol=0
        )
    else:
        assert case["x0"].shape[1] <= 2 and motion.loss == out.loss


def test_v15_image_prediction_is_the_real_frame_only(golden_dir):
    """An image on V1.5 is padded to two latent frames inside the forward; frame 0 comes back."""
    case = load_file(golden_dir / "loss_case_v15_f1_h8w8.safetensors")
    model = load_transformer(golden_dir / "transformer_v15_inp")
    scheduler = load_noise_scheduler(golden_dir / "scheduler_5b")
    batch = {
        "latents": case["x0"],
        "prompt_embeds": case["prompt_embeds"],
        "inpaint_latents": case["inpaint_latents"],
    }
    with torch.no_grad():
        out = compute_loss(
            model, batch, scheduler, noise=case["noise"], timesteps=case["timesteps"]
        )
    assert out.model_pred.shape == (3, 1, 16, 8, 8)
    expected = torch.nn.functional.mse_loss(out.model_pred, case["target"])
    assert out.loss == expected
    torch.testing.assert_close(out.loss, case["loss"], rtol=1e-5, atol=0)


def test_compute_loss_independent_recomputation(model, golden_dir):
    """compute_loss against the §13 formulas written out by hand, on a fixed batch and drawn t, ε."""
    acp = load_file(golden_dir / "ddpm_schedule_2b.safetensors")["alphas_cumprod"]
    scheduler = load_noise_scheduler(golden_dir / "scheduler_2b")
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, 16, 8, 12, generator=gen)
    batch = {
        "latents": x0,
        "prompt_embeds": torch.randn(2, 226, 32, generator=gen),
        "inpaint_latents": torch.randn(2, 3, 17, 8, 12, generator=gen),
    }
    with torch.no_grad():
        out = compute_loss(model, batch, scheduler, generator=torch.Generator().manual_seed(9))
        # The same generator seed gives the same draws: noise first, then timesteps.
        draw = torch.Generator().manual_seed(9)
        noise = torch.randn(x0.shape, generator=draw)
        t = torch.randint(0, 1000, (2,), generator=draw)
        a = acp[t].sqrt()[:, None, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None, None]
        x_t = a * x0 + s * noise
        v = a * noise - s * x0
        pred = CogVideoXTransformer3DModel.forward(
            model,
            hidden_states=torch.cat([x_t, batch["inpaint_latents"]], dim=2),
            encoder_hidden_states=batch["prompt_embeds"],
            timestep=t,
            return_dict=False,
        )[0]
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.noisy_latents, x_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.target, v, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.model_pred, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ((pred - v) ** 2).mean(), rtol=1e-5, atol=0)

    motion = compute_loss(
        model,
        batch,
        scheduler,
        noise=noise,
        timesteps=t,
        motion_sub_loss=True,
        motion_sub_loss_ratio=0.4,
    )
    d_pred, d_v = pred[:, 1:] - pred[:, :-1], v[:, 1:] - v[:, :-1]
    expected = 0.6 * ((pred - v) ** 2).mean() + 0.4 * ((d_pred - d_v) ** 2).mean()
    torch.testing.assert_close(motion.loss.detach(), expected, rtol=1e-5, atol=0)


def test_timesteps_range_and_gradients(model, scheduler):
    gen = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(64, 1, 16, 4, 4, generator=gen),
        "prompt_embeds": torch.randn(64, 226, 32, generator=gen),
        "inpaint_latents": torch.zeros(64, 1, 17, 4, 4),
    }
    out = compute_loss(model, batch, scheduler, generator=gen, num_train_timesteps=10)
    assert out.timesteps.dtype == torch.int64
    assert 0 <= out.timesteps.min() and out.timesteps.max() <= 9
    assert len(out.timesteps.unique()) > 5
    out.loss.backward()
    assert model.proj_out.weight.grad is not None and model.proj_out.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_normal_mode_16_channels(tmp_path, scheduler):
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=1,
    ).save_pretrained(tmp_path / "t2v")
    t2v = load_transformer(tmp_path / "t2v")
    gen = torch.Generator().manual_seed(3)
    batch = {
        "latents": torch.randn(2, 2, 16, 8, 8, generator=gen),
        "prompt_embeds": torch.randn(2, 226, 32),
    }
    with torch.no_grad():
        out = compute_loss(t2v, batch, scheduler, generator=gen)
    assert out.model_pred.shape == (2, 2, 16, 8, 8) and torch.isfinite(out.loss)


def test_sample_posterior_statistics():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 1, 4, 1, 1).expand(4000, 1, 4, 2, 2)
    logvar = torch.tensor([0.0, -2.0, 1.0, 50.0]).reshape(1, 1, 4, 1, 1).expand(4000, 1, 4, 2, 2)
    moments = torch.cat([mean, logvar], dim=2)  # (B, F, 2C, h, w), mean first
    z = sample_posterior(moments, torch.Generator().manual_seed(0))
    assert z.shape == (4000, 1, 4, 2, 2) and z.dtype == torch.float32
    std = torch.exp(0.5 * torch.tensor([0.0, -2.0, 1.0, 20.0]))  # logvar clamped at 20
    z = z.transpose(0, 2).reshape(4, -1)
    z_score = (z.mean(1) - mean[0, 0, :, 0, 0]) / (std / z.shape[1] ** 0.5)
    assert z_score.abs().max() < 4
    torch.testing.assert_close(z.std(1) / std, torch.ones(4), atol=0.03, rtol=0)
    again = sample_posterior(moments, torch.Generator().manual_seed(0))
    assert torch.equal(again.transpose(0, 2).reshape(4, -1), z)


def test_draw_probabilities():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    picks = pick_variants(torch.zeros(n, 4, dtype=torch.bool), gen)
    assert picks.dtype == torch.int64 and set(picks.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(
        torch.bincount(picks) / n, torch.full((4,), 0.25), atol=0.015, rtol=0
    )

    all_masked = torch.arange(n) % 2 == 0
    flags = draw_t2v_flags(all_masked, gen)
    assert flags.dtype == torch.float32 and set(flags.unique().tolist()) == {0.0, 1.0}
    assert torch.all(flags[~all_masked] == 1)
    assert abs((flags[all_masked] == 0).float().mean().item() - 0.9) < 0.015
    assert torch.all(draw_t2v_flags(all_masked, gen, p_zero=0.0) == 1)

    captions = torch.arange(1, n + 1)
    dropped = caption_dropout(captions, gen, p=0.1, empty_index=0)
    assert dropped.dtype == torch.int64
    kept = dropped != 0
    assert torch.equal(dropped[kept], captions[kept])
    assert abs((~kept).float().mean().item() - 0.1) < 0.01


def test_build_inpaint_latents_scales_mask_channel():
    mask = torch.full((2, 1, 1, 2, 2), 0.625)
    masked = torch.ones(2, 1, 16, 2, 2)
    out = build_inpaint_latents(mask, masked, torch.tensor([1.0, 0.0]), 0.7)
    assert out.shape == (2, 1, 17, 2, 2)
    torch.testing.assert_close(out[0, :, 0], torch.full((1, 2, 2), 0.625 * 0.7))
    torch.testing.assert_close(out[0, :, 1:], torch.full((1, 16, 2, 2), 0.7))
    assert torch.count_nonzero(out[1]) == 0


def _raw_batch(gen: torch.Generator, b: int = 3, k: int = 2) -> dict[str, torch.Tensor]:
    mean = torch.randn(b, 2, 16, 4, 4, generator=gen)
    moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=2).bfloat16()  # std ~3e-7
    # Variant j has mask value (j+1)/8 and masked mean j+1, so the pick is visible in the output.
    masks = torch.stack([torch.full((b, 2, 1, 4, 4), (j + 1) / 8) for j in range(k)], 1)
    masked_mean = torch.stack([torch.full((b, 2, 16, 4, 4), float(j + 1)) for j in range(k)], 1)
    masked = torch.cat([masked_mean, torch.full_like(masked_mean, -30.0)], dim=3).bfloat16()
    all_masked = torch.zeros(b, k, dtype=torch.bool)
    all_masked[:, -1] = True
    return {
        "latents": moments,
        "masks": masks.bfloat16(),
        "masked_latents": masked,
        "all_masked": all_masked,
        "caption": torch.arange(1, b + 1),
    }


def test_prepare_batch_inpaint():
    raw = _raw_batch(torch.Generator().manual_seed(0), b=64)
    table = torch.randn(65, 226, 32)
    out = prepare_batch(
        raw, lambda idx: table[idx], "inpaint", SCALING, torch.Generator().manual_seed(1)
    )
    mean = raw["latents"][:, :, :16].float()
    torch.testing.assert_close(out["latents"], mean * SCALING, atol=1e-5, rtol=0)
    inpaint = out["inpaint_latents"]
    assert inpaint.shape == (64, 2, 17, 4, 4) and inpaint.dtype == torch.float32
    variant, flags = out["variant"], out["t2v_flag"]
    assert set(variant.tolist()) == {0, 1}
    expected_mask = (variant + 1).float() / 8 * flags * SCALING
    torch.testing.assert_close(inpaint[:, 0, 0, 0, 0], expected_mask)
    torch.testing.assert_close(
        inpaint[:, 0, 1, 0, 0], (variant + 1).float() * flags * SCALING, atol=1e-5, rtol=0
    )
    assert torch.all(flags[variant == 0] == 1)  # only all-masked variants can be zeroed
    assert (flags[variant == 1] == 0).any()
    torch.testing.assert_close(out["prompt_embeds"], table[out["caption"]])
    assert set(out["caption"].tolist()) <= set(range(65))

    again = prepare_batch(
        raw, lambda idx: table[idx], "inpaint", SCALING, torch.Generator().manual_seed(1)
    )
    for key in ("latents", "inpaint_latents", "prompt_embeds", "variant", "t2v_flag", "caption"):
        assert torch.equal(again[key], out[key]), key

    # Captions read by the loader (`caption_embeds`): the same batch, and only the empty caption
    # is looked up (the loader already read the others).
    asked = []

    def empty_only(idx):
        asked.append(idx.tolist())
        return table[idx]

    loaded = {**raw, "caption_embeds": table[raw["caption"]]}
    read = prepare_batch(loaded, empty_only, "inpaint", SCALING, torch.Generator().manual_seed(1))
    for key in ("latents", "inpaint_latents", "prompt_embeds", "variant", "t2v_flag", "caption"):
        assert torch.equal(read[key], out[key]), key
    assert asked == [[0]]
    dropped = (out["caption"] == 0) & (raw["caption"] != 0)
    assert dropped.any() and torch.equal(read["prompt_embeds"][dropped][0], table[0])


def test_prepare_batch_normal_and_sample_format():
    raw = _raw_batch(torch.Generator().manual_seed(0))
    out = prepare_batch(
        raw, lambda idx: torch.zeros(len(idx), 226, 32), "normal", 0.7, torch.Generator()
    )
    assert "inpaint_latents" not in out and out["latents"].shape == (3, 2, 16, 4, 4)

    sample = {
        **raw,
        "latents": raw["latents"][:, :, :16],
        "masked_latents": raw["masked_latents"][:, :, :, :16],
    }
    out = prepare_batch(
        sample,
        lambda idx: torch.zeros(len(idx), 226, 32),
        "inpaint",
        0.7,
        torch.Generator(),
        latent_format="sample",
    )
    torch.testing.assert_close(out["latents"], sample["latents"].float() * 0.7)
    assert out["inpaint_latents"].shape == (3, 2, 17, 4, 4)
    with pytest.raises(ValueError, match="mode 'control'"):
        prepare_batch(raw, lambda idx: idx, "control", 0.7, torch.Generator())
