"""Validation videos during `cogfun train`, without T5 or the VAE held while training.

- **Prompts are encoded once, before training.** `--validation-prompts` takes prompt texts (as the
  original), a `.txt` file (one prompt per line), a `cogfun encode-prompts` `.safetensors` file, or
  `store`: the embeddings `cogfun precompute --validation-prompts FILE` wrote into the first
  `--latents` store holding them (`cogfun.common.sample_store`). Texts are encoded by the main
  process with the model's T5 before the transformer is loaded, saved as
  `output_dir/validation/prompts.safetensors` (the encode-prompts format) and T5 is released; an
  embeddings file (or the store's) is read as is and T5 is never built. A store on an object store
  has its file copied to `output_dir/validation/validation_prompts.safetensors` first.
- **Image to video with `--validation-paths`** (VideoX-Fun's `--validation_paths`): one start image
  per prompt, in order; each is checked (read) at start-up and its conditioning is built and
  VAE-encoded during each round, with the VAE that round loads for its decode anyway: nothing is held
  between rounds and the VAE is never loaded outside them, at the cost of one VAE encode per prompt
  and round (small beside the denoising steps). The start image is repeated over the frames with
  frame 0 kept, as `cogfun sample --image` builds it.
- **Every `--validation-steps` optimizer steps, and after every `--validation-epochs`-th epoch** (the
  original's rule: epoch index e finished with e % N == 0), the current weights sample each prompt:
  the EMA weights when `--use-ema` is on (swapped in and back). The VAE is loaded for the decode and
  released after. The transformer's mode is restored; gradients, optimizer and data are untouched and
  every draw comes from generators seeded from `--seed`, so training computes exactly what it would
  without validation (and resumes the same).
- **Every rank takes part.** With whole parameters on every rank (single process, DDP, ZeRO-1/2)
  prompt i is sampled by rank i mod world size on the unwrapped model (no collective inside, so no
  hang); with sharded parameters (ZeRO-3, FSDP2) each forward gathers them collectively, so every
  rank samples every prompt in lockstep and the main process writes the files. All ranks then meet
  at a barrier.
- **Outputs:** `output_dir/validation/step-N/NN.mp4`, a frame strip per prompt in TensorBoard
  (`validation/NN`), and `validation_s`, `validation_videos`, `validation_failed` in that step's
  metrics row. A failure is logged with its traceback and counted; training goes on.

Sampling follows the original's validation: the original's negative prompt "bad detailed", guidance
6.0, the plain DDIMScheduler (`DDIM_Origin`), text to video (image to video with start images).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from cogfun.common import sample_inputs as si
from cogfun.common.modes import mode_facts
from cogfun.common.sample_store import FROM_STORE, NEGATIVE_PROMPT
from cogfun.train import distributed
from cogfun.train.preflight import TrainRefused
from torch import Tensor, nn

log = logging.getLogger(__name__)

GUIDANCE_SCALE = 6.0
SCHEDULER = "DDIM_Origin"
PROMPTS_FILE = "prompts.safetensors"
_STRIP_FRAMES = 8  # frames shown per prompt in TensorBoard


class ValidationError(TrainRefused):
    """--validation-prompts (or the model) cannot be used for validation; the message says why."""


def prompt_source(values: list[str]) -> Path | list[str]:
    """An embeddings file, or the prompt texts (from a .txt file or given directly)."""
    if len(values) == 1 and values[0].endswith((".safetensors", ".txt")):
        path = Path(values[0])
        if not path.is_file():
            raise ValidationError(f"--validation-prompts {path}: file not found")
        if path.suffix == ".safetensors":
            return path
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not texts:
            raise ValidationError(f"--validation-prompts {path}: no prompts in the file")
        return texts
    return list(values)


def _encode_to_file(model_dir: Path, texts: list[str], out: Path, device: torch.device) -> None:
    """T5 over the prompts and the negative prompt, saved; T5 is released before returning."""
    from cogfun.common.models import (
        encode_prompts,
        load_text_encoder,
        load_tokenizer,
        model_identity,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(model_dir)
    encoder = load_text_encoder(model_dir, dtype=dtype).to(device)
    try:
        embeds = encode_prompts(tokenizer, encoder, [*texts, NEGATIVE_PROMPT]).float().cpu()
    finally:
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ident = model_identity(model_dir, "text_encoder")["sha256"]
    si.save_prompt_embeds(out, texts, embeds[:-1], NEGATIVE_PROMPT, embeds[-1:], ident)


@dataclass
class Validation:
    """What a validation round needs; built once by `prepare_validation`."""

    model_dir: Path
    out_dir: Path
    prompts: list[str]
    embeds: Tensor  # (N, L, D) float32, CPU
    negative: Tensor  # (1, L, D)
    every_steps: int
    every_epochs: int
    size: si.SampleSize
    num_inference_steps: int
    seed: int
    sharded: bool = False  # ZeRO-3 / FSDP2: forwards are collective, ranks run in lockstep
    images: list[Path] = field(default_factory=list)  # start images, one per prompt (or none)

    epochs_seen: set[int] = field(default_factory=set)

    def due(self, step: int, finished_epochs: set[int]) -> bool:
        """At every N-th step, and once after each finished epoch e with e % every_epochs == 0."""
        new = finished_epochs - self.epochs_seen
        self.epochs_seen |= finished_epochs
        by_epoch = self.every_epochs > 0 and any(e % self.every_epochs == 0 for e in new)
        return by_epoch or (self.every_steps > 0 and step % self.every_steps == 0)


def prepare_validation(
    cfg: Any, acc: Accelerator, model_dir: Path, transformer_config: dict
) -> Validation | None:
    """Encode or read the validation prompts before training; None when validation is off.

    Called before the transformer loads, so T5 (main process only, texts only) is gone by then.
    """
    if not cfg.validation_prompts:
        if cfg.validation_paths:
            raise ValidationError(
                "--validation-paths gives start images for --validation-prompts, which is not "
                "given: add one prompt per image"
            )
        return None
    from cogfun.common.models import ModelFolderError, check_model_folder

    out_dir = cfg.output_dir / "validation"
    source = prompts_source(cfg, out_dir)
    parts = ["vae"] if isinstance(source, Path) else ["vae", "tokenizer", "text_encoder"]
    try:
        check_model_folder(model_dir, parts)
    except ModelFolderError as err:
        raise ValidationError(f"--validation-prompts needs {', '.join(parts)}: {err}") from err
    images = None
    if isinstance(source, list):
        images = _start_images(cfg, len(source))  # checked before T5 runs
        path = out_dir / PROMPTS_FILE
        if acc.is_main_process:
            log.info("validation: encoding %d prompt(s) with T5 once", len(source))
            _encode_to_file(model_dir, source, path, acc.device)
        acc.wait_for_everyone()
        source = path
    loaded = si.load_prompt_embeds(source)
    width = transformer_config.get("text_embed_dim")
    if width is not None and loaded.embeds.shape[-1] != width:
        raise ValidationError(
            f"--validation-prompts {source}: embeddings of width {loaded.embeds.shape[-1]}, but the "
            f"transformer takes {width} (another model's T5)"
        )
    if images is None:
        images = _start_images(cfg, len(loaded.prompts))
    size = si.snap_size(
        cfg.validation_num_frames,
        cfg.validation_height,
        cfg.validation_width,
        transformer_config,
        lambda msg: log.warning("validation: %s", msg.replace("--", "--validation-")),
    )
    return Validation(
        model_dir=model_dir,
        out_dir=out_dir,
        prompts=loaded.prompts,
        embeds=loaded.embeds,
        negative=loaded.negative_embeds,
        every_steps=cfg.validation_steps,
        every_epochs=cfg.validation_epochs,
        size=size,
        num_inference_steps=cfg.validation_inference_steps,
        seed=cfg.seed,
        sharded=_sharded(),
        images=images,
    )


def prompts_source(cfg: Any, out_dir: Path) -> Path | list[str]:
    """Where validation prompts come from: the prompt list or embeddings file `--validation-prompts`
    names, or with `store` the first `--latents` store's file (copied into `out_dir` from an
    object store, read in place from a local one)."""
    if list(cfg.validation_prompts) != [FROM_STORE]:
        return prompt_source(cfg.validation_prompts)
    from cogfun.common.sample_store import STORE_FILE, find_store_prompts
    from cogfun.common.store import location
    from cogfun.train.stores import parse_latents

    try:
        found = find_store_prompts([spec.path for spec in parse_latents(cfg.latents)])
    except FileNotFoundError as err:
        raise ValidationError(str(err)) from err
    log.info("validation: prompts from the store, %s", found)
    if found.local:
        return found.path
    # Read like any embeddings file: each process copies it (whole, under its own temporary name).
    data = found.read()
    if data is None:
        raise ValidationError(f"--validation-prompts {FROM_STORE}: {found} disappeared")
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / STORE_FILE
    location(copy).write(data)
    return copy


def _start_images(cfg: Any, prompts: int) -> list[Path]:
    """--validation-paths checked: one readable image per prompt, an inpaint-mode run."""
    from cogfun.common.decode import DecodeError, read_image

    paths = [Path(p) for p in cfg.validation_paths]
    if not paths:
        return []
    if len(paths) != prompts:
        raise ValidationError(
            f"--validation-paths: {len(paths)} start image(s) for {prompts} validation prompt(s); "
            "give one image per prompt, in the prompts' order"
        )
    if not mode_facts(cfg.mode).needs_masks:  # the start image is the known part of a mask
        raise ValidationError(
            f"--validation-paths: image to video needs the inpaint transformer (33 input "
            f"channels), but this run trains in --mode {cfg.mode}"
        )
    for path in paths:
        if not path.is_file():
            raise ValidationError(f"--validation-paths {path}: file not found")
        try:
            read_image(path)
        except DecodeError as err:
            raise ValidationError(f"--validation-paths {path}: {err}") from err
    return paths


def _sharded() -> bool:
    plan = distributed.launch_plan()
    return plan.zero_stage == 3 or plan.fsdp_version is not None


def _my_prompts(v: Validation, acc: Accelerator) -> range:
    if v.sharded:
        return range(len(v.prompts))
    return range(acc.process_index, len(v.prompts), acc.num_processes)


def _sample_mine(
    v: Validation, model: nn.Module, acc: Accelerator, folder: Path, written: list[Path]
) -> None:
    """Sample this rank's share of the prompts into `folder`, appending each file to `written`.

    Under mixed precision the VAE runs in that dtype and the transformer under autocast, as in
    training; the fp32 master weights are not copied."""
    from cogfun.common.geometry import latent_shape_of
    from cogfun.common.models import load_vae
    from cogfun.common.sampling import generate, initial_latents
    from cogfun.common.schedulers import build_scheduler, scheduler_config

    mine = _my_prompts(v, acc)
    if not mine:
        return
    device = acc.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        str(acc.mixed_precision), next(model.parameters()).dtype
    )
    vae = load_vae(v.model_dir, dtype=dtype).to(device)
    try:
        for i in mine:
            generator = torch.Generator(device).manual_seed(v.seed + i)
            f_lat, h, w = latent_shape_of(v.size.frames, v.size.height, v.size.width)
            shape = (1, f_lat, vae.config.latent_channels, h, w)
            video, mask = si.image_to_video(v.images[i], None, v.size) if v.images else (None, None)
            with acc.autocast():
                result = generate(
                    model,
                    vae,
                    build_scheduler(SCHEDULER, scheduler_config(v.model_dir)),
                    prompt_embeds=v.embeds[i : i + 1].to(device, dtype),
                    negative_prompt_embeds=v.negative.to(device, dtype),
                    latents=initial_latents(shape, generator),
                    video=video,
                    mask=mask,
                    num_inference_steps=v.num_inference_steps,
                    guidance_scale=GUIDANCE_SCALE,
                    generator=generator,
                )
            if acc.is_main_process or not v.sharded:
                written.append(si.write_mp4(result["video"][0], folder / f"{i:02d}.mp4", fps=8))
    finally:
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _log_strips(acc: Accelerator, folder: Path, step: int) -> None:
    """Frame strips of every prompt's video (all ranks' files) to TensorBoard."""
    try:
        tracker = acc.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return
    if not hasattr(tracker, "add_image"):
        return
    import av
    import numpy as np

    for path in sorted(folder.glob("*.mp4")):
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        pick = np.linspace(0, len(frames) - 1, min(_STRIP_FRAMES, len(frames))).round().astype(int)
        strip = np.concatenate([frames[k] for k in pick], axis=1)  # (H, k*W, 3)
        tracker.add_image(f"validation/{path.stem}", strip, step, dataformats="HWC")


def _ema_params(core: nn.Module, ema: Any) -> list[nn.Parameter]:
    """The parameters `ema` shadows, in its order: all of them, or only the trainable ones (the
    LoRA adapters' EMA keeps just those)."""
    params = list(core.parameters())
    if ema is not None and len(ema.shadow_params) != len(params):
        params = [p for p in params if p.requires_grad]
        if len(ema.shadow_params) != len(params):
            raise ValueError(
                f"the EMA holds {len(ema.shadow_params)} tensors but the model has {len(params)} "
                "trainable ones"
            )
    return params


def run_validation(v: Validation, acc: Accelerator, model: nn.Module, ema: Any, step: int) -> dict:
    """One round on every rank; returns the fields added to this step's metrics row."""
    start = time.perf_counter()
    folder = v.out_dir / f"step-{step}"
    core = distributed.unwrap(acc, model)
    was_training = core.training
    written: list[Path] = []
    failed, params = 0, None
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    try:
        if ema is not None:
            tracked = _ema_params(core, ema)
            ema.store(tracked)
            params = tracked  # stored: restored below whatever happens next
            ema.copy_to(params)
        core.eval()
        _sample_mine(v, core, acc, folder, written)
    except Exception:
        mine = _my_prompts(v, acc)
        failed = len(mine) - len(written) if acc.is_main_process or not v.sharded else 0
        log.exception(
            "validation at step %d failed on rank %d; training goes on", step, acc.process_index
        )
    finally:
        if params is not None:
            ema.restore(params)
        core.train(was_training)
    acc.wait_for_everyone()
    counts = distributed.gather_ints(acc, len(written))
    failures = distributed.gather_ints(acc, failed)
    if acc.is_main_process:
        try:
            _log_strips(acc, folder, step)
        except Exception:
            log.exception("validation at step %d: TensorBoard logging failed", step)
        log.info("validation at step %d: %d video(s) in %s", step, sum(counts), folder)
    return {
        "validation_s": round(time.perf_counter() - start, 3),
        "validation_videos": sum(counts),
        "validation_failed": sum(failures),
    }
