"""Reading the store for training: a bucket batch sampler, a batched store dataset, the DataLoader.

The data path draws no randomness of its own beyond the batch order: every per-step draw (noise,
timestep, posterior sample, mask variant, text-to-video zeroing, caption dropout) happens in the
training step from a seeded ``torch.Generator``. The batch order is a pure function of
``(seed, epoch, bucket slots, batch_size, num_replicas)``, so resume only needs ``(epoch,
batches_done)``.

Uneven work across ranks: an epoch's batch list is *padded* to a multiple of ``num_replicas`` by
repeating batches from its head (cyclically when there are fewer batches than ranks), never
truncated. So every rank takes the same number of batches (no rank waits forever in a collective),
every stored sample is seen at least once per epoch, and at most ``num_replicas - 1`` batches per
epoch are seen twice.

Prefetching runs the sampler ahead of the training step, so the sampler cannot know how many batches
were *consumed*: the training loop counts them in its ``TrainingState`` (`cogfun.train.state`), the
one owner of the position, and the loaders start each pass where that state says
(``batches(epoch, start)``). ``set_epoch`` / ``set_position`` (or ``load_state_dict``) are for
iterating the sampler, or a loader over it, by hand.

Two loaders read the same batches in the same order (``make_dataloader(backend=...)``): reader
threads of the training process sharing one ``StoreReader`` (the default, `cogfun.train.threaded`),
or DataLoader worker processes (`cogfun.train.prefetch`). Workers open the store lazily, once per
process: an open ``StoreReader`` is never pickled or forked into a worker (zarr resets its IO loop
after a fork, and the dataset drops a reader opened by another process). Batches come out as one
``read_batch`` per bucket batch, bf16 tensors plus ``caption`` indices, the captions' T5 embeddings
(``caption_embeds``, so the training step reads nothing), ``bucket`` and ``slots``.

Several stores (``cogfun train --latents A.zarr B.zarr:3``): the sampler's buckets are then keyed
``(store index, bucket name)``, so a batch never mixes stores (nor buckets) and the order is the
same pure function of the seed and the slot lists; the batch also says its ``store`` index. A
store's weight ``N`` lists each of its slots N times before the per-epoch shuffle, so each copy
lands in its own place in the epoch, as the original's ``video_repeat`` repeats dataset rows. One
store of weight 1 gives exactly the batches a single store always gave.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cogfun.train.prefetch import EpochLoader
from cogfun.train.state import ORDER_KEYS, order_mismatch
from cogfun.train.threaded import ThreadLoader
from torch.utils.data import Dataset, get_worker_info

log = logging.getLogger(__name__)

BucketKey = str | tuple[int, str]  # a bucket name, or (store index, bucket name) for several
# (bucket, slots in that bucket), and when training follows the stream with a variant picker the
# (step, micro-step) the batch trains at (`cogfun.train.picks`)
Batch = tuple[BucketKey, list[int]] | tuple[BucketKey, list[int], tuple[int, int]]
BACKENDS = ("threads", "processes")  # how the loader's workers run (make_dataloader)


class BucketBatchSampler:
    """Batches of slots from one bucket each, shuffled per epoch, split evenly over ranks.

    ``bucket_slots`` maps a bucket key to the slot indices that may be read (the done slots; a
    slot listed N times is seen N times an epoch). Yields ``(bucket key, slots)``. See the module
    docstring for the padding rule.
    """

    def __init__(
        self,
        bucket_slots: Mapping[BucketKey, np.ndarray],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"BucketBatchSampler: need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}"
            )
        # Sorted names: the order must not depend on how the caller built the dict.
        self.buckets: dict[BucketKey, np.ndarray] = {
            name: np.asarray(bucket_slots[name], dtype=np.int64).reshape(-1)
            for name in sorted(bucket_slots)
            if len(bucket_slots[name]) > 0
        }
        if not self.buckets:
            raise ValueError("BucketBatchSampler: no samples in any bucket (empty store?)")
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0  # batches of self.epoch the next iteration skips (set_position)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.buckets.values())

    def _num_global_batches(self) -> int:
        return sum(math.ceil(len(s) / self.batch_size) for s in self.buckets.values())

    def __len__(self) -> int:
        """Batches per rank per epoch (a full epoch, whatever set_position skips)."""
        return math.ceil(self._num_global_batches() / self.num_replicas)

    def _epoch_order(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The epoch as arrays: each bucket's shuffled slots, and per global (padded) batch its
        bucket index and start offset. O(samples) numpy, no per-batch Python objects, so a 100k
        store costs the same to start as a 1k one."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        shuffled, bucket_of, start_of = [], [], []
        for i, slots in enumerate(self.buckets.values()):
            shuffled.append(slots[torch.randperm(len(slots), generator=gen).numpy()])
            # The last partial batch is kept (smaller) so no sample is silently never seen.
            starts = np.arange(0, len(slots), self.batch_size)
            bucket_of.append(np.full(len(starts), i))
            start_of.append(starts)
        n = self._num_global_batches()
        order = torch.randperm(n, generator=gen).numpy()
        order = order[np.arange(len(self) * self.num_replicas) % n]  # pad by repeating the head
        return shuffled, np.concatenate(bucket_of)[order], np.concatenate(start_of)[order]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from its batch ``start`` on, built as they are drawn."""
        self.check_batches_done(start)
        return self._batches(epoch, self.rank + start * self.num_replicas, self.num_replicas)

    def _batches(self, epoch: int, first: int, step: int) -> Iterator[Batch]:
        """Global batches first, first + step, ... of the epoch, built one at a time."""
        shuffled, bucket_of, start_of = self._epoch_order(epoch)
        names = list(self.buckets)
        for b, start in zip(
            bucket_of[first::step].tolist(), start_of[first::step].tolist(), strict=True
        ):
            yield names[b], shuffled[b][start : start + self.batch_size].tolist()

    def global_batches(self, epoch: int) -> list[Batch]:
        """The epoch's padded batch list over all ranks; rank r takes items r, r+R, r+2R, ..."""
        return list(self._batches(epoch, 0, 1))

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """This rank's full, deterministic batch list for ``epoch``."""
        return list(self._batches(epoch, self.rank, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._skip = 0

    def check_batches_done(self, batches_done: int) -> None:
        if not 0 <= batches_done <= len(self):
            raise ValueError(
                f"BucketBatchSampler: batches_done {batches_done} is outside 0..{len(self)} "
                "(batches per rank per epoch)"
            )

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Make the next pass start at batch ``batches_done`` of ``epoch`` (one pass only)."""
        self.check_batches_done(batches_done)
        self.epoch = epoch
        self._skip = batches_done

    def take_position(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass starting now; the ``set_position`` skip is spent, so
        a later pass over the same epoch (without set_position) is the whole epoch again."""
        position = (self.epoch, self._skip)
        self._skip = 0
        return position

    def __iter__(self) -> Iterator[Batch]:
        # A generator: the position is taken when drawing starts, not when iter() is called. A
        # DataLoader with workers calls iter(sampler) twice before it draws (torch's
        # _BaseDataLoaderIter.__init__ and _reset); a skip taken eagerly would be spent on the
        # discarded first iterator and a resumed run would replay the epoch from its start.
        yield from self.batches(*self.take_position())

    def order(self) -> dict[str, int]:
        """What fixes the batch order besides the epoch (`cogfun.train.state.ORDER_KEYS`)."""
        return {key: int(getattr(self, key)) for key in ORDER_KEYS}

    def state_dict(self, batches_done: int) -> dict[str, int]:
        """Plain ints (JSON): the position ``batches_done`` into this epoch, and the order."""
        return {"epoch": self.epoch, "batches_done": batches_done, **self.order()}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position; refuses when the order would differ (another seed, batch size, ...)."""
        mismatch = order_mismatch(state, self.order())
        if mismatch:
            raise ValueError(f"BucketBatchSampler: cannot resume the saved data order ({mismatch})")
        self.set_position(int(state["epoch"]), int(state["batches_done"]))


class StoreBatchDataset(Dataset):
    """Map-style dataset whose keys are sampler batches: ``dataset[(bucket, slots)]`` is one batch.

    The store is opened on first use in each process, so constructing the dataset (and pickling it
    into spawned workers) never carries an open store, only its name (an object store's Location
    keeps its storage options) and `cache` (`open_store`'s `--cache-dir` arguments). A damaged
    sample raises ``DamagedSample`` naming it, unless ``skip_damaged``: then it is dropped from the
    batch and logged.
    ``dataset[(bucket, slots, (step, micro))]`` with a ``picker`` reads, of an inpaint store, only
    the mask variants the training step at that position draws (``variants_read`` says which).
    """

    def __init__(
        self,
        store_path: Any,
        skip_damaged: bool = False,
        picker: Any = None,
        cache: Mapping[str, Any] | None = None,
    ) -> None:
        self.store_path = _store_name(store_path)
        self.cache = dict(cache or {})
        self.skip_damaged = skip_damaged
        self.picker = picker  # a cogfun.train.picks.VariantPicker, or None: every variant
        self._reader: Any = None
        self._reader_pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_reader_pid"] = None
        return state

    def use_reader(self, reader: Any) -> None:
        """Read through `reader` (already open in this process) instead of opening one."""
        self._reader, self._reader_pid = reader, os.getpid()

    def reader(self) -> Any:
        """This process's StoreReader (reopened after a fork: handles are per process)."""
        if self._reader is None or self._reader_pid != os.getpid():
            from cogfun.common.store import open_store

            self._reader = open_store(self.store_path, **self.cache)
            self._reader_pid = os.getpid()
        return self._reader

    def __getitem__(self, batch: Batch) -> dict[str, Any]:
        from cogfun.common.store import DamagedSample

        bucket, slots = batch[0], [int(s) for s in batch[1]]
        at = batch[2] if len(batch) > 2 else None
        reader = self.reader()
        while True:
            try:
                variants = self._variants(reader, bucket, len(slots), at)
                out = dict(reader.read_batch(bucket, slots, verify=True, variants=variants))
                break
            except DamagedSample as exc:
                if not self.skip_damaged or exc.slot not in slots:
                    raise
                log.warning("skipping %s", exc)
                slots = [s for s in slots if s != exc.slot]
        out["caption_embeds"] = self._caption_embeds(reader, out)
        out["bucket"] = bucket
        out["slots"] = slots
        return out

    def _variants(
        self, reader: Any, bucket: str, size: int, at: tuple[int, int] | None
    ) -> list[list[int]] | None:
        """The mask variants of each sample the step at `at` uses; None (all) without a position,
        a picker or mask variants (a normal store)."""
        if at is None or self.picker is None or not reader.layout.masks_per_sample:
            return None
        return self.picker.picks(bucket, reader.buckets[bucket].latent_shape, size, at)

    @staticmethod
    def _caption_embeds(reader: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's caption embeddings (B, L, D) bf16, each distinct caption read once."""
        captions = batch["caption"].tolist()
        if not captions:
            length, dim = reader.layout.text_len, reader.layout.text_dim
            return torch.zeros(0, length, dim, dtype=torch.bfloat16)
        read = {i: reader.caption_embedding(i) for i in dict.fromkeys(captions)}
        return torch.stack([read[i] for i in captions])


class MultiStoreDataset(Dataset):
    """Batches keyed ``((store index, bucket), slots)``, each read from its own store's dataset;
    the batch also carries its ``store`` index."""

    def __init__(self, parts: Sequence[StoreBatchDataset]) -> None:
        self.parts = list(parts)

    def reader(self) -> list[Any]:
        """Every store's reader in this process (a worker opens them all before its first batch)."""
        return [part.reader() for part in self.parts]

    def __getitem__(self, batch: Batch) -> dict[str, Any]:
        (index, bucket), rest = batch[0], tuple(batch[1:])
        out = self.parts[index][(bucket, *rest)]
        out["store"] = index
        return out


StoreArg = Any  # a store (Path, URL or Location), or (store, weight) pairs


def _store_name(store: Any) -> Any:
    """A local store as a Path; an object store as its Location, which pickles with its storage
    options (a worker process reconnects with them, whatever its defaults)."""
    from cogfun.common.store import Location, location

    if isinstance(store, Location) or "://" in str(store):
        return location(store)
    return Path(store)


def make_dataloader(
    store_path: StoreArg,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world: int,
    skip_damaged: bool = False,
    prefetch_factor: int | None = None,
    backend: str = "threads",
    picker: Any = None,
    cache: Mapping[str, Any] | None = None,
) -> tuple[ThreadLoader | EpochLoader, BucketBatchSampler]:
    """A loader yielding one store batch per item, and its sampler (for set_epoch/set_position).

    ``store_path`` is one store, or ``(store, weight)`` pairs (several stores: module docstring).
    Each pass over the loader is one epoch of the sampler, prefetched across epoch boundaries.
    ``backend`` "threads": ``num_workers`` reader threads in this process share one open store,
    ``prefetch_factor`` (default 2) batches per thread ahead; "processes": a DataLoader with
    ``num_workers`` worker processes, ``prefetch_factor`` (default 4) batches each ahead
    (``batch_size=None``: the sampler yields whole batches and the dataset reads each in one
    call, so there is no per-sample fetch and no collation). ``num_workers`` 0 reads in the
    caller's thread either way. A threads batch is ready once read, so fewer need to wait ahead
    (a real 2b-InP batch of 4 with 4 mask variants is ~100 MB). ``picker`` (the trainer's
    `cogfun.train.picks.VariantPicker`): ``follow`` then reads only the mask variants each step
    draws (that batch: 32 MB read instead of 69, `python -m bench.loader`); passes by hand read
    every variant. ``cache``: `open_store`'s cache arguments for every store it opens (`--cache-dir`).
    """
    from cogfun.common.store import open_store

    if backend not in BACKENDS:
        raise ValueError(f"make_dataloader: backend {backend!r} is not one of {BACKENDS}")
    pairs = list(store_path) if isinstance(store_path, list | tuple) else [(store_path, 1)]
    readers = [open_store(path, **(cache or {})) for path, _ in pairs]
    several = len(pairs) > 1
    slots = {
        (i, name) if several else name: np.tile(info.slots, weight)
        for i, (reader, (_, weight)) in enumerate(zip(readers, pairs, strict=True))
        for name, info in reader.buckets.items()
    }
    sampler = BucketBatchSampler(
        slots,
        batch_size=batch_size,
        seed=seed,
        num_replicas=world,
        rank=rank,
    )
    parts = [StoreBatchDataset(path, skip_damaged, picker, cache) for path, _ in pairs]
    dataset: Any = MultiStoreDataset(parts) if several else parts[0]
    pin = torch.cuda.is_available()
    if backend == "threads":
        for part, reader in zip(parts, readers, strict=True):
            part.use_reader(reader)
        ahead = (prefetch_factor or 2) * num_workers
        device = torch.cuda.current_device() if pin else None  # this rank's, set by accelerate
        threads = ThreadLoader(dataset, sampler, num_workers, ahead, pin, device)
        threads.picker = picker
        return threads, sampler
    # Only the done-slot lists are taken from these readers; workers open their own.
    workers = {}
    if num_workers > 0:
        workers = {
            "persistent_workers": True,
            "prefetch_factor": prefetch_factor or 4,
            "worker_init_fn": _worker_init,
        }
    loader = EpochLoader(
        dataset,
        sampler,
        ahead=2 if num_workers > 0 else 0,
        num_workers=num_workers,
        pin_memory=pin,
        # Own generator: otherwise each new iterator draws its worker base seed from torch's global
        # RNG, which would make the training step's randomness depend on the loader.
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )
    loader.picker = picker
    return loader, sampler


def _worker_init(worker_id: int) -> None:
    """Opens the worker's store while the main process is still setting up, so the first batch does
    not pay for it. Seeds nothing: the data path draws no randomness (torch already limits each
    worker to one thread)."""
    info = get_worker_info()
    if info is not None:
        info.dataset.reader()
