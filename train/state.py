"""Where a training run stands: the one owner of its step and data position.

`TrainingState` holds the optimizer step, the epoch and the batches this rank has taken from it.
The training loop advances it; the loaders start every epoch pass where it says
(`EpochPasses.follow`); a checkpoint writes `state_dict()` into trainer_state.json and a resume
reads it back with `load_state_dict()`. Neither the sampler nor the loaders keep a position of
their own for training: the sampler's `set_epoch`/`set_position` are for iterating it (or a loader)
by hand, and a loader's read-ahead stream only remembers where it is, to know when a pass continues it.

No random-number state is kept here, as before: every micro-step seeds its own generator from
(seed, rank, step, micro-step) (`cogfun.train.picks.step_seed`), so the step and the position are all
a resume needs besides the weights and the optimizer; accelerate's `save_state` still writes its
`random_states_<rank>.pkl` beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ORDER_KEYS = ("seed", "batch_size", "num_replicas", "num_samples")  # what fixes the batch order


def order_mismatch(saved: Mapping[str, Any], now: Mapping[str, int]) -> str | None:
    """The differences between a saved data order and this run's (`ORDER_KEYS` present in both),
    as text; None when the saved position means the same batches now."""
    diff = [
        f"{k}: saved {int(saved[k])}, now {now[k]}"
        for k in ORDER_KEYS
        if k in saved and k in now and int(saved[k]) != now[k]
    ]
    return ", ".join(diff) or None


@dataclass
class TrainingState:
    """The optimizer step and the data position of one rank, enough (with the checkpoint's weights
    and optimizer) to resume exactly.

    `batches_done` counts the batches this rank has taken from `epoch` (every rank takes the same
    number: the sampler gives them equal shares). `batches_per_epoch` and `order` describe the data
    the position is in (`len(sampler)` and `BucketBatchSampler.order()`): a saved position is only
    taken back into the same order.
    """

    world_size: int = 1
    batches_per_epoch: int = 0  # 0: not known, no range check
    order: dict[str, int] = field(default_factory=dict)
    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches done in it): where the next batch comes from."""
        return self.epoch, self.batches_done

    @property
    def epoch_ended(self) -> bool:
        """The last batch taken was the epoch's last (the next one starts the next epoch)."""
        return 0 < self.batches_per_epoch <= self.batches_done

    def took_batch(self) -> None:
        self.batches_done += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0

    def finished_step(self) -> None:
        self.global_step += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain ints (JSON), in trainer_state.json's layout: the step and position at the top
        level, and under `sampler` the position again with the order it is a position in."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "world_size": self.world_size,
            "sampler": {"epoch": self.epoch, "batches_done": self.batches_done, **self.order},
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Take back a saved state (any trainer_state.json cogfun has written: the `sampler` entry,
        when there, says which order the position is in). Raises ValueError, changing nothing,
        when that order differs from this run's or the position is outside an epoch."""
        mismatch = order_mismatch(saved.get("sampler", {}), self.order)
        if mismatch:
            raise ValueError(f"cannot resume the saved data order ({mismatch})")
        done = int(saved["batches_done"])
        if self.batches_per_epoch and not 0 <= done <= self.batches_per_epoch:
            raise ValueError(
                f"batches_done {done} is outside 0..{self.batches_per_epoch} (batches per rank "
                "per epoch)"
            )
        self.global_step = int(saved["global_step"])
        self.epoch = int(saved["epoch"])
        self.batches_done = done
        self.world_size = int(saved["world_size"])
