"""The cascade's quality estimator: "is the cheap model's answer to this prompt correct?".

:class:`AnswerScorer` is FrugalGPT's answer scorer (Chen, Zaharia and Zou 2023, "FrugalGPT: How to
Use Large Language Models While Reducing Cost and Improving Performance", arXiv 2305.05176): a
model of ``P(correct | prompt, answer)`` trained on logged (prompt, cheap answer, was it correct)
triples. FrugalGPT fine-tunes a small DistilBERT; here it is a logistic regression on

* word uni+bigram TF-IDF of the prompt and, with a vocabulary of its own, of the answer
  (sublinear tf), so the words of hard questions and of hedging or broken answers both count;
* standardised dense features of the answer (:data:`ALL_FEATURES`): lengths (``log(1 + words)``
  of answer and prompt and their difference, lines, numbers), the final number (after GSM8K's
  ``####`` or the last one: present, integer, negative, size, equal to the last computed result,
  copied from the prompt), the **arithmetic check** -- every ``a op b = c`` equality of the answer
  (chains, GSM8K ``<<a*b=c>>`` annotations) evaluated with a tiny safe parser
  (:func:`evaluate_arithmetic`, no ``eval``) and compared up to the rounding written
  (:func:`check_arithmetic`: how many, how many false) --, the share of the prompt's numbers
  the answer uses, hedging words, whether it ends cleanly.

Chosen by cross-validation on the train half of the GSM8K benchmark split
(``benchmarks/gateway/scorer_study.py``): the math features lift the out-of-fold AUC from 0.72
(TF-IDF + length features, the first scorer) to about 0.82; MiniLM embeddings of prompt and
answer add nothing over them (and cost ~45 ms of CPU per text) and gradient-boosted trees
(``HistGradientBoostingClassifier``) do worse than the logistic regression on 659 examples, so
the scorer stays linear and is saved as arrays + JSON (no pickle, no skops) with
:meth:`AnswerScorer.save` / :meth:`AnswerScorer.load` (``meta["scorer_version"]``
:data:`SCORER_VERSION`; files of the first scorer, version 1, still load). It trains in about a
second on ~700 examples and scores a request in about 0.3-0.5 ms on one CPU core, computed per
pair without sparse matrices (it runs on the gateway's event loop).

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

__all__ = ["ALL_FEATURES", "DENSE_FEATURES", "DENSE_FEATURES_V1", "SCORER_VERSION", "AnswerScorer",
           "answer_features", "check_arithmetic", "combine_confidence", "evaluate_arithmetic", "final_answer",
           "mean_logprob"]

# -- answer features --------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM_FINAL = re.compile(r"####\s*\$?\s*-?\d[\d,]*(?:\.\d+)?\s*$")
_FINAL_MARK = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")
_CALC = re.compile(r"<<([^<>]{1,200})>>")  # GSM8K's calculator annotations <<a*b=c>>
_TIMES = re.compile(r"(?<=[\d)\s])[x\u00d7](?=\s*[\d($])")  # "9 x 2", "9×2" as a product
# a run of arithmetic: numbers, operators, parentheses, $, %, '=' and spaces (no newline)
_ARITH_RUN = re.compile(r"[\d.,$%()+\-*/\u00f7\u2212= \t]+")
_ARITH_TOKEN = re.compile(r"[ \t]*(?:(\d[\d,]*(?:\.\d+)?|\.\d+)|([-+*/()%]))")
_HEDGES = re.compile(r"\b(?:however|assum\w*|approximately|approx|about|around|round\w*|estimat\w*|cannot|can't|"
                     r"not possible|impossible|unclear|not enough|actually|wait|mistake|sorry|maybe|perhaps|"
                     r"might|probably|let's say|if we|doesn't make sense)\b", re.IGNORECASE)
_MAX_ARITH_CHARS = 400  # longer runs are not checked (bounded work per request)

#: every dense feature this version computes, in this order (a saved scorer names the ones it uses)
ALL_FEATURES = (
    # format 1 (the first scorer's features)
    "log_answer_words", "log_prompt_words", "log_length_ratio", "log_numbers", "final_number", "gsm8k_final",
    "empty",
    # format 2: the structure of a math answer
    "log_lines", "log_equations", "log_wrong_equations", "any_wrong_equation", "share_wrong_equations",
    "final_integer", "final_negative", "log_abs_final", "final_is_last_result", "final_differs_from_last_result",
    "prompt_numbers_used", "final_in_prompt", "log_hedges", "ends_cleanly",
)
#: the features of the first saved format (``scorer_version`` 1), kept readable
DENSE_FEATURES_V1 = ALL_FEATURES[:7]
DENSE_FEATURES = ALL_FEATURES  # the default of new scorers


def _arith_tokens(text: str) -> list | None:
    """``[("n", value) | ("o", op)]`` of an arithmetic text, or None when it holds anything else."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] in " \t$":
            i += 1
            continue
        m = _ARITH_TOKEN.match(text, i)
        if m is None:
            return None
        if m.group(1) is not None:
            num = m.group(1).replace(",", "")
            try:
                out.append(("n", float(num)))
            except ValueError:  # "1,2.3.4"
                return None
        else:
            out.append(("o", m.group(2)))
        i = m.end()
    return out


