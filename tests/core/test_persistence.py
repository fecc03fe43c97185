"""One persistence for fitted objects (leanscale.core.persistence): arrays + a JSON manifest,
atomic as a whole, versioned, a class registry; files are untrusted input."""

from __future__ import annotations

import doctest
import io
import json
import zipfile

import numpy as np
import pytest

from leanscale.core import persistence
from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
)
from leanscale.core.persistence import (
    FORMAT_VERSION,
    Fitted,
    fitted_class,
    fitted_from_state,
    load_arrays,
    load_fitted,
    load_state,
    register_fitted,
    registered_kinds,
    save_arrays,
    save_state,
)


@pytest.fixture
def Affine():
    """A tiny fitted class registered for one test (the registry is left as it was)."""

    @register_fitted("test.Affine")
    class Affine(Fitted):
        def __init__(self, w=None, b=0.0, scale=1.0):
            self.w, self.b, self.scale = w, b, scale

        def predict(self, x):
            return self.scale * (np.asarray(x) @ self.w + self.b)

        def get_state(self):
            return {"class": "test.Affine", "b": self.b}, {"w": self.w}

        @classmethod
        def from_state(cls, meta, arrays, scale=1.0):
            if not isinstance(meta.get("b"), float):
                raise InvalidParameterError(f"The 'meta' parameter of Affine.from_state has b {meta.get('b')!r}.")
            return cls(arrays["w"], meta["b"], scale)

    yield Affine
    persistence._REGISTRY.pop("test.Affine", None)


def test_doctests():
    assert doctest.testmod(persistence, raise_on_error=False).failed == 0
    assert "doctest.Scale" not in registered_kinds()


# ------------------------------------------------------------------------------ round trips


def test_a_registered_class_round_trips_through_a_folder(tmp_path, Affine):
    x = np.random.default_rng(0).normal(size=(5, 3))
    model = Affine(np.array([1.0, -2.0, 0.5]), 0.25)
    folder = model.save(tmp_path / "m")
    assert folder == tmp_path / "m"
    for loaded in (Affine.load(folder), load_fitted(folder), load_fitted(folder, scale=2.0)):
        assert isinstance(loaded, Affine)
    np.testing.assert_array_equal(load_fitted(folder).predict(x), model.predict(x))
    np.testing.assert_array_equal(load_fitted(folder, scale=2.0).predict(x), 2.0 * model.predict(x))
    assert fitted_class("test.Affine") is Affine and "test.Affine" in registered_kinds()
    doc = json.loads((folder / "meta.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION == 1
    assert doc["class"] == "test.Affine" and doc["arrays_file"].startswith("arrays-")


def test_save_state_returns_meta_as_given_and_arrays_bit_exact(tmp_path):
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.array([1, -2], dtype=np.int64),
              "b": np.array([True, False])}
    meta = {"class": "Anything", "nested": {"a": [1, 2]}, "s": "text"}
    save_state(tmp_path / "st", meta, arrays)
    back_meta, back = load_state(tmp_path / "st")
    assert back_meta == meta  # the keys save_state adds are removed again
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    with pytest.raises(InvalidParameterError, match="'format_version'"):
        save_state(tmp_path / "st", {"format_version": 2}, arrays)
    with pytest.raises(InvalidParameterError, match="'meta' parameter of save_state must be a dict"):
        save_state(tmp_path / "st", [1], arrays)
    with pytest.raises(DataNotFoundError, match="meta.json"):
        load_state(tmp_path / "missing")


def test_save_and_load_arrays_safetensors_and_npz(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
              "c": np.array([1, 2], dtype=np.int64)}
    for name in ("x.safetensors", "x.npz"):
        path = save_arrays(tmp_path / name, arrays)
        assert path == tmp_path / name
        back = load_arrays(path)
        assert set(back) == set(arrays)
        for k, value in arrays.items():
            assert back[k].dtype == value.dtype
            np.testing.assert_array_equal(back[k], value)
    assert (tmp_path / "x.npz").read_bytes()[:2] == b"PK"
    assert (tmp_path / "x.safetensors").read_bytes()[:2] != b"PK"
    with pytest.raises(InvalidParameterError, match="JSON meta"):
        save_arrays(tmp_path / "y.safetensors", {"s": np.array(["a", "b"])})
    with pytest.raises(InvalidParameterError, match="keys"):
        save_arrays(tmp_path / "y.safetensors", {1: np.zeros(2)})


# ------------------------------------------------------------------------------ the registry


def test_unknown_kinds_are_refused_with_the_known_ones_listed(tmp_path, Affine):
    save_state(tmp_path / "st", {"class": "Nothing"}, {"w": np.zeros(3)})
    meta, arrays = load_state(tmp_path / "st")
    with pytest.raises(InvalidParameterError, match=r"'class' set to one of .*'test.Affine'.*Got 'Nothing'"):
        fitted_from_state(meta, arrays)
    with pytest.raises(InvalidParameterError, match="Got None"):
        fitted_from_state("not a dict", arrays)
    with pytest.raises(DataFormatError, match=r"saved model '.*st' is invalid.*'test.Affine'.*Got 'Nothing'"):
        load_fitted(tmp_path / "st")


def test_keyword_arguments_that_do_not_apply_are_refused(tmp_path, Affine):
    folder = Affine(np.ones(2), 0.0).save(tmp_path / "m")
    with pytest.raises(InvalidParameterError, match=r"'encoder' parameter of load_fitted does not apply to a saved "
                                                    r"'test.Affine' \(it takes 'scale'\)"):
        load_fitted(folder, encoder=None)
    meta, arrays = load_state(folder)
    with pytest.raises(InvalidParameterError, match="'encoder' parameter of fitted_from_state"):
        fitted_from_state(meta, arrays, encoder=None)
    with pytest.raises(InvalidParameterError, match="'encoder' parameter of Affine.load does not apply"):
        Affine.load(folder, encoder=None)


def test_a_kind_belongs_to_one_class(Affine):
    with pytest.raises(InvalidParameterError, match="already registered"):
        @register_fitted("test.Affine")
        class Other(Fitted):
            def get_state(self):
                return {}, {}

            @classmethod
            def from_state(cls, meta, arrays):
                return cls()

    with pytest.raises(InvalidParameterError, match="must define from_state"):
        register_fitted("test.Incomplete")(type("Incomplete", (), {"get_state": lambda self: ({}, {})}))
    with pytest.raises(InvalidParameterError, match="'kind' parameter of register_fitted"):
        register_fitted("")
    assert "test.Incomplete" not in registered_kinds()


def test_an_invalid_state_in_a_file_names_the_folder(tmp_path, Affine):
    folder = Affine(np.ones(2), 0.0).save(tmp_path / "m")
    doc = json.loads((folder / "meta.json").read_text())
    doc["b"] = "zero"
    (folder / "meta.json").write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"saved model '.*m' is invalid: The 'meta' parameter of Affine"):
        load_fitted(folder)
    with pytest.raises(DataFormatError, match=r"saved model '.*m' is invalid"):
        Affine.load(folder)


