"""Progress on stderr for the long phases of the CLI commands (#progress: "a bar on every step longer than ~2 s").

The commands run in-process on a tiny data set (300 examples, 16 features) with the progress helper in
its line mode (pytest's captured stderr is not a terminal) and ``LEANSCALE_PROGRESS_INTERVAL=0``: a line
on every step, so every phase that has a bar shows it however fast it runs here. With
``LEANSCALE_NO_PROGRESS=1`` or ``--json`` nothing is printed; the numbers never depend on the bars.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from leanscale.cli.main import main
from leanscale.core.errors import InvalidParameterError
from leanscale.core.progress import LineProgress, progress

MODEL_SRC = """\
import torch.nn as nn


def build():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # what the CLI adds to it is undone after the test
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("LEANSCALE_PROGRESS_INTERVAL", "0")  # a line on every step
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[:, :3] += 4 * np.eye(3, dtype=np.float32)[y]  # separable: class c is feature c
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "net.py").write_text(MODEL_SRC)
    return {"x": x, "y": y, "root": tmp_path}


def _lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


# ------------------------------------------------------------------------------------------ the helper
def test_interval_variable_gives_a_line_per_step_and_a_last_line(monkeypatch, capsys):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("LEANSCALE_PROGRESS_INTERVAL", "0")
    bar = progress(total=3, desc="phase", unit="step")
    assert isinstance(bar, LineProgress)  # stderr is not a terminal here
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = _lines(capsys.readouterr().err, "phase: ")
    assert [line.split(" step")[0] for line in lines] == ["phase: 1/3", "phase: 2/3", "phase: 3/3", "phase: 3/3"]
    assert "done in" in lines[-1] and "elapsed" in lines[0]


def test_a_bad_interval_variable_is_ignored_with_a_warning(monkeypatch):
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("LEANSCALE_PROGRESS_INTERVAL", bad)
        with pytest.warns(UserWarning, match="LEANSCALE_PROGRESS_INTERVAL must be a number of seconds"):
            bar = progress(total=2, desc="x", interval=7.0)
        assert bar.interval == 7.0  # the caller's interval, not the bad value
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")  # silenced bars never read it
    assert progress(total=2, desc="x").silent


# --------------------------------------------------------------------------------------- prune score
@pytest.mark.parametrize("metric, phases", [
    ("el2n", ("el2n: scoring run, seed 0: ", "el2n: predictions, seed 0: ")),
    ("grand", ("grand: scoring run, seed 0: ", "grand: per-example gradients, seed 0: ")),
    ("forgetting", ("forgetting: scoring run, seed 0: ",)),
])
def test_prune_score_reports_every_scoring_phase(tiny, capsys, metric, phases):
    rc = main(["prune", "score", "--model", "net.py:build", "--data", "data.npz", "--metric", metric,
               "--epochs", "1", "--batch-size", "32", "--out", "p"])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = _lines(err, phases[0])
    # 300 // 32 = 9 steps: one line per step and the last line
    assert len(run) == 10 and run[-1].startswith(f"{phases[0]}9/9 step (100%), done in"), run
    if len(phases) > 1:
        scored = _lines(err, phases[1])
        assert scored[-1].startswith(f"{phases[1]}300/300 example (100%), done in"), scored


