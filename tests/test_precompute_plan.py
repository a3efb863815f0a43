"""The precompute plan (pure: rows + header probes -> buckets, slots, chunks, draws) and the
progress helper. No model, no media: probes are given directly."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from cogfun.common.decode import MediaInfo
from cogfun.common.progress import progress, setup_logging
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.metadata import Row
from cogfun.precompute.plan import (
    build_plan,
    probe_rows,
    probes_from_json,
    probes_to_json,
    sample_seeds,
)


def _cfg(**kw) -> PrecomputeConfig:
    base = dict(
        data=Path("/data"),
        image_sample_size=128,
        video_sample_size=64,
        token_sample_size=64,
        video_sample_n_frames=9,
        vae_mini_batch=2,
        masks_per_sample=3,
    )
    return PrecomputeConfig(**{**base, **kw})


def _row(i: int, kind: str, text: str | None = "a cat", error: str | None = None, **kw) -> Row:
    file = f"{kind}s/{i}.{'mp4' if kind == 'video' else 'png'}"
    return Row(i, file, Path("/data") / file, text, kind, error=error, **kw)


ROWS = [
    _row(0, "video", "a dog runs"),
    _row(1, "video", "a cat"),
    _row(2, "image", "a cat"),  # same caption as row 1: stored once
    _row(3, "image", ""),  # the empty caption is index 0
    _row(4, "video", None, error="meta.json: row 4: field 'text' is null"),
    _row(5, "video", "too short"),
]
PROBES = {
    "video:videos/0.mp4": MediaInfo(64, 96, 25),
    "video:videos/1.mp4": MediaInfo(112, 64, 49),
    "image:images/2.png": MediaInfo(80, 64, 1),
    "image:images/3.png": MediaInfo(64, 64, 1),
    "video:videos/5.mp4": MediaInfo(64, 64, 2),  # 2 frames, stride 3: no clip
}


def _by_row(samples) -> dict:
    """Samples by "row<i>.v<variant>" (their keys are content keys)."""
    return {f"row{s.row}.v{s.key.rsplit('.v', 1)[1]}": s for s in samples}


def test_plan_is_deterministic_and_records_failures():
    cfg = _cfg(variants_per_sample=2)
    a, b = build_plan(ROWS, PROBES, cfg), build_plan(ROWS, PROBES, cfg)
    assert a.samples == b.samples and a.store == b.store
    # 2 videos x 2 variants + 2 images; row 4 (bad row) and row 5 (too short, per variant) fail.
    assert len(a.samples) == 6
    keys = {f.key: f for f in a.failures}
    assert set(keys) == {"row4", "row5.v0", "row5.v1"}
    assert "field 'text' is null" in keys["row4"].reason and keys["row4"].row == 4
    assert "too short" in keys["row5.v0"].reason and "videos/5.mp4" in keys["row5.v0"].reason
    # Captions: "" first, each distinct caption once, samples point at them.
    assert a.store.captions == ["", "a dog runs", "a cat"]
    by_key = _by_row(a.samples)
    assert by_key["row1.v0"].caption == by_key["row2.v0"].caption == 2
    assert by_key["row3.v0"].caption == 0
    # Another seed draws other clips/sizes/masks.
    other = build_plan(ROWS, PROBES, _cfg(variants_per_sample=2, seed=7))
    assert [s.mask_seeds for s in other.samples] != [s.mask_seeds for s in a.samples]


def test_buckets_slots_and_chunks():
    cfg = _cfg(random_hw_adapt=False, random_frame_crop=False, vae_mini_batch=2)
    plan = build_plan(ROWS[:4], PROBES, cfg)
    by_key = _by_row(plan.samples)
    # 64x96 video at base 64: key 0.68 -> (416, 608) * 64/512 -> (48, 64); 25 frames // 3 = 8
    # clip frames -> 5 (4k+1) -> latent 2x6x8.
    v0 = by_key["row0.v0"]
    assert (*v0.geometry.pixels, v0.bucket) == (5, 48, 64, "f2_h6_w8")
    assert v0.clip_frames == 8 and len(v0.indices) == 5
    assert np.all(np.diff(v0.indices) == 3)  # stride 3 within the clip
    # 80x64 image at 128: key 1.21 -> (544, 448) / 4 -> (136, 112) -> (128, 112).
    assert by_key["row2.v0"].bucket == "f1_h16_w14"
    # Slots are 0.. in plan order within a bucket; chunks never mix buckets and hold <= 2.
    for bucket in plan.store.buckets:
        members = [s for s in plan.samples if s.bucket == bucket.name]
        assert [s.slot for s in members] == list(range(len(bucket.rows)))
        assert (bucket.latent_frames, bucket.latent_h, bucket.latent_w) == (
            (bucket.frames - 1) // 4 + 1,
            bucket.height // 8,
            bucket.width // 8,
        )
    for chunk in plan.chunks:
        assert 1 <= len(chunk.samples) <= 2
        assert {s.bucket for s in chunk.samples} == {chunk.bucket}
    assert [c.index for c in plan.chunks_for(1, 2)] == [c.index for c in plan.chunks[1::2]]


def test_provenance_and_normal_mode():
    plan = build_plan(ROWS[:4], PROBES, _cfg())
    prov = plan.store.buckets[0].rows[0].provenance
    assert set(prov) >= {"key", "file", "frames", "crop", "seed", "mask_seeds", "source_hw"}
    assert "row" not in prov  # nothing positional: an edit elsewhere in the metadata keeps it
    assert len(prov["mask_seeds"]) == 3
    normal = build_plan(ROWS[:4], PROBES, _cfg(mode="normal"))
    # Normal mode draws no masks but the same clips and buckets (mask seeds come from their own
    # child of the sample seed).
    assert all(s.mask_seeds == () for s in normal.samples)
    strip = [dataclasses.replace(s, mask_seeds=()) for s in plan.samples]
    assert strip == normal.samples


def test_v15_plan_holds_only_patchable_frame_counts():
    """With patch_size_t 2 (V1.5) the same rows, seeds and draws give the same samples, only their
    frame counts clipped to even latent counts (or 1): 9 frames (3 latent) become 5."""
    rows = [_row(i, "video", f"clip {i}") for i in range(12)] + [_row(20, "image", "still")]
    probes = {
        f"video:videos/{i}.mp4": MediaInfo(64 + 16 * (i % 3), 96, 30 + 4 * i) for i in range(12)
    }
    probes["image:images/20.png"] = MediaInfo(64, 64, 1)
    cfg = _cfg(variants_per_sample=2)
    plain, v15 = build_plan(rows, probes, cfg), build_plan(rows, probes, cfg, patch_size_t=2)
    assert len(v15.samples) == len(plain.samples) == 25 and not v15.failures
    plain_frames = {b.latent_frames for b in plain.store.buckets}
    assert 3 in plain_frames and plain_frames <= {1, 2, 3}  # 9 frames -> 3 latent (5 -> 2)
    assert {b.latent_frames for b in v15.store.buckets} == {1, 2}
    by_key = {s.key: s for s in plain.samples}
    for spec in v15.samples:
        old, g, g_old = by_key[spec.key], spec.geometry, by_key[spec.key].geometry
        assert (g.height, g.width, spec.seed, spec.mask_seeds, spec.clip_frames) == (
            g_old.height, g_old.width, old.seed, old.mask_seeds, old.clip_frames,
        )  # fmt: skip
        assert g.frames == {9: 5, 5: 5, 1: 1}[g_old.frames], spec.key
        assert spec.indices == old.indices[: g.frames]  # the clip's leading frames
    assert build_plan(rows, probes, cfg, patch_size_t=None).store == plain.store


def test_sample_seeds_independent_of_k():
    s1, m1 = sample_seeds(42, 3, 0, 1, 4)
    s2, m2 = sample_seeds(42, 3, 0, 1, 2)
    assert s1 == s2 and m1[:2] == m2 and len(set(m1)) == 4
    assert sample_seeds(42, 3, 1, 1, 0)[0] != s1  # another repeat, another draw
    assert all(0 <= x < 2**63 for x in [s1, *m1])


def test_probe_rows_skips_known_and_uses_metadata_size(tmp_path):
    calls = []

    def prober(path, kind):
        calls.append(path)
        return MediaInfo(10, 20, 30)

    rows = [
        _row(0, "image", width=100, height=50),  # size from metadata: no probe
        _row(1, "video"),
        _row(1, "video", repeat=1),  # same file: probed once
        _row(2, "video", error="bad row"),
    ]
    probes = probe_rows(rows, prober=prober)
    assert calls == [Path("/data/videos/1.mp4")]
    assert probes["image:images/0.png"] == MediaInfo(50, 100, 1)
    assert probes_from_json(probes_to_json(probes)) == probes
    assert probe_rows(rows, known=probes, prober=prober) == probes and len(calls) == 1


def test_progress_log_lines_go_to_stderr(capsys):
    setup_logging()
    with progress(4, "encode", mode="log", unit="samples", interval=0) as bar:
        bar.advance(1, failed=0)
        bar.advance(3, failed=1)
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if "encode:" in line]
    assert len(lines) == 3  # two updates + the final line
    assert "4/4 samples (100%)" in lines[-1] and "failed=1" in lines[-1]
    assert "samples/s" in lines[-1] and "ETA" in lines[-1]
    with progress(2, "quiet", mode="none") as bar:
        bar.advance(2)
        assert bar.completed == 2 and bar.rate > 0
    assert "quiet" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress mode"):
        with progress(1, "x", mode="fancy"):
            pass
    logging.getLogger("cogfun.train").warning("still reaches caplog")


def test_logging_keeps_caplog_working(caplog):
    setup_logging()
    setup_logging()  # idempotent: one handler
    logging.getLogger("cogfun.x").warning("hello")
    assert "hello" in caplog.text
    assert (
        len([h for h in logging.getLogger("cogfun").handlers if "Stderr" in type(h).__name__]) == 1
    )


def test_progress_bar_mode_renders(capsys):
    with progress(3, "bar", mode="bar", unit="samples") as bar:
        bar.advance(3, failed=0)
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err
