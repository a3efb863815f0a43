"""The training DataLoader: one endless batch stream, each batch one buffer from its worker.

Two costs used to sit in the training loop's data wait (tiny model, 8 workers, 29 ms steps:
data_wait_fraction 0.14; docs/performance.md):

- every epoch began with an empty prefetch: a DataLoader iterator ends with its epoch, and the
  next pass resets the workers and waits for its first batch (20-50 ms an epoch);
- receiving a batch from a worker cost the training process ~0.5 ms per tensor (each tensor in
  shared memory is a file-descriptor handoff and a mapping), 2.8 ms for a store batch, which the
  step waits for even when the batch is long ready.

`EpochLoader` draws every epoch from one stream that runs on across epoch ends; workers hand each
batch over as one contiguous byte buffer (`pack_batch`, pickled: one copy), which the training
process views as tensors again (`unpack_batch`, no copy). The batches, their order and their bytes
are exactly the sampler's and the store's.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from cogfun.train.data import Batch, BucketBatchSampler
    from cogfun.train.picks import Position, VariantPicker
    from cogfun.train.state import TrainingState


class BatchStream:
    """The sampler's batches from `start` = (epoch, batches done) on, epoch after epoch, without
    end: what the DataLoader draws from, so its workers keep prefetching across epoch ends.

    With `at` (the (step, micro-step) its first batch trains at) and the `picker` that counts
    positions on, each batch is `(bucket, slots, position)`: the dataset then reads only the mask
    variants the step at that position draws (`cogfun.train.picks`)."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler
        self.start = (0, 0)
        self.at: Position | None = None
        self.picker: VariantPicker | None = None

    def __iter__(self) -> Iterator[Batch]:
        # A generator, so `start` is read at the first draw (see BucketBatchSampler.__iter__).
        (epoch, done), at, picker = self.start, self.at, self.picker
        while True:
            for bucket, slots in self.sampler.batches(epoch, done):
                if at is None or picker is None:
                    yield bucket, slots
                    continue
                yield bucket, slots, at
                at = picker.after(at)
            epoch, done = epoch + 1, 0


