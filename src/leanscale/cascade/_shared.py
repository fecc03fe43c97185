"""What the text classifiers and the router share: argument and label checks, checks of a saved
state's meta, the TF-IDF vectorizer's state, a warning-free logistic regression fit, and the
base class of the text classifiers.

Private to :mod:`leanscale.cascade` (``tfidf``, ``embedding_head`` and ``router`` import it; it
imports none of them). Saved states are untrusted: every ``*_from_meta`` / ``check_*`` here
raises :class:`~leanscale.core.errors.InvalidParameterError` naming the field, which
:func:`leanscale.core.persistence.from_state_of_file` turns into one error naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.estimator import Estimator
from leanscale.core.persistence import Fitted
from leanscale.core.validation import (
    InstanceOf,
    check_consistent_length,
    check_labels,
    check_texts,
    unknown_name_error,
)

INSTALL_CASCADE = "pip install 'leanscale[cascade]'"
MAX_WIDTH = 1 << 16  # widths read from a file (hidden, n_features_in) are at most this
STATE_VERSION = 1  # the "version" of a classifier's / router's meta (its fields), not of the folder layout


class _NgramRange(InstanceOf):
    """The constraint of ``ngram_range``: a pair ``(lo, hi)`` of ints with ``1 <= lo <= hi``."""

    def __init__(self):
        super().__init__(tuple, list, description="a pair (lo, hi) of ints with 1 <= lo <= hi")

    def is_satisfied_by(self, value: Any) -> bool:
        return (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 1 <= value[0] <= value[1])


NGRAM_RANGE = _NgramRange()


def sklearn_text():
    """``(TfidfVectorizer, LogisticRegression)``; a clear error naming the extra when scikit-learn is missing."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise MissingDependencyError(
            f"TF-IDF models need scikit-learn, which is not installed. Install it with: {INSTALL_CASCADE}"
        ) from exc
    return TfidfVectorizer, LogisticRegression


def texts_arg(texts: Any, owner: str, name: str = "texts", min_len: int = 1) -> list[str]:
    return check_texts(name, texts, owner=owner, min_len=min_len)


