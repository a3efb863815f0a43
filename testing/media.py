"""Sample media for tests, the demo and benchmarks: small H.264 videos, still images, metadata.

Everything is generated offline and seeded: the same arguments give the same bytes (libx264 and the
PNG/JPEG encoders are deterministic for a fixed input).

    from cogfun.testing.media import make_sample_dataset
    meta = make_sample_dataset("/tmp/data")     # /tmp/data/metadata.json + videos/ + images/

Videos hold moving content (a drifting two-colour gradient and a bouncing square), so consecutive
frames differ and a VAE or a frame sampler has something to see. Images come in RGB and in the odd
modes real datasets contain (grayscale, RGBA, palette, CMYK JPEG, 16-bit grayscale).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

IMAGE_MODES = ("RGB", "L", "RGBA", "P", "CMYK", "I;16")

# Modes each still-image format can hold (what write_image checks before saving).
_FORMAT_MODES = {
    ".png": {"RGB", "L", "RGBA", "P", "I;16"},
    ".jpg": {"RGB", "L", "CMYK"},
    ".jpeg": {"RGB", "L", "CMYK"},
}

# (height, width, frames) of the sample dataset's videos: square, landscape, portrait, and one
# length that is not 4k+1, cycled when more videos are asked for.
SAMPLE_VIDEO_SPECS = ((64, 64, 33), (64, 96, 25), (112, 64, 49), (80, 80, 20))
# (mode, height, width, suffix) of the sample dataset's images, cycled.
SAMPLE_IMAGE_SPECS = (
    ("RGB", 64, 96, ".jpg"),
    ("RGBA", 80, 64, ".png"),
    ("P", 64, 64, ".png"),
    ("L", 48, 80, ".png"),
    ("CMYK", 64, 80, ".jpg"),
    ("I;16", 72, 56, ".png"),
)
METADATA_FORMATS = ("json", "jsonl", "csv")

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
_SUBJECTS = ("square", "block", "tile", "patch")
_MOTIONS = ("drifts", "bounces", "slides", "glides")
_SCENES = ("a soft gradient", "a striped backdrop", "a pale field", "a dusky sky")


def _scene_params(rng: np.random.Generator, height: int, width: int) -> dict:
    """Seeded colours, square size, start position and velocity for one clip or image."""
    side = max(4, min(height, width) // 4)
    return {
        "c0": rng.uniform(20, 235, size=3),
        "c1": rng.uniform(20, 235, size=3),
        "square": rng.uniform(0, 255, size=3),
        "freq": rng.uniform(0.5, 1.5, size=2),
        "side": side,
        "pos": rng.uniform(0, 1, size=2) * (height - side, width - side),
        "vel": rng.choice([-1, 1], size=2) * rng.uniform(1.0, 3.0, size=2),
    }


def _bounce(x: float, span: int) -> int:
    """Fold a free coordinate into [0, span] like a ball bouncing between two walls."""
    if span <= 0:
        return 0
    x = abs(x) % (2 * span)
    return int(2 * span - x if x > span else x)


def _render(p: dict, height: int, width: int, t: float) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 at time t: a moving gradient plus a bouncing square."""
    y = np.arange(height, dtype=np.float64)[:, None] / height
    x = np.arange(width, dtype=np.float64)[None, :] / width
    fy, fx = p["freq"]
    # The gradient's phase moves with t so every pixel changes from frame to frame.
    g = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y - 0.05 * t))  # (H, W)
    img = (1 - g)[..., None] * p["c0"] + g[..., None] * p["c1"]  # (H, W, 3)
    side = p["side"]
    top = _bounce(p["pos"][0] + p["vel"][0] * t, height - side)
    left = _bounce(p["pos"][1] + p["vel"][1] * t, width - side)
    img[top : top + side, left : left + side] = p["square"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_video(
    path: str | Path,
    frames: int,
    height: int,
    width: int,
    fps: int = 8,
    seed: int = 0,
    rotation: int = 0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
) -> Path:
    """Write an mp4 of `frames` coded frames of height x width with moving content; returns the path.

    `rotation` (degrees counter-clockwise, a multiple of 90) is stored as the stream's display
    matrix, as phones do: the coded frames stay height x width and readers that honour the matrix
    show width x height for 90/270. 4:2:0 pixel formats need an even height and width; odd sizes are
    rejected rather than silently changed.
    """
    path = Path(path)
    if frames < 1:
        raise ValueError(f"write_video {path}: frames must be >= 1, got {frames}")
    if height < 2 or width < 2:
        raise ValueError(f"write_video {path}: height and width must be >= 2, got {height}x{width}")
    if "420" in pix_fmt and (height % 2 or width % 2):
        raise ValueError(
            f"write_video {path}: {pix_fmt} needs an even height and width, got {height}x{width}"
        )
    if rotation % 90:
        raise ValueError(f"write_video {path}: rotation must be a multiple of 90, got {rotation}")
    params = _scene_params(np.random.default_rng(seed), height, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # x264's SIMD code made the bytes differ between calls in one process (the same frames,
        # a different earlier encode); its C path is deterministic and fast enough for samples.
        options = {"x264-params": "asm=0"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation % 360:
            stream.set_display_rotation(rotation)
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(_render(params, height, width, t), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def write_image(
    path: str | Path, height: int, width: int, mode: str = "RGB", seed: int = 0
) -> Path:
    """Write a still image of height x width in `mode` (one of IMAGE_MODES); returns the path.

    The format follows the suffix: .png holds RGB, L, RGBA, P and I;16; .jpg/.jpeg hold RGB, L and
    CMYK. I;16 uses the full 16-bit range, so a reader that clips instead of scaling shows white.
    """
    path = Path(path)
    if mode not in IMAGE_MODES:
        raise ValueError(f"write_image {path}: mode must be one of {IMAGE_MODES}, got {mode!r}")
    suffix = path.suffix.lower()
    allowed = _FORMAT_MODES.get(suffix)
    if allowed is None:
        raise ValueError(f"write_image {path}: suffix must be one of {sorted(_FORMAT_MODES)}")
    if mode not in allowed:
        raise ValueError(
            f"write_image {path}: {suffix} cannot hold mode {mode}; use {_suffix_for(mode)}"
        )
    rng = np.random.default_rng(seed)
    rgb = _render(_scene_params(rng, height, width), height, width, t=0.0)  # (H, W, 3)
    base = Image.fromarray(rgb)
    if mode == "RGB":
        image = base
    elif mode == "RGBA":
        alpha = np.linspace(64, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
        image = Image.fromarray(np.dstack([rgb, np.rint(alpha).astype(np.uint8)]))
    elif mode == "P":
        image = base.quantize(colors=32)
    elif mode == "I;16":
        # A smooth 16-bit luminance ramp with fine steps (not just 8-bit values times 257).
        lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0  # (H, W)
        ramp = np.linspace(0.0, 1.0, height * width).reshape(height, width)
        image = Image.fromarray(np.rint((0.5 * lum + 0.5 * ramp) * 65535).astype(np.uint16))
    else:  # L, CMYK
        image = base.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _suffix_for(mode: str) -> str:
    return ".jpg" if mode == "CMYK" else ".png"


def _caption(rng: np.random.Generator) -> str:
    colour, subject, motion, scene = (
        rng.choice(_COLOURS),
        rng.choice(_SUBJECTS),
        rng.choice(_MOTIONS),
        rng.choice(_SCENES),
    )
    return f"a {colour} {subject} {motion} across {scene}"


def make_sample_dataset(
    root: str | Path, n_videos: int = 4, n_images: int = 3, seed: int = 0, fmt: str = "json"
) -> Path:
    """Write videos/ and images/ under `root` plus metadata in the original's format; returns its path.

    Metadata rows are `{"file_path": <relative to root>, "text": caption, "type": "video"|"image"}`,
    videos first, in `metadata.json` (a JSON list), `metadata.jsonl` or `metadata.csv` per `fmt`.
    Videos cycle through SAMPLE_VIDEO_SPECS and images through SAMPLE_IMAGE_SPECS.
    """
    if fmt not in METADATA_FORMATS:
        raise ValueError(f"make_sample_dataset: fmt must be one of {METADATA_FORMATS}, got {fmt!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    for i in range(n_videos):
        height, width, frames = SAMPLE_VIDEO_SPECS[i % len(SAMPLE_VIDEO_SPECS)]
        rel = f"videos/video_{i:03d}.mp4"
        write_video(root / rel, frames, height, width, seed=seed * 1000 + i)
        rows.append({"file_path": rel, "text": _caption(rng), "type": "video"})
    for i in range(n_images):
        mode, height, width, suffix = SAMPLE_IMAGE_SPECS[i % len(SAMPLE_IMAGE_SPECS)]
        rel = f"images/image_{i:03d}{suffix}"
        write_image(root / rel, height, width, mode=mode, seed=seed * 1000 + 500 + i)
        rows.append({"file_path": rel, "text": _caption(rng), "type": "image"})
    return _write_metadata(root / f"metadata.{fmt}", rows, fmt)


def _write_metadata(path: Path, rows: list[dict[str, str]], fmt: str) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_path", "text", "type"])
            writer.writeheader()
            writer.writerows(rows)
    return path
