"""The gateway's configuration: the backend models, their prices and limits, the fallback chains
and the client keys, read from YAML (``yaml.safe_load`` only) or a dict and checked up front.

::

    models:
      - name: small
        base_url: http://127.0.0.1:9001/v1
        model: llama-3.1-8b-instruct        # optional: the upstream model name (default: name)
        api_key_env: SMALL_API_KEY          # optional: the backend key, read from this variable
        input_price_per_1k: 0.0006          # USD per 1,000 prompt tokens
        output_price_per_1k: 0.0018         # USD per 1,000 completion tokens
        timeout_s: 30                       # optional (30)
        max_concurrency: 64                 # optional (64)
      - name: big
        base_url: http://127.0.0.1:9002/v1
        input_price_per_1k: 0.01
        output_price_per_1k: 0.03
    fallbacks:
      small: [big]                          # on error, timeout or 429: the next one, with backoff
    client_keys_env: LEANSCALE_GATEWAY_KEYS # optional: comma-separated keys clients must send

Optional top-level limits: ``max_in_flight`` (256: requests being answered at once; beyond, 429),
``max_body_bytes`` (1,000,000), ``backoff_s`` (0.05: wait before the first fallback, doubled for
each further one) and ``max_backoff_s`` (1.0).

A request for model ``m`` is tried on ``m`` then on each of ``fallbacks[m]`` in order, each model
at most once (the chains are not followed transitively, so a "cycle" such as ``a: [b]``,
``b: [a]`` is harmless). Unknown keys are errors (a typo must not silently drop a setting).
Every error names the file (or "config dict") and the key path, e.g.
``models[1].base_url must be an http(s) URL. Got 'foo'``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from leanscale.core.errors import (
    DataFormatError,
    DataNotFoundError,
    InvalidParameterError,
    MissingDependencyError,
)

__all__ = ["MAX_CONFIG_BYTES", "GatewayConfig", "ModelConfig"]

MAX_CONFIG_BYTES = 1_000_000
_INSTALL = "pip install 'leanscale[gateway]'"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}\Z")

_MODEL_KEYS = {"name", "base_url", "model", "api_key_env", "input_price_per_1k", "output_price_per_1k", "timeout_s",
               "max_concurrency"}
_TOP_KEYS = {"models", "fallbacks", "client_keys_env", "max_in_flight", "max_body_bytes", "backoff_s",
             "max_backoff_s"}


@dataclass(frozen=True)
class ModelConfig:
    """One backend: an OpenAI-compatible server at ``base_url`` (ending in ``/v1`` usually)."""

    name: str
    base_url: str
    model: str  # the model name sent upstream
    input_price_per_1k: float = 0.0
    output_price_per_1k: float = 0.0
    api_key_env: str | None = None
    timeout_s: float = 30.0
    max_concurrency: int = 64

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a call with these token counts."""
        return (prompt_tokens * self.input_price_per_1k + completion_tokens * self.output_price_per_1k) / 1000.0

    def api_key(self) -> str | None:
        """The backend key from ``api_key_env`` (None without one); an error when it is not set."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env, "").strip()
        if not value:
            raise InvalidParameterError(
                f"model {self.name!r}: the environment variable {self.api_key_env!r} (api_key_env) holds the "
                "backend's API key and must be set and non-empty.")
        return value


@dataclass(frozen=True)
class GatewayConfig:
    """The validated configuration (see the module docstring). Build it with :meth:`from_yaml`
    or :meth:`from_dict`."""

    models: tuple[ModelConfig, ...]
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    client_keys_env: str | None = None
    max_in_flight: int = 256
    max_body_bytes: int = 1_000_000
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    source: str = "config dict"

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def chain(self, name: str) -> list[str]:
        """The models tried for a request for ``name``, in order (each once)."""
        return list(dict.fromkeys([name, *self.fallbacks.get(name, ())]))

    def client_keys(self) -> list[str] | None:
        """The keys clients must send (None: no client authentication); an error when
        ``client_keys_env`` is configured but the variable is unset or holds no key."""
        if self.client_keys_env is None:
            return None
        keys = [k.strip() for k in os.environ.get(self.client_keys_env, "").split(",") if k.strip()]
        if not keys:
            raise InvalidParameterError(
                f"{self.source}: client_keys_env names the environment variable {self.client_keys_env!r}, which "
                "must hold the comma-separated keys clients send (Authorization: Bearer <key>). It is unset or "
                "empty; set it, or remove client_keys_env to run without client keys.")
        return keys

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> GatewayConfig:
        """Read and validate a YAML file (at most :data:`MAX_CONFIG_BYTES`; ``yaml.safe_load``)."""
        try:
            import yaml
        except ImportError as exc:
            raise MissingDependencyError(
                f"reading a gateway config needs PyYAML (missing: {exc.name}). Install it with: {_INSTALL}") from exc
        p = Path(path)
        source = f"gateway config {str(p)!r}"
        if not p.is_file():
            raise DataNotFoundError(f"{source}: no such file (expected a YAML file with a 'models' list).")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise DataFormatError(f"{source}: the file is {size} bytes; a gateway config has at most "
                                  f"{MAX_CONFIG_BYTES} bytes.")
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise DataFormatError(f"{source}: the file is over {MAX_CONFIG_BYTES} bytes.")
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{source}: not UTF-8 text ({exc}).") from None
        except yaml.YAMLError as exc:
            raise DataFormatError(f"{source}: not valid YAML: {exc}") from None
        return _parse(data, source, DataFormatError)

    @classmethod
    def from_dict(cls, data: dict) -> GatewayConfig:
        """Validate a dict of the YAML's shape."""
        return _parse(data, "config dict", InvalidParameterError)


