"""Canned answers (leanscale.cascade.gateway.rules): RE2 matching, the OpenAI JSON and chunks they
produce (validated with the openai client's own types), and the config checks."""

from __future__ import annotations

import re
import time

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from leanscale.cascade.gateway.rules import (
    MAX_ANSWER_BYTES,
    MAX_RULES,
    RULES_MODEL,
    CannedRules,
    check_rules_config,
    completion_chunks,
    completion_json,
    completion_to_chunks,
)
from leanscale.core.errors import DataFormatError, InvalidParameterError

HOURS = {"name": "hours", "pattern": r"\bopening hours\b", "answer": "We are open 9:00-17:00, Monday to Friday."}
REFUND = {"pattern": r"^refund #(\d{4})$", "answer": "Refunds take 5 days.", "case_sensitive": True}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_matches_last_user_message_in_config_order_with_search_semantics():
    rules = CannedRules.from_config([HOURS, REFUND, {"name": "hours2", "pattern": "hours", "answer": "x"}])
    assert len(rules) == 3
    # search semantics, case-insensitive by default; the first rule in config order wins over "hours2"
    assert rules.match([user("What are your OPENING HOURS today?")]).name == "hours"
    assert rules.match([user("hours?")]).name == "hours2"
    # only the *last* user message is matched by default
    assert rules.match([user("opening hours?"), {"role": "assistant", "content": "9-5"}, user("thanks")]) is None
    assert rules.match([user("thanks"), {"role": "assistant", "content": "ok"}, user("opening hours?")]).name == "hours"
    # case_sensitive rule with anchors: exact shape only
    assert rules.match([user("refund #1234")]).name == "rules[1]"
    assert rules.match([user("Refund #1234")]) is None
    assert rules.match([user("my refund #1234")]) is None
    # a list of content parts: the text parts are matched; no text / malformed -> no match, no error
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "opening hours"}]
    assert rules.match([{"role": "user", "content": parts}]).name == "hours"
    assert rules.match([{"role": "user", "content": None}]) is None
    assert rules.match("not a list") is None
    assert rules.match([1, None, {"role": 3}]) is None
    # a lone surrogate in the text does not break RE2 (it becomes U+FFFD)
    assert rules.match([user("opening hours \ud800")]).name == "hours"


def test_roles_match_the_last_message_of_each_listed_role():
    rules = CannedRules.from_config([
        {"name": "pirate", "pattern": "talk like a pirate", "answer": "Arr.", "roles": ["system"]},
        {"name": "both", "pattern": "magic", "answer": "*", "roles": ["system", "user"]},
    ])
    sys_msg = {"role": "system", "content": "Always talk like a pirate."}
    assert rules.match([sys_msg, user("hello")]).name == "pirate"
    assert rules.match([user("talk like a pirate")]) is None  # user text, system-only rule
    assert rules.match([user("magic")]).name == "both"
    assert rules.match([{"role": "system", "content": "magic"}, user("x")]).name == "both"


def test_agrees_with_python_re_on_a_brute_force_grid():
    """RE2 and Python's re agree on these RE2-compatible patterns: the first matching rule is the
    one a plain loop over re.search finds."""
    specs = [r"\bprice\b", r"^hi\b", r"\d{3}-\d{4}", r"(foo|bar)baz", r"colou?r$", r"[aeiou]{3}"]
    rules = CannedRules.from_config([{"pattern": p, "answer": f"a{i}"} for i, p in enumerate(specs)])
    texts = ["the price is right", "Hi there", "call 555-1234", "barbaz!", "colour", "color?", "queue", "nothing",
             "PRICE", "hi", "foobaz and 123-4567"]
    for t in texts:
        want = next((f"a{i}" for i, p in enumerate(specs) if re.search(p, t, re.IGNORECASE)), None)
        got = rules.match([user(t)])
        assert (got.answer if got else None) == want, t


def test_re2_refuses_backreferences_lookarounds_and_huge_repetitions_naming_the_rule():
    for pattern, why in [(r"(a)\1", "invalid escape"), (r"(?=a)b", "invalid perl operator"),
                         (r"((a{100}){100}){100}", "repetition"), (r"[", "missing ]")]:
        with pytest.raises(InvalidParameterError) as e:
            CannedRules.from_config([HOURS, {"name": "bad-one", "pattern": pattern, "answer": "x"}])
        msg = str(e.value)
        assert "rules[1] (rule 'bad-one').pattern" in msg and "refused by RE2" in msg and why in msg, msg


def test_catastrophic_backtracking_pattern_runs_in_linear_time():
    """(a+)+$ is exponential on a backtracking engine; on RE2 it is accepted and linear."""
    rules = CannedRules.from_config([{"pattern": r"(a+)+$", "answer": "x"}, {"pattern": r"(\w+\s?)*!$",
                                                                            "answer": "y"}])
    evil = "a" * 200_000 + "b"
    t0 = time.perf_counter()
    assert rules.match([user(evil)]) is None
    assert rules.match([user("word " * 20_000 + "?")]) is None
    assert time.perf_counter() - t0 < 1.0
    assert rules.match([user("baaa")]).answer == "x"


def test_thousand_rules_match_in_one_pass():
    rules = CannedRules.from_config([{"pattern": rf"\bcode{i:04d}\b", "answer": f"answer {i}"}
                                     for i in range(MAX_RULES)])
    t0 = time.perf_counter()
    for i in (0, 517, 999):
        assert rules.match([user(f"what is code{i:04d}?")]).answer == f"answer {i}"
    assert rules.match([user("code10000")]) is None
    assert time.perf_counter() - t0 < 0.5


