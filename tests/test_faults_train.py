"""The training side of the fault matrix, reduced, on a store made by `cogfun precompute`:
`cogfun train` killed (as SIGKILL) in the middle of writing a checkpoint file and just before a
finished checkpoint is published; `--resume-from-checkpoint latest` never picks a partial one and
the resumed per-step losses and final weights equal the uninterrupted run's. A full disk during a
checkpoint save; a damaged sample skipped with `--skip-damaged`.
`python -m bench.faults` runs the full matrix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.faults import KILLED, hook_env, read_log
from cogfun.testing.runs import (
    OPTS,
    checkpoint_report,
    cogfun,
    fault_dataset,
    train_cli_args,
    train_compare,
)
from cogfun.testing.store_files import flip_byte

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """A precompute store, and an uninterrupted training run on it (as a process, one thread)."""
    root = tmp_path_factory.mktemp("train_faults")
    data = fault_dataset(root / "data")
    store = root / "s.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=store, **OPTS)) == 0
    ref = root / "ref"
    res = cogfun(train_cli_args(store, tiny_model_dir, ref), hook_env(root))
    assert res.returncode == 0, res.stderr[-3000:]
    return root, store, ref


# A checkpoint writes 5 files: optimizer, scheduler, random states, transformer/ weights (bf16) and
# the fp32 master weights.
POINTS = {  # fault -> the file it hits, the step of the checkpoint `latest` must pick then
    "torn transformer weights in checkpoint-8": (
        "ckpt-write:9",
        "diffusion_pytorch_model.safetensors",
        4,
    ),
    "torn master weights in checkpoint-8": ("ckpt-write:10", "master_weights.safetensors", 4),
    "before publishing checkpoint-12": ("ckpt-publish:3", ".tmp-checkpoint-12", 8),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_during_a_checkpoint_then_resume_is_identical(setup, tiny_model_dir, tmp_path, point):
    root, store, ref = setup
    fault, hit_name, step = POINTS[point]
    out, log = tmp_path / "out", tmp_path / "fault.log"
    args = train_cli_args(store, tiny_model_dir, out)
    res = cogfun(args, hook_env(root, fault, log=log))
    assert res.returncode == KILLED, res.stderr[-3000:]
    ((_, _, path),) = read_log(log)
    assert Path(path).name == hit_name and ".tmp-checkpoint-" in path
    partial, latest = checkpoint_report(out)
    assert partial == 0 and latest is not None and latest.name == f"checkpoint-{step}"
    resumed = cogfun(args, hook_env(root))  # --resume-from-checkpoint latest is the default
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing after step {step}" in resumed.stderr
    assert train_compare(ref, out) == (0, 0, True)


@pytest.fixture(scope="module")
def disk_full(setup, tiny_model_dir, tmp_path_factory):
    """A run whose disk fills up at the first file of checkpoint-8 (its 6th checkpoint file)."""
    root, store, _ = setup
    out = tmp_path_factory.mktemp("disk_full") / "out"
    args = train_cli_args(store, tiny_model_dir, out)
    return args, out, cogfun(args, hook_env(root, "ckpt-enospc:6"))


def test_disk_full_during_a_checkpoint_then_resume_is_identical(setup, disk_full):
    root, _, ref = setup
    args, out, res = disk_full
    assert res.returncode != 0 and "No space left on device" in res.stderr
    assert checkpoint_report(out) == (0, out / "checkpoint-4")
    assert cogfun(args, hook_env(root)).returncode == 0
    assert train_compare(ref, out) == (0, 0, True)


def test_disk_full_during_a_checkpoint_is_a_clear_error(disk_full):
    _, _, res = disk_full
    assert "Traceback" not in res.stderr and "disk is full" in res.stderr


def test_skip_damaged_trains_around_a_damaged_sample(setup, tiny_model_dir, tmp_path):
    """(Without --skip-damaged the run stops naming the sample: test_train_run.py checks that.)"""
    root, store, _ = setup
    damaged = Path(shutil.copytree(store, tmp_path / "damaged.zarr"))
    reader = open_store(damaged)
    bucket = max(reader.buckets, key=lambda b: len(reader.buckets[b].slots))
    slot = int(reader.buckets[bucket].slots[0])
    flip_byte(damaged, bucket, "latents", slot)  # one sample's chunk inside its shard
    out = tmp_path / "out"
    # Enough steps for a whole epoch (batch 2), so the damaged sample is certainly drawn.
    n = -(-sum(len(b.slots) for b in reader.buckets.values()) // 2) + len(reader.buckets)
    steps = dict(max_train_steps=n, checkpointing_steps=n, skip_damaged=True)
    res = cogfun(train_cli_args(damaged, tiny_model_dir, out, **steps), hook_env(root))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{bucket}/{slot}" in res.stderr and "skip" in res.stderr.lower()
    assert (out / f"checkpoint-{n}" / "trainer_state.json").is_file()
