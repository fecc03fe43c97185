"""Mine high-precision keyword rules from labelled text, for the first (regex) stage of a cascade.

:func:`mine_rules` turns ``(texts, labels)`` into a short, readable list of rules such as
``\\brefund\\b -> billing`` that a :class:`~leanscale.cascade.stages.RegexStage` runs in front of
the models, answering the easy requests for almost nothing.

Algorithm
---------
1. Each text (cut to the regex stage's ``max_length``) is lowercased (``lowercase=True``) and
   split into tokens with ``\\b\\w\\w+\\b``. The n-grams with ``n`` in ``ngram_range`` are runs of
   tokens separated only by whitespace (so each n-gram is exactly what its pattern
   ``\\bw1\\s+w2\\b`` can match); an n-gram holding a stop word is dropped. Each document counts
   once per n-gram.
2. Per n-gram: its support (documents holding it) and its count per label. The candidate rule is
   ``n-gram -> majority label``, with ``precision = k / n`` (``k`` documents of that label among
   ``n``).
3. A candidate is kept only when ``n >= min_support`` and the one-sided lower confidence bound of
   its precision, the Clopper-Pearson bound ``Beta^-1(1 - confidence; k, n - k + 1)`` (0 when
   ``k = 0``), is ``>= min_precision``.
4. Candidates are ordered by (lower bound, support), both descending, shorter n-grams first on
   ties, and taken greedily up to ``max_rules``. Each is checked with the pattern itself, on the
   same engine as the stage (RE2's ``\\b`` and ``\\s`` are ASCII-only, so a token starting or
   ending with a non-ASCII letter can match less or more than its token did): the bound is
   recomputed on the documents the pattern matches and, with ``prune_redundant=True``, also on
   the documents it would *answer* in the stage -- those not already taken by an earlier rule,
   since the first matching pattern wins. A rule failing either check is dropped; so is a rule
   left with fewer than ``min_support`` documents of its own (it is redundant).

Why a lower bound rather than the empirical precision. Among thousands of n-grams, many rare ones
are "100 % precise" by chance (a word seen in 3 documents, all of one label); selecting on the
empirical precision picks exactly those, and their precision on new data is much lower (the
winner's curse). The Clopper-Pearson bound is exact for a binomial proportion: a rule whose true
precision is below ``min_precision`` passes with probability at most ``1 - confidence``. A rule
with no error needs about ``log(1 - confidence) / log(min_precision)`` documents to pass (149 at
the defaults), and a rule with a few errors proportionally more. The bound is per rule -- with many
candidates a few borderline rules can still slip through -- but on held-out data the mined rules
keep (nearly) the precision asked for, which the empirical precision does not.

The reported ``support``, ``precision`` and ``precision_lower_bound`` of a rule are measured on the
training documents it answers in the stage (all those it matches when ``prune_redundant=False``);
:func:`evaluate_rules` measures the same quantities on any (held-out) data. ``MinedRules`` saves to
a JSON-able dict (:meth:`MinedRules.to_dict`), no pickle involved.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanscale.cascade.stages import RegexStage
from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.validation import (
    Interval,
    Options,
    check_consistent_length,
    check_labels,
    check_param,
    check_texts,
)

__all__ = ["MinedRules", "evaluate_rules", "mine_rules"]  # re-exported by leanscale.cascade (precision_lower_bound: here)

_TOKEN = re.compile(r"\b\w\w+\b")
_MAX_LENGTH = 10_000  # RegexStage's default max_length: mining sees what the stage will see
_FORMAT = "leanscale.mined_rules"
_VERSION = 1


def precision_lower_bound(k, n, confidence: float = 0.95):
    """One-sided Clopper-Pearson lower bound of a proportion ``k / n`` at level ``confidence``.

    Vectorised over ``k`` and ``n``; 0 where ``k == 0`` (and where ``n == 0``).
    """
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    ok = (k > 0) & (n > 0)
    a = np.where(ok, k, 1.0)
    b = np.where(ok, n - k + 1.0, 1.0)
    lb = np.where(ok, beta.ppf(1.0 - confidence, a, b), 0.0)
    return lb if lb.ndim else float(lb)


def _pattern(words: Sequence[str]) -> str:
    return r"\b" + r"\s+".join(re.escape(w) for w in words) + r"\b"


def _is_label(v: Any) -> bool:
    return isinstance(v, (str, int, bool)) or (isinstance(v, float) and math.isfinite(v))


def _native(label: Any) -> Any:
    return label.item() if isinstance(label, np.generic) else label


@dataclass
class MinedRules:
    """Rules learned by :func:`mine_rules`, in the order the regex stage tries them.

    ``rules``: one dict per rule with ``pattern``, ``label``, ``token`` (the n-gram), ``support``,
    ``precision``, ``precision_lower_bound`` (on the training documents the rule answers) and
    ``n_matched`` (training documents its pattern matches). ``lowercase``: whether matching is
    case-insensitive. ``params``: the mining parameters, for the record.
    """

    rules: list[dict] = field(default_factory=list)
    lowercase: bool = True
    params: dict = field(default_factory=dict)

    @property
    def patterns(self) -> list[tuple[str, Any]]:
        """``[(pattern, label), ...]``, the argument of :class:`RegexStage`."""
        return [(r["pattern"], r["label"]) for r in self.rules]

    def __len__(self) -> int:
        return len(self.rules)

    def to_stage(self, name: str = "rules", cost: float | None = None, **kwargs) -> RegexStage:
        """A :class:`RegexStage` answering with these rules (first match wins, confidence 1).

        ``kwargs`` go to :class:`RegexStage` (``engine``, ``timeout``, ...); matching is
        case-insensitive when the rules were mined with ``lowercase=True``.
        """
        if not self.rules:
            raise InvalidParameterError(
                "The rules of MinedRules are empty: no n-gram reached the requested precision with "
                "enough support. Lower 'min_precision' or 'min_support', or mine on more data."
            )
        kwargs.setdefault("ignore_case", self.lowercase)
        return RegexStage(self.patterns, name=name, cost=cost, **kwargs)

    def to_dict(self) -> dict:
        """A JSON-able dict (labels must be JSON-able themselves); :meth:`from_dict` reads it back."""
        rules = [{k: _native(v) for k, v in r.items()} for r in self.rules]
        return {"format": _FORMAT, "version": _VERSION, "lowercase": bool(self.lowercase),
                "params": dict(self.params), "rules": rules}

    @classmethod
    def from_dict(cls, data: dict) -> MinedRules:
        """Rebuild from :meth:`to_dict`'s output (e.g. after ``json.load``)."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidParameterError(
                f"The 'data' parameter of MinedRules.from_dict must be a dict written by MinedRules.to_dict "
                f"(format {_FORMAT!r}). Got {type(data).__name__}"
                + (f" with format {data.get('format')!r}" if isinstance(data, dict) else "") + " instead."
            )
        if data.get("version") != _VERSION:
            raise InvalidParameterError(
                f"The 'data' parameter of MinedRules.from_dict has version {data.get('version')!r}; "
                f"this leanscale reads version {_VERSION}."
            )
        rules = data.get("rules")
        if not isinstance(rules, list) or not all(
            isinstance(r, dict) and isinstance(r.get("pattern"), str) and _is_label(r.get("label")) for r in rules
        ):
            shown = repr(rules)
            raise InvalidParameterError(
                "The 'data' parameter of MinedRules.from_dict must hold 'rules': a list of dicts with a "
                "'pattern' string and a 'label' (a string, an integer, a finite number or a boolean). Got "
                f"{shown[:200] + ('...' if len(shown) > 200 else '')} instead."
            )
        lowercase = data.get("lowercase", True)
        params = data.get("params", {})
        if not isinstance(lowercase, bool):
            raise InvalidParameterError(
                f"The 'data' parameter of MinedRules.from_dict must have 'lowercase' true or false. Got {lowercase!r}.")
        if not isinstance(params, dict):
            raise InvalidParameterError(
                f"The 'data' parameter of MinedRules.from_dict must have 'params', a dict. Got {type(params).__name__}.")
        return cls(rules=[dict(r) for r in rules], lowercase=lowercase, params=dict(params))

    def explain(self) -> str:
        """A table, one rule per line, in the order they are tried."""
        if not self.rules:
            return "no rules (nothing reached the requested precision with enough support)"
        head = ("#", "n-gram", "label", "support", "precision", "lower bound")
        rows = [
            (str(i), str(r.get("token", r["pattern"])), str(r["label"]), str(r.get("support", "")),
             _fmt(r.get("precision")), _fmt(r.get("precision_lower_bound")))
            for i, r in enumerate(self.rules, 1)
        ]
        widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(head)]
        left = (False, True, True, False, False, False)

        def line(cells):
            return "  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(cells, widths, left)).rstrip()

        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in rows]
        p = self.params
        if p:
            out.append(
                f"({len(self.rules)} rules; precision lower bound >= {p.get('min_precision')} at confidence "
                f"{p.get('confidence')}, support >= {p.get('min_support')}, mined on {p.get('n_documents')} documents)"
            )
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"MinedRules({len(self.rules)} rules, lowercase={self.lowercase})"


