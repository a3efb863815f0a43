"""Fault injection for the reliability tests and `bench/faults.py`: the write-layer hooks a child
cogfun process loads (`cogfun.testing.runs` starts those processes and judges what they leave).

Write-layer hook. Every file of a store goes through one of two functions, each writing a temporary
file and renaming it: zarr's `zarr.storage._local._put` (creation, metadata and attributes, the
shared all-masked latents, the done index) and the store's own `cogfun.common.store.chunks.put`
(staged sample and caption chunks, sealed shards). `install_hooks()` wraps both, with one write
counter, when `COGFUN_FAULT` is set:

    COGFUN_FAULT=kill-before:N   die (os._exit(137), as SIGKILL: no cleanup) before the N-th write
    COGFUN_FAULT=kill-torn:N     die in the middle of the N-th write (half of it in the temp file)
    COGFUN_FAULT=kill-after:N    die right after the N-th write
    COGFUN_FAULT=enospc:N        the N-th write and every later one fail with OSError(ENOSPC)
    COGFUN_FAULT=pause:N         sleep (10 min) before the N-th write: a live writer to look at
    COGFUN_FAULT=count           only count (with COGFUN_FAULT_LOG: list every write)
    COGFUN_FAULT=MODE:N:TEXT     any of the above counting only writes whose path holds TEXT
    COGFUN_FAULT_RANK=R          only the process whose RANK is R (accelerate launch) fires
    COGFUN_FAULT_LOG=FILE        the hook appends "<n>\t<mode>\t<path>" of what it hit (or wrote)

Training's checkpoint files get the same treatment (`checkpoint_hooks`: `ckpt-write:N`,
`ckpt-enospc:N`, `ckpt-publish:N`). A child process gets the hooks through `hook_env()`: a
folder with a `sitecustomize.py` that loads this file (by path) is put on PYTHONPATH. Without
`COGFUN_FAULT` that file does nothing, and cogfun's product code (all but `cogfun.testing`) holds
no fault code. Only the standard library is imported at module level, and nothing of cogfun: a
hooked child imports zarr and the store package when the hook is armed (which a cogfun command
imports anyway); keep it so.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

FAULT_ENV, FAULT_RANK_ENV, FAULT_LOG_ENV = "COGFUN_FAULT", "COGFUN_FAULT_RANK", "COGFUN_FAULT_LOG"
KILL_MODES = ("kill-before", "kill-torn", "kill-after")
KILLED = 137  # what a shell reports for SIGKILL; os._exit(137) stands in for it
# The per-sample arrays a store writes as shards (staged first, then sealed by their owner).
SHARDED = ("latents", "masks", "masked_latents", "all_masked", "checksum")
BIN = Path(sys.executable).parent

# ---- the write-layer hook ----


class Fault:
    """One armed fault, counting every write it sees (zarr's and the store's own chunk and shard
    writes alike, in the order they happen)."""

    def __init__(self, spec: str, log: str | None = None):
        self.mode, _, arg = spec.partition(":")
        arg, _, self.match = arg.partition(":")  # MODE:N:TEXT counts only paths holding TEXT
        self.target = int(arg) if arg else 0
        self.log = log
        self.lock, self.count = threading.Lock(), 0

    def note(self, n: int, path: object) -> None:
        if self.log:
            with self.lock, open(self.log, "a", encoding="utf-8") as f:
                f.write(f"{n}\t{self.mode}\t{path}\n")

    def before(self, path: object, data: Callable[[], bytes]) -> int:
        """Count one write of `path` and fire what the spec asks before it; returns its number
        (0 for a write the spec's TEXT leaves out)."""
        if self.match and self.match not in str(path):
            return 0
        with self.lock:
            self.count += 1
            n = self.count
        mode, target = self.mode, self.target
        if mode == "count":
            self.note(n, path)
        elif mode == "enospc" and n >= target:
            if n == target:
                self.note(n, path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        elif n == target and mode == "pause":
            self.note(n, path)
            time.sleep(600)
        elif n == target and mode in KILL_MODES:
            self.note(n, path)
            if mode == "kill-before":
                os._exit(KILLED)
            if mode == "kill-torn":  # what a kill leaves mid-write: half a temporary file
                raw = data()
                if getattr(path, "local", True):  # an object store has no half-written object
                    Path(f"{path}.torn.partial").write_bytes(raw[: len(raw) // 2])
                os._exit(KILLED)
        return n

    def after(self, n: int) -> None:
        if n and n == self.target and self.mode == "kill-after":
            os._exit(KILLED)


def faulty_put(real: Callable, spec: str, log: str | None = None, fault: Fault | None = None):
    """`real` (zarr's `_put(path, value, exclusive=False)`) with the fault `spec` injected."""
    fault = fault or Fault(spec, log)

    def put(path: Path, value, exclusive: bool = False):
        n = fault.before(path, lambda: bytes(value.as_buffer_like()))
        try:
            return real(path, value, exclusive=exclusive)
        finally:  # also when it raised (zarr ignores FileExistsError from an exclusive write)
            fault.after(n)

    return put


def faulty_store_put(real: Callable, fault: Fault) -> Callable:
    """`real` (the store's `chunks.put(path, data)`, through which every staged chunk and every
    sealed shard is written) with `fault` injected; removals (data None) are not writes."""

    def put(path: str, data):
        if data is None:
            return real(path, data)
        if not isinstance(data, bytes | bytearray | memoryview):
            data = b"".join(data)  # a streamed shard, whole: a torn write needs its bytes
        n = fault.before(path, lambda: bytes(data))
        try:
            return real(path, data)
        finally:
            fault.after(n)

    return put


def arm(spec: str, log: str | None = None) -> Callable[[], None]:
    """Arm `spec` on both write paths of this process, with one write counter: zarr's (store
    creation, metadata, attributes, the shared all-masked latents, the done index) and the
    store's own (`cogfun.common.store.chunks.put`: staged chunks and sealed shards). Returns a
    function that disarms."""
    import zarr.storage._local as local
    from cogfun.common.store import chunks

    fault = Fault(spec, log)
    real_zarr, real_store = local._put, chunks.put
    local._put = faulty_put(real_zarr, spec, log, fault)
    chunks.put = faulty_store_put(real_store, fault)

    def disarm() -> None:
        local._put, chunks.put = real_zarr, real_store

    return disarm


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
    arm(spec, os.environ.get(FAULT_LOG_ENV))


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
    """What a store write was, from its file path (or object URL)."""
    parts = str(path).split("/")
    if any(p.endswith(".creating") for p in parts):
        return "store creation"
    name = parts[-1]
    if "captions" in parts:
        return "caption embedding" if ".staged" in parts else "caption shard"
    if name == "zarr.json":
        return "root attributes (finalize)" if parts[-2].endswith(".zarr") else "metadata"
    if ".staged" not in parts and "buckets" in parts and parts[-2] in SHARDED:
        return f"sealed shard ({parts[-2]})"
    array = parts[parts.index(".staged") - 1] if ".staged" in parts else parts[-2]
    return {
        "checksum": "done flag (checksum)",
        "done": "done index (finalize)",
        "all_masked_latents": "shared all-masked latent",
        "all_masked_checksum": "shared all-masked latent",
    }.get(array, f"sample chunk ({array})")
