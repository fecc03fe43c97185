"""leanscale.data.load_dataset: the user's own data in every format, and one set of messages (#15).

Each format is written in tmp_path from known arrays and read back: the values, the label codes and
the classes (the original labels, strings allowed) must be what was written.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.data import UserData, load_dataset

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 3)).astype(np.float32)
NAMES = np.array(["cat", "dog", "eel"])[np.arange(12) % 3]  # cat, dog, eel, cat, ...
CODES = np.arange(12) % 3


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def feature_rows():
    return [[*map(repr, map(float, row)), lab] for row, lab in zip(X, NAMES)]


# --------------------------------------------------------------------------------- round trips


def test_npz_with_string_labels_round_trips(tmp_path):
    np.savez(tmp_path / "d.npz", x=X, y=NAMES)
    d = load_dataset(tmp_path / "d.npz")
    assert isinstance(d, UserData) and d.kind == "features" and len(d) == 12
    np.testing.assert_array_equal(d.x, X)
    assert d.classes == ("cat", "dog", "eel") and d.y.tolist() == CODES.tolist()
    assert d.labels.tolist() == NAMES.tolist()


def test_npz_integer_labels_keep_their_values_and_test_split_shares_the_coding(tmp_path):
    np.savez(tmp_path / "d.npz", x=X, y=np.array([0, 7] * 6), x_test=X[:4], y_test=np.array([7, 7, 0, 0]))
    d = load_dataset(tmp_path / "d.npz")
    assert d.y.tolist() == [0, 7] * 6 and d.classes == tuple(range(8)) and d.y_test.tolist() == [7, 7, 0, 0]
    np.savez(tmp_path / "s.npz", x=X, y=NAMES, x_test=X[:2], y_test=np.array(["eel", "ant"]))
    s = load_dataset(tmp_path / "s.npz")
    assert s.classes == ("ant", "cat", "dog", "eel") and s.labels.tolist() == NAMES.tolist()
    assert [s.classes[c] for c in s.y_test] == ["eel", "ant"]


def test_npz_images_and_named_keys(tmp_path):
    imgs = RNG.random((6, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "i.npz", pixels=imgs, target=np.arange(6) % 2)
    d = load_dataset(tmp_path / "i.npz", x="pixels", y="target")
    assert d.kind == "image" and d.x.shape == (6, 1, 5, 5)
    np.testing.assert_array_equal(d.x[:, 0], imgs)


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_table_features_round_trip(tmp_path, suffix, delimiter):
    path = write_csv(tmp_path / f"d{suffix}", ["a", "b", "c", "label"], feature_rows(), delimiter)
    d = load_dataset(path)
    assert d.feature_names == ("a", "b", "c") and d.kind == "features"
    np.testing.assert_array_equal(d.x, X)
    assert d.labels.tolist() == NAMES.tolist()
    only = load_dataset(path, x=["c", "a"])
    np.testing.assert_array_equal(only.x, X[:, [2, 0]])


def test_csv_text_column_and_integer_labels(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["body", "queue"], [["refund please", "2"], ["login broken", "10"]])
    d = load_dataset(path, text="body", label="queue")
    assert d.kind == "text" and d.texts == ["refund please", "login broken"] and d.x is None
    assert d.y.tolist() == [2, 10] and d.labels.tolist() == [2, 10]
    kept = write_csv(tmp_path / "k.csv", ["body", "label"], [["a", "007"], ["b", "0.5"]])
    assert load_dataset(kept, text="body").labels.tolist() == ["007", "0.5"]  # not numbers: kept as written


def test_jsonl_vectors_and_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"v": [float(a) for a in row], "w": 1, "label": lab})
                              for row, lab in zip(X, NAMES)) + "\n\n")
    d = load_dataset(path)
    np.testing.assert_array_equal(d.x, np.concatenate([X, np.ones((12, 1), np.float32)], axis=1))
    assert d.feature_names == ("v", "w") and d.labels.tolist() == NAMES.tolist()
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": 3}\n')
    t = load_dataset(texts, text="text")
    assert t.texts == ["a b", "c d"] and t.classes == ("3", "x") and t.labels.tolist() == ["x", "3"]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "label": NAMES.tolist()})
    pq.write_table(table, tmp_path / "d.parquet")
    d = load_dataset(tmp_path / "d.parquet")
    np.testing.assert_array_equal(d.x, X)
    assert d.labels.tolist() == NAMES.tolist()


def test_hugging_face_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"text": ["awful"], "label": [0]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    d = load_dataset(tmp_path / "hf", text="text")
    assert d.texts == ["good", "bad", "fine"] and d.labels.tolist() == ["pos", "neg", "pos"]
    assert d.texts_test == ["awful"] and [d.classes[c] for c in d.y_test] == ["neg"]
    datasets.Dataset.from_dict({"a": [1.0, 2.0], "b": [[1, 2], [3, 4]], "label": ["x", "y"]}).save_to_disk(
        str(tmp_path / "flat"))
    f = load_dataset(tmp_path / "flat")
    np.testing.assert_array_equal(f.x, [[1, 1, 2], [2, 3, 4]])


def _image_folder(root, sizes=None, mode="L"):
    from PIL import Image

    arrays = {}
    for c, cls in enumerate(("ant", "bee")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            h, w = sizes[2 * c + i] if sizes else (6, 4)
            arr = RNG.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(root / cls / f"{i}.png")
            arrays[(cls, i)] = arr
    return arrays


def test_image_folder_round_trip_and_sizes(tmp_path):
    arrays = _image_folder(tmp_path / "imgs")
    d = load_dataset(tmp_path / "imgs")
    assert d.kind == "image" and d.x.shape == (4, 1, 6, 4) and d.classes == ("ant", "bee")
    assert d.y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(d.x[2, 0], arrays[("bee", 0)] / 255.0, atol=1e-7)
    _image_folder(tmp_path / "mixed", sizes=[(6, 4), (6, 4), (8, 8), (6, 4)], mode="RGB")
    with pytest.raises(DataFormatError, match=r"must all have one size .*--image-size.* 8x8 .*bee"):
        load_dataset(tmp_path / "mixed")
    r = load_dataset(tmp_path / "mixed", image_size=(5, 7))
    assert r.x.shape == (4, 3, 5, 7) and 0 <= r.x.min() and r.x.max() <= 1


def test_split_is_stratified_and_disjoint():
    d = UserData(source="s", path="s", kind="features", x=np.zeros((30, 1), np.float32), texts=None,
                 y=np.repeat([0, 1, 2], 10), classes=(0, 1, 2))
    train, test = d.split(0.2, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(30))
    assert np.bincount(d.y[test]).tolist() == [2, 2, 2]


# ------------------------------------------------------------------------------------ messages


def test_missing_label_column_names_the_file_and_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "b", "queue"], [["1", "2", "x"]])
    with pytest.raises(DataFormatError, match=r"'.*d.csv' has no column 'label' .*--label-column.*'a', 'b', 'queue'"):
        load_dataset(path)
    with pytest.raises(DataFormatError, match=r"has no column 'body' \(the text column.*'a', 'b', 'queue'"):
        load_dataset(path, text="body", y="queue")
    with pytest.raises(DataFormatError, match=r"has no column 'z' \(the x column"):
        load_dataset(path, x=["a", "z"], y="queue")


def test_ragged_rows_name_their_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b,label\n1,2,x\n3,y\n")
    with pytest.raises(DataFormatError, match=r"r.csv', line 3: 2 field\(s\) where the header has 3 .*ragged"):
        load_dataset(path)
    j = tmp_path / "r.jsonl"
    j.write_text('{"v": [1, 2], "label": "x"}\n{"v": [1], "label": "y"}\n')
    with pytest.raises(DataFormatError, match=r"r.jsonl', line 2: the feature column 'v' holds 1 value.*ragged"):
        load_dataset(j)
    k = tmp_path / "k.jsonl"
    k.write_text('{"a": 1, "label": "x"}\n{"b": 1, "label": "y"}\n')
    with pytest.raises(DataFormatError, match=r"k.jsonl', line 2: no key 'a' \(a feature column: every column but "
                                              r"the label .*--feature-columns.*\). This row's keys are: 'b', 'label'"):
        load_dataset(k)


def test_jsonl_rows_with_different_keys_load_when_the_used_keys_are_in_every_row(tmp_path):
    """JSONL rows may carry other keys (metadata in some rows only): the columns are their union, and only a row
    that lacks a used column (label, text, feature, input_ids) is refused, naming its line and its keys."""
    rows = [{"id": i, "text": f"t{i}", "v": [float(a) for a in row], "label": lab, **({"src": "web"} if i % 4 else {})}
            for i, (row, lab) in enumerate(zip(X, NAMES))]
    rows[5]["meta"] = {"checked": True}
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_dataset(path, text="text")
    assert t.texts == [f"t{i}" for i in range(12)] and t.labels.tolist() == NAMES.tolist()
    f = load_dataset(path, x=["v", "id"])
    np.testing.assert_array_equal(f.x, np.concatenate([X, np.arange(12, dtype=np.float32)[:, None]], axis=1))
    assert f.labels.tolist() == NAMES.tolist() and f.feature_names == ("v", "id")
    # the same rows without the metadata keys give the same data
    same = tmp_path / "same.jsonl"
    same.write_text("\n".join(json.dumps({k: r[k] for k in ("id", "text", "v", "label")}) for r in rows) + "\n")
    np.testing.assert_array_equal(load_dataset(same, x=["v", "id"]).x, f.x)
    assert load_dataset(same, text="text").texts == t.texts


@pytest.mark.parametrize("content,kwargs,match", [
    ('{"text": "a", "label": "x"}\n\n{"text": "b", "id": 3}\n', {"text": "text"},
     r"d.jsonl', line 3: no key 'label' \(the label column\). This row's keys are: 'text', 'id'\."),
    ('{"body": "a", "y": "x"}\n{"y": "z", "note": "n"}\n', {"text": "body", "y": "y"},
     r"d.jsonl', line 2: no key 'body' \(the text column\). This row's keys are: 'y', 'note'\."),
    ('{"a": 1, "b": 2, "label": 0}\n{"b": 2, "label": 1, "c": 5}\n', {"x": ["a", "b"]},
     r"d.jsonl', line 2: no key 'a' \(a feature column\). This row's keys are: 'b', 'label', 'c'\."),
    ('{"input_ids": [1, 2], "label": 0}\n{"label": 1, "text": "hi"}\n', {},
     r"d.jsonl', line 2: no key 'input_ids' \(the token ids column\). This row's keys are: 'label', 'text'\."),
])
def test_a_jsonl_row_without_a_used_key_names_its_line_and_its_keys(tmp_path, content, kwargs, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataFormatError, match=match):
        load_dataset(tmp_path / "d.jsonl", **kwargs)


def test_non_numeric_feature_names_column_and_line(tmp_path):
    path = write_csv(tmp_path / "n.csv", ["a", "color", "label"], [["1", "2", "x"], ["3", "red", "y"]])
    with pytest.raises(DataFormatError, match=r"n.csv', line 3: the feature column 'color' must hold numbers. "
                                              r"Got 'red'.*--text-column"):
        load_dataset(path)
    blank = write_csv(tmp_path / "b.csv", ["a", "label"], [["", "x"]])
    with pytest.raises(DataFormatError, match=r"b.csv', line 2: .*'a' must hold numbers. Got an empty field"):
        load_dataset(blank)


@pytest.mark.parametrize("name,content,match", [
    ("e.csv", "", r"e.csv' is empty: expected a header row"),
    ("h.csv", "a,label\n", r"h.csv' holds no examples"),
    ("e.jsonl", "\n\n", r"e.jsonl' holds no examples"),
    ("t.npz", "a,b\n1,2\n", r"t.npz' must be a .npz archive .* not a zip archive"),
    ("l.jsonl", '{"a": 1, "label": 0.5}\n', r"l.jsonl', line 1: the label must be an integer or a string .* 0.5"),
    ("m.csv", "a,label\n1,\n", r"m.csv', line 2: the label is empty"),
    ("j.jsonl", "[1, 2]\n", r"j.jsonl', line 1: expected a JSON object"),
])
def test_bad_files_name_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=match):
        load_dataset(tmp_path / name)


def test_untrusted_files(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([object(), 1], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataFormatError, match="pickle"):
        load_dataset(tmp_path / "o.npz")
    np.savez(tmp_path / "k.npz", x=X, y=CODES)
    with pytest.raises(DataFormatError, match=r"k.npz' must be at most 100 bytes"):
        load_dataset(tmp_path / "k.npz", max_bytes=100)
    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((1000, 100), np.float32), y=np.zeros(1000, np.int64))
    with pytest.raises(DataFormatError, match=r"z.npz' must hold at most 50,000 bytes of arrays"):
        load_dataset(tmp_path / "z.npz", max_bytes=50_000)
    with pytest.raises(DataFormatError, match=r"has no array 'pixels'.*'x', 'y'"):
        load_dataset(tmp_path / "k.npz", x="pixels")


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidParameterError, match=r"'path' parameter of load_dataset .* no such file"):
        load_dataset(tmp_path / "nope.csv")
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(InvalidParameterError, match=r"suffix '.xlsx' is none of these"):
        load_dataset(tmp_path / "d.xlsx")
    with pytest.raises(InvalidParameterError, match=r"'y' and 'label' parameters"):
        load_dataset(tmp_path / "d.xlsx", y="a", label="b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"one sub-folder of images"):
        load_dataset(tmp_path / "empty")


def test_embedding_texts_shows_progress_when_slow(monkeypatch, capsys):
    """embed_texts (the MiniLM path of text data) prints progress lines once it has run ~2 s."""
    import leanscale.core.progress as progress_module
    from leanscale.models import embed_texts

    clock = iter(range(0, 1000, 3))  # every reading of the clock is 3 s later
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.delenv("LEANSCALE_NO_PROGRESS", raising=False)

    class Lengths:
        def encode(self, batch):
            return [[float(len(t)), 1.0] for t in batch]

    out = embed_texts([f"text {i}" for i in range(10)], model=Lengths(), batch_size=2, normalize=False)
    assert out.shape == (10, 2) and out[0, 0] == 6.0
    err = capsys.readouterr().err
    assert "embed texts: 2/10 text" in err and "embed texts: 10/10 text (100%), done in" in err


# ------------------------------------------------------------------------------ token ids (#15)


def test_token_ids_stay_int64_in_npz_tables_and_datasets_folders(tmp_path):
    """An `input_ids` array or column is token ids: int64 (n, T), kind "tokens"; a tokenised datasets
    folder's attention_mask is not read as a feature."""
    import datasets

    ids = np.arange(24, dtype=np.int32).reshape(6, 4)
    np.savez(tmp_path / "t.npz", input_ids=ids, y=np.array(["a", "b"] * 3))
    d = load_dataset(tmp_path / "t.npz")
    assert d.kind == "tokens" and d.x.dtype == np.int64 and np.array_equal(d.x, ids) and d.classes == ("a", "b")
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * 4, "label": lab} for r, lab in zip(ids, "abcabc")]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = load_dataset(tmp_path / "t.jsonl")
    assert d.kind == "tokens" and np.array_equal(d.x, ids) and d.feature_names == ("input_ids",)
    assert d.classes[d.y[2]] == "c"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    d = load_dataset(tmp_path / "ds")
    assert d.kind == "tokens" and d.x.dtype == np.int64 and np.array_equal(d.x, ids)
    # features chosen by name still work beside token columns
    d = load_dataset(tmp_path / "t.jsonl", x="attention_mask")
    assert d.kind == "features" and d.x.dtype == np.float32


