"""Decode videos and images into uint8 frames, and draw clip frame indices (as the original's
cogvideox/data/dataset_image_video.py does).

- `probe(path, kind)` reads only headers: PyAV stream info for videos (frame count, coded size,
  and for mp4/mov the track's display matrix, so a rotated phone clip reports its display size
  without decoding), Pillow's lazy open for images.
- `clip_indices` is the original's frame sampler, bit for bit, with the caller's RNG.
- `read_video_frames` decodes with decord `get_batch` at full size (decord's own resize fails on
  small sizes) and falls back to PyAV when decord fails (decord fails on small rotated clips).
  Both return frames in display orientation. Frames whose short side is above `short_side_cap` are
  then resized bilinearly (no antialias, half-pixel centres: cv2.INTER_LINEAR, as the original).
- `read_image` converts any Pillow mode to RGB `(1, H, W, 3)`. Deviation from the original's plain
  `convert("RGB")`: 16-bit grayscale is scaled to 8 bits instead of clipped (which turns it white).
  EXIF orientation is not applied, as in the original.

Every failure raises `DecodeError`, whose message names the file and the reason.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_RESIZE_CHUNK = 8  # frames resized at once: bounds the float32 copy of a long 1080p clip


class DecodeError(Exception):
    """A file could not be probed or decoded; `.path` and `.reason` say which and why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process boundaries (pickling)
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class MediaInfo:
    """Display size (rotation applied) and frame count (1 for images)."""

    height: int
    width: int
    frames: int


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DecodeError(path, "file not found")
    if not path.is_file():
        raise DecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DecodeError(path, "file is empty (0 bytes)")


def probe(path: str | Path, kind: str) -> MediaInfo:
    """Header-only size and frame count of a video or image (`kind` "video" or "image")."""
    path = Path(path)
    _check_file(path)
    if kind == "image":
        return _probe_image(path)
    if kind == "video":
        return _probe_video(path)
    raise ValueError(f"probe {path}: kind must be 'video' or 'image', got {kind!r}")


def _probe_image(path: Path) -> MediaInfo:
    try:
        with Image.open(path) as image:  # lazy: reads the header, not the pixels
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(path, f"not a readable image: {e}") from None
    return MediaInfo(height, width, 1)


