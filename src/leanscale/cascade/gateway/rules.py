"""Canned answers: regular-expression rules the gateway consults before calling any model.

A request whose messages match a rule is answered at once with the rule's text, as a complete
OpenAI ``chat.completion`` (or its ``chat.completion.chunk`` stream), ``model``
``"leanscale-rules"`` and zero cost. The YAML section::

    rules:
      - name: opening-hours                  # optional (default: "rules[i]"); unique
        pattern: '(?i)\\b(opening|business) hours\\b'
        answer: "We are open 9:00-17:00, Monday to Friday."
        roles: [user]                        # optional (default [user]): see below
        case_sensitive: false                # optional (default false)

Semantics:

* Patterns run on RE2 (``google-re2``, ``pip install 'leanscale[cascade]'``): linear time in the
  text whatever the pattern, so a crafted request cannot make a rule slow. RE2 has no
  back-references (``(a)\\1``) nor look-arounds (``(?=...)``) and bounds repetition counts
  (``{n}`` with n <= 1000) and the compiled program size; such patterns are refused when the
  config is read, with an error naming the rule. Patterns that are exponential on a
  backtracking engine (``(a+)+$``) are accepted: on RE2 they are linear.
* ``search`` semantics: the pattern may match anywhere in the text; anchor it with ``^``/``$``
  (``\\A``/``\\z``) or ``\\b`` as needed.
* ``roles``: for each listed role (``system``, ``developer``, ``user``, ``assistant``, ``tool``),
  the *last* message with that role is matched; the rule fires when any of them matches. The
  default ``[user]`` matches the last user message only (the question being asked). A message's
  ``content`` is its string, or the ``text`` parts of a list of parts joined with newlines;
  messages without text are skipped. For ``/v1/completions`` (:meth:`CannedRules.match_body`)
  a string ``prompt`` (or a one-element list) is the user message.
* ``case_sensitive: false`` (the default) matches letters in either case.
* The rules are tried in order; the first that matches answers. All rules with the same
  ``roles`` and ``case_sensitive`` run as one RE2 set (one pass over the text), so 1,000 rules
  cost about as much as one.

Bounds: at most :data:`MAX_RULES` (1,000) rules, patterns of at most :data:`MAX_PATTERN_CHARS`
(1,000) characters, answers of at most :data:`MAX_ANSWER_BYTES` (100,000 UTF-8 bytes).

The answer's ``usage`` counts *words* (whitespace-separated), not model tokens -- there is no
model, hence no tokenizer -- as :class:`~leanscale.cascade.gateway.testing.FakeOpenAIBackend`
does: ``prompt_tokens`` = the words of all the messages' text, ``completion_tokens`` = the
words of the answer (times ``n``), ``cost_usd`` = 0.0.

Interface for the app::

    rules = CannedRules.from_config(config_rules)         # check_rules_config is run inside
    rule = rules.match_body(body)                         # or rules.match(body["messages"])
    if rule is not None:
        if body.get("stream"):
            events = [sse(c) for c in completion_chunks(rule, body)] + [b"data: [DONE]\\n\\n"]
        else:
            answer = completion_json(rule, body)          # headers: x-leanscale-model: RULES_MODEL,
                                                          # x-leanscale-cost-usd: 0
"""

from __future__ import annotations

import contextlib
import difflib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from leanscale.cascade.stages import re2_text
from leanscale.core.errors import InvalidParameterError, MissingDependencyError

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_PATTERN_CHARS",
    "MAX_RULES",
    "RULES_MODEL",
    "CannedRules",
    "Rule",
    "check_rules_config",
    "completion_chunks",
    "completion_json",
    "completion_to_chunks",
    "count_words",
    "message_text",
]

