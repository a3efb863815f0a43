"""Fault matrices: kill -9, full disk, damaged stores, bad inputs, fingerprints, planted pickles.

    python -m bench.faults                      # the full matrix (~15 min on 2 CPU cores)
    python -m bench.faults --seed 7 --kills 20  # other seeded moments, more of them

It writes the tiny model and a small dataset (7 samples' files and a broken one) to a temporary
folder and runs `cogfun precompute` and `cogfun train` as real processes. A kill is SIGKILL from
outside at a seeded random time, or `os._exit(137)` from a hook at a seeded write (a chosen
kind of write: store creation, caption, sample chunk, done flag, finalize; before, in the middle
of or after it). After each interruption the same command is rerun and the result compared with
an uninterrupted run: `lost` and `duplicated` count samples (precompute, by provenance key) or
optimizer steps (train, in metrics.jsonl); `identical` needs the same `cogfun inspect --json`
digest, failures and a clean `--verify` (precompute) or the same per-step loss, lr and grad norm
and bitwise final weights (train). `detected` counts faults reported as they should be: nothing
torn right after a kill (no partial checkpoint picked), a clear disk-full message, and for the
detection matrices (damage, refusals, fingerprints, bad inputs, pickles), which run the
`tests/test_faults_*.py` and `tests/test_bad_inputs.py` cases, each case passed.
Exit code 0 when every row passes. docs/reliability.md holds a run's table.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from cogfun.testing import runs
from cogfun.testing.faults import KILLED, hook_env, read_log, write_kind

ROOT = Path(__file__).resolve().parent.parent

KINDS = (
    "store creation",
    "caption embedding",
    "shared all-masked latent",
    "sample chunk (latents)",
    "sample chunk (masks)",
    "done flag (checksum)",
    "sealed shard (latents)",
    "sealed shard (checksum)",
    "caption shard",
    "done index (finalize)",
    "root attributes (finalize)",
)
MODES = ("kill-before", "kill-torn", "kill-after")


class Row:
    """One line of the table: a scenario's trials and what they found."""

    def __init__(self, scenario: str):
        self.scenario, self.trials, self.lost, self.duplicated = scenario, 0, 0, 0
        self.detected, self.expected, self.identical, self.notes = 0, 0, 0, Counter()

    def add(
        self,
        lost: int = 0,
        duplicated: int = 0,
        identical: bool = True,
        detected: bool | None = None,
        note: str | None = None,
    ) -> None:
        self.trials += 1
        self.lost, self.duplicated = self.lost + lost, self.duplicated + duplicated
        self.identical += bool(identical)
        if detected is not None:
            self.expected += 1
            self.detected += bool(detected)
        if note:
            self.notes[note] += 1

    @property
    def passed(self) -> bool:
        return (
            self.trials > 0
            and self.lost == 0
            and self.duplicated == 0
            and self.identical == self.trials
            and self.detected == self.expected
        )

    def cells(self) -> list[str]:
        detected = f"{self.detected}/{self.expected}" if self.expected else "-"
        result = "pass" if self.passed else "FAIL"
        if self.identical != self.trials:
            result += f" ({self.trials - self.identical} not identical)"
        notes = "; ".join(f"{n} x{k}" if k > 1 else n for n, k in sorted(self.notes.items()))
        return [
            self.scenario,
            str(self.trials),
            str(self.lost),
            str(self.duplicated),
            detected,
            result,
            notes,
        ]


