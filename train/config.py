"""`TrainConfig`: every option of `cogfun train`, declared once.

Defaults are those of the original's recommended training command (DESIGN.md, "Defaults"), so
`cogfun train --mode inpaint` is the recommended run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cogfun.common.options import option

DEFAULT_MODEL = "models/Diffusion_Transformer/CogVideoX-Fun-2b-InP"


@dataclass(frozen=True)
class TrainConfig:
    latents: Path = option(Path("latents.zarr"), "Zarr store written by `cogfun precompute`.")
    model: Path = option(
        Path(DEFAULT_MODEL),
        "CogVideoX-Fun model folder; only transformer/ and scheduler/ are loaded.",
        aliases=("pretrained_model_name_or_path",),
    )
    transformer_path: Path | None = option(
        None, "Extra transformer weights (safetensors) loaded over the model's, non-strictly."
    )
    output_dir: Path = option(
        Path("output_dir"), "Checkpoints, metrics.jsonl, logs and loss.png go here."
    )
    mode: str = option(
        "inpaint",
        "inpaint (33-channel input with masks) or normal (16-channel text-to-video).",
        aliases=("train_mode",),
        choices=("inpaint", "normal"),
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
        help="Parameter-name substrings to train ('.' = everything).", factory=lambda: ["."]
    )
    trainable_modules_low_learning_rate: list[str] = option(
        help="Parameter-name substrings trained at half the learning rate.", factory=list
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
    auto_tile_batch_size: bool = option(
        False,
        "Repeat small batches x2/x4 with fresh noise and timesteps (VideoX-Fun's --auto_tile_batch_size).",
    )
    skip_damaged: bool = option(
        False, "Skip store samples whose checksum fails instead of stopping."
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
