"""Shared builders for the training tests: a small store that fits the tiny model, a model folder
without VAE and T5, and config/run helpers. Cached per process so every test module reuses them.
The `cogfun train` command line (`train_args`) lives in `cogfun.testing.runs`, which the
benchmarks share."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TINY_SCALING = 1.15258426  # the tiny 2b-inp VAE's scaling factor
TEXT_LEN, TEXT_DIM = 226, 32  # the tiny transformer's max_text_seq_length and text_embed_dim
K = 2  # mask variants per sample
BUCKETS = (  # name, frames, height, width, latent frames, h, w, samples
    ("f5_h8_w8", 5, 64, 64, 2, 8, 8, 6),
    ("f1_h8_w12", 1, 64, 96, 1, 8, 12, 4),
)


@functools.cache
def make_store(
    root: Path,
    masks: bool = True,
    channels: int = 16,
    text_dim: int = TEXT_DIM,
    samples: bool = True,
    finalize: bool = True,
    vae_sha256: str | None = None,
) -> Path:
    """A store of random bf16 moments: 6 clips + 4 images, 3 captions, K=2 variants (finalized;
    `samples=False` leaves every slot unwritten, `finalize=False` leaves it incomplete; `vae_sha256`
    records a VAE identity in the settings as precompute does)."""
    import torch
    from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write

    kind = f"{'inp' if masks else 'normal'}_{channels}_{text_dim}_{int(samples)}{int(finalize)}"
    kind += f"_{vae_sha256[:8]}" if vae_sha256 else ""
    name = f"store_{kind}.zarr"
    path = root / name
    plan = StorePlan(
        buckets=[
            BucketPlan(
                n, f, h, w, fl, lh, lw, [RowPlan(1 + i % 2, {"file": f"{n}-{i}"}) for i in range(k)]
            )
            for n, f, h, w, fl, lh, lw, k in BUCKETS
        ],
        captions=["", "a cat", "a dog"],
    )
    layout = StoreLayout(
        channels, "moments", K if masks else 0, text_len=TEXT_LEN, text_dim=text_dim
    )
    writer = open_for_write(
        path,
        settings={"test": name, **({"vae": {"sha256": vae_sha256}} if vae_sha256 else {})},
        attrs={"scaling_factor": TINY_SCALING},
        plan=plan,
        layout=layout,
        create=True,
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(len(plan.captions)):
        writer.write_caption(i, torch.randn(TEXT_LEN, text_dim, generator=gen).bfloat16())
    for b in plan.buckets if samples else []:
        n, lat = len(b.rows), (b.latent_frames, 2 * channels, b.latent_h, b.latent_w)
        latents = torch.randn(n, *lat, generator=gen).bfloat16()
        if not masks:
            writer.write_samples(b.name, list(range(n)), latents)
            continue
        writer.write_all_masked(b.name, torch.randn(*lat, generator=gen).bfloat16())
        mask_shape = (n, K, b.latent_frames, 1, b.latent_h, b.latent_w)
        mask = (torch.rand(*mask_shape, generator=gen) > 0.5).bfloat16()
        masked = torch.randn(n, K, *lat, generator=gen).bfloat16()
        flags = torch.zeros(n, K, dtype=torch.bool)
        flags[0, 1] = True
        writer.write_samples(b.name, list(range(n)), latents, mask, masked, flags)
    if finalize:
        writer.finalize()
    return path


@functools.cache
def transformer_only_model(root: Path, tiny_model: Path, variant: str = "2b-inp") -> Path:
    """The tiny model without vae/ and text_encoder/ (training must never need them)."""
    out = root / f"model_{variant}"
    if variant == "2b-inp":
        shutil.copytree(tiny_model, out)
    else:
        from cogfun.testing.tiny import write_tiny_model

        write_tiny_model(out, variant=variant, seed=0)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(out / part, ignore_errors=True)
    return out


def train_config(**overrides: Any):
    """A TrainConfig for a few fast steps on CPU."""
    from cogfun.train.config import TrainConfig

    base = dict(
        train_batch_size=2,
        dataloader_num_workers=0,
        max_train_steps=4,
        checkpointing_steps=2,
        lr_warmup_steps=2,
        learning_rate=1e-3,
        mixed_precision="no",
        gradient_checkpointing=False,
        report_to="none",
        progress="none",
        use_came=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def run_in_process(**overrides: Any) -> None:
    """`cogfun.train.run.run` in this process."""
    from cogfun.train.run import run

    run(train_config(**overrides))


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    return env


def cogfun_cmd() -> list[str]:
    """The console script beside this interpreter (what `accelerate launch` must be given)."""
    return [str(Path(sys.executable).with_name("cogfun"))]


def run_cli(args: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        cogfun_cmd() + args,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        **kw,
    )


def validation_videos(out: Path) -> set[str]:
    """The validation videos a run wrote, as `step-N/NN.mp4` paths under `out/validation`."""
    return {
        p.relative_to(out / "validation").as_posix() for p in (out / "validation").rglob("*.mp4")
    }