def table(rows: list[Row]) -> str:
    head = ["scenario", "trials", "lost", "duplicated", "detected", "result", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- precompute ----


class Precompute:
    """The dataset, the model, an uninterrupted run's snapshot, its writes and its timing."""

    def __init__(self, work: Path, model: Path):
        self.work, self.model = work, model
        self.data = runs.fault_dataset(work / "data")
        ref, count_log = work / "ref.zarr", work / "ref.writes"
        env = hook_env(work, "count", log=count_log)
        self.phase, _ = runs.timed_run(self.args(ref), env, runs.writing_started(ref))
        self.ref = runs.snapshot(ref)
        self.writes = [(n, write_kind(p)) for n, _, p in read_log(count_log)]
        self.n = 0
        log(
            f"reference: {self.ref.samples} samples, {len(self.writes)} zarr writes, "
            f"{self.phase:.1f} s writing, digest {self.ref.digest[:16]}"
        )

    def args(self, out: Path) -> list[str]:
        return runs.precompute_args(self.data, self.model, out)

    def out(self) -> Path:
        self.n += 1
        return self.work / f"trial{self.n:03d}.zarr"

    def rerun(self, out: Path, processes: int = 1):
        def go() -> int:
            if processes == 1:
                return runs.cogfun(self.args(out), hook_env(self.work)).returncode
            return runs.launch(self.args(out), hook_env(self.work), processes).returncode

        return go

    def settle(
        self, row: Row, out: Path, note: str, detected: bool | None = None, rerun_processes: int = 1
    ) -> None:
        """Rerun to the end and compare with the reference; `torn` (read as damaged right after
        the interruption) must be 0."""
        result = runs.resume_and_compare(out, self.ref, self.rerun(out, rerun_processes))
        ok_after_kill = result["torn"] == 0
        row.add(
            result["lost"],
            result["duplicated"],
            result["identical"],
            ok_after_kill if detected is None else detected and ok_after_kill,
            note,
        )


def kill_at_writes(pc: Precompute, rng: random.Random, trials: int) -> Row:
    row = Row("precompute: kill -9 at a seeded write (1 process)")
    for i in range(trials):
        kind, mode = KINDS[i % len(KINDS)], MODES[i % len(MODES)]
        n = rng.choice([n for n, k in pc.writes if k == kind])
        out, hit = pc.out(), pc.work / f"hit{pc.n:03d}.log"
        code = runs.cogfun(pc.args(out), hook_env(pc.work, f"{mode}:{n}", log=hit)).returncode
        ((_, _, path),) = read_log(hit)
        assert code == KILLED, (mode, n, code)
        pc.settle(row, out, f"{mode} {write_kind(path)}")
        log(f"{row.scenario}: {mode}:{n} ({write_kind(path)})")
    return row


def kill_at_times(pc: Precompute, rng: random.Random, trials: int) -> Row:
    row = Row("precompute: kill -9 at a seeded time (1 process)")
    for _ in range(trials):
        delay = rng.uniform(0.0, pc.phase)
        out = pc.out()
        _, killed = runs.timed_run(
            pc.args(out), hook_env(pc.work), runs.writing_started(out), delay
        )
        pc.settle(row, out, "killed" if killed else "finished before the kill")
        log(f"{row.scenario}: {delay:.2f} s into writing, killed={killed}")
    return row


def kill_twice(pc: Precompute, rng: random.Random, trials: int) -> Row:
    row = Row("precompute: killed, then killed again while resuming")
    for i in range(trials):
        out = pc.out()
        first = rng.choice([n for n, k in pc.writes if k == KINDS[3 + i % 3]])
        runs.cogfun(pc.args(out), hook_env(pc.work, f"kill-after:{first}"))
        second = rng.randint(1, 12)  # the rerun's own writes: it redoes the chunks left
        again = runs.cogfun(pc.args(out), hook_env(pc.work, f"kill-torn:{second}"))
        pc.settle(row, out, "killed twice" if again.returncode == KILLED else "rerun finished")
        log(f"{row.scenario}: kill-after:{first}, then kill-torn:{second}")
    return row


def kill_one_rank(pc: Precompute, rng: random.Random) -> Row:
    """accelerate launch with 2 processes: rank 1, then rank 0, dies at a seeded write; the
    launcher stops the other. Reruns with 1 and 2 processes."""
    row = Row("precompute: kill -9 one of 2 processes")
    creation = sum(1 for _, k in pc.writes if k == "store creation")
    for rank, rerun in ((1, 1), (0, 2)):
        n = rng.randint(1, 12) + (creation if rank == 0 else 0)
        out, hit = pc.out(), pc.work / f"hit{pc.n:03d}.log"
        res = runs.launch(pc.args(out), hook_env(pc.work, f"kill-after:{n}", rank=rank, log=hit))
        ((_, _, path),) = read_log(hit)
        assert res.returncode != 0, res.stderr[-2000:]
        pc.settle(row, out, f"rank {rank} at {write_kind(path)}", rerun_processes=rerun)
        log(f"{row.scenario}: rank {rank} kill-after:{n}, rerun with {rerun}")
    return row


def disk_full(pc: Precompute, rng: random.Random) -> Row:
    row = Row("precompute: disk full (ENOSPC), then space freed")
    for kind in (
        "store creation",
        "caption embedding",
        "sample chunk (latents)",
        "done flag (checksum)",
        "root attributes (finalize)",
    ):
        n = rng.choice([n for n, k in pc.writes if k == kind])
        out = pc.out()
        res = runs.cogfun(pc.args(out), hook_env(pc.work, f"enospc:{n}"))
        clear = (
            res.returncode == 2
            and "the disk is full" in res.stderr
            and "rerun the same command" in res.stderr
            and "Traceback" not in res.stderr
        )
        pc.settle(row, out, f"at {kind}", detected=clear)
        log(f"{row.scenario}: enospc:{n} ({kind}), clear message={clear}")
    return row


# ---- train ----


class Train:
    def __init__(self, work: Path, model: Path, store: Path):
        self.work, self.model, self.store, self.n = work, model, store, 0
        self.ref = work / "train_ref"
        started = lambda: (self.ref / "metrics.jsonl").exists()  # noqa: E731
        self.phase, _ = runs.timed_run(self.args(self.ref), hook_env(work), started)
        steps, every = runs.TRAIN_OPTS["max_train_steps"], runs.TRAIN_OPTS["checkpointing_steps"]
        self.checkpoints = steps // every
        log(f"train reference: {steps} steps, {self.checkpoints} checkpoints, {self.phase:.1f} s")

    def args(self, out: Path, **kw) -> list[str]:
        return runs.train_cli_args(self.store, self.model, out, **kw)

    def out(self) -> Path:
        self.n += 1
        return self.work / f"train{self.n:03d}"

    def settle(self, row: Row, out: Path, note: str, detected: bool = True) -> None:
        partial, latest = runs.checkpoint_report(out)
        resumed = runs.cogfun(self.args(out), hook_env(self.work))
        lost, duplicated, identical = runs.train_compare(self.ref, out)
        start = f"resumed from {latest.name}" if latest else "restarted"
        ok = identical and resumed.returncode == 0
        row.add(lost, duplicated, ok, detected and partial == 0, f"{note} ({start})")


def train_kills(tr: Train, rng: random.Random, timed: int, writes: int, publishes: int) -> Row:
    row = Row("train: kill -9 (seeded times, mid checkpoint write, before publish)")
    for _ in range(timed):
        out = tr.out()
        delay = rng.uniform(0.0, tr.phase)
        _, killed = runs.timed_run(
            tr.args(out), hook_env(tr.work), lambda o=out: (o / "metrics.jsonl").exists(), delay
        )
        tr.settle(row, out, "timed kill" if killed else "finished first")
        log(f"{row.scenario}: {delay:.2f} s into training, killed={killed}")
    # checkpoint files counted per checkpoint: optimizer, scheduler, RNG, weights (bf16), fp32 masters
    files = 5
    faults = [f"ckpt-write:{rng.randint(1, files * (tr.checkpoints - 1))}" for _ in range(writes)]
    faults += [f"ckpt-publish:{rng.randint(1, tr.checkpoints - 1)}" for _ in range(publishes)]
    for fault in faults:
        out = tr.out()
        res = runs.cogfun(tr.args(out), hook_env(tr.work, fault))
        assert res.returncode == KILLED, (fault, res.stderr[-2000:])
        tr.settle(row, out, fault.split(":")[0])
        log(f"{row.scenario}: {fault}")
    return row


def train_disk_full(tr: Train, rng: random.Random) -> Row:
    row = Row("train: disk full during a checkpoint save, then space freed")
    for _ in range(2):
        out, n = tr.out(), rng.randint(1, 4 * (tr.checkpoints - 1))
        res = runs.cogfun(tr.args(out), hook_env(tr.work, f"ckpt-enospc:{n}"))
        clear = (
            res.returncode != 0 and "disk is full" in res.stderr and "Traceback" not in res.stderr
        )
        tr.settle(row, out, "clear message" if clear else "traceback, no clear message", clear)
        log(f"{row.scenario}: ckpt-enospc:{n}, clear={clear}")
    return row


# ---- the detection matrices: the test cases themselves ----

SUITES = {  # scenario -> (test file, test function name prefixes)
    "store: damaged chunk or done index -> inspect --verify names it": (
        "test_faults_damage.py",
        ("test_a_damaged_",),
    ),
    "store: edited/missing zarr.json, newer schema -> refused": (
        "test_faults_damage.py",
        ("test_edited_or_missing_metadata",),
    ),
    "store: live precompute writing, second writer -> refused": (
        "test_faults_damage.py",
        ("test_a_store_a_live", "test_a_second_precompute"),
    ),
    "fingerprint: other weights/option/masks/format/seed -> refused naming the key": (
        "test_faults_fingerprint.py",
        ("test_",),
    ),
    "bad inputs: 30+ kinds in one run, each stored or recorded naming it": (
        "test_bad_inputs.py",
        ("test_",),
    ),
    "safety: planted pickles never loaded": ("test_faults_safety.py", ("test_",)),
}


def detection_rows() -> list[Row]:
    import pytest

    outcomes: dict[str, list[bool]] = {}

    class Collect:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                file, _, name = report.nodeid.partition("::")
                outcomes.setdefault(f"{Path(file).name}::{name}", []).append(report.passed)

    files = sorted({str(ROOT / "tests" / f) for f, _ in SUITES.values()})
    quiet = ["-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    pytest.main([*quiet, "--rootdir", str(ROOT), *files], plugins=[Collect()])
    rows = []
    for scenario, (file, prefixes) in SUITES.items():
        row = Row(scenario)
        for nodeid, results in sorted(outcomes.items()):
            name = nodeid.split("::")[1]
            if nodeid.startswith(file + "::") and name.startswith(prefixes):
                row.add(detected=all(results))
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds every kill point and time")
    parser.add_argument("--kills", type=int, default=12, help="precompute kills at writes")
    parser.add_argument("--timed", type=int, default=5, help="precompute kills at random times")
    parser.add_argument("--no-detection", action="store_true", help="skip the pytest matrices")
    parser.add_argument("--quick", action="store_true", help="a few trials of each (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.timed = 3, 1
    start, rng = time.monotonic(), random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cogfun-bench-faults-"))
    from cogfun.testing.tiny import write_tiny_model

    model = write_tiny_model(work / "model")
    pc = Precompute(work, model)
    few = 1 if args.quick else 0
    rows = [
        kill_at_writes(pc, rng, args.kills),
        kill_at_times(pc, rng, args.timed),
        kill_twice(pc, rng, 2 - few),
        kill_one_rank(pc, rng),
        disk_full(pc, rng),
    ]
    tr = Train(work, model, work / "ref.zarr")
    kills = (
        dict(timed=1, writes=1, publishes=1) if args.quick else dict(timed=4, writes=5, publishes=2)
    )
    rows += [train_kills(tr, rng, **kills), train_disk_full(tr, rng)]
    if not args.no_detection:
        rows += detection_rows()
    print(table(rows))
    print(
        f"\nseed {args.seed}, {time.monotonic() - start:.0f} s"
        + (f", kept {work}" if args.keep else "")
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
