"""Offline replay of the gateway's request log: the cost-quality frontier of every policy on the
traffic that was actually served, and training the router / cascade scorer from that log.

::

    from leanscale.cascade.gateway.replay import read_request_log, read_outcomes, replay, train_from_log
    log = read_request_log("requests.jsonl")
    outcomes = read_outcomes("outcomes.jsonl")
    result = replay(log, outcomes, prices=GatewayConfig.from_yaml("gw.yaml"))
    print(result.format_table())
    train_from_log(log, outcomes, "policies/", prices="gw.yaml")   # router/ and scorer/

**The request log** (written by :mod:`.log`, one JSON object per line) is untrusted input: the
file size and each line's length are bounded, a line that is not a JSON object or whose known
fields have the wrong type is a :class:`~leanscale.core.errors.DataFormatError` naming the file and
the line; unknown fields are ignored (newer gateways add some); a ``format_version`` field newer
than :data:`LOG_FORMAT_VERSION` is refused; a truncated *last* line (no newline: the gateway died
mid-write) is skipped and counted. A request's prompt is its ``prompt`` text (``log: {prompts:
text}``) or its ``prompt_sha256``.

**The outcomes file** says how good each model's answer to each prompt is. JSON lines (``.jsonl``,
one object per line) or CSV with a header row (``.csv``; the format is chosen by the extension,
``format=`` overrides), one row per (prompt, model):

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``prompt``          the prompt text (as the gateway sees it: the messages' contents joined by
                    newlines) -- or ``prompt_sha256`` (``sha256:<hex>``, the log's hash) -- or
                    ``request_id`` (a logged request's id, the ``x-leanscale-request-id``
                    header); exactly one of the three
``model``           a model name (optional with ``request_id``: the model that answered it)
``correct``         ``true``/``false`` (CSV also ``1``/``0``, ``yes``/``no``) -- or ``score``, any
                    finite number (higher is better, e.g. a judge's 1-10); exactly one
``answer``          optional: that model's answer text (lets the cascade be replayed and its
                    scorer trained from a hashed log)
``cost_usd``        optional: that model's cost on that prompt (else from the log or the prices)
``prompt_tokens``,  optional: token counts, priced with the config's prices
``completion_tokens``
==================  ==========================================================================

Unknown columns are ignored. Rows that repeat a (prompt, model) must agree on the quality.

**Costs** of model ``m`` on a request, first found: the outcomes row's ``cost_usd``, its token
counts x the prices, the log's token counts x the prices (a ``usage`` object on a line or a cascade
step, when a gateway writes one), the logged ``cost_usd`` of a line where ``m`` alone was called (or
of ``m``'s cascade step); else the mean known cost of ``m`` (imputed, counted in the result's
notes). **Quality** comes from the outcomes only. A request whose prompt lacks an outcome for one of
the replayed models is excluded and counted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import DataFormatError, InvalidParameterError

from .policies import prompt_hash

__all__ = ["LOG_FORMAT_VERSION", "LoggedRequest", "Outcomes", "ReplayResult", "RequestLog", "read_outcomes",
           "read_request_log", "replay", "train_from_log"]

LOG_FORMAT_VERSION = 1  # the newest request-log format this module reads (lines without the field: 1)
MAX_LOG_BYTES = 4 << 30
MAX_OUTCOMES_BYTES = 2 << 30
MAX_LINE_BYTES = 16 << 20
ROUTER_KNOBS = tuple(round(0.1 * i, 1) for i in range(11))
CASCADE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))
RANDOM_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}


# ----------------------------------------------------------------------------------- the log

@dataclass
class LoggedRequest:
    """One line of the request log (the fields replay uses; ``line`` is its 1-based number)."""

    line: int
    request_id: str | None
    policy: str | None
    status: str | None
    model: str | None
    models_called: list[str]
    cost_usd: float | None
    prompt: str | None
    prompt_sha256: str | None
    answer: str | None
    usage: dict | None = None  # {"prompt_tokens", "completion_tokens"} when the gateway logged them
    cascade_steps: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str | None:
        """The prompt's identity: its hash (computed from the text when the text was logged)."""
        if self.prompt is not None:
            return prompt_hash(self.prompt)
        return self.prompt_sha256


@dataclass
class RequestLog:
    """A parsed request log: ``requests`` (every line, in order), ``path``, ``skipped`` notes."""

    path: str
    requests: list[LoggedRequest]
    notes: list[str] = field(default_factory=list)