def _fmt(x) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------------------------ validation

def _check_label_values(labels: Any, owner: str) -> list:
    arr = check_labels("labels", labels, owner=owner)
    out = [_native(v) for v in arr.tolist()]
    for i, v in enumerate(out):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must not contain missing labels (None abstains in a "
                f"stage). Got {v!r} at index {i}."
            )
    return out


def _check_ngram_range(ngram_range: Any) -> tuple[int, int]:
    ok = (
        isinstance(ngram_range, (tuple, list)) and len(ngram_range) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ngram_range)
        and 1 <= ngram_range[0] <= ngram_range[1]
    )
    if not ok:
        raise InvalidParameterError(
            "The 'ngram_range' parameter of mine_rules must be a pair of ints (min_n, max_n) with "
            f"1 <= min_n <= max_n. Got {ngram_range!r} instead."
        )
    return int(ngram_range[0]), int(ngram_range[1])


def _check_stop_words(stop_words: Any) -> frozenset:
    if stop_words is None:
        return frozenset()
    if isinstance(stop_words, str) and stop_words == "english":
        try:
            from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        except ImportError:
            raise MissingDependencyError(
                "stop_words='english' uses scikit-learn's list: pip install 'leanscale[cascade]', "
                "or pass your own collection of words."
            ) from None
        return frozenset(ENGLISH_STOP_WORDS)
    if isinstance(stop_words, (str, bytes)) or not hasattr(stop_words, "__iter__"):
        raise InvalidParameterError(
            "The 'stop_words' parameter of mine_rules must be None, 'english' or a collection of strings. "
            f"Got {stop_words!r} instead."
        )
    words = list(stop_words)
    if not all(isinstance(w, str) for w in words):
        raise InvalidParameterError(
            "The 'stop_words' parameter of mine_rules must be None, 'english' or a collection of strings. "
            f"Got {stop_words!r} instead."
        )
    return frozenset(words)


