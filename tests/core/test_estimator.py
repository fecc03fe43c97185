"""The one estimator base (#14): scikit-learn's parameter contract, written once.

``leanscale.core.estimator.Estimator`` derives ``get_params``/``set_params``/``repr`` from the
``__init__`` signature and checks ``_parameter_constraints`` in ``_validate_params``; renamed
parameters keep working one release (``_renamed`` for ``set_params``, ``renamed_argument`` for
constructors and functions).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from leanscale.core.deprecation import renamed_argument
from leanscale.core.errors import InvalidParameterError
from leanscale.core.estimator import Estimator
from leanscale.core.validation import Interval, Options


class Scaler(Estimator):
    """A toy estimator: ``factor`` was called ``scale`` before (constructor and set_params)."""

    _parameter_constraints = {  # noqa: RUF012 -- a ClassVar in the base
        "factor": [Interval(float, 0, None, closed="neither")],
        "mode": [Options(("mul", "div"))],
        "seed": [Interval(int, 0, None)],
    }
    _renamed = {"scale": "factor"}  # noqa: RUF012

    def __init__(self, factor: float = 1.0, mode: str = "mul", seed: int = 0, weights=None, *, scale=None):
        self.factor = renamed_argument("Scaler", "scale", "factor", scale, factor, 1.0)
        self.mode = mode
        self.seed = seed
        self.weights = weights

    def fit(self, x, y=None):
        self._validate_params()
        self.fitted_ = True
        return self


def test_get_params_follows_the_signature_and_set_params_round_trips():
    est = Scaler(factor=2.0, seed=3)
    params = est.get_params()
    assert params == {"factor": 2.0, "mode": "mul", "seed": 3, "weights": None}  # no renamed 'scale'
    other = Scaler().set_params(**params)
    assert other.get_params() == params
    assert est.set_params(mode="div") is est and est.mode == "div"
    assert Scaler(**est.get_params()).get_params() == est.get_params()
    assert list(Scaler._get_param_names()) == ["factor", "mode", "seed", "weights"]


def test_set_params_refuses_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(InvalidParameterError) as exc:
        Scaler().set_params(seeed=1)
    message = str(exc.value)
    assert "of Scaler.set_params" in message
    assert "must be one of 'factor', 'mode', 'seed', 'weights'. Got 'seeed' instead." in message
    assert "Did you mean 'seed'?" in message


def test_repr_shows_only_the_parameters_that_differ_from_their_defaults():
    assert repr(Scaler()) == "Scaler()"
    assert repr(Scaler(factor=2.0, seed=4)) == "Scaler(factor=2.0, seed=4)"
    assert repr(Scaler(factor=1)) == "Scaler(factor=1)"  # an int is not the float default
    # an array parameter: no ambiguous-truth error, shown as changed
    assert repr(Scaler(weights=np.ones(2))) == "Scaler(weights=array([1., 1.]))"


def test_validate_params_names_the_parameter_the_class_and_the_value():
    est = Scaler(factor=-1.0)  # nothing is checked in __init__ (scikit-learn's rule)
    with pytest.raises(InvalidParameterError) as exc:
        est.fit(None)
    assert str(exc.value) == (
        "The 'factor' parameter of Scaler must be a float in the range (0, inf). Got -1.0 instead.")
    with pytest.raises(InvalidParameterError, match=r"'mode' parameter of Scaler must be one of 'div', 'mul'\. "
                                                    r"Got 'add' instead"):
        Scaler(mode="add").fit(None)
    with pytest.raises(InvalidParameterError, match="'seed' parameter of Scaler"):
        Scaler(seed=True).fit(None)  # a bool is not an int
    assert Scaler(factor=3).fit(None).fitted_


def test_renamed_parameter_in_set_params_warns_and_sets_the_new_name():
    est = Scaler()
    with pytest.warns(FutureWarning, match="Scaler: the 'scale' parameter was renamed to 'factor'"):
        assert est.set_params(scale=5.0) is est
    assert est.factor == 5.0 and "scale" not in est.get_params()


def test_renamed_parameter_in_set_params_refuses_both_names_at_once():
    with pytest.raises(InvalidParameterError, match="'scale'.*'factor'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        Scaler().set_params(scale=5.0, factor=2.0)


def test_set_params_is_all_or_nothing():
    est = Scaler()
    before = est.get_params()
    with pytest.raises(InvalidParameterError, match="'parameter' parameter of Scaler.set_params.*Got 'nope'"):
        est.set_params(factor=9.0, nope=1)
    assert est.get_params() == before


def test_renamed_argument_in_the_constructor_warns_and_refuses_both_names():
    with pytest.warns(FutureWarning, match=r"the 'scale' parameter was renamed to 'factor'.*pass factor=4\.0"):
        est = Scaler(scale=4.0)
    assert est.factor == 4.0
    with pytest.raises(InvalidParameterError, match=r"The 'scale' parameter of Scaler was renamed to 'factor'; "
                                                    r"pass only 'factor'\. Got both scale=4\.0 and factor=2\.0"):
        Scaler(factor=2.0, scale=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Scaler(factor=2.0).factor == 2.0  # the new name alone: no warning


def test_renamed_argument_for_a_function_points_the_warning_at_the_caller():
    def scale(x, factor=1.0, *, scale_by=None):
        return x * renamed_argument("scale", "scale_by", "factor", scale_by, factor, 1.0)

    with pytest.warns(FutureWarning) as record:
        assert scale(2.0, scale_by=3.0) == 6.0
    assert record[0].filename == __file__  # stacklevel: the line that called scale(), not scale itself
    assert scale(2.0, 3.0) == 6.0
    with pytest.raises(InvalidParameterError, match="pass only 'factor'"):
        scale(2.0, 3.0, scale_by=3.0)


def test_scikit_learn_clone_and_the_real_estimators():
    sklearn_base = pytest.importorskip("sklearn.base")
    est = Scaler(factor=2.0, mode="div", weights=[1, 2])
    copy = sklearn_base.clone(est)
    assert copy is not est and type(copy) is Scaler and copy.get_params() == est.get_params()
    assert not hasattr(copy, "fitted_")

    from leanscale.models.linear import SoftmaxRegression
    from leanscale.pruning.active import ActiveLearner
    from leanscale.pruning.kmeans import KMeans
    from leanscale.pruning.pruner import DataPruner

    for original in (SoftmaxRegression(C=3.0, warm_start=True), KMeans(4, metric="cosine"),
                     DataPruner(metric="random", keep=0.3), ActiveLearner(SoftmaxRegression(C=2.0), seed=1)):
        assert isinstance(original, Estimator)
        cloned = sklearn_base.clone(original)
        assert repr(cloned) == repr(original)
        assert cloned.get_params().keys() == original.get_params().keys()


@pytest.mark.parametrize("check", ["check_get_params_invariance", "check_set_params",
                                   "check_no_attributes_set_in_init", "check_parameters_default_constructible"])
def test_scikit_learn_parameter_checks_pass_on_every_estimator(check):
    estimator_checks = pytest.importorskip("sklearn.utils.estimator_checks")
    from leanscale.models.linear import SoftmaxRegression
    from leanscale.pruning.active import ActiveLearner
    from leanscale.pruning.kmeans import KMeans
    from leanscale.pruning.pruner import DataPruner

    for est in (Scaler(), SoftmaxRegression(), KMeans(), DataPruner(), ActiveLearner(SoftmaxRegression())):
        getattr(estimator_checks, check)(type(est).__name__, est)
