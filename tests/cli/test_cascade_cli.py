"""`leanscale cascade fit|eval|serve` on small synthetic ticket data (rules and TF-IDF only, declared
costs: fast and deterministic), and every bad input as a clean error."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random

import numpy as np
import pytest

from leanscale.cascade import Cascade
from leanscale.cascade.data import load_labelled_texts
from leanscale.cli import serve as serve_cli
from leanscale.cli.main import build_parser, main
from leanscale.core.errors import InvalidParameterError

KEYWORDS = {"billing": ["refund", "invoice"], "tech": ["crash", "error"], "sales": ["price", "quote"]}
FILLER = ["please", "help", "me", "with", "my", "account", "today", "thanks", "the", "of", "this", "that", "order",
          "service", "team", "now"]
COSTS = "rules=0.001,tfidf=0.05"


def make_rows(n=600, seed=0, noise=0.05):
    """Label i % 3; 85% of the texts hold one of the label's two keywords; 5% of the labels are random."""
    rng = random.Random(seed)
    labels = list(KEYWORDS)
    rows = []
    for i in range(n):
        lab = labels[i % 3]
        words = rng.sample(FILLER, 5)
        if rng.random() < 0.85:
            words.insert(rng.randrange(6), rng.choice(KEYWORDS[lab]))
        if rng.random() < noise:
            lab = rng.choice(labels)
        rows.append((" ".join(words), lab))
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body", "queue"])
        for i, (t, lab) in enumerate(rows):
            w.writerow([i, t, lab])
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade_cli")
    rows = make_rows()
    return {"root": root, "rows": rows, "csv": write_csv(root / "tickets.csv", rows),
            "jsonl": write_jsonl(root / "tickets.jsonl", rows)}


CSV_COLUMNS = ["--text-column", "body", "--label-column", "queue"]


@pytest.fixture(scope="module")
def fitted(data):
    """One fit on the CSV, shared by the tests that only read its outputs."""
    out = data["root"] / "csv_cascade.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["cascade", "fit", "--data", str(data["csv"]), *CSV_COLUMNS, "--stages", "rules,tfidf",
                   "--costs", COSTS, "--min-precision", "0.8", "--out", str(out)])
    return {"rc": rc, "out": buf.getvalue(), "path": out, "eval": data["root"] / "csv_cascade.eval.json"}


def test_fit_csv_prints_explain_and_the_test_summary(fitted):
    assert fitted["rc"] == 0
    out = fitted["out"]
    assert "600 examples, 3 labels; train 360 / calibration 120 / test 120" in out
    assert "rule(s) mined" in out and "Cascade of 2 stages" in out  # explain()
    assert "test split: 120 examples" in out and "tfidf alone: accuracy" in out and "x cheaper" in out
    assert "frontier:" in out and "(exact)" in out


def test_saved_cascade_loads_predicts_and_matches_the_eval_json(fitted, data):
    cascade = Cascade.load(fitted["path"])
    assert [s.name for s in cascade.stages] == ["rules", "tfidf"]
    assert cascade.costs_ == {"rules": 0.001, "tfidf": 0.05}  # declared, not measured
    assert cascade.predict(["I want a refund now", "the app shows an error"]).tolist() == ["billing", "tech"]

    doc = json.loads(fitted["eval"].read_text())
    idx = doc["indices"]
    assert sorted(idx["train"] + idx["calibration"] + idx["test"]) == list(range(600))
    assert (len(idx["train"]), len(idx["calibration"]), len(idx["test"])) == (360, 120, 120)
    texts, y = load_labelled_texts(data["csv"], text_column="body", label_column="queue")
    te = idx["test"]
    out = cascade.predict_detailed([texts[i] for i in te])
    acc = float(np.mean(out.labels == y[te]))
    assert doc["test"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert doc["test"]["accuracy"] > 0.75  # keywords decide 85% of the labels
    assert doc["test"]["stages"]["rules"]["fraction"] == pytest.approx(float(np.mean(out.stage == "rules")))
    assert doc["test"]["mean_cost"] == pytest.approx(float(out.cost.mean()))
    assert doc["test"]["speedup_vs_last_stage"] == pytest.approx(0.05 / float(out.cost.mean()))
    assert doc["data"]["n_examples"] == 600 and doc["stages"] == ["rules", "tfidf"]


def test_eval_uses_the_recorded_test_split_of_the_same_data(fitted, data, capsys):
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(data["csv"]), *CSV_COLUMNS]) == 0
    out = capsys.readouterr().out
    assert "the test split recorded in csv_cascade.eval.json" in out
    assert "evaluation: 120 examples" in out and "accuracy" in out and "mean cost" in out and "frontier:" in out
    recorded = json.loads(fitted["eval"].read_text())["test"]
    # the JSONL holds the same examples: recognised by content, same split, same numbers
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(data["jsonl"]), "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["n"] == 120 and blob["accuracy"] == recorded["accuracy"]
    assert blob["stages"]["rules"]["fraction"] == recorded["stages"]["rules"]["fraction"]
    assert blob["frontier"] == recorded["frontier"]
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(data["jsonl"]), "--json", "--all"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 600


