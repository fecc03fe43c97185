"""Learned deferral: a small model predicts whether a cheaper stage's answer is right, and the
cascade defers on that prediction instead of on the stage's raw confidence.

``Cascade(deferral="learned")`` uses this module. A stage's top-class probability is a weak
signal of its correctness when the model is mis-calibrated, or when the answer's reliability shows
elsewhere: whether an earlier, independent stage gave the same label (the "committee agreement" of
Wang et al. 2022, arXiv 2012.01988), the margin between the two top classes, the entropy, the
length of the request. For each non-last stage ``k`` a logistic regression on such features
(:func:`deferral_features`) is trained on the calibration requests that stage answers, with the
target "stage ``k``'s label is right"; its predicted probability replaces the confidence in the
threshold search.

No leakage: the scores the thresholds are chosen on are **cross-fitted**
(:func:`cross_fitted_scores`): the calibration requests are split into ``n_folds`` folds and each
request is scored by the model fitted on the other folds, so no request's own label enters its
score (the same reason stacking uses out-of-fold predictions). At prediction time the score is the
average of the fold models' logits (one linear model: the fold models' coefficients averaged).

Which stages run is part of a configuration: a stage's features use the stages before it that are
switched on, so each subset of switched-on stages has its own deferral models and its own scores.
:func:`learned_frontier` fits them for every subset (``2^(m-1)`` for ``m`` stages: 4 for the usual
three-stage cascade), finds the exact frontier of each subset with every stage of the subset on
(:func:`frontier_all_on`: a stage may be on without ever answering, only to give the later stages
its opinion) and merges them into one Pareto frontier.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leanscale.cascade import search as _search
from leanscale.core.errors import InvalidParameterError

__all__ = ["DeferralModel", "cross_fitted_scores", "deferral_features", "feature_names", "fit_logistic",
           "frontier_all_on", "learned_frontier"]  # importable from leanscale.cascade.deferral

N_FOLDS = 5  # cross-fitting folds of the calibration requests
L2 = 1e-3  # ridge penalty of the logistic regression (on standardised features, per request)
SCORE_MAX = 1.0 - 1e-9  # learned scores stay below 1: the threshold 1.0 means "on, never answers"
MAX_LEARNED_STAGES = 8  # 2^(m-1) subsets: refuse more stages than this
_EPS = 1e-6


def _lengths(items: Sequence) -> np.ndarray:
    """log(1 + characters) of each request (0 for a request without a length)."""
    out = np.zeros(len(items))
    for i, x in enumerate(items):
        try:
            out[i] = math.log1p(len(x))
        except TypeError:
            pass
    return out


def feature_names(own_extra: int, earlier: Sequence[str]) -> list[str]:
    """Names of the columns :func:`deferral_features` returns, in order."""
    names = ["confidence", "logit_confidence", "log_length"] + [f"stage_feature_{j}" for j in range(own_extra)]
    for e in earlier:
        names += [f"{e}.answered", f"{e}.confidence", f"{e}.agrees", f"{e}.agrees_x_confidence"]
    return names


def deferral_features(out, earlier: Sequence, lengths: np.ndarray) -> np.ndarray:
    """(n, f) float64 features of one stage's answers for its deferral model.

    Args:
        out: the stage's :class:`~leanscale.cascade.stages.StageOutput` on ``n`` requests; its
            ``features`` (e.g. :class:`ModelStage`'s margin and entropy) are used when present.
        earlier: the outputs of the switched-on stages before it, on the same requests (``None``
            for one that failed: it counts as having abstained).
        lengths: (n,) ``log(1 + characters)`` of the requests.

    Returns:
        the columns named by :func:`feature_names`: confidence, its logit, the log length, the
        stage's own features, and per earlier stage whether it answered, its confidence, whether it
        gave the same label, and that agreement times its confidence.
    """
    n = len(out.labels)
    conf = np.clip(np.asarray(out.confidence, dtype=np.float64), _EPS, 1 - _EPS)
    cols = [conf, np.log(conf / (1 - conf)), np.asarray(lengths, dtype=np.float64)]
    if out.features is not None:
        cols += list(np.asarray(out.features, dtype=np.float64).T)
    for o in earlier:
        if o is None:
            cols += [np.zeros(n)] * 4
            continue
        same = np.array([a == b for a, b in zip(o.labels, out.labels)], dtype=bool) if n else np.zeros(0, bool)
        agree = (np.asarray(o.answered, bool) & np.asarray(out.answered, bool) & same).astype(np.float64)
        oc = np.asarray(o.confidence, dtype=np.float64)
        cols += [np.asarray(o.answered, dtype=np.float64), oc, agree, agree * oc]
    return np.column_stack(cols) if cols else np.zeros((n, 0))


@dataclass
class DeferralModel:
    """A fitted deferral rule of one stage: ``score = sigmoid(features @ coef + intercept)``.

    ``earlier``: the names of the stages whose outputs its features use (in order);
    ``n_stage_features``: how many columns of the stage's own ``StageOutput.features`` it expects.
    """

    coef: np.ndarray
    intercept: float
    earlier: tuple = ()
    n_stage_features: int = 0
    n_train: int = 0
    names: list = field(default_factory=list)

    def score(self, F: np.ndarray) -> np.ndarray:
        """Predicted probability that the stage is right, (n,), in [0, ``SCORE_MAX``]."""
        F = np.asarray(F, dtype=np.float64)
        if F.ndim != 2 or F.shape[1] != len(self.coef):
            raise InvalidParameterError(
                f"The 'F' parameter of DeferralModel.score must have {len(self.coef)} columns. Got shape {F.shape}.")
        z = np.clip(F @ self.coef + self.intercept, -50, 50)
        return np.minimum(1.0 / (1.0 + np.exp(-z)), SCORE_MAX)

    def to_dict(self) -> dict:
        return {"coef": [float(v) for v in self.coef], "intercept": float(self.intercept),
                "earlier": list(self.earlier), "n_stage_features": int(self.n_stage_features),
                "n_train": int(self.n_train), "names": list(self.names)}


def fit_logistic(F: np.ndarray, t: np.ndarray, l2: float = L2, max_iter: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression of ``t`` (0/1) on ``F``; ``(coef, intercept)`` in the
    raw feature space. Newton's method on standardised columns (the intercept is not penalised):
    deterministic, and a few milliseconds for the handful of features a deferral rule has.

    One class only (every answer right, or every answer wrong): a constant at the smoothed rate.
    """
    F = np.asarray(F, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n, d = F.shape
    rate = (t.sum() + 0.5) / (n + 1.0)
    if n == 0 or t.min() == t.max():
        return np.zeros(d), float(math.log(rate / (1 - rate)))
    mu = F.mean(axis=0)
    sd = F.std(axis=0)
    sd[sd < 1e-12] = 1.0
    Z = np.hstack([(F - mu) / sd, np.ones((n, 1))])  # (n, d + 1): the last column is the intercept
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-8  # keeps the Hessian invertible when the classes separate
    p = np.zeros(d + 1)
    p[-1] = math.log(rate / (1 - rate))
    for _ in range(max_iter):
        z = np.clip(Z @ p, -50, 50)
        q = 1.0 / (1.0 + np.exp(-z))
        grad = Z.T @ (q - t) / n + reg * p
        H = (Z * (q * (1 - q))[:, None]).T @ Z / n + np.diag(reg)
        step = np.linalg.solve(H, grad)
        p -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    w, b = p[:d], float(p[d])
    return w / sd, b - float((w * mu / sd).sum())


def cross_fitted_scores(F: np.ndarray, t: np.ndarray, rows: np.ndarray, n_folds: int = N_FOLDS,
                        seed: int | None = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Out-of-fold predicted correctness of the requests ``rows`` and the averaged model.

    Args:
        F: (n, f) features; t: (n,) 0/1 targets (is the stage right); rows: the requests to fit
            and score (those the stage answers).
        n_folds: folds (fewer when there are fewer rows); seed: the fold assignment.

    Returns:
        ``(scores, coef, intercept)``: ``scores`` (n,) -- for each of ``rows`` the score of the
        model fitted on the other folds (its own target never enters it), 0 elsewhere -- and the
        fold models' averaged coefficients (the model used at prediction time).
    """
    F = np.asarray(F, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    n, d = F.shape
    scores = np.zeros(n)
    k = min(int(n_folds), len(rows))
    if k < 2:  # 0 or 1 rows: nothing to cross-fit on; a constant 0.5 (no label enters it)
        scores[rows] = 0.5
        return scores, np.zeros(d), 0.0
    perm = np.random.default_rng(seed).permutation(rows)
    folds = np.array_split(perm, k)
    coefs, bs = [], []
    for j, held in enumerate(folds):
        fit_rows = np.concatenate([f for i, f in enumerate(folds) if i != j])
        w, b = fit_logistic(F[fit_rows], t[fit_rows])
        z = np.clip(F[held] @ w + b, -50, 50)
        scores[held] = np.minimum(1.0 / (1.0 + np.exp(-z)), SCORE_MAX)
        coefs.append(w)
        bs.append(b)
    return scores, np.mean(coefs, axis=0), float(np.mean(bs))


def frontier_all_on(answered: np.ndarray, score: np.ndarray, correct: np.ndarray, costs,
                    max_thresholds: int | None = None) -> _search.FrontierResult:
    """The exact (cost, accuracy) frontier when every stage is on (none may be skipped).

    As :func:`leanscale.cascade.search.frontier`, but a stage cannot be off: its candidate
    thresholds are its distinct scores plus 1.0 ("on, never answers": it is run for the features
    it gives the later stages). Scores must lie in [0, 1).
    """
    answered, score, correct, costs = _search._as_arrays(answered, score, correct, costs)
    m, n = answered.shape
    last_correct = correct[-1]
    col = _search._Collector()
    exact = [True]

    def rec(k: int, R: np.ndarray, base_cost: float, base_correct: float, prefix: tuple) -> None:
        if k == m - 1:
            col.add(base_cost + len(R) * costs[-1], base_correct + last_correct[R].sum(), prefix, None)
            return
        cost_on = base_cost + len(R) * costs[k]
        a = R[answered[k, R]]
        if k == m - 2:
            order = np.argsort(-score[k, a], kind="stable")
            s_sorted = score[k, a][order]
            cum_k = np.concatenate([[0], np.cumsum(correct[k, a][order])])
            cum_last = np.concatenate([[0], np.cumsum(last_correct[a][order])])
            total_last = last_correct[R].sum()
            vals = np.concatenate([[1.0], np.unique(s_sorted)[::-1]])
            take = np.searchsorted(-s_sorted, -vals, side="right")  # how many have score >= v
            corr = base_correct + cum_k[take] + (total_last - cum_last[take])
            col.add(cost_on + (len(R) - take) * costs[-1], corr, prefix, vals)
            return
        vals, ok = (_search._candidates(score[k, a], max_thresholds) if a.size else (np.zeros(0), True))
        exact[0] &= ok
        s_R, ans_R = score[k, R], answered[k, R]
        for v in np.concatenate([[1.0], vals]):
            taken = ans_R & (s_R >= v)
            rec(k + 1, R[~taken], cost_on, base_correct + correct[k, R[taken]].sum(), prefix + (float(v),))

    rec(0, np.arange(n), 0.0, 0.0, ())
    return col.result(n, exact[0])


@dataclass
class LearnedFrontier:
    """What :func:`learned_frontier` returns: the merged ``frontier``; per subset of switched-on
    stages (a tuple of stage indices) the ``scores`` matrix (m, n) the thresholds apply to (the
    raw confidence in rows of stages that are off, and of the last stage) and its ``models``
    (stage index -> :class:`DeferralModel`)."""

    frontier: _search.FrontierResult
    scores: dict
    models: dict


def learned_frontier(outs: Sequence, correct: np.ndarray, costs, lengths: np.ndarray, names: Sequence[str], *,
                     n_folds: int = N_FOLDS, seed: int | None = 0,
                     max_thresholds: int | None = None) -> LearnedFrontier:
    """Deferral models and the exact frontier for every subset of switched-on stages, merged.

    Args:
        outs: each stage's :class:`~leanscale.cascade.stages.StageOutput` on the ``n``
            calibration requests; correct: (m, n) bool; costs: (m,); lengths: (n,) log lengths;
            names: the stage names.
        n_folds, seed: the cross-fitting (see :func:`cross_fitted_scores`).
        max_thresholds: caps the candidate thresholds of every stage but the last thresholded one.
    """
    m = len(outs)
    if m - 1 > MAX_LEARNED_STAGES:
        raise InvalidParameterError(
            f"The 'stages' parameter of Cascade has {m} stages; deferral='learned' searches every subset of the "
            f"first {m - 1} and supports at most {MAX_LEARNED_STAGES + 1} stages.")
    answered = np.stack([np.asarray(o.answered, bool) for o in outs])
    conf = np.stack([np.asarray(o.confidence, np.float64) for o in outs])
    correct = np.asarray(correct, dtype=bool) & answered
    costs = np.asarray(costs, dtype=np.float64)
    cache: dict = {}  # (k, earlier indices) -> (oof scores, DeferralModel)
    pts_cost, pts_acc, pts_thr = [], [], []
    n_eval, exact = 0, True
    scores_by, models_by = {}, {}
    for r in range(m):
        for subset in itertools.combinations(range(m - 1), r):
            S = conf.copy()
            models = {}
            for pos, k in enumerate(subset):
                earlier = subset[:pos]
                if (k, earlier) not in cache:
                    F = deferral_features(outs[k], [outs[j] for j in earlier], lengths)
                    sc, w, b = cross_fitted_scores(F, correct[k], np.flatnonzero(answered[k]), n_folds, seed)
                    n_extra = 0 if outs[k].features is None else int(np.asarray(outs[k].features).shape[1])
                    cache[(k, earlier)] = (sc, DeferralModel(w, b, tuple(names[j] for j in earlier), n_extra,
                                                             int(answered[k].sum()),
                                                             feature_names(n_extra, [names[j] for j in earlier])))
                S[k], models[k] = cache[(k, earlier)]
            idx = list(subset) + [m - 1]
            fr = frontier_all_on(answered[idx], S[idx], correct[idx], costs[idx], max_thresholds)
            n_eval += fr.n_evaluated
            exact &= fr.exact
            for c, a, thr in zip(fr.cost, fr.accuracy, fr.thresholds):
                full = [None] * (m - 1)
                for k, t in zip(subset, thr):
                    full[k] = t
                pts_cost.append(c)
                pts_acc.append(a)
                pts_thr.append(tuple(full))
            scores_by[subset], models_by[subset] = S, models
    keep = _search.pareto_mask(np.asarray(pts_cost), np.asarray(pts_acc))
    fr = _search.FrontierResult(np.asarray(pts_cost)[keep], np.asarray(pts_acc)[keep], [pts_thr[i] for i in keep],
                                n_eval, exact)
    return LearnedFrontier(fr, scores_by, models_by)
