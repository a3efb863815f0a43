"""Inpaint masks against the original: resize_mask goldens, mask statistics, per-type geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cogfun.common.masks import (
    IMAGE_MASK_PROBS,
    MASK_TYPES,
    VIDEO_MASK_PROBS,
    mask_to_latent,
    masked_video,
    random_mask,
    resize_mask,
)
from safetensors.torch import load_file

CASES = ("f9_64x64", "f13_64x96", "f1_64x64")
STATS = (
    "all_masked",
    "mean_masked_fraction",
    "first_frame_fully_known",
    "first_and_last_frames_fully_known",
    "all_frames_identical",
    "last_frame_fully_known",
)


@pytest.fixture(scope="module")
def golden_resize(golden_dir) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "resize_mask.safetensors")


@pytest.fixture(scope="module")
def golden_stats(golden_dir) -> dict:
    return json.loads((golden_dir / "mask_stats.json").read_text())["results"]


# ---------------------------------------------------------------------------------------------
# resize_mask / mask_to_latent / masked_video
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_resize_mask_matches_original(golden_resize, case):
    mask_in, want = golden_resize[f"{case}.mask_in"], golden_resize[f"{case}.out"]
    b, _, f_lat, h, w = want.shape
    got = resize_mask(mask_in, (b, 16, f_lat, h, w))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert torch.equal(got * 8, torch.round(got * 8))  # multiples of 1/8


@pytest.mark.parametrize("case", CASES)
def test_mask_to_latent_matches_original(golden_resize, case):
    # mask_in is 1 - mask; mask_to_latent takes the pixel mask (F, 1, H, W) itself
    mask_in, want = golden_resize[f"{case}.mask_in"], golden_resize[f"{case}.out"]
    for i in range(mask_in.shape[0]):
        pixel_mask = (1 - mask_in[i]).permute(1, 0, 2, 3).to(torch.uint8)  # (F, 1, H, W)
        got = mask_to_latent(pixel_mask)
        assert got.shape == (want.shape[2], 1, want.shape[3], want.shape[4])
        torch.testing.assert_close(got, want[i].permute(1, 0, 2, 3), rtol=0, atol=1e-7)


def test_mask_to_latent_first_frame_known_and_bad_shapes():
    mask = torch.ones((9, 1, 16, 24), dtype=torch.uint8)
    mask[0] = 0  # image-to-video: frame 0 known
    lat = mask_to_latent(mask)
    assert lat.shape == (3, 1, 2, 3)
    assert torch.all(lat[0] == 1) and torch.all(lat[1:] == 0)
    assert mask_to_latent(torch.zeros((1, 1, 16, 16), dtype=torch.uint8)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="4k\\+1"):
        mask_to_latent(torch.zeros((8, 1, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible"):
        mask_to_latent(torch.zeros((5, 1, 12, 16), dtype=torch.uint8))


def test_masked_video_sets_masked_pixels_to_minus_one():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand((5, 3, 8, 8), generator=gen) * 2 - 1
    mask = torch.zeros((5, 1, 8, 8), dtype=torch.uint8)
    mask[2:, :, 2:6, 1:7] = 1
    out = masked_video(pixels, mask)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    sel = mask.bool().expand_as(pixels)
    assert torch.all(out[sel] == -1)
    assert torch.equal(out[~sel], pixels[~sel])


# ---------------------------------------------------------------------------------------------
# Registry, determinism
# ---------------------------------------------------------------------------------------------


def test_registry_and_probabilities():
    assert sorted(MASK_TYPES) == list(range(10))
    assert VIDEO_MASK_PROBS == (0.05, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05)
    assert IMAGE_MASK_PROBS == (0.2, 0.8)
    assert abs(sum(VIDEO_MASK_PROBS) - 1) < 1e-12
    rng = np.random.default_rng(0)
    for kind, fn in MASK_TYPES.items():
        m = fn(9, 32, 48, rng)
        assert m.shape == (9, 1, 32, 48) and m.dtype == np.uint8, kind
        assert set(np.unique(m)) <= {0, 1}, kind


def test_random_mask_types_by_shape():
    rng = np.random.default_rng(1)
    kinds = {random_mask((1, 3, 32, 32), rng)[1] for _ in range(200)}
    assert kinds == {0, 1}
    kinds = {random_mask((13, 3, 32, 32), rng)[1] for _ in range(600)}
    assert kinds == set(range(10))
    mask, _ = random_mask((13, 3, 32, 48), rng)
    assert mask.shape == (13, 1, 32, 48) and mask.dtype == torch.uint8


def test_random_mask_deterministic_per_seed():
    def draws(seed):
        rng = np.random.default_rng(seed)
        return [random_mask((17, 3, 32, 32), rng) for _ in range(60)]

    a, b, c = draws(5), draws(5), draws(6)
    assert all(ka == kb and torch.equal(ma, mb) for (ma, ka), (mb, kb) in zip(a, b, strict=True))
    assert any(ka != kc or not torch.equal(ma, mc) for (ma, ka), (mc, kc) in zip(a, c, strict=True))


def test_tiny_frames_do_not_crash():
    rng = np.random.default_rng(2)
    for kind, fn in MASK_TYPES.items():
        for f, h, w in ((2, 2, 2), (3, 5, 3), (1, 1, 1)):
            assert fn(f, h, w, rng).shape == (f, 1, h, w), (kind, f, h, w)


# ---------------------------------------------------------------------------------------------
# Per-type geometry: bounds exclusive (torch/numpy randint) or inclusive (python randint)
# ---------------------------------------------------------------------------------------------


def _extent(active: np.ndarray) -> tuple[int, int] | None:
    idx = np.flatnonzero(active)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else None


def _unclipped_sizes(masks: list[np.ndarray], n: int = 64) -> tuple[set[int], set[int]]:
    """Height and width of each 2-D region that touches no border."""
    hs, ws = set(), set()
    for m in masks:
        rows, cols = _extent(m.any(axis=1)), _extent(m.any(axis=0))
        if rows and rows[0] > 0 and rows[1] < n:
            hs.add(rows[1] - rows[0])
        if cols and cols[0] > 0 and cols[1] < n:
            ws.add(cols[1] - cols[0])
    return hs, ws


def test_type0_rectangle_sizes():
    rng = np.random.default_rng(10)
    masks = [MASK_TYPES[0](1, 64, 64, rng)[0, 0] for _ in range(3000)]
    hs, ws = _unclipped_sizes(masks)
    want = {2 * (b // 2) for b in range(16, 48)}  # size in [16, 48) exclusive, halved both ways
    assert hs == want and ws == want


def test_type2_type3_known_frames():
    rng = np.random.default_rng(11)
    first = set()
    for _ in range(300):
        m = MASK_TYPES[2](49, 4, 4, rng)
        k = int(np.flatnonzero(m.reshape(49, -1).all(axis=1))[0])
        assert m[:k].sum() == 0 and m[k:].all()
        first.add(k)
    assert first == {1, 2, 3, 4}
    ks = set()
    for _ in range(300):
        m = MASK_TYPES[3](49, 4, 4, rng)
        full = np.flatnonzero(m.reshape(49, -1).all(axis=1))
        k = int(full[0])
        assert int(full[-1]) == 48 - k and m.sum() == (49 - 2 * k) * 16
        ks.add(k)
    assert ks == {1, 2, 3, 4}
    # the original's k:-k slice is empty for short clips: nothing is masked
    assert MASK_TYPES[3](2, 4, 4, rng).sum() == 0


def test_type4_frame_span():
    rng = np.random.default_rng(12)
    starts, stops = set(), set()
    for _ in range(1500):
        m = MASK_TYPES[4](49, 8, 8, rng)
        span = _extent(m.reshape(49, -1).any(axis=1))
        starts.add(span[0])
        stops.add(span[1])
    assert starts == set(range(0, 24)) and stops == set(range(24, 49))


def test_type6_blocks():
    rng = np.random.default_rng(13)
    counts, heights, widths = set(), set(), set()
    for _ in range(1500):
        m = MASK_TYPES[6](49, 64, 64, rng)[:, 0]
        frames = np.flatnonzero(m.reshape(49, -1).any(axis=1))
        counts.add(len(frames))
        for i in frames:
            rows, cols = _extent(m[i].any(axis=1)), _extent(m[i].any(axis=0))
            assert m[i].sum() == (rows[1] - rows[0]) * (cols[1] - cols[0])  # one block
            heights.add(rows[1] - rows[0])
            widths.add(cols[1] - cols[0])
    assert counts == set(range(1, 25))  # random.randint(1, 49 // 2): inclusive
    assert heights == widths == set(range(1, 17))  # random.randint(1, 64 // 4): inclusive


def test_type7_type8_ellipse_and_circle():
    rng = np.random.default_rng(14)
    want = {2 * r - 1 for r in range(8, 16)}  # semi-axes/radius in [8, 16): exclusive
    ellipses = [MASK_TYPES[7](1, 64, 64, rng)[0, 0] for _ in range(2500)]
    hs, ws = _unclipped_sizes(ellipses)
    assert hs == want and ws == want
    circles = [MASK_TYPES[8](2, 64, 64, rng) for _ in range(2500)]
    assert all(np.array_equal(c[0], c[1]) for c in circles[:50])
    hs, ws = _unclipped_sizes([c[0, 0] for c in circles])
    assert hs == want and ws == want


def test_type9_whole_frames():
    rng = np.random.default_rng(15)
    per_frame = np.stack([MASK_TYPES[9](49, 4, 4, rng).reshape(49, -1) for _ in range(400)])
    assert np.all(per_frame.min(axis=2) == per_frame.max(axis=2))  # each frame all or nothing
    assert abs(per_frame.mean() - 0.5) < 4 * np.sqrt(0.25 / per_frame[..., 0].size)


@pytest.mark.parametrize("kind", range(10))
def test_masked_fraction_per_type(golden_stats, kind):
    want = golden_stats["video_49x3x64x64"]["expected_masked_fraction_by_type"][str(kind)]
    rng = np.random.default_rng(100 + kind)
    n = 400 if kind in (0, 4, 7, 8) else 200
    fracs = np.array([MASK_TYPES[kind](49, 64, 64, rng).mean() for _ in range(n)])
    stderr = max(fracs.std(ddof=1) / np.sqrt(n), 1e-9)
    assert abs(fracs.mean() - want) < 4 * stderr + 1e-12, (kind, fracs.mean(), want, stderr)


# ---------------------------------------------------------------------------------------------
# Whole-sampler statistics against the original's expectations (golden README §7)
# ---------------------------------------------------------------------------------------------


def _sampler_stats(shape: tuple[int, int, int, int], n: int, seed: int) -> dict[str, np.ndarray]:
    """Per-draw indicators / fractions for each statistic of mask_stats.json."""
    f, _, h, w = shape
    rng = np.random.default_rng(seed)
    out = {name: np.empty(n) for name in STATS}
    for i in range(n):
        m = random_mask(shape, rng)[0].numpy().reshape(f, h * w)
        per_frame = np.count_nonzero(m, axis=1)  # (F,)
        out["all_masked"][i] = per_frame.sum() == f * h * w
        out["mean_masked_fraction"][i] = per_frame.sum() / (f * h * w)
        out["first_frame_fully_known"][i] = per_frame[0] == 0
        out["last_frame_fully_known"][i] = per_frame[-1] == 0
        out["first_and_last_frames_fully_known"][i] = per_frame[0] == 0 and per_frame[-1] == 0
        same_count = bool(np.all(per_frame == per_frame[0]))
        out["all_frames_identical"][i] = same_count and bool(np.all(m == m[0]))
    return out


def _check_stats(golden_stats, key, shape, n, seed, sigmas):
    """|observed - expected| < sigmas * stderr, the stderr computed from this run's n."""
    expected = golden_stats[key]
    got = _sampler_stats(shape, n, seed)
    for name in STATS:
        want = expected[name]["expected"]
        obs = got[name].mean()
        if name == "mean_masked_fraction":
            stderr = got[name].std(ddof=1) / np.sqrt(n)
        else:
            stderr = np.sqrt(want * (1 - want) / n)
        # a degenerate statistic (p = 0 or 1) must match exactly
        assert abs(obs - want) <= sigmas * stderr + 1e-12, (key, name, obs, want, stderr)


@pytest.mark.parametrize(
    ("key", "shape", "seed"),
    [("video_49x3x64x64", (49, 3, 64, 64), 0), ("image_1x3x64x64", (1, 3, 64, 64), 1)],
)
def test_mask_statistics_20000(golden_stats, key, shape, seed):
    # ~4 s for both shapes: the sampler is vectorized per mask, so no slow marker is needed
    assert golden_stats[key]["draws"] == 20000
    _check_stats(golden_stats, key, shape, n=20000, seed=seed, sigmas=4)
