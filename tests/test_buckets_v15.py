"""V1.5 frame counts (`patch_size_t` 2) against the original's outputs
(tests/golden/frames_v15.json, tests/golden/README.md section 11), and `patch_size_t` None leaving
every draw as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cogfun.common.buckets import (
    BucketOptions,
    choose_image_variant,
    choose_video_variant,
    frames_4k1,
    frames_for_size,
    latent_shape,
    patch_frames,
    patchable_latent_frames,
    random_frame_crop_choices,
    video_variant_for_size,
)

# The golden's mock args: image 1024, video 256, token 512, random_hw_adapt, token-length mode.
CLIP_HW, CLIP_FRAMES = (896, 896), 89  # every ladder size is eligible for this clip


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "frames_v15.json").read_text())


def _opts(n_frames: int, patch_size_t: int | None) -> BucketOptions:
    return BucketOptions(
        video_sample_n_frames=n_frames, random_frame_crop=False, patch_size_t=patch_size_t
    )


def _key(patch_size_t: int | None) -> str:
    return f"patch_size_t={patch_size_t if patch_size_t is not None else 'None'}"


def test_size_frame_table_for_85_and_49_frames(golden):
    assert set(golden["sizes"]) == {"video_sample_n_frames=85", "video_sample_n_frames=49"}
    checked = 0
    for setting, table in golden["sizes"].items():
        n = int(setting.split("=")[1])
        assert [int(s) for s in table] == [256, 384, 512, 640, 768, 896, 1024]
        for s, entry in table.items():
            assert frames_for_size(int(s), n, 512) == int(entry["length_to_frame_num"])
            for p_t in (2, None):
                want = entry[_key(p_t)]
                H, W, F = video_variant_for_size(*CLIP_HW, CLIP_FRAMES, int(s), _opts(n, p_t))
                assert [1, F, 3, H, W] == want["pixel_values"], (setting, s, p_t)
                assert [1, F, 1, H, W] == want["mask"]
                assert latent_shape(F, H, W)[0] == want["latent_frames"]
                checked += 1
    assert checked == 28
    # The counts the golden README marks as differing from the patch_size_t None rule.
    n49 = golden["sizes"]["video_sample_n_frames=49"]
    assert [n49[s]["patch_size_t=2"]["pixel_values"][1] for s in ("256", "896")] == [45, 13]
    assert (
        golden["sizes"]["video_sample_n_frames=85"]["896"]["patch_size_t=2"]["latent_frames"] == 6
    )


def test_short_clips_at_256(golden):
    table = golden["short_clips_s256_n85"]
    assert len(table) == 12
    for length, want in table.items():
        for p_t in (2, None):
            got = video_variant_for_size(*CLIP_HW, int(length), 256, _opts(85, p_t))[2]
            assert got == want[_key(p_t)], (length, p_t)


def test_image_stays_one_frame(golden):
    opts = BucketOptions(random_hw_adapt=False, patch_size_t=2)
    H, W = choose_image_variant(512, 512, opts, np.random.default_rng(0))
    assert [1, patch_frames(1, 2), 3, H, W] == golden["image_512x512_patch_size_t=2"]


@pytest.mark.parametrize("n", [85, 49])
def test_random_frame_crop_candidates_collapse_in_pairs(golden, n):
    pairs = golden[f"random_frame_crop_candidates_n{n}_p_t2"]
    values, probs = random_frame_crop_choices(n, 2)
    plain_values, plain_probs = random_frame_crop_choices(n)
    assert [[c, v] for c, v in zip(plain_values, values, strict=True)] == pairs
    assert probs == plain_probs  # the draw is the original's; only the drawn value is clipped


def test_patch_frames_rule():
    assert [patch_frames(n, 2) for n in range(1, 22)] == [
        1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5, 13, 13, 13, 13, 13, 13, 13, 13, 21,
    ]  # fmt: skip
    assert all(patch_frames(n, None) == frames_4k1(n) for n in range(0, 120))
    assert all(patch_frames(n, 1) == frames_4k1(n) for n in range(0, 120))
    assert patch_frames(49, 2) == 45 and patch_frames(85, 2) == 85 and patch_frames(81, 2) == 77
    for n in range(1, 200):
        assert patchable_latent_frames(latent_shape(patch_frames(n, 2), 8, 8)[0], 2), n
    assert [patchable_latent_frames(f, 2) for f in (1, 2, 3, 4, 13, 22)] == [
        True, True, False, True, False, True,
    ]  # fmt: skip
    assert patchable_latent_frames(13, None) and BucketOptions().patch_size_t is None


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"training_with_video_token_length": False},
        {"random_hw_adapt": False},
        {"enable_bucket": False},
    ],
)
def test_v15_draws_are_the_plain_draws_clipped(flags):
    """Same seed, same RNG use: a V1.5 draw is the patch_size_t None draw with its frame count
    passed through patch_frames, in every bucket mode, so only the frames ever differ."""
    plain, v15 = BucketOptions(**flags), BucketOptions(**flags, patch_size_t=2)
    seen = set()
    for seed in range(300):
        clip = 5 + seed % 50
        a = choose_video_variant(720, 1280, clip, plain, np.random.default_rng(seed))
        b = choose_video_variant(720, 1280, clip, v15, np.random.default_rng(seed))
        assert b == (a[0], a[1], patch_frames(a[2], 2)), (seed, clip)
        seen.add(b[2])
    # Clips of 5+ frames keep at least one latent pair, and every latent count is even.
    assert min(seen) >= 5 and all(latent_shape(f, 8, 8)[0] % 2 == 0 for f in seen)
    assert len(seen) > 3  # several frame counts were drawn
