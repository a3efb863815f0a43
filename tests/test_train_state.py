"""`TrainingState`, the one owner of a run's step and data position: what it writes into
trainer_state.json, what it takes back (checkpoints as cogfun has always written them), and what it
refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cogfun.train.data import BucketBatchSampler
from cogfun.train.state import TrainingState

SAMPLER = BucketBatchSampler({"a": np.arange(9), "b": np.arange(5)}, 2, seed=5, num_replicas=2)


def fresh() -> TrainingState:
    return TrainingState(world_size=2, batches_per_epoch=len(SAMPLER), order=SAMPLER.order())


def test_state_dict_is_trainer_state_json_layout_and_round_trips():
    state = fresh()
    for _ in range(3):
        state.took_batch()
    state.next_epoch()
    state.took_batch()
    for _ in range(4):
        state.finished_step()
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved == {
        "global_step": 4,
        "epoch": 1,
        "batches_done": 1,
        "world_size": 2,
        "sampler": {
            "epoch": 1,
            "batches_done": 1,
            "seed": 5,
            "batch_size": 2,
            "num_replicas": 2,
            "num_samples": 14,
        },
    }
    back = fresh()
    back.load_state_dict(saved)
    assert back == state and back.position == (1, 1)


def test_a_checkpoint_written_before_resumes():
    """trainer_state.json as cogfun wrote it before the state had one owner (the sampler's entry
    from `BucketBatchSampler.state_dict`, the stores, version and config beside the position)."""
    written = {
        "global_step": 6,
        "epoch": 1,
        "batches_done": 1,
        "world_size": 2,
        "sampler": {**SAMPLER.state_dict(1), "epoch": 1},
        "store": "/data/s.zarr",
        "store_fingerprint": "abc",
        "cogfun_version": "0.1.0",
        "config": {"seed": 5},
    }
    state = fresh()
    state.load_state_dict(written)
    assert (state.global_step, state.position, state.world_size) == (6, (1, 1), 2)
    bare = fresh()  # no `sampler` entry: the position alone
    bare.load_state_dict(
        {k: written[k] for k in ("global_step", "epoch", "batches_done", "world_size")}
    )
    assert bare == state


def test_another_order_or_a_position_outside_the_epoch_is_refused_and_changes_nothing():
    saved = fresh().state_dict()
    saved["sampler"]["seed"], saved["sampler"]["batch_size"] = 6, 3
    state = fresh()
    with pytest.raises(ValueError, match=r"data order \(seed: saved 6, now 5, batch_size: saved 3"):
        state.load_state_dict({**saved, "global_step": 9})
    assert state == fresh()
    past = {**fresh().state_dict(), "batches_done": len(SAMPLER) + 1}
    with pytest.raises(ValueError, match=f"batches_done {len(SAMPLER) + 1} is outside 0..4"):
        state.load_state_dict(past)
    assert state == fresh()


def test_epoch_ended_marks_the_step_that_took_an_epochs_last_batch():
    state = fresh()
    ended = []
    for _ in range(len(SAMPLER)):
        state.took_batch()
        ended.append(state.epoch_ended)
    assert ended == [False] * (len(SAMPLER) - 1) + [True]
    state.next_epoch()
    assert state.position == (1, 0) and not state.epoch_ended
    assert not TrainingState(batches_done=3).epoch_ended  # epoch length unknown: never
