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

Serving never loses a request: a stage that raises, answers in the wrong format or exceeds its
``timeout`` is counted in ``errors_`` and the batch goes to the next stage; what no stage answers
gets the most confident answer seen on the way (or ``fallback_label``). :meth:`predict_detailed`
reports, per request, the label, the answering stage, its confidence and the cost paid.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import math
import threading
from collections.abc import Sequence
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
    measure_cost,
)
from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_write_json, to_jsonable
from leanscale.core.validation import (
    Interval,
    check_consistent_length,
    check_is_fitted,
    check_params,
)

__all__ = ["FALLBACK", "Cascade", "CascadeOutput"]

FALLBACK = "fallback"  # the "stage" of a request no stage answered
FORMAT_VERSION = 1


class CascadeOutput(NamedTuple):
    """Per request: ``labels``, ``stage`` (name of the answering stage, or ``"fallback"``),
    ``confidence`` and ``cost`` (sum of the costs of the stages it went through); plus ``errors``,
    the stages that failed on this batch (name -> number of requests they failed on)."""

    labels: np.ndarray
    stage: np.ndarray
    confidence: np.ndarray
    cost: np.ndarray
    errors: dict


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


class Cascade:
    """See the module docstring. Learned attributes: ``thresholds_`` (stage name -> threshold or
    ``None`` for off; the last stage has none), ``costs_``, ``frontier_`` (a
    :class:`~leanscale.cascade.search.FrontierResult` on all calibration data), ``choice_`` (index
    into ``frontier_`` of the chosen setting when it lies on it), ``calibration_`` (per-stage
    fractions answered and accuracies), ``guarantee_`` (the test's details), ``errors_``
    (stage -> failures seen by predict), ``classes_``."""

    _parameter_constraints = {
        "target_accuracy": [Interval("real", 0, 1, closed="both"), None],
        "budget": [Interval("real", 0, None, closed="left"), None],
        "guarantee": [bool],
        "delta": [Interval("real", 0, 1, closed="neither")],
        "guarantee_split": [Interval("real", 0, 1, closed="neither")],
        "calibrate": [bool],
        "max_thresholds": [Interval(int, 2, None), None],
        "random_state": [Interval(int, 0, None), None],
    }

    def __init__(self, stages: Sequence[Stage], *, target_accuracy: float | None = None,
                 budget: float | None = None, guarantee: bool = False, delta: float = 0.05,
                 guarantee_split: float = 0.5, calibrate: bool = False, max_thresholds: int | None = None,
                 fallback_label: Any = None, random_state: int | None = 0):
        self.stages = stages
        self.target_accuracy = target_accuracy
        self.budget = budget
        self.guarantee = guarantee
        self.delta = delta
        self.guarantee_split = guarantee_split
        self.calibrate = calibrate
        self.max_thresholds = max_thresholds
        self.fallback_label = fallback_label
        self.random_state = random_state
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ sklearn-style plumbing
    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names}

    def set_params(self, **params) -> Cascade:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                from leanscale.core.validation import unknown_name_error

                raise unknown_name_error("params", k, valid, "Cascade.set_params")
            setattr(self, k, v)
        return self

    def _validate(self) -> list[Stage]:
        check_params({k: getattr(self, k) for k in self._parameter_constraints}, self._parameter_constraints,
                     "Cascade")
        stages = self.stages
        if isinstance(stages, Stage) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise InvalidParameterError(
                f"The 'stages' parameter of Cascade must be a non-empty list of Stage objects. Got {stages!r} instead."
            )
        for i, s in enumerate(stages):
            if not isinstance(s, Stage):
                raise InvalidParameterError(
                    f"The 'stages' parameter of Cascade must hold Stage objects (RegexStage, RuleStage, ModelStage, "
                    f"CallableStage); item {i} is {type(s).__name__}."
                )
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
        X = list(X)
        y = np.asarray(list(y), dtype=object)
        check_consistent_length("Cascade.fit", X=X, y=y)
        if len(X) < 2:
            raise InvalidParameterError(f"The 'X' parameter of Cascade.fit must hold at least 2 requests. Got {len(X)}.")
        n = len(X)
        rng = np.random.default_rng(self.random_state)
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

        self.frontier_ = _search.frontier(answered, conf, correct, costs, self.max_thresholds)
        last_alone = tuple([None] * (len(stages) - 1))
        _, last_acc, _ = _search.evaluate_config(last_alone, answered, conf, correct, costs)
        self.reference_accuracy_ = float(last_acc)
        self.guarantee_ = None

        if self.guarantee:
            thr = self._choose_guaranteed(answered, conf, correct, costs, sel, test)
        else:
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
    def _call(self, stage: Stage, items: list):
        if stage.timeout is None:
            return stage.predict(items)
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="leanscale-stage")
        fut = self._pool.submit(stage.predict, items)
        try:
            return fut.result(timeout=stage.timeout)
        except cf.TimeoutError:
            fut.cancel()  # a running call cannot be interrupted; its answer is ignored
            raise StageError(f"stage {stage.name!r} exceeded its timeout of {stage.timeout} s") from None

    def predict_detailed(self, X: Sequence) -> CascadeOutput:
        """Labels plus, per request, the answering stage, its confidence and the cost paid."""
        check_is_fitted(self, ["thresholds_"])
        stages = list(self.stages)
        X = list(X)
        n = len(X)
        labels = np.full(n, None, dtype=object)
        stage_of = np.full(n, FALLBACK, dtype=object)
        confidence = np.zeros(n)
        cost = np.zeros(n)
        best_label = np.full(n, None, dtype=object)  # most confident answer below its threshold
        best_conf = np.full(n, -1.0)
        errors: dict[str, int] = {}
        remaining = np.arange(n)
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
            except StageError:
                errors[s.name] = errors.get(s.name, 0) + int(remaining.size)
                continue
            take = out.answered & (out.confidence >= t)
            idx = remaining[take]
            labels[idx], stage_of[idx], confidence[idx] = out.labels[take], s.name, out.confidence[take]
            better = out.answered & ~take & (out.confidence > best_conf[remaining])
            bidx = remaining[better]
            best_label[bidx], best_conf[bidx] = out.labels[better], out.confidence[better]
            remaining = remaining[~take]
        if remaining.size:
            has = best_conf[remaining] >= 0
            labels[remaining] = np.where(has, best_label[remaining], self.fallback_label)
            confidence[remaining] = np.where(has, best_conf[remaining], 0.0)
        if errors:
            with self._lock:
                for k, v in errors.items():
                    self.errors_[k] = self.errors_.get(k, 0) + v
        return CascadeOutput(labels, stage_of, confidence, cost, errors)

    def predict(self, X: Sequence) -> np.ndarray:
        return self.predict_detailed(X).labels

    def score(self, X: Sequence, y: Sequence) -> float:
        """Accuracy on ``(X, y)``."""
        pred = self.predict(X)
        y = np.asarray(list(y), dtype=object)
        check_consistent_length("Cascade.score", X=pred, y=y)
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
            rule = "answers everything left" if k == len(self.stages) - 1 else \
                f"answers when its confidence >= {c['threshold']:.4g}"
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
        """Write ``path`` (JSON) plus one array file per saved model stage beside it; no pickle.

        Regex stages and leanscale text models are saved whole; rule, callable and other model
        stages are saved by name and must be passed to :meth:`load` in ``objects``."""
        check_is_fitted(self, ["thresholds_"])
        path = Path(path)
        stages = []
        for s in self.stages:
            d: dict[str, Any] = {"kind": s.kind, "name": s.name, "cost": s.cost, "timeout": s.timeout}
            if isinstance(s, RegexStage):
                d.update(patterns=[[p, lab] for p, lab in s.patterns], ignore_case=s.ignore_case,
                         match_timeout=s.match_timeout, max_length=s.max_length)
            elif isinstance(s, ModelStage):
                d.update(classes=s.classes.tolist(), temperature=s.temperature, batch_size=s.batch_size)
                if hasattr(s.model, "get_state") and s.transform is None:
                    from leanscale.cascade.text_models import save_arrays

                    meta, arrays = s.model.get_state()
                    arrays_file = f"{path.stem}.{s.name}.arrays"
                    written = save_arrays(path.parent / arrays_file, arrays)
                    d.update(model={"class": type(s.model).__name__, "meta": meta, "arrays": Path(written).name})
                else:
                    d.update(model="external")
            elif isinstance(s, CallableStage):
                d.update(batched=s.batched)
            stages.append(d)
        doc = {
            "format": "leanscale.cascade", "version": FORMAT_VERSION, "stages": stages,
            "params": {k: v for k, v in self.get_params().items() if k != "stages"},
            "thresholds": self.thresholds_, "costs": self.costs_, "temperatures": self.temperatures_,
            "expected_cost": self.expected_cost_, "expected_accuracy": self.expected_accuracy_,
            "reference_accuracy": self.reference_accuracy_, "calibration": self.calibration_,
            "guarantee": self.guarantee_, "classes": self.classes_.tolist(),
            "frontier": {"cost": self.frontier_.cost, "accuracy": self.frontier_.accuracy,
                         "thresholds": [list(t) for t in self.frontier_.thresholds], "exact": self.frontier_.exact},
        }
        atomic_write_json(path, to_jsonable(doc))
        return path

    @classmethod
    def load(cls, path: str | Path, objects: dict[str, Any] | None = None) -> Cascade:
        """Rebuild a fitted cascade from :meth:`save`'s JSON. ``objects``: stage name -> the
        predicate, function or model for stages that were saved by name."""
        path = Path(path)
        objects = dict(objects or {})
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidParameterError(f"The 'path' parameter of Cascade.load must name a saved cascade JSON file: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != "leanscale.cascade":
            raise InvalidParameterError(f"The 'path' parameter of Cascade.load names {path}, which is not a saved leanscale cascade.")

        def need(name: str, what: str):
            if name not in objects:
                raise InvalidParameterError(
                    f"The 'objects' parameter of Cascade.load must provide {what} for stage {name!r} "
                    f"(it cannot be saved without pickle). Got names {sorted(objects)}."
                )
            return objects.pop(name)

        stages: list[Stage] = []
        for d in doc["stages"]:
            common = {"name": d["name"], "cost": d["cost"], "timeout": d["timeout"]}
            if d["kind"] == "regex":
                stages.append(RegexStage([tuple(p) for p in d["patterns"]], ignore_case=d["ignore_case"],
                                         match_timeout=d["match_timeout"], max_length=d["max_length"], **common))
            elif d["kind"] == "model":
                if d["model"] == "external":
                    model = need(d["name"], "the model")
                else:
                    from leanscale.cascade import text_models

                    m = d["model"]
                    klass = getattr(text_models, m["class"], None)
                    if klass is None or not hasattr(klass, "from_state"):
                        raise InvalidParameterError(f"The saved cascade {path} names an unknown model class {m['class']!r}.")
                    model = klass.from_state(m["meta"], text_models.load_arrays(path.parent / m["arrays"]))
                    objects.pop(d["name"], None)
                stages.append(ModelStage(model, classes=d["classes"], temperature=d["temperature"],
                                         batch_size=d["batch_size"], **common))
            elif d["kind"] == "rule":
                stages.append(RuleStage(need(d["name"], "the predicate"), **common))
            elif d["kind"] == "callable":
                stages.append(CallableStage(need(d["name"], "the function"), batched=d["batched"], **common))
            else:
                raise InvalidParameterError(f"The saved cascade {path} has an unknown stage kind {d['kind']!r}.")
        if objects:
            external = [d["name"] for d in doc["stages"]
                        if d["kind"] in ("rule", "callable") or d.get("model") == "external"]
            raise InvalidParameterError(
                f"The 'objects' parameter of Cascade.load names {sorted(objects)}, which are not external stages of "
                f"this cascade; valid names: {external}."
            )
        self = cls(stages, **doc["params"])
        self.thresholds_ = doc["thresholds"]
        self.costs_ = doc["costs"]
        self.temperatures_ = doc["temperatures"]
        self.expected_cost_, self.expected_accuracy_ = doc["expected_cost"], doc["expected_accuracy"]
        self.reference_accuracy_ = doc["reference_accuracy"]
        self.calibration_, self.guarantee_ = doc["calibration"], doc["guarantee"]
        self.classes_ = np.array(doc["classes"], dtype=object)
        f = doc["frontier"]
        self.frontier_ = _search.FrontierResult(np.asarray(f["cost"]), np.asarray(f["accuracy"]),
                                                [tuple(t) for t in f["thresholds"]], 0, f["exact"])
        self.errors_ = {s.name: 0 for s in stages}
        return self

    def __getstate__(self):  # the lock and the pool are not copyable
        d = dict(self.__dict__)
        d.pop("_lock", None)
        d.pop("_pool", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
        self._pool = None
