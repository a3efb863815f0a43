"""A diverging run is visible and stopped: non-finite losses and gradient norms are written to
metrics.jsonl as "nan"/"inf" (still standard JSON), marked and counted; their updates are skipped;
after --max-nonfinite-steps in a row `cogfun train` stops with exit code 3 and a final checkpoint of
the last finite weights, which resumes."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from cogfun.train import loop
from cogfun.train.divergence import EXIT_DIVERGED, DivergenceGuard, finite
from cogfun.train.loss import compute_loss
from cogfun.train.metrics import encode_row, read_metrics, truncate_metrics
from safetensors.torch import load_file
from train_support import make_store, run_in_process, transformer_only_model
from typer.testing import CliRunner

CLI_BASE = (
    "--train-batch-size 2 --dataloader-num-workers 0 --checkpointing-steps 2 --lr-warmup-steps 2 "
    "--learning-rate 1e-3 --mixed-precision no --no-gradient-checkpointing --report-to none "
    "--progress none --no-use-came"
).split()


def strict_rows(path):
    """metrics.jsonl parsed as standard JSON (NaN/Infinity tokens are refused)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_guard_marks_counts_and_trips_after_the_limit_in_a_row(tmp_path):
    guard = DivergenceGuard(3, count=2)  # a resumed run: 2 non-finite steps before
    rows = [
        {"step": 1, "loss": 0.5, "grad_norm": 0.1},
        {"step": 2, "loss": math.nan, "grad_norm": math.nan},
        {"step": 3, "loss": 0.4, "grad_norm": math.inf},  # finite loss, overflowing gradients
        {"step": 4, "loss": 0.4, "grad_norm": 0.2},  # the streak ends
        {"step": 5, "loss": math.inf, "grad_norm": 0.2},  # updated: its gradients were finite
        {"step": 6, "loss": math.nan, "grad_norm": None},
        {"step": 7, "loss": math.nan, "grad_norm": math.nan},
    ]
    tripped = []
    for row in rows:
        guard.observe(row)
        tripped.append(guard.tripped)
    assert [r["nonfinite"] for r in rows] == [False, True, True, False, True, True, True]
    assert [r["update_skipped"] for r in rows] == [False, True, True, False, False, False, True]
    assert [r["nonfinite_steps"] for r in rows] == [2, 3, 4, 4, 5, 6, 7]
    assert tripped == [False] * 6 + [True]
    assert guard.streak == 3 and guard.first_bad_step == 5
    saved = guard.stop_message(7, tmp_path, saved=True)
    assert saved.startswith(
        "training stopped at step 7: the loss or gradient norm was not finite for 3 steps in a "
        f"row (steps 5-7; --max-nonfinite-steps 3; the values are in {tmp_path / 'metrics.jsonl'})."
    )
    assert "The weights are finite (2 of these steps had finite gradients and were applied" in saved
    assert f"saved as {tmp_path / 'checkpoint-7'}: resuming goes on past these batches" in saved
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    lost = guard.stop_message(7, tmp_path, saved=False)
    assert lost.endswith(
        "The weights are not finite, so no checkpoint was saved at the stop; the last one before "
        f"them is {tmp_path / 'checkpoint-4'}."
    )
    # 0 never stops; under fp16 loss scaling an overflowing gradient alone is the scaler's business.
    never, scaled = DivergenceGuard(0), DivergenceGuard(1, loss_scaled=True)
    for _ in range(50):
        never.observe({"step": 1, "loss": math.nan, "grad_norm": math.nan})
    scaled.observe({"step": 1, "loss": 0.3, "grad_norm": math.inf})
    assert not never.tripped and never.count == 50
    assert not scaled.tripped and scaled.count == 0
    scaled.observe({"step": 2, "loss": math.nan, "grad_norm": math.inf})
    assert scaled.tripped and scaled.count == 1
    assert finite(None) and finite(1.0) and not finite(-math.inf)