# ---------------------------------------------------------------------------------------- mining

def _ngrams(text: str, lo: int, hi: int, stop: frozenset) -> set[tuple[str, ...]]:
    """The document's n-grams: runs of tokens separated by whitespace only."""
    toks, starts, ends = [], [], []
    for m in _TOKEN.finditer(text):
        toks.append(m.group())
        starts.append(m.start())
        ends.append(m.end())
    # adjacent[j]: token j and token j+1 are separated by whitespace only
    adjacent = [text[ends[j]:starts[j + 1]].isspace() for j in range(len(toks) - 1)]
    out: set[tuple[str, ...]] = set()
    for n in range(lo, hi + 1):
        for j in range(len(toks) - n + 1):
            if n > 1 and not all(adjacent[j:j + n - 1]):
                continue
            gram = tuple(toks[j:j + n])
            if stop and any(w in stop for w in gram):
                continue
            out.add(gram)
    return out


def mine_rules(
    texts: Sequence[str],
    labels: Sequence,
    min_precision: float = 0.98,
    min_support: int = 5,
    max_rules: int = 200,
    ngram_range: tuple[int, int] = (1, 2),
    confidence: float = 0.95,
    lowercase: bool = True,
    stop_words: Any = None,
    *,
    prune_redundant: bool = True,
    engine: str = "auto",
) -> MinedRules:
    """Learn keyword rules ``n-gram -> label`` whose precision is statistically at least ``min_precision``.

    Parameters
    ----------
    texts, labels : training requests and their labels (same length).
    min_precision : required one-sided Clopper-Pearson lower bound of each rule's precision, in (0, 1].
    min_support : least number of training documents a rule must match (and answer).
    max_rules : most rules kept (the best by lower bound, then support).
    ngram_range : ``(min_n, max_n)``; ``(1, 2)`` mines single words and pairs of adjacent words.
    confidence : level of the lower bound, in (0, 1); higher is more conservative.
    lowercase : lowercase before tokenising, and match case-insensitively.
    stop_words : ``None``, ``"english"`` (scikit-learn's list) or a collection of words; n-grams
        containing one are not mined.
    prune_redundant : judge each rule also on the documents not already answered by earlier rules
        (first match wins) and drop it when that leaves it without ``min_support`` documents or
        below the bound.
    engine : regular-expression engine used to check the patterns, as in :class:`RegexStage`
        (``"auto"``: RE2 when installed). Use the same engine to serve the rules.

    Returns
    -------
    MinedRules (possibly empty: then :meth:`MinedRules.explain` says so and ``to_stage`` raises).
    """
    owner = "mine_rules"
    texts = check_texts("texts", texts, owner=owner)
    label_list = _check_label_values(labels, owner)
    check_consistent_length(owner, texts=texts, labels=label_list)
    min_precision = float(check_param("min_precision", min_precision,
                                      [Interval(float, 0, 1, closed="right")], owner))
    min_support = int(check_param("min_support", min_support, [Interval(int, 1, None)], owner))
    max_rules = int(check_param("max_rules", max_rules, [Interval(int, 1, None)], owner))
    confidence = float(check_param("confidence", confidence, [Interval(float, 0, 1, closed="neither")], owner))
    lowercase = check_param("lowercase", lowercase, [bool], owner)
    prune_redundant = check_param("prune_redundant", prune_redundant, [bool], owner)
    engine = check_param("engine", engine, [Options({"auto", "re", "re2"})], owner)
    lo, hi = _check_ngram_range(ngram_range)
    stop = _check_stop_words(stop_words)
    if lowercase:
        stop = frozenset(w.lower() for w in stop)

    texts = [t[:_MAX_LENGTH] for t in texts]
    seen = [t.lower() if lowercase else t for t in texts]

    # label ids in order of first appearance (labels need not be sortable)
    label_ids: dict[Any, int] = {}
    y = np.array([label_ids.setdefault(v, len(label_ids)) for v in label_list], dtype=np.int64)
    classes = list(label_ids)
    n_labels = len(classes)

    # document-n-gram incidence, counted per label with one bincount
    vocab: dict[tuple[str, ...], int] = {}
    feat_idx = array("q")  # compact: one entry per (document, n-gram)
    doc_idx = array("q")
    for d, text in enumerate(seen):
        for g in _ngrams(text, lo, hi, stop):
            feat_idx.append(vocab.setdefault(g, len(vocab)))
            doc_idx.append(d)
    stop_spec = stop_words if stop_words is None or isinstance(stop_words, str) else sorted(stop)
    params = {"min_precision": min_precision, "min_support": min_support, "max_rules": max_rules,
              "ngram_range": [lo, hi], "confidence": confidence, "stop_words": stop_spec,
              "prune_redundant": prune_redundant, "n_documents": len(texts),
              "engine": RegexStage([("x", 0)], engine=engine).engine}  # what "auto" resolved to
    if not vocab:
        return MinedRules([], lowercase, params)
    feats = np.frombuffer(feat_idx, dtype=np.int64)
    docs = np.frombuffer(doc_idx, dtype=np.int64)
    # per-label counts only for the n-grams with enough support (most n-grams are rare)
    cand = np.flatnonzero(np.bincount(feats, minlength=len(vocab)) >= min_support)
    row = np.full(len(vocab), -1, dtype=np.int64)
    row[cand] = np.arange(len(cand))
    sel = row[feats] >= 0
    counts = np.bincount(row[feats[sel]] * n_labels + y[docs[sel]],
                         minlength=len(cand) * n_labels).reshape(len(cand), n_labels)
    support = counts.sum(axis=1)
    major = counts.argmax(axis=1) if len(cand) else np.zeros(0, dtype=np.int64)
    hits = counts[np.arange(len(cand)), major]

    lb = precision_lower_bound(hits, support, confidence)
    keep = np.flatnonzero(lb >= min_precision)
    grams = list(vocab)
    order = sorted(keep, key=lambda i: (-lb[i], -support[i], len(grams[cand[i]]), grams[cand[i]]))

    # check each candidate with its compiled pattern, in the order the stage will try them
    folded = [t.casefold() for t in texts] if lowercase else texts
    truth = np.asarray(y)
    claimed = np.zeros(len(texts), dtype=bool)
    rules: list[dict] = []
    for i in order:
        if len(rules) >= max_rules:
            break
        words, label_id = grams[int(cand[i])], int(major[i])
        pattern = _pattern(words)
        probe = RegexStage([(pattern, True)], engine=engine, ignore_case=lowercase, max_length=_MAX_LENGTH)
        needles = [w.casefold() for w in words] if lowercase else list(words)
        maybe = [d for d, t in enumerate(folded) if all(w in t for w in needles)]
        matched = np.zeros(len(texts), dtype=bool)
        if maybe:
            matched[np.asarray(maybe)[probe.predict([texts[d] for d in maybe]).answered]] = True
        n_m = int(matched.sum())
        k_m = int((truth[matched] == label_id).sum())
        lb_m = precision_lower_bound(k_m, n_m, confidence)
        if n_m < min_support or lb_m < min_precision:
            continue
        if prune_redundant:
            own = matched & ~claimed
            n_r = int(own.sum())
            k_r = int((truth[own] == label_id).sum())
            lb_r = precision_lower_bound(k_r, n_r, confidence)
            if n_r < min_support or lb_r < min_precision:
                continue
        else:
            n_r, k_r, lb_r = n_m, k_m, lb_m
        claimed |= matched
        rules.append({
            "pattern": pattern,
            "label": _native(classes[label_id]),
            "token": " ".join(words),
            "support": n_r,
            "precision": k_r / n_r,
            "precision_lower_bound": float(lb_r),
            "n_matched": n_m,
        })
    return MinedRules(rules, lowercase, params)


