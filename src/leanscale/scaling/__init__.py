"""Compute-optimal scaling: fit L(N, D), plan N and D for a budget, run your own sweeps.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv 2203.15556;
Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv 2404.10102;
Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", arXiv 2305.16264 (repeated data);
Sardana et al. 2024, "Beyond Chinchilla-Optimal", arXiv 2401.00448 (inference-aware planning).
"""

from leanscale.scaling.data_constrained import (
    MUENNIGHOFF_2023,
    R_D_STAR,
    R_N_STAR,
    DataConstrainedPlan,
    data_constrained_loss,
    effective_data,
    effective_params,
    plan_data_constrained,
)
from leanscale.scaling.envelope import EnvelopeFit, fit_envelope
from leanscale.scaling.flops import GPU_PEAK_FLOPS, gpu_hours, training_flops
from leanscale.scaling.inference_aware import (
    InferencePlan,
    chinchilla_optimal_for_loss,
    plan_inference_aware,
    tokens_for_loss,
)
from leanscale.scaling.isoflop import IsoFLOPFit, fit_isoflop
from leanscale.scaling.laws import (
    CHINCHILLA_2022,
    EPOCH_2024,
    LAWS,
    BootstrapResult,
    ComputeOptimal,
    ParametricScalingLaw,
    ScalingWarning,
    chinchilla_grid,
    fit_parametric,
    get_law,
)
from leanscale.scaling.planning import Plan, plan
from leanscale.scaling.runs import Curves, Runs, read_curves, read_runs

__all__ = [
    "CHINCHILLA_2022",
    "EPOCH_2024",
    "GPU_PEAK_FLOPS",
    "LAWS",
    "MUENNIGHOFF_2023",
    "R_D_STAR",
    "R_N_STAR",
    "BootstrapResult",
    "ComputeOptimal",
    "Curves",
    "DataConstrainedPlan",
    "EnvelopeFit",
    "InferencePlan",
    "IsoFLOPFit",
    "ParametricScalingLaw",
    "Plan",
    "Runs",
    "ScalingWarning",
    "chinchilla_flops",
    "chinchilla_grid",
    "chinchilla_optimal_for_loss",
    "data_constrained_loss",
    "effective_data",
    "effective_params",
    "fit_envelope",
    "fit_isoflop",
    "fit_parametric",
    "get_law",
    "gpu_hours",
    "plan",
    "plan_data_constrained",
    "plan_inference_aware",
    "read_curves",
    "read_runs",
    "tokens_for_loss",
    "training_flops",
]


def __getattr__(name: str):
    # chinchilla_flops (Appendix F's exact training FLOPs) is exported here only (#14). It lives
    # with the transformer's per-layer FLOP rules in leanscale.models.transformer, which needs torch:
    # loaded on first use, so `import leanscale.scaling` (leanscale plan / fit) stays torch-free.
    if name == "chinchilla_flops":
        from leanscale.models.transformer import chinchilla_flops

        globals()[name] = chinchilla_flops  # once
        return chinchilla_flops
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
