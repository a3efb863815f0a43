"""`generate` against the original inpaint pipeline's recorded runs (tests/golden/README.md sec. 12-13)."""

from __future__ import annotations

import json

import pytest
import torch
from cogfun.common.fun_vae import fun_decode, plain_decode
from cogfun.common.sample_inputs import SampleSize, snap_size
from cogfun.common.sampling import NOISE_AUG_SIGMA, generate, inpaint_conditioning, noise_augment
from cogfun.common.schedulers import SCHEDULERS, build_scheduler
from cogfun.common.transformer import load_transformer
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.upsampling import CogVideoXUpsample3D
from safetensors.torch import load_file

CASES = ["sample_t2v_64x96_ddimcog", "sample_t2v_64x96_cogdpm", "sample_i2v_64x64_ddimcog"]
# The pipeline's scheduler classes, by the names `cogfun sample --scheduler` takes.
BY_CLASS = {"CogVideoXDDIMScheduler": "DDIM_Cog", "CogVideoXDPMScheduler": "CogVideoX_DPM"}


@pytest.fixture(scope="module")
def models(golden_dir):
    torch.set_num_threads(1)
    vae = AutoencoderKLCogVideoX.from_pretrained(golden_dir / "vae_tiny").eval()
    transformer = load_transformer(golden_dir / "transformer_2b_inp").eval()
    return transformer, vae


@pytest.fixture(scope="module")
def cases(golden_dir):
    return json.loads((golden_dir / "sample_cases.json").read_text())


def _run(models, golden, case, scheduler_name, decode=True):
    transformer, vae = models
    steps, outputs = [], []
    generator = torch.Generator("cpu").manual_seed(case["generator_seed"])
    result = generate(
        transformer,
        vae,
        build_scheduler(scheduler_name, case["scheduler_config"]),
        prompt_embeds=golden["prompt_embeds"],
        negative_prompt_embeds=golden["negative_prompt_embeds"],
        latents=golden["latents_init"],
        video=golden.get("video"),
        mask=golden.get("mask"),
        num_inference_steps=case["num_inference_steps"],
        guidance_scale=case["guidance_scale"],
        generator=generator,
        on_step=lambda i, t, lat, out: (steps.append(lat.clone()), outputs.append(out.clone())),
        decode=decode,
    )
    return result, torch.stack(steps), outputs, generator


def _maxabs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_golden_case(models, cases, golden_dir, name):
    case = cases[name]
    golden = load_file(golden_dir / f"{name}.safetensors")
    result, steps, outputs, _ = _run(models, golden, case, BY_CLASS[case["scheduler_class"]])
    # The conditioning first: one batch of it (the pipeline duplicates it for [uncond, cond]).
    assert torch.equal(golden["inpaint_latents"][0], golden["inpaint_latents"][1])
    assert _maxabs(result["inpaint_latents"], golden["inpaint_latents"][:1]) < 1e-5
    if case["mode"] == "t2v":
        assert torch.count_nonzero(result["inpaint_latents"]) == 0
    assert _maxabs(outputs[0], golden["transformer_out_step0"]) < 1e-5
    assert _maxabs(steps, golden["step_latents"]) < 1e-4
    assert _maxabs(result["latents"], golden["latents_final"]) < 1e-4
    assert _maxabs(result["video"], golden["decoded_video"]) < 1e-3
    assert result["video"].dtype == torch.float32


def test_dpm_draws_replay_the_generator(models, cases, golden_dir):
    """The CogVideoX DPM steps draw 6 tensors from `generator`, in the pipeline's order."""
    name = "sample_t2v_64x96_cogdpm"
    case, golden = cases[name], load_file(golden_dir / f"{name}.safetensors")
    _, _, _, generator = _run(models, golden, case, "CogVideoX_DPM", decode=False)
    replay = torch.Generator("cpu").manual_seed(case["generator_seed"])
    draws = golden["scheduler_noise_draws"]
    for stored in draws:
        assert torch.equal(torch.randn(stored.shape, generator=replay), stored)
    assert torch.equal(generator.get_state(), replay.get_state())  # no draw more, none less


