"""The layers can be read off the tree: `common/` imports no stage, the stages import neither each
other nor the app layer, and only the app layer's tiny-model and demo commands reach into
`cogfun.testing`. Every module's imports are read with `ast` (nothing is imported), lazy ones inside
functions included, so a failure names the module and the import that breaks the rule."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Package -> folder, as pyproject.toml maps them (a package added there is walked too).
PACKAGES = {
    name.split(".", 1)[1]: ROOT / folder
    for name, folder in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"
    ]["setuptools"]["package-dir"].items()
}
# Package -> the cogfun packages it must not import.
FORBIDDEN = {
    "common": {"precompute", "train", "app", "testing"},
    "precompute": {"train", "app", "testing"},
    "train": {"precompute", "app", "testing"},
    "app": {"testing"},
    "testing": {"app"},  # the fixtures drive what the commands run, never the CLI itself
}
# The app layer's commands that write a tiny model or generated media (`cogfun tiny-model`,
# `cogfun demo`) are the product's only way into cogfun.testing.
TESTING_USERS = {"cogfun.app.cli", "cogfun.app.demo"}


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["cogfun", package, *parts])


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported cogfun module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            if (
                target == "cogfun" or not node.module
            ):  # `from cogfun import train`, `from . import x`
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, mod) for line, mod in found if mod == "cogfun" or mod.startswith("cogfun.")]


def _walk() -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            name = _module_name(package, path)
            modules[name] = (path, _imports(name, path))
    return modules


MODULES = _walk()


def _package(module: str) -> str:
    """`cogfun.train.setup` -> 'train'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _where(module: str, line: int) -> str:
    return f"{MODULES[module][0].relative_to(ROOT)}:{line} ({module})"


def test_every_package_is_walked():
    for package in ("common", "precompute", "train", "app"):
        assert any(_package(m) == package for m in MODULES), f"no module found in {package}/"
    assert "cogfun.app.cli" in MODULES and "cogfun.common.models" in MODULES


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_it_must_not(package):
    bad = []
    for module, (_, imports) in MODULES.items():
        if _package(module) != package:
            continue
        forbidden = FORBIDDEN[package] - ({"testing"} if module in TESTING_USERS else set())
        bad += [
            f"{_where(module, line)} imports {target}"
            for line, target in imports
            if _package(target) in forbidden
        ]
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def _sanctioned(module: str, target: str) -> bool:
    """The app layer's tiny-model / demo commands taking the tiny model and the sample media."""
    return module in TESTING_USERS and _package(target) == "testing"


def test_only_the_tiny_model_and_demo_commands_import_testing():
    bad = [
        f"{_where(module, line)} imports {target}"
        for module, (_, imports) in MODULES.items()
        if _package(module) != "testing"
        for line, target in imports
        if _package(target) == "testing" and not _sanctioned(module, target)
    ]
    assert not bad, "product modules importing cogfun.testing:\n" + "\n".join(bad)


def _resolve(target: str) -> str | None:
    """The walked module an import names (`cogfun.testing.tiny.VARIANTS` -> cogfun.testing.tiny)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_what_the_app_takes_from_testing_leads_back_to_no_app_module():
    """testing/ may import anything (its run helpers drive the CLI), so the package graph holds
    app <-> testing; there is no cycle as long as the testing modules the two commands import
    (and all they import in turn) never reach the app layer."""
    seen: dict[str, str] = {}  # module -> how it was reached
    todo = []
    for module in sorted(TESTING_USERS):
        for line, target in MODULES[module][1]:
            resolved = _resolve(target)
            if _sanctioned(module, target) and resolved and resolved not in seen:
                seen[resolved] = f"{_where(module, line)} imports {target}"
                todo.append(resolved)
    while todo:
        module = todo.pop()
        for line, target in MODULES[module][1]:
            resolved = _resolve(target)
            if resolved is None or resolved in seen:
                continue
            seen[resolved] = f"{seen[module]}\n{_where(module, line)} imports {target}"
            assert _package(resolved) != "app", (
                "import cycle through cogfun.testing:\n" + seen[resolved]
            )
            todo.append(resolved)


def test_the_package_import_graph_has_no_cycle():
    """Between packages, every import counted (the app layer's tiny-model / demo imports of
    testing included: testing imports no app module)."""
    edges: dict[str, dict[str, str]] = {}  # package -> imported package -> an example import
    for module, (_, imports) in MODULES.items():
        for line, target in imports:
            src, dst = _package(module), _package(target)
            if dst and dst != src:
                edges.setdefault(src, {}).setdefault(
                    dst, f"{_where(module, line)} imports {target}"
                )
    state: dict[str, str] = {}  # package -> "open" (on the DFS stack) or "done"

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                steps = [edges[a][b] for a, b in zip(cycle, cycle[1:], strict=False)]
                pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(steps))
            if nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for package in sorted(edges):
        if package not in state:
            visit(package, [])
