"""Numbers and tables for the terminal.

:func:`format_number` is the one place that decides how a number is shown; the terminal tables
here and the HTML tables of :mod:`leanscale.report.html` both use it, so a loss of ``2.3456789``
reads ``2.346`` everywhere and a compute budget of ``5.76e23`` FLOPs never turns into 24 digits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["format_number", "format_table", "table_columns", "is_numeric"]

# Plain (non-scientific) notation is used for magnitudes in [_SMALL, _LARGE); outside it a
# number is written as mantissa-e-exponent with 4 significant digits ("5.76e23", "1.2e-5").
_SMALL = 1e-3
_LARGE = 1e6
_SIG_DIGITS = 4


def is_numeric(value: Any) -> bool:
    """True for ints and floats (numpy's too), False for booleans and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _scientific(v: float) -> str:
    mantissa, _, exponent = f"{v:.{_SIG_DIGITS - 1}e}".partition("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def format_number(value: Any) -> str:
    """Show a value in a table cell: numbers with 3-4 significant digits, the rest as text.

    * integers below one million are written in full (``50000``), larger ones in scientific
      notation (``70000000000`` -> ``7e10``);
    * floats get 4 significant digits (``2.3456789`` -> ``2.346``, ``0.5`` -> ``0.5``), floats in
      ``[1e4, 1e6)`` are rounded to an integer (``12345.6`` -> ``12346``), and magnitudes outside
      ``[1e-3, 1e6)`` are scientific (``5.76e23``, ``1.235e-4``);
    * ``None`` is ``-``, booleans are ``yes``/``no``, NaN and infinities are ``nan``/``inf``/``-inf``;
    * lists and tuples are formatted element-wise and joined with ``", "``; anything else is ``str``.

    Example:
        >>> [format_number(x) for x in (3, 2.3456789, 5.76e23, 1.2345e-4, 12345.6, None, True)]
        ['3', '2.346', '5.76e23', '1.234e-4', '12346', '-', 'yes']
    """
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        v = int(value)
        return str(v) if abs(v) < _LARGE else _scientific(float(v))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        a = abs(v)
        if v == 0:
            return "0"
        if a < _SMALL or round(a) >= _LARGE:
            return _scientific(v)
        if a >= 10 ** _SIG_DIGITS:
            return str(int(round(v)))
        text = f"{v:.{_SIG_DIGITS}g}"
        return "0" if text == "-0" else text
    if isinstance(value, (list, tuple)):
        return ", ".join(format_number(v) for v in value)
    return str(value)


def table_columns(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    """``columns`` if given, otherwise every key of every row in order of first appearance."""
    if columns is not None:
        return [str(c) for c in columns]
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _cell(value: Any, max_width: int | None) -> str:
    text = " ".join(format_number(value).split())  # one line per cell
    if max_width is not None and len(text) > max_width:
        text = text[: max(max_width - 3, 1)] + "..."
    return text


def format_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    *,
    max_width: int | None = None,
) -> str:
    """A monospace table of dict rows for the terminal.

    Numeric columns are right-aligned, text columns left-aligned; a missing key shows as ``-``.

    Args:
        rows: one mapping per row.
        columns: keys to show, in order (default: all keys, in order of first appearance).
        title: an optional line above the table.
        max_width: cut cells longer than this many characters (ending them with ``...``).

    Returns:
        The table as one string without a trailing newline.

    Example:
        >>> print(format_table([{"n_params": 70e9, "loss": 1.93667}, {"n_params": 1e6, "loss": 3.1}]))
        n_params   loss
        --------  -----
            7e10  1.937
             1e6    3.1
    """
    rows = list(rows)
    cols = table_columns(rows, columns)
    if not cols:
        body = "(no rows)"
        return f"{title}\n{body}" if title else body
    cells = [[_cell(row.get(c), max_width) for c in cols] for row in rows]
    numeric = [
        any(is_numeric(row.get(c)) for row in rows)
        and all(is_numeric(row.get(c)) or row.get(c) is None for row in rows)
        for c in cols
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        parts = [t.rjust(w) if num else t.ljust(w) for t, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(cols))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    if not rows:
        out.append("(no rows)")
    return "\n".join(out)
