"""Non-finite steps: shown, counted, never applied, and a run that keeps producing them is stopped.

A step is *non-finite* when its loss (mean over ranks) or its pre-clip gradient norm is NaN or
infinite. What happens to it:

- Its update is not applied, so the weights and optimizer state stay those of the last finite step.
  Without DeepSpeed cogfun skips `optimizer.step()` and `lr_scheduler.step()` itself (clipping with
  a NaN norm would write NaN into every gradient, and CAME/AdamW would then write it into the
  weights); DeepSpeed's ZeRO optimizer skips such a step itself (its overflow check, which the
  locked DeepSpeed 0.19 runs for bf16 too: `"bf16": {"check_grad_overflow": true}` is its default;
  older releases did not, which is why saves check the weights), and so does fp16's loss scaler,
  which must still see the step to lower its scale. The EMA is not stepped either.
- metrics.jsonl shows it: `loss`/`grad_norm` hold the strings "nan", "inf" or "-inf" (JSON has no
  such numbers), `nonfinite` is true, `update_skipped` says whether the update was dropped and
  `nonfinite_steps` counts the run's non-finite steps so far (continued across resumes).
  TensorBoard gets the NaN/inf values themselves.
- After `--max-nonfinite-steps` of them in a row (0: never) the run stops: the weights then are
  those before the streak, so a final checkpoint is saved at the stopping step (a checkpoint is
  only ever saved, there or periodically during a streak, after checking that every weight is
  finite), and `cogfun train` exits non-zero naming it.

With fp16 loss scaling an overflowing gradient is the scaler's routine signal (it skips the step
and halves the scale, several times in a row at the start of a run), so there only a non-finite
loss counts towards the streak.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from cogfun.train import distributed
from cogfun.train.checkpoint import complete_checkpoints
from torch import nn

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3  # `cogfun train`'s exit code when the guard stopped the run (2: refused as asked)


class TrainingDiverged(Exception):
    """The loss or gradient norm stayed non-finite for `--max-nonfinite-steps` steps in a row."""


def finite(value: float | None) -> bool:
    """False for NaN and +-inf; None (no norm measured this step) counts as finite."""
    return value is None or math.isfinite(value)


def skip_update(accelerator: Accelerator, grad_norm: float | None) -> bool:
    """Whether cogfun must not call optimizer/LR-scheduler step for this micro-step: a sync step
    with a non-finite norm, unless DeepSpeed or a loss scaler is there to skip it itself."""
    if finite(grad_norm) or not accelerator.sync_gradients:
        return False
    return not distributed.is_deepspeed(accelerator) and accelerator.scaler is None


def weights_finite(accelerator: Accelerator, params: list[nn.Parameter]) -> bool:
    """Every rank's (local shard of the) trained weights is finite; every rank must call it."""
    ok = True
    with torch.no_grad():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2's DTensor shards
            if local.numel() and not bool(torch.isfinite(local).all()):
                ok = False
                break
    return all(distributed.gather_ints(accelerator, int(ok)))


class DivergenceGuard:
    """Watches the metrics rows of a run: marks and counts non-finite steps, says when to stop."""

    def __init__(self, limit: int, *, loss_scaled: bool = False, count: int = 0) -> None:
        self.limit = limit
        self.loss_scaled = loss_scaled
        self.count = count  # non-finite steps of the run so far
        self.streak = 0  # of them in a row, ending at the last step seen
        self.first_bad_step: int | None = None
        self.applied_in_streak = 0  # streak steps whose update went in (finite gradients)

    @classmethod
    def for_run(cls, accelerator: Accelerator, limit: int, last_row: dict[str, Any] | None):
        """The guard of a run; a resumed run continues the count of the metrics it keeps."""
        count = int((last_row or {}).get("nonfinite_steps", 0) or 0)
        return cls(limit, loss_scaled=accelerator.mixed_precision == "fp16", count=count)

    def observe(self, row: dict[str, Any]) -> None:
        """Add `nonfinite`, `update_skipped` and `nonfinite_steps` to one step's metrics row."""
        loss_bad = not finite(row.get("loss"))
        norm_bad = not finite(row.get("grad_norm"))
        bad = loss_bad or (norm_bad and not self.loss_scaled)
        row["nonfinite"] = bad
        row["update_skipped"] = norm_bad
        if bad:
            self.count += 1
            self.streak += 1
            if self.streak == 1:
                self.first_bad_step = int(row["step"])
                self.applied_in_streak = 0
            self.applied_in_streak += not norm_bad
            log.warning(
                "step %d: loss %s, gradient norm %s; %s (%d non-finite step(s) in a row%s)",
                row["step"],
                row.get("loss"),
                row.get("grad_norm"),
                "update skipped" if norm_bad else "update applied (the gradients were finite)",
                self.streak,
                f", the run stops at {self.limit}" if self.limit else "",
            )
        else:
            self.streak = 0
            self.first_bad_step = None
        row["nonfinite_steps"] = self.count

    @property
    def tripped(self) -> bool:
        return self.limit > 0 and self.streak >= self.limit

    def may_save(self, accelerator: Accelerator, params: list[nn.Parameter]) -> bool:
        """Whether a checkpoint may be saved now (every rank must call it): always outside a
        streak; inside one only when the weights are finite (a poisoned checkpoint could push a
        good one out under --checkpoints-total-limit)."""
        if self.streak == 0:
            return True
        if weights_finite(accelerator, params):
            return True
        log.warning("not saving a checkpoint: the trained weights are not finite")
        return False

    def stop_message(self, step: int, output_dir: Path, saved: bool) -> str:
        """What `cogfun train` reports when the guard stopped the run at `step`."""
        first = self.first_bad_step if self.first_bad_step is not None else step
        head = (
            f"training stopped at step {step}: the loss or gradient norm was not finite for "
            f"{self.streak} steps in a row (steps {first}-{step}; --max-nonfinite-steps "
            f"{self.limit}; the values are in {output_dir / 'metrics.jsonl'})."
        )
        if saved:
            kept = (
                f"Their updates were skipped, so the weights are those after step {first - 1}"
                if self.applied_in_streak == 0
                else f"The weights are finite ({self.applied_in_streak} of these steps had finite "
                "gradients and were applied; the others were skipped)"
            )
            return (
                f"{head} {kept}, saved as {output_dir / f'checkpoint-{step}'}: resuming goes on "
                "past these batches; if it diverges again, resume from an earlier checkpoint "
                "with a lower --learning-rate or --max-grad-norm."
            )
        earlier = [path for n, path in complete_checkpoints(output_dir) if n < first]
        where = f"the last one before them is {earlier[-1]}" if earlier else "none was saved before"
        return (
            f"{head} The weights are not finite, so no checkpoint was saved at the stop; {where}."
        )
