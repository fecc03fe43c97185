"""Bad input to the scaling API and CLI: every case is a clear error naming the parameter or
file, or an explicit warning (a ScalingWarning, and a `warnings` entry in the text and --json
output). Nothing is silently wrong."""

import csv
import functools
import json
import math
import re
import warnings

import numpy as np
import pytest

from leanscale.cli.main import main
from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
    LeanscaleError,
)
from leanscale.scaling import (
    EPOCH_2024,
    ParametricScalingLaw,
    ScalingWarning,
    fit_parametric,
    get_law,
    plan,
    read_runs,
)
from leanscale.scaling import laws as laws_module
from leanscale.scaling.analysis import analyze_runs
from leanscale.scaling.laws import BootstrapResult

# A good design: 4 sizes x 2 ratios D/N, losses from Epoch's law (exact).
N = np.repeat(np.geomspace(1e8, 1e10, 4), 2)
D = N * np.tile([5.0, 40.0], 4)
LOSS = EPOCH_2024.predict(N, D)


@functools.cache
def _good_law() -> ParametricScalingLaw:
    """fit_parametric(N, D, LOSS), fitted once (~0.3 s) for the tests that only read it."""
    return fit_parametric(N, D, LOSS)


def _write_runs(path, n, d, loss, extra=None):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["n_params", "n_tokens", "loss"])
        w.writerows(zip(n, d, loss))
    return path


def _cli(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingWarning)  # the CLI prints them itself
        rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# --- runs given to the fit --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_params=[], n_tokens=[], loss=[]), "at least 6 runs.*Got 0"),
        (dict(n_params=[1e8], n_tokens=[1e9], loss=[3.0]), "at least 6 runs.*Got 1"),
        (dict(n_params=[1e8, 2e8], n_tokens=[1e9, 1e9], loss=[3.0, 2.9]), "at least 6 runs.*Got 2"),
        (dict(n_params=[1e8] * 8, n_tokens=[1e9] * 8), "distinct.*Got 8 runs at 1 distinct"),
        (dict(n_params=np.r_[N[:3], N[:3]], n_tokens=np.r_[D[:3], D[:3]], loss=np.r_[LOSS[:3], LOSS[:3]]),
         "at 3 distinct"),
        (dict(n_params=np.r_[0.0, N[1:]]), "'n_params'.*positive.*0.0"),
        (dict(n_tokens=np.r_[-1e9, D[1:]]), "'n_tokens'.*positive.*-1"),
        (dict(loss=np.r_[np.nan, LOSS[1:]]), "'loss'.*finite.*nan"),
        (dict(n_params=np.r_[np.inf, N[1:]]), "'n_params'.*finite.*inf"),
        (dict(loss=np.r_[0.0, LOSS[1:]]), "'loss'.*positive"),
        (dict(n_params=["a"] * 8), "'n_params'.*array-like of numbers"),
        (dict(n_params=N.reshape(2, 4)), "'n_params'.*1-d array"),
        (dict(loss=LOSS[:5]), "same length.*n_params=8.*loss=5"),
    ],
)
def test_fit_refuses_bad_runs(change, match):
    kwargs = dict(n_params=N, n_tokens=D, loss=LOSS) | change
    with pytest.raises(InvalidParameterError, match=match):
        fit_parametric(**kwargs)


