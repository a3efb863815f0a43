"""What `cogfun sample` feeds the sampler: sizes the model accepts, input video and mask, mp4 output,
and the prompt-embeddings file of `cogfun encode-prompts`.

Inputs are built as the original's predict scripts build them (`get_image_to_video_latent` and
`get_video_to_video_latent` in CogVideoX-Fun's `cogvideox/utils/utils.py`): a video in [0, 1]
(1, 3, F, H, W) and a mask (1, 1, F, H, W) with 255 = generate, 0 = keep.

**Prompt-embeddings file** (safetensors, written by `cogfun encode-prompts`):

| tensor | shape | meaning |
|---|---|---|
| `prompt_embeds` | (N, 226, D) float32 | T5 hidden states of the N prompts, in file order |
| `negative_prompt_embeds` | (1, 226, D) float32 | the negative prompt's (the empty prompt when none given) |

Metadata (all strings): `format` = `cogfun-prompt-embeds`, `version` = `1`, `prompts` (a JSON list),
`negative_prompt`, `max_length`, `text_encoder_sha256` (of the model's `text_encoder/` files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cogfun.common.geometry import VAE_TEMPORAL, frames_4k1, latent_frames
from PIL import Image
from torch import Tensor

EMBEDS_FORMAT = "cogfun-prompt-embeds"
EMBEDS_VERSION = "1"
MASK_THRESHOLD = 240  # the original's mask-image rule: gray >= 240 generates, darker is kept
_SIZE_STEP = 16  # 8x VAE, then 2x2 patches


@dataclass(frozen=True)
class SampleSize:
    frames: int
    height: int
    width: int


def snap_size(
    frames: int,
    height: int,
    width: int,
    transformer_config: dict,
    say: Callable[[str], None],
) -> SampleSize:
    """The nearest size the model takes at or below the request (V1.5 pads frames up), said via `say`.

    Frames: 4k+1 (rounded down, as the predict scripts do); on `patch_size_t` models an odd latent
    count gets one more latent frame (4 frames), as their predict scripts pad; non-rotary (2b) models
    stop at their positional table's `sample_frames`. Height and width: multiples of 16.
    """
    if frames < 1 or height < _SIZE_STEP or width < _SIZE_STEP:
        raise ValueError(
            f"--num-frames must be >= 1 and --height/--width >= {_SIZE_STEP}, got "
            f"{frames} x {height} x {width}"
        )
    new_frames = frames_4k1(frames)
    p_t = transformer_config.get("patch_size_t")
    if p_t:
        latents = latent_frames(new_frames)
        if latents % p_t:
            new_frames += (p_t - latents % p_t) * VAE_TEMPORAL
    if not transformer_config.get("use_rotary_positional_embeddings", False):
        cap = int(transformer_config.get("sample_frames", 49))
        new_frames = min(new_frames, frames_4k1(cap))
    size = SampleSize(
        new_frames, height // _SIZE_STEP * _SIZE_STEP, width // _SIZE_STEP * _SIZE_STEP
    )
    if size.frames != frames:
        why = "4k+1 frames" + (", an even number of latent frames" if p_t else "")
        if not transformer_config.get("use_rotary_positional_embeddings", False):
            why += f", at most {transformer_config.get('sample_frames', 49)} frames"
        say(f"--num-frames {frames} -> {size.frames} (this model takes {why})")
    if (size.height, size.width) != (height, width):
        say(
            f"--height/--width {height}x{width} -> {size.height}x{size.width} "
            f"(multiples of {_SIZE_STEP})"
        )
    return size


def _resize_rgb(rgb: np.ndarray, height: int, width: int, bicubic: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3): PIL's default bicubic (as the original resizes its start
    and end images) or bilinear (as cv2.resize resizes its input video's frames)."""
    method = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    return np.array(Image.fromarray(rgb).resize((width, height), method))


def image_to_video(start: Path, end: Path | None, size: SampleSize) -> tuple[Tensor, Tensor]:
    """Start image repeated over all frames, frame 0 kept; with an end image the last frame is kept too."""
    from cogfun.common.decode import read_image

    first = _resize_rgb(read_image(start)[0], size.height, size.width, bicubic=True)
    video = torch.from_numpy(first).permute(2, 0, 1)[:, None].repeat(1, size.frames, 1, 1)
    mask = torch.full((1, size.frames, size.height, size.width), 255.0)
    mask[:, 0] = 0
    if end is not None:
        last = _resize_rgb(read_image(end)[0], size.height, size.width, bicubic=True)
        video[:, -1] = torch.from_numpy(last).permute(2, 0, 1)
        mask[:, -1] = 0
    return video[None].float() / 255, mask[None]


