"""Your own model as a stage of a text cascade, trained by leanscale and saved without your code.

What ``leanscale cascade fit --model NAME=SPEC`` builds (:func:`build_text_stages` calls
:func:`build_user_stage` for every stage name given a model):

* an **unfitted scikit-learn classifier that takes the raw texts** (a ``Pipeline`` of a
  ``TfidfVectorizer`` or ``HashingVectorizer`` and a ``LogisticRegression`` or
  ``SGDClassifier(loss="log_loss")``, ...): fitted on the training texts; the cascade saves it
  with skops, and it must hold only scikit-learn / numpy / scipy classes (checked after the fit,
  before any time is spent on the cascade), so that loading it needs none of your code;
* a **torch module taking MiniLM-L6 embeddings** (``(batch, 384)`` float32) and returning logits
  ``(batch, n_classes)``: wrapped in an :class:`EmbeddingModuleClassifier`, the built-in MiniLM
  head's trainer with your module as the head (AdamW, cosine decay, the shared engine: the same
  code as :class:`~leanscale.cascade.EmbeddingClassifier`). It is saved as an allow-listed
  exported graph plus its weights (:mod:`leanscale.cascade.external_models`); whether it can be
  is checked on the untrained module, before training.

Anything else is refused with an :class:`~leanscale.core.errors.InvalidParameterError` naming the
parameter (``--model`` on the command line).

Steps that may take long (fitting a stage, loading the encoder, embedding, training the head)
report to stderr through :func:`leanscale.core.progress.progress` every 2 s while they run
(:func:`working`), and not at all when ``LEANSCALE_NO_PROGRESS=1``.

Example:
    >>> from sklearn.feature_extraction.text import TfidfVectorizer
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> texts = [f"refund {i}" if i % 2 else f"crash {i}" for i in range(20)]
    >>> labels = ["billing" if i % 2 else "tech" for i in range(20)]
    >>> stage = build_user_stage("mine", make_pipeline(TfidfVectorizer(), LogisticRegression()), texts, labels)
    >>> stage.predict(["refund please"]).labels.tolist()
    ['billing']
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from leanscale.cascade._shared import (
    MAX_WIDTH,
    STATE_VERSION,
    check_meta,
    classes_from_meta,
    classes_to_meta,
    meta_int,
    meta_params,
    refuse_callable,
    short,
)
from leanscale.cascade.embedding_head import EmbeddingClassifier
from leanscale.core.errors import InvalidParameterError
from leanscale.core.persistence import register_fitted
from leanscale.core.progress import working
from leanscale.core.validation import Interval, Options, check_is_fitted

__all__ = ["EmbeddingModuleClassifier", "build_user_stage", "check_user_model", "user_model_kind"]

MINILM_DIM = 384  # all-MiniLM-L6-v2's embedding width: the input of a torch stage
EMBED_BLOCK = 512  # texts embedded between two progress updates

Log = Callable[[str], None]

_EXPECTED = ("an unfitted scikit-learn classifier taking the raw texts (fit(texts, y) and predict_proba(texts), "
             "e.g. a Pipeline of a TfidfVectorizer and a LogisticRegression) or a torch.nn.Module taking "
             f"{MINILM_DIM}-d MiniLM embeddings and returning logits")


# ---------------------------------------------------------------------------------- checking


def user_model_kind(obj: Any) -> str | None:
    """``"sklearn"`` (an instance with ``fit`` and ``predict_proba``), ``"torch"`` (a
    ``torch.nn.Module`` instance) or None (anything else, a class included)."""
    if isinstance(obj, type):
        return None
    try:
        from torch import nn
    except ImportError:  # pragma: no cover - torch is a core dependency
        nn = None
    if nn is not None and isinstance(obj, nn.Module):
        return "torch"
    if callable(getattr(obj, "fit", None)) and callable(getattr(obj, "predict_proba", None)):
        return "sklearn"
    return None


def check_user_model(obj: Any, name: str, *, param: str = "models", owner: str = "build_user_stage",
                     source: str | None = None) -> str:
    """The kind of a user's model for stage ``name`` (:func:`user_model_kind`), or an error.

    Args:
        obj: what the user's factory returned.
        name: the stage name.
        param, owner: named in the error (``"--model"``, ``"leanscale cascade fit"``).
        source: where ``obj`` came from (``"models.py:make"``), for the error.

    Raises:
        InvalidParameterError: ``obj`` is None, a class, or neither a scikit-learn-style
            classifier nor a torch module (saying what it lacks).
    """
    kind = user_model_kind(obj)
    if kind is not None:
        return kind
    where = f" from {source!r}" if source else ""
    head = f"The {param!r} parameter of {owner} must give stage {name!r} {_EXPECTED}."
    if obj is None:
        got = f"Got None{where} (does the factory return its model?)"
    elif isinstance(obj, type):
        got = (f"Got the class {obj.__name__}{where}, not an instance: return {obj.__name__}(...) from the factory, "
               f"not {obj.__name__}")
    else:
        missing = [m for m in ("fit", "predict_proba") if not callable(getattr(obj, m, None))]
        got = f"Got {type(obj).__name__}{where}, which has no {' and no '.join(missing)} method"
        if missing == ["predict_proba"]:
            got += " (a regressor, or a classifier without probabilities, e.g. SGDClassifier needs loss='log_loss')"
    return _raise(f"{head} {got}.")


def _raise(msg: str):
    raise InvalidParameterError(msg)


# --------------------------------------------------------------------------- the torch stage


@register_fitted("EmbeddingModuleClassifier")
class EmbeddingModuleClassifier(EmbeddingClassifier):
    """:class:`~leanscale.cascade.EmbeddingClassifier` with your torch module as the head.

    The texts are embedded by all-MiniLM-L6-v2 (``(n, 384)``, unit-norm); ``module`` maps a
    float32 ``(batch, 384)`` tensor to logits ``(batch, n_classes)``. A copy of it is trained
    (``module`` itself is left as given) by the built-in head's trainer: AdamW with a cosine
    learning-rate decay over ``epochs`` passes of seeded shuffles, cross-entropy, the shared engine.

    Saving. ``get_state()`` exports the trained head with ``torch.export`` as an allow-listed
    graph (:func:`leanscale.cascade.external_models.torch_export`) and its weights; ``from_state``
    rebuilds it as an :class:`~leanscale.cascade.external_models.ExportedGraph` (no user code, no
    pickle) whose ``predict_proba`` is the original's. After loading, ``module`` is None.

    Parameters:
        module: an ``nn.Module`` instance (untrained; the factory's output).
        encoder: ``"minilm"`` or None (precomputed embeddings only), as in EmbeddingClassifier.
        epochs, lr, batch_size, weight_decay, seed: as in EmbeddingClassifier.

    Learned attributes: ``classes_``, ``head_`` (the trained copy, or an ``ExportedGraph`` after
    loading), ``n_features_in_``, ``loss_history_``.
    """

    _parameter_constraints = {
        "module": [None, callable],
        "encoder": [Options(("minilm",)), None],
        "epochs": [Interval(int, 1, None)],
        "lr": [Interval("real", 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None)],
        "weight_decay": [Interval("real", 0, None)],
        "seed": [Interval(int, 0, None)],
    }

    def __init__(self, module: Any = None, encoder: str | None = "minilm", epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 256, weight_decay: float = 1e-2, seed: int = 0):
        self.module = module
        self.encoder = encoder
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    def _build_head(self, d: int, n_classes: int):
        """A copy of ``module``, checked to map ``(2, d)`` float32 to ``(2, n_classes)`` logits."""
        from torch import nn

        if not isinstance(self.module, nn.Module):
            raise InvalidParameterError(
                f"The 'module' parameter of {type(self).__name__} must be a torch.nn.Module instance to train. Got "
                f"{type(self.module).__name__}.")
        head = copy.deepcopy(self.module)
        check_head_output(head, d, n_classes, "the 'module' parameter of EmbeddingModuleClassifier")
        return head

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: the parameters (not ``module``), classes and the exported graph of the
        trained head (``meta['graph']``) with its weights (``graph.<name>`` arrays).

        Raises:
            InvalidParameterError: the head cannot be exported as an allow-listed graph.
        """
        import torch

        from leanscale.cascade import external_models as ext

        check_is_fitted(self, ["head_", "classes_"])
        refuse_callable(self.encoder, "encoder", type(self).__name__, "encoder='minilm' or None",
                        "use the built-in MiniLM encoder")
        example = torch.zeros((4, int(self.n_features_in_)), dtype=torch.float32)
        try:
            spec, arrays = ext.torch_export(self.head_, example)
        except ext.NotSavable as exc:
            raise InvalidParameterError(
                f"The 'module' parameter of {type(self).__name__} cannot be saved without its code: {exc}.") from None
        params = {k: v for k, v in self.get_params().items() if k != "module"}
        meta = {
            "class": type(self).__name__,
            "version": STATE_VERSION,
            "params": params,
            "n_features_in": int(self.n_features_in_),
            "classes": classes_to_meta(self.classes_),
            "loss_history": [float(v) for v in self.loss_history_],
            "graph": spec,
        }
        return meta, {f"graph.{k}": np.asarray(v) for k, v in arrays.items()}

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   encoder: Any = "saved") -> EmbeddingModuleClassifier:
        """Rebuild from :meth:`get_state` (untrusted: every field is checked; the graph may call
        only allow-listed ops); ``encoder`` overrides the saved one."""
        from leanscale.cascade import external_models as ext

        owner = f"{cls.__name__}.from_state"
        arrays = check_meta(meta, arrays, cls.__name__, ())
        names = [n for n in cls._get_param_names() if n != "module"]
        params = meta_params(meta, names, owner)
        if "encoder" in params and params["encoder"] not in (None, "minilm"):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} has encoder {short(params['encoder'])}; a saved encoder is 'minilm' "
                "or null.")
        if not (isinstance(encoder, str) and encoder == "saved"):
            params["encoder"] = encoder
        self = cls(module=None, **params)
        self._validate_params()
        classes = classes_from_meta(meta.get("classes"), owner)
        d = meta_int(meta, "n_features_in", owner, 1, MAX_WIDTH)
        bad = sorted(k for k in arrays if not k.startswith("graph."))
        if bad:
            raise InvalidParameterError(f"The 'arrays' parameter of {owner} has unexpected arrays {bad[:5]}.")
        spec = meta.get("graph")
        where = f"graph in the 'meta' parameter of {owner}"
        try:
            head = ext.torch_from_saved(spec, {k[len("graph."):]: v for k, v in arrays.items()}, where)
            if spec["input"]["shape"] != [None, d]:
                raise InvalidParameterError(
                    f"The 'meta' parameter of {owner} has a graph taking {short(spec['input']['shape'])}; expected "
                    f"[null, {d}] (n_features_in).")
            ext.probe(head, spec, len(classes), where)
        except InvalidParameterError:
            raise
        except Exception as exc:  # DataFormatError from the checks: reported as a bad state
            raise InvalidParameterError(str(exc)) from None
        loss = meta.get("loss_history", [])
        if not isinstance(loss, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in loss):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has loss_history {short(loss)}; "
                                        "expected a list of numbers.")
        head.eval()
        self.head_, self.classes_, self.n_features_in_ = head, classes, d
        self.loss_history_ = [float(v) for v in loss]
        return self


