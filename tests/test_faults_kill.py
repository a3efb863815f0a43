"""The precompute kill matrix, reduced: `cogfun precompute` dies (as SIGKILL: no cleanup) in the
middle of a staged sample chunk write, right after a done flag, in the middle of sealing a shard,
between a shard's arrays and its checksum shard, and before finalize's last write; one rank
of an `accelerate launch` run dies too. Each time nothing written reads as damaged, and a rerun
gives a store equal to an uninterrupted run's: 0 lost, 0 duplicated, the same digest.
`python -m bench.faults` runs the full matrix (seeded random points and times)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.faults import KILLED, hook_env, read_log, write_kind
from cogfun.testing.runs import (
    OPTS,
    cogfun,
    fault_dataset,
    launch,
    precompute_args,
    resume_and_compare,
    snapshot,
    write_log_of_a_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """Dataset, an uninterrupted run's snapshot and the list of its zarr writes, in order."""
    root = tmp_path_factory.mktemp("kill")
    data = fault_dataset(root / "data")
    ref_out, log = root / "ref.zarr", root / "ref.log"
    assert write_log_of_a_run(ref_out, log, data, tiny_model_dir) == 0
    writes = [(n, write_kind(path)) for n, _, path in read_log(log)]
    return root, data, snapshot(ref_out), writes


def _rerun(data: Path, model: Path, out: Path):
    return lambda: run(PrecomputeConfig(data=data, model=model, out=out, **OPTS))


def _first(writes: list[tuple[int, str]], kind: str, last: bool = False) -> int:
    found = [n for n, k in writes if k == kind]
    assert found, kind
    return found[-1] if last else found[len(found) // 2]


POINTS = {  # mode, the kind of write it hits (the middle one of that kind, or the last)
    "torn sample chunk": ("kill-torn", "sample chunk (latents)", False),
    "after a done flag": ("kill-after", "done flag (checksum)", False),
    "torn shard seal": ("kill-torn", "sealed shard (latents)", False),
    "sealed arrays, not yet the checksum shard": ("kill-before", "sealed shard (checksum)", False),
    "before finalize completes": ("kill-before", "root attributes (finalize)", True),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_a_write_then_resume_is_identical(setup, tiny_model_dir, point):
    root, data, ref, writes = setup
    mode, kind, last = POINTS[point]
    n = _first(writes, kind, last)
    name = "".join(c if c.isalnum() else "-" for c in point)  # one store per point
    out, log = root / f"{name}.zarr", root / f"{name}.log"
    args = precompute_args(data, tiny_model_dir, out)
    res = cogfun(args, hook_env(root, f"{mode}:{n}", log=log))
    assert res.returncode == KILLED, res.stderr[-2000:]
    ((hit, _, path),) = read_log(log)
    assert hit == n and write_kind(path) == kind
    partial = open_store(out, allow_incomplete=True)
    assert partial.status == "writing"  # died before `complete`: training refuses it
    result = resume_and_compare(out, ref, _rerun(data, tiny_model_dir, out))
    assert result == {"torn": 0, "rerun_code": 0, "lost": 0, "duplicated": 0, "identical": True}


def test_one_of_two_processes_killed_then_resume_is_identical(setup, tiny_model_dir):
    """Rank 1 dies right after staging its 2nd sample's latents (that sample half staged, no done
    flag yet); the launcher stops rank 0; one process then finishes the store."""
    root, data, ref, _ = setup
    out, log = root / "two.zarr", root / "two.log"
    args = precompute_args(data, tiny_model_dir, out)
    res = launch(args, hook_env(root, "kill-after:2:/latents/.staged/", rank=1, log=log))
    assert res.returncode != 0, res.stderr[-2000:]
    ((hit, _, path),) = read_log(log)
    assert hit == 2 and write_kind(path) == "sample chunk (latents)"
    assert open_store(out, allow_incomplete=True).status == "writing"
    result = resume_and_compare(out, ref, _rerun(data, tiny_model_dir, out))
    assert result == {"torn": 0, "rerun_code": 0, "lost": 0, "duplicated": 0, "identical": True}
