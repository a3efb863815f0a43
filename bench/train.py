"""Training step on the store versus the original's online way, side by side in one run.

    python -m bench.train                    # proportional benchmark model (bench/models.py)
    python -m bench.train --tiny             # the tiny model instead
    python -m bench.train --workdir W        # keep models, clips and stores in W (reused on rerun)

Both ways train the same transformer on the same generated clips with the same step (bf16 autocast,
gradient checkpointing, AdamW, clipping at 0.05) and the same thread count:

- online (the original's scripts/train.py): every step decodes a clip with decord, resizes and crops
  it, draws a mask, VAE-encodes the video and the masked video (posterior samples), T5-encodes the
  caption, then runs the transformer step; VAE and T5 in bf16 as the original runs them.
- store (cogfun): the same transformer step fed by `cogfun.train.data.make_dataloader` over a store
  that `cogfun precompute` wrote from the same clips (then replicated to `--epoch-samples` samples
  through the store API, so epochs are not artificially short), with the default worker count
  and backend (reader threads); a third subprocess runs the same with worker processes
  (`--dataloader-backend processes`), for the `*_processes` figures.

The clips are generated (`--source-size`, default 1.25x the bucket edge, simple moving shapes), so
decoding them is cheaper than decoding real 720p footage: the online way's decode share here is
well below the ~20 % measured for the original on real clips (docs/performance.md), and the
speedup is a lower bound in that respect.

Each way runs in its own long-lived subprocess; the subprocesses start up together (not measured),
then the parent alternates them in rounds (ABBA order, this machine's speed drifts) and samples
each process tree's memory. Figures, one `name: value`
line each (defined in docs/performance.md):

- `online_step_ms`, `store_step_ms`: median step time (with `_min`/`_max`), warm-up excluded;
- `train_speedup_vs_online`: online ÷ store median (`_min`/`_max`: the ratio of each round;
  `_best`: fastest online ÷ fastest store step, the steadiest estimate when other jobs load the
  machine in bursts);
- `online_share_decode|vae|t5|transformer`: where the online step's time goes;
- `online_peak_mb`, `store_peak_mb`: peak of the summed proportional set size (PSS: shared pages
  split between the processes mapping them) of each subprocess and its loader workers, sampled
  every 0.5 s; `train_peak_rss_ratio` is store ÷ online; `store_workers_peak_mb` is the workers'
  part; `*_maxrss_mb` is the training process's own peak RSS (VmHWM);
- `data_wait_fraction`: in a separate run of the tiny model on its store with the default workers,
  time spent waiting for the next batch ÷ step time, after a warm-up that drains the prefetch;
  torch on cores - 1 threads (the loader keeps a core, as beside a GPU); the median of
  `--wait-rounds` fresh runs, alternated with the same on worker processes
  (`data_wait_fraction_processes`) and with torch on every core (`data_wait_fraction_all_cores`);
- `*_processes`: the store way's figures with worker processes instead of reader threads.

The set-up lives in `bench/train_setup.py`, the two ways' training loops in `bench/train_ways.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.train_setup import STRIDE, Setup, build_setup
from bench.train_ways import child_main, proc_mb


def _children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (cheap: no scan of every process)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids.extend(int(k) for k in task.read_text().split())
        except OSError:
            pass
    return kids


def pss_mb(pid: int) -> tuple[float, float]:
    """(PSS of the process, summed PSS of its descendants) in MB: shared pages are split between
    the processes that map them, so loader workers forked from the trainer are not counted twice."""
    own = proc_mb(pid, "smaps_rollup", "Pss")
    todo, others = _children(pid), 0.0
    while todo:
        child = todo.pop()
        others += proc_mb(child, "smaps_rollup", "Pss")
        todo.extend(_children(child))
    return own, others


class Child:
    """A training subprocess of one way; its tree's peak PSS is sampled in a thread."""

    def __init__(
        self,
        way: str,
        setup: Setup,
        args: argparse.Namespace,
        log: Path,
        backend: str = "threads",
        threads: int | None = None,
    ):
        payload = {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(setup).items()
        }
        command = [
            sys.executable, "-m", "bench.train", "--child", way,
            "--setup", json.dumps(payload), "--threads", str(threads or args.threads),
            "--workers", str(args.workers), "--seed", str(args.seed), "--backend", backend,
        ]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )
        self.peak_mb = 0.0  # the tree's summed PSS
        self.peak_workers_mb = 0.0
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._sample, daemon=True)
        self._watch.start()
        self._ready = False  # its "ready" line is read by `wait_ready` (or the first `run`)

    def wait_ready(self) -> None:
        """Wait until the child has built its model and loader. Children constructed together
        start up together (start-up is not measured)."""
        if not self._ready:
            self._read()
            self._ready = True

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            own, workers = pss_mb(self.proc.pid)
            self.peak_mb = max(self.peak_mb, own + workers)
            self.peak_workers_mb = max(self.peak_workers_mb, workers)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(
                f"benchmark child {self.proc.args[3]} died; its log {self.log}:\n{tail}"
            )
        return json.loads(line)

    def run(self, steps: int) -> list[dict]:
        self.wait_ready()
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()["rows"]

    def quit(self) -> dict:
        self.wait_ready()
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(timeout=60)
        self._stop.set()
        self._watch.join()
        return out