def test_chat_completion_json_validates_with_the_openai_types():
    rule = CannedRules.from_config([HOURS]).match([user("opening hours?")])
    body = {"model": "small", "messages": [{"role": "system", "content": "be brief"}, user("opening hours?")], "n": 2}
    answer = completion_json(rule, body)
    parsed = ChatCompletion.model_validate(answer)
    assert parsed.model == RULES_MODEL == "leanscale-rules"
    assert parsed.object == "chat.completion"
    assert [c.message.content for c in parsed.choices] == [HOURS["answer"]] * 2
    assert {c.finish_reason for c in parsed.choices} == {"stop"}
    # usage in words: prompt = "be brief" + "opening hours?" = 4 words; answer = 7 words x n=2
    assert parsed.usage.prompt_tokens == 4
    assert parsed.usage.completion_tokens == 2 * len(HOURS["answer"].split()) == 14
    assert parsed.usage.total_tokens == 18
    assert answer["usage"]["cost_usd"] == 0.0
    assert completion_json(rule, body)["id"] != answer["id"]


def test_stream_chunks_validate_and_reassemble_to_the_answer():
    answer_text = "word " * 2000  # 10,000 characters: several content chunks
    rules = CannedRules.from_config([{"pattern": "long", "answer": answer_text}])
    rule = rules.match([user("long please")])
    body = {"model": "m", "messages": [user("long please")], "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = completion_chunks(rule, body)
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert len({c.id for c in parsed}) == 1 and {c.model for c in parsed} == {RULES_MODEL}
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == answer_text
    assert [c.choices[0].finish_reason for c in parsed if c.choices][-1] == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 2000
    assert len(parsed) >= 5  # role, 3 content pieces of <= 4096 characters, finish, usage
    # without include_usage: no usage chunk, as OpenAI
    plain = completion_chunks(rule, {**body, "stream_options": None})
    assert all(c["choices"] for c in plain) and len(plain) == len(chunks) - 1


def test_text_completions_endpoint_and_match_body():
    rules = CannedRules.from_config([HOURS])
    body = {"model": "small", "prompt": "opening hours"}
    rule = rules.match_body(body)
    assert rule.name == "hours"
    assert rules.match_body({"model": "small", "prompt": ["opening hours"]}).name == "hours"
    assert rules.match_body({"model": "small", "prompt": ["opening hours", "b"]}) is None
    assert rules.match_body({"model": "small", "messages": [user("opening hours")]}).name == "hours"
    assert rules.match_body(None) is None
    parsed = Completion.model_validate(completion_json(rule, body, endpoint="completions"))
    assert parsed.choices[0].text == HOURS["answer"] and parsed.usage.prompt_tokens == 2
    chunks = completion_chunks(rule, body, endpoint="completions")
    assert "".join(Completion.model_validate(c).choices[0].text for c in chunks) == HOURS["answer"]
    with pytest.raises(InvalidParameterError, match="'endpoint'"):
        completion_json(rule, body, endpoint="embeddings")


def test_completion_to_chunks_of_any_answer_keeps_tool_calls():
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "small",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": None,
                  "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    chunks = [ChatCompletionChunk.model_validate(c) for c in completion_to_chunks(answer, include_usage=True)]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "f")]
    assert chunks[-2].choices[0].finish_reason == "tool_calls" and chunks[-1].usage.total_tokens == 3


@pytest.mark.parametrize("value, needle", [
    ("nope", "rules must be a list"),
    ([HOURS] * 2, "rules[1].name 'hours' is also the name of rules[0]"),
    ([{"pattern": "x"}], "rules[0]: the key 'answer' is missing"),
    ([{"answer": "x"}], "rules[0]: the key 'pattern' is missing"),
    ([{"pattern": "", "answer": "x"}], "rules[0].pattern must be a non-empty string"),
    ([{"pattern": "a" * 1001, "answer": "x"}], "rules[0].pattern has 1001 characters; at most 1000"),
    ([{"pattern": "a", "answer": "x" * (MAX_ANSWER_BYTES + 1)}], "rules[0].answer is 100001 bytes"),
    ([{"pattern": "a", "answer": "é" * 50_001}], "rules[0].answer is 100002 bytes"),
    ([{"pattern": "a", "answer": 3}], "rules[0].answer must be a non-empty string"),
    ([{"pattern": "a", "answer": "x", "roles": ["robot"]}], "rules[0].roles must be a non-empty list"),
    ([{"pattern": "a", "answer": "x", "roles": []}], "rules[0].roles must be a non-empty list"),
    ([{"pattern": "a", "answer": "x", "case_sensitive": "yes"}], "rules[0].case_sensitive must be true or false"),
    ([{"pattern": "a", "answer": "x", "anwser": "y"}], "unknown key rules[0].anwser"),
    ([{"pattern": "a", "answer": "x"}] * (MAX_RULES + 1), "rules has 1001 rules; at most 1000"),
    (["x"], "rules[0] must be a mapping"),
])
def test_config_errors_name_the_key_path(value, needle):
    with pytest.raises(InvalidParameterError) as e:
        check_rules_config(value)
    assert needle in str(e.value), str(e.value)


def test_config_normalises_and_uses_source_and_error_class():
    out = check_rules_config([{"pattern": "a", "answer": "x", "roles": "system"}])
    assert out == [{"name": "rules[0]", "pattern": "a", "answer": "x", "roles": ["system"], "case_sensitive": False}]
    assert check_rules_config(None) == [] and not CannedRules.from_config(None)
    with pytest.raises(DataFormatError) as e:
        check_rules_config([{"pattern": "a", "anwser": "x"}], "gateway config 'gw.yaml'", DataFormatError)
    assert str(e.value).startswith("gateway config 'gw.yaml': unknown key rules[0].anwser (allowed: answer, ")
    assert str(e.value).endswith("Did you mean 'answer'?")
