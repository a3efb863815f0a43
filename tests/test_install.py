"""requirements/lock.txt is one tested set inside pyproject.toml's ranges, and CI installs it whole.

pyproject.toml states ranges (a GPU machine keeps its own torch); the lock pins every package, so
a fresh machine gets what was tested. These tests keep the two honest and the lock complete.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from cogfun.app.doctor import check_requirements, installed_versions
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# pip freeze leaves these out; the project's build needs setuptools, which the lock pins anyway.
NOT_LOCKED = {"pip", "wheel", "cogfun"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _lock() -> dict[str, Requirement]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert canonicalize_name(req.name) not in pins, f"{req.name} pinned twice"
            pins[canonicalize_name(req.name)] = req
    return pins


def _declared() -> list[Requirement]:
    project = _project()
    return [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for r in project["optional-dependencies"]["dev"]
    ]


def _skip_unless_lock_environment() -> None:
    # The lock was made on Python 3.11 with the CPU torch; a CUDA torch needs nvidia-* packages the
    # lock leaves out, and markers select other packages on other Pythons (bench/py_versions.sh).
    if sys.version_info[:2] != (3, 11) or not metadata.version("torch").endswith("+cpu"):
        pytest.skip("the lock is the Python 3.11 + CPU torch environment")


def test_every_lock_line_is_an_exact_pin():
    lock = _lock()
    assert len(lock) > 50  # every transitive package, not only the direct ones
    for name, req in lock.items():
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{name}: {req} is not exact"
        assert req.marker is None, f"{name}: the lock is for one platform, no markers"


def test_every_direct_dependency_is_locked_inside_its_range():
    lock = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is a dependency in pyproject.toml but not in the lock"
        (pin,) = lock[name].specifier
        assert req.specifier.contains(pin.version), (
            f"lock pins {name}=={pin.version}, outside pyproject.toml's {req.specifier}"
        )


def test_ranges_keep_a_gpu_machines_torch_and_pythons():
    project = _project()
    deps = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    # Ranges, not pins: the GPU machine's torch 2.11 (CUDA) and newer releases are accepted.
    for name, req in deps.items():
        assert all(s.operator != "==" for s in req.specifier), f"{name} is pinned in pyproject"
    assert deps["torch"].specifier.contains("2.11.0+cu128")
    assert not deps["torch"].specifier.contains("2.4.1")  # no torch.serialization.safe_globals
    python = SpecifierSet(project["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13") if python.contains(v)] == ["3.11", "3.12"]
    # decord has no aarch64 wheels: its marker leaves it out there instead of failing the install.
    rows = check_requirements(
        [str(deps["decord"])], {"decord": None}, {"platform_machine": "aarch64"}
    )
    assert rows == [
        {"name": "decord", "required": ">=0.6.0", "installed": None, "applies": False, "ok": True}
    ]


def test_lock_is_consistent_with_itself():
    """Each locked package's own requirements (its installed metadata) hold within the lock."""
    _skip_unless_lock_environment()
    lock = _lock()
    versions = {name: next(iter(req.specifier)).version for name, req in lock.items()}
    missing = [name for name in lock if installed_versions([name])[name] is None]
    if missing:
        pytest.skip(f"not installed here, so their metadata is unknown: {missing[:5]}")
    broken = []
    for name in lock:
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in versions:
                broken.append(f"{name} needs {req}, which the lock leaves out")
            elif not req.specifier.contains(versions[dep], prereleases=True):
                broken.append(f"{name} needs {req}, the lock has {versions[dep]}")
    assert broken == []


def test_this_environment_is_the_lock():
    """CI installs with -c requirements/lock.txt: every package there is at its locked version and
    nothing unlocked came along (a new transitive dependency must be added to the lock)."""
    _skip_unless_lock_environment()
    lock = _lock()
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]
    }
    unlocked = sorted(set(installed) - set(lock) - NOT_LOCKED)
    assert unlocked == [], f"installed but not in requirements/lock.txt: {unlocked}"
    for name, req in lock.items():
        have = installed.get(name)
        assert have is not None, f"{name} is in the lock but not installed"
        (pin,) = req.specifier
        # torch 2.13.0+cpu is the locked 2.13.0 (a local build label is not a different release).
        assert Version(have).public == Version(pin.version).public, f"{name} {have} != {pin}"


def test_check_requirements_names_what_is_wrong():
    rows = check_requirements(
        [
            "torch>=2.5",
            "zarr>=3.1",
            "decord>=0.6; platform_machine == 'x86_64'",
            "pytest; extra == 'dev'",
        ],
        {"torch": "2.4.1+cu121", "zarr": None, "decord": "0.6.0"},
        {"platform_machine": "x86_64"},
    )
    assert [(r["name"], r["installed"], r["required"], r["ok"]) for r in rows] == [
        ("torch", "2.4.1+cu121", ">=2.5", False),
        ("zarr", None, ">=3.1", False),
        ("decord", "0.6.0", ">=0.6", True),
    ]
