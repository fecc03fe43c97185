"""The scaling CLI end to end: sweep -> fit -> plan, and its errors (no tracebacks)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from leanscale.cli.main import main
from leanscale.scaling import EPOCH_2024


def _json_out(capsys):
    return json.loads(capsys.readouterr().out)


OWN_SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "scaling" / "own_sweep"


def test_round_trip_fit_plan_on_a_real_sweep(tmp_path, capsys):
    # The committed benchmark sweep (20 real runs, 4 budgets) stands in for `leanscale sweep`,
    # whose command line tests/scaling/test_sweep.py runs; training one here cost 80 s.
    out = tmp_path / "fit"
    rc = main(["fit", str(OWN_SWEEP / "runs.csv"), "--out", str(out), "--resamples", "20", "--json"])
    assert rc == 0
    fit = _json_out(capsys)
    assert (out / "law.json").is_file() and (out / "contours.png").is_file()
    assert fit["n_runs"] == 20
    assert [r["approach"][0] for r in fit["exponents"]] == ["3", "2", "1"]
    # The same fit as the committed one (benchmarks/scaling/own_law.py wrote it).
    committed = json.loads((OWN_SWEEP.parent / "own_fit" / "law.json").read_text())
    for key in ("E", "A", "B", "alpha", "beta"):
        assert fit["law"][key] == pytest.approx(committed[key], rel=1e-6), key

    law = out / "law.json"
    rc = main(["plan", "--flops", "1e16", "--law", str(law), "--extrapolate", "--json"])
    assert rc == 0
    plan = _json_out(capsys)
    assert plan["flops"] == pytest.approx(1e16)
    assert plan["n_params"] * plan["n_tokens"] * 6 == pytest.approx(1e16)
    # Without --extrapolate a budget below the smallest swept model is refused.
    rc = main(["plan", "--flops", "1e6", "--law", str(law)])
    err = capsys.readouterr().err
    assert rc == 2 and "below the smallest model" in err and "Traceback" not in err


def test_fit_on_user_runs_recovers_the_law(tmp_path, capsys):
    n = np.repeat(np.geomspace(1e8, 1e10, 6), 3)
    d = n * np.tile([5.0, 20.0, 80.0], 6)
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["n_params", "n_tokens", "loss"])
        w.writerows(zip(n, d, EPOCH_2024.predict(n, d)))
    assert main(["fit", str(path), "--resamples", "0", "--no-figures", "--json"]) == 0
    fit = _json_out(capsys)
    assert fit["law"]["alpha"] == pytest.approx(0.3478, rel=1e-3)
    assert fit["law"]["beta"] == pytest.approx(0.3658, rel=1e-3)


def test_plan_prints_a_table(capsys):
    assert main(["plan", "--flops", "5.76e23", "--law", "chinchilla", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "tokens per parameter" in out and "GPU-hours" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--flops", "1e21", "--law", "kaplan"], "'law'.*'chinchilla', 'epoch'"),
        (["plan", "--flops", "-3"], "'flops'.*range \\(0, inf\\)"),
        (["plan", "--flops", "nan"], "'flops'.*Got nan"),
        (["plan"], "one or two of 'flops', 'n_params', 'n_tokens'"),
        (["plan", "--flops", "1e20", "--mfu", "0.5"], "'--mfu'.*only with '--gpu'"),
        (["plan", "--flops", "1e20", "--gpu", "h100", "--mfu", "0"], "'mfu'.*range \\(0, 1\\]"),
        (["plan", "--flops", "1e20", "--gpu", "h100", "--mfu", "nan"], "'mfu'.*Got nan"),
    ],
)
def test_plan_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_fit_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("params,tokens,loss\n1e8,1e9,3.0\n")
    assert main(["fit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'n_params', 'n_tokens'" in err and "Found the columns: 'params', 'tokens', 'loss'" in err
    assert main(["fit", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    few = tmp_path / "few.csv"
    few.write_text("n_params,n_tokens,loss\n1e8,1e9,3.0\n2e8,1e9,2.9\n")
    assert main(["fit", str(few)]) == 2
    assert "at least 6 runs" in capsys.readouterr().err
    neg = tmp_path / "neg.csv"
    neg.write_text("n_params,n_tokens,loss\n" + "\n".join(f"{1e8*(i+1)},1e9,{3.0 if i else -1}" for i in range(6)))
    assert main(["fit", str(neg)]) == 2
    assert "positive" in capsys.readouterr().err
