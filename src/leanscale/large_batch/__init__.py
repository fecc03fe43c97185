"""Large batches without the generalization gap.

Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", arXiv 1705.08741 (Ghost BatchNorm,
square-root LR scaling, regime adaptation); Goyal et al. 2017, arXiv 1706.02677 (linear scaling,
warmup); Keskar et al. 2017, arXiv 1609.04836 (sharpness); You et al. 2017/2019 (LARS, LAMB);
McCandlish et al. 2018, arXiv 1812.06162 (gradient noise scale); for AdamW, Wang & Aitchison 2024,
arXiv 2405.13698, and Bergsma et al. 2025, arXiv 2505.13738 (EMA timescale), Marek et al. 2025, arXiv
2507.07101 (beta2's half-life in examples); Merrill et al. 2025, arXiv 2505.23971 (the critical batch
by branching, batch-size warmup). Method card: README.md here.
"""

from leanscale.large_batch.critical_batch import (
    BatchSizeSchedule,
    CriticalBatchResult,
    WarmupMeasurement,
    batch_warmup,
    branch_critical_batch,
    measure_batch_warmup,
)
from leanscale.large_batch.ghost_bn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    accumulate_running_stats,
    apply_ghost_batchnorm,
    ghost_batch_sizes,
)
from leanscale.large_batch.lamb import LAMB
from leanscale.large_batch.lars import LARS, lars_param_groups
from leanscale.large_batch.noise_scale import (
    BatchAdvice,
    GradientNoiseScale,
    NoiseEstimates,
    NoiseScaleResult,
    advise,
    measure_noise_scale,
    two_batch_estimates,
)
from leanscale.large_batch.recipe import (
    LargeBatchPlan,
    LargeBatchRecipe,
    adamw_timescale,
    beta_half_life,
    scale_beta,
)
from leanscale.large_batch.schedules import (
    Regime,
    adapt_regime,
    clip_gradients,
    scale_lr,
    warmup_factor,
    warmup_schedule,
)
from leanscale.large_batch.sharpness import SharpnessResult, sharpness
from leanscale.large_batch.train import TrainConfig, TrainResult, train_classifier

__all__ = [
    "LAMB",
    "LARS",
    "BatchAdvice",
    "BatchSizeSchedule",
    "CriticalBatchResult",
    "WarmupMeasurement",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GradientNoiseScale",
    "LargeBatchPlan",
    "LargeBatchRecipe",
    "NoiseEstimates",
    "NoiseScaleResult",
    "Regime",
    "SharpnessResult",
    "TrainConfig",
    "TrainResult",
    "accumulate_running_stats",
    "adamw_timescale",
    "adapt_regime",
    "advise",
    "apply_ghost_batchnorm",
    "batch_warmup",
    "beta_half_life",
    "branch_critical_batch",
    "measure_batch_warmup",
    "clip_gradients",
    "ghost_batch_sizes",
    "lars_param_groups",
    "measure_noise_scale",
    "scale_beta",
    "scale_lr",
    "sharpness",
    "train_classifier",
    "two_batch_estimates",
    "warmup_factor",
    "warmup_schedule",
]
