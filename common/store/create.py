"""Creating or resuming a store (`open_for_write`).

Private helper of `cogfun.common.store`. A half-created store never passes for a store:

- locally the whole pre-sized store is built in a sibling folder and renamed into place, so it
  never exists under the final name;
- an object store has no rename: the creator first writes a `.creating` marker object under the
  store's prefix, then every object of the new store but its root (zarr builds them in memory;
  they go out in parallel), then the root's `zarr.json` with all its attributes (one PUT: from
  then on the prefix holds a cogfun store), and deletes the marker last. Readers and resuming
  writers treat a prefix holding the marker as no store (`io.being_created`); the next creator
  deletes what it holds and starts again.

An existing store is resumed only with the same fingerprint, layout and plan; otherwise
FingerprintMismatch names what differs.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import zarr
from cogfun.common.store.fetch import in_parallel
from cogfun.common.store.grow import add_bucket, grow
from cogfun.common.store.io import CREATING, being_created, check_root, create_array
from cogfun.common.store.location import Location, location
from cogfun.common.store.schema import (
    DEFAULT_COMPRESSION,
    FAILURES_DIR,
    SCHEMA_VERSION,
    STORE_FORMAT,
    FingerprintMismatch,
    StoreError,
    StoreLayout,
    StorePlan,
    fingerprint,
    normalise_json,
    plan_digest,
    settings_diff,
    validate_plan,
)
from cogfun.common.store.specs import (
    CAPTION_SHARD,
    SHARD_SAMPLES,
    caption_specs,
)
from cogfun.common.store.write import StoreWriter, now_iso
from zarr.storage import MemoryStore

# Variable-width strings: a fixed-width numpy array would pad every row to the longest one.
STRINGS = np.dtypes.StringDType()


def _validate_layout(layout: StoreLayout) -> None:
    if layout.latent_format not in ("moments", "sample"):
        raise StoreError(
            f"layout.latent_format must be 'moments' or 'sample', not {layout.latent_format!r}"
        )
    if (
        min(layout.latent_channels, layout.text_len, layout.text_dim) < 1
        or layout.masks_per_sample < 0
    ):
        raise StoreError(f"layout has a non-positive size: {layout}")


def _create(
    path: Location, root_attrs: dict, plan: StorePlan, layout: StoreLayout, compression: dict
) -> None:
    """Build the whole pre-sized store at `path` (see the module doc for how, on each kind)."""
    if path.local:
        _create_local(path.path, root_attrs, plan, layout, compression)
        return
    marker = path / CREATING
    if marker.is_file():  # left by a creator killed mid-way; only one process ever creates
        path.delete_tree()
    mine = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex})".encode()
    if not marker.create(mine) and marker.read() != mine:  # ours: a retried PUT that had landed
        raise StoreError(f"{path} is being created by another process right now")
    built: dict = {}  # key -> zarr Buffer: the objects zarr would write, made in memory
    root = zarr.open_group(MemoryStore(built), mode="w", attributes=root_attrs)
    _fill(root, root_attrs, plan, layout, compression)
    meta = built.pop("zarr.json").to_bytes()
    writes = [lambda k=k, v=v: (path / k).write(v.to_bytes()) for k, v in sorted(built.items())]
    in_parallel(writes)
    (path / "zarr.json").write(meta)  # from here on the prefix holds a cogfun store
    marker.delete()


def _create_local(
    path: Path, root_attrs: dict, plan: StorePlan, layout: StoreLayout, compression: dict
) -> None:
    """Build the store in a sibling folder, then rename it into place."""
    tmp = path.parent / f".{path.name}.creating"
    if tmp.exists():  # left by a creator killed mid-way; only one process ever creates
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(tmp), mode="w", attributes=root_attrs)
    _fill(root, root_attrs, plan, layout, compression)
    (tmp / FAILURES_DIR).mkdir()
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty folder the user made for the store
    os.rename(tmp, path)


def _fill(
    root: zarr.Group, root_attrs: dict, plan: StorePlan, layout: StoreLayout, compression: dict
) -> None:
    """The root's groups and pre-sized arrays, with the plan rows and caption texts written."""
    shard_rows, caption_rows = root_attrs["shard_samples"], root_attrs["caption_shard"]
    buckets = root.create_group("buckets")
    for b in plan.buckets:
        add_bucket(buckets, b, layout, shard_rows, compression)
    captions = root.create_group("captions")
    for spec in caption_specs(len(plan.captions), layout, caption_rows):
        create_array(captions, spec, compression)
    captions["texts"][:] = np.asarray(plan.captions, dtype=STRINGS)


