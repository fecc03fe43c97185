import json
import os
import stat

import numpy as np
import pytest

from leanscale.core.errors import DataNotFoundError
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


@pytest.mark.parametrize(
    "content, why",
    [
        (b'{"key": "run/1", "result": {"loss": 3', "valid JSON"),  # truncated by a crash or a full disk
        (b"\x89PNG\r\n\x1a\n\x00\x00", "UTF-8"),  # random bytes
        (b'[1, 2, 3]', "JSON object with the keys"),
        (b'{"result": {"loss": 3.0}}', "JSON object with the keys"),  # no key
        (b'{"key": 7, "result": 1}', "JSON object with the keys"),  # key of the wrong type
        (b'{"key": "run/1"}', "JSON object with the keys"),  # no result
        (b'{"key": "run/2", "result": 1}', "must hold the task 'run/1'"),  # another task's file
    ],
)
def test_job_state_damaged_task_counts_as_not_done_and_is_moved_aside(tmp_path, content, why):
    state = JobState(tmp_path)
    state.save("run/1", {"loss": 3.0})
    state.save("run/3", {"loss": 2.0})
    path = state.path("run/1")
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match=why) as caught:
        assert not state.is_done("run/1")
    assert str(path) in str(caught[0].message) and "computed again" in str(caught[0].message)
    assert not path.exists() and path.with_name(path.name + ".damaged").read_bytes() == content
    assert state.is_done("run/3") and state.keys() == ["run/3"]  # the others are untouched
    state.save("run/1", {"loss": 3.5})  # recomputed
    assert state.load("run/1") == {"loss": 3.5} and state.results() == {"run/1": {"loss": 3.5}, "run/3": {"loss": 2.0}}


def test_job_state_listing_skips_damaged_files_with_a_warning(tmp_path):
    state = JobState(tmp_path)
    state.save("a", 1)
    (state.tasks / "b.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="b.json"):
        assert state.results() == {"a": 1}
    assert state.keys() == ["a"] and list(state) == ["a"]  # moved aside: no second warning


def test_job_state_load_of_a_missing_or_damaged_task_names_it(tmp_path):
    state = JobState(tmp_path)
    with pytest.raises(DataNotFoundError, match="'x' has no result"):
        state.load("x")
    state.path("x").write_text("not json")
    with pytest.warns(RuntimeWarning), pytest.raises(DataNotFoundError, match="damaged and moved aside"):
        state.load("x")


def test_job_state_removes_stray_temp_files_on_open(tmp_path):
    state = JobState(tmp_path)
    state.save("a", 1)
    state.write_config({"x": 1})
    # What a write killed between mkstemp and rename leaves (atomic_write_bytes' naming).
    strays = [state.tasks / ".b.json.k2j4_x.tmp", tmp_path / ".config.json.abc123.tmp",
              tmp_path / "arrays" / ".a.npy.zz9.tmp"]
    for p in strays:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b'{"key": "b", "res')
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", state.tasks / "a.json", tmp_path / "config.json"]
    keep[0].write_text("user file")
    keep[1].write_text("user file")
    worker = JobState(tmp_path)  # a worker or another rank: never deletes a write in flight
    assert all(p.exists() for p in strays) and worker.removed_tmp == []
    again = JobState(tmp_path, clean=True)  # the job's owner, at the start
    assert not any(p.exists() for p in strays) and sorted(again.removed_tmp) == sorted(strays)
    assert all(p.exists() for p in keep)
    assert again.keys() == ["a"]
