"""format_number and terminal tables (leanscale.report.table)."""

import doctest
import math

import numpy as np
import pytest

import leanscale.report.table as table_mod
from leanscale.report.table import format_number, format_table


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (3, "3"),
        (-42, "-42"),
        (50000, "50000"),
        (999_999, "999999"),
        (1_000_000, "1e6"),
        (70_000_000_000, "7e10"),
        (123_456_789, "1.235e8"),
        (0.0, "0"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (2.3456789, "2.346"),
        (-2.3456789, "-2.346"),
        (1234.5678, "1235"),
        (12345.6, "12346"),
        (999_999.6, "1e6"),  # rounds up to a million: scientific, never "1000000"
        (5.76e23, "5.76e23"),
        (1.4e12, "1.4e12"),
        (0.001, "0.001"),
        (0.00099, "9.9e-4"),
        (-2.5e-7, "-2.5e-7"),
        (3.0, "3"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (None, "-"),
        (True, "yes"),
        (False, "no"),
        ("text <b>", "text <b>"),
        ((1, 2.5), "1, 2.5"),
        ([1e9, 0.25], "1e9, 0.25"),
        (np.float32(0.1), "0.1"),
        (np.float64(1.5e20), "1.5e20"),
        (np.int64(7), "7"),
        (np.bool_(True), "yes"),
    ],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_format_number_keeps_three_to_four_significant_digits():
    for v in (1.23456, 12.3456, 123.456, 0.0123456, 1.23456e-5, 1.23456e9):
        digits = format_number(v).split("e")[0].replace("-", "").replace(".", "").lstrip("0")
        assert 3 <= len(digits) <= 4, (v, format_number(v))


def test_format_table_aligns_numbers_right_and_text_left():
    text = format_table(
        [{"name": "a", "loss": 3.14159}, {"name": "longer", "loss": 12.5}], title="Losses"
    )
    lines = text.splitlines()
    assert lines[0] == "Losses"
    assert lines[1].split() == ["name", "loss"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("a ") and lines[3].endswith("3.142")
    assert lines[4].startswith("longer") and lines[4].endswith(" 12.5")
    # right-aligned: the numbers end in the same column
    assert len(lines[3]) == len(lines[4])


def test_format_table_columns_missing_keys_and_union():
    rows = [{"a": 1}, {"b": "x"}]
    text = format_table(rows)
    assert text.splitlines()[0].split() == ["a", "b"]
    assert text.splitlines()[2].split() == ["1", "-"]
    only_b = format_table(rows, columns=["b"])
    assert "a" not in only_b.splitlines()[0]


def test_format_table_empty_and_truncation():
    assert format_table([]) == "(no rows)"
    assert format_table([], columns=["a"]).endswith("(no rows)")
    text = format_table([{"note": "x" * 100, "n": 1}], max_width=20)
    assert "x" * 17 + "..." in text
    assert "x" * 18 not in text
    assert "\n" not in format_table([{"a": "two\nlines"}]).splitlines()[-1]


def test_docstring_examples():
    assert doctest.testmod(table_mod, raise_on_error=False).failed == 0
