"""Stages of a cascade: something that answers a batch of requests with a label and a confidence,
or abstains, at a known cost per call.

Every stage implements one method, ``predict(items) -> StageOutput``, over a *batch* (a list of
requests, usually strings), so that model stages can run vectorised and the server can micro-batch.

* :class:`RegexStage` -- ``[(pattern, label), ...]``; the first pattern that matches answers with
  confidence 1, otherwise the stage abstains. Patterns are compiled with RE2 (linear time, no
  catastrophic backtracking; ``pip install 'leanscale[cascade]'``). Without RE2 they run on
  Python's ``re`` only after :func:`check_regex_safety` has rejected nested quantifiers and
  back-references, and a per-request time limit still applies through the ``regex`` module when it
  is installed.
* :class:`RuleStage` -- a Python predicate ``fn(item) -> label or None`` (None abstains).
* :class:`ModelStage` -- anything with ``predict_proba`` (a scikit-learn pipeline, a leanscale text
  classifier) or a torch module returning logits; confidence is the top class probability, after
  optional temperature scaling (``temperature``, fitted by the cascade on held-out data).
* :class:`CallableStage` -- any function returning ``(label, confidence)`` per request (a remote
  LLM endpoint, a service); ``confidence`` may be omitted (then 1.0).

A stage that raises, returns the wrong number of answers or a confidence outside [0, 1] does not
lose requests: the cascade catches :class:`StageError`, counts it and passes the batch to the next
stage (see :class:`leanscale.cascade.Cascade`).

``cost`` is the price of one call for one request in any unit the user likes (seconds, dollars,
FLOPs) as long as all stages use the same one; ``None`` means "measure it" (mean wall seconds per
request, :func:`measure_cost`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from leanscale.core.errors import InvalidParameterError, LeanscaleError
from leanscale.core.validation import Interval, check_param

__all__ = [
    "CallableStage",
    "ModelStage",
    "RegexStage",
    "RuleStage",
    "Stage",
    "StageError",
    "StageOutput",
    "check_regex_safety",
    "measure_cost",
    "softmax_with_temperature",
]


class StageError(LeanscaleError, RuntimeError):
    """A stage failed or answered in the wrong format; the cascade falls back to the next stage."""


class StageOutput(NamedTuple):
    """A stage's answers for a batch of ``n`` requests.

    ``labels``: (n,) object array (``None`` where abstained); ``confidence``: (n,) float64 in
    [0, 1] (0 where abstained); ``answered``: (n,) bool, False where the stage abstains.
    """

    labels: np.ndarray
    confidence: np.ndarray
    answered: np.ndarray


def _check_name(name: Any, owner: str) -> str:
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise InvalidParameterError(
            f"The 'name' parameter of {owner} must be a non-empty string of letters, digits, '_', '.' or '-'. "
            f"Got {name!r} instead."
        )
    return name


def _check_cost(cost: Any, owner: str) -> float | None:
    if cost is None:
        return None
    return float(check_param("cost", cost, [Interval("real", 0, None, closed="left")], owner))


def _check_timeout(timeout: Any, owner: str) -> float | None:
    if timeout is None:
        return None
    return float(check_param("timeout", timeout, [Interval("real", 0, None, closed="neither")], owner))


class Stage:
    """Base class. Subclasses set ``kind`` and implement :meth:`_predict`.

    Parameters common to every stage: ``name`` (unique in a cascade), ``cost`` (per request,
    ``None`` = measure), ``timeout`` (seconds per batch; ``None`` = no limit; enforced by the
    cascade, which falls back to the next stage when it is exceeded).
    """

    kind = "stage"

    def __init__(self, name: str, cost: float | None = None, timeout: float | None = None):
        owner = type(self).__name__
        self.name = _check_name(name, owner)
        self.cost = _check_cost(cost, owner)
        self.timeout = _check_timeout(timeout, owner)

    def _predict(self, items: Sequence) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, items: Sequence) -> StageOutput:
        """Answer a batch; raises :class:`StageError` when the stage fails or answers badly."""
        items = list(items)
        try:
            out = self._predict(items)
        except StageError:
            raise
        except Exception as exc:  # a stage may fail in any way; the cascade falls back
            raise StageError(f"stage {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        return _check_output(out, len(items), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, cost={self.cost!r})"


def _check_output(out: Any, n: int, name: str) -> StageOutput:
    if not isinstance(out, StageOutput):
        raise StageError(f"stage {name!r} must return a StageOutput; got {type(out).__name__}")
    labels, conf, answered = (np.asarray(a) for a in out)
    if labels.shape != (n,) or conf.shape != (n,) or answered.shape != (n,):
        raise StageError(
            f"stage {name!r} answered with shapes labels {labels.shape}, confidence {conf.shape}, "
            f"answered {answered.shape}; expected ({n},) each for a batch of {n}"
        )
    try:
        conf = conf.astype(np.float64)
    except (TypeError, ValueError):
        raise StageError(f"stage {name!r} returned confidences {conf!r}; expected numbers in [0, 1]") from None
    answered = answered.astype(bool)
    bad = answered & ~((conf >= 0) & (conf <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StageError(f"stage {name!r} returned confidence {float(conf[i])!r} for request {i}; expected a number in [0, 1]")
    conf = np.where(answered, conf, 0.0)
    labels = labels.astype(object)
    labels[~answered] = None
    return StageOutput(labels, conf, answered)


# ----------------------------------------------------------------------------------------- regex

# Nested quantifiers ("(a+)+", "(a*)*", "(\w+\s?)*") and back-references are what make a
# backtracking engine exponential; RE2 has neither problem (and rejects back-references).
_NESTED_QUANT = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]")
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")


def check_regex_safety(pattern: str, name: str = "patterns") -> None:
    """Reject patterns that can backtrack catastrophically on Python's ``re``.

    Raises :class:`InvalidParameterError` naming the pattern for nested quantifiers such as
    ``(a+)+`` or ``(\\w+\\s?)*`` and for back-references. RE2 does not need this check.
    """
    if _NESTED_QUANT.search(pattern) or _BACKREF.search(pattern):
        raise InvalidParameterError(
            f"The {name!r} parameter contains the pattern {pattern!r}, which can take exponential time "
            "(a nested quantifier such as '(a+)+' or a back-reference). Rewrite it without nesting, or "
            "install RE2 (pip install 'leanscale[cascade]'), which runs every pattern in linear time "
            "and rejects back-references."
        )


def _re2():
    try:
        import re2  # google-re2: linear-time matching
    except ImportError:
        return None
    return re2


class RegexStage(Stage):
    """Answer with the label of the first matching pattern (confidence 1), else abstain.

    ``patterns``: a sequence of ``(pattern, label)`` pairs, tried in order (``search`` semantics,
    so anchor with ``^``/``$`` or ``\\b`` as needed). ``flags``: ``"i"`` for case-insensitive.
    ``engine``: ``"auto"`` (RE2 when installed, else checked ``re``), ``"re2"`` or ``"re"``.
    ``match_timeout``: seconds per request and pattern on the ``re`` engine when the ``regex``
    module is installed (RE2 needs none). ``max_length`` truncates longer requests (bounds the work).
    """

    kind = "regex"

    def __init__(
        self,
        patterns: Sequence[tuple[str, Any]],
        name: str = "regex",
        cost: float | None = None,
        *,
        ignore_case: bool = True,
        engine: str = "auto",
        match_timeout: float = 0.05,
        max_length: int = 10_000,
        timeout: float | None = None,
    ):
        super().__init__(name, cost, timeout)
        if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence) or not patterns:
            raise InvalidParameterError(
                "The 'patterns' parameter of RegexStage must be a non-empty sequence of (pattern, label) "
                f"pairs. Got {patterns!r} instead."
            )
        if engine not in ("auto", "re2", "re"):
            raise InvalidParameterError(
                f"The 'engine' parameter of RegexStage must be one of 'auto', 're', 're2'. Got {engine!r} instead."
            )
        re2 = _re2()
        if engine == "re2" and re2 is None:
            raise InvalidParameterError(
                "The 'engine' parameter of RegexStage is 're2' but RE2 is not installed: "
                "pip install 'leanscale[cascade]'."
            )
        self.engine = "re2" if (engine in ("auto", "re2") and re2 is not None) else "re"
        self.ignore_case = bool(ignore_case)
        self.match_timeout = float(check_param("match_timeout", match_timeout,
                                               [Interval("real", 0, None, closed="neither")], "RegexStage"))
        self.max_length = int(check_param("max_length", max_length, [Interval(int, 1, None)], "RegexStage"))
        self.patterns: list[tuple[str, Any]] = []
        self._compiled = []
        for i, pair in enumerate(patterns):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
                raise InvalidParameterError(
                    f"The 'patterns' parameter of RegexStage must hold (pattern, label) pairs; item {i} is {pair!r}."
                )
            pattern, label = pair
            self.patterns.append((pattern, label))
            self._compiled.append(self._compile(pattern))
        self.timeouts_ = 0  # matches abandoned on the time limit (re engine only)

    def _compile(self, pattern: str):
        if self.engine == "re2":
            import re2

            opts = re2.Options()
            opts.case_sensitive = not self.ignore_case
            opts.log_errors = False
            try:
                return re2.compile(pattern, opts)
            except Exception as exc:
                raise InvalidParameterError(
                    f"The 'patterns' parameter of RegexStage has {pattern!r}, which RE2 cannot compile "
                    f"({exc}); RE2 has no back-references or look-arounds."
                ) from None
        check_regex_safety(pattern)
        try:
            import regex  # supports a per-call timeout

            return regex.compile(pattern, regex.IGNORECASE if self.ignore_case else 0)
        except ImportError:
            pass
        except Exception as exc:
            raise InvalidParameterError(
                f"The 'patterns' parameter of RegexStage has {pattern!r}, which does not compile: {exc}."
            ) from None
        try:
            return re.compile(pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as exc:
            raise InvalidParameterError(
                f"The 'patterns' parameter of RegexStage has {pattern!r}, which does not compile: {exc}."
            ) from None

    def _search(self, rx, text: str) -> bool:
        if self.engine == "re2" or isinstance(rx, re.Pattern):
            return rx.search(text) is not None
        try:
            return rx.search(text, timeout=self.match_timeout) is not None
        except TimeoutError:
            self.timeouts_ += 1
            return False

    def _predict(self, items: Sequence) -> StageOutput:
        n = len(items)
        labels = np.full(n, None, dtype=object)
        answered = np.zeros(n, dtype=bool)
        for i, item in enumerate(items):
            text = str(item)[: self.max_length]
            for rx, (_, label) in zip(self._compiled, self.patterns):
                if self._search(rx, text):
                    labels[i], answered[i] = label, True
                    break
        return StageOutput(labels, answered.astype(np.float64), answered)


class RuleStage(Stage):
    """A Python predicate: ``fn(item)`` returns a label, ``None`` to abstain, or ``(label, confidence)``."""

    kind = "rule"

    def __init__(self, fn: Callable[[Any], Any], name: str = "rule", cost: float | None = None,
                 timeout: float | None = None):
        super().__init__(name, cost, timeout)
        if not callable(fn):
            raise InvalidParameterError(f"The 'fn' parameter of RuleStage must be callable. Got {fn!r} instead.")
        self.fn = fn

    def _predict(self, items: Sequence) -> StageOutput:
        return _from_pairs([self.fn(x) for x in items], self.name, allow_bare=True)


def _from_pairs(answers: Sequence, name: str, allow_bare: bool) -> StageOutput:
    n = len(answers)
    labels = np.full(n, None, dtype=object)
    conf = np.zeros(n)
    answered = np.zeros(n, dtype=bool)
    for i, a in enumerate(answers):
        if a is None:
            continue
        if isinstance(a, (tuple, list)):  # a list is a pair too (JSON has no tuples); never a label
            if len(a) != 2:
                raise StageError(f"stage {name!r} returned {a!r} for request {i}; expected (label, confidence)")
            label, c = a
            if label is None:
                continue
            try:
                c = float(c)
            except (TypeError, ValueError):
                raise StageError(f"stage {name!r} returned confidence {c!r} for request {i}; expected a number") from None
        elif allow_bare and not isinstance(a, (dict, set)):
            label, c = a, 1.0
        else:
            raise StageError(f"stage {name!r} returned {a!r} for request {i}; expected (label, confidence)")
        if not math.isfinite(c):
            raise StageError(f"stage {name!r} returned confidence {c!r} for request {i}; expected a number in [0, 1]")
        labels[i], conf[i], answered[i] = label, c, True
    return StageOutput(labels, conf, answered)


def softmax_with_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Re-temper class probabilities: ``softmax(log(p) / T)`` (T > 1 softens, T < 1 sharpens)."""
    logp = np.log(np.clip(proba, 1e-12, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


class ModelStage(Stage):
    """A classifier: ``model.predict_proba(features)`` or a torch module returning logits.

    ``transform`` maps the batch of requests to the model's input (default: the list itself, which
    suits scikit-learn text pipelines). ``classes``: class labels in column order (default
    ``model.classes_``; required for torch modules). ``temperature``: divides the log-probabilities
    before the confidence is taken (set by ``Cascade.fit(..., calibrate=True)``). ``batch_size``
    splits large batches.
    """

    kind = "model"

    def __init__(self, model: Any, name: str = "model", cost: float | None = None, *,
                 transform: Callable[[list], Any] | None = None, classes: Sequence | None = None,
                 temperature: float = 1.0, batch_size: int = 1024, timeout: float | None = None):
        super().__init__(name, cost, timeout)
        is_torch = _is_torch_module(model)
        if not is_torch and not callable(getattr(model, "predict_proba", None)):
            raise InvalidParameterError(
                "The 'model' parameter of ModelStage must have a predict_proba method or be a torch.nn.Module. "
                f"Got {type(model).__name__} instead."
            )
        if classes is None:
            classes = getattr(model, "classes_", None)
        if classes is None:
            raise InvalidParameterError(
                "The 'classes' parameter of ModelStage is required when the model has no classes_ attribute."
            )
        self.model, self.transform, self.is_torch = model, transform, is_torch
        self.classes = np.asarray(list(classes), dtype=object)
        self.temperature = float(check_param("temperature", temperature,
                                             [Interval("real", 0, None, closed="neither")], "ModelStage"))
        self.batch_size = int(check_param("batch_size", batch_size, [Interval(int, 1, None)], "ModelStage"))

    def predict_proba(self, items: Sequence) -> np.ndarray:
        """(n, n_classes) probabilities before temperature scaling."""
        chunks = []
        for s in range(0, len(items), self.batch_size):
            batch = list(items[s: s + self.batch_size])
            x = self.transform(batch) if self.transform is not None else batch
            if self.is_torch:
                import torch

                was_training = self.model.training
                self.model.eval()  # no dropout, no batch-norm statistics updates at inference
                try:
                    with torch.no_grad():
                        p = torch.softmax(self.model(x).float(), dim=-1).cpu().numpy()
                finally:
                    self.model.train(was_training)
            else:
                p = np.asarray(self.model.predict_proba(x), dtype=np.float64)
            chunks.append(p)
        proba = np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)))
        if proba.ndim != 2 or proba.shape != (len(items), len(self.classes)):
            raise StageError(
                f"stage {self.name!r}: the model returned probabilities of shape {proba.shape}; "
                f"expected ({len(items)}, {len(self.classes)})"
            )
        return proba

    def _predict(self, items: Sequence) -> StageOutput:
        proba = self.predict_proba(items)
        if self.temperature != 1.0:
            proba = softmax_with_temperature(proba, self.temperature)
        top = proba.argmax(axis=1)
        conf = proba[np.arange(len(items)), top]
        return StageOutput(self.classes[top], conf, np.isfinite(conf))


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return isinstance(model, torch.nn.Module)