RULES_MODEL = "leanscale-rules"
MAX_RULES = 1000
MAX_PATTERN_CHARS = 1000
MAX_ANSWER_BYTES = 100_000
ROLES = ("system", "developer", "user", "assistant", "tool")
_RULE_KEYS = {"name", "pattern", "answer", "roles", "case_sensitive"}
_CHUNK_CHARS = 4096  # content characters per stream chunk
_MAX_N = 128


@dataclass(frozen=True)
class Rule:
    """One canned answer: ``pattern`` (RE2, search semantics), the ``answer`` text, the ``roles``
    whose last message is matched, ``case_sensitive`` and the rule's ``name``."""

    name: str
    pattern: str
    answer: str
    roles: tuple[str, ...] = ("user",)
    case_sensitive: bool = False


def _re2_module():
    try:
        import re2  # google-re2: linear-time matching
    except ImportError as exc:
        raise MissingDependencyError(
            "the gateway's rules run on RE2 (linear time) and need google-re2. Install it with: "
            "pip install 'leanscale[cascade]'") from exc
    return re2


def _re2_options(re2, case_sensitive: bool):
    opts = re2.Options()
    opts.case_sensitive = case_sensitive
    opts.log_errors = False
    return opts


def _re2_error(exc: Exception) -> str:
    msg = exc.args[0] if exc.args else exc
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return str(msg)


# ------------------------------------------------------------------------------------ config
def _prefix(source: str | None) -> str:
    return f"{source}: " if source else ""


