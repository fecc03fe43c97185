"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better",
arXiv 1705.08741, Algorithm 1).

A large batch of ``B`` examples is split into ``B / g`` *ghost batches* of ``g`` examples, and
BatchNorm normalizes each ghost batch with its own statistics. The noise of small-batch
statistics, which large batches lose, comes back, and the network sees the same normalization
as it would in small-batch training; the gradient is still that of the whole batch.

The functional form :func:`apply_ghost_batchnorm` is the real code (composer's style): it swaps
every ``nn.BatchNorm1d/2d/3d`` of a model for :class:`GhostBatchNorm1d/2d/3d` through
:func:`leanscale.core.surgery.replace_module_classes`, reusing the same ``weight`` / ``bias``
Parameters and running-statistics buffers, so the optimizer (and its momentum) needs no change
and checkpoints load in both directions.

Rules, stated once:

* **Split.** In training mode the batch (dim 0) is split into ``k = ceil(B / g)`` contiguous
  ghost batches whose sizes differ by at most one and never exceed ``g`` (the first ``B mod k``
  get one example more; when ``g`` divides ``B`` every ghost batch has exactly ``g`` examples;
  :func:`ghost_batch_sizes`). The output equals BatchNorm applied to each ghost batch separately
  (Hoffer's chunked forward).
* **Running statistics.** Updated once per forward, with the module's ``momentum``, towards the
  *mean over ghost batches* of each ghost batch's mean and of its unbiased variance:
  ``running = (1 - m) running + m mean_j(stat_j)``. These estimate what the network sees in
  training (ghost-batch statistics), and with ``g = B`` the rule is exactly BatchNorm's. (Hoffer's
  reference code updates once per chunk, i.e. ``k`` times per step, which changes the effective
  momentum with the batch size; composer divides the momentum by ``k`` to undo it.)
* **Eval mode** uses the running statistics: identical to ``nn.BatchNorm``.
* **Small batches.** A training batch smaller than ``g`` raises an error (its statistics would be
  those of a smaller ghost batch than asked for), unless ``small_batch="batchnorm"``, which
  normalizes it as one ghost batch (useful for the last, short batch of an epoch).
* **DDP.** Each rank splits its own local batch: ``g`` is a per-device size and must divide, or
  not exceed, the local batch. Running statistics stay per rank (DDP's default
  ``broadcast_buffers=True`` copies rank 0's at each forward).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> model = apply_ghost_batchnorm(model, ghost_batch_size=16)
    >>> type(model[1]).__name__
    'GhostBatchNorm2d'
    >>> tuple(model(torch.randn(64, 1, 8, 8)).shape)  # 4 ghost batches of 16
    (64, 4, 6, 6)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.surgery import replace_module_classes
from leanscale.core.validation import Interval, Options, check_param

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "accumulate_running_stats",
    "apply_ghost_batchnorm",
    "ghost_batch_sizes",
]

_SMALL_BATCH = ("raise", "batchnorm")


class _GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared code of :class:`GhostBatchNorm1d/2d/3d`; see the module docstring for the rules.

    A subclass of torch's ``_BatchNorm``: same parameters, buffers and ``state_dict`` keys as the
    BatchNorm it replaces, and ``isinstance(m, nn.modules.batchnorm._BatchNorm)`` stays true (code
    that excludes norm weights from weight decay keeps working).
    """

    _bn_class: type[nn.modules.batchnorm._BatchNorm]

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        small_batch: str = "raise",
        device=None,
        dtype=None,
    ):
        owner = type(self).__name__
        check_param("num_features", num_features, [Interval(int, 1, None)], owner=owner)
        check_param("ghost_batch_size", ghost_batch_size, [Interval(int, 1, None)], owner=owner)
        check_param("small_batch", small_batch, [Options(set(_SMALL_BATCH))], owner=owner)
        check_param("eps", eps, [Interval(float, 0, math.inf, closed="neither")], owner=owner)
        check_param("momentum", momentum, [None, Interval(float, 0, 1)], owner=owner)
        check_param("affine", affine, [bool], owner=owner)
        check_param("track_running_stats", track_running_stats, [bool], owner=owner)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.ghost_batch_size = int(ghost_batch_size)
        self.small_batch = small_batch

    def _check_input_dim(self, input: torch.Tensor) -> None:
        try:
            self._bn_class._check_input_dim(self, input)
        except ValueError as exc:  # torch's "expected 4D input (got 2D input)"
            raise InvalidParameterError(
                f"The 'input' of {type(self).__name__} must be a batch of the shape "
                f"{self._bn_class.__name__} takes: {exc}. Got shape {tuple(input.shape)}."
            ) from None
        if input.ndim < 2 or input.shape[1] != self.num_features:
            raise InvalidParameterError(
                f"The 'input' of {type(self).__name__} must have {self.num_features} channels (num_features) "
                f"in dimension 1. Got shape {tuple(input.shape)}."
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, ghost_batch_size: int, small_batch: str = "raise"
    ) -> _GhostBatchNorm:
        """A Ghost BatchNorm that *shares* ``bn``'s Parameters and buffers (no copy)."""
        new = cls(
            bn.num_features, ghost_batch_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
            track_running_stats=bn.track_running_stats, small_batch=small_batch, device="meta",
        )
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))  # the same Parameter (or None): optimizers keep it
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers.get(name)
        new.train(bn.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            # Eval: exactly nn.BatchNorm with the running statistics.
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        b = input.shape[0]
        g = self.ghost_batch_size
        if b < g and self.training:
            if self.small_batch == "raise":
                raise InvalidParameterError(
                    f"{type(self).__name__} got a training batch of {b} examples, smaller than its "
                    f"'ghost_batch_size' of {g}. Use batches of at least {g} examples per device "
                    f"(e.g. DataLoader(drop_last=True)), a smaller ghost_batch_size, or "
                    f"small_batch='batchnorm' to normalize short batches as one ghost batch."
                )
            g = b
        sizes = ghost_batch_sizes(b, g)
        k = len(sizes)  # number of ghost batches
        per_channel = min(sizes) * math.prod(input.shape[2:])
        if per_channel < 2:
            raise InvalidParameterError(
                f"The 'ghost_batch_size' of {type(self).__name__} gives ghost batches with {per_channel} value "
                f"per channel (ghost batch {min(sizes)}, input shape {tuple(input.shape)}): batch statistics "
                f"need at least 2. Use a ghost_batch_size of at least 2 for this input."
            )
        if k == 1:
            out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        elif b % k == 0:
            # k equal ghost batches of b/k in one call: (b, C, *S) -> (b/k, k*C, *S), so that each
            # (ghost batch j, channel c) pair is one "channel" of an ordinary batch norm.
            out = _normalize_equal_chunks(input, k, self.weight, self.bias, self.eps)
        else:
            out = torch.cat([
                F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
                for chunk in input.split(sizes, 0)
            ])
        if self.training and self.track_running_stats:
            self._update_running_stats(input, sizes)
        return out

    @torch.no_grad()
    def _update_running_stats(self, input: torch.Tensor, sizes: list[int]) -> None:
        means, variances = [], []
        for chunk in input.split(sizes, 0):
            x = chunk.transpose(0, 1).reshape(chunk.shape[1], -1).float()  # (C, n_j * prod(S))
            # unbiased variance, like nn.BatchNorm's running_var (n - 1 in the denominator)
            var, mean = torch.var_mean(x, dim=1, correction=1 if x.shape[1] > 1 else 0)
            means.append(mean)
            variances.append(var)
        mean_sum, var_sum = torch.stack(means).sum(0), torch.stack(variances).sum(0)
        pending = getattr(self, "_pending", None)
        if pending is not None:  # inside accumulate_running_stats: one update at the end
            pending.append((mean_sum, var_sum, len(sizes)))
            return
        self._apply_running_update(mean_sum / len(sizes), var_sum / len(sizes))

    @torch.no_grad()
    def _apply_running_update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            m = 1.0 / float(self.num_batches_tracked)
        else:
            m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)


