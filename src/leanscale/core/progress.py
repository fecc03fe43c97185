"""Progress bars that never get in the way.

:func:`progress` returns a tqdm bar when tqdm is installed and stderr is a terminal; otherwise a
light fallback that prints a line to stderr now and then (a log file gets a few readable lines,
not thousands of carriage returns) and a last line when a long loop ends. It never fails because
tqdm is missing. ``LEANSCALE_NO_PROGRESS=1`` silences every bar;
``LEANSCALE_PROGRESS_INTERVAL=<seconds>`` sets the seconds between the fallback's lines for every
bar (e.g. 60 for a quiet log, 0 for a line on every step).

Example:
    >>> total = 0
    >>> for n in progress(range(3), desc="sizes", disable=True):
    ...     total += n
    >>> total
    3
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress", "progress_disabled", "LineProgress", "working", "write_line"]

ENV_DISABLE = "LEANSCALE_NO_PROGRESS"
ENV_INTERVAL = "LEANSCALE_PROGRESS_INTERVAL"
_TRUE = {"1", "true", "yes", "on"}


def progress_disabled() -> bool:
    """True when ``LEANSCALE_NO_PROGRESS`` is set to 1/true/yes/on."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in _TRUE


def _interval_override() -> float | None:
    """The seconds of ``LEANSCALE_PROGRESS_INTERVAL`` (a number >= 0), or None when it is unset.
    Any other value is ignored with a warning: a typo in a cosmetic setting must not stop a run."""
    text = os.environ.get(ENV_INTERVAL, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        import warnings

        warnings.warn(
            f"The environment variable {ENV_INTERVAL} must be a number of seconds >= 0 (between two progress "
            f"lines). Got {text!r:.50}: ignored, the default interval is used.", UserWarning, stacklevel=3)
        return None
    return value


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class LineProgress:
    """A minimal stand-in for ``tqdm``: iterate, ``update``, ``set_postfix``, ``close``, ``with``.

    Prints ``desc: n/total (pct%) elapsed`` to stderr at most every ``interval`` seconds, and a
    final line on :meth:`close` when the loop took at least ``interval`` seconds or already
    printed. With ``silent=True`` it prints nothing at all (the disabled bar).
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str | None = None,
        *,
        unit: str = "it",
        interval: float = 10.0,
        silent: bool = False,
    ):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = float(interval)
        self.silent = silent
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self._last_print = self.start
        self._printed = False
        self._closed = False

    # tqdm-compatible surface --------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable; call update(n) instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("progress bar has no total")
        return self.total

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.silent and now - self._last_print >= self.interval:
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items()
        )

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        if not self.silent:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        if not self.silent and (self._printed or now - self.start >= self.interval):
            self._print(now, final=True)

    # ---------------------------------------------------------------------
    def _print(self, now: float, final: bool = False) -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.postfix}" if self.postfix else ""
        status = "done in" if final else "elapsed"
        print(f"{head}{count} {self.unit}{pct}, {status} {now - self.start:.1f} s{tail}",
              file=sys.stderr, flush=True)
        self._last_print = now
        self._printed = True


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    disable: bool | None = None,
    *,
    unit: str = "it",
    leave: bool = True,
    interval: float = 10.0,
) -> Any:
    """A progress bar over ``iterable`` (or a manual one with ``total`` and ``update``).

    Args:
        iterable: what to iterate; ``None`` for a manual bar (``bar.update(n)``).
        total: number of steps when ``len(iterable)`` does not say it.
        desc: a short label ("sweep", "chapter scaling").
        disable: ``True`` prints nothing; ``False`` forces a bar (tqdm when installed, even
            when stderr is not a terminal); ``None`` (default) decides: nothing when
            ``LEANSCALE_NO_PROGRESS=1``, tqdm on a terminal, otherwise occasional lines.
        unit: what one step is ("run", "batch").
        leave: keep the finished tqdm bar on screen.
        interval: seconds between lines of the fallback; ``LEANSCALE_PROGRESS_INTERVAL``
            overrides it for every bar.

    Returns:
        A ``tqdm`` object or a :class:`LineProgress`; both iterate and support ``update``,
        ``set_postfix``, ``close`` and ``with``.
    """
    if disable is None and progress_disabled():
        disable = True
    override = None if disable else _interval_override()
    if override is not None:
        interval = override
    if disable:
        return LineProgress(iterable, total, desc, unit=unit, interval=interval, silent=True)
    if disable is False or _stderr_is_tty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                        dynamic_ncols=True)
    return LineProgress(iterable, total, desc, unit=unit, interval=interval)


def write_line(text: str, file: Any = None) -> None:
    """Print ``text`` (to ``file``, default stdout) without breaking a tqdm bar being drawn on the
    terminal: the bar is cleared, the line printed and the bar drawn again below it."""
    file = sys.stdout if file is None else file
    tqdm = sys.modules.get("tqdm")  # a bar exists only if tqdm was imported
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        tqdm.tqdm.write(text, file=file)
        file.flush()
    else:
        print(text, file=file, flush=True)


HEARTBEAT_S = 2.0  # working(): a progress line at most this often while a step runs


class _Working:
    """A progress bar that moves while the caller is blocked: a daemon thread refreshes it every
    0.25 s (lines at most every :data:`HEARTBEAT_S`); with no ``total`` it counts seconds."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self._timed = total is None
        self._bar = progress(total=total, desc=desc, unit="s" if self._timed else unit, interval=HEARTBEAT_S)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._t0 = time.perf_counter()
        self._ticks = 0
        self._thread = threading.Thread(target=self._beat, name="leanscale-progress", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(0.25):
            with self._lock:
                if self._timed:
                    due = int(time.perf_counter() - self._t0) - self._ticks  # whole seconds not yet counted
                    self._ticks += max(due, 0)
                    self._bar.update(max(due, 0))
                else:
                    self._bar.update(0)  # prints when the interval has passed

    def update(self, n: int = 1) -> None:
        """Count ``n`` units done (a bar with a ``total``)."""
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        with self._lock:
            if self._timed:
                due = int(time.perf_counter() - self._t0) - self._ticks
                if due > 0:
                    self._bar.update(due)
            self._bar.close()


@contextlib.contextmanager
def working(desc: str, total: int | None = None, unit: str = "it") -> Iterator[_Working]:
    """A progress report on stderr for a step that may block for long (a scikit-learn ``fit``, a
    model load): ``desc: n s, elapsed t s`` every 2 s while it runs (``desc: k/total unit`` when
    ``total`` is given and the step calls ``update``), a last line when it took at least 2 s,
    nothing for a quicker step or under ``LEANSCALE_NO_PROGRESS=1``.
    (:func:`progress`: a tqdm bar on a terminal.)"""
    bar = _Working(desc, total, unit)
    try:
        yield bar
    finally:
        bar.close()
