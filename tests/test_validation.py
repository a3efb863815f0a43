"""Validation videos during `cogfun train` (train/validation.py): when, where, without T5, and the
training it leaves untouched. Under `accelerate launch`: tests/test_validation_launch.py."""

from __future__ import annotations

import av
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


def _encode(root, tiny_model_dir, texts):
    prompts = root / "prompts.txt"
    prompts.write_text("".join(t + "\n" for t in texts))
    out = root / "emb.safetensors"
    result = CliRunner().invoke(
        app,
        ["encode-prompts", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
        + ["--out", str(out), "--negative-prompt", "bad detailed"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, tiny_model_dir):
    return _encode(tmp_path_factory.mktemp("val"), tiny_model_dir, ["a red square drifts", "a dog"])


def test_embeddings_file_samples_at_the_steps_and_never_builds_t5(
    store, tiny_model_dir, embeddings, tmp_path, t5_builds
):
    out = tmp_path / "val"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        validation_prompts=[str(embeddings)],
        validation_steps=2,
        validation_epochs=0,
        **FAST,
    )
    assert t5_builds == []
    assert validation_videos(out) == {
        "step-2/00.mp4",
        "step-2/01.mp4",
        "step-4/00.mp4",
        "step-4/01.mp4",
    }
    with av.open(str(out / "validation/step-4/01.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        if row["step"] % 2:
            assert "validation_s" not in row
        else:
            assert row["validation_videos"] == 2 and row["validation_failed"] == 0
            assert row["validation_s"] > 0

    # Training computes exactly what it computes without validation.
    plain = tmp_path / "plain"
    run_in_process(latents=store, model=tiny_model_dir, output_dir=plain)
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in metrics(plain)], key


def test_text_prompts_go_through_t5_once_before_the_transformer_loads(
    store, tiny_model_dir, tmp_path, t5_builds, monkeypatch
):
    import cogfun.train.setup as setup_module

    events = []
    load_model = setup_module.load_model

    def record(*args, **kwargs):
        events.append(f"transformer after {len(t5_builds)} T5")
        return load_model(*args, **kwargs)

    monkeypatch.setattr(setup_module, "load_model", record)
    out = tmp_path / "text"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=2,
        validation_prompts=["a cat", "a dog"],
        validation_steps=2,
        **FAST,
    )
    assert t5_builds == ["T5EncoderModel"] and events == ["transformer after 1 T5"]
    from cogfun.common.sample_inputs import load_prompt_embeds

    saved = load_prompt_embeds(out / "validation" / "prompts.safetensors")
    assert saved.prompts == ["a cat", "a dog"] and saved.negative_prompt == "bad detailed"
    assert validation_videos(out) == {"step-2/00.mp4", "step-2/01.mp4"}


def test_ema_weights_sample_and_training_weights_come_back(
    store, tiny_model_dir, embeddings, tmp_path, monkeypatch
):
    import cogfun.common.sampling as sampling
    import torch
    from safetensors.torch import load_file

    seen = []
    generate = sampling.generate

    def spy(transformer, *args, **kwargs):
        seen.append(transformer.state_dict()["patch_embed.proj.weight"].clone())
        return generate(transformer, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    out, plain = tmp_path / "ema", tmp_path / "ema_plain"
    common = dict(latents=store, model=tiny_model_dir, use_ema=True, save_dtype="fp32")
    run_in_process(
        output_dir=out, validation_prompts=[str(embeddings)], validation_steps=2, **common, **FAST
    )
    run_in_process(output_dir=plain, **common)
    key = "patch_embed.proj.weight"
    ema = load_file(out / "checkpoint-2/transformer_ema/diffusion_pytorch_model.safetensors")[key]
    trained = load_file(out / "checkpoint-2/transformer/diffusion_pytorch_model.safetensors")[key]
    assert len(seen) == 4  # 2 prompts at steps 2 and 4
    assert torch.equal(seen[0], ema) and not torch.equal(seen[0], trained)
    for name in ("loss", "grad_norm"):
        assert [r[name] for r in metrics(out)] == [r[name] for r in metrics(plain)], name


def test_lora_with_ema_samples_the_adapters_ema(store, tiny_model_dir, embeddings, tmp_path):
    """The adapters' EMA shadows only the trainable tensors: it is swapped in for those alone."""
    out = tmp_path / "lora"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=2,
        lora=True,
        rank=4,
        network_alpha=4,
        use_ema=True,
        validation_prompts=[str(embeddings)],
        validation_steps=2,
        **FAST,
    )
    (row,) = [r for r in metrics(out) if "validation_s" in r]
    assert (row["validation_videos"], row["validation_failed"]) == (2, 0)


def test_frame_strips_go_to_tensorboard(store, tiny_model_dir, embeddings, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=2,
        report_to="tensorboard",
        validation_prompts=[str(embeddings)],
        validation_steps=2,
        **FAST,
    )
    runs = []
    for events in {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}:
        runs.append(EventAccumulator(str(events), size_guidance={"images": 0}).Reload())
    (acc,) = [run for run in runs if run.Tags()["images"]]
    assert set(acc.Tags()["images"]) == {"validation/00", "validation/01"}
    (image,) = acc.Images("validation/01")
    assert image.step == 2 and (image.height, image.width) == (32, 5 * 32)  # 5 frames side by side
    assert "train/validation_s" in acc.Tags()["scalars"]


def test_a_failure_is_reported_and_training_goes_on(
    store, tiny_model_dir, embeddings, tmp_path, monkeypatch, caplog
):
    import cogfun.common.models as models

    def broken(*args, **kwargs):
        raise RuntimeError("the VAE is on holiday")

    monkeypatch.setattr(models, "load_vae", broken)
    out = tmp_path / "fail"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        validation_prompts=[str(embeddings)],
        validation_steps=2,
        **FAST,
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [(r["validation_videos"], r["validation_failed"]) for r in rows[1::2]] == [(0, 2)] * 2
    assert "validation at step 2 failed on rank 0; training goes on" in caplog.text
    assert "the VAE is on holiday" in caplog.text
    assert (out / "checkpoint-4" / "transformer").is_dir()


def test_epochs_trigger_after_each_nth_finished_epoch(store, tiny_model_dir, embeddings, tmp_path):
    from cogfun.train.data import make_dataloader

    _, sampler = make_dataloader(store, 2, 0, 42, 0, 1)
    per_epoch = len(sampler)
    steps = 2 * per_epoch + 1
    out = tmp_path / "epochs"
    run_in_process(
        latents=store,
        model=tiny_model_dir,
        output_dir=out,
        max_train_steps=steps,
        checkpointing_steps=steps,
        validation_prompts=[str(embeddings)],
        validation_steps=0,
        validation_epochs=2,
        **FAST,
    )
    # Epochs 0 and 2 qualify; only epoch 0 has finished within these steps.
    assert {p.parent.name for p in (out / "validation").rglob("*.mp4")} == {f"step-{per_epoch}"}


def test_bad_validation_inputs_are_refused(store, tiny_model_dir, tmp_path):
    with pytest.raises(TrainRefused, match="--validation-prompts .*missing.safetensors: file not"):
        run_in_process(
            latents=store,
            model=tiny_model_dir,
            output_dir=tmp_path / "a",
            validation_prompts=[str(tmp_path / "missing.safetensors")],
        )
    no_vae = tmp_path / "no_vae"
    import shutil

    shutil.copytree(tiny_model_dir, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(TrainRefused, match="--validation-prompts needs vae, tokenizer, text_enc"):
        run_in_process(
            latents=store,
            model=no_vae,
            output_dir=tmp_path / "b",
            validation_prompts=["a cat"],
        )
