"""The torch.distributed job as the core sees it (through :mod:`mtckpt.frameworks`):
this rank and the world size, and the ranks' agreement at restore."""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .. import coordination
from ..errors import MtckptError


def distributed_job() -> tuple[int, int] | None:
    """This rank and the world size, once torch.distributed is initialised (the core asks
    through :mod:`mtckpt.frameworks`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def job_coordinator(timeout: float) -> TorchCoordinator | None:
    """The ranks' agreement over torch.distributed, once it is initialised."""
    return TorchCoordinator(timeout) if distributed_job() is not None else None


class TorchCoordinator(coordination.GatheringCoordinator):
    """Restore agreement over torch.distributed: a gloo group of its own, so that its
    collectives work beside any backend and give up after ``timeout`` seconds. The group
    is made at the first gather and destroyed by ``release`` (the end of a restore): a
    manager kept across an in-process restart holds no connection of the old job, whose
    ranks learn of a fault when its connections close."""

    def __init__(self, timeout: float) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout
        self.group = None
        self._world = weakref.ref(dist.group.WORLD)  # the job it was made for

    def current(self) -> bool:
        return dist.is_initialized() and self._world() is dist.group.WORLD

    def release(self) -> None:
        group, self.group = self.group, None
        if group is not None and self.current():
            dist.destroy_process_group(group)

    def _all_gather(self, value: Any, what: str) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        try:
            if self.group is None:  # every rank gathers in the same order: made by all at once
                timeout = timedelta(seconds=self.timeout)
                self.group = dist.new_group(backend="gloo", timeout=timeout)
            dist.all_gather_object(gathered, value, group=self.group)
        except RuntimeError as exc:  # gloo reports timeouts and lost peers this way
            raise MtckptError(
                f"rank {self.rank}: the ranks did not {what} within {self.timeout} s (a rank "
                f"died or is not restoring): {exc}"
            ) from exc
        return gathered