class EpochPasses:
    """What both training loaders share: every pass is one epoch of `self.batches`, drawn from
    one endless stream. `epoch_pass(epoch, start)` is the pass from batch `start` of `epoch`;
    `follow(state)` passes epoch after epoch from where a `TrainingState` stands, advancing it as
    batches are taken (training); iterating the loader is the pass the sampler's `set_epoch` /
    `set_position` say (by hand). A pass that continues exactly where the last one stopped takes
    the batches already read ahead; any other position restarts the stream there. A read that
    fails (or is interrupted) ends the stream, so a later pass starts it afresh where it should.

    With a `picker` (`cogfun.train.picks.VariantPicker`, set by the trainer), `follow` also hands
    each batch's training position to the stream, so only the mask variants the step draws are
    read; a pass by hand never does (every variant is read), and a stream whose positions are not
    the ones wanted (a pass by hand, a batch trained at no position) is restarted.

    A loader keeps `_stream` (a `BatchStream`) and `_next` (the (epoch, batches done) its stream
    yields next, or None) and says how to `_restart(start, at)` the stream, `_take()` its next batch
    and `_drop()` it."""

    batches: BucketBatchSampler
    _stream: BatchStream
    _next: tuple[int, int] | None
    _next_at: Position | None = None  # the training position the stream's next batch is read for
    picker: VariantPicker | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator, so the sampler's position is taken at the first draw, as its own pass does.
        yield from self.epoch_pass(*self.batches.take_position())

    @property
    def next_position(self) -> tuple[int, int] | None:
        """(epoch, batches done) the running stream yields next; None when no stream runs."""
        return self._next

    @property
    def stream_start(self) -> tuple[int, int]:
        """The (epoch, batches done) the stream was last (re)started at."""
        return self._stream.start

    def follow(self, state: TrainingState, micro: int = 0) -> Iterator[dict[str, Any]]:
        """Batches from `state`'s position on, epoch after epoch without end; each batch is
        counted in `state` as it is handed out, and a finished epoch moves it to the next. The
        first batch trains at micro-step `micro` of `state.global_step`, each later one at the
        micro-step after (what the `picker`, when set, reads the mask variants for)."""
        at = (state.global_step, micro) if self.picker is not None else None
        if state.epoch_ended:
            state.next_epoch()
        while True:
            for batch in self.epoch_pass(*state.position, at=at):
                state.took_batch()
                at = self.picker.after(at) if at is not None else None
                yield batch
            state.next_epoch()

    def epoch_pass(
        self, epoch: int, start: int = 0, at: Position | None = None
    ) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from its batch `start` on (this rank's); with `at` (and a
        `picker`), the first trains at position `at` and only its mask variants are read."""
        self.batches.check_batches_done(start)
        return self._epoch((epoch, start), at)

    def _start_stream(self, start: tuple[int, int], at: Position | None) -> None:
        """Point the stream at `start`, its first batch read for training position `at`."""
        self._stream.start = start
        self._stream.at, self._stream.picker = at, self.picker

    def _restart(self, start: tuple[int, int], at: Position | None = None) -> None:
        raise NotImplementedError

    def _take(self) -> dict[str, Any]:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    def _epoch(self, want: tuple[int, int], at: Position | None = None) -> Iterator[dict[str, Any]]:
        at = at if self.picker is not None else None
        if self._next != want or self._next_at != at:  # _next None: no stream running
            self._restart(want, at)
            self._next_at = at
        epoch, done = want
        while done < len(self):
            try:
                batch = self._take()
            except BaseException:
                self._drop()
                raise
            done += 1
            self._next = (epoch, done) if done < len(self) else (epoch + 1, 0)
            self._next_at = self.picker.after(at) if at is not None else None
            at = self._next_at
            yield batch


class EpochLoader(EpochPasses, DataLoader):
    """A DataLoader over a `BucketBatchSampler` with worker processes, whose every pass is one
    epoch (`EpochPasses`). Items pass through `pack_batch` in the worker and `unpack_batch` here.
    """

    def __init__(
        self, dataset: Dataset, batches: BucketBatchSampler, ahead: int = 2, **kwargs: Any
    ) -> None:
        self.batches = batches
        self.ahead = ahead
        self._stream = BatchStream(batches)
        self._live: list[_Receiver | None] = [None]  # a holder the finalizer below can see
        self._next: tuple[int, int] | None = None  # (epoch, batches done) the stream yields next
        pack = partial(pack_batch, as_tensor=bool(kwargs.get("pin_memory")))
        DataLoader.__init__(
            self, dataset, batch_size=None, sampler=self._stream, collate_fn=pack, **kwargs
        )
        weakref.finalize(self, _stop_receiver, self._live)  # a dropped loader ends its thread

    def _end_workers(self) -> None:
        """Shut the workers down now (a new pass starts new ones). Left to garbage collection
        after a failed read, their shutdown waited out torch's 5 s join timeout per worker."""
        it = getattr(self, "_iterator", None)  # torch keeps persistent workers' iterator here
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self._iterator = None

    def _restart(self, start: tuple[int, int], at: Position | None = None) -> None:
        if self._live[0] is not None:
            self._live[0].stop()  # joined before the workers' iterator is reset under it
        self._start_stream(start, at)
        self._live[0] = _Receiver(DataLoader.__iter__(self), self.ahead)

    def _take(self) -> dict[str, Any]:
        return unpack_batch(next(self._live[0]))

    def _drop(self) -> None:
        if self._live[0] is not None:
            self._live[0].stop()
        self._live[0], self._next = None, None
        self._end_workers()


# ---- receiving batches on a background thread ----

_THREADS: list[tuple[threading.Thread, threading.Event]] = []


