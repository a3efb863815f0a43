"""The loss falls when the tiny model overfits a few samples: the whole path (store -> posterior
sample -> loss -> backward -> clipping -> AdamW, through `cogfun train`) learns, not just runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cogfun.common.store import BucketPlan, RowPlan, StoreLayout, StorePlan, open_for_write
from train_support import (
    TEXT_DIM,
    TEXT_LEN,
    TINY_SCALING,
    metrics,
    run_in_process,
    transformer_only_model,
)


def _near_deterministic_store(path):
    """4 copies of one image latent with a tiny posterior variance: x0 is (almost) fixed, so the
    model can memorise it and the v-prediction loss can fall far below its starting value (even
    at t = 999, where x_t is pure noise and v = -x0)."""
    plan = StorePlan(
        buckets=[
            BucketPlan(
                "f1_h8_w8", 1, 64, 64, 1, 8, 8, [RowPlan(1, {"file": f"s{i}"}) for i in range(4)]
            )
        ],
        captions=["", "a cat"],
    )
    writer = open_for_write(
        path,
        settings={"test": "overfit"},
        attrs={"scaling_factor": TINY_SCALING},
        plan=plan,
        layout=StoreLayout(16, "moments", 0, text_len=TEXT_LEN, text_dim=TEXT_DIM),
        create=True,
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        writer.write_caption(i, torch.randn(TEXT_LEN, TEXT_DIM, generator=gen).bfloat16())
    mean = torch.randn(1, 1, 16, 8, 8, generator=gen).expand(4, -1, -1, -1, -1)
    logvar = torch.full_like(mean, -20.0)
    writer.write_samples("f1_h8_w8", [0, 1, 2, 3], torch.cat([mean, logvar], dim=2).bfloat16())
    writer.finalize()
    return path


@pytest.mark.slow
def test_loss_falls_when_overfitting(tmp_path_factory, tmp_path, tiny_model_dir):
    root = tmp_path_factory.getbasetemp()
    model = transformer_only_model(root, tiny_model_dir, variant="2b")
    store = _near_deterministic_store(tmp_path / "overfit.zarr")
    out = tmp_path / "overfit"
    run_in_process(
        latents=store,
        model=model,
        mode="normal",
        output_dir=out,
        max_train_steps=60,
        checkpointing_steps=60,
        train_batch_size=4,
        learning_rate=1e-2,
        lr_warmup_steps=5,
        max_grad_norm=1.0,
        grad_clip_schedule="fixed",
        caption_dropout=0.0,
    )
    losses = np.array([row["loss"] for row in metrics(out)])
    assert len(losses) == 60
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.65 * first  # seen: 1.33 -> 0.59, (first, last)
