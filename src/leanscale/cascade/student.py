"""A cheap student of a big text model: learned token vectors (and a tiny transformer) on top of
the static MiniLM table, distilled from the big model's class probabilities.

:class:`StudentClassifier` reads a text as the token ids of the model2vec tokenizer of the static
MiniLM encoder (:func:`leanscale.models.static_text_encoder`) and starts from that encoder's token
table, so before training its text vector is exactly the static encoder's (the unit-norm mean of
the tokens' rows). Unlike :class:`~leanscale.cascade.StaticEmbeddingStage` it trains the table with
the head (``learn_tokens``), can add hashed token bigrams (fastText's n-gram features: Joulin et al.
2017, "Bag of Tricks for Efficient Text Classification"), and with ``layers > 0`` runs a
tiny pre-norm transformer over the tokens before the mean (its output projections start at zero,
so it starts as the bag). Trained with ``soft_targets`` -- a bigger model's class probabilities on
unlabelled texts -- it is a distilled middle stage for a cascade (Hinton et al. 2015). Optionally
the head also sees a TF-IDF model's scaled log-probabilities, as the big model of the WordNet
benchmark does (:mod:`leanscale.cascade.stacking`). On WordNet (method card, benchmark 1d) the
bag alone, distilled on 58,000 unlabelled glosses, reaches 70.4% (the distilled static stage
67.3%, the big model 72.1%) at ~1/38 of the big model's cost.

    student = StudentClassifier(tfidf=tfidf).fit(texts, y, soft_targets=Q)  # Q: the big model's probabilities
    stage = ModelStage(student, name="student")

Needs model2vec (``pip install 'leanscale[static-embeddings]'``). Saving: ``get_state`` /
``from_state`` / ``save`` / ``load`` (no pickle: JSON meta and float32 arrays; the tokenizer is
the static encoder's ``tokenizer.json``, saved as text).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
    short,
    texts_arg,
)
from leanscale.cascade.tfidf import TfidfClassifier
from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.persistence import register_fitted
from leanscale.core.validation import InstanceOf, Interval, check_is_fitted

__all__ = ["StudentClassifier"]

_HASH_MUL = 1_000_003  # bigram (a, b) -> (a * _HASH_MUL + b) mod buckets


# ------------------------------------------------------------------------------------- tokens


class _Tokens:
    """The static encoder's tokenizer and token table: ``ids(texts)`` as model2vec's ``encode``
    sees them (the same truncation, unknown tokens dropped)."""

    def __init__(self, tokenizer: Any, table: np.ndarray, unk_id: int | None, max_length: int | None,
                 median_token_length: int, tokenizer_json: str):
        self.tokenizer, self.table, self.unk_id = tokenizer, table, unk_id
        self.max_length, self.median_token_length = max_length, median_token_length
        self.tokenizer_json = tokenizer_json
        import threading

        self._lock = threading.Lock()  # a Hugging Face tokenizer is not safe from two threads at once

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self.max_length is not None:
            m = self.max_length * self.median_token_length
            texts = [t[:m] for t in texts]
        with self._lock:
            enc = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        out = []
        for e in enc:
            ids = [i for i in e.ids if i != self.unk_id] if self.unk_id is not None else list(e.ids)
            out.append(ids)
        return out


_LOADED: dict = {}  # (folder, mtime of its table) -> _Tokens: fits in one process share one load


def _static_tokens(path: Any) -> _Tokens:
    """The tokenizer and table of the static encoder in ``path`` (None: the default cache folder,
    built there on first use)."""
    from pathlib import Path

    from leanscale.cascade.stages import STATIC_ENCODER_DIR
    from leanscale.data.paths import cache_dir
    from leanscale.models import static_text_encoder

    folder = cache_dir() / STATIC_ENCODER_DIR if path is None else path
    try:
        key = (str(Path(folder).resolve()), os.stat(Path(folder) / "model.safetensors").st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    enc = static_text_encoder(folder)  # builds the default folder once; checks the files
    model = enc._model  # a model2vec StaticModel
    tok_json = (Path(enc.path) / "tokenizer.json").read_text(encoding="utf-8")
    tok = _tokens_from(model.tokenizer, np.asarray(model.embedding, dtype=np.float32), model.unk_token_id,
                       model.max_length, int(getattr(model, "median_token_length", 1) or 1), tok_json)
    if key is not None:
        _LOADED.clear()  # one encoder at a time (a table is ~30 MB)
        _LOADED[key] = tok
    return tok


def _tokens_from(tokenizer, table, unk_id, max_length, median_token_length, tok_json) -> _Tokens:
    tokenizer.no_truncation()
    if max_length is not None:
        tokenizer.enable_truncation(max_length=int(max_length))
    return _Tokens(tokenizer, table, unk_id, max_length, median_token_length, tok_json)


def _bigrams(ids: list[int], buckets: int) -> list[int]:
    return [(a * _HASH_MUL + b) % buckets for a, b in zip(ids[:-1], ids[1:])]


# ------------------------------------------------------------------------------------- network


def _build_net(table: np.ndarray, *, bigram_buckets: int, layers: int, heads: int,
               max_tokens: int, n_side: int, hidden: int, n_classes: int, seed: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    v, d = table.shape

    class StudentNet(nn.Module):
        """tokens -> (optional transformer) -> mean (+ bigram sum / n) -> unit norm -> [., side] -> MLP."""

        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(v, d)
            with torch.no_grad():
                self.tok.weight.copy_(torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)))
            self.tok.weight.requires_grad_(False)
            self.delta = None  # while training: learned offsets of the rows of the tokens seen (see learn_rows)
            self.bigram = nn.EmbeddingBag(bigram_buckets, d, mode="sum") if bigram_buckets else None
            if self.bigram is not None:
                nn.init.zeros_(self.bigram.weight)
            self.blocks = nn.ModuleList()
            if layers:
                # position vectors: seen by the blocks only (taken out again after them)
                self.pos = nn.Parameter(0.1 * torch.randn(max_tokens, d))
                for _ in range(layers):
                    blk = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                                     norm_first=True)
                    nn.init.zeros_(blk.self_attn.out_proj.weight)
                    nn.init.zeros_(blk.self_attn.out_proj.bias)
                    nn.init.zeros_(blk.linear2.weight)
                    nn.init.zeros_(blk.linear2.bias)
                    self.blocks.append(blk)
            k_in = d + n_side
            if hidden:
                self.head = nn.Sequential(nn.Linear(k_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
            else:
                self.head = nn.Sequential(nn.Linear(k_in, n_classes))

        def learn_rows(self, seen: np.ndarray) -> None:
            """Train the rows of the token ids ``seen`` (the others get no gradient anyway): a
            zero-initialised offset per seen token, so the optimizer holds only those rows."""
            remap = torch.zeros(v, dtype=torch.int64)
            remap[torch.from_numpy(seen)] = torch.arange(1, len(seen) + 1)
            self.register_buffer("remap", remap, persistent=False)
            self.delta = nn.Embedding(len(seen) + 1, d, padding_idx=0)  # row 0: unseen, stays 0
            nn.init.zeros_(self.delta.weight)

        def fold(self) -> None:
            """Add the learned offsets into the table (after training): one table again."""
            if self.delta is not None:
                with torch.no_grad():
                    self.tok.weight += self.delta(self.remap)
                self.delta = None
                del self.remap

        def embed(self, ids, mask, bg, bg_offsets):
            # ids, mask: (B, T) padded token ids and their mask; bg / bg_offsets: flat hashed bigrams
            x = self.tok(ids)  # (B, T, d)
            if self.delta is not None:
                x = x + self.delta(self.remap[ids])
            if len(self.blocks):
                p = self.pos[: x.shape[1]]
                x = x + p
                pad = ~mask
                pad[:, 0] &= mask.any(1)  # a text without tokens attends to its padding (no NaN; not pooled)
                for blk in self.blocks:
                    x = blk(x, src_key_padding_mask=pad)
                x = x - p  # zero-initialised outputs: the bag's vectors before training
            m = mask.unsqueeze(-1).to(x.dtype)
            n = m.sum(1).clamp(min=1.0)  # (B, 1)
            v = (x * m).sum(1) / n  # (B, d): the mean of the (contextual) token vectors
            if self.bigram is not None:
                v = v + self.bigram(bg, bg_offsets) / n
            return F.normalize(v, dim=-1, eps=1e-30)  # (B, d), as the static encoder's unit rows

        def forward(self, ids, mask, bg, bg_offsets, side):
            v = self.embed(ids, mask, bg, bg_offsets)
            if side is not None:
                v = torch.cat([v, side], dim=1)
            return self.head(v)

    with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
        torch.manual_seed(seed)
        net = StudentNet()
    return net


def _length_batches(lengths: np.ndarray, bs: int, gen) -> list[np.ndarray]:
    """One epoch of index batches: a seeded shuffle, cut into windows of 32 batches, each window
    sorted by text length (little padding), the batches in a seeded random order."""
    import torch

    n = len(lengths)
    perm = torch.randperm(n, generator=gen).numpy()
    out = []
    window = 32 * bs
    for s in range(0, n, window):
        w = perm[s: s + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        out.extend(w[i: i + bs] for i in range(0, len(w), bs))
    order = torch.randperm(len(out), generator=gen).numpy()
    return [out[i] for i in order]


def _batch_tensors(ids: list[list[int]], buckets: int, max_tokens: int | None):
    """Padded ``(ids, mask)`` (B, T) and the flat bigrams with offsets for a list of id lists."""
    import torch

    if max_tokens is not None:
        ids = [x[:max_tokens] for x in ids]
    t = max(1, max((len(x) for x in ids), default=1))
    arr = np.zeros((len(ids), t), np.int64)
    mask = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
        arr[i, : len(x)] = x
        mask[i, : len(x)] = True
    if buckets:
        bgs = [_bigrams(x, buckets) for x in ids]
        flat = np.fromiter((b for x in bgs for b in x), np.int64)
        offsets = np.cumsum([0] + [len(x) for x in bgs[:-1]]).astype(np.int64)
        bg, off = torch.from_numpy(flat), torch.from_numpy(offsets)
    else:
        bg = off = None
    return torch.from_numpy(arr), torch.from_numpy(mask), bg, off


# ------------------------------------------------------------------------------------- estimator


@register_fitted("StudentClassifier")
class StudentClassifier(TextClassifier):
    """Learned static token vectors (optionally hashed bigrams and a tiny transformer) with an MLP
    head: a cheap student of a big text model.

    Parameters:
        encoder_path: folder of the static MiniLM encoder whose tokenizer and token table the
            student starts from (:func:`leanscale.models.static_text_encoder`); None: the default
            ``cache_dir()/minilm-static-256`` (built there on first use, ~15 s).
        learn_tokens: train the token table with the head (False: frozen, the static encoder's
            features exactly when there are no bigrams and no layers).
        bigram_buckets: hashed token-bigram vectors added to the mean (0: none).
        layers, heads: a tiny pre-norm transformer (width = the table's, feed-forward 2x) over
            the tokens before the mean; 0 layers: a bag of tokens.
        max_tokens: the tokens read per text (the first ones; the rest are ignored, with or
            without layers -- the static encoder itself reads up to 512).
        tfidf: a fitted :class:`~leanscale.cascade.TfidfClassifier` whose ``STACK_SCALE * log p``
            columns join the text vector (None: the text vector alone).
        hidden: the head's hidden width (0: linear).
        epochs, lr, batch_size, weight_decay, seed: AdamW on seeded shuffles, cosine decay (weight
            decay on the head and transformer only, not on the token and bigram tables).

    Learned attributes: ``classes_``, ``net_`` (torch module), ``loss_history_``.
    """

    _parameter_constraints = {
        "encoder_path": [None, str, os.PathLike],
        "learn_tokens": [bool],
        "bigram_buckets": [Interval(int, 0, 1 << 24)],
        "layers": [Interval(int, 0, 8)],
        "heads": [Interval(int, 1, 64)],
        "max_tokens": [Interval(int, 1, 4096)],
        "tfidf": [None, InstanceOf(TfidfClassifier, description="a fitted TfidfClassifier")],
        "hidden": [Interval(int, 0, MAX_WIDTH)],
        "epochs": [Interval(int, 1, None)],
        "lr": [Interval("real", 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None)],
        "weight_decay": [Interval("real", 0, None)],
        "seed": [Interval(int, 0, None)],
    }

    def __init__(self, encoder_path: str | os.PathLike | None = None, learn_tokens: bool = True,
                 bigram_buckets: int = 0,
                 layers: int = 0, heads: int = 4, max_tokens: int = 64, tfidf: Any = None, hidden: int = 512,
                 epochs: int = 8, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-2,
                 seed: int = 0):
        self.encoder_path = encoder_path
        self.learn_tokens = learn_tokens
        self.bigram_buckets = bigram_buckets
        self.layers = layers
        self.heads = heads
        self.max_tokens = max_tokens
        self.tfidf = tfidf
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    # -- features -----------------------------------------------------------------------------

    def _tokens(self) -> _Tokens:
        tok = getattr(self, "_tokens_", None)
        if tok is None:
            tok = self._tokens_ = _static_tokens(self.encoder_path)
        return tok

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of ``texts`` (the static encoder's tokenizer, unknown tokens dropped)."""
        return self._tokens().ids(texts_arg(texts, "StudentClassifier.token_ids", min_len=0))

    def _side(self, texts: list[str]) -> np.ndarray | None:
        if self.tfidf is None:
            return None
        from leanscale.cascade.stacking import _FLOOR, STACK_SCALE

        return (STACK_SCALE * np.log(np.clip(self.tfidf.predict_proba(texts), _FLOOR, 1.0))).astype(np.float32)

    def _check_side(self, side: Any, n: int, owner: str) -> np.ndarray:
        k = len(self.tfidf.classes_)
        arr = np.asarray(side, dtype=np.float32) if side is not None else None
        if arr is None or arr.shape != (n, k) or not np.isfinite(arr).all():
            raise InvalidParameterError(
                f"The 'tfidf_features' parameter of {owner} must be a finite ({n}, {k}) array: STACK_SCALE * the "
                f"log-probabilities of the tfidf model's {k} classes for each text (e.g. cross_fitted_logp). Got "
                f"{'shape ' + str(arr.shape) if arr is not None else 'None'}.")
        return arr

    # -- training -----------------------------------------------------------------------------

    def fit(self, texts: Sequence[str], y: Sequence, *, soft_targets: Any = None,
            tfidf_features: Any = None) -> StudentClassifier:
        """Train the student on ``texts``; returns self.

        Args:
            texts: the training texts (labelled and unlabelled).
            y: labels (n,); their sorted distinct values are ``classes_`` (where a text has no
                label, pass the bigger model's argmax).
            soft_targets: knowledge distillation, as in :meth:`EmbeddingClassifier.fit_embeddings`:
                target distributions (n, n_classes), columns in ``classes_`` order (a bigger model's
                ``predict_proba`` on unlabelled texts, one-hot rows for labelled ones); the loss is
                the cross-entropy to them. None: the labels ``y``.
            tfidf_features: with ``tfidf``, the TF-IDF block of the training texts (n, k): pass
                out-of-fold values for the texts ``tfidf`` was trained on (TF-IDF is over-confident
                there). None: :func:`~leanscale.cascade.stacking.cross_fitted_logp` of ``texts, y``.
        """
        import torch
        import torch.nn.functional as F

        from leanscale.cascade.embedding_head import _check_soft_targets
        from leanscale.train import fit, lr_factor

        self._validate_params()
        owner = "StudentClassifier.fit"
        texts = texts_arg(texts, owner)
        classes, codes = labels_arg(y, len(texts), owner)
        n = len(texts)
        side = None
        if self.tfidf is not None:
            check_is_fitted(self.tfidf, ["classes_"])
            if tfidf_features is None:
                from leanscale.cascade.stacking import cross_fitted_logp

                tfidf_features = cross_fitted_logp(texts, np.asarray(classes)[codes], self.tfidf.classes_, self.seed)
            side = torch.from_numpy(np.ascontiguousarray(self._check_side(tfidf_features, n, owner)))
        elif tfidf_features is not None:
            raise InvalidParameterError(f"The 'tfidf_features' parameter of {owner} must be None when tfidf is None. "
                                        f"Got an array of shape {np.shape(tfidf_features)}.")
        if soft_targets is None:
            q = torch.nn.functional.one_hot(torch.from_numpy(codes.astype(np.int64)), len(classes)).float()
        else:
            q = torch.from_numpy(_check_soft_targets(soft_targets, n, classes, owner))
        tok = self._tokens()
        ids = tok.ids(texts)
        net = _build_net(tok.table, bigram_buckets=self.bigram_buckets,
                         layers=self.layers, heads=self.heads, max_tokens=self.max_tokens,
                         n_side=0 if side is None else side.shape[1], hidden=self.hidden, n_classes=len(classes),
                         seed=self.seed)
        if self.learn_tokens:
            net.learn_rows(np.unique(np.fromiter((i for x in ids for i in x[:self.max_tokens]), np.int64)))
        tables = ("tok.", "delta.", "bigram.", "pos")
        decay = [p for name, p in net.named_parameters() if p.requires_grad and not name.startswith(tables)]
        no_decay = [p for name, p in net.named_parameters() if p.requires_grad and name.startswith(tables)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(self.weight_decay)},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=float(self.lr))
        bs = min(self.batch_size, n)
        steps_per_epoch = len(_length_batches(np.zeros(n, np.int64), bs, torch.Generator()))
        total = self.epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(self.seed)
        buckets, max_tokens = self.bigram_buckets, self.max_tokens

        lengths = np.array([min(len(x), max_tokens) for x in ids])

        def batches():
            for _ in range(self.epochs):
                yield from _length_batches(lengths, bs, gen)  # every text once per epoch

        def loss(net, idx):
            b = _batch_tensors([ids[i] for i in idx], buckets, max_tokens)
            logits = net(*b, None if side is None else side[idx])
            return -(q[idx] * F.log_softmax(logits, dim=-1)).sum(1).mean()

        losses, running = [], {"loss": 0.0}

        def on_step(out) -> None:
            running["loss"] += float(out.loss) * len(out.batch)
            if out.step % steps_per_epoch == 0:
                losses.append(running["loss"] / n)
                running["loss"] = 0.0

        net.train()
        fit(net, opt, batches(), loss, n_steps=total, lr=float(self.lr),
            schedule=lambda step: lr_factor(step, total), on_step=on_step, ddp=False)
        net.fold()
        net.eval()
        self.net_, self.classes_, self.loss_history_ = net, classes, losses
        return self

    # -- prediction ---------------------------------------------------------------------------

    def _forward(self, texts: list[str], fn: str) -> np.ndarray:
        import torch

        ids = self._tokens().ids(texts)
        side = self._side(texts)
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 1024):
                b = _batch_tensors(ids[s: s + 1024], self.bigram_buckets, self.max_tokens)
                if fn == "embed":
                    out.append(self.net_.embed(*b).numpy())
                else:
                    sd = None if side is None else torch.from_numpy(side[s: s + 1024])
                    out.append(torch.softmax(self.net_(*b, sd), dim=-1).numpy())
        return np.vstack(out).astype(np.float64 if fn != "embed" else np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit-norm text vectors (before the TF-IDF block and the head)."""
        check_is_fitted(self, ["net_", "classes_"])
        texts = texts_arg(texts, "StudentClassifier.embed", min_len=0)
        if not texts:
            return np.zeros((0, self.net_.tok.weight.shape[1]), np.float32)
        return self._forward(texts, "embed")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self, ["net_", "classes_"])
        texts = texts_arg(texts, "StudentClassifier.predict_proba", min_len=0)
        if not texts:
            return np.zeros((0, len(self.classes_)))
        return self._forward(texts, "proba")

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(meta, arrays)``: parameters, classes, the tokenizer (JSON text) and the TF-IDF
        model's state (JSON-able), and the network's float32 weights (``net.<name>``; the TF-IDF
        model's arrays as ``tfidf.<name>``)."""
        check_is_fitted(self, ["net_", "classes_"])
        params = self.get_params()
        params["tfidf"] = None
        if params["encoder_path"] is not None:
            params["encoder_path"] = os.fspath(params["encoder_path"])
        tok = self._tokens()
        meta = {
            "class": "StudentClassifier",
            "version": STATE_VERSION,
            "params": params,
            "classes": classes_to_meta(self.classes_),
            "loss_history": [float(v) for v in self.loss_history_],
            "tokenizer": {"json": tok.tokenizer_json, "unk_id": tok.unk_id, "max_length": tok.max_length,
                          "median_token_length": tok.median_token_length},
            "vocab_size": int(tok.table.shape[0]),
            "dim": int(tok.table.shape[1]),
        }
        arrays = {f"net.{k}": v.detach().cpu().numpy().astype(np.float32)
                  for k, v in self.net_.state_dict().items()}
        if self.tfidf is not None:
            tmeta, tarrays = self.tfidf.get_state()
            meta["tfidf"] = tmeta
            arrays.update({f"tfidf.{k}": v for k, v in tarrays.items()})
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> StudentClassifier:
        """Rebuild from :meth:`get_state` (``predict_proba`` is identical)."""
        import torch

        owner = "StudentClassifier.from_state"
        arrays = check_meta(meta, arrays, "StudentClassifier", ())
        params = meta_params(meta, cls._get_param_names(), owner)
        if params.get("tfidf") is not None:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has params.tfidf {short(params['tfidf'])}; "
                                        "expected null (the TF-IDF model is saved under 'tfidf').")
        tfidf = None
        if meta.get("tfidf") is not None:
            tarrays = {k[len("tfidf."):]: v for k, v in arrays.items() if k.startswith("tfidf.")}
            tfidf = TfidfClassifier.from_state(meta["tfidf"], tarrays)
        self = cls(**{**params, "tfidf": tfidf})
        self._validate_params()
        classes = classes_from_meta(meta.get("classes"), owner)
        v = meta_int(meta, "vocab_size", owner, 1, 1 << 22)
        d = meta_int(meta, "dim", owner, 1, MAX_WIDTH)
        t = meta.get("tokenizer")
        if not isinstance(t, Mapping) or not isinstance(t.get("json"), str):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} must have 'tokenizer' with the tokenizer's "
                                        f"JSON text under 'json'. Got {short(t)}.")
        for key in ("unk_id", "max_length"):
            if t.get(key) is not None and (isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 0):
                raise InvalidParameterError(f"The 'meta' parameter of {owner} has tokenizer.{key} {short(t[key])}; "
                                            "expected null or an int >= 0.")
        mtl = t.get("median_token_length", 1)
        if isinstance(mtl, bool) or not isinstance(mtl, int) or mtl < 1:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has tokenizer.median_token_length "
                                        f"{short(mtl)}; expected an int >= 1.")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError("StudentClassifier needs the tokenizers package (with model2vec). Install "
                                         "it with: pip install 'leanscale[static-embeddings]'") from exc
        try:
            tokenizer = Tokenizer.from_str(t["json"])
        except Exception as exc:
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has a tokenizer that does not load: "
                                        f"{short(str(exc))}.") from None
        table = finite_array(arrays, "net.tok.weight", (v, d), owner).astype(np.float32)
        n_side = 0 if tfidf is None else len(tfidf.classes_)
        net = _build_net(table, bigram_buckets=self.bigram_buckets,
                         layers=self.layers, heads=self.heads, max_tokens=self.max_tokens, n_side=n_side,
                         hidden=self.hidden, n_classes=len(classes), seed=self.seed)
        expected = {k: tuple(p.shape) for k, p in net.state_dict().items()}
        names = {f"net.{k}" for k in expected}
        extra = sorted(k for k in arrays if k.startswith("net.") and k not in names)
        if extra:
            raise InvalidParameterError(f"The 'arrays' parameter of {owner} has unexpected arrays {extra[:5]}.")
        state = {}
        for k, shape in expected.items():
            key = f"net.{k}"
            if key not in arrays:
                raise InvalidParameterError(f"The 'arrays' parameter of {owner} is missing {key!r} of shape {shape}.")
            state[k] = torch.from_numpy(np.ascontiguousarray(finite_array(arrays, key, shape, owner), np.float32))
        net.load_state_dict(state)
        net.eval()
        self._tokens_ = _tokens_from(tokenizer, table, t.get("unk_id"), t.get("max_length"), mtl, t["json"])
        loss = meta.get("loss_history", [])
        if not isinstance(loss, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in loss):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} has loss_history {short(loss)}; "
                                        "expected a list of numbers.")
        self.net_, self.classes_, self.loss_history_ = net, classes, [float(x) for x in loss]
        return self