# ------------------------------------------------------------------------------ versions


def _edit_meta(folder, **changes):
    doc = json.loads((folder / "meta.json").read_text())
    for k, v in changes.items():
        if v is ...:
            doc.pop(k)
        else:
            doc[k] = v
    (folder / "meta.json").write_text(json.dumps(doc))


def test_a_newer_format_version_is_refused_and_an_absent_one_reads_as_1(tmp_path, Affine):
    folder = Affine(np.ones(2), 0.5).save(tmp_path / "m")
    _edit_meta(folder, format_version=FORMAT_VERSION + 1)
    with pytest.raises(DataFormatError, match=r"format_version 2: it was written by a newer leanscale.*Upgrade"):
        load_fitted(folder)
    for bad in ("1", 0, True, None):
        _edit_meta(folder, format_version=bad)
        with pytest.raises(DataFormatError, match="expected an int >= 1"):
            load_state(folder)
    _edit_meta(folder, format_version=...)  # a save of leanscale 0.1 has no format_version
    assert load_fitted(folder).b == 0.5


def test_saves_before_content_addressing_still_load(tmp_path, Affine):
    folder = tmp_path / "old"
    folder.mkdir()
    save_arrays(folder / "arrays.safetensors", {"w": np.array([3.0, 4.0])})
    (folder / "meta.json").write_text(json.dumps({"class": "test.Affine", "b": 1.0}))
    model = load_fitted(folder)
    assert model.predict([1.0, 1.0]) == 8.0
    model.save(folder)  # a new save replaces the fixed-name file by a content-addressed one
    assert not (folder / "arrays.safetensors").exists() and len(list(folder.glob("arrays-*"))) == 1
    assert load_fitted(folder).predict([1.0, 1.0]) == 8.0


