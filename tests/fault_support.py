"""Fault injection for the reliability tests and `bench/faults.py`: write-layer hooks, precompute
runs as real processes (killed with SIGKILL), store snapshots, training outcomes.

Write-layer hook. Every file zarr writes goes through `zarr.storage._local._put` (a temporary
file, then a rename). `install_hooks()` wraps it when `COGFUN_FAULT` is set:

    COGFUN_FAULT=kill-before:N   die (os._exit(137), as SIGKILL: no cleanup) before the N-th write
    COGFUN_FAULT=kill-torn:N     die in the middle of the N-th write (half of it in the temp file)
    COGFUN_FAULT=kill-after:N    die right after the N-th write
    COGFUN_FAULT=enospc:N        the N-th write and every later one fail with OSError(ENOSPC)
    COGFUN_FAULT=pause:N         sleep (10 min) before the N-th write: a live writer to look at
    COGFUN_FAULT=count           only count (with COGFUN_FAULT_LOG: list every write)
    COGFUN_FAULT_RANK=R          only the process whose RANK is R (accelerate launch) fires
    COGFUN_FAULT_LOG=FILE        the hook appends "<n>\t<mode>\t<path>" of what it hit (or wrote)

Training's checkpoint files get the same treatment (`checkpoint_hooks`: `ckpt-write:N`,
`ckpt-enospc:N`, `ckpt-publish:N`). A child process gets the hooks through `hook_env()`: a
folder with a `sitecustomize.py` that loads this file is put on PYTHONPATH. Without
`COGFUN_FAULT` that file does nothing, and cogfun itself holds no fault code. Only the standard
library is imported at module level, so the hook costs a child nothing but zarr's import.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FAULT_ENV, FAULT_RANK_ENV, FAULT_LOG_ENV = "COGFUN_FAULT", "COGFUN_FAULT_RANK", "COGFUN_FAULT_LOG"
KILL_MODES = ("kill-before", "kill-torn", "kill-after")
KILLED = 137  # what a shell reports for SIGKILL; os._exit(137) stands in for it
BIN = Path(sys.executable).parent

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


# ---- the write-layer hook ----


def faulty_put(real: Callable, spec: str, log: str | None = None) -> Callable:
    """`real` (zarr's `_put(path, value, exclusive=False)`) with the fault `spec` injected."""
    mode, _, arg = spec.partition(":")
    target = int(arg) if arg else 0
    lock, count = threading.Lock(), [0]

    def note(n: int, path: Path) -> None:
        if log:
            with lock, open(log, "a", encoding="utf-8") as f:
                f.write(f"{n}\t{mode}\t{path}\n")

    def put(path: Path, value, exclusive: bool = False):
        with lock:
            count[0] += 1
            n = count[0]
        if mode == "count":
            note(n, path)
        elif mode == "enospc" and n >= target:
            if n == target:
                note(n, path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        elif n == target and mode == "pause":
            note(n, path)
            time.sleep(600)
        elif n == target and mode in KILL_MODES:
            note(n, path)
            if mode == "kill-before":
                os._exit(KILLED)
            if mode == "kill-torn":  # what a kill leaves mid-write: half a temporary file
                data = bytes(value.as_buffer_like())
                Path(f"{path}.torn.partial").write_bytes(data[: len(data) // 2])
                os._exit(KILLED)
        try:
            return real(path, value, exclusive=exclusive)
        finally:  # also when it raised (zarr ignores FileExistsError from an exclusive write)
            if n == target and mode == "kill-after":
                os._exit(KILLED)

    return put


def checkpoint_hooks(spec: str, log: str | None) -> None:
    """Training's checkpoint writes: every `safetensors.torch.save_file` / `torch.save` into a
    `.tmp-checkpoint-*` folder is counted, and so is each rename that publishes one.

        ckpt-write:N    die in the N-th file write (the file left half written)
        ckpt-enospc:N   the N-th file write and every later one fail with ENOSPC
        ckpt-publish:N  die before the N-th `.tmp-checkpoint-K -> checkpoint-K` rename
    """
    import pathlib

    import safetensors.torch
    import torch

    mode, _, arg = spec.partition(":")
    target, lock, counts = int(arg), threading.Lock(), {"write": 0, "publish": 0}

    def hit(kind: str, path: object) -> int:
        with lock:
            counts[kind] += 1
            n = counts[kind]
        if n == target and log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{n}\t{mode}\t{path}\n")
        return n

    def wrap(real: Callable) -> Callable:
        def save(obj, path, *args, **kwargs):
            if ".tmp-checkpoint-" not in str(path) or mode == "ckpt-publish":
                return real(obj, path, *args, **kwargs)
            n = hit("write", path)
            if mode == "ckpt-enospc" and n >= target:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            result = real(obj, path, *args, **kwargs)
            if mode == "ckpt-write" and n == target:
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                os._exit(KILLED)
            return result

        return save

    safetensors.torch.save_file = wrap(safetensors.torch.save_file)
    torch.save = wrap(torch.save)
    real_rename = pathlib.Path.rename

    def rename(self, target_path):
        if mode == "ckpt-publish" and self.name.startswith(".tmp-checkpoint-"):
            if hit("publish", self) == target:
                os._exit(KILLED)
        return real_rename(self, target_path)

    pathlib.Path.rename = rename


def install_hooks() -> None:
    """Arm the fault `COGFUN_FAULT` asks for (called by the generated sitecustomize)."""
    spec = os.environ.get(FAULT_ENV)
    rank = os.environ.get(FAULT_RANK_ENV)
    if not spec or (rank is not None and os.environ.get("RANK", "0") != rank):
        return
    if spec.startswith("ckpt-"):
        checkpoint_hooks(spec, os.environ.get(FAULT_LOG_ENV))
        return
    import zarr.storage._local as local

    local._put = faulty_put(local._put, spec, os.environ.get(FAULT_LOG_ENV))


SITECUSTOMIZE = """import os
if os.environ.get("COGFUN_FAULT"):
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("_cogfun_faults", {path!r})
    module = sys.modules["_cogfun_faults"] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.install_hooks()
    except BaseException as e:  # a fault run without its fault would pass for the wrong reason
        print(f"cogfun fault hook failed to install: {{e!r}}", file=sys.stderr)
        os._exit(3)
"""


def hook_env(
    root: Path,
    fault: str | None = None,
    rank: int | None = None,
    log: Path | None = None,
    threads: int = 1,
) -> dict[str, str]:
    """Environment for a child cogfun process, with the write hook armed when `fault` is given."""
    hooks = root / "_fault_hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE.format(path=str(Path(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGFUN_FAULT")}
    env.update(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(threads))
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), env.get("PYTHONPATH")) if p)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if fault:
        env[FAULT_ENV] = fault
        if rank is not None:
            env[FAULT_RANK_ENV] = str(rank)
        if log is not None:
            env[FAULT_LOG_ENV] = str(log)
    return env


