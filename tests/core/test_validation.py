import math

import numpy as np
import pytest

from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.core.validation import (
    Interval,
    Options,
    check_array,
    check_consistent_length,
    check_is_fitted,
    check_labels,
    check_param,
    unknown_name_error,
)


@pytest.mark.parametrize(
    "interval,good,bad",
    [
        (Interval(int, 1, None), [1, 10**9, np.int64(3)], [0, 1.5, True, "2"]),
        (Interval(float, 0, 1, closed="neither"), [0.5, 1e-9], [0, 1.0, math.nan, False]),
        (Interval(float, 0, 1, closed="left"), [0.0, 0.99], [1.0, -0.1]),
        (Interval("real", None, 0), [-5, 0.0], [0.1, math.inf]),
    ],
)
def test_interval_membership(interval, good, bad):
    assert all(interval.is_satisfied_by(v) for v in good)
    assert not any(interval.is_satisfied_by(v) for v in bad)


def test_message_names_parameter_owner_expectation_and_value():
    with pytest.raises(InvalidParameterError) as exc:
        check_param("lr", -1.0, [Interval(float, 0, None, closed="neither")], owner="LARS")
    assert str(exc.value) == "The 'lr' parameter of LARS must be a float in the range (0, inf). Got -1.0 instead."
    with pytest.raises(InvalidParameterError, match=r"must be None or one of 'a', 'b'\. Got 'c'"):
        check_param("mode", "c", [None, Options({"a", "b"})])
    assert check_param("mode", None, [None, Options({"a"})]) is None


def test_invalid_parameter_error_is_a_value_error():
    assert issubclass(InvalidParameterError, ValueError)


def test_unknown_name_lists_valid_names_and_the_closest():
    err = unknown_name_error("law", "epok", ["chinchilla", "epoch"], owner="plan")
    assert "must be one of 'chinchilla', 'epoch'" in str(err) and "Did you mean 'epoch'?" in str(err)


def test_check_array_reports_the_first_bad_value():
    assert check_array("x", [1, 2], positive=True).dtype == np.float64
    with pytest.raises(InvalidParameterError, match=r"'x'.*finite values\. Got nan at flat index 1"):
        check_array("x", [1.0, float("nan")])
    with pytest.raises(InvalidParameterError, match=r"positive values\. Got -2\.0 at flat index 1"):
        check_array("x", [1.0, -2.0], positive=True)
    with pytest.raises(InvalidParameterError, match=r"1-d array\. Got an array of shape \(2, 2\)"):
        check_array("x", [[1, 2], [3, 4]])
    with pytest.raises(InvalidParameterError, match="at least 3 values"):
        check_array("x", [1, 2], min_len=3)


def test_consistent_length_and_fitted():
    assert check_consistent_length(a=[1, 2], b=[3, 4]) == 2
    with pytest.raises(InvalidParameterError, match="a=2, b=3"):
        check_consistent_length(a=[1, 2], b=[1, 2, 3])

    class Est:
        pass

    with pytest.raises(NotFittedError, match="Est instance is not fitted yet"):
        check_is_fitted(Est(), ["coef_"])


def test_check_labels_accepts_lists_arrays_and_tensors_and_names_the_parameter():
    import torch

    from leanscale.core.validation import check_labels

    assert check_labels("y", [1, 0, 1]).tolist() == [1, 0, 1]
    assert check_labels("y", torch.tensor([2, 3])).tolist() == [2, 3]
    assert check_labels("y", np.array(["a", "b"])).tolist() == ["a", "b"]
    with pytest.raises(InvalidParameterError, match=r"'y' parameter of f must be a 1-d array of labels.*\(2, 2\)"):
        check_labels("y", [[0, 1], [1, 0]], owner="f")


def test_check_texts():
    from leanscale.core.validation import check_texts

    assert check_texts("texts", ("a", "b"), owner="f") == ["a", "b"]
    assert check_texts("texts", iter(["a"])) == ["a"]
    assert check_texts("texts", [], min_len=0) == []
    with pytest.raises(InvalidParameterError, match="'texts' parameter of f must be a sequence of strings"):
        check_texts("texts", "one string", owner="f")
    with pytest.raises(InvalidParameterError, match="must not be empty"):
        check_texts("texts", [])
    with pytest.raises(InvalidParameterError, match="at least 3 texts. Got 2"):
        check_texts("texts", ["a", "b"], min_len=3)
    with pytest.raises(InvalidParameterError, match="'docs' .* Got int 3 at index 1"):
        check_texts("docs", ["a", 3])


def test_check_items():
    from leanscale.core.validation import check_items

    kw = {"what": "ints (one per row)", "noun": "rows", "owner": "f"}
    assert check_items("xs", (1, 2), int, **kw) == [1, 2]
    assert check_items("xs", iter([1]), int, **kw) == [1]  # any iterable ...
    with pytest.raises(InvalidParameterError, match="The 'xs' parameter of f must be a sequence of ints "
                       r"\(one per row\). Got generator instead."):
        check_items("xs", (i for i in [1]), int, reusable=True, **kw)  # ... unless it is kept and read again
    with pytest.raises(InvalidParameterError, match="Got int instead"):
        check_items("xs", 3, int, **kw)
    with pytest.raises(InvalidParameterError, match="The 'xs' parameter of f must not be empty. Got 0 rows."):
        check_items("xs", [], int, **kw)
    with pytest.raises(InvalidParameterError, match="must hold at least 2 rows. Got 1."):
        check_items("xs", [1], int, min_len=2, **kw)
    with pytest.raises(InvalidParameterError, match="Got str 'a' at index 1"):
        check_items("xs", [1, "a"], (int, float), **kw)


@pytest.mark.parametrize("bad, index", [([0.0, float("nan"), 1.0], 1), ([float("inf"), 2.0], 0)])
def test_check_labels_refuses_a_missing_label(bad, index):
    with pytest.raises(InvalidParameterError, match=f"'y' parameter of f must hold a label for every example. .* index {index}"):
        check_labels("y", np.array(bad), owner="f")
    assert check_labels("y", np.array([0.0, 1.0])).tolist() == [0.0, 1.0]  # float labels themselves are fine
