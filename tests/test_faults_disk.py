"""Full disk: ENOSPC injected at the store's write layer (every file zarr writes) and at the
failure records, at each kind of write. Precompute stops with a clear message (exit 2: the disk
is full, rerunning resumes); after space is freed the same command finishes a store identical to
an uninterrupted run's."""

from __future__ import annotations

import errno
import os

import pytest
from cogfun.common.store import Location
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.faults import arm, read_log, write_kind
from cogfun.testing.runs import OPTS, compare, fault_dataset, snapshot, write_log_of_a_run

KINDS = [
    "store creation",
    "caption embedding",
    "shared all-masked latent",
    "sample chunk (latents)",
    "done flag (checksum)",
    "sealed shard (latents)",
    "sealed shard (checksum)",
    "caption shard",
    "done index (finalize)",
    "root attributes (finalize)",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("disk")
    data = fault_dataset(root / "data")
    ref, log = root / "ref.zarr", root / "ref.log"
    assert write_log_of_a_run(ref, log, data, tiny_model_dir) == 0
    writes = [(n, write_kind(path)) for n, _, path in read_log(log)]
    return data, snapshot(ref), writes


def _full_then_free(cfg: PrecomputeConfig, capsys, monkeypatch, fail) -> str:
    """Run with the disk 'full' (as `fail` patches it), then with space again; the first run's
    stderr."""
    capsys.readouterr()
    with monkeypatch.context() as m:
        undo = fail(m)
        try:
            assert run(cfg) == 2
        finally:
            if callable(undo):
                undo()
    err = capsys.readouterr().err
    assert run(cfg) == 0
    return err


@pytest.mark.parametrize("kind", KINDS)
def test_disk_full_at_a_store_write_then_rerun_is_identical(
    setup, tiny_model_dir, tmp_path, capsys, monkeypatch, kind
):
    data, ref, writes = setup
    n = [i for i, k in writes if k == kind][0]
    out = tmp_path / "s.zarr"
    cfg = PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)
    err = _full_then_free(
        cfg,
        capsys,
        monkeypatch,
        lambda m: arm(f"enospc:{n}"),
    )
    assert "precompute aborted: the disk is full" in err and "No space left on device" in err
    assert "rerun the same command, it resumes where it stopped" in err
    assert "Traceback" not in err
    assert compare(ref, snapshot(out)) == (0, 0, True)


def test_disk_full_at_a_failure_record_then_rerun_is_identical(
    setup, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    data, ref, _ = setup
    out = tmp_path / "s.zarr"
    real = Location.write

    def full(self, data):
        if self.parent.name == "failures":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    cfg = PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)
    err = _full_then_free(cfg, capsys, monkeypatch, lambda m: m.setattr(Location, "write", full))
    assert "the disk is full" in err and "failures" in err
    assert compare(ref, snapshot(out)) == (0, 0, True)
    assert not [p for p in (out / "failures").iterdir() if not p.name.endswith(".json")]
