"""Advice from a measured noise scale: a batch size and a learning rate (McCandlish et al. 2018).

:func:`advise` turns ``B_simple`` into a recommended batch size (rounded, capped, a multiple of the
devices), scales a tuned learning rate to it with the paper's eq. 2.7, and explains itself in
:attr:`BatchAdvice.reasoning`. :func:`_advise_measured` is the version the measurements
(:meth:`GradientNoiseScale.advise`, :meth:`NoiseScaleResult.advise`) call: an unreliable
measurement warns and its advice carries the warning.

Example:
    >>> advice = advise(400.0, base_lr=0.1, base_batch_size=128)
    >>> advice.batch_size, round(advice.lr, 3), advice.steps_factor, round(advice.examples_factor, 2)
    (512, 0.232, 1.78125, 2.28)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

from leanscale.core.deprecation import renamed_argument
from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param

__all__ = ["BatchAdvice", "advise"]


@dataclass(frozen=True)
class BatchAdvice:
    """A batch size and learning rate from McCandlish et al.'s model (see :func:`advise`)."""

    batch_size: int  # recommended global batch
    lr: float | None  # eps(B) from base_lr at base_batch_size (None without base_lr)
    b_simple: float  # the noise scale used as B_noise
    steps_factor: float  # S / S_min = 1 + B_noise / B: steps relative to the fewest possible
    examples_factor: float  # E / E_min = 1 + B / B_noise: examples relative to the fewest possible
    lr_max: float | None  # eps_max = base_lr (1 + B_noise / base_batch_size): the optimal LR as B -> inf
    base_lr: float | None
    base_batch_size: int | None
    steps_vs_base: float | None  # S(B) / S(base_batch_size) = (1 + B_noise/B) / (1 + B_noise/base_batch_size)
    examples_vs_base: float | None  # E(B) / E(base_batch_size)
    reasoning: str  # the paragraph __str__ prints
    warnings: tuple[str, ...] = ()  # why this advice is not to be trusted as is (also in reasoning)
    n_examples: int | None = None  # training-set size the batch was checked against

    @property
    def base_batch(self) -> int | None:
        """Deprecated name of :attr:`base_batch_size` (a ``FutureWarning``; removed in the next release)."""
        warnings.warn("BatchAdvice.base_batch was renamed to BatchAdvice.base_batch_size and will be removed "
                      "in the next release.", FutureWarning, stacklevel=2)
        return self.base_batch_size

    def __str__(self) -> str:
        return self.reasoning

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def advise(
    b_simple: float,
    *,
    base_lr: float | None = None,
    base_batch_size: int | None = None,
    max_batch: int | None = None,
    n_devices: int = 1,
    power_of_two: bool = True,
    n_examples: int | None = None,
    base_batch: int | None = None,
) -> BatchAdvice:
    """Recommend a batch size and learning rate from a measured noise scale.

    McCandlish et al.'s model, taking ``B_noise ~ B_simple``: training to a given loss takes
    ``S = S_min (1 + B_noise / B)`` steps and ``E = E_min (1 + B / B_noise)`` examples (eqs.
    2.11-2.12). ``B = B_noise`` is the knee of that trade-off, where both cost 2x their minimum;
    that is the recommendation. The optimal SGD learning rate is ``eps(B) = eps_max / (1 +
    B_noise / B)`` (eq. 2.7); with a learning rate ``base_lr`` tuned at ``base_batch_size``::

        eps(B) = base_lr (1 + B_noise / base_batch_size) / (1 + B_noise / B)

    which is the linear scaling rule for ``B << B_noise`` and saturates at ``eps_max`` above it.

    Steps: ``B_simple`` -> rounded to the nearest power of two (``power_of_two``) -> at most
    ``max_batch`` -> rounded down to a multiple of ``n_devices`` (at least ``n_devices``).

    Caveats (also in the reasoning): ``B_simple ~ B_noise`` needs a well-conditioned Hessian; the
    noise scale grows during training, so advice from an early measurement is conservative later;
    the LR rule is derived for SGD -- for Adam the paper found the optimal LR grows more slowly
    (like ``B^alpha``, ``alpha`` between 0.5 and 1).

    Args:
        b_simple: The measured noise scale (>= 0; ``inf`` needs ``max_batch``).
        base_lr: Learning rate tuned at ``base_batch_size`` (> 0), to scale to the new batch.
        base_batch_size: Batch size ``base_lr`` belongs to (required with ``base_lr``).
        max_batch: Largest batch you can use (memory, data, devices).
        n_devices: Data-parallel devices; the batch is a multiple of it.
        power_of_two: Round ``B_simple`` to the nearest power of two (else to the nearest int).
        n_examples: Size of the training set. The batch is then at most ``n_examples`` (rounded
            down to a multiple of ``n_devices``), and a batch above ``n_examples / 10`` (fewer than 10
            steps per epoch) gets a warning in ``warnings`` and the reasoning: the model behind the
            advice assumes many steps drawn from a large data set.
        base_batch: Deprecated name of ``base_batch_size`` (a ``FutureWarning``; removed in the
            next release).

    Returns:
        A :class:`BatchAdvice`; ``print()`` it for the reasoning.

    Raises:
        InvalidParameterError: a NaN or negative ``b_simple``, an infinite one without
            ``max_batch``, ``base_lr`` without ``base_batch_size`` (or vice versa), non-positive values,
            or ``max_batch < n_devices``.
    """
    owner = "advise"
    base_batch_size = renamed_argument(owner, "base_batch", "base_batch_size", base_batch, base_batch_size, None)
    b_noise = _check_advise_args(b_simple, base_lr, base_batch_size, max_batch, n_devices, power_of_two, n_examples,
                                 owner)
    batch, notes = _choose_batch(b_noise, max_batch, n_devices, power_of_two, n_examples)
    cautions = _cautions(batch, b_noise, n_examples)
    scaled = _scale_lr(b_noise, batch, base_lr, base_batch_size)
    return BatchAdvice(
        batch_size=batch, lr=scaled.lr, b_simple=b_noise, steps_factor=_steps_factor(b_noise, batch),
        examples_factor=_examples_factor(b_noise, batch), lr_max=scaled.lr_max,
        base_lr=None if base_lr is None else float(base_lr), base_batch_size=base_batch_size,
        steps_vs_base=scaled.steps_vs_base, examples_vs_base=scaled.examples_vs_base,
        reasoning=_reasoning(b_noise, batch, notes, cautions, base_lr, base_batch_size, scaled),
        warnings=tuple(cautions), n_examples=n_examples,
    )


