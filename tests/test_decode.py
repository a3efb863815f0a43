"""Decoding: probe, the clip sampler, video frames (rotation, 10-bit, VFR, cap), images, bad files."""

from __future__ import annotations

import pickle
import random
from fractions import Fraction

import av
import numpy as np
import pytest
from cogfun.common.decode import (
    DecodeError,
    MediaInfo,
    cap_short_side,
    clip_indices,
    probe,
    read_decord,
    read_image,
    read_pyav,
    read_video_frames,
)
from cogfun.testing.media import write_image, write_video

# ------------------------------------------------ clip_indices (the original's frame sampling)


@pytest.mark.parametrize(
    "n_total, stride, n_frames, k, clip_len",
    [
        (200, 3, 49, 49, 145),  # long video: exactly stride 3
        (147, 3, 49, 49, 145),  # the shortest video with 49 frames at stride 3
        (146, 3, 49, 48, 142),
        (30, 1, 49, 30, 30),  # clip fills the video: start 0, no draw
        (60, 3, 49, 20, 58),  # N < stride * n: k = N // S
        (20, 3, 49, 6, 16),
        (3, 3, 49, 1, 1),
        (50, 1, 49, 49, 49),
        (100, 4, 16, 16, 61),
    ],
)
def test_clip_indices_values(n_total, stride, n_frames, k, clip_len):
    seed = n_total * 31 + stride
    got = clip_indices(n_total, stride, n_frames, random.Random(seed))
    ref = random.Random(seed)
    start = 0 if clip_len == n_total else ref.randint(0, n_total - clip_len)
    assert got == list(np.linspace(start, start + clip_len - 1, k).astype(int))
    assert got == [start + stride * i for i in range(k)]  # the drop window 0..1 keeps exact strides
    assert all(isinstance(i, int) for i in got) and got[-1] < n_total


def test_clip_indices_start_covers_range_inclusive():
    rng = random.Random(0)
    starts = {clip_indices(20, 3, 49, rng)[0] for _ in range(300)}
    assert starts == {0, 1, 2, 3, 4}  # N - clip_len = 4, both ends included
    gen = np.random.default_rng(0)
    assert {clip_indices(20, 3, 49, gen)[0] for _ in range(300)} == {0, 1, 2, 3, 4}


def test_clip_indices_no_draw_when_clip_fills_video():
    rng = random.Random(7)
    state = rng.getstate()
    # only stride 1 can fill the video: for S > 1, (k-1)*S + 1 <= N - S + 1 < N
    assert clip_indices(30, 1, 49, rng) == list(range(30))
    assert rng.getstate() == state


def test_clip_indices_too_short_names_file():
    with pytest.raises(
        DecodeError, match=r"clip\.mp4: video too short for one clip: 2 frames, stride 3"
    ):
        clip_indices(2, 3, 49, random.Random(0), path="clip.mp4")
    with pytest.raises(DecodeError, match="0 frames"):
        clip_indices(0, 1, 49, random.Random(0))


# ---------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "plain": write_video(d / "plain.mp4", 20, 48, 64, seed=1),
        "rot90": write_video(d / "rot90.mp4", 20, 48, 64, seed=1, rotation=90),
        "rot180": write_video(d / "rot180.mp4", 20, 48, 64, seed=1, rotation=180),
        "rot270": write_video(d / "rot270.mp4", 20, 48, 64, seed=1, rotation=270),
        "big_rot90": write_video(d / "big_rot90.mp4", 6, 96, 160, seed=2, rotation=90),
        "p10": write_video(d / "p10.mp4", 20, 48, 64, seed=1, pix_fmt="yuv420p10le"),
        "landscape": write_video(d / "land.mp4", 8, 64, 96, seed=3),
        "portrait": write_video(d / "port.mp4", 8, 112, 64, seed=4),
    }


def test_probe_video(videos):
    assert probe(videos["plain"], "video") == MediaInfo(48, 64, 20)
    assert probe(videos["p10"], "video") == MediaInfo(48, 64, 20)
    assert probe(videos["portrait"], "video") == MediaInfo(112, 64, 8)


