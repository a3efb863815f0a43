"""Bucket, size and frame math against the original's outputs (tests/golden/buckets.json)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cogfun.common.buckets import (
    ASPECT_RATIO_512,
    BucketOptions,
    auto_tile_factor,
    center_crop_offsets,
    choose_image_variant,
    choose_video_variant,
    cover_resize_hw,
    eligible_sizes,
    frames_4k1,
    frames_for_size,
    image_bucket_hw,
    image_downsample_choices,
    latent_shape,
    nearest_ratio_key,
    random_frame_crop_choices,
    resize_cover_crop,
    short_side_cap_hw,
    size_ladder,
    snap16,
    video_bucket_hw,
    video_variant_for_size,
)

LADDER = [256, 384, 512, 640, 768, 896, 1024]
OPTS = BucketOptions()


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "buckets.json").read_text())


@pytest.fixture(scope="module")
def sizes(golden) -> list[dict]:
    assert len(golden["sizes"]) == 43
    return golden["sizes"]


def _decoded(entry: dict) -> tuple[int, int]:
    return short_side_cap_hw(*entry["hw"], 1024)


# ---------------------------------------------------------------------------------------------
# Golden tables, one test per table, every entry
# ---------------------------------------------------------------------------------------------


def test_aspect_table_has_the_original_keys_and_order(sizes):
    keys = list(ASPECT_RATIO_512)
    assert len(keys) == 40
    assert keys[0] == "0.25" and keys[20] == "1.0" and keys[-1] == "4.0"
    assert "2.0" in keys and "3.0" in keys and "0.4" in keys
    # keys ascend as floats (the tie rule relies on table order)
    assert [float(k) for k in keys] == sorted(float(k) for k in keys)
    assert ASPECT_RATIO_512["1.0"] == (512, 512) and ASPECT_RATIO_512["0.57"] == (384, 672)
    for e in sizes:
        assert list(ASPECT_RATIO_512[e["nearest_key"]]) == e["bucket_512_table"], e["hw"]


def test_nearest_key_every_size(sizes):
    got = [(e["hw"], nearest_ratio_key(*e["hw"]), e["nearest_key"]) for e in sizes]
    wrong = [g for g in got if g[1] != g[2]]
    assert wrong == []


def test_nearest_key_edge_cases():
    assert nearest_ratio_key(375, 1000) == "0.35"  # exact float tie: first key in table order
    assert nearest_ratio_key(545, 1000) == "0.57"  # looks like a tie; float64 says 0.57
    assert nearest_ratio_key(1000, 545) == "1.75"
    assert nearest_ratio_key(1, 1) == "1.0"
    assert nearest_ratio_key(100, 1000) == "0.25" and nearest_ratio_key(1000, 100) == "4.0"


def test_image_bucket_every_size_and_base(sizes):
    wrong = []
    for e in sizes:
        for base, want in e["image_bucket"].items():
            got = image_bucket_hw(*e["hw"], int(base), 1)
            if list(got) != want:
                wrong.append((e["hw"], base, got, want))
    assert wrong == []
    assert sum(len(e["image_bucket"]) for e in sizes) == 43 * 4


def test_image_bucket_1024_downsampled_every_size(sizes):
    wrong = []
    for e in sizes:
        assert set(e["image_bucket_1024_downsampled"]) == {"1.25", "1.5", "2", "4.0"}
        for rho, want in e["image_bucket_1024_downsampled"].items():
            got = image_bucket_hw(*e["hw"], 1024, float(rho))
            if list(got) != want:
                wrong.append((e["hw"], rho, got, want))
    assert wrong == []


def test_image_downsample_choices(golden):
    want = golden["image_downsample_choices_1024_over_256"]
    values, probs = image_downsample_choices(1024, 256)
    assert values == want["values"] and probs == want["probabilities"]
    assert image_downsample_choices(1536, 256)[0] == [1, 1.25, 1.5, 2, 2.5, 3, 6.0]
    assert image_downsample_choices(768, 256) == ([1, 1.25, 1.5, 3.0], [0.75] + [0.25 / 3] * 3)
    assert image_downsample_choices(512, 256) == ([1, 2.0], [0.75, 0.25])
    assert image_downsample_choices(256, 256) == ([1], [1.0])  # below 512: no image ratio


def test_video_decoded_hw_and_collate_key_every_size(sizes):
    wrong = []
    for e in sizes:
        dec = _decoded(e)
        if list(dec) != e["video_decoded_hw"] or nearest_ratio_key(*dec) != e["video_collate_key"]:
            wrong.append((e["hw"], dec))
    assert wrong == []
    assert short_side_cap_hw(1088, 1920, 1024) == (1024, 1807)
    assert short_side_cap_hw(1024, 1807, 1024) == (1024, 1807)  # idempotent


def test_video_token_length_bucket_every_size(sizes):
    wrong = []
    for e in sizes:
        assert [int(s) for s in e["video_token_length_bucket"]] == LADDER
        for s, want in e["video_token_length_bucket"].items():
            got = video_bucket_hw(*_decoded(e), int(s))
            if list(got) != want:
                wrong.append((e["hw"], s, got, want))
    assert wrong == []
    assert video_bucket_hw(720, 1280, 384) == (288, 496)  # float truncation, not 504


def test_video_eligible_sizes_every_size(sizes):
    wrong = []
    for e in sizes:
        dh, dw = _decoded(e)
        got = eligible_sizes(LADDER, (dh + dw) / 2)
        if got != e["video_eligible_sizes"]:
            wrong.append((e["hw"], got))
    assert wrong == []
    assert eligible_sizes(LADDER, 1.0) == LADDER  # none below 1.25 * mean: all sizes


def test_size_ladder_and_frames_per_size(golden):
    assert size_ladder(256, 1024) == golden["size_ladder"] == LADDER
    for setting, table in golden["frames_per_size"].items():
        opts = dict(part.split("=") for part in setting.split(","))
        ladder = size_ladder(int(opts["video_sample_size"]), int(opts["image_sample_size"]))
        assert ladder == [int(s) for s in table], setting
        got = {s: frames_for_size(s, 49, 512) for s in ladder}
        assert got == {int(s): int(f) for s, f in table.items()}, setting
    assert frames_for_size(1024, 49, 512) == 13  # the code's formula, not the README's 9
    assert frames_for_size(768, 49, 512) == 21
    assert size_ladder(256, 1000) == [256, 384, 512, 640, 768, 896, 1000]


def test_collate_video_cases(golden):
    cases = golden["collate_video_cases"]
    assert len(cases) == 3
    for case in cases:
        frames, h, w = case["video_frames_hw"]
        assert (h + w) / 2 == case["local_min_size"]
        assert eligible_sizes(LADDER, (h + w) / 2) == case["eligible_sizes"]
        assert [int(s) for s in case["per_size"]] == case["eligible_sizes"]
        for s, want in case["per_size"].items():
            H, W, Fr = video_variant_for_size(h, w, frames, int(s), OPTS)
            assert [1, Fr, 3, H, W] == want["pixel_values_shape_BFCHW"], (case, s)
            f_lat, lh, lw = latent_shape(Fr, H, W)
            assert [f_lat, lh, lw] == want["latent_F_h_w"]
            assert f_lat * (lh // 2) * (lw // 2) == want["tokens"]
            assert auto_tile_factor(Fr, H, W) == want["auto_tile_factor"], (case, s)


# ---------------------------------------------------------------------------------------------
# Frame rules
# ---------------------------------------------------------------------------------------------


def test_frames_4k1_and_snap16():
    assert [frames_4k1(n) for n in (0, 1, 2, 4, 5, 8, 9, 40, 48, 49, 53)] == [
        1, 1, 1, 1, 5, 5, 9, 37, 45, 49, 53,
    ]  # fmt: skip
    assert snap16(503.99999) == 496 and snap16(816.0) == 816 and snap16(819.2) == 816


def test_random_frame_crop_choices():
    values, probs = random_frame_crop_choices(49)
    assert values == list(range(5, 50, 4)) and len(values) == 12
    assert probs[-1] == 0.9 and probs[:-1] == [(1.0 - 0.9) / 11] * 11  # the original's float
    assert abs(sum(probs) - 1) < 1e-12
    assert random_frame_crop_choices(5) == ([5], [1.0])
    assert random_frame_crop_choices(1) == ([], [])


# ---------------------------------------------------------------------------------------------
# Per-sample draws under each flag combination
# ---------------------------------------------------------------------------------------------


def test_video_variant_default_draws_uniform_size_and_crop():
    rng = np.random.default_rng(0)
    n = 6000
    draws = [choose_video_variant(272, 640, 53, OPTS, rng) for _ in range(n)]
    by_size = {video_bucket_hw(272, 640, s): s for s in (256, 384, 512)}
    assert set((H, W) for H, W, _ in draws) == set(by_size)  # eligible: 256, 384, 512 only
    counts = Counter(by_size[(H, W)] for H, W, _ in draws)
    for s in (256, 384, 512):  # uniform: 1/3 each, 4 sigma
        assert abs(counts[s] / n - 1 / 3) < 4 * np.sqrt(2 / 9 / n), counts
    frames = Counter(f for _, _, f in draws)
    assert set(frames) <= set(range(5, 50, 4))
    assert abs(frames[49] / n - 0.9) < 4 * np.sqrt(0.09 / n)


def test_video_variant_token_length_frames_per_size():
    opts = BucketOptions(random_frame_crop=False)
    rng = np.random.default_rng(1)
    seen = {}
    for _ in range(400):
        H, W, frames = choose_video_variant(720, 1280, 49, opts, rng)
        seen[(H, W)] = frames
    want = {video_bucket_hw(720, 1280, s): frames_for_size(s, 49, 512) for s in LADDER}
    assert seen == want
    assert want[(768, 1344)] == 13
    # a short clip caps the budget and is cut to 4k+1 (40 -> 37)
    rng = np.random.default_rng(2)
    assert {choose_video_variant(720, 1280, 40, opts, rng)[2] for _ in range(200)} == {
        37, 29, 21, 17, 13,
    }  # fmt: skip


def test_video_variant_applies_short_side_cap():
    opts = BucketOptions(random_frame_crop=False)
    a = [choose_video_variant(2160, 3840, 49, opts, np.random.default_rng(s)) for s in range(20)]
    b = [choose_video_variant(1024, 1820, 49, opts, np.random.default_rng(s)) for s in range(20)]
    assert a == b


def test_random_frame_crop_truncates_leading_frames():
    opts = BucketOptions()
    rng = np.random.default_rng(3)
    frames = Counter(choose_video_variant(144, 176, 20, opts, rng)[2] for _ in range(3000))
    assert max(frames) == 17  # never more than the clip allows
    assert set(frames) <= {5, 9, 13, 17}
    assert frames[5] > 0 and frames[9] > 0


def test_video_variant_hw_adapt_without_token_length():
    opts = BucketOptions(training_with_video_token_length=False, random_frame_crop=False)
    rng = np.random.default_rng(4)
    # video_sample_size 256 < 512: the only ratio is 1; the budget is n + 4, so the clip decides
    assert {choose_video_variant(720, 1280, 49, opts, rng) for _ in range(50)} == {(192, 336, 49)}
    assert choose_video_variant(720, 1280, 40, opts, rng) == (192, 336, 37)
    opts768 = BucketOptions(
        video_sample_size=768, training_with_video_token_length=False, random_frame_crop=False
    )
    got = Counter(choose_video_variant(512, 512, 49, opts768, rng)[:2] for _ in range(4000))
    assert set(got) == {(768, 768), (608, 608), (512, 512)}  # rho in {1, 1.25, 1.5}
    assert abs(got[(768, 768)] / 4000 - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)


def test_video_variant_without_hw_adapt_and_without_bucket():
    opts = BucketOptions(random_hw_adapt=False, random_frame_crop=False)
    rng = np.random.default_rng(5)
    assert choose_video_variant(720, 1280, 49, opts, rng) == (192, 336, 49)
    assert choose_video_variant(720, 1280, 23, opts, rng) == (192, 336, 21)
    fixed = BucketOptions(enable_bucket=False, random_frame_crop=False)
    assert choose_video_variant(720, 1280, 49, fixed, rng) == (256, 256, 49)
    assert choose_video_variant(144, 176, 20, fixed, rng) == (256, 256, 17)


def test_image_variant_draws():
    rng = np.random.default_rng(6)
    n = 8000
    got = Counter(choose_image_variant(512, 512, OPTS, rng) for _ in range(n))
    assert set(got) == {(1024, 1024), (816, 816), (672, 672), (512, 512), (256, 256)}
    assert abs(got[(1024, 1024)] / n - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    for side in (816, 672, 512, 256):
        assert abs(got[(side, side)] / n - 0.0625) < 4 * np.sqrt(0.0625 * 0.9375 / n)
    assert choose_image_variant(720, 1280, BucketOptions(random_hw_adapt=False), rng) == (768, 1344)
    assert choose_image_variant(720, 1280, BucketOptions(enable_bucket=False), rng) == (1024, 1024)


def test_draws_are_deterministic_per_seed():
    a = [choose_video_variant(720, 1280, 49, OPTS, np.random.default_rng(9)) for _ in range(3)]
    b = [choose_video_variant(720, 1280, 49, OPTS, np.random.default_rng(9)) for _ in range(3)]
    assert a == b
    rng1, rng2 = np.random.default_rng(10), np.random.default_rng(10)
    assert [choose_image_variant(300, 400, OPTS, rng1) for _ in range(30)] == [
        choose_image_variant(300, 400, OPTS, rng2) for _ in range(30)
    ]


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def test_cover_resize_and_center_crop_offsets():
    assert cover_resize_hw(720, 1280, 288, 496) == (288, 512)
    assert cover_resize_hw(1280, 720, 496, 288) == (512, 288)
    assert cover_resize_hw(100, 153, 64, 64) == (64, 97)
    # torchvision's int(round(x / 2.0)) rounds halves to even
    assert center_crop_offsets(64, 97, 64, 64) == (0, 16)
    assert center_crop_offsets(64, 99, 64, 64) == (0, 18)
    assert center_crop_offsets(70, 64, 64, 64) == (3, 0)


def test_resize_cover_crop_shape_range_and_constant():
    frames = torch.full((3, 90, 160, 3), 51, dtype=torch.uint8)
    frames[..., 1] = 255
    frames[..., 2] = 0
    out = resize_cover_crop(frames, 48, 80)
    assert out.shape == (3, 3, 48, 80) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.full((3, 48, 80), 51 / 255 * 2 - 1))
    # antialias weights sum to 1 only up to float32 rounding, as in torchvision
    torch.testing.assert_close(out[:, 1], torch.ones(3, 48, 80), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2], -torch.ones(3, 48, 80), rtol=0, atol=1e-6)
    noise = torch.randint(
        0, 256, (2, 37, 53, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = resize_cover_crop(noise.numpy(), 32, 16)
    assert out.shape == (2, 3, 32, 16)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6


def test_resize_cover_crop_lands_pattern_centered():
    # 100x300 -> cover 64x64 means resize to 64x192, then keep columns 64:128
    frames = torch.zeros((1, 100, 300, 3), dtype=torch.uint8)
    frames[:, :, 140:160] = 255  # a bar centered at column 150 of 300
    frames[:, :, :50] = 255  # a bar far left: must be cropped away
    out = resize_cover_crop(frames, 64, 64)
    profile = out[0, 0].mean(dim=0)  # (W,) column means
    bright = torch.nonzero(profile > 0).flatten()
    assert bright.min() >= 25 and bright.max() <= 38  # the bar maps to ~[29.9, 42.7) - 64 + 64
    assert abs((bright.min() + bright.max()).item() / 2 - 31.5) <= 1.0
    assert torch.all(out[0, :, :, :20] == -1) and torch.all(out[0, :, :, -20:] == -1)
    expected = F.interpolate(
        frames.permute(0, 3, 1, 2).float() / 255,
        size=(64, 192),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[..., 64:128]
    torch.testing.assert_close(out, (expected - 0.5) / 0.5, rtol=0, atol=0)


def test_resize_cover_crop_equal_size_is_identity():
    frames = torch.randint(
        0, 256, (2, 32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    out = resize_cover_crop(frames, 32, 48)
    want = frames.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, (want - 0.5) / 0.5, rtol=0, atol=0)


def test_resize_cover_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 frames"):
        resize_cover_crop(torch.zeros((1, 8, 8, 3)), 8, 8)
    with pytest.raises(ValueError, match="uint8 frames"):
        resize_cover_crop(torch.zeros((8, 8, 3), dtype=torch.uint8), 8, 8)
