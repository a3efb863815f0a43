"""`TrainConfig`: every option of `cogfun train`, declared once.

Defaults are those of the original's recommended training command, so `cogfun train` is the
recommended run. Two defaults are read at run time rather than fixed: `--mode` is what the model is
(its transformer's input channels) and batch tiling follows the store (on when it was encoded with
token-length buckets, as the original tiles then). `cogfun train` also takes `cogfun precompute`'s
options (all but `--out`): given `--data` it builds or reuses the store at `--latents` first.
A `--latents` URL stays a string (`cogfun.config.store_paths`); `--storage-options` is never
recorded in a checkpoint; training outputs stay local.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cogfun.common.fields import option
from cogfun.common.modes import MODES
from cogfun.config.store_paths import options_text, storage_options_field, store_path

DEFAULT_MODEL = "models/Diffusion_Transformer/CogVideoX-Fun-2b-InP"


@dataclass(frozen=True)
class TrainConfig:
    latents: list[Path | str] = option(
        help="Zarr store(s) written by `cogfun precompute`: local folders or object-store URLs "
        "(s3://bucket/prefix/latents.zarr, gs://..., az://...). Several train on together "
        "(`--latents A.zarr B.zarr:3`): `:N` (a whole number, default 1) puts each sample of that "
        "store N times in every epoch, as the original's video_repeat does; a batch is always "
        "from one bucket of one store.",
        factory=lambda: [Path("latents.zarr")],
        shown="latents.zarr",
        variadic=True,
    )
    storage_options: str | None = storage_options_field()
    cache_dir: Path | None = option(
        None,
        "Local folder caching what is read of object-store stores (shard bytes, indexes), so "
        "later epochs read local disk; shared safely by processes. Ignored for local stores.",
    )
    cache_max_gb: float | None = option(
        None,
        "--cache-dir: most GB (10^9 bytes) the cache keeps; the least recently used entries go "
        "first. Default: no limit.",
    )
    model: Path = option(
        Path(DEFAULT_MODEL),
        "CogVideoX-Fun model folder; only transformer/ and scheduler/ are loaded.",
        aliases=("pretrained_model_name_or_path",),
    )
    transformer_path: Path | None = option(
        None, "Extra transformer weights (safetensors) loaded over the model's, non-strictly."
    )
    output_dir: Path = option(
        Path("output_dir"),
        "Checkpoints, metrics.jsonl, logs and loss.png go here (a local folder).",
    )
    mode: str | None = option(
        None,
        "inpaint (33-channel input with masks) or normal (16-channel text-to-video). Default: "
        "what the model is (transformer/config.json in_channels 33: inpaint, 16: normal); "
        "widening a 16-channel model to 33 channels needs --mode inpaint given explicitly.",
        aliases=("train_mode",),
        choices=tuple(MODES),
        shown="the model's",
    )
    seed: int = option(
        42, "Seed of noise, timesteps, mask-variant picks, caption dropout and data order."
    )
    train_batch_size: int = option(4, "Samples per process per micro-step (all from one bucket).")
    gradient_accumulation_steps: int = option(1, "Micro-steps per optimizer step.")
    dataloader_num_workers: int = option(
        8, "Store-reading workers (see --dataloader-backend); 0 reads in the training loop."
    )
    dataloader_backend: str = option(
        "threads",
        "threads: workers are threads of the training process sharing one open store (reads, "
        "decompression and checksums release the GIL; no copies, no extra processes); "
        "processes: DataLoader worker processes.",
        choices=("threads", "processes"),
    )
    num_train_epochs: int = option(100, "Epochs to train when --max-train-steps is not given.")
    max_train_steps: int | None = option(
        None, "Total optimizer steps (overrides --num-train-epochs)."
    )
    checkpointing_steps: int = option(
        50, "Save a checkpoint every N optimizer steps (and at the end)."
    )
    checkpoints_total_limit: int | None = option(
        None, "Keep at most this many checkpoints (oldest removed first)."
    )
    resume_from_checkpoint: str | None = option(
        "latest", "latest, a checkpoint path, or none; latest starts fresh when there is none."
    )
    learning_rate: float = option(2e-5, "Learning rate of the trainable modules.")
    scale_lr: bool = option(
        False, "Multiply the learning rate by accumulation x batch x processes."
    )
    lr_scheduler: str = option(
        "constant_with_warmup",
        "diffusers LR schedule name.",
        choices=(
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ),
    )
    lr_warmup_steps: int = option(100, "Warmup length in optimizer steps.")
    use_came: bool = option(
        True, "CAME optimizer (betas 0.9/0.999/0.9999, eps 1e-30/1e-16) instead of AdamW."
    )
    use_8bit_adam: bool = option(
        False,
        "bitsandbytes' 8-bit AdamW (same betas, decay, eps; moments in 8 bits: ~2 instead of 8 "
        "bytes per trained parameter). Needs --no-use-came; not under DeepSpeed or FSDP.",
    )
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(
        3e-2, "AdamW weight decay (not passed to CAME, as in the original)."
    )
    adam_epsilon: float = option(1e-10, "AdamW epsilon.")
    max_grad_norm: float = option(
        0.05, "Gradient clipping norm (also under DeepSpeed, through its gradient_clipping)."
    )
    grad_clip_schedule: str = option(
        "auto",
        "auto = the original's (adaptive without DeepSpeed, fixed under it); adaptive; fixed.",
        choices=("auto", "adaptive", "fixed"),
    )
    abnormal_norm_clip_start: int = option(
        1000, "Adaptive clipping: steps of linear decay, after which abnormal norms clip harder."
    )
    initial_grad_norm_ratio: int = option(
        5, "Adaptive clipping: the first step's clip norm is max_grad_norm times this."
    )
    mixed_precision: str = option(
        "bf16", "Autocast dtype over fp32 master weights.", choices=("bf16", "fp16", "no")
    )
    gradient_checkpointing: bool = option(
        True, "Recompute each transformer block in backward (less memory)."
    )
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    trainable_modules: list[str] = option(
        help="Parameter-name substrings to train ('.' = everything).",
        factory=lambda: ["."],
        variadic=True,
    )
    trainable_modules_low_learning_rate: list[str] = option(
        help="Parameter-name substrings trained at half the learning rate.",
        factory=list,
        variadic=True,
    )
    lora: bool = option(
        False,
        "Train LoRA adapters instead of the whole transformer (the original's train_lora.py); "
        "checkpoints hold the adapters in the original's and diffusers' formats.",
    )
    rank: int = option(128, "--lora: rank of the LoRA update matrices.")
    network_alpha: int = option(64, "--lora: the update is scaled by network_alpha / rank.")
    lora_target_modules: list[str] = option(
        help="--lora: layers that get adapters, by name or dotted suffix (to_q, attn1.to_out.0); "
        "default every Linear of the transformer, as the original.",
        factory=list,
    )
    lora_base_dtype: str = option(
        "auto",
        "--lora: dtype of the frozen base weights; auto = the --mixed-precision dtype (as the "
        "original), fp32 keeps them fp32.",
        choices=("auto", "fp32"),
    )
    use_ema: bool = option(
        False, "Keep an EMA copy of the transformer (saved as transformer_ema/)."
    )
    motion_sub_loss: bool = option(
        False, "Add the frame-difference loss (when more than 2 latent frames)."
    )
    motion_sub_loss_ratio: float = option(0.25, "Weight of the motion sub-loss.")
    uniform_sampling: bool = option(False, "Stratify timesteps across processes.")
    train_sampling_steps: int = option(1000, "Timesteps are drawn from [0, N).")
    caption_dropout: float = option(
        0.1, "Probability of training on the empty caption (classifier-free guidance)."
    )
    auto_tile_batch_size: bool | None = option(
        None,
        "Repeat small batches x2/x4 with fresh noise and timesteps, as the original does whenever "
        "--training_with_video_token_length is on. Default: on when the store was encoded with "
        "token-length buckets; --no-auto-tile-batch-size turns it off.",
        shown="the store's",
    )
    save_dtype: str = option(
        "bf16",
        "dtype of each checkpoint's transformer/ folder (for inference; the original ships bf16). "
        "Resuming always uses the fp32 master weights.",
        choices=("bf16", "fp32"),
    )
    skip_damaged: bool = option(
        False,
        "Skip store samples whose checksum fails instead of stopping (an I/O error is retried, "
        "then stops the run: it is not damage).",
    )
    max_nonfinite_steps: int = option(
        5,
        "Stop after this many optimizer steps in a row whose loss or gradient norm is NaN/inf "
        "(their updates are skipped), saving a final checkpoint of the last finite weights and "
        "exiting with code 3; 0: never stop.",
    )
    use_deepspeed: bool = option(
        False, "Accepted for compatibility: DeepSpeed is what `accelerate launch` set up."
    )
    report_to: str = option("tensorboard", "accelerate tracker: tensorboard, wandb, all or none.")
    logging_dir: str = option("logs", "TensorBoard folder, relative to --output-dir.")
    tracker_project_name: str = option("cogvideox-fun", "Tracker project name.")
    progress: str = option(
        "auto",
        "Progress display: auto (bar on a terminal, log lines otherwise), bar, log, none.",
        choices=("auto", "bar", "log", "none"),
    )
    validation_prompts: list[str] = option(
        help="Prompts sampled during training (several after the flag, as the original), or one "
        ".txt file (a prompt per line) or `cogfun encode-prompts` .safetensors file, or `store`: the prompts "
        "`cogfun precompute --validation-prompts` encoded into the --latents store. Texts go "
        "through T5 once before training; T5 is released before the first step.",
        factory=list,
        variadic=True,
    )
    validation_paths: list[Path] = option(
        help="Start images, one per validation prompt in order: validation samples image to "
        "video from them (as VideoX-Fun's --validation_paths); inpaint mode only.",
        factory=list,
        variadic=True,
    )
    validation_steps: int = option(
        2000, "With --validation-prompts: sample every N optimizer steps (0: never by steps)."
    )
    validation_epochs: int = option(
        5, "With --validation-prompts: sample after epochs 0, N, 2N, ... (0: never by epochs)."
    )
    validation_num_frames: int = option(49, "Frames of each validation video (snapped to 4k+1).")
    validation_height: int = option(512, "Height of the validation videos (multiple of 16).")
    validation_width: int = option(512, "Width of the validation videos (multiple of 16).")
    validation_inference_steps: int = option(50, "Sampler steps of each validation video.")

    def __post_init__(self) -> None:
        # One store may be given as a plain path (the Python API, config files, older code).
        value = self.latents
        stores = [value] if isinstance(value, str | Path) else list(value)
        # A store URL stays a string (Path would fold its `//`); a local store is a Path.
        object.__setattr__(self, "latents", [store_path(p) for p in stores])
        object.__setattr__(self, "storage_options", options_text(self.storage_options))
