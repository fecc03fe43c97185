"""`leanscale prune score|select` and `leanscale active` end to end on small data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from leanscale.cli.main import main
from tests.distributed import free_port


def _npz(path, n=120, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(scale=3.0, size=(k, d))
    x = centers[y] + rng.normal(size=(n, d))
    yt = np.arange(60) % k
    np.savez(path, x=x, y=y, x_test=centers[yt] + rng.normal(size=(60, d)), y_test=yt)
    return path


def test_prune_score_then_select_writes_scores_kept_and_manifest(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "el2n"
    assert main(["prune", "score", "--data", str(data), "--metric", "el2n", "--epochs", "2", "--out", str(out)]) == 0
    scores = np.load(out / "scores.npy", allow_pickle=False)
    assert scores.shape == (120,) and np.all(scores >= 0) and np.all(scores <= np.sqrt(2))
    assert "kept 120 of 120" in capsys.readouterr().out

    sel = tmp_path / "sel"
    assert main(["prune", "select", "--scores", str(out), "--data", str(data), "--keep", "0.25",
                 "--strategy", "hard", "--out", str(sel), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    kept = np.load(sel / "kept.npy", allow_pickle=False)
    assert manifest["metric"] == "el2n" and manifest["n_kept"] == len(kept) == 30
    assert manifest["strategy"]["resolved"] == "hard"
    # Class-balanced: 10 of each class's 40, the hardest within the class.
    y = np.arange(120) % 3
    assert np.bincount(y[kept]).tolist() == [10, 10, 10]
    for c in range(3):
        in_c = np.flatnonzero(y == c)
        assert scores[np.intersect1d(kept, in_c)].min() >= np.sort(scores[in_c])[-10]
    saved = json.loads((sel / "manifest.json").read_text())
    assert sorted(saved["dropped_indices"] + kept.tolist()) == list(range(120))


def test_prune_select_auto_rule_and_bad_keep(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.linspace(0, 1, 50))
    assert main(["prune", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "10", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_kept"] == 10 and m["strategy"]["resolved"] == "easy"
    assert m["strategy"]["reason"] == (
        "auto: keeping 20% of the examples (10 of 50) is below auto_min_fraction=0.4: with a small kept set keep "
        "the easiest examples (Sorscher et al. 2022, Fig. 1)")
    assert np.load(tmp_path / "kept.npy", allow_pickle=False).tolist() == list(range(10))  # the easiest = lowest scores
    # 20 of 50 = 40%: exactly auto_min_fraction, so the hardest
    assert main(["prune", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "20", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["strategy"]["resolved"] == "hard" and "(20 of 50) is at least auto_min_fraction=0.4" in m["strategy"]["reason"]
    assert np.load(tmp_path / "kept.npy", allow_pickle=False).tolist() == list(range(30, 50))
    assert main(["prune", "select", "--scores", str(tmp_path / "s.npy"), "--keep", "1.5"]) == 2
    assert "'keep' parameter" in capsys.readouterr().err
    assert main(["prune", "select", "--scores", str(tmp_path / "nothing"), "--keep", "0.5"]) == 2
    assert "'--scores' parameter" in capsys.readouterr().err


def test_prune_score_label_metric_without_labels_is_a_clean_error(tmp_path, capsys):
    np.savez(tmp_path / "u.npz", x=np.zeros((20, 3)))
    assert main(["prune", "score", "--data", str(tmp_path / "u.npz"), "--metric", "el2n",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'y'" in err and "Traceback" not in err


@pytest.mark.distributed
def test_prune_score_under_torchrun_equals_one_process(tmp_path):
    """EL2N of a 2-process DDP scoring run (each rank trains on half of every global batch and
    scores half of the examples) equals the single-process scores, up to float summation order.
    The default MLP has BatchNorm, whose batch statistics are per rank under DDP: with 16-example
    halves they differ from the 32-example batch, so the agreement is approximate, not exact."""
    data = _npz(tmp_path / "d.npz", n=96)
    common = ["prune", "score", "--data", str(data), "--metric", "el2n", "--epochs", "2", "--batch-size", "32",
              "--seed", "4"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "leanscale.cli.main", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LEANSCALE_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = np.load(tmp_path / "one" / "scores.npy", allow_pickle=False)
    two = np.load(tmp_path / "two" / "scores.npy", allow_pickle=False)
    assert one.shape == two.shape == (96,)
    assert np.corrcoef(one, two)[0, 1] > 0.95 and np.abs(one - two).max() < 0.1


def test_active_cli_runs_resumes_and_beats_nothing_less_than_random_labels(tmp_path, capsys, one_thread):
    data = _npz(tmp_path / "d.npz", n=300)
    out = tmp_path / "al"
    args = ["active", "--data", str(data), "--strategy", "margin", "--budget", "60", "--batch-size", "20",
            "--initial", "20", "--out", str(out), "--json"]
    assert main(args) == 0
    blob = json.loads(capsys.readouterr().out)
    assert [h["n_labels"] for h in blob["history"]] == [20, 40, 60]
    assert blob["history"][-1]["accuracy"] > 0.9  # well-separated blobs
    assert blob["warnings"] == []
    hist = json.loads((out / "history.json").read_text())
    assert len(set(hist["labeled_indices"])) == 60
    # Run again: the saved state is complete, so nothing more is labelled and the history is the same.
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["history"] == blob["history"]
    assert main(["active", "--data", str(data), "--strategy", "marginn"]) == 2
    assert "Did you mean 'margin'" in capsys.readouterr().err


def test_active_budget_larger_than_the_pool_is_clipped_with_a_warning(tmp_path, capsys, one_thread):
    data = _npz(tmp_path / "d.npz", n=60)
    assert main(["active", "--data", str(data), "--budget", "100000", "--batch-size", "20", "--initial", "20",
                 "--json"]) == 0
    captured = capsys.readouterr()
    blob = json.loads(captured.out)
    assert [h["n_labels"] for h in blob["history"]] == [20, 40, 60]  # stopped at the pool
    assert len(blob["warnings"]) == 1
    assert "--budget 100,000 is more than the 60 examples in the pool" in blob["warnings"][0]
    assert f"warning: {blob['warnings'][0]}" in captured.err
    # text output: the same warning line, before the rounds
    assert main(["active", "--data", str(data), "--budget", "100000", "--batch-size", "20", "--initial", "20"]) == 0
    captured = capsys.readouterr()
    assert "warning: --budget 100,000 is more than the 60 examples" in captured.err
    assert "60 labels" in captured.out


def test_active_initial_larger_than_the_pool_is_refused_and_all_random_is_flagged(tmp_path, capsys, one_thread):
    data = _npz(tmp_path / "d.npz", n=60)
    for initial in ("5000", "61"):
        assert main(["active", "--data", str(data), "--initial", initial, "--out", str(tmp_path / "al")]) == 2
        err = capsys.readouterr().err
        assert "'--initial' parameter of leanscale active must be at most the pool size (60 examples" in err
        assert "Traceback" not in err
    assert not (tmp_path / "al").exists()
    # --n-train shrinks the pool: named in the message
    assert main(["active", "--data", str(data), "--n-train", "30", "--initial", "40"]) == 2
    assert "(30 examples in" in capsys.readouterr().err
    # --initial >= budget: every label random; legal, but said
    assert main(["active", "--data", str(data), "--initial", "30", "--budget", "30", "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert [h["n_labels"] for h in blob["history"]] == [30]
    assert any("this is random sampling" in w for w in blob["warnings"])


def test_active_fit_warnings_are_reported_once_not_raw(tmp_path, capsys, monkeypatch, one_thread):
    """A ConvergenceWarning of every round's fit -> one "warning: ..." line and one JSON entry (counted),
    no raw warning with a file and line (pytest's filterwarnings=error would fail this test on one)."""
    import warnings

    from leanscale.models.linear import ConvergenceWarning, SoftmaxRegression

    fit, calls, stop_at = SoftmaxRegression.fit, [], [None]

    def fit_and_warn(self, X, y):
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
        calls.append(len(y))
        warnings.warn(f"SoftmaxRegression did not converge (largest gradient entry {len(calls)}.5e-03)",
                      ConvergenceWarning, stacklevel=2)
        return fit(self, X, y)

    monkeypatch.setattr(SoftmaxRegression, "fit", fit_and_warn)
    data = _npz(tmp_path / "d.npz", n=90)
    out = tmp_path / "al"
    args = ["active", "--data", str(data), "--budget", "60", "--batch-size", "20", "--initial", "20",
            "--out", str(out), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    blob = json.loads(captured.out)
    assert len(calls) == 3
    assert blob["warnings"] == [("ConvergenceWarning: SoftmaxRegression did not converge (largest gradient "
                                 "entry 1.5e-03) (3 times)")]
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"warning: {blob['warnings'][0]}"]
    assert json.loads((out / "history.json").read_text())["warnings"] == blob["warnings"]
    # run again: complete, nothing fitted, and the warnings of the run are still reported
    assert main(args) == 0
    assert len(calls) == 3 and json.loads(capsys.readouterr().out)["warnings"] == blob["warnings"]

    # interrupted after 2 fits, then resumed: the warnings of both parts, counted together
    calls.clear()
    stop_at[0] = 2
    out2 = tmp_path / "al2"
    args[args.index("--out") + 1] = str(out2)
    assert main(args) == 130
    capsys.readouterr()
    stop_at[0] = None
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [h["n_labels"] for h in resumed["history"]] == [20, 40, 60]
    assert len(resumed["warnings"]) == 1 and resumed["warnings"][0].endswith(f"({len(calls)} times)")

    # text mode: the same single line
    assert main(["active", "--data", str(data), "--budget", "40", "--batch-size", "20", "--initial", "20"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        (f"warning: ConvergenceWarning: SoftmaxRegression did not converge (largest gradient entry "
         f"{len(calls) - 1}.5e-03) (2 times)")]


def test_prune_select_refuses_scores_that_do_not_belong_to_their_manifest(tmp_path, capsys):
    """A kill between scores.npy and manifest.json (here: scores.npy replaced afterwards) must not pair
    the new scores with the old manifest's metric silently."""
    from leanscale.pruning import DataPruner

    y = np.arange(40) % 2
    pruner = DataPruner(metric="random", keep=0.5, seed=0).fit(None, y, scores=np.linspace(0, 1, 40))
    manifest = json.loads(pruner.write_manifest(tmp_path).read_text())
    import hashlib
    assert manifest["sha256"]["scores.npy"] == hashlib.sha256((tmp_path / "scores.npy").read_bytes()).hexdigest()
    assert main(["prune", "select", "--scores", str(tmp_path), "--keep", "10", "--json"]) == 0  # whole: fine
    capsys.readouterr()
    np.save(tmp_path / "scores.npy", np.linspace(1, 0, 40))  # a newer run's scores, its manifest never written
    assert main(["prune", "select", "--scores", str(tmp_path), "--keep", "10"]) == 2
    err = capsys.readouterr().err
    assert "does not belong to the manifest" in err and "scores.npy" in err and "Traceback" not in err
