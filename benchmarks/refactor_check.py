"""Did a refactor move any number? Short versions of every benchmark's training, at two revisions.

Issue #14 moved five training loops onto one engine (``leanscale.train``) and many pieces to new
homes. This script runs a short version of what each benchmark trains -- the large-batch
classifier (plain and Ghost BatchNorm + warmup), the pruning scoring model and its EL2N scores,
an IsoFLOP run, SWAT, a mixture of experts, SimCLR and a TF-IDF cascade -- once with the code of a
base revision (checked out into a temporary git worktree) and once with the working tree, on the
same data and seeds, and compares. A second seed of the working tree gives the seed noise that a
difference must stay within. Each check runs in its own process with one thread.

Usage: python benchmarks/refactor_check.py [--base 3675ebc] [--only lb,pruning,...]
Writes benchmarks/results/engine/refactor_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine  # noqa: E402

# Each check: code run with `seed` defined; it sets `out` to a dict of numbers. Only API that
# exists at both revisions (old names may warn; warnings are not errors here).
CHECKS = {
    "large_batch": """
        from leanscale.large_batch import TrainConfig, train_classifier
        out = {}
        for name, kw in {"B128": dict(batch_size=128, lr=0.1),
                         "B512_ghost_warmup": dict(batch_size=512, lr=0.2, ghost_batch_size=128,
                                                  warmup_epochs=0.5, micro_batch_size=256)}.items():
            r = train_classifier(TrainConfig(n_train=8192, n_test=1000, width=8, epochs=3.0, seed=seed,
                                             eval_every_epochs=3.0, **kw))
            out[name + "_test_accuracy"] = r.test_accuracy
            out[name + "_train_loss"] = r.train_loss
    """,
    "pruning": """
        import numpy as np, torch
        from leanscale.data.fashion_mnist import fashion_mnist_tensors
        from leanscale.models.cnn import BNCNN
        from leanscale.pruning._train import train_scoring_model
        from leanscale.pruning.scores import el2n_scores
        d = fashion_mnist_tensors("train", n=4000, seed=0)
        m = train_scoring_model(lambda: BNCNN(10, 1, 8), d.x, d.y, epochs=1.0, seed=seed)
        m.eval()
        with torch.no_grad():
            p = torch.softmax(m(d.x), 1).numpy()
        s = el2n_scores(p, d.y.numpy())
        out = {"el2n_mean": float(s.mean()), "el2n_p90": float(np.quantile(s, 0.9)),
               "train_accuracy": float((p.argmax(1) == d.y.numpy()).mean())}
    """,
    "scaling": """
        import numpy as np
        from leanscale.data.text import TokenStream, encode_corpus
        from leanscale.scaling._train import RunSpec, train_run
        stream = TokenStream(np.asarray(encode_corpus("gcide", 384, max_bytes=300_000)), 0.05)
        spec = RunSpec(run_id="c", budget_flops=0.0, n_layer=2, n_head=2, n_embd=32, seq_len=64, vocab_size=384,
                       n_params=0, n_params_non_embedding=0, n_tokens=16 * 64 * 120, flops=0.0, flops_appendix_f=0.0,
                       lr=3e-3, batch_size=16, warmup_fraction=0.05, min_lr_ratio=0.1, weight_decay=0.1,
                       grad_clip=1.0, n_curve_points=3, val_batches=8, val_fraction=0.05, corpus="gcide",
                       max_bytes=None, seed=seed)
        r = train_run(spec, stream)
        out = {"val_loss": r["loss"], "train_loss": r["train_loss"]}
    """,
    "moe": """
        import numpy as np
        from leanscale.data.text import TokenStream, encode_corpus
        from leanscale.scaling._train import RunSpec, train_run
        from leanscale.sparse import apply_moe, moe_aux_loss
        stream = TokenStream(np.asarray(encode_corpus("gcide", 384, max_bytes=300_000)), 0.05)
        spec = RunSpec(run_id="m", budget_flops=0.0, n_layer=2, n_head=2, n_embd=32, seq_len=64, vocab_size=384,
                       n_params=0, n_params_non_embedding=0, n_tokens=16 * 64 * 100, flops=0.0, flops_appendix_f=0.0,
                       lr=3e-3, batch_size=16, warmup_fraction=0.05, min_lr_ratio=0.1, weight_decay=0.1,
                       grad_clip=1.0, n_curve_points=2, val_batches=8, val_fraction=0.05, corpus="gcide",
                       max_bytes=None, seed=seed)
        r = train_run(spec, stream, prepare_model=lambda m: apply_moe(m, 4, every=2), aux_loss=moe_aux_loss)
        out = {"val_loss": r["loss"], "n_params": r["n_params"]}
    """,
    "swat": """
        import torch
        from leanscale.large_batch import TrainConfig, train_classifier
        from leanscale.models.cnn import BNCNN
        from leanscale.sparse import apply_swat
        torch.manual_seed(seed)
        import inspect
        same = {"dense_last_layer": False} if "dense_last_layer" in inspect.signature(apply_swat).parameters else {}
        model = apply_swat(BNCNN(10, 1, 8), 0.8, **same)  # #15 keeps heads dense by default: compare like with like
        r = train_classifier(TrainConfig(n_train=4096, n_test=1000, width=8, epochs=2.0, seed=seed, decay="cosine",
                                         milestones=(), warmup_epochs=0.1, eval_every_epochs=2.0), model=model)
        out = {"test_accuracy": r.test_accuracy, "train_loss": r.train_loss}
    """,
    "simclr": """
        from leanscale.data.fashion_mnist import fashion_mnist_tensors
        from leanscale.pruning.embed import train_ssl_encoder
        d = fashion_mnist_tensors("train", n=2048, seed=0)
        enc = train_ssl_encoder(d.x, epochs=2, batch_size=256, seed=seed)
        h = enc.history_
        out = {"final_loss": sum(h.losses[-4:]) / 4, "first_loss": h.losses[0], "steps": h.steps}
    """,
    "cascade": """
        import numpy as np
        from leanscale.data.wordnet import load_wordnet_glosses, train_test_split
        from leanscale.cascade import TfidfClassifier
        g = load_wordnet_glosses()
        idx = np.random.default_rng(0).permutation(len(g.texts))[:6000]
        texts = [g.texts[i] for i in idx]
        labels = np.asarray(g.labels)[idx]
        tr, te = train_test_split(labels, 0.25, seed=seed)
        clf = TfidfClassifier(max_features=20000, seed=seed).fit([texts[i] for i in tr], labels[tr])
        pred = clf.predict([texts[i] for i in te])
        out = {"test_accuracy": float((np.asarray(pred) == labels[te]).mean())}
    """,
}


def _run(src: Path, name: str, seed: int) -> dict:
    code = "import json, sys, torch, warnings\nwarnings.simplefilter('ignore')\ntorch.set_num_threads(1)\n" \
        f"seed = {seed}\n" + textwrap.dedent(CHECKS[name]) + "\nprint('RESULT ' + json.dumps(out))\n"
    env = {**os.environ, "PYTHONPATH": str(src), "LEANSCALE_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[7:]), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="3675ebc", help="the revision before the refactor")
    ap.add_argument("--only", help="comma-separated checks: " + ",".join(CHECKS))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
                       check=True, capture_output=True)
        try:
            for name in names:
                before = _run(base / "src", name, 0)
                after = _run(ROOT / "src", name, 0)
                other_seed = _run(ROOT / "src", name, 1)
                diff, noise = {}, {}
                for k, v in after.items():
                    if k == "seconds" or not isinstance(v, (int, float)) or k not in before:
                        continue
                    diff[k] = abs(v - before[k])
                    noise[k] = abs(v - other_seed.get(k, v))
                within = all(diff[k] <= max(noise[k], 1e-12) for k in diff) and "error" not in after
                rows[name] = {"base": before, "now": after, "now_seed_1": other_seed, "abs_difference": diff,
                              "seed_noise": noise, "identical": all(d == 0 for d in diff.values()) and bool(diff),
                              "within_seed_noise": within}
                print(f"{name:12s} identical={rows[name]['identical']!s:5s} within_seed_noise={within!s:5s} "
                      f"{json.dumps(diff)}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = RESULTS / "engine" / "refactor_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() and args.only else {"checks": {}}
    record = {"base": args.base, "head": head.stdout.strip() + " + working tree", "machine": machine(),
              "checks": {**previous.get("checks", {}), **rows}}
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["within_seed_noise"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
