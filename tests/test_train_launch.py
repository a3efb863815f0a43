"""`cogfun train` as separate processes: `kill -9` then resume, and `accelerate launch` on CPU with
DDP (2 processes), saving and resuming. Two-process DeepSpeed ZeRO-2 training, saving (fp32 from
ZeRO's partitions) and resuming is tests/test_validation_launch.py[deepspeed] (with validation on),
one process under DeepSpeed tests/test_divergence.py.

DeepSpeed JIT-compiles a small communication op on its first run on a machine (about 30 s, cached
under ~/.cache/torch_extensions); later runs take seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cogfun.testing.runs import free_port, train_args
from safetensors.torch import load_file
from train_support import (
    cli_env,
    cogfun_cmd,
    make_store,
    metrics,
    run_in_process,
    transformer_only_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    return make_store(root), transformer_only_model(root, tiny_model_dir)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_kill_9_then_resume_matches_the_uninterrupted_run(shared, tmp_path):
    store, model = shared
    threads = torch.get_num_threads()  # bitwise equality needs the same thread count
    run_in_process(latents=store, model=model, output_dir=tmp_path / "ref", max_train_steps=8)
    out = tmp_path / "killed"
    args = train_args(store, model, out, max_train_steps=400, progress="none")
    proc = subprocess.Popen(
        cogfun_cmd() + args,
        env=cli_env(threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and steps[-1] < 8, steps
    run_in_process(latents=store, model=model, output_dir=out, max_train_steps=8)
    ref, resumed = metrics(tmp_path / "ref"), metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in ref], key
    a, b = (
        _weights(tmp_path / "ref/checkpoint-8/transformer"),
        _weights(out / "checkpoint-8/transformer"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".tmp-checkpoint-*"))


def _launch(
    nproc: int, store: Path, model: Path, out: Path, **options
) -> subprocess.CompletedProcess:
    """DDP on CPU (`--multi_gpu` with ACCELERATE_USE_CPU: gloo) under `accelerate launch`."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = cli_env(threads=1)
    env["ACCELERATE_USE_CPU"] = "true"
    head = [accelerate, "launch", "--num_processes", str(nproc), "--num_machines", "1"]
    head += ["--main_process_port", str(free_port()), "--dynamo_backend", "no"]
    head += ["--multi_gpu", "--mixed_precision", "no"]
    args = train_args(store, model, out, **options)
    res = subprocess.run(
        head + cogfun_cmd() + args, env=env, capture_output=True, text=True, timeout=400
    )
    assert res.returncode == 0, res.stderr[-6000:]
    return res


def _check_rows(rows, nproc, warmup=2, lr=1e-3):
    for k, row in enumerate(rows, start=1):
        assert row["world_size"] == nproc
        assert len(row["rank_samples"]) == nproc and all(n > 0 for n in row["rank_samples"])
        assert row["lr"] == pytest.approx(min(1.0, (k - 1) / warmup) * lr)
        assert row["loss"] > 0 and row["grad_norm"] > 0


def test_accelerate_launch_ddp_trains_saves_and_resumes(shared, tmp_path):
    store, model = shared
    nproc, out = 2, tmp_path / "out"
    options = dict(max_train_steps=2, checkpointing_steps=2, mixed_precision="no", use_came=False)
    options.update(save_dtype="bf16", dataloader_num_workers=1)
    first = _launch(nproc, store, model, out, **options)
    for rank in range(nproc):  # every process saw the world and did work
        assert f"rank {rank} of {nproc}: 4 samples in this run, at step 2" in first.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    _check_rows(rows, nproc)
    saved = _weights(out / "checkpoint-2" / "transformer")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert (out / "checkpoint-2" / "master_weights.safetensors").is_file()
    assert "MULTI_CPU, 2 process(es)" in first.stderr
    assert rows[0]["clip_norm"] == pytest.approx(0.25)  # the adaptive schedule's first value
    options["max_train_steps"] = 3
    second = _launch(nproc, store, model, out, **options)
    assert f"resuming from {out / 'checkpoint-2'}" in second.stderr
    assert f"rank {nproc - 1} of {nproc}: 2 samples in this run, at step 3" in second.stderr
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == rows
    _check_rows(resumed, nproc)
    from diffusers import CogVideoXTransformer3DModel

    final = CogVideoXTransformer3DModel.from_pretrained(out / "checkpoint-3" / "transformer")
    assert final.config.in_channels == 33
