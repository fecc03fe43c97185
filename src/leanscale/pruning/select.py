"""Choose which examples to keep from per-example scores (hard, easy, random or Sorscher's rule).

Sorscher, Geirhos, Shekhar, Ganguli & Morcos 2022, "Beyond neural scaling laws: beating power law
scaling via data pruning", arXiv 2206.14486.

Scores follow the package convention: one number per example, higher = harder. ``"hard"`` keeps
the highest scores, ``"easy"`` the lowest, ``"random"`` a seeded uniform sample (scores ignored).

**Which end to keep** (their Fig. 1, the perceptron theory, confirmed on CIFAR-10 and ImageNet):
the best pruning strategy depends on how much data is *kept*. With scarce data, keeping the
easiest (most typical) examples is best: a small training set must first capture the coarse
structure, and hard examples are then mostly noise to it. With abundant data, keeping the hardest
examples is best: the easy ones are redundant and the hard ones carry the information near the
decision boundary. ``strategy="auto"`` applies this rule with a threshold on the *fraction* of
the examples that is kept (:data:`AUTO_MIN_FRACTION`): on our two benchmarks the crossover sat at
the same fraction while the number of kept examples per class at the crossover differed 13x.
:func:`resolve_strategy` returns the decision with a human-readable reason, which
:class:`~leanscale.pruning.pruner.DataPruner` writes into its manifest.

**Class balance.** With labels and ``class_balance=True`` every class keeps the same fraction of
its examples (the quotas of :func:`leanscale.data._sampling.proportional_quotas`: largest
remainders, summing exactly to the kept count) and is ranked within itself, so a metric that
finds one class harder than the others cannot wipe it out -- Sorscher et al. observe that
unbalanced pruning with hard-example metrics can strongly over-prune easy classes.
``class_balance=True`` with ``labels=None`` simply means no balancing.

**Ties** (equal scores, e.g. forgetting counts of 0) are broken by a random permutation drawn
from ``numpy.random.default_rng(seed)``: the same inputs and seed always give the same indices,
and no position in the data set is favoured.

Example:
    >>> import numpy as np
    >>> scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.2])
    >>> select(scores, 2).tolist()                     # the two hardest
    [0, 3]
    >>> select(scores, 0.5, strategy="easy").tolist()  # the easiest half
    [1, 4, 5]
    >>> select(scores, 2, labels=[0, 0, 0, 1, 1, 1]).tolist()  # the hardest of each class
    [0, 3]
    >>> resolve_strategy("auto", 60, 200)[0]           # 30% kept: a small kept set -> easy
    'easy'
    >>> resolve_strategy("auto", 80, 200)[0]           # 40% kept: at the threshold -> hard
    'hard'
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import (
    Interval,
    check_array,
    check_consistent_length,
    check_labels,
    check_param,
    unknown_name_error,
)
from leanscale.data._sampling import proportional_quotas

__all__ = ["AUTO_MIN_FRACTION", "STRATEGIES", "resolve_strategy", "select"]

STRATEGIES = ("hard", "easy", "random", "auto")

# strategy="auto" keeps HARD examples when at least this fraction of the examples is kept
# (n_keep / n_total >= AUTO_MIN_FRACTION) and EASY ones otherwise (Sorscher et al. 2022, Fig. 1:
# small kept set -> keep easy, large -> keep hard). Measured by benchmarks/pruning/fraction_kept.py
# (MLP, 3 seeds; benchmarks/results/pruning/fraction_kept_fashion-mnist-mlp.json and
# fraction_kept_wordnet-mlp.json): on BOTH Fashion-MNIST (60,000 train, 10 classes) and WordNet
# glosses (20,000 train, 45 classes) keep-hard beats keep-easy for EL2N and GraNd at 50% kept and
# above, and keep-easy beats keep-hard at 30% kept and below. Counted in kept examples per class the
# crossover differs 13x between the two (1,800-3,000 vs 133-222 per class); as a fraction it is the
# same (between 30% and 50%), so 0.4. Caveat: Sorscher et al.'s theory (Fig. 1) has the crossover
# move with the total amount of data; the fraction is only what was stable on our two data sets.
# tests/pruning/test_select.py checks the constant against both JSON files. Measure yours and pass
# auto_min_fraction.
AUTO_MIN_FRACTION = 0.4

_KEEP_CONSTRAINTS = [Interval(int, 1, None), Interval(float, 0, 1, closed="right")]
_REASONS = {
    "hard": "strategy 'hard' was requested: keep the highest scores (the hardest examples)",
    "easy": "strategy 'easy' was requested: keep the lowest scores (the easiest examples)",
    "random": "strategy 'random' was requested: keep a seeded uniform sample (scores ignored)",
}


def _percent(ratio: float, threshold: float) -> str:
    """``ratio`` as a percentage (30, 33.33), with more digits where rounding would hide which side
    of ``threshold`` it is on (39.999% is not printed as 40%)."""
    for digits in range(2, 12):
        text = f"{100 * ratio:.{digits}f}"
        if ratio == threshold or text != f"{100 * threshold:.{digits}f}":
            break
    return text.rstrip("0").rstrip(".")


def resolve_strategy(strategy: str, n_keep: int, n_total: int,
                     auto_min_fraction: float = AUTO_MIN_FRACTION) -> tuple[str, str]:
    """The concrete strategy (``"hard"``, ``"easy"`` or ``"random"``) and why it was chosen.

    An explicit strategy is returned as it is. ``"auto"`` applies Sorscher et al.'s rule on the
    kept fraction: hard when ``n_keep / n_total >= auto_min_fraction`` (a large kept set), easy
    otherwise.

    Args:
        strategy: One of ``"hard"``, ``"easy"``, ``"random"``, ``"auto"``.
        n_keep: The number of kept examples (int >= 1).
        n_total: The number of examples they are chosen from (int >= ``n_keep``).
        auto_min_fraction: The threshold on the kept fraction, in (0, 1]
            (default :data:`AUTO_MIN_FRACTION`).

    Returns:
        ``(strategy, reason)``: the reason is one sentence for a manifest or a log.

    Example:
        >>> strategy, reason = resolve_strategy("auto", 1800, 6000)
        >>> strategy
        'easy'
        >>> print(reason)  # doctest: +NORMALIZE_WHITESPACE
        auto: keeping 30% of the examples (1800 of 6000) is below auto_min_fraction=0.4:
        with a small kept set keep the easiest examples (Sorscher et al. 2022, Fig. 1)
        >>> print(resolve_strategy("auto", 3000, 6000)[1])  # doctest: +NORMALIZE_WHITESPACE
        auto: keeping 50% of the examples (3000 of 6000) is at least auto_min_fraction=0.4:
        with a large kept set keep the hardest examples (Sorscher et al. 2022, Fig. 1)
    """
    owner = "resolve_strategy"
    if not (isinstance(strategy, str) and strategy in STRATEGIES):
        raise unknown_name_error("strategy", strategy, STRATEGIES, owner=owner)
    check_param("n_keep", n_keep, [Interval(int, 1, None)], owner=owner)
    check_param("n_total", n_total, [Interval(int, 1, None)], owner=owner)
    if n_total < n_keep:
        raise InvalidParameterError(
            f"The 'n_total' parameter of {owner} must be an int at least n_keep ({n_keep}): the kept "
            f"examples are chosen from n_total. Got {n_total!r} instead."
        )
    check_param("auto_min_fraction", auto_min_fraction, [Interval(float, 0, 1, closed="right")], owner=owner)
    if strategy != "auto":
        return strategy, _REASONS[strategy]
    threshold = float(auto_min_fraction)
    # Division is correctly rounded, so a ratio equal to the threshold (2 of 5 vs 0.4) compares equal.
    ratio = int(n_keep) / int(n_total)
    kept = f"keeping {_percent(ratio, threshold)}% of the examples ({int(n_keep)} of {int(n_total)})"
    if ratio < threshold:
        return "easy", (
            f"auto: {kept} is below auto_min_fraction={threshold!r}: with a small kept set keep the "
            f"easiest examples (Sorscher et al. 2022, Fig. 1)"
        )
    return "hard", (
        f"auto: {kept} is at least auto_min_fraction={threshold!r}: with a large kept set keep the "
        f"hardest examples (Sorscher et al. 2022, Fig. 1)"
    )


def _n_keep(keep: float, n: int) -> int:
    """The number of examples ``keep`` means for ``n`` examples (see :func:`select`)."""
    if isinstance(keep, numbers.Integral):
        return int(keep)
    # round half up (1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001); keep >= 1
    return max(1, min(n, math.floor(float(keep) * n + 0.5 + 1e-9)))


def select(
    scores: Any,
    keep: float,
    strategy: str = "hard",
    labels: Any = None,
    class_balance: bool = True,
    *,
    seed: int = 0,
    auto_min_fraction: float = AUTO_MIN_FRACTION,
) -> np.ndarray:
    """The indices of the examples to keep, sorted ascending (int64).

    Args:
        scores: ``(n,)`` per-example scores, higher = harder (``inf`` allowed, NaN not).
        keep: A fraction in (0, 1] of the examples (rounded to the nearest count, at least 1) or
            an int count in [1, n]. Booleans are rejected.
        strategy: ``"hard"`` (highest scores), ``"easy"`` (lowest), ``"random"`` (seeded,
            scores ignored) or ``"auto"`` (:func:`resolve_strategy`: hard when at least the
            fraction ``auto_min_fraction`` of the ``n`` examples is kept, easy otherwise).
        labels: ``(n,)`` class labels (any values), or None.
        class_balance: With labels, each class keeps the same fraction of its examples (exact
            counts from :func:`~leanscale.data._sampling.proportional_quotas`), ranked within the
            class. Without labels it has no effect.
        seed: Seed of the random order that breaks ties (and of the sample for ``"random"``).
        auto_min_fraction: The threshold of ``"auto"`` on the kept fraction, in (0, 1].

    Returns:
        ``(n_keep,)`` int64 indices into ``scores``, sorted ascending.

    Raises:
        InvalidParameterError: ``scores`` not 1-d or containing NaN, ``keep`` outside (0, 1] or
            larger than ``n``, an unknown ``strategy``, ``labels`` of another length,
            ``auto_min_fraction`` outside (0, 1].
    """
    owner = "select"
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    scores = check_array("scores", scores, ndim=1, finite=False, min_len=1, owner=owner)
    if np.isnan(scores).any():
        bad = int(np.flatnonzero(np.isnan(scores))[0])
        raise InvalidParameterError(
            f"The 'scores' parameter of {owner} must not contain NaN. Got NaN at index {bad}."
        )
    n = scores.shape[0]
    check_param("keep", keep, _KEEP_CONSTRAINTS, owner=owner)
    if isinstance(keep, numbers.Integral) and keep > n:
        raise InvalidParameterError(
            f"The 'keep' parameter of {owner} must be at most the number of examples ({n}) when it is "
            f"a count. Got {keep} instead."
        )
    if not (isinstance(strategy, str) and strategy in STRATEGIES):
        raise unknown_name_error("strategy", strategy, STRATEGIES, owner=owner)
    check_param("class_balance", class_balance, [bool], owner=owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner=owner)
    check_param("auto_min_fraction", auto_min_fraction, [Interval(float, 0, 1, closed="right")], owner=owner)
    inverse, n_classes = None, 1
    if labels is not None:
        labels = check_labels("labels", labels, owner=owner)  # 1-d, no NaN
        check_consistent_length(owner, scores=scores, labels=labels)
        try:
            classes, inverse = np.unique(labels, return_inverse=True)
        except TypeError:  # e.g. None next to strings
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must hold labels of one sortable type (ints or strings). Got "
                f"a mix: {sorted({type(v).__name__ for v in labels.tolist()})}."
            ) from None
        inverse = inverse.reshape(-1)
        n_classes = len(classes)

    n_keep = _n_keep(keep, n)
    resolved, _ = resolve_strategy(strategy, n_keep, n, auto_min_fraction)
    # Ranking: the best candidates first. Sorting a seeded permutation stably puts equal scores
    # in that permutation's order, so ties are broken randomly but reproducibly.
    perm = np.random.default_rng(seed).permutation(n)
    if resolved == "random":
        order = perm
    elif resolved == "hard":
        order = perm[np.argsort(-scores[perm], kind="stable")]
    else:
        order = perm[np.argsort(scores[perm], kind="stable")]

    if inverse is None or not class_balance:
        kept = order[:n_keep]
    else:
        quotas = proportional_quotas(np.bincount(inverse, minlength=n_classes), n_keep)
        by_class = inverse[order]
        kept = np.concatenate([order[by_class == c][: quotas[c]] for c in range(n_classes)])
    return np.sort(kept).astype(np.int64)
