"""`PrecomputeConfig`: every option of `cogfun precompute`, declared once.

Defaults are those of the original's recommended training command, so `cogfun precompute --data D`
prepares the recommended run. `--mode` defaults to what the model is (see `cogfun.common.modes`).
`--out` may be an object-store URL, kept as a string (`cogfun.config.store_paths`); the client's
`--storage-options` are never recorded in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cogfun.common.fields import option
from cogfun.common.modes import MODES, default_precompute_mode
from cogfun.config.store_paths import options_text, storage_options_field, store_path

DEFAULT_MODEL = "models/Diffusion_Transformer/CogVideoX-Fun-2b-InP"
DEFAULT_STORE = "latents.zarr"


@dataclass(frozen=True)
class PrecomputeConfig:
    data: Path = option(
        help="Dataset root; metadata file_path entries are joined onto it.",
        aliases=("train_data_dir",),
    )
    meta: Path | None = option(
        None,
        "Metadata file (JSON list, JSON Lines or CSV). Default: DATA/metadata.json.",
        aliases=("train_data_meta",),
    )
    model: Path = option(
        Path(DEFAULT_MODEL),
        "CogVideoX-Fun model folder (diffusers layout); only vae/, text_encoder/, tokenizer/ are "
        "loaded, and transformer/config.json is read (its weights are not needed).",
        aliases=("pretrained_model_name_or_path",),
    )
    out: Path | str = option(
        Path(DEFAULT_STORE),
        "Zarr store to write (what `cogfun train --latents` reads): a local folder, or an "
        "object-store URL (s3://bucket/prefix/latents.zarr, gs://..., az://...) below a bucket's "
        "root.",
    )
    storage_options: str | None = storage_options_field()
    mode: str = option(
        None,
        "inpaint draws masks and encodes masked videos; normal skips them. Default: what the "
        "model is (transformer/config.json in_channels 33: inpaint, 16: normal); inpaint when "
        "the model folder has no transformer config.",
        aliases=("train_mode",),
        choices=tuple(MODES),
        shown="the model's",
    )
    seed: int = option(42, "Seed of every per-sample draw (clip start, resolution, frames, masks).")
    image_sample_size: int = option(
        1024,
        "Base edge of image buckets; top of the video size ladder; short-side cap of decoded frames.",
    )
    video_sample_size: int = option(256, "Base edge of video buckets; bottom of the size ladder.")
    token_sample_size: int = option(
        512, "Token budget edge: budget = video_sample_n_frames * token_sample_size**2 pixels."
    )
    video_sample_stride: int = option(3, "Stride between sampled frames, in source frames.")
    video_sample_n_frames: int = option(49, "Most frames per clip (4k+1).")
    video_repeat: int = option(
        1, "Rows per video (each with its own draws); 0 keeps every row once, as VideoX-Fun."
    )
    vae_mini_batch: int = option(
        1, "Samples per VAE encode call (part of the fingerprint: results depend on the batch)."
    )
    shard_samples: int = option(
        512,
        "Samples per shard file (rounded up to whole --vae-mini-batch chunks); fixed when the "
        "store is created, not part of the fingerprint.",
    )
    tokenizer_max_length: int = option(226, "T5 token length (padded and truncated).")
    enable_bucket: bool = option(
        True, "Aspect-ratio buckets instead of a fixed square center crop."
    )
    random_hw_adapt: bool = option(True, "Draw a resolution per sample from the size ladder.")
    training_with_video_token_length: bool = option(
        True, "Pair video resolutions with frame counts from the token budget."
    )
    random_frame_crop: bool = option(
        True, "Draw a shorter 4k+1 frame count (10% of samples) as the original does."
    )
    variants_per_sample: int = option(
        1, "Independently drawn resolution/frame variants stored per video row."
    )
    masks_per_sample: int = option(
        4,
        "Inpaint mask variants per sample; training picks one per step (all-masked variants share one encode).",
    )
    latent_format: str = option(
        "moments",
        "Store VAE posterior moments (fresh sample each step) or one sample (half the size).",
        choices=("moments", "sample"),
    )
    vae_dtype: str = option(
        "auto",
        "VAE compute dtype: auto = bf16 on GPU, fp32 on CPU.",
        choices=("auto", "bf16", "fp32"),
    )
    text_encoder_dtype: str = option(
        "auto",
        "T5 compute dtype: auto = bf16 on GPU, fp32 on CPU.",
        choices=("auto", "bf16", "fp32"),
    )
    vae_slicing: bool = option(False, "Encode one sample at a time inside a chunk (less memory).")
    vae_tiling: bool = option(
        False, "Spatially tiled VAE encode (less memory for large frames; changes results)."
    )
    decode_workers: int = option(
        2, "Processes decoding media ahead of the encoder (0 = decode inline)."
    )
    threads: int = option(
        0, "torch CPU threads per process (0 = torch's default); recorded in the store."
    )
    progress: str = option(
        "auto",
        "Progress display: auto (bar on a terminal, log lines otherwise), bar, log, none.",
        choices=("auto", "bar", "log", "none"),
    )
    validation_prompts: Path | None = option(
        None,
        "Text file of validation prompts (one per line), T5-encoded with the captions into "
        "STORE/validation_prompts.safetensors for `cogfun train --validation-prompts store`; "
        "not part of the fingerprint.",
    )

    def __post_init__(self) -> None:
        # A store URL stays a string (Path would fold its `//`); a local store is a Path.
        object.__setattr__(self, "out", store_path(self.out))
        object.__setattr__(self, "storage_options", options_text(self.storage_options))
        if self.mode is None:
            object.__setattr__(self, "mode", default_precompute_mode(Path(self.model)))

    def meta_path(self) -> Path:
        return self.meta if self.meta is not None else self.data / "metadata.json"