class CallableStage(Stage):
    """Any function: ``fn(items) -> [(label, confidence) or label or None, ...]`` when ``batched``,
    else ``fn(item) -> (label, confidence) | label | None`` per request. A remote endpoint fits here;
    give it a ``timeout`` and the cascade falls back when it is slow."""

    kind = "callable"

    def __init__(self, fn: Callable, name: str = "callable", cost: float | None = None, *,
                 batched: bool = False, timeout: float | None = None):
        super().__init__(name, cost, timeout)
        if not callable(fn):
            raise InvalidParameterError(f"The 'fn' parameter of CallableStage must be callable. Got {fn!r} instead.")
        self.fn, self.batched = fn, bool(batched)

    def _predict(self, items: Sequence) -> StageOutput:
        answers = self.fn(items) if self.batched else [self.fn(x) for x in items]
        try:
            answers = list(answers)
        except TypeError:
            raise StageError(f"stage {self.name!r} returned {type(answers).__name__}; expected a list of answers") from None
        if len(answers) != len(items):
            raise StageError(f"stage {self.name!r} returned {len(answers)} answers for {len(items)} requests")
        return _from_pairs(answers, self.name, allow_bare=True)


def measure_cost(stage: Stage, items: Sequence, repeats: int = 1) -> float:
    """Mean wall seconds per request of ``stage.predict`` on ``items`` (best of ``repeats``).

    One untimed call on the first few items comes first: a stage's first call often loads a
    model or allocates buffers, which is not a per-request cost."""
    items = list(items)
    if not items:
        raise InvalidParameterError("The 'items' parameter of measure_cost must not be empty.")
    stage.predict(items[:8])  # warm-up
    best = math.inf
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        stage.predict(items)
        best = min(best, time.perf_counter() - t0)
    return best / len(items)
