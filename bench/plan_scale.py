"""Planning time and memory against metadata size: 10k, 100k and 1M rows.

    python -m bench.plan_scale              # 10k / 100k / 1M rows, about a minute on 2 cores
    python -m bench.plan_scale --quick      # 1k / 10k rows, seconds (what the tests run)

Each size is a synthetic JSONL metadata file (half images carrying `width`/`height`, so no file is
opened; half videos, whose header probes are given as the cached results a resumed run gathers),
captions cycling over 1000 texts; inpaint mode with 4 mask seeds a sample and 2 variants a video
(1.5 samples a row), the other options at their defaults. A fresh Python process per size reads the metadata, takes the
header pass, builds the plan (`cogfun.precompute.plan.build_plan`) and computes the plan digest the
store is created and resumed with, so its peak RSS is that of planning alone.

Figures (one `name: value` line each), `<n>` being the size's label (`10k`, `100k`, `1m`):
- `plan_s_<n>`: wall time of the four steps together; `read_s_<n>`, `build_s_<n>`, `digest_s_<n>`
  split it;
- `plan_rss_mb_<n>`: the planning process's peak resident memory (MiB), `read_rss_mb_<n>` its
  peak after reading the metadata and probes (before the plan), and `plan_rss_mb_base`: the same
  process before reading anything (Python, numpy, torch imports);
- `plan_growth_<big>_vs_<small>`: time ratio of the two largest sizes (linear = their size ratio).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
QUICK_SIZES = {"1k": 1_000, "10k": 10_000}
CAPTIONS = 1000
HW = [(480, 720), (720, 1280), (512, 512), (1080, 1920), (360, 640)]


def write_metadata(path: Path, n: int) -> None:
    """n rows, alternating image (with width/height) and video, written as a stream."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            h, w = HW[i % len(HW)]
            text = f"caption number {i % CAPTIONS} of the synthetic set"
            if i % 2:
                row = {"file_path": f"videos/{i}.mp4", "text": text, "type": "video"}
            else:
                row = {"file_path": f"images/{i}.jpg", "text": text, "width": w, "height": h}
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(meta: Path) -> dict[str, float]:
    """The planning steps in this (fresh) process; returns their times and peak RSS."""
    from cogfun.common.decode import MediaInfo
    from cogfun.common.store.schema import (
        plan_digest,
    )
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.precompute.metadata import read_metadata
    from cogfun.precompute.plan import build_plan, probe_key, probe_rows

    base = _rss_mb()
    cfg = PrecomputeConfig(
        data=meta.parent,
        meta=meta,
        out=meta.parent / "unused.zarr",
        mode="inpaint",
        masks_per_sample=4,
        variants_per_sample=2,
    )
    start = time.perf_counter()
    rows = read_metadata(meta, meta.parent, cfg.video_repeat)
    # A resumed run's gathered probes: every video's header, 49..120 frames.
    known = {
        probe_key(r): MediaInfo(*HW[r.index % len(HW)], 49 + r.index % 72)
        for r in rows
        if r.type == "video"
    }
    probes = probe_rows(rows, known)
    del known
    read_s = time.perf_counter() - start
    read_rss = _rss_mb()
    plan = build_plan(rows, probes, cfg, patch_size_t=None)
    build_s = time.perf_counter() - start - read_s
    digest = plan_digest(plan.store)
    total = time.perf_counter() - start
    assert len(digest) == 64 and len(plan.samples) + len(plan.failures) >= len(rows)
    return {
        "read_s": read_s,
        "build_s": build_s,
        "digest_s": total - read_s - build_s,
        "plan_s": total,
        "plan_rss_mb": _rss_mb(),
        "base_rss_mb": base,
        "read_rss_mb": read_rss,
        "samples": len(plan.samples),
    }


def measure(meta: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.plan_scale", "--child", str(meta)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"planning {meta} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k rows only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    sizes = QUICK_SIZES if args.quick else SIZES
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="plan_scale_") as tmp:
        for label, n in sizes.items():
            meta = Path(tmp) / f"meta_{label}.jsonl"
            write_metadata(meta, n)
            results[label] = r = measure(meta)
            meta.unlink()
            print(f"plan_rows_{label}: {n}")
            print(f"plan_samples_{label}: {int(r['samples'])}")
            for name in ("plan_s", "read_s", "build_s", "digest_s"):
                print(f"{name}_{label}: {r[name]:.2f}")
            print(f"plan_rss_mb_{label}: {r['plan_rss_mb']:.0f}")
            print(f"read_rss_mb_{label}: {r['read_rss_mb']:.0f}")
    first = next(iter(results.values()))
    print(f"plan_rss_mb_base: {first['base_rss_mb']:.0f}")
    small, big = list(sizes)[-2:]
    print(f"plan_growth_{big}_vs_{small}: {results[big]['plan_s'] / results[small]['plan_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
