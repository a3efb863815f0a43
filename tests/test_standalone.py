"""The repository stands alone: no file a user gets cites a document they do not have (the design
notes, reference and benchmark write-ups the project was built from) or a path on the machine it was
written on. Facts from those belong in docs/ or tests/golden/README.md, cited there; the original's
behaviour is cited by its public source (the CogVideoX-Fun repository's files)."""

from __future__ import annotations

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
