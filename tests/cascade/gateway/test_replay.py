"""Offline replay of the request log and training from it: a real log written by the gateway in front
of fake backends replaying Mixtral's (small) and GPT-4's (big) recorded GSM8K answers, driven with the
official openai client; the frontier's always-<model> and random points are checked against values
computed by hand from the CSV and the prices, the router/cascade sweeps for monotone cost, and a
router trained from the log is served. Malformed logs and outcomes name their line."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from leanscale.cascade.gateway import GatewayConfig
from leanscale.cascade.gateway.policies import prompt_hash
from leanscale.cascade.gateway.replay import (
    read_outcomes,
    read_request_log,
    replay,
    train_from_log,
)
from leanscale.cascade.gateway.router_policy import RouterPolicy
from leanscale.cascade.gateway.testing import FakeOpenAIBackend, count_tokens
from leanscale.cli.main import main
from leanscale.core.errors import DataFormatError

from .conftest import BIG, SMALL, client, running_gateway

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "routellm" / "gsm8k_responses.csv"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
PRICES = {"small": (SMALL["input"], SMALL["output"]), "big": (BIG["input"], BIG["output"])}


def _cost(model: str, prompt: str, answer: str) -> float:
    i, o = PRICES[model]
    return (count_tokens(prompt) * i + count_tokens(answer) * o) / 1000


def _models(small, big) -> list[dict]:
    return [{"name": "small", "base_url": small.base_url, "input_price_per_1k": SMALL["input"],
             "output_price_per_1k": SMALL["output"], "timeout_s": 30},
            {"name": "big", "base_url": big.base_url, "input_price_per_1k": BIG["input"],
             "output_price_per_1k": BIG["output"], "timeout_s": 30}]


def _wait_lines(path: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(x) for x in lines]
        time.sleep(0.01)
    raise AssertionError(f"the log has {len(lines)} lines, expected {n}")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """60 GSM8K questions, each asked to 'small' and to 'big' through the gateway (log with text),
    plus an outcomes file (JSONL) from the CSV's correctness."""
    with open(DATA, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    idx = np.random.default_rng(1).permutation(len(rows))[:60]
    rows = [rows[i] for i in idx]
    folder = tmp_path_factory.mktemp("replay")
    log_path = folder / "requests.jsonl"
    replies = {"small": {r["prompt"]: r[WEAK + "_response"] for r in rows},
               "big": {r["prompt"]: r[STRONG + "_response"] for r in rows}}
    with FakeOpenAIBackend(reply=replies["small"].__getitem__) as small, \
            FakeOpenAIBackend(reply=replies["big"].__getitem__) as big:
        config = GatewayConfig.from_dict({"models": _models(small, big), "backoff_s": 0.01,
                                          "log": {"path": str(log_path), "prompts": "text"}})
        with running_gateway(config) as url:
            c = client(url)
            for r in rows:
                for m in ("small", "big"):
                    c.chat.completions.create(model=m, messages=[{"role": "user", "content": r["prompt"]}])
            c.close()
        _wait_lines(log_path, 120)
    outcomes = folder / "outcomes.jsonl"
    with open(outcomes, "w", encoding="utf-8") as f:
        for r in rows:
            for m, col in (("small", WEAK), ("big", STRONG)):
                f.write(json.dumps({"prompt": r["prompt"], "model": m, "correct": r[col] == "True"}) + "\n")
    ok = {"small": np.array([r[WEAK] == "True" for r in rows]), "big": np.array([r[STRONG] == "True" for r in rows])}
    cost = {m: np.array([_cost(m, r["prompt"], replies[m][r["prompt"]]) for r in rows]) for m in ("small", "big")}
    return {"rows": rows, "log": log_path, "outcomes": outcomes, "ok": ok, "cost": cost, "folder": folder,
            "replies": replies}


@pytest.fixture(scope="module")
def trained(logged):
    out = logged["folder"] / "policies"
    return train_from_log(logged["log"], logged["outcomes"], out, PRICES, cheap_model="small")


def _by(result, policy, knob=None):
    return [p for p in result.points if p["policy"] == policy and (knob is None or p["knob"] == knob)]


def test_always_and_random_points_match_the_csv(logged):
    res = replay(logged["log"], logged["outcomes"], PRICES, policies=("always", "random", "logged"))
    assert res.models == ["small", "big"]
    assert res.counts == {"requests_logged": 120, "without_prompt": 0, "excluded_without_outcomes": 0,
                          "requests_replayed": 120, "prompts": 60}
    ok, cost = logged["ok"], logged["cost"]
    for m in ("small", "big"):
        (p,) = _by(res, f"always-{m}")
        assert p["quality"] == pytest.approx(ok[m].mean(), abs=1e-12)
        assert p["cost_usd"] == pytest.approx(cost[m].mean(), rel=1e-9)
        assert p["share"][m] == 1.0 and p["n"] == 120
    cs, cb, qs, qb = cost["small"].mean(), cost["big"].mean(), ok["small"].mean(), ok["big"].mean()
    for f in (0.0, 0.2, 0.5, 1.0):
        (p,) = _by(res, "random", f)
        assert p["cost_usd"] == pytest.approx((1 - f) * cs + f * cb, rel=1e-9)
        assert p["quality"] == pytest.approx((1 - f) * qs + f * qb, abs=1e-12)
        assert p["share"]["big"] == pytest.approx(f)
    g = res.gap["random"]  # random recovers exactly the share of strong calls
    assert g["at_20"] == pytest.approx(0.2) and g["at_50"] == pytest.approx(0.5) and g["apgr"] == pytest.approx(0.5)
    logged_pts = {p["knob"]: p for p in _by(res, "logged")}
    assert logged_pts["small"]["quality"] == pytest.approx(qs) and logged_pts["big"]["cost_usd"] == pytest.approx(cb)
    assert logged_pts["all"]["cost_usd"] == pytest.approx((cs + cb) / 2)


def test_router_and_cascade_sweeps_are_monotone(logged, trained):
    res = replay(logged["log"], logged["outcomes"], PRICES, router=trained["router"], scorer=trained["scorer"])
    ok = logged["ok"]
    for name in ("leanscale-router", "leanscale-cascade"):
        pts = sorted(_by(res, name), key=lambda p: p["knob"])
        assert len(pts) >= 11
        costs = [p["cost_usd"] for p in pts]
        assert all(b >= a - 1e-15 for a, b in zip(costs, costs[1:])), (name, costs)
        assert set(res.gap[name]) == {"at_20", "at_50", "apgr"}
    policy = RouterPolicy.load(trained["router"])  # replay's vectorised choice == the served decide()
    for knob in (0.3, 0.7):
        picks = [policy.decide(r["prompt"], ("fraction", knob))[0] for r in logged["rows"]]
        (p,) = _by(res, "leanscale-router", knob)
        assert p["share"]["big"] == pytest.approx(picks.count("big") / len(picks))
        assert p["quality"] == pytest.approx(np.mean([ok[m][i] for i, m in enumerate(picks)]))
    r0, r1 = _by(res, "leanscale-router", 0.0)[0], _by(res, "leanscale-router", 1.0)[0]
    assert r0["quality"] == pytest.approx(ok["small"].mean()) and r1["quality"] == pytest.approx(ok["big"].mean())
    c0 = _by(res, "leanscale-cascade", 0.0)[0]  # threshold 0: every cheap answer accepted
    assert c0["quality"] == pytest.approx(ok["small"].mean()) and c0["share"]["small"] == 1.0
    c1 = _by(res, "leanscale-cascade", 1.0)[0]  # (almost) everything escalated: both models paid
    assert c1["cost_usd"] <= (logged["cost"]["small"] + logged["cost"]["big"]).mean() + 1e-12
    text = res.format_table()
    assert "leanscale-router" in text and "gap recovered" in text and "120 requests replayed" in text


def test_cascade_and_router_need_texts_and_answers(logged, trained, tmp_path):
    # a hashed log: neither the router nor the cascade can re-decide, and the output says so
    hashed = tmp_path / "hashed.jsonl"
    with open(hashed, "w", encoding="utf-8") as f:
        for line in logged["log"].read_text(encoding="utf-8").splitlines():
            obj = json.loads(line)
            obj["prompt_sha256"] = prompt_hash(obj.pop("prompt"))
            obj.pop("answer")
            obj["a_new_field"] = {"tolerated": True}
            f.write(json.dumps(obj) + "\n")
    by_hash = tmp_path / "outcomes.csv"
    with open(by_hash, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt_sha256", "model", "correct"])
        for r in logged["rows"][:50]:  # 10 prompts without outcomes
            w.writerow([prompt_hash(r["prompt"]), "small", r[WEAK]])
            w.writerow([prompt_hash(r["prompt"]), "big", r[STRONG]])
    res = replay(hashed, by_hash, PRICES, router=trained["router"], scorer=trained["scorer"])
    assert res.counts["excluded_without_outcomes"] == 20 and res.counts["requests_replayed"] == 100
    assert not _by(res, "leanscale-router") and not _by(res, "leanscale-cascade")
    notes = " ".join(res.notes)
    assert "leanscale-router: not replayed" in notes and "leanscale-cascade: not replayed" in notes
    assert _by(res, "always-small")[0]["quality"] == pytest.approx(logged["ok"]["small"][:50].mean())


def test_train_from_log_then_serve_the_router(logged, trained):
    assert trained["prompts"] == 60 and Path(trained["router"], "meta.json").is_file()
    assert Path(trained["scorer"], "meta.json").is_file()
    assert trained["config"]["cascade"]["models"] == ["small", "big"]
    replies = logged["replies"]
    with FakeOpenAIBackend(reply=replies["small"].__getitem__) as small, \
            FakeOpenAIBackend(reply=replies["big"].__getitem__) as big:
        config = GatewayConfig.from_dict({"models": _models(small, big), "backoff_s": 0.01,
                                          "router": {"path": trained["router"]},
                                          "cascade": {"models": ["small", "big"], "scorer": trained["scorer"]}})
        with running_gateway(config) as url:
            c = client(url)
            q = logged["rows"][0]["prompt"]
            for knob, expected in (("0", "small"), ("1", "big")):
                raw = c.chat.completions.with_raw_response.create(
                    model=f"leanscale-router:{knob}", messages=[{"role": "user", "content": q}])
                assert raw.headers["x-leanscale-model"] == expected
                assert raw.parse().choices[0].message.content == replies[expected][q]
            raw = c.chat.completions.with_raw_response.create(model="leanscale-cascade:0",
                                                              messages=[{"role": "user", "content": q}])
            assert raw.headers["x-leanscale-model"] == "small"


def test_request_id_outcomes_and_cli(logged, tmp_path, capsys):
    lines = [json.loads(x) for x in logged["log"].read_text(encoding="utf-8").splitlines()]
    by_id = tmp_path / "by_id.jsonl"
    truth = {r["prompt"]: r for r in logged["rows"]}
    with open(by_id, "w", encoding="utf-8") as f:  # feedback per request: the model is the one that answered
        for ln in lines:
            col = WEAK if ln["model"] == "small" else STRONG
            f.write(json.dumps({"request_id": ln["request_id"], "correct": truth[ln["prompt"]][col] == "True"}) + "\n")
    out = tmp_path / "frontier.json"
    assert main(["gateway", "replay", str(logged["log"]), "--outcomes", str(by_id), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "always-small" in printed and "leanscale-router: not replayed" in printed
    blob = json.loads(out.read_text())
    (big,) = [p for p in blob["points"] if p["policy"] == "always-big"]
    assert big["quality"] == pytest.approx(logged["ok"]["big"].mean())
    assert main(["gateway", "train", str(logged["log"]), "--outcomes", str(by_id), "--out",
                 str(tmp_path / "pol"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 60
    assert (tmp_path / "pol" / "router" / "meta.json").is_file()


@pytest.mark.parametrize("content, message", [
    ('{"request_id": "a", "prompt": "x"}\n[1, 2]\n', "line 2: must be a JSON object"),
    ('{"prompt": "x"}\n\n{"prompt": 3}\n', "line 3: 'prompt' must be a string"),
    ('{"prompt": "x", "models_called": "small"}\n', "line 1: 'models_called' must be a list"),
    ('{"prompt": "x", "cost_usd": -1}\n', "line 1: 'cost_usd' must be a number >= 0"),
    ('{"prompt": "x"}\n{"prompt": "y", "format_version": 2}\n', "line 2: written in request-log format 2"),
    ('{"prompt": "x"}\n{oops\n{"prompt": "y"}\n', "line 2: not valid JSON"),
])
def test_malformed_logs_name_the_line(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message.replace("[", r"\[")):
        read_request_log(path)


def test_truncated_last_line_is_skipped_and_size_is_bounded(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"prompt": "x", "future": 1}\n{"prompt": "y", "mod', encoding="utf-8")
    log = read_request_log(path)
    assert [r.prompt for r in log.requests] == ["x"] and "truncated last line of the request log (line 2," in log.notes[0]
    with pytest.raises(DataFormatError, match="at most 10 bytes"):
        read_request_log(path, max_bytes=10)


@pytest.mark.parametrize("name, content, message", [
    ("o.jsonl", '{"prompt": "x", "model": "a", "correct": true}\n{"prompt": "x", "model": "a"}\n',
     "line 2: needs exactly one of the columns 'correct'"),
    ("o.jsonl", '{"model": "a", "correct": true}\n', "line 1: needs exactly one of the columns 'prompt'"),
    ("o.jsonl", '{"prompt": "x", "model": "a", "correct": "maybe"}\n', "line 1: column 'correct' must be true or false"),
    ("o.jsonl", '{"prompt": "x", "model": "a", "correct": true}\n{"prompt": "x", "model": "a", "correct": false}\n',
     "line 2: contradicts line 1"),
    ("o.jsonl", '{"prompt_sha256": "abc", "model": "a", "score": 1}\n', "line 1: column 'prompt_sha256'"),
    ("o.csv", "prompt,model,score\nx,a,1\ny,a,high\n", "line 3: column 'score' must be a number"),
    ("o.csv", "prompt,model,correct\nx,a,true,extra\n", "line 2: more values than the header"),
    ("o.csv", "prompt,model,correct,cost_usd\nx,a,true,-2\n", "line 2: column 'cost_usd' must be a finite number >= 0"),
    ("o.jsonl", '{"prompt": "x", "correct": true}\n', "line 1: column 'model' is required"),
])
def test_malformed_outcomes_name_the_line_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_outcomes(path)


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"prompt": "x"}\nnot json\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    out.write_text('{"prompt": "x", "model": "a", "correct": true}\n', encoding="utf-8")
    assert main(["gateway", "replay", str(log), "--outcomes", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "Traceback" not in err
    assert main(["gateway", "replay", str(tmp_path / "missing.jsonl"), "--outcomes", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["gateway"]) == 2 and "--config is required" in capsys.readouterr().err