# advise() warns when the batch leaves fewer steps per epoch than this
_MIN_STEPS_PER_EPOCH = 10


def _steps_factor(b_noise: float, b: float) -> float:
    """``S / S_min = 1 + B_noise / B``: steps to a given loss relative to the fewest possible."""
    return 1.0 + b_noise / b


def _examples_factor(b_noise: float, b: float) -> float:
    """``E / E_min = 1 + B / B_noise``: examples relative to the fewest possible (inf for B_noise = 0)."""
    return math.inf if b_noise == 0 else 1.0 + b / b_noise


def _check_advise_args(
    b_simple: float,
    base_lr: float | None,
    base_batch_size: int | None,
    max_batch: int | None,
    n_devices: int,
    power_of_two: bool,
    n_examples: int | None,
    owner: str,
) -> float:
    """Check :func:`advise`'s arguments (see its Raises); returns ``B_noise = float(b_simple)``."""
    check_param("b_simple", b_simple, [Interval("real", 0, None, closed="left")], owner=owner)
    check_param("base_lr", base_lr, [None, Interval("real", 0, None, closed="neither")], owner=owner)
    check_param("base_batch_size", base_batch_size, [None, Interval(int, 1, None)], owner=owner)
    check_param("max_batch", max_batch, [None, Interval(int, 1, None)], owner=owner)
    check_param("n_devices", n_devices, [Interval(int, 1, None)], owner=owner)
    check_param("power_of_two", power_of_two, [bool], owner=owner)
    check_param("n_examples", n_examples, [None, Interval(int, 1, None)], owner=owner)
    if n_examples is not None and n_examples < n_devices:
        raise InvalidParameterError(
            f"The 'n_examples' parameter of {owner} must be at least n_devices ({n_devices}). Got {n_examples}."
        )
    if (base_lr is None) != (base_batch_size is None):
        name = "base_batch_size" if base_batch_size is None else "base_lr"
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be given together with "
            f"{'base_lr' if name == 'base_batch_size' else 'base_batch_size'} (the LR is scaled from the batch it was "
            f"tuned at). Got None."
        )
    if max_batch is not None and max_batch < n_devices:
        raise InvalidParameterError(
            f"The 'max_batch' parameter of {owner} must be at least n_devices ({n_devices}). Got {max_batch}."
        )
    b_noise = float(b_simple)
    if math.isinf(b_noise) and max_batch is None:
        raise InvalidParameterError(
            f"The 'max_batch' parameter of {owner} must be given when b_simple is inf (the gradient was "
            f"not resolved above the noise: every batch you can afford is below the critical batch). "
            f"Got None. Or measure again with larger batches."
        )
    return b_noise


