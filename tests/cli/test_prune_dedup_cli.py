"""`leanscale prune dedup` end to end from a temporary folder, and its refusals (exit 2, a clear message)."""

import csv
import json

import numpy as np
import pytest

from leanscale.cli.main import main


def _docs(seed=0, n=30):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(2000)]
    base = [" ".join(rng.choice(vocab, 30)) for _ in range(n)]
    near = [b.replace(b.split()[10], "changed", 1) for b in base[:5]]  # one word changed: Jaccard ~0.8
    exact = [base[7].upper(), "  " + base[8]]
    return base + near + exact  # rows 30-34 near duplicates of 0-4, 35 and 36 exact of 7 and 8


def _manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_exact_and_minhash_writes_kept_rows_manifest_and_summary(tmp_path, capsys):
    docs = _docs()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    out = tmp_path / "out"
    assert main(["prune", "dedup", "--data", str(data), "--method", "exact,minhash", "--threshold", "0.7",
                 "--shingle-size", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 30 of 37 rows (7 removed" in printed and "exact: 2 of 37" in printed and "minhash: 5 of 35" in printed
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == list(range(30))  # the rows as they were, in order
    assert np.load(out / "kept.npy", allow_pickle=False).tolist() == list(range(30))
    rows = _manifest(out / "manifest.jsonl")
    assert [(r["index"], r["duplicate_of"], r["method"]) for r in rows] == (
        [(30 + i, i, "minhash") for i in range(5)] + [(35, 7, "exact"), (36, 8, "exact")])
    assert all(0.7 <= r["similarity"] < 1 for r in rows[:5]) and rows[5]["similarity"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_kept"] == 30 and summary["removed_by_method"] == {"exact": 2, "minhash": 5}
    assert summary["settings"]["threshold"] == 0.7 and summary["data"]["text_column"] == "text"


def test_csv_text_column_semantic_with_given_embeddings_and_json(tmp_path, capsys):
    data = tmp_path / "t.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["body", "label"])
        w.writerows([["a, quoted", "x"], ["b", "y"], ["c", "x"], ["d", "y"]])
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.999, 0.01], [0.6, 0.8]])
    np.save(tmp_path / "e.npy", emb)
    out = tmp_path / "o"
    assert main(["prune", "dedup", "--data", str(data), "--text-column", "body", "--method", "semantic",
                 "--embeddings", str(tmp_path / "e.npy"), "--eps", "0.01", "--n-clusters", "1", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_kept"] == 3 and summary["removed_by_method"] == {"semantic": 1}
    with open(out / "kept.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [["body", "label"], ["a, quoted", "x"], ["b", "y"], ["d", "y"]]
    (rec,) = _manifest(out / "manifest.jsonl")
    assert rec["index"] == 2 and rec["duplicate_of"] == 0 and rec["method"] == "semantic"
    assert rec["similarity"] == pytest.approx(0.999 / np.hypot(0.999, 0.01), abs=1e-6)


def test_txt_one_item_per_line(tmp_path, capsys):
    data = tmp_path / "lines.txt"
    data.write_text("Hello world\n\nhello   WORLD\nsomething else\n")
    assert main(["prune", "dedup", "--data", str(data), "--method", "exact", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "kept.txt").read_text() == "Hello world\nsomething else\n"
    assert main(["prune", "dedup", "--data", str(data), "--method", "exact", "--normalize", "none",
                 "--out", str(tmp_path / "raw")]) == 0
    assert (tmp_path / "raw" / "kept.txt").read_text().count("\n") == 3


@pytest.mark.parametrize("extra, message", [
    (["--method", "fuzzy"], "'--method' parameter of leanscale prune dedup must be one of 'exact', 'minhash'"),
    (["--threshold", "1.5"], "'--threshold' parameter of leanscale prune dedup must be a float in the range"),
    (["--shingle", "line"], "'--shingle' parameter of leanscale prune dedup"),
    (["--num-perm", "1"], "'--num-perm' parameter of leanscale prune dedup"),
    (["--normalize", "nfkd"], "'--normalize' parameter of leanscale prune dedup"),
    (["--text-column", "body"], "no key 'body'"),
    (["--method", "semantic", "--embeddings", "missing.npy"], "embeddings file (--embeddings)"),
])
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n')
    assert main(["prune", "dedup", "--data", "d.jsonl", *extra, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_data_files_exit_2(tmp_path, capsys):
    cases = [("missing.jsonl", None, "'--data' parameter of leanscale prune dedup must be an existing file"),
             ("x.parquet", "", "must be a .jsonl, .ndjson, .csv, .tsv, .txt file"),
             ("bad.jsonl", '{"text": "ok"}\n{"text": 3}\n', "line 2: the text column 'text' must hold a string"),
             ("nocol.csv", "a,b\n1,2\n", "has no column 'text'"),
             ("lines.txt", "a\n", "'--text-column' parameter of leanscale prune dedup is for .jsonl")]
    (tmp_path / "a_file").write_text("a file where the output folder should go")
    (tmp_path / "ok.txt").write_text("a\nb\n")
    assert main(["prune", "dedup", "--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "a_file")]) == 2
    assert "'--out' parameter of leanscale prune dedup must be a folder" in capsys.readouterr().err
    for name, content, message in cases:
        if content is not None:
            (tmp_path / name).write_text(content)
        extra = ["--text-column", "t"] if name == "lines.txt" else []
        assert main(["prune", "dedup", "--data", str(tmp_path / name), *extra, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