@contextlib.contextmanager
def accumulate_running_stats(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation with Ghost BatchNorm: one running-statistics update per step.

    Inside the block every Ghost BatchNorm of ``model`` only collects its ghost-batch statistics;
    when the block ends (also on error) each applies one update with their mean, so micro-batches
    whose size is a multiple of the ghost batch give exactly the step and the running statistics
    of the whole batch in one forward. Without it, every micro-batch forward would update the
    running statistics once (k updates per step for k micro-batches)::

        optimizer.zero_grad()
        with accumulate_running_stats(model):
            for xb, yb in zip(x.split(256), y.split(256)):
                (loss_fn(model(xb), yb) * len(yb) / len(y)).backward()
        optimizer.step()
    """
    check_param("model", model, [nn.Module], owner="accumulate_running_stats")
    modules = [m for m in model.modules() if isinstance(m, _GhostBatchNorm) and m.track_running_stats]
    for m in modules:
        m._pending = []
    try:
        yield
    finally:
        for m in modules:
            pending, m._pending = m._pending, None
            if pending:
                k = sum(n for _, _, n in pending)
                m._apply_running_update(sum(p[0] for p in pending) / k, sum(p[1] for p in pending) / k)


def ghost_batch_sizes(batch_size: int, ghost_batch_size: int) -> list[int]:
    """Sizes of the ghost batches a batch of ``batch_size`` is split into (training mode).

    ``k = ceil(batch_size / ghost_batch_size)`` contiguous parts, as equal as possible: the first
    ``batch_size mod k`` parts have one example more. (``torch.chunk`` is not used: it can leave
    a last part of a single example, whose statistics are degenerate.)

    >>> ghost_batch_sizes(256, 128), ghost_batch_sizes(13, 4)
    ([128, 128], [4, 3, 3, 3])
    """
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner="ghost_batch_sizes")
    check_param("ghost_batch_size", ghost_batch_size, [Interval(int, 1, None)], owner="ghost_batch_sizes")
    k = max(1, math.ceil(batch_size / ghost_batch_size))
    q, r = divmod(batch_size, k)
    return [q + 1] * r + [q] * (k - r)


def _normalize_equal_chunks(x: torch.Tensor, k: int, weight, bias, eps: float) -> torch.Tensor:
    b, c = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    # (b, C, *S) -> (k, b/k, C, *S) -> (b/k, k, C, *S) -> (b/k, k*C, *S)
    xg = x.reshape(k, b // k, c, *rest).transpose(0, 1).reshape(b // k, k * c, *rest)
    w = weight.repeat(k) if weight is not None else None  # (k*C,): the same affine for every ghost batch
    bb = bias.repeat(k) if bias is not None else None
    out = F.batch_norm(xg, None, None, w, bb, True, 0.0, eps)
    # back to (b, C, *S), ghost batch j at rows j*b/k ... (j+1)*b/k - 1 as in chunk()
    return out.reshape(b // k, k, c, *rest).transpose(0, 1).reshape(b, c, *rest)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(B, C)`` or ``(B, C, L)`` inputs; drop-in for ``nn.BatchNorm1d``.

    Args:
        num_features: ``C``.
        ghost_batch_size: Examples per ghost batch (per device under DDP). Hoffer et al. used 128.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm1d``.
        small_batch: ``"raise"`` (default) or ``"batchnorm"``: what a training batch smaller than
            ``ghost_batch_size`` does.
    """

    _bn_class = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(B, C, H, W)`` inputs; drop-in for ``nn.BatchNorm2d``.

    Args: as :class:`GhostBatchNorm1d`.
    """

    _bn_class = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(B, C, D, H, W)`` inputs; drop-in for ``nn.BatchNorm3d``.

    Args: as :class:`GhostBatchNorm1d`.
    """

    _bn_class = nn.BatchNorm3d


_GHOST_FOR = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}


