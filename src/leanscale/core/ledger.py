"""One cost ledger for every technique: FLOPs, wall seconds, peak memory, examples.

Every leanscale technique reports what it spends through this module, so that "large batches",
"data pruning", "compute-optimal scaling", "sparse activation" and "cascades" are compared on the
same bill. Three pieces:

* **FLOPs** -- :func:`count_flops` runs one forward pass with forward hooks and asks a per-class
  *FLOP rule* for the forward and backward cost of each module call. Rules live in a plain
  registry keyed by module class and found along the MRO, so a subclass inherits its parent's
  rule unless it registers its own (:func:`register_flop_rule`; SWAT and MoE layers add theirs).
* **Time and memory** -- :func:`measure` is a context manager that records wall seconds and the
  peak memory increase (CUDA allocator on a GPU, resident set size on the CPU).
* **The ledger** -- :class:`CostLedger` collects :class:`CostEntry` rows (``record`` or
  ``with ledger.track(name):``), sums them, prints a table, and saves/loads atomic JSON.

Conventions for FLOPs (the same as ``torch.utils.flop_counter.FlopCounterMode`` and as
Appendix F of Hoffmann et al. 2022, arXiv 2203.15556, and Kaplan et al. 2020, arXiv 2001.08361):

* one multiply-add (MAC) is **2 FLOPs**; bias additions are not counted (they are a ``1/fan_in``
  fraction of a layer's MACs);
* the backward pass of a matmul-like layer (Linear, Conv, attention) costs one forward's worth of
  FLOPs for the gradient with respect to its input **and** one for the gradient with respect to
  its weight, i.e. 2x forward. Each half is counted only when autograd will compute it: no input
  gradient for a layer applied directly to data (input does not require grad), no weight gradient
  for a frozen layer, no backward at all under ``torch.no_grad()``;
* only work done inside modules that have a rule is counted: functional calls outside modules
  (the loss, residual additions, activation functions) are not. For matmul-dominated models this
  is a fraction of a percent.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> c = count_flops(net, torch.randn(16, 8))
    >>> c.forward  # 2 * 16 * (8*4 + 4*2)
    1280
    >>> c.backward  # 2x forward, except the first layer's input gradient (data needs none)
    1536
    >>> ledger = CostLedger()
    >>> _ = ledger.record("train step", flops=c, seconds=0.5, n_examples=16)
    >>> ledger.total().flops
    2816
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.io import atomic_write_json, read_json
from leanscale.core.validation import Interval, check_param

__all__ = [
    "FlopRule",
    "register_flop_rule",
    "get_flop_rule",
    "FlopCount",
    "track_flops",
    "count_flops",
    "Measurement",
    "measure",
    "CostEntry",
    "CostLedger",
    "NORM_STATS_FLOPS_PER_ELEMENT",
    "RMS_NORM_STATS_FLOPS_PER_ELEMENT",
    "NORM_BACKWARD_FACTOR",
]

FlopRule = Callable[[nn.Module, tuple, Any], "tuple[float, float]"]
"""``rule(module, inputs, output) -> (forward_flops, backward_flops)`` for ONE call of ``module``.

``inputs`` are the positional arguments of the call (the keyword values when there were none),
``output`` what it returned. The rule counts only the work the module does itself: the calls of
its submodules are hooked and counted by their own rules.
"""

_FLOP_RULES: dict[type, FlopRule] = {}


def register_flop_rule(module_cls: type, rule: FlopRule | None = None):
    """Register ``rule`` as the FLOP rule of ``module_cls`` and of its subclasses.

    A later registration for the same class replaces the earlier one. Without ``rule`` this is a
    decorator::

        @register_flop_rule(MyExpertLayer)
        def _my_expert_layer_flops(module, inputs, output):
            return forward_flops, backward_flops

    Raises:
        InvalidParameterError: ``module_cls`` is not a subclass of ``nn.Module`` or ``rule`` is
            not callable.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise InvalidParameterError(
            f"The 'module_cls' parameter of register_flop_rule must be a subclass of "
            f"torch.nn.Module. Got {module_cls!r} instead."
        )
    if rule is None:
        def decorator(func: FlopRule) -> FlopRule:
            register_flop_rule(module_cls, func)
            return func

        return decorator
    check_param("rule", rule, [callable], owner="register_flop_rule")
    _FLOP_RULES[module_cls] = rule
    return rule


