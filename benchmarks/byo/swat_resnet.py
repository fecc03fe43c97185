"""Bring your own model: SWAT on a ResNet-style CNN that calls ``F.relu`` in ``forward``.

A user's residual CNN (conv-BN-``F.relu`` basic blocks, a residual add, global pooling, a linear
head), written as torchvision writes ResNets: with functional activations, which SWAT's compact
saved-activation storage must cover too (#15). Dense vs SWAT-U 80% (first layer and head dense,
the method card's defaults), trained the same way on Fashion-MNIST with leanscale's engine;
recorded: test accuracy, training FLOPs per example (the cost ledger's rules, SWAT's as the paper
counts them) and the bytes saved for backward on one batch of 128, measured with saved-tensor
hooks, for the whole model and for the converted layers.

Usage: python benchmarks/byo/swat_resnet.py [--n-train 20000 --epochs 3]
Writes benchmarks/results/byo/swat_resnet.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        identity = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNetish(nn.Module):
    """(b, 1, 28, 28) -> (b, 10): stem, 3 stages of 2 basic blocks (16, 32, 64 channels), pool, head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, out in enumerate((width, 2 * width, 4 * width)):
            stages += [Block(c, out, 1 if i == 0 else 2), Block(out, out, 1)]
            c = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stages(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from leanscale.data.fashion_mnist import fashion_mnist_tensors
    from leanscale.sparse import apply_swat
    from leanscale.sparse.report import swat_report
    from leanscale.train import param_groups, seeded
    from leanscale.train.classifier import fit_classifier

    train = fashion_mnist_tensors("train", n=args.n_train, seed=args.seed)
    test = fashion_mnist_tensors("test", n=args.n_test, seed=0)
    data = (train.x, train.y, test.x, test.y)
    with seeded(args.seed):
        base = ResNetish()
    models = {"dense": copy.deepcopy(base),
              f"swat_u_{args.sparsity:g}": apply_swat(copy.deepcopy(base), args.sparsity)}
    t0 = time.perf_counter()
    runs = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
        run = fit_classifier(model, data, opt, batch_size=128, epochs=args.epochs, lr=0.1, seed=args.seed,
                             decay="cosine", milestones=(), warmup_epochs=0.1, eval_every_epochs=args.epochs)
        runs[name] = {"test_accuracy": run.test_accuracy, "train_loss": run.train_loss, "steps": run.steps,
                      "seconds": run.seconds}
        print(f"{name:10s} test accuracy {run.test_accuracy:.4f}  ({run.seconds:.0f} s)", flush=True)
    swat_name = f"swat_u_{args.sparsity:g}"
    report = swat_report(models["dense"], models[swat_name], train.x[:128])
    t = report["total"]
    conversion = report["conversion"]
    goals = {
        "accuracy_drop_points": 100 * (runs["dense"]["test_accuracy"] - runs[swat_name]["test_accuracy"]),
        "training_flops_reduction": 1 - t["train_flops_swat"] / t["train_flops_dense"],
        "saved_bytes_reduction_whole_model": 1 - t["saved_bytes_swat"] / t["saved_bytes_dense"],
        "held_bytes_reduction_converted_layers": 1 - t["held_bytes_converted_swat"] / t["held_bytes_converted_dense"],
        "layers_not_covered": conversion.get("not_covered"),
    }
    out = RESULTS / "byo" / "swat_resnet.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "SWAT on a ResNet-style CNN with functional ReLUs (Fashion-MNIST)",
              "settings": vars(args), "runs": runs, "total": t,
              "conversion": {k: v for k, v in conversion.items() if k != "text"},
              "goals": goals, "machine": machine(), "seconds_total": time.perf_counter() - t0}
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(report["text"])
    print(json.dumps(goals, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