def test_collinear_runs_are_flagged_unidentifiable_everywhere(tmp_path, capsys):
    n = np.geomspace(1e8, 1e10, 8)
    d = 20.0 * n  # constant D/N: N and D cannot be separated
    loss = EPOCH_2024.predict(n, d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        law = fit_parametric(n, d, loss)
    assert any("unidentifiable" in w and "D/N = 20 tokens per parameter" in w for w in law.warnings_)
    assert [str(w.message) for w in caught] == law.warnings_  # each one also a ScalingWarning
    # Through the CLI: the text says it, --json lists it, law.json keeps it, plan repeats it.
    runs = _write_runs(tmp_path / "runs.csv", n, d, loss)
    rc, out, _ = _cli(["fit", str(runs), "--resamples", "0", "--no-figures"], capsys)
    assert rc == 0 and "WARNING: The law is unidentifiable" in out
    rc, out, err = _cli(["fit", str(runs), "--resamples", "0", "--no-figures", "--json"], capsys)
    blob = json.loads(out)
    assert rc == 0 and any("unidentifiable" in w for w in blob["warnings"]) and "unidentifiable" in err
    law_file = tmp_path / "fit" / "law.json"
    assert any("unidentifiable" in w for w in json.loads(law_file.read_text())["warnings"])
    if law.alpha_ > 0 and law.beta_ > 0:
        rc, out, _ = _cli(["plan", "--flops", "1e20", "--law", str(law_file), "--json"], capsys)
        assert rc == 0 and any("flagged when it was fitted" in w and "unidentifiable" in w
                               for w in json.loads(out)["warnings"])


@pytest.mark.parametrize(
    "n, d, how",
    [
        (np.geomspace(1e8, 1e10, 8), 1e21 / (6 * np.geomspace(1e8, 1e10, 8)), "single IsoFLOP budget"),
        (np.full(8, 1e9), np.geomspace(1e9, 1e11, 8), "a single model size"),
        (np.geomspace(1e8, 1e10, 8), np.full(8, 1e10), "a single token count"),
    ],
)
def test_other_collinear_designs_are_flagged(n, d, how):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        law = fit_parametric(n, d, EPOCH_2024.predict(n, d))
    assert any(how in w and "unidentifiable" in w for w in law.warnings_)
    assert all(issubclass(w.category, ScalingWarning) for w in caught)


def test_a_good_design_has_no_warning():
    law = fit_parametric(N, D, LOSS)  # warnings are errors in this test suite
    assert law.warnings_ == []


def test_negative_exponent_is_warned(tmp_path, capsys):
    loss = 1.0 + 1e-3 * N**0.1 + 400.0 / D**0.3  # loss grows with N: alpha < 0
    with pytest.warns(ScalingWarning, match="alpha=-0.1.*not both positive"):
        law = fit_parametric(N, D, loss)
    assert law.alpha_ < 0
    runs = _write_runs(tmp_path / "runs.csv", N, D, loss)
    rc, out, _ = _cli(["fit", str(runs), "--resamples", "0", "--no-figures", "--json"], capsys)
    assert rc == 0 and any("not both positive" in w for w in json.loads(out)["warnings"])
    # Its law file cannot be planned with: a clear error naming the file and the key.
    rc, _, err = _cli(["plan", "--flops", "1e20", "--law", str(tmp_path / "fit" / "law.json")], capsys)
    assert rc == 2 and "law.json" in err and "positive 'alpha'" in err


def test_duplicate_rows_are_warned():
    n, d, loss = np.r_[N, N[:1]], np.r_[D, D[:1]], np.r_[LOSS, LOSS[:1]]
    with pytest.warns(ScalingWarning, match="1 run\\(s\\) repeat another run exactly"):
        fit_parametric(n, d, loss)


def test_point_estimate_outside_its_interval_is_warned(tmp_path, capsys, monkeypatch):
    law = _good_law()
    samples = np.tile([law.E_, law.A_, law.B_, law.alpha_, law.beta_], (100, 1))
    samples[:, 3] *= np.linspace(1.2, 1.5, 100)  # every resample has a larger alpha than the fit
    boot = BootstrapResult(law=law, samples=samples, level=0.95, converged=np.ones(100, bool))
    found = boot.check(1e21)
    assert any("point estimate of alpha" in w and "outside its own 95% bootstrap interval" in w for w in found)
    assert any("N_opt at 1e+21 FLOPs" in w for w in found)
    lo, hi = boot.compute_optimal_interval(1e21)["n_params"]
    assert not lo <= law.compute_optimal(1e21)[0] <= hi  # what the warning says is true
    # In `leanscale fit`: the same warning in the text and in --json.
    monkeypatch.setattr(ParametricScalingLaw, "bootstrap",
                        lambda self, *a, **k: BootstrapResult(self, samples, 0.95, np.ones(100, bool)))
    runs = _write_runs(tmp_path / "runs.csv", N, D, LOSS)
    rc, out, _ = _cli(["fit", str(runs), "--resamples", "100", "--no-figures", "--json"], capsys)
    assert rc == 0 and any("point estimate of alpha" in w for w in json.loads(out)["warnings"])
    rc, out, _ = _cli(["fit", str(runs), "--resamples", "100", "--no-figures"], capsys)
    assert "WARNING: The point estimate of alpha" in out


def test_refits_that_did_not_converge_are_warned():
    law = _good_law()
    samples = np.tile([law.E_, law.A_, law.B_, law.alpha_, law.beta_], (50, 1))
    boot = BootstrapResult(law=law, samples=samples, level=0.95, converged=np.arange(50) < 25)
    assert any("50.0% of the bootstrap refits did not converge" in w for w in boot.check())


def test_bootstrap_frontier_has_no_zero_or_inf_from_overflow():
    # Extreme resamples (beta near 0, large alpha) overflowed the closed form to N_opt = 0 or inf.
    n, d = laws_module._frontier(np.array([1e21, 1e21]), np.array([400.0, 1e30]), np.array([400.0, 1e-30]),
                                 np.array([0.3, 30.0]), np.array([1e-3, 0.01]))
    assert np.all(np.isfinite(n) & (n > 0)) and np.allclose(n * d * 6, 1e21)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_resamples=5), "'n_resamples'.*range \\[10, inf\\).*5"),
        (dict(n_resamples=100, level=1.5), "'level'.*1.5"),
        (dict(n_resamples=100, seed=-1), "'seed'.*-1"),
    ],
)
def test_bootstrap_bad_parameters(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        _good_law().bootstrap(**kwargs)


# --- plan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flops=0.0), "'flops'.*\\(0, inf\\).*0.0"),
        (dict(flops=-1e20), "'flops'.*-1e\\+20"),
        (dict(flops=math.nan), "'flops'.*nan"),
        (dict(flops=math.inf), "'flops'.*inf"),
        (dict(flops="1e20"), "'flops'.*'1e20'"),
        (dict(flops=True), "'flops'.*True"),
        (dict(n_params=1e300), "'n_params'.*overflow"),
        (dict(n_tokens=1e300), "'n_tokens'.*overflow"),
        (dict(n_params=1e-300, extrapolate=True), "'n_params'.*underflows"),
        (dict(flops=1e20, gpu="h100", mfu=0.0), "'mfu'"),
        (dict(flops=1e20, gpu="h100", mfu=math.nan), "'mfu'"),
    ],
)
def test_plan_refuses(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        plan("epoch", **kwargs)


def test_plan_far_beyond_the_fitted_runs_is_warned(tmp_path, capsys):
    # Runs up to ~2e16 FLOPs; a plan at 1e25 is ~4e8x beyond them.
    n = np.repeat(np.geomspace(1e6, 1e7, 4), 2)
    d = n * np.tile([5.0, 40.0], 4)
    law = fit_parametric(n, d, EPOCH_2024.predict(n, d))
    top = float((6 * n * d).max())
    with pytest.warns(ScalingWarning, match=f"beyond the largest run.*{re.escape(f'{top:.3g}')} FLOPs"):
        p = plan(law, flops=1e25)
    assert f"{1e25 / top:.3g}x" in p.warnings[0]
    path = law.save(tmp_path / "law.json")
    rc, out, _ = _cli(["plan", "--flops", "1e25", "--law", str(path), "--json"], capsys)
    assert rc == 0 and "beyond the largest run" in json.loads(out)["warnings"][0]
    rc, out, _ = _cli(["plan", "--flops", "1e25", "--law", str(path)], capsys)
    assert rc == 0 and "WARNING: The plan (1e+25 FLOPs)" in out and "runs span" in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan(law, flops=top).warnings == []  # inside the range: nothing


# --- law files ------------------------------------------------------------------------------------------
def _law_blob():
    return _good_law().to_dict() | {}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b.pop("alpha"), "must have the keys E, A, B, alpha, beta. Missing \\['alpha'\\]"),
        (lambda b: b.update(alpha="0.3"), "number under 'alpha'. Got '0.3'"),
        (lambda b: b.update(E=None), "number under 'E'. Got None"),
        (lambda b: b.update(B=True), "number under 'B'. Got True"),
        (lambda b: b.update(A=-5.0), "positive finite number under 'A'. Got -5.0"),
        (lambda b: b.update(E=math.nan), "under 'E'. Got nan"),
        (lambda b: b.update(beta=math.inf), "under 'beta'. Got inf"),
        (lambda b: b.update(beta=-0.2), "positive 'beta'"),
        (lambda b: b.update(kind="isoflop"), "kind 'parametric'"),
        (lambda b: b.update(name=3), "'name'"),
        (lambda b: b.update(huber_delta=0), "'huber_delta'"),
        (lambda b: b.update(method="lbfgs"), "'method'"),
        (lambda b: b.update(runs=[1, 2]), "object under 'runs'"),
        (lambda b: b["runs"].pop("loss"), "'runs.loss'"),
        (lambda b: b["runs"].update(n_params=[1e8, "x"]), "'runs.n_params'"),
        (lambda b: b["runs"].update(loss=b["runs"]["loss"][:3]), "one length"),
        (lambda b: b["runs"].update(n_tokens=[-1.0] * 8), "'runs.n_tokens'"),
        (lambda b: b.update(warnings="x"), "'warnings'"),
        (lambda b: b.update(objective="low"), "'objective'"),
    ],
)
def test_law_file_with_bad_keys_names_the_file_and_key(tmp_path, mutate, match):
    blob = json.loads(json.dumps(_law_blob(), default=lambda o: o.tolist()))
    mutate(blob)
    path = tmp_path / "law.json"
    path.write_text(json.dumps(blob))
    with pytest.raises(DataFormatError, match=match) as info:
        get_law(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"kind": "parametric", "E": 1.8, "A": 48', "law file.*must be valid JSON.*truncated"),
        (b"", "law file.*valid JSON"),
        (b"\xff\xfe\x00garbage", "law file.*UTF-8"),
        (b"[1.8, 482, 2085, 0.35, 0.37]", "law file.*JSON object.*Got list"),
        (b"n_params,n_tokens,loss\n1e8,1e9,3\n", "law file.*valid JSON"),  # a runs CSV given as --law
    ],
)
def test_damaged_law_file_is_one_clear_error(tmp_path, content, match, capsys):
    path = tmp_path / "law.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match) as info:
        get_law(str(path))
    assert str(path) in str(info.value)
    rc, _, err = _cli(["plan", "--flops", "1e21", "--law", str(path)], capsys)
    assert rc == 2 and str(path) in err and "law file" in err


