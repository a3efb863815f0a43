"""`cogfun sample` and `cogfun encode-prompts` on the tiny model: playable mp4s, embeddings round trip."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from cogfun.app.cli import app
from cogfun.common import sample_inputs
from cogfun.common.models import encode_prompts, load_text_encoder, load_tokenizer
from cogfun.common.sample_inputs import load_prompt_embeds
from cogfun.testing.media import write_image, write_video
from typer.testing import CliRunner

SMALL = ["--num-frames", "9", "--height", "48", "--width", "64", "--num-inference-steps", "2"]


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == 8  # the predict scripts' fps
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _sample(model, out, *args):
    result = CliRunner().invoke(
        app, ["sample", "--model", str(model), "--out", str(out), *SMALL, *args]
    )
    return result


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    start = write_image(root / "start.png", 40, 56, seed=1)
    end = write_image(root / "end.png", 64, 64, seed=2)
    clip = write_video(root / "in.mp4", 12, 48, 64, seed=3)
    mask = root / "mask.mp4"
    with av.open(str(mask), "w") as container:  # white square in the middle: generate there
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(10):
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[16:32, 16:48] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"start": start, "end": end, "clip": clip, "mask": mask}


def test_text_to_video(tiny_model_dir, tmp_path):
    out = tmp_path / "t2v.mp4"
    result = _sample(tiny_model_dir, out, "--prompt", "a red square drifts", "--seed", "5")
    assert result.exit_code == 0, result.output
    frames = _frames(out)
    assert frames.shape == (9, 48, 64, 3)
    assert frames.std() > 1  # not a blank video
    assert f"wrote {out}" in result.output


def test_image_to_video_with_end_image(tiny_model_dir, tmp_path, media):
    out = tmp_path / "i2v.mp4"
    result = _sample(
        tiny_model_dir,
        out,
        "--prompt",
        "a dog",
        "--image",
        str(media["start"]),
        "--end-image",
        str(media["end"]),
        "--scheduler",
        "DDIM_Cog",
    )
    assert result.exit_code == 0, result.output
    assert _frames(out).shape == (9, 48, 64, 3)


@pytest.mark.parametrize("how", ["mask", "rect"])
def test_video_inpainting(tiny_model_dir, tmp_path, media, how):
    out = tmp_path / f"v2v_{how}.mp4"
    masking = ["--mask-video", str(media["mask"])] if how == "mask" else ["--rect", "8,40,16,48"]
    result = _sample(
        tiny_model_dir, out, "--prompt", "a cat", "--video", str(media["clip"]), *masking
    )
    assert result.exit_code == 0, result.output
    assert _frames(out).shape == (9, 48, 64, 3)


def test_sizes_are_snapped_and_said(tiny_model_dir, tmp_path):
    out = tmp_path / "snap.mp4"
    result = CliRunner().invoke(
        app,
        ["sample", "--model", str(tiny_model_dir), "--out", str(out), "--prompt", "a cat"]
        + ["--num-frames", "7", "--height", "40", "--width", "70", "--num-inference-steps", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "--num-frames 7 -> 5" in result.output
    assert "--height/--width 40x70 -> 32x64" in result.output
    assert _frames(out).shape == (5, 32, 64, 3)


def test_encode_prompts_round_trip(tiny_model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square drifts\n\na dog runs in the park\n")
    emb = tmp_path / "emb.safetensors"
    result = CliRunner().invoke(
        app,
        ["encode-prompts", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
        + ["--out", str(emb), "--negative-prompt", "blurry"],
    )
    assert result.exit_code == 0, result.output
    loaded = load_prompt_embeds(emb)
    assert loaded.prompts == ["a red square drifts", "a dog runs in the park"]
    assert loaded.negative_prompt == "blurry"
    assert loaded.embeds.shape == (2, 226, 32) and loaded.negative_embeds.shape == (1, 226, 32)
    expected = encode_prompts(
        load_tokenizer(tiny_model_dir),
        load_text_encoder(tiny_model_dir),
        ["a red square drifts", "a dog runs in the park", "blurry"],
    )
    assert torch.equal(loaded.embeds, expected[:2])
    assert torch.equal(loaded.negative_embeds, expected[2:])

    # Sampling from the file gives the same video as encoding the same prompts at sample time
    # (compared before the mp4 encode: x264's SIMD paths are not bit-reproducible run to run).
    written, write = {}, sample_inputs.write_mp4

    def record(video, path, fps):
        written[path.name] = video.clone()
        return write(video, path, fps)

    monkeypatch.setattr(sample_inputs, "write_mp4", record)
    from_file, from_text = tmp_path / "file.mp4", tmp_path / "text.mp4"
    args = ["--num-inference-steps", "1", "--seed", "3", "--num-frames", "5", "--height", "32"]
    r1 = _sample(
        tiny_model_dir, from_file, "--prompt-embeds", str(emb), "--prompt-index", "1", *args
    )
    r2 = _sample(
        tiny_model_dir,
        from_text,
        "--prompt",
        "a dog runs in the park",
        "--negative-prompt",
        "blurry",
        *args,
    )
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert torch.equal(written["file.mp4"], written["text.mp4"])
    assert _frames(from_file).shape == (5, 32, 64, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prompt", "x", "--video", "in.mp4"],
            "--video needs exactly one of --mask-video and --rect",
        ),
        (["--prompt", "x", "--scheduler", "DDPM"], "choose one of DDIM_Origin"),
        (["--num-frames", "9"], "give exactly one of --prompt and --prompt-embeds"),
        (["--prompt", "x", "--end-image", "e.png"], "--end-image needs --image"),
    ],
)
def test_bad_flags(tiny_model_dir, tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["sample", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o.mp4"), *args]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o.mp4").exists()


def test_bad_files_are_named(tiny_model_dir, tmp_path, media):
    bogus = tmp_path / "not_embeds.safetensors"
    bogus.write_bytes(b"hello")
    result = _sample(tiny_model_dir, tmp_path / "o.mp4", "--prompt-embeds", str(bogus))
    assert result.exit_code == 2
    assert f"{bogus} is not a safetensors file" in result.output
    result = _sample(
        tiny_model_dir,
        tmp_path / "o.mp4",
        "--prompt",
        "x",
        "--video",
        str(media["clip"]),
        "--rect",
        "0,99,0,10",
    )
    assert result.exit_code == 2 and "--rect '0,99,0,10': needs 0 <= y0 < y1 <= 48" in result.output
    result = _sample(tmp_path / "nowhere", tmp_path / "o.mp4", "--prompt", "x")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_v15_frames_are_padded_up(tmp_path):
    """V1.5 pads an odd latent count up by one latent frame, as its predict scripts do: 9 -> 13."""
    from cogfun.testing.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "v15", variant="v15-5b-inp", seed=0)
    out = tmp_path / "v15.mp4"
    result = _sample(model, out, "--prompt", "a dog", "--num-inference-steps", "1")
    assert result.exit_code == 0, result.output
    assert (
        "--num-frames 9 -> 13" in result.output and "even number of latent frames" in result.output
    )
    assert _frames(out).shape == (13, 48, 64, 3)


def test_checkpoint_weights_are_the_ones_sampled(tiny_model_dir, tmp_path, monkeypatch):
    """`--checkpoint checkpoint-N` and its `transformer/` load the trained weights, not the model's."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "out" / "checkpoint-7" / "transformer"
    shutil.copytree(tiny_model_dir / "transformer", folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["proj_out.weight"] = torch.zeros_like(weights["proj_out.weight"])
    save_file(weights, str(weights_file))

    written, write = {}, sample_inputs.write_mp4

    def record(video, path, fps):
        written[path.name] = video.clone()
        return write(video, path, fps)

    monkeypatch.setattr(sample_inputs, "write_mp4", record)
    args = ["--prompt", "a cat", "--num-inference-steps", "1", "--num-frames", "1"]
    args += ["--height", "32", "--width", "32"]
    for name, extra in (
        ("base.mp4", []),
        ("ckpt.mp4", ["--checkpoint", str(folder.parent)]),
        ("ckpt_t.mp4", ["--checkpoint", str(folder)]),
    ):
        result = _sample(tiny_model_dir, tmp_path / name, *args, *extra)
        assert result.exit_code == 0, result.output
    assert torch.equal(written["ckpt.mp4"], written["ckpt_t.mp4"])
    assert not torch.equal(written["ckpt.mp4"], written["base.mp4"])
    bad = _sample(tiny_model_dir, tmp_path / "x.mp4", *args, "--checkpoint", str(tmp_path))
    assert bad.exit_code == 2 and f"--checkpoint {tmp_path}: expected a checkpoint-N" in bad.output


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory):
    """Random rank-4 adapters (scale 1.5) saved in both formats, as a `--lora` run saves them."""
    from cogfun.common.models import load_transformer
    from cogfun.train import lora

    transformer = load_transformer(tiny_model_dir)
    lora.add_lora(transformer, rank=4, alpha=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora.lora_layers(transformer).values():
            for part in (layer.lora_A["default"], layer.lora_B["default"]):
                part.weight.copy_(torch.randn(part.weight.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("lora") / "checkpoint-7"
    folder.mkdir()
    return {
        "original": lora.save_original(transformer, folder / "checkpoint-7.safetensors"),
        "diffusers": lora.save_diffusers(transformer, folder / lora.DIFFUSERS_WEIGHT_NAME),
    }


def _recorded(monkeypatch) -> dict[str, torch.Tensor]:
    """The decoded video of each sample, by output file name (before the mp4 encode)."""
    written, write = {}, sample_inputs.write_mp4

    def record(video, path, fps):
        written[path.name] = video.clone()
        return write(video, path, fps)

    monkeypatch.setattr(sample_inputs, "write_mp4", record)
    return written


TINY = ["--prompt", "a cat", "--num-inference-steps", "2", "--num-frames", "5"]
TINY += ["--height", "32", "--width", "32", "--seed", "11"]


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_lora_sample_equals_sampling_the_merged_model(
    tiny_model_dir, tmp_path, monkeypatch, lora_files, fmt
):
    """`--lora FILE` at the default weight 0.55 gives the video of `cogfun merge-lora` at 0.55."""
    merged = tmp_path / "merged"
    result = CliRunner().invoke(
        app,
        ["merge-lora", "--model", str(tiny_model_dir), "--lora", str(lora_files[fmt])]
        + ["--lora-weight", "0.55", "--out", str(merged)],
    )
    assert result.exit_code == 0, result.output
    written = _recorded(monkeypatch)
    runs = {
        "lora.mp4": ["--lora", str(lora_files[fmt])],
        "merged.mp4": ["--checkpoint", str(merged)],
        "base.mp4": [],
        "half.mp4": ["--lora", str(lora_files[fmt]), "--lora-weight", "0.275"],
    }
    for name, extra in runs.items():
        result = _sample(tiny_model_dir, tmp_path / name, *TINY, *extra)
        assert result.exit_code == 0, result.output
        if name == "lora.mp4":
            assert f"merged {lora_files[fmt]} at weight 0.55 (" in result.output
    assert torch.equal(written["lora.mp4"], written["merged.mp4"])
    assert not torch.equal(written["lora.mp4"], written["base.mp4"])
    assert not torch.equal(written["lora.mp4"], written["half.mp4"])


def test_lora_checkpoint_folder_is_merged_over_the_model(
    tiny_model_dir, tmp_path, monkeypatch, lora_files
):
    """A `--lora` run's checkpoint-N (no transformer/) samples its adapters at weight 1.0, from the
    original-format file; `--lora-weight` overrides; a second LoRA beside it is refused."""
    folder = lora_files["original"].parent
    written = _recorded(monkeypatch)
    runs = {
        "ckpt.mp4": ["--checkpoint", str(folder)],
        "file1.mp4": ["--lora", str(lora_files["original"]), "--lora-weight", "1"],
        "ckpt55.mp4": ["--checkpoint", str(folder), "--lora-weight", "0.55"],
        "file55.mp4": ["--lora", str(lora_files["original"])],
    }
    for name, extra in runs.items():
        result = _sample(tiny_model_dir, tmp_path / name, *TINY, *extra)
        assert result.exit_code == 0, result.output
    assert torch.equal(written["ckpt.mp4"], written["file1.mp4"])
    assert torch.equal(written["ckpt55.mp4"], written["file55.mp4"])
    assert not torch.equal(written["ckpt.mp4"], written["ckpt55.mp4"])

    both = _sample(
        tiny_model_dir,
        tmp_path / "x.mp4",
        *TINY,
        "--checkpoint",
        str(folder),
        "--lora",
        str(lora_files["diffusers"]),
    )
    assert both.exit_code == 2
    assert f"--checkpoint {folder} holds LoRA adapters (checkpoint-7.safetensors)" in both.output
    assert not (tmp_path / "x.mp4").exists()
    unused = _sample(tiny_model_dir, tmp_path / "x.mp4", *TINY, "--lora-weight", "0.7")
    assert unused.exit_code == 2
    assert "--lora-weight 0.7: there is no LoRA to merge" in unused.output
    assert not (tmp_path / "x.mp4").exists()


def test_bad_lora_files_are_named(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    bogus = {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 8)}
    bogus["lora_unet_nowhere.lora_up.weight"] = torch.zeros(8, 2)
    save_file(bogus, str(other))
    result = _sample(tiny_model_dir, tmp_path / "o.mp4", *TINY, "--lora", str(other))
    assert result.exit_code == 2
    assert "lora_unet_nowhere names no Linear layer of this transformer" in result.output
    missing = _sample(tiny_model_dir, tmp_path / "o.mp4", *TINY, "--lora", str(tmp_path / "n.pt"))
    assert (
        missing.exit_code == 2 and f"--lora {tmp_path / 'n.pt'}: file not found" in missing.output
    )
    assert not (tmp_path / "o.mp4").exists()