def get_flop_rule(module: nn.Module | type) -> FlopRule | None:
    """The rule of the nearest class in ``module``'s MRO that has one, or ``None``."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        rule = _FLOP_RULES.get(klass)
        if rule is not None:
            return rule
    return None


# ----------------------------------------------------------------------------- built-in rules


def _needs_grad(t: Any) -> bool:
    """Autograd will compute a gradient for ``t`` (hooks run in the forward's grad mode)."""
    return torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad


def _matmul_backward(module: nn.Module, x: Any, fwd: int) -> int:
    """Backward of a matmul-like layer: ``fwd`` for the input gradient, ``fwd`` for the weight's."""
    return fwd * int(_needs_grad(x)) + fwd * int(_needs_grad(getattr(module, "weight", None)))


def _linear_flops(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # output: (..., out_features); each output element is a dot product of length in_features.
    fwd = 2 * module.in_features * output.numel()
    return fwd, _matmul_backward(module, inputs[0], fwd)


def _conv_flops(module: nn.modules.conv._ConvNd, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # output: (B, C_out, *spatial_out). Each output element is a dot product over one group's
    # input channels and the kernel window, whatever the stride, dilation or padding (padded
    # zeros are multiplied too, as cuDNN and FlopCounterMode count them).
    macs_per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    fwd = 2 * macs_per_output * output.numel()
    # Backward: the input gradient is a transposed convolution with the same MACs; the weight
    # gradient pairs each output gradient with its input window, again the same MACs.
    return fwd, _matmul_backward(module, inputs[0], fwd)


def _conv_transpose_flops(
    module: nn.modules.conv._ConvTransposeNd, inputs: tuple, output: torch.Tensor
) -> tuple[int, int]:
    # A transposed convolution scatters every INPUT element into one group's output channels
    # over the kernel window: input (B, C_in, *spatial_in).
    x = inputs[0]
    fwd = 2 * x.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    return fwd, _matmul_backward(module, x, fwd)


def _embedding_flops(module: nn.Embedding, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    # Forward: a row lookup (gather), 0 FLOPs. Backward: the weight gradient scatter-adds each
    # element of the output gradient into its row, 1 FLOP per output element (0 when frozen).
    # The indices need no gradient. (Chinchilla instead prices the lookup as a one-hot matmul.)
    return 0, output.numel() * int(_needs_grad(module.weight))


_RMSNorm = getattr(nn, "RMSNorm", None)  # torch >= 2.4

# Normalisation layers: a few FLOPs per element, per the operations a straightforward kernel runs.
# mean (1 add), centre (1 sub), square + sum for the variance (2), scale by 1/std (1):
NORM_STATS_FLOPS_PER_ELEMENT = 5
RMS_NORM_STATS_FLOPS_PER_ELEMENT = 3  # square (1), sum (1), scale by 1/rms (1)
NORM_EVAL_FLOPS_PER_ELEMENT = 2  # BatchNorm with running statistics: subtract mean (1), scale (1)
NORM_BACKWARD_FACTOR = 2  # backward ~ 2x forward: two reductions of the gradient + the elementwise chain rule


def _norm_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int]:
    x = inputs[0]
    if _RMSNorm is not None and isinstance(module, _RMSNorm):
        per_element = RMS_NORM_STATS_FLOPS_PER_ELEMENT
    elif (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not module.training
        and module.running_mean is not None
    ):
        per_element = NORM_EVAL_FLOPS_PER_ELEMENT
    else:
        per_element = NORM_STATS_FLOPS_PER_ELEMENT
    # Affine part: multiply by the weight (1), add the bias (1), when present.
    per_element += int(getattr(module, "weight", None) is not None)
    per_element += int(getattr(module, "bias", None) is not None)
    fwd = per_element * x.numel()
    needs = _needs_grad(x) or any(_needs_grad(p) for p in module.parameters(recurse=False))
    return fwd, NORM_BACKWARD_FACTOR * fwd * int(needs)


for _cls in (nn.Linear,):
    register_flop_rule(_cls, _linear_flops)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_flop_rule(_cls, _conv_flops)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_flop_rule(_cls, _conv_transpose_flops)
register_flop_rule(nn.Embedding, _embedding_flops)
for _cls in (
    nn.LayerNorm, nn.GroupNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    *((_RMSNorm,) if _RMSNorm is not None else ()),
):
    register_flop_rule(_cls, _norm_flops)


# ----------------------------------------------------------------------------- counting


@dataclass
class FlopCount:
    """FLOPs of the module calls seen while counting.

    Attributes:
        forward: Forward FLOPs.
        backward: FLOPs of the backward pass that autograd would run for that forward.
        by_module: Qualified module name (``""`` for the root) -> ``(forward, backward)``.
        unsupported: Names of the module classes that were called, own parameters and have no
            rule; their work is missing from the count.
    """

    forward: float = 0
    backward: float = 0
    by_module: dict[str, tuple[float, float]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Forward + backward: the FLOPs of one training step on this input."""
        return self.forward + self.backward


@contextlib.contextmanager
def track_flops(model: nn.Module, *, warn: bool = True) -> Iterator[FlopCount]:
    """Count the FLOPs of every forward call of ``model``'s modules inside the ``with`` block.

    Use it to count real training steps (data-dependent routing included) without an extra
    forward pass. The hooks are removed on exit, also on error. Modules that own parameters but
    have no rule are listed in ``unsupported`` and, with ``warn``, reported in one warning.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> with track_flops(net) as c:
        ...     _ = net(torch.randn(5, 4)); _ = net(torch.randn(5, 4))
        >>> c.forward
        240
    """
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of track_flops must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    count = FlopCount()
    handles = []

    def make_hook(name: str, rule: FlopRule | None):
        def hook(module, args, kwargs, output):
            if rule is None:
                cls_name = type(module).__name__
                if cls_name not in count.unsupported:
                    count.unsupported.append(cls_name)
                return
            fwd, bwd = rule(module, args if args else tuple(kwargs.values()), output)
            count.forward += fwd
            count.backward += bwd
            old_fwd, old_bwd = count.by_module.get(name, (0, 0))
            count.by_module[name] = (old_fwd + fwd, old_bwd + bwd)

        return hook

    try:
        for name, module in model.named_modules():  # a shared module is visited once
            rule = get_flop_rule(module)
            owns_params = next(module.parameters(recurse=False), None) is not None
            if rule is not None or owns_params:
                handles.append(module.register_forward_hook(make_hook(name, rule), with_kwargs=True))
        yield count
    finally:
        for handle in handles:
            handle.remove()
    if warn and count.unsupported:
        warnings.warn(
            f"count_flops: no FLOP rule for {', '.join(count.unsupported)}; their FLOPs are not "
            f"counted. Register one with leanscale.core.ledger.register_flop_rule.",
            UserWarning,
            stacklevel=3,
        )


def count_flops(model: nn.Module, /, *args: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of one forward (and of the matching backward) of ``model(*args, **kwargs)``.

    The forward runs with gradients enabled, so the backward count is that of a training step;
    use ``.forward`` for inference. Buffers (BatchNorm running statistics) are restored
    afterwards, so counting leaves the model as it was. See the module docstring for conventions.

    Returns:
        A :class:`FlopCount`.

    Raises:
        InvalidParameterError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidParameterError(
            f"The 'model' parameter of count_flops must be an instance of torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with track_flops(model) as count, torch.enable_grad():
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    return count


# ----------------------------------------------------------------------------- time and memory


@dataclass
class Measurement:
    """What :func:`measure` recorded; filled in when the ``with`` block ends.

    Attributes:
        seconds: Wall-clock seconds (``time.perf_counter``); on CUDA, after synchronizing.
        peak_memory_bytes: Peak increase of memory over its value at the start (see ``method``).
        device: ``"cpu"`` or ``"cuda:N"``.
        method: How memory was measured: ``"cuda_max_memory_allocated"``, ``"proc_statm_rss"``,
            ``"getrusage_maxrss"`` or ``"unavailable"``.
    """

    seconds: float = 0.0
    peak_memory_bytes: int = 0
    device: str = "cpu"
    method: str = ""


_STATM = "/proc/self/statm"


@dataclass
class _CudaWatch:
    """An open CUDA measurement: its device and the highest absolute peak nested ones saw."""

    device_index: int
    peak: int = 0


_CUDA_ACTIVE: list[_CudaWatch] = []  # open CUDA measurements, outermost first


def _cuda_hand_over(device_index: int, peak: int) -> None:
    for watch in _CUDA_ACTIVE:
        if watch.device_index == device_index:
            watch.peak = max(watch.peak, peak)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    bad = InvalidParameterError(
        f"The 'device' parameter of measure must be 'cpu', 'cuda', 'cuda:N' or None. Got {device!r} instead."
    )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad from None
    if dev.type not in ("cpu", "cuda"):
        raise bad
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameterError(
                f"The 'device' parameter of measure is {device!r}, but CUDA is not available. Use 'cpu'."
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class _RSSSampler:
    """Samples the resident set size from /proc/self/statm in a daemon thread; keeps the max."""

    def __init__(self, interval_seconds: float):
        self.interval = interval_seconds
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open(_STATM, os.O_RDONLY)
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leanscale-rss-sampler", daemon=True)
        self._thread.start()

    def read(self) -> int:
        # statm: size resident shared text lib data dt, in pages; the 2nd field is the RSS.
        return int(os.pread(self.fd, 256, 0).split()[1]) * self.page_size

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        os.close(self.fd)
        return self.peak - self.start


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS: bytes, Linux: KiB


@contextlib.contextmanager
def measure(
    device: str | torch.device | None = None, *, interval_seconds: float = 0.002
) -> Iterator[Measurement]:
    """Measure wall seconds and peak memory of the ``with`` block.

    What is measured:

    * **CUDA** (``device`` is a GPU; the default when one is available): the peak of
      ``torch.cuda.max_memory_allocated`` during the block minus ``memory_allocated`` at its
      start -- tensor memory held by PyTorch's caching allocator on that GPU, not the reserved
      cache and not other processes. The peak counter is reset at the start; nested measurements
      still see the right peak (an inner one hands its peak to the outer ones), but other code
      that resets the counter inside the block makes the result too low. The stream is
      synchronized at the start and the end, so ``seconds`` includes the queued kernels.
    * **CPU**: the largest increase of this process's resident set size (all threads) over its
      value at the start, sampled from ``/proc/self/statm`` every ``interval_seconds`` by a
      background thread and once more at the end. Memory that is allocated but never touched,
      or that the allocator reuses from what it had already mapped, does not raise the RSS; a
      spike shorter than the interval can be missed. Without ``/proc`` (macOS) the fallback is
      the increase of ``getrusage``'s lifetime max RSS, which is 0 unless the block sets a new
      lifetime peak.

    Example:
        >>> import torch
        >>> with measure("cpu") as m:
        ...     x = torch.ones(1000, 1000)
        >>> m.seconds > 0
        True
    """
    dev = _resolve_device(device)
    check_param("interval_seconds", interval_seconds, [Interval("real", 0, None, closed="neither")],
                owner="measure")
    record = Measurement(device=str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        # Hand the peak so far to the enclosing measurements before resetting the counter.
        _cuda_hand_over(dev.index, torch.cuda.max_memory_allocated(dev))
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        mine = _CudaWatch(dev.index)
        _CUDA_ACTIVE.append(mine)
        t0 = time.perf_counter()
        try:
            yield record
        finally:
            torch.cuda.synchronize(dev)
            record.seconds = time.perf_counter() - t0
            _CUDA_ACTIVE[:] = [w for w in _CUDA_ACTIVE if w is not mine]
            peak = max(torch.cuda.max_memory_allocated(dev), mine.peak)
            _cuda_hand_over(dev.index, peak)
            record.peak_memory_bytes = max(0, peak - base)
            record.method = "cuda_max_memory_allocated"
        return

    sampler = _RSSSampler(interval_seconds) if os.path.exists(_STATM) else None
    rss_start = _maxrss_bytes() if sampler is None else None
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = time.perf_counter() - t0
        if sampler is not None:
            record.peak_memory_bytes = max(0, sampler.stop())
            record.method = "proc_statm_rss"
        elif rss_start is not None:
            record.peak_memory_bytes = max(0, (_maxrss_bytes() or 0) - rss_start)
            record.method = "getrusage_maxrss"
        else:
            record.method = "unavailable"


# ----------------------------------------------------------------------------- the ledger


_ENTRY_FIELDS = ("name", "flops", "seconds", "peak_memory_bytes", "n_examples")


@dataclass
class CostEntry:
    """One line of the bill. Unknown quantities are ``None``; ``meta`` holds free-form context
    (technique, step, batch size, ...), JSON-serialisable."""

    name: str
    flops: float | None = None
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    n_examples: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """A flat dict: the fields, then the ``meta`` items."""
        row = {k: getattr(self, k) for k in _ENTRY_FIELDS}
        row.update(self.meta)
        return row


def _check_entry(entry: CostEntry, owner: str) -> CostEntry:
    check_param("name", entry.name, [str], owner=owner)
    if not entry.name:
        raise InvalidParameterError(f"The 'name' parameter of {owner} must be a non-empty str. Got ''.")
    if isinstance(entry.flops, FlopCount):
        entry.flops = entry.flops.total
    real = [None, Interval("real", 0, math.inf, closed="left")]  # finite: inf seconds is no cost
    count = [None, Interval(int, 0, None)]
    check_param("flops", entry.flops, real, owner=owner)
    check_param("seconds", entry.seconds, real, owner=owner)
    check_param("peak_memory_bytes", entry.peak_memory_bytes, count, owner=owner)
    check_param("n_examples", entry.n_examples, count, owner=owner)
    clash = sorted(set(entry.meta) & set(_ENTRY_FIELDS + ("meta",)))
    if clash:
        raise InvalidParameterError(
            f"The metadata of {owner} must not use the reserved keys {', '.join(map(repr, clash))}."
        )
    # Plain Python numbers (not numpy or tensors), so that JSON round trips are exact.
    if entry.flops is not None:
        entry.flops = int(entry.flops) if isinstance(entry.flops, numbers.Integral) else float(entry.flops)
    if entry.seconds is not None:
        entry.seconds = float(entry.seconds)
    if entry.peak_memory_bytes is not None:
        entry.peak_memory_bytes = int(entry.peak_memory_bytes)
    if entry.n_examples is not None:
        entry.n_examples = int(entry.n_examples)
    return entry


def _sum_or_none(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or unit == "TiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if kind == "seconds":
        return f"{value:.3g}"
    if kind == "int":
        return f"{int(value)}"
    return f"{value:.3e}"


class CostLedger:
    """The bill of a run: a list of :class:`CostEntry`.

    Example:
        >>> import torch
        >>> ledger = CostLedger()
        >>> _ = ledger.record("eval", flops=2e9, seconds=1.5, n_examples=1000, split="test")
        >>> with ledger.track("train", n_examples=64) as entry:
        ...     entry.flops = 6e9  # e.g. count_flops(model, batch).total * n_steps
        >>> ledger.total().flops, ledger.total().n_examples
        (8000000000.0, 1064)
        >>> [e.name for e in ledger.entries]
        ['eval', 'train']
    """

    def __init__(self, entries: Iterable[CostEntry] | None = None):
        self.entries: list[CostEntry] = []
        for entry in entries or ():
            check_param("entries", entry, [CostEntry], owner="CostLedger")
            self.entries.append(_check_entry(dataclasses.replace(entry, meta=dict(entry.meta)), "CostLedger"))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[CostEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"CostLedger({len(self.entries)} entries)"

    def record(
        self,
        name: str,
        *,
        flops: float | FlopCount | None = None,
        seconds: float | None = None,
        peak_memory_bytes: int | None = None,
        n_examples: int | None = None,
        **meta: Any,
    ) -> CostEntry:
        """Append an entry and return it. ``flops`` may be a :class:`FlopCount` (its total)."""
        entry = CostEntry(name, flops, seconds, peak_memory_bytes, n_examples, dict(meta))
        self.entries.append(_check_entry(entry, "CostLedger.record"))
        return entry

    @contextlib.contextmanager
    def track(
        self,
        name: str,
        *,
        flops: float | FlopCount | None = None,
        n_examples: int | None = None,
        device: str | torch.device | None = None,
        **meta: Any,
    ) -> Iterator[CostEntry]:
        """Measure the ``with`` block (see :func:`measure`) and record it as one entry.

        The entry is yielded, so the block may fill in ``flops``, ``n_examples`` or ``meta``
        once it knows them. It is appended when the block ends without an exception; a block
        that raises records nothing.
        """
        entry = CostEntry(name, flops, None, None, n_examples, dict(meta))
        _check_entry(entry, "CostLedger.track")  # fail before the work, not after
        with measure(device) as m:
            yield entry
        entry.seconds = m.seconds
        entry.peak_memory_bytes = m.peak_memory_bytes
        entry.meta.setdefault("device", m.device)
        entry.meta.setdefault("memory_method", m.method)
        self.entries.append(_check_entry(entry, "CostLedger.track"))

    def names(self) -> list[str]:
        """Entry names, each once, in order of first appearance."""
        return list(dict.fromkeys(e.name for e in self.entries))

    def total(self, name: str | None = None) -> CostEntry:
        """Sum of the entries (only those called ``name`` if given).

        FLOPs, seconds and examples add up; peak memory is the largest peak, since entries
        run one after another. A quantity no entry knows stays ``None``. ``meta["n_entries"]``
        says how many entries were summed.
        """
        rows = [e for e in self.entries if name is None or e.name == name]
        peaks = [e.peak_memory_bytes for e in rows if e.peak_memory_bytes is not None]
        return CostEntry(
            name="total" if name is None else name,
            flops=_sum_or_none(e.flops for e in rows),
            seconds=_sum_or_none(e.seconds for e in rows),
            peak_memory_bytes=max(peaks) if peaks else None,
            n_examples=_sum_or_none(e.n_examples for e in rows),
            meta={"n_entries": len(rows)},
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per entry (fields, then metadata), e.g. for ``atomic_write_csv``."""
        return [e.to_row() for e in self.entries]

    def summary_table(self) -> str:
        """A text table with one row per entry name (entries of a name summed) and a total row."""
        header = ("name", "entries", "FLOPs", "seconds", "peak memory", "examples", "FLOPs/example")
        body = []
        for t in [self.total(n) for n in self.names()] + [self.total()]:
            per_example = t.flops / t.n_examples if t.flops is not None and t.n_examples else None
            body.append((
                t.name, str(t.meta["n_entries"]), _fmt(t.flops, "flops"), _fmt(t.seconds, "seconds"),
                _fmt(t.peak_memory_bytes, "bytes"), _fmt(t.n_examples, "int"), _fmt(per_example, "flops"),
            ))
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells):
            # The name column is left-aligned, the numbers right-aligned.
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ledger as JSON, atomically (a reader never sees half a file)."""
        blob = {
            "format": "leanscale.cost_ledger",
            "version": 1,
            "entries": [dataclasses.asdict(e) for e in self.entries],
        }
        return atomic_write_json(path, blob)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostLedger:
        """Read a ledger written by :meth:`save`."""
        where = f"The cost ledger file {os.fspath(path)!r}"
        blob = read_json(path, what="cost ledger file")
        if not isinstance(blob, dict) or blob.get("format") != "leanscale.cost_ledger":
            raise DataFormatError(f"{where} is not a leanscale cost ledger file (no \"format\": "
                                  f"\"leanscale.cost_ledger\").")
        rows = blob.get("entries", [])
        if not isinstance(rows, list):
            raise DataFormatError(f"{where} must hold a list under 'entries'. Got {type(rows).__name__}.")
        fields = set(_ENTRY_FIELDS) | {"meta"}
        entries = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("name"), str) or \
                    not isinstance(row.get("meta", {}), dict):
                raise DataFormatError(f"{where} has a malformed entry {i}: expected an object with a 'name' string "
                                      f"and an optional 'meta' object. Got {row!r:.200}.")
            entries.append(CostEntry(**{k: v for k, v in row.items() if k in fields}))
        try:
            return cls(entries)
        except InvalidParameterError as exc:  # a negative or non-numeric cost in the file
            raise DataFormatError(f"{where} has an invalid entry: {exc}") from None

    def merge(self, *others: CostLedger) -> CostLedger:
        """A new ledger with this ledger's entries followed by each of ``others``' (copied)."""
        for other in others:
            check_param("others", other, [CostLedger], owner="CostLedger.merge")
        return CostLedger([e for ledger in (self, *others) for e in ledger.entries])