@atexit.register
def _join_receivers() -> None:
    """Stop and join every receiver thread at exit, before torch's own exit handlers (registered
    earlier, so run later) shut the workers down: a thread left inside a DataLoader iterator while
    the interpreter finalizes aborts the process."""
    for _, stop in _THREADS:
        stop.set()
    for thread, _ in _THREADS:
        thread.join()


class _Receiver:
    """`next()` of a DataLoader iterator, received on a background thread up to `depth` ahead
    (depth 0: by the caller, no thread). Taking a batch from a worker costs the training process
    0.5-3 ms, more when the cores are busy (the worker's sending thread must run); on the thread
    it overlaps the step, as torch's pin-memory thread does on CUDA. Only the thread touches the
    iterator until `stop()` has joined it."""

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._source = source if depth == 0 else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth:
            # The thread holds the iterator, the queue and the event, never this object.
            args = (source, self._queue, self._stop)
            self._thread = threading.Thread(
                target=_receive, args=args, name="cogfun-batches", daemon=True
            )
            _THREADS[:] = [(t, e) for t, e in _THREADS if t.is_alive()]
            _THREADS.append((self._thread, self._stop))
            self._thread.start()

    def __next__(self) -> Any:
        if self._source is not None:
            return next(self._source)
        item, error = self._queue.get()
        if error is not None:
            raise error
        return item

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _receive(source: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(out, stop, (item, None)):
                return
        _put(out, stop, (None, RuntimeError("the batch stream ended")))
    except Exception as exc:
        # Without this thread's frames in its traceback, the exception does not keep the
        # workers' iterator alive for as long as the caller keeps the exception.
        _put(out, stop, (None, exc.with_traceback(None)))


def _put(out: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    while not stop.is_set():
        try:
            out.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _stop_receiver(holder: list[_Receiver | None]) -> None:
    if holder[0] is not None:
        holder[0].stop(wait=False)


_ALIGN = 16  # every array starts at a multiple of this in the buffer, so any dtype can view it
_PICKLE_MAX = 512 * 1024  # larger batches cross in shared memory (pack_batch)


def pack_batch(batch: dict[str, Any], as_tensor: bool = False) -> dict[str, Any]:
    """A batch's tensors in one uint8 buffer (+ where each lies); other values as they are.

    The buffer is a tensor (it crosses in shared memory: one file-descriptor handoff) when it is
    large or `as_tensor` (pin_memory on CUDA: the pin-memory thread then pins it, and its views
    with it); a smaller one is a numpy array, pickled through the worker's pipe. Measured on 2
    cores: 1.4 MB batches load at 720 samples/s as a tensor, 450 as bytes; a 270 KB batch made
    the training loop wait 0.064 of its step as a tensor, 0.036 as bytes."""
    parts, layout, rest, offset = [], [], {}, 0
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            rest[key] = value
            continue
        raw = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        layout.append((key, str(value.dtype).removeprefix("torch."), tuple(value.shape), offset))
        pad = -len(raw) % _ALIGN
        parts += [raw, np.zeros(pad, np.uint8)]
        offset += len(raw) + pad
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    packed = torch.from_numpy(buffer) if as_tensor or len(buffer) > _PICKLE_MAX else buffer
    return {"packed": packed, "layout": layout, "rest": rest, "order": list(batch)}


def unpack_batch(packed: dict[str, Any]) -> dict[str, Any]:
    """The batch `pack_batch` packed: tensors are views of the one buffer (no copy)."""
    buffer = packed["packed"]
    buffer = buffer if isinstance(buffer, torch.Tensor) else torch.from_numpy(buffer)
    out: dict[str, Any] = dict(packed["rest"])
    for key, dtype, shape, offset in packed["layout"]:
        dt = getattr(torch, dtype)
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        out[key] = buffer[offset : offset + size].view(dt).reshape(shape)
    return {key: out[key] for key in packed["order"]}
