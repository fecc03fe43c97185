"""Planning an IsoFLOP sweep (no training): the shape family and the grid of runs.

For each compute budget C, :func:`plan_isoflop_grid` picks ``n_sizes`` model shapes from
:func:`model_family` around the size that would see ``tokens_per_param`` tokens per parameter,
gives each D = C / (6 N) tokens and a peak LR from the width rule, and checks that every run fits
the step and corpus limits. Each run is a :class:`leanscale.scaling._train.RunSpec`.

Example:
    >>> from leanscale.scaling.sweep_config import SweepConfig
    >>> config = SweepConfig(vocab_size=512, seq_len=64, budgets_flops=(1e11, 1e12), n_sizes=3)
    >>> [shape.n_embd for shape in model_family(config, max_params=5e4)]  # up to the first above 5e4
    [8, 16, 24, 32, 40, 48]
    >>> [(spec.run_id, spec.n_params, spec.n_tokens) for spec in plan_isoflop_grid(config)][:3]
    [('C1e11-L1-d8', 5400, 3086420), ('C1e11-L1-d16', 12336, 1351059), ('C1e11-L1-d32', 30816, 540845)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from leanscale.core.errors import InvalidParameterError
from leanscale.scaling._train import RunSpec, model_config
from leanscale.scaling.sweep_config import SweepConfig

__all__ = ["ModelShape", "model_family", "plan_isoflop_grid"]


@dataclass(frozen=True)
class ModelShape:
    """One member of the shape family, with its parameter counts."""

    n_layer: int
    n_embd: int
    n_head: int
    n_params: int  # all parameters, tied embedding counted once
    n_params_non_embedding: int  # without token and position embeddings


def _shape(n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int) -> ModelShape:
    """Parameter counts of the sweep's :class:`GPT` (no biases, tied embeddings, MLP ratio 4).

    Per block: two LayerNorm gains (2 d), fused Q/K/V (3 d^2), attention output (d^2) and the
    MLP (2 * 4 d^2); plus the final LayerNorm (d) and the embeddings (vocab * d tokens, shared
    with the output head, and seq_len * d positions). Closed form because building even a
    meta-device model per candidate shape costs ~0.2 s; ``tests/scaling/test_sweep.py`` checks
    it against :meth:`GPT.n_params` so the two cannot drift apart.
    """
    d = n_embd
    non_embedding = n_layer * (12 * d * d + 2 * d) + d
    return ModelShape(n_layer, d, n_head, non_embedding + (vocab_size + seq_len) * d, non_embedding)


def model_family(config: SweepConfig, max_params: float) -> list[ModelShape]:
    """The shapes a sweep chooses from, by increasing ``n_params``, up to the first above ``max_params``.

    Widths are the multiples of ``head_dim`` (every head has ``head_dim`` channels, ``n_head =
    n_embd // head_dim``, as in the Chinchilla tables); the depth of a width is ``n_embd /
    aspect_ratio`` rounded half up (at least 1): depth and width grow together at a fixed ratio
    (Kaplan et al. 2020, whose loss is flat for ratios 20-200). One depth per width keeps the
    family monotone in N. Measured here, deep-narrow shapes of these tiny models lose: at 2e12
    FLOPs a 2-layer width-48 model (ratio 24) reached 3.61 nats where the 1-layer width-48 and
    2-layer width-64 models around it reached 3.28 and 3.53, hence the default ratio of 48.
    """
    shapes: list[ModelShape] = []
    k = 0
    while not shapes or shapes[-1].n_params <= max_params:
        k += 1
        d = k * config.head_dim
        n_layer = max(1, math.floor(d / config.aspect_ratio + 0.5))
        shapes.append(_shape(n_layer, d, k, config.vocab_size, config.seq_len))
    return shapes


def _peak_lr(config: SweepConfig, n_embd: int) -> float:
    """The LR rule: ``lr * (lr_base_width / n_embd) ** lr_width_exponent``.

    Wider models need smaller steps (muP: 1/width for the hidden matrices under Adam; GPT-3's
    table roughly halves the LR from width 768 to 2048), and these tiny ones more steeply:
    measured at 4e11 FLOPs with batches of 8, the best of three LRs a factor 2 apart was
    >= 1.1e-2 at width 24 and 3.2e-3 at width 40; at 1e12 FLOPs with batches of 32 it was
    >= 1.2e-2 at width 32, 5e-3 at 48 and 2e-3 at 80. Hence the exponent 1.5 between muP's 1
    and the measured ~2, with 5e-3 at width 32.
    """
    return config.lr * (config.lr_base_width / n_embd) ** config.lr_width_exponent


# RunSpec fields taken as they are from the shape and from the sweep settings
_FROM_SHAPE = ("n_layer", "n_head", "n_embd", "n_params", "n_params_non_embedding")
_FROM_CONFIG = ("seq_len", "vocab_size", "batch_size", "warmup_fraction", "min_lr_ratio", "weight_decay",
                "grad_clip", "n_curve_points", "val_batches", "val_fraction", "max_bytes", "seed")


def _budget_label(c: float) -> str:
    return f"{c:.3g}".replace("+", "")  # 1e+12 -> 1e12


def plan_isoflop_grid(config: SweepConfig, n_train_tokens: int | None = None) -> list[RunSpec]:
    """The runs of an IsoFLOP sweep: ``n_sizes`` model sizes for every budget, smallest first.

    For a budget C the centre of the bracket is the model that would see ``tokens_per_param``
    tokens per parameter, N* = sqrt(C / (6 * tokens_per_param)) (80 by default, measured for
    these tiny models; Chinchilla's is ~20, see :class:`SweepConfig`). The ``n_sizes`` target
    sizes are spaced evenly in log N over ``size_span`` (5x by default) around N*, so the loss
    minimum of each IsoFLOP curve falls inside the bracket even when the optimum is a few times
    off the centre. Each target is snapped to the nearest shape of :func:`model_family`
    (distinct, increasing), the run gets D = C / (6 N) tokens, rounded to an integer, and a
    peak LR from the width rule (:func:`_peak_lr`).

    N is the total number of parameters with the token embedding tied to the output head and
    counted once, plus the position embedding, exactly as :meth:`GPT.n_params` counts it. Each
    spec also records the non-embedding count and the Chinchilla Appendix-F FLOPs of its D.

    Args:
        config: the sweep settings (see :class:`SweepConfig`).
        n_train_tokens: training tokens of the corpus; when given, budgets whose smallest model
            would need more tokens than that are rejected (single-epoch training repeats none).

    Returns:
        A list of :class:`RunSpec`, grouped by budget (ascending), sizes ascending within one.

    Raises:
        InvalidParameterError: a budget is too small for the smallest model of the family or
            for ``min_steps`` optimizer steps of its largest model, or needs more tokens than
            the corpus has. The message names ``budgets_flops``, what is needed and what was
            received.
    """
    from leanscale.models.transformer import flops_per_token

    if not isinstance(config, SweepConfig):
        raise InvalidParameterError(
            f"The 'config' parameter of plan_isoflop_grid must be a SweepConfig. Got "
            f"{type(config).__name__} instead."
        )
    budgets = config.budgets_flops
    half_span = math.sqrt(config.size_span) if config.n_sizes > 1 else 1.0  # one size: N* itself
    centre = {c: math.sqrt(c / (6.0 * config.tokens_per_param)) for c in budgets}  # N*
    family = model_family(config, max_params=max(centre.values()) * half_span * 1.5)
    smallest = family[0]
    owner = "plan_isoflop_grid"

    # A budget too small: the smallest target size below the smallest model.
    min_budget = 6.0 * config.tokens_per_param * (smallest.n_params * half_span) ** 2
    for c in budgets:
        if centre[c] / half_span < smallest.n_params * (1 - 1e-9):
            raise InvalidParameterError(
                f"The 'budgets_flops' parameter of {owner} must hold budgets of at least "
                f"{min_budget:.3g} FLOPs for this grid. Got {c:.3g}: the smallest of "
                f"{config.n_sizes} sizes spanning {config.size_span:g}x around N* = sqrt(C / (6 * "
                f"{config.tokens_per_param:g} tokens/param)) = {centre[c]:,.0f} would have "
                f"{centre[c] / half_span:,.0f} parameters, below the smallest model of the family "
                f"(n_layer={smallest.n_layer}, n_embd={smallest.n_embd}: {smallest.n_params:,} "
                "parameters). Raise the budget, or lower vocab_size, seq_len, head_dim or size_span."
            )

    grid: list[RunSpec] = []
    for c in budgets:
        if config.n_sizes == 1:
            targets = [centre[c]]
        else:
            targets = [centre[c] * config.size_span ** (i / (config.n_sizes - 1) - 0.5)
                       for i in range(config.n_sizes)]
        chosen: list[ModelShape] = []
        lo = 0
        for i, target in enumerate(targets):
            room = len(targets) - 1 - i  # shapes still needed after this one
            candidates = family[lo : len(family) - room]
            if not candidates:
                raise InvalidParameterError(
                    f"The shape family is too coarse for {config.n_sizes} distinct sizes spanning "
                    f"{config.size_span:g}x at budget {c:.3g} (budgets_flops); raise size_span or "
                    "lower n_sizes or head_dim."
                )
            best = min(range(len(candidates)),
                       key=lambda j: abs(math.log(candidates[j].n_params / target)))
            chosen.append(candidates[best])
            lo += best + 1
        for shape in chosen:
            n_tokens = int(round(c / (6.0 * shape.n_params)))
            spec = RunSpec(
                run_id=f"C{_budget_label(c)}-L{shape.n_layer}-d{shape.n_embd}",
                budget_flops=c,
                n_tokens=n_tokens,
                flops=6.0 * shape.n_params * n_tokens,
                flops_appendix_f=0.0,
                lr=_peak_lr(config, shape.n_embd),
                corpus=str(config.corpus),
                **{name: getattr(shape, name) for name in _FROM_SHAPE},
                **{name: getattr(config, name) for name in _FROM_CONFIG},
            )
            spec = replace(spec, flops_appendix_f=flops_per_token(model_config(spec)) * n_tokens)
            grid.append(spec)

    # Too small for min_steps: the largest model of a budget gets the fewest tokens.
    for spec in grid:
        if spec.n_steps < config.min_steps:
            tokens_per_step = spec.batch_size * spec.seq_len
            need = config.min_steps * tokens_per_step * 6.0 * spec.n_params
            raise InvalidParameterError(
                f"The 'budgets_flops' parameter of {owner} must give every run at least "
                f"min_steps={config.min_steps} optimizer steps of batch_size * seq_len = "
                f"{tokens_per_step:,} tokens. Got {spec.budget_flops:.3g}: its model "
                f"{spec.run_id} ({spec.n_params:,} parameters) gets {spec.n_tokens:,} tokens, "
                f"{spec.n_steps} steps; it needs at least {need:.3g} FLOPs. Raise the budget or "
                "lower batch_size."
            )
    # Too large for the corpus: the smallest model of a budget gets the most tokens.
    if n_train_tokens is not None:
        available = max(n_train_tokens - 1, 0) // config.seq_len * config.seq_len
        for spec in grid:
            if spec.n_tokens > available:
                fit = spec.budget_flops * (available / spec.n_tokens) ** 2  # D of a bracket ~ sqrt(C)
                raise InvalidParameterError(
                    f"The 'budgets_flops' parameter of {owner} must not need more tokens than the "
                    f"corpus has. Got {spec.budget_flops:.3g}: its smallest model {spec.run_id} "
                    f"({spec.n_params:,} parameters) needs {spec.n_tokens:,} training tokens, but "
                    f"corpus {config.corpus!r} (vocab_size={config.vocab_size}, max_bytes="
                    f"{config.max_bytes}) has {available:,} (single-epoch training repeats no "
                    f"token). Use budgets up to about {fit:.3g} FLOPs, or a larger corpus."
                )
    return grid
