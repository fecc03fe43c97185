"""Training FLOPs and hardware: C ~ 6 N D, Chinchilla's exact count, GPU-hours.

C = 6 N D counts 2 FLOPs per multiply-add, one multiply-add per parameter per token in the forward
pass, and twice that in the backward pass (Kaplan et al. 2020, arXiv 2001.08361; Hoffmann et al.
2022, arXiv 2203.15556). The exact per-layer count of Hoffmann et al.'s Appendix F (embeddings,
attention, dense blocks, logits; backward = 2x forward) is
:func:`leanscale.models.transformer.chinchilla_flops`, next to the per-layer rules it sums; its one
public export is ``leanscale.scaling.chinchilla_flops`` (loaded on first use: the package imports
without torch).
"""

from __future__ import annotations

import numpy as np

from leanscale.core.validation import (
    Interval,
    check_array,
    check_param,
    unknown_name_error,
)

__all__ = ["GPU_PEAK_FLOPS", "gpu_hours", "training_flops"]


def training_flops(n_params, n_tokens):
    """C = 6 N D: FLOPs to train ``n_params`` parameters on ``n_tokens`` tokens."""
    n = check_array("n_params", n_params, ndim=None, positive=True, owner="training_flops")
    d = check_array("n_tokens", n_tokens, ndim=None, positive=True, owner="training_flops")
    c = 6.0 * n * d
    return float(c) if c.ndim == 0 else c


# Dense peak throughput in FLOP/s, without structured sparsity, for the usual training dtype
# (bf16/fp16 tensor cores; TPU bf16). Vendor datasheets.
GPU_PEAK_FLOPS = {
    "h100": 989e12,  # NVIDIA H100 SXM, bf16 dense
    "h200": 989e12,  # NVIDIA H200 SXM, same compute as H100 SXM, more memory
    "b200": 2250e12,  # NVIDIA B200, bf16 dense
    "a100": 312e12,  # NVIDIA A100, bf16 dense
    "v100": 125e12,  # NVIDIA V100 SXM2, fp16 tensor cores
    "a10g": 125e12,  # NVIDIA A10G (AWS g5), bf16 dense
    "l4": 121e12,  # NVIDIA L4, bf16 dense
    "t4": 65e12,  # NVIDIA T4, fp16 tensor cores
    "mi300x": 1307e12,  # AMD MI300X, bf16 dense
    "tpu-v4": 275e12,  # Google TPU v4, bf16 per chip
    "tpu-v5e": 197e12,  # Google TPU v5e, bf16 per chip
}


def gpu_hours(flops: float, gpu: str = "h100", mfu: float = 0.4) -> float:
    """Accelerator-hours to spend ``flops`` at model-FLOPs utilisation ``mfu`` on ``gpu``."""
    check_array("flops", [flops], positive=True, owner="gpu_hours")
    check_param("mfu", mfu, [Interval(float, 0, 1, closed="right")], owner="gpu_hours")
    key = str(gpu).lower()
    if key not in GPU_PEAK_FLOPS:
        raise unknown_name_error("gpu", gpu, GPU_PEAK_FLOPS, owner="gpu_hours")
    return float(np.float64(flops) / (GPU_PEAK_FLOPS[key] * mfu) / 3600.0)
