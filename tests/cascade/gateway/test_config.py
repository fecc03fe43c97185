"""GatewayConfig: a valid YAML file loads as written; every bad config is refused with a message
naming the file and the key path."""

from __future__ import annotations

import copy
import textwrap

import pytest

from leanscale.cascade.gateway import GatewayConfig, create_gateway_app
from leanscale.cascade.gateway.config import MAX_CONFIG_BYTES
from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
)

GOOD_YAML = textwrap.dedent("""\
    models:
      - name: small
        base_url: http://127.0.0.1:9001/v1
        api_key_env: SMALL_API_KEY
        input_price_per_1k: 0.0006
        output_price_per_1k: 0.0018
        timeout_s: 30
        max_concurrency: 64
      - name: big
        base_url: https://big.example.com/v1/
        model: meta-llama/Llama-3.1-70B-Instruct
        input_price_per_1k: 0.01
        output_price_per_1k: 0.03
    fallbacks:
      small: [big]
    client_keys_env: LEANSCALE_GATEWAY_KEYS
    """)

GOOD = {
    "models": [
        {"name": "small", "base_url": "http://127.0.0.1:9001/v1", "input_price_per_1k": 0.0006,
         "output_price_per_1k": 0.0018},
        {"name": "big", "base_url": "http://127.0.0.1:9002/v1", "input_price_per_1k": 0.01,
         "output_price_per_1k": 0.03},
    ],
    "fallbacks": {"small": ["big"]},
}