# ------------------------------------------------------------------------------------ evaluation

def _as_patterns(rules_or_patterns: Any) -> tuple[list[tuple[str, Any]], bool | None]:
    if isinstance(rules_or_patterns, MinedRules):
        return rules_or_patterns.patterns, rules_or_patterns.lowercase
    if isinstance(rules_or_patterns, (str, bytes)) or not isinstance(rules_or_patterns, Sequence):
        raise InvalidParameterError(
            "The 'rules_or_patterns' parameter of evaluate_rules must be a MinedRules, a list of rule dicts "
            f"or a list of (pattern, label) pairs. Got {type(rules_or_patterns).__name__} instead."
        )
    out = []
    for i, r in enumerate(rules_or_patterns):
        if isinstance(r, dict) and isinstance(r.get("pattern"), str) and "label" in r:
            out.append((r["pattern"], r["label"]))
        elif isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str):
            out.append((r[0], r[1]))
        else:
            raise InvalidParameterError(
                "The 'rules_or_patterns' parameter of evaluate_rules must hold rule dicts or (pattern, label) "
                f"pairs; item {i} is {r!r}."
            )
    return out, None


def evaluate_rules(rules_or_patterns: Any, texts: Sequence[str], labels: Sequence, *,
                   ignore_case: bool | None = None, engine: str = "auto") -> dict:
    """Apply rules as a :class:`RegexStage` does (first match wins) and measure them on labelled data.

    ``rules_or_patterns``: a :class:`MinedRules`, a list of its rule dicts, or ``(pattern, label)``
    pairs. ``ignore_case``: default the rules' ``lowercase`` (True for plain patterns).

    Returns ``{"coverage", "precision", "n_answered", "n", "per_rule"}``: coverage is the fraction of
    texts answered, precision the fraction of answered texts whose label is right (``nan`` when none
    is answered), and ``per_rule`` one dict per rule (``pattern``, ``label``, ``support`` = texts it
    answered, ``correct``, ``precision``), in order.
    """
    owner = "evaluate_rules"
    patterns, lowercase = _as_patterns(rules_or_patterns)
    texts = check_texts("texts", texts, owner=owner)
    label_list = _check_label_values(labels, owner)
    check_consistent_length(owner, texts=texts, labels=label_list)
    if ignore_case is None:
        ignore_case = True if lowercase is None else lowercase
    ignore_case = check_param("ignore_case", ignore_case, [bool], owner)
    n = len(texts)
    if not patterns:
        return {"coverage": 0.0, "precision": math.nan, "n_answered": 0, "n": n, "per_rule": []}
    # the stage answers with the index of the rule that fired, so rules sharing a label stay apart
    stage = RegexStage([(p, i) for i, (p, _) in enumerate(patterns)], name="evaluate_rules",
                       ignore_case=ignore_case, engine=engine)
    out = stage.predict(texts)
    fired = np.where(out.answered, out.labels, -1).astype(np.int64)
    correct = np.array([f >= 0 and patterns[f][1] == label_list[d] for d, f in enumerate(fired)], dtype=bool)
    per_rule = []
    for i, (p, lab) in enumerate(patterns):
        mine = fired == i
        s, c = int(mine.sum()), int(correct[mine].sum())
        per_rule.append({"pattern": p, "label": lab, "support": s, "correct": c,
                         "precision": c / s if s else math.nan})
    n_answered = int(out.answered.sum())
    n_correct = int(correct.sum())
    return {
        "coverage": n_answered / n,
        "precision": n_correct / n_answered if n_answered else math.nan,
        "n_answered": n_answered,
        "n": n,
        "per_rule": per_rule,
    }
