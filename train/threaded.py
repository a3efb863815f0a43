"""The default training loader: store batches read by threads of the training process.

A store batch costs file reads, Blosc/zstd decompression and blake2b checksums, and all three
release the GIL (2 threads decompress and hash twice as fast as 1 here), so threads read as fast
as DataLoader worker processes without what the processes cost:

- memory: each worker process is a copy of the trainer's Python (~14 MB private, ~55 MB PSS each
  on 2 cores, 8 workers: the store way peaked above the original's online way,
  `train_peak_rss_ratio` 1.24; docs/performance.md);
- the handoff: a batch from a worker is pickled or passed through shared memory and received by
  the training process (0.5-3 ms of its time a batch, `data_wait_fraction` 0.026 with the tiny
  model); a batch from a thread is a finished tensor in this process's memory.

`ThreadLoader` passes over epochs as `EpochLoader` does (`EpochPasses`: one endless stream,
read ahead across epoch ends, restarted wherever a pass does not continue it). Batches come out in
the sampler's order, whatever order the threads finish in. A failed read raises the reader's own
exception (a `DamagedSample` names the sample) and ends the stream; the next pass starts it afresh.

On CUDA the threads also pin each batch's memory, so the training step's
`.to(device, non_blocking=True)` copies overlap the step instead of blocking it; they work on the
training process's device (`device`), never on GPU 0 by default.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from cogfun.train.prefetch import BatchStream, EpochPasses

if TYPE_CHECKING:
    from cogfun.train.data import Batch, BucketBatchSampler
    from cogfun.train.picks import Position


class ThreadLoader(EpochPasses):
    """Batches of `batches` (a `BucketBatchSampler`) read as `dataset[batch]` on `threads`
    threads, at most `ahead` batches ahead of the consumer (threads 0: read inline, nothing ahead).
    """

    def __init__(
        self,
        dataset: Any,
        batches: BucketBatchSampler,
        threads: int,
        ahead: int,
        pin_memory: bool = False,
        device: int | None = None,
    ) -> None:
        if threads < 0:
            raise ValueError(f"ThreadLoader: threads must be >= 0, got {threads}")
        self.dataset = dataset
        self.batches = batches
        self.threads = threads
        self.ahead = max(ahead, threads) if threads else 0
        self.pin_memory = pin_memory
        self._stream = BatchStream(batches)
        self._source: Iterator[Batch] | None = None
        self._pending: deque[Future] = deque()  # in the stream's order
        self._next: tuple[int, int] | None = None  # (epoch, batches done) the stream yields next
        self._pool = None
        if threads:
            # A thread's CUDA calls go to device 0 unless told otherwise: pinning there from
            # rank 3's threads would open a context (~0.5 GB) on GPU 0. torch's own pin-memory
            # thread sets the device the same way.
            init = {"initializer": _use_device, "initargs": (device,)} if device is not None else {}
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cogfun-read", **init)
        weakref.finalize(self, _shutdown, self._pool, self._pending)

    def _restart(self, start: tuple[int, int], at: Position | None = None) -> None:
        self._drop()
        self._start_stream(start, at)
        self._source = iter(self._stream)

    def _drop(self) -> None:
        """Forget the stream and what was read ahead (reads already running finish unseen)."""
        while self._pending:
            self._pending.popleft().cancel()
        self._source, self._next = None, None

    def _take(self) -> dict[str, Any]:
        if self._pool is None:
            return fetch(self.dataset, self.pin_memory, next(self._source))
        while len(self._pending) <= self.ahead:  # the one taken now, and `ahead` after it
            # Not a bound method: a queued read must not keep the loader alive.
            future = self._pool.submit(fetch, self.dataset, self.pin_memory, next(self._source))
            self._pending.append(future)
        return self._pending.popleft().result()


def fetch(dataset: Any, pin: bool, batch: Batch) -> dict[str, Any]:
    """`dataset[batch]`, its tensors pinned when `pin` (then copies; else the item as it is)."""
    out = dataset[batch]
    if pin:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def _use_device(index: int) -> None:
    torch.cuda.set_device(index)


def _shutdown(pool: ThreadPoolExecutor | None, pending: deque[Future]) -> None:
    while pending:
        pending.popleft().cancel()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
