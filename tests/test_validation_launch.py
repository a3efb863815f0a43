"""Validation under `accelerate launch`, 2 processes (ZeRO-2, ZeRO-3): videos at the right steps
from every rank, no T5 built in any process (recorded from inside each process by a start-up hook),
and training that computes and resumes exactly as it does without validation. The ZeRO-2 run is
also the suite's two-process DeepSpeed training, save and resume (CAME, fp32 saved from ZeRO's
partitions; the DDP one: tests/test_train_launch.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cogfun.app.cli import app
from cogfun.testing.runs import train_args, train_compare
from safetensors.torch import load_file
from train_support import cli_env, cogfun_cmd, make_store, metrics, validation_videos
from typer.testing import CliRunner

FAST = dict(
    validation_num_frames=5,
    validation_height=32,
    validation_width=32,
    validation_inference_steps=2,
)
CONFIG = Path(__file__).resolve().parents[1] / "config"
T5_LOG_ENV = "COGFUN_TEST_T5_LOG"

# Loaded by every child Python through PYTHONPATH (the accelerate launcher and each rank). Each
# process writes `started` to its own file; when transformers' T5 module is imported its
# T5PreTrainedModel.__init__ (T5EncoderModel, T5Stack, ...) is wrapped to append `built NAME`.
# The module is patched as it loads, so a process that never imports T5 pays nothing.
SITECUSTOMIZE = """import os
if os.environ.get("COGFUN_TEST_T5_LOG"):
    import importlib.abc, sys

    _log = os.path.join(
        os.environ["COGFUN_TEST_T5_LOG"], f"rank-{os.environ.get('RANK', 'none')}-{os.getpid()}.txt"
    )
    _target = "transformers.models.t5.modeling_t5"

    def _note(line):
        with open(_log, "a", encoding="utf-8") as f:
            f.write(line + "\\n")

    def _patch(module):
        cls = module.T5PreTrainedModel
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            _note("built " + type(self).__name__)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        _note("patched " + _target)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _target:
                return None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        break
            else:
                return None
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = run
            return spec

    sys.meta_path.insert(0, _Finder())
    _note("started")
"""


def t5_env(root: Path, log: Path) -> dict[str, str]:
    """cli_env() with the T5 hook on PYTHONPATH, recording into the folder `log`."""
    hooks = root / "_t5_hook"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log.mkdir(parents=True)
    env = cli_env(threads=1)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), env.get("PYTHONPATH")) if p)
    env[T5_LOG_ENV] = str(log)
    return env


def t5_log(log: Path) -> dict[str, list[str]]:
    """Rank ("0", "1", or "none" outside a launch) -> the lines its processes wrote."""
    seen: dict[str, list[str]] = {}
    for path in sorted(log.glob("rank-*.txt")):
        rank = path.stem.split("-")[1]
        seen.setdefault(rank, []).extend(path.read_text(encoding="utf-8").splitlines())
    return seen


def assert_no_t5(log: Path) -> None:
    seen = t5_log(log)
    assert {"0", "1"} <= set(seen), seen  # the hook ran inside both ranks
    for rank, lines in seen.items():
        assert lines[0] == "started", (rank, lines)
        assert not [line for line in lines if line.startswith("built")], (rank, lines)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.getbasetemp())


def _encode(root: Path, model: Path, texts: list[str]) -> Path:
    prompts, out = root / "prompts.txt", root / "emb.safetensors"
    prompts.write_text("".join(t + "\n" for t in texts))
    result = CliRunner().invoke(
        app,
        ["encode-prompts", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
        + ["--negative-prompt", "bad detailed"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def three_prompts(tmp_path_factory, tiny_model_dir):
    """More prompts than ranks do not divide evenly: rank 0 samples two, rank 1 one."""
    return _encode(tmp_path_factory.mktemp("val3"), tiny_model_dir, ["a cat", "a dog", "a bird"])


@pytest.mark.slow
def test_the_t5_hook_records_a_t5_built_in_a_child(tiny_model_dir, tmp_path):
    """The hook the launches below rely on: a process that does build T5 shows up."""
    (tmp_path / "p.txt").write_text("a cat\n")
    log = tmp_path / "t5"
    args = ["encode-prompts", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "p.txt")]
    res = subprocess.run(
        cogfun_cmd() + args + ["--out", str(tmp_path / "e.safetensors")],
        env=t5_env(tmp_path, log),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    (lines,) = t5_log(log).values()
    assert lines[0] == "started" and "built T5EncoderModel" in lines, lines


def _launcher(kind: str) -> tuple[list[str], dict]:
    """`accelerate launch` for 2 processes of `kind`, and the training options it needs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    head = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1"]
    head += ["--main_process_port", str(port), "--dynamo_backend", "no"]
    if kind == "ddp":
        return head + ["--multi_gpu"], {}
    name = "zero_stage2_config.json" if kind == "deepspeed" else "zero_stage3_config.json"
    head += ["--use_deepspeed", "--deepspeed_config_file", str(CONFIG / name)]
    head += ["--mixed_precision", "bf16"]
    if kind == "deepspeed":  # fp32 is assembled from ZeRO-2's fp32 partitions on 2 processes
        return head, dict(mixed_precision="bf16", use_came=True, save_dtype="fp32")
    return head, dict(mixed_precision="bf16", use_came=False)


