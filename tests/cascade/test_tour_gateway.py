"""The cascade chapter's LLM gateway section (leanscale.cascade.tour.gateway_section): the gateway
served for real in front of two fake backends replaying Mixtral's and GPT-4's recorded GSM8K
answers; its table is checked against the CSV itself, and the section is skipped with its reason
when the data are missing."""

from __future__ import annotations

import csv
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

import leanscale.cascade.tour as tour
from leanscale.core.errors import DataFormatError
from leanscale.core.ledger import CostLedger
from leanscale.report.chapter import TourContext
from leanscale.report.html import HTMLReport

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def _csv() -> Path:
    found = [p for p in tour.gsm8k_candidates() if p.is_file()]
    assert found, f"the RouteLLM GSM8K file is expected at one of {tour.gsm8k_candidates()}"
    return found[0]


def _reference(path: Path, n_train: int, n_test: int, seed: int) -> dict:
    """Accuracy and cost per request of always-small / always-big on the test split, from the CSV
    read here with the csv module (words as tokens, the tour's prices)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    test = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:n_test]]
    out = {}
    for model, col in (("small", WEAK), ("big", STRONG)):
        pin, pout = tour.GATEWAY_PRICES[model]
        out[model] = {
            "accuracy": float(np.mean([r[col] == "True" for r in test])),
            "cost": float(np.mean([(len(r["prompt"].split()) * pin + len(r[col + "_response"].split()) * pout) / 1000
                                   for r in test])),
        }
    return out


def _ctx(tmp_path, quick=True, ledger=None) -> TourContext:
    return TourContext(out_dir=tmp_path, quick=quick, seed=0, report=HTMLReport("t"), ledger=ledger, echo=False)


def _port_closed(url: str) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", urlsplit(url).port)) != 0


def test_quick_section_table_matches_the_csv(tmp_path, monkeypatch):
    got = {}
    real = tour.gateway_comparison

    def keep(*args, **kwargs):
        got.update(real(*args, **kwargs))
        return got

    monkeypatch.setattr(tour, "gateway_comparison", keep)
    threads = {t.ident for t in threading.enumerate()}
    ctx = _ctx(tmp_path, ledger=CostLedger())
    summary = tour.gateway_section(ctx)

    ref = _reference(_csv(), got["n_train"], got["n_test"], seed=0)
    rows = {r["policy"]: r for r in got["rows"]}
    assert list(rows) == ["always-small", "always-big", "router, knob 0.2", "router, knob 0.5",
                          "cascade, threshold 0.5"]
    assert all(r["failed"] == 0 for r in got["rows"])
    for model in ("small", "big"):
        row = rows[f"always-{model}"]
        assert row["accuracy"] == pytest.approx(ref[model]["accuracy"], abs=1e-12)
        assert row["cost_per_request_usd"] == pytest.approx(ref[model]["cost"], rel=1e-9)
        assert row["big_share"] == (model == "big")
    assert rows["always-small"]["gap_recovered"] == 0 and rows["always-big"]["gap_recovered"] == 1
    casc = rows["cascade, threshold 0.5"]  # every request paid small; the escalated ones big too
    assert ref["small"]["cost"] * (1 - 1e-9) <= casc["cost_per_request_usd"]
    assert casc["cost_per_request_usd"] <= ref["small"]["cost"] + ref["big"]["cost"]
    shares = [rows["router, knob 0.2"]["big_share"], rows["router, knob 0.5"]["big_share"]]
    assert shares[0] <= shares[1]  # a bigger knob never sends fewer requests to big

    html = ctx.report.render()
    assert html.count("<tr>") >= 1 + 5 and "always-big" in html and "leanscale-cascade" in html
    assert html.count("data:image/png;base64,") == 1
    assert f"{ref['big']['accuracy']:.1%}" in summary[0]["value"]
    assert [e.n_examples for e in ctx.ledger] == [got["requests"]] == [5 * got["n_test"]]
    # everything stopped: no thread left, the gateway's port closed
    assert {t.ident for t in threading.enumerate()} <= threads
    assert _port_closed(got["gateway_url"])


def test_router_knob_ends_are_the_two_models(tmp_path):
    """Knob 0 sends nothing to big and knob 1 everything: the accuracies of always-small and always-big."""
    res = tour.gateway_comparison(_csv(), n_train=60, n_test=20, knobs=(0.0, 1.0), folds=3, seed=3)
    rows = {r["model"]: r for r in res["rows"]}
    for knob, model in (("0", "small"), ("1", "big")):
        assert rows[f"leanscale-router:{knob}"]["big_share"] == (model == "big")
        assert rows[f"leanscale-router:{knob}"]["accuracy"] == rows[model]["accuracy"]
        assert rows[f"leanscale-router:{knob}"]["cost_per_request_usd"] == pytest.approx(
            rows[model]["cost_per_request_usd"], rel=1e-9)
    assert rows["big"]["accuracy"] == pytest.approx(_reference(_csv(), 60, 20, seed=3)["big"]["accuracy"])
    assert set(res["test_index"]).isdisjoint(tour.gsm8k_split(1319, 60, 20, 3)[0])


def test_section_skipped_with_its_reason_when_the_data_are_missing(tmp_path):
    threads = {t.ident for t in threading.enumerate()}
    missing = tmp_path / "nowhere" / "gsm8k_responses.csv"
    ctx = _ctx(tmp_path)
    summary = tour.gateway_section(ctx, csv_path=missing)
    assert len(summary) == 1 and summary[0]["value"].startswith("skipped: ")
    assert str(missing) in summary[0]["value"]
    html = ctx.report.render()
    assert re.search(r"Skipped: the GSM8K responses file .* was not found", html) and str(missing) in html
    assert "<table>" not in html  # no table of made-up numbers
    assert {t.ident for t in threading.enumerate()} <= threads


def test_data_root_is_searched_first_and_a_bad_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSCALE_DATA_ROOT", str(tmp_path))
    assert tour.gsm8k_candidates()[:2] == [tmp_path / "routellm" / "gsm8k_responses.csv",
                                           tmp_path / "gsm8k_responses.csv"]
    bad = tmp_path / "gsm8k_responses.csv"
    bad.write_text("prompt,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"gsm8k_responses\.csv.*Missing: \['mistralai/Mixtral"):
        tour.load_gsm8k_responses(bad)