def open_for_write(
    path: str | Path | Location,
    *,
    settings: dict,
    attrs: dict,
    plan: StorePlan,
    layout: StoreLayout,
    create: bool,
    compression: dict | None = None,
    shard_samples: int = SHARD_SAMPLES,
) -> StoreWriter:
    """Create (create=True, one process only) or resume a store; refuse different settings.

    `compression` (BloscCodec arguments) and `shard_samples` (samples per shard file) only apply
    when the store is created; they change no decoded byte, so they are not part of the
    fingerprint (a resumed store keeps its own).
    """
    path = location(path)
    _validate_layout(layout)
    validate_plan(plan, str(path))
    settings = normalise_json(settings, "settings")
    digest = plan_digest(plan)
    update = None  # what growing the store to `plan` did, when it did
    creating = being_created(path)  # an object store's creator was killed: no store yet
    if creating or not (path / "zarr.json").exists():
        if not creating and path.exists() and not (path.is_dir() and not path.listdir()):
            raise StoreError(f"{path} exists and is not a cogfun store: choose another store path")
        if not create:
            raise StoreError(
                f"no store at {path}: the first process (create=True) must create it before others open it"
            )
        root_attrs = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "status": "writing",
            "fingerprint": fingerprint(settings),
            "settings": settings,
            "attrs": normalise_json(attrs, "attrs"),
            "layout": layout.to_json(),
            "buckets": [b.name for b in plan.buckets],
            "captions": len(plan.captions),
            "plan_digest": digest,
            "compression": dict(compression or DEFAULT_COMPRESSION),
            "shard_samples": int(shard_samples),
            "caption_shard": CAPTION_SHARD,
            "created_at": now_iso(),
        }
        _create(path, root_attrs, plan, layout, dict(compression or DEFAULT_COMPRESSION))
    else:
        old = check_root(path)
        if old["schema_version"] != SCHEMA_VERSION:
            raise StoreError(
                f"{path} was started by an older cogfun (store schema {old['schema_version']}, "
                f"one file per sample); this cogfun writes schema {SCHEMA_VERSION} (sharded) and "
                "cannot add to it: write to a new store (--out), or finish it with the cogfun "
                "that started it"
            )
        if old["fingerprint"] != fingerprint(settings):
            diff = settings_diff(old["settings"], settings)
            raise FingerprintMismatch(
                path, diff or {"fingerprint": (old["fingerprint"], fingerprint(settings))}
            )
        diff = {f"layout.{k}": v for k, v in settings_diff(old["layout"], layout.to_json()).items()}
        if diff:
            raise FingerprintMismatch(path, diff)
        if create and old.get("plan_digest") != digest:
            # Another dataset (rows added, edited or gone): grow the store to the plan, which
            # keeps every row the store holds, in place.
            update = grow(path, old, plan, layout, digest)
        elif old.get("plan_digest") != digest:
            diff["plan (the rows, their draws and captions)"] = (old.get("plan_digest"), digest)
            raise FingerprintMismatch(path, diff)
    writer = StoreWriter(path, plan, layout)
    writer.update = update
    if create and writer.root.attrs.get("status") == "complete":
        writer.root.attrs.update({"status": "writing"})  # a rerun may add samples: index is stale
    return writer
