"""Issue 17, "SWAT on real hardware": structured SWAT vs unstructured SWAT vs dense on this CPU.

Two parts, results in ``benchmarks/results/sparse/structured.json`` (+ ``structured_step_time.csv``,
``structured_accuracy.csv``):

1. **Step time** (forward + backward + SGD-momentum update, batch 128 of Fashion-MNIST-shaped
   inputs, ``--threads`` threads). Every setting of a model is built first; then ``--rounds``
   rounds each run ``--steps`` steps of every setting in turn (interleaved, so a busy phase of the
   shared machine hits all settings alike). Per step two clocks: wall time (``perf_counter``) and
   the CPU time of the calling thread (``thread_time``; with 1 thread the whole step runs on it,
   and time the OS gives to other processes is not counted). Reported per setting: min and
   median over rounds of the round's median step, and the speed-up = dense / setting (median
   over rounds of the per-round ratio). Training FLOPs per step from the cost ledger
   (``count_flops`` on a training forward; SWAT layers counted as the paper does).
2. **Accuracy**: Fashion-MNIST training (``swat_accuracy.py``'s data loading and schedule: SGD
   momentum 0.9, cosine LR with 0.1 epoch warm-up, batch 128) of dense vs structured SWAT.

Models: ``lenet`` (LeNet-300-100), ``wide`` (784-1024-1024-10 MLP), ``bncnn8`` (``BNCNN(width=8)``,
``swat_accuracy.py``'s CNN), ``bncnn32`` (the default ``BNCNN(width=32)``). MLPs: every layer but
the head converted; CNNs: first conv and head dense. Unstructured SWAT gets the same layers.

Usage: python benchmarks/sparse/structured.py [--threads 1] [--rounds 8] [--steps 4]
       [--models lenet,wide,bncnn8,bncnn32] [--acc-model wide] [--acc-epochs 2] [--seeds 2]
       [--acc-variants structured:0.7,structured:0.8,structured-a0-first:0.8] [--acc-skip-dense]
Rerunning a part (``--skip-accuracy``, ``--models wide``, ``--acc-skip-dense``) keeps the other
models' rows and the other runs in the JSON.

The input-channel choice (``apply_structured_swat(selection=...)``): variants ``sampled:0.8``,
``unbiased:0.8[:explore]``, ``unbiased-a0-first:0.8`` (``structured-a0-first`` on a CNN keeps the
first *converted* conv's input whole); ``--settings kind:sparsity[:explore],...`` times dense plus
those settings in one interleaved run (rows of the same (model, setting) are replaced, the rest
kept; each row records its ``run``); ``--first-seed 1 --seeds 1`` adds a seed. Every finished
accuracy run is written at once (a cut run keeps its finished rows); concurrent runs merge under
a file lock.

Dense baselines for the CNN (``bncnn32`` only): ``narrow:0.8`` (a dense net of the filters
structured SWAT's forward runs at 80%: 32-6-13-13, fresh init), ``narrow-sliced:0.8`` (the same
net cut from the structured run's own initial weights: its top-K filters; under BatchNorm + ReLU
the dropped filters never learn, so this is structured SWAT's computation up to the head's
extra bias path), ``dense-w:24`` (a dense ``BNCNN(width=24)``). Dense baseline for the wide
MLP: ``dense-w:512`` (the MLP 784-512-512-10: same depth, 512 hidden units per layer).
``--acc-epochs`` other than 2 writes ``accuracy_<model>_ep<N>`` (``accuracy_ep<N>`` for ``wide``; the
2-epoch rows stay);
``--tag T`` names a step-time run's rows ``"<setting> [T]"`` (dense included), so they sit next
to earlier runs' instead of replacing them; every step-time row records the load averages (1, 5,
15 min) at the start and end of its run (``loadavg_start``, ``loadavg_end``). Accuracy rows of
structured layers record ``kept_filters``: per layer, how often the forward's filters changed
between steps and how many were ever used.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, machine
from benchmarks.sparse.swat_accuracy import base_config, lenet_300_100
from leanscale.core.flops import count_flops
from leanscale.core.io import atomic_write_csv, atomic_write_json
from leanscale.models import BNCNN
from leanscale.sparse import apply_structured_swat, apply_swat

BATCH = 128
STRUCTURED = (0.5, 0.7, 0.8, 0.9)
UNSTRUCTURED = (0.8,)
OUT = RESULTS / "sparse"


def wide_mlp(hidden: int = 1024) -> nn.Module:
    """The MLP 784-``hidden``-``hidden``-10 (``wide``: 1024; ``dense-w:N`` on ``wide``: N)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def live_channels(sparsity: float, width: int = 32) -> tuple[int, int, int, int]:
    """Filters the forward of ``BNCNN(width)`` runs under structured SWAT at ``sparsity`` (first
    conv dense; K = max(1, round((1 - s) * n)) of each converted conv, as ``top_channels``)."""
    k = [max(1, round((1 - sparsity) * n)) for n in (width, 2 * width, 2 * width)]
    return (width, *k)


