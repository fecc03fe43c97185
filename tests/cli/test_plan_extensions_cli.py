"""``leanscale plan --unique-tokens`` and ``--inference-tokens``: output, JSON and errors (exit 2)."""

import json
import re

import pytest

from leanscale.cli.main import main
from leanscale.scaling import plan_data_constrained, plan_inference_aware


def test_unique_tokens_table(capsys):
    # Muennighoff et al.'s Figure 1 budget: 25B unique tokens
    assert main(["plan", "--flops", "9.26e21", "--unique-tokens", "25e9", "--law", "muennighoff"]) == 0
    out = capsys.readouterr().out
    for label in ("epochs (D / U)", "effective tokens D'", "loss penalty vs unlimited data", "parameters N"):
        assert label in out
    assert re.search(r"epochs \(D / U\)\s+9\.0", out), out
    assert "WARNING" not in out


def test_unique_tokens_json_matches_the_api(capsys):
    argv = ["plan", "--flops", "1e24", "--unique-tokens", "1e11", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    blob = json.loads(captured.out)
    with pytest.warns():
        ref = plan_data_constrained("epoch", flops=1e24, unique_tokens=1e11)
    for key in ("n_params", "n_tokens", "epochs", "effective_tokens", "loss_penalty", "unlimited_loss"):
        assert blob[key] == pytest.approx(getattr(ref, key), rel=1e-12)
    assert blob["warnings"] == ref.warnings and len(ref.warnings) == 2
    assert captured.err.count("WARNING: ") == 2 and "1 + R_D*" in captured.err


def test_inference_tokens_table_and_json(capsys):
    assert main(["plan", "--params", "13e9", "--inference-tokens", "2e12", "--law", "chinchilla"]) == 0
    out = capsys.readouterr().out
    for label in ("total FLOPs", "Chinchilla-optimal total FLOPs", "FLOPs saved", "Chinchilla-optimal N"):
        assert label in out
    assert main(["plan", "--flops", "1e23", "--inference-tokens", "1e13", "--json", "--gpu", "h100"]) == 0
    blob = json.loads(capsys.readouterr().out)
    ref = plan_inference_aware("epoch", inference_tokens=1e13, flops=1e23, gpu="h100")
    for key in ("n_params", "n_tokens", "total_flops", "chinchilla_total_flops", "flops_saved", "gpu_hours"):
        assert blob[key] == pytest.approx(getattr(ref, key), rel=1e-12)
    assert blob["n_params"] < blob["chinchilla_n_params"] and blob["flops_saved"] > 0
    assert main(["plan", "--target-loss", str(ref.target_loss), "--inference-tokens", "1e13", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_params"] == pytest.approx(ref.n_params, rel=1e-9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--flops", "1e22", "--unique-tokens", "-1"], "'unique_tokens'.*range \\(0, inf\\).*-1.0"),
        (["--flops", "1e22", "--unique-tokens", "0"], "'unique_tokens'.*range \\(0, inf\\)"),
        (["--flops", "1e22", "--unique-tokens", "nan"], "'unique_tokens'.*Got nan"),
        (["--flops", "1e22", "--unique-tokens", "inf"], "'unique_tokens'.*Got inf"),
        (["--unique-tokens", "1e10"], "'--unique-tokens'.*needs '--flops'"),
        (["--flops", "1e22", "--params", "1e9", "--unique-tokens", "1e10"], "'--unique-tokens'.*--params 1000000000.0"),
        (["--flops", "1e22", "--unique-tokens", "1e10", "--inference-tokens", "1e12"], "cannot be combined"),
        (["--flops", "1e22", "--unique-tokens", "1e10", "--target-loss", "2.5"], "'--target-loss'.*only with"),
        (["--flops", "1e22", "--unique-tokens", "1e10", "--law", "kaplan"], "'law'.*'chinchilla', 'epoch'"),
        (["--flops", "1e22", "--inference-tokens", "-5"], "'inference_tokens'.*range \\[0, inf\\).*-5.0"),
        (["--flops", "1e22", "--inference-tokens", "nan"], "'inference_tokens'.*Got nan"),
        (["--inference-tokens", "1e12"], "exactly one of '--flops', '--params', '--target-loss'.*none"),
        (["--flops", "1e22", "--params", "1e9", "--inference-tokens", "1e12"], "exactly one.*--flops, --params"),
        (["--tokens", "1e11", "--inference-tokens", "1e12"], "not '--tokens'"),
        (["--target-loss", "1.0", "--inference-tokens", "1e12"], "'target_loss'.*irreducible loss"),
        (["--target-loss", "2.5"], "'--target-loss'.*only with '--inference-tokens'"),
        (["--flops", "1e22", "--inference-tokens", "1e12", "--mfu", "0.5"], "'--mfu'.*only with '--gpu'"),
    ],
)
def test_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("leanscale plan: error: ")
    assert re.search(message, err), err
