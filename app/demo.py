"""`cogfun demo`: the whole pipeline on a laptop CPU in about a minute.

    cogfun demo [--workdir cogfun-demo]

Writes a tiny random-weight CogVideoX-Fun-2b-InP-shaped model (`W/model`) and a small dataset of
generated clips and images (`W/data`), precomputes the store (`W/latents.zarr`), trains a few steps
(`W/output`), and inspects the store. Sizes are scaled down (64-128 px, 9 frames) so the tiny VAE
and transformer run in seconds; every step goes through the same code as a real run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cogfun.precompute.config import PrecomputeConfig
from cogfun.train.config import TrainConfig


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def store(self) -> Path:
        return self.root / "latents.zarr"

    @property
    def output(self) -> Path:
        return self.root / "output"


def precompute_config(paths: DemoPaths) -> PrecomputeConfig:
    return PrecomputeConfig(
        data=paths.data,
        model=paths.model,
        out=paths.store,
        image_sample_size=128,
        video_sample_size=64,
        token_sample_size=64,
        video_sample_n_frames=9,
        masks_per_sample=2,
        decode_workers=1,
        threads=1,
    )


def train_config(paths: DemoPaths, steps: int) -> TrainConfig:
    return TrainConfig(
        latents=paths.store,
        model=paths.model,
        output_dir=paths.output,
        train_batch_size=2,
        dataloader_num_workers=1,
        max_train_steps=steps,
        checkpointing_steps=max(1, steps // 2),
        lr_warmup_steps=2,
        learning_rate=1e-3,
        report_to="tensorboard",
        mixed_precision="no",
    )


def run_demo(workdir: Path, *, steps: int = 20, fresh: bool = True, echo=print) -> DemoPaths:
    """Run every stage; returns where everything is. `fresh` deletes an earlier demo first."""
    import torch
    from cogfun.precompute.inspect import inspect_store
    from cogfun.precompute.run import run as run_precompute
    from cogfun.testing.media import make_sample_dataset
    from cogfun.testing.tiny import write_tiny_model
    from cogfun.train.run import run as run_train

    paths = DemoPaths(Path(workdir))
    if fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()

    echo(f"[1/5] tiny model -> {write_tiny_model(paths.model, variant='2b-inp', seed=0)}")
    meta = make_sample_dataset(paths.data, n_videos=4, n_images=3, seed=0)
    echo(f"[2/5] sample dataset -> {meta}")
    echo(f"[3/5] precompute -> {paths.store}")
    code = run_precompute(precompute_config(paths))
    if code != 0:
        raise RuntimeError(f"demo precompute failed with exit code {code}")
    echo(f"[4/5] train {steps} steps -> {paths.output}")
    run_train(train_config(paths, steps))
    echo("[5/5] inspect")
    inspect_store(paths.store)

    echo(f"\nDone in {time.perf_counter() - t0:.0f} s. Everything is under {paths.root}:")
    echo(f"  model       {paths.model}")
    echo(f"  dataset     {paths.data} (metadata.json)")
    echo(f"  store       {paths.store}    (cogfun inspect {paths.store})")
    echo(f"  checkpoints {paths.output}/checkpoint-*/transformer")
    echo(f"  metrics     {paths.output}/metrics.jsonl, {paths.output}/loss.png")
    return paths
