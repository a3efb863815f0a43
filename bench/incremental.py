"""An incremental update against a full re-encode: what adding rows to a dataset costs.

    python -m bench.incremental                          # 40 clips, +4 new, 1 recaptioned, ~2 min
    python -m bench.incremental --clips 8 --added 2 --frames 5 --size 32     # seconds (tests)

A dataset of `clips` generated clips is precomputed into a store with cogfun's defaults and the
tiny model. Then the metadata is edited as a growing dataset is: `added` new clips and one clip's
caption changed, one clip dropped. The same store is updated (precompute rerun with the edited
metadata: only new or changed rows are encoded), and the edited metadata is precomputed into a
fresh store (what a store keyed by the whole metadata file needed: everything again). Both are
timed in this process, wall time of the whole precompute (planning, models, encoding, finalize).

Figures (one `name: value` line each):
- `full_encode_s`: the fresh store of the edited metadata;
- `update_s`: the update of the existing store;
- `update_vs_full`: update_s / full_encode_s (the goal: about the share of changed rows, plus the
  fixed cost of loading the models);
- `update_encoded`, `update_reused`, `update_retired`: what the update did (`last_update`);
- `update_equals_fresh`: 1 when the updated store's digest equals the fresh store's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.scale import precompute_run, write_clips


def precompute(model: Path, data: Path, meta: Path, out: Path, frames: int, size: int) -> float:
    """Wall seconds of one whole precompute (planning to finalize)."""
    return precompute_run(model, data, meta, out, frames, size)[1]


def main(argv: list[str] | None = None) -> int:
    from cogfun.common.store import open_store
    from cogfun.testing.tiny import write_tiny_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--added", type=int, default=4)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-incremental-"))
    try:
        model = write_tiny_model(work / "model")
        data = write_clips(work / "data", args.clips + args.added, args.frames, args.size)
        rows = json.loads((data / "metadata.json").read_text())
        first, edited = rows[: args.clips], [dict(r) for r in rows[1:]]  # clip 0 dropped
        edited[0]["text"] = "a caption written again"
        (data / "first.json").write_text(json.dumps(first))
        (data / "edited.json").write_text(json.dumps(edited))
        store, fresh = work / "store.zarr", work / "fresh.zarr"
        precompute(model, data, data / "first.json", store, args.frames, args.size)
        update_s = precompute(model, data, data / "edited.json", store, args.frames, args.size)
        full_s = precompute(model, data, data / "edited.json", fresh, args.frames, args.size)
        updated = open_store(store)
        last = updated.root_attrs["last_update"]
        print(f"clips: {args.clips} then {len(edited)}")
        print(f"full_encode_s: {full_s:.3f}")
        print(f"update_s: {update_s:.3f}")
        print(f"update_vs_full: {update_s / full_s:.3f}")
        print(f"update_encoded: {last['added']}")
        print(f"update_reused: {last['reused']}")
        print(f"update_retired: {last['retired']}")
        print(f"update_equals_fresh: {int(updated.digest() == open_store(fresh).digest())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