@pytest.mark.slow
# ZeRO-2 (the seed command's config) takes the rank-split path DDP takes too, so DDP is not run
# again here (its training and resume: tests/test_train_launch.py).
@pytest.mark.parametrize("kind", ["deepspeed", "zero3"])
def test_every_rank_takes_part_under_accelerate_launch(
    kind, store, tiny_model_dir, three_prompts, tmp_path
):
    """Prompt i on rank i % 2 (ZeRO-2, as under DDP), every prompt on both ranks in lockstep (ZeRO-3,
    whose forwards gather the parameters collectively); no hang, no T5 on either rank. Interrupted
    at step 2 and resumed to 3; under ZeRO-3 the run's losses, grad norms and final weights then
    equal those of an uninterrupted 3-step run without validation."""
    head, extra = _launcher(kind)

    def launch(out: Path, steps: int, log: Path, validation: bool) -> str:
        args = train_args(
            store, tiny_model_dir, out, max_train_steps=steps, checkpointing_steps=2, **extra
        )
        if validation:
            args += ["--validation-prompts", str(three_prompts), "--validation-steps", "1"]
            args += ["--validation-epochs", "0"]
            for key, value in FAST.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
        env = t5_env(tmp_path, log)
        if kind == "ddp":
            env["ACCELERATE_USE_CPU"] = "true"
        cmd = head + cogfun_cmd() + args
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-6000:]
        return res.stderr

    out = tmp_path / kind
    first = launch(out, 2, tmp_path / "t5-first", validation=True)
    assert validation_videos(out) == {f"step-{s}/{i:02d}.mp4" for s in (1, 2) for i in (0, 1, 2)}
    rows = metrics(out)
    assert [(r["validation_videos"], r["validation_failed"]) for r in rows] == [(3, 0), (3, 0)]
    assert_no_t5(tmp_path / "t5-first")
    for rank in range(2):  # every process saw the world and did work
        assert f"rank {rank} of 2: 4 samples in this run, at step 2" in first
    assert all(r["world_size"] == 2 and min(r["rank_samples"]) > 0 for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4])  # 2 warm-up steps to 1e-3
    if kind == "deepspeed":
        assert "CAME under DeepSpeed ZeRO-2" in first and "DeepSpeed ZeRO-2, 2 process(es)" in first
        # clip_norm is engine.gradient_clipping(): --max-grad-norm, not accelerate's "auto" 1.0
        assert all(r["clip_norm"] == 0.05 for r in rows)
        assert (out / "checkpoint-2" / "pytorch_model").is_dir()
        assert not (out / "checkpoint-2" / "master_weights.safetensors").exists()
        folder = out / "checkpoint-2" / "transformer"
        saved = load_file(folder / "diffusion_pytorch_model.safetensors")
        assert {v.dtype for v in saved.values()} == {torch.float32}
        # The masters, not the engine's bf16 module upcast: trained values carry fp32 precision.
        assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())

    stderr = launch(out, 3, tmp_path / "t5-resumed", validation=True)
    assert f"resuming from {out / 'checkpoint-2'}" in stderr
    assert validation_videos(out) == {f"step-{s}/{i:02d}.mp4" for s in (1, 2, 3) for i in (0, 1, 2)}
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == rows
    assert resumed[2]["validation_videos"] == 3
    assert "rank 1 of 2: 2 samples in this run, at step 3" in stderr
    assert_no_t5(tmp_path / "t5-resumed")

    assert resumed[2]["lr"] == pytest.approx(1e-3)
    if kind == "deepspeed":
        from diffusers import CogVideoXTransformer3DModel

        final = CogVideoXTransformer3DModel.from_pretrained(out / "checkpoint-3" / "transformer")
        assert final.config.in_channels == 33
        return  # ZeRO-3 below: the resumed run equals an uninterrupted one without validation
    plain = tmp_path / "plain"
    launch(plain, 3, tmp_path / "t5-plain", validation=False)
    assert "validation_s" not in metrics(plain)[0]
    # Steps 1-2 show validation changes nothing, step 3 that the resume is exact.
    ref, got = metrics(plain), metrics(out)
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    assert train_compare(plain, out) == (0, 0, True)  # and the final weights, bitwise
