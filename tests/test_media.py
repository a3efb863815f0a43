"""Sample media: videos (size, frames, motion, rotation, determinism), images per mode, datasets."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
from cogfun.testing.media import (
    IMAGE_MODES,
    SAMPLE_IMAGE_SPECS,
    SAMPLE_VIDEO_SPECS,
    make_sample_dataset,
    write_image,
    write_video,
)
from PIL import Image


def _decode_all(path) -> tuple[list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return [f.to_ndarray(format="rgb24") for f in frames], [f.rotation for f in frames]


def test_write_video_size_frames_and_motion(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=12, height=48, width=80, fps=8, seed=1)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (80, 48)
        assert stream.frames == 12
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8
    frames, rotations = _decode_all(path)
    assert len(frames) == 12 and frames[0].shape == (48, 80, 3)
    assert rotations == [0] * 12
    diffs = np.abs(np.diff(np.stack(frames).astype(int), axis=0)).mean(axis=(1, 2, 3))  # (11,)
    assert diffs.min() > 1.0  # every frame moves
    assert frames[0].std() > 10  # not a flat colour


def test_write_video_is_deterministic_per_seed(tmp_path):
    # Interleave other sizes: with SIMD, x264's bytes depended on the encodes that came before.
    a = write_video(tmp_path / "a.mp4", 25, 64, 96, seed=5).read_bytes()
    write_video(tmp_path / "other.mp4", 33, 64, 64, seed=1)
    write_video(tmp_path / "other.mp4", 20, 48, 64, seed=2)
    b = write_video(tmp_path / "b.mp4", 25, 64, 96, seed=5).read_bytes()
    c = write_video(tmp_path / "c.mp4", 25, 64, 96, seed=6).read_bytes()
    assert a == b
    assert a != c


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_write_video_rotation_is_a_display_matrix(tmp_path, rotation):
    path = write_video(tmp_path / "r.mp4", 4, 48, 64, rotation=rotation)
    frames, rotations = _decode_all(path)
    assert frames[0].shape == (48, 64, 3)  # coded frames keep their size
    assert {int(r) % 360 for r in rotations} == {rotation}


def test_write_video_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 33x64"):
        write_video(tmp_path / "odd.mp4", 4, 33, 64)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        write_video(tmp_path / "none.mp4", 0, 32, 32)
    with pytest.raises(ValueError, match="multiple of 90"):
        write_video(tmp_path / "rot.mp4", 4, 32, 32, rotation=45)


def test_write_video_ten_bit(tmp_path):
    path = write_video(tmp_path / "p10.mp4", 5, 32, 48, pix_fmt="yuv420p10le")
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_write_image_modes(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"img{suffix}", 40, 56, mode=mode, seed=2)
    with Image.open(path) as image:
        assert image.mode == mode
        assert image.size == (56, 40)
        values = np.asarray(image)
    assert values.std() > 5  # real content, not a flat fill
    if mode == "I;16":
        assert values.dtype == np.uint16 and values.max() > 30000
    assert (
        path.read_bytes() == write_image(tmp_path / f"again{suffix}", 40, 56, mode, 2).read_bytes()
    )


def test_write_image_rejects_mode_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"\.png cannot hold mode CMYK; use \.jpg"):
        write_image(tmp_path / "c.png", 8, 8, mode="CMYK")
    with pytest.raises(ValueError, match="mode must be one of"):
        write_image(tmp_path / "x.png", 8, 8, mode="YCbCr")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_make_sample_dataset(tmp_path, fmt):
    meta = make_sample_dataset(tmp_path / "data", n_videos=4, n_images=3, seed=0, fmt=fmt)
    assert meta == tmp_path / "data" / f"metadata.{fmt}"
    text = meta.read_text(encoding="utf-8")
    if fmt == "json":
        rows = json.loads(text)
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 7
    assert [r["type"] for r in rows] == ["video"] * 4 + ["image"] * 3
    assert all(set(r) == {"file_path", "text", "type"} for r in rows)
    assert all(r["text"] for r in rows) and len({r["text"] for r in rows}) > 1
    for row, (height, width, frames) in zip(rows[:4], SAMPLE_VIDEO_SPECS, strict=True):
        assert not row["file_path"].startswith("/")
        with av.open(str(tmp_path / "data" / row["file_path"])) as container:
            stream = container.streams.video[0]
            got = (stream.codec_context.height, stream.codec_context.width, stream.frames)
            assert got == (height, width, frames)
    for row, (mode, height, width, suffix) in zip(rows[4:], SAMPLE_IMAGE_SPECS[:3], strict=True):
        assert row["file_path"].endswith(suffix)
        with Image.open(tmp_path / "data" / row["file_path"]) as image:
            assert (image.mode, image.size) == (mode, (width, height))


def test_make_sample_dataset_is_deterministic(tmp_path):
    a = make_sample_dataset(tmp_path / "a", n_videos=2, n_images=2, seed=3).parent
    b = make_sample_dataset(tmp_path / "b", n_videos=2, n_images=2, seed=3).parent
    c = make_sample_dataset(tmp_path / "c", n_videos=2, n_images=2, seed=4).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 5
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_make_sample_dataset_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of"):
        make_sample_dataset(tmp_path, fmt="yaml")
