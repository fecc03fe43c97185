"""Fuzz every kind of file the scaling tools read: saved laws, runs CSVs and sweep state.

Each file is damaged at random (truncated, random bytes, a flipped byte, a deleted key or column,
a value of the wrong type, NaN / inf / negative / huge numbers). The public loaders and the CLI
(`leanscale plan`, `fit` and `sweep` resume) must either work or raise a LeanscaleError with a
message: never a raw exception."""

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanscale.cli.main import main
from leanscale.core.errors import LeanscaleError
from leanscale.scaling import (
    EPOCH_2024,
    ParametricScalingLaw,
    ScalingWarning,
    fit_parametric,
    get_law,
    plan,
)
from leanscale.scaling import sweep as sweep_module
from leanscale.scaling.runs import read_runs

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, -1, -1e300, 1e308, 1e-320]),
    st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(obj, prefix=()):
    """Every key path into nested dicts and lists."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


BYTE_DAMAGE = ("truncate", "random", "flip")


def _damage_bytes(draw, raw: bytes, how: str) -> bytes:
    """What a disk or a copy does to any file: cut short, replaced by garbage, one byte changed."""
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "random":
        return draw(st.binary(max_size=300))
    i = draw(st.integers(0, len(raw) - 1))
    return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]


@st.composite
def damaged_json(draw, raw: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "random", "flip", "delete", "replace", "replace"]))
    if how in BYTE_DAMAGE:
        return _damage_bytes(draw, raw, how)
    obj = json.loads(raw)
    path = draw(st.sampled_from(list(_paths(obj))))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(obj).encode()  # NaN / Infinity written as JSON's extension tokens


# --- law files ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def law_bytes(tmp_path_factory):
    n = np.repeat(np.geomspace(1e8, 1e10, 4), 2)
    d = n * np.tile([5.0, 40.0], 4)
    law = fit_parametric(n, d, EPOCH_2024.predict(n, d))
    return law.save(tmp_path_factory.mktemp("law") / "law.json").read_bytes()


@FUZZ
@given(data=st.data())
def test_damaged_law_file_never_escapes_as_a_raw_exception(law_bytes, data, capsys):
    blob = data.draw(damaged_json(law_bytes))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "law.json"
        path.write_bytes(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScalingWarning)  # a plan far outside the runs may warn
            try:
                law = get_law(str(path))
            except LeanscaleError as exc:
                assert str(path) in str(exc)  # the message names the file
            else:
                assert isinstance(law, ParametricScalingLaw)
                assert all(math.isfinite(v) and v > 0 for v in (law.E_, law.A_, law.B_, law.alpha_, law.beta_))
                try:
                    p = plan(law, flops=1e21, extrapolate=True)
                    assert math.isfinite(p.n_params) and p.n_params > 0
                except LeanscaleError:
                    pass
            rc = main(["plan", "--flops", "1e21", "--law", str(path), "--extrapolate", "--json"])
        out, err = capsys.readouterr()
        assert rc in (0, 2) and "Traceback" not in err
        if rc == 2:  # the message names the file, also when its numbers fail later (e.g. overflow in plan)
            assert "law file" in err and str(path) in err
        else:
            assert json.loads(out)["n_params"] > 0


# --- runs CSV ---------------------------------------------------------------------------------------
RUNS_CSV = "n_params,n_tokens,loss,run_id\n" + "".join(
    f"{n:.6g},{n * r:.6g},{EPOCH_2024.predict(n, n * r):.6f},r{i}\n"
    for i, (n, r) in enumerate((n, r) for n in (1e8, 3e8, 1e9, 3e9) for r in (5.0, 40.0))
)
CELLS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "1e-400", "abc", "", "1e308", "\x00", '"'])


@st.composite
def damaged_csv(draw) -> bytes:
    raw = RUNS_CSV.encode()
    how = draw(st.sampled_from(["truncate", "random", "flip", "cell", "cell", "column", "extra"]))
    if how in BYTE_DAMAGE:
        return _damage_bytes(draw, raw, how)
    lines = [line.split(",") for line in RUNS_CSV.splitlines()]
    if how == "cell":
        r, c = draw(st.integers(1, len(lines) - 1)), draw(st.integers(0, 2))
        lines[r][c] = draw(CELLS)
    elif how == "column":
        c = draw(st.integers(0, 3))
        lines = [row[:c] + row[c + 1:] for row in lines]
    else:
        lines[draw(st.integers(1, len(lines) - 1))].append("7")
    return ("\n".join(",".join(row) for row in lines) + "\n").encode()


@FUZZ
@given(blob=damaged_csv())
def test_damaged_runs_csv_never_escapes_as_a_raw_exception(blob, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "runs.csv"
        path.write_bytes(blob)
        try:
            read_runs(path)
        except LeanscaleError as exc:
            assert str(path) in str(exc) or "n_params" in str(exc)
        rc = main(["fit", str(path), "--resamples", "0", "--no-figures", "--json"])
        out, err = capsys.readouterr()
        assert rc in (0, 2) and "Traceback" not in err
        if rc == 0:
            assert "warnings" in json.loads(out)


# --- sweep state: task files, grid and config, resumed through the CLI -------------------------------
SWEEP_ARGS = ["--budgets", "2e9,4e9", "--sizes", "3", "--set", "vocab_size=300", "--set", "seq_len=32",
              "--set", "head_dim=8", "--set", "batch_size=8", "--set", "size_span=4.0",
              "--set", "tokens_per_param=5.0", "--set", "n_curve_points=2", "--set", "val_batches=1",
              "--set", "n_threads=1", "--no-progress", "--json"]
TOKENS = np.random.default_rng(0).integers(0, 300, 400_000)


def _fake_train_run(spec, data, **kwargs):
    loss = 3.0 + 1e3 / spec.n_params + 1e4 / spec.n_tokens
    out = {k: getattr(spec, k) for k in sweep_module.RUNS_COLUMNS if hasattr(spec, k)}
    return {**out, "loss": loss, "train_loss": loss, "seconds": 0.01,
            "curve": [{"n_tokens": spec.n_tokens, "loss": loss, "train_loss": loss}]}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_module, "train_run", _fake_train_run)
        mp.setattr(sweep_module, "load_tokens", lambda config: TOKENS)
        assert main(["sweep", "--out", str(out), *SWEEP_ARGS]) == 0
    return out


@FUZZ
@given(data=st.data())
def test_damaged_sweep_state_resumes_or_fails_clearly(finished_sweep, data, monkeypatch, capsys):
    monkeypatch.setattr(sweep_module, "train_run", _fake_train_run)
    monkeypatch.setattr(sweep_module, "load_tokens", lambda config: TOKENS)
    capsys.readouterr()
    files = sorted(p.relative_to(finished_sweep) for p in finished_sweep.rglob("*.json"))
    target = data.draw(st.sampled_from(files))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s"
        shutil.copytree(finished_sweep, out)
        (out / target).write_bytes(data.draw(damaged_json((out / target).read_bytes())))
        try:
            sweep_module.load_sweep_config(out)
        except LeanscaleError as exc:
            assert target.name != "config.json" or str(out / "config.json") in str(exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(["sweep", "--out", str(out), *SWEEP_ARGS])
        stdout, err = capsys.readouterr()
        assert rc in (0, 2) and "Traceback" not in err
        assert not caught  # the CLI reports them itself, in --json's "warnings"
        if rc == 0:  # resumed: every run is there, a damaged task trained again
            blob = json.loads(stdout)
            assert len(blob["runs"]) == 6 and blob["n_trained"] == len(blob["warnings"])
            assert all("computed again" in w for w in blob["warnings"])
            assert all(f"WARNING: {w}" in err for w in blob["warnings"])
        else:
            assert target.name == "grid.json" and "grid" in err