def _probe_video(path: Path) -> MediaInfo:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(path, "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames
            if frames <= 0:  # container without a frame count (e.g. mkv): count packets
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            quarter_turn = None
            if any(name in container.format.name for name in ("mp4", "mov")):
                quarter_turn = _mp4_quarter_turn(path, stream.index)
            if quarter_turn is None:  # not ISO-BMFF: read the rotation off the first frame
                quarter_turn = _first_frame_rotation(container, stream) % 180 != 0
    except av.error.FFmpegError as e:
        raise DecodeError(path, f"cannot read as a video: {e}") from None
    if width <= 0 or height <= 0 or frames <= 0:
        raise DecodeError(path, f"video stream has no frames ({width}x{height}, {frames} frames)")
    if quarter_turn:
        height, width = width, height
    return MediaInfo(height, width, frames)


def _first_frame_rotation(container, stream) -> int:
    for frame in container.decode(stream):
        return int(round(frame.rotation))
    return 0


def _mp4_quarter_turn(path: Path, track_index: int) -> bool | None:
    """Whether the mp4/mov track's display matrix turns it by 90/270 degrees; None if not mp4.

    Reads the `moov/trak/tkhd` matrix directly (PyAV exposes a stream's display matrix only on
    decoded frames). The matrix is [a b u; c d v; x y w] in 16.16 fixed point; a quarter turn has
    a == d == 0.
    """
    moov = _find_box(path, b"moov")
    if moov is None:
        return None
    traks = [payload for kind, payload in _iter_boxes(moov) if kind == b"trak"]
    if track_index >= len(traks):
        return None
    for kind, payload in _iter_boxes(traks[track_index]):
        if kind == b"tkhd" and payload:
            version = payload[0]
            offset = 4 + (48 if version == 1 else 36)  # full-box header, then fixed fields
            if len(payload) < offset + 36:
                return None
            a, _b, _u, _c, d = struct.unpack_from(">5i", payload, offset)
            return a == 0 and d == 0
    return None


def _iter_boxes(data: bytes):
    """(type, payload) of each ISO-BMFF box in `data`."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= len(data):
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = len(data) - pos
        if size < header:
            return
        yield kind, data[pos + header : pos + size]
        pos += size


def _find_box(path: Path, wanted: bytes, limit: int = 256 << 20) -> bytes | None:
    """Payload of the first top-level box of type `wanted`, seeking over the others."""
    with path.open("rb") as f:
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            size, kind = struct.unpack(">I4s", head)
            header = 8
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
                header = 16
            if kind == wanted:
                if size == 0 or size - header > limit:
                    return None
                payload = f.read(size - header)
                return payload if len(payload) == size - header else None
            if size < header:  # size 0 (box runs to EOF) or corrupt
                return None
            f.seek(size - header, 1)


def clip_indices(
    n_total: int,
    stride: int,
    n_frames: int,
    rng: random.Random | np.random.Generator,
    *,
    path: str | Path | None = None,
) -> list[int]:
    """The original's clip sampler (get_batch in cogvideox/data/dataset_image_video.py; drop
    window 0..1).

    k = min(n_frames, n_total // stride) frames spanning clip_len = min(N, (k-1)*stride + 1),
    starting at a uniform draw in [0, N - clip_len] (inclusive; no draw when the clip fills the
    video), indices = linspace(start, start + clip_len - 1, k) truncated to int. Raises DecodeError
    (naming `path`) when the video is too short for one frame (k == 0).
    """
    if stride < 1 or n_frames < 1:
        raise ValueError(f"stride and n_frames must be >= 1, got {stride} and {n_frames}")
    k = min(n_frames, n_total // stride)
    if k == 0:
        raise DecodeError(
            path,
            f"video too short for one clip: {n_total} frames, stride {stride} needs >= {stride}",
        )
    clip_len = min(n_total, (k - 1) * stride + 1)
    start = 0 if clip_len == n_total else _randint(rng, 0, n_total - clip_len)
    return np.linspace(start, start + clip_len - 1, k).astype(int).tolist()


def _randint(rng: random.Random | np.random.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high], inclusive (Python `random.randint` semantics)."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng)}")


def read_video_frames(
    path: str | Path, indices: list[int], short_side_cap: int | None
) -> np.ndarray:
    """Frames `indices` of a video in display orientation, short side capped: (k, H, W, 3) uint8."""
    path = Path(path)
    _check_file(path)
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"read_video_frames {path}: indices must be non-empty and >= 0")
    try:
        frames = read_decord(path, indices)
    except Exception as decord_error:  # decord raises bare RuntimeError/DECORDError subclasses
        try:
            frames = read_pyav(path, indices)
        except DecodeError as e:
            raise DecodeError(path, f"{e.reason} (decord also failed: {decord_error})") from None
    return cap_short_side(frames, short_side_cap)


def read_decord(path: Path, indices: list[int]) -> np.ndarray:
    import decord  # imported lazily: it loads its own FFmpeg and is not needed for probing

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=2)
    try:
        if max(indices) >= len(reader):
            raise IndexError(f"frame {max(indices)} requested, decord sees {len(reader)} frames")
        frames = reader.get_batch(indices).asnumpy()  # (k, H, W, 3)
    finally:
        del reader
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise ValueError(f"decord returned frames of shape {frames.shape}")
    return frames


def read_pyav(path: Path, indices: list[int]) -> np.ndarray:
    """Decode sequentially up to the last wanted frame; frames are counted in presentation order."""
    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    seen = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    got[i] = _display_rgb(frame)
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        raise DecodeError(path, f"cannot decode video after {seen} frames: {e}") from None
    if len(got) < len(wanted):
        raise DecodeError(path, f"frame {last} requested but the video decodes to {seen} frames")
    return np.stack([got[i] for i in indices])


def _display_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 in display orientation: undo the display matrix's counter-clockwise turn."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = int(round(frame.rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def cap_short_side(frames: np.ndarray, short_side_cap: int | None) -> np.ndarray:
    """Resize (k, H, W, 3) uint8 so the short side equals the cap, only when it is larger.

    As the original's `resize_frame`: the long side becomes int(cap * long / short); bilinear with
    half-pixel centres and no antialias, which is what cv2.resize's INTER_LINEAR does.
    """
    k, h, w, _ = frames.shape
    if short_side_cap is None or min(h, w) <= short_side_cap:
        return frames
    if h < w:
        size = (short_side_cap, int(short_side_cap * w / h))
    else:
        size = (int(short_side_cap * h / w), short_side_cap)
    out = np.empty((k, *size, 3), dtype=np.uint8)
    for s in range(0, k, _RESIZE_CHUNK):
        x = torch.from_numpy(frames[s : s + _RESIZE_CHUNK]).permute(0, 3, 1, 2).float()  # (c,3,H,W)
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        out[s : s + _RESIZE_CHUNK] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def read_image(path: str | Path) -> np.ndarray:
    """Any Pillow image as RGB uint8 (1, H, W, 3)."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DecodeError(path, f"cannot decode image: {e}") from None
    return rgb[None]


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8. 16-bit grayscale is scaled (round(v * 255 / 65535)), not clipped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        v = np.clip(np.asarray(image).astype(np.int64), 0, 65535)  # (H, W)
        v8 = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(v8[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))  # a writable copy (torch warns on read-only arrays)