def _parse(tokens: list, percent: bool) -> float:
    """Evaluate ``tokens`` (``+ - * /``, parentheses, unary minus, postfix ``%``): a recursive
    descent parser over the usual precedence; ValueError / ZeroDivisionError on a bad expression."""
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def factor() -> float:
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ValueError("expression ends early")
        pos += 1
        if tok == ("o", "-"):
            return -factor()
        if tok == ("o", "+"):
            return factor()
        if tok == ("o", "("):
            v = expr()
            if peek() != ("o", ")"):
                raise ValueError("unbalanced parenthesis")
            pos += 1
        elif tok[0] == "n":
            v = tok[1]
        else:
            raise ValueError(f"unexpected {tok[1]!r}")
        while peek() == ("o", "%"):
            pos += 1
            if percent:
                v /= 100.0
        return v

    def term() -> float:
        nonlocal pos
        v = factor()
        while (tok := peek()) in (("o", "*"), ("o", "/")):
            pos += 1
            r = factor()
            v = v * r if tok[1] == "*" else v / r
        return v

    def expr() -> float:
        nonlocal pos
        v = term()
        while (tok := peek()) in (("o", "+"), ("o", "-")):
            pos += 1
            r = term()
            v = v + r if tok[1] == "+" else v - r
        return v

    v = expr()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return v


def evaluate_arithmetic(text: str, percent: bool = True) -> float | None:
    """The value of an arithmetic expression -- numbers (``1,200``, ``3.5``, ``$2``), ``+ - * /``,
    ``x`` / ``×`` / ``÷`` between numbers, parentheses, unary minus, postfix ``%`` (``/ 100`` when
    ``percent``, else ignored) -- or None when ``text`` is anything else or does not evaluate
    (division by zero, overflow). A tiny parser: no ``eval``, bounded by the text's length."""
    if len(text) > _MAX_ARITH_CHARS:
        return None
    text = _TIMES.sub("*", text.replace("\u00f7", "/").replace("\u2212", "-").replace("\u00d7", "*"))
    tokens = _arith_tokens(text)
    if not tokens:
        return None
    try:
        v = _parse(tokens, percent)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return v if math.isfinite(v) else None


def _decimals(text: str) -> int:
    """The most decimals of a number written in ``text`` (the precision it was rounded to)."""
    return max((len(m) - 1 for m in re.findall(r"\.\d+", text)), default=0)


def _equal_as_written(lhs: float, rhs: float, rhs_text: str) -> bool:
    """Whether ``lhs`` equals ``rhs`` up to the rounding of the digits written in ``rhs_text``:
    half a unit for a whole number (``2.5 = 3`` rounded up is equal, ``85 + 17 = 101`` is not), one
    unit of the last decimal written otherwise (``250/3 = 83.33``, truncated ``2/3 = 0.66``)."""
    k = _decimals(rhs_text)
    tol = (0.5 if k == 0 else 10.0 ** -k) + 1e-9 * max(1.0, abs(lhs))
    return abs(lhs - rhs) <= tol


def _has_operator(tokens: list) -> bool:
    return any(t[0] == "o" and t[1] in "+-*/" for t in tokens[1:])  # a leading "-" is a sign


