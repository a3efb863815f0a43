"""Model and store must agree, checked before any work.

Precompute refuses a model it cannot serve (Fun control models, unknown channel counts, a folder
without transformer/config.json) and records what the store was encoded for; training refuses a
store that does not fit its transformer (V1.1 masked-video noise, V1.5 `patch_size_t`, latent
channels, the VAE) with one message naming each difference, before any weights load. Stores written
before the record existed still train. End to end: a tiny 5b-InP and a tiny V1.5 model precompute
and train."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from cogfun.common.models import model_identity
from cogfun.common.store import (
    BucketPlan,
    RowPlan,
    StoreLayout,
    StorePlan,
    fingerprint,
    open_for_write,
    open_store,
)
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset
from cogfun.testing.tiny import write_tiny_model
from cogfun.train.preflight import TrainRefused, check_store
from train_support import metrics, run_in_process
from typer.testing import CliRunner

OPTS = dict(
    image_sample_size=128,
    video_sample_size=64,
    token_sample_size=64,
    video_sample_n_frames=9,  # 9 frames = 3 latent frames: odd, so V1.5 clips them to 5
    threads=1,
    decode_workers=0,
    progress="none",
    masks_per_sample=2,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("agree") / "data"
    make_sample_dataset(root, n_videos=3, n_images=2, seed=0)
    return root


@pytest.fixture(scope="module")
def plain(data, tiny_model_dir, tmp_path_factory) -> Path:
    """A store precomputed for the tiny 2b-InP model (no patch_size_t, no masked-video noise)."""
    out = tmp_path_factory.mktemp("agree_plain") / "plain.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)) == 0
    return out


def _tconfig(model: Path) -> dict:
    return json.loads((model / "transformer" / "config.json").read_text())


def _model_copy(tiny: Path, dest: Path, **changes) -> Path:
    """The tiny model with its transformer config edited (precompute and checks read JSON only)."""
    shutil.copytree(tiny, dest)
    path = dest / "transformer" / "config.json"
    path.write_text(json.dumps({**_tconfig(dest), **changes}))
    return dest


def _refused_precompute(capsys, data: Path, model: Path, out: Path) -> str:
    capsys.readouterr()
    assert run(PrecomputeConfig(data=data, model=model, out=out, **OPTS)) == 2
    err = capsys.readouterr().err
    assert "precompute aborted" in err
    assert not out.exists()  # refused before any work: not even the store folder
    return err


# ---- precompute: models it cannot serve ----


@pytest.mark.parametrize(
    "changes",
    [
        {"in_channels": 32},  # 16 noisy + 16 control latents
        {"_name_or_path": "models/CogVideoX-Fun-V1.1-5b-Control/transformer"},
    ],
    ids=["32-channels", "named-control"],
)
def test_precompute_refuses_control_models(data, tiny_model_dir, tmp_path, capsys, changes):
    model = _model_copy(tiny_model_dir, tmp_path / "ctl", **changes)
    err = _refused_precompute(capsys, data, model, tmp_path / "s.zarr")
    assert "is a CogVideoX-Fun control model" in err
    assert "control training is not supported" in err
    assert "--mode" not in err  # no hint towards inpaint (or any other) mode


def test_precompute_refuses_unknown_channel_counts(data, tiny_model_dir, tmp_path, capsys):
    model = _model_copy(tiny_model_dir, tmp_path / "m20", in_channels=20)
    err = _refused_precompute(capsys, data, model, tmp_path / "s.zarr")
    assert "the transformer takes 20 input channels, neither 16 (text to video) nor 33" in err
    assert "this model is not supported" in err


def test_precompute_refuses_a_folder_without_transformer_config(
    data, tiny_model_dir, tmp_path, capsys
):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "no_tr"))
    shutil.rmtree(model / "transformer")
    err = _refused_precompute(capsys, data, model, tmp_path / "s.zarr")
    assert f"{model / 'transformer' / 'config.json'} is missing" in err
    assert "patch_size_t" in err and "add_noise_in_inpaint_model" in err


def test_store_records_what_it_was_encoded_for(plain, tiny_model_dir):
    store = open_store(plain)
    assert store.settings["transformer"] == {"patch_size": 2, "patch_size_t": None}
    assert store.settings["inpaint_noise"] is False
    assert store.layout.latent_channels == 16 == store.settings["vae"]["latent_channels"]
    assert store.settings["vae"]["sha256"] == model_identity(tiny_model_dir, "vae")["sha256"]
    check_store(store, _tconfig(tiny_model_dir), "inpaint", tiny_model_dir)  # agrees: no error


def test_precompute_resume_for_another_patch_size_t_is_refused(
    data, plain, tiny_model_dir, tmp_path, capsys
):
    digest = open_store(plain).digest()
    model = _model_copy(tiny_model_dir, tmp_path / "pt2", patch_size_t=2)
    capsys.readouterr()
    assert run(PrecomputeConfig(data=data, model=model, out=plain, **OPTS)) == 2
    err = capsys.readouterr().err
    assert "written with different settings" in err
    # settings_diff shows a null value like an absent one: "(absent)" stands for patch_size_t null.
    assert "  transformer.patch_size_t: (absent) -> 2\n" in err
    assert open_store(plain).digest() == digest


# ---- training: the store against the transformer ----


def _store(path: Path, settings: dict, buckets=((5, 64, 64), (1, 64, 96)), channels=16):
    """A finalized store of random moments (2 samples per bucket, K=2) with the given settings."""
    plan = StorePlan(
        [
            BucketPlan(
                f"f{(f - 1) // 4 + 1}_h{h // 8}_w{w // 8}",
                f,
                h,
                w,
                (f - 1) // 4 + 1,
                h // 8,
                w // 8,
                [RowPlan(1, {"file": f"{f}-{i}"}) for i in range(2)],
            )
            for f, h, w in buckets
        ],
        ["", "a cat"],
    )
    layout = StoreLayout(channels, "moments", 2, text_len=226, text_dim=32)
    writer = open_for_write(
        path, settings=settings, attrs={}, plan=plan, layout=layout, create=True
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        writer.write_caption(i, torch.randn(226, 32, generator=gen).bfloat16())
    for b in plan.buckets:
        lat = (b.latent_frames, 2 * channels, b.latent_h, b.latent_w)
        writer.write_all_masked(b.name, torch.randn(*lat, generator=gen).bfloat16())
        masks = torch.ones(2, 2, b.latent_frames, 1, b.latent_h, b.latent_w).bfloat16()
        writer.write_samples(
            b.name,
            [0, 1],
            torch.randn(2, *lat, generator=gen).bfloat16(),
            masks,
            torch.randn(2, 2, *lat, generator=gen).bfloat16(),
            torch.zeros(2, 2, dtype=torch.bool),
        )
    writer.finalize()
    return open_store(path)


def _refusal(store, tconfig: dict, model: Path, mode: str = "inpaint") -> str:
    with pytest.raises(TrainRefused) as err:
        check_store(store, tconfig, mode, model)
    message = str(err.value)
    assert message.startswith(f"store {store.path} does not fit {model}: ")
    return message


def test_v11_noise_must_match_both_ways(plain, tiny_model_dir, tmp_path):
    v11 = {**_tconfig(tiny_model_dir), "add_noise_in_inpaint_model": True}
    message = _refusal(open_store(plain), v11, tiny_model_dir)
    assert "its masked videos were encoded without the masked-video noise, but the transformer " \
        "has add_noise_in_inpaint_model true" in message  # fmt: skip
    noised = _store(tmp_path / "noised.zarr", {**open_store(plain).settings, "inpaint_noise": True})
    check_store(noised, v11, "inpaint", tiny_model_dir)  # a V1.1 store for a V1.1 model
    message = _refusal(noised, _tconfig(tiny_model_dir), tiny_model_dir)
    assert "its masked videos were encoded with the masked-video noise (for a model with " \
        "add_noise_in_inpaint_model true) but the transformer has add_noise_in_inpaint_model " \
        "false" in message  # fmt: skip


def test_patch_size_t_must_match_both_ways(plain, tiny_model_dir, tmp_path):
    v15_layout = {**_tconfig(tiny_model_dir), "patch_size_t": 2}
    message = _refusal(open_store(plain), v15_layout, tiny_model_dir)
    assert "its frame counts were chosen for a transformer with no patch_size_t" in message
    assert "but the transformer has patch_size_t 2" in message and "precompute a store" in message
    record = {"patch_size": 2, "patch_size_t": 2}
    made_for_v15 = _store(
        tmp_path / "v15.zarr", {**open_store(plain).settings, "transformer": record}
    )
    check_store(made_for_v15, v15_layout, "inpaint", tiny_model_dir)
    message = _refusal(made_for_v15, _tconfig(tiny_model_dir), tiny_model_dir)
    assert "chosen for a transformer with patch_size_t 2" in message
    assert "but the transformer has no patch_size_t" in message


def test_buckets_the_transformer_cannot_patch_are_refused(plain, tiny_model_dir, tmp_path):
    settings = {**open_store(plain).settings, "transformer": {"patch_size": 2, "patch_size_t": 2}}
    store = _store(tmp_path / "odd.zarr", settings, buckets=((9, 64, 64), (5, 64, 64)))
    tconfig = {**_tconfig(tiny_model_dir), "patch_size_t": 2}
    message = _refusal(store, tconfig, tiny_model_dir)
    assert "bucket(s) f3_h8_w8 have latent shapes the transformer (patch_size 2, " \
        "patch_size_t 2) cannot patch" in message  # fmt: skip
    assert "f2_h8_w8" not in message


def test_latent_channels_and_another_vae_are_refused(plain, tiny_model_dir, tmp_path):
    settings = open_store(plain).settings
    narrow = _store(tmp_path / "c8.zarr", settings, channels=8)
    message = _refusal(narrow, _tconfig(tiny_model_dir), tiny_model_dir)
    assert "its latents have 8 channels but the transformer predicts 16" in message
    assert "VAE with 8 latent channels but" in message and "has 16" in message
    other = {**settings, "vae": {**settings["vae"], "sha256": "0" * 64}}
    message = _refusal(
        _store(tmp_path / "vae.zarr", other), _tconfig(tiny_model_dir), tiny_model_dir
    )
    assert "it was encoded with another vae (sha256 000000000000...)" in message


@pytest.mark.parametrize("mode", ["inpaint", "normal"])
def test_training_refuses_control_models_without_a_mode_hint(plain, tiny_model_dir, mode):
    control = {**_tconfig(tiny_model_dir), "in_channels": 32}
    message = _refusal(open_store(plain), control, tiny_model_dir, mode)
    assert "the transformer is a CogVideoX-Fun control model (in_channels 32 = 16 noisy + 16 " \
        "control latents): control training is not supported" in message  # fmt: skip
    assert "--mode" not in message and "use --mode inpaint" not in message
    odd = {**_tconfig(tiny_model_dir), "in_channels": 20}
    assert "takes 20 input channels" in _refusal(open_store(plain), odd, tiny_model_dir, mode)


def _old_way(store: Path, dest: Path) -> Path:
    """A copy of `store` as cogfun wrote it before the records: no `transformer`, no `inpaint_noise`
    (the fingerprint is recomputed, as those stores' fingerprints were of their settings)."""
    shutil.copytree(store, dest)
    root = json.loads((dest / "zarr.json").read_text())
    attrs = root["attributes"]
    for key in ("transformer", "inpaint_noise"):
        del attrs["settings"][key]
    attrs["fingerprint"] = fingerprint(attrs["settings"])
    (dest / "zarr.json").write_text(json.dumps(root))
    return dest


def test_stores_from_before_the_record_open_and_check_as_before(plain, tiny_model_dir, tmp_path):
    old = open_store(_old_way(plain, tmp_path / "old.zarr"))
    assert "transformer" not in old.settings and old.digest() == open_store(plain).digest()
    check_store(old, _tconfig(tiny_model_dir), "inpaint", tiny_model_dir)
    v15 = {**_tconfig(tiny_model_dir), "patch_size_t": 2, "add_noise_in_inpaint_model": True}
    message = _refusal(old, v15, tiny_model_dir)
    assert "with no patch_size_t (any latent frame count; CogVideoX-Fun 2b/5b) (a store from " \
        "before cogfun recorded this: all such stores were made so)" in message  # fmt: skip
    assert "encoded without the masked-video noise" in message


def test_one_message_names_every_difference_before_any_weights_load(plain, tmp_path, monkeypatch):
    """The tiny V1.5 model on a 2b-InP store: patch_size_t, masked-video noise, VAE scaling factor
    and VAE identity all differ; `cogfun train` names them in one refusal and loads nothing."""
    import cogfun.common.models as models
    from cogfun.app.cli import app
    from cogfun.train import distributed

    def boom(*a, **k):
        raise AssertionError("loaded something heavy before refusing")

    monkeypatch.setattr(models, "load_transformer", boom)
    monkeypatch.setattr(distributed, "make_accelerator", boom)
    model = write_tiny_model(tmp_path / "v15", variant="v15-5b-inp", seed=0)
    args = ["train", "--latents", plain, "--model", model, "--output-dir", tmp_path / "o"]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*map(str, args), "--mode", "inpaint"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich may wrap the message box
    assert text.count("does not fit") == 1
    for part in (
        "chosen for a transformer with no patch_size_t",
        "the transformer has patch_size_t 2",
        "encoded without the masked-video noise",
        "VAE scaling factor 1.15258426",
        "encoded with another vae",
    ):
        assert part in text, part
    assert not (tmp_path / "o").exists()


# ---- end to end: precompute, then train, on the 5b-InP and V1.5 layouts ----


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["5b-inp", "v15-5b-inp"])
def test_precompute_then_train(data, tmp_path, variant):
    model = write_tiny_model(tmp_path / "model", variant=variant, seed=0)
    out = tmp_path / "s.zarr"
    assert run(PrecomputeConfig(data=data, model=model, out=out, **OPTS)) == 0
    store = open_store(out)
    tconfig = _tconfig(model)
    assert store.settings["transformer"]["patch_size_t"] == tconfig["patch_size_t"]
    assert store.settings["inpaint_noise"] is tconfig["add_noise_in_inpaint_model"]
    frames = {b.latent_shape[0] for b in store.buckets.values() if len(b.slots)}
    if variant == "v15-5b-inp":
        assert frames == {1, 2}  # 9-frame clips (3 latent) became 5 frames (2 latent)
    else:
        assert 3 in frames and frames <= {1, 2, 3}  # the same draws keep 9 frames
    assert sum(len(b.slots) for b in store.buckets.values()) == 5
    run_in_process(
        latents=out,
        model=model,
        output_dir=tmp_path / "o",
        max_train_steps=5,
        checkpointing_steps=5,
    )
    rows = metrics(tmp_path / "o")
    # One sample per bucket: the 5 steps of epoch 0 visit every bucket, images and clips alike.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and {r["epoch"] for r in rows} == {0}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    ckpt = tmp_path / "o" / "checkpoint-5" / "transformer"
    assert json.loads((ckpt / "config.json").read_text())["patch_size_t"] == tconfig["patch_size_t"]
    assert (ckpt / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_a_store_from_before_the_record_still_trains(plain, tiny_model_dir, tmp_path):
    old = _old_way(plain, tmp_path / "old.zarr")
    run_in_process(latents=old, model=tiny_model_dir, output_dir=tmp_path / "o", max_train_steps=2)
    rows = metrics(tmp_path / "o")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "o" / "checkpoint-2" / "transformer" / "config.json").is_file()
