"""How good is the self-supervised image embedding of ``leanscale.pruning.embed``, and how long does
it take? (issue #4: self-supervised prototypes need an embedding; SimCLR, arXiv 2002.05709.)

Trains :func:`train_ssl_encoder` with its defaults on Fashion-MNIST's 60,000 training images (no
labels) on 2 CPU threads and records the wall time. Then, with the encoder frozen, the labels are
used only to *measure* the embedding:

* k-NN accuracy: each test image takes the majority label of its k = 20 nearest training images
  by cosine similarity (ties go to the smaller label);
* linear-probe accuracy: a softmax regression (L-BFGS, L2 penalty) on the standardised
  embeddings of the training set, evaluated on the test set.

The same two measures on the raw pixels, and on an untrained encoder of the same architecture
(random weights: what the architecture alone gives), put the numbers in context.

Usage: OMP_NUM_THREADS=2 python benchmarks/pruning/ssl_encoder.py [--threads 2] [--n-train N]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine
from leanscale.core.io import atomic_write_json
from leanscale.data.fashion_mnist import fashion_mnist_tensors
from leanscale.models.encoders import ConvEncoder, embed_images
from leanscale.pruning.embed import train_ssl_encoder

K_NEIGHBOURS = 20
PROBE_L2 = 1e-4  # weight of 0.5 * |W|^2 added to the mean cross entropy of the probe
PROBE_ITERS = 300  # L-BFGS iterations (full batch)


def knn_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
                 k: int = K_NEIGHBOURS, chunk: int = 1000) -> float:
    """Majority vote of the k most cosine-similar training rows, test rows in chunks."""
    train = F.normalize(train.float(), dim=1)  # (n, d)
    test = F.normalize(test.float(), dim=1)  # (m, d)
    n_classes = int(y_train.max()) + 1
    correct = 0
    for s in range(0, len(test), chunk):
        idx = (test[s : s + chunk] @ train.T).topk(k, dim=1).indices  # (c, k)
        votes = F.one_hot(y_train[idx], n_classes).sum(1)  # (c, n_classes)
        correct += int((votes.argmax(1) == y_test[s : s + chunk]).sum())
    return correct / len(test)


def linear_probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor,
                          y_test: torch.Tensor) -> float:
    """Softmax regression on standardised features, full-batch L-BFGS."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    a, b = (train - mean) / std, (test - mean) / std  # (n, d), (m, d)
    n_classes = int(y_train.max()) + 1
    torch.manual_seed(0)
    w = torch.zeros(a.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=PROBE_ITERS, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + 0.5 * PROBE_L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).float().mean())


def evaluate(name: str, train: torch.Tensor, test: torch.Tensor, y_train, y_test) -> dict:
    t0 = time.perf_counter()
    knn = knn_accuracy(train, y_train, test, y_test)
    t1 = time.perf_counter()
    probe = linear_probe_accuracy(train, y_train, test, y_test)
    t2 = time.perf_counter()
    print(f"{name:28s} dim {train.shape[1]:4d}  k-NN {knn:.4f}  linear probe {probe:.4f}", flush=True)
    return {"dim": int(train.shape[1]), "knn_accuracy": knn, "linear_probe_accuracy": probe,
            "knn_seconds": t1 - t0, "probe_seconds": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=None, help="a stratified subset (quick runs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning" / "ssl_encoder.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tr = fashion_mnist_tensors("train", n=args.n_train)
    te = fashion_mnist_tensors("test")
    defaults = {k: p.default for k, p in inspect.signature(train_ssl_encoder).parameters.items()
                if p.default is not inspect.Parameter.empty}
    print(f"training SimCLR on {len(tr.x)} images, {torch.get_num_threads()} threads, defaults {defaults}",
          flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    encoder = train_ssl_encoder(tr.x)  # the defaults, labels never seen
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    hist = encoder.history_
    step_s = np.asarray(hist.step_seconds)
    quiet_step = float(np.median(np.sort(step_s)[: max(1, len(step_s) // 10)]))
    print(f"trained in {train_seconds:.1f} s ({quiet_step * hist.steps:.0f} s on a quiet machine, estimated): "
          f"{hist.steps} steps, loss {np.mean(hist.losses[:10]):.3f} -> "
          f"{np.mean(hist.losses[-10:]):.3f}", flush=True)

    t0 = time.perf_counter()
    e_train = torch.from_numpy(embed_images(encoder, tr.x))  # (60000, dim)
    e_test = torch.from_numpy(embed_images(encoder, te.x))  # (10000, dim)
    embed_seconds = time.perf_counter() - t0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = ConvEncoder(1, defaults["dim"])
    with torch.no_grad():  # same input standardisation as the trained one; BN running stats at init
        untrained.mean.copy_(encoder.mean)
        untrained.std.copy_(encoder.std)
    # An untrained network's BatchNorm has no running statistics: estimate them on the training
    # images (forward passes in train mode, no gradient, momentum None = cumulative average).
    for m in untrained.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    untrained.train()
    with torch.no_grad():
        for s in range(0, len(tr.x), 1000):
            untrained(tr.x[s : s + 1000])
    r_train = torch.from_numpy(embed_images(untrained, tr.x))
    r_test = torch.from_numpy(embed_images(untrained, te.x))

    results = {
        "simclr_encoder": evaluate("SimCLR encoder (trained)", e_train, e_test, tr.y, te.y),
        "raw_pixels": evaluate("raw pixels (standardised)", tr.x.flatten(1), te.x.flatten(1), tr.y, te.y),
        "untrained_encoder": evaluate("untrained encoder (random)", r_train, r_test, tr.y, te.y),
    }
    atomic_write_json(args.out, {
        "benchmark": "ssl_encoder",
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "note": ("Wall-clock times were measured while other jobs shared the same 2 cores, so they "
                 "are noisy (likely pessimistic). Accuracies are deterministic for the seed, up to "
                 "floating-point differences across machines and thread counts."),
        "data": {"train": len(tr.x), "test": len(te.x), "dataset": "Fashion-MNIST"},
        "train_ssl_encoder_defaults": defaults,
        "train_seconds": train_seconds,
        # CPU time of this process (all its threads): on a quiet machine the wall time would be
        # about train_cpu_seconds / threads (when both threads stay busy).
        "train_cpu_seconds": train_cpu_seconds,
        "train_cpu_seconds_per_thread": train_cpu_seconds / torch.get_num_threads(),
        # Steps slowed down by other jobs inflate the wall time; the fastest 10% of the steps
        # are the least disturbed, so steps x their median estimates the time on a quiet machine.
        "step_seconds_median": float(np.median(step_s)),
        "step_seconds_fastest_decile": quiet_step,
        "train_seconds_quiet_estimate": quiet_step * hist.steps,
        "steps": hist.steps,
        "planned_steps": hist.planned_steps,
        "stopped_early": hist.stopped_early,
        "loss_first_10_steps": float(np.mean(hist.losses[:10])),
        "loss_last_10_steps": float(np.mean(hist.losses[-10:])),
        "embed_seconds": embed_seconds,  # train + test images
        "evaluation": {"k": K_NEIGHBOURS, "metric": "cosine, majority vote",
                       "linear_probe": f"softmax regression, L-BFGS {PROBE_ITERS} iterations, L2 {PROBE_L2}, "
                                       "standardised features"},
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