def test_ddim_origin_trajectory(models, cases, golden_dir):
    name = "sample_i2v_64x64_ddimcog"
    case, golden = cases[name], load_file(golden_dir / f"{name}.safetensors")
    result, steps, _, _ = _run(models, golden, case, "DDIM_Origin", decode=False)
    assert _maxabs(steps, golden["ddimorigin_step_latents"]) < 1e-4
    assert _maxabs(result["latents"], golden["ddimorigin_latents_final"]) < 1e-4
    assert "video" not in result
    # DDIMScheduler ignores snr_shift_scale: the two samplers really differ on this case.
    assert _maxabs(golden["ddimorigin_latents_final"], golden["latents_final"]) > 0.1


@pytest.mark.parametrize("name", CASES)
def test_plain_diffusers_decode_differs(models, golden_dir, name):
    """The Fun decode is what makes the video match: diffusers' own chunking is off by ~0.1."""
    _, vae = models
    golden = load_file(golden_dir / f"{name}.safetensors")
    z = golden["latents_final"].permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    plain = (plain_decode(vae, z) / 2 + 0.5).clamp(0, 1)
    fun = (fun_decode(vae, z) / 2 + 0.5).clamp(0, 1)
    assert _maxabs(plain, golden["decoded_video"]) > 0.05
    assert _maxabs(fun, golden["decoded_video"]) < 1e-5


def test_fun_decode_frame_counts_and_restores_the_vae(models):
    """Frame 0 alone gives 1 frame, each later latent frame 4, a trailing single one included."""
    _, vae = models
    before = [type(m) for m in vae.decoder.modules()]
    for f_lat, frames in ((1, 1), (2, 5), (3, 9), (4, 13)):
        out = fun_decode(
            vae, torch.randn(1, 16, f_lat, 4, 6, generator=torch.Generator().manual_seed(f_lat))
        )
        assert out.shape == (1, 3, frames, 32, 48)
    assert [type(m) for m in vae.decoder.modules()] == before
    assert any(type(m) is CogVideoXUpsample3D for m in vae.decoder.modules())
    # diffusers gives 16 frames for 4 latent frames: the two decodes really differ there too.
    assert plain_decode(vae, torch.zeros(1, 16, 4, 4, 6)).shape[2] == 16


def test_noise_aug_leaves_masked_pixels_and_has_the_pipeline_sigma():
    masked = torch.full((1, 3, 5, 64, 64), -1.0)
    masked[:, :, 0] = 0.25
    out = noise_augment(masked, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, 1:], masked[:, :, 1:])
    noise = out[:, :, 0] - 0.25
    assert abs(noise.std().item() - NOISE_AUG_SIGMA) < 0.003
    assert abs(noise.mean().item()) < 0.003


def test_noise_aug_only_when_the_model_asks(models, golden_dir):
    _, vae = models
    golden = load_file(golden_dir / "sample_i2v_64x64_ddimcog.safetensors")
    shape = golden["latents_init"].shape

    def cond(add_noise, seed):
        gen = torch.Generator().manual_seed(seed)
        return inpaint_conditioning(
            vae, shape, golden["video"], golden["mask"], add_noise=add_noise, noise_generator=gen
        )

    plain = cond(False, 0)
    assert torch.allclose(plain, golden["inpaint_latents"][:1], atol=1e-5)
    noisy = cond(True, 0)
    assert torch.equal(noisy, cond(True, 0))  # same generator seed, same conditioning
    assert not torch.equal(noisy[:, :, 1:], plain[:, :, 1:])
    assert torch.equal(noisy[:, :, :1], plain[:, :, :1])  # the mask channel has no noise


def test_every_scheduler_runs_and_moves_the_latents(models, cases, golden_dir):
    name = "sample_t2v_64x96_ddimcog"
    case, golden = cases[name], load_file(golden_dir / f"{name}.safetensors")
    finals = {}
    for scheduler in SCHEDULERS:
        result, steps, _, _ = _run(models, golden, case, scheduler, decode=False)
        assert torch.isfinite(result["latents"]).all(), scheduler
        finals[scheduler] = result["latents"]
    assert _maxabs(finals["DDIM_Cog"], golden["latents_final"]) < 1e-4
    distinct = {round(v.abs().sum().item(), 2) for v in finals.values()}
    assert len(distinct) == len(SCHEDULERS)


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler 'DDPM'.*DDIM_Origin"):
        build_scheduler("DDPM", {})


