"""Self-supervised image embeddings to score and prune with: SimCLR training of an image encoder.

Self-supervised prototypes (Sorscher et al. 2022, arXiv 2206.14486) rank examples by their distance
to k-means centroids, so they need an embedding in which similar examples are close. For images
without a pretrained encoder, :func:`train_ssl_encoder` learns one from the images alone.

The encoders themselves (MiniLM-L6 text embeddings, the conv image backbone, batching of any
embedding function) live in :mod:`leanscale.models.encoders`, shared with cascade.

* :func:`train_ssl_encoder` + :func:`~leanscale.models.encoders.embed_images` -- SimCLR (Chen,
  Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
  Representations", arXiv 2002.05709) on the images alone, no labels: two random augmentations
  of each image (:func:`simclr_augment`) go through a small conv backbone
  (:class:`~leanscale.models.encoders.ConvEncoder`) and an MLP projection head, and the NT-Xent
  loss (:func:`nt_xent_loss`) pulls the two views together and pushes the other ``2B - 2``
  images of the batch away. The backbone (without the head, as in the paper, section 4.2) is the
  embedding.

Example:
    >>> import torch
    >>> from leanscale.models.encoders import embed_images
    >>> images = torch.rand(64, 1, 16, 16)
    >>> encoder = train_ssl_encoder(images, epochs=1, batch_size=32, dim=8)
    >>> embed_images(encoder, images).shape
    (64, 8)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.progress import progress
from leanscale.core.validation import InstanceOf, Interval, check_param

# ConvEncoder and as_images are used here. embed_images, embed_texts and embed_with moved to
# leanscale.models.encoders; pruner.py still reaches them through this module (``embed.embed_texts``
# ...), so they stay importable from here until it imports them from models.
from leanscale.models.encoders import (  # noqa: F401
    ConvEncoder,
    as_images,
    embed_images,
    embed_texts,
    embed_with,
)
from leanscale.train import StepOutput, fit, lr_factor

__all__ = [
    "SSLHistory",
    "nt_xent_loss",
    "simclr_augment",
    "train_ssl_encoder",
]


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
    x = as_images(images, "train_ssl_encoder", min_len=2)  # (n, C, H, W) float32
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
    model = nn.Sequential(encoder, head)  # (b, C, H, W) -> (b, 64) projections
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    order_gen = torch.Generator().manual_seed(seed)  # batches (CPU)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)  # augmentations (on the device)

    def batches():
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=order_gen).to(dev)
            for i in range(steps_per_epoch):
                yield perm[i * bs:(i + 1) * bs]  # (bs,) the last partial batch of an epoch dropped

    def loss_fn(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        xb = x[idx]  # (bs, C, H, W)
        views = torch.cat([
            simclr_augment(xb, generator=aug_gen, pixel_std=pixel_std, size=size),
            simclr_augment(xb, generator=aug_gen, pixel_std=pixel_std, size=size),
        ])  # (2 bs, C, h, w): one forward, so BatchNorm sees both views together
        z = net(views)  # (2 bs, 64)
        return nt_xent_loss(z[:bs], z[bs:], temperature)

    hist = SSLHistory(planned_steps=total)
    clock = {"last": time.perf_counter()}
    from leanscale.core.distributed import rank_and_world

    # every rank trains its own copy under torchrun: one bar, on rank 0
    bar = progress(total=total, desc="SimCLR", unit="step", disable=None if rank_and_world()[0] == 0 else True)

    def on_step(out: StepOutput) -> None:
        now = time.perf_counter()
        hist.losses.append(out.loss.item())
        hist.step_seconds.append(now - clock["last"])
        clock["last"] = now
        hist.steps = out.step
        bar.update(1)

    t0 = time.perf_counter()
    try:
        # the LR at the end of the step: a linear warmup over the first 5% of the steps, then a
        # cosine to 0 at the last step (SimCLR's schedule)
        result = fit(model, opt, batches(), loss_fn, n_steps=total, lr=lr,
                     schedule=lambda step: lr_factor(step + 1, total, warmup_steps=warmup),
                     on_step=on_step, time_limit_s=time_budget_s, ddp=False)
    finally:
        bar.close()
    hist.stopped_early = result.stopped == "time_limit"
    hist.seconds = time.perf_counter() - t0
    encoder.eval()
    encoder.history_ = hist
    return encoder

