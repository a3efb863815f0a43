"""Beyond ZeRO-2: the shipped ZeRO-3, ZeRO-3 offload and FSDP2 configs, 8-bit AdamW, and the
refusals of combinations that cannot work (train/memory_checks.py).

ZeRO-3 (with and without CPU offload) trains, saves and resumes exactly with 2 gloo processes on
CPU. FSDP2 cannot run on CPU: accelerate sets FSDP up only on GPUs and other accelerators (on CPU
processes it falls back to DDP or to unconnected single processes), so its config is checked here
for what accelerate reads from it and for cogfun's acceptance, and the run is refused on CPU.
The offload run needs DeepSpeed's CPU Adam op, which DeepSpeed compiles (g++, ninja) on its first
use on a machine (about 3 minutes, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cogfun.testing.runs import train_args
from cogfun.train import memory_checks, optim
from cogfun.train.distributed import LaunchPlan, launch_plan
from safetensors import safe_open
from train_support import (
    cli_env,
    cogfun_cmd,
    make_store,
    metrics,
    run_in_process,
    train_config,
    transformer_only_model,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
ZERO3, ZERO3_OFFLOAD = (
    CONFIG / "zero_stage3_config.json",
    CONFIG / "zero_stage3_offload_config.json",
)
FSDP2 = CONFIG / "fsdp2.yaml"


def _deepspeed_env(monkeypatch, path: Path) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))


def _fsdp_env(monkeypatch) -> None:
    """What `accelerate launch --config_file config/fsdp2.yaml` puts in each process's environment."""
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(FSDP2)).fsdp_config
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(fsdp["fsdp_version"]))
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", fsdp["fsdp_state_dict_type"])


@pytest.mark.parametrize(
    "path, stage, offload",
    [
        (CONFIG / "zero_stage2_config.json", 2, False),
        (ZERO3, 3, False),
        (ZERO3_OFFLOAD, 3, True),
    ],
)
def test_shipped_deepspeed_configs_read_as_launched(monkeypatch, path, stage, offload):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    ds = HfDeepSpeedConfig(str(path))  # what accelerate's DeepSpeed plugin reads
    assert ds.is_zero3() == (stage == 3) and ds.is_offload() == offload
    zero = json.loads(path.read_text())["zero_optimization"]
    if stage == 3:  # without it accelerate cannot gather a transformer/ to save
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    _deepspeed_env(monkeypatch, path)
    plan = launch_plan()
    assert (plan.deepspeed, plan.zero_stage) == (True, stage)
    assert plan.offload_optimizer == plan.offload_param == offload
    assert plan.source == str(path)
    cfg = train_config(use_came=False)
    assert memory_checks.problems(cfg, plan, accelerator=False) == []


