"""``Cascade``: answer with the cheapest stage that is confident enough; the big model only sees
what the cheap ones leave (Wang et al. 2022, "Wisdom of Committees", arXiv 2012.01988; Chen,
Zaharia and Zou 2023, "FrugalGPT", arXiv 2305.05176).

A scikit-learn-style classifier over a list of :mod:`stages <leanscale.cascade.stages>`::

    cascade = Cascade([RegexStage(rules, cost=0.001), ModelStage(tfidf, cost=0.05),
                       ModelStage(big, cost=2.0)], target_accuracy=0.9).fit(X_cal, y_cal)
    cascade.predict(X)          # labels
    cascade.frontier_           # every Pareto-optimal (cost, accuracy) threshold setting
    print(cascade.explain())    # what each threshold means on the calibration data

``fit`` runs every stage once on held-out calibration data, then finds the **exact** Pareto
frontier of mean cost vs accuracy over all per-stage thresholds (each stage may also be switched
off) with :func:`leanscale.cascade.search.frontier`, and picks from it:

* ``target_accuracy``: the cheapest setting whose calibration accuracy is >= the target (an error
  says what is reachable when nothing is);
* ``budget``: the most accurate setting whose mean cost per request is <= the budget;
* neither: the target is the last (biggest) stage's own accuracy -- "as good as the big model,
  for less";
* ``guarantee=True``: the calibration set is split (``guarantee_split``) into a selection half,
  whose frontier orders the candidates from most to least accurate, and a test half, on which
  fixed-sequence binomial tests certify them (Learn-then-Test); the chosen setting has accuracy >=
  ``target_accuracy`` with probability >= 1 - ``delta`` over the draw of the calibration data,
  provided future requests come from the same distribution.

``calibrate=True`` fits a temperature per model stage (on the selection data) so that thresholds
read as probabilities.

``deferral="learned"`` thresholds a *learned* score instead of the raw confidence: per stage, a
logistic regression on its confidence, margin, entropy, the request's length and its agreement
with the earlier stages predicts "is this stage's answer right?", cross-fitted on the calibration
data (no request's own label enters the score its threshold is chosen on); every subset of
switched-on stages gets its own models and the frontiers are merged
(:mod:`leanscale.cascade.deferral`). The default, ``"confidence"``, is the raw confidence.

Serving never loses a request: a stage that raises, answers in the wrong format or exceeds its
``timeout`` is counted in ``errors_`` and the batch goes to the next stage; what no stage answers
gets the most confident answer seen on the way (or ``fallback_label``). :meth:`predict_detailed`
reports, per request, the label, the answering stage, its confidence and the cost paid.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from leanscale.cascade import search as _search
from leanscale.cascade.stages import (
    CallableStage,
    ModelStage,
    RegexStage,
    RuleStage,
    Stage,
    StageError,
    _re2,
    measure_cost,
)
from leanscale.core.deprecation import renamed_argument
from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
    LeanscaleError,
    MissingDependencyError,
)
from leanscale.core.estimator import Estimator
from leanscale.core.io import atomic_write_json, to_jsonable
from leanscale.core.persistence import (
    fitted_class,
    read_arrays_checked,
    read_json_file,
    write_arrays_addressed,
)
from leanscale.core.validation import (
    Interval,
    Options,
    check_consistent_length,
    check_is_fitted,
    check_items,
)

__all__ = ["FALLBACK", "Cascade", "CascadeOutput", "ExternalStageWarning",
           "UnansweredWarning"]  # re-exported by leanscale.cascade

FALLBACK = "fallback"  # the "stage" of a request no stage answered
FORMAT_VERSION = 2  # 2: model stages saved with skops or as an exported torch graph; 1 is still read
_VERSION_WITHOUT_EXTERNAL_MODELS = 1  # written when no stage needs version 2 (older leanscale reads it)


class UnansweredWarning(UserWarning):
    """:meth:`Cascade.predict` returned ``None`` for requests that no stage answered."""


class ExternalStageWarning(UserWarning):
    """:meth:`Cascade.save` saved a model stage by name (``"external"``): its model or transform is
    user code, so loading, evaluating or serving the file needs it back in ``objects=``."""


class CascadeOutput(NamedTuple):
    """Per request: ``labels``, ``stage`` (name of the answering stage, or ``"fallback"``),
    ``confidence`` and ``cost`` (sum of the costs of the stages it went through); plus ``errors``,
    the stages that failed on this batch (name -> number of requests they failed on).

    ``answered`` (bool per request) is False where no stage gave any answer: the label there is
    ``fallback_label`` (``None`` unless configured) -- not a prediction. ``failed`` (per request, a
    tuple of the names of the stages that failed on it) and ``reasons`` (stage name -> the last
    failure message) say why."""

    labels: np.ndarray
    stage: np.ndarray
    confidence: np.ndarray
    cost: np.ndarray
    errors: dict
    answered: np.ndarray | None = None
    failed: np.ndarray | None = None
    reasons: dict | None = None


def _fit_temperature(proba: np.ndarray, y_index: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``softmax(log p / T)`` (Guo et al.
    2017); searched on log T in [1/20, 20]."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(proba, 1e-12, 1.0))
    ok = y_index >= 0
    logp, yi = logp[ok], y_index[ok]
    if len(yi) == 0:
        return 1.0

    def nll(log_t):
        z = logp / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(yi)), yi] - np.log(np.exp(z).sum(axis=1))).mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(res.x))


# ------------------------------------------------------------------------------ input checks


def _check_X(X: Any, owner: str) -> list:
    """The requests ``X`` as a list. A bare ``str`` (or bytes) is refused: iterating it would make
    one request per character."""
    if isinstance(X, (str, bytes, bytearray)):
        raise InvalidParameterError(
            f"The 'X' parameter of {owner} must be a list of requests, e.g. [{X[:40]!r}] for a single one. "
            f"Got a single {type(X).__name__}, which would be read as one request per character."
        )
    if isinstance(X, Mapping) or not hasattr(X, "__iter__"):
        raise InvalidParameterError(
            f"The 'X' parameter of {owner} must be a list of requests. Got {type(X).__name__} instead.")
    return list(X)


def _check_y(y: Any, owner: str) -> np.ndarray:
    """The labels ``y`` as a 1-d object array; ``None``/NaN (a missing label) and unhashable labels
    are refused, and so is a bare ``str`` (one label per character)."""
    if hasattr(y, "detach") and hasattr(y, "cpu"):
        y = y.detach().cpu().numpy()
    if isinstance(y, (str, bytes, bytearray)) or isinstance(y, Mapping) or not hasattr(y, "__iter__"):
        raise InvalidParameterError(
            f"The 'y' parameter of {owner} must be a list of labels, one per request. Got {type(y).__name__} instead.")
    items = list(y)
    arr = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
            raise InvalidParameterError(
                f"The 'y' parameter of {owner} must not contain missing labels (None or NaN). Got {v!r} at index {i}.")
        try:
            hash(v)
        except TypeError:
            raise InvalidParameterError(
                f"The 'y' parameter of {owner} must hold hashable labels (str, int, ...). Got {type(v).__name__} "
                f"{v!r} at index {i}.") from None
        arr[i] = v
    return arr


# --------------------------------------------------------------------- reading a saved cascade

MAX_CASCADE_BYTES = 256 << 20  # a cascade JSON (vocabularies included) is at most 256 MiB
_MAX_ITEMS = 1_000_000  # list lengths read from a file (classes, frontier points, patterns)
_MODEL_CLASSES = ("TfidfClassifier", "EmbeddingClassifier", "EmbeddingModuleClassifier")
_NEW_MODEL_CLASSES = ("skops", "torch.graph")  # external_models.KINDS (that module imports torch: lazily)
_MAX_TIMEOUT = 7 * 86400.0  # a stage timeout read from a file (threading refuses ~1e308)
_MISSING = object()
_UNSET = object()  # Cascade(random_state=) not given


class _NoneArg:  # the value None passed under the old name random_state= (renamed_argument reads None as absent)
    def __repr__(self) -> str:
        return "None"


_NONE = _NoneArg()


def _short(v: Any, n: int = 100) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _is_label(v: Any) -> bool:
    return isinstance(v, (str, int, bool)) or (isinstance(v, float) and math.isfinite(v))


class _SavedDoc:
    """Field checks of an untrusted cascade JSON; every error names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, where: str, expected: str, got: Any = _MISSING) -> DataFormatError:
        msg = f"The cascade file {str(self.path)!r} is invalid: {where} must be {expected}"
        return DataFormatError(msg + ("." if got is _MISSING else f". Got {_short(got)}."))

    def get(self, d: Any, key: str, where: str) -> Any:
        if not isinstance(d, dict):
            raise self.error(where, "a JSON object", d)
        if key not in d:
            raise self.error(f"{where}[{key!r}]", "present (the key is missing)")
        return d[key]

    def num(self, v: Any, where: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            none: bool = False, open_lo: bool = False) -> Any:
        if v is None and none:
            return None
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        bad = isinstance(v, bool) or not ok or not math.isfinite(v) or (lo is not None and (v < lo or (open_lo and v == lo))) \
            or (hi is not None and v > hi)
        if bad:
            rng = f"{'(' if open_lo else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise self.error(where, f"{'an integer' if integer else 'a finite number'} in {rng}"
                             + (" or null" if none else ""), v)
        return v

    def boolean(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise self.error(where, "true or false", v)
        return v

    def lst(self, v: Any, where: str, min_len: int = 0, max_len: int = _MAX_ITEMS) -> list:
        if not isinstance(v, list) or not min_len <= len(v) <= max_len:
            raise self.error(where, f"a list of {min_len} to {max_len:,} items", v)
        return v

    def label(self, v: Any, where: str, none: bool = False) -> Any:
        if (v is None and none) or _is_label(v):
            return v
        raise self.error(where, "a label (a string, an integer, a finite number or a boolean)", v)

    def names_dict(self, v: Any, where: str, keys: Sequence[str], value) -> dict:
        if not isinstance(v, dict) or set(v) != set(keys):
            raise self.error(where, f"an object with exactly the keys {list(keys)}", v)
        for k in keys:
            value(v[k], f"{where}[{k!r}]")
        return v


def _arrays_files_of(path: Path) -> set[str]:
    """The arrays files the cascade JSON at ``path`` (if any) names and that a save of this stem
    writes; never raises (a damaged previous save leaves nothing to clean up)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_CASCADE_BYTES:
            return set()
        doc = json.loads(path.read_text(encoding="utf-8"))
        out = set()
        for d in doc.get("stages", []):
            entries = [d.get("model"), d.get("transform")] if isinstance(d, dict) else []
            for m in entries:
                for key in ("arrays", "file"):
                    name = m.get(key) if isinstance(m, dict) else None
                    if isinstance(name, str) and name == Path(name).name and name.startswith(f"{path.stem}.") \
                            and name.endswith((".arrays", ".npz", ".skops")):
                        out.add(name)
        return out
    except Exception:
        return set()


_TRANSFORM_HINT = (
    "To save it without user code, give ModelStage a fitted scikit-learn transformer as transform= (e.g. a "
    "TfidfVectorizer or HashingVectorizer, saved with skops), put the feature computation inside the exported torch "
    "module or a scikit-learn Pipeline, or use a built-in text model (TfidfClassifier, EmbeddingClassifier)")


def _external(stage: ModelStage, reason: str, hint: str = "") -> str:
    warnings.warn(
        f"Cascade.save: model stage {stage.name!r} is saved by name ('external') because {reason}. Loading, evaluating "
        f"or serving the file needs it back: Cascade.load(path, objects={{{stage.name!r}: <the ModelStage, or its "
        f"model when it has no transform>}}) or `leanscale serve --objects module:NAME`." + (f" {hint}." if hint else ""),
        ExternalStageWarning, stacklevel=4)
    return "external"


def _save_model_stage(s: ModelStage, folder: Path, prefix: str, written: set[str]) -> tuple[Any, dict | None]:
    """``(model entry, transform entry or None)`` of a model stage's JSON; the files they name are
    written into ``folder`` (and added to ``written``). A stage that cannot be saved as data gets
    ``("external", None)`` and an :class:`ExternalStageWarning`."""
    if s.transform is not None and callable(s.transform):
        return _external(s, "its transform is a Python callable (user code, which cannot be saved without pickle)",
                         _TRANSFORM_HINT), None
    if hasattr(s.model, "get_state") and s.transform is None:  # leanscale's own text models
        meta, arrays = s.model.get_state()
        name, digest = write_arrays_addressed(folder, prefix, arrays, suffix=".arrays")
        written.add(name)
        return {"class": type(s.model).__name__, "meta": meta, "arrays": name, "sha256": digest}, None
    from leanscale.cascade import external_models as ext

    part = "its transform"
    try:
        transform = None
        if s.transform is not None:
            data = ext.sklearn_dumps(s.transform)
            name, digest = ext.write_file_addressed(folder, prefix + "transform.", data, ".skops")
            written.add(name)
            transform = {"class": ext.SKOPS_KIND, "format_version": ext.EXTERNAL_VERSION, "file": name,
                         "sha256": digest}
        part = "its model"
        if s.is_torch:
            spec, arrays = ext.torch_export(s.model, s._example_input)
            name, digest = write_arrays_addressed(folder, prefix, arrays, suffix=".arrays")
            model = {"class": ext.TORCH_KIND, "format_version": ext.EXTERNAL_VERSION, "graph": spec, "arrays": name,
                     "sha256": digest}
        elif hasattr(s.model, "get_state"):
            meta, arrays = s.model.get_state()
            name, digest = write_arrays_addressed(folder, prefix, arrays, suffix=".arrays")
            model = {"class": type(s.model).__name__, "meta": meta, "arrays": name, "sha256": digest}
        else:
            data = ext.sklearn_dumps(s.model)
            name, digest = ext.write_file_addressed(folder, prefix, data, ".skops")
            model = {"class": ext.SKOPS_KIND, "format_version": ext.EXTERNAL_VERSION, "file": name, "sha256": digest}
        written.add(name)
    except ext.NotSavable as exc:
        return _external(s, f"{part} ({type(s.transform if part == 'its transform' else s.model).__name__}) cannot be "
                         f"saved as data: {exc}"), None
    except MissingDependencyError as exc:
        return _external(s, str(exc)), None
    return model, transform


def _load_external_model(v: _SavedDoc, path: Path, where: str, m: Any, n_classes: int | None) -> Any:
    """A scikit-learn object (skops) or a torch graph named by a cascade JSON's model entry."""
    from leanscale.cascade import external_models as ext
    from leanscale.core.persistence import check_format_version

    kind = m["class"]
    keys = {"class", "format_version", "file", "sha256"} if kind == ext.SKOPS_KIND else \
        {"class", "format_version", "graph", "arrays", "sha256"}
    if set(m) != keys:
        raise v.error(where, f"an object with exactly the keys {sorted(keys)}", sorted(m))
    check_format_version(m, what=f"{where} entry of the cascade file {str(path)!r}", current=ext.EXTERNAL_VERSION,
                         default=None)
    what = f"file of {where} of {str(path)!r}"
    if kind == ext.SKOPS_KIND:
        data = ext.read_file_checked(path.parent, m["file"], m["sha256"], what=what, max_bytes=ext.MAX_SKOPS_BYTES)
        return ext.sklearn_loads(data, f"{what} {m['file']!r}")
    if not isinstance(m["sha256"], str):
        raise v.error(f"{where}['sha256']", "a sha256 hex digest", m["sha256"])
    arrays = read_arrays_checked(path.parent, m["arrays"], m["sha256"], what=f"arrays {what}")
    graph = ext.torch_from_saved(m["graph"], arrays, f"torch graph of {where} in {str(path)!r}")
    ext.probe(graph, m["graph"], n_classes, f"torch graph of {where} in {str(path)!r}")
    return graph


def _stage_failed(name: str, exc: Exception, remaining: np.ndarray, errors: dict, reasons: dict, failed: list) -> None:
    """Book a stage failure: every request in ``remaining`` falls through to the next stage."""
    errors[name] = errors.get(name, 0) + int(remaining.size)
    reasons[name] = str(exc)
    for i in remaining:
        failed[i].append(name)


class Cascade(Estimator):
    """See the module docstring. Learned attributes: ``thresholds_`` (stage name -> threshold or
    ``None`` for off; the last stage has none), ``costs_``, ``frontier_`` (a
    :class:`~leanscale.cascade.search.FrontierResult` on all calibration data), ``choice_`` (index
    into ``frontier_`` of the chosen setting when it lies on it), ``calibration_`` (per-stage
    fractions answered and accuracies), ``guarantee_`` (the test's details), ``errors_``
    (stage -> failures seen by predict), ``classes_``, ``deferral_`` (``deferral="learned"``: stage
    name -> its :class:`~leanscale.cascade.deferral.DeferralModel`, for the switched-on stages;
    None otherwise)."""

    _parameter_constraints = {
        "target_accuracy": [Interval("real", 0, 1, closed="both"), None],
        "budget": [Interval("real", 0, None, closed="left"), None],
        "guarantee": [bool],
        "delta": [Interval("real", 0, 1, closed="neither")],
        "guarantee_split": [Interval("real", 0, 1, closed="neither")],
        "calibrate": [bool],
        "max_thresholds": [Interval(int, 2, None), None],
        "seed": [Interval(int, 0, None), None],
        "deferral": [Options(("confidence", "learned"))],
    }
    _renamed = {"random_state": "seed"}  # the old name works for one release, with a FutureWarning

    def __init__(self, stages: Sequence[Stage], *, target_accuracy: float | None = None,
                 budget: float | None = None, guarantee: bool = False, delta: float = 0.05,
                 guarantee_split: float = 0.5, calibrate: bool = False, max_thresholds: int | None = None,
                 fallback_label: Any = None, seed: int | None = 0, random_state: Any = _UNSET,
                 deferral: str = "confidence"):
        self.stages = stages
        self.target_accuracy = target_accuracy
        self.budget = budget
        self.guarantee = guarantee
        self.delta = delta
        self.guarantee_split = guarantee_split
        self.calibrate = calibrate
        self.max_thresholds = max_thresholds
        self.fallback_label = fallback_label
        if random_state is not _UNSET:  # the old name; None (unseeded) is a value here, not "absent"
            seed = renamed_argument("Cascade", "random_state", "seed",
                                    _NONE if random_state is None else random_state, seed, 0)
            seed = None if seed is _NONE else seed
        self.seed = seed
        self.deferral = deferral
        self._lock = threading.Lock()
        # per stage name: a semaphore bounding its calls in flight (see _call); hung calls of one
        # stage hold only that stage's slots, never another stage's capacity
        self._stage_slots: dict[str, threading.BoundedSemaphore] = {}

    # ------------------------------------------------------------------ parameters
    @property
    def random_state(self) -> int | None:
        """Deprecated name of :attr:`seed` (a ``FutureWarning``; removed in the next release)."""
        warnings.warn("Cascade.random_state was renamed to Cascade.seed and will be removed in the next release.",
                      FutureWarning, stacklevel=2)
        return self.seed

    @random_state.setter
    def random_state(self, value: int | None) -> None:
        warnings.warn("Cascade.random_state was renamed to Cascade.seed and will be removed in the next release.",
                      FutureWarning, stacklevel=2)
        self.seed = value

    def _validate(self) -> list[Stage]:
        self._validate_params()
        stages = check_items("stages", self.stages, Stage, owner="Cascade", reusable=True, noun="stages",
                             what="Stage objects (RegexStage, RuleStage, ModelStage, CallableStage)")
        names = [s.name for s in stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidParameterError(f"The 'stages' parameter of Cascade has repeated stage names {dup}; names must be unique.")
        if self.target_accuracy is not None and self.budget is not None:
            raise InvalidParameterError(
                "The 'target_accuracy' and 'budget' parameters of Cascade are exclusive: give one "
                f"(got target_accuracy={self.target_accuracy!r}, budget={self.budget!r})."
            )
        if self.guarantee and self.target_accuracy is None:
            raise InvalidParameterError("The 'target_accuracy' parameter of Cascade is required when guarantee=True.")
        if self.guarantee and self.deferral == "learned":
            raise InvalidParameterError(
                "The 'deferral' parameter of Cascade is 'learned', which is not available with guarantee=True (the "
                "deferral models would have to be fitted on the selection half only); use deferral='confidence'.")
        return list(stages)

    # ------------------------------------------------------------------------------ fitting
    def _run_all(self, stages: list[Stage], X: list) -> list:
        outs = []
        for s in stages:
            try:
                outs.append(s.predict(X))
            except StageError as exc:
                raise InvalidParameterError(
                    f"The 'stages' parameter of Cascade has stage {s.name!r}, which failed on the calibration data: {exc}"
                ) from exc
        return outs

    def fit(self, X: Sequence, y: Sequence) -> Cascade:
        """Run every stage on the calibration data ``X`` (labels ``y``), find the frontier and
        choose the thresholds. Returns self."""
        stages = self._validate()
        X = _check_X(X, "Cascade.fit")
        y = _check_y(y, "Cascade.fit")
        check_consistent_length("Cascade.fit", X=X, y=y)
        if len(X) < 2:
            raise InvalidParameterError(f"The 'X' parameter of Cascade.fit must hold at least 2 requests. Got {len(X)}.")
        n = len(X)
        rng = np.random.default_rng(self.seed)
        if self.guarantee:
            perm = rng.permutation(n)
            n_sel = int(round(self.guarantee_split * n))
            if n_sel < 1 or n - n_sel < 1:
                raise InvalidParameterError(
                    f"The 'guarantee_split' parameter of Cascade leaves an empty split of {n} requests. "
                    "Use more calibration data.")
            sel, test = np.sort(perm[:n_sel]), np.sort(perm[n_sel:])
        else:
            sel, test = np.arange(n), None

        # temperatures (on the selection data only: the test half must stay untouched)
        self.temperatures_ = {}
        if self.calibrate:
            for s in stages:
                if isinstance(s, ModelStage):
                    s.temperature = 1.0
                    proba = s.predict_proba([X[i] for i in sel])
                    index = {c: j for j, c in enumerate(s.classes.tolist())}
                    yi = np.array([index.get(v, -1) for v in y[sel]])
                    s.temperature = _fit_temperature(proba, yi)
                    self.temperatures_[s.name] = s.temperature

        # costs: declared, or measured on (up to 256 of) the calibration requests
        self.costs_ = {}
        for s in stages:
            self.costs_[s.name] = s.cost if s.cost is not None else measure_cost(s, X[: min(n, 256)])
        costs = np.array([self.costs_[s.name] for s in stages])

        outs = self._run_all(stages, X)
        answered = np.stack([o.answered for o in outs])
        conf = np.stack([o.confidence for o in outs])
        correct = np.stack([np.array([a and lab == t for a, lab, t in zip(o.answered, o.labels, y)]) for o in outs])
        self._cal = (answered, conf, correct, costs)

        last_alone = tuple([None] * (len(stages) - 1))
        _, last_acc, _ = _search.evaluate_config(last_alone, answered, conf, correct, costs)
        self.reference_accuracy_ = float(last_acc)
        self.guarantee_ = None
        self.deferral_ = None

        if self.deferral == "learned":
            from leanscale.cascade import deferral as _deferral

            lf = _deferral.learned_frontier(outs, correct, costs, _deferral._lengths(X), [s.name for s in stages],
                                            seed=self.seed, max_thresholds=self.max_thresholds)
            self.frontier_ = lf.frontier
            thr = self._choose(self.frontier_)
            subset = tuple(k for k, t in enumerate(thr) if t is not None)
            self._cal = (answered, lf.scores[subset], correct, costs)  # the thresholds apply to these scores
            self.deferral_ = {stages[k].name: m for k, m in lf.models[subset].items()}
        elif self.guarantee:
            self.frontier_ = _search.frontier(answered, conf, correct, costs, self.max_thresholds)
            thr = self._choose_guaranteed(answered, conf, correct, costs, sel, test)
        else:
            self.frontier_ = _search.frontier(answered, conf, correct, costs, self.max_thresholds)
            thr = self._choose(self.frontier_)
        self._set_thresholds(stages, thr)
        labels = set()
        for s in stages:
            if isinstance(s, ModelStage):
                labels.update(s.classes.tolist())
            elif isinstance(s, RegexStage):
                labels.update(lab for _, lab in s.patterns)
        labels.update(y.tolist())
        self.classes_ = np.array(sorted(labels, key=str), dtype=object)
        self.errors_ = {s.name: 0 for s in stages}
        return self

    def _target(self) -> float | None:
        if self.target_accuracy is not None:
            return float(self.target_accuracy)
        if self.budget is not None:
            return None
        return self.reference_accuracy_

    def _choose(self, fr: _search.FrontierResult) -> tuple:
        target = self._target()
        if target is None:
            ok = np.flatnonzero(fr.cost <= self.budget + 1e-12)
            if ok.size == 0:
                raise InvalidParameterError(
                    f"The 'budget' parameter of Cascade is {self.budget!r}, below the cheapest setting found "
                    f"(mean cost {fr.cost[0]:.6g} per request, accuracy {fr.accuracy[0]:.4f})."
                )
            i = int(ok[-1])  # most accurate within budget (the frontier is sorted by cost)
        else:
            ok = np.flatnonzero(fr.accuracy >= target - 1e-12)
            if ok.size == 0:
                raise InvalidParameterError(
                    f"The 'target_accuracy' parameter of Cascade is {target!r}, but no combination of stages reaches "
                    f"it on the calibration data: the best reachable accuracy is {fr.accuracy[-1]:.4f} "
                    f"(mean cost {fr.cost[-1]:.6g} per request)."
                )
            i = int(ok[0])  # cheapest reaching the target
        self.choice_ = i
        return fr.thresholds[i]

    def _choose_guaranteed(self, answered, conf, correct, costs, sel, test) -> tuple:
        target, delta = float(self.target_accuracy), float(self.delta)
        fr_sel = _search.frontier(answered[:, sel], conf[:, sel], correct[:, sel], costs, self.max_thresholds)
        order = np.argsort(-fr_sel.accuracy, kind="stable")  # most accurate first
        n_correct = []
        for i in order:
            _, acc, _ = _search.evaluate_config(fr_sel.thresholds[i], answered, conf, correct, costs, idx=test)
            n_correct.append(int(round(acc * len(test))))
        certified, p_values = _search.fixed_sequence_test(n_correct, len(test), target, delta)
        if certified == 0:
            best = max(n_correct) / len(test) if n_correct else float("nan")
            raise InvalidParameterError(
                f"The 'target_accuracy' parameter of Cascade is {target!r}, which cannot be certified at "
                f"delta={delta!r} with {len(test)} test requests: the most accurate setting scores {best:.4f} on them "
                f"(p-value {p_values[0]:.3g}). Lower the target or delta, or add calibration data."
            )
        # the cheapest certified setting (certified ones are a prefix of the accuracy order)
        cands = [order[j] for j in range(certified)]
        pick = min(cands, key=lambda i: (fr_sel.cost[i], -fr_sel.accuracy[i]))
        j = int(np.flatnonzero(order == pick)[0])
        self.choice_ = None
        self.guarantee_ = {
            "target_accuracy": target, "delta": delta, "n_selection": len(sel), "n_test": len(test),
            "n_candidates": len(order), "n_certified": int(certified),
            "test_accuracy": n_correct[j] / len(test), "p_value": p_values[j],
            "selection_cost": float(fr_sel.cost[pick]),
        }
        return fr_sel.thresholds[pick]

    def _set_thresholds(self, stages: list[Stage], thr: tuple) -> None:
        self.thresholds_ = {s.name: (None if t is None else float(t)) for s, t in zip(stages[:-1], thr)}
        answered, conf, correct, costs = self._cal
        cost, acc, stage = _search.evaluate_config(thr, answered, conf, correct, costs)
        self.expected_cost_, self.expected_accuracy_ = float(cost), float(acc)
        cal = {}
        for k, s in enumerate(stages):
            sel = stage == k
            cal[s.name] = {
                "threshold": self.thresholds_.get(s.name, "always") if k < len(stages) - 1 else "always",
                "on": k == len(stages) - 1 or self.thresholds_[s.name] is not None,
                "answered_fraction": float(sel.mean()),
                "accuracy_when_answering": float(correct[k, sel].mean()) if sel.any() else None,
                "cost": float(costs[k]),
            }
        cal[FALLBACK] = {"answered_fraction": float((stage == -1).mean())}
        self.calibration_ = cal

    # --------------------------------------------------------------------------- prediction
    # The most calls of one stage in flight at once (a call that overran its timeout still holds
    # its slot until it really returns); further calls of that stage fail at once and fall through.
    STAGE_CONCURRENCY = 8

    def _call(self, stage: Stage, items: list):
        """``stage.predict(items)``; under the stage's ``timeout`` when it has one.

        A stage with a timeout runs on a daemon thread of its own, bounded per stage: at most
        ``STAGE_CONCURRENCY`` calls of that stage (``stage.max_concurrency`` overrides it) may be in
        flight, counting calls that overran their timeout and are still running (a Python thread
        cannot be interrupted). When all its slots are held by hung calls the stage fails at once
        with :class:`StageError` -- the requests fall to the next stage without waiting -- and a
        hung stage never holds the capacity of another one. Daemon threads: a hung call does not
        keep the process alive at exit."""
        if stage.timeout is None:
            return stage.predict(items)
        limit = int(getattr(stage, "max_concurrency", None) or self.STAGE_CONCURRENCY)
        with self._lock:
            slots_by_stage = self.__dict__.setdefault("_stage_slots", {})
            slots = slots_by_stage.get(stage.name)
            if slots is None:
                slots = slots_by_stage[stage.name] = threading.BoundedSemaphore(limit)
        if not slots.acquire(blocking=False):
            raise StageError(
                f"stage {stage.name!r} is saturated: {limit} earlier calls are still running past its timeout "
                f"of {stage.timeout} s; not calling it")
        fut: cf.Future = cf.Future()

        def run():
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(stage.predict(items))
                    except BaseException as exc:  # delivered to the caller (StageError or worse)
                        fut.set_exception(exc)
            finally:
                slots.release()

        try:
            threading.Thread(target=run, name=f"leanscale-stage-{stage.name}", daemon=True).start()
        except BaseException:
            slots.release()
            raise
        try:
            return fut.result(timeout=stage.timeout)
        except cf.TimeoutError:
            fut.cancel()  # a running call cannot be interrupted; its answer is ignored
            raise StageError(f"stage {stage.name!r} exceeded its timeout of {stage.timeout} s") from None

    def predict_detailed(self, X: Sequence) -> CascadeOutput:
        """Labels plus, per request, the answering stage, its confidence and the cost paid.

        A request on which no stage gave any answer (every stage failed, was switched off or
        abstained) gets ``fallback_label`` with stage ``"fallback"``, confidence 0 and
        ``answered[i] == False``; ``failed[i]`` names the stages that failed on it and ``reasons``
        says how. Such a label is not a prediction: the server refuses to send it as one."""
        check_is_fitted(self, ["thresholds_"])
        X = _check_X(X, "Cascade.predict")
        stages = list(self.stages)
        X = list(X)
        n = len(X)
        labels = np.full(n, None, dtype=object)
        stage_of = np.full(n, FALLBACK, dtype=object)
        confidence = np.zeros(n)
        cost = np.zeros(n)
        answered = np.zeros(n, dtype=bool)
        failed: list[list[str]] = [[] for _ in range(n)]
        reasons: dict[str, str] = {}
        best_label = np.full(n, None, dtype=object)  # most confident answer below its threshold
        best_conf = np.full(n, -1.0)
        errors: dict[str, int] = {}
        remaining = np.arange(n)
        learned = self.deferral_ if getattr(self, "deferral_", None) else None
        ran: dict[str, tuple] = {}  # learned deferral: stage name -> its (labels, confidence, answered) over all n
        for k, s in enumerate(stages):
            if remaining.size == 0:
                break
            last = k == len(stages) - 1
            t = -math.inf if last else self.thresholds_.get(s.name)
            if t is None:
                continue
            cost[remaining] += self.costs_[s.name]
            try:
                out = self._call(s, [X[i] for i in remaining])
            except StageError as exc:
                _stage_failed(s.name, exc, remaining, errors, reasons, failed)
                continue
            if learned is not None and not last:
                try:
                    score = self._deferral_score(s, out, remaining, ran, X)
                except StageError as exc:
                    _stage_failed(s.name, exc, remaining, errors, reasons, failed)
                    continue
                full = (np.full(n, None, dtype=object), np.zeros(n), np.zeros(n, dtype=bool))
                full[0][remaining], full[1][remaining], full[2][remaining] = out.labels, out.confidence, out.answered
                ran[s.name] = full
                take = out.answered & (score >= t)
            else:
                take = out.answered & (out.confidence >= t)
            idx = remaining[take]
            labels[idx], stage_of[idx], confidence[idx] = out.labels[take], s.name, out.confidence[take]
            answered[idx] = True
            better = out.answered & ~take & (out.confidence > best_conf[remaining])
            bidx = remaining[better]
            best_label[bidx], best_conf[bidx] = out.labels[better], out.confidence[better]
            remaining = remaining[~take]
        if remaining.size:
            has = best_conf[remaining] >= 0
            labels[remaining] = np.where(has, best_label[remaining], self.fallback_label)
            confidence[remaining] = np.where(has, best_conf[remaining], 0.0)
            answered[remaining] = has
        if errors:
            with self._lock:
                for k, v in errors.items():
                    self.errors_[k] = self.errors_.get(k, 0) + v
        failed_arr = np.empty(n, dtype=object)
        for i, f in enumerate(failed):  # element-wise: numpy would make equal-length tuples a 2-D array
            failed_arr[i] = tuple(f)
        return CascadeOutput(labels, stage_of, confidence, cost, errors, answered, failed_arr, reasons)

    def _deferral_score(self, stage: Stage, out, remaining: np.ndarray, ran: dict, X: list) -> np.ndarray:
        """The learned deferral score of ``stage``'s answers on the requests ``remaining``."""
        from leanscale.cascade import deferral as _deferral
        from leanscale.cascade.stages import StageOutput

        model = self.deferral_[stage.name]
        if model.n_stage_features:
            if out.features is None or out.features.shape[1] != model.n_stage_features:
                got = None if out.features is None else out.features.shape[1]
                raise StageError(f"stage {stage.name!r} returned {got} feature columns; its deferral model was "
                                 f"fitted on {model.n_stage_features}")
        else:
            out = out._replace(features=None)
        earlier = []
        for name in model.earlier:  # a stage that failed on this batch counts as having abstained
            h = ran.get(name)
            earlier.append(None if h is None else StageOutput(h[0][remaining], h[1][remaining], h[2][remaining]))
        F = _deferral.deferral_features(out, earlier, _deferral._lengths([X[i] for i in remaining]))
        return model.score(F)

    def predict(self, X: Sequence) -> np.ndarray:
        """Labels; ``fallback_label`` (``None`` unless configured) where no stage gave an answer
        (see :meth:`predict_detailed`'s ``answered``). Without a ``fallback_label``, such requests
        also raise a :class:`UnansweredWarning` (a ``None`` in the labels is not a prediction)."""
        out = self.predict_detailed(X)
        if self.fallback_label is None and not out.answered.all():
            n_none = int((~out.answered).sum())
            warnings.warn(
                f"{n_none} of {len(out.answered)} requests got no answer from any stage; their label is None "
                f"(stage errors: {dict(out.errors) or 'none'}). Use predict_detailed(...).answered to find them, "
                f"or set fallback_label.", UnansweredWarning, stacklevel=2)
        return out.labels

    def score(self, X: Sequence, y: Sequence) -> float:
        """Accuracy on ``(X, y)``."""
        X = _check_X(X, "Cascade.score")
        y = _check_y(y, "Cascade.score")
        check_consistent_length("Cascade.score", X=X, y=y)
        pred = self.predict(X)
        return float(np.mean([a == b for a, b in zip(pred, y)]))

    def explain(self) -> str:
        """What each threshold means, on the calibration data."""
        check_is_fitted(self, ["thresholds_"])
        lines = [f"Cascade of {len(self.stages)} stages; calibration accuracy {self.expected_accuracy_:.4f} at mean cost "
                 f"{self.expected_cost_:.6g} per request (the last stage alone: {self.reference_accuracy_:.4f} at "
                 f"{self.costs_[self.stages[-1].name]:.6g})."]
        for k, s in enumerate(self.stages):
            c = self.calibration_[s.name]
            if not c["on"]:
                lines.append(f"  {s.name}: off (it never pays for itself on the frontier)")
                continue
            acc = c["accuracy_when_answering"]
            acc_s = "-" if acc is None else f"{acc:.4f}"
            what = "predicted correctness (learned deferral)" if getattr(self, "deferral_", None) else "confidence"
            rule = "answers everything left" if k == len(self.stages) - 1 else \
                f"answers when its {what} >= {c['threshold']:.4g}"
            if k < len(self.stages) - 1 and getattr(self, "deferral_", None) and c["threshold"] >= 1.0:
                rule = "never answers: it runs only to inform the later stages' learned deferral"
            lines.append(f"  {s.name}: {rule}; on calibration data it answered {c['answered_fraction']:.1%} of all "
                         f"requests with accuracy {acc_s} (cost {c['cost']:.6g} per call)")
        if self.guarantee_:
            g = self.guarantee_
            lines.append(f"  guarantee: accuracy >= {g['target_accuracy']} with probability >= {1 - g['delta']:.3f}; "
                         f"certified on {g['n_test']} held-out requests (accuracy {g['test_accuracy']:.4f}, "
                         f"p-value {g['p_value']:.3g}).")
        return "\n".join(lines)

    # ------------------------------------------------------------------------ save and load
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON) plus one arrays file per saved model stage beside it; no pickle.

        Regex stages, leanscale text models, scikit-learn models (``skops``, a ``.skops`` file per
        model) and torch modules (exported with ``torch.export``, written as an allow-listed op
        graph in the JSON plus a safetensors arrays file) are saved whole: :meth:`load` needs no
        user code for them. A model stage whose ``transform`` is a Python callable, or whose model
        cannot be saved that way (a user class, a torch module that does not export), is saved by
        name with an :class:`ExternalStageWarning` saying why; rule and callable stages are code
        and always saved by name. Stages saved by name must be passed to :meth:`load` in ``objects``.

        The save is atomic as a whole. Each arrays file is named by its content
        (``<stem>.<stage>.<sha256[:16]>.arrays``) and its sha256 is recorded in the JSON, which is
        written last: its atomic rename is the commit point. Until then the previous JSON and the
        arrays files it names are untouched (a kill leaves the previous cascade loadable); the
        arrays files only the previous JSON named are removed after the commit.
        """
        check_is_fitted(self, ["thresholds_"])
        path = Path(path)
        folder = path.parent
        previous = _arrays_files_of(path)
        written: set[str] = set()
        version = _VERSION_WITHOUT_EXTERNAL_MODELS
        stages = []
        for s in self.stages:
            d: dict[str, Any] = {"kind": s.kind, "name": s.name, "cost": s.cost, "timeout": s.timeout}
            if isinstance(s, RegexStage):
                d.update(patterns=[[p, lab] for p, lab in s.patterns], ignore_case=s.ignore_case,
                         match_timeout=s.match_timeout, max_length=s.max_length)
            elif isinstance(s, ModelStage):
                d.update(classes=s.classes.tolist(), temperature=s.temperature, batch_size=s.batch_size)
                model, transform = _save_model_stage(s, folder, f"{path.stem}.{s.name}.", written)
                d.update(model=model)
                if transform is not None:
                    d.update(transform=transform)
                if isinstance(model, dict) and model.get("class") in _NEW_MODEL_CLASSES or transform is not None:
                    version = FORMAT_VERSION
            elif isinstance(s, CallableStage):
                d.update(batched=s.batched)
            stages.append(d)
        doc = {
            "format": "leanscale.cascade", "version": version, "stages": stages,
            # deferral="confidence" (the default) is left out: such a file is what older leanscale reads
            "params": {k: v for k, v in self.get_params().items()
                       if k != "stages" and not (k == "deferral" and v == "confidence")},
            "thresholds": self.thresholds_, "costs": self.costs_, "temperatures": self.temperatures_,
            "expected_cost": self.expected_cost_, "expected_accuracy": self.expected_accuracy_,
            "reference_accuracy": self.reference_accuracy_, "calibration": self.calibration_,
            "guarantee": self.guarantee_, "classes": self.classes_.tolist(),
            "frontier": {"cost": self.frontier_.cost, "accuracy": self.frontier_.accuracy,
                         "thresholds": [list(t) for t in self.frontier_.thresholds], "exact": self.frontier_.exact},
        }
        if getattr(self, "deferral_", None):
            doc["deferral"] = {name: m.to_dict() for name, m in self.deferral_.items()}
        atomic_write_json(path, to_jsonable(doc))  # the commit point
        for name in previous - written:
            try:
                (folder / name).unlink()
            except OSError:
                pass
        return path

    @classmethod
    def load(cls, path: str | Path, objects: dict[str, Any] | None = None) -> Cascade:
        """Rebuild a fitted cascade from :meth:`save`'s JSON. ``objects``: stage name -> the
        predicate, function or model (or, for a model stage, the whole :class:`ModelStage`, which
        keeps its transform) for stages that were saved by name. Stages saved as data (regex,
        leanscale text models, scikit-learn models through skops, torch modules as an exported
        graph) need nothing: no user code is imported or run.

        The file is untrusted data. Its size is checked before it is read; every field is checked
        (type, range, consistency with the other fields) before anything is built; an arrays file
        must lie in the JSON's folder and match the sha256 recorded at save time, and the sizes it
        declares must match the model's meta before any array is allocated; regex patterns run on
        RE2 (or are refused); a TF-IDF model's token pattern must be scikit-learn's default (the
        loaded model uses leanscale's own constant, never the file's string); a ``.skops`` file must
        match its sha256 and hold only scikit-learn/numpy/scipy.sparse classes beyond skops' own
        trusted types (``skops.io.get_untrusted_types``); a torch graph may call only allow-listed
        ATen ops and must return ``(batch, n_classes)`` on a probe. Whatever is wrong raises one
        :class:`~leanscale.core.errors.DataFormatError` naming the file and the field.

        Raises:
            DataNotFoundError: the file (or an arrays file it names) does not exist.
            DataFormatError: the file is not a valid saved cascade.
            InvalidParameterError: ``objects`` lacks a stage saved by name, or names one that is not.
        """
        path = Path(path)
        if objects is not None and not isinstance(objects, Mapping):
            raise InvalidParameterError(
                f"The 'objects' parameter of Cascade.load must be a dict of stage name -> object. "
                f"Got {type(objects).__name__} instead.")
        objects = dict(objects or {})
        doc = read_json_file(path, "cascade file", MAX_CASCADE_BYTES)
        if not isinstance(doc, dict) or doc.get("format") != "leanscale.cascade":
            raise DataFormatError(
                f"The cascade file {str(path)!r} is not a saved leanscale cascade: it must be a JSON object with "
                f"\"format\": \"leanscale.cascade\". Got {_short(doc.get('format') if isinstance(doc, dict) else doc)}.")
        try:
            return cls._from_doc(path, doc, objects)
        except (LeanscaleError, MemoryError):
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
            raise DataFormatError(
                f"The cascade file {str(path)!r} is invalid ({type(exc).__name__}: {exc}).") from None

    @classmethod
    def _from_doc(cls, path: Path, doc: dict, objects: dict) -> Cascade:
        v = _SavedDoc(path)
        version = doc.get("version")
        if type(version) is int and version > FORMAT_VERSION:
            raise DataFormatError(
                f"The cascade file {str(path)!r} has version {version}: it was written by a newer leanscale, and this "
                f"one reads versions up to {FORMAT_VERSION}. Upgrade leanscale to load it.")
        if type(version) is not int or version < 1:
            raise v.error("'version'", f"an integer from 1 to {FORMAT_VERSION} (the versions this leanscale reads)",
                          doc.get("version"))
        raw = v.lst(v.get(doc, "stages", "the file"), "'stages'", 1, 1000)
        names = []
        for i, d in enumerate(raw):
            where = f"stages[{i}]"
            name = v.get(d, "name", where)
            if not isinstance(name, str) or name in names:
                raise v.error(f"{where}['name']", "a stage name (a string) used once", name)
            names.append(name)
            kind = v.get(d, "kind", where)
            if kind not in ("regex", "model", "rule", "callable"):
                raise v.error(f"{where}['kind']", "one of 'regex', 'model', 'rule', 'callable'", kind)
            v.num(v.get(d, "cost", where), f"{where}['cost']", 0, none=True)
            v.num(v.get(d, "timeout", where), f"{where}['timeout']", 0, _MAX_TIMEOUT, open_lo=True, none=True)

        def need(name: str, what: str):
            if name not in objects:
                raise InvalidParameterError(
                    f"The 'objects' parameter of Cascade.load must provide {what} for stage {name!r} "
                    f"(it cannot be saved without pickle). Got names {sorted(objects)}."
                )
            return objects.pop(name)

        stages: list[Stage] = []
        for i, d in enumerate(raw):
            where = f"stages[{i}] ({d['name']!r})"
            common = {"name": d["name"], "cost": d["cost"], "timeout": d["timeout"]}
            if d["kind"] == "regex":
                pats = v.lst(v.get(d, "patterns", where), f"{where}['patterns']", 1)
                for j, pair in enumerate(pats):
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                            and len(pair[0]) <= 100_000):
                        raise v.error(f"{where}['patterns'][{j}]", "a [pattern string, label] pair", pair)
                    v.label(pair[1], f"{where}['patterns'][{j}][1]")
                v.boolean(v.get(d, "ignore_case", where), f"{where}['ignore_case']")
                v.num(v.get(d, "match_timeout", where), f"{where}['match_timeout']", 0, 3600, open_lo=True)
                v.num(v.get(d, "max_length", where), f"{where}['max_length']", 1, 10**9, integer=True)
                if _re2() is None:  # patterns from a file run on RE2 or are refused
                    raise MissingDependencyError(
                        f"The cascade file {str(path)!r} has the regex stage {d['name']!r}; patterns read from a file "
                        "run only on RE2 (linear time): pip install 'leanscale[cascade]'.")
                stage = cls._stage(v, where, RegexStage, [tuple(p) for p in pats], ignore_case=d["ignore_case"],
                                   match_timeout=d["match_timeout"], max_length=d["max_length"], engine="re2",
                                   **common)
            elif d["kind"] == "model":
                classes = v.lst(v.get(d, "classes", where), f"{where}['classes']", 1)
                for j, c in enumerate(classes):
                    v.label(c, f"{where}['classes'][{j}]")
                v.num(v.get(d, "temperature", where), f"{where}['temperature']", 0, open_lo=True)
                v.num(v.get(d, "batch_size", where), f"{where}['batch_size']", 1, 10**7, integer=True)
                m = v.get(d, "model", where)
                t = d.get("transform")
                transform = None
                if m == "external":
                    if t is not None:
                        raise v.error(f"{where}['transform']", "absent for a stage saved by name", t)
                    model = need(d["name"], "the model (or the ModelStage, with its transform)")
                    if isinstance(model, ModelStage):
                        model, transform = model.model, model.transform
                else:
                    if t is not None:
                        transform = cls._saved_model(v, path, where, t, transform=True)
                    model = cls._saved_model(v, path, where, m, n_classes=len(classes))
                    n_cols = len(model.classes_) if hasattr(model, "classes_") else len(classes)
                    if len(classes) != n_cols:  # the stage may rename them, not change their number
                        raise v.error(f"{where}['classes']", f"a list of {n_cols} labels, one per class of its saved "
                                      "model", classes)
                    objects.pop(d["name"], None)
                stage = cls._stage(v, where, ModelStage, model, classes=classes, temperature=d["temperature"],
                                   batch_size=d["batch_size"], transform=transform, **common)
            elif d["kind"] == "rule":
                stage = cls._stage(v, where, RuleStage, need(d["name"], "the predicate"), **common)
            else:
                batched = v.boolean(v.get(d, "batched", where), f"{where}['batched']")
                stage = cls._stage(v, where, CallableStage, need(d["name"], "the function"), batched=batched, **common)
            stages.append(stage)
        if objects:
            external = [d["name"] for d in raw if d["kind"] in ("rule", "callable") or d.get("model") == "external"]
            raise InvalidParameterError(
                f"The 'objects' parameter of Cascade.load names {sorted(objects)}, which are not external stages of "
                f"this cascade; valid names: {external}."
            )

        params = v.get(doc, "params", "the file")
        valid = [p for p in cls._get_param_names() if p != "stages"]
        legacy = {old: new for old, new in cls._renamed.items() if isinstance(params, dict) and old in params}
        if not isinstance(params, dict) or not set(params) <= set(valid) | set(legacy) \
                or any(new in params for new in legacy.values()):
            raise v.error("'params'", f"an object with keys among {valid}", params)
        params = {legacy.get(k, k): p for k, p in params.items()}  # files of 0.1 store "random_state"
        if "fallback_label" in params:
            v.label(params["fallback_label"], "'params'['fallback_label']", none=True)
        self = cls(stages, **params)
        try:
            self._validate()
        except InvalidParameterError as exc:
            raise DataFormatError(f"The cascade file {str(path)!r} is invalid: 'params': {exc}") from None

        m = len(stages)
        thr = v.names_dict(v.get(doc, "thresholds", "the file"), "'thresholds'", names[:-1],
                           lambda x, w: v.num(x, w, 0, 1, none=True))
        costs = v.names_dict(v.get(doc, "costs", "the file"), "'costs'", names, lambda x, w: v.num(x, w, 0))
        temps = v.get(doc, "temperatures", "the file")
        model_names = [s.name for s in stages if isinstance(s, ModelStage)]
        if not isinstance(temps, dict) or not set(temps) <= set(model_names):
            raise v.error("'temperatures'", f"an object with keys among the model stages {model_names}", temps)
        for k, t in temps.items():
            v.num(t, f"'temperatures'[{k!r}]", 0, open_lo=True)
        exp_cost = v.num(v.get(doc, "expected_cost", "the file"), "'expected_cost'", 0)
        exp_acc = v.num(v.get(doc, "expected_accuracy", "the file"), "'expected_accuracy'", 0, 1)
        ref_acc = v.num(v.get(doc, "reference_accuracy", "the file"), "'reference_accuracy'", 0, 1)
        cal = v.get(doc, "calibration", "the file")
        if not isinstance(cal, dict) or set(cal) != set(names) | {FALLBACK}:
            raise v.error("'calibration'", f"an object with exactly the keys {names + [FALLBACK]}", cal)
        for k, name in enumerate(names):
            c, w = cal[name], f"'calibration'[{name!r}]"
            on = v.boolean(v.get(c, "on", w), f"{w}['on']")
            if on != (k == m - 1 or thr[name] is not None):
                raise v.error(f"{w}['on']", "consistent with 'thresholds' (on exactly when a threshold is set)", on)
            t = v.get(c, "threshold", w)
            if k < m - 1 and on:
                v.num(t, f"{w}['threshold']", 0, 1)
            elif t not in ("always", None) and not isinstance(t, (int, float)):
                raise v.error(f"{w}['threshold']", "'always', null or a number", t)
            v.num(v.get(c, "answered_fraction", w), f"{w}['answered_fraction']", 0, 1)
            v.num(v.get(c, "accuracy_when_answering", w), f"{w}['accuracy_when_answering']", 0, 1, none=True)
            v.num(v.get(c, "cost", w), f"{w}['cost']", 0)
        v.num(v.get(cal[FALLBACK], "answered_fraction", f"'calibration'[{FALLBACK!r}]"),
              f"'calibration'[{FALLBACK!r}]['answered_fraction']", 0, 1)
        guarantee = v.get(doc, "guarantee", "the file")
        if guarantee is not None:
            for key, lo, hi, integer in (("target_accuracy", 0, 1, False), ("delta", 0, 1, False),
                                         ("n_test", 1, None, True), ("test_accuracy", 0, 1, False),
                                         ("p_value", 0, 1, False)):
                v.num(v.get(guarantee, key, "'guarantee'"), f"'guarantee'[{key!r}]", lo, hi, integer=integer)
        classes = v.lst(v.get(doc, "classes", "the file"), "'classes'")
        for j, c in enumerate(classes):
            v.label(c, f"'classes'[{j}]")
        f = v.get(doc, "frontier", "the file")
        f_cost = v.lst(v.get(f, "cost", "'frontier'"), "'frontier'['cost']", 1)
        f_acc = v.lst(v.get(f, "accuracy", "'frontier'"), "'frontier'['accuracy']", len(f_cost), len(f_cost))
        f_thr = v.lst(v.get(f, "thresholds", "'frontier'"), "'frontier'['thresholds']", len(f_cost), len(f_cost))
        for j in range(len(f_cost)):
            v.num(f_cost[j], f"'frontier'['cost'][{j}]", 0)
            v.num(f_acc[j], f"'frontier'['accuracy'][{j}]", 0, 1)
            row = v.lst(f_thr[j], f"'frontier'['thresholds'][{j}]", m - 1, m - 1)
            for t in row:
                v.num(t, f"'frontier'['thresholds'][{j}]", 0, 1, none=True)
        exact = v.boolean(v.get(f, "exact", "'frontier'"), "'frontier'['exact']")

        self.thresholds_ = {k: (None if t is None else float(t)) for k, t in thr.items()}
        self.costs_ = {k: float(c) for k, c in costs.items()}
        self.temperatures_ = {k: float(t) for k, t in temps.items()}
        self.expected_cost_, self.expected_accuracy_ = float(exp_cost), float(exp_acc)
        self.reference_accuracy_ = float(ref_acc)
        self.calibration_, self.guarantee_ = cal, guarantee
        self.classes_ = np.array(classes, dtype=object)
        self.frontier_ = _search.FrontierResult(np.asarray(f_cost, dtype=np.float64), np.asarray(f_acc, dtype=np.float64),
                                                [tuple(t) for t in f_thr], 0, exact)
        self.errors_ = {s.name: 0 for s in stages}
        self.deferral_ = cls._deferral_from_doc(v, doc, self, names) if self.deferral == "learned" else None
        return self

    @staticmethod
    def _deferral_from_doc(v: _SavedDoc, doc: dict, self: Cascade, names: list[str]) -> dict:
        """The learned deferral models of a saved cascade, every field checked."""
        from leanscale.cascade.deferral import DeferralModel

        on = [n for n in names[:-1] if self.thresholds_[n] is not None]
        d = v.get(doc, "deferral", "the file")
        if not isinstance(d, dict) or set(d) != set(on):
            raise v.error("'deferral'", f"an object with exactly the keys {on} (the switched-on stages)", d)
        out = {}
        for name in on:
            e, w = d[name], f"'deferral'[{name!r}]"
            earlier = v.lst(v.get(e, "earlier", w), f"{w}['earlier']", 0, len(names))
            allowed = on[: on.index(name)]
            if not all(isinstance(x, str) for x in earlier) or earlier != [x for x in allowed if x in earlier]:
                raise v.error(f"{w}['earlier']", f"switched-on stages before {name!r}, in order (among {allowed})",
                              earlier)
            n_extra = v.num(v.get(e, "n_stage_features", w), f"{w}['n_stage_features']", 0, 10_000, integer=True)
            width = 3 + n_extra + 4 * len(earlier)
            coef = v.lst(v.get(e, "coef", w), f"{w}['coef']", width, width)
            for j, c in enumerate(coef):
                v.num(c, f"{w}['coef'][{j}]")
            b = v.num(v.get(e, "intercept", w), f"{w}['intercept']")
            n_train = v.num(v.get(e, "n_train", w), f"{w}['n_train']", 0, integer=True)
            fnames = v.lst(v.get(e, "names", w), f"{w}['names']", width, width)
            if not all(isinstance(x, str) for x in fnames):
                raise v.error(f"{w}['names']", "a list of strings", fnames)
            out[name] = DeferralModel(np.asarray(coef, dtype=np.float64), float(b), tuple(earlier), int(n_extra),
                                      int(n_train), list(fnames))
        return out

    @staticmethod
    def _stage(v: _SavedDoc, where: str, klass, *args, **kwargs) -> Stage:
        try:
            return klass(*args, **kwargs)
        except MissingDependencyError:
            raise
        except InvalidParameterError as exc:
            raise DataFormatError(f"The cascade file {str(v.path)!r} is invalid: {where}: {exc}") from None

    @staticmethod
    def _saved_model(v: _SavedDoc, path: Path, where: str, m: Any, *, transform: bool = False,
                     n_classes: int | None = None):
        field = "transform" if transform else "model"
        klass_name = v.get(m, "class", f"{where}[{field!r}]")
        if transform and klass_name != "skops":
            raise v.error(f"{where}['transform']['class']", "'skops'", klass_name)
        if klass_name in _NEW_MODEL_CLASSES:
            return _load_external_model(v, path, f"{where}[{field!r}]", m, n_classes)
        if klass_name not in _MODEL_CLASSES:
            raise v.error(f"{where}['model']['class']", f"'external' or one of {list(_MODEL_CLASSES + _NEW_MODEL_CLASSES)}",
                          klass_name)
        meta = v.get(m, "meta", f"{where}['model']")
        name = v.get(m, "arrays", f"{where}['model']")
        digest = m.get("sha256")  # absent in saves before content addressing
        arrays = read_arrays_checked(path.parent, name, digest, what=f"arrays file of stage {where} of {str(path)!r}")
        try:
            return fitted_class(klass_name).from_state(meta, arrays)
        except (MissingDependencyError, DataNotFoundError):
            raise
        except LeanscaleError as exc:
            raise DataFormatError(f"The cascade file {str(path)!r} is invalid: {where}: {exc}") from None

    def __getstate__(self):  # the lock and the per-stage slots are not copyable
        d = dict(self.__dict__)
        d.pop("_lock", None)
        d.pop("_stage_slots", None)
        d.pop("_pool", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
        self._stage_slots = {}
