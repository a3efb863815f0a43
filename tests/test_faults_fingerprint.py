"""The fingerprint matrix: rerunning precompute into an existing store with other VAE weights, any
other encode option, other mask options, latent format or seed is refused (exit 2) with the
differing key named, and the store is left as it was. Options that change no stored byte
(threads, decode workers, progress, where the data lies) are accepted."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.runs import OPTS, fault_dataset
from safetensors.torch import load_file, save_file

# Not fingerprinted: where things are, and how fast they are done.
# validation_prompts only adds a side file of prompt embeddings (no training sample changes);
# shard_samples only packs the same chunks into other files (fixed when the store is created).
NOT_FINGERPRINTED = {
    "data",
    "meta",
    "model",
    "out",
    "decode_workers",
    "threads",
    "progress",
    "validation_prompts",
    "shard_samples",
    "storage_options",
}

# option -> (new value, settings keys the refusal must name)
OPTION_CHANGES = {
    "mode": ("normal", ["mode", "masks_per_sample"]),
    "seed": (7, ["seed"]),
    "image_sample_size": (144, ["image_sample_size"]),
    "video_sample_size": (80, ["video_sample_size"]),
    "token_sample_size": (80, ["token_sample_size"]),
    "video_sample_stride": (2, ["video_sample_stride"]),
    "video_sample_n_frames": (13, ["video_sample_n_frames"]),
    "video_repeat": (2, ["video_repeat"]),
    "vae_mini_batch": (1, ["vae_mini_batch"]),
    "tokenizer_max_length": (100, ["tokenizer_max_length"]),
    "enable_bucket": (False, ["enable_bucket"]),
    "random_hw_adapt": (False, ["random_hw_adapt"]),
    "training_with_video_token_length": (False, ["training_with_video_token_length"]),
    "random_frame_crop": (False, ["random_frame_crop"]),
    "variants_per_sample": (1, ["variants_per_sample"]),
    "masks_per_sample": (3, ["masks_per_sample"]),
    "latent_format": ("sample", ["latent_format"]),
    "vae_dtype": ("bf16", ["vae_dtype"]),
    "text_encoder_dtype": ("bf16", ["text_encoder_dtype"]),
    "vae_slicing": (True, ["vae_slicing"]),
    "vae_tiling": (True, ["vae_tiling"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fingerprint")
    data = fault_dataset(root / "data")
    out = root / "s.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)) == 0
    return root, data, out, open_store(out).digest()


def _refused(cfg: PrecomputeConfig, capsys, out: Path, digest: str, keys: list[str]) -> str:
    capsys.readouterr()
    assert run(cfg) == 2
    err = capsys.readouterr().err
    assert "written with different settings" in err, err
    for key in keys:
        assert f"  {key}: " in err, (key, err)  # one "key: old -> new" line per differing key
    assert open_store(out).digest() == digest  # nothing was written
    return err


def test_every_option_that_shapes_the_bytes_is_in_the_matrix():
    fields = {f.name for f in dataclasses.fields(PrecomputeConfig)}
    assert set(OPTION_CHANGES) == fields - NOT_FINGERPRINTED


@pytest.mark.parametrize("option", list(OPTION_CHANGES))
def test_another_encode_option_is_refused_naming_it(base, tiny_model_dir, capsys, option):
    _, data, out, digest = base
    value, keys = OPTION_CHANGES[option]
    assert OPTS.get(option, getattr(PrecomputeConfig, option, None)) != value
    cfg = PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **{**OPTS, option: value})
    err = _refused(cfg, capsys, out, digest, keys)
    assert f"-> {json.dumps(value)}" in err  # the new value is shown beside the old one


def _perturb_weights(file: Path) -> None:
    weights = load_file(file)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, file)


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


MODEL_CHANGES = {  # what changes in a copy of the model folder -> keys named
    "VAE weights": (
        lambda m: _perturb_weights(m / "vae" / "diffusion_pytorch_model.safetensors"),
        ["vae.sha256"],
    ),
    "VAE scaling factor": (
        lambda m: _edit_json(m / "vae" / "config.json", scaling_factor=0.9),
        ["vae.sha256", "vae.scaling_factor"],
    ),
    "text encoder weights": (
        lambda m: _perturb_weights(m / "text_encoder" / "model.safetensors"),
        ["text_encoder.sha256"],
    ),
    "tokenizer files": (
        lambda m: _edit_json(m / "tokenizer" / "tokenizer_config.json", model_max_length=77),
        ["tokenizer.sha256"],
    ),
    "masked-video noise (transformer config)": (
        lambda m: _edit_json(m / "transformer" / "config.json", add_noise_in_inpaint_model=True),
        ["inpaint_noise"],
    ),
}


@pytest.mark.parametrize("change", list(MODEL_CHANGES))
def test_other_model_files_are_refused_naming_the_part(
    base, tiny_model_dir, tmp_path, capsys, change
):
    _, data, out, digest = base
    edit, keys = MODEL_CHANGES[change]
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    edit(model)
    _refused(PrecomputeConfig(data=data, model=model, out=out, **OPTS), capsys, out, digest, keys)


def test_an_edited_dataset_updates_the_store_instead(base, tiny_model_dir, tmp_path, capsys):
    """The dataset is not part of the fingerprint: an edited metadata file updates the store
    (in full: tests/test_incremental.py); every setting is still checked."""
    _, data, out, digest = base
    store = Path(shutil.copytree(out, tmp_path / "s.zarr"))
    moved = Path(shutil.copytree(data, tmp_path / "data"))
    rows = json.loads((moved / "metadata.json").read_text())
    rows[0]["text"] = "another caption"
    (moved / "metadata.json").write_text(json.dumps(rows))
    capsys.readouterr()
    assert run(PrecomputeConfig(data=moved, model=tiny_model_dir, out=store, **OPTS)) == 0
    err = capsys.readouterr().err
    assert "written with different settings" not in err
    assert re.search(r"updated .*s\.zarr to the dataset: [1-9]\d* samples added, \d+ reused", err)
    assert open_store(store).digest() != digest
    assert open_store(out).digest() == digest


def test_what_changes_no_byte_is_accepted(base, tiny_model_dir, tmp_path, capsys):
    _, data, out, digest = base
    moved = Path(shutil.copytree(data, tmp_path / "elsewhere"))  # same files, another folder
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    opts = {**OPTS, "threads": 2, "decode_workers": 1, "progress": "none"}
    capsys.readouterr()
    assert run(PrecomputeConfig(data=moved, model=model, out=out, **opts)) == 0
    assert "stored 0 samples in 0 chunks" in capsys.readouterr().err
    assert open_store(out).digest() == digest
    torch.set_num_threads(1)  # the run set 2 for this process
