"""`cogfun doctor` reports this Python's real versions and devices, and exits 1 naming each problem."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from cogfun.app import doctor


@pytest.fixture(scope="module")
def cli_report():
    """One `cogfun doctor --json --require-cuda` run (it imports torch, diffusers and DeepSpeed)."""
    res = subprocess.run(
        [sys.executable, "-c", "from cogfun.app.cli import main; main()", "doctor", "--json"]
        + ["--require-cuda"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return res, json.loads(res.stdout)  # stdout is the JSON object and nothing else


def test_json_holds_this_pythons_versions_and_devices(cli_report):
    _, report = cli_report
    assert report["python"]["version"] == platform.python_version()
    assert report["python"]["supported"] is True
    assert report["cogfun"] == metadata.version("cogfun")
    t = report["torch"]
    assert t["version"] == torch.__version__
    assert t["cuda_build"] == torch.version.cuda
    assert t["cuda_available"] == torch.cuda.is_available()
    assert t["device_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert len(t["devices"]) == t["device_count"]
    assert (
        t["cpu"]["fp32"] is None and t["cpu"]["bf16"] is None
    )  # both matmuls ran and summed right
    for name in ("torch", "diffusers", "transformers", "accelerate", "zarr", "av", "deepspeed"):
        assert report["packages"][name]["installed"] == metadata.version(name), name
    assert all(p["ok"] for p in report["packages"].values() if "ok" in p)
    assert report["imports"]["zarr"] is None and report["imports"]["diffusers"] is None
    ds = report["deepspeed"]
    assert ds["version"] == metadata.version("deepspeed")
    assert {"cpu_adam", "fused_adam"} <= set(ds["ops"])
    assert all(set(o) == {"prebuilt", "buildable"} for o in ds["ops"].values())


def test_require_cuda_is_the_only_problem_here(cli_report):
    res, report = cli_report
    if torch.cuda.is_available():
        assert res.returncode == 0 and report["problems"] == [] and report["ok"] is True
        assert all(d["fp32"] is None for d in report["torch"]["devices"])
        return
    assert res.returncode == 1
    assert report["ok"] is False
    build = torch.version.cuda
    assert report["problems"] == [
        f"--require-cuda: torch {torch.__version__} sees no CUDA device "
        f"(CUDA build: {build or 'none, a CPU build'})"
    ]
    text = doctor.render(report)
    assert f"torch: {torch.__version__} (CUDA build: {build or 'none'})" in text.splitlines()
    assert text.splitlines()[-2:] == [f"PROBLEM: {report['problems'][0]}", "1 problem(s)"]


def test_broken_install_exits_1_naming_each_problem(monkeypatch, capsys):
    monkeypatch.setattr(
        doctor, "_declared_requirements", lambda: ["torch>=99", "not-a-real-package>=1"]
    )
    real_imports = {m: None for m in (*doctor.REQUIRED_IMPORTS, "peft")}
    monkeypatch.setattr(
        doctor,
        "_imports",
        lambda: (
            real_imports
            | {"deepspeed": "ImportError: libcudart.so.12", "decord": "ModuleNotFoundError: x"}
        ),
    )
    assert doctor.run_doctor(as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [
        f"torch: {metadata.version('torch')}, cogfun needs >=99",
        "not-a-real-package: not installed, cogfun needs >=1",
        "deepspeed is installed but does not import: ImportError: libcudart.so.12",
    ]
    assert (
        "decord unavailable (ModuleNotFoundError: x): videos decode through PyAV"
        in (report["warnings"])
    )
    assert report["video_decoder"] == "PyAV" and report["deepspeed"] is None
    assert report["packages"]["torch"] == {
        "installed": metadata.version("torch"),
        "required": ">=99",
        "applies": True,
        "ok": False,
    }
    assert doctor.run_doctor(as_json=False) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"  torch: {metadata.version('torch')} / >=99  <- out of range" in lines
    assert lines[-1] == "3 problem(s)"
