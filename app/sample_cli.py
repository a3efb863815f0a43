"""`cogfun sample` and `cogfun encode-prompts`.

    cogfun sample --model M --prompt "a dog runs" --out dog.mp4                       # text to video
    cogfun sample --model M --image start.png [--end-image end.png] --prompt ... --out a.mp4
    cogfun sample --model M --video in.mp4 --mask-video mask.mp4 --prompt ... --out b.mp4
    cogfun sample --model M --video in.mp4 --rect 16,48,16,80 --prompt ... --out c.mp4
    cogfun sample --model M --lora lora.safetensors [--lora-weight 0.55] --prompt ... --out d.mp4
    cogfun sample --model M --checkpoint out/checkpoint-500 --prompt ... --out e.mp4   # full or LoRA run
    cogfun encode-prompts --model M --prompts prompts.txt --out prompts.safetensors

Defaults are those of the original's `predict_t2v.py` / `predict_i2v.py` (CogVideoX-Fun): 384x672,
49 frames, 50 steps, guidance 6.0, seed 43, 8 fps, the DDIM_Origin sampler and their negative prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

# The predict scripts' negative prompts (text to video, image to video), verbatim.
NEGATIVE_T2V = (
    "The video is not of a high quality, it has a low resolution. Watermark present in each frame. "
    "The background is solid. Strange body and strange trajectory. Distortion. "
)
NEGATIVE_I2V = (
    "The video is not of a high quality, it has a low resolution. Watermark present in each frame. "
    "Strange motion trajectory.  "
)


def _say(msg: str) -> None:
    typer.echo(f"cogfun sample: {msg}", err=True)


def _fail(command: str, msg: str) -> typer.Exit:
    typer.echo(f"cogfun {command}: {msg}", err=True)
    return typer.Exit(2)


def _device_dtype(device: str | None, dtype: str | None):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise typer.BadParameter(f"choose one of {', '.join(names)}", param_hint="--dtype")
    return dev, names[dtype]


def _encode_texts(model: Path, texts: list[str], device, dtype):
    """T5 embeddings of `texts` (float32, on CPU); T5 is released before returning."""
    import torch
    from cogfun.common.models import encode_prompts, load_text_encoder, load_tokenizer

    tokenizer = load_tokenizer(model)
    encoder = load_text_encoder(model, dtype=dtype).to(device)
    try:
        return encode_prompts(tokenizer, encoder, texts).float().cpu()
    finally:
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
    app.command("encode-prompts")(encode_prompts_command)


def encode_prompts_command(
    model: Path = typer.Option(..., "--model", help="Model folder (tokenizer/ and text_encoder/)."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file: one prompt per line."),
    out: Path = typer.Option(..., "--out", help="Embeddings file to write (.safetensors)."),
    negative_prompt: str = typer.Option(
        "", "--negative-prompt", help="Negative prompt stored beside the prompts (default: empty)."
    ),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
    dtype: str = typer.Option(None, "--dtype", help="T5 dtype: float32, bfloat16, float16."),
) -> None:
    """Run T5 once over a prompt file and save the embeddings (for `sample` and validation)."""
    from cogfun.common.models import ModelFolderError, check_model_folder, model_identity
    from cogfun.common.sample_inputs import save_prompt_embeds

    if not prompts.is_file():
        raise _fail("encode-prompts", f"--prompts {prompts}: file not found")
    texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    if not texts:
        raise _fail("encode-prompts", f"--prompts {prompts}: no prompts (every line is empty)")
    try:
        root = check_model_folder(model, ["tokenizer", "text_encoder"])
    except ModelFolderError as err:
        raise _fail("encode-prompts", str(err)) from err
    dev, dt = _device_dtype(device, dtype)
    embeds = _encode_texts(root, [*texts, negative_prompt], dev, dt)
    ident = model_identity(root, "text_encoder")["sha256"]
    save_prompt_embeds(out, texts, embeds[:-1], negative_prompt, embeds[-1:], ident)
    typer.echo(f"wrote {len(texts)} prompt embeddings {tuple(embeds.shape[1:])} to {out}", err=True)


def sample(
    model: Path = typer.Option(..., "--model", help="Model folder (diffusers layout)."),
    out: Path = typer.Option(..., "--out", help="Video file to write (.mp4)."),
    prompt: str = typer.Option(None, "--prompt", help="Text prompt (encoded with the model's T5)."),
    negative_prompt: str = typer.Option(
        None,
        "--negative-prompt",
        help="Negative prompt (default: the original predict script's for the task).",
    ),
    prompt_embeds: Path = typer.Option(
        None, "--prompt-embeds", help="Embeddings file from `cogfun encode-prompts` (no T5 run)."
    ),
    prompt_index: int = typer.Option(0, "--prompt-index", help="Which prompt of --prompt-embeds."),
    checkpoint: Path = typer.Option(
        None,
        "--checkpoint",
        help="A trained checkpoint-N folder (or its transformer/); a --lora run's checkpoint-N "
        "is merged over the model's transformer (at weight 1.0 unless --lora-weight is given).",
    ),
    lora: Path = typer.Option(
        None,
        "--lora",
        help="LoRA file merged into the transformer (the original's or diffusers' format).",
    ),
    lora_weight: float = typer.Option(
        None,
        "--lora-weight",
        help="Merge weight of the LoRA (default 0.55 for --lora, as the original predict scripts; "
        "1.0 for a LoRA --checkpoint).",
        show_default=False,
    ),
    image: Path = typer.Option(None, "--image", help="Start image: image to video."),
    end_image: Path = typer.Option(None, "--end-image", help="End image (with --image)."),
    video: Path = typer.Option(None, "--video", help="Input video: video inpainting."),
    mask_video: Path = typer.Option(
        None, "--mask-video", help="Mask video or image for --video: white (>= 240) = generate."
    ),
    rect: str = typer.Option(
        None, "--rect", help="y0,y1,x0,x1: generate this rectangle of --video (output pixels)."
    ),
    num_frames: int = typer.Option(49, "--num-frames", help="Frames (snapped to 4k+1)."),
    height: int = typer.Option(384, "--height", help="Height in pixels (multiple of 16)."),
    width: int = typer.Option(672, "--width", help="Width in pixels (multiple of 16)."),
    num_inference_steps: int = typer.Option(50, "--num-inference-steps", help="Sampler steps."),
    guidance_scale: float = typer.Option(6.0, "--guidance-scale", help="Classifier-free guidance."),
    seed: int = typer.Option(43, "--seed", help="Seed of the sampling generator."),
    scheduler: str = typer.Option(
        "DDIM_Origin",
        "--scheduler",
        help="DDIM_Origin, DDIM_Cog, DPM++, Euler, Euler A, PNDM or CogVideoX_DPM.",
    ),
    fps: int = typer.Option(8, "--fps", help="Frame rate of the written mp4."),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
    dtype: str = typer.Option(
        None, "--dtype", help="Model dtype: float32, bfloat16, float16 (default bf16 on GPU)."
    ),
) -> None:
    """Generate a video from a model (and a trained checkpoint): text, image or video to video."""
    from cogfun.common.schedulers import SCHEDULERS

    if (prompt is None) == (prompt_embeds is None):
        raise typer.BadParameter(
            "give exactly one of --prompt and --prompt-embeds", param_hint="--prompt"
        )
    if prompt_embeds is not None and negative_prompt is not None:
        raise typer.BadParameter(
            "--prompt-embeds carries its own negative prompt", param_hint="--negative-prompt"
        )
    if scheduler not in SCHEDULERS:
        raise typer.BadParameter(f"choose one of {', '.join(SCHEDULERS)}", param_hint="--scheduler")
    if image is not None and video is not None:
        raise typer.BadParameter("give --image or --video, not both", param_hint="--image")
    if end_image is not None and image is None:
        raise typer.BadParameter("--end-image needs --image", param_hint="--end-image")
    if video is not None and (mask_video is None) == (rect is None):
        raise typer.BadParameter(
            "--video needs exactly one of --mask-video and --rect", param_hint="--video"
        )
    if video is None and (mask_video is not None or rect is not None):
        raise typer.BadParameter("--mask-video/--rect need --video", param_hint="--mask-video")
    if out.suffix.lower() != ".mp4":
        raise typer.BadParameter(f"{out}: the output is an .mp4 file", param_hint="--out")
    if num_inference_steps < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--num-inference-steps")
    from cogfun.app.sample_run import SampleRequest, run_sample

    request = SampleRequest(
        model=model,
        out=out,
        prompt=prompt,
        negative_prompt=negative_prompt
        if negative_prompt is not None
        else (NEGATIVE_I2V if image is not None else NEGATIVE_T2V),
        prompt_embeds=prompt_embeds,
        prompt_index=prompt_index,
        checkpoint=checkpoint,
        lora=lora,
        lora_weight=lora_weight,
        image=image,
        end_image=end_image,
        video=video,
        mask_video=mask_video,
        rect=rect,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        scheduler=scheduler,
        fps=fps,
    )
    dev, dt = _device_dtype(device, dtype)
    try:
        path = run_sample(request, dev, dt, say=_say)
    except (ValueError, FileNotFoundError) as err:
        raise _fail("sample", str(err)) from err
    except Exception as err:
        from cogfun.common.decode import DecodeError
        from cogfun.common.models import ModelFolderError

        if isinstance(err, ModelFolderError | DecodeError):
            raise _fail("sample", str(err)) from err
        raise
    typer.echo(f"wrote {path}", err=True)
    sys.stderr.flush()
