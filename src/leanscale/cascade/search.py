"""Exact cost-accuracy frontier of a cascade's confidence thresholds, and the finite-sample guarantee.

Setting. ``m`` stages run in order on a request. Stage ``k < m-1`` is either *off* (never called,
costs nothing) or *on* with a threshold ``t_k``: it is called on every request that reaches it
(paying ``cost_k``) and answers the request when it does not abstain and its confidence is
``>= t_k``; otherwise the request goes on. The last stage is always on and answers whatever it does
not abstain on (a request the last stage abstains on counts as wrong here: the cascade's fallback
may still get it right, so the estimate is a lower bound).

Calibration data gives, per stage, ``answered`` (bool), ``confidence`` and ``correct`` (bool) for
each of ``n`` requests. A configuration's mean cost and accuracy are sums over requests, and only
the thresholds' positions among the observed confidences matter, so the candidates for ``t_k`` are
the distinct confidences (of answered requests still reaching stage ``k``) plus "off".

:func:`frontier` enumerates every configuration exactly: a recursion over stages ``0..m-3`` (one
branch per candidate threshold, plus off) and, for the last thresholded stage ``m-2``, one sorted
sweep with cumulative sums that evaluates all of its thresholds at once. Each sweep is reduced to
its Pareto points before they are merged, so memory stays O(frontier). Cost: O(prod_{k<m-2} u_k *
n log n) for ``u_k`` distinct confidences of stage ``k`` -- a regex stage has one, so the usual
"rules -> small model -> big model" cascade is a single sweep. ``max_thresholds`` caps the outer
stages' candidates at that many quantiles for very large calibration sets (then the search is
exact on the last thresholded stage only; :attr:`FrontierResult.exact` says which).

:func:`fixed_sequence_test` is the guarantee (Learn-then-Test, Angelopoulos et al. 2021, arXiv
2110.01052, with fixed-sequence testing): configurations ordered from the most to the least
accurate *on a selection split* are tested on an independent split with the exact binomial test of
H0: accuracy < target; testing stops at the first failure, which controls the family-wise error at
``delta`` without a multiplicity correction. The cheapest configuration rejected before the first
failure has accuracy >= target with probability >= 1 - delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# re-exported by leanscale.cascade; binomial_p_value, evaluate_config, fixed_sequence_test and
# pareto_mask are importable from here
__all__ = ["FrontierResult", "frontier"]

OFF = None  # a stage that is not called


@dataclass
class FrontierResult:
    """Pareto-optimal configurations, sorted by increasing cost (and strictly increasing accuracy).

    ``cost``: mean cost per request; ``accuracy``: fraction correct; ``thresholds``: for each point
    a tuple with one entry per stage except the last (``None`` = off); ``n_evaluated``: how many
    configurations were scored; ``exact``: False when ``max_thresholds`` subsampled a stage.
    """

    cost: np.ndarray
    accuracy: np.ndarray
    thresholds: list
    n_evaluated: int
    exact: bool

    def __len__(self) -> int:
        return len(self.cost)


def pareto_mask(cost: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (cost <= and correct >=, one strictly), sorted by
    cost; among equal points the first is kept."""
    cost = np.asarray(cost, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if cost.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-correct, cost))  # cost ascending, then correct descending
    c = correct[order]
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], c[:-1]]))
    return order[c > best_before]


class _Collector:
    def __init__(self):
        self.cost, self.correct, self.thr = [], [], []
        self.n_evaluated = 0

    def add(self, cost: np.ndarray, correct: np.ndarray, prefix: tuple, last_values) -> None:
        cost = np.atleast_1d(np.asarray(cost, dtype=np.float64))
        correct = np.atleast_1d(np.asarray(correct, dtype=np.float64))
        self.n_evaluated += cost.size
        keep = pareto_mask(cost, correct)
        for i in keep:
            self.cost.append(cost[i])
            self.correct.append(correct[i])
            self.thr.append(prefix if last_values is None else prefix + (float(last_values[i]),))

    def result(self, n: int, exact: bool) -> FrontierResult:
        cost = np.asarray(self.cost)
        correct = np.asarray(self.correct)
        keep = pareto_mask(cost, correct)
        return FrontierResult(cost[keep] / n, correct[keep] / n, [self.thr[i] for i in keep],
                              self.n_evaluated, exact)


def _candidates(values: np.ndarray, max_thresholds: int | None) -> tuple[np.ndarray, bool]:
    vals = np.unique(values)[::-1]  # descending
    if max_thresholds is None or len(vals) <= max_thresholds:
        return vals, True
    q = np.quantile(values, np.linspace(1.0, 0.0, max_thresholds), method="higher")
    return np.unique(q)[::-1], False


