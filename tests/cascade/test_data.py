"""load_labelled_texts (WordNet, CSV, TSV, JSONL, parquet, datasets folders, all read by load_dataset; every
bad file is a clear error) and split_three (a deterministic partition, stratified, every class with >= 3
examples in every part)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from leanscale.cascade.data import load_labelled_texts, split_three
from leanscale.core.errors import DataFormatError, InvalidParameterError

# ------------------------------------------------------------------------------ load_labelled_texts


def test_csv_tsv_and_jsonl_give_the_same_examples(tmp_path):
    (tmp_path / "d.csv").write_text(
        '\ufeffid,body,queue\n1,"refund, please",billing\n\n2,"the app\ncrashed",tech\n3,price?, sales \n',
        encoding="utf-8")
    (tmp_path / "d.tsv").write_text("body\tqueue\nrefund, please\tbilling\n\"the app\ncrashed\"\ttech\nprice?\tsales\n")
    rows = [{"body": "refund, please", "queue": "billing", "extra": 1}, {"body": "the app\ncrashed", "queue": "tech"},
            {"body": "price?", "queue": "sales"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    for name in ("d.csv", "d.tsv", "d.jsonl"):
        texts, labels = load_labelled_texts(tmp_path / name, text_column="body", label_column="queue")
        assert texts == ["refund, please", "the app\ncrashed", "price?"], name
        assert labels.dtype == object and labels.tolist() == ["billing", "tech", "sales"], name


def test_parquet_and_datasets_folder_equal_the_csv(tmp_path):
    """The same examples in a CSV, a parquet file and a datasets folder (a DatasetDict: train then test, with
    a ClassLabel) give the same texts and string labels."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["refund, please", "the app\ncrashed", "price?", "login fails", "  spaced  "]
    queues = ["billing", "tech", "sales", "tech", "7"]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "queue", "id"])
        w.writerows([t, q, i] for i, (t, q) in enumerate(zip(texts, queues)))
    ref_texts, ref_labels = load_labelled_texts(tmp_path / "d.csv", text_column="body", label_column="queue")
    assert ref_texts == texts and ref_labels.tolist() == queues and ref_labels.dtype == object
    pq.write_table(pa.table({"id": list(range(5)), "body": texts, "queue": queues}), tmp_path / "d.parquet")
    names = ["7", "billing", "sales", "tech"]
    features = datasets.Features({"body": datasets.Value("string"), "queue": datasets.ClassLabel(names=names)})
    codes = [names.index(q) for q in queues]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": texts[:3], "queue": codes[:3]}, features=features),
        "test": datasets.Dataset.from_dict({"body": texts[3:], "queue": codes[3:]}, features=features),
    }).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"body": texts, "queue": queues}).save_to_disk(str(tmp_path / "flat"))
    for source in ("d.parquet", "dd", "flat"):
        got_texts, got_labels = load_labelled_texts(tmp_path / source, text_column="body", label_column="queue")
        assert got_texts == ref_texts, source
        assert got_labels.dtype == object and got_labels.tolist() == ref_labels.tolist(), source