# ------------------------------------------------------------------------------------ checks
class _Checker:
    def __init__(self, source: str, error: type[Exception]):
        self.source, self.error = source, error

    def fail(self, key: str, expected: str, got: Any = ..., show_got: bool = True):
        msg = f"{self.source}: {key} {expected}."
        if show_got:
            msg += f" Got {got!r:.200}." if not isinstance(got, (dict, list)) else f" Got a {type(got).__name__}."
        return self.error(msg)

    def mapping(self, key: str, value: Any, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping", value)
        bad = [k for k in value if not isinstance(k, str) or k not in allowed]
        if bad:
            import difflib

            hint = difflib.get_close_matches(str(bad[0]), sorted(allowed), n=1, cutoff=0.6)
            where = f"{key}." if key != "(top level)" else ""
            raise self.error(
                f"{self.source}: unknown key {where}{bad[0]!s:.100} (allowed: {', '.join(sorted(allowed))})."
                + (f" Did you mean {hint[0]!r}?" if hint else ""))
        return value

    def string(self, key: str, value: Any, pattern: re.Pattern | None = None, what: str = "a non-empty string") -> str:
        if not isinstance(value, str) or not value.strip() or (pattern is not None and not pattern.match(value)):
            raise self.fail(key, f"must be {what}", value)
        return value

    def number(self, key: str, value: Any, low: float, *, strict: bool = False, integer: bool = False) -> float:
        kind = "an integer" if integer else "a number"
        rel = ">" if strict else ">="
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or value < low or (strict and value == low):
            raise self.fail(key, f"must be {kind} {rel} {low:g}", value)
        return value

    def url(self, key: str, value: Any) -> str:
        ok = isinstance(value, str)
        if ok:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment
        if not ok:
            raise self.fail(key, "must be an http(s) URL (e.g. http://127.0.0.1:9001/v1)", value)
        return value.rstrip("/")


def _parse(data: Any, source: str, error: type[Exception]) -> GatewayConfig:
    c = _Checker(source, error)
    top = c.mapping("(top level)", data, _TOP_KEYS)
    if "models" not in top:
        raise c.error(f"{source}: the key 'models' (a list of backend models) is missing.")
    models_raw = top["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise c.fail("models", "must be a non-empty list of models", models_raw)
    models: list[ModelConfig] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(models_raw):
        key = f"models[{i}]"
        m = c.mapping(key, raw, _MODEL_KEYS)
        for needed in ("name", "base_url"):
            if needed not in m:
                raise c.error(f"{source}: {key}.{needed} is missing.")
        name = c.string(f"{key}.name", m["name"], _MODEL_NAME,
                        "a name of letters, digits and ._:/@+- (at most 128 characters)")
        if name in seen:
            raise c.error(f"{source}: {key}.name {name!r} is also the name of models[{seen[name]}]; model names must "
                          "be unique.")
        seen[name] = i
        api_key_env = m.get("api_key_env")
        if api_key_env is not None:
            c.string(f"{key}.api_key_env", api_key_env, _ENV_NAME, "the name of an environment variable")
        models.append(ModelConfig(
            name=name,
            base_url=c.url(f"{key}.base_url", m["base_url"]),
            model=c.string(f"{key}.model", m.get("model", name)),
            input_price_per_1k=float(c.number(f"{key}.input_price_per_1k", m.get("input_price_per_1k", 0.0), 0)),
            output_price_per_1k=float(c.number(f"{key}.output_price_per_1k", m.get("output_price_per_1k", 0.0), 0)),
            api_key_env=api_key_env,
            timeout_s=float(c.number(f"{key}.timeout_s", m.get("timeout_s", 30.0), 0, strict=True)),
            max_concurrency=int(c.number(f"{key}.max_concurrency", m.get("max_concurrency", 64), 1, integer=True)),
        ))
    fallbacks: dict[str, tuple[str, ...]] = {}
    raw_fb = top.get("fallbacks")
    if raw_fb is not None:
        if not isinstance(raw_fb, dict):
            raise c.fail("fallbacks", "must be a mapping of model name -> list of model names", raw_fb)
        for name, chain in raw_fb.items():
            if name not in seen:
                raise c.fail("fallbacks", f"keys must be configured model names ({', '.join(map(repr, seen))})",
                             name)
            key = f"fallbacks.{name}"
            if isinstance(chain, str):
                chain = [chain]
            if not isinstance(chain, list):
                raise c.fail(key, "must be a list of model names", chain)
            for j, target in enumerate(chain):
                if target not in seen:
                    raise c.fail(f"{key}[{j}]", f"must be a configured model name ({', '.join(map(repr, seen))})",
                                 target)
                if target == name:
                    raise c.fail(f"{key}[{j}]", "must not be the model itself (it is always tried first)", target)
            if len(set(chain)) != len(chain):
                raise c.fail(key, "must not list a model twice", chain)
            fallbacks[name] = tuple(chain)
    client_keys_env = top.get("client_keys_env")
    if client_keys_env is not None:
        c.string("client_keys_env", client_keys_env, _ENV_NAME, "the name of an environment variable")
    backoff_s = float(c.number("backoff_s", top.get("backoff_s", 0.05), 0))
    max_backoff_s = float(c.number("max_backoff_s", top.get("max_backoff_s", 1.0), 0))
    if backoff_s > 10 or max_backoff_s > 60:
        raise c.error(f"{source}: backoff_s must be at most 10 and max_backoff_s at most 60 (seconds). "
                      f"Got {backoff_s:g} and {max_backoff_s:g}.")
    return GatewayConfig(
        models=tuple(models),
        fallbacks=fallbacks,
        client_keys_env=client_keys_env,
        max_in_flight=int(c.number("max_in_flight", top.get("max_in_flight", 256), 1, integer=True)),
        max_body_bytes=int(c.number("max_body_bytes", top.get("max_body_bytes", 1_000_000), 1, integer=True)),
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
        source=source,
    )
