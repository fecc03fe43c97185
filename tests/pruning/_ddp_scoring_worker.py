"""Worker for test_distributed.py: sharded scoring and a DDP-trained DataPruner (gloo).

Every rank scores its shard of a fixed model's probabilities and GraNd scores (gathered with
map_sharded), gathers int64 and bool rows over an uneven split, and fits an EL2N DataPruner whose
scoring model trains with DDP (an MLP without BatchNorm, so DDP differs from one process only by
the order of float additions) -- with resumable state, fitted twice -- and a forgetting pruner
(ForgettingTracker gathers every rank's slice). A BatchNorm MLP trained with DDP shows the
running statistics are synchronised. Rank r writes ``OUT/rank{r}.json``.

Usage: torchrun --nproc_per_node=2 _ddp_scoring_worker.py OUT
"""

import json
import sys

import numpy as np
import torch
from torch import nn

from leanscale.core.distributed import init_from_env, rank_and_world, shutdown
from leanscale.pruning._train import train_scoring_model
from leanscale.pruning.distributed import map_sharded
from leanscale.pruning.pruner import DataPruner

N, D, K = 47, 6, 3  # 47 examples: uneven shards (23 / 24) and uneven slices of each global batch


def tiny_data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(N, generator=g) > 0).long() + (x[:, 1] > 1).long()  # (N,) in {0, 1, 2}
    return x, y


def mlp():
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, K))  # no BatchNorm


def fixed_model():
    torch.manual_seed(11)
    return mlp()


def pruner(metric="el2n", epochs=1, out_dir=None):
    return DataPruner(metric=metric, keep=0.5, strategy="hard", class_balance=False, model_fn=mlp,
                      score_epochs=epochs, batch_size=16, lr=0.1, seed=0, out_dir=out_dir)


def bn_mlp():
    from leanscale.models.cnn import MLPClassifier

    return MLPClassifier(D, 8, K, batchnorm=True)


def main(out):
    from leanscale.pruning.grand import grand_scores
    from leanscale.pruning.scores import collect_probs

    init_from_env("gloo")
    rank, world = rank_and_world()
    x, y = tiny_data()
    model = fixed_model()
    probs = map_sharded(lambda idx: collect_probs(model, x[idx]), N)
    grand = map_sharded(lambda idx: grand_scores(model, (x[idx], y[idx])), N)
    ints = map_sharded(lambda idx: np.stack([idx, -idx], axis=1), 7)  # (7, 2) int64
    bools = map_sharded(lambda idx: idx % 2 == 0, 7)  # (7,) bool
    fitted = pruner(out_dir=f"{out}/run").fit(x.numpy(), y.numpy())
    manifest_path = fitted.write_manifest(f"{out}/manifest")
    resumed = pruner(out_dir=f"{out}/run").fit(x.numpy(), y.numpy())  # rank 0 loads, every rank gets it
    forgetting = pruner("forgetting", epochs=3).fit(x.numpy(), y.numpy())
    bn_model = train_scoring_model(bn_mlp, x, y, epochs=1, batch_size=16, seed=0)
    result = {
        "world_size": world,
        "probs": probs.tolist(),
        "grand": grand.tolist(),
        "bytes": [[int(a), int(b), bool(c)] for (a, b), c in zip(ints, bools)],
        "scores": fitted.scores_.tolist(),
        "kept": fitted.kept_indices_.tolist(),
        "resumed_scores": resumed.scores_.tolist(),
        "resumed_reused": resumed.reused_,
        "forgetting": forgetting.scores_.tolist(),
        "bn_buffers": {k: v.tolist() for k, v in bn_model.state_dict().items() if "running" in k},
        "manifest": json.loads(manifest_path.read_text()) if rank == 0 else None,
    }
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    del fitted, resumed, forgetting, bn_model  # the DDP wrapper and optimizer were dropped inside train_scoring_model
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