def test_metrics_lines_stay_standard_json_and_read_back_as_floats(tmp_path):
    row = {"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "x": [-math.inf, 1.0]}
    line = encode_row(row)
    assert json.loads(line) == {
        "step": 3,
        "loss": "nan",
        "grad_norm": "inf",
        "lr": 1e-3,
        "x": ["-inf", 1.0],
    }
    path = tmp_path / "metrics.jsonl"
    path.write_text(line + "\n" + encode_row({"step": 4, "loss": 0.5}) + "\n")
    assert truncate_metrics(path, 3) == 1
    (back,) = read_metrics(path)
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["lr"] == 1e-3
    assert strict_rows(path)[0]["loss"] == "nan"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    return make_store(root), transformer_only_model(root, tiny_model_dir)


def poison_losses(monkeypatch, bad: dict[int, float]):
    """compute_loss whose n-th call (1-based; the n-th step without accumulation) returns the
    loss times bad[n] (NaN or inf), so its gradients are non-finite too."""
    calls = [0]

    def poisoned(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad:
            out.loss = out.loss * bad[calls[0]]
        return out

    monkeypatch.setattr(loop, "compute_loss", poisoned)


def masters(checkpoint):
    return load_file(checkpoint / "master_weights.safetensors")


def test_a_diverging_run_stops_with_a_good_checkpoint_that_resumes(shared, tmp_path, monkeypatch):
    from cogfun.app.cli import app

    store, model = shared
    out = tmp_path / "out"
    poison_losses(monkeypatch, {4: math.inf, **{n: math.nan for n in range(5, 40)}})
    args = ["train", "--latents", store, "--model", model, "--output-dir", out, *CLI_BASE]
    args += ["--max-train-steps", "20", "--max-nonfinite-steps", "3"]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, [str(a) for a in args])
    assert res.exit_code == EXIT_DIVERGED == 3, res.output
    message = res.output.replace("\n", " ")
    assert (
        "cogfun train: training stopped at step 6: the loss or gradient norm was not finite for "
        "3 steps in a row (steps 4-6; --max-nonfinite-steps 3;" in message
    )
    assert f"the weights are those after step 3, saved as {out / 'checkpoint-6'}" in message

    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows[:3])
    assert [(r["loss"], r["grad_norm"]) for r in rows[3:]] == [("inf", "nan")] + [("nan",) * 2] * 2
    assert [r["nonfinite"] for r in rows] == [False] * 3 + [True] * 3
    assert [r["update_skipped"] for r in rows] == [False] * 3 + [True] * 3
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 2, 3]

    # Saved: 2 (before), 4 (inside the streak: its weights checked finite) and 6 (at the stop).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    final, at4 = masters(out / "checkpoint-6"), masters(out / "checkpoint-4")
    at2 = masters(out / "checkpoint-2")
    assert all(torch.isfinite(v).all() for v in final.values())
    # The updates of steps 4-6 were skipped: the weights are still those after step 3.
    assert all(torch.equal(final[k], at4[k]) for k in final)
    assert not all(torch.equal(final[k], at2[k]) for k in final)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6

    # Resumed without the fault, the run goes on from checkpoint-6 and keeps the count.
    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    run_in_process(latents=store, model=model, output_dir=out, max_train_steps=8)
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows[6:])
    assert [r["nonfinite_steps"] for r in rows[6:]] == [3, 3]
    after = masters(out / "checkpoint-8")
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not all(torch.equal(after[k], final[k]) for k in final)


def test_a_negative_limit_is_refused_naming_the_option(shared, tmp_path):
    from cogfun.app.cli import app

    store, model = shared
    args = ["train", "--latents", store, "--model", model, "--output-dir", tmp_path, *CLI_BASE]
    args += ["--max-nonfinite-steps", "-1"]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, [str(a) for a in args])
    assert res.exit_code == 2
    assert "--max-nonfinite-steps must be >= 0 (0: never stop; got -1)" in res.output
    assert not (tmp_path / "metrics.jsonl").exists()


POISONED_CLI = """
import math
from cogfun.train import loop

real, calls = loop.compute_loss, [0]


def poisoned(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] >= {first}:
        out.loss = out.loss * math.nan
    return out


loop.compute_loss = poisoned
from cogfun.app.cli import main

main()
"""


@pytest.mark.slow
def test_under_deepspeed_the_engine_skips_and_the_run_stops(shared, tmp_path):
    """ZeRO-2 bf16 (config/zero_stage2_config.json), one process: DeepSpeed's own overflow check
    drops the update and reports an infinite norm; the guard stops the run the same way."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from cogfun.testing.runs import train_args
    from train_support import cli_env

    store, model = shared
    out = tmp_path / "out"
    script = tmp_path / "poisoned_cogfun.py"
    script.write_text(POISONED_CLI.format(first=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Path(__file__).resolve().parents[1] / "config" / "zero_stage2_config.json"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    head = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1"]
    head += ["--main_process_port", str(port), "--dynamo_backend", "no", "--use_deepspeed"]
    head += ["--deepspeed_config_file", str(config), "--mixed_precision", "bf16"]
    args = train_args(store, model, out, max_train_steps=10, mixed_precision="bf16")
    args += ["--max-nonfinite-steps", "3"]
    res = subprocess.run(
        [*head, str(script), *args], env=cli_env(1), capture_output=True, text=True, timeout=600
    )
    # accelerate launch exits 1 when its process fails; the process's own code is in its report.
    assert res.returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_DIVERGED}\b", res.stderr), (
        res.stderr[-6000:]
    )
    assert "training stopped at step 6" in res.stderr and "steps 4-6" in res.stderr
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows[3:]] == ["nan"] * 3
    assert [r["grad_norm"] for r in rows[3:]] == ["inf"] * 3  # DeepSpeed's overflow report
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 2, 3]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    final = load_file(next((out / "checkpoint-6" / "transformer").glob("*.safetensors")))
    at4 = load_file(next((out / "checkpoint-4" / "transformer").glob("*.safetensors")))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert all(torch.equal(final[k], at4[k]) for k in final)
