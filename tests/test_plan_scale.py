"""The header pass split over processes (`cogfun.precompute.headers`): each rank probes a disjoint
share, all combine to a single process's probes, reruns reuse the cache. Ranks are simulated in
this process by calling each rank's step in turn; tests/test_precompute_procs.py launches two."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cogfun.common.decode import DecodeError, MediaInfo
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.headers import (
    HeaderPassError,
    gather_probes,
    probe_dir,
    probe_share,
    prune,
    rank_file,
)
from cogfun.precompute.metadata import Row
from cogfun.precompute.plan import build_plan, probe_rows, sample_seeds
from cogfun.precompute.seeds import many_sample_seeds


class Prober:
    """A header reader that counts the files it opens (sizes derived from the file's number)."""

    def __init__(self):
        self.opened: list[str] = []

    def __call__(self, path: Path, kind: str) -> MediaInfo:
        self.opened.append(path.name)
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        n = int(path.stem)
        if n == 7:
            raise DecodeError(path, "no video stream")
        return MediaInfo(64 + 16 * (n % 3), 96, 1 if kind == "image" else 20 + n)


def _rows(root: Path) -> list[Row]:
    rows = []
    for i in range(12):
        kind = "image" if i % 4 == 3 else "video"
        name = f"{kind}s/{i}.{'png' if kind == 'image' else 'mp4'}"
        path = root / name
        if i != 5:  # row 5's file is missing
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * (i + 1))
        # Row 11 is an image whose size the metadata gives: never opened.
        wh = {"width": 96, "height": 64} if i == 11 else {}
        rows.append(Row(i, name, path, f"caption {i % 5}", kind, **wh))
    # Rows repeating a file (video_repeat) are probed once.
    rows.append(Row(0, rows[0].file_path, rows[0].path, "caption 0", "video", repeat=1))
    return rows


def _cfg(root: Path) -> PrecomputeConfig:
    return PrecomputeConfig(
        data=root, image_sample_size=64, video_sample_size=64, token_sample_size=64,
        video_sample_n_frames=9, vae_mini_batch=2, variants_per_sample=2,
    )  # fmt: skip


def _two_ranks(rows, folder, run, prober):
    counts = [probe_share(rows, r, 2, folder, run, prober) for r in range(2)]
    return counts, [gather_probes(rows, 2, folder, run) for _ in range(2)]


def test_two_ranks_probe_disjoint_halves_and_plan_like_one(tmp_path):
    rows = _rows(tmp_path / "data")
    folder = probe_dir(tmp_path / "out.zarr")
    assert folder == tmp_path / ".out.zarr.probes"
    prober = Prober()
    counts, gathered = _two_ranks(rows, folder, 41, prober)
    # 11 distinct files need a header (row 11's size is in the metadata): 6 and 5.
    assert [(c.share, c.probed, c.cached) for c in counts] == [(6, 6, 0), (5, 5, 0)]
    assert len(prober.opened) == 11 and len(set(prober.opened)) == 11
    assert "11.png" not in prober.opened
    firsts = [json.loads(rank_file(folder, r, 2).read_text())["entries"] for r in range(2)]
    assert {e[0] for e in firsts[0]}.isdisjoint({e[0] for e in firsts[1]})

    single = probe_rows(rows, prober=Prober())
    assert gathered[0] == gathered[1] == single
    assert single["image:images/7.png"] == "no video stream"
    assert single["video:videos/5.mp4"].startswith("cannot read: ")
    cfg = _cfg(tmp_path / "data")
    assert build_plan(rows, gathered[1], cfg) == build_plan(rows, single, cfg)


def test_rerun_reuses_the_cache_and_reprobes_changed_files(tmp_path):
    rows = _rows(tmp_path / "data")
    folder = probe_dir(tmp_path / "out.zarr")
    _two_ranks(rows, folder, 1, Prober())
    again = Prober()
    counts, gathered = _two_ranks(rows, folder, 2, again)
    # Only the missing file (row 5: an OSError may not last) is opened again.
    assert again.opened == ["5.mp4"]
    assert sum(c.cached for c in counts) == 10
    # A file that changed (its mtime) is probed again; the others come from the cache.
    st = os.stat(rows[2].path)
    os.utime(rows[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = Prober()
    counts3 = [probe_share(rows, r, 3, folder, 3, third) for r in range(3)]
    assert sorted(third.opened) == ["2.mp4", "5.mp4"]
    assert [c.share for c in counts3] == [4, 4, 3] and sum(c.cached for c in counts3) == 9
    assert gather_probes(rows, 3, folder, 3) == gathered[0]
    (folder / ".rank0-of-3.json.999.tmp").write_text("{", encoding="utf-8")  # a killed write
    prune(folder, 3)
    assert sorted(p.name for p in folder.iterdir()) == [f"rank{r}-of-3.json" for r in range(3)]


def test_a_file_of_another_run_or_a_damaged_one_is_refused_or_reprobed(tmp_path, caplog):
    rows = _rows(tmp_path / "data")
    folder = probe_dir(tmp_path / "out.zarr")
    _two_ranks(rows, folder, 5, Prober())
    probe_share(rows, 0, 2, folder, 6, Prober())  # rank 1 of run 6 never wrote its file
    with pytest.raises(HeaderPassError, match=r"rank1-of-2\.json was written by another run"):
        gather_probes(rows, 2, folder, 6)
    rank_file(folder, 1, 2).write_text("{not json", encoding="utf-8")
    prober = Prober()
    counts = probe_share(rows, 1, 2, folder, 6, prober)
    assert counts.probed == 5 and "rank1-of-2.json is unreadable" in caplog.text
    assert gather_probes(rows, 2, folder, 6) == probe_rows(rows, prober=Prober())


@pytest.mark.parametrize("seed", [0, 42, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1, -3, 2**70 + 1])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_vectorized_seeds_equal_seed_sequence(seed, k):
    rng = np.random.default_rng(seed % 1000)
    rows = np.concatenate([[0, 1, 2**32 - 1], rng.integers(0, 2**32, 60)])
    repeats = np.concatenate([[0, 0, 7], rng.integers(0, 4, 60)])
    variants = np.concatenate([[0, 3, 0], rng.integers(0, 3, 60)])
    seeds, masks = many_sample_seeds(seed, rows, repeats, variants, k)
    assert seeds.shape == (63,) and masks.shape == (63, k)
    for i in range(63):
        one = sample_seeds(seed, int(rows[i]), int(repeats[i]), int(variants[i]), k)
        assert (int(seeds[i]), [int(m) for m in masks[i]]) == one
    with pytest.raises(ValueError, match="0..2\\*\\*32-1"):
        many_sample_seeds(seed, np.array([2**32]), np.array([0]), np.array([0]), k)
