"""The header pass split over the launched processes, with a cache that survives kill -9.

Every file whose header the plan needs (a video, or an image without `width`/`height` in the
metadata) gets a number in first-appearance order; process r of N probes the files numbered
r, r + N, r + 2N, ... (`probe_share`) and writes what it found to `rank{r}-of-{N}.json` in the
probe folder beside the store (`.NAME.probes/`, next to the store's `.NAME.lock`), whole
(`Location.write`: locally a temporary name and a rename, on an object store one PUT), so a kill
never leaves half a file. After every process has written its file, each reads all N of them
(`gather_probes`) and so holds the same probes a single process would have found: the plan built
from them is the same, byte for byte. The folder is wherever the store is: a local folder, or a
prefix beside an object-store store (the functions take a `Path` or a `Location`).

Each entry keeps the file's resolved path, size and mtime (ns). A later run (a resume, or one with
another process count) first looks a file up by (kind, metadata path, resolved path, size, mtime)
in every result file of the folder and probes it again only when it is new or changed. Failures
to open a file (permissions, a missing file) are not cached: they may be fixed before the rerun.
Every run writes a random `run` number, fixed by process 0, into its files, so a file left by an
earlier run is never taken for this run's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cogfun.common.decode import DecodeError, MediaInfo
from cogfun.common.store import Location, location
from cogfun.precompute import plan
from cogfun.precompute.metadata import Row
from cogfun.precompute.plan import Probe, probe_key, probe_rows
from cogfun.precompute.ranks import Ranks

log = logging.getLogger("cogfun.precompute")

FORMAT = 1
RESULTS = "rank*-of-*.json"
# What a killed write leaves: a local Location's temporary name, or an older cogfun's.
LEFTOVERS = ("rank*-of-*.json.*.partial", ".rank*.tmp")
Where = TypeVar("Where", Path, Location)


class HeaderPassError(Exception):
    """The per-process probe results cannot be combined; the message names the file."""


@dataclass(frozen=True)
class ShareCounts:
    """What one process did in the header pass."""

    share: int  # files this process is responsible for
    probed: int  # headers read from the media files
    cached: int  # results taken from an earlier run's files
    seconds: float


def probe_dir(store: Where) -> Where:
    """The probe folder of a store: beside it, as its lock is, so creating the store never meets
    foreign files in its folder (a Path for a Path, a Location for a Location)."""
    return store.parent / f".{store.name}.probes"


STAMP_ONLY = {"stamp_only": True}  # an entry holding a file's size and mtime, no header


def rank_file(folder: Where, rank: int, world: int) -> Where:
    return folder / f"rank{rank}-of-{world}.json"


def needed(rows: list[Row]) -> list[Row]:
    """The first row of each file whose header must be read, in first-appearance order (rows with
    an error and images whose size the metadata gives open nothing)."""
    seen: set[str] = set()
    out: list[Row] = []
    for row in rows:
        if row.error is not None or (row.type == "image" and row.width and row.height):
            continue
        key = probe_key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def stamp_only(rows: list[Row]) -> list[Row]:
    """The first row of each file no header is read of (images whose size the metadata gives):
    only its size and mtime are taken."""
    seen = {probe_key(r) for r in needed(rows)}
    out: list[Row] = []
    for row in rows:
        key = probe_key(row)
        if row.error is None and key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _to_json(value: Probe) -> list[int] | dict:
    if isinstance(value, MediaInfo):
        return [value.height, value.width, value.frames]
    return {"error": value}


def _from_json(value: list | dict) -> Probe:
    if isinstance(value, dict):
        return str(value["error"])
    height, width, frames = (int(x) for x in value)
    return MediaInfo(height, width, frames)


def read_cache(folder: Path | Location) -> dict[tuple[str, str, int, int], list | dict]:
    """(probe key, resolved path, size, mtime_ns) -> result, from every result file in `folder`.
    An unreadable file is skipped with a warning: its files are probed again."""
    cache: dict[tuple[str, str, int, int], list | dict] = {}
    folder = location(folder)
    for name in sorted(fnmatch.filter(folder.listdir(), RESULTS)):
        path = folder / name
        try:
            text = path.read_text()
            if text is None:
                continue  # removed since the listing (another run's prune)
            data = json.loads(text)
            if data.get("format") != FORMAT:
                continue
            for key, resolved, size, mtime_ns, cacheable, result in data["entries"]:
                if cacheable:
                    cache[(key, resolved, int(size), int(mtime_ns))] = result
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("%s is unreadable (%s): its files are probed again", path, e)
    return cache


def _probe_one(row: Row, prober: Callable[[Path, str], MediaInfo]) -> tuple[Probe, bool]:
    """(result, cacheable): a decoder's verdict is the file's; an OSError may not last."""
    try:
        return prober(row.path, row.type), True
    except DecodeError as e:
        return e.reason, True
    except OSError as e:  # permissions, a folder where a file should be, ...
        return f"cannot read: {e}", False


def probe_share(
    rows: list[Row],
    rank: int,
    world: int,
    folder: Path | Location,
    run: int,
    prober: Callable[[Path, str], MediaInfo] | None = None,
) -> ShareCounts:
    """Probe this process's share of the needed headers (cached ones are not opened) and write
    them to its result file."""
    start = time.perf_counter()
    prober = prober or plan.probe  # looked up at call time: tests replace it there
    folder = location(folder)
    folder.mkdir()
    cache = read_cache(folder)
    entries: list[list] = []
    probed = cached = 0
    mine = needed(rows)[rank::world]
    for row in mine:
        key, resolved = probe_key(row), str(row.path)
        stamp = _stamp(row.path)  # None: the prober says why, in its usual words
        hit = cache.get((key, resolved, *stamp)) if stamp else None
        if hit is not None:
            cached += 1
            entries.append([key, resolved, *stamp, True, hit])
            continue
        result, cacheable = _probe_one(row, prober)
        probed += 1
        size, mtime_ns = stamp or (-1, -1)
        keep = cacheable and stamp is not None
        entries.append([key, resolved, size, mtime_ns, keep, _to_json(result)])
    for row in stamp_only(rows)[rank::world]:  # files with no header to read: size and mtime
        size, mtime_ns = _stamp(row.path) or (-1, -1)
        entries.append([probe_key(row), str(row.path), size, mtime_ns, False, STAMP_ONLY])
    data = {"format": FORMAT, "run": run, "rank": rank, "world": world, "entries": entries}
    rank_file(folder, rank, world).write_text(json.dumps(data, separators=(",", ":")))
    return ShareCounts(len(mine), probed, cached, time.perf_counter() - start)


def gather_probes(
    rows: list[Row],
    world: int,
    folder: Path | Location,
    run: int,
    stamps: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Probe]:
    """Every process's results of run `run` combined: the probes a single process would find;
    `stamps` (when given) gets every file's (size, mtime_ns) by probe key."""
    found: dict[str, Probe] = {}
    folder = location(folder)
    for rank in range(world):
        path = rank_file(folder, rank, world)
        try:
            text = path.read_text()
            if text is None:
                raise FileNotFoundError("no such file")
            data = json.loads(text)
            if data.get("run") != run:
                raise HeaderPassError(f"{path} was written by another run (the process died?)")
            for key, _resolved, size, mtime, _cacheable, result in data["entries"]:
                if stamps is not None:
                    stamps[key] = (int(size), int(mtime))
                if result != STAMP_ONLY:
                    found[key] = _from_json(result)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise HeaderPassError(
                f"{path}: process {rank}'s header probes are unreadable: {e}"
            ) from e

    def missing(path: Path, kind: str) -> MediaInfo:
        raise HeaderPassError(f"no process probed {kind} {path} (see {folder})")

    return probe_rows(rows, found, prober=missing)