def _got(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f" Got a {type(value).__name__}."
    return f" Got {value!r:.200}."


def check_rules_config(value: Any, source: str | None = None,
                       error: type[Exception] = InvalidParameterError) -> list[dict]:
    """Check the ``rules:`` section of a gateway config; return it normalised.

    Every pattern is compiled with RE2 here, so a pattern RE2 refuses fails when the config is
    read, not on a request.

    Args:
        value: the section: a list of mappings with ``pattern`` and ``answer`` (required),
            ``name``, ``roles``, ``case_sensitive`` (optional). ``None`` means no rules.
        source: the config's name for messages (e.g. ``"gateway config 'gw.yaml'"``); none when
            None.
        error: the exception class raised (the config loader passes ``DataFormatError`` for a
            file, ``InvalidParameterError`` for a dict).

    Returns:
        a list of dicts with every key set (``name`` defaults to ``"rules[i]"``, ``roles`` to
        ``["user"]``, ``case_sensitive`` to False).

    Raises:
        ``error``: the message names the key path (``rules[2].pattern``) and the rule, says what
            was expected and what was received. MissingDependencyError: google-re2 is not
            installed (``pip install 'leanscale[cascade]'``).
    """
    p = _prefix(source)
    if value is None:
        return []
    if not isinstance(value, list):
        raise error(f"{p}rules must be a list of rules (each with 'pattern' and 'answer').{_got(value)}")
    if len(value) > MAX_RULES:
        raise error(f"{p}rules has {len(value)} rules; at most {MAX_RULES} are allowed.")
    re2 = _re2_module() if value else None
    out: list[dict] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(value):
        key = f"rules[{i}]"
        if not isinstance(raw, dict):
            raise error(f"{p}{key} must be a mapping with 'pattern' and 'answer'.{_got(raw)}")
        bad = [k for k in raw if not isinstance(k, str) or k not in _RULE_KEYS]
        if bad:
            hint = difflib.get_close_matches(str(bad[0]), sorted(_RULE_KEYS), n=1, cutoff=0.6)
            raise error(f"{p}unknown key {key}.{bad[0]!s:.100} (allowed: {', '.join(sorted(_RULE_KEYS))})."
                        + (f" Did you mean {hint[0]!r}?" if hint else ""))
        name = raw.get("name", key)
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise error(f"{p}{key}.name must be a non-empty string of at most 200 characters.{_got(name)}")
        if name in names:
            raise error(f"{p}{key}.name {name!r} is also the name of rules[{names[name]}]; rule names must be unique.")
        names[name] = i
        who = f"{key} (rule {name!r})" if name != key else key
        for needed in ("pattern", "answer"):
            if needed not in raw:
                raise error(f"{p}{who}: the key '{needed}' is missing.")
        pattern = raw["pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise error(f"{p}{who}.pattern must be a non-empty string (a regular expression).{_got(pattern)}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise error(f"{p}{who}.pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are allowed.")
        answer = raw["answer"]
        if not isinstance(answer, str) or not answer:
            raise error(f"{p}{who}.answer must be a non-empty string (the canned answer).{_got(answer)}")
        try:
            size = len(answer.encode("utf-8"))
        except UnicodeEncodeError:
            raise error(f"{p}{who}.answer is not valid Unicode text (a lone surrogate).") from None
        if size > MAX_ANSWER_BYTES:
            raise error(f"{p}{who}.answer is {size} bytes (UTF-8); at most {MAX_ANSWER_BYTES} are allowed.")
        roles = raw.get("roles", ["user"])
        if isinstance(roles, str):
            roles = [roles]
        if (not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r in ROLES for r in roles)
                or len(set(roles)) != len(roles)):
            raise error(f"{p}{who}.roles must be a non-empty list of distinct roles among "
                        f"{', '.join(ROLES)}.{_got(roles)}")
        case_sensitive = raw.get("case_sensitive", False)
        if not isinstance(case_sensitive, bool):
            raise error(f"{p}{who}.case_sensitive must be true or false.{_got(case_sensitive)}")
        try:
            pattern.encode("utf-8")
            re2.compile(pattern, _re2_options(re2, case_sensitive))
        except (UnicodeEncodeError, re2.error) as exc:  # a lone surrogate, or RE2's refusal
            reason = "not valid Unicode text" if isinstance(exc, UnicodeEncodeError) else _re2_error(exc)
            raise error(
                f"{p}{who}.pattern {pattern!r:.200} is refused by RE2 ({reason}). RE2 runs in linear time and so has "
                "no back-references or look-arounds, and allows repetition counts up to 1000 and a bounded "
                "program size; rewrite the pattern without them.") from None
        out.append({"name": name, "pattern": pattern, "answer": answer, "roles": list(roles),
                    "case_sensitive": case_sensitive})
    return out


# ------------------------------------------------------------------------------------ matching
def message_text(message: Any) -> str | None:
    """The text of a chat message: its ``content`` string, or the ``text`` of its ``text`` parts
    joined with newlines; None when it has no text (e.g. an assistant message with only tool calls)."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content
                 if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
        return "\n".join(parts) if parts else None
    return None


class CannedRules:
    """The configured rules, compiled. Build with :meth:`from_config`; thread-safe (read-only
    after construction; RE2 matching is re-entrant).

    Rules that share ``roles`` and ``case_sensitive`` form a group matched with one ``re2.Set``
    (one pass over the text); the first rule in config order among all groups' matches wins.
    """

    def __init__(self, rules: Sequence[Rule]):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._groups: list[tuple[tuple[str, ...], Any, list[int], list[Any]]] = []
        if not self.rules:
            return
        re2 = _re2_module()
        by_group: dict[tuple[tuple[str, ...], bool], list[int]] = {}
        for i, r in enumerate(self.rules):
            by_group.setdefault((r.roles, r.case_sensitive), []).append(i)
        for (roles, case_sensitive), idx in by_group.items():
            opts = _re2_options(re2, case_sensitive)
            compiled = [re2.compile(self.rules[i].pattern, opts) for i in idx]
            rset = None
            try:
                rset = re2.Set.SearchSet(opts)
                for i in idx:
                    rset.Add(self.rules[i].pattern)
                rset.Compile()
            except re2.error:  # pragma: no cover - the per-rule search below still works
                rset = None
            self._groups.append((roles, rset, idx, compiled))

    @classmethod
    def from_config(cls, value: Any, source: str | None = None,
                    error: type[Exception] = InvalidParameterError) -> CannedRules:
        """The rules of a config's ``rules:`` section (checked with :func:`check_rules_config`)."""
        return cls([Rule(name=d["name"], pattern=d["pattern"], answer=d["answer"], roles=tuple(d["roles"]),
                         case_sensitive=d["case_sensitive"])
                    for d in check_rules_config(value, source, error)])

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"CannedRules({len(self.rules)} rules)"

    def match(self, messages: Any) -> Rule | None:
        """The first rule (in config order) that matches ``messages`` (a chat request's list of
        message dicts), or None. Malformed messages are skipped, never an error."""
        if not self._groups or not isinstance(messages, list):
            return None
        last: dict[str, str] = {}
        for m in reversed(messages):
            if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in last:
                text = message_text(m)
                if text is not None:
                    last[m["role"]] = re2_text(text)  # a lone surrogate -> U+FFFD (RE2 takes UTF-8)
        best: int | None = None
        for roles, rset, idx, compiled in self._groups:
            if best is not None and idx[0] > best:
                continue  # this group cannot beat the rule already found
            for role in roles:
                text = last.get(role)
                if text is None:
                    continue
                hits = self._group_hits(rset, idx, compiled, text)
                if hits:
                    best = min(hits) if best is None else min(best, *hits)
        return None if best is None else self.rules[best]

    @staticmethod
    def _group_hits(rset, idx: list[int], compiled: list[Any], text: str) -> list[int]:
        if rset is not None:
            with contextlib.suppress(Exception):  # e.g. the set's DFA ran out of memory: search rule by rule
                return [idx[j] for j in rset.Match(text)]
        return [i for i, rx in zip(idx, compiled) if rx.search(text) is not None]

    def match_body(self, body: Any) -> Rule | None:
        """The rule matching a request body: its ``messages`` (chat), or its ``prompt``
        (completions: a string, or a list of one string, as a user message)."""
        if not isinstance(body, dict):
            return None
        if "messages" in body:
            return self.match(body["messages"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.match([{"role": "user", "content": prompt}])
        return None


# ------------------------------------------------------------------------------------ answers
def count_words(text: str) -> int:
    """Whitespace-separated words: the ``usage`` token counts of canned answers."""
    return len(text.split())


def _n(body: Any) -> int:
    n = body.get("n", 1) if isinstance(body, dict) else 1
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= _MAX_N else 1


def _prompt_words(body: Any) -> int:
    if not isinstance(body, dict):
        return 0
    if isinstance(body.get("messages"), list):
        return sum(count_words(t) for t in map(message_text, body["messages"]) if t)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return count_words(prompt)
    if isinstance(prompt, list):
        return sum(count_words(p) for p in prompt if isinstance(p, str))
    return 0


def completion_json(rule: Rule | str, request_body: Any, *, endpoint: str = "chat",
                    model: str = RULES_MODEL) -> dict:
    """The full OpenAI answer for a matched rule (or a plain answer text).

    Args:
        rule: the matched :class:`Rule` (or the answer text itself).
        request_body: the request (for ``n`` and the prompt's word count).
        endpoint: ``"chat"`` (a ``chat.completion``) or ``"completions"`` (a ``text_completion``).
        model: the ``model`` field (default ``"leanscale-rules"``).

    Returns:
        a JSON-ready dict that ``openai.types.chat.ChatCompletion`` (or ``openai.types.Completion``)
        validates: ``n`` choices with the answer and ``finish_reason`` ``"stop"``, and ``usage`` in
        words with ``cost_usd`` 0.0.
    """
    answer = rule.answer if isinstance(rule, Rule) else str(rule)
    n = _n(request_body)
    prompt_tokens, completion_tokens = _prompt_words(request_body), count_words(answer) * n
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens, "cost_usd": 0.0}
    created = int(time.time())
    if endpoint == "chat":
        return {"id": f"chatcmpl-rules-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": model, "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": answer, "refusal": None},
                             "logprobs": None, "finish_reason": "stop"} for i in range(n)],
                "usage": usage}
    if endpoint == "completions":
        return {"id": f"cmpl-rules-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                "model": model, "system_fingerprint": None,
                "choices": [{"index": i, "text": answer, "logprobs": None, "finish_reason": "stop"}
                            for i in range(n)],
                "usage": usage}
    raise InvalidParameterError(f"The 'endpoint' parameter of completion_json must be 'chat' or 'completions'. "
                                f"Got {endpoint!r} instead.")


