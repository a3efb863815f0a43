"""The repository stands alone: no file a user gets cites a document they do not have (the design
notes, reference and benchmark write-ups the project was built from) or a path on the machine it was
written on. Facts from those belong in docs/ or tests/golden/README.md, cited there; the original's
behaviour is cited by its public source (the CogVideoX-Fun repository's files)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(
        [
            r"\b" + "REFER" + r"ENCE\b",
            r"\b" + "BENCH" + r"MARKS\b",
            "DES" + r"IGN\.md",
            "ENVIRON" + r"MENT\.md",
            "STY" + r"LE\.md",
            r"\.\./" + "shared",
            "/wo" + "rk/",
        ]
    )
)
# Golden data written by the original's code: their text is its output (tests/golden/README.md,
# which describes them, is checked like any other file).
GOLDEN_DATA = "tests/golden/"


def project_files() -> list[str]:
    """Tracked files plus new ones not ignored (a file is checked before it is committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err})")
    return sorted(
        name
        for name in out.splitlines()
        if not (name.startswith(GOLDEN_DATA) and name != GOLDEN_DATA + "README.md")
    )


def test_no_file_cites_a_document_outside_the_repository():
    files = project_files()
    assert "README.md" in files and "docs/internals.md" in files
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images and other binary files
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if FORBIDDEN.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, (
        "cite docs/, tests/golden/README.md or a public source instead:\n" + "\n".join(found)
    )


def test_the_pattern_catches_each_form():
    cited = [
        "see REFER" + "ENCE §8.1",
        "(REFER" + "ENCE.md section 7)",
        "BENCH" + "MARKS.md defines it",
        "DES" + "IGN.md, Defaults",
        "ENVIRON" + "MENT.md",
        "STY" + "LE.md",
        "../" + "shared/golden",
        "/wo" + "rk/shared/x",
    ]
    assert all(FORBIDDEN.search(text) for text in cited)
    assert not any(
        FORBIDDEN.search(text)
        for text in ("REFERENCE_LOSS = 1", "a reference loss", "benchmarks/", "shared memory")
    )


# ---- bench/ and tests/ import only what a reader can find ----
#
# `bench` is a package run as `python -m bench.NAME` from the repository root; its modules import
# public names of cogfun (fixtures from `cogfun.testing`) and of one another, never the tests'
# helpers; tests, too, reach no private name of cogfun; and no file of bench/ or tests/ edits the
# import path (pytest's `pythonpath` and
# `python -m` put the root there).

PATH_EDITS = {"syspath_prepend", "addsitedir"}


def _private(name: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in name.split("."))


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def import_problems(source: str, bench: bool, test_modules: set[str]) -> list[str]:
    """What breaks the rules above in one file's source (`bench`: the stricter bench rules)."""
    found, bound = [], {}  # local name -> the cogfun/bench name it was imported as
    tree = ast.parse(source)
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
        if dotted == "sys.path" or (dotted and node.attr in PATH_EDITS):
            found.append(f"line {node.lineno}: touches the import path ({dotted})")
        if isinstance(node, ast.Import):
            names = [(a.name, a.asname or a.name.split(".")[0], a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                (node.module, a.asname or a.name, f"{node.module}.{a.name}") for a in node.names
            ]
        else:
            names = []
        for module, local, full in names:
            top = module.split(".")[0]
            if bench and (top == "tests" or top in test_modules):
                found.append(f"line {node.lineno}: imports {module} from tests/")
            elif top in ("cogfun", "bench"):
                if _private(full):
                    found.append(f"line {node.lineno}: imports the private {full}")
                bound[local] = full
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
        root = dotted.split(".")[0] if dotted else None
        if root in bound and _private(dotted.split(".", 1)[1]):
            found.append(f"line {node.lineno}: uses the private {bound[root]}.{node.attr}")
    return found


def test_bench_and_tests_use_public_names_and_leave_the_import_path_alone():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    files = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    assert (ROOT / "bench" / "__init__.py") in files
    problems = []
    for path in files:
        bench = path.parent.name == "bench"
        for problem in import_problems(path.read_text(encoding="utf-8"), bench, test_modules):
            problems.append(f"{path.relative_to(ROOT)}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_import_rules_catch_each_form():
    def check(source: str, bench: bool = True) -> list[str]:
        return import_problems(source, bench, {"train_support", "conftest"})

    caught = [
        "import sys\nsys.path.insert(0, 'x')",
        "import sys\nsys.path.append('x')",
        "import sys\nsys.path[:0] = ['x']",
        "def f(monkeypatch):\n    monkeypatch.syspath_prepend('x')",
        "from train_support import make_store",
        "import tests.train_support",
        "from cogfun.testing.tiny import _write_json",
        "from cogfun.common import _private_module",
        "import cogfun.common._helpers",
        "from bench.memory import _rss",
        "from cogfun.testing import tiny\ntiny._seeded(0, 'vae')",
        "import cogfun.testing.tiny\ncogfun.testing.tiny._MODEL_INDEX",
        "from bench import memory as m\nm._warm_up",
    ]
    for source in caught:
        assert check(source), source
    assert check("import sys\nsys.path.insert(0, 'x')", bench=False)
    fine = [
        "from cogfun.testing.tiny import write_tiny_model",
        "from bench.models import build_vae\nimport torch\ntorch._C",
        "from cogfun.testing import tiny\ntiny.write_json\ntiny.__file__",
        "import zarr.storage._local as local\nlocal._put",  # not cogfun's
        "import sys\nsys.executable",
        "class A:\n    def f(self):\n        return self._x",
    ]
    for source in fine:
        assert not check(source), (source, check(source))
    assert not check("from train_support import make_store", bench=False)
    # Tests, too, use only public names of the product.
    assert check("from cogfun.common.sampling import _noise_aug", bench=False)
    assert check("from cogfun.common import store\nstore._x", bench=False)
