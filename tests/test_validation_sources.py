"""Where validation's inputs come from: prompts precompute encoded into the store
(`--validation-prompts store`) and start images for image-to-video validation (`--validation-paths`).
"""

from __future__ import annotations

import pytest
from cogfun.app.cli import app
from cogfun.train.preflight import TrainRefused
from train_support import make_store, metrics, run_in_process, validation_videos
from typer.testing import CliRunner

FAST = dict(
    validation_num_frames=5,
    validation_height=32,
    validation_width=32,
    validation_inference_steps=2,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("val_src")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square drifts\na dog\n")
    out = root / "emb.safetensors"
    result = CliRunner().invoke(
        app,
        ["encode-prompts", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
        + ["--out", str(out), "--negative-prompt", "bad detailed"],
    )
    assert result.exit_code == 0, result.output
    return out


def _precompute(dataset, model, out, **kw):
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run

    opts = dict(image_sample_size=64, video_sample_size=32, token_sample_size=32)
    opts.update(video_sample_n_frames=5, threads=1, decode_workers=0, progress="none")
    assert run(PrecomputeConfig(data=dataset, model=model, out=out, **opts, **kw)) == 0
    return out


def _root_attrs(store):
    import json

    return json.loads((store / "zarr.json").read_text())["attributes"]


def test_precompute_encodes_validation_prompts_into_the_store_and_train_reads_them(
    tiny_model_dir, tmp_path, t5_builds
):
    """The prompts file lands beside the arrays; the fingerprint and plan digest are those of the
    store without it; a rerun adds it to an existing store without re-encoding anything else;
    `--validation-prompts store` trains with it and never builds T5."""
    import torch
    from cogfun.common.models import encode_prompts, load_text_encoder, load_tokenizer
    from cogfun.common.sample_inputs import load_prompt_embeds
    from cogfun.common.sample_store import STORE_FILE
    from cogfun.testing.media import make_sample_dataset

    dataset = tmp_path / "data"
    make_sample_dataset(dataset, n_videos=2, n_images=1, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square drifts\n\n a dog runs \n")
    plain = _precompute(dataset, tiny_model_dir, tmp_path / "plain.zarr")
    with_prompts = _precompute(
        dataset, tiny_model_dir, tmp_path / "with.zarr", validation_prompts=prompts
    )
    assert not (plain / STORE_FILE).exists()
    for key in ("fingerprint", "plan_digest", "settings"):
        assert _root_attrs(plain)[key] == _root_attrs(with_prompts)[key], key

    saved = load_prompt_embeds(with_prompts / STORE_FILE)
    assert saved.prompts == ["a red square drifts", "a dog runs"]
    assert saved.negative_prompt == "bad detailed"
    tokenizer, encoder = load_tokenizer(tiny_model_dir), load_text_encoder(tiny_model_dir)
    assert torch.equal(saved.embeds, encode_prompts(tokenizer, encoder, saved.prompts))
    assert torch.equal(saved.negative_embeds, encode_prompts(tokenizer, encoder, ["bad detailed"]))

    # The complete store without prompts gets them from a rerun: nothing else is encoded (one T5
    # build, for the prompts), and a second rerun with the same prompts loads no T5 at all.
    builds = len(t5_builds)
    _precompute(dataset, tiny_model_dir, plain, validation_prompts=prompts)
    assert len(t5_builds) == builds + 1
    assert torch.equal(load_prompt_embeds(plain / STORE_FILE).embeds, saved.embeds)
    _precompute(dataset, tiny_model_dir, plain, validation_prompts=prompts)
    assert len(t5_builds) == builds + 1

    out = tmp_path / "train"
    builds = len(t5_builds)
    run_in_process(
        latents=with_prompts,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=2,
        validation_prompts=["store"],
        validation_steps=2,
        **FAST,
    )
    assert len(t5_builds) == builds
    assert validation_videos(out) == {"step-2/00.mp4", "step-2/01.mp4"}

    bad = tmp_path / "bad.txt"
    bad.write_text("\n \n")
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import OptionError, run_precompute

    with pytest.raises(OptionError, match=f"--validation-prompts {bad}: no prompts in the file"):
        run_precompute(PrecomputeConfig(data=dataset, model=tiny_model_dir, validation_prompts=bad))


def test_store_prompts_missing_is_refused(store, tiny_model_dir, tmp_path):
    with pytest.raises(TrainRefused, match="--validation-prompts store: no store at --latents"):
        run_in_process(
            latents=store,
            model=tiny_model_dir,
            output_dir=tmp_path / "o",
            validation_prompts=["store"],
        )


@pytest.fixture(scope="module")
def start_images(tmp_path_factory):
    from cogfun.testing.media import write_image

    root = tmp_path_factory.mktemp("starts")
    return [write_image(root / f"s{i}.png", 40, 56, seed=i) for i in range(2)]


def test_validation_paths_sample_image_to_video(
    store, tiny_model_dir, embeddings, start_images, tmp_path, monkeypatch
):
    """Prompt i starts from image i: frame 0 kept (the resized image), the rest generated; the
    start image's conditioning is VAE-encoded into the 17 inpaint channels."""
    import cogfun.common.sampling as sampling
    import numpy as np
    import torch
    from cogfun.common.sample_inputs import SampleSize, image_to_video

    calls = []
    generate = sampling.generate

    def spy(transformer, vae, scheduler, **kwargs):
        result = generate(transformer, vae, scheduler, **kwargs)
        calls.append((kwargs["video"], kwargs["mask"], result["inpaint_latents"]))
        return result

    monkeypatch.setattr(sampling, "generate", spy)
    out = tmp_path / "i2v"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=2,
        validation_prompts=[str(embeddings)],
        validation_paths=start_images,
        validation_steps=2,
        **FAST,
    )
    assert validation_videos(out) == {"step-2/00.mp4", "step-2/01.mp4"}
    assert len(calls) == 2
    for (video, mask, inpaint), image in zip(calls, start_images, strict=True):
        expected, _ = image_to_video(image, None, SampleSize(5, 32, 32))
        assert video.shape == (1, 3, 5, 32, 32) and torch.equal(video, expected)
        assert mask.shape == (1, 1, 5, 32, 32)
        assert (mask[:, :, 0] == 0).all() and (mask[:, :, 1:] == 255).all()
        assert inpaint.shape == (1, 2, 17, 4, 4) and inpaint.abs().sum() > 0
    assert not torch.equal(calls[0][2], calls[1][2])  # each prompt its own image
    row = [r for r in metrics(out) if "validation_s" in r][0]
    assert (row["validation_videos"], row["validation_failed"]) == (2, 0)
    assert np.isfinite(row["validation_s"])


def test_bad_validation_paths_are_refused(
    store, tiny_model_dir, embeddings, start_images, tmp_path
):
    common = dict(latents=store, model=tiny_model_dir, output_dir=tmp_path / "o")
    cases = [
        (dict(validation_paths=start_images), "--validation-paths gives start images for"),
        (
            dict(validation_prompts=[str(embeddings)], validation_paths=start_images[:1]),
            "--validation-paths: 1 start image\\(s\\) for 2 validation prompt\\(s\\)",
        ),
        (
            dict(
                validation_prompts=[str(embeddings)],
                validation_paths=[start_images[0], tmp_path / "nope.png"],
            ),
            f"--validation-paths {tmp_path / 'nope.png'}: file not found",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(TrainRefused, match=message):
            run_in_process(**common, **extra)
    from cogfun.testing.tiny import write_tiny_model

    t2v_model = write_tiny_model(tmp_path / "t2v", variant="2b", seed=0)  # 16 input channels
    with pytest.raises(TrainRefused, match="image to video needs the inpaint transformer"):
        run_in_process(
            **{**common, "latents": make_store(tmp_path, masks=False), "model": t2v_model},
            validation_prompts=[str(embeddings)],
            validation_paths=start_images,
        )