def read_input_video(path: Path, size: SampleSize) -> Tensor:
    """The first `size.frames` frames of a video, resized: (1, 3, F, H, W) in [0, 1]."""
    from cogfun.common.decode import DecodeError, probe, read_video_frames

    info = probe(path, "video")
    if info.frames < size.frames:
        raise DecodeError(
            path, f"has {info.frames} frames, fewer than the {size.frames} to generate"
        )
    frames = read_video_frames(path, list(range(size.frames)), None)  # (F, H0, W0, 3)
    resized = np.stack([_resize_rgb(f, size.height, size.width, bicubic=False) for f in frames])
    return torch.from_numpy(resized).permute(3, 0, 1, 2)[None].float() / 255


def read_mask(path: Path, size: SampleSize) -> Tensor:
    """A mask video (or one image for every frame): gray >= 240 generates. (1, 1, F, H, W) in {0, 255}."""
    from cogfun.common.decode import DecodeError, probe, read_image, read_video_frames

    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        frames = np.repeat(read_image(path), size.frames, axis=0)
    else:
        info = probe(path, "video")
        if info.frames < size.frames:
            raise DecodeError(
                path, f"mask video has {info.frames} frames, fewer than the {size.frames} needed"
            )
        frames = read_video_frames(path, list(range(size.frames)), None)
    gray = np.stack(
        [
            np.asarray(
                Image.fromarray(f)
                .convert("L")
                .resize((size.width, size.height), Image.Resampling.BILINEAR)
            )
            for f in frames
        ]
    )  # (F, H, W)
    mask = torch.from_numpy((gray >= MASK_THRESHOLD).astype(np.float32) * 255)
    return mask[None, None]


def parse_rect(text: str, size: SampleSize) -> tuple[int, int, int, int]:
    """`y0,y1,x0,x1` in output pixels (end exclusive), checked against the output size."""
    try:
        y0, y1, x0, x1 = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--rect {text!r}: expected four integers y0,y1,x0,x1") from None
    if not (0 <= y0 < y1 <= size.height and 0 <= x0 < x1 <= size.width):
        raise ValueError(
            f"--rect {text!r}: needs 0 <= y0 < y1 <= {size.height} and 0 <= x0 < x1 <= "
            f"{size.width} (the output size)"
        )
    return y0, y1, x0, x1


def rect_mask(rect: tuple[int, int, int, int], size: SampleSize) -> Tensor:
    """Generate inside the rectangle on every frame, keep the rest: (1, 1, F, H, W) in {0, 255}."""
    y0, y1, x0, x1 = rect
    mask = torch.zeros(1, 1, size.frames, size.height, size.width)
    mask[..., y0:y1, x0:x1] = 255
    return mask


def write_mp4(video: Tensor, path: Path, fps: int) -> Path:
    """(3, F, H, W) in [0, 1] -> H.264 mp4 (yuv420p). Pixels are `(x * 255)` truncated, as the
    original's `save_videos_grid` writes them."""
    import av

    frames = (video.permute(1, 2, 3, 0).cpu().float() * 255).numpy().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_prompt_embeds(
    path: Path,
    prompts: list[str],
    embeds: Tensor,
    negative_prompt: str,
    negative_embeds: Tensor,
    text_encoder_sha256: str,
) -> Path:
    """Write the prompt-embeddings file (format in the module docstring)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": EMBEDS_FORMAT,
        "version": EMBEDS_VERSION,
        "prompts": json.dumps(prompts),
        "negative_prompt": negative_prompt,
        "max_length": str(embeds.shape[1]),
        "text_encoder_sha256": text_encoder_sha256,
    }
    tensors = {
        "prompt_embeds": embeds.float().contiguous().cpu(),
        "negative_prompt_embeds": negative_embeds.float().contiguous().cpu(),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


@dataclass(frozen=True)
class PromptEmbeds:
    prompts: list[str]
    embeds: Tensor  # (N, L, D)
    negative_prompt: str
    negative_embeds: Tensor  # (1, L, D)


def load_prompt_embeds(path: Path) -> PromptEmbeds:
    """Read a prompt-embeddings file, checking its format and shapes; errors name the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if (
                meta.get("format") != EMBEDS_FORMAT
                or not {
                    "prompt_embeds",
                    "negative_prompt_embeds",
                }
                <= names
            ):
                raise ValueError(
                    f"{path} is not a `cogfun encode-prompts` file (format "
                    f"{meta.get('format')!r}, tensors {sorted(names)})"
                )
            embeds = f.get_tensor("prompt_embeds")
            negative = f.get_tensor("negative_prompt_embeds")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    prompts = json.loads(meta.get("prompts", "[]"))
    if embeds.ndim != 3 or negative.shape != (1, *embeds.shape[1:]) or len(prompts) != len(embeds):
        raise ValueError(
            f"{path}: inconsistent shapes (prompt_embeds {tuple(embeds.shape)}, "
            f"negative_prompt_embeds {tuple(negative.shape)}, {len(prompts)} prompts)"
        )
    return PromptEmbeds(prompts, embeds, meta.get("negative_prompt", ""), negative)
