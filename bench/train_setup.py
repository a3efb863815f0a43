"""Set-up of `bench/train.py`: model folder, generated clips, the precomputed store and its replica.

Everything is written under the benchmark's work folder and reused when already there: the model
folder, `--clips` square clips (`write_video`) with a metadata.json, the store `cogfun precompute`
writes from them (every clip in one size x size x frames bucket) and a copy of that store with
`--epoch-samples` slots written in bulk through the store API (so an epoch is not a handful of
steps, which would make the loader restart its prefetch every few steps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

STRIDE = 3  # video_sample_stride of the recommended command
CAPTIONS = [
    "a red ball rolling across a green field",
    "a dog running on the beach at sunset",
    "a small boat moving slowly on the lake",
    "a white bird flying over the city",
]


@dataclasses.dataclass(frozen=True)
class Setup:
    model: Path
    data: Path
    store: Path  # what the store way trains on (replicated)
    size: int  # square bucket edge in pixels
    frames: int


def write_model(folder: Path, tiny: bool) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    if tiny:
        from cogfun.testing.tiny import write_tiny_model

        return write_tiny_model(folder, variant="2b-inp", seed=0)
    from bench.models import write_proportional_model

    return write_proportional_model(folder, seed=0)


def write_clips(root: Path, n: int, frames: int, side: int) -> Path:
    """n square clips with enough frames for one `frames`-frame clip at stride 3, + metadata.json."""
    from cogfun.testing.media import write_video

    meta = root / "metadata.json"
    rows = [
        {
            "file_path": f"videos/clip_{i:02d}.mp4",
            "text": CAPTIONS[i % len(CAPTIONS)],
            "type": "video",
        }
        for i in range(n)
    ]
    if meta.is_file() and json.loads(meta.read_text()) == rows:
        return meta
    for i, row in enumerate(rows):
        write_video(root / row["file_path"], frames * STRIDE + 3, side, side, seed=i)
    meta.write_text(json.dumps(rows, indent=2) + "\n")
    return meta


def precompute_store(setup: Setup, out: Path, threads: int) -> Path:
    """`cogfun precompute` with settings that put every clip in one size x size x frames bucket."""
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.run import run

    text_len = json.loads((setup.model / "transformer" / "config.json").read_text())[
        "max_text_seq_length"
    ]
    config = PrecomputeConfig(
        data=setup.data,
        model=setup.model,
        out=out,
        image_sample_size=setup.size,
        video_sample_size=setup.size,
        token_sample_size=setup.size,
        video_sample_stride=STRIDE,
        video_sample_n_frames=setup.frames,
        random_hw_adapt=False,
        training_with_video_token_length=False,
        random_frame_crop=False,
        tokenizer_max_length=text_len,
        vae_dtype="bf16",  # as the online way (and the original) encodes
        text_encoder_dtype="bf16",
        decode_workers=0,
        threads=threads,
        progress="none",
    )
    if run(config) != 0:
        raise RuntimeError(f"precompute of {setup.data} into {out} failed (see its log above)")
    return out


def replicate_store(src: Path, dst: Path, samples: int) -> Path:
    """A store holding the samples of `src` repeated up to `samples` slots, written in bulk."""
    from cogfun.common.store import (
        BucketPlan,
        RowPlan,
        StoreError,
        StorePlan,
        open_for_write,
        open_store,
    )

    reader = open_store(src)
    try:
        if sum(len(b.slots) for b in open_store(dst).buckets.values()) == samples:
            return dst
    except StoreError:
        pass
    sources = [(name, int(s)) for name, info in reader.buckets.items() for s in info.slots]
    picks = [sources[i % len(sources)] for i in range(samples)]
    plan_buckets = []
    for name, info in reader.buckets.items():
        f_lat, _, h, w = info.latent_shape
        rows = [
            RowPlan(int(reader.read_sample(b, s)["caption"]), {"copy_of": f"{b}/{s}", "slot": i})
            for i, (b, s) in enumerate(picks)
            if b == name
        ]
        plan_buckets.append(
            BucketPlan(name, info.frames, info.height, info.width, f_lat, h, w, rows)
        )
    plan = StorePlan(plan_buckets, reader.caption_texts())
    settings = {**reader.settings, "replica_of": reader.fingerprint, "samples": samples}
    writer = open_for_write(
        dst, settings=settings, attrs=reader.attrs, plan=plan, layout=reader.layout, create=True
    )
    for i in range(len(plan.captions)):
        writer.write_caption(i, reader.caption_embedding(i))
    for bucket in plan.buckets:
        copies = [int(r.provenance["copy_of"].rsplit("/", 1)[1]) for r in bucket.rows]
        batch = reader.read_batch(bucket.name, copies)
        flags = batch["all_masked"].bool()
        if flags.any():  # the bucket's shared all-masked latent, as the reader substitutes it
            writer.write_all_masked(bucket.name, batch["masked_latents"][flags][0])
        writer.write_samples(
            bucket.name,
            list(range(len(copies))),
            batch["latents"],
            batch["masks"],
            batch["masked_latents"],
            flags,
        )
    writer.finalize()
    return dst


def build_setup(
    workdir: Path,
    tiny: bool,
    clips: int,
    size: int,
    frames: int,
    source: int,
    samples: int,
    threads: int,
) -> Setup:
    """Model folder, `clips` source clips of source x source pixels, the precomputed store of
    their size x size x frames samples and its replica with `samples` slots."""
    name = f"{'tiny' if tiny else 'proportional'}_{clips}x{frames}x{size}_{source}"
    model = write_model(workdir / ("tiny_model" if tiny else "proportional_model"), tiny)
    data = workdir / f"clips_{clips}x{frames}x{source}"
    write_clips(data, clips, frames, source)
    setup = Setup(model, data, workdir / f"{name}_x{samples}.zarr", size, frames)
    small = precompute_store(setup, workdir / f"{name}.zarr", threads)
    replicate_store(small, setup.store, samples)
    return setup