def labels_arg(y: Any, n: int, owner: str, x_name: str = "texts") -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)`` of the labels ``y`` (length ``n``, at least two classes)."""
    y = check_labels("y", y, owner=owner)
    check_consistent_length(owner, **{x_name: range(n), "y": y})
    if y.dtype.kind == "O":
        for i, v in enumerate(y):
            if not isinstance(v, (str, int, np.integer, bool, np.bool_)):
                raise InvalidParameterError(
                    f"The 'y' parameter of {owner} must hold str, int or bool labels. Got "
                    f"{type(v).__name__} {v!r} at index {i}."
                )
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise InvalidParameterError(f"The 'y' parameter of {owner} must not contain NaN or infinite labels.")
    try:
        classes, codes = np.unique(y, return_inverse=True)
    except TypeError:
        raise InvalidParameterError(
            f"The 'y' parameter of {owner} must hold labels of one type (all str or all int)."
        ) from None
    if len(classes) < 2:
        raise InvalidParameterError(
            f"The 'y' parameter of {owner} must contain at least 2 classes. Got {len(classes)}: {classes.tolist()!r}."
        )
    return classes, codes.reshape(-1)


def classes_to_meta(classes: np.ndarray) -> dict[str, Any]:
    return {"values": np.asarray(classes).tolist(), "dtype": np.asarray(classes).dtype.str}


def _is_label(v: Any) -> bool:
    return isinstance(v, (str, int, bool)) or (isinstance(v, float) and np.isfinite(v))


def classes_from_meta(entry: Any, owner: str = "from_state") -> np.ndarray:
    """The class labels saved by :func:`classes_to_meta` (untrusted: only plain labels, at least 2,
    distinct, with a str/int/bool/object dtype)."""
    values, dtype = (entry.get("values"), entry.get("dtype")) if isinstance(entry, Mapping) else (entry, None)
    if not isinstance(values, list) or len(values) < 2 or not all(_is_label(v) for v in values):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must list at least 2 class labels (str, int or bool). Got "
            f"{short(values)}.")
    if len(set(map(repr, values))) != len(values):
        raise InvalidParameterError(f"The 'meta' parameter of {owner} lists repeated class labels: {short(values)}.")
    if dtype in (None, "|O"):
        return np.asarray(values, dtype=object)
    kinds = {"U": str, "i": int, "u": int, "b": bool, "f": float}
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in kinds or (dt.kind != "U" and dt.itemsize > 8) \
            or not all(type(v) is kinds[dt.kind] for v in values):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} has class dtype {dtype!r} for labels {short(values)}; expected "
            "'|O' or a str/int/bool dtype matching the labels.")
    return np.asarray(values, dtype=str if dt.kind == "U" else dt)


def short(v: Any, n: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def refuse_callable(value: Any, param: str, owner: str, savable: str, how: str) -> None:
    """Refuse to save a ``param`` that is a user callable: code cannot be saved without pickle.

    ``savable`` names the values that can be saved, ``how`` says how to save and get the callable back.
    """
    if callable(value):
        raise InvalidParameterError(
            f"The {param!r} parameter of {owner} is a user callable, which cannot be saved without pickle. "
            f"Only {savable} can be saved: {how}."
        )


def meta_params(meta: Mapping[str, Any], names: Sequence[str], owner: str) -> dict[str, Any]:
    params = meta.get("params")
    if not isinstance(params, Mapping):
        raise InvalidParameterError(f"The 'meta' parameter of {owner} must hold 'params', a dict. Got {short(params)}.")
    for k in params:
        if k not in names:
            raise unknown_name_error("meta['params']", k, names, owner=owner)
    return dict(params)


def meta_int(meta: Mapping[str, Any], key: str, owner: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must have {key!r} an int in [{lo}, {hi}]. Got {short(v)}.")
    return v


def finite_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple, owner: str) -> np.ndarray:
    arr = np.asarray(arrays[key])
    if tuple(arr.shape) != tuple(shape):
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} has {key!r} of shape {tuple(arr.shape)}; expected {tuple(shape)}.")
    if arr.dtype.kind not in "biuf" or (arr.size and not np.isfinite(arr).all()):
        raise InvalidParameterError(f"The 'arrays' parameter of {owner} has {key!r} with non-finite or non-numeric values.")
    return arr


def check_meta(meta: Any, arrays: Any, kind: str, required_arrays: Sequence[str]) -> dict[str, np.ndarray]:
    owner = f"{kind}.from_state"
    if not isinstance(meta, Mapping):
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} must be the dict returned by get_state. Got {type(meta).__name__}."
        )
    if meta.get("class") != kind:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} describes a {meta.get('class')!r}, not a {kind!r}."
        )
    if meta.get("version") != STATE_VERSION:
        raise InvalidParameterError(
            f"The 'meta' parameter of {owner} has state version {meta.get('version')!r}; this leanscale "
            f"reads version {STATE_VERSION}."
        )
    if not isinstance(arrays, Mapping):
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} must be the dict of arrays returned by get_state. "
            f"Got {type(arrays).__name__}."
        )
    missing = [k for k in required_arrays if k not in arrays]
    if missing:
        raise InvalidParameterError(
            f"The 'arrays' parameter of {owner} is missing {', '.join(map(repr, missing))}."
        )
    out = {}
    for k, v in arrays.items():
        arr = np.asarray(v)
        if not isinstance(k, str) or arr.dtype.kind not in "biuf":
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} must map str names to numeric arrays. Got {k!r} of dtype {arr.dtype}.")
        out[k] = arr
    return out


DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's; the only one leanscale saves
MAX_NGRAM = 16


def tfidf_state(vectorizer: Any) -> tuple[dict[str, Any], np.ndarray]:
    """``(meta, idf)`` of a fitted TfidfVectorizer: its vocabulary in column order and the
    parameters that affect ``transform``. Used by the classifier and the router."""
    vocab = vectorizer.vocabulary_
    terms: list[str] = [""] * len(vocab)
    for term, j in vocab.items():
        terms[j] = term
    meta = {
        "vocabulary": terms,
        "ngram_range": list(vectorizer.ngram_range),
        "sublinear_tf": bool(vectorizer.sublinear_tf),
        "lowercase": bool(vectorizer.lowercase),
        "norm": vectorizer.norm,
        "use_idf": bool(vectorizer.use_idf),
        "smooth_idf": bool(vectorizer.smooth_idf),
        "token_pattern": vectorizer.token_pattern,
        "analyzer": vectorizer.analyzer,
    }
    return meta, np.asarray(vectorizer.idf_, dtype=np.float64)


def tfidf_from_state(meta: Mapping[str, Any], idf: np.ndarray, owner: str = "tfidf_from_state") -> Any:
    r"""A TfidfVectorizer with the saved fixed vocabulary and ``idf_`` (no refit).

    ``meta`` is untrusted: the analyzer must be ``"word"`` and the token pattern scikit-learn's
    default ``(?u)\b\w\w+\b``, the only one leanscale writes; any other pattern is refused (one
    such as ``(?:\w+)+#`` would take exponential time on Python's ``re``). The vectorizer then
    uses leanscale's own constant :data:`DEFAULT_TOKEN_PATTERN`, never the file's string. That
    pattern runs in linear time on ``re``: ``findall`` tries each maximal run of word characters
    once, ``\w+`` takes the whole run and the closing ``\b`` then holds, so nothing backtracks.
    (RE2 would also do, but its Python ``findall`` was about 10x slower in a one-off check while
    writing this, 20,000 short texts; not a committed benchmark.)
    """
    TfidfVectorizer, _ = sklearn_text()
    if not isinstance(meta, Mapping):
        raise InvalidParameterError(f"The TF-IDF state of {owner} must be a dict. Got {short(meta)}.")
    where = f"The TF-IDF state of {owner}"
    missing = [k for k in ("vocabulary", "ngram_range", "sublinear_tf", "lowercase", "norm", "use_idf",
                           "smooth_idf", "token_pattern", "analyzer") if k not in meta]
    if missing:
        raise InvalidParameterError(f"{where} is missing {', '.join(map(repr, missing))}.")
    if meta["token_pattern"] != DEFAULT_TOKEN_PATTERN:
        raise InvalidParameterError(
            f"{where} has token_pattern {short(meta['token_pattern'])}; only scikit-learn's default "
            f"{DEFAULT_TOKEN_PATTERN!r} is accepted from a file (other patterns could take exponential time "
            "on Python's re).")
    if meta["analyzer"] != "word":
        raise InvalidParameterError(f"{where} has analyzer {short(meta['analyzer'])}; expected 'word'.")
    terms = meta["vocabulary"]
    if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t for t in terms):
        raise InvalidParameterError(f"{where} must have 'vocabulary', a non-empty list of non-empty strings.")
    if len(set(terms)) != len(terms):
        raise InvalidParameterError(f"{where} has repeated vocabulary terms.")
    ng = meta["ngram_range"]
    if (not isinstance(ng, (list, tuple)) or len(ng) != 2 or not all(type(v) is int for v in ng)
            or not 1 <= ng[0] <= ng[1] <= MAX_NGRAM):
        raise InvalidParameterError(f"{where} has ngram_range {short(ng)}; expected [lo, hi] with 1 <= lo <= hi <= {MAX_NGRAM}.")
    for k in ("sublinear_tf", "lowercase", "use_idf", "smooth_idf"):
        if not isinstance(meta[k], bool):
            raise InvalidParameterError(f"{where} has {k}={short(meta[k])}; expected true or false.")
    if meta["norm"] not in ("l1", "l2", None):
        raise InvalidParameterError(f"{where} has norm {short(meta['norm'])}; expected 'l1', 'l2' or null.")
    idf = np.asarray(idf)
    if idf.shape != (len(terms),):
        raise InvalidParameterError(
            f"The saved TF-IDF state is inconsistent: {len(terms)} vocabulary terms but idf of shape {idf.shape}."
        )
    if idf.dtype.kind not in "iuf" or not np.isfinite(idf).all():
        raise InvalidParameterError(f"{where} has non-finite or non-numeric idf values.")
    vec = TfidfVectorizer(
        vocabulary={t: j for j, t in enumerate(terms)},
        ngram_range=(ng[0], ng[1]),
        sublinear_tf=meta["sublinear_tf"],
        lowercase=meta["lowercase"],
        norm=meta["norm"],
        use_idf=meta["use_idf"],
        smooth_idf=meta["smooth_idf"],
        token_pattern=DEFAULT_TOKEN_PATTERN,  # the constant, not the file's string
        analyzer="word",
        dtype=np.float64,
    )
    vec.idf_ = idf.astype(np.float64)
    return vec


def fit_logistic(LogisticRegression: Any, X: Any, y: np.ndarray, **params: Any) -> tuple[Any, bool]:
    """Fit a LogisticRegression; return it and whether the solver converged (no warning escapes:
    a time-bounded fit that stops at ``max_iter`` is recorded in ``converged_`` instead)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr = LogisticRegression(**params).fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # anything else is re-emitted
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return lr, converged


class TextClassifier(Estimator, Fitted):
    """Base of the text classifiers: the parameter contract (:class:`~leanscale.core.estimator.Estimator`),
    ``save``/``load`` (:class:`~leanscale.core.persistence.Fitted`) and ``predict``."""

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """The most probable class of each text."""
        proba = self.predict_proba(texts)
        return self.classes_[proba.argmax(axis=1)]
