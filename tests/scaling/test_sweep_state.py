"""Sweep state on disk: damaged task files are rerun, stray temp files removed, process workers
die with their parent, and the sweep's JSON files never give a raw traceback."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.scaling import sweep as sweep_module
from leanscale.scaling.sweep import SweepConfig, load_sweep_config, run_sweep

HERE = Path(__file__).parent


def _proc_state(pid: int) -> str | None:
    """The process state letter of ``pid`` (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")  # a zombie has exited


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of a sweep running --executor process: its workers and resource tracker exit too."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    driver = textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(HERE)!r})
        import _sleepy_worker
        from leanscale.scaling.executors import _run_process
        from leanscale.scaling.sweep import SweepConfig
        from types import SimpleNamespace
        config = SweepConfig(executor="process", n_workers=2, n_threads=1)
        specs = [SimpleNamespace(n_tokens=i) for i in range(4)]  # the worker never trains them
        _run_process(specs, np.zeros(4, dtype=np.int64), config, lambda spec, result: None,
                     worker=_sleepy_worker.sleep_and_report)
    """)
    env = {**os.environ, "LEANSCALE_TEST_PID_DIR": str(pid_dir)}
    parent = subprocess.Popen([sys.executable, "-c", driver], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120  # two spawned workers import torch on a busy machine
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            workers = sorted(int(p.stem) for p in pid_dir.glob("*.pid"))
        assert len(workers) == 2, f"workers did not start (parent exit code {parent.poll()})"
        children = _children(parent.pid)  # the workers and multiprocessing's resource tracker
        assert set(workers) <= set(children)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in children if _alive(p)]
        assert not left, f"processes outlived their killed parent: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:  # never leave a sleeper behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- damaged sweep state: recomputed, never a traceback ------------------------------------------
CONFIG = SweepConfig(corpus="gcide", vocab_size=300, seq_len=32, head_dim=8, batch_size=8,
                     budgets_flops=(2e9, 4e9), n_sizes=3, size_span=4.0, tokens_per_param=5.0,
                     n_curve_points=2, val_batches=1, n_threads=1)
TOKENS = np.random.default_rng(0).integers(0, 300, 400_000)


def _fake_result(spec) -> dict:
    loss = 3.0 + 1e3 / spec.n_params + 1e4 / spec.n_tokens
    out = {k: getattr(spec, k) for k in sweep_module.RUNS_COLUMNS if hasattr(spec, k)}
    return {**out, "loss": loss, "train_loss": loss + 0.1, "seconds": 0.01,
            "curve": [{"n_tokens": spec.n_tokens // 2, "loss": loss + 0.5, "train_loss": loss + 0.6},
                      {"n_tokens": spec.n_tokens, "loss": loss, "train_loss": loss + 0.1}]}


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by a closed form; the list records which runs were (re)computed."""
    calls: list[str] = []

    def fake_train_run(spec, data, **kwargs):
        calls.append(spec.run_id)
        return _fake_result(spec)

    monkeypatch.setattr(sweep_module, "train_run", fake_train_run)
    return calls


def _sweep(out):
    return run_sweep(CONFIG, out, progress=False, tokens=TOKENS)


DAMAGE = {
    "truncated": lambda raw, other: raw[: len(raw) // 2],
    "random bytes": lambda raw, other: bytes(range(256)) * 3,
    "empty": lambda raw, other: b"",
    "not an object": lambda raw, other: b"[]",
    "no result": lambda raw, other: json.dumps({"key": json.loads(raw)["key"]}).encode(),
    "result lacks loss": lambda raw, other: json.dumps(
        {**json.loads(raw), "result": {k: v for k, v in json.loads(raw)["result"].items() if k != "loss"}}).encode(),
    "loss is a string": lambda raw, other: json.dumps(
        {**json.loads(raw), "result": {**json.loads(raw)["result"], "loss": "low"}}).encode(),
    "curve is null": lambda raw, other: json.dumps(
        {**json.loads(raw), "result": {**json.loads(raw)["result"], "curve": None}}).encode(),
    "another run's file": lambda raw, other: other,
    "another run's result": lambda raw, other: json.dumps(
        {"key": json.loads(raw)["key"], "result": json.loads(other)["result"]}).encode(),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_task_file_is_recomputed(tmp_path, fake_training, how):
    first = _sweep(tmp_path)
    assert first.n_trained == 6 and len(fake_training) == 6
    tasks = sorted((tmp_path / "tasks").glob("*.json"))
    raw, other = tasks[0].read_bytes(), tasks[1].read_bytes()
    tasks[0].write_bytes(DAMAGE[how](raw, other))
    fake_training.clear()
    with pytest.warns(RuntimeWarning, match="computed again") as caught:
        again = _sweep(tmp_path)
    assert len(caught) == 1 and tasks[0].name in str(caught[0].message)
    assert again.warnings == [str(caught[0].message)]  # also in the result (`sweep --json` prints it)
    assert len(fake_training) == 1 and again.n_trained == 1 and again.n_skipped == 5  # exactly the damaged run
    assert again.runs == first.runs  # the same table as before the damage
    assert (tasks[0].parent / (tasks[0].name + ".damaged")).is_file()
    assert json.loads(tasks[0].read_bytes())["result"]["loss"] == json.loads(raw)["result"]["loss"]


def test_stray_temp_files_are_removed_on_resume(tmp_path, fake_training):
    _sweep(tmp_path)
    strays = [tmp_path / "tasks" / ".C2e09-L1-d8.json.a1b2c3.tmp", tmp_path / ".runs.csv.xyz.tmp"]
    for p in strays:
        p.write_text("half a fi")
    again = _sweep(tmp_path)
    assert again.n_trained == 0 and not any(p.exists() for p in strays)


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"run_id": "C2e09', "sweep grid file.*valid JSON"),
        ('{"runs": []}', "sweep grid file.*must be a JSON list of run objects.*Got dict"),
        ('[1, 2]', "sweep grid file.*JSON list of run objects"),
        ('[{"run_id": "x"}]', "already holds a sweep with a different grid"),
    ],
)
def test_damaged_grid_file_is_a_clear_error(tmp_path, fake_training, content, match):
    _sweep(tmp_path)
    (tmp_path / "grid.json").write_text(content)
    with pytest.raises((DataFormatError, InvalidParameterError), match=match) as info:
        _sweep(tmp_path)
    assert "grid" in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"seq_len": 3', "sweep config file.*valid JSON"),
        ('{"seq_len": "long"}', "sweep config file.*seq_len"),
        ('{"seq_len": -4}', "sweep config file.*seq_len"),
        ('{"budgets_flops": [1e9, "x"]}', "sweep config file.*budgets_flops"),
        ('{"sequence": 3}', "sweep config file.*sequence"),
        ('[]', "sweep config file.*mapping"),
    ],
)
def test_damaged_config_file_names_the_file_and_key(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(DataFormatError, match=match) as info:
        load_sweep_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_config_round_trip(tmp_path, fake_training):
    _sweep(tmp_path)
    assert load_sweep_config(tmp_path) == CONFIG


def test_sweep_cli_reports_a_damaged_task_in_text_and_json(tmp_path, fake_training, monkeypatch, capsys):
    from leanscale.cli.main import main

    monkeypatch.setattr(sweep_module, "load_tokens", lambda config: TOKENS)
    args = ["sweep", "--out", str(tmp_path), "--budgets", "2e9,4e9", "--sizes", "3", "--set", "vocab_size=300",
            "--set", "seq_len=32", "--set", "head_dim=8", "--set", "batch_size=8", "--set", "size_span=4.0",
            "--set", "tokens_per_param=5.0", "--set", "n_curve_points=2", "--set", "val_batches=1",
            "--set", "n_threads=1", "--no-progress"]
    assert main(args) == 0 and len(fake_training) == 6
    task = sorted((tmp_path / "tasks").glob("*.json"))[2]
    task.write_text('{"key": "C2e09')
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(1 trained now, 5 already done)" in out and f"WARNING: The task file {str(task)!r}" in out
    task.write_bytes(b"\x00\x01")
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    blob = json.loads(captured.out)
    assert blob["n_trained"] == 1 and len(blob["warnings"]) == 1 and str(task) in blob["warnings"][0]
    assert "WARNING:" in captured.err and "Traceback" not in captured.err
    assert len(fake_training) == 8  # 6, then the damaged run twice


def test_process_executor_starts_the_longest_runs_first(monkeypatch):
    """The parallel executors submit runs by tokens, most first (a long run started last would keep
    one worker busy while the others idle); the tables stay in grid order (run_sweep's job)."""
    import concurrent.futures

    from leanscale.scaling.executors import _run_process, longest_first
    from leanscale.scaling.grid import plan_isoflop_grid
    from leanscale.scaling.tour import tour_sweep_config

    grid = plan_isoflop_grid(tour_sweep_config(quick=False))
    submitted = []

    class InlinePool:  # runs each submission at once, in this process: the order is the test
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, spec, max_minutes):
            submitted.append(spec.run_id)
            future = concurrent.futures.Future()
            future.set_result({"run_id": spec.run_id})
            return future

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlinePool)
    recorded = []
    _run_process(grid, np.zeros(4, dtype=np.int64), SweepConfig(executor="process", n_workers=2),
                 lambda spec, result: recorded.append(result["run_id"]), worker=None)
    tokens = {s.run_id: s.n_tokens for s in grid}
    assert sorted(recorded) == sorted(tokens) and submitted == [s.run_id for s in longest_first(grid)]
    assert [tokens[r] for r in submitted] == sorted(tokens.values(), reverse=True)
    assert [tokens[r] for r in submitted] != [s.n_tokens for s in grid]  # grid order differs: the test can fail

    # makespan of the tour's measured run times (seconds ~ tokens) on 2 workers: longest first is no worse
    def makespan(order):
        load = [0.0, 0.0]
        for spec in order:
            load[load.index(min(load))] += spec.n_tokens
        return max(load)

    assert makespan(longest_first(grid)) <= makespan(grid)
