"""cogfun as the tests and `bench/faults.py` run it: command lines, real child processes (killed
with SIGKILL on cue), store snapshots, and how a rerun or a resumed training compares with an
uninterrupted one.

`precompute_args` and `train_args` build `cogfun precompute` / `cogfun train` command lines with
small, fast defaults (CPU, one thread); `cogfun`, `launch` and `timed_run` run them beside this
interpreter, with the environment `cogfun.testing.faults.hook_env` gives (the fault hooks armed or
not). `snapshot` and `compare` say what a store holds against a reference run; `train_compare`
does the same for a training run's metrics and final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogfun.testing.faults import BIN, arm

# Small sizes keep each encode in milliseconds; one thread per process: bitwise equality is
# promised for equal thread counts only.
OPTS = dict(
    image_sample_size=128,
    video_sample_size=64,
    token_sample_size=64,
    video_sample_n_frames=9,
    variants_per_sample=2,
    masks_per_sample=2,
    vae_mini_batch=2,
    threads=1,
    decode_workers=0,
    progress="log",
)

# ---- precompute as a child process ----


def precompute_args(data: Path, model: Path, out: Path, **kw) -> list[str]:
    args = ["precompute", "--data", str(data), "--model", str(model), "--out", str(out)]
    for key, value in {**OPTS, **kw}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def cogfun(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cogfun"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], env: dict, processes: int = 2, timeout: float = 400):
    """`accelerate launch --num_processes N cogfun ARGS` on CPU (gloo)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port())]
    return subprocess.run(
        [*cmd, str(BIN / "cogfun"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def writing_started(out: Path) -> Callable[[], bool]:
    """A probe: the store, or the sibling folder it is created in, exists."""
    return lambda: out.exists() or (out.parent / f".{out.name}.creating").exists()


def timed_run(
    args: list[str],
    env: dict,
    started: Callable[[], bool],
    kill_at: float | None = None,
    timeout: float = 300,
) -> tuple[float, bool]:
    """Run `cogfun ARGS`; with `kill_at`, SIGKILL its whole process group `kill_at` seconds after
    `started()` turns true. Returns (seconds from then to the end, killed)."""
    proc = subprocess.Popen(
        [str(BIN / "cogfun"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not started() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cogfun {' '.join(args)}: never started")
            time.sleep(0.005)
        began = time.monotonic()
        try:
            proc.wait(timeout=timeout if kill_at is None else kill_at)
            return time.monotonic() - began, False
        except subprocess.TimeoutExpired:
            if kill_at is None:
                raise
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return time.monotonic() - began, True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- store snapshots ----


@dataclass
class Snapshot:
    """What a store holds, as `cogfun inspect --json` and a full read report it."""

    status: str
    samples: int
    digest: str | None
    keys: list[str]  # provenance key of every stored sample
    failures: dict[str, str]  # failure key -> reason
    damaged: list = field(default_factory=list)


def inspect_json(store: Path, *extra: str) -> tuple[int, dict | None, str]:
    """`cogfun inspect STORE --json [extra]` in this process: (exit code, JSON or None, stderr).
    It calls what the command runs (`precompute.inspect.inspect_store`), not the CLI: the app
    layer imports `cogfun.testing` (tiny-model, demo), so `cogfun.testing` never imports it."""
    import contextlib
    import io

    from cogfun.precompute.inspect import inspect_store

    unknown = [e for e in extra if e != "--verify"]
    if unknown:
        raise ValueError(f"inspect_json: only --verify is supported, got {unknown}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_store(store, as_json=True, verify="--verify" in extra)
    data = json.loads(out.getvalue()) if out.getvalue().strip() else None
    return code, data, err.getvalue()


def snapshot(store: Path) -> Snapshot:
    from cogfun.common.store import open_store

    code, data, err = inspect_json(store, "--verify")
    if data is None:
        raise AssertionError(f"cogfun inspect {store} failed ({code}): {err}")
    reader = open_store(store, allow_incomplete=True)
    keys = [reader.provenance(n, int(s))["key"] for n, i in reader.buckets.items() for s in i.slots]
    failures = {f["key"]: f["reason"] for f in data["failed"]}
    return Snapshot(
        data["status"], data["samples"], data["digest"], keys, failures, data["damaged"]
    )


def compare(ref: Snapshot, got: Snapshot) -> tuple[int, int, bool]:
    """(lost, duplicated, identical) of `got` against an uninterrupted run's `ref`."""
    lost = len(set(ref.keys) - set(got.keys))
    duplicated = len(got.keys) - len(set(got.keys))
    identical = (
        got.status == "complete"
        and got.digest == ref.digest
        and got.samples == ref.samples
        and set(got.failures) == set(ref.failures)
        and not got.damaged
    )
    return lost, duplicated, identical


def write_log_of_a_run(out: Path, log: Path, data: Path, model: Path, **kw) -> int:
    """Run precompute in this process with every store write listed in `log`; the exit code."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run

    disarm = arm("count", str(log))
    try:
        return run(PrecomputeConfig(data=data, model=model, out=out, **{**OPTS, **kw}))
    finally:
        disarm()


def resume_and_compare(out: Path, ref: Snapshot, rerun: Callable[[], int]) -> dict:
    """After an interrupted run: samples that read as damaged now (`torn`), then rerun and
    compare with the uninterrupted run (`lost`, `duplicated`, `identical`)."""
    from cogfun.common.store import open_store

    torn = (
        len(open_store(out, allow_incomplete=True).verify()) if (out / "zarr.json").exists() else 0
    )
    code = rerun()
    lost, duplicated, identical = compare(ref, snapshot(out))
    return {
        "torn": torn,
        "rerun_code": code,
        "lost": lost,
        "duplicated": duplicated,
        "identical": identical and code == 0,
    }


def fault_dataset(root: Path) -> Path:
    """The kill matrix's dataset: 4 videos, 3 images and one unreadable file (so failure records
    are written too)."""
    from cogfun.testing.media import make_sample_dataset

    meta = make_sample_dataset(root, n_videos=4, n_images=3, seed=11)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    rows = json.loads(meta.read_text())
    rows.append({"file_path": "broken.mp4", "text": "a broken clip", "type": "video"})
    meta.write_text(json.dumps(rows))
    return root


# ---- training ----

TRAIN_OPTS = dict(max_train_steps=24, checkpointing_steps=4)


def train_args(store: Path, model: Path, out: Path, **options: Any) -> list[str]:
    """`train --latents ... --model ... --output-dir ...` plus the fast defaults as flags."""
    values = {
        "train_batch_size": 2,
        "dataloader_num_workers": 0,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "lr_warmup_steps": 2,
        "learning_rate": 1e-3,
        "mixed_precision": "no",
        "report_to": "none",
        "progress": "log",
    }
    values.update(options)
    args = ["train", "--latents", str(store), "--model", str(model), "--output-dir", str(out)]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    if "gradient_checkpointing" not in options:
        args.append("--no-gradient-checkpointing")
    if "use_came" not in options:
        args.append("--no-use-came")
    return args


def train_cli_args(store: Path, model: Path, out: Path, **kw) -> list[str]:
    """`train_args` with the fault matrices' longer run (24 steps, a checkpoint every 4)."""
    return train_args(store, model, out, **{**TRAIN_OPTS, **kw})


def checkpoint_report(out: Path) -> tuple[int, Path | None]:
    """(checkpoint-N folders that are not complete, what `--resume-from-checkpoint latest` picks)
    right after a kill. Complete: trainer_state.json and transformer weights that load."""
    from cogfun.train.checkpoint import find_resume
    from safetensors.torch import load_file

    partial = 0
    for folder in out.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            for weights in (folder / "transformer").glob("*.safetensors"):
                load_file(weights)
        except (OSError, ValueError):
            partial += 1
    return partial, find_resume(out, "latest")


def train_compare(ref: Path, out: Path) -> tuple[int, int, bool]:
    """(lost steps, duplicated steps, identical) of a resumed run against an uninterrupted one:
    the same per-step loss, lr and grad norm, and bitwise the same final weights."""
    import torch
    from cogfun.train.metrics import read_metrics
    from safetensors.torch import load_file

    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in b]
    lost = len({r["step"] for r in a} - set(steps))
    duplicated = len(steps) - len(set(steps))
    keys = ("step", "loss", "lr", "grad_norm")
    same = [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    last = f"checkpoint-{a[-1]['step']}/transformer/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(ref / last), load_file(out / last) if (out / last).is_file() else {}
    weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    leftovers = list(out.glob(".tmp-checkpoint-*")) + list(out.glob(".old-checkpoint-*"))
    return lost, duplicated, same and weights and not leftovers