def _as_arrays(answered, score, correct, costs):
    """The frontier searches' inputs as arrays: ``correct`` only where the stage answered."""
    answered = np.asarray(answered, dtype=bool)
    return (answered, np.asarray(score, dtype=np.float64), np.asarray(correct, dtype=bool) & answered,
            np.asarray(costs, dtype=np.float64))


def frontier(answered: np.ndarray, confidence: np.ndarray, correct: np.ndarray, costs,
             max_thresholds: int | None = None) -> FrontierResult:
    """The exact Pareto frontier of (mean cost, accuracy) over all threshold configurations.

    ``answered``, ``confidence``, ``correct``: (m, n) arrays (stage x request); ``costs``: (m,)
    cost per call. See the module docstring for the model and the algorithm.
    """
    answered, confidence, correct, costs = _as_arrays(answered, confidence, correct, costs)
    m, n = answered.shape
    last_correct = correct[-1]
    col = _Collector()
    exact = [True]

    def rec(k: int, R: np.ndarray, base_cost: float, base_correct: float, prefix: tuple) -> None:
        if k == m - 1:
            col.add(base_cost + len(R) * costs[-1], base_correct + last_correct[R].sum(), prefix, None)
            return
        rec(k + 1, R, base_cost, base_correct, prefix + (OFF,))  # stage k off
        a = R[answered[k, R]]
        if a.size == 0:
            return  # on but never answering: dominated by off
        cost_on = base_cost + len(R) * costs[k]
        if k == m - 2:
            # one sweep over all thresholds of the last thresholded stage
            order = np.argsort(-confidence[k, a], kind="stable")
            c_sorted = confidence[k, a][order]
            cum_k = np.cumsum(correct[k, a][order])  # correct answers of stage k among the taken
            cum_last = np.cumsum(last_correct[a][order])  # what the last stage would have got right
            total_last = last_correct[R].sum()
            vals = np.unique(c_sorted)[::-1]
            take = np.searchsorted(-c_sorted, -vals, side="right")  # how many have conf >= v
            corr = base_correct + cum_k[take - 1] + (total_last - cum_last[take - 1])
            cost = cost_on + (len(R) - take) * costs[-1]
            col.add(cost, corr, prefix, vals)
            return
        vals, ok = _candidates(confidence[k, a], max_thresholds)
        exact[0] &= ok
        conf_R, ans_R = confidence[k, R], answered[k, R]
        for v in vals:
            taken = ans_R & (conf_R >= v)
            rec(k + 1, R[~taken], cost_on, base_correct + correct[k, R[taken]].sum(), prefix + (float(v),))

    rec(0, np.arange(n), 0.0, 0.0, ())
    return col.result(n, exact[0])


def evaluate_config(thresholds, answered, confidence, correct, costs, idx=None) -> tuple[float, float, np.ndarray]:
    """Mean cost, accuracy and the answering stage of each request (``-1``: nobody answered) for
    one configuration, on the requests ``idx`` (default all). The reference the search must match."""
    answered, confidence, correct, costs = _as_arrays(answered, confidence, correct, costs)
    m, n = answered.shape
    if idx is None:
        idx = np.arange(n)
    stage = np.full(len(idx), -1)
    total_cost = 0.0
    remaining = np.ones(len(idx), dtype=bool)
    for k in range(m):
        t = thresholds[k] if k < m - 1 else -np.inf
        if t is OFF:
            continue
        total_cost += remaining.sum() * costs[k]
        take = remaining & answered[k, idx] & (confidence[k, idx] >= t)
        stage[take] = k
        remaining &= ~take
    ok = np.zeros(len(idx), dtype=bool)
    for k in range(m):
        sel = stage == k
        ok[sel] = correct[k, idx[sel]]
    return total_cost / len(idx), ok.mean(), stage


def binomial_p_value(n_correct: int, n: int, target: float) -> float:
    """P(Binomial(n, target) >= n_correct): the exact p-value of H0 "accuracy <= target"."""
    from scipy.stats import binom

    return float(binom.sf(n_correct - 1, n, target))


def fixed_sequence_test(n_correct, n: int, target: float, delta: float) -> tuple[int, list[float]]:
    """Test configurations in the given order (most accurate first); return how many were
    certified (the prefix with p-value <= delta before the first failure) and all p-values."""
    p_values = []
    certified = 0
    for k in n_correct:
        p = binomial_p_value(int(k), n, target)
        p_values.append(p)
        if p > delta:
            break
        certified += 1
    return certified, p_values
