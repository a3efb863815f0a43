"""cogfun.common.models: checking a model folder and loading each part on its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cogfun.common.models import (
    ModelFolderError,
    check_model_folder,
    encode_prompts,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    model_identity,
)
from cogfun.testing.tiny import write_tiny_model
from safetensors.torch import load_file

ALL_PARTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "m", variant="2b-inp", seed=0)


@pytest.fixture
def copy_of(model_dir, tmp_path):
    """A private copy that a test may damage."""

    def make() -> Path:
        return Path(shutil.copytree(model_dir, tmp_path / "copy"))

    return make


def test_check_model_folder_accepts_complete_folder(model_dir):
    assert check_model_folder(str(model_dir), ALL_PARTS) == model_dir
    assert check_model_folder(model_dir, []) == model_dir


def test_missing_parts_are_each_named(copy_of):
    root = copy_of()
    shutil.rmtree(root / "vae")
    (root / "scheduler" / "scheduler_config.json").unlink()
    for weights in (root / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(root, ALL_PARTS)
    message = str(err.value)
    assert str(root) in message
    assert "vae/ (folder missing)" in message
    assert "scheduler/ (no scheduler_config.json)" in message
    assert "text_encoder/ (no weights" in message
    assert "transformer/" not in message and "tokenizer/" not in message
    # Asking only for present parts still works.
    assert check_model_folder(root, ["transformer", "tokenizer"]) == root
    with pytest.raises(ModelFolderError, match=r"vae/ \(folder missing\)"):
        load_vae(root)


def test_missing_tokenizer_files_and_shards(copy_of):
    root = copy_of()
    (root / "tokenizer" / "tokenizer.json").unlink()
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}'
    )
    with pytest.raises(ModelFolderError) as err:
        check_model_folder(root, ["tokenizer", "transformer"])
    message = str(err.value)
    assert "tokenizer/ (no spiece.model or tokenizer.json)" in message
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in message


def test_not_a_model_folder(tmp_path, model_dir):
    with pytest.raises(ModelFolderError, match=r"does not exist") as err:
        check_model_folder(tmp_path / "nope", ["vae"])
    assert str(tmp_path / "nope") in str(err.value)

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ModelFolderError, match="not a model folder") as err:
        check_model_folder(a_file, ["vae"])
    assert str(a_file) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match="not a model folder") as err:
        load_scheduler(empty)
    assert str(empty) in str(err.value) and "model_index.json" in str(err.value)

    # Passing one part's folder instead of the model folder gets a hint.
    with pytest.raises(ModelFolderError, match="folder above it"):
        check_model_folder(model_dir / "vae", ["vae"])

    with pytest.raises(ValueError, match="unet"):
        check_model_folder(model_dir, ["unet"])


def test_load_vae_never_reads_transformer(copy_of):
    root = copy_of()
    shutil.rmtree(root / "transformer")
    shutil.rmtree(root / "text_encoder")
    vae = load_vae(root)
    assert type(vae).__name__ == "AutoencoderKLCogVideoX"
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == 1.15258426
    with torch.no_grad():
        moments = vae.encode(torch.zeros(1, 3, 5, 32, 48)).latent_dist.mean  # (B, C, F, H, W)
    assert moments.shape == (1, 16, 2, 4, 6)
    bf16 = load_vae(root, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_text_encoder_and_tokenizer_alone(copy_of):
    root = copy_of()
    shutil.rmtree(root / "transformer")
    shutil.rmtree(root / "vae")
    encoder = load_text_encoder(root)
    assert type(encoder).__name__ == "T5EncoderModel"
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert next(load_text_encoder(root, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    tokenizer = load_tokenizer(root)
    ids = tokenizer("a woman is dancing in the rain").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == 1


def test_load_scheduler_is_ddpm_on_the_golden_schedule(model_dir, golden_dir):
    from diffusers import DDPMScheduler

    scheduler = load_scheduler(model_dir)
    assert type(scheduler) is DDPMScheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 1000
    golden = load_file(golden_dir / "ddpm_schedule_2b.safetensors")
    assert torch.equal(scheduler.alphas_cumprod, golden["alphas_cumprod"])
    assert torch.equal(scheduler.betas, golden["betas"])
    assert scheduler.alphas_cumprod[999].item() == 0.0


def test_encode_prompts_matches_the_original_call(model_dir):
    tokenizer = load_tokenizer(model_dir)
    encoder = load_text_encoder(model_dir)
    texts = ["a dog runs on the beach", ""]
    embeds = encode_prompts(tokenizer, encoder, texts)
    assert embeds.shape == (2, 226, 32)
    assert embeds.dtype == torch.float32

    ids = tokenizer(texts, max_length=226, padding="max_length", truncation=True).input_ids
    ids = torch.tensor(ids)
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all()  # empty caption: EOS then 225 pads
    with torch.no_grad():
        plain = encoder(input_ids=ids).last_hidden_state
        masked = encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert torch.equal(embeds, plain)
    # No attention mask: padding positions see the caption, so the result differs from a masked call.
    assert not torch.allclose(embeds[0], masked[0])
    assert encode_prompts(tokenizer, encoder, texts, max_length=16).shape == (2, 16, 32)


def test_model_identity(model_dir, tmp_path, copy_of):
    vae_id = model_identity(model_dir, "vae")
    assert vae_id["part"] == "vae" and vae_id["class"] == "AutoencoderKLCogVideoX"
    assert set(vae_id["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert len(vae_id["sha256"]) == 64
    assert model_identity(model_dir, "text_encoder")["class"] == "T5EncoderModel"
    assert model_identity(model_dir, "tokenizer")["class"] == "T5Tokenizer"
    assert model_identity(model_dir, "scheduler")["class"] == "CogVideoXDDIMScheduler"

    # Same seed elsewhere: same identity (the path is not part of it). Other seed: other weights.
    same = write_tiny_model(tmp_path / "same", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert model_identity(same, "vae") == vae_id
    assert model_identity(other, "vae")["sha256"] != vae_id["sha256"]
    assert model_identity(other, "tokenizer") == model_identity(model_dir, "tokenizer")

    # One changed byte in the weights, same size: a different identity.
    root = copy_of()
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_identity(root, "vae")["sha256"] != vae_id["sha256"]
    assert model_identity(root, "vae")["files"]["config.json"] == vae_id["files"]["config.json"]


def test_load_transformer_is_reexported(model_dir):
    pytest.importorskip("cogfun.common.transformer")
    transformer = load_transformer(model_dir)
    assert transformer.config.in_channels == 33