def _choose_batch(
    b_noise: float, max_batch: int | None, n_devices: int, power_of_two: bool, n_examples: int | None
) -> tuple[int, list[str]]:
    """The recommended batch and how it was reached (one note per step): ``B_noise`` rounded, capped
    at ``max_batch`` and ``n_examples``, rounded down to a multiple of ``n_devices``."""
    notes = []
    if math.isinf(b_noise):
        target = float(max_batch)
        notes.append(f"B_simple is inf (noise dominates at the measured batch sizes), so the largest allowed "
                     f"batch, {max_batch}, is used")
    elif power_of_two:
        target = 2.0 ** round(math.log2(b_noise)) if b_noise >= 1 else 1.0
        notes.append(f"B_simple {_fmt(b_noise)} rounded to the power of two {int(target)}")
    else:
        target = float(max(1, round(b_noise)))
        notes.append(f"B_simple {_fmt(b_noise)} rounded to {int(target)}")
    batch = int(target)
    if max_batch is not None and batch > max_batch:
        batch = max_batch
        notes.append(f"capped at max_batch {max_batch}")
    if n_examples is not None and batch > n_examples:
        batch = n_examples
        notes.append(f"capped at the {n_examples:,} examples of the data set")
    if n_devices > 1 and batch % n_devices:
        batch = max(n_devices, batch // n_devices * n_devices)
        notes.append(f"rounded down to a multiple of {n_devices} devices, {batch}")
    return batch, notes


def _cautions(batch: int, b_noise: float, n_examples: int | None) -> list[str]:
    """Why the advice is not to be trusted as is: too few steps per epoch, or no noise resolved."""
    cautions = []
    if n_examples is not None and batch * _MIN_STEPS_PER_EPOCH > n_examples:
        cautions.append(
            f"batch {batch:,} is {batch / n_examples:.0%} of the {n_examples:,} training examples "
            f"({n_examples // batch} step(s) per epoch): the noise-scale model assumes many steps drawn from a "
            f"large data set, so this advice does not transfer; use a batch of at most "
            f"{max(1, n_examples // _MIN_STEPS_PER_EPOCH):,} and more epochs, or more data"
        )
    if b_noise == 0:
        cautions.append("B_simple = 0 means no gradient noise was resolved, not that there is none: the "
                        "recommended batch is only the smallest possible one")
    return cautions


class _ScaledLR(NamedTuple):
    """The learning-rate part of the advice (all None without ``base_lr``)."""

    lr: float | None = None  # eps(batch)
    lr_max: float | None = None  # eps_max
    steps_vs_base: float | None = None  # S(batch) / S(base_batch_size)
    examples_vs_base: float | None = None  # E(batch) / E(base_batch_size)


def _scale_lr(b_noise: float, batch: int, base_lr: float | None, base_batch_size: int | None) -> _ScaledLR:
    """``eps(B) = base_lr (1 + B_noise / base_batch_size) / (1 + B_noise / B)`` and the costs against
    ``base_batch_size``."""
    if base_lr is None:
        return _ScaledLR()
    if math.isinf(b_noise):  # eps(B)/eps(B0) -> B / B0: the linear rule
        return _ScaledLR(lr=base_lr * batch / base_batch_size, lr_max=math.inf,
                         steps_vs_base=base_batch_size / batch, examples_vs_base=1.0)
    lr_max = base_lr * _steps_factor(b_noise, base_batch_size)
    return _ScaledLR(
        lr=lr_max / _steps_factor(b_noise, batch),
        lr_max=lr_max,
        steps_vs_base=_steps_factor(b_noise, batch) / _steps_factor(b_noise, base_batch_size),
        examples_vs_base=(_examples_factor(b_noise, batch) / _examples_factor(b_noise, base_batch_size)
                          if b_noise > 0 else batch / base_batch_size),
    )


def _reasoning(
    b_noise: float,
    batch: int,
    notes: list[str],
    cautions: list[str],
    base_lr: float | None,
    base_batch_size: int | None,
    scaled: _ScaledLR,
) -> str:
    """The paragraph :class:`BatchAdvice` prints: the batch, the learning rate, warnings, caveats."""
    text = [(
        f"Recommended batch size {batch}: {'; '.join(notes)}. McCandlish et al. (2018) take the noise scale "
        f"B_noise ~ B_simple = tr(Sigma)/|G|^2 = {_fmt(b_noise)} as the critical batch: reaching a given loss "
        f"takes S = S_min (1 + B_noise/B) steps and E = E_min (1 + B/B_noise) examples, and B = B_noise is the "
        f"knee where both cost 2x their minimum. At batch {batch}: {_fmt(_steps_factor(b_noise, batch))}x the "
        f"fewest steps and {_fmt(_examples_factor(b_noise, batch))}x the fewest examples."
    )]
    if base_lr is not None:
        lr = scaled.lr
        if math.isinf(b_noise):
            text.append(
                f"Learning rate {lr:.4g}: with B_noise = inf the optimal LR eps(B) = eps_max/(1 + B_noise/B) "
                f"scales linearly from base_lr {base_lr:g} at batch {base_batch_size}."
            )
        else:
            linear = base_lr * batch / base_batch_size
            text.append(
                f"Learning rate {lr:.4g}: the optimal SGD rate is eps(B) = eps_max/(1 + B_noise/B); from base_lr "
                f"{base_lr:g} at batch {base_batch_size}, eps_max = {scaled.lr_max:.4g} and eps({batch}) = {lr:.4g} "
                f"(the linear rule would give {linear:.4g}; the two agree only for B << B_noise). Compared with batch "
                f"{base_batch_size}: {_fmt(scaled.steps_vs_base)}x the steps and {_fmt(scaled.examples_vs_base)}x the "
                f"examples."
            )
    if cautions:
        text.append(" ".join(f"Warning: {c}." for c in cautions))
    text.append(
        "Caveats: B_simple equals B_noise only for a well-conditioned Hessian, so treat it as an "
        "order-of-magnitude guide; the noise scale grows as training proceeds, so a measurement "
        "early in training under-estimates the useful batch later (re-measure, or grow the batch); the LR rule "
        "is for SGD -- for Adam the optimal LR grows more slowly with the batch."
    )
    return " ".join(text)


def _advise_measured(b_simple: float, warning: str | None, kwargs: dict) -> BatchAdvice:
    """:func:`advise` for a measurement; an unreliable one warns and its advice carries the warning."""
    advice = advise(b_simple, **kwargs)
    cautions = [*(c.rstrip(".") for c in [warning] if c is not None), *advice.warnings]
    if cautions:  # one warning with every reason
        warnings.warn("advise: " + "; ".join(cautions) + ".", RuntimeWarning, stacklevel=3)
    if warning is None:
        return advice
    return replace(advice, warnings=(warning.rstrip("."), *advice.warnings),
                   reasoning=f"Warning: {warning} {advice.reasoning}")