# ------------------------------------------------------------------------------ untrusted files


def test_size_limits_are_checked_before_reading(tmp_path, Affine):
    folder = Affine(np.zeros(1000), 0.0).save(tmp_path / "m")
    with pytest.raises(DataFormatError, match=r"meta.json' must be at most 10 bytes"):
        load_state(folder, max_meta_bytes=10)
    with pytest.raises(DataFormatError, match=r"arrays-.* must be at most 100 bytes"):
        load_state(folder, max_arrays_bytes=100)
    with pytest.raises(DataFormatError, match="must be at most 100 bytes"):
        load_arrays(save_arrays(tmp_path / "a.npz", {"w": np.zeros(1000)}), max_bytes=100)
    _meta, arrays = load_state(folder)  # the defaults (256 MiB, 1 GiB) let it through
    assert arrays["w"].shape == (1000,)


def test_npz_zip_bomb_is_refused_before_allocation(tmp_path):
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)})
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.npy", npy_format.MAGIC_PREFIX + b"\x01\x00" + header.getvalue()[8:] + b"\0" * 1000)
    (tmp_path / "bomb.npz").write_bytes(buf.getvalue())
    with pytest.raises(DataFormatError, match=r"bomb.npz.*declares arrays of 80,000,000,000\+ bytes"):
        load_arrays(tmp_path / "bomb.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataFormatError, match="text.npz"):
        load_arrays(tmp_path / "text.npz")


def test_the_arrays_file_must_lie_in_the_folder_and_match_its_hash(tmp_path, Affine):
    folder = Affine(np.ones(2), 0.0).save(tmp_path / "m")
    other = Affine(np.full(2, 7.0), 0.0).save(tmp_path / "other")
    doc = json.loads((folder / "meta.json").read_text())
    mine = folder / doc["arrays_file"]
    mine.write_bytes(next(other.glob("arrays-*")).read_bytes())
    with pytest.raises(DataFormatError, match="does not match the hash recorded"):
        load_fitted(folder)
    _edit_meta(folder, arrays_file="../other/" + next(other.glob("arrays-*")).name)
    with pytest.raises(DataFormatError, match="must lie inside the folder"):
        load_fitted(folder)
    _edit_meta(folder, arrays_file=doc["arrays_file"], arrays_sha256=...)
    with pytest.raises(DataFormatError, match="records no 'arrays_sha256'"):
        load_fitted(folder)


# ------------------------------------------------------------------------------ atomic as a whole


def test_a_kill_between_the_two_writes_leaves_the_previous_save_readable(tmp_path, Affine, monkeypatch):
    first, second = Affine(np.array([1.0, 2.0]), 0.0), Affine(np.array([5.0, 6.0]), 1.0)
    folder = first.save(tmp_path / "m")
    before = sorted(p.name for p in folder.iterdir())

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence, "atomic_write_json", killed)  # the arrays are written, meta.json is not
    with pytest.raises(KeyboardInterrupt):
        second.save(folder)
    monkeypatch.undo()
    assert len(list(folder.glob("arrays-*"))) == 2  # the new arrays file exists but is not named yet
    np.testing.assert_array_equal(load_fitted(folder).w, first.w)
    # a completed save commits, then removes the arrays file only the previous meta.json named
    second.save(folder)
    np.testing.assert_array_equal(load_fitted(folder).w, second.w)
    after = sorted(p.name for p in folder.iterdir())
    assert len(after) == 2 and not (set(before) - {"meta.json"}) & set(after)


# ------------------------------------------------------------------------------ named files + a manifest


def test_check_format_version_is_the_one_version_rule():
    from leanscale.core.persistence import check_format_version

    assert check_format_version({}, what="f", current=2) == 1  # absent: written before versioning
    assert check_format_version({"v": 2}, what="f", current=2, key="v") == 2
    with pytest.raises(DataFormatError, match=r"The ckpt 'x' has v 3: it was written by a newer leanscale, and this "
                                              r"one reads up to version 2\. Upgrade"):
        check_format_version({"v": 3}, what="ckpt 'x'", current=2, key="v")
    for bad in (0, -1, True, "1", 1.0, None, [1]):
        with pytest.raises(DataFormatError, match="expected an int >= 1"):
            check_format_version({"format_version": bad}, what="f", current=1)
    with pytest.raises(DataFormatError, match="records no 'v'"):
        check_format_version({}, what="f", current=1, key="v", default=None)


