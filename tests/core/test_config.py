"""Typed configs and key=value overrides (leanscale.core.config)."""

from __future__ import annotations

import doctest
import json
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

import leanscale.core.config as config_mod
from leanscale.core.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_config,
    parse_value,
)
from leanscale.core.errors import InvalidParameterError


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 4  # transformer blocks
    dropout: float = 0.0  # dropout probability


@dataclass(frozen=True)
class TrainConfig:
    n_layer: int = 4  # transformer blocks
    learning_rate: float = 3e-4  # AdamW peak learning rate
    widths: tuple[int, ...] = (64, 128)  # d_model of each run
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    compile: bool = False  # torch.compile the model
    out: str | None = None  # results folder
    max_steps: Optional[int] = None  # None: until the budget is spent
    method: Literal["fast", "reference"] = "fast"
    data_root: Path = Path("data")
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.n_layer < 1:
            raise InvalidParameterError(f"n_layer must be >= 1, got {self.n_layer}")


def test_overrides_parse_each_type():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "n_layer=6",
            "learning_rate=1e-3",
            "widths=32,64,128",
            "betas=(0.8, 0.99)",
            "compile=true",
            "out=runs/a",
            "max_steps=2e3",
            "method=reference",
            "data_root=/tmp/x",
            "model.dropout=0.1",
        ],
    )
    assert cfg.n_layer == 6 and type(cfg.n_layer) is int
    assert cfg.learning_rate == 1e-3
    assert cfg.widths == (32, 64, 128)
    assert cfg.betas == (0.8, 0.99)
    assert cfg.compile is True
    assert cfg.out == "runs/a"
    assert cfg.max_steps == 2000 and type(cfg.max_steps) is int
    assert cfg.method == "reference"
    assert cfg.data_root == Path("/tmp/x")
    assert cfg.model == ModelConfig(n_layer=4, dropout=0.1)


def test_overrides_return_a_new_config_and_later_wins():
    base = TrainConfig()
    cfg = apply_overrides(base, ["n_layer=2", "n_layer=3"])
    assert cfg.n_layer == 3 and base.n_layer == 4
    with pytest.raises(FrozenInstanceError):
        cfg.n_layer = 5  # type: ignore[misc]
    assert apply_overrides(base, []) == base


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
)
def test_bool_parsing(text, expected):
    assert apply_overrides(TrainConfig(), [f"compile={text}"]).compile is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", "truee"])
def test_bad_bool_names_key_type_and_value(text):
    with pytest.raises(InvalidParameterError, match=rf"'compile'.*must be bool. Got '{text}'"):
        apply_overrides(TrainConfig(), [f"compile={text}"])


def test_none_and_empty_tuple():
    cfg = apply_overrides(TrainConfig(out="x", max_steps=5), ["out=None", "max_steps=null", "widths="])
    assert cfg.out is None and cfg.max_steps is None and cfg.widths == ()


def test_ints_accept_underscores_and_whole_scientific_notation():
    assert parse_value("1_000", int) == 1000
    assert parse_value("2.5e6", int) == 2_500_000
    with pytest.raises(InvalidParameterError, match=r"must be int. Got '2.5'"):
        parse_value("2.5", int)


def test_unknown_key_lists_known_keys_and_closest_match():
    with pytest.raises(InvalidParameterError) as info:
        apply_overrides(TrainConfig(), ["learnig_rate=0.1"])
    msg = str(info.value)
    assert "'learnig_rate'" in msg
    assert "Known keys: n_layer, learning_rate, widths" in msg
    assert "Did you mean 'learning_rate'?" in msg


