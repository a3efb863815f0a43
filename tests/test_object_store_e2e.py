"""A store on S3, end to end, against moto's S3 server on 127.0.0.1 (`cogfun.testing.s3`), started
and stopped by the tests: precompute into it with 2 processes and one of them killed, resumed to a
store equal to a local run's; training from it (2 processes), and with one process step for step
what training from the local store gives;
`cogfun inspect --verify` of it; the server stopped and restarted mid-training (retries, then the
same losses as an uninterrupted run), and stopped for good (one clear error naming the object)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cogfun.common.store import location, open_store
from cogfun.testing.faults import BIN, hook_env, read_log, write_kind
from cogfun.testing.runs import (
    OPTS,
    compare,
    launch,
    precompute_args,
    snapshot,
    train_args,
    train_compare,
)

pytestmark = pytest.mark.slow

TRAIN = dict(max_train_steps=6, checkpointing_steps=3, dataloader_num_workers=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, s3_server):
    """A local reference store, and the same dataset precomputed into S3 by 2 processes, one of
    which is killed after staging part of a sample; then resumed."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run
    from cogfun.testing.runs import fault_dataset

    if not s3_server.running:
        s3_server.start()
    root = tmp_path_factory.mktemp("s3e2e")
    data = fault_dataset(root / "data")
    ref = root / "ref.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=ref, **OPTS)) == 0
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/runs/latents.zarr"
    options = json.dumps(s3_server.options())
    args = precompute_args(data, tiny_model_dir, url, storage_options=options)
    log = root / "kill.log"
    env = hook_env(root, "kill-after:2:/latents/.staged/", rank=1, log=log)
    killed = launch(args, env)
    assert killed.returncode != 0, killed.stderr[-3000:]
    ((hit, _, path),) = read_log(log)
    assert hit == 2 and path.startswith(url) and write_kind(path) == "sample chunk (latents)"
    partial = open_store(location(url, s3_server.options()), allow_incomplete=True)
    assert partial.status == "writing" and partial.verify() == []  # nothing torn
    # Resumed by one process (in this one: the server thread keeps serving while it runs).
    cfg = PrecomputeConfig(
        data=data, model=tiny_model_dir, out=url, storage_options=options, **OPTS
    )
    assert run(cfg) == 0
    return {"root": root, "data": data, "ref": ref, "url": url, "options": options}


def _store(built, s3_server):
    return location(built["url"], s3_server.options())


def test_precompute_on_s3_killed_and_resumed_equals_local(built, s3_server):
    ref = snapshot(built["ref"])
    got = snapshot(_store(built, s3_server))
    assert compare(ref, got) == (0, 0, True)
    store = _store(built, s3_server)
    keys = sorted(k for k, _ in store.walk())
    assert not [k for k in keys if "/.staged/" in k or k.endswith(".creating")]
    assert "zarr.json" in keys and any(k.startswith("buckets/") for k in keys)
    # Beside the store: the probe files stay, the lease is gone with the writer.
    beside = store.parent.listdir()
    assert ".latents.zarr.probes" in beside and ".latents.zarr.lock" not in beside