def test_bad_token_ids_name_the_file_and_the_row(tmp_path):
    np.savez(tmp_path / "f.npz", input_ids=np.ones((3, 2), dtype=np.float32), y=np.zeros(3))
    with pytest.raises(DataFormatError, match=r"'input_ids' of .*f.npz.* must hold token ids: .* Got dtype float32"):
        load_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "n.npz", input_ids=np.array([[1, 2], [3, -4]]), y=np.zeros(2))
    with pytest.raises(DataFormatError, match=r"token ids >= 0. Got -4 in row 1"):
        load_dataset(tmp_path / "n.npz")
    (tmp_path / "r.jsonl").write_text('{"input_ids": [1, 2], "label": 0}\n{"input_ids": [1], "label": 1}\n')
    with pytest.raises(DataFormatError, match=r"line 2: the token column 'input_ids' holds 1 token ids where the "
                                              r"first row holds 2: pad every row"):
        load_dataset(tmp_path / "r.jsonl")
    (tmp_path / "s.jsonl").write_text('{"input_ids": "1 2", "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"line 1: the token column 'input_ids' must hold lists of token ids"):
        load_dataset(tmp_path / "s.jsonl")
    (tmp_path / "f.jsonl").write_text('{"input_ids": [1, 2.5], "label": 0}\n')
    with pytest.raises(DataFormatError, match=r"must hold integer token ids >= 0. Got 2.5"):
        load_dataset(tmp_path / "f.jsonl")
