"""What both integrations do to a model before training, and their shared argument checks."""

from __future__ import annotations

from typing import Any

from torch import nn

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param


def check_options(owner: str, ghost_batch_size: Any, swat: Any, moe: Any, noise_scale: Any) -> None:
    check_param("ghost_batch_size", ghost_batch_size, [None, Interval(int, 1, None)], owner=owner)
    check_param("swat", swat, [None, Interval(float, 0, 1, closed="left"), dict], owner=owner)
    check_param("moe", moe, [None, dict], owner=owner)
    if isinstance(moe, dict) and "n_experts" not in moe:
        raise InvalidParameterError(
            f"The 'moe' parameter of {owner} must be a dict of apply_moe arguments with 'n_experts'. Got keys "
            f"{sorted(moe)}."
        )
    check_param("noise_scale", noise_scale, [bool], owner=owner)


def apply_surgery(model: nn.Module, ghost_batch_size: int | None, swat: Any, moe: dict | None) -> list[str]:
    """Ghost BatchNorm, SWAT and MoE conversions in place, in that order; returns what was done."""
    done = []
    if ghost_batch_size is not None:
        from leanscale.large_batch import apply_ghost_batchnorm

        apply_ghost_batchnorm(model, ghost_batch_size)
        done.append(f"ghost batchnorm ({ghost_batch_size})")
    if moe is not None:
        from leanscale.sparse import apply_moe

        kwargs = dict(moe)
        apply_moe(model, kwargs.pop("n_experts"), **kwargs)
        done.append(f"mixture of experts ({moe['n_experts']} experts)")
    if swat is not None:
        from leanscale.sparse import apply_swat

        kwargs = {"sparsity": swat} if isinstance(swat, float) else dict(swat)
        apply_swat(model, **kwargs)
        done.append(f"SWAT ({kwargs.get('sparsity', 0.8):g})")
    return done


def init_options(obj: Any, owner: str, ghost_batch_size: Any, swat: Any, moe: Any, noise_scale: Any,
                 noise_scale_beta: float) -> None:
    """Check and store a callback's options; ``surgery_`` empty, ``noise_scale_`` the estimator or None."""
    check_options(owner, ghost_batch_size, swat, moe, noise_scale)
    obj.ghost_batch_size = ghost_batch_size
    obj.swat = swat
    obj.moe = moe
    obj.noise_scale = noise_scale
    obj.surgery_ = []
    obj.noise_scale_ = None
    if noise_scale:
        from leanscale.large_batch import GradientNoiseScale

        obj.noise_scale_ = GradientNoiseScale(beta=noise_scale_beta)