def completion_to_chunks(completion: dict, include_usage: bool = False, chunk_chars: int = _CHUNK_CHARS) -> list[dict]:
    """The stream chunks of a complete answer (a ``chat.completion`` or ``text_completion`` dict,
    e.g. a canned answer or a cached one), as OpenAI streams them: for chat, a first chunk per
    choice with ``delta.role``, the content in pieces of at most ``chunk_chars`` characters, a
    last chunk with ``finish_reason``; then, when ``include_usage``, a chunk with empty
    ``choices`` and the ``usage``. Each chunk is written ``data: <json>\\n\\n`` and the stream
    ends with ``data: [DONE]\\n\\n`` (the caller writes both).

    Tool calls and function calls in a message are sent whole in one delta (index 0...).
    """
    chat = completion.get("object") != "text_completion"
    base = {"id": completion.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(completion.get("created") or time.time()), "model": completion.get("model") or "unknown",
            "system_fingerprint": completion.get("system_fingerprint")}
    chunks: list[dict] = []

    def chunk(index: int, delta_or_text: Any, finish: str | None = None) -> dict:
        if chat:
            choice = {"index": index, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    for pos, choice in enumerate(completion.get("choices") or []):
        index = choice.get("index", pos) if isinstance(choice, dict) else pos
        if not isinstance(choice, dict):
            continue
        finish = choice.get("finish_reason") or "stop"
        if chat:
            message = choice.get("message") or {}
            content = message.get("content")
            chunks.append(chunk(index, {"role": message.get("role") or "assistant", "content": ""}))
            if isinstance(content, str):
                for start in range(0, len(content), chunk_chars):
                    chunks.append(chunk(index, {"content": content[start:start + chunk_chars]}))
            extra = {}
            if message.get("tool_calls"):
                extra["tool_calls"] = [{**tc, "index": k} for k, tc in enumerate(message["tool_calls"])
                                       if isinstance(tc, dict)]
            if message.get("function_call"):
                extra["function_call"] = message["function_call"]
            if message.get("refusal"):
                extra["refusal"] = message["refusal"]
            if extra:
                chunks.append(chunk(index, extra))
            chunks.append(chunk(index, {}, finish))
        else:
            text = choice.get("text") or ""
            pieces = [text[s:s + chunk_chars] for s in range(0, len(text), chunk_chars)] or [""]
            for piece in pieces[:-1]:
                chunks.append(chunk(index, piece))
            chunks.append(chunk(index, pieces[-1], finish))
    if include_usage and isinstance(completion.get("usage"), dict):
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return chunks


def completion_chunks(rule: Rule | str, request_body: Any, *, endpoint: str = "chat",
                      model: str = RULES_MODEL) -> list[dict]:
    """The stream of a matched rule: :func:`completion_json`'s answer as chunks
    (:func:`completion_to_chunks`), with the usage chunk when the request asked for it
    (``stream_options: {"include_usage": true}``, as OpenAI does). The caller writes each as
    ``data: <json>\\n\\n``, then ``data: [DONE]\\n\\n``."""
    options = request_body.get("stream_options") if isinstance(request_body, dict) else None
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return completion_to_chunks(completion_json(rule, request_body, endpoint=endpoint, model=model), include_usage)