def test_law_file_path_errors(tmp_path, monkeypatch):
    with pytest.raises(InvalidParameterError, match="does not exist"):
        get_law(str(tmp_path / "nope.json"))
    with pytest.raises(DataFormatError, match="law file.*folder"):
        get_law(str(tmp_path))
    other = tmp_path / "law.npz"  # a wrong extension: read as JSON, refused with the file's name
    other.write_bytes(b"PK\x03\x04binary")
    with pytest.raises(DataFormatError, match="law file.*law.npz"):
        get_law(str(other))
    big = tmp_path / "big.json"
    big.write_text(json.dumps(_law_blob(), default=lambda o: o.tolist()))
    monkeypatch.setattr(laws_module, "MAX_LAW_FILE_BYTES", 100)
    with pytest.raises(DataFormatError, match="law file.*at most 100 bytes"):
        get_law(str(big))


def test_law_that_is_not_a_file_or_name(capsys):
    with pytest.raises(DataFormatError, match="law file '/dev/zero' is not a regular file"):
        get_law("/dev/zero")  # would otherwise be read forever
    with pytest.raises(InvalidParameterError, match="'law'"):
        get_law("")
    with pytest.raises(InvalidParameterError, match="'law'.*preset name or a path"):
        get_law(3)
    with pytest.raises(DataFormatError, match="runs file '/dev/zero' is not a regular file"):
        read_runs("/dev/zero")
    rc, _, err = _cli(["plan", "--flops", "1e21", "--law", "/dev/zero"], capsys)
    assert rc == 2 and "/dev/zero" in err