def test_eval_on_new_data_uses_every_example(fitted, data, capsys):
    new = write_jsonl(data["root"] / "new.jsonl", make_rows(n=45, seed=7))
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(new)]) == 0
    out = capsys.readouterr().out
    assert "not the ones recorded" in out and "evaluation: 45 examples" in out


def test_fit_jsonl_with_a_budget_gives_the_same_split(fitted, data, capsys):
    out = data["root"] / "budget.json"
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "rules,tfidf", "--costs", COSTS,
                 "--min-precision", "0.8", "--budget", "0.03", "--out", str(out)]) == 0
    cascade = Cascade.load(out)
    assert cascade.expected_cost_ <= 0.03 + 1e-12
    assert cascade.thresholds_["rules"] is not None  # the budget cannot pay for TF-IDF on everything
    a = json.loads((data["root"] / "budget.eval.json").read_text())["indices"]
    b = json.loads(fitted["eval"].read_text())["indices"]
    assert a == b  # the same examples and seed give the same split, whatever the file format


def test_guarantee_is_certified_and_explained(data, capsys):
    out = data["root"] / "guaranteed.json"
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "tfidf", "--target-accuracy", "0.6",
                 "--guarantee", "--delta", "0.1", "--calibrate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "guarantee: accuracy >= 0.6 with probability >= 0.900" in text
    cascade = Cascade.load(out)
    assert cascade.guarantee_["n_certified"] >= 1 and "tfidf" in cascade.temperatures_
    assert cascade.costs_["tfidf"] > 0  # measured when not declared


def test_rules_stage_is_skipped_with_a_note_when_no_rule_passes(data, capsys):
    out = data["root"] / "norules.json"
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "rules,tfidf", "--min-precision", "1",
                 "--out", str(out)]) == 0
    assert "rules: no keyword rule reached precision 1.0" in capsys.readouterr().out
    assert [s.name for s in Cascade.load(out).stages] == ["tfidf"]
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "rules", "--min-precision", "1",
                 "--out", str(out)]) == 2
    assert "left no stage to run" in capsys.readouterr().err


