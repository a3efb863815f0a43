"""The benchmarks (`python -m bench.NAME`): proportional model, FLOP ratios, gpu --reduced, train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import flops, models

ROOT = Path(__file__).resolve().parent.parent


def _figures(stdout: str) -> dict[str, str]:
    """`name: value` lines -> {name: value}."""
    out = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name and " " not in name:
            out[name] = value.strip()
    return out


def _run(module: str, *args: str, timeout: int) -> dict[str, str]:
    """`python -m bench.MODULE ARGS` from the repository root; its figures."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"bench.{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return _figures(proc.stdout)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_proportional_parameter_counts_match_benchmarks_table():
    from transformers import T5EncoderModel

    with torch.device("meta"):
        transformer = models.build_transformer(models.proportional_transformer_config())
        vae = models.build_vae(models.proportional_vae_config())
        t5 = T5EncoderModel(models.t5_config(422, **models.PROPORTIONAL_T5))
    # docs/performance.md, "Benchmark models": 7.55 M (1.7 B / 225), 0.91 M, 18.2 M (with the tiny
    # tokenizer's vocabulary).
    assert _params(transformer) == pytest.approx(7.55e6, rel=0.005)
    assert _params(vae) == pytest.approx(0.91e6, rel=0.005)
    assert _params(t5) == pytest.approx(18.2e6, rel=0.005)
    assert transformer.config.max_text_seq_length == 15 and transformer.config.in_channels == 33
    assert not transformer.config.use_rotary_positional_embeddings


def test_proportional_cost_ratios_within_2x_of_real():
    figures = flops.proportional_costs().figures()
    # docs/performance.md, at 49x128x128: VAE 28.7 GFLOP per encode, T5 0.55, transformer
    # forward 21.
    assert figures["vae_encode_gflop"] == pytest.approx(28.7, rel=0.01)
    assert figures["t5_gflop"] == pytest.approx(0.55, rel=0.01)
    assert figures["transformer_forward_gflop"] == pytest.approx(21.0, rel=0.01)
    assert figures["transformer_fwd_bwd_gflop"] == pytest.approx(3 * 21.0, rel=0.01)
    for name, real in flops.TARGET_RATIOS.items():
        assert real / 2 <= figures[name] <= real * 2, (name, figures[name])
    # Two encodes + T5 + fwd/bwd over fwd/bwd alone: the compute-only bound of the speedup.
    assert 1.5 < figures["online_compute_ratio_ckpt"] < figures["online_compute_ratio"] < 2.2


def test_real_2b_cost_ratios_match_reference():
    figures = flops.real_costs().figures()
    assert figures["vae_encode_gflop"] == pytest.approx(1.13e5, rel=0.01)
    assert figures["transformer_forward_gflop"] == pytest.approx(7.8e4, rel=0.01)
    assert figures["cost_ratio_t5"] == pytest.approx(0.019, abs=0.001)
    assert figures["cost_ratio_transformer"] == pytest.approx(0.69, abs=0.01)


def test_folder_costs_read_a_model_folder(tiny_model_dir):
    figures = flops.folder_costs(tiny_model_dir, 9, 64, 64).figures()
    # The tiny VAE (tiny.py): 8 channels everywhere, one layer per block.
    tiny_vae = {
        "block_out_channels": (8, 8, 8, 8),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 16,
        "temporal_compression_ratio": 4,
    }
    direct = flops.vae_encode_flops(tiny_vae, 9, 64, 64)
    assert figures["vae_encode_gflop"] == pytest.approx(direct / 1e9)
    assert 0 < figures["cost_ratio_transformer"] < 1


@pytest.mark.slow
def test_gpu_reduced_prints_sane_figures():
    fig = _run(
        "gpu", "--reduced", "--peak-tflops", "2", "--steps", "2", "--encodes", "1",
        "--warmup", "1", timeout=300,
    )  # fmt: skip
    assert fig["device"] == "cpu"
    assert int(fig["video_tokens"]) == 3 * 4 * 4 and int(fig["text_tokens"]) == 15
    step_s, tflops = float(fig["transformer_step_s"]), float(fig["transformer_step_tflops"])
    assert (
        0 < float(fig["transformer_step_s_min"]) <= step_s <= float(fig["transformer_step_s_max"])
    )
    assert tflops == pytest.approx(float(fig["transformer_step_flops"]) / step_s / 1e12, rel=0.01)
    assert float(fig["mfu"]) == pytest.approx(tflops / 2, rel=0.01)
    assert 0 < float(fig["mfu"]) < 1
    assert fig["vae_clip"] == "9x64x64"
    assert float(fig["vae_frames_per_s"]) == pytest.approx(9 / float(fig["vae_encode_s"]), rel=0.01)
    ratio = float(fig["online_step_ratio_estimate"])
    assert ratio == pytest.approx(1 + 2 * float(fig["vae_encode_s"]) / step_s, rel=0.01)
    # The VAE variants (default eager, channels_last): same weights and clip, compared to eager.
    assert float(fig["vae_max_abs_diff_eager"]) == 0
    assert 0 <= float(fig["vae_max_abs_diff_channels_last"]) < 0.1  # bf16 rounding at most
    speedup = float(fig["vae_frames_per_s_channels_last"]) / float(fig["vae_frames_per_s_eager"])
    assert float(fig["vae_speedup_channels_last"]) == pytest.approx(speedup, rel=0.01)
    assert "vae_frames_per_s_compile" not in fig  # opt-in: minutes on the real VAE


def test_gpu_refuses_an_unknown_vae_variant():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--reduced",
            "--vae-variants",
            "eager,fast",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "--vae-variants: unknown fast" in proc.stderr


def test_gpu_peak_table():
    from bench import gpu

    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu.peak_tflops("cpu") is None


@pytest.mark.slow
def test_write_proportional_model_loads_through_cogfun(tmp_path):
    from cogfun.common.models import load_text_encoder, load_tokenizer, load_vae
    from cogfun.common.transformer import load_transformer

    folder = models.write_proportional_model(tmp_path / "prop")
    counts = models.parameter_counts(folder)
    assert counts["transformer"] == pytest.approx(7.55e6, rel=0.005)
    assert counts["vae"] == pytest.approx(0.91e6, rel=0.005)
    assert counts["text_encoder"] == pytest.approx(18.2e6, rel=0.005)
    transformer = load_transformer(folder)
    assert transformer.config.num_layers == 30 and transformer.config.text_embed_dim == 256
    assert list(load_vae(folder).config.block_out_channels) == [8, 16, 16, 32]
    assert load_text_encoder(folder).config.num_layers == 24
    ids = load_tokenizer(folder)(["a dog running"], max_length=15, padding="max_length").input_ids
    assert len(ids[0]) == 15


@pytest.mark.slow
def test_trainer_wait_bench_runs_cogfun_train_on_both_backends(tmp_path):
    fig = _run(
        "trainer_wait", "--workdir", str(tmp_path), "--steps", "6", "--skip", "2",
        "--workers", "2", "--threads", "1", timeout=600,
    )  # fmt: skip
    for backend in ("threads", "processes"):
        assert 0 <= float(fig[f"trainer_wait_fraction_{backend}_t1"]) < 1
        assert float(fig[f"trainer_wait_ms_{backend}_t1"]) >= 0
        rows = tmp_path / f"run_{backend}_t1_{0 if backend == 'threads' else 1}" / "metrics.jsonl"
        assert [json.loads(r)["step"] for r in rows.read_text().splitlines()] == list(range(1, 7))


@pytest.mark.slow
def test_memory_bench_quick_prints_every_configuration():
    fig = _run("memory", "--quick", "--threads", "1", timeout=600)
    assert fig["model"] == "tiny" and fig["clip"] == "5x64x64" and fig["lora_rank"] == "4"
    names = ("full_adamw", "full_came", "lora", "adamw_8bit")
    peaks = {n: float(fig[f"{n}_peak_mb"]) for n in names}
    assert all(v > 0 for v in peaks.values()), peaks
    for n in names:
        assert fig[f"{n}_processes"] == "1"
        # the peaks are printed to 0.1 MB, the ratios from the unrounded peaks
        ratio = peaks[n] / peaks["full_adamw"]
        assert float(fig[f"{n}_ratio"]) == pytest.approx(
            ratio, abs=1e-3 + 0.15 / peaks["full_adamw"]
        )
    full = int(fig["full_adamw_trained_params"])
    assert full == int(fig["full_came_trained_params"]) == int(fig["adamw_8bit_trained_params"])
    assert 0 < int(fig["lora_trained_params"]) < full


def test_memory_bench_refuses_an_unknown_configuration():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--configs", "full_adamw,zero4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "--configs: unknown zero4 (known: full_adamw," in proc.stderr


@pytest.mark.slow
def test_validation_bench_quick_prints_every_figure():
    fig = _run("validation", "--quick", "--threads", "1", timeout=600)
    assert fig["model"] == "tiny" and fig["clip"] == "5x64x64"
    assert (fig["validation_videos"], fig["validation_failed"]) == ("1", "0")
    train, held = float(fig["train_peak_mb"]), float(fig["train_held_mb"])
    peak, decode = float(fig["validation_peak_mb"]), float(fig["vae_decode_peak_mb"])
    assert 0 < held <= train and peak > 0 and decode > 0
    assert float(fig["validation_above_train_peak_mb"]) == pytest.approx(peak - train, abs=0.02)
    assert fig["within_goal"] == ("yes" if peak - train <= decode else "no")
    step, round_s = float(fig["train_step_s"]), float(fig["validation_s"])
    assert step > 0 and round_s > 0 and float(fig["vae_decode_s"]) > 0
    # The times are printed to 3 decimals (a tiny step is ~0.02 s): the ratio must lie within what
    # that rounding allows, plus 1% for the ratio's own rounding.
    lo, hi = (round_s - 5e-4) / (step + 5e-4), (round_s + 5e-4) / max(step - 5e-4, 1e-9)
    assert lo * 0.99 <= float(fig["validation_vs_train_step"]) <= hi * 1.01


def test_validation_bench_refuses_a_bad_clip():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.validation", "--quick", "--frames", "6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "--frames must be 4k+1 and --height/--width multiples of 16" in proc.stderr


def test_plan_scale_bench_quick_prints_its_figures():
    fig = _run("plan_scale", "--quick", timeout=300)
    for label, n in (("1k", 1000), ("10k", 10000)):
        assert int(fig[f"plan_rows_{label}"]) == n
        # Half the rows are videos with 2 variants each: 1.5 samples a row, none failed.
        assert int(fig[f"plan_samples_{label}"]) == n * 3 // 2
        parts = sum(float(fig[f"{step}_s_{label}"]) for step in ("read", "build", "digest"))
        assert float(fig[f"plan_s_{label}"]) == pytest.approx(parts, abs=0.02)
        assert 0 < float(fig[f"plan_s_{label}"]) < 60
        base, read = float(fig["plan_rss_mb_base"]), float(fig[f"read_rss_mb_{label}"])
        assert 0 < base <= read <= float(fig[f"plan_rss_mb_{label}"])
    assert float(fig["plan_growth_10k_vs_1k"]) > 1
