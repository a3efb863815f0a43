"""Incremental updates: the plan of an edited dataset, matched to the store it updates.

A store's rows are keyed by content (`plan.content_key`: file path, size, mtime, caption, type,
repeat, then the variant), and each sample's draws come from its key. So `merge` can lay the new
plan over the rows the store already holds (`cogfun.common.store.read_plan`):

- a sample whose key the store has keeps its slot and its bytes (reused, nothing encoded);
- a new key gets a new slot at the end of its bucket (a new bucket is added after the others);
- a stored row whose key the plan no longer has is retired: it stays where it is, unserved (a
  later plan that has it again serves it again);
- new captions go after the store's.

The merged plan is what `open_for_write` grows the store to, and what every process encodes
from: its chunks hold only live samples, cut at the same `vae_mini_batch` slot boundaries as a
fresh plan. Merging the plan into a store it has already been merged into gives the same plan
(every key is found), which is how the other processes of a run, and a resumed run, agree.
"""

from __future__ import annotations

import dataclasses

from cogfun.common.store import BucketPlan, RowPlan, StorePlan
from cogfun.precompute.plan import Chunk, Plan, SampleSpec, bucket_order


def merge(stored: StorePlan | None, new: Plan, vae_mini_batch: int) -> Plan:
    """`new` laid over the rows of `stored` (None: a new store, `new` as it is)."""
    if stored is None:
        return new
    captions = list(stored.captions)
    index = {text: i for i, text in enumerate(captions)}
    for text in new.store.captions:
        if text not in index:
            index[text] = len(captions)
            captions.append(text)
    planned = {b.name: b for b in new.store.buckets}
    by_bucket: dict[str, list[SampleSpec]] = {}
    for spec in new.samples:
        by_bucket.setdefault(spec.bucket, []).append(spec)
    old_names = [b.name for b in stored.buckets]
    names = old_names + sorted((n for n in planned if n not in old_names), key=bucket_order)
    old = {b.name: b for b in stored.buckets}
    buckets: list[BucketPlan] = []
    samples: list[SampleSpec] = []
    for name in names:
        shape = old.get(name) or planned[name]
        rows = list(old[name].rows) if name in old else []
        slot_of = {r.key: i for i, r in enumerate(rows)}
        live = [False] * len(rows)
        rows_planned = planned[name].rows if name in planned else []
        for spec, row in zip(by_bucket.get(name, []), rows_planned, strict=True):
            caption = index[new.store.captions[row.caption]]
            slot = slot_of.get(spec.key)
            if slot is None:
                slot = len(rows)
                rows.append(RowPlan(caption, row.provenance, spec.key))
                live.append(True)
            live[slot] = True
            samples.append(dataclasses.replace(spec, slot=slot, caption=caption))
        rows = [dataclasses.replace(r, live=v) for r, v in zip(rows, live, strict=True)]
        buckets.append(dataclasses.replace(shape, rows=rows))
    return Plan(
        StorePlan(buckets, captions), samples, _chunks(samples, names, vae_mini_batch), new.failures
    )


def _chunks(samples: list[SampleSpec], names: list[str], mini_batch: int) -> list[Chunk]:
    """Live samples cut into VAE chunks at the fixed slot boundaries (slot // mini_batch), bucket
    by bucket in store order, slots ascending."""
    size = max(1, mini_batch)
    groups: dict[tuple[int, int], list[SampleSpec]] = {}
    order = {n: i for i, n in enumerate(names)}
    for spec in samples:
        groups.setdefault((order[spec.bucket], spec.slot // size), []).append(spec)
    chunks = []
    for i, key in enumerate(sorted(groups)):
        members = tuple(sorted(groups[key], key=lambda s: s.slot))
        chunks.append(Chunk(i, members[0].bucket, members))
    return chunks
