"""LoRA: peft adapters on the tiny transformer, the original's and diffusers' files, merge-lora.

The reference merge below is the rule the original's `merge_lora` applies (CogVideoX-Fun
`cogvideox/utils/lora_utils.py`), written out from its description:
for each `lora_unet_<path>` module, W += weight * (alpha / rank) * up @ down, rank = up.shape[1].
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from cogfun.app.cli import app
from cogfun.common.models import load_transformer
from cogfun.train import lora, lora_files
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

RANK, ALPHA = 4, 6  # scale 1.5: not a power of two, so a wrong scale cannot hide in rounding


def _random_adapters(transformer: nn.Module, seed: int = 1) -> None:
    """Non-zero down and up everywhere (a fresh adapter has up = 0, which merges to nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(transformer).values():
            for part in (layer.lora_A["default"], layer.lora_B["default"]):
                part.weight.copy_(torch.randn(part.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path) -> nn.Module:
    transformer = load_transformer(tiny_model_dir)
    lora.add_lora(transformer, rank=RANK, alpha=ALPHA)
    _random_adapters(transformer)
    return transformer


@pytest.fixture(scope="module")
def files(adapted: nn.Module, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    return {
        "original": lora.save_original(adapted, folder / "checkpoint-7.safetensors"),
        "diffusers": lora.save_diffusers(adapted, folder / lora.DIFFUSERS_WEIGHT_NAME),
    }


def _plain_linears(model_dir: Path) -> list[str]:
    model = load_transformer(model_dir)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def original_rule(model: nn.Module, file: Path, weight: float) -> dict[str, torch.Tensor]:
    """The original's merge, applied to a plain transformer's state dict copy."""
    modules = {n.replace(".", "_"): m for n, m in model.named_modules()}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in load_file(file).items():
        stem, part = key.split(".", 1)
        groups[stem][part] = value
    with torch.no_grad():
        for stem, parts in groups.items():
            up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
            scale = parts["alpha"].item() / up.shape[1] if "alpha" in parts else 1.0
            module = modules[stem.removeprefix("lora_unet_").lstrip("_")]
            module.weight += weight * scale * (up @ down)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _peft_merged(adapted: nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """peft's own merge of the adapters into a copy holding the same weights."""
    copy = load_transformer(model_dir)
    lora.add_lora(copy, rank=RANK, alpha=ALPHA)
    copy.load_state_dict(adapted.state_dict())
    copy.fuse_lora(lora_scale=1.0)
    copy.unload_lora()
    return copy.state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False):
    assert set(a) == set(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=key)


def test_default_targets_every_linear_and_only_adapters_train(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir)
    linears = _plain_linears(tiny_model_dir)
    names = lora.add_lora(transformer, base_dtype=torch.bfloat16)
    assert (
        names == linears and len(names) == 21
    )  # 3 embeddings + 2 blocks x 8 + norm_out + proj_out
    assert "patch_embed.proj" not in names  # the 2x2 Conv2d patch embedding keeps no adapter
    assert sorted(lora.lora_layers(transformer)) == sorted(linears)
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 21
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    layer = lora.lora_layers(transformer)["transformer_blocks.0.attn1.to_q"]
    assert layer.r["default"] == lora.DEFAULT_RANK == 128
    assert layer.scaling["default"] == 64 / 128
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # step 0 is the base model
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_target_modules_suffixes_and_refusals(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir)
    got = lora.resolve_targets(transformer, ["to_q", "attn1.to_out.0"])
    assert got == [
        f"transformer_blocks.{i}.attn1.{m}" for i in (0, 1) for m in ("to_q", "to_out.0")
    ]
    with pytest.raises(lora.LoraError, match=r"--lora-target-modules 'to_z': no module"):
        lora.resolve_targets(transformer, ["to_z"])
    with pytest.raises(lora.LoraError, match=r"patch_embed.proj is a Conv2d; LoRA adapters go"):
        lora.resolve_targets(transformer, ["patch_embed.proj"])
    with pytest.raises(lora.LoraError, match="--rank 0"):
        lora.add_lora(transformer, rank=0)


def test_original_file_keys_follow_the_original_format(adapted, files, tiny_model_dir):
    state = load_file(files["original"])
    linears = _plain_linears(tiny_model_dir)
    stems = ["lora_unet__" + n.replace(".", "_") for n in linears]
    assert "lora_unet__transformer_blocks_0_attn1_to_q" in stems
    expected = {f"{s}.{p}" for s in stems for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(state) == expected
    stem = "lora_unet__transformer_blocks_1_ff_net_0_proj"
    assert state[f"{stem}.lora_down.weight"].shape == (RANK, 32)
    assert state[f"{stem}.lora_up.weight"].shape == (128, RANK)  # gelu FF: 4 x 32
    assert state[f"{stem}.alpha"].shape == () and state[f"{stem}.alpha"].item() == ALPHA
    layer = lora.lora_layers(adapted)["transformer_blocks.1.ff.net.0.proj"]
    assert torch.equal(state[f"{stem}.lora_up.weight"], layer.lora_B["default"].weight)


def test_original_rule_on_saved_file_equals_peft_merge(adapted, files, tiny_model_dir):
    by_rule = original_rule(load_transformer(tiny_model_dir), files["original"], 1.0)
    base = load_transformer(tiny_model_dir).state_dict()
    changed = [k for k in base if not torch.equal(base[k], by_rule[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n in _plain_linears(tiny_model_dir))
    _assert_same(by_rule, _peft_merged(adapted, tiny_model_dir))


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_merge_lora_at_weight_matches_the_rule(files, tiny_model_dir, fmt):
    expected = original_rule(load_transformer(tiny_model_dir), files["original"], 0.55)
    merged = load_transformer(tiny_model_dir)
    names = lora_files.merge_lora(merged, files[fmt], weight=0.55)
    assert len(names) == 21
    _assert_same(merged.state_dict(), expected, exact=fmt == "original")


def test_diffusers_file_loads_through_diffusers_loader(files, tiny_model_dir):
    from diffusers import CogVideoXPipeline

    state = CogVideoXPipeline.lora_state_dict(str(files["diffusers"]), use_safetensors=True)
    assert all(k.startswith("transformer.") for k in state)
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.load_lora_weights(str(files["diffusers"]), adapter_name="cogfun", use_safetensors=True)
    loaded = [m for m in pipe.transformer.modules() if "cogfun" in getattr(m, "lora_A", {})]
    assert len(loaded) == 21
    pipe.fuse_lora(lora_scale=0.55)
    pipe.unload_lora_weights()
    expected = original_rule(load_transformer(tiny_model_dir), files["original"], 0.55)
    _assert_same(pipe.transformer.state_dict(), expected)


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_load_lora_round_trip(adapted, files, tiny_model_dir, fmt):
    transformer = load_transformer(tiny_model_dir)
    names = lora_files.load_lora(transformer, files[fmt])
    assert len(names) == 21
    want, got = lora.adapters(adapted), lora.adapters(transformer)
    for name in want:
        torch.testing.assert_close(got[name].delta(), want[name].delta(), rtol=1e-6, atol=1e-7)
    assert all(p.requires_grad == (".lora_" in n) for n, p in transformer.named_parameters())


def test_bad_files_are_refused(files, tiny_model_dir, tmp_path):
    transformer = load_transformer(tiny_model_dir)
    with pytest.raises(lora.LoraError, match="expected an existing .safetensors"):
        lora_files.read_lora(tmp_path / "missing.safetensors", transformer)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(lora.LoraError, match="not a LoRA file cogfun reads"):
        lora_files.read_lora(tmp_path / "other.safetensors", transformer)
    state = load_file(files["original"])
    stem = "lora_unet__transformer_blocks_0_attn1_to_q"
    state[f"{stem}.lora_up.weight"] = torch.zeros(64, RANK)
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        lora.LoraError, match=r"to_q adapter is \(64, 4\) @ \(4, 32\) but the layer"
    ):
        lora_files.read_lora(tmp_path / "wide.safetensors", transformer)
    state = load_file(files["original"])
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        state[f"lora_unet__transformer_blocks_9_attn1_to_q.{part}"] = state[
            f"{stem}.{part}"
        ].clone()
    save_file(state, str(tmp_path / "deep.safetensors"))
    with pytest.raises(lora.LoraError, match="blocks_9_attn1_to_q names no Linear"):
        lora_files.read_lora(tmp_path / "deep.safetensors", transformer)


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_merge_lora_cli_writes_a_loadable_folder(files, tiny_model_dir, tmp_path, fmt):
    out = tmp_path / "merged"
    args = ["merge-lora", "--model", str(tiny_model_dir), "--lora", str(files[fmt])]
    result = CliRunner().invoke(app, [*args, "--lora-weight", "0.55", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'transformer'}" in result.output
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "CogVideoXTransformer3DModel" and config["in_channels"] == 33
    merged = load_transformer(out).state_dict()
    expected = original_rule(load_transformer(tiny_model_dir), files["original"], 0.55)
    _assert_same(merged, expected, exact=fmt == "original")

    bf16 = [*args, "--lora-weight", "0.55", "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]
    half = CliRunner().invoke(app, bf16)
    assert half.exit_code == 0, half.output
    stored = load_file(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[k], merged[k].bfloat16()) for k in stored)

    again = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2
    assert f"--out {out}: {out / 'transformer'} already exists" in again.output
    missing = CliRunner().invoke(
        app, [*args[:3], "--lora", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "o")]
    )
    assert (
        missing.exit_code == 2 and "expected an existing .safetensors LoRA file" in missing.output
    )
