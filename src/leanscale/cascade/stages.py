"""Stages of a cascade: something that answers a batch of requests with a label and a confidence,
or abstains, at a known cost per call.

Every stage implements one method, ``predict(items) -> StageOutput``, over a *batch* (a list of
requests, usually strings), so that model stages can run vectorised and the server can micro-batch.

* :class:`RegexStage` -- ``[(pattern, label), ...]``; the first pattern that matches answers with
  confidence 1, otherwise the stage abstains. Patterns are compiled with RE2 (linear time, no
  catastrophic backtracking; ``pip install 'leanscale[cascade]'``). Without RE2 they run on the
  ``regex`` package only after :func:`check_regex_safety` has rejected nested quantifiers,
  quantified alternations and back-references, with a real per-match time limit; with neither,
  the stage is refused (Python's ``re`` has no time limit).
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

import contextlib
import math
import re
import threading
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
    "StaticEmbeddingStage",
    "check_regex_safety",
    "measure_cost",
]  # re-exported by leanscale.cascade; softmax_with_temperature is importable from here


class StageError(LeanscaleError, RuntimeError):
    """A stage failed or answered in the wrong format; the cascade falls back to the next stage."""


class StageOutput(NamedTuple):
    """A stage's answers for a batch of ``n`` requests.

    ``labels``: (n,) object array (``None`` where abstained); ``confidence``: (n,) float64 in
    [0, 1] (0 where abstained); ``answered``: (n,) bool, False where the stage abstains;
    ``features``: optional (n, f) float64 signals of each answer's reliability for a learned
    deferral rule (``Cascade(deferral="learned")``; :class:`ModelStage` gives the margin between
    its two top probabilities and the normalised entropy), 0 where abstained; ``None`` when the
    stage has none.
    """

    labels: np.ndarray
    confidence: np.ndarray
    answered: np.ndarray
    features: np.ndarray | None = None


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


# A week: longer than any stage call should take, and far below threading.TIMEOUT_MAX (a larger
# value, e.g. 1e308, makes ``Future.result(timeout=...)`` raise OverflowError).
MAX_STAGE_TIMEOUT_S = 7 * 24 * 3600.0


def _check_timeout(timeout: Any, owner: str) -> float | None:
    if timeout is None:
        return None
    return float(check_param("timeout", timeout, [Interval("real", 0, MAX_STAGE_TIMEOUT_S, closed="right")], owner))


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
    labels, conf, answered = (np.asarray(a) for a in out[:3])
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
    features = out.features
    if features is not None:
        try:
            features = np.asarray(features, dtype=np.float64)
        except (TypeError, ValueError):
            raise StageError(f"stage {name!r} returned features that are not numbers; expected an (n, f) "
                             "float array") from None
        if features.ndim != 2 or features.shape[0] != n or not np.isfinite(features).all():
            raise StageError(f"stage {name!r} returned features of shape {features.shape}; expected finite "
                             f"numbers of shape ({n}, f)")
        features = np.where(answered[:, None], features, 0.0)
    return StageOutput(labels, conf, answered, features)


# ----------------------------------------------------------------------------------------- regex

# What makes a backtracking engine exponential is ambiguity inside a repetition: a quantified
# group that itself holds a quantifier ("(a+)+", "((a+))+", "(\w+\s?)*") or an alternation
# ("(a|aa)+", "(a|a)+"), and back-references. RE2 has no such problem (and no back-references).
_BACKREF = re.compile(r"\\[1-9]|\(\?P=|\\g<|\(\?\(")
_QUANT_BRACES = re.compile(r"\{(\d*)(,?)(\d*)\}")


def _quantifier(pattern: str, i: int) -> tuple[str | None, int]:
    """The quantifier starting at ``pattern[i]``: ``(None, i)``, ``("once", end)`` for ``?``,
    ``{0,1}``, ``{n}`` ... or ``("many", end)`` for one that can repeat (``*``, ``+``, ``{m,}``,
    ``{m,n}`` with n > 1); a lazy ``?`` or possessive ``+`` suffix is included in ``end``."""
    if i >= len(pattern):
        return None, i
    c = pattern[i]
    if c in "*+":
        kind, end = "many", i + 1
    elif c == "?":
        kind, end = "once", i + 1
    elif c == "{":
        m = _QUANT_BRACES.match(pattern, i)
        if m is None or (not m.group(1) and not m.group(3)):
            return None, i
        lo, comma, hi = m.groups()
        many = (comma and (not hi or int(hi) > 1)) or (not comma and int(lo or 0) > 1)
        kind, end = ("many" if many else "once"), m.end()
    else:
        return None, i
    if end < len(pattern) and pattern[end] in "?+":
        end += 1
    return kind, end


def _group_prefix_end(pattern: str, i: int) -> int:
    """Index after the opening of the group at ``pattern[i] == "("`` (``(``, ``(?:``, ``(?P<n>``, ...)."""
    j = i + 1
    if j >= len(pattern) or pattern[j] != "?":
        return j
    j += 1
    if pattern.startswith("P<", j):
        k = pattern.find(">", j)
        return len(pattern) if k < 0 else k + 1
    if pattern.startswith(("<=", "<!"), j):
        return j + 2
    if j < len(pattern) and pattern[j] in ":=!>#":
        return j + 1
    while j < len(pattern) and (pattern[j].isalpha() or pattern[j] == "-"):
        j += 1
    return j + 1 if j < len(pattern) and pattern[j] == ":" else j


def _unsafe_reason(pattern: str) -> str | None:
    if _BACKREF.search(pattern):
        return "a back-reference or conditional group"
    stack = [[False, False]]  # per open group: holds a quantifier, holds an alternation
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":  # a character class: one character, whatever is inside
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif c == "(":
            stack.append([False, False])
            i = _group_prefix_end(pattern, i)
            continue
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            kind, end = _quantifier(pattern, i + 1)
            if kind == "many" and inner[0]:
                return "a nested quantifier such as '(a+)+'"
            if kind == "many" and inner[1]:
                return "an alternation under a quantifier such as '(a|aa)+'"
            stack[-1][0] |= inner[0] or kind is not None
            stack[-1][1] |= inner[1]
            i = end
            continue
        elif c == "|":
            stack[-1][1] = True
            i += 1
            continue
        else:
            i += 1
        kind, end = _quantifier(pattern, i)
        if kind is not None:
            stack[-1][0] = True
            i = end
    return None


def check_regex_safety(pattern: str, name: str = "patterns") -> None:
    """Reject patterns that can backtrack exponentially on a backtracking engine (``re``, ``regex``).

    Raises :class:`InvalidParameterError` naming the pattern for a repeated group that holds a
    quantifier (``(a+)+``, ``((a+))+``, ``(\\w+\\s?)*``) or an alternation (``(a|aa)+``,
    ``(a|a)+$``), and for back-references. This does not bound polynomial blow-ups such as
    ``a*a*a*b``: that is why the ``re`` engine also needs a real time limit (the ``regex``
    package). RE2 needs neither.
    """
    reason = _unsafe_reason(pattern)
    if reason is not None:
        raise InvalidParameterError(
            f"The {name!r} parameter contains the pattern {pattern!r}, which can take exponential time on a "
            f"backtracking engine ({reason}). Use engine='re2' (linear time, the default), or rewrite it "
            "without the nested repetition."
        )


def _re2():
    try:
        import re2  # google-re2: linear-time matching
    except ImportError:
        return None
    return re2


def _regex_module():
    """The ``regex`` package (per-call ``timeout``), or None: Python's ``re`` has no time limit."""
    try:
        import regex
    except ImportError:
        return None
    return regex


_SURROGATES = re.compile("[\ud800-\udfff]")


def re2_text(text: str) -> str:
    """``text`` as RE2 can take it: a lone surrogate (which UTF-8 cannot encode, so RE2 would fail
    on the text) becomes U+FFFD; any other text is returned unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


class RegexStage(Stage):
    """Answer with the label of the first matching pattern (confidence 1), else abstain.

    ``patterns``: a sequence of ``(pattern, label)`` pairs, tried in order (``search`` semantics,
    so anchor with ``^``/``$`` or ``\\b`` as needed). ``ignore_case``: case-insensitive matching.
    ``engine``: ``"auto"`` (RE2 when installed, else ``"re"``), ``"re2"`` or ``"re"``. The ``re``
    engine runs on the ``regex`` package, whose per-match ``match_timeout`` is a real time limit,
    after :func:`check_regex_safety`; without ``regex`` it is refused (Python's ``re`` cannot be
    interrupted, so one request could hold a thread forever). ``max_length`` truncates longer
    requests (bounds the work). A text RE2 cannot encode (a lone surrogate) is matched with
    U+FFFD in its place; a text whose matching fails abstains alone (``failures_`` counts them),
    never its whole batch.
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
        if self.engine == "re" and _regex_module() is None:
            raise InvalidParameterError(
                f"The 'engine' parameter of RegexStage is {engine!r}, which needs the 'regex' package for a real "
                "per-match time limit (Python's re cannot be interrupted: one crafted request could hold a thread "
                "forever). Use engine='re2' (pip install 'leanscale[cascade]'; linear time, no limit needed), or "
                "pip install regex."
            )
        self.ignore_case = check_param("ignore_case", ignore_case, [bool], "RegexStage")
        self.match_timeout = float(check_param("match_timeout", match_timeout,
                                               [Interval("real", 0, 3600, closed="right")], "RegexStage"))
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
        self.failures_ = 0  # texts whose matching failed (they abstain)

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
        regex = _regex_module()
        try:
            return regex.compile(pattern, regex.IGNORECASE if self.ignore_case else 0)
        except Exception as exc:
            raise InvalidParameterError(
                f"The 'patterns' parameter of RegexStage has {pattern!r}, which does not compile: {exc}."
            ) from None

    def _search(self, rx, text: str) -> bool:
        if self.engine == "re2":
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
            if self.engine == "re2":
                text = re2_text(text)
            try:
                for rx, (_, label) in zip(self._compiled, self.patterns):
                    if self._search(rx, text):
                        labels[i], answered[i] = label, True
                        break
            except Exception:  # this text alone abstains; the rest of the batch is unaffected
                self.failures_ += 1
                labels[i], answered[i] = None, False
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

    ``transform`` maps the batch of requests (a list) to the model's input; default: the list
    itself, which suits scikit-learn text pipelines. It is either a Python callable
    ``transform(batch)`` (user code: a cascade holding it saves the stage by name, and loading
    needs the stage back in ``objects=``) or a fitted scikit-learn transformer such as a
    ``TfidfVectorizer`` (its ``transform(batch)`` is used, turned into a dense float32 tensor for
    a torch module; saved with the cascade through skops, no user code needed to load it). A torch
    module takes one tensor whose first dimension is the batch. ``classes``: class labels in column
    order (default ``model.classes_``; required for torch modules). ``temperature``: divides the log-probabilities
    before the confidence is taken (set by ``Cascade.fit(..., calibrate=True)``). ``batch_size``
    splits large batches.

    A torch module is run in eval mode under ``torch.no_grad`` and is safe to call from many threads:
    a module already in eval mode runs concurrently; one left in training mode is switched to eval
    and back (each submodule to its own mode) under an exclusive lock, so no call ever runs with
    dropout on or batch-norm statistics updating.
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
        if transform is not None and not callable(transform) and not callable(getattr(transform, "transform", None)):
            raise InvalidParameterError(
                "The 'transform' parameter of ModelStage must be None, a callable (batch -> model input) or a fitted "
                f"scikit-learn transformer (with a transform method). Got {type(transform).__name__} instead.")
        self.model, self.transform, self.is_torch = model, transform, is_torch
        self._example_input = None  # the first tensor a torch module was given (the example to export it on)
        self.classes = np.asarray(list(classes), dtype=object)
        self.temperature = float(check_param("temperature", temperature,
                                             [Interval("real", 0, None, closed="neither")], "ModelStage"))
        self.batch_size = int(check_param("batch_size", batch_size, [Interval(int, 1, None)], "ModelStage"))
        self._init_mode_lock()

    def predict_proba(self, items: Sequence) -> np.ndarray:
        """(n, n_classes) probabilities before temperature scaling."""
        chunks = []
        for s in range(0, len(items), self.batch_size):
            batch = list(items[s: s + self.batch_size])
            x = self._transform(batch)
            if self.is_torch:
                p = self._torch_proba(x)
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

    def _transform(self, batch: list) -> Any:
        """The model's input for ``batch``: through ``transform`` (a callable, or a scikit-learn
        transformer's ``transform``, as a dense float32 tensor for a torch module)."""
        t = self.transform
        if t is None:
            return batch
        if callable(t):
            return t(batch)
        x = t.transform(batch)
        if not self.is_torch:
            return x
        import torch

        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return torch.as_tensor(np.asarray(x, dtype=np.float32))

    # A torch module runs in eval mode (no dropout, no batch-norm updates) and without autograd.
    # Thread safety: ``train``/``eval`` flip a flag shared by every thread using the module, so a
    # call that switches a module left in training mode to eval and back (restoring the caller's
    # mode) holds the stage's mode lock exclusively, while calls on a module already in eval mode
    # share it and run concurrently. No call ever runs while another has the module in training
    # mode, whatever the mix of threads.
    def _torch_proba(self, x) -> np.ndarray:
        import torch

        from leanscale.train.user_data import as_logits

        model = self.model
        if self._example_input is None and isinstance(x, torch.Tensor) and x.ndim >= 1 and len(x):
            self._example_input = x[:4].detach().cpu().clone()
        with self._mode_lock_shared():
            if not any(m.training for m in model.modules()):
                with torch.no_grad():
                    return torch.softmax(as_logits(model(x)).float(), dim=-1).cpu().numpy()
        with self._mode_lock_exclusive():
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                with torch.no_grad():
                    return torch.softmax(as_logits(model(x)).float(), dim=-1).cpu().numpy()
            finally:
                for m, training in modes:  # each submodule's own mode (a frozen batch norm stays in eval)
                    m.training = training

    @contextlib.contextmanager
    def _mode_lock_shared(self):
        cond = self._mode_cond
        with cond:
            while self._mode_writer:
                cond.wait()
            self._mode_readers += 1
        try:
            yield
        finally:
            with cond:
                self._mode_readers -= 1
                if self._mode_readers == 0:
                    cond.notify_all()

    @contextlib.contextmanager
    def _mode_lock_exclusive(self):
        cond = self._mode_cond
        with cond:
            while self._mode_writer or self._mode_readers:
                cond.wait()
            self._mode_writer = True
        try:
            yield
        finally:
            with cond:
                self._mode_writer = False
                cond.notify_all()

    def __getstate__(self):  # the mode lock is not copyable
        d = dict(self.__dict__)
        for key in ("_mode_cond", "_mode_readers", "_mode_writer"):
            d.pop(key, None)
        return d

    def __setstate__(self, d):
        d.setdefault("_example_input", None)
        self.__dict__.update(d)
        self._init_mode_lock()

    def _init_mode_lock(self) -> None:
        self._mode_cond = threading.Condition()
        self._mode_readers = 0
        self._mode_writer = False

    def _predict(self, items: Sequence) -> StageOutput:
        proba = self.predict_proba(items)
        if self.temperature != 1.0:
            proba = softmax_with_temperature(proba, self.temperature)
        top = proba.argmax(axis=1)
        conf = proba[np.arange(len(items)), top]
        return StageOutput(self.classes[top], conf, np.isfinite(conf), proba_features(proba))


def proba_features(proba: np.ndarray) -> np.ndarray:
    """(n, 2) reliability signals of class probabilities (n, k): the margin between the two top
    probabilities and the entropy divided by log k (0: certain, 1: uniform)."""
    proba = np.asarray(proba, dtype=np.float64)
    n, k = proba.shape
    if k < 2:
        return np.column_stack([np.ones(n), np.zeros(n)])
    top2 = np.partition(proba, k - 2, axis=1)[:, -2:]  # (n, 2): second, first
    p = np.clip(proba, 1e-12, 1.0)
    ent = -(p * np.log(p)).sum(axis=1) / math.log(k)
    out = np.column_stack([top2[:, 1] - top2[:, 0], ent])
    return np.where(np.isfinite(out), out, 0.0)


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return isinstance(model, torch.nn.Module)


STATIC_ENCODER_DIR = "minilm-static-256"  # under leanscale.data.paths.cache_dir(), as the gateway's semantic cache


def _default_static_encoder():
    from leanscale.data.paths import cache_dir
    from leanscale.models import static_text_encoder

    return static_text_encoder(cache_dir() / STATIC_ENCODER_DIR)


class _EmbeddingHead:
    """``predict_proba(features)`` of a head fitted on embeddings (what :class:`ModelStage` calls)."""

    def __init__(self, head: Any):
        self.head = head
        self.classes_ = head.classes_

    def predict_proba(self, F: Any) -> np.ndarray:
        if callable(getattr(self.head, "predict_proba_embeddings", None)):
            return self.head.predict_proba_embeddings(F)
        return np.asarray(self.head.predict_proba(F), dtype=np.float64)


class StaticEmbeddingStage(ModelStage):
    """Static word embeddings with a trained head: a cheap middle stage between TF-IDF and a
    transformer.

    The encoder is MiniLM-L6 distilled by model2vec into static token embeddings
    (:func:`leanscale.models.static_text_encoder`: a text is the mean of its tokens' rows, ~0.3 ms
    a text instead of MiniLM's ~20 ms; ``pip install 'leanscale[static-embeddings]'``); the head is
    a linear or small MLP :class:`~leanscale.cascade.EmbeddingClassifier` on the embeddings,
    optionally on the embeddings stacked with a TF-IDF model's scaled log-probabilities (as
    :class:`leanscale.cascade.stacking.StackedEncoder` does for MiniLM). Build one with
    :meth:`fit`, or wrap a fitted head.

    Parameters:
        head: a fitted model of the features: ``predict_proba_embeddings(F)`` (an
            :class:`EmbeddingClassifier`) or ``predict_proba(F)`` (e.g. a scikit-learn classifier),
            and ``classes_``.
        encoder: a :class:`~leanscale.models.StaticTextEncoder`, any callable ``texts -> (n, d)``,
            or ``None``: the distilled MiniLM in ``cache_dir()/minilm-static-256`` (built there on
            first use, ~15 s; the folder the gateway's semantic cache uses).
        tfidf: a fitted :class:`~leanscale.cascade.TfidfClassifier` whose
            ``STACK_SCALE * log p`` columns follow the embedding (None: the embedding alone).
        name, cost, temperature, batch_size, timeout: as :class:`ModelStage`.

    The stage's transform is Python code, so :meth:`Cascade.save` saves it by name (pass it back
    in ``objects=`` to load).
    """

    def __init__(self, head: Any, encoder: Any = None, name: str = "static", cost: float | None = None, *,
                 tfidf: Any = None, temperature: float = 1.0, batch_size: int = 1024, timeout: float | None = None):
        owner = "StaticEmbeddingStage"
        if getattr(head, "classes_", None) is None or not (
                callable(getattr(head, "predict_proba_embeddings", None)) or callable(getattr(head, "predict_proba", None))):
            raise InvalidParameterError(
                f"The 'head' parameter of {owner} must be a fitted model of embeddings with classes_ and "
                f"predict_proba_embeddings (an EmbeddingClassifier) or predict_proba. Got {type(head).__name__} instead.")
        if encoder is not None and not callable(encoder) and not callable(getattr(encoder, "encode", None)):
            raise InvalidParameterError(
                f"The 'encoder' parameter of {owner} must be None, a StaticTextEncoder or a callable texts -> (n, d). "
                f"Got {type(encoder).__name__} instead.")
        if tfidf is not None and not callable(getattr(tfidf, "predict_proba", None)):
            raise InvalidParameterError(
                f"The 'tfidf' parameter of {owner} must be None or a fitted TfidfClassifier. "
                f"Got {type(tfidf).__name__} instead.")
        self.head, self.encoder, self.tfidf = head, encoder, tfidf
        self._encode_fn = None
        super().__init__(_EmbeddingHead(head), name, cost, transform=self.features, temperature=temperature,
                         batch_size=batch_size, timeout=timeout)

    def _encoder(self):
        if self._encode_fn is None:
            enc = _default_static_encoder() if self.encoder is None else self.encoder
            self._encode_fn = enc.encode if callable(getattr(enc, "encode", None)) else enc
        return self._encode_fn

    def embed(self, texts: Sequence) -> np.ndarray:
        """(n, d) float32 embeddings of ``texts`` by the encoder."""
        texts = [str(t) for t in texts]
        E = np.asarray(self._encoder()(texts), dtype=np.float32)
        if E.ndim != 2 or E.shape[0] != len(texts):
            raise StageError(f"stage {self.name!r}: the encoder returned shape {E.shape} for {len(texts)} texts; "
                             "expected (n, d)")
        return E

    def features(self, texts: Sequence, embeddings: np.ndarray | None = None) -> np.ndarray:
        """The head's input: the embeddings (given, or computed), then the TF-IDF block if any."""
        E = self.embed(texts) if embeddings is None else np.asarray(embeddings, dtype=np.float32)
        if self.tfidf is None:
            return E
        from leanscale.cascade.stacking import STACK_SCALE

        logp = np.log(np.clip(self.tfidf.predict_proba([str(t) for t in texts]), 1e-6, 1.0))
        return np.hstack([E, STACK_SCALE * logp]).astype(np.float32)

    @classmethod
    def fit(cls, texts: Sequence, y: Sequence, *, encoder: Any = None, tfidf: Any = None, hidden: int = 0,
            epochs: int = 20, lr: float = 1e-3, seed: int = 0, name: str = "static", cost: float | None = None,
            embeddings: np.ndarray | None = None, timeout: float | None = None,
            soft_targets: Any = None) -> StaticEmbeddingStage:
        """Train the head on ``texts`` (labels ``y``) and return the stage.

        With ``tfidf``, the head's training features use *cross-fitted* TF-IDF log-probabilities
        (:func:`leanscale.cascade.stacking.cross_fitted_logp`: TF-IDF is over-confident on its own
        training texts) while prediction uses ``tfidf`` itself. ``embeddings``: the texts'
        embeddings when already at hand (skips encoding). ``hidden``: 0 = logistic regression.
        ``soft_targets``: distill a bigger model into the stage -- its class probabilities (n,
        n_classes, columns in the sorted order of ``y``'s classes), as in
        :meth:`EmbeddingClassifier.fit_embeddings`; ``y`` is then the labels where known and the
        bigger model's argmax elsewhere.
        """
        from leanscale.cascade.embedding_head import EmbeddingClassifier

        owner = "StaticEmbeddingStage.fit"
        if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__"):
            raise InvalidParameterError(f"The 'texts' parameter of {owner} must be a list of texts. "
                                        f"Got {type(texts).__name__} instead.")
        texts = [str(t) for t in texts]
        y = list(y)
        if len(texts) != len(y) or not texts:
            raise InvalidParameterError(f"The 'texts' and 'y' parameters of {owner} must be non-empty and of equal "
                                        f"length. Got {len(texts)} texts and {len(y)} labels.")
        stage = cls(_Unfitted(), encoder, name, cost, tfidf=tfidf, timeout=timeout)
        E = stage.embed(texts) if embeddings is None else np.asarray(embeddings, dtype=np.float32)
        if E.ndim != 2 or E.shape[0] != len(texts):
            raise InvalidParameterError(f"The 'embeddings' parameter of {owner} must have shape ({len(texts)}, d). "
                                        f"Got {E.shape}.")
        F = E
        if tfidf is not None:
            from leanscale.cascade.stacking import cross_fitted_logp

            F = np.hstack([E, cross_fitted_logp(texts, y, tfidf.classes_, seed)]).astype(np.float32)
        head = EmbeddingClassifier(encoder=None, hidden=hidden, epochs=epochs, lr=lr, seed=seed).fit_embeddings(
            F, y, soft_targets=soft_targets)
        stage.head = head
        stage.model = _EmbeddingHead(head)
        stage.classes = np.asarray(list(head.classes_), dtype=object)
        return stage


class _Unfitted:  # a placeholder head while StaticEmbeddingStage.fit trains the real one
    classes_ = ()

    def predict_proba(self, F):  # pragma: no cover - replaced before use
        raise StageError("the head is not fitted")


class CallableStage(Stage):
    """Any function: ``fn(items) -> [(label, confidence) or label or None, ...]`` when ``batched``,
    else ``fn(item) -> (label, confidence) | label | None`` per request. A remote endpoint fits here;
    give it a ``timeout`` and the cascade falls back when it is slow: the call then runs on a daemon
    thread of the stage's own, at most ``Cascade.STAGE_CONCURRENCY`` (8) in flight per stage, so a
    hung endpoint makes this stage fail fast and never makes the other stages wait."""

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