def test_jsonl_rows_may_carry_different_keys(tmp_path):
    """Metadata keys in some rows only are fine; a row without the label is an error naming its line."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b", "label": "x", "meta": {"src": 1}}\n{"id": 7, "label": "y", "text": "c d"}\n'
                 '{"text": "e f", "label": "x"}\n')
    texts, labels = load_labelled_texts(p)
    assert texts == ["a b", "c d", "e f"] and labels.tolist() == ["x", "y", "x"]
    p.write_text('{"text": "a b", "label": "x"}\n\n{"text": "c d", "lable": "y", "id": 2}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl', line 3: no key 'label' \(the label column\)\. "
                                              r"This row's keys are: 'text', 'lable', 'id'"):
        load_labelled_texts(p)


def test_integer_labels_become_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b", "label": 1}\n{"text": "c d", "label": "2"}\n')
    _, labels = load_labelled_texts(str(p))
    assert labels.tolist() == ["1", "2"]


def test_wordnet_glosses_with_lexicographer_names():
    texts, labels = load_labelled_texts("wordnet")
    assert len(texts) == len(labels) == 117_659
    assert len(set(labels.tolist())) == 45 and "noun.animal" in set(labels.tolist())
    assert all(isinstance(t, str) for t in texts[:100])


@pytest.mark.parametrize("name,content,message", [  # load_dataset's messages (#15: one data layer)
    ("d.csv", "text,category\nhello,a\n", ("d.csv' has no column 'label' (the label column: label= in Python, "
                                           "--label-column on the command line). Its columns are: 'text', 'category'")),
    ("d.tsv", "label\ttxt\nx\thello\n", "has no column 'text' (the text column"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n',
     "d.jsonl', line 3: no key 'label' (the label column). This row's keys are: 'text'"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "a", "label": \n', "d.jsonl', line 2: not valid JSON"),
    ("d.jsonl", '["a", "x"]\n', "line 1: expected a JSON object"),
    ("d.jsonl", '{"text": 3, "label": "x"}\n', "line 1: the text column 'text' must hold strings. Got int 3"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', "line 1: the label must be an integer or a string (a class). Got 1.5"),
    ("d.jsonl", '{"text": "a", "label": true}\n', "must be an integer or a string. Got True"),
    ("d.csv", "text,label\nhello,a\nbye,b,extra\n", "d.csv', line 3: 3 field(s) where the header has 2"),
    ("d.csv", "text,label\nhello,\n", "line 2: the label is empty"),
    ("d.csv", "text,label\n  ,a\n", "line 2: the text column 'text' is empty"),
    ("d.csv", "", "d.csv' is empty"),
    ("d.csv", "text,label\n\n", "d.csv' holds no examples"),
    ("d.jsonl", "\n\n", "d.jsonl' holds no examples"),
])
def test_bad_files_name_file_line_and_column(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError) as info:
        load_labelled_texts(tmp_path / name)
    assert message in str(info.value)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\nok,a\nbad \xff,b\n")
    with pytest.raises(DataFormatError, match=r"d\.csv', line 3: not valid UTF-8"):
        load_labelled_texts(p)


@pytest.mark.parametrize("source,kwargs,message", [
    ("data.txt", {}, "suffix '.txt' is not one of .csv, .jsonl, .ndjson, .parquet, .pq, .tsv"),
    ("missing.csv", {}, "no such file"),
    (".", {}, "suffix '(none)'"),
    ("d.csv", {"text_column": ""}, "The 'text_column' parameter of load_labelled_texts must be a non-empty string"),
    ("d.csv", {"text_column": "x", "label_column": "x"}, "must differ"),
    (3, {}, "Got int 3 instead"),
])
def test_bad_sources(tmp_path, monkeypatch, source, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidParameterError) as info:
        load_labelled_texts(source, **kwargs)
    assert message in str(info.value)


def test_a_folder_named_like_a_file_is_refused(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InvalidParameterError, match="a folder"):
        load_labelled_texts(tmp_path / "dir.csv")


# ----------------------------------------------------------------------------------- split_three


def _check_partition(parts, n):
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_unstratified_sizes_and_determinism():
    parts = split_three(1000, seed=3)
    _check_partition(parts, 1000)
    assert [len(p) for p in parts] == [600, 200, 200]
    again = split_three(1000, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_three(1000, seed=4)
    assert not np.array_equal(parts[2], other[2])
    assert [len(p) for p in split_three(11, (0.5, 0.25, 0.25))] == [5, 3, 3]  # largest remainders


def test_stratified_keeps_class_proportions():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c", "d"], p=[0.55, 0.3, 0.1, 0.05], size=2000)
    parts = split_three(len(labels), seed=1, labels=labels)
    _check_partition(parts, len(labels))
    assert [len(p) for p in parts] == [1200, 400, 400]
    for c in "abcd":
        share = np.mean(labels == c)
        for p in parts:
            assert abs(np.mean(labels[p] == c) - share) < 0.004  # rounding of at most one item per class and part


@pytest.mark.parametrize("seed", range(8))
def test_every_class_with_three_examples_is_in_every_part(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=30)
    labels = np.repeat(np.arange(30), counts)
    rng.shuffle(labels)
    fractions = [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (0.34, 0.33, 0.33)][seed % 3]
    parts = split_three(len(labels), fractions, seed=seed, labels=labels)
    _check_partition(parts, len(labels))
    for c in np.flatnonzero(counts >= 3):
        assert all((labels[p] == c).any() for p in parts), (c, counts[c])
    if fractions == (0.6, 0.2, 0.2):  # room for one item of each class in every part: exact sizes
        assert [len(p) for p in parts] == [len(p) for p in split_three(len(labels), fractions)]


def test_many_tiny_classes_win_over_the_sizes():
    labels = np.repeat([f"c{i}" for i in range(40)], 3)  # 120 items, 40 classes of 3
    parts = split_three(len(labels), (0.9, 0.05, 0.05), labels=labels)
    _check_partition(parts, 120)
    assert [len(p) for p in parts] == [40, 40, 40]
    assert all(len(set(labels[p].tolist())) == 40 for p in parts)


def test_mixed_type_labels_are_fine():
    labels = np.array([1, "1", 2, "a"] * 6, dtype=object)
    _check_partition(split_three(24, labels=labels), 24)


@pytest.mark.parametrize("kwargs,message", [
    ({"n": 2}, "The 'n' parameter of split_three must be an int in the range [3, inf)"),
    ({"n": 10, "fractions": (0.5, 0.5)}, "The 'fractions' parameter of split_three must be three positive numbers"),
    ({"n": 10, "fractions": (0.6, 0.3, 0.2)}, "summing to 1"),
    ({"n": 10, "fractions": (1.0, 0.0, 0.0)}, "three positive numbers"),
    ({"n": 10, "fractions": "abc"}, "three positive numbers"),
    ({"n": 10, "fractions": (0.96, 0.02, 0.02)}, "leaves the calibration part empty for n=10"),
    ({"n": 10, "labels": [0, 1]}, "The 'labels' parameter of split_three must be a 1-d sequence of length n=10"),
    ({"n": 10, "seed": -1}, "The 'seed' parameter of split_three"),
])
def test_split_bad_input(kwargs, message):
    with pytest.raises(InvalidParameterError) as info:
        split_three(**kwargs)
    assert message in str(info.value)