def _check_size(path: Path, max_bytes: int, what: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        from leanscale.core.errors import DataNotFoundError

        raise DataNotFoundError(f"The {what} {str(path)!r} does not exist.") from None
    if path.is_dir():
        raise DataFormatError(f"The {what} {str(path)!r} is a folder, not a file.")
    if size > max_bytes:
        raise DataFormatError(f"The {what} {str(path)!r} must be at most {max_bytes:,} bytes. Got {size:,} bytes.")


def _iter_lines(path: Path, what: str, max_line_bytes: int):
    """(line number, text, ended with a newline) of each non-blank line; decoding errors name the line."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if len(raw) > max_line_bytes:
                raise DataFormatError(f"{what} {str(path)!r}, line {no}: longer than {max_line_bytes:,} bytes.")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{what} {str(path)!r}, line {no}: not UTF-8 (byte {exc.start}).") from None
            if text.strip():
                yield no, text, text.endswith("\n")


def _num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)


def _tokens(obj: Any) -> dict | None:
    if not isinstance(obj, Mapping):
        return None
    p, c = obj.get("prompt_tokens"), obj.get("completion_tokens")
    if _num_or_none(p) and _num_or_none(c) and p is not None and c is not None:
        return {"prompt_tokens": float(p), "completion_tokens": float(c)}
    return None


def read_request_log(path: str | os.PathLike, *, max_bytes: int = MAX_LOG_BYTES,
                     max_line_bytes: int = MAX_LINE_BYTES) -> RequestLog:
    """Parse the gateway's JSONL request log (see the module docstring).

    Args:
        path: the log file.
        max_bytes: the file's size limit (checked before reading).
        max_line_bytes: one line's size limit.

    Returns:
        A :class:`RequestLog`.

    Raises:
        DataNotFoundError: no such file.
        DataFormatError: too large, a line that is not a JSON object, a known field of the wrong
            type, or a ``format_version`` newer than this leanscale reads (the message names the line).
    """
    path = Path(path)
    what = "request log"
    _check_size(path, max_bytes, what)
    requests: list[LoggedRequest] = []
    notes: list[str] = []
    pending_error: str | None = None
    pending_line = 0
    for no, text, ended in _iter_lines(path, "The request log", max_line_bytes):
        if pending_error is not None:  # a bad line that was not the last one
            raise DataFormatError(pending_error)
        where = f"The request log {str(path)!r}, line {no}"
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            msg = f"{where}: not valid JSON ({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')})."
            if not ended:  # maybe a last line cut by a crash: an error only if more lines follow
                pending_error, pending_line = msg, no
                continue
            raise DataFormatError(msg) from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: must be a JSON object (one request). Got {type(obj).__name__}.")
        version = obj.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise DataFormatError(f"{where}: 'format_version' must be an integer. Got {version!r:.40}.")
        if version > LOG_FORMAT_VERSION:
            raise DataFormatError(
                f"{where}: written in request-log format {version}; this leanscale reads format "
                f"{LOG_FORMAT_VERSION} at most. Upgrade leanscale to replay it.")

        def field_of(name: str, check, expected: str):
            v = obj.get(name)
            if v is not None and not check(v):
                raise DataFormatError(f"{where}: {name!r} must be {expected}. Got {json.dumps(v)[:60]}.")
            return v

        is_str = lambda v: isinstance(v, str)  # noqa: E731
        prompt_sha = field_of("prompt_sha256", lambda v: isinstance(v, str) and bool(_HASH.match(v)),
                              "'sha256:' and 64 lowercase hex digits")
        called = field_of("models_called", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
                          "a list of model names")
        cost = field_of("cost_usd", _num_or_none, "a number >= 0 or null")
        casc = field_of("cascade", lambda v: isinstance(v, dict), "an object")
        steps = []
        if casc is not None:
            raw_steps = casc.get("steps")
            if raw_steps is not None and not (isinstance(raw_steps, list) and all(isinstance(s, dict)
                                                                                   for s in raw_steps)):
                raise DataFormatError(f"{where}: 'cascade.steps' must be a list of objects.")
            for s in raw_steps or []:
                if not isinstance(s.get("model"), str) or not _num_or_none(s.get("cost_usd")):
                    raise DataFormatError(f"{where}: each of 'cascade.steps' needs a 'model' name and a "
                                          "'cost_usd' >= 0 or null.")
                steps.append(s)
        requests.append(LoggedRequest(
            line=no, request_id=field_of("request_id", is_str, "a string"),
            policy=field_of("policy", is_str, "a string"), status=field_of("status", is_str, "a string"),
            model=field_of("model", is_str, "a string"), models_called=list(called or []),
            cost_usd=None if cost is None else float(cost), prompt=field_of("prompt", is_str, "a string"),
            prompt_sha256=prompt_sha, answer=field_of("answer", is_str, "a string"), usage=_tokens(obj.get("usage")),
            cascade_steps=steps))
    if pending_error is not None:
        notes.append(f"skipped a truncated last line of the request log (line {pending_line}, no newline: the "
                     "gateway stopped mid-write)")
    return RequestLog(str(path), requests, notes)


# ------------------------------------------------------------------------------ outcomes

@dataclass
class Outcomes:
    """A parsed outcomes file: ``rows`` with ``key`` (a prompt hash, or ``None`` with a request
    id), ``prompt`` (text or None), ``request_id``, ``model``, ``quality`` (float), ``correct``
    (bool or None for scores), ``answer``, ``cost_usd``, ``tokens`` and ``where`` (file, line)."""

    path: str
    rows: list[dict]
    kind: str  # "correct" or "score"


def _parse_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise DataFormatError(f"{where}: column 'correct' must be true or false. Got {json.dumps(v)[:40]}.")


def _parse_number(v: Any, where: str, col: str, *, nonneg: bool) -> float:
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise DataFormatError(f"{where}: column {col!r} must be a number. Got {v[:40]!r}.") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonneg and v < 0):
        raise DataFormatError(f"{where}: column {col!r} must be a finite number{' >= 0' if nonneg else ''}. "
                              f"Got {json.dumps(v)[:40]}.")
    return float(v)


def read_outcomes(path: str | os.PathLike, *, format: str | None = None, max_bytes: int = MAX_OUTCOMES_BYTES,
                  max_line_bytes: int = MAX_LINE_BYTES) -> Outcomes:
    """Parse an outcomes file (JSONL or CSV, see the module docstring).

    Args:
        path: the file.
        format: "jsonl" or "csv" (default: from the extension; ``.csv`` is CSV, anything else JSONL).
        max_bytes, max_line_bytes: size limits.

    Raises:
        DataFormatError: a malformed row; the message names the file, the line and the column.
    """
    path = Path(path)
    fmt = format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    if fmt not in ("csv", "jsonl"):
        raise InvalidParameterError(f"The 'format' parameter of read_outcomes must be 'csv' or 'jsonl'. Got {format!r}.")
    _check_size(path, max_bytes, "outcomes file")
    records: list[tuple[str, dict]] = []
    if fmt == "jsonl":
        for no, text, _ in _iter_lines(path, "The outcomes file", max_line_bytes):
            where = f"The outcomes file {str(path)!r}, line {no}"
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                raise DataFormatError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)} at column "
                                      f"{getattr(exc, 'colno', '?')}).") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: must be a JSON object. Got {type(obj).__name__}.")
            records.append((where, obj))
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"The outcomes file {str(path)!r} is not UTF-8 (byte {exc.start}).") from None
        csv.field_size_limit(max_line_bytes)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            header = reader.fieldnames or []
            if len(set(header)) != len(header):
                raise DataFormatError(f"The outcomes file {str(path)!r}: the header repeats a column name.")
            for row in reader:
                where = f"The outcomes file {str(path)!r}, line {reader.line_num}"
                if None in row:
                    raise DataFormatError(f"{where}: more values than the header's {len(header)} columns.")
                records.append((where, {k: (v if v != "" else None) for k, v in row.items()}))
        except csv.Error as exc:
            raise DataFormatError(f"The outcomes file {str(path)!r}, line {reader.line_num}: not CSV ({exc}).") from None
    if not records:
        raise DataFormatError(f"The outcomes file {str(path)!r} holds no rows.")
    rows: list[dict] = []
    kinds: set[str] = set()
    seen: dict[tuple, tuple[float, str]] = {}
    for where, obj in records:
        keys = [k for k in ("prompt", "prompt_sha256", "request_id") if obj.get(k) is not None]
        if len(keys) != 1:
            raise DataFormatError(f"{where}: needs exactly one of the columns 'prompt', 'prompt_sha256', "
                                  f"'request_id'. Got {keys or 'none'}.")
        for col in ("prompt", "prompt_sha256", "request_id", "model", "answer"):
            if obj.get(col) is not None and not isinstance(obj[col], str):
                raise DataFormatError(f"{where}: column {col!r} must be a string. Got {json.dumps(obj[col])[:40]}.")
        sha = obj.get("prompt_sha256")
        if sha is not None and not _HASH.match(sha):
            raise DataFormatError(f"{where}: column 'prompt_sha256' must be 'sha256:' and 64 lowercase hex digits "
                                  f"(the log's hash). Got {sha[:80]!r}.")
        model = obj.get("model")
        if model is None and obj.get("request_id") is None:
            raise DataFormatError(f"{where}: column 'model' is required (it may be left out only with 'request_id').")
        has_c, has_s = obj.get("correct") is not None, obj.get("score") is not None
        if has_c == has_s:
            raise DataFormatError(f"{where}: needs exactly one of the columns 'correct' (true/false) and 'score' "
                                  "(a number).")
        if has_c:
            correct = _parse_bool(obj["correct"], where)
            quality = float(correct)
            kinds.add("correct")
        else:
            correct = None
            quality = _parse_number(obj["score"], where, "score", nonneg=False)
            kinds.add("score")
        cost = None if obj.get("cost_usd") is None else _parse_number(obj["cost_usd"], where, "cost_usd", nonneg=True)
        pt, ct = obj.get("prompt_tokens"), obj.get("completion_tokens")
        if (pt is None) != (ct is None):
            raise DataFormatError(f"{where}: columns 'prompt_tokens' and 'completion_tokens' go together. Got only one.")
        tokens = None if pt is None else {
            "prompt_tokens": _parse_number(pt, where, "prompt_tokens", nonneg=True),
            "completion_tokens": _parse_number(ct, where, "completion_tokens", nonneg=True)}
        key = prompt_hash(obj["prompt"]) if obj.get("prompt") is not None else sha
        row = {"key": key, "prompt": obj.get("prompt"), "request_id": obj.get("request_id"), "model": model,
               "quality": quality, "correct": correct, "answer": obj.get("answer"), "cost_usd": cost,
               "tokens": tokens, "where": where}
        ident = (key, obj.get("request_id"), model)
        if ident in seen and seen[ident][0] != quality:
            raise DataFormatError(f"{where}: contradicts {seen[ident][1].split(', ', 1)[-1]} (same prompt and model, "
                                  f"another quality).")
        seen.setdefault(ident, (quality, where))
        rows.append(row)
    if len(kinds) > 1:
        raise DataFormatError(f"The outcomes file {str(path)!r} mixes 'correct' and 'score' rows; use one kind.")
    return Outcomes(str(path), rows, kinds.pop())


# ------------------------------------------------------------------------------ the table

def _price_fn(prices: Any):
    """``cost(model, prompt_tokens, completion_tokens)`` or None, from a GatewayConfig, a YAML
    path or ``{model: (input_per_1k, output_per_1k)}``."""
    if prices is None:
        return None, None
    from .config import GatewayConfig

    if isinstance(prices, (str, os.PathLike)):
        prices = GatewayConfig.from_yaml(prices)
    if isinstance(prices, GatewayConfig):
        cfg = prices
        names = set(cfg.model_names)
        return (lambda m, p, c: cfg.model(m).cost(p, c) if m in names else None), cfg
    if isinstance(prices, Mapping):
        table = {}
        for m, v in prices.items():
            try:
                a, b = (float(x) for x in v)
            except (TypeError, ValueError):
                raise InvalidParameterError(
                    "The 'prices' parameter must be a GatewayConfig, its YAML path or {model: (input_price_per_1k, "
                    f"output_price_per_1k)}}. Got {m!r}: {v!r:.60}.") from None
            if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0):
                raise InvalidParameterError(f"The 'prices' parameter has a price < 0 or not finite for {m!r}.")
            table[m] = (a, b)
        return (lambda m, p, c: (p * table[m][0] + c * table[m][1]) / 1000.0 if m in table else None), None
    raise InvalidParameterError("The 'prices' parameter must be a GatewayConfig, its YAML path or {model: "
                                f"(input_price_per_1k, output_price_per_1k)}}. Got {type(prices).__name__}.")


def _as_log(log: Any) -> RequestLog:
    if isinstance(log, RequestLog):
        return log
    if isinstance(log, (str, os.PathLike)):
        return read_request_log(log)
    raise InvalidParameterError(f"The 'log' parameter must be a RequestLog or a path. Got {type(log).__name__}.")


def _as_outcomes(outcomes: Any) -> Outcomes:
    if isinstance(outcomes, Outcomes):
        return outcomes
    if isinstance(outcomes, (str, os.PathLike)):
        return read_outcomes(outcomes)
    raise InvalidParameterError(
        f"The 'outcomes' parameter must be an Outcomes or a path. Got {type(outcomes).__name__}.")


@dataclass
class _Table:
    """Per logged request (rows) x model (columns): quality, cost; per prompt key: text, answers."""

    models: list[str]
    reqs: list[LoggedRequest]  # the requests kept (all models' outcomes known)
    keys: list[str]
    quality: np.ndarray  # (n, M)
    cost: np.ndarray  # (n, M)
    tokens: dict  # key -> {model: (prompt_tokens, completion_tokens)}
    text: dict  # key -> prompt text
    answers: dict  # key -> {model: answer}
    correct: dict  # (key, model) -> bool or None
    notes: list[str]
    n_logged: int
    n_no_prompt: int
    n_excluded: int


def _build_table(log: RequestLog, out: Outcomes, price, models: Sequence[str] | None) -> _Table:
    notes = list(log.notes)
    by_id = {r.request_id: r for r in log.requests if r.request_id is not None}
    quality: dict[tuple[str, str], float] = {}
    correct: dict[tuple[str, str], bool | None] = {}
    text: dict[str, str] = {}
    answers: dict[str, dict[str, str]] = {}
    costs: dict[tuple[str, str], list[float]] = {}
    tokens: dict[str, dict[str, tuple[float, float]]] = {}
    unknown_ids = 0
    for row in out.rows:
        key, model = row["key"], row["model"]
        if row["request_id"] is not None:
            req = by_id.get(row["request_id"])
            if req is None or req.key is None:
                unknown_ids += 1
                continue
            key = req.key
            model = model or req.model
            if model is None:
                raise DataFormatError(f"{row['where']}: column 'model' is required: request "
                                      f"{row['request_id']!r} was answered by no model.")
        quality[(key, model)] = row["quality"]
        correct[(key, model)] = row["correct"]
        if row["prompt"] is not None:
            text[key] = row["prompt"]
        if row["answer"] is not None:
            answers.setdefault(key, {})[model] = row["answer"]
        if row["cost_usd"] is not None:
            costs.setdefault((key, model), []).append(row["cost_usd"])
        elif row["tokens"] is not None:
            t = row["tokens"]
            tokens.setdefault(key, {})[model] = (t["prompt_tokens"], t["completion_tokens"])
            c = price(model, t["prompt_tokens"], t["completion_tokens"]) if price else None
            if c is not None:
                costs.setdefault((key, model), []).append(c)
    if unknown_ids:
        notes.append(f"{unknown_ids} outcome rows name a request_id that is not in the log (or has no prompt): "
                     "ignored")
    # the log's own costs, answers and texts (outcomes rows take precedence for costs)
    log_costs: dict[tuple[str, str], list[float]] = {}
    for r in log.requests:
        key = r.key
        if key is None:
            continue
        if r.prompt is not None:
            text.setdefault(key, r.prompt)
        if r.model is not None and r.answer is not None and r.status == "ok":
            answers.setdefault(key, {}).setdefault(r.model, r.answer)
        if r.model is not None and r.models_called == [r.model]:
            if r.usage is not None:
                tokens.setdefault(key, {}).setdefault(r.model, (r.usage["prompt_tokens"], r.usage["completion_tokens"]))
            c = price(r.model, r.usage["prompt_tokens"], r.usage["completion_tokens"]) \
                if (price and r.usage is not None) else None
            c = c if c is not None else r.cost_usd
            if c is not None:
                log_costs.setdefault((key, r.model), []).append(c)
        for s in r.cascade_steps:
            st = _tokens(s.get("usage")) or _tokens(s)
            c = price(s["model"], st["prompt_tokens"], st["completion_tokens"]) if (price and st) else None
            c = c if c is not None else s.get("cost_usd")
            if c is not None and s.get("decision") != "failed":
                log_costs.setdefault((key, s["model"]), []).append(float(c))
    for k, v in log_costs.items():
        costs.setdefault(k, v)
    all_models = sorted({m for (_, m) in quality})
    if models is None:
        models = all_models
    else:
        models = list(models)
        missing = [m for m in models if m not in all_models]
        if missing:
            raise InvalidParameterError(f"The 'models' parameter names {missing}, which have no outcomes in "
                                        f"{out.path!r} (models with outcomes: {all_models}).")
    if len(models) < 1:
        raise DataFormatError(f"The outcomes file {out.path!r} names no model.")
    with_prompt = [r for r in log.requests if r.key is not None]
    kept = [r for r in with_prompt if all((r.key, m) in quality for m in models)]
    n = len(kept)
    if n == 0:
        raise DataFormatError(
            f"No request of the log {log.path!r} has outcomes for every model of {models} in {out.path!r} "
            f"({len(with_prompt)} requests with a prompt; the outcomes must name their prompt text, its "
            "prompt_sha256 or their request_id).")
    keys = [r.key for r in kept]
    Q = np.array([[quality[(k, m)] for m in models] for k in keys], dtype=np.float64)
    C = np.full((n, len(models)), np.nan)
    for i, k in enumerate(keys):
        for j, m in enumerate(models):
            v = costs.get((k, m))
            if v:
                C[i, j] = float(np.mean(v))
    for j, m in enumerate(models):
        miss = np.isnan(C[:, j])
        if miss.all():
            raise DataFormatError(
                f"No cost is known for model {m!r}: the log has no request answered by {m!r} alone with a cost, "
                "and the outcomes give neither 'cost_usd' nor token counts (with --config prices) for it.")
        if miss.any():
            C[miss, j] = C[~miss, j].mean()
            notes.append(f"cost of {m!r} imputed (its mean known cost) for {int(miss.sum())} of {n} requests")
    return _Table(models, kept, keys, Q, C, tokens, text, answers, correct, notes, len(log.requests),
                  len(log.requests) - len(with_prompt), len(with_prompt) - n)


# ------------------------------------------------------------------------------ replay

@dataclass
class ReplayResult:
    """The frontier: ``points`` (dicts: policy, knob, quality, cost_usd, share {model: share of
    calls}, strong_share, n), ``gap`` (per swept policy, two models only: the share of the
    weak-to-strong quality gap recovered at 20% / 50% strong calls and its area APGR),
    ``models`` (cheapest first), ``counts`` and ``notes``."""

    points: list[dict]
    gap: dict
    models: list[str]
    counts: dict
    notes: list[str]
    quality_kind: str

    def to_dict(self) -> dict:
        return {"models": self.models, "quality": self.quality_kind, "counts": self.counts, "points": self.points,
                "gap_recovered": self.gap, "notes": self.notes}

    def format_table(self) -> str:
        """The frontier as a readable text table."""
        q = "accuracy" if self.quality_kind == "correct" else "score"
        head = ["policy", "knob", q, "USD/request", "calls per model", "n"]
        rows = []
        for p in self.points:
            share = " ".join(f"{m}={s:.0%}" for m, s in p["share"].items())
            knob = "" if p["knob"] is None else (f"{p['knob']:g}" if isinstance(p["knob"], float) else str(p["knob"]))
            qual = f"{p['quality']:.2%}" if self.quality_kind == "correct" else f"{p['quality']:.4g}"
            rows.append([p["policy"], knob, qual, f"{p['cost_usd']:.6g}", share, str(p["n"])])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        c = self.counts
        lines.append("")
        lines.append(f"{c['requests_replayed']} requests replayed of {c['requests_logged']} logged "
                     f"({c['excluded_without_outcomes']} without outcomes for every model, {c['without_prompt']} "
                     "without a prompt: excluded)")
        for name, g in self.gap.items():
            lines.append(f"gap recovered ({self.models[0]} -> {self.models[-1]}), {name}: "
                         f"{_pct(g['at_20'])} at 20% strong calls, {_pct(g['at_50'])} at 50%, APGR {_pct(g['apgr'])}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _point(policy: str, knob: Any, quality: np.ndarray, cost: np.ndarray, calls: np.ndarray, models: list[str],
           strong: int) -> dict:
    """calls: (n, M) expected number of calls of each model per request."""
    n = len(quality)
    per_model = calls.sum(axis=0)
    total = per_model.sum()
    share = {m: float(per_model[j] / total) if total else 0.0 for j, m in enumerate(models)}
    return {"policy": policy, "knob": knob, "quality": float(np.mean(quality)), "cost_usd": float(np.mean(cost)),
            "share": share, "strong_share": float(np.mean(calls[:, strong] > 0)) if calls.size else 0.0, "n": n}


def _gap(points: list[dict], q_weak: float, q_strong: float) -> dict:
    s = np.array([p["strong_share"] for p in points])
    q = np.array([p["quality"] for p in points])
    order = np.lexsort((q, s))
    s, q = s[order], q[order]
    us = np.unique(s)
    uq = np.array([q[s == v].max() for v in us])  # the best point at each share
    gap = q_strong - q_weak
    if abs(gap) < 1e-12:
        return {"at_20": None, "at_50": None, "apgr": None}
    pgr = (uq - q_weak) / gap

    def at(x: float) -> float | None:
        if x < us[0] - 1e-9 or x > us[-1] + 1e-9:
            return None
        return float(np.interp(x, us, pgr))

    apgr = float(np.sum(np.diff(us) * (pgr[1:] + pgr[:-1]) / 2)) if len(us) > 1 and us[0] <= 1e-9 and us[-1] >= 1 - 1e-9 else None
    return {"at_20": at(0.2), "at_50": at(0.5), "apgr": apgr}


def replay(log: Any, outcomes: Any, prices: Any = None, *, policies: Sequence[str] = (
           "always", "random", "router", "cascade", "logged"), router: Any = None, scorer: Any = None,
           cascade_models: Sequence[str] | None = None, models: Sequence[str] | None = None,
           router_knobs: Sequence[float] = ROUTER_KNOBS, thresholds: Sequence[float] = CASCADE_THRESHOLDS,
           random_fractions: Sequence[float] = RANDOM_FRACTIONS) -> ReplayResult:
    """The cost-quality frontier of each policy on the logged traffic.

    Args:
        log: a :class:`RequestLog` or the log's path.
        outcomes: an :class:`Outcomes` or the outcomes file's path.
        prices: a :class:`~leanscale.cascade.gateway.GatewayConfig` (or its YAML path) or
            ``{model: (input_price_per_1k, output_price_per_1k)}``: prices token counts; a config
            also gives the router (``router.path``), the scorer and the cascade's models.
        policies: which to replay: "always" (each model alone), "random" (the strong model with
            probability ``f``, in expectation), "router" (the saved router re-deciding each prompt,
            at each of ``router_knobs``: strong fractions; with more than two models the budget
            ``c_weak + f (c_strong - c_weak)``), "cascade" (the cheap model's answers scored by the
            saved scorer, escalated below each of ``thresholds``), "logged" (what the gateway did).
        router: a saved router folder or :class:`RouterPolicy` (default: the config's).
        scorer: a saved scorer folder or :class:`AnswerScorer` (default: the config's).
        cascade_models: the cascade's models, cheapest first (default: the config's, else every
            model by mean cost).
        models: the models to replay (default: every model of the outcomes).

    Returns:
        A :class:`ReplayResult`; what could not be replayed (no prompt texts for the router, no
        answers or no scorer for the cascade) is said in its ``notes``.
    """
    known = {"always", "random", "router", "cascade", "logged"}
    if isinstance(policies, str) or not set(policies) <= known:
        raise InvalidParameterError(f"The 'policies' parameter of replay must be a list of {sorted(known)}. "
                                    f"Got {policies!r}.")
    for name, knobs in (("router_knobs", router_knobs), ("thresholds", thresholds),
                        ("random_fractions", random_fractions)):
        if isinstance(knobs, str) or not all(isinstance(k, (int, float)) and not isinstance(k, bool)
                                             and 0 <= k <= 1 for k in knobs):
            raise InvalidParameterError(f"The {name!r} parameter of replay must be numbers in [0, 1]. Got {knobs!r:.80}.")
    log, outcomes = _as_log(log), _as_outcomes(outcomes)
    price, cfg = _price_fn(prices)
    t = _build_table(log, outcomes, price, models)
    notes = t.notes
    mean_cost = t.cost.mean(axis=0)
    order = sorted(range(len(t.models)), key=lambda j: (mean_cost[j], t.models[j]))
    names = [t.models[j] for j in order]  # cheapest first
    Q, C = t.quality[:, order], t.cost[:, order]
    n, M = Q.shape
    strong = M - 1
    points: list[dict] = []
    swept: dict[str, list[dict]] = {}
    if "always" in policies:
        for j, m in enumerate(names):
            calls = np.zeros((n, M))
            calls[:, j] = 1
            points.append(_point(f"always-{m}", None, Q[:, j], C[:, j], calls, names, strong))
    if "random" in policies and M >= 2:
        pts = []
        for f in random_fractions:
            f = float(f)
            calls = np.zeros((n, M))
            calls[:, 0], calls[:, strong] = 1 - f, f
            p = _point("random", f, (1 - f) * Q[:, 0] + f * Q[:, strong], (1 - f) * C[:, 0] + f * C[:, strong],
                       calls, names, strong)
            p["strong_share"] = f  # in expectation
            pts.append(p)
        points += pts
        swept["random"] = pts
    if "router" in policies:
        pts = _replay_router(t, names, Q, C, router, cfg, router_knobs, notes)
        points += pts
        if pts:
            swept["leanscale-router"] = pts
    if "cascade" in policies:
        pts = _replay_cascade(t, names, Q, C, scorer, cfg, cascade_models, thresholds, notes)
        points += pts
        if pts:
            swept["leanscale-cascade"] = pts
    if "logged" in policies:
        points += _replay_logged(t, names, Q, strong, notes)
    gap = {}
    if M == 2:
        for name, pts in swept.items():
            gap[name] = _gap(pts, float(Q[:, 0].mean()), float(Q[:, strong].mean()))
    counts = {"requests_logged": t.n_logged, "without_prompt": t.n_no_prompt,
              "excluded_without_outcomes": t.n_excluded, "requests_replayed": n, "prompts": len(set(t.keys))}
    return ReplayResult(points, gap, names, counts, notes, outcomes.kind)


def _replay_router(t: _Table, names, Q, C, router, cfg, knobs, notes) -> list[dict]:
    from .router_policy import RouterPolicy

    if router is None and cfg is not None and cfg.router is not None:
        router = cfg.router.path
    if router is None:
        notes.append("leanscale-router: not replayed (no router: give --config with router.path, or router=)")
        return []
    policy = router if isinstance(router, RouterPolicy) else RouterPolicy.load(router)
    if cfg is not None:
        policy.use_prices(lambda m, p, c: cfg.model(m).cost(p, c))
    rmodels = policy.models
    missing = [m for m in rmodels if m not in names]
    if missing:
        notes.append(f"leanscale-router: not replayed (its models {missing} have no outcomes)")
        return []
    no_text = sum(k not in t.text for k in t.keys)
    if no_text:
        notes.append(f"leanscale-router: not replayed ({no_text} requests have only a prompt hash: log with "
                     "prompts: text, or give the prompt text in the outcomes file)")
        return []
    ukeys = sorted(set(t.keys))
    P = policy.router._proba_matrix([t.text[k] for k in ukeys], "replay")  # (u, models) in router order
    row = {k: i for i, k in enumerate(ukeys)}
    P = P[[row[k] for k in t.keys]]
    col = [names.index(m) for m in rmodels]
    n, M = Q.shape
    pts = []
    for f in knobs:
        f = float(f)
        if len(rmodels) == 2:
            gains = P[:, rmodels.index(policy.strong)] - P[:, rmodels.index(policy.weak)]
            thr = policy.threshold(f)
            pick = np.where(gains > thr, rmodels.index(policy.strong), rmodels.index(policy.weak))
        else:
            cost = np.array([policy.costs[m] for m in rmodels])
            budget = policy.costs[policy.weak] + f * (policy.costs[policy.strong] - policy.costs[policy.weak])
            lam = policy._lambda(budget)
            by_cost = sorted(range(len(rmodels)), key=lambda j: cost[j])
            util = P[:, by_cost] - lam * cost[by_cost]
            pick = np.asarray(by_cost)[np.argmax(util, axis=1)]
        j = np.asarray(col)[pick]  # column in `names`
        calls = np.zeros((n, M))
        calls[np.arange(n), j] = 1
        pts.append(_point("leanscale-router", f, Q[np.arange(n), j], C[np.arange(n), j], calls, names, M - 1))
    return pts


def _replay_cascade(t: _Table, names, Q, C, scorer, cfg, cascade_models, thresholds, notes) -> list[dict]:
    from .scorer import AnswerScorer

    if cascade_models is None and cfg is not None and cfg.cascade is not None:
        cascade_models = cfg.cascade.models
    chain = list(cascade_models) if cascade_models is not None else list(names)
    if scorer is None and cfg is not None and cfg.cascade is not None:
        scorer = cfg.cascade.scorer
    if len(chain) < 2:
        return []
    missing = [m for m in chain if m not in names]
    if missing:
        notes.append(f"leanscale-cascade: not replayed (its models {missing} have no outcomes)")
        return []
    if scorer is None:
        notes.append("leanscale-cascade: not replayed (no scorer: give --config with cascade.scorer, or scorer=; "
                     "train one with `leanscale gateway train`)")
        return []
    gated = chain[:-1]
    no_answer = sum(any(m not in t.answers.get(k, {}) for m in gated) for k in t.keys)
    no_text = sum(k not in t.text for k in t.keys)
    if no_answer or no_text:
        notes.append(f"leanscale-cascade: not replayed (it needs the prompt text and the answer of {gated}: "
                     f"{no_answer} requests lack an answer, {no_text} a prompt text; log with prompts: text or give "
                     "'prompt' and 'answer' in the outcomes file)")
        return []
    sc = scorer if isinstance(scorer, AnswerScorer) else AnswerScorer.load(scorer)
    ukeys = sorted(set(t.keys))
    row = {k: i for i, k in enumerate(ukeys)}
    idx = [row[k] for k in t.keys]
    conf = np.stack([sc.predict_proba([t.text[k] for k in ukeys], [t.answers[k][m] for k in ukeys])[idx]
                     for m in gated], axis=1)  # (n, len(gated))
    n, M = Q.shape
    cols = [names.index(m) for m in chain]
    pts = []
    for thr in thresholds:
        thr = float(thr)
        accept = conf >= thr
        stop = np.where(accept.any(axis=1), accept.argmax(axis=1), len(gated))  # index into chain
        calls = np.zeros((n, M))
        for s in range(len(chain)):
            calls[stop >= s, cols[s]] = 1
        final = np.asarray(cols)[stop]
        cost = (calls * C).sum(axis=1)
        p = _point("leanscale-cascade", thr, Q[np.arange(n), final], cost, calls, names, M - 1)
        pts.append(p)
    notes.append("leanscale-cascade: replayed with the trained scorer alone (log-probabilities are not logged)")
    return pts


def _replay_logged(t: _Table, names, Q, strong, notes) -> list[dict]:
    """What the gateway did: the answering model's quality, the logged cost, per logged policy."""
    rows = [(i, r) for i, r in enumerate(t.reqs) if r.status == "ok" and r.model in names]
    other = len(t.reqs) - len(rows)
    if other:
        notes.append(f"logged: {other} replayed requests failed or were answered by no replayed model "
                     "(a rule, a cache hit): left out of the logged points")
    if not rows:
        return []
    groups: dict[str, list] = {"all": rows}
    for i, r in rows:
        groups.setdefault(r.policy or "?", []).append((i, r))
    if len(groups) == 2:  # one policy: the 'all' point is it
        groups = {k: v for k, v in groups.items() if k != "all"}
    pts = []
    no_cost = 0
    for name, items in groups.items():
        q = np.array([Q[i, names.index(r.model)] for i, r in items])
        costs = np.array([r.cost_usd if r.cost_usd is not None else np.nan for _, r in items])
        if name == "all":
            no_cost = int(np.isnan(costs).sum())
        calls = np.zeros((len(items), len(names)))
        for a, (_, r) in enumerate(items):
            for m in r.models_called:
                if m in names:
                    calls[a, names.index(m)] += 1
        p = _point("logged", name, q, np.nan_to_num(costs, nan=0.0), calls, names, strong)
        if np.isnan(costs).all():
            p["cost_usd"] = None
        elif np.isnan(costs).any():
            p["cost_usd"] = float(np.nanmean(costs))
        pts.append(p)
    if no_cost:
        notes.append(f"logged: {no_cost} requests have no logged cost (the backend sent no usage): the logged "
                     "mean cost is over the others")
    return pts


# ------------------------------------------------------------------------------ training

def train_from_log(log: Any, outcomes: Any, out_dir: str | os.PathLike, prices: Any = None, *,
                   models: Sequence[str] | None = None, cheap_model: str | None = None,
                   score_threshold: float | None = None, features: str = "tfidf", seed: int = 0) -> dict:
    """Train the gateway's router (and the cascade's scorer when the cheap model's answers are
    known) from the logged prompts and their outcomes; each distinct prompt counts once.

    Args:
        log, outcomes, prices, models: as in :func:`replay`.
        out_dir: the folder to write: ``out_dir/router`` (the config's ``router.path``) and
            ``out_dir/scorer`` (``cascade.scorer``).
        cheap_model: the model whose answers the scorer judges (default: the config's first
            cascade model, else the cheapest model).
        score_threshold: with a ``score`` outcomes file, a score >= this counts as correct
            (required then).
        features, seed: the router's features ("tfidf" or "minilm") and seed.

    Returns:
        ``{"router": folder, "scorer": folder or None, "prompts": n, "config": {...}, "notes": [...]}``
        where ``config`` is the YAML snippet (as a dict) pointing at the folders.
    """
    from .policies import train_router, train_scorer

    log, outcomes = _as_log(log), _as_outcomes(outcomes)
    if outcomes.kind == "score":
        if score_threshold is None or isinstance(score_threshold, bool) or not isinstance(
                score_threshold, (int, float)) or not math.isfinite(score_threshold):
            raise InvalidParameterError(
                f"The 'score_threshold' parameter of train_from_log must be a number when the outcomes file "
                f"{outcomes.path!r} holds scores (a score >= it counts as correct). Got {score_threshold!r}.")
    price, cfg = _price_fn(prices)
    t = _build_table(log, outcomes, price, models)
    notes = list(t.notes)
    ukeys, seen = [], set()
    for k in t.keys:
        if k not in seen:
            seen.add(k)
            ukeys.append(k)
    no_text = [k for k in ukeys if k not in t.text]
    if no_text:
        notes.append(f"{len(no_text)} prompts have only a hash (no text): left out of training")
    ukeys = [k for k in ukeys if k in t.text]
    if len(ukeys) < 2:
        raise DataFormatError(
            f"train_from_log needs at least 2 distinct prompts with their text and outcomes for every model; got "
            f"{len(ukeys)} (log with prompts: text, or give 'prompt' in the outcomes file {outcomes.path!r}).")
    row = {k: i for i, k in enumerate(t.keys)}  # the last request of each key
    prompts = [t.text[k] for k in ukeys]
    idx = [row[k] for k in ukeys]
    Q, C = t.quality[idx], t.cost[idx]
    ok = Q >= score_threshold if outcomes.kind == "score" else Q.astype(bool)
    outs = {m: ok[:, j] for j, m in enumerate(t.models)}
    costs = {m: np.maximum(C[:, j], 1e-12) for j, m in enumerate(t.models)}
    out_dir = Path(out_dir)
    result: dict[str, Any] = {"router": None, "scorer": None, "prompts": len(prompts), "config": {}, "notes": notes}
    kw: dict[str, Any] = {}
    if all(all(m in t.tokens.get(k, {}) for m in t.models) for k in ukeys):
        kw = {"prompt_tokens": [float(np.mean([t.tokens[k][m][0] for m in t.models])) for k in ukeys],
              "completion_tokens": {m: [t.tokens[k][m][1] for k in ukeys] for m in t.models}}
    else:
        notes.append("router: no token counts for every (prompt, model): it keeps the logged mean costs "
                     "(a price change in the config then needs retraining)")
    if len(t.models) >= 2:
        result["router"] = str(train_router(prompts, outs, costs, out_dir / "router", features=features, seed=seed,
                                            **kw))
        result["config"]["router"] = {"path": result["router"]}
    else:
        notes.append("router: not trained (outcomes for one model only)")
    if cheap_model is None:
        if cfg is not None and cfg.cascade is not None:
            cheap_model = cfg.cascade.models[0]
        else:
            cheap_model = min(t.models, key=lambda m: (float(t.cost[:, t.models.index(m)].mean()), m))
    if cheap_model not in t.models:
        raise InvalidParameterError(f"The 'cheap_model' parameter of train_from_log must be one of {t.models}. "
                                    f"Got {cheap_model!r}.")
    have = [k for k in ukeys if cheap_model in t.answers.get(k, {})]
    if len(have) >= 2:
        j = t.models.index(cheap_model)
        sel = [ukeys.index(k) for k in have]
        train_scorer([t.text[k] for k in have], [t.answers[k][cheap_model] for k in have], ok[sel, j],
                     out_dir / "scorer")
        result["scorer"] = str(out_dir / "scorer")
        others = sorted((m for m in t.models if m != cheap_model), key=lambda m: float(t.cost[:, t.models.index(m)].mean()))
        result["config"]["cascade"] = {"models": [cheap_model, *others[-1:]], "scorer": result["scorer"]}
        if len(have) < len(ukeys):
            notes.append(f"scorer: trained on the {len(have)} of {len(ukeys)} prompts with {cheap_model!r}'s answer")
    else:
        notes.append(f"scorer: not trained (the answers of {cheap_model!r} are not known: log with prompts: text, "
                     "or give 'answer' in the outcomes file)")
    return result