def test_law_dict_errors_without_a_file():
    with pytest.raises(DataFormatError, match="The law data must have the keys"):
        ParametricScalingLaw.from_dict({"E": 1.0})
    with pytest.raises(DataFormatError, match="The law data must be a JSON object"):
        ParametricScalingLaw.from_dict("epoch")


# --- runs files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, error, match",
    [
        (b"", InvalidParameterError, "must have the column.*Found the columns: \\(none\\)"),
        (b"n_params,n_tokens,loss\n", InvalidParameterError, "header but no rows"),
        (b'{"kind": "parametric", "E": 1.8}', InvalidParameterError, "looks like JSON, not CSV"),
        (b"\x89PNG\r\n\x1a\n\xff\x00", DataFormatError, "UTF-8 CSV"),
        (b"n_params,n_tokens,loss\n1e8,1e9\x00,3\n", DataFormatError, "NUL bytes"),
        (b"n_params,n_tokens,loss,loss\n1e8,1e9,3,3\n", DataFormatError, "\\['loss'\\] more than once"),
        (b"n_params,n_tokens,loss\n1e8,1e9,3,9\n", DataFormatError, "more values than columns in data row 1"),
        (b"n_params,n_tokens,loss\n1e8,1e9\n", InvalidParameterError, "'loss'.*numbers. Got None in data row 1"),
        (b"n_params,n_tokens,loss\n1e8,1e9,abc\n", InvalidParameterError, "'loss'.*numbers. Got 'abc'"),
        (b"n_params,n_tokens,loss\n1e8,1e9,inf\n", InvalidParameterError, "finite"),
        (b"n_params,n_tokens,loss\n1e8,1e9,nan\n", InvalidParameterError, "finite"),
        (b"n_params,n_tokens,loss\n-1e8,1e9,3\n", InvalidParameterError, "positive"),
        (b"n_params,n_tokens,loss\n1e200,1e200,3\n", InvalidParameterError, "6 N D are finite.*overflows"),
        (b"n_params,n_tokens,loss,flops\n1e8,1e9,3,0\n", InvalidParameterError, "'flops.*positive"),
    ],
)
def test_bad_runs_file(tmp_path, content, error, match, capsys):
    path = tmp_path / "runs.csv"
    path.write_bytes(content)
    with pytest.raises(error, match=match) as info:
        read_runs(path)
    assert str(path) in str(info.value)
    rc, _, err = _cli(["fit", str(path), "--no-figures"], capsys)
    assert rc == 2 and str(path) in err


