"""The two ways `bench/train.py` trains, each run in its own subprocess.

- online (the original's scripts/train.py): every step decodes a clip with decord, resizes and crops
  it, draws a mask, VAE-encodes the video and the masked video (posterior samples), T5-encodes the
  caption (VAE and T5 in bf16, as the original), then runs the transformer step;
- store (cogfun): `make_dataloader` over the store with workers (reader threads, or worker
  processes with `--backend processes`), `prepare_batch` in the training process, then the same
  transformer step.

The subprocess is driven over stdin (`run K`: K steps, `quit`) and answers one JSON line per
command on stdout: per-step seconds and the time spent in each data phase, then its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.train_setup import STRIDE, Setup

MAX_GRAD_NORM = 0.05
LR = 2e-5


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: dict[str, Tensor],
    generator: torch.Generator,
) -> None:
    """The transformer step both ways share: loss under bf16 autocast, backward, clip, AdamW."""
    from cogfun.train.loss import compute_loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_loss(model, batch, scheduler, generator=generator)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class OnlineBatches:
    """The original's per-step data work (scripts/train.py's collate_fn and training step: decode,
    mask, VAE and T5), inline (0 workers)."""

    def __init__(self, setup: Setup, seed: int):
        from cogfun.common import models
        from cogfun.common.decode import probe

        self.setup = setup
        self.vae = models.load_vae(setup.model, torch.bfloat16)
        self.t5 = models.load_text_encoder(setup.model, torch.bfloat16)
        self.tokenizer = models.load_tokenizer(setup.model)
        self.text_len = json.loads((setup.model / "transformer" / "config.json").read_text())[
            "max_text_seq_length"
        ]
        self.scaling = float(self.vae.config.scaling_factor)
        rows = json.loads((setup.data / "metadata.json").read_text())
        self.rows = [(setup.data / r["file_path"], r["text"]) for r in rows]
        self.lengths = [probe(path, "video").frames for path, _ in self.rows]
        self.rng = np.random.default_rng(seed)

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(F, 3, H, W) -> posterior sample (1, F_lat, C, h, w), unscaled, float32."""
        x = pixels.permute(1, 0, 2, 3)[None].to(torch.bfloat16)  # (1, 3, F, H, W)
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator)  # (1, C, F_lat, h, w)
        return z.permute(0, 2, 1, 3, 4).float()

    def __call__(self, generator: torch.Generator) -> tuple[dict, dict]:
        from cogfun.common.buckets import resize_cover_crop
        from cogfun.common.decode import clip_indices, read_video_frames
        from cogfun.common.masks import mask_to_latent, masked_video, random_mask
        from cogfun.common.models import encode_prompts
        from cogfun.train.loss import build_inpaint_latents

        t0 = time.perf_counter()
        i = int(self.rng.integers(len(self.rows)))
        path, text = self.rows[i]
        size, frames = self.setup.size, self.setup.frames
        indices = clip_indices(self.lengths[i], STRIDE, frames, self.rng)
        raw = read_video_frames(path, indices, short_side_cap=size)  # (F, H0, W0, 3) uint8
        pixels = resize_cover_crop(raw, size, size)  # (F, 3, H, W)
        mask, _ = random_mask(tuple(pixels.shape), self.rng)  # (F, 1, H, W), 1 = generate
        masked = masked_video(pixels, mask)
        t2v = 0.0 if bool(mask.bool().all()) and self.rng.random() < 0.9 else 1.0
        text = "" if self.rng.random() < 0.1 else text
        t1 = time.perf_counter()
        latents = self._encode(pixels, generator) * self.scaling
        masked_latents = self._encode(masked, generator)
        t2 = time.perf_counter()
        prompt = encode_prompts(self.tokenizer, self.t5, [text], self.text_len)  # (1, L, D)
        t3 = time.perf_counter()
        inpaint = build_inpaint_latents(
            mask_to_latent(mask)[None], masked_latents, torch.tensor([t2v]), self.scaling
        )  # (1, F_lat, 17, h, w)
        batch = {"latents": latents, "inpaint_latents": inpaint, "prompt_embeds": prompt}
        return batch, {"decode": t1 - t0, "vae": t2 - t1, "t5": t3 - t2}


class StoreBatches:
    """cogfun's data path: the store DataLoader with workers, prepare_batch in the training process."""

    def __init__(self, setup: Setup, seed: int, workers: int, backend: str):
        from cogfun.common.store import open_store
        from cogfun.train.data import make_dataloader
        from cogfun.train.loop import CaptionEmbeddings

        self.loader, self.sampler = make_dataloader(
            setup.store,
            batch_size=1,
            num_workers=workers,
            seed=seed,
            rank=0,
            world=1,
            backend=backend,
        )
        reader = open_store(setup.store)
        self.captions = CaptionEmbeddings(reader, torch.device("cpu"))
        self.scaling = reader.scaling_factor
        self.latent_format = reader.layout.latent_format
        self.stream = self._batches()

    def _batches(self):
        epoch = 0
        while True:  # as the training loop: one loader pass per epoch
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def __call__(self, generator: torch.Generator) -> tuple[dict, dict]:
        from cogfun.train.loss import prepare_batch

        t0 = time.perf_counter()
        raw = next(self.stream)
        wait = time.perf_counter() - t0
        batch = prepare_batch(
            raw, self.captions, "inpaint", self.scaling, generator, latent_format=self.latent_format
        )
        return batch, {"wait": wait}


def child_main(args: argparse.Namespace) -> int:
    from cogfun.common.transformer import load_transformer
    from cogfun.train.loss import load_noise_scheduler

    # Answers go to the real stdout; anything a library prints goes to the log (stderr) instead.
    answers, sys.stdout = sys.stdout, sys.stderr
    torch.set_num_threads(args.threads)
    setup = Setup(
        **{
            k: Path(v) if k in ("model", "data", "store") else v
            for k, v in json.loads(args.setup).items()
        }
    )
    if args.child == "online":
        source = OnlineBatches(setup, args.seed)
    else:
        source = StoreBatches(setup, args.seed, args.workers, args.backend)
    model = load_transformer(setup.model)
    model.train()
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=3e-2, eps=1e-10)
    scheduler = load_noise_scheduler(setup.model)
    gen = torch.Generator().manual_seed(args.seed)
    _answer(answers, {"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["run"]:
            rows = []
            for _ in range(int(command[1])):
                t0 = time.perf_counter()
                batch, phases = source(gen)
                train_step(model, optimizer, scheduler, batch, gen)
                rows.append({"step": time.perf_counter() - t0, **phases})
            _answer(answers, {"rows": rows})
        elif command[:1] == ["quit"]:
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report
            # its parent's peak when that is higher.
            _answer(answers, {"maxrss_mb": proc_mb(os.getpid(), "status", "VmHWM")})
            return 0
    return 1


def _answer(out: IO[str], obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def proc_mb(pid: int, file: str, field: str) -> float:
    """A `Field:   N kB` value of /proc/PID/FILE in MB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