@pytest.mark.parametrize(
    "name, shape", [("rot90", (64, 48)), ("rot180", (48, 64)), ("rot270", (64, 48))]
)
def test_probe_rotated_reports_display_size(videos, name, shape):
    assert probe(videos[name], "video") == MediaInfo(*shape, 20)


def test_read_video_frames_shape_and_motion(videos):
    frames = read_video_frames(videos["plain"], [0, 3, 6, 9, 12], short_side_cap=None)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    diffs = np.abs(np.diff(frames.astype(int), axis=0)).mean(axis=(1, 2, 3))  # (4,)
    assert diffs.min() > 2.0
    repeated = read_video_frames(videos["plain"], [6, 0, 6], None)
    assert np.array_equal(repeated[0], frames[2]) and np.array_equal(repeated[1], frames[0])


@pytest.mark.parametrize("name, turns", [("rot90", 1), ("rot180", 2), ("rot270", 3)])
def test_rotated_video_comes_out_in_display_orientation(videos, name, turns):
    # Same seed and coded size: the coded pixels are identical, only the display matrix differs.
    # rotation=90 means "turn 90 degrees counter-clockwise to display" (np.rot90 with k=1).
    plain = read_video_frames(videos["plain"], [0, 5], None)
    rotated = read_video_frames(videos[name], [0, 5], None)
    assert np.array_equal(rotated, np.rot90(plain, k=turns, axes=(1, 2)))


def test_decord_and_pyav_agree_on_rotated_clip(videos):
    indices = [0, 2, 5]
    decord_frames = read_decord(videos["big_rot90"], indices)
    pyav_frames = read_pyav(videos["big_rot90"], indices)
    assert decord_frames.shape == pyav_frames.shape == (3, 160, 96, 3)
    assert np.array_equal(decord_frames, pyav_frames)
    # the decord failure the PyAV fallback exists for (get_batch on a small rotated clip)
    with pytest.raises(Exception, match="from_size == to_size"):
        read_decord(videos["rot90"], indices)


def test_ten_bit_video_decodes_close_to_eight_bit(videos):
    eight = read_video_frames(videos["plain"], [0, 10], None).astype(int)
    ten = read_video_frames(videos["p10"], [0, 10], None).astype(int)
    assert ten.shape == (2, 48, 64, 3)
    assert np.abs(ten - eight).mean() < 6
    assert np.abs(read_pyav(videos["p10"], [0, 10]).astype(int) - ten).mean() < 5


def _write_vfr(path, durations_ms: list[int]):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for t, duration in enumerate(durations_ms):
            img = np.full((48, 64, 3), 10 * t, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += duration
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_variable_frame_rate_video(tmp_path):
    path = _write_vfr(tmp_path / "vfr.mp4", [40, 200, 90, 300] * 5)
    assert probe(path, "video").frames == 20
    frames = read_video_frames(path, [0, 7, 19], None)
    assert frames.shape == (3, 48, 64, 3)
    # frame t is a flat grey of 10*t: the indices are frame positions, not timestamps
    assert np.allclose(frames.reshape(3, -1).mean(1), [0, 70, 190], atol=3)
    assert np.array_equal(frames, read_pyav(path, [0, 7, 19]))


@pytest.mark.parametrize(
    "name, cap, shape",
    [
        ("landscape", 32, (32, 48)),  # 64x96 -> short side 32
        ("landscape", 40, (40, 60)),
        ("portrait", 32, (56, 32)),  # 112x64 -> 56x32
        ("portrait", 64, (112, 64)),  # short side == cap: unchanged
        ("landscape", 1024, (64, 96)),  # smaller than the cap: unchanged
    ],
)
def test_short_side_cap(videos, name, cap, shape):
    frames = read_video_frames(videos[name], [0, 4], short_side_cap=cap)
    assert frames.shape == (2, *shape, 3)


def test_cap_short_side_is_bilinear_without_antialias():
    ramp = (np.arange(16) * 2).astype(np.uint8)  # columns 0, 2, 4, ...
    frames = np.broadcast_to(ramp[None, None, :, None], (1, 8, 16, 3)).copy()
    out = cap_short_side(frames, 4)  # 8x16 -> 4x8, exactly 2x down
    # half-pixel centres: output column j samples input 2j + 0.5, the mean of columns 2j, 2j+1
    assert out.shape == (1, 4, 8, 3)
    assert out[0, 0, :, 0].tolist() == [4 * j + 1 for j in range(8)]
    assert cap_short_side(frames, 8) is frames


# ---------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return {
        mode: write_image(d / f"{mode.replace(';', '')}{'.jpg' if mode == 'CMYK' else '.png'}", 40, 56, mode, seed=3)
        for mode in ("RGB", "L", "RGBA", "P", "CMYK", "I;16")
    }  # fmt: skip