def read_log(log: Path) -> list[tuple[int, str, str]]:
    """(n, mode, path) lines a hook wrote."""
    if not log.is_file():
        return []
    rows = [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines() if line]
    return [(int(n), mode, path) for n, mode, path in rows]


def write_kind(path: str) -> str:
    """What a zarr write was, from its file path."""
    parts = Path(path).parts
    if any(p.endswith(".creating") for p in parts):
        return "store creation"
    name = Path(path).name
    if "captions" in parts:
        return "caption embedding"
    if name == "zarr.json":
        return "root attributes (finalize)" if parts[-2].endswith(".zarr") else "metadata"
    array = parts[-2]
    return {
        "checksum": "done flag (checksum)",
        "done": "done index (finalize)",
        "all_masked_latents": "shared all-masked latent",
        "all_masked_checksum": "shared all-masked latent",
    }.get(array, f"sample chunk ({array})")


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


def launch(args: list[str], env: dict, processes: int = 2, timeout: float = 400):
    """`accelerate launch --num_processes N cogfun ARGS` on CPU (gloo)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(20000 + (os.getpid() * 7 + time.monotonic_ns()) % 20000)]
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
    """`cogfun inspect STORE --json [extra]` in this process: (exit code, JSON or None, stderr)."""
    from cogfun.common.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["inspect", str(store), "--json", *extra])
    data = json.loads(res.stdout) if res.stdout.strip() else None
    return res.exit_code, data, res.stderr


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
    """Run precompute in this process with every zarr write listed in `log`; the exit code."""
    import zarr.storage._local as local
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run

    real = local._put
    local._put = faulty_put(real, "count", str(log))
    try:
        return run(PrecomputeConfig(data=data, model=model, out=out, **{**OPTS, **kw}))
    finally:
        local._put = real


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
    from cogfun.common.media import make_sample_dataset

    meta = make_sample_dataset(root, n_videos=4, n_images=3, seed=11)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    rows = json.loads(meta.read_text())
    rows.append({"file_path": "broken.mp4", "text": "a broken clip", "type": "video"})
    meta.write_text(json.dumps(rows))
    return root


# ---- training ----

TRAIN_OPTS = dict(max_train_steps=24, checkpointing_steps=4)


def train_cli_args(store: Path, model: Path, out: Path, **kw) -> list[str]:
    from train_support import train_args

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
