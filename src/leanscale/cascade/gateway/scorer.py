"""The cascade's quality estimator: "is the cheap model's answer to this prompt correct?".

:class:`AnswerScorer` is FrugalGPT's answer scorer (Chen, Zaharia and Zou 2023, "FrugalGPT: How to
Use Large Language Models While Reducing Cost and Improving Performance", arXiv 2305.05176): a
model of ``P(correct | prompt, answer)`` trained on logged (prompt, cheap answer, was it correct)
triples. FrugalGPT fine-tunes a small DistilBERT; here it is a logistic regression on

* word uni+bigram TF-IDF of the prompt and, with a vocabulary of its own, of the answer
  (sublinear tf), so the words of hard questions and of hedging or broken answers both count;
* a few standardised dense features of the answer: ``log(1 + words)`` of the answer and of the
  prompt and their difference, ``log(1 + numbers in the answer)``, whether the answer's last line
  holds a number (a final result, as in math answers), whether it ends with a GSM8K-style
  ``#### <number>``, whether it is empty.

That needs scikit-learn only, trains in well under a second on thousands of examples and
scores a request in about 0.1 ms. It is saved as arrays + JSON (no pickle) with
:meth:`AnswerScorer.save` and read back with :meth:`AnswerScorer.load`.

:func:`mean_logprob` reads the backend's token log-probabilities from an OpenAI answer when it
sent them, and :func:`combine_confidence` merges the two estimates: a weighted mean in logit
space, ``sigmoid((1 - w) logit(p_scorer) + w logit(exp(mean logprob)))``, with ``w`` the
``cascade.logprob_weight`` of the config (0: the scorer alone, 1: the logprobs alone); when only
one of the two exists it is used alone. ``exp(mean token logprob)`` is the geometric mean of the
token probabilities, a confidence in (0, 1]; it is not calibrated (a fluent wrong answer can be
confident), which is why the trained scorer keeps half the weight by default.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leanscale.cascade._shared import (
    STATE_VERSION,
    check_meta,
    finite_array,
    fit_logistic,
    meta_int,
    short,
    sklearn_text,
    texts_arg,
    tfidf_from_state,
    tfidf_state,
)
from leanscale.core.errors import InvalidParameterError
from leanscale.core.persistence import (
    Fitted,
    from_state_of_file,
    load_state,
    register_fitted,
)

__all__ = ["DENSE_FEATURES", "AnswerScorer", "combine_confidence", "mean_logprob"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM_FINAL = re.compile(r"####\s*\$?\s*-?\d[\d,]*(?:\.\d+)?\s*$")
DENSE_FEATURES = ("log_answer_words", "log_prompt_words", "log_length_ratio", "log_numbers", "final_number",
                  "gsm8k_final", "empty")


def dense_features(prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """``(n, len(DENSE_FEATURES))`` float64: the length and final-number features of each pair."""
    out = np.zeros((len(answers), len(DENSE_FEATURES)))
    for i, (p, a) in enumerate(zip(prompts, answers)):
        a = a.strip()
        wa, wp = math.log1p(len(a.split())), math.log1p(len(p.split()))
        lines = [ln for ln in a.splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        out[i] = (wa, wp, wa - wp, math.log1p(len(_NUMBER.findall(a))), float(bool(_NUMBER.search(last))),
                  float(bool(_GSM_FINAL.search(a))), float(not a))
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # overflow-free logistic


def _logit(p: float) -> float:
    p = min(1.0 - 1e-9, max(1e-9, float(p)))
    return math.log(p / (1.0 - p))


def mean_logprob(answer: Any) -> float | None:
    """The mean token log-probability of the first choice of an OpenAI answer (chat:
    ``choices[0].logprobs.content[*].logprob``; completions: ``choices[0].logprobs.token_logprobs``),
    or None when the backend sent none."""
    try:
        lp = answer["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(lp, dict):
        return None
    values: list[Any] = []
    if isinstance(lp.get("content"), list):
        values = [t.get("logprob") for t in lp["content"] if isinstance(t, dict)]
    elif isinstance(lp.get("token_logprobs"), list):
        values = lp["token_logprobs"]
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v <= 0]
    return sum(vals) / len(vals) if vals else None


def combine_confidence(p_scorer: float | None, logprob: float | None, weight: float) -> float | None:
    """The cascade's confidence that the answer is right (see the module docstring): the scorer's
    probability and ``exp(logprob)`` averaged in logit space with weight ``weight`` on the
    logprobs; the one that exists when the other is None; None when both are."""
    p_lp = None if logprob is None else math.exp(min(0.0, logprob))
    if p_scorer is None:
        return p_lp
    if p_lp is None:
        return float(p_scorer)
    z = (1.0 - weight) * _logit(p_scorer) + weight * _logit(p_lp)
    return float(_sigmoid(z))


@register_fitted("GatewayAnswerScorer")
class AnswerScorer(Fitted):
    """``P(the answer is correct | prompt, answer)``: logistic regression on TF-IDF of the prompt,
    TF-IDF of the answer and :data:`DENSE_FEATURES` (see the module docstring).

    Parameters:
        C: inverse L2 strength of the logistic regression.
        max_features: vocabulary size of each TF-IDF.
        ngram_range: n-gram lengths of each TF-IDF.
        seed: ``random_state`` of the logistic regression.

    Learned attributes (after :meth:`fit`): ``prompt_vectorizer_``, ``answer_vectorizer_``,
    ``dense_mean_`` / ``dense_scale_`` (standardisation), ``coef_`` (d,), ``intercept_``,
    ``base_rate_`` (training accuracy of the answers), ``converged_``.
    """

    def __init__(self, C: float = 1.0, max_features: int = 20_000, ngram_range: tuple[int, int] = (1, 2),
                 seed: int = 0):
        self.C, self.max_features, self.ngram_range, self.seed = C, max_features, ngram_range, seed

    def _check_params(self, owner: str) -> None:
        if isinstance(self.C, bool) or not isinstance(self.C, (int, float)) or not (math.isfinite(self.C)
                                                                                   and self.C > 0):
            raise InvalidParameterError(f"The 'C' parameter of {owner} must be a number > 0. Got {self.C!r}.")
        if isinstance(self.max_features, bool) or not isinstance(self.max_features, int) or self.max_features < 1:
            raise InvalidParameterError(
                f"The 'max_features' parameter of {owner} must be an int >= 1. Got {self.max_features!r}.")
        ng = self.ngram_range
        if (not isinstance(ng, (tuple, list)) or len(ng) != 2 or not all(type(v) is int for v in ng)
                or not 1 <= ng[0] <= ng[1] <= 4):
            raise InvalidParameterError(
                f"The 'ngram_range' parameter of {owner} must be (lo, hi) with 1 <= lo <= hi <= 4. Got {ng!r}.")

    def _pairs(self, prompts: Any, answers: Any, owner: str) -> tuple[list[str], list[str]]:
        prompts = texts_arg(prompts, owner, "prompts", min_len=0)
        answers = texts_arg(answers, owner, "answers", min_len=0)
        if len(prompts) != len(answers):
            raise InvalidParameterError(
                f"The parameters 'prompts' and 'answers' of {owner} must have the same length. Got "
                f"prompts={len(prompts)}, answers={len(answers)}.")
        return prompts, answers

    def _features(self, prompts: list[str], answers: list[str]):
        from scipy import sparse

        dense = (dense_features(prompts, answers) - self.dense_mean_) / self.dense_scale_
        return sparse.hstack([self.prompt_vectorizer_.transform(prompts), self.answer_vectorizer_.transform(answers),
                              sparse.csr_matrix(dense)], format="csr")

    def fit(self, prompts: Sequence[str], answers: Sequence[str], correct: Any) -> AnswerScorer:
        """Learn ``P(correct | prompt, answer)``; returns self.

        Args:
            prompts: the requests' prompts.
            answers: the cheap model's answers to them.
            correct: whether each answer was correct (bools or 0/1), as long as ``prompts``.
        """
        owner = "AnswerScorer.fit"
        self._check_params(owner)
        prompts, answers = self._pairs(prompts, answers, owner)
        if len(prompts) < 2:
            raise InvalidParameterError(f"{owner} needs at least 2 (prompt, answer) pairs. Got {len(prompts)}.")
        y = np.asarray(correct)
        if y.ndim != 1 or len(y) != len(prompts) or not (y.dtype.kind == "b" or (
                y.dtype.kind in "iuf" and np.isin(y, (0, 1)).all())):
            raise InvalidParameterError(
                f"The 'correct' parameter of {owner} must be a 1-d array of bools or 0/1 of length {len(prompts)} "
                f"(was each answer correct?). Got {short(correct)}.")
        y = y.astype(bool)
        TfidfVectorizer, LogisticRegression = sklearn_text()
        vecs = []
        for name, texts in (("prompts", prompts), ("answers", answers)):
            vec = TfidfVectorizer(max_features=self.max_features, ngram_range=tuple(self.ngram_range),
                                  sublinear_tf=True, min_df=1, dtype=np.float64)
            try:
                vec.fit(texts)
            except ValueError as exc:  # empty vocabulary
                raise InvalidParameterError(f"{owner} found no words in {name!r} ({exc}).") from None
            vecs.append(vec)
        self.prompt_vectorizer_, self.answer_vectorizer_ = vecs
        dense = dense_features(prompts, answers)
        self.dense_mean_ = dense.mean(axis=0)
        scale = dense.std(axis=0)
        self.dense_scale_ = np.where(scale > 1e-12, scale, 1.0)
        X = self._features(prompts, answers)
        k, n = int(y.sum()), len(y)
        self.base_rate_ = k / n
        if 0 < k < n:
            lr, self.converged_ = fit_logistic(LogisticRegression, X, y.astype(np.int64), C=float(self.C),
                                               solver="lbfgs", max_iter=1000, random_state=self.seed)
            self.coef_, self.intercept_ = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        else:  # always or never right: a constant, smoothed away from 0 and 1
            self.coef_, self.intercept_, self.converged_ = np.zeros(X.shape[1]), _logit((k + 0.5) / (n + 1)), True
        return self

    def predict_proba(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``P(correct)`` of each (prompt, answer) pair: a float64 array of shape (n,)."""
        if not hasattr(self, "coef_"):
            raise InvalidParameterError("This AnswerScorer is not fitted yet; call fit() or load() first.")
        prompts, answers = self._pairs(prompts, answers, "AnswerScorer.predict_proba")
        if not prompts:
            return np.zeros(0)
        return _sigmoid(np.asarray(self._features(prompts, answers) @ self.coef_).ravel() + self.intercept_)

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: parameters and both TF-IDF vocabularies (JSON), weights (float64)."""
        if not hasattr(self, "coef_"):
            raise InvalidParameterError("This AnswerScorer is not fitted yet; nothing to save.")
        tf_p, idf_p = tfidf_state(self.prompt_vectorizer_)
        tf_a, idf_a = tfidf_state(self.answer_vectorizer_)
        meta = {"class": "GatewayAnswerScorer", "version": STATE_VERSION,
                "params": {"C": float(self.C), "max_features": int(self.max_features),
                           "ngram_range": list(self.ngram_range), "seed": int(self.seed)},
                "prompt_tfidf": tf_p, "answer_tfidf": tf_a, "dense_features": list(DENSE_FEATURES),
                "n_features_in": int(len(self.coef_)), "base_rate": float(self.base_rate_),
                "converged": bool(self.converged_)}
        arrays = {"coef": np.asarray(self.coef_, dtype=np.float64), "intercept": np.asarray([self.intercept_]),
                  "idf_prompt": idf_p, "idf_answer": idf_a, "dense_mean": self.dense_mean_.astype(np.float64),
                  "dense_scale": self.dense_scale_.astype(np.float64)}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> AnswerScorer:
        """Rebuild a fitted scorer from :meth:`get_state` (identical predictions)."""
        owner = "AnswerScorer.from_state"
        arrays = check_meta(meta, arrays, "GatewayAnswerScorer",
                            ("coef", "intercept", "idf_prompt", "idf_answer", "dense_mean", "dense_scale"))
        params = meta.get("params")
        if not isinstance(params, Mapping) or set(params) != {"C", "max_features", "ngram_range", "seed"}:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has malformed 'params' {short(params)}.")
        if list(meta.get("dense_features") or []) != list(DENSE_FEATURES):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} was saved with the dense features {short(meta.get('dense_features'))}; "
                f"this leanscale computes {list(DENSE_FEATURES)}.")
        self = cls(C=params["C"], max_features=params["max_features"], ngram_range=tuple(params["ngram_range"]),
                   seed=params["seed"])
        self._check_params(owner)
        self.prompt_vectorizer_ = tfidf_from_state(meta.get("prompt_tfidf"), arrays["idf_prompt"], owner)
        self.answer_vectorizer_ = tfidf_from_state(meta.get("answer_tfidf"), arrays["idf_answer"], owner)
        d = meta_int(meta, "n_features_in", owner, 1, 1 << 24)
        k = len(DENSE_FEATURES)
        expected = len(self.prompt_vectorizer_.vocabulary) + len(self.answer_vectorizer_.vocabulary) + k
        if d != expected:
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} is inconsistent: {d} features for {expected} vocabulary terms and "
                "dense features.")
        self.coef_ = finite_array(arrays, "coef", (d,), owner).astype(np.float64)
        self.intercept_ = float(finite_array(arrays, "intercept", (1,), owner)[0])
        self.dense_mean_ = finite_array(arrays, "dense_mean", (k,), owner).astype(np.float64)
        self.dense_scale_ = finite_array(arrays, "dense_scale", (k,), owner).astype(np.float64)
        if (self.dense_scale_ <= 0).any():
            raise InvalidParameterError(f"The 'arrays' parameter of {owner} has a dense_scale <= 0.")
        base = meta.get("base_rate")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 <= base <= 1:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has a malformed 'base_rate' {short(base)}.")
        self.base_rate_ = float(base)
        self.converged_ = bool(meta.get("converged", True))
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerScorer:
        """Rebuild a scorer saved with :meth:`save` (errors in the files name the folder)."""
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays)
