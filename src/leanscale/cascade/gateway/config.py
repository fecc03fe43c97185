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
        breaker: {failure_threshold: 5, open_s: 30}  # optional (these): circuit breaker, see breaker.py;
                                                     # null or {enabled: false}: none
      - name: big
        base_url: http://127.0.0.1:9002/v1
        input_price_per_1k: 0.01
        output_price_per_1k: 0.03
    fallbacks:
      small: [big]                          # on error, timeout or 429: the next one, with backoff
    client_keys_env: LEANSCALE_GATEWAY_KEYS # optional: comma-separated keys clients must send
    state: {redis_url: redis://127.0.0.1:6379/0}  # optional: breaker state shared by workers (store.py)

Optional top-level limits: ``max_in_flight`` (256: requests being answered at once; beyond, 429),
``max_body_bytes`` (1,000,000), ``backoff_s`` (0.05: wait before the first fallback, doubled for
each further one) and ``max_backoff_s`` (1.0).

A request for model ``m`` is tried on ``m`` then on each of ``fallbacks[m]`` in order, each model
at most once (the chains are not followed transitively, so a "cycle" such as ``a: [b]``,
``b: [a]`` is harmless). Unknown keys are errors (a typo must not silently drop a setting).
Every error names the file (or "config dict") and the key path, e.g.
``models[1].base_url must be an http(s) URL. Got 'foo'``.

Optional sections for the learned policies and the request log (see ``README.md``)::

    router:                                 # the policy "leanscale-router[:<knob>]"
      path: router/                         # a folder saved by gateway.policies.train_router
      models: [small, big]                  # optional: must be the saved router's models
      default_knob: 0.3                     # optional (0.5): strong fraction in [0, 1], or "$0.002"
    cascade:                                # the policy "leanscale-cascade[:<threshold>]"
      models: [small, big]                  # cheapest first; each but the last is gated
      scorer: scorer/                       # optional: a folder saved by train_scorer
      threshold: 0.5                        # optional (0.5): accept when confidence >= threshold
      logprob_weight: 0.5                   # optional (0.5): weight of the logprob confidence
      request_logprobs: false               # optional: ask the gated models for logprobs
    log:
      path: requests.jsonl                  # appended to, one JSON line per request, never rotated
      prompts: hash                         # hash (sha256 of the prompt) or text (prompt and answer)
      max_queue: 10000                      # optional: lines waiting for the writer; beyond, dropped

Relative paths are relative to the YAML file's folder (to the working directory for a dict).
The artefacts are loaded when the app is built; here their folders must hold a ``meta.json``.
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

from .breaker import BreakerConfig, parse_breaker
from .store import StateConfig, parse_state

__all__ = ["CASCADE_POLICY", "MAX_CONFIG_BYTES", "ROUTER_POLICY", "CascadeConfig", "GatewayConfig", "LogConfig",
           "ModelConfig", "RouterConfig", "parse_cascade_threshold", "parse_router_knob"]

ROUTER_POLICY = "leanscale-router"
CASCADE_POLICY = "leanscale-cascade"
POLICY_NAMES = (ROUTER_POLICY, CASCADE_POLICY)

MAX_CONFIG_BYTES = 1_000_000
_INSTALL = "pip install 'leanscale[gateway]'"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}\Z")

_MODEL_KEYS = {"name", "base_url", "model", "api_key_env", "input_price_per_1k", "output_price_per_1k", "timeout_s",
               "max_concurrency", "breaker"}
_TOP_KEYS = {"state", "models", "fallbacks", "client_keys_env", "max_in_flight", "max_body_bytes", "backoff_s",
             "max_backoff_s", "router", "cascade", "log", "rules", "cache"}
_ROUTER_KEYS = {"path", "models", "default_knob"}
_CASCADE_KEYS = {"models", "scorer", "threshold", "logprob_weight", "request_logprobs"}
_LOG_KEYS = {"path", "prompts", "max_queue"}
_KNOB_HELP = ("a strong-model fraction in [0, 1] (e.g. 0.3) or a budget in USD per request written '$0.002'")


