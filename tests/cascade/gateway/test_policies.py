"""The learned policies served for real: ``leanscale-router[:knob]`` and ``leanscale-cascade[:t]``
in front of fake backends replaying Mixtral's (small) and GPT-4's (big) recorded GSM8K answers,
driven with the official openai client; every decision is checked against the saved policy's own
decision computed by hand, and the request log against what happened."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import openai
import pytest

from leanscale.cascade.gateway import GatewayConfig
from leanscale.cascade.gateway.policies import prompt_hash, train_router, train_scorer
from leanscale.cascade.gateway.router_policy import RouterPolicy
from leanscale.cascade.gateway.scorer import (
    AnswerScorer,
    combine_confidence,
    mean_logprob,
)
from leanscale.cascade.gateway.testing import FakeOpenAIBackend, count_tokens

from .conftest import BIG, SMALL, client, running_gateway

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "routellm" / "gsm8k_responses.csv"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def _cost(prices: dict, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * prices["input"] + completion_tokens * prices["output"]) / 1000


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """200 GSM8K questions (a fixed random subset): 150 to train the router and the scorer, 50 to test."""
    with open(DATA, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    idx = np.random.default_rng(0).permutation(len(rows))[:200]
    rows = [rows[i] for i in idx]
    train, test = rows[:150], rows[150:]
    q = [r["prompt"] for r in train]
    ok = {"small": np.array([r[WEAK] == "True" for r in train]), "big": np.array([r[STRONG] == "True" for r in train])}
    answers = {"small": [r[WEAK + "_response"] for r in train], "big": [r[STRONG + "_response"] for r in train]}
    folder = tmp_path_factory.mktemp("policies")
    train_router(q, ok, {"small": 1.0, "big": 20.0}, folder / "router",
                 prompt_tokens=[count_tokens(x) for x in q],
                 completion_tokens={m: [count_tokens(a) for a in answers[m]] for m in answers})
    train_scorer(q, answers["small"], ok["small"], folder / "scorer")
    replies = {"small": {r["prompt"]: r[WEAK + "_response"] for r in rows},
               "big": {r["prompt"]: r[STRONG + "_response"] for r in rows}}
    return {"train": train, "test": test, "folder": folder, "replies": replies}


def _config(small, big, folder: Path, **extra) -> GatewayConfig:
    return GatewayConfig.from_dict({
        "models": [
            {"name": "small", "base_url": small.base_url, "input_price_per_1k": SMALL["input"],
             "output_price_per_1k": SMALL["output"], "timeout_s": 30},
            {"name": "big", "base_url": big.base_url, "input_price_per_1k": BIG["input"],
             "output_price_per_1k": BIG["output"], "timeout_s": 30},
        ],
        "router": {"path": str(folder / "router"), "default_knob": 0.3},
        "cascade": {"models": ["small", "big"], "scorer": str(folder / "scorer"), "threshold": 0.5},
        "log": {"path": str(folder / "requests.jsonl"), "prompts": "hash"},
        "backoff_s": 0.01,
        **extra,
    })


@pytest.fixture
def served(gsm8k, tmp_path):
    replies = gsm8k["replies"]
    log_path = tmp_path / "requests.jsonl"
    with FakeOpenAIBackend(reply=replies["small"].__getitem__) as small, \
            FakeOpenAIBackend(reply=replies["big"].__getitem__) as big:
        config = _config(small, big, gsm8k["folder"], log={"path": str(log_path), "prompts": "hash"})
        with running_gateway(config) as url:
            yield {"url": url, "small": small, "big": big, "log": log_path, "config": config, **gsm8k}


def _ask(c: openai.OpenAI, model: str, question: str):
    return c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": question}])


def _policy(config: GatewayConfig, folder: Path) -> RouterPolicy:
    return RouterPolicy.load(folder / "router").use_prices(lambda m, pt, ct: config.model(m).cost(pt, ct))


def _log_lines(path: Path, n: int) -> list[dict]:
    import time

    deadline = time.monotonic() + 5  # the writer thread flushes within milliseconds
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(x) for x in lines]
        time.sleep(0.01)
    raise AssertionError(f"{path} has fewer than {n} lines")


def test_router_knobs_all_small_all_big_and_a_calibrated_fraction(served):
    c, test = client(served["url"]), served["test"]
    policy = _policy(served["config"], served["folder"])
    chosen = {}
    for knob in ("0.0", "1.0", "0.3"):
        chosen[knob] = []
        for r in test:
            raw = _ask(c, f"leanscale-router:{knob}", r["prompt"])
            name = raw.headers["x-leanscale-model"]
            assert raw.headers["x-leanscale-models-called"] == name
            # the answer is the chosen model's recorded answer, and its decision is the policy's own
            assert raw.parse().choices[0].message.content == served["replies"][name][r["prompt"]]
            assert name == policy.decide(r["prompt"], ("fraction", float(knob)))[0]
            chosen[knob].append(name)
    assert set(chosen["0.0"]) == {"small"} and set(chosen["1.0"]) == {"big"}
    # 0.3: the threshold is the gain quantile of the (out-of-fold) training prompts, so on the 150
    # training prompts at most floor(0.3 * 150) = 45 go to big under the out-of-fold gains ...
    gains = policy._gains(policy.calibration_)
    assert (gains > policy.threshold(0.3)).sum() == 45  # no ties among 150 continuous gains
    # ... and 50 new prompts from the same distribution get Binomial(50, 0.3) big calls: mean 15,
    # sd sqrt(50 * 0.3 * 0.7) = 3.24; 3 sd (+-9.7) covers the sampling noise
    n_big = chosen["0.3"].count("big")
    assert abs(n_big - 15) <= 3 * math.sqrt(50 * 0.3 * 0.7), n_big
    assert (served["small"].calls, served["big"].calls) == (50 + 50 - n_big, 50 + n_big)
    # "leanscale-router" alone uses the configured default knob (0.3)
    assert _ask(c, "leanscale-router", test[0]["prompt"]).headers["x-leanscale-model"] == chosen["0.3"][0]


def test_router_budget_knob_uses_config_prices_and_typical_tokens(served):
    c, test = client(served["url"]), served["test"]
    policy = _policy(served["config"], served["folder"])
    # the expected costs: config prices x the mean token counts recorded at training
    pt, ct = policy.prompt_tokens, policy.completion_tokens
    c_small, c_big = _cost(SMALL, pt, ct["small"]), _cost(BIG, pt, ct["big"])
    assert policy.costs == pytest.approx({"small": c_small, "big": c_big})
    budget = c_small + 0.5 * (c_big - c_small)  # affords half the requests on big
    assert policy.router.fraction_for_budget(budget) == pytest.approx(0.5)
    for r in test[:15]:
        raw = _ask(c, f"leanscale-router:${budget:.10f}", r["prompt"])
        assert raw.headers["x-leanscale-model"] == policy.decide(r["prompt"], ("budget", float(f"{budget:.10f}")))[0]
    with pytest.raises(openai.BadRequestError) as info:  # below the cheapest model's expected cost
        _ask(c, f"leanscale-router:${c_small / 10:.3g}", test[0]["prompt"])
    assert info.value.body["param"] == "model" and "cheapest" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="router knob must be"):
        _ask(c, "leanscale-router:lots", test[0]["prompt"])


def test_cascade_accepts_when_the_scorer_trusts_and_escalates_otherwise(served):
    c, test, replies = client(served["url"]), served["test"][:24], served["replies"]
    scorer = AnswerScorer.load(served["folder"] / "scorer")
    p = scorer.predict_proba([r["prompt"] for r in test], [replies["small"][r["prompt"]] for r in test])
    threshold = float(np.median(p))  # both decisions occur
    log_before = len(served["log"].read_text().splitlines()) if served["log"].exists() else 0
    outcomes = []
    for r, p_r in zip(test, p):
        q = r["prompt"]
        raw = _ask(c, f"leanscale-cascade:{threshold!r}", q)
        answer = raw.parse()
        accept = p_r >= threshold  # the scorer's own decision, by hand (no logprobs: the scorer alone)
        assert combine_confidence(float(p_r), None, 0.5) == pytest.approx(float(p_r))
        small_cost = _cost(SMALL, count_tokens(q), count_tokens(replies["small"][q]))
        big_cost = _cost(BIG, count_tokens(q), count_tokens(replies["big"][q]))
        assert float(raw.headers["x-leanscale-confidence"]) == pytest.approx(float(p_r), rel=1e-5)
        if accept:
            assert raw.headers["x-leanscale-models-called"] == "small"
            assert raw.headers["x-leanscale-model"] == "small"
            assert answer.choices[0].message.content == replies["small"][q]
            expected = small_cost
        else:
            assert raw.headers["x-leanscale-models-called"] == "small,big"
            assert raw.headers["x-leanscale-model"] == "big"
            assert answer.choices[0].message.content == replies["big"][q]
            expected = small_cost + big_cost  # the cheap call is paid too
        assert float(raw.headers["x-leanscale-cost-usd"]) == pytest.approx(expected, rel=1e-9)
        assert answer.usage.model_extra["cost_usd"] == pytest.approx(expected, rel=1e-9)
        outcomes.append((q, accept, expected, raw.headers["x-leanscale-request-id"]))
    assert 0 < sum(a for _, a, _, _ in outcomes) < len(outcomes)
    assert served["small"].calls == len(test) and served["big"].calls == sum(not a for _, a, _, _ in outcomes)
    # the log: one line per request, matching what happened
    lines = _log_lines(served["log"], log_before + len(test))[log_before:]
    for line, (q, accept, expected, rid) in zip(lines, outcomes):
        assert line["request_id"] == rid and line["status"] == "ok" and line["endpoint"] == "chat"
        assert line["policy"] == f"leanscale-cascade:{threshold!r}"
        assert line["models_called"] == (["small"] if accept else ["small", "big"])
        assert line["model"] == ("small" if accept else "big")
        assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
        assert line["prompt_sha256"] == prompt_hash(q) and "prompt" not in line and "answer" not in line
        steps = line["cascade"]["steps"]
        assert steps[0]["decision"] == ("accept" if accept else "escalate")
        assert line["latency_s"] > 0 and line["stream"] is False


def test_cascade_streams_only_the_final_answer(served):
    c, replies = client(served["url"]), served["replies"]
    scorer = AnswerScorer.load(served["folder"] / "scorer")
    q = served["test"][0]["prompt"]
    p = float(scorer.predict_proba([q], [replies["small"][q]])[0])
    small_cost = _cost(SMALL, count_tokens(q), count_tokens(replies["small"][q]))
    big_cost = _cost(BIG, count_tokens(q), count_tokens(replies["big"][q]))
    for threshold, final, expected in ((0.0, "small", small_cost), (1.0, "big", small_cost + big_cost)):
        assert (p >= threshold) == (final == "small")
        raw = c.chat.completions.with_raw_response.create(
            model=f"leanscale-cascade:{threshold}", messages=[{"role": "user", "content": q}], stream=True,
            stream_options={"include_usage": True})
        assert raw.headers["x-leanscale-model"] == final
        with raw.parse() as stream:
            chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == replies[final][q]  # no half-streamed cheap answer before an escalated one
        assert chunks[-1].usage.model_extra["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert served["small"].requests[-1].get("stream") is None  # the cheap call was not streamed
    assert served["big"].requests[-1]["stream"] is True


def test_models_lists_policies_and_unknown_or_bad_policies_are_refused(served):
    c = client(served["url"])
    ids = [m.id for m in c.models.list()]
    assert ids == ["small", "big", "leanscale-router", "leanscale-cascade"]
    q = served["test"][0]["prompt"]
    with pytest.raises(openai.BadRequestError, match="cascade threshold must be"):
        _ask(c, "leanscale-cascade:2", q)
    with pytest.raises(openai.NotFoundError):
        _ask(c, "leanscale-routerx", q)


def test_policies_not_configured_are_not_found(backends):
    small, big = backends
    config = GatewayConfig.from_dict({"models": [{"name": "small", "base_url": small.base_url},
                                                 {"name": "big", "base_url": big.base_url}]})
    with running_gateway(config) as url:
        c = client(url)
        assert [m.id for m in c.models.list()] == ["small", "big"]
        with pytest.raises(openai.NotFoundError, match="'leanscale-router' is not configured"):
            _ask(c, "leanscale-router:0.3", "hi")


def test_logprobs_confidence_and_its_combination():
    chat = {"choices": [{"logprobs": {"content": [{"logprob": -0.1}, {"logprob": -0.3}]}}]}
    assert mean_logprob(chat) == pytest.approx(-0.2)
    text = {"choices": [{"logprobs": {"token_logprobs": [None, -1.0, -3.0]}}]}
    assert mean_logprob(text) == pytest.approx(-2.0)
    assert mean_logprob({"choices": [{"logprobs": None}]}) is None
    p_lp = math.exp(-0.2)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + math.exp(-(0.75 * logit(0.3) + 0.25 * logit(p_lp))))
    assert combine_confidence(0.3, -0.2, 0.25) == pytest.approx(expected)
    assert combine_confidence(None, -0.2, 0.25) == pytest.approx(p_lp)
    assert combine_confidence(0.3, -0.2, 0.0) == pytest.approx(0.3)
    assert combine_confidence(None, None, 0.5) is None


def test_saved_policies_round_trip(gsm8k):
    folder, test = gsm8k["folder"], gsm8k["test"]
    scorer = AnswerScorer.load(folder / "scorer")
    q, a = [r["prompt"] for r in test], [r[WEAK + "_response"] for r in test]
    again = AnswerScorer.from_state(*scorer.get_state())
    np.testing.assert_array_equal(again.predict_proba(q, a), scorer.predict_proba(q, a))
    assert not list(folder.glob("**/*.pkl")) and not list(folder.glob("**/*.pickle"))
    policy = RouterPolicy.load(folder / "router")
    assert policy.calibration_.shape == (150, 2) and policy.calibration_kind == "cv"
    assert policy.models == ["small", "big"]
