"""One cost ledger for every technique: FLOPs, wall seconds, peak memory, examples.

Every leanscale technique reports what it spends through this module, so that "large batches",
"data pruning", "compute-optimal scaling", "sparse activation" and "cascades" are compared on the
same bill. Three pieces, in three modules:

* **FLOPs** -- :mod:`leanscale.core.flops`: :func:`~leanscale.core.flops.count_flops` and
  :func:`~leanscale.core.flops.track_flops` ask a per-class *FLOP rule* for the forward and
  backward cost of each module call (:func:`~leanscale.core.flops.register_flop_rule`; the module
  that defines a layer registers its rule). The FLOP conventions are in that module's docstring.
* **Time and memory** -- :mod:`leanscale.core.measure`: :func:`~leanscale.core.measure.measure`
  is a context manager that records wall seconds and the peak memory increase (CUDA allocator on
  a GPU, resident set size on the CPU).
* **The ledger** -- here: :class:`CostLedger` collects :class:`CostEntry` rows (``record`` or
  ``with ledger.track(name):``), sums them, prints a table, and saves/loads atomic JSON.

The FLOP and measurement names are still importable from this module (``from
leanscale.core.ledger import count_flops``), but their home is ``core.flops`` / ``core.measure``.

Example:
    >>> import torch
    >>> from leanscale.core.flops import count_flops
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> c = count_flops(net, torch.randn(16, 8))
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import leanscale.core.flops as _flops
import leanscale.core.measure as _measure
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.flops import FlopCount
from leanscale.core.io import atomic_write_json, read_json
from leanscale.core.measure import measure
from leanscale.core.validation import Interval, check_param

__all__ = ["CostEntry", "CostLedger"]


def __getattr__(name: str) -> Any:
    # The FLOP and measurement names lived here before the split; they stay importable from this
    # module (callers not yet moved to core.flops / core.measure), but are not part of its __all__.
    for module in (_flops, _measure):
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        children: bool = False,
        **meta: Any,
    ) -> Iterator[CostEntry]:
        """Measure the ``with`` block (see :func:`measure`) and record it as one entry.

        ``children=True`` counts the resident memory of child processes too (on the CPU), e.g.
        the workers of a sweep.

        The entry is yielded, so the block may fill in ``flops``, ``n_examples`` or ``meta``
        once it knows them. It is appended when the block ends without an exception; a block
        that raises records nothing.
        """
        entry = CostEntry(name, flops, None, None, n_examples, dict(meta))
        _check_entry(entry, "CostLedger.track")  # fail before the work, not after
        with measure(device, children=children) as m:
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