def test_runs_file_path_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="runs file.*does not exist"):
        read_runs(tmp_path / "missing.csv")
    with pytest.raises(DataFormatError, match="runs file.*is a folder"):
        read_runs(tmp_path)


def test_runs_file_with_a_bom_is_read(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_bytes(b"\xef\xbb\xbf" + b"n_params,n_tokens,loss\n1e8,1e9,3.0\n")  # Excel's UTF-8
    assert read_runs(path).n_params.tolist() == [1e8]


# --- the fit command and analysis ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (["--resamples", "-1"], "'n_resamples'.*-1"),
        (["--resamples", "5"], "'n_resamples'.*5"),
        (["--flops", "-1"], "'budget_flops'.*-1"),
        (["--flops", "nan"], "'budget_flops'.*nan"),
        (["--flops", "inf"], "'budget_flops'.*inf"),
    ],
)
def test_fit_cli_bad_options(tmp_path, args, match, capsys):
    runs = _write_runs(tmp_path / "runs.csv", N, D, LOSS)
    rc, _, err = _cli(["fit", str(runs), "--no-figures", *args], capsys)
    assert rc == 2 and __import__("re").search(match, err), err


def test_fit_budget_far_outside_the_runs_is_warned(tmp_path):
    from leanscale.scaling.runs import Runs

    runs = Runs(n_params=N, n_tokens=D, loss=LOSS, flops=6 * N * D, budget_flops=None,
                run_id=[str(i) for i in range(N.size)])
    a = analyze_runs(runs, n_resamples=0, budget_flops=1e30)
    assert any("beyond the runs" in w and "extrapolated" in w for w in a.warnings)
    assert a.to_dict()["warnings"] == a.warnings
    assert analyze_runs(runs, n_resamples=0).warnings == []


