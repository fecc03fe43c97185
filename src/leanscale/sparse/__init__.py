"""Sparse activation: SWAT sparse weight activation training (Raihan & Aamodt 2020) and
mixture-of-experts conditional computation (Switch Transformer, Fedus et al. 2021).

See ``README.md`` in this folder (the method card).
"""

from leanscale.core.deprecation import moved_attributes
from leanscale.sparse.export import (
    SparseLinear,
    load_pruned,
    load_swat_checkpoint,
    save_pruned,
    save_swat_checkpoint,
    to_sparse_kernels,
    weight_sparsity,
)
from leanscale.sparse.memory import SavedTensors, track_saved_tensors
from leanscale.sparse.moe import (
    MoE,
    MoEMLP,
    MoEOutput,
    apply_moe,
    moe_aux_loss,
    moe_global_batch,
    moe_layers,
    moe_stats,
    moe_update_bias,
)
from leanscale.sparse.moe_parallel import (
    ExpertParallelMoE,
    apply_expert_parallel,
    average_replicated_grads,
    ddp_ignore_experts,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    shard_experts,
)
from leanscale.sparse.moe_targets import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    find_ffn_blocks,
    moe_from_pretrained,
)
from leanscale.sparse.report import swat_conversion_report
from leanscale.sparse.swat import (
    SUPPORTED_LAYERS,
    SWAT,
    CompactReLU,
    SWATConv1D,
    SWATConv2d,
    SWATLinear,
    SWATMultiheadAttention,
    apply_swat,
    erk_densities,
    export_pruned,
    set_swat_sparsity,
    swat_layers,
    swat_summary,
    topk_threshold,
)
from leanscale.sparse.swat_structured import (
    StructuredSWATConv2d,
    StructuredSWATLinear,
    apply_structured_swat,
    top_channels,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "SWAT",
    "CompactReLU",
    "ExpertParallelMoE",
    "MoE",
    "MoEMLP",
    "MoEOutput",
    "MoETransformerDecoderLayer",
    "MoETransformerEncoderLayer",
    "SWATConv1D",
    "SWATConv2d",
    "SWATLinear",
    "SWATMultiheadAttention",
    "SavedTensors",
    "SparseLinear",
    "StructuredSWATConv2d",
    "StructuredSWATLinear",
    "apply_expert_parallel",
    "apply_moe",
    "apply_structured_swat",
    "apply_swat",
    "average_replicated_grads",
    "ddp_ignore_experts",
    "erk_densities",
    "expert_parameter_names",
    "export_pruned",
    "find_ffn_blocks",
    "gather_experts",
    "gathered_state_dict",
    "load_pruned",
    "load_swat_checkpoint",
    "moe_aux_loss",
    "moe_from_pretrained",
    "moe_global_batch",
    "moe_layers",
    "moe_stats",
    "moe_update_bias",
    "save_pruned",
    "save_swat_checkpoint",
    "set_swat_sparsity",
    "shard_experts",
    "swat_layers",
    "swat_summary",
    "to_sparse_kernels",
    "top_channels",
    "topk_threshold",
    "track_saved_tensors",
    "weight_sparsity",
    "swat_conversion_report",
]

# read_torch_file lives in leanscale.core.io (one home per name); the old import works one release
__getattr__ = moved_attributes(__name__, {"read_torch_file": "leanscale.core.io:read_torch_file"})