def test_inspect_verify_names_a_damaged_sample_on_s3(built, s3_server):
    base = [str(BIN / "cogfun"), "inspect", built["url"], "--storage-options", built["options"]]
    ok = subprocess.run([*base, "--verify", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads(ok.stdout)
    assert report["status"] == "complete" and report["damaged"] == []
    assert report["digest"] == snapshot(built["ref"]).digest
    store = _store(built, s3_server)
    shard = next(
        store / k for k, _ in store.walk() if "/latents/c." in f"/{k}" and k.startswith("buckets/")
    )
    original = shard.read()
    damaged = bytearray(original)
    damaged[len(damaged) // 3] ^= 0xFF  # inside a chunk: its sample's checksum fails
    shard.write(bytes(damaged))
    try:
        bad = subprocess.run(
            [*base, "--verify", "--json"], capture_output=True, text=True, timeout=120
        )
    finally:
        shard.write(original)
    assert bad.returncode != 0
    found = json.loads(bad.stdout)["damaged"]
    assert len(found) == 1, found
    assert found[0]["bucket"] == shard.parent.parent.name


def _train(built, model, store, out: Path, processes: int = 1, options: str | None = None, **kw):
    """`cogfun train` on `store` (its storage options when it is on S3): with 2 processes run to
    the end (CompletedProcess), with 1 started (Popen) for the caller to watch."""
    args = train_args(store, model, out, **{**TRAIN, **kw})
    if str(store).startswith("s3://"):
        args += ["--storage-options", options or built["options"]]
    env = hook_env(built["root"])
    if processes > 1:
        return launch(args, env, processes=processes)
    return subprocess.Popen(
        [str(BIN / "cogfun"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_train_two_processes_from_s3(built, tiny_model_dir, tmp_path):
    """Both ranks read their share from S3, every sample checked against its checksum on the
    way (what training from the local copy gives, step for step, is compared in the restart test
    below with one process)."""
    from cogfun.train.metrics import read_metrics

    remote = _train(built, tiny_model_dir, built["url"], tmp_path / "s3", processes=2)
    assert remote.returncode == 0, remote.stderr[-3000:]
    rows = read_metrics(tmp_path / "s3" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, TRAIN["max_train_steps"] + 1))
    assert all(r["world_size"] == 2 and min(r["rank_samples"]) > 0 for r in rows)
    assert (tmp_path / "s3" / "checkpoint-6" / "transformer").is_dir()


def _metrics_steps(out: Path) -> int:
    from cogfun.train.metrics import read_metrics

    path = out / "metrics.jsonl"
    return len(read_metrics(path)) if path.is_file() else 0


# The outage starts at a chosen read, not at a chosen time: the loader reads ahead and keeps small
# shards, so when it next asks the server is not known. 6 steps read 15 latents chunks (what
# `outages == 1` checks); the 9th is the 5th batch's, asked for once step 3 has taken its batch
# (one worker, 2 batches ahead).
OUTAGE = (9, "/latents/c.")


def test_server_restart_mid_training_retries_then_same_losses(
    built, tiny_model_dir, s3_server, tmp_path
):
    ref = _train(built, tiny_model_dir, built["ref"], tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    out = tmp_path / "s3"
    outages = s3_server.outages
    s3_server.outage_at(*OUTAGE, seconds=1.5)  # then every request fails to connect for 1.5 s
    proc = _train(built, tiny_model_dir, built["url"], out)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        s3_server.outage_at(0)  # not left armed for another test
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert s3_server.outages == outages + 1
    assert "trying again" in err  # the outage was met, and retried
    assert train_compare(tmp_path / "ref", out) == (0, 0, True)


def test_server_gone_mid_training_is_one_clear_error(built, tiny_model_dir, s3_server, tmp_path):
    out = tmp_path / "s3"
    options = json.dumps(s3_server.options(retries=2, retry_backoff_s=0.05))
    s3_server.outage_at(*OUTAGE, seconds=None)  # stopped for good
    proc = _train(built, tiny_model_dir, built["url"], out, options=options)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        s3_server.outage_at(0)
        if proc.poll() is None:
            proc.kill()
        if not s3_server.running:
            s3_server.start()
    assert proc.returncode not in (0, None)
    # One error naming the object, after the 2 attempts the options allow: cogfun's own requests
    # say "failed 2 times"; zarr's (an array's metadata opened lazily) say obstore's "after 1
    # retries".
    last = [line for line in err.splitlines() if line.startswith("cogfun train: ")]
    assert len(last) == 1 and built["url"] in last[0], err[-3000:]
    assert "failed 2 times" in last[0] or "after 1 retries" in last[0], last[0]
    assert 2 <= _metrics_steps(out) < TRAIN["max_train_steps"]