def test_unknown_nested_key():
    with pytest.raises(InvalidParameterError, match=r"'model.n_layr'.*Known keys: n_layer, dropout.*'n_layer'"):
        apply_overrides(TrainConfig(), ["model.n_layr=2"])
    with pytest.raises(InvalidParameterError, match="group of settings"):
        apply_overrides(TrainConfig(), ["model=2"])
    with pytest.raises(InvalidParameterError, match="has no field"):
        apply_overrides(TrainConfig(), ["n_layer.x=2"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("n_layer=four", r"'n_layer' parameter of TrainConfig must be int. Got 'four' instead"),
        ("learning_rate=fast", r"'learning_rate'.*must be float. Got 'fast'"),
        ("widths=1,a", r"'widths'.*must be tuple\[int, \.\.\.\]. Got '1,a'"),
        ("betas=0.9", r"'betas'.*must be tuple\[float, float\]. Got '0.9'"),
        ("max_steps=lots", r"'max_steps'.*must be int \| None. Got 'lots'"),
        ("method=fats", r"'method'.*one of 'fast', 'reference'. Got 'fats'.*Did you mean 'fast'"),
    ],
)
def test_bad_values_name_key_type_and_string(override, pattern):
    with pytest.raises(InvalidParameterError, match=pattern):
        apply_overrides(TrainConfig(), [override])


def test_malformed_override_and_non_dataclass():
    with pytest.raises(InvalidParameterError, match="key=value.*Known keys"):
        apply_overrides(TrainConfig(), ["n_layer"])
    with pytest.raises(InvalidParameterError, match="dataclass instance"):
        apply_overrides({"n_layer": 1}, ["n_layer=2"])


def test_post_init_checks_run_again():
    with pytest.raises(InvalidParameterError, match="n_layer must be >= 1"):
        apply_overrides(TrainConfig(), ["n_layer=0"])


def test_dict_round_trip_through_json():
    cfg = apply_overrides(TrainConfig(), ["widths=8,16", "out=o", "model.n_layer=2"])
    blob = json.loads(json.dumps(config_to_dict(cfg)))
    assert blob["widths"] == [8, 16] and blob["model"] == {"n_layer": 2, "dropout": 0.0}
    assert blob["data_root"] == "data"
    assert config_from_dict(TrainConfig, blob) == cfg


def test_from_dict_uses_defaults_and_rejects_unknown_or_mistyped():
    assert config_from_dict(TrainConfig, {"n_layer": 2}) == TrainConfig(n_layer=2)
    assert config_from_dict(TrainConfig, {"learning_rate": 1}).learning_rate == 1.0
    with pytest.raises(InvalidParameterError, match=r"'n_layers'.*Known keys.*Did you mean 'n_layer'"):
        config_from_dict(TrainConfig, {"n_layers": 2})
    with pytest.raises(InvalidParameterError, match=r"'n_layer'.*must be int. Got '2'"):
        config_from_dict(TrainConfig, {"n_layer": "2"})
    with pytest.raises(InvalidParameterError, match=r"'compile'.*must be bool"):
        config_from_dict(TrainConfig, {"compile": 1})
    with pytest.raises(InvalidParameterError, match=r"'widths'.*tuple\[int, \.\.\.\]"):
        config_from_dict(TrainConfig, {"widths": [1, "a"]})
    with pytest.raises(InvalidParameterError, match="'extra'.*Known keys: n_layer, dropout"):
        config_from_dict(TrainConfig, {"model": {"extra": 1}})


def test_from_dict_requires_fields_without_default():
    @dataclass
    class Needs:
        n_params: int  # no default

    with pytest.raises(InvalidParameterError, match="'n_params'.*no default"):
        config_from_dict(Needs, {})
    assert config_from_dict(Needs, {"n_params": 3}).n_params == 3


def test_describe_config_rows():
    rows = describe_config(apply_overrides(TrainConfig(), ["n_layer=8"]))
    by_key = {r["key"]: r for r in rows}
    assert by_key["n_layer"] == {"key": "n_layer", "type": "int", "value": 8, "default": 4}
    assert by_key["model.dropout"]["type"] == "float"
    assert by_key["widths"]["type"] == "tuple[int, ...]"


def test_docstring_examples():
    assert doctest.testmod(config_mod, raise_on_error=False).failed == 0


@pytest.mark.parametrize("overrides", [None, 5, {"a": 1}])
def test_apply_overrides_refuses_a_non_list(overrides):
    @dataclass(frozen=True)
    class Small:
        a: int = 1

    with pytest.raises(config_mod.InvalidParameterError, match="'overrides' parameter of apply_overrides"):
        apply_overrides(Small(), overrides)
