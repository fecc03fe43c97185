"""Data pruning and active learning.

Sorscher et al. 2022, "Beyond neural scaling laws", arXiv 2206.14486 (self-supervised prototypes,
keep easy vs hard); Paul et al. 2021, arXiv 2107.07075 (EL2N, GraNd); Toneva et al. 2019,
arXiv 1812.05159 (forgetting events); Qin et al. 2024, arXiv 2303.04947 (InfoBatch); Okanovic et al.
2024, arXiv 2305.18424 (RS2: a fresh random subset per epoch). Method card: README.md here.

Every score is one float per example, higher = harder. The pieces compose: a score function ->
:func:`select` -> kept indices; :class:`DataPruner` does both and writes a manifest. The encoders
(``embed_texts``, ``embed_images``, ``embed_with``) live in :mod:`leanscale.models.encoders`.
"""

from leanscale.core.deprecation import moved_attributes
from leanscale.pruning.active import ActiveLearner
from leanscale.pruning.datasets import PruningData, load_pruning_data
from leanscale.pruning.dedup import (
    DedupResult,
    deduplicate,
    near_duplicate_pairs,
    normalize_text,
)
from leanscale.pruning.embed import train_ssl_encoder
from leanscale.pruning.features import fast_embedding
from leanscale.pruning.forgetting import ForgettingTracker
from leanscale.pruning.grand import grand_scores
from leanscale.pruning.infobatch import InfoBatch
from leanscale.pruning.kmeans import KMeans
from leanscale.pruning.prototypes import prototype_scores
from leanscale.pruning.pruner import DataPruner, read_pruning_manifest
from leanscale.pruning.rs2 import RS2Sampler
from leanscale.pruning.scores import collect_probs, el2n_scores, uncertainty_scores
from leanscale.pruning.select import resolve_strategy, select

__all__ = [
    "ActiveLearner",
    "DataPruner",
    "DedupResult",
    "ForgettingTracker",
    "InfoBatch",
    "KMeans",
    "PruningData",
    "RS2Sampler",
    "collect_probs",
    "deduplicate",
    "el2n_scores",
    "fast_embedding",
    "grand_scores",
    "load_pruning_data",
    "near_duplicate_pairs",
    "normalize_text",
    "prototype_scores",
    "resolve_strategy",
    "select",
    "train_ssl_encoder",
    "uncertainty_scores",
    "read_pruning_manifest",
]

# Moved to leanscale.models.encoders; importable from here, with a FutureWarning, for one release.
# the encoders moved to leanscale.models.encoders (#14); the old names work one release
__getattr__ = moved_attributes(__name__, {n: f"leanscale.models.encoders:{n}"
                                          for n in ("embed_images", "embed_texts", "embed_with")})