def test_prune_score_is_silent_with_no_progress_or_json(tiny, capsys, monkeypatch):
    args = ["prune", "score", "--model", "net.py:build", "--data", "data.npz", "--epochs", "1", "--out"]
    assert main([*args, "p1", "--json"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    assert main([*args, "p2"]) == 0
    assert capsys.readouterr().err == ""
    # the scores do not depend on the bars
    np.testing.assert_array_equal(np.load(tiny["root"] / "p1" / "scores.npy"),
                                  np.load(tiny["root"] / "p2" / "scores.npy"))


@pytest.mark.parametrize("metric", ["el2n", "grand"])
def test_data_pruner_scores_are_the_same_with_a_progress_bar(tiny, capsys, metric):
    from leanscale.pruning import DataPruner

    x = torch.as_tensor(tiny["x"][:200])
    y = tiny["y"][:200]

    def fit(show):
        torch.manual_seed(0)
        p = DataPruner(metric=metric, keep=0.5, score_epochs=1.0, batch_size=32, model_fn=lambda: torch.nn.Linear(16, 3))
        return p.fit(x, y, progress_bar=show).scores_

    quiet = fit(False)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(fit(True), quiet)  # bitwise: the same batches, the same numbers
    assert f"{metric}: scoring run, seed 0: 6/6 step" in capsys.readouterr().err
    with pytest.raises(InvalidParameterError, match="'progress_bar' parameter of DataPruner.fit"):
        DataPruner(metric=metric).fit(x, y, progress_bar="yes")


# ------------------------------------------------------------------------------------------ active
def test_active_reports_the_labels_per_round(tiny, capsys, monkeypatch):
    args = ["active", "--data", "data.npz", "--budget", "40", "--batch-size", "10", "--initial", "10"]
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = _lines(captured.err, "active learning (margin): ")
    # one line per round's fit (10, 20, 30, 40 labels) and the last line
    assert [line.split(" label")[0].rsplit(" ", 1)[1] for line in lines] == ["10/40", "20/40", "30/40", "40/40",
                                                                              "40/40"]
    assert "done in" in lines[-1]
    assert [line.split() for line in captured.out.splitlines()[:4]] == [[n, "labels"] for n in ("10", "20", "30", "40")]
    short = ["active", "--data", "data.npz", "--budget", "15", "--batch-size", "5", "--initial", "10"]
    assert main([*short, "--json"]) == 0
    captured = capsys.readouterr()
    assert "active learning" not in captured.err and len(json.loads(captured.out)["history"]) == 2
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    assert main(short) == 0 and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ batch noise
def test_batch_noise_reports_warm_up_steps_and_measurement_batches(tiny, capsys, monkeypatch):
    args = ["batch", "noise", "--model", "net.py:build", "--data", "data.npz", "--warm-steps", "3",
            "--batch-size", "16", "--n-batches", "5"]
    main(args)  # 0 or 1 (an estimate from 5 batches may be unreliable): the progress is what is tested
    err = capsys.readouterr().err
    warm = _lines(err, "train B=")
    assert warm and warm[-1].startswith("train B=") and "3/3" in warm[-1], err
    noise = _lines(err, "noise scale: ")
    assert [line.split(" batch")[0] for line in noise] == [f"noise scale: {i}/5" for i in (1, 2, 3, 4, 5, 5)]
    monkeypatch.setenv("LEANSCALE_NO_PROGRESS", "1")
    main(args)
    assert not _lines(capsys.readouterr().err, "noise scale")


def test_measure_noise_scale_is_the_same_with_a_progress_bar(capsys, monkeypatch):
    from leanscale.large_batch.noise_scale import measure_noise_scale

    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("LEANSCALE_PROGRESS_INTERVAL", "0")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loss = torch.nn.functional.cross_entropy
    quiet = measure_noise_scale(model, loss, (x, y), batch_size=8, n_batches=4)
    assert capsys.readouterr().err == ""
    shown = measure_noise_scale(model, loss, (x, y), batch_size=8, n_batches=4, progress_bar=True)
    assert shown.to_dict() == quiet.to_dict()
    assert _lines(capsys.readouterr().err, "noise scale: ")[-1].startswith("noise scale: 4/4 batch (100%), done in")


# ------------------------------------------------------------------------------------------ fit
def test_fit_reports_its_fits_and_is_silent_with_json(tiny, capsys):
    rng = np.random.default_rng(0)
    rows = ["n_params,n_tokens,loss"]
    for c in (1e15, 1e16, 1e17):
        for n in np.geomspace(1e6, 1e8, 5):
            d = c / (6 * n)
            rows.append(f"{n:.6g},{d:.6g},{1.7 + 400 / n ** 0.34 + 410 / d ** 0.28 + rng.normal(0, 0.01):.6f}")
    (tiny["root"] / "runs.csv").write_text("\n".join(rows) + "\n")
    args = ["fit", "runs.csv", "--resamples", "20", "--no-figures"]
    assert main(args) == 0
    lines = _lines(capsys.readouterr().err, "fit: ")
    assert [line.split(" fit ")[0] for line in lines] == ["fit: 1/4", "fit: 2/4", "fit: 3/4", "fit: 4/4", "fit: 4/4"]
    assert "now=bootstrap x20" in lines[0]
    assert main([*args, "--json"]) == 0
    assert capsys.readouterr().err == ""
