"""What a run reports: `metrics.jsonl`, `loss.png` and accelerate's trackers (TensorBoard).

`output_dir/metrics.jsonl` holds one JSON object per optimizer step and nothing else; `step` is the
1-based global step (the N of `checkpoint-N`). A resumed run first drops the rows after the step it
resumes from (they belong to the run that was interrupted), then appends. Only the main process writes.

Every line is standard JSON: a NaN or infinite value (a diverging step's loss or gradient norm, see
`cogfun.train.divergence`) is written as the string "nan", "inf" or "-inf", and `read_metrics`
turns those strings back into floats. The trackers get the float itself (TensorBoard plots NaN/inf).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_row(row: dict[str, Any]) -> str:
    """One metrics line: JSON with non-finite floats as "nan"/"inf"/"-inf" (JSON has no NaN)."""
    return json.dumps(_encode(row), allow_nan=False)


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _NONFINITE[v] if isinstance(v, str) and v in _NONFINITE else v for k, v in row.items()
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(_decode(row))
    return rows


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the rows with step <= last_step (atomically); returns how many were kept."""
    if not path.exists():
        return 0
    kept = [row for row in read_metrics(path) if row["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(encode_row(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


class MetricsLog:
    """Appends one row per optimizer step to metrics.jsonl (main process) and to the trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, resume_step: int) -> None:
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        self._file = None
        self.last_row: dict[str, Any] | None = None  # the last row kept from an earlier run
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            kept = truncate_metrics(self.path, resume_step)
            if kept:
                self.last_row = read_metrics(self.path)[-1]
            if kept:
                log.info(
                    "%s: continuing after step %d (%d rows kept)", self.path, resume_step, kept
                )
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(encode_row(row) + "\n")
            self._file.flush()
        numbers = {
            f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, int | float)
        }
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def start_trackers(accelerator: Accelerator, project: str, config: dict[str, Any]) -> None:
    """Start accelerate's trackers (`--report-to`), logging the config as hyperparameters."""
    if accelerator.log_with in (None, []):
        return
    # TensorBoard's hparams take numbers, strings and booleans only.
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.items()}
    accelerator.init_trackers(project, config=flat)


def plot_loss(metrics_path: Path, out_path: Path) -> Path | None:
    """Write the per-step loss (and a running mean) to a PNG; None when there are no rows."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bad = [r["step"] for r in rows if not math.isfinite(r["loss"])]
    rows = [r for r in rows if math.isfinite(r["loss"])]  # non-finite steps: marked below
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
    for i, step in enumerate(bad):
        ax.axvline(
            step, color="red", lw=0.8, alpha=0.6, label="non-finite loss" if i == 0 else None
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