def prune(folder: Path | Location, world: int) -> None:
    """Drop result files of other process counts once this run's hold every needed header, and
    temporary files a killed run left."""
    folder = location(folder)
    keep = {rank_file(folder, r, world).name for r in range(world)}
    for name in folder.listdir():
        if name not in keep and any(fnmatch.fnmatch(name, p) for p in (RESULTS, *LEFTOVERS)):
            (folder / name).delete()


def header_pass(
    rows: list[Row], ranks: Ranks, store: str | Path | Location, run: int
) -> tuple[dict[str, Probe], ShareCounts, dict[str, tuple[int, int]]]:
    """Every process probes its share, then all read every share: the same probes on each rank,
    and every file's (size, mtime_ns) by probe key (what a sample's content key holds).
    `run` is the number process 0 drew for this run (the same on every process)."""
    folder = probe_dir(location(store))
    counts: ShareCounts | None = None
    try:
        counts = probe_share(rows, ranks.rank, ranks.world, folder, run)
    finally:
        # Every process learns whether all wrote their file (a failed one raises its own error).
        failed = ranks.sum([int(counts is None)])[0]
    if failed:
        raise HeaderPassError("another process could not write its header probes (see its log)")
    stamps: dict[str, tuple[int, int]] = {}
    probes = gather_probes(rows, ranks.world, folder, run, stamps)
    log.info(
        "process %d of %d: header pass: %d files in this share, %d probed, %d from the cache "
        "(%s), %.1f s",
        ranks.rank,
        ranks.world,
        counts.share,
        counts.probed,
        counts.cached,
        folder,
        counts.seconds,
    )
    return probes, counts, stamps