def test_every_refusal_is_a_leanscale_error():
    # The CLI prints these without a traceback; `except ValueError` also still works.
    for exc in (InvalidParameterError, DataFormatError):
        assert issubclass(exc, LeanscaleError) and issubclass(exc, ValueError)


def test_a_loss_outlier_that_sends_the_fit_to_overflow_is_a_clear_error():
    """Found by the runs-CSV fuzz test: one loss of 1e308 drove log B to 1.4e4 and exp() overflowed
    (a bare OverflowError). The fit now says the losses cannot be described by the law."""
    n = np.array([1e8, 1e8, 3e8, 3e8, 1e9, 1e9, 3e9, 3e9])
    d = np.array([5e8, 4e9, 1.5e9, 1.2e10, 5e9, 4e10, 1.5e10, 1.2e11])
    loss = np.array([1e308, 3.2536, 3.2775, 2.7889, 2.7650, 2.4504, 2.4561, 2.2456])
    with pytest.raises(InvalidParameterError, match="'loss' parameter of fit_parametric cannot be described.*1e\\+308"):
        fit_parametric(n, d, loss)


def test_runs_whose_compute_overflows_are_refused_in_the_api_and_in_a_law_file(tmp_path):
    """Found by exploring the law-file fuzz test: a run with N = 6e298 made 6 N D overflow (a numpy
    RuntimeWarning, then inf compute in the extrapolation check)."""
    n = np.geomspace(1e8, 1e10, 8)
    d = 20 * n * np.tile([0.5, 2.0], 4)
    bad_n = n.copy()
    bad_n[0] = 6e298
    with pytest.raises(InvalidParameterError, match="finite compute 6 N D.*index 0"):
        fit_parametric(bad_n, d, EPOCH_2024.predict(n, d))
    law = fit_parametric(n, d, EPOCH_2024.predict(n, d))
    path = law.save(tmp_path / "law.json")
    blob = json.loads(path.read_text())
    blob["runs"]["n_params"][0] = 6e298
    path.write_text(json.dumps(blob))
    with pytest.raises(DataFormatError, match="6 N D overflows") as info:
        get_law(str(path))
    assert str(path) in str(info.value)


def test_a_grid_file_with_unhashable_run_ids_is_a_clear_error(tmp_path):
    """Found by exploring the sweep-state fuzz test: a run_id that is a list in grid.json raised
    TypeError (unhashable) while describing the difference."""
    from leanscale.scaling.sweep import _check_same_grid, plan_isoflop_grid, preset_config

    grid = plan_isoflop_grid(preset_config("quick"))
    _check_same_grid(tmp_path, grid)
    blob = json.loads((tmp_path / "grid.json").read_text())
    blob[0]["run_id"] = ["not", "an", "id"]
    (tmp_path / "grid.json").write_text(json.dumps(blob))
    with pytest.raises(InvalidParameterError, match="already holds a sweep with a different grid"):
        _check_same_grid(tmp_path, grid)