def test_a_good_yaml_file_loads_as_written(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(GOOD_YAML)
    cfg = GatewayConfig.from_yaml(path)
    small, big = cfg.models
    assert cfg.model_names == ["small", "big"]
    assert (small.base_url, small.model, small.api_key_env, small.timeout_s, small.max_concurrency) == (
        "http://127.0.0.1:9001/v1", "small", "SMALL_API_KEY", 30.0, 64)
    assert big.base_url == "https://big.example.com/v1"  # the trailing slash dropped
    assert big.model == "meta-llama/Llama-3.1-70B-Instruct" and big.api_key_env is None
    assert (big.timeout_s, big.max_concurrency) == (30.0, 64)  # the defaults
    assert cfg.fallbacks == {"small": ("big",)} and cfg.client_keys_env == "LEANSCALE_GATEWAY_KEYS"
    assert cfg.chain("small") == ["small", "big"] and cfg.chain("big") == ["big"]
    assert small.cost(1000, 2000) == pytest.approx(0.0006 + 2 * 0.0018)
    assert str(path) in cfg.source


def test_chains_are_not_followed_transitively():
    d = copy.deepcopy(GOOD)
    d["models"].append({"name": "c", "base_url": "http://127.0.0.1:9003/v1"})
    d["fallbacks"] = {"small": ["big"], "big": ["small", "c"], "c": ["small"]}  # a "cycle" is harmless
    cfg = GatewayConfig.from_dict(d)
    assert cfg.chain("small") == ["small", "big"]
    assert cfg.chain("big") == ["big", "small", "c"]
    assert cfg.chain("c") == ["c", "small"]


def _bad(change) -> dict:
    d = copy.deepcopy(GOOD)
    change(d)
    return d


def _set(path, value):
    def change(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


BAD = [
    (_set(["models", 1, "base_url"], "foo"), r"models\[1\]\.base_url must be an http\(s\) URL .*Got 'foo'"),
    (_set(["models", 0, "base_url"], "ftp://x/v1"), r"models\[0\]\.base_url must be an http\(s\) URL"),
    (_set(["models", 0, "input_price_per_1K"], 1.0),
     r"unknown key models\[0\]\.input_price_per_1K .*Did you mean 'input_price_per_1k'\?"),
    (_set(["fallback"], {}), r"unknown key fallback .*Did you mean 'fallbacks'\?"),
    (_set(["models", 1, "name"], "small"), r"models\[1\]\.name 'small' is also the name of models\[0\]"),
    (_set(["models", 0, "name"], ""), r"models\[0\]\.name must be a name"),
    (_set(["models", 0, "name"], 7), r"models\[0\]\.name must be a name .*Got 7"),
    (_set(["models", 0, "input_price_per_1k"], -1), r"models\[0\]\.input_price_per_1k must be a number >= 0. Got -1"),
    (_set(["models", 0, "output_price_per_1k"], "cheap"), r"models\[0\]\.output_price_per_1k must be a number"),
    (_set(["models", 0, "timeout_s"], 0), r"models\[0\]\.timeout_s must be a number > 0. Got 0"),
    (_set(["models", 0, "timeout_s"], float("nan")), r"models\[0\]\.timeout_s must be a number > 0"),
    (_set(["models", 0, "max_concurrency"], 0), r"models\[0\]\.max_concurrency must be an integer >= 1"),
    (_set(["models", 0, "max_concurrency"], True), r"models\[0\]\.max_concurrency must be an integer >= 1"),
    (_set(["models", 0, "max_concurrency"], 2.5), r"models\[0\]\.max_concurrency must be an integer >= 1"),
    (_set(["models", 0, "api_key_env"], "MY KEY"), r"models\[0\]\.api_key_env must be the name of an environment"),
    (_set(["models", 0, "model"], ""), r"models\[0\]\.model must be a non-empty string"),
    (_set(["models", 1], "big"), r"models\[1\] must be a mapping. Got 'big'"),
    (lambda d: d["models"][1].pop("base_url"), r"models\[1\]\.base_url is missing"),
    (_set(["models"], []), r"models must be a non-empty list"),
    (lambda d: d.pop("models"), r"the key 'models' .* is missing"),
    (_set(["fallbacks"], {"small": ["huge"]}), r"fallbacks\.small\[0\] must be a configured model name .*Got 'huge'"),
    (_set(["fallbacks"], {"tiny": ["big"]}), r"fallbacks keys must be configured model names .*Got 'tiny'"),
    (_set(["fallbacks"], {"small": ["small"]}), r"fallbacks\.small\[0\] must not be the model itself"),
    (_set(["fallbacks"], {"small": ["big", "big"]}), r"fallbacks\.small must not list a model twice"),
    (_set(["fallbacks"], {"small": 3}), r"fallbacks\.small must be a list of model names"),
    (_set(["fallbacks"], ["big"]), r"fallbacks must be a mapping"),
    (_set(["client_keys_env"], "1KEYS"), r"client_keys_env must be the name of an environment variable"),
    (_set(["max_in_flight"], 0), r"max_in_flight must be an integer >= 1. Got 0"),
    (_set(["backoff_s"], 100), r"backoff_s must be at most 10"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(InvalidParameterError, match=message) as info:
        GatewayConfig.from_dict(_bad(change))
    assert str(info.value).startswith("config dict: ")


def test_the_top_level_must_be_a_mapping():
    with pytest.raises(InvalidParameterError, match="must be a mapping"):
        GatewayConfig.from_dict(["models"])


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD_YAML.replace("http://127.0.0.1:9001/v1", "foo"))
    with pytest.raises(DataFormatError, match=r"gateway config '.*gw\.yaml': models\[0\]\.base_url must be an http"):
        GatewayConfig.from_yaml(path)
    path.write_text("models: [\n  - name: x\n")
    with pytest.raises(DataFormatError, match=r"gw\.yaml': not valid YAML"):
        GatewayConfig.from_yaml(path)
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"gw\.yaml': \(top level\) must be a mapping. Got None"):
        GatewayConfig.from_yaml(path)
    path.write_text("models: !!python/object/apply:os.system ['echo hacked']\n")  # safe_load refuses tags
    with pytest.raises(DataFormatError, match="not valid YAML"):
        GatewayConfig.from_yaml(path)
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(DataFormatError, match=f"at most {MAX_CONFIG_BYTES} bytes"):
        GatewayConfig.from_yaml(path)
    with pytest.raises(DataNotFoundError, match=r"missing\.yaml': no such file"):
        GatewayConfig.from_yaml(tmp_path / "missing.yaml")


def test_unset_environment_variables_fail_when_the_app_is_built(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    d = copy.deepcopy(GOOD)
    d["models"][0]["api_key_env"] = "NO_SUCH_KEY_VAR"
    with pytest.raises(InvalidParameterError, match="'NO_SUCH_KEY_VAR' .*must be set"):
        create_gateway_app(GatewayConfig.from_dict(d))
    d = copy.deepcopy(GOOD)
    d["client_keys_env"] = "NO_SUCH_KEY_VAR"
    monkeypatch.setenv("NO_SUCH_KEY_VAR", " , ")
    with pytest.raises(InvalidParameterError, match="client_keys_env .*'NO_SUCH_KEY_VAR'.*unset or empty"):
        create_gateway_app(GatewayConfig.from_dict(d))
    with pytest.raises(InvalidParameterError, match="must be a GatewayConfig"):
        create_gateway_app({"models": []})


# ---------------------------------------------------------------------- policy and log sections
def _saved(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text("{}")
    return folder


def test_policy_and_log_sections_load_with_relative_paths(tmp_path):
    _saved(tmp_path / "router")
    _saved(tmp_path / "scorer")
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD_YAML + textwrap.dedent("""\
        router: {path: router, default_knob: "$0.002"}
        cascade: {models: [small, big], scorer: scorer, threshold: 0.7, request_logprobs: true}
        log: {path: requests.jsonl, prompts: text}
        """))
    cfg = GatewayConfig.from_yaml(path)
    assert cfg.router.path == str((tmp_path / "router").resolve()) and cfg.router.default_knob == ("budget", 0.002)
    assert cfg.cascade.models == ("small", "big") and cfg.cascade.threshold == 0.7 and cfg.cascade.request_logprobs
    assert cfg.cascade.logprob_weight == 0.5 and cfg.cascade.scorer == str((tmp_path / "scorer").resolve())
    assert cfg.log.path == str((tmp_path / "requests.jsonl").resolve()) and cfg.log.prompts == "text"
    assert cfg.policy_names == ["leanscale-router", "leanscale-cascade"]
    assert GatewayConfig.from_dict(GOOD).router is None


def test_bad_policy_and_log_sections_name_the_key(tmp_path):
    _saved(tmp_path / "r")
    cases = [
        ({"router": {"path": str(tmp_path / "nothing")}}, r"router\.path must be a folder saved by train_router"),
        ({"router": {"path": str(tmp_path / "r"), "knob": 1}}, r"unknown key router\.knob"),
        ({"router": {"path": str(tmp_path / "r"), "default_knob": 1.5}}, r"router\.default_knob must be a strong"),
        ({"router": {"path": str(tmp_path / "r"), "models": ["small", "huge"]}}, r"router\.models\[1\] must be a"),
        ({"router": {}}, r"router\.path .* is missing"),
        ({"cascade": {"models": ["small"]}}, r"cascade\.models must be a list of at least 2"),
        ({"cascade": {"models": ["small", "big"], "threshold": 2}}, r"cascade\.threshold .* must be in \[0, 1\]"),
        ({"cascade": {"models": ["small", "big"], "request_logprobs": "yes"}}, r"cascade\.request_logprobs must be"),
        ({"cascade": {"models": ["small", "big"], "scorer": str(tmp_path)}}, r"cascade\.scorer must be a folder"),
        ({"log": {"path": str(tmp_path / "no" / "x.jsonl")}}, r"log\.path must be in an existing folder"),
        ({"log": {"path": str(tmp_path)}}, r"log\.path must be a file path"),
        ({"log": {"path": str(tmp_path / "x.jsonl"), "prompts": "all"}}, r"log\.prompts must be 'hash'"),
        ({"models": [{"name": "leanscale-router", "base_url": "http://127.0.0.1:1/v1"}]},
         r"models\[0\]\.name must not be a policy name"),
    ]
    for extra, message in cases:
        with pytest.raises(InvalidParameterError, match=message):
            GatewayConfig.from_dict({**copy.deepcopy(GOOD), **extra})