def test_fsdp2_config_is_what_accelerate_and_cogfun_accept(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from diffusers.models.transformers import cogvideox_transformer_3d

    config = load_config_from_file(str(FSDP2))
    assert str(config.distributed_type).endswith("FSDP") and config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert hasattr(cogvideox_transformer_3d, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    _fsdp_env(monkeypatch)
    plan = launch_plan()
    assert plan == LaunchPlan(
        fsdp_version=2,
        fsdp_state_dict="FULL_STATE_DICT",
        source="the accelerate launch FSDP settings",
    )
    assert memory_checks.problems(train_config(use_came=False), plan, accelerator=True) == []
    (on_cpu,) = memory_checks.problems(train_config(use_came=False), plan, accelerator=False)
    assert on_cpu.startswith("FSDP (the accelerate launch FSDP settings) without a GPU")


def test_without_accelerate_launch_nothing_is_sharded(monkeypatch):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert launch_plan() == LaunchPlan()
    assert memory_checks.problems(train_config(use_8bit_adam=True), LaunchPlan()) == []


ZERO2_PLAN = LaunchPlan(deepspeed=True, zero_stage=2, source="z2.json")
ZERO3_PLAN = LaunchPlan(deepspeed=True, zero_stage=3, source="z3.json")
OFFLOAD_PLAN = LaunchPlan(True, 3, True, True, source="z3o.json")
ZERO2_OFFLOAD_PLAN = LaunchPlan(True, 2, True, False, source="z2o.json")
FSDP2_PLAN = LaunchPlan(fsdp_version=2, source="fsdp.yaml")

REFUSALS = [
    (dict(use_8bit_adam=True, use_came=True), LaunchPlan(), "--use-8bit-adam and --use-came"),
    (dict(use_8bit_adam=True), ZERO2_PLAN, "--use-8bit-adam under DeepSpeed ZeRO-2 (z2.json)"),
    (dict(use_8bit_adam=True), FSDP2_PLAN, "--use-8bit-adam under FSDP2 (fsdp.yaml)"),
    (dict(use_came=True), ZERO3_PLAN, "--use-came under DeepSpeed ZeRO-3 (z3.json)"),
    (
        dict(use_came=True),
        OFFLOAD_PLAN,
        "--use-came under DeepSpeed ZeRO-3 with CPU offload of optimizer and parameters",
    ),
    (
        dict(use_came=True),
        ZERO2_OFFLOAD_PLAN,
        "--use-came under DeepSpeed ZeRO-2 with CPU offload of optimizer (z2o.json): with the "
        "optimizer offloaded",
    ),
    (dict(use_came=True), FSDP2_PLAN, "--use-came under FSDP2"),
    (dict(use_ema=True), ZERO3_PLAN, "--use-ema under DeepSpeed ZeRO-3"),
    (dict(use_ema=True), FSDP2_PLAN, "--use-ema under FSDP2"),
    (dict(lora=True), FSDP2_PLAN, "--lora under FSDP2"),
    (dict(), LaunchPlan(fsdp_version=1, source="f1"), "FSDP1 (f1): cogfun trains with FSDP2"),
    (
        dict(),
        LaunchPlan(fsdp_version=2, fsdp_state_dict="SHARDED_STATE_DICT", source="f2"),
        "fsdp_state_dict_type SHARDED_STATE_DICT (f2): sharded checkpoints keep their index as a "
        "pickle",
    ),
]


@pytest.mark.parametrize("overrides, plan, says", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_each_combination_that_cannot_work_gets_one_message(overrides, plan, says):
    cfg = train_config(**{"use_came": False, **overrides})
    found = memory_checks.problems(cfg, plan, accelerator=True)
    assert len(found) == 1 and found[0].startswith(says), found


def test_combinations_that_work_pass():
    ok = [
        (dict(use_came=True), ZERO2_PLAN),  # warned, as the original's recommended command runs it
        (dict(use_ema=True), ZERO2_PLAN),
        (dict(lora=True), ZERO3_PLAN),
        (dict(), OFFLOAD_PLAN),
        (dict(use_8bit_adam=True, lora=True), LaunchPlan()),
    ]
    for overrides, plan in ok:
        cfg = train_config(**{"use_came": False, **overrides})
        assert memory_checks.problems(cfg, plan, accelerator=True) == [], overrides


@pytest.mark.slow
def test_refusal_comes_before_the_model_is_read(tmp_path):
    """Through the CLI as `accelerate launch` would start it: the model folder does not exist, and
    the message is the refusal, not a missing model."""
    env = cli_env()
    env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ZERO3))
    args = ["train", "--latents", str(tmp_path / "none.zarr"), "--model", str(tmp_path / "none")]
    proc = subprocess.run(
        cogfun_cmd() + args + ["--use-8bit-adam", "--no-use-came", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"cogfun train: --use-8bit-adam under DeepSpeed ZeRO-3 ({ZERO3}): ZeRO hands the "
        "optimizer flat partitions" in proc.stderr
    )


def _groups(seed: int = 0) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    return model, optim.select_trainable(model, ["."], [], 1e-3)


def _adam8(groups: list[dict]) -> torch.optim.Optimizer:
    return optim.make_optimizer(
        groups, use_came=False, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.03, eps=1e-8,
        use_8bit_adam=True,
    )  # fmt: skip


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, start: int) -> list[float]:
    losses = []
    for k in range(start, start + n):
        x = torch.randn(16, 96, generator=torch.Generator().manual_seed(k))
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_8bit_adamw_runs_on_cpu_and_its_state_resumes_exactly():
    import bitsandbytes as bnb

    model, groups = _groups()
    opt = _adam8(groups)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    first = _steps(model, opt, 3, 0)
    # 64x96 weights have more than bitsandbytes' 4096-value threshold: their moments are uint8.
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    assert first[-1] < first[0]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = _steps(model, opt, 3, 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as cogfun's safe_loading loads it
    model2, groups2 = _groups(seed=1)
    model2.load_state_dict(saved["model"])
    opt2 = _adam8(groups2)
    opt2.load_state_dict(saved["opt"])
    assert _steps(model2, opt2, 3, 3) == reference


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    return make_store(root), transformer_only_model(root, tiny_model_dir)


@pytest.mark.slow
def test_8bit_training_resumes_exactly(shared, tmp_path):
    store, model = shared
    common = dict(latents=store, model=model, use_8bit_adam=True, use_came=False)
    run_in_process(output_dir=tmp_path / "ref", max_train_steps=4, **common)
    run_in_process(output_dir=tmp_path / "cut", max_train_steps=2, **common)
    run_in_process(output_dir=tmp_path / "cut", max_train_steps=4, **common)
    ref, cut = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in cut] == [r[key] for r in ref], key


def _launch(config: Path, store: Path, model: Path, out: Path, steps: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    head = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1"]
    head += ["--main_process_port", str(port), "--dynamo_backend", "no", "--use_deepspeed"]
    head += ["--deepspeed_config_file", str(config), "--mixed_precision", "bf16"]
    args = train_args(
        store, model, out, max_train_steps=steps, checkpointing_steps=2, mixed_precision="bf16"
    )
    res = subprocess.run(
        head + cogfun_cmd() + args, env=cli_env(1), capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-6000:]
    return res


def _saved_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype())
    return out


# The plain ZeRO-3 config's exact resume, bitwise final weights (saved from the shards) and every
# rank's part are checked by tests/test_validation_launch.py[zero3]; this test adds the saved
# folder's full shapes and dtype and the optimizer's shards, on the offloading config.
@pytest.mark.slow
@pytest.mark.parametrize("config", [ZERO3_OFFLOAD], ids=["zero3-offload"])
def test_zero3_trains_saves_a_whole_transformer_and_resumes_exactly(config, shared, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    store, model = shared
    ref = _launch(config, store, model, tmp_path / "ref", 3)
    stage = "DeepSpeed ZeRO-3" + (
        " (optimizer offloaded to CPU)" if config == ZERO3_OFFLOAD else ""
    )
    assert f"accelerate: {stage}, 2 process(es)" in ref.stderr
    # The resumed run starts from a copy of the reference run cut back to its checkpoint-2 (the
    # same state a run stopped after step 2 leaves: one launch fewer).
    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-3")
    second = _launch(config, store, model, tmp_path / "cut", 3)
    assert f"resuming from {tmp_path / 'cut' / 'checkpoint-2'}" in second.stderr
    rows, resumed = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert all(r["world_size"] == 2 and r["clip_norm"] == 0.05 for r in resumed)
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], key
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["global_step"], state["world_size"]) == (3, 2)
    # transformer/ was gathered from both ranks' partitions: every tensor at its full shape.
    folder = tmp_path / "cut" / "checkpoint-3" / "transformer"
    base = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    expected = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    saved = _saved_tensors(folder)
    assert {k: shape for k, (shape, _) in saved.items()} == expected
    assert {dtype for _, dtype in saved.values()} == {"BF16"}
    final = CogVideoXTransformer3DModel.from_pretrained(folder)
    moved = [
        k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k].to(v))
    ]
    assert len(moved) > len(expected) // 2  # trained, not the initial weights
    shards = sorted(p.name for p in (folder.parent / "pytorch_model").iterdir())
    assert [s for s in shards if "optim_states" in s] == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]
