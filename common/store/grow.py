"""Growing a store to a new plan: rows added, retired or brought back, nothing rewritten.

Private helper of `cogfun.common.store`. An incremental precompute plans the edited dataset
against the rows the store holds (`read_plan`): every row the store has keeps its slot (retired
when the dataset no longer has it, `live` 0), new rows get new slots at the end of their bucket
(new buckets are added), new captions go at the end. `grow` checks the plan keeps every stored
row as it is (key, caption, provenance), then resizes the arrays (their shard grid simply
extends: a sealed shard is never rewritten for it, a partly filled last shard is resealed whole
by its owner when its new samples are staged) and writes the new plan rows. Only the first
process does this, with the store's status already `writing`, before any other process opens it;
every step can be redone, so a `kill -9` in the middle is finished by the next run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from cogfun.common.store.io import create_array, open_root
from cogfun.common.store.location import Location, location
from cogfun.common.store.schema import (
    BucketPlan,
    RowPlan,
    StoreError,
    StoreLayout,
    StorePlan,
    provenance_strings,
    row_keys,
)
from cogfun.common.store.specs import caption_specs, plan_specs, sample_specs, shared_specs
from cogfun.common.store.sums import text_checksum

# Variable-width strings: a fixed-width numpy array would pad every row to the longest one.
STRINGS = np.dtypes.StringDType()


def add_bucket(
    buckets: zarr.Group, b: BucketPlan, layout: StoreLayout, shard_rows: int, compression: dict
) -> None:
    """A bucket's group and arrays, sized and with its plan rows written."""
    n = len(b.rows)
    group = buckets.create_group(b.name, attributes=_bucket_attrs(b, layout))
    specs = sample_specs(n, b, layout, shard_rows) + plan_specs(n) + shared_specs(b, layout)
    for spec in specs:
        create_array(group, spec, compression)
    write_plan_rows(group, b, 0)


def write_plan_rows(group: zarr.Group, b: BucketPlan, start: int) -> None:
    """Rows `start`.. of a bucket's plan arrays (caption, provenance and its hash, key), and the
    live flag of every row."""
    if len(b.rows) > start:
        prov = provenance_strings(b)
        new = slice(start, len(b.rows))
        group["caption"][new] = np.asarray([r.caption for r in b.rows[new]], dtype=np.int64)
        group["provenance"][new] = np.asarray(prov[new], dtype=STRINGS)
        group["provenance_hash"][new] = np.asarray(
            [text_checksum(p) for p in prov[new]], dtype=np.uint64
        )
        group["key"][new] = np.asarray(row_keys(b, prov)[new], dtype=STRINGS)
    if b.rows:
        group["live"][:] = np.asarray([r.live for r in b.rows], dtype=np.uint8)


def _bucket_attrs(b: BucketPlan, layout: StoreLayout) -> dict:
    return {
        "frames": b.frames,
        "height": b.height,
        "width": b.width,
        "latent_frames": b.latent_frames,
        "latent_h": b.latent_h,
        "latent_w": b.latent_w,
        "latent_shape": [b.latent_frames, layout.latent_channels, b.latent_h, b.latent_w],
        "rows": len(b.rows),
    }


def read_plan(path: str | Path | Location) -> StorePlan:
    """The rows a (schema 2) store holds, bucket by bucket in slot order, with their keys and
    live flags, and its captions: what an incremental plan is made against."""
    path = location(path)
    root = open_root(path, "r")
    attrs = root.attrs.asdict()
    if attrs.get("schema_version", 0) < 2:
        raise StoreError(f"{path}: a schema-1 store has no row keys: write a new store")
    buckets = []
    for name in attrs["buckets"]:
        group = root["buckets"][name]
        a = group.attrs.asdict()
        n = int(a["rows"])
        captions = np.asarray(group["caption"][:n])
        provenance = group["provenance"][:n]
        keys = group["key"][:n]
        live = np.asarray(group["live"][:n]) if n else np.zeros(0, np.uint8)
        rows = [
            RowPlan(int(c), json.loads(str(p)), str(k), bool(v))
            for c, p, k, v in zip(captions, provenance, keys, live, strict=True)
        ]
        buckets.append(
            BucketPlan(
                name,
                int(a["frames"]),
                int(a["height"]),
                int(a["width"]),
                int(a["latent_frames"]),
                int(a["latent_h"]),
                int(a["latent_w"]),
                rows,
            )
        )
    texts = [str(t) for t in root["captions"]["texts"][: int(attrs["captions"])]]
    return StorePlan(buckets, texts)


