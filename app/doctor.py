"""`cogfun doctor`: is this Python ready to precompute and train?

    cogfun doctor [--json] [--require-cuda]

It reports the versions that matter (Python, torch and the CUDA it was built with, diffusers,
transformers, accelerate, DeepSpeed, peft, zarr, decord / PyAV), whether every installed version lies
in the range cogfun declares (its installed metadata, i.e. pyproject.toml's `dependencies`), the CUDA
devices with a real matmul on each (fp32 and bf16), NCCL, and DeepSpeed's op table (what `ds_report`
prints: prebuilt or not, buildable here or not), without compiling anything.

A *problem* is something that stops cogfun: a required package missing, out of range or failing to
import, a CUDA device that cannot run a kernel, no CUDA device under `--require-cuda`. A *warning* is
something that works differently: no decord (videos decode through PyAV), a GPU without bf16 (train
with `--mixed-precision fp16`). The exit status is 1 when there is a problem, else 0.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Shown first and always, installed or not; the rest of the declared dependencies follow.
KEY_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "deepspeed",
    "peft",
    "zarr",
    "numcodecs",
    "decord",
    "av",
)
# Modules whose import failure is a problem: everything the two stages import at run time.
REQUIRED_IMPORTS = ("torch", "diffusers", "transformers", "accelerate", "zarr", "av", "safetensors")


def check_requirements(
    requirements: Iterable[str],
    installed: dict[str, str | None],
    environment: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per requirement: name, the range, the installed version, and whether it applies/fits.

    `installed` maps canonical names to versions (None = not installed). Requirements behind an
    extra are left out; a requirement whose marker is false here (decord on aarch64) has
    `applies: False` and is never a problem.
    """
    env = dict(environment or default_environment())
    rows = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        name = canonicalize_name(req.name)
        applies = req.marker is None or req.marker.evaluate({**env, "extra": ""})
        have = installed.get(name)
        ok = (not applies) or (have is not None and req.specifier.contains(have, prereleases=True))
        rows.append(
            {
                "name": name,
                "required": str(req.specifier) or "any",
                "installed": have,
                "applies": applies,
                "ok": ok,
            }
        )
    return rows


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[canonicalize_name(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[canonicalize_name(name)] = None
    return out


def _declared_requirements() -> list[str] | None:
    """pyproject.toml's dependencies when cogfun runs from its checkout (an editable install: a
    stale `cogfun.egg-info` beside it would otherwise answer), else the installed metadata's."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "cogfun":
            return list(project.get("dependencies", []))
    try:
        return list(metadata.requires("cogfun") or [])
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Route file descriptor 1 to 2: DeepSpeed's logger prints to the stdout it saw at import."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _imports() -> dict[str, str | None]:
    """Module -> None when it imports, else the error's first line."""
    out: dict[str, str | None] = {}
    for module in (*REQUIRED_IMPORTS, "decord", "deepspeed", "peft"):
        try:
            importlib.import_module(module)
            out[module] = None
        except Exception as err:  # a broken binary raises OSError/RuntimeError, not ImportError
            out[module] = _first_line(err)
    return out


def _device_check(torch: Any, device: str, dtype: Any) -> str | None:
    """A real 64x64 matmul on `device` in `dtype`; None when it ran and gave the right sum."""
    try:
        a = torch.ones(64, 64, device=device, dtype=dtype)
        total = float((a @ a).float().sum().item())
    except Exception as err:
        return _first_line(err)
    return None if total == 64.0**3 else f"64x64 ones matmul summed to {total}, expected {64**3}"


def _torch_report() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None for a CPU build
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "nccl": None,
        "distributed_backends": {
            "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
            "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
        },
        "cpu": {
            "threads": torch.get_num_threads(),
            "fp32": _device_check(torch, "cpu", torch.float32),
            "bf16": _device_check(torch, "cpu", torch.bfloat16),
        },
        "devices": [],
    }
    if cuda:
        with contextlib.suppress(Exception):
            report["nccl"] = ".".join(str(p) for p in torch.cuda.nccl.version())
        for i in range(report["device_count"]):
            props = torch.cuda.get_device_properties(i)
            device = f"cuda:{i}"
            report["devices"].append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "bf16_supported": bool(torch.cuda.is_bf16_supported()),
                    "fp32": _device_check(torch, device, torch.float32),
                    "bf16": _device_check(torch, device, torch.bfloat16),
                }
            )
    return report