def _median_line(prefix: str, values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {
        prefix: statistics.median(values) * scale,
        f"{prefix}_min": min(values) * scale,
        f"{prefix}_max": max(values) * scale,
    }


def compare(setup: Setup, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Alternate online and store rounds (and the store read by worker processes instead of
    threads); step times, time shares and peak memory."""
    online = Child("online", setup, args, workdir / "online.log")
    store = Child("store", setup, args, workdir / "store.log")
    procs = Child("store", setup, args, workdir / "store_processes.log", backend="processes")
    children = {"online": online, "store": store, "processes": procs}
    for child in children.values():  # started together above; each warmed up alone
        child.wait_ready()
    for child in children.values():
        child.run(args.warmup)
    rows: dict[str, list[dict]] = {way: [] for way in children}
    ratios = []
    for r in range(args.rounds):
        order = list(children) if r % 2 == 0 else list(reversed(children))
        got = {way: children[way].run(args.steps) for way in order}
        for way, steps in got.items():
            rows[way].extend(steps)
        ratios.append(
            statistics.median(s["step"] for s in got["online"])
            / statistics.median(s["step"] for s in got["store"])
        )
    ends = {way: child.quit() for way, child in children.items()}
    on = [s["step"] for s in rows["online"]]
    st = [s["step"] for s in rows["store"]]
    pr = [s["step"] for s in rows["processes"]]
    total = sum(on)
    decode, vae, t5 = (sum(s[k] for s in rows["online"]) / total for k in ("decode", "vae", "t5"))
    return {
        **_median_line("online_step_ms", on, 1e3),
        **_median_line("store_step_ms", st, 1e3),
        "train_speedup_vs_online": statistics.median(on) / statistics.median(st),
        "train_speedup_vs_online_min": min(ratios),
        "train_speedup_vs_online_max": max(ratios),
        "train_speedup_vs_online_best": min(on) / min(st),
        "online_share_decode": decode,
        "online_share_vae": vae,
        "online_share_t5": t5,
        "online_share_transformer": 1 - decode - vae - t5,
        "store_wait_fraction_alternating": sum(s["wait"] for s in rows["store"]) / sum(st),
        "online_peak_mb": online.peak_mb,
        "store_peak_mb": store.peak_mb,
        "train_peak_rss_ratio": store.peak_mb / online.peak_mb,
        "store_workers_peak_mb": store.peak_workers_mb,
        "online_maxrss_mb": ends["online"]["maxrss_mb"],
        "store_maxrss_mb": ends["store"]["maxrss_mb"],
        **_median_line("store_processes_step_ms", pr, 1e3),
        "store_processes_peak_mb": procs.peak_mb,
        "store_processes_workers_peak_mb": procs.peak_workers_mb,
        "train_peak_rss_ratio_processes": procs.peak_mb / online.peak_mb,
        "train_speedup_vs_online_processes": statistics.median(on) / statistics.median(pr),
    }


def data_wait(setup: Setup, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Continuous store steps of the tiny model: waiting time ÷ step time after a warm-up; the
    median of `--wait-rounds` fresh runs of each configuration, alternated:

    - reader threads (the default backend), torch on `--wait-threads` threads (cores - 1: the
      loader has a core, as on a GPU machine, where the CPU only feeds the accelerator);
    - worker processes, the same threads (`_processes`);
    - reader threads with torch on every core (`_all_cores`): every read then takes its core
      time from the step itself, so this measures how scarce the CPU is, not the loader."""
    configs = {
        "": ("threads", args.wait_threads),
        "_processes": ("processes", args.wait_threads),
        "_all_cores": ("threads", args.threads),
    }
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for r in range(args.wait_rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        # A round's fresh children start up together (not measured), then each is warmed up
        # and measured alone while the others wait idle, their read-ahead queues full.
        children = {}
        for name in order:
            backend, threads = configs[name]
            log = workdir / f"wait{name or '_threads'}.log"
            children[name] = Child("store", setup, args, log, backend=backend, threads=threads)
        for child in children.values():
            child.wait_ready()
        for name in order:
            child = children[name]
            child.run(args.wait_warmup)  # drains the batches prefetched while workers started
            rows = child.run(args.wait_steps)
            child.quit()
            steps = [s["step"] for s in rows]
            wait = sum(s["wait"] for s in rows) / sum(steps)
            rounds[name].append((wait, statistics.median(steps)))
    out: dict[str, float] = {"data_wait_threads": args.wait_threads}
    for name, got in rounds.items():
        out[f"data_wait_fraction{name}"] = statistics.median(w for w, _ in got)
        out[f"data_wait_step_ms{name}"] = statistics.median(m for _, m in got) * 1e3
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from cogfun.train.config import TrainConfig

    default_workers = next(
        f.default for f in dataclasses.fields(TrainConfig) if f.name == "dataloader_num_workers"
    )
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="compare on the tiny model")
    p.add_argument(
        "--workdir", type=Path, help="models, clips, stores and logs (default: a temp dir)"
    )
    p.add_argument("--clips", type=int, default=4, help="distinct clips (and captions)")
    p.add_argument("--size", type=int, default=128, help="square bucket edge in pixels (x16)")
    p.add_argument("--frames", type=int, default=49, help="frames per clip (4k+1)")
    p.add_argument("--source-size", type=int, help="source clip edge (default 1.25x --size, even)")
    p.add_argument("--epoch-samples", type=int, default=64, help="store samples per epoch")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per way per round")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per way first")
    p.add_argument(
        "--wait-size", type=int, default=64, help="bucket edge of the tiny data-wait run"
    )
    p.add_argument("--wait-warmup", type=int, help="default: prefetched batches + 4")
    p.add_argument("--wait-steps", type=int, default=30)
    p.add_argument("--wait-rounds", type=int, default=3, help="data-wait runs per configuration")
    p.add_argument(
        "--wait-threads",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) - 1),
        help="torch threads of the data-wait runs (default: cores - 1, a core for the loader)",
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workers", type=int, default=default_workers, help="store loader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=("online", "store"), help=argparse.SUPPRESS)
    p.add_argument("--backend", default="threads", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.wait_warmup is None:
        args.wait_warmup = 4 * args.workers + 4  # make_dataloader's prefetch_factor is 4
    if args.size % 16 or args.wait_size % 16 or (args.frames - 1) % 4:
        p.error("--size and --wait-size must be multiples of 16 and --frames of the form 4k+1")
    return args


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, float | str]:
    start = time.perf_counter()
    source = args.source_size or args.size * 5 // 4 // 2 * 2  # decoded larger, then resized
    figures: dict[str, float | str] = {
        "model": "tiny" if args.tiny else "proportional",
        "clip": f"{args.frames}x{args.size}x{args.size}",
        "source_clip": f"{args.frames * STRIDE + 3}x{source}x{source}",
        "threads": args.threads,
        "workers": args.workers,
        "load_avg_1m_start": os.getloadavg()[0],
    }
    rest = (args.epoch_samples, args.threads)
    setup = build_setup(workdir, args.tiny, args.clips, args.size, args.frames, source, *rest)
    if args.tiny and args.wait_size == args.size:
        wait_setup = setup
    else:
        wait_source = args.wait_size * 5 // 4 // 2 * 2
        wait_setup = build_setup(
            workdir, True, args.clips, args.wait_size, args.frames, wait_source, *rest
        )
    figures["setup_s"] = time.perf_counter() - start
    figures.update(compare(setup, args, workdir))
    figures.update(data_wait(wait_setup, args, workdir))
    figures["load_avg_1m_end"] = os.getloadavg()[0]
    figures["total_s"] = time.perf_counter() - start
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    torch.set_num_threads(args.threads)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        figures = measure(args, args.workdir)
    else:  # nothing left behind (the models alone are ~100 MB)
        with tempfile.TemporaryDirectory(prefix="cogfun-bench-train-") as tmp:
            figures = measure(args, Path(tmp))
    for name, value in figures.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
