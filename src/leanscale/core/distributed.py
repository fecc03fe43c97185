"""``torchrun`` helpers shared by every technique's CLI: start gloo from the environment, the
rank and world size, and the exit rule that keeps rank 0 from aborting at shutdown."""

from __future__ import annotations

import gc
import os

__all__ = ["init_from_env", "rank_and_world", "shutdown"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str = "gloo") -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1), start the process group; True if started here."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
        return True
    return False


def shutdown() -> None:
    """The torchrun exit rule: drop DDP objects first (the caller), collect, barrier, destroy.

    On this project's CPUs, rank 0 sometimes aborts at exit ("terminate called without an active
    exception") when DDP objects are still alive at ``destroy_process_group``.
    """
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
