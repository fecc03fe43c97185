"""Time and memory of a block of code: :func:`measure`.

:func:`measure` is a context manager that records wall seconds and the peak memory increase
(CUDA allocator on a GPU, resident set size on the CPU) in a :class:`Measurement`.
:meth:`leanscale.core.ledger.CostLedger.track` uses it to record one ledger entry per block.

Example:
    >>> with measure("cpu") as m:
    ...     total = sum(range(1000))
    >>> m.device, m.seconds > 0, m.peak_memory_bytes >= 0
    ('cpu', True, True)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param

__all__ = ["Measurement", "measure"]


@dataclass
class Measurement:
    """What :func:`measure` recorded; filled in when the ``with`` block ends.

    Attributes:
        seconds: Wall-clock seconds (``time.perf_counter``); on CUDA, after synchronizing.
        peak_memory_bytes: Peak increase of memory over its value at the start (see ``method``).
        device: ``"cpu"`` or ``"cuda:N"``.
        method: How memory was measured: ``"cuda_max_memory_allocated"``, ``"proc_statm_rss"``,
            ``"proc_statm_rss_tree"`` (with child processes), ``"getrusage_maxrss"`` or
            ``"unavailable"``.
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


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (children, grandchildren, ...) from
    ``/proc/<pid>/task/<tid>/children``; a process that ends meanwhile is skipped."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _rss_of(pid: int, page_size: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * page_size
    except (OSError, ValueError, IndexError):  # ended meanwhile
        return 0


class _RSSSampler:
    """Samples the resident set size from /proc/self/statm in a daemon thread; keeps the max.

    With ``children``, the sum over this process and its live descendants (worker processes)."""

    def __init__(self, interval_seconds: float, children: bool = False):
        self.interval = interval_seconds
        self.children = children
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open(_STATM, os.O_RDONLY)
        self.start = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leanscale-rss-sampler", daemon=True)
        self._thread.start()

    def read(self) -> int:
        # statm: size resident shared text lib data dt, in pages; the 2nd field is the RSS.
        own = int(os.pread(self.fd, 256, 0).split()[1]) * self.page_size
        if not self.children:
            return own
        return own + sum(_rss_of(pid, self.page_size) for pid in _descendants(os.getpid()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        os.close(self.fd)
        return self.peak - self.start


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``; elsewhere
    nothing), so that memory freed before a measured block and reused inside it counts as the
    block's: glibc keeps freed chunks below its mmap threshold (which grows up to 32 MiB) mapped."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS: bytes, Linux: KiB


@contextlib.contextmanager
def measure(
    device: str | torch.device | None = None, *, interval_seconds: float = 0.002, children: bool = False
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
      background thread and once more at the end. The C heap's free pages are handed back first
      (glibc's ``malloc_trim``), so that memory freed before the block and reused in it counts.
      Memory that is allocated but never touched, or that another allocator keeps mapped after
      freeing it, does not raise the RSS; a spike shorter than the interval can be missed. With ``children=True`` each sample is the
      sum over this process and its live descendants (e.g. the worker processes of a sweep;
      ``method`` ``"proc_statm_rss_tree"``): a page shared by two processes (the libraries every
      worker maps) counts once in each, so this errs high, and a worker that starts and ends
      between two samples is missed. Without ``/proc`` (macOS) the fallback is the increase of
      ``getrusage``'s lifetime max RSS, which is 0 unless the block sets a new lifetime peak.

    Why sampling: ``tracemalloc`` sees only Python's allocator, not the buffers of torch or
    numpy; ``getrusage(RUSAGE_SELF).ru_maxrss`` is the maximum over the whole life of the
    process, so a block that stays below an earlier peak (a chapter after a bigger one) reads 0.
    A thread reading the 2nd field of ``/proc/self/statm`` (one ``pread``, a few microseconds)
    every ``interval_seconds`` gives the block's own peak over its start.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a :class:`torch.device` or None (the GPU
            when one is available, else the CPU).
        interval_seconds: the CPU sampling interval.
        children: on the CPU, also count the resident memory of child processes.

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
    check_param("children", children, [bool], owner="measure")
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

    if os.path.exists(_STATM):
        _malloc_trim()  # the start value without freed memory the block would reuse unseen
        sampler = _RSSSampler(interval_seconds, children)
    else:
        sampler = None
    rss_start = _maxrss_bytes() if sampler is None else None
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = time.perf_counter() - t0
        if sampler is not None:
            record.peak_memory_bytes = max(0, sampler.stop())
            record.method = "proc_statm_rss_tree" if children else "proc_statm_rss"
        elif rss_start is not None:
            record.peak_memory_bytes = max(0, (_maxrss_bytes() or 0) - rss_start)
            record.method = "getrusage_maxrss"
        else:
            record.method = "unavailable"