def _deepspeed_report() -> dict[str, Any]:
    """`ds_report`'s facts, gathered without building any op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops, torch_info
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    ops = {}
    for name, builder in ALL_OPS.items():
        try:
            compatible = bool(builder.is_compatible(False))
        except Exception:  # a CUDA builder without a CUDA toolkit raises from its probe
            compatible = False
        ops[name] = {"prebuilt": bool(installed_ops.get(name, False)), "buildable": compatible}
    return {
        "version": deepspeed.__version__,
        "accelerator": get_accelerator().device_name(),
        "compiled_with_torch": torch_info.get("version"),
        "compiled_with_cuda": torch_info.get("cuda_version"),
        "ops": ops,
        # ZeRO-2 with cogfun's own optimizers (CAME, torch AdamW) builds no op; the table matters
        # only for DeepSpeed optimizers or offload, which need their op buildable (nvcc) or prebuilt.
    }


def collect(require_cuda: bool = False) -> dict[str, Any]:
    """Everything `cogfun doctor` prints, as one JSON-able dict with `problems` and `warnings`."""
    problems: list[str] = []
    warnings: list[str] = []
    declared = _declared_requirements()
    if declared is None:
        problems.append("cogfun is not installed in this Python (pip install -e . in the checkout)")
        declared = []
    names = list(KEY_PACKAGES) + [Requirement(r).name for r in declared]
    versions = installed_versions(names)
    rows = check_requirements(declared, versions)
    for row in rows:
        if row["ok"]:
            continue
        have = row["installed"] or "not installed"
        problems.append(f"{row['name']}: {have}, cogfun needs {row['required']}")
    with _stdout_to_stderr():
        imports = _imports()
        torch_info = _torch_report() if imports["torch"] is None else None
        ds = None
        if imports["deepspeed"] is None:
            try:
                ds = _deepspeed_report()
            except Exception as err:
                warnings.append(f"deepspeed op table unavailable: {_first_line(err)}")
    for module in (*REQUIRED_IMPORTS, "deepspeed", "peft"):
        if imports[module] is not None and versions.get(canonicalize_name(module)) is not None:
            problems.append(f"{module} is installed but does not import: {imports[module]}")
    if imports["decord"] is not None:
        warnings.append(f"decord unavailable ({imports['decord']}): videos decode through PyAV")
    if torch_info is not None:
        for check in ("fp32", "bf16"):
            if torch_info["cpu"][check] is not None:
                problems.append(f"cpu {check} matmul failed: {torch_info['cpu'][check]}")
        for dev in torch_info["devices"]:
            for check in ("fp32", "bf16"):
                if dev[check] is not None and (check == "fp32" or dev["bf16_supported"]):
                    problems.append(f"cuda:{dev['index']} {check} matmul failed: {dev[check]}")
            if not dev["bf16_supported"]:
                warnings.append(
                    f"cuda:{dev['index']} ({dev['name']}) has no bf16: train with "
                    "--mixed-precision fp16 (the default is bf16)"
                )
        if torch_info["cuda_build"] and not torch_info["cuda_available"]:
            warnings.append(
                f"torch is a CUDA {torch_info['cuda_build']} build but sees no GPU "
                "(driver, CUDA_VISIBLE_DEVICES?)"
            )
        if require_cuda and not torch_info["cuda_available"]:
            problems.append(
                f"--require-cuda: torch {torch_info['version']} sees no CUDA device "
                f"(CUDA build: {torch_info['cuda_build'] or 'none, a CPU build'})"
            )
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "python": {
            "version": platform.python_version(),
            "executable": sys.executable,
            "supported": (3, 11) <= sys.version_info[:2] <= (3, 12),
        },
        "platform": f"{platform.system()} {platform.machine()}",
        "cogfun": versions.get("cogfun") or _own_version(),
        "packages": {
            row["name"]: {k: row[k] for k in ("installed", "required", "applies", "ok")}
            for row in rows
        }
        | {
            n: {"installed": versions[n]}
            for n in map(canonicalize_name, KEY_PACKAGES)
            if n not in {r["name"] for r in rows}
        },
        "imports": imports,
        "torch": torch_info,
        "deepspeed": ds,
        "video_decoder": "decord (PyAV fallback)" if imports["decord"] is None else "PyAV",
    }


def _own_version() -> str | None:
    try:
        return metadata.version("cogfun")
    except metadata.PackageNotFoundError:
        return None


def render(report: dict[str, Any]) -> str:
    """The human-readable form: `name: value` lines, problems and warnings last."""
    py = report["python"]
    lines = [
        f"cogfun: {report['cogfun']}",
        f"python: {py['version']} ({py['executable']})"
        + ("" if py["supported"] else "  <- cogfun supports 3.11-3.12"),
        f"platform: {report['platform']}",
    ]
    t = report["torch"]
    if t is not None:
        lines.append(f"torch: {t['version']} (CUDA build: {t['cuda_build'] or 'none'})")
        lines.append(
            f"cuda available: {t['cuda_available']}, devices: {t['device_count']}, "
            f"nccl: {t['nccl']}, cudnn: {t['cudnn']}"
        )
        for d in t["devices"]:
            lines.append(
                f"  cuda:{d['index']}: {d['name']}, sm {d['capability']}, {d['memory_gib']} GiB, "
                f"bf16 {'yes' if d['bf16_supported'] else 'no'}, "
                f"matmul fp32 {d['fp32'] or 'ok'}, bf16 {d['bf16'] or 'ok'}"
            )
        lines.append(f"cpu: {t['cpu']['threads']} threads, bf16 matmul {t['cpu']['bf16'] or 'ok'}")
    lines.append("packages (installed / cogfun needs):")
    for name, p in report["packages"].items():
        need = p.get("required")
        mark = "" if p.get("ok", True) else "  <- out of range"
        if p.get("applies") is False:
            mark = "  (not needed on this platform)"
        lines.append(
            f"  {name}: {p['installed'] or 'not installed'}" + (f" / {need}" if need else "") + mark
        )
    lines.append(f"video decoder: {report['video_decoder']}")
    ds = report["deepspeed"]
    if ds is not None:
        built = [n for n, o in ds["ops"].items() if o["prebuilt"]]
        buildable = [n for n, o in ds["ops"].items() if o["buildable"]]
        lines.append(
            f"deepspeed: {ds['version']}, accelerator {ds['accelerator']}, "
            f"prebuilt ops: {', '.join(built) or 'none (built on first use)'}"
        )
        lines.append(f"  buildable ops here: {', '.join(buildable) or 'none'}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    for p in report["problems"]:
        lines.append(f"PROBLEM: {p}")
    lines.append("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
    return "\n".join(lines)


def run_doctor(as_json: bool = False, require_cuda: bool = False) -> int:
    report = collect(require_cuda=require_cuda)
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 0 if report["ok"] else 1
