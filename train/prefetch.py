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

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from cogfun.train.data import Batch, BucketBatchSampler


class _BatchStream:
    """The sampler's batches from `start` = (epoch, batches done) on, epoch after epoch, without
    end: what the DataLoader draws from, so its workers keep prefetching across epoch ends."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler
        self.start = (0, 0)

    def __iter__(self) -> Iterator[Batch]:
        # A generator, so `start` is read at the first draw (see BucketBatchSampler.__iter__).
        s, (epoch, done) = self.sampler, self.start
        while True:
            yield from s._batches(epoch, s.rank + done * s.num_replicas, s.num_replicas)
            epoch, done = epoch + 1, 0


class EpochLoader(DataLoader):
    """A DataLoader over a `BucketBatchSampler` whose every pass is one epoch (the sampler's
    `set_epoch` / `set_position` say which, and from where), drawn from one endless stream.

    A pass that continues exactly where the last one stopped (the loop's `set_epoch(e + 1)` after
    a full epoch, or `set_position` at the point reached) takes the batches already prefetched;
    any other position restarts the stream there. Items pass through `pack_batch` in the worker
    and `unpack_batch` here.
    """

    def __init__(self, dataset: Dataset, batches: BucketBatchSampler, **kwargs: Any) -> None:
        self.batches = batches
        self._stream = _BatchStream(batches)
        self._live: Iterator[Any] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, batches done) the stream yields next
        pack = partial(pack_batch, as_tensor=bool(kwargs.get("pin_memory")))
        super().__init__(dataset, batch_size=None, sampler=self._stream, collate_fn=pack, **kwargs)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, Any]]:
        s = self.batches
        want, s._skip = (s.epoch, s._skip), 0  # the skip is spent, as the sampler's own pass does
        if self._live is None or self._next != want:
            self._stream.start = want
            self._live = super().__iter__()
        epoch, done = want
        while done < len(s):
            try:
                packed = next(self._live)
            except Exception:  # a failed read ends the stream: a later pass starts it afresh
                self._live, self._next = None, None
                raise
            done += 1
            self._next = (epoch, done) if done < len(s) else (epoch + 1, 0)
            yield unpack_batch(packed)


_ALIGN = 16  # every array starts at a multiple of this in the buffer, so any dtype can view it


def pack_batch(batch: dict[str, Any], as_tensor: bool = False) -> dict[str, Any]:
    """A batch's tensors in one uint8 buffer (+ where each lies); other values as they are.
    `as_tensor` (with pin_memory on CUDA): the buffer is a tensor, so it crosses in shared memory
    and the pin-memory thread pins it (its views are then pinned too); else a numpy array."""
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
    packed = torch.from_numpy(buffer) if as_tensor else buffer
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