def test_snap_size():
    said = []
    two_b = {"use_rotary_positional_embeddings": False, "sample_frames": 49}
    assert snap_size(50, 70, 100, two_b, said.append) == SampleSize(49, 64, 96)
    assert any("50 -> 49" in s for s in said) and any("70x100 -> 64x96" in s for s in said)
    assert snap_size(81, 64, 64, two_b, said.append).frames == 49  # the 2b table ends at 13 latents
    said.clear()
    assert snap_size(49, 64, 64, two_b, said.append).frames == 49 and not said
    v15 = {"use_rotary_positional_embeddings": True, "patch_size_t": 2}
    assert snap_size(49, 64, 64, v15, said.append).frames == 53  # 13 latent frames -> 14
    assert snap_size(85, 64, 64, v15, said.append).frames == 85  # 22 latent frames: even
    assert (
        snap_size(81, 64, 64, {"use_rotary_positional_embeddings": True}, said.append).frames == 81
    )
    with pytest.raises(ValueError, match="--num-frames must be >= 1"):
        snap_size(0, 64, 64, two_b, said.append)


def test_generate_refuses_mismatched_video(models, golden_dir):
    transformer, vae = models
    golden = load_file(golden_dir / "sample_i2v_64x64_ddimcog.safetensors")
    with pytest.raises(ValueError, match="the video has 5 frames but the latents have 3"):
        generate(
            transformer,
            vae,
            build_scheduler("DDIM_Origin", golden_dir / "scheduler_2b"),
            prompt_embeds=golden["prompt_embeds"],
            negative_prompt_embeds=golden["negative_prompt_embeds"],
            latents=golden["latents_init"],
            video=golden["video"][:, :, :5],
            mask=golden["mask"][:, :, :5],
            num_inference_steps=1,
            guidance_scale=6.0,
            generator=None,
        )


def test_v15_model_samples_even_latent_counts_and_images(models, golden_dir):
    """V1.5 (`patch_size_t` 2, `add_noise_in_inpaint_model`): 2 and 1 latent frames run, 3 is refused,
    and the conditioning's noise comes from the noise generator (same seed, same result)."""
    _, vae = models
    transformer = load_transformer(golden_dir / "transformer_v15_inp").eval()
    assert transformer.config.patch_size_t == 2 and transformer.add_noise_in_inpaint_model
    emb = torch.randn(
        1, 226, transformer.config.text_embed_dim, generator=torch.Generator().manual_seed(1)
    )

    def run(f_lat, noise_seed):
        frames = (f_lat - 1) * 4 + 1
        video = torch.rand(1, 3, frames, 64, 64, generator=torch.Generator().manual_seed(2))
        mask = torch.full((1, 1, frames, 64, 64), 255.0)
        mask[:, :, 0] = 0
        return generate(
            transformer,
            vae,
            build_scheduler("DDIM_Origin", golden_dir / "scheduler_5b"),
            prompt_embeds=emb,
            negative_prompt_embeds=torch.zeros_like(emb),
            latents=torch.randn(1, f_lat, 16, 8, 8, generator=torch.Generator().manual_seed(3)),
            video=video,
            mask=mask,
            num_inference_steps=2,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(4),
            noise_aug_generator=torch.Generator().manual_seed(noise_seed),
        )

    two = run(2, 0)
    assert two["video"].shape == (1, 3, 5, 64, 64) and two["inpaint_latents"].shape == (
        1,
        2,
        17,
        8,
        8,
    )
    assert torch.equal(two["latents"], run(2, 0)["latents"])
    assert not torch.equal(two["inpaint_latents"], run(2, 1)["inpaint_latents"])
    one = run(1, 0)
    assert one["latents"].shape == (1, 1, 16, 8, 8) and one["video"].shape == (1, 3, 1, 64, 64)
    with pytest.raises(ValueError, match="3 latent frames: this model \\(patch_size_t 2\\) needs"):
        run(3, 0)