def check_arithmetic(answer: str) -> tuple[int, int, float | None]:
    """``(checked, wrong, last_result)``: the ``a op b = c`` equalities of ``answer`` (chains
    ``a = b = c`` give one per ``=``; GSM8K ``<<a*b=c>>`` annotations too) in which at least one
    side has an operator and both sides evaluate; how many of them are false (both with ``%`` as
    ``/ 100`` and ignored, up to the rounding of the right side's digits); the value right of the
    last checked ``=`` (None when none)."""
    calcs = _CALC.findall(answer)
    text = _CALC.sub(" ", answer)
    runs: list[str] = list(calcs)
    for line in _TIMES.sub("*", text.replace("\u00d7", "*")).splitlines():
        runs.extend(m.group(0) for m in _ARITH_RUN.finditer(line) if "=" in m.group(0))
    checked = wrong = 0
    last = None
    for run in runs:
        parts = run.split("=")
        if len(parts) < 2 or len(run) > _MAX_ARITH_CHARS:
            continue
        parts[0] = parts[0].lstrip(" \t.,)")  # a run may start after a word ("is 3 + 4 = 7", "(so 3 + 4 = 7")
        parts[-1] = parts[-1].rstrip(" \t.,(")
        for left, right in zip(parts, parts[1:]):
            lt, rt = _arith_tokens(left), _arith_tokens(right)
            if not lt or not rt or not (_has_operator(lt) or _has_operator(rt)):
                continue
            ok = None
            for percent in ((True, False) if "%" in left or "%" in right else (True,)):
                a, b = evaluate_arithmetic(left, percent), evaluate_arithmetic(right, percent)
                if a is None or b is None:
                    continue
                ok = bool(ok) or _equal_as_written(a, b, right)
                last = b
            if ok is None:
                continue
            checked += 1
            wrong += not ok
    return checked, wrong, last


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(answer: str) -> float | None:
    """The answer's final number: after the last ``####`` when there is one, else the last number."""
    marks = _FINAL_MARK.findall(answer)
    if marks:
        return _number(marks[-1])
    nums = _NUMBER.findall(_CALC.sub(" ", answer))
    return _number(nums[-1]) if nums else None


def _numbers(text: str) -> set[float]:
    out = set()
    for m in _NUMBER.findall(text):
        v = _number(m.lstrip("-"))
        if v is not None:
            out.add(v)
    return out


def answer_features(prompt: str, answer: str) -> list[float]:
    """The :data:`ALL_FEATURES` of one (prompt, answer) pair (a list of floats, that order)."""
    a = answer.strip()
    wa, wp = math.log1p(len(a.split())), math.log1p(len(prompt.split()))
    lines = [ln for ln in a.splitlines() if ln.strip()]
    last_line = lines[-1] if lines else ""
    checked, wrong, last = check_arithmetic(a)
    final = final_answer(a)
    p_nums = _numbers(prompt)
    a_nums = _numbers(_CALC.sub(" ", a))
    has_final = final is not None
    same_last = has_final and last is not None and abs(final - last) < 1e-6 * max(1.0, abs(final))
    return [
        wa, wp, wa - wp, math.log1p(len(_NUMBER.findall(a))), float(bool(_NUMBER.search(last_line))),
        float(bool(_GSM_FINAL.search(a))), float(not a),
        math.log1p(len(lines)), math.log1p(checked), math.log1p(wrong), float(wrong > 0),
        wrong / checked if checked else 0.0,
        float(has_final and final == round(final)), float(has_final and final < 0),
        math.log1p(abs(final)) if has_final else 0.0,
        float(same_last), float(has_final and last is not None and not same_last),
        len(p_nums & a_nums) / len(p_nums) if p_nums else 1.0,
        float(has_final and abs(final) in p_nums),
        math.log1p(len(_HEDGES.findall(a))),
        float(bool(a) and (a[-1] in ".!?)" or bool(_GSM_FINAL.search(a)))),
    ]


def dense_features(prompts: Sequence[str], answers: Sequence[str],
                   names: Sequence[str] = DENSE_FEATURES) -> np.ndarray:
    """``(n, len(names))`` float64: the named features (of :data:`ALL_FEATURES`) of each pair."""
    cols = [ALL_FEATURES.index(n) for n in names]
    out = np.zeros((len(answers), len(cols)))
    for i, (p, a) in enumerate(zip(prompts, answers)):
        out[i] = np.asarray(answer_features(p, a))[cols]
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


#: the version of the scorer's saved meta (``meta["scorer_version"]``; absent = 1): 1 = the first
#: scorer (TF-IDF + :data:`DENSE_FEATURES_V1`), 2 = any subset of :data:`ALL_FEATURES`, named in
#: ``meta["dense_features"]``. Both load; a newer version is refused with a message saying so.
SCORER_VERSION = 2
_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern (the only one saved)


