"""V1.1 Fun models (`add_noise_in_inpaint_model: true`) train on noise-augmented masked videos;
precompute freezes that augmentation per mask variant, from the variant's seed."""

from __future__ import annotations

import json
import shutil

import torch
from cogfun.common.masks import add_inpaint_noise
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset

OPTS = dict(
    image_sample_size=128,
    video_sample_size=64,
    token_sample_size=64,
    video_sample_n_frames=9,
    threads=1,
    decode_workers=0,
    progress="none",
    masks_per_sample=2,
)


def test_noise_only_on_known_pixels_with_the_original_sigma():
    masked = torch.full((5, 3, 32, 32), 0.25)
    masked[:, :, :16] = -1.0  # masked half
    sigmas = []
    for seed in range(300):
        out = add_inpaint_noise(masked, torch.Generator().manual_seed(seed))
        assert torch.equal(out[:, :, :16], masked[:, :, :16])  # masked pixels stay exactly -1
        sigmas.append((out[:, :, 16:] - 0.25).std().item())
    log_sigma = torch.tensor(sigmas).log()
    # sigma = exp(N(-3, 0.5)): log-sigma has mean -3 and std 0.5
    assert abs(log_sigma.mean().item() + 3.0) < 0.1
    assert abs(log_sigma.std().item() - 0.5) < 0.08
    a = add_inpaint_noise(masked, torch.Generator().manual_seed(1))
    assert torch.equal(a, add_inpaint_noise(masked, torch.Generator().manual_seed(1)))


def test_precompute_applies_it_when_the_transformer_config_asks(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    make_sample_dataset(data, n_videos=2, n_images=1, seed=0)
    noisy_model = tmp_path / "model_v11"
    shutil.copytree(tiny_model_dir, noisy_model)
    cfg_path = noisy_model / "transformer" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["add_noise_in_inpaint_model"] = True
    cfg_path.write_text(json.dumps(config))

    plain, noisy = tmp_path / "plain.zarr", tmp_path / "noisy.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=plain, **OPTS)) == 0
    assert run(PrecomputeConfig(data=data, model=noisy_model, out=noisy, **OPTS)) == 0
    a, b = open_store(plain), open_store(noisy)
    assert a.settings["inpaint_noise"] is False and b.settings["inpaint_noise"] is True
    assert a.buckets.keys() == b.buckets.keys()
    differs = 0
    for name, info in a.buckets.items():
        for slot in info.slots:
            x, y = a.read_sample(name, slot), b.read_sample(name, slot)
            assert torch.equal(x["latents"], y["latents"])  # the clean video is untouched
            assert torch.equal(x["masks"], y["masks"])
            for k in range(2):
                if not x["all_masked"][k]:  # an all-masked video has no known pixel to noise
                    differs += not torch.equal(x["masked_latents"][k], y["masked_latents"][k])
    assert differs > 0
