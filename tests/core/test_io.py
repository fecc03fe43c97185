import json
import os
import stat

import numpy as np
import pytest

from leanscale.core.io import (
    JobState,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    read_csv,
    read_json,
    to_jsonable,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_atomic_write_has_the_mode_of_a_plain_open(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    path = atomic_write_bytes(tmp_path / "x", b"1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.json"
    atomic_write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]  # the temp file was removed


def test_to_jsonable_numpy_nonfinite_and_nested():
    blob = to_jsonable({"i": np.int64(3), "f": np.float32(0.5), "a": np.arange(3), "nan": float("nan"),
                        "inf": np.float64("inf"), "b": np.bool_(True), "t": (1, 2)})
    assert json.loads(json.dumps(blob)) == {"i": 3, "f": 0.5, "a": [0, 1, 2], "nan": "nan", "inf": "inf",
                                            "b": True, "t": [1, 2]}


def test_csv_round_trip_with_column_order(tmp_path):
    path = atomic_write_csv(tmp_path / "r.csv", [{"b": 1, "a": 2.5, "extra": "x"}], columns=["a", "b"])
    assert read_csv(path) == [{"a": "2.5", "b": "1"}]


def test_job_state_resumes_finished_tasks(tmp_path):
    state = JobState(tmp_path)
    assert not state.is_done("run/1")
    state.save("run/1", {"loss": 3.0})
    again = JobState(tmp_path)  # a new process after an interruption
    assert again.is_done("run/1") and again.load("run/1") == {"loss": 3.0}
    assert again.keys() == ["run/1"] and again.results() == {"run/1": {"loss": 3.0}}
    assert list(again) == ["run/1"] and "run/1" in again and "run/2" not in again
    assert again.path("run/1").parent == tmp_path / "tasks"  # the key is made safe for a file name
