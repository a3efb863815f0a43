"""The processes of one precompute run: rank, world size, device and the few collectives it needs.

A plain `cogfun precompute ...` is one process and never imports accelerate. Under
`accelerate launch [--multi_gpu] --num_processes N $(which cogfun) precompute ...` (LOCAL_RANK set)
accelerate's `PartialState` starts torch.distributed. On CPU it is told to use gloo: without that,
two CPU processes each believe they are rank 0 of 1 (tests/test_precompute_procs.py checks the
backend). The collectives move small int64 tensors only: nothing is pickled between processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger("cogfun.precompute")

# The header pass and plan of a large dataset, and the store's creation, come before the first
# collective returns: a cold header pass over millions of files takes a while.
SETUP_TIMEOUT = timedelta(hours=12)


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def place(self) -> tuple[int, int]:
        """(rank, world): which shards of the store this process owns (`StoreWriter.owns`)."""
        return self.rank, self.world

    def _tensor(self, values: list[int]) -> torch.Tensor:
        # gloo reduces CPU tensors, nccl CUDA ones: the state's device is the right one for both.
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (every rank passes a list of the same length)."""
        if not self.distributed:
            return list(values)
        t = self._tensor(values)
        torch.distributed.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over the ranks."""
        if not self.distributed:
            return list(values)
        t = self._tensor(values)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]


def launched() -> bool:
    """Started by a launcher (accelerate launch / torchrun) rather than as a plain command."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cuda() -> bool:
    """A GPU is used when there is one, unless `ACCELERATE_USE_CPU` asks for the CPU."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def init_ranks() -> Ranks:
    """This process's place in the run; starts the process group when launched."""
    cuda = use_cuda()
    if not launched():
        return Ranks(0, 1, torch.device("cuda" if cuda else "cpu"), False)
    from accelerate import PartialState

    kwargs: dict = {"timeout": SETUP_TIMEOUT}
    if not cuda:
        kwargs["backend"] = "gloo"
    state = PartialState(**kwargs)
    distributed = state.num_processes > 1
    device = state.device if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    log.info(
        "process %d of %d (local %d) on %s, backend %s",
        state.process_index,
        state.num_processes,
        state.local_process_index,
        device,
        state.backend,
    )
    return Ranks(state.process_index, state.num_processes, device, distributed)
