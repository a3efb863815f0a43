"""`cogfun train --lora` on the tiny models: only the adapters change, both files are written at
every checkpoint, the loss falls when overfitting, a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write
from cogfun.testing.runs import train_args
from cogfun.train import lora
from cogfun.train.loop import fit
from cogfun.train.setup import setup
from safetensors.torch import load_file
from train_support import (
    TEXT_DIM,
    TEXT_LEN,
    TINY_SCALING,
    cli_env,
    cogfun_cmd,
    make_store,
    metrics,
    run_in_process,
    train_config,
    transformer_only_model,
)
from typer.testing import CliRunner

LORA = dict(lora=True, rank=4, network_alpha=6)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    return make_store(root), transformer_only_model(root, tiny_model_dir)


def _base(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def test_only_adapters_change_and_checkpoints_hold_both_files(shared, tmp_path, tiny_model_dir):
    from diffusers import CogVideoXPipeline

    store, model = shared
    out = tmp_path / "out"
    trainer = setup(train_config(latents=store, model=model, output_dir=out, use_ema=True, **LORA))
    core = trainer.model
    before, adapters_before = _base(core), lora.adapter_state_dict(core)
    assert len(adapters_before) == 42 and trainer.params == [
        p for n, p in core.named_parameters() if ".lora_" in n
    ]
    fit(trainer)
    after = _base(core)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base: bitwise unchanged
    adapters_after = lora.adapter_state_dict(core)
    same = [k for k in adapters_after if torch.equal(adapters_before[k], adapters_after[k])]
    assert not same

    ckpt = out / "checkpoint-4"
    assert not (ckpt / "transformer").exists() and not (ckpt / "transformer_ema").exists()
    exact = load_file(ckpt / "lora_adapters.safetensors")
    assert all(torch.equal(exact[k], adapters_after[k]) for k in adapters_after)
    original = load_file(ckpt / "checkpoint-4.safetensors")  # --save-dtype bf16 by default
    stem = "lora_unet__transformer_blocks_0_attn1_to_q"
    assert (
        original[f"{stem}.alpha"].item() == 6 and original[f"{stem}.alpha"].dtype == torch.bfloat16
    )
    live = adapters_after["transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    assert torch.equal(original[f"{stem}.lora_up.weight"], live.bfloat16())
    diffusers = load_file(ckpt / "pytorch_lora_weights.safetensors")
    key = "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(diffusers[key], (live * 1.5).bfloat16())
    ema = load_file(ckpt / "lora_ema" / "lora_adapters.safetensors")
    assert ema.keys() == exact.keys() and any(not torch.equal(ema[k], exact[k]) for k in ema)
    assert (ckpt / "lora_ema" / "checkpoint-4.safetensors").is_file()

    # diffusers picks pytorch_lora_weights.safetensors out of the checkpoint folder (README, LoRA)
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.load_lora_weights(str(ckpt), adapter_name="cogfun")
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert torch.equal(to_q.lora_B["cogfun"].weight, diffusers[key].float())
    assert sum("cogfun" in getattr(m, "lora_A", {}) for m in pipe.transformer.modules()) == 21
    assert (out / "checkpoint-2" / "checkpoint-2.safetensors").is_file()


def test_resume_repeats_the_uninterrupted_run(shared, tmp_path):
    store, model = shared
    kw = dict(latents=store, model=model, checkpointing_steps=2, use_ema=True, **LORA)
    run_in_process(output_dir=tmp_path / "straight", max_train_steps=4, **kw)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=2, **kw)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=4, **kw)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for file in ("lora_adapters.safetensors", "lora_ema/lora_adapters.safetensors"):
        wa = load_file(tmp_path / "straight" / "checkpoint-4" / file)
        wb = load_file(tmp_path / "split" / "checkpoint-4" / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file


def test_refusals(shared, tmp_path):
    from cogfun.app.cli import app

    store, model = shared
    runner = CliRunner()
    res = runner.invoke(
        app, train_args(store, model, tmp_path / "a", lora=True, trainable_modules="attn1")
    )
    assert res.exit_code == 2 and "--lora trains the adapters only" in res.output
    res = runner.invoke(
        app, train_args(store, model, tmp_path / "b", lora=True, lora_target_modules="to_z")
    )
    assert res.exit_code == 2
    assert "--lora-target-modules 'to_z': no module of the transformer" in res.output
    run_in_process(
        latents=store, model=model, output_dir=tmp_path / "r4", max_train_steps=1, **LORA
    )
    res = runner.invoke(app, train_args(store, model, tmp_path / "r4", lora=True, rank=8))
    assert res.exit_code == 2
    assert "lora_A.default.weight is (4, 32), this run's is (8, 32) (another --rank?)" in res.output
    run_in_process(latents=store, model=model, output_dir=tmp_path / "full", max_train_steps=2)
    res = runner.invoke(app, train_args(store, model, tmp_path / "full", lora=True))
    assert res.exit_code == 2
    assert "no lora_adapters.safetensors: it was not written by a --lora run" in res.output


def _overfit_store(path):
    """4 copies of one inpaint sample (one mask variant) with a tiny posterior variance, so the
    adapters can memorise it (as tests/test_train_overfit.py does for full training)."""
    rows = [RowPlan(1, {"file": f"s{i}"}) for i in range(4)]
    plan = StorePlan([BucketPlan("f1_h8_w8", 1, 64, 64, 1, 8, 8, rows)], captions=["", "a cat"])
    writer = open_for_write(
        path,
        settings={"test": "lora-overfit"},
        attrs={"scaling_factor": TINY_SCALING},
        plan=plan,
        layout=StoreLayout(16, "moments", 1, text_len=TEXT_LEN, text_dim=TEXT_DIM),
        create=True,
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        writer.write_caption(i, torch.randn(TEXT_LEN, TEXT_DIM, generator=gen).bfloat16())

    def moments():  # (F_lat, 2C, h, w): mean, log-variance
        mean = torch.randn(1, 16, 8, 8, generator=gen)
        return torch.cat([mean, torch.full_like(mean, -20.0)], dim=1).bfloat16()

    writer.write_all_masked("f1_h8_w8", moments())
    latents, masked = moments(), moments()
    mask = (torch.rand(1, 1, 1, 8, 8, generator=gen) > 0.5).bfloat16()
    writer.write_samples(
        "f1_h8_w8",
        [0, 1, 2, 3],
        latents.expand(4, -1, -1, -1, -1).contiguous(),
        mask.expand(4, 1, 1, 1, 8, 8).contiguous(),
        masked.expand(4, 1, -1, -1, -1, -1).contiguous(),
        torch.zeros(4, 1, dtype=torch.bool),
    )
    writer.finalize()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["2b-inp", "5b-inp"])
def test_loss_falls_when_overfitting(shared, tmp_path_factory, tmp_path, tiny_model_dir, variant):
    root = tmp_path_factory.getbasetemp()
    if variant == "2b-inp":
        model = shared[1]
    else:
        model = transformer_only_model(root, tiny_model_dir, variant=variant)
    out = tmp_path / "overfit"
    run_in_process(
        latents=_overfit_store(tmp_path / "overfit.zarr"),
        model=model,
        output_dir=out,
        max_train_steps=60,
        checkpointing_steps=60,
        train_batch_size=4,
        learning_rate=1e-2,
        lr_warmup_steps=5,
        max_grad_norm=1.0,
        grad_clip_schedule="fixed",
        caption_dropout=0.0,
        lora=True,
        rank=8,
        network_alpha=8,
    )
    losses = np.array([row["loss"] for row in metrics(out)])
    assert len(losses) == 60
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.65 * first, (first, last)  # seen: 2b-inp 1.48 -> 0.75, 5b-inp 1.48 -> 0.69


@pytest.mark.slow
def test_lora_under_deepspeed_saves_and_resumes(shared, tmp_path):
    """One process under DeepSpeed ZeRO-2 (bf16, on CPU): the engine restores the adapters."""
    store, model = shared
    out = tmp_path / "ds"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    config = Path(__file__).resolve().parents[1] / "config" / "zero_stage2_config.json"
    head = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1"]
    with socket.socket() as sock:  # a free port: other launches may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head += ["--main_process_port", str(port), "--dynamo_backend", "no"]
    head += ["--use_deepspeed", "--deepspeed_config_file", str(config)]
    head += ["--mixed_precision", "bf16"]
    for steps in (2, 3):
        args = train_args(store, model, out, max_train_steps=steps, mixed_precision="bf16", **LORA)
        res = subprocess.run(
            head + cogfun_cmd() + args, env=cli_env(1), capture_output=True, text=True, timeout=400
        )
        assert res.returncode == 0, res.stderr[-4000:]
    assert f"resuming from {out / 'checkpoint-2'}" in res.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    for step in (2, 3):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "pytorch_model").is_dir() and not (ckpt / "transformer").exists()
        assert len(load_file(ckpt / f"checkpoint-{step}.safetensors")) == 3 * 21
        assert len(load_file(ckpt / "pytorch_lora_weights.safetensors")) == 2 * 21
