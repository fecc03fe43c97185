"""Multinomial logistic (softmax) regression with an L2 penalty, fitted by L-BFGS in torch.

A fast model with no dependency beyond torch, for active learning (:mod:`leanscale.pruning.active`)
and cascades, following scikit-learn's estimator contract (``fit`` returns ``self``;
``predict_proba``, ``predict``; learned ``classes_``, ``coef_``, ``intercept_``).

**The objective.** With ``k`` classes, weights ``W`` (k, d), intercepts ``b`` (k,) and
``p_i = softmax(W x_i + b)``, :meth:`SoftmaxRegression.fit` minimises::

    L(W, b) = sum_i -log p_i[y_i]  +  ||W||_F^2 / (2 C)

the *summed* (not averaged) cross-entropy plus the penalty, i.e. scikit-learn's
``LogisticRegression(C=C)`` objective ``C * sum_i loss_i + ||W||^2 / 2`` divided by ``C``: a larger
``C`` means a weaker penalty, and the same ``C`` regularises less as the data grow. The intercepts
are not penalised. ``W`` has one row per class (the over-parametrised softmax; the penalty makes
it identifiable: at the minimum the rows of ``W`` sum to 0). With two classes ``coef_`` therefore
has 2 rows, not scikit-learn's 1, and the model equals binary logistic regression with weight
``w = W[1] - W[0]`` and penalty ``||w||^2 / (4 C)`` (the minimum-norm split is ``W = (-w/2, w/2)``).
The intercepts are only defined up to a common constant; ``intercept_`` is reported centred
(summing to 0), which does not change any probability.

**Numerics.** Everything is computed in float64 whatever the input dtype. L-BFGS
(``torch.optim.LBFGS``, strong-Wolfe line search) minimises ``L / n`` (same minimiser, better
scaled) from ``W = 0`` and ``b`` = centred log class frequencies (or from the previous fit with
``warm_start=True``), and stops when the largest
absolute entry of the gradient of ``L / n`` is at most ``tol``, when an iteration changes ``L / n``
by less than 1e-15 (float64 precision: a ``tol`` far below ~1e-8 cannot be met and this test
ends the fit instead), or after ``max_iter`` iterations (then, unless the gradient test holds, a
:class:`ConvergenceWarning`).

**Standardisation is not done for you.** The penalty treats every feature alike, so features on
very different scales are penalised unequally, and L-BFGS converges slowly on badly scaled
inputs. Standardise (or L2-normalise embeddings) first when the scales differ.

Example:
    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> clf = SoftmaxRegression(C=10.0).fit(X, ["a", "a", "b", "b"])
    >>> clf.classes_.tolist(), clf.predict([[0.2], [2.9]]).tolist()
    (['a', 'b'], ['a', 'b'])
    >>> clf.coef_.shape, bool(abs(clf.coef_.sum()) < 1e-6)
    ((2, 1), True)
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from leanscale.core.errors import InvalidParameterError
from leanscale.core.estimator import Estimator
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_is_fitted,
)

__all__ = ["ConvergenceWarning", "SoftmaxRegression"]

_OWNER = "SoftmaxRegression"
_LBFGS_HISTORY = 20  # curvature pairs kept by L-BFGS (torch's default is 100; 20 is ample here)
# L-BFGS also stops when the objective changes by less than this between iterations. The objective
# is L / n, of order 1, so 1e-15 is a few float64 ulps: in practice only the gradient test stops it.
_TOLERANCE_CHANGE = 1e-15


class ConvergenceWarning(UserWarning):
    """L-BFGS stopped at ``max_iter`` before the gradient reached ``tol``."""


class SoftmaxRegression(Estimator):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS in float64.

    Args:
        C: inverse penalty strength (> 0): the objective is the summed cross-entropy plus
            ``||W||^2 / (2 C)`` (scikit-learn's convention; see the module docstring).
        max_iter: most L-BFGS iterations (>= 1).
        tol: stop when the largest absolute gradient entry of the objective divided by the number
            of examples is at most ``tol`` (> 0).
        warm_start: start L-BFGS from the previous fit's ``coef_`` and ``intercept_`` (rows of
            classes it did not know start at 0 / the log class frequency), as scikit-learn's
            ``warm_start``. The minimum is the same (the objective is convex); refitting on a
            slightly larger labelled set, as active learning does, takes fewer iterations.

    Attributes (after ``fit``):
        classes_: the sorted distinct labels of ``y`` (k,); probability columns follow this order.
        coef_: float64 (k, d) weights, one row per class (also for k = 2).
        intercept_: float64 (k,) intercepts, centred to sum to 0.
        n_features_in_: d.
        n_iter_: L-BFGS iterations used.
        converged_: False when ``max_iter`` was reached with the gradient still above ``tol``.
    """

    _parameter_constraints: ClassVar[dict] = {
        "C": [Interval("real", 0, None, closed="neither")],
        "max_iter": [Interval(int, 1, None)],
        "tol": [Interval("real", 0, None, closed="neither")],
        "warm_start": [bool],
    }

    def __init__(self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-6, *, warm_start: bool = False):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start

    # ------------------------------------------------------------------------------------- fit
    def fit(self, X, y) -> SoftmaxRegression:
        """Fit on ``X`` (n, d) and labels ``y`` (n,) of any sortable type; return ``self``.

        Raises:
            InvalidParameterError: a bad ``C``/``max_iter``/``tol``; ``X`` not 2-d or not finite;
                ``y`` not 1-d or of another length; fewer than 2 distinct labels.
        """
        self._validate_params()
        X = _as_float64(X, "X")  # (n, d)
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        if y.ndim != 1:
            raise InvalidParameterError(
                f"The 'y' parameter of {_OWNER}.fit must be a 1-d array of labels. Got shape {y.shape}."
            )
        n = check_consistent_length(owner=f"{_OWNER}.fit", X=X, y=y)
        if y.dtype == object and any(v is None for v in y.tolist()):
            raise InvalidParameterError(
                f"The 'y' parameter of {_OWNER}.fit must hold a label for every example. Got None at index "
                f"{[v is None for v in y.tolist()].index(True)}."
            )
        if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):
            raise InvalidParameterError(
                f"The 'y' parameter of {_OWNER}.fit must hold a label for every example. Got "
                f"{y[~np.isfinite(y)][0]!r} at index {int(np.flatnonzero(~np.isfinite(y))[0])} (a missing label?)."
            )
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InvalidParameterError(
                f"The 'y' parameter of {_OWNER}.fit must contain at least 2 distinct labels. Got "
                f"{len(classes)} ({classes.tolist()!r}) in {n} examples."
            )
        k, d = len(classes), X.shape[1]

        x = torch.from_numpy(X)  # (n, d) float64
        target = torch.from_numpy(y_idx.astype(np.int64).reshape(-1))  # (n,)
        counts = np.bincount(y_idx.reshape(-1), minlength=k).astype(np.float64)
        log_prior = np.log(counts / n)
        w0, b0 = np.zeros((k, d)), log_prior - log_prior.mean()
        if self.warm_start and getattr(self, "n_features_in_", None) == d:
            old = {c: i for i, c in enumerate(self.classes_.tolist())}
            for i, c in enumerate(classes.tolist()):
                if c in old:
                    w0[i], b0[i] = self.coef_[old[c]], self.intercept_[old[c]]
        weight = torch.tensor(w0, dtype=torch.float64, requires_grad=True)  # (k, d)
        bias = torch.tensor(b0, dtype=torch.float64, requires_grad=True)  # (k,)
        inv_2c = 1.0 / (2.0 * float(self.C))

        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, max_eval=None,
            tolerance_grad=float(self.tol), tolerance_change=_TOLERANCE_CHANGE,
            history_size=_LBFGS_HISTORY, line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = x @ weight.T + bias  # (n, k)
            loss = F.cross_entropy(logits, target, reduction="sum") + inv_2c * weight.pow(2).sum()
            loss = loss / n
            loss.backward()
            return loss

        optimizer.step(closure)
        closure()  # the gradient at the final point
        grad_max = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
        state = optimizer.state[optimizer._params[0]]
        self.n_iter_ = int(state.get("n_iter", 0))
        # Converged: the gradient test was met, or L-BFGS stopped before max_iter because an
        # iteration no longer changed the objective (float64 precision reached).
        self.converged_ = bool(grad_max <= float(self.tol) or self.n_iter_ < self.max_iter)
        if not self.converged_:
            warnings.warn(
                f"{_OWNER} did not converge in max_iter={self.max_iter} L-BFGS iterations (largest "
                f"gradient entry {grad_max:.2e} > tol={self.tol}); raise max_iter, or standardise X.",
                ConvergenceWarning,
                stacklevel=2,
            )
        b = bias.detach().numpy().copy()
        self.classes_ = classes
        self.coef_ = weight.detach().numpy().copy()
        self.intercept_ = b - b.mean()
        self.n_features_in_ = d
        return self

    # --------------------------------------------------------------------------------- predict
    def decision_function(self, X) -> np.ndarray:
        """The logits ``X W^T + b`` (n, k), float64."""
        check_is_fitted(self, ["coef_"])
        X = _as_float64(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise InvalidParameterError(
                f"The 'X' parameter of {_OWNER} must have {self.n_features_in_} features (as in fit). "
                f"Got {X.shape[1]}."
            )
        return X @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, k) float64, columns in the order of ``classes_``."""
        logits = torch.from_numpy(self.decision_function(X))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row (n,), values from ``classes_``."""
        check_is_fitted(self, ["coef_", "classes_"])
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X, y) -> float:
        """Accuracy of :meth:`predict` on ``(X, y)``."""
        y = np.asarray(y)
        pred = self.predict(X)
        check_consistent_length(owner=f"{_OWNER}.score", X=pred, y=y)
        return float(np.mean(pred == y))


def _as_float64(X, name: str) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().to(torch.float64).numpy()
    return np.ascontiguousarray(check_array(name, X, ndim=2, min_len=1, owner=_OWNER))
