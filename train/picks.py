"""Which mask variant a training step uses, worked out by the loader before it reads the batch.

A store sample holds K mask variants (masks and masked-video latents), and a training micro-step
uses one per tiled copy of the sample, drawn from the micro-step's generator (`step_seed`) after
the posterior sample of the latents (`cogfun.train.loss.prepare_batch`). That draw depends only on
the seed, the rank, the step and micro-step, the batch's size and tiling and the latents' shape,
all known before the batch is read, so the loader makes the same draws (`VariantPicker.picks`)
and reads only the variants they pick (a real 2b-InP batch of 4, K = 4: 32 MB read instead of 69,
`python -m bench.loader`).

The loader hands each batch's position (step, micro-step) over with the batch; the step draws
again from its own generator, exactly as without the picker (same losses), and refuses a batch
whose read variants do not cover its draw (`prepare_batch`: a bug never trains on zeros). Where
the loader cannot know the position (a loader iterated by hand), every variant is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from cogfun.common.modes import mode_facts

Position = tuple[int, int]  # (optimizer step, micro-step) a batch is trained at


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of one micro-step's generator: independent across ranks, steps and micro-steps."""
    digest = hashlib.sha256(f"cogfun-train:{seed}:{rank}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: manual_seed's safe range


@dataclass(frozen=True)
class VariantPicker:
    """The training step's variant draw, for the loader (picklable: worker processes get a copy).

    `variants` is K, the variants the step draws from; 0 when the step uses none (normal mode):
    then no variant is read at all. `tiles` maps a bucket name to its batch tiling factor
    (`loop.tile_batch`; absent: 1). `latent_format` says whether the step first draws a posterior
    sample of the latents ("moments") or not ("sample").
    """

    seed: int
    rank: int
    accumulation: int
    latent_format: str
    variants: int
    tiles: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def for_run(cls, cfg: Any, accelerator: Any, layout: Any, tiles: Mapping[str, int]) -> Self:
        """The picker of a run (`cogfun.train.setup`): the step's seed, rank and accumulation,
        what it draws before the variant (`layout.latent_format`, `tiles`) and K (0 when the
        mode uses no mask)."""
        needs = mode_facts(cfg.mode).needs_masks
        return cls(
            seed=cfg.seed,
            rank=accelerator.process_index,
            accumulation=accelerator.gradient_accumulation_steps,
            latent_format=layout.latent_format,
            variants=layout.masks_per_sample if needs else 0,
            tiles=dict(tiles),
        )

    def after(self, at: Position) -> Position:
        """The position of the batch that follows one trained at `at`."""
        step, micro = at
        micro += 1
        return (step + 1, 0) if micro == self.accumulation else (step, micro)

    def picks(
        self, bucket: str, latent_shape: tuple[int, ...], size: int, at: Position
    ) -> list[list[int]]:
        """The variants each of the `size` samples of a `bucket` batch trained at `at` needs:
        one per tiled copy (copy j of sample i is row j * size + i of the tiled batch), sorted and
        without repeats. `latent_shape` is the bucket's (F_lat, C, h, w), C the VAE channels."""
        if not self.variants:
            return [[] for _ in range(size)]
        from cogfun.common.posterior import standard_normal
        from cogfun.train.loss import pick_variants

        tiles = self.tiles.get(bucket, 1)
        rows = size * tiles
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.rank, *at))
        if self.latent_format == "moments":  # the posterior sample of the latents comes first
            standard_normal((rows, *latent_shape), generator, torch.device("cpu"))
        drawn = pick_variants(torch.zeros(rows, self.variants, dtype=torch.bool), generator)
        drawn = drawn.view(tiles, size)
        return [sorted(set(drawn[:, i].tolist())) for i in range(size)]