def apply_ghost_batchnorm(
    model: nn.Module,
    ghost_batch_size: int,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    small_batch: str = "raise",
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` (in place) by its Ghost BatchNorm.

    The new modules share the old ones' Parameters and buffers, so an optimizer built before the
    surgery keeps working (``optimizers`` is accepted for symmetry with the other techniques and
    checked to hold the model's BatchNorm parameters; nothing in it changes). Already-converted
    modules, ``SyncBatchNorm`` and BatchNorm subclasses are left alone. A model without any
    BatchNorm gets a warning and is returned unchanged.

    Args:
        model: The model (not wrapped in DDP: convert first, then wrap).
        ghost_batch_size: Examples per ghost batch, per device.
        optimizers: Optimizer(s) already built on the model's parameters, or None.
        small_batch: ``"raise"`` or ``"batchnorm"``; see :class:`GhostBatchNorm1d`.

    Returns:
        ``model`` itself.
    """
    check_param("ghost_batch_size", ghost_batch_size, [Interval(int, 1, None)], owner="apply_ghost_batchnorm")
    check_param("small_batch", small_batch, [Options(set(_SMALL_BATCH))], owner="apply_ghost_batchnorm")
    policies = {
        bn_cls: (lambda module, index, cls=ghost_cls: cls.from_batchnorm(module, ghost_batch_size, small_batch))
        for bn_cls, ghost_cls in _GHOST_FOR.items()
    }
    replaced = replace_module_classes(model, policies, optimizers=optimizers)
    if sum(replaced.values()) == 0:
        already = sum(isinstance(m, _GhostBatchNorm) for m in model.modules())
        why = (f"it already has {already} Ghost BatchNorm module(s)" if already
               else "it has no nn.BatchNorm1d/2d/3d module")
        warnings.warn(
            f"apply_ghost_batchnorm replaced nothing in the 'model' ({type(model).__name__}): {why}.",
            UserWarning, stacklevel=2,
        )
    return model
