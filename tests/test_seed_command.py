"""The original's recommended training command, unchanged, through `accelerate launch`: `cogfun
train` given the dataset builds the store with the same settings on both processes, trains and
checkpoints; the same command again reuses the store (no encode, not a byte rewritten) and resumes.
Only sizes and step counts are made small (tiny model, a few generated clips, CPU with gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import cli_env, cogfun_cmd, metrics
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

# The original README's command (CogVideoX-Fun, "Training Code", without DeepSpeed), flag for flag.
SEED_FLAGS: list[tuple[str, str | None]] = [
    ("--pretrained_model_name_or_path", "$MODEL_NAME"),
    ("--train_data_dir", "$DATASET_NAME"),
    ("--train_data_meta", "$DATASET_META_NAME"),
    ("--image_sample_size", "1024"),
    ("--video_sample_size", "256"),
    ("--token_sample_size", "512"),
    ("--video_sample_stride", "3"),
    ("--video_sample_n_frames", "49"),
    ("--train_batch_size", "4"),
    ("--video_repeat", "1"),
    ("--gradient_accumulation_steps", "1"),
    ("--dataloader_num_workers", "8"),
    ("--num_train_epochs", "100"),
    ("--checkpointing_steps", "50"),
    ("--learning_rate", "2e-05"),
    ("--lr_scheduler", "constant_with_warmup"),
    ("--lr_warmup_steps", "100"),
    ("--seed", "42"),
    ("--output_dir", "output_dir"),
    ("--gradient_checkpointing", None),
    ("--mixed_precision", "bf16"),
    ("--adam_weight_decay", "3e-2"),
    ("--adam_epsilon", "1e-10"),
    ("--vae_mini_batch", "1"),
    ("--max_grad_norm", "0.05"),
    ("--random_hw_adapt", None),
    ("--training_with_video_token_length", None),
    ("--random_frame_crop", None),
    ("--enable_bucket", None),
    ("--use_came", None),
    ("--train_mode", "inpaint"),
    ("--resume_from_checkpoint", "latest"),
    ("--trainable_modules", "."),
]
# Small sizes for a CPU: the tiny model, 64-128 pixel buckets, 9 frames, 2 steps, a checkpoint each.
SMALL = {
    "--image_sample_size": "128",
    "--video_sample_size": "64",
    "--token_sample_size": "64",
    "--video_sample_n_frames": "9",
    "--train_batch_size": "2",
    "--dataloader_num_workers": "2",
    "--checkpointing_steps": "1",
}
STORE_OPTIONS = {  # the precompute settings the seed command implies, as the store records them
    "image_sample_size": 128,
    "video_sample_size": 64,
    "token_sample_size": 64,
    "video_sample_stride": 3,
    "video_sample_n_frames": 9,
    "video_repeat": 1,
    "vae_mini_batch": 1,
    "random_hw_adapt": True,
    "training_with_video_token_length": True,
    "random_frame_crop": True,
    "enable_bucket": True,
    "mode": "inpaint",
    "seed": 42,
}


def seed_args(model: Path, data: Path, steps: int, **changed: str) -> list[str]:
    values = {"$MODEL_NAME": str(model), "$DATASET_NAME": str(data)}
    values["$DATASET_META_NAME"] = str(data / "metadata.json")
    args = []
    for flag, value in SEED_FLAGS:
        value = changed.get(flag, SMALL.get(flag, values.get(value, value)))
        args += [flag] if value is None else [f"{flag}={value}"]
    return [*args, f"--max_train_steps={steps}", "--report_to=none", "--progress=log"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` with the seed's launcher flag (--mixed_precision bf16), 2 CPU processes."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    head = [accelerate, "launch", "--mixed_precision=bf16", "--multi_gpu", "--num_processes", "2"]
    head += ["--num_machines", "1", "--main_process_port", str(_free_port())]
    head += ["--dynamo_backend", "no"]
    env = cli_env(threads=1)
    env["ACCELERATE_USE_CPU"] = "true"  # DDP on CPU: --multi_gpu + use_cpu, gloo
    res = subprocess.run(
        head + cogfun_cmd() + ["train", *args],
        env=env,
        cwd=workdir,  # --latents is left at its default: latents.zarr here
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert res.returncode == 0, res.stderr[-6000:]
    return res


def _files(store: Path) -> dict[str, tuple[int, int]]:
    """Every file of the store with its mtime (ns) and size."""
    out = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(store))] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    from cogfun.testing.media import make_sample_dataset

    work = tmp_path_factory.mktemp("seed")
    make_sample_dataset(work / "data", n_videos=4, n_images=2, seed=3)
    res = launch(work, seed_args(tiny_model_dir, work / "data", steps=2))
    return work, res


def test_the_seed_command_has_every_flag_of_the_original():
    assert len(SEED_FLAGS) == 33 and len({f for f, _ in SEED_FLAGS}) == 33
    assert set(SMALL) <= {f for f, _ in SEED_FLAGS}


def test_the_seed_command_builds_the_store_then_trains(first_run):
    from cogfun.common.store import open_store

    work, res = first_run
    for rank in range(2):  # both processes encoded their share, then trained
        assert f"process {rank} of 2: stored" in res.stderr
    assert res.stderr.count("building the store latents.zarr from") == 2
    assert "MULTI_CPU, 2 process(es)" in res.stderr and "mixed precision bf16" in res.stderr
    store = open_store(work / "latents.zarr")
    settings = store.settings
    assert {k: settings[k] for k in STORE_OPTIONS} == STORE_OPTIONS
    assert store.layout.masks_per_sample > 0  # --train_mode inpaint
    out = work / "output_dir"
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert all(r["world_size"] == 2 and r["loss"] > 0 for r in metrics(out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    config = state["config"]
    assert (config["mode"], config["use_came"], config["mixed_precision"]) == (
        "inpaint",
        True,
        "bf16",
    )
    # The store was encoded with token-length buckets: batches tile as the original's do.
    assert config["auto_tile_batch_size"] is True
    assert state["store_fingerprint"] == store.fingerprint
    transformer = out / "checkpoint-2" / "transformer"
    assert json.loads((transformer / "config.json").read_text())["in_channels"] == 33


def test_the_same_command_reuses_the_store_and_resumes(first_run, tiny_model_dir):
    from cogfun.common.store import open_store

    work, _ = first_run
    store = work / "latents.zarr"
    before, digest = _files(store), open_store(store).digest()
    res = launch(work, seed_args(tiny_model_dir, work / "data", steps=3))
    assert res.stderr.count("reusing the store latents.zarr: it is complete") == 2
    assert "building the store" not in res.stderr and "of 2: stored" not in res.stderr
    assert f"resuming from {Path('output_dir') / 'checkpoint-2'}" in res.stderr
    assert _files(store) == before  # not one file of the store written again
    assert open_store(store).digest() == digest
    rows = metrics(work / "output_dir")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (work / "output_dir" / "checkpoint-3" / "trainer_state.json").is_file()


def test_a_store_with_other_settings_is_refused_naming_each_difference(first_run, tiny_model_dir):
    from cogfun.app.cli import app

    work, _ = first_run
    before = _files(work / "latents.zarr")
    args = seed_args(tiny_model_dir, work / "data", steps=4, **{"--video_sample_stride": "2"})
    args += ["--no-random-frame-crop"]
    cwd = Path.cwd()
    try:
        os.chdir(work)
        res = CliRunner().invoke(app, ["train", *args])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 2, res.output
    assert "the store latents.zarr (--latents) was written with other settings" in res.output
    assert "video_sample_stride: 3 -> 2" in res.output
    assert "random_frame_crop: True -> False" in res.output
    assert _files(work / "latents.zarr") == before
    assert not (work / "output_dir" / "checkpoint-4").exists()
