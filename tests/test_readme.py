"""The README stays true: its option tables are the ones the configs generate, and its set-up and
test commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

from cogfun.app.options import readme_options_block

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- options:start -->\n", "<!-- options:end -->"


def test_readme_option_tables_match_the_configs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(START, 1)[1].split(END, 1)[0]
    expected = readme_options_block()
    assert block.strip() == expected.strip(), (
        "README.md option tables are stale; replace the block between the options markers with:\n"
        "python -c 'from cogfun.app.options import readme_options_block as b; print(b())'"
    )


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = "-c requirements/lock.txt -e '.[dev]'"
    assert f"pip install {install}" in readme and f"pip install -q {install}" in ci
    assert "python -m pytest" in readme and "python -m pytest -q" in ci
