"""Mode 3 of the noise scale, DDP: a communication hook that records the local and the averaged
squared norms of every gradient bucket (see :meth:`GradientNoiseScale.attach_ddp
<leanscale.large_batch.noise_scale.GradientNoiseScale.attach_ddp>`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param


@dataclass
class _DDPMeasurement:
    local_sq_sum: torch.Tensor  # 0-d float64: sum over buckets of |local bucket|^2, all-reduced (sum over ranks)
    global_sq: list  # per bucket, 0-d float64 |averaged bucket|^2 (filled by the futures' callbacks)
    world_size: int
    local_batch_size: int | None


@dataclass
class _DDPState:
    pending: list  # the estimator's list of _DDPMeasurement
    group: Any
    world_size: int
    local_batch_size: int | None
    inner: Callable
    inner_state: Any
    local_sq: list = field(default_factory=list)  # this iteration: per bucket, 0-d float64
    global_sq: list = field(default_factory=list)


def _noise_scale_comm_hook(state: _DDPState, bucket):  # -> Future[Tensor]; no annotation: DDP
    # checks it by value and would reject the string this module's postponed annotations make of it
    """DDP communication hook: record local and averaged squared norms, average as usual.

    DDP calls the hooks of one backward pass in bucket order (index 0 first, ``is_last()`` last)
    on every rank, so the extra scalar all-reduce issued on the last bucket is matched across ranks.
    """
    import torch.distributed as dist

    if bucket.index() == 0:  # a new backward pass
        state.local_sq, state.global_sq = [], []
    buf = bucket.buffer()  # (n_bucket,) flat local gradients of this bucket, before averaging
    state.local_sq.append(torch.linalg.vector_norm(buf.detach(), dtype=torch.float64).square())
    global_sq = state.global_sq
    slot = len(global_sq)
    global_sq.append(None)

    def record(fut):
        averaged = fut.value()  # (n_bucket,) averaged gradients
        global_sq[slot] = torch.linalg.vector_norm(averaged.detach(), dtype=torch.float64).square()
        return averaged

    fut = state.inner(state.inner_state, bucket).then(record)
    if not bucket.is_last():
        return fut
    device = state.local_sq[0].device
    local_sum = torch.stack([t.to(device) for t in state.local_sq]).sum()  # 0-d float64
    scalar = dist.all_reduce(local_sum, group=state.group, async_op=True).get_future()
    measurement = _DDPMeasurement(local_sum, global_sq, state.world_size, state.local_batch_size)

    def finish(_):
        state.pending.append(measurement)
        return fut.value()

    return torch.futures.collect_all([fut, scalar]).then(finish)


def attach_hook(
    ddp_model: Any,
    pending: list,
    local_batch_size: int | None,
    hook: Callable | None,
    hook_state: Any,
    *,
    owner: str,
    attached: bool,
) -> _DDPState:
    """Check the arguments of ``attach_ddp`` and register :func:`_noise_scale_comm_hook` on ``ddp_model``.

    The hook appends one :class:`_DDPMeasurement` per backward pass to ``pending`` (the
    estimator's list). ``attached``: the estimator already has a DDP model (an error).

    Returns:
        The hook's state.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
        allreduce_hook,
    )
    from torch.nn.parallel import DistributedDataParallel

    check_param("ddp_model", ddp_model, [DistributedDataParallel], owner=owner)
    check_param("local_batch_size", local_batch_size, [None, Interval(int, 1, None)], owner=owner)
    check_param("hook", hook, [None, callable], owner=owner)
    if attached:
        raise InvalidParameterError(
            f"The 'ddp_model' parameter of {owner} must be attached only once per estimator "
            f"(create one GradientNoiseScale per DDP model). Got a second call."
        )
    group = ddp_model.process_group
    world = dist.get_world_size(group)
    if world < 2:
        raise InvalidParameterError(
            f"The 'ddp_model' parameter of {owner} must run on at least 2 processes (the local and "
            f"the averaged gradient are the two batch sizes). Got a world size of {world}."
        )
    state = _DDPState(
        pending=pending, group=group, world_size=world, local_batch_size=local_batch_size,
        inner=hook if hook is not None else allreduce_hook,
        inner_state=hook_state if hook is not None else group,
    )
    ddp_model.register_comm_hook(state, _noise_scale_comm_hook)
    return state