def test_probe_image(images):
    assert probe(images["RGB"], "image") == MediaInfo(40, 56, 1)
    assert probe(images["CMYK"], "image") == MediaInfo(40, 56, 1)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16"])
def test_read_image_modes_to_rgb(images, mode):
    from PIL import Image

    rgb = read_image(images[mode])
    assert rgb.shape == (1, 40, 56, 3) and rgb.dtype == np.uint8
    reference = read_image(images["RGB"]).astype(int)  # same seed: same picture
    with Image.open(images[mode]) as image:
        raw = np.asarray(image)
    if mode in ("L", "I;16"):
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    if mode == "L":
        assert np.array_equal(rgb[0, ..., 0], raw)
    elif mode == "I;16":
        assert np.array_equal(rgb[0, ..., 0], np.rint(raw / 257).astype(np.uint8))
        assert raw.max() > 30000 and rgb.max() > 100  # scaled, not clipped to white
        assert (rgb == 255).mean() < 0.01
    elif mode == "RGBA":
        assert np.array_equal(rgb[0], raw[..., :3])  # alpha dropped, colours kept
    else:  # RGB, P (32-colour palette), CMYK JPEG: close to the RGB picture
        assert np.abs(rgb.astype(int) - reference).mean() < 12


# ---------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, videos, images):
    d = tmp_path_factory.mktemp("bad")
    data = videos["plain"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    jpg = write_image(d / "whole.jpg", 64, 64, "RGB").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "text.png").write_text("not an image")
    with av.open(str(d / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return d


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.mp4", "file not found"),
        ("empty.mp4", r"file is empty \(0 bytes\)"),
        ("truncated.mp4", "cannot read as a video"),
        ("text.mp4", "cannot read as a video"),
        ("audio.mp4", "no video stream"),
    ],
)
def test_bad_video_probe(bad_files, name, reason):
    with pytest.raises(DecodeError, match=rf"{name}: {reason}") as info:
        probe(bad_files / name, "video")
    assert info.value.path == str(bad_files / name)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.mp4", "file not found"),
        ("empty.mp4", r"file is empty \(0 bytes\)"),
        ("truncated.mp4", r"cannot decode video after 0 frames: .*decord also failed"),
        ("text.mp4", r"cannot decode video after 0 frames: .*decord also failed"),
        ("audio.mp4", r"no video stream \(decord also failed"),
    ],
)
def test_bad_video_read(bad_files, name, reason):
    with pytest.raises(DecodeError, match=rf"{name}: {reason}"):
        read_video_frames(bad_files / name, [0, 1], None)


def test_index_past_the_end(videos):
    with pytest.raises(
        DecodeError, match=r"plain\.mp4: frame 25 requested but the video decodes to 20"
    ):
        read_video_frames(videos["plain"], [0, 25], None)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.jpg", "file not found"),
        ("truncated.jpg", "cannot decode image: .*[Tt]runcated"),
        ("text.png", "cannot decode image: cannot identify image file"),
    ],
)
def test_bad_image(bad_files, name, reason):
    with pytest.raises(DecodeError, match=rf"{name}: {reason}"):
        read_image(bad_files / name)
    if name == "text.png":
        with pytest.raises(DecodeError, match=rf"{name}: not a readable image"):
            probe(bad_files / name, "image")


def test_decode_error_pickles():
    error = pickle.loads(pickle.dumps(DecodeError("/data/a.mp4", "file not found")))
    assert (error.path, error.reason, str(error)) == (
        "/data/a.mp4",
        "file not found",
        "/data/a.mp4: file not found",
    )