class _LinearTfidf:
    """``coef . tfidf(text)`` of one fitted TfidfVectorizer, computed directly from the text:
    scikit-learn's word analyzer (lowercase, ``(?u)\\b\\w\\w+\\b``, n-grams), (sublinear) term
    counts, idf and the l1/l2 norm over the vocabulary's terms -- the same number as
    ``vectorizer.transform([text]) @ coef`` without building a sparse matrix (about 20x faster
    for one text, which is what the gateway scores on its event loop)."""

    def __init__(self, vectorizer: Any, coef: np.ndarray):
        vocab = vectorizer.vocabulary_ if hasattr(vectorizer, "vocabulary_") else vectorizer.vocabulary
        idf = np.asarray(vectorizer.idf_, dtype=np.float64) if vectorizer.use_idf else np.ones(len(vocab))
        self.terms = {t: (float(idf[j]), float(coef[j])) for t, j in vocab.items()}
        self.lo, self.hi = vectorizer.ngram_range
        self.lowercase, self.sublinear, self.norm = vectorizer.lowercase, vectorizer.sublinear_tf, vectorizer.norm

    def __call__(self, text: str) -> float:
        tokens = _TOKEN.findall(text.lower() if self.lowercase else text)
        counts: dict[str, int] = {}
        terms = self.terms
        for n in range(self.lo, self.hi + 1):
            for i in range(len(tokens) - n + 1):
                g = tokens[i] if n == 1 else " ".join(tokens[i:i + n])
                if g in terms:
                    counts[g] = counts.get(g, 0) + 1
        dot = total = 0.0
        for g, c in counts.items():
            idf, w = terms[g]
            v = (1.0 + math.log(c) if self.sublinear else float(c)) * idf
            dot += v * w
            total += v * v if self.norm == "l2" else abs(v)
        if self.norm is None or total == 0.0:
            return dot
        return dot / (math.sqrt(total) if self.norm == "l2" else total)