class NarrowBNCNN(nn.Module):
    """``BNCNN``'s layout (conv-BN-ReLU x2, max-pool, x2, max-pool, global average pool, BN,
    linear) with any four conv widths: the dense baseline of the width structured SWAT's forward
    actually runs (e.g. 32-6-13-13 for ``BNCNN(32)`` at 80%)."""

    def __init__(self, channels: tuple[int, int, int, int], n_classes: int = 10):
        super().__init__()
        from leanscale.models.cnn import _conv_bn_relu

        c1, c2, c3, c4 = channels
        self.features = nn.Sequential(*_conv_bn_relu(1, c1), *_conv_bn_relu(c1, c2), nn.MaxPool2d(2),
                                      *_conv_bn_relu(c2, c3), *_conv_bn_relu(c3, c4), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm1d(c4)
        self.classifier = nn.Linear(c4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(self.pool(self.features(x)).flatten(1)))


def sliced_narrow(full: nn.Module, sparsity: float) -> NarrowBNCNN:
    """The sub-network structured SWAT's forward runs at step 1: ``full`` (an initialised
    ``BNCNN``) cut to the top-K filters (by L2 norm, as ``top_channels``) of each converted conv,
    the next layer's input columns, BatchNorm and head cut alike. If the kept filters never
    change during training (the dropped ones are dead under BatchNorm + ReLU), training this
    dense net is the same computation as training ``full`` with structured SWAT."""
    from leanscale.sparse import top_channels

    convs = [m for m in full.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in full.features if isinstance(m, nn.BatchNorm2d)]
    keep = [torch.arange(convs[0].out_channels)]
    for conv in convs[1:]:
        keep.append(top_channels(conv.weight.detach().flatten(1).norm(dim=1), 1 - sparsity))
    net = NarrowBNCNN(tuple(len(k) for k in keep))
    new_convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    new_bns = [m for m in net.features if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        prev = torch.arange(convs[0].in_channels)
        for conv, bn, new_conv, new_bn, k in zip(convs, bns, new_convs, new_bns, keep):
            new_conv.weight.copy_(conv.weight[k][:, prev])
            new_bn.weight.copy_(bn.weight[k])
            new_bn.bias.copy_(bn.bias[k])
            prev = k
        net.bn.weight.copy_(full.bn.weight[prev])
        net.bn.bias.copy_(full.bn.bias[prev])
        net.classifier.weight.copy_(full.classifier.weight[:, prev])
        net.classifier.bias.copy_(full.classifier.bias)
    return net


def build(model: str, kind: str, sparsity: float, seed: int = 0, activation_sparsity: float | None = None,
          explore: float | None = None) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "dense-w":  # a dense net of another width ("sparsity" carries the width)
        if model == "wide":  # the same MLP with N hidden units per layer: 784-N-N-10
            return wide_mlp(int(sparsity))
        if model.startswith("bncnn"):
            return BNCNN(width=int(sparsity))
        raise SystemExit(f"dense-w is for the models wide and bncnn*, not {model!r}")
    if kind in ("narrow", "narrow-sliced") and not model.startswith("bncnn"):
        raise SystemExit(f"{kind} is for the models bncnn*, not {model!r} (on the wide MLP use dense-w:<hidden>)")
    if kind == "narrow":  # dense, of the live width of structured SWAT at this sparsity, fresh init
        return NarrowBNCNN(live_channels(sparsity, int(model[len("bncnn"):])))
    if kind == "narrow-sliced":
        return sliced_narrow(BNCNN(width=int(model[len("bncnn"):])), sparsity)
    net = {"lenet": lenet_300_100, "wide": wide_mlp, "bncnn8": lambda: BNCNN(width=8),
           "bncnn32": lambda: BNCNN(width=32)}[model]()
    first_dense = model.startswith("bncnn")
    # "sampled..." / "unbiased..." kinds: the same layers as "structured...", input channels by
    # selection="sampled" / "unbiased"
    selection = next((k for k in ("sampled", "unbiased") if kind.startswith(k)), None)
    sel = {"selection": selection, "explore": explore} if selection else {}
    if selection:
        kind = kind.replace(selection, "structured")
    if kind == "swat":
        apply_swat(net, sparsity, dense_first_layer=first_dense, dense_last_layer=True,
                   activation_sparsity=activation_sparsity)
    elif kind == "structured":
        apply_structured_swat(net, sparsity, dense_first_layer=first_dense, activation_sparsity=activation_sparsity,
                              **sel)
    elif kind == "structured-a0":  # dense weight gradient: only the forward and input gradient reduced
        apply_structured_swat(net, sparsity, dense_first_layer=first_dense, activation_sparsity=0.0, **sel)
    elif kind == "structured-a0-first":
        # the first converted layer's input kept whole for dW: raw pixels (MLPs), the dense first
        # conv's output (CNNs: their first conv stays dense, the second is the first converted)
        convertible = [n for n, m in net.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        first = convertible[1 if first_dense else 0]
        apply_structured_swat(net, sparsity, layers=[first], activation_sparsity=0.0, **sel)
        apply_structured_swat(net, sparsity, dense_first_layer=True, activation_sparsity=activation_sparsity, **sel)
    return net


KINDS = {"structured": "structured {}%", "structured-a0": "structured {}%, activation_sparsity=0",
         "structured-a0-first": "structured {}%, first layer's activation dense",
         "sampled": "sampled {}% (explore {})", "sampled-a0": "sampled {}% (explore {}), activation_sparsity=0",
         "sampled-a0-first": "sampled {}% (explore {}), first layer's activation dense",
         "unbiased": "unbiased {}% (explore {})",
         "unbiased-a0-first": "unbiased {}% (explore {}), first layer's activation dense"}


def parse_variant(item: str) -> tuple[str, str, float, float | None]:
    """``kind:sparsity[:explore]`` -> (label, kind, sparsity, explore); explore for sampled kinds
    only (default 0.5, apply_structured_swat's)."""
    parts = item.split(":")
    kind, sparsity = parts[0], float(parts[1])
    if kind in ("narrow", "narrow-sliced", "dense-w"):
        if kind == "dense-w":
            if sparsity != int(sparsity) or sparsity < 1:
                raise SystemExit(f"dense-w needs a whole number of channels / hidden units >= 1, got {parts[1]!r}")
            return f"dense, width {int(sparsity)}", kind, sparsity, None
        c = "-".join(map(str, live_channels(sparsity)))
        init = "fresh init" if kind == "narrow" else "sliced from the structured net's init"
        return f"dense {c} (structured {round(100 * sparsity)}%'s live filters, {init})", kind, sparsity, None
    if kind not in KINDS and kind not in ("swat", "dense"):
        raise SystemExit(f"unknown kind {kind!r} in {item!r}: one of {', '.join(KINDS)}")
    explore = float(parts[2]) if len(parts) > 2 else (0.5 if kind.startswith(("sampled", "unbiased")) else None)
    if kind == "dense":
        return "dense", "dense", 0.0, None
    if kind == "swat":
        return f"SWAT-U {round(100 * sparsity)}% (unstructured)", "swat", sparsity, None
    return KINDS[kind].format(round(100 * sparsity), explore), kind, sparsity, explore


def settings(spec: str | None = None) -> list[tuple[str, str, float, float | None, float | None]]:
    """(label, kind, sparsity, activation_sparsity, explore) of the timed settings: the default
    list, or dense plus ``spec`` (``kind:sparsity[:explore],...``, as ``--acc-variants``)."""
    if spec:
        chosen = [parse_variant(item) for item in spec.split(",") if item]
        return [("dense", "dense", 0.0, None, None)] + [(label, kind, s, None, e) for label, kind, s, e in chosen
                                                          if kind != "dense"]
    out = [("dense", "dense", 0.0, None)]
    out += [(f"SWAT-U {round(100 * s)}% (unstructured)", "swat", s, None) for s in UNSTRUCTURED]
    out += [(f"structured {round(100 * s)}%", "structured", s, None) for s in STRUCTURED]
    out += [("structured 80%, activation_sparsity=0", "structured", 0.8, 0.0)]
    out += [(KINDS["structured-a0-first"].format(round(100 * s)), "structured-a0-first", s, None) for s in (0.8, 0.9)]
    return [(*row, None) for row in out]


def training_flops(net: nn.Module, x: torch.Tensor) -> float:
    """Training FLOPs (forward + backward) of one step on ``x``, on a copy of ``net``."""
    net = copy.deepcopy(net).train()
    return count_flops(net, x).total


def step_time(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    rows = []
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # rows of one interleaved run share it
    load_start = os.getloadavg()  # 1, 5 and 15 minute load averages: how busy the shared machine was
    for model in args.models.split(","):
        steps, flops = {}, {}
        for label, kind, sparsity, a_sparsity, explore in settings(args.settings):
            if kind == "structured-a0-first" and model.startswith("bncnn") and not args.settings:
                continue  # the default list: the CNNs' first layer is dense anyway
            net = build(model, kind, sparsity, activation_sparsity=a_sparsity, explore=explore)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

            def step(net=net, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()

            for _ in range(args.warmup):
                step()
            steps[label] = step
            flops[label] = training_flops(net, x)
        wall = {k: [] for k in steps}
        cpu = {k: [] for k in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                w, c = [], []
                for _ in range(args.steps):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    step()
                    c.append(time.thread_time() - c0)
                    w.append(time.perf_counter() - t0)
                wall[label].append(statistics.median(w))
                cpu[label].append(statistics.median(c))
        load_end = os.getloadavg()
        for label in steps:
            speed_cpu = [d / s for d, s in zip(cpu["dense"], cpu[label])]
            speed_wall = [d / s for d, s in zip(wall["dense"], wall[label])]
            row = {"model": model, "setting": f"{label} [{args.tag}]" if args.tag else label, "run": run,
                   "rounds": args.rounds, "steps_per_round": args.steps,
                   "cpu_ms_min": 1e3 * min(cpu[label]), "cpu_ms_median": 1e3 * statistics.median(cpu[label]),
                   "wall_ms_min": 1e3 * min(wall[label]), "wall_ms_median": 1e3 * statistics.median(wall[label]),
                   "speedup_cpu_median": statistics.median(speed_cpu),
                   "speedup_cpu_of_min": min(cpu["dense"]) / min(cpu[label]),
                   "speedup_cpu_range": [min(speed_cpu), max(speed_cpu)],
                   "speedup_wall_median": statistics.median(speed_wall),
                   "speedup_wall_of_min": min(wall["dense"]) / min(wall[label]),
                   "training_flops_per_step": flops[label],
                   "flops_vs_dense": flops[label] / flops["dense"],
                   "loadavg_start": [round(v, 2) for v in load_start],
                   "loadavg_end": [round(v, 2) for v in load_end]}
            rows.append(row)
            print(f"{model:>8} {label:<40} cpu {row['cpu_ms_min']:7.2f} / {row['cpu_ms_median']:7.2f} ms "
                  f"x{row['speedup_cpu_median']:.2f}  wall {row['wall_ms_min']:7.2f} / {row['wall_ms_median']:7.2f} ms "
                  f"x{row['speedup_wall_median']:.2f}  FLOPs {row['flops_vs_dense']:.2f}", flush=True)
    return rows


def track_kept(net: nn.Module) -> dict:
    """Per structured layer, how often its kept output channels (the forward's filters) changed
    between training steps and how many filters were ever kept; filled in as ``net`` trains."""
    out = {}
    for name, module in net.named_modules():
        if not hasattr(module, "last_channels"):
            continue
        out[name] = state = {"changes": 0, "ever_kept": 0, "kept": None}
        ever: set[int] = set()

        def hook(module, inputs, output, state=state, ever=ever):
            if not module.training:
                return
            idx = module.last_channels[0]
            key = list(range(module.weight.shape[0])) if idx is None else idx.tolist()
            if state["kept"] is not None and key != state["kept"]:
                state["changes"] += 1
            state["kept"] = key
            ever.update(key)
            state["ever_kept"] = len(ever)

        module.register_forward_hook(hook)
    return out


def accuracy(args, save=None) -> list[dict]:
    """Train every variant for every seed; ``save(rows)`` after each run (partial results)."""
    from leanscale.large_batch.train import load_image_data, train_classifier

    rows, data = [], None
    runs = [] if args.acc_skip_dense else [("dense", "dense", 0.0, None)]
    runs += [parse_variant(item) for item in args.acc_variants.split(",") if item]
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, kind, sparsity, explore in runs:
            cfg = base_config("bncnn" if args.acc_model.startswith("bncnn") else "mlp", args.acc_epochs, seed,
                              args.n_train)
            if data is None:
                data = load_image_data(cfg)
            net = build(args.acc_model, kind, sparsity, seed, explore=explore)
            kept = track_kept(net)
            t0 = time.perf_counter()
            c0 = time.process_time()
            result = train_classifier(cfg, data=data, model=net)
            row = {"model": args.acc_model, "setting": label, "sparsity": sparsity, "seed": seed,
                   **({"kept_filters": kept} if kept else {}),
                   "test_accuracy": result.test_accuracy, "epochs": args.acc_epochs, "steps": result.steps,
                   "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                   "lr": cfg.lr, "n_train": args.n_train or 60000, "explore": explore}
            rows.append(row)
            print(f"{args.acc_model} {label} seed {seed}: {100 * row['test_accuracy']:.2f}%  "
                  f"{row['wall_seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU", flush=True)
            if save is not None:
                save(rows)
    return rows


PROBE = [  # (label, kind, sparsity, apply_structured_swat keywords) for --probe
    ("dense", "dense", 0.0, {}),
    ("structured 80%", "structured", 0.8, {}),
    ("structured 80%, topk_period=100", "structured", 0.8, {"topk_period": 100}),
    ("structured 80%, activation_sparsity=0.5", "structured", 0.8, {"activation_sparsity": 0.5}),
    ("structured 80%, activation_sparsity=0", "structured", 0.8, {"activation_sparsity": 0.0}),
    ("structured 80%, warmup_steps=300", "structured", 0.8, {"warmup_steps": 300}),
    ("structured 80%, first layer's activation dense", "structured-a0-first", 0.8, {}),
    ("structured 80%, first layer dense", "structured-first-dense", 0.8, {}),
]


def probe(args) -> dict:
    """What costs the structured MLP its accuracy: settings on a 20,000-image subset, 1 seed."""
    from leanscale.large_batch.train import load_image_data, train_classifier

    cfg = base_config("mlp", args.acc_epochs, 0, 20000)
    data = load_image_data(cfg)
    x = data[0].reshape(len(data[0]), -1)  # (N, 784) standardised pixels
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(x.shape[1])
    n_batches = len(x) // BATCH
    for i in range(n_batches):  # which pixels the top-K rule (80%: keep 20%) picks per batch
        counts[x[perm[i * BATCH:(i + 1) * BATCH]].square().sum(0).topk(round(0.2 * x.shape[1])).indices] += 1
    pixels = {"batches": n_batches, "pixels": x.shape[1], "ever_in_top_20pct": int((counts > 0).sum()),
              "in_top_20pct_in_over_half_of_batches": int((counts > n_batches / 2).sum())}
    print(pixels, flush=True)
    out = {}
    for label, kind, sparsity, kw in PROBE:
        torch.manual_seed(0)
        net = wide_mlp()
        if kind == "structured":
            apply_structured_swat(net, sparsity, dense_first_layer=False, **kw)
        elif kind == "structured-first-dense":
            apply_structured_swat(net, sparsity, dense_first_layer=True)
        elif kind == "structured-a0-first":
            net = build("wide", kind, sparsity)
        out[label] = 100 * train_classifier(cfg, data=data, model=net).test_accuracy
        print(f"probe {label}: {out[label]:.2f}%", flush=True)
    return {"model": "wide", "n_train": 20000, "epochs": args.acc_epochs, "seed": 0, "pixel_selection": pixels,
            "test_accuracy_percent": out}


def goal(blob: dict, key: str = "accuracy") -> dict | None:
    """The issue's goal (>= 1.5x step speed-up at <= 1 point lost) against the accuracy runs."""
    if key not in blob or "step_time" not in blob:
        return None
    model = blob[key]["model"]
    speed = {r["setting"]: r for r in blob["step_time"]["rows"] if r["model"] == model}
    rows = []
    for s in blob[key]["summary"]:
        if s["setting"] in speed and s["setting"] != "dense":
            rows.append({"setting": s["setting"], "speedup_cpu_median": speed[s["setting"]]["speedup_cpu_median"],
                         "speedup_cpu_range": speed[s["setting"]]["speedup_cpu_range"],
                         # against the dense runs of the same seeds where there are such
                         "accuracy_drop_points": s.get("accuracy_drop_points_same_seeds", s["accuracy_drop_points"]),
                         "n_seeds": s["n_seeds"]})
    for r in rows:
        r["met"] = r["speedup_cpu_median"] >= 1.5 and r["accuracy_drop_points"] <= 1.0
    return {"goal": "a variant with >= 1.5x faster training steps at <= 1 point accuracy loss", "model": model,
            "settings": rows, "met": any(r["met"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="lenet,wide,bncnn8,bncnn32")
    ap.add_argument("--acc-model", default="wide", choices=("lenet", "wide", "bncnn8", "bncnn32"),
                    help="wide writes 'accuracy' (the goal is judged on it), others 'accuracy_<model>'")
    ap.add_argument("--acc-variants", default="structured:0.7,structured:0.8,structured-a0-first:0.8",
                    help="kind:sparsity[:explore],... with kind structured, structured-a0, structured-a0-first, "
                         "sampled, sampled-a0, sampled-a0-first (selection='sampled', explore default 0.5), "
                         "unbiased or unbiased-a0-first (selection='unbiased'); dense baselines dense-w:N "
                         "(wide: the MLP 784-N-N-10; bncnn*: BNCNN(width=N)), narrow:S, narrow-sliced:S (bncnn*)")
    ap.add_argument("--settings", default=None,
                    help="time dense plus these kind:sparsity[:explore] settings instead of the default list")
    ap.add_argument("--tag", default=None,
                    help="suffix ' [TAG]' on this step-time run's setting names: its rows (dense included) are "
                         "kept next to earlier runs' instead of replacing them")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--acc-skip-dense", action="store_true", help="reuse the dense runs already in the JSON")
    ap.add_argument("--acc-epochs", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--skip-step-time", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--probe", action="store_true", help="also run the 20,000-image probe of settings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = OUT / "structured.json"
    head = {"benchmark": "swat_structured", "issue": 17, "machine": machine(), "threads": args.threads,
            "batch": BATCH, "optimizer": "SGD momentum 0.9 (step time: lr 0.01)",
            "note": "other jobs shared the 2 cores: read the thread-CPU-time columns and the interleaved "
                    "per-round ratios; wall times are noisy"}

    def merge(update) -> dict:
        """Re-read the JSON, apply ``update(blob)`` to it, recompute the goals, write it back:
        another run of this script writing other keys meanwhile keeps its results (an exclusive
        lock on a side file makes the read-modify-write atomic between concurrent runs)."""
        import fcntl
        import tempfile

        with open(Path(tempfile.gettempdir()) / "leanscale_structured_json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(path.read_text()) if path.exists() else {}
            blob = {**head, **{k: v for k, v in old.items() if k in ("step_time", "probe_20k")
                               or k.startswith(("accuracy", "goal"))}}
            update(blob)
            for k in [k for k in blob if k.startswith("accuracy")]:
                g = goal(blob, k)
                if g is not None:
                    blob["goal" if k == "accuracy" else f"goal_{k[len('accuracy_'):]}"] = g
            atomic_write_json(path, blob)
        return blob

    if not args.skip_step_time:
        rows = step_time(args)

        def put_steps(blob):
            # rows of the same (model, setting) are replaced; other settings of the model are kept
            # (each row's speed-up is against the dense row of its own interleaved run: "run")
            new = {(r["model"], r["setting"]) for r in rows}
            merged = [r for r in blob.get("step_time", {}).get("rows", []) if (r["model"], r["setting"]) not in new]
            merged += rows
            old = blob.get("step_time", {})
            # the block's rounds / steps describe the untagged rows' run (every row records its
            # own); a tagged run leaves them, and any note written there, as they were
            head = {"rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                    "threads": args.threads}
            if args.tag:
                head = {k: old.get(k, v) for k, v in head.items()}
            blob["step_time"] = {**{k: v for k, v in old.items() if k not in head and k != "rows"}, **head,
                                 "rows": merged}
            cols = list(dict.fromkeys(k for r in merged for k in r if k != "speedup_cpu_range"))
            atomic_write_csv(OUT / "structured_step_time.csv", merged, columns=cols)

        merge(put_steps)
    key = "accuracy" if args.acc_model == "wide" else f"accuracy_{args.acc_model}"
    if args.acc_epochs != 2.0:  # other run lengths: their own rows (the 2-epoch ones stay)
        key += f"_ep{args.acc_epochs:g}"

    def put_accuracy(rows):
        def update(blob):
            new = {(r["setting"], r["seed"]) for r in rows}
            merged = [r for r in blob.get(key, {}).get("runs", []) if r["model"] == args.acc_model
                      and (r["setting"], r["seed"]) not in new] + rows
            dense = [r["test_accuracy"] for r in merged if r["setting"] == "dense"]
            dense_by_seed = {r["seed"]: r["test_accuracy"] for r in merged if r["setting"] == "dense"}
            summary = []
            for label in dict.fromkeys(r["setting"] for r in merged):
                runs = [r for r in merged if r["setting"] == label]
                acc = [r["test_accuracy"] for r in runs]
                item = {"setting": label, "n_seeds": len(acc), "seeds": [r["seed"] for r in runs],
                        "test_accuracy_mean": statistics.mean(acc),
                        "accuracy_drop_points": 100 * (statistics.mean(dense) - statistics.mean(acc)) if dense
                        else None}
                paired = [dense_by_seed[r["seed"]] - r["test_accuracy"] for r in runs if r["seed"] in dense_by_seed]
                if paired:  # against the dense run of the same seed (seeds differ between settings)
                    item["accuracy_drop_points_same_seeds"] = 100 * statistics.mean(paired)
                summary.append(item)
            blob[key] = {"model": args.acc_model, "epochs": args.acc_epochs,
                         "n_train": args.n_train or 60000, "threads": args.threads,
                         "schedule": f"SGD momentum 0.9, weight decay 5e-4, lr {merged[-1]['lr']} cosine, 0.1 epoch "
                                     f"warm-up, batch 128 (swat_accuracy.py's settings)",
                         "runs": merged, "summary": summary}
            cols = list(dict.fromkeys(k for r in merged for k in r))
            atomic_write_csv(OUT / f"structured_{key}.csv", merged, columns=cols)
            for s in summary:
                drop = s.get("accuracy_drop_points_same_seeds", s["accuracy_drop_points"])
                print(f"  {s['setting']}: {100 * s['test_accuracy_mean']:.2f}% (n={s['n_seeds']}, "
                      f"{drop if drop is not None else float('nan'):+.2f} points lost)", flush=True)
        merge(update)

    if not args.skip_accuracy:
        accuracy(args, save=put_accuracy)
    if args.probe:
        result = probe(args)
        merge(lambda blob: blob.update(probe_20k=result))
    blob = merge(lambda blob: None)
    print(json.dumps({k: v for k, v in blob.items() if k.startswith("goal")}, indent=1))


if __name__ == "__main__":
    main()
