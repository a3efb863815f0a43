"""Helpers of the store tests: a small plan (a video bucket and an image bucket), deterministic
sample contents, and a store written from them."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from cogfun.common.store import (
    BucketPlan,
    RowPlan,
    StoreLayout,
    StorePlan,
    open_for_write,
)

LAYOUT = StoreLayout(
    latent_channels=4, latent_format="moments", masks_per_sample=2, text_len=6, text_dim=8
)
NORMAL = StoreLayout(
    latent_channels=2, latent_format="sample", masks_per_sample=0, text_len=3, text_dim=4
)
SETTINGS = {"seed": 42, "vae": {"dtype": "bf16", "sha": "abc"}, "masks_per_sample": 2}
ATTRS = {"scaling_factor": 0.7, "code_version": "0.1.0", "torch_threads": 1}
CAPTIONS = ["", "a cat", "a dog"]
VIDEO, IMAGE = "f2_h4_w6", "f1_h2_w2"


def make_plan(n_video: int = 5) -> StorePlan:
    rows = [
        RowPlan(i % 3, {"file": f"clips/v{i}.mp4", "frames": [0, 3, 6, 9, 12]})
        for i in range(n_video)
    ]
    video = BucketPlan(VIDEO, 5, 32, 48, 2, 4, 6, rows)
    image = BucketPlan(
        IMAGE, 1, 16, 16, 1, 2, 2, [RowPlan(1, {"file": "img.png"}), RowPlan(0, {"file": "b.png"})]
    )
    return StorePlan([video, image], list(CAPTIONS))


def bf16(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def sample(plan: StorePlan, bucket: str, slot: int, layout: StoreLayout = LAYOUT) -> dict:
    """Deterministic random contents of one sample; slot 0 of each bucket has an all-masked variant."""
    b = next(b for b in plan.buckets if b.name == bucket)
    f, h, w, k, cs = (
        b.latent_frames,
        b.latent_h,
        b.latent_w,
        layout.masks_per_sample,
        layout.stored_channels,
    )
    seed = zlib.crc32(f"{bucket}/{slot}".encode())
    out = {"latents": bf16((f, cs, h, w), seed)}
    if k:
        out["masks"] = (
            torch.rand((k, f, 1, h, w), generator=torch.Generator().manual_seed(seed)) > 0.5
        ).to(torch.bfloat16)
        out["masked_latents"] = bf16((k, f, cs, h, w), seed + 1)
        out["all_masked"] = torch.tensor([slot == 0] + [False] * (k - 1))
    return out


def shared(plan: StorePlan, bucket: str, layout: StoreLayout = LAYOUT) -> torch.Tensor:
    b = next(b for b in plan.buckets if b.name == bucket)
    return bf16(
        (b.latent_frames, layout.stored_channels, b.latent_h, b.latent_w),
        zlib.crc32(bucket.encode()),
    )


def caption(i: int, layout: StoreLayout = LAYOUT) -> torch.Tensor:
    return bf16((layout.text_len, layout.text_dim), 1000 + i)


def write_store(
    path: Path, plan: StorePlan | None = None, *, layout=LAYOUT, order=None, finalize=True, **kw
):
    plan = plan or make_plan()
    w = open_for_write(
        path, settings=SETTINGS, attrs=ATTRS, plan=plan, layout=layout, create=True, **kw
    )
    for i in range(len(plan.captions)):
        w.write_caption(i, caption(i, layout))
    slots = [(b.name, s) for b in plan.buckets for s in range(len(b.rows))]
    for name, s in order(slots) if order else slots:
        if layout.masks_per_sample and not w.has_all_masked(name):
            w.write_all_masked(name, shared(plan, name, layout))
        w.write_sample(name, s, **sample(plan, name, s, layout))
    if finalize:
        w.finalize()
    return w


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint16).numpy()