def grow(path: Location, old: dict, plan: StorePlan, layout: StoreLayout, digest: str) -> dict:
    """Grow the store at `path` (root attributes `old`) to `plan`; returns and records what the
    update did: rows added, reused (live before and now), retired, brought back."""
    root = open_root(path, "r+")
    where = str(path)
    m_old = int(old["captions"])
    texts = [str(t) for t in root["captions"]["texts"][:m_old]]
    if plan.captions[:m_old] != texts:
        raise StoreError(f"{where}: the plan does not keep the store's captions in place")
    missing = [b for b in old["buckets"] if b not in {p.name for p in plan.buckets}]
    if missing:
        raise StoreError(f"{where}: the plan drops buckets the store holds: {missing}")
    for b in plan.buckets:  # every check before the first write
        if b.name in old["buckets"]:
            _check_kept(
                root["buckets"][b.name], b, int(root["buckets"][b.name].attrs["rows"]), where
            )
    root.attrs.update({"status": "writing"})  # the done index is stale from here on
    shard_rows, compression = int(old["shard_samples"]), dict(old["compression"])
    counts = {"added": 0, "reused": 0, "retired": 0, "restored": 0}
    for b in plan.buckets:
        if b.name not in old["buckets"]:
            add_bucket(root["buckets"], b, layout, shard_rows, compression)
            counts["added"] += sum(r.live for r in b.rows)
            continue
        group = root["buckets"][b.name]
        n_old = int(group.attrs["rows"])
        was_live = np.asarray(group["live"][:n_old], dtype=bool) if n_old else np.zeros(0, bool)
        if len(b.rows) > n_old:
            for spec in sample_specs(len(b.rows), b, layout, shard_rows) + plan_specs(len(b.rows)):
                group[spec.name].resize(spec.shape)
        write_plan_rows(group, b, n_old)
        group.attrs.update({"rows": len(b.rows)})
        live = np.asarray([r.live for r in b.rows], dtype=bool)
        counts["added"] += int(live[n_old:].sum())
        counts["reused"] += int((live[:n_old] & was_live).sum())
        counts["retired"] += int((~live[:n_old] & was_live).sum())
        counts["restored"] += int((live[:n_old] & ~was_live).sum())
    captions = root["captions"]
    if len(plan.captions) > m_old:
        for spec in caption_specs(len(plan.captions), layout, int(old["caption_shard"])):
            captions[spec.name].resize(spec.shape)
        captions["texts"][m_old:] = np.asarray(plan.captions[m_old:], dtype=STRINGS)
    root.attrs.update(
        {
            "buckets": [b.name for b in plan.buckets],
            "captions": len(plan.captions),
            "plan_digest": digest,
            "last_update": counts,
        }
    )
    return counts


def _check_kept(group: zarr.Group, b: BucketPlan, n_old: int, where: str) -> None:
    """The plan's first `n_old` rows of the bucket are the stored rows: same key, caption and
    provenance (what a row was drawn and encoded with)."""
    if len(b.rows) < n_old:
        raise StoreError(f"{where}: the plan has fewer rows in {b.name} than the store holds")
    if not n_old:
        return
    stored_keys = [str(k) for k in group["key"][:n_old]]
    stored_caps = np.asarray(group["caption"][:n_old])
    stored_hash = np.asarray(group["provenance_hash"][:n_old])
    kept = BucketPlan(**{**b.__dict__, "rows": b.rows[:n_old]})
    prov = provenance_strings(kept)
    keys = row_keys(kept, prov)
    for i in range(n_old):
        same = (
            keys[i] == stored_keys[i]
            and b.rows[i].caption == int(stored_caps[i])
            and text_checksum(prov[i]) == int(stored_hash[i])
        )
        if not same:
            raise StoreError(
                f"{where}: bucket {b.name} row {i} ({stored_keys[i]}) is not the plan's row "
                f"{keys[i]}: the plan must keep every stored row in its slot"
            )
