"""Precompute across processes: two ranks under `accelerate launch`, and `kill -9` then resume.
Both must give a store whose digest equals an uninterrupted single-process run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cogfun.common.decode import probe
from cogfun.common.store import StoreError, open_store
from cogfun.precompute import headers, plan
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.metadata import read_metadata
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset

pytestmark = pytest.mark.slow

# One thread per process in every run: bitwise equality is promised for equal thread counts.
OPTS = dict(
    image_sample_size=128,
    video_sample_size=64,
    token_sample_size=64,
    video_sample_n_frames=17,
    variants_per_sample=3,
    vae_mini_batch=2,
    shard_samples=4,  # several shards a bucket, so both processes own and seal some
    threads=1,
    decode_workers=0,
    progress="log",
)
BIN = Path(sys.executable).parent


def _flags(data: Path, model: Path, out: Path, **kw) -> list[str]:
    opts = {**OPTS, **kw}
    args = ["--data", str(data), "--model", str(model), "--out", str(out)]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("procs") / "data"
    make_sample_dataset(root, n_videos=6, n_images=3, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(dataset, tiny_model_dir, tmp_path_factory) -> tuple[str, int, Path]:
    """Digest, sample count and path of an uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert run(PrecomputeConfig(data=dataset, model=tiny_model_dir, out=out, **OPTS)) == 0
    r = open_store(out)
    return r.digest(), sum(len(i.slots) for i in r.buckets.values()), out


def _shards(store: Path) -> dict[str, bytes]:
    """Every sealed shard file (per-sample arrays and captions), by path inside the store."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("c.*"))
        if p.parent.name in ("latents", "masks", "masked_latents", "all_masked", "checksum")
        or p.parent.name == "embeddings"
    }


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_two_processes_equal_one(dataset, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "two.zarr"
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(29500 + os.getpid() % 1000)]
    cmd = [*launch, str(BIN / "cogfun"), "precompute", *_flags(dataset, tiny_model_dir, out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # Each rank saw a world of 2 and stored its share of the chunks.
    stored = {
        int(m[1]): int(m[2])
        for m in re.finditer(r"process (\d) of 2: stored (\d+) samples", res.stderr)
    }
    assert set(stored) == {0, 1} and min(stored.values()) > 0
    sealed = [int(m[1]) for m in re.finditer(r"(\d+) shard files sealed", res.stderr)]
    assert len(sealed) == 2 and min(sealed) > 0, sealed  # each process sealed its own shards
    # Each rank read the headers of its own share of the files, none all of them.
    probed = {
        int(m[1]): (int(m[2]), int(m[3]), int(m[4]))
        for m in re.finditer(
            r"process (\d) of 2: header pass: (\d+) files in this share, (\d+) probed, "
            r"(\d+) from the cache",
            res.stderr,
        )
    }
    assert set(probed) == {0, 1}, res.stderr[-3000:]
    needed = len(headers.needed(read_metadata(dataset / "metadata.json", dataset)))
    assert needed >= 6 and sum(p[1] for p in probed.values()) == needed
    assert all(0 < p[1] < needed and p == (p[1], p[1], 0) for p in probed.values()), probed
    assert sorted(f.name for f in headers.probe_dir(out).iterdir()) == [
        "rank0-of-2.json",
        "rank1-of-2.json",
    ]
    digest, count, ref = reference
    assert sum(stored.values()) == count
    assert "backend gloo" in res.stderr
    r = open_store(out)
    assert r.attrs["processes"] == 2 and r.attrs["threads"] == 1
    assert r.digest() == digest
    # Byte for byte the single process's shard files: each shard written whole by its owner.
    two, one = _shards(out), _shards(ref)
    assert len(one) > 10 and two == one
    assert not list(out.rglob(".staged/*"))


def _done(out: Path) -> int:
    try:
        r = open_store(out, allow_incomplete=True)
    except (StoreError, OSError, ValueError):  # not created yet, or mid-creation
        return 0
    return sum(len(i.slots) for i in r.buckets.values())


def test_kill_9_then_resume_equals_uninterrupted(
    dataset, tiny_model_dir, reference, tmp_path, monkeypatch
):
    digest, count, _ = reference
    out = tmp_path / "killed.zarr"
    cmd = [str(BIN / "cogfun"), "precompute", *_flags(dataset, tiny_model_dir, out)]
    cmd += ["--decode-workers", "1"]  # a worker process too: the whole group is killed
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        done = 0
        while proc.poll() is None and time.monotonic() < deadline:
            done = _done(out)
            if done >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "precompute finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _done(out)
    assert 2 <= at_kill < count, (at_kill, count)
    partial = open_store(out, allow_incomplete=True)
    assert partial.status == "writing" and partial.verify() == []  # nothing torn
    opened: list[str] = []

    def counting(path, kind):
        opened.append(str(path))
        return probe(path, kind)

    monkeypatch.setattr(plan, "probe", counting)
    assert run(PrecomputeConfig(data=dataset, model=tiny_model_dir, out=out, **OPTS)) == 0
    assert opened == []  # every header came from the killed run's probe cache
    r = open_store(out)
    assert r.status == "complete" and sum(len(i.slots) for i in r.buckets.values()) == count
    assert r.digest() == digest