def test_learned_deferral_is_fit_saved_and_used_after_load(data, capsys):
    """`--deferral learned` reaches the Cascade, the saved file keeps the deferral models, and the
    loaded cascade routes exactly as the fitted one did (the eval JSON written at fit time)."""
    out = data["root"] / "learned.json"
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "rules,tfidf", "--costs", COSTS,
                 "--min-precision", "0.8", "--deferral", "learned", "--out", str(out)]) == 0
    capsys.readouterr()
    cascade = Cascade.load(out)
    assert cascade.deferral == "learned" and cascade.deferral_
    doc = json.loads(out.with_name("learned.eval.json").read_text())
    assert doc["settings"]["deferral"] == "learned"
    texts = [t for t, _ in data["rows"]]
    y = np.array([lab for _, lab in data["rows"]], dtype=object)
    te = doc["indices"]["test"]
    routed = cascade.predict_detailed([texts[i] for i in te])
    assert doc["test"]["accuracy"] == pytest.approx(float(np.mean(routed.labels == y[te])), abs=1e-12)
    assert doc["test"]["mean_cost"] == pytest.approx(float(routed.cost.mean()))
    assert main(["cascade", "eval", str(out), "--data", str(data["jsonl"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == doc["test"]["accuracy"]


@pytest.mark.parametrize("extra,message", [
    (["--stages", "rules,bert"], ("The '--stages' parameter of leanscale cascade fit must be one of 'minilm', "
                                  "'rules', 'tfidf'. Got 'bert' instead.")),
    (["--stages", "tfidf,tfidf"], "repeats tfidf"),
    (["--stages", "tfidf", "--costs", "rules=1"], "The '--costs' parameter of leanscale cascade fit must be one of 'tfidf'"),
    (["--stages", "tfidf", "--costs", "tfidf=-1"], "must look like 'rules=0.001,tfidf=0.05'"),
    (["--stages", "tfidf", "--target-accuracy", "0.999", "--costs", "tfidf=1"],
     "no combination of stages reaches it on the calibration data: the best reachable accuracy is"),
    (["--stages", "tfidf", "--guarantee"], "'--guarantee' parameter of leanscale cascade fit needs --target-accuracy"),
    (["--stages", "tfidf", "--target-accuracy", "0.6", "--guarantee", "--deferral", "learned"],
     "'--deferral' parameter of leanscale cascade fit must be 'confidence' with --guarantee"),
    (["--stages", "tfidf", "--target-accuracy", "1.5"], "'--target-accuracy' parameter of leanscale cascade fit"),
    (["--stages", "tfidf", "--max-examples", "2"], "'--max-examples' parameter of leanscale cascade fit"),
])
def test_fit_bad_options(data, extra, message, capsys):
    rc = main(["cascade", "fit", "--data", str(data["jsonl"]), *extra, "--out", str(data["root"] / "bad.json")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_fit_bad_data_files(data, capsys):
    out = str(data["root"] / "bad.json")
    assert main(["cascade", "fit", "--data", str(data["csv"]), "--text-column", "body", "--out", out]) == 2
    err = capsys.readouterr().err
    # the messages of leanscale.data.load_dataset, the same for every command
    assert "tickets.csv' has no column 'label'" in err and "'body', 'queue'" in err and "--label-column" in err
    empty = data["root"] / "empty.csv"
    empty.write_text("")
    assert main(["cascade", "fit", "--data", str(empty), "--out", out]) == 2
    assert "empty.csv' is empty" in capsys.readouterr().err
    header_only = data["root"] / "header.csv"
    header_only.write_text("text,label\n")
    assert main(["cascade", "fit", "--data", str(header_only), "--out", out]) == 2
    assert "header.csv' holds no examples" in capsys.readouterr().err
    one = write_jsonl(data["root"] / "one_label.jsonl", [("a b c", "x")] * 20)
    assert main(["cascade", "fit", "--data", str(one), "--out", out]) == 2
    assert "at least 2 labels" in capsys.readouterr().err
    assert main(["cascade", "fit", "--data", "tickets.xlsx", "--out", out]) == 2
    assert "The '--data' parameter of leanscale cascade fit must be one of 'wordnet' or an existing file" in \
        capsys.readouterr().err


def test_both_target_and_budget_is_a_usage_error(data, capsys):
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--target-accuracy", "0.8", "--budget", "1",
                 "--out", str(data["root"] / "x.json")]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_of_a_missing_cascade_is_a_clean_error(data, capsys):
    assert main(["cascade", "eval", str(data["root"] / "nope.json"), "--data", str(data["jsonl"])]) == 2
    err = capsys.readouterr().err
    assert "The cascade file" in err and "nope.json' does not exist" in err and "Traceback" not in err


def test_serve_reuses_leanscale_serve(capsys):
    assert main(["cascade", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "leanscale cascade serve" in out and "--max-wait-ms" in out and "--objects" in out
    args = build_parser().parse_args(["cascade", "serve", "c.json", "--port", "9001", "--max-batch", "8"])
    assert args.action_func is serve_cli.run and (args.cascade, args.port, args.max_batch) == ("c.json", 9001, 8)


def test_cascade_without_action_prints_help_and_fails(capsys):
    assert main(["cascade"]) == 2
    err = capsys.readouterr().err
    assert "fit" in err and "eval" in err and "serve" in err and "examples:" in err
    assert main(["cascade", "--help"]) == 0
    assert "leanscale cascade fit --data wordnet --out cascade.json" in capsys.readouterr().out


# ------------------------------------------------------------------ issue #13: nothing silently wrong


def test_eval_refuses_a_split_left_by_an_interrupted_fit(data, capsys, monkeypatch):
    """A kill after the new cascade JSON but before its eval.json used to pair the new model with
    the old test split (examples it was trained on); eval now refuses, naming both files."""
    out = data["root"] / "interrupted.json"
    args = ["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "tfidf", "--costs", "tfidf=1", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((data["root"] / "interrupted.eval.json").read_text())["cascade_sha256"]
    capsys.readouterr()
    import leanscale.core.io as core_io

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between the cascade JSON and its eval.json

    monkeypatch.setattr(core_io, "atomic_write_json", killed)
    assert main(args[:-2] + ["--seed", "1", "--out", str(out)]) != 0
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["cascade", "eval", str(out), "--data", str(data["jsonl"])]) == 2
    err = capsys.readouterr().err
    assert "interrupted.eval.json' belongs to another save of" in err and "--all" in err and "Traceback" not in err
    assert main(["cascade", "eval", str(out), "--data", str(data["jsonl"]), "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 600


def test_eval_warns_about_labels_the_cascade_never_saw(fitted, data, capsys):
    rows = make_rows(n=30, seed=3)
    rows = [(t, "refunds" if i % 3 == 0 else lab) for i, (t, lab) in enumerate(rows)]  # 10 of 30 unseen
    path = write_jsonl(data["root"] / "unseen.jsonl", rows)
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(path)]) == 0
    cap = capsys.readouterr()
    assert "WARNING: 10 of 30 examples (33.3%) have labels the cascade never saw" in cap.out
    assert "'refunds'" in cap.out and "WARNING" in cap.err
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(path), "--json"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert any("10 of 30 examples" in w and "'refunds'" in w for w in blob["warnings"])
    # none of the labels known: not an accuracy of 0.0000 with exit 0, but a clear error
    other = write_jsonl(data["root"] / "other_labels.jsonl", [(t, f"x{i % 2}") for i, (t, _) in enumerate(rows)])
    assert main(["cascade", "eval", str(fitted["path"]), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds no label the cascade knows" in err and "'x0', 'x1'" in err and "--label-column" in err


def test_fit_out_naming_a_folder_is_a_clean_error(data, capsys):
    folder = data["root"] / "folder.json"
    folder.mkdir()
    assert main(["cascade", "fit", "--data", str(data["jsonl"]), "--stages", "tfidf", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "'--out' parameter of leanscale cascade fit" in err and "is a folder" in err and "Traceback" not in err


def test_evaluate_counts_and_reports_requests_no_stage_answered():
    """A request no stage answered is counted as wrong AND reported (not a silent 'accuracy 0.5')."""
    from leanscale.cascade import Cascade, RuleStage
    from leanscale.cascade.evaluation import evaluate_cascade as evaluate

    # the last stage answers "refund" texts and abstains on everything else
    stage = RuleStage(lambda t: "refund" if "refund" in t else None, name="rules", cost=1.0)
    cascade = Cascade([stage]).fit(["refund me", "refund now", "hello", "refund pls"],
                                   ["refund", "refund", "other", "refund"])
    summary = evaluate(cascade, ["refund a", "hi there", "hello", "refund b"], ["refund", "other", "other", "refund"])
    assert summary["accuracy"] == 0.5
    assert summary["unanswered"] == 2
    assert any("2 of 4 requests got no answer from any stage" in w for w in summary["warnings"])


def test_the_cli_default_stages_are_the_apis():
    """The CLI writes the stage names out once (its module imports nothing heavy at start-up); the
    names themselves are checked by the API's check, so the two cannot disagree on what is valid."""
    from leanscale.cascade import evaluation
    from leanscale.cli import cascade as cascade_cli

    assert cascade_cli.DEFAULT_STAGES == ",".join(evaluation.TEXT_STAGES)
    assert not hasattr(cascade_cli, "VALID_STAGES") and not hasattr(cascade_cli, "MIN_EXAMPLES")


@pytest.mark.parametrize("text, message", [
    (",", r"The '--stages' parameter of leanscale cascade fit must name at least one of rules, tfidf, minilm\. Got ','"),
    ("rules,bert", r"'--stages'.*bert"),
    ("rules,tfidf,rules", r"The '--stages' parameter of leanscale cascade fit repeats rules\. Got 'rules,tfidf,rules'"),
])
def test_stage_names_are_checked_by_the_api_with_the_flag_named(text, message):
    from leanscale.cli.cascade import _parse_stages

    with pytest.raises(InvalidParameterError, match=message):
        _parse_stages(text)
    assert _parse_stages(" tfidf , rules ") == ["tfidf", "rules"]