def parse_router_knob(value: Any) -> tuple[str, float]:
    """``("fraction", f)`` for a number in [0, 1] (``0.3``, ``"0.3"``) or ``("budget", usd)`` for
    ``"$0.002"`` (> 0); ValueError (its message says what is expected) otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
        if math.isfinite(f) and 0.0 <= f <= 1.0:
            return "fraction", f
        raise ValueError(f"the router knob must be {_KNOB_HELP}. Got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.startswith("$"):
                usd = float(text[1:])
                if math.isfinite(usd) and usd > 0:
                    return "budget", usd
            else:
                f = float(text)
                if math.isfinite(f) and 0.0 <= f <= 1.0:
                    return "fraction", f
        except ValueError:
            pass
    raise ValueError(f"the router knob must be {_KNOB_HELP}. Got {value!r:.60}")


def parse_cascade_threshold(value: Any) -> float:
    """A confidence threshold in [0, 1] from a number or its text; ValueError otherwise."""
    try:
        t = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"the cascade threshold must be a number in [0, 1] (accept the cheap answer when the "
                         f"confidence is at least this). Got {value!r:.60}")
    return t


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
    breaker: BreakerConfig | None = BreakerConfig()  # None: no circuit breaker

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
class RouterConfig:
    """The ``router:`` section: a router saved by :func:`~leanscale.cascade.gateway.policies.train_router`."""

    path: str  # absolute
    models: tuple[str, ...] | None = None  # None: the saved router's models
    default_knob: tuple[str, float] = ("fraction", 0.5)  # parse_router_knob's result


@dataclass(frozen=True)
class CascadeConfig:
    """The ``cascade:`` section: the models tried in order (cheapest first), the saved scorer."""

    models: tuple[str, ...]
    scorer: str | None = None  # absolute path of a saved AnswerScorer
    threshold: float = 0.5
    logprob_weight: float = 0.5
    request_logprobs: bool = False


@dataclass(frozen=True)
class LogConfig:
    """The ``log:`` section: the JSONL request log."""

    path: str  # absolute
    prompts: str = "hash"  # "hash" or "text"
    max_queue: int = 10_000


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
    state: StateConfig = StateConfig()  # the top-level ``state`` section (store.py)
    router: RouterConfig | None = None
    cascade: CascadeConfig | None = None
    log: LogConfig | None = None
    rules: tuple[dict, ...] = ()  # the checked ``rules:`` section (rules.check_rules_config)
    cache: dict | None = None  # the checked ``cache:`` section (cache.check_cache_config); None: no cache

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def policy_names(self) -> list[str]:
        """The configured policies (``leanscale-router``, ``leanscale-cascade``)."""
        return ([ROUTER_POLICY] if self.router is not None else []) + (
            [CASCADE_POLICY] if self.cascade is not None else [])

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
        return _parse(data, source, DataFormatError, base=p.resolve().parent)

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> GatewayConfig:
        """Validate a dict of the YAML's shape (relative paths: from ``base_dir``, default the
        working directory)."""
        return _parse(data, "config dict", InvalidParameterError, base=Path(base_dir or Path.cwd()))


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


def _path(c: _Checker, key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise c.fail(key, "must be a path (a non-empty string)", value)
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _artefact(c: _Checker, key: str, value: Any, base: Path, made_by: str) -> str:
    p = _path(c, key, value, base)
    if not (p / "meta.json").is_file():
        raise c.fail(key, f"must be a folder saved by {made_by} (holding a meta.json); {str(p)!r} is not", value)
    return str(p)


def _names(c: _Checker, key: str, value: Any, seen: dict[str, int]) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise c.fail(key, "must be a list of at least 2 configured model names", value)
    for j, name in enumerate(value):
        if name not in seen:
            raise c.fail(f"{key}[{j}]", f"must be a configured model name ({', '.join(map(repr, seen))})", name)
    if len(set(value)) != len(value):
        raise c.fail(key, "must not list a model twice", value)
    return tuple(value)


def _parse_router(c: _Checker, raw: Any, seen: dict[str, int], base: Path) -> RouterConfig:
    r = c.mapping("router", raw, _ROUTER_KEYS)
    if "path" not in r:
        raise c.error(f"{c.source}: router.path (the folder saved by train_router) is missing.")
    models = _names(c, "router.models", r["models"], seen) if r.get("models") is not None else None
    knob = ("fraction", 0.5)
    if r.get("default_knob") is not None:
        try:
            knob = parse_router_knob(r["default_knob"])
        except ValueError:
            raise c.fail("router.default_knob", f"must be {_KNOB_HELP}", r["default_knob"]) from None
    return RouterConfig(path=_artefact(c, "router.path", r["path"], base, "train_router"), models=models,
                        default_knob=knob)


def _parse_cascade(c: _Checker, raw: Any, seen: dict[str, int], base: Path) -> CascadeConfig:
    r = c.mapping("cascade", raw, _CASCADE_KEYS)
    if "models" not in r:
        raise c.error(f"{c.source}: cascade.models (the models tried in order, cheapest first) is missing.")
    models = _names(c, "cascade.models", r["models"], seen)
    scorer = _artefact(c, "cascade.scorer", r["scorer"], base, "train_scorer") if r.get("scorer") is not None \
        else None
    threshold = float(c.number("cascade.threshold", r.get("threshold", 0.5), 0))
    weight = float(c.number("cascade.logprob_weight", r.get("logprob_weight", 0.5), 0))
    if threshold > 1 or weight > 1:
        raise c.error(f"{c.source}: cascade.threshold and cascade.logprob_weight must be in [0, 1]. Got "
                      f"{threshold:g} and {weight:g}.")
    request_logprobs = r.get("request_logprobs", False)
    if not isinstance(request_logprobs, bool):
        raise c.fail("cascade.request_logprobs", "must be true or false", request_logprobs)
    return CascadeConfig(models=models, scorer=scorer, threshold=threshold, logprob_weight=weight,
                         request_logprobs=request_logprobs)


def _parse_log(c: _Checker, raw: Any, base: Path) -> LogConfig:
    r = c.mapping("log", raw, _LOG_KEYS)
    if "path" not in r:
        raise c.error(f"{c.source}: log.path (the JSONL file the requests are appended to) is missing.")
    p = _path(c, "log.path", r["path"], base)
    if p.is_dir():
        raise c.fail("log.path", "must be a file path, not a folder", r["path"])
    if not p.parent.is_dir():
        raise c.fail("log.path", f"must be in an existing folder ({str(p.parent)!r} does not exist)", r["path"])
    prompts = r.get("prompts", "hash")
    if prompts not in ("hash", "text"):
        raise c.fail("log.prompts", "must be 'hash' (sha256 of the prompt) or 'text' (the prompt and the answer)",
                     prompts)
    max_queue = int(c.number("log.max_queue", r.get("max_queue", 10_000), 1, integer=True))
    return LogConfig(path=str(p), prompts=prompts, max_queue=max_queue)


def _parse(data: Any, source: str, error: type[Exception], base: Path | None = None) -> GatewayConfig:
    base = base if base is not None else Path.cwd()
    c = _Checker(source, error)
    top = c.mapping("(top level)", data, _TOP_KEYS)
    if "models" not in top:
        raise c.error(f"{source}: the key 'models' (a list of backend models) is missing.")
    models_raw = top["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise c.fail("models", "must be a non-empty list of models", models_raw)
    models: list[ModelConfig] = []
    seen: dict[str, int] = {}
    state = parse_state(c, top.get("state"))
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
        if any(name == p or name.startswith(p + ":") for p in POLICY_NAMES):
            raise c.fail(f"{key}.name", f"must not be a policy name of the gateway ({', '.join(POLICY_NAMES)}, "
                         "optionally with ':<knob>')", name)
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
            breaker=parse_breaker(c, f"{key}.breaker", m.get("breaker", {}), state),
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
    from .cache import check_cache_config
    from .rules import check_rules_config

    rules = tuple(check_rules_config(top.get("rules"), source, error)) if top.get("rules") is not None else ()
    cache = check_cache_config(top.get("cache"), source, error, base=base) if "cache" in top else None
    return GatewayConfig(
        rules=rules,
        cache=cache,
        models=tuple(models),
        fallbacks=fallbacks,
        client_keys_env=client_keys_env,
        max_in_flight=int(c.number("max_in_flight", top.get("max_in_flight", 256), 1, integer=True)),
        max_body_bytes=int(c.number("max_body_bytes", top.get("max_body_bytes", 1_000_000), 1, integer=True)),
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
        source=source,
        state=state,
        router=_parse_router(c, top["router"], seen, base) if top.get("router") is not None else None,
        cascade=_parse_cascade(c, top["cascade"], seen, base) if top.get("cascade") is not None else None,
        log=_parse_log(c, top["log"], base) if top.get("log") is not None else None,
    )