@register_fitted("GatewayAnswerScorer")
class AnswerScorer(Fitted):
    """``P(the answer is correct | prompt, answer)``: logistic regression on TF-IDF of the prompt,
    TF-IDF of the answer and the named dense features (see the module docstring).

    Parameters:
        C: inverse L2 strength of the logistic regression.
        max_features: vocabulary size of each TF-IDF.
        ngram_range: n-gram lengths of each TF-IDF.
        seed: ``random_state`` of the logistic regression.
        dense_features: names from :data:`ALL_FEATURES` (None: all of them, :data:`DENSE_FEATURES`;
            :data:`DENSE_FEATURES_V1` is the first scorer's set).

    Learned attributes (after :meth:`fit`): ``prompt_vectorizer_``, ``answer_vectorizer_``,
    ``dense_mean_`` / ``dense_scale_`` (standardisation), ``coef_`` (d,), ``intercept_``,
    ``base_rate_`` (training accuracy of the answers), ``converged_``, ``dense_features_`` (names).
    """

    def __init__(self, C: float = 1.0, max_features: int = 20_000, ngram_range: tuple[int, int] = (1, 2),
                 seed: int = 0, dense_features: Sequence[str] | None = None):
        self.C, self.max_features, self.ngram_range, self.seed = C, max_features, ngram_range, seed
        self.dense_features = dense_features

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
        self._dense_names(owner)

    def _dense_names(self, owner: str) -> tuple[str, ...]:
        names = self.dense_features
        if names is None:
            return DENSE_FEATURES
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise InvalidParameterError(
                f"The 'dense_features' parameter of {owner} must be None or a list of feature names. Got "
                f"{short(names)}.")
        unknown = [n for n in names if n not in ALL_FEATURES]
        if unknown or len(set(names)) != len(names):
            raise InvalidParameterError(
                f"The 'dense_features' parameter of {owner} must list distinct names of {list(ALL_FEATURES)}. Got "
                f"{short(list(names))}" + (f" (unknown: {unknown})." if unknown else " (repeated names)."))
        return tuple(names)

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

        dense = (dense_features(prompts, answers, self.dense_features_) - self.dense_mean_) / self.dense_scale_
        return sparse.hstack([self.prompt_vectorizer_.transform(prompts), self.answer_vectorizer_.transform(answers),
                              sparse.csr_matrix(dense)], format="csr")

    def _prepare(self) -> None:
        """The per-request scorers: the linear TF-IDF terms of each text and the dense weights."""
        n_p, n_a = len(self._vocab(self.prompt_vectorizer_)), len(self._vocab(self.answer_vectorizer_))
        self._score_prompt = _LinearTfidf(self.prompt_vectorizer_, self.coef_[:n_p])
        self._score_answer = _LinearTfidf(self.answer_vectorizer_, self.coef_[n_p:n_p + n_a])
        self._cols = [ALL_FEATURES.index(n) for n in self.dense_features_]
        # (x - mean) / scale . w = x . (w / scale) - mean . (w / scale)
        w = self.coef_[n_p + n_a:] / self.dense_scale_
        self._dense_w, self._offset = w, self.intercept_ - float(self.dense_mean_ @ w)

    @staticmethod
    def _vocab(vec: Any) -> Mapping[str, int]:
        return vec.vocabulary_ if hasattr(vec, "vocabulary_") else vec.vocabulary

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
        self.dense_features_ = self._dense_names(owner)
        dense = dense_features(prompts, answers, self.dense_features_)
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
        self._prepare()
        return self

    def predict_proba(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """``P(correct)`` of each (prompt, answer) pair: a float64 array of shape (n,).

        Computed per pair without sparse matrices (:class:`_LinearTfidf`); equal to
        ``sigmoid(features @ coef_ + intercept_)`` up to float rounding."""
        if not hasattr(self, "coef_"):
            raise InvalidParameterError("This AnswerScorer is not fitted yet; call fit() or load() first.")
        prompts, answers = self._pairs(prompts, answers, "AnswerScorer.predict_proba")
        z = np.empty(len(prompts))
        for i, (p, a) in enumerate(zip(prompts, answers)):
            feats = answer_features(p, a)
            dense = sum(w * feats[j] for w, j in zip(self._dense_w, self._cols))
            z[i] = self._score_prompt(p) + self._score_answer(a) + dense + self._offset
        return _sigmoid(z)

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: parameters, both TF-IDF vocabularies and the dense features' names
        (JSON, ``scorer_version`` :data:`SCORER_VERSION`), weights (float64)."""
        if not hasattr(self, "coef_"):
            raise InvalidParameterError("This AnswerScorer is not fitted yet; nothing to save.")
        tf_p, idf_p = tfidf_state(self.prompt_vectorizer_)
        tf_a, idf_a = tfidf_state(self.answer_vectorizer_)
        meta = {"class": "GatewayAnswerScorer", "version": STATE_VERSION, "scorer_version": SCORER_VERSION,
                "params": {"C": float(self.C), "max_features": int(self.max_features),
                           "ngram_range": list(self.ngram_range), "seed": int(self.seed)},
                "prompt_tfidf": tf_p, "answer_tfidf": tf_a, "dense_features": list(self.dense_features_),
                "n_features_in": int(len(self.coef_)), "base_rate": float(self.base_rate_),
                "converged": bool(self.converged_)}
        arrays = {"coef": np.asarray(self.coef_, dtype=np.float64), "intercept": np.asarray([self.intercept_]),
                  "idf_prompt": idf_p, "idf_answer": idf_a, "dense_mean": self.dense_mean_.astype(np.float64),
                  "dense_scale": self.dense_scale_.astype(np.float64)}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> AnswerScorer:
        """Rebuild a fitted scorer from :meth:`get_state` (identical predictions). Reads
        ``scorer_version`` 1 (the first scorer, no such key) and 2; a newer one is refused."""
        owner = "AnswerScorer.from_state"
        arrays = check_meta(meta, arrays, "GatewayAnswerScorer",
                            ("coef", "intercept", "idf_prompt", "idf_answer", "dense_mean", "dense_scale"))
        version = meta.get("scorer_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCORER_VERSION:
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} has scorer_version {short(version)}; this leanscale reads scorer "
                f"versions 1 to {SCORER_VERSION} (a newer leanscale saved it: upgrade leanscale, or retrain the "
                "scorer with `leanscale gateway train` / train_scorer).")
        params = meta.get("params")
        if not isinstance(params, Mapping) or set(params) != {"C", "max_features", "ngram_range", "seed"}:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has malformed 'params' {short(params)}.")
        names = meta.get("dense_features")
        if version == 1 and list(names or []) != list(DENSE_FEATURES_V1):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} (scorer_version 1) was saved with the dense features "
                f"{short(names)}; scorer_version 1 has {list(DENSE_FEATURES_V1)}.")
        self = cls(C=params["C"], max_features=params["max_features"], ngram_range=tuple(params["ngram_range"]),
                   seed=params["seed"], dense_features=names if isinstance(names, list) else short(names))
        self._check_params(owner)
        self.dense_features_ = self._dense_names(owner)
        self.prompt_vectorizer_ = tfidf_from_state(meta.get("prompt_tfidf"), arrays["idf_prompt"], owner)
        self.answer_vectorizer_ = tfidf_from_state(meta.get("answer_tfidf"), arrays["idf_answer"], owner)
        d = meta_int(meta, "n_features_in", owner, 1, 1 << 24)
        k = len(self.dense_features_)
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
        self._prepare()
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerScorer:
        """Rebuild a scorer saved with :meth:`save` (errors in the files name the folder)."""
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays)
