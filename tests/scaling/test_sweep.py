"""IsoFLOP sweeps: grid planning, training, resuming, executors and the CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

import leanscale.scaling.sweep as sweep_module
from leanscale.cli.main import main
from leanscale.core.errors import InvalidParameterError
from leanscale.data.text import TokenStream, encode_corpus
from leanscale.models.transformer import GPT, flops_per_token
from leanscale.scaling._train import lr_at, model_config
from leanscale.scaling.sweep import (
    CURVES_COLUMNS,
    PRESETS,
    RUNS_COLUMNS,
    SweepConfig,
    plan_isoflop_grid,
    preset_config,
    run_sweep,
    train_run,
)

# A sweep small enough for a test: 2 budgets x 3 sizes of 3k-23k parameters on 300 kB of gcide,
# ~1,200 optimizer steps of 8 x 32 tokens in all. n_threads=1: the same arithmetic in every
# executor, so their results can be compared exactly.
TINY = dict(
    corpus="gcide", max_bytes=300_000, vocab_size=300, seq_len=32, head_dim=8, batch_size=8,
    budgets_flops=(2e9, 4e9), n_sizes=3, size_span=4.0, tokens_per_param=5.0,
    n_curve_points=4, val_batches=4, n_threads=1,
)
ONE_BUDGET = {**TINY, "budgets_flops": (2e9,)}  # its 3 runs are the reference's first 3


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANSCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return encode_corpus("gcide", vocab_size=TINY["vocab_size"], max_bytes=TINY["max_bytes"])


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    """The tiny sweep trained once, serially: the reference the other executors must match."""
    out = tmp_path_factory.mktemp("reference")
    return run_sweep(SweepConfig(**TINY), out, progress=False, tokens=tokens)


def _losses(result, prefix: str = "") -> dict[str, tuple[float, float]]:
    return {r["run_id"]: (r["loss"], r["train_loss"]) for r in result.runs
            if r["run_id"].startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def test_grid_has_budgets_times_sizes_with_d_equal_c_over_6n():
    config = SweepConfig(budgets_flops=(1e12, 3e12, 1e13), n_sizes=5)
    grid = plan_isoflop_grid(config)
    assert len(grid) == 15 and len({s.run_id for s in grid}) == 15
    for budget in config.budgets_flops:
        runs = [s for s in grid if s.budget_flops == budget]
        assert len(runs) == 5
        sizes = [s.n_params for s in runs]
        assert sizes == sorted(sizes) and len(set(sizes)) == 5
        # size_span (5x) around the centre, up to snapping to the shape family
        assert config.size_span / 2 < sizes[-1] / sizes[0] < config.size_span * 2
        centre = math.sqrt(budget / (6 * config.tokens_per_param))
        assert sizes[0] < centre < sizes[-1]
        for s in runs:
            assert abs(s.n_tokens - budget / (6 * s.n_params)) <= 0.5
            assert s.flops == 6 * s.n_params * s.n_tokens
            assert s.flops == pytest.approx(budget, rel=1e-5)


def test_grid_counts_match_the_model():
    """N, the non-embedding N and the Appendix-F FLOPs are those of the model that is trained."""
    config = SweepConfig(budgets_flops=(1e12, 1e13), n_sizes=5)
    for s in plan_isoflop_grid(config):
        model = GPT(model_config(s))
        assert s.n_params == model.n_params()
        assert s.n_params_non_embedding == model.n_params(non_embedding=True)
        assert s.flops_appendix_f == pytest.approx(flops_per_token(model_config(s)) * s.n_tokens)
        assert s.n_head * config.head_dim == s.n_embd  # fixed head width


def test_lr_falls_with_width():
    config = SweepConfig(budgets_flops=(1e12,), n_sizes=5)
    grid = plan_isoflop_grid(config)
    for s in grid:
        assert s.lr == pytest.approx(config.lr * (config.lr_base_width / s.n_embd) ** 1.5)
        assert s.batch_size == config.batch_size
    assert [s.lr for s in grid] == sorted((s.lr for s in grid), reverse=True)


def test_budget_below_the_smallest_model_is_refused():
    with pytest.raises(InvalidParameterError,
                       match=r"'budgets_flops' .* at least [0-9.e+]+ FLOPs .* Got 1e\+09") as info:
        plan_isoflop_grid(SweepConfig(budgets_flops=(1e9, 1e12)))
    assert "smallest model of the family" in str(info.value)


def test_budget_beyond_the_corpus_is_refused():
    with pytest.raises(InvalidParameterError,
                       match=r"'budgets_flops' .* Got 1e\+13: .* needs [0-9,]+ training tokens.* has 9,999,872"):
        plan_isoflop_grid(SweepConfig(budgets_flops=(1e12, 1e13)), n_train_tokens=10_000_000)


def test_budget_with_too_few_steps_is_refused():
    config = SweepConfig(**{**TINY, "budgets_flops": (2e9,), "min_steps": 1000})
    with pytest.raises(InvalidParameterError, match=r"min_steps=1000 optimizer steps"):
        plan_isoflop_grid(config)


@pytest.mark.parametrize("key, value, match", [
    ("executor", "gpu", r"'executor' parameter of SweepConfig must be one of"),
    ("budgets_flops", (1e12, 1e12), r"must not repeat a budget"),
    ("budgets_flops", (), r"non-empty tuple"),
    ("budgets_flops", (-1.0,), r"positive finite"),
    ("n_sizes", 0, r"'n_sizes' parameter of SweepConfig must be an int in the range \[1, inf\)"),
    ("corpus", None, r"'corpus' parameter of SweepConfig must be an instance of str"),
])
def test_bad_config_is_refused(key, value, match):
    with pytest.raises(InvalidParameterError, match=match):
        SweepConfig(**{key: value})


def test_presets_plan_and_unknown_preset_lists_the_valid_ones():
    for name in PRESETS:
        assert plan_isoflop_grid(preset_config(name))
    bench = plan_isoflop_grid(preset_config("benchmark"))
    budgets = sorted({s.budget_flops for s in bench})
    assert len(budgets) >= 4 and budgets[-1] / budgets[0] >= 30
    assert len(bench) == 5 * len(budgets)
    with pytest.raises(InvalidParameterError, match=r"'preset' .* Did you mean 'quick'"):
        preset_config("quik")
    with pytest.raises(InvalidParameterError, match=r"Unknown config key 'budget'"):
        preset_config("quick", ["budget=1e12"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    n, peak = 100, 1e-3
    lrs = [lr_at(s, n, peak, warmup_fraction=0.1, min_lr_ratio=0.1) for s in range(n)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone after warmup
    assert max(lrs) == pytest.approx(peak)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_sweep_writes_runs_and_curves(reference, tokens):
    out = reference.out_dir
    with open(out / "runs.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RUNS_COLUMNS
        rows = list(reader)
    with open(out / "curves.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CURVES_COLUMNS
        curves = list(reader)
    assert len(rows) == 6 and len(curves) == 6 * TINY["n_curve_points"]
    assert json.loads((out / "config.json").read_text())["budgets_flops"] == [2e9, 4e9]
    for r in rows:
        assert float(r["flops"]) == 6 * int(r["n_params"]) * int(r["n_tokens"])
        assert float(r["flops"]) == pytest.approx(float(r["budget_flops"]), rel=0.05)  # whole batches
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["train_loss"]))
        points = [c for c in curves if c["run_id"] == r["run_id"]]
        assert [int(c["n_tokens"]) for c in points][-1] == int(r["n_tokens"])
        assert float(points[-1]["loss"]) == float(r["loss"])

    # The models learned something: every final loss is below the unigram entropy of the corpus
    # (the best loss of a model that ignores the context), and the best run clearly.
    stream = TokenStream(tokens, SweepConfig(**TINY).val_fraction)
    counts = np.bincount(stream.train_tokens, minlength=TINY["vocab_size"]).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats per token, about 4.2 here
    assert unigram_entropy < math.log(TINY["vocab_size"])
    for r in rows:
        assert float(r["loss"]) < unigram_entropy, (r["run_id"], r["loss"], unigram_entropy)
    assert min(float(r["loss"]) for r in rows) < unigram_entropy - 0.15


def test_max_minutes_stops_a_run_and_says_so(tokens, capsys):
    spec = plan_isoflop_grid(SweepConfig(**TINY))[0]
    result = train_run(spec, tokens, max_minutes=1e-5)  # 0.6 ms: stops after the first step
    assert result["truncated"] and result["n_steps"] == 1
    assert result["n_tokens"] == spec.batch_size * spec.seq_len < spec.n_tokens
    assert result["flops"] == 6 * result["n_params"] * result["n_tokens"]
    assert len(result["curve"]) == 1 and math.isfinite(result["loss"])
    assert "stopped by max_minutes" in capsys.readouterr().err


def test_interrupted_sweep_resumes_without_retraining(reference, tokens, tmp_path, monkeypatch):
    config = SweepConfig(**ONE_BUDGET)
    calls = []
    real_train_run = sweep_module.train_run

    def interrupted(spec, data, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        calls.append(spec.run_id)
        return real_train_run(spec, data, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, tmp_path, progress=False, tokens=tokens)
    assert len(list((tmp_path / "tasks").glob("*.json"))) == 1
    with open(tmp_path / "runs.csv") as fh:
        assert [r["run_id"] for r in csv.DictReader(fh)] == calls  # finished -> in runs.csv

    resumed = []

    def counting(spec, data, **kwargs):
        resumed.append(spec.run_id)
        return real_train_run(spec, data, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", counting)
    result = run_sweep(config, tmp_path, progress=False, tokens=tokens)
    assert result.n_skipped == 1 and result.n_trained == 2
    assert len(resumed) == 2 and calls[0] not in resumed  # the finished run was not retrained
    assert _losses(result) == _losses(reference, "C2e09")  # the same numbers as uninterrupted

    # Same grid, another executor: nothing left to train. Another grid: refused.
    again = run_sweep(replace(config, executor="process", n_workers=2), tmp_path, progress=False,
                      tokens=tokens)
    assert again.n_trained == 0 and len(resumed) == 2
    with pytest.raises(InvalidParameterError, match=r"already holds a sweep with a different grid.* lr "):
        run_sweep(replace(config, lr=1e-3), tmp_path, progress=False, tokens=tokens)
    with pytest.raises(InvalidParameterError, match=r"different grid.*only in the new grid"):
        run_sweep(replace(config, budgets_flops=(2e9, 3e9)), tmp_path, progress=False, tokens=tokens)


def test_process_executor_matches_serial(reference, tokens, tmp_path):
    config = SweepConfig(**{**ONE_BUDGET, "executor": "process", "n_workers": 2})
    result = run_sweep(config, tmp_path, progress=False, tokens=tokens)
    assert result.n_trained == 3
    assert _losses(result) == _losses(reference, "C2e09")  # bit for bit


def test_ray_executor_matches_serial(reference, tokens, tmp_path):
    config = SweepConfig(**{**ONE_BUDGET, "executor": "ray", "n_workers": 2})
    result = run_sweep(config, tmp_path, progress=False, tokens=tokens)
    assert result.n_trained == 3
    assert _losses(result) == _losses(reference, "C2e09")


def test_ray_missing_names_the_extra(monkeypatch, tokens, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    config = SweepConfig(**{**TINY, "executor": "ray"})
    with pytest.raises(ImportError, match=r"pip install 'leanscale\[ray\]'"):
        run_sweep(config, tmp_path, progress=False, tokens=tokens)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cli_args(out) -> list[str]:
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in TINY.items() if k not in ("budgets_flops", "n_sizes")]
    return ["sweep", "--out", str(out), "--budgets", "2e9,4e9", "--sizes", "3", "--no-progress"] + [
        a for s in sets for a in ("--set", s)]


def test_cli_prints_a_table_and_the_fit_hint(reference, tokens, tmp_path, capsys, monkeypatch):
    # The command line gives the reference's grid, so it resumes the reference's finished runs.
    out = tmp_path / "s"
    shutil.copytree(reference.out_dir, out)
    monkeypatch.setattr(sweep_module, "load_tokens", lambda config: tokens)
    assert main(_cli_args(out)) == 0
    text = capsys.readouterr().out
    assert "6 runs (0 trained now, 6 already done)" in text
    assert "C4e09-L1-d32" in text and f"leanscale fit {out / 'runs.csv'}" in text
    assert main(_cli_args(out) + ["--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["n_skipped"] == 6 and blob["config"]["budgets_flops"] == [2e9, 4e9]
    assert {r["run_id"]: (r["loss"], r["train_loss"]) for r in blob["runs"]} == _losses(reference)


def test_cli_bad_budget_is_a_clear_error(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--budgets", "1e3"]) == 2
    err = capsys.readouterr().err
    assert "'budgets_flops'" in err and "Traceback" not in err


def test_docstring_examples_run():
    import doctest

    import leanscale.scaling._train as train_module
    import leanscale.scaling.grid as grid_module
    import leanscale.scaling.sweep_config as config_module

    for module in (sweep_module, train_module, config_module, grid_module):
        assert doctest.testmod(module, raise_on_error=False).failed == 0


def test_the_front_re_exports_the_split_modules_names():
    # `leanscale.scaling.sweep.<name>` keeps working for every public name, and is the same object.
    import leanscale.scaling.executors as executors_module
    import leanscale.scaling.grid as grid_module
    import leanscale.scaling.sweep_config as config_module
    import leanscale.scaling.sweep_state as state_module

    for module in (config_module, grid_module, state_module):
        for name in module.__all__:
            assert name in sweep_module.__all__ and getattr(sweep_module, name) is getattr(module, name)
    from leanscale.scaling._presets import EXECUTORS

    assert set(executors_module._EXECUTORS) == set(EXECUTORS)  # every executor SweepConfig accepts runs