def test_npy_bytes_is_what_np_save_writes_and_refuses_objects():
    from leanscale.core.persistence import npy_bytes

    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    assert npy_bytes(arr) == buf.getvalue()
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(arr)), allow_pickle=False), arr)
    with pytest.raises(InvalidParameterError, match="object arrays need pickle"):
        npy_bytes(np.array([{}, None], dtype=object))


def test_write_with_manifest_commits_named_files_and_their_hashes(tmp_path):
    import hashlib

    from leanscale.core.persistence import (
        read_manifest,
        verify_recorded_file,
        write_with_manifest,
    )

    path = write_with_manifest(tmp_path / "out", {"a.bin": b"abc", "b.bin": b""}, {"what": "x"}, version=3)
    assert path == tmp_path / "out" / "manifest.json"
    doc = json.loads(path.read_text())
    assert list(doc) == ["format_version", "what", "sha256"] and doc["format_version"] == 3
    assert doc["sha256"] == {"a.bin": hashlib.sha256(b"abc").hexdigest(), "b.bin": hashlib.sha256(b"").hexdigest()}
    assert read_manifest(path, current=3) == doc
    with pytest.raises(DataFormatError, match="format_version 3: it was written by a newer leanscale"):
        read_manifest(path, current=2)
    assert verify_recorded_file(path.parent, doc, "a.bin") == (path.parent / "a.bin").resolve()
    assert verify_recorded_file(path.parent, doc, "c.bin") is None  # nothing recorded: nothing to check
    (path.parent / "a.bin").write_bytes(b"abd")
    with pytest.raises(DataFormatError, match=r"a.bin' does not belong to the manifest"):
        verify_recorded_file(path.parent, doc, "a.bin")
    (path.parent / "a.bin").unlink()
    with pytest.raises(DataNotFoundError, match="a.bin' recorded in the manifest"):
        verify_recorded_file(path.parent, doc, "a.bin")
    evil = {"sha256": {"../../etc/passwd": "0" * 64}}
    with pytest.raises(DataFormatError, match="must lie inside the folder"):
        verify_recorded_file(path.parent, evil, "../../etc/passwd")
    with pytest.raises(DataFormatError, match="must hold a JSON object"):
        (tmp_path / "list.json").write_text("[]")
        read_manifest(tmp_path / "list.json", current=1)
    (tmp_path / "big.json").write_text("{}" + " " * 100)
    with pytest.raises(DataFormatError, match="must be at most 10 bytes"):
        read_manifest(tmp_path / "big.json", current=1, max_bytes=10)


@pytest.mark.parametrize(("files", "manifest", "kwargs", "match"), [
    ({"a": b""}, {"sha256": 1}, {}, "must not use the keys"),
    ({"a": b""}, {"format_version": 1}, {}, "must not use the keys"),
    ({"../a": b""}, {}, {}, "plain files of the folder"),
    ({"manifest.json": b""}, {}, {}, "plain files of the folder"),
    ({"a": "text"}, {}, {}, "must map names to bytes"),
    ([("a", b"")], {}, {}, "'files' parameter"),
    ({"a": b""}, [], {}, "'manifest' parameter"),
    ({"a": b""}, {}, {"version": 0}, "'version' parameter"),
])
def test_write_with_manifest_bad_input(tmp_path, files, manifest, kwargs, match):
    from leanscale.core.persistence import write_with_manifest

    with pytest.raises(InvalidParameterError, match=match):
        write_with_manifest(tmp_path, files, manifest, **kwargs)
    assert list(tmp_path.iterdir()) == []  # checked before anything is written


def test_a_kill_before_the_manifest_leaves_files_the_old_manifest_disowns(tmp_path, monkeypatch):
    from leanscale.core.persistence import (
        read_manifest,
        verify_recorded_file,
        write_with_manifest,
    )

    path = write_with_manifest(tmp_path, {"a.bin": b"old"}, {"run": 1})

    def killed(p, obj):
        raise KeyboardInterrupt("killed before the manifest was written")

    monkeypatch.setattr(persistence, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_with_manifest(tmp_path, {"a.bin": b"new"}, {"run": 2})
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    doc = read_manifest(path, current=1)
    assert doc["run"] == 1  # the previous manifest is intact ...
    with pytest.raises(DataFormatError, match="does not belong to the manifest"):
        verify_recorded_file(tmp_path, doc, "a.bin")  # ... and says the new file is not its own