def check_head_output(module: Any, d: int, n_classes: int, what: str) -> None:
    """Run ``module`` on zeros ``(2, d)`` (eval mode, no grad); it must return a float tensor
    ``(2, n_classes)`` of logits. The error starts with ``what`` (capitalised)."""
    import torch

    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((2, d), dtype=torch.float32))
    except Exception as exc:
        raise InvalidParameterError(
            f"{what[0].upper()}{what[1:]} must take a float32 tensor (batch, {d}) of MiniLM embeddings. Calling it on "
            f"one of shape (2, {d}) failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes) or not out.dtype.is_floating_point:
        got = f"a tensor of shape {tuple(out.shape)} ({out.dtype})" if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise InvalidParameterError(
            f"{what[0].upper()}{what[1:]} must return one float tensor of logits (batch, n_classes) = (2, {n_classes}) "
            f"for 2 embeddings ({n_classes} labels in the data). Got {got}.")


# ---------------------------------------------------------------------------------- building


def build_user_stage(
    name: str,
    model: Any,
    texts: Sequence[str],
    labels: Sequence | np.ndarray,
    *,
    cost: float | None = None,
    seed: int = 0,
    log: Log | None = None,
    param: str = "models",
    owner: str = "build_user_stage",
    source: str | None = None,
) -> Any:
    """A :class:`~leanscale.cascade.ModelStage` named ``name`` from the user's ``model``, trained
    on ``(texts, labels)``, that :meth:`Cascade.save <leanscale.cascade.Cascade.save>` writes as
    data (skops, or an exported graph) so that loading needs none of the user's code.

    Args:
        name: the stage name.
        model: an unfitted scikit-learn classifier taking the raw texts (fitted here), or a
            ``torch.nn.Module`` mapping ``(batch, 384)`` MiniLM embeddings to logits (trained
            here by :class:`EmbeddingModuleClassifier` with ``seed``).
        texts, labels: the training examples.
        cost: the stage's declared cost per request (None: measured when the cascade is fit).
        seed: seeds the torch head's training.
        log: called with one line when the stage is trained.
        param, owner, source: named in errors (``"--model"``, the command, ``"file.py:factory"``).

    Returns:
        The fitted ModelStage.

    Raises:
        InvalidParameterError: ``model`` is not one of the two kinds, its fit fails, it cannot
            be saved without the user's code (a class of its own in a Pipeline, a torch module
            that ``torch.export`` cannot export or that calls ops outside the allow-list), or a
            torch module's output is not ``(batch, n_classes)`` logits.
    """
    from leanscale.cascade import ModelStage
    from leanscale.cascade import external_models as ext

    kind = check_user_model(model, name, param=param, owner=owner, source=source)
    say = log or (lambda _: None)
    where = f" from {source!r}" if source else ""
    head = f"The {param!r} parameter of {owner} gives stage {name!r} a {type(model).__name__}{where}"
    y = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    t0 = time.perf_counter()
    if kind == "sklearn":
        try:
            with working(f"{name}: fit {type(model).__name__} on {len(texts):,} texts"):
                model.fit(list(texts), y)
        except Exception as exc:
            raise InvalidParameterError(
                f"{head}, whose fit(texts, labels) failed on the {len(texts):,} training texts: {type(exc).__name__}: "
                f"{str(exc)[:500]}. It must be a classifier that takes the raw texts (a Pipeline starting with a "
                "TfidfVectorizer or HashingVectorizer, for example).") from exc
        if getattr(model, "classes_", None) is None:
            raise InvalidParameterError(f"{head}, which has no classes_ after fit: a scikit-learn classifier sets it.")
        try:
            ext.sklearn_dumps(model)  # the saved cascade must load without the user's code
        except ext.NotSavable as exc:
            raise InvalidParameterError(
                f"{head}, which cannot be saved without your code: {exc}. Build it from scikit-learn classes only "
                "(a Pipeline of scikit-learn steps); the saved cascade is loaded without your module.") from None
        stage = ModelStage(model, name=name, cost=cost)
        what = f"{type(model).__name__} fitted"
    else:
        import torch

        classes = np.unique(y)
        check_head_output(model, MINILM_DIM, len(classes), f"{head}, which")
        try:  # before training: the trained head will be saved as an exported graph
            ext.torch_export(copy.deepcopy(model), torch.zeros((4, MINILM_DIM), dtype=torch.float32))
        except ext.NotSavable as exc:
            raise InvalidParameterError(
                f"{head}, which cannot be saved without your code: {exc}. It must take one tensor and return one "
                "tensor of logits, export with torch.export (no data-dependent Python control flow) and use "
                "common layers (linear, normalisations, activations, attention).") from None
        clf = EmbeddingModuleClassifier(module=model, seed=seed)
        E = embed_with_progress(clf, list(texts), name)
        with working(f"{name}: train {type(model).__name__} on {len(texts):,} embeddings"):
            clf.fit_embeddings(E, y)
        stage = ModelStage(clf, name=name, cost=cost)
        what = f"{type(model).__name__} head trained on MiniLM embeddings"
    say(f"{name}: {what} in {time.perf_counter() - t0:.1f} s")
    return stage


def embed_with_progress(clf: EmbeddingClassifier, texts: list[str], name: str) -> np.ndarray:
    """``clf.embed(texts)``, block by block, reported by :func:`working` (the encoder's first load
    included: several seconds)."""
    with working(f"{name}: embed texts with all-MiniLM-L6-v2", total=len(texts), unit="text") as bar:
        rows = []
        for s in range(0, len(texts), EMBED_BLOCK):
            block = texts[s: s + EMBED_BLOCK]
            rows.append(clf.embed(block))  # (len(block), 384)
            bar.update(len(block))
    return np.concatenate(rows) if rows else np.zeros((0, MINILM_DIM), dtype=np.float32)
