"""Decode workers must not change a stored byte at any torch thread count."""

from __future__ import annotations

import json

import numpy as np
import torch
from cogfun.common.decode import cap_short_side
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.media import write_video


def test_the_short_side_resize_depends_on_the_thread_count():
    """Why decoding runs on one thread inline too: this resize rounds differently on two."""
    frames = np.random.default_rng(0).integers(0, 256, (9, 180, 320, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cap_short_side(frames, 128)
        torch.set_num_threads(2)
        two = cap_short_side(frames, 128)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (9, 128, 227, 3)
    assert not np.array_equal(one, two)  # if torch ever makes it exact, the guard can go


def test_inline_and_worker_decoding_store_the_same_bytes(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    rows = []
    for i in range(2):  # sources larger than the short-side cap (128), so frames are resized
        write_video(data / f"v{i}.mp4", 30, 180, 320, seed=i)
        rows.append({"file_path": f"v{i}.mp4", "text": f"clip {i}", "type": "video"})
    (data / "metadata.json").write_text(json.dumps(rows))
    digests = []
    for workers in (0, 1):
        out = tmp_path / f"w{workers}.zarr"
        cfg = PrecomputeConfig(
            data=data,
            model=tiny_model_dir,
            out=out,
            image_sample_size=128,
            video_sample_size=64,
            token_sample_size=64,
            video_sample_n_frames=9,
            masks_per_sample=1,
            threads=2,
            decode_workers=workers,
            progress="none",
        )
        assert run(cfg) == 0
        digests.append(open_store(out).digest())
    assert digests[0] == digests[1]
