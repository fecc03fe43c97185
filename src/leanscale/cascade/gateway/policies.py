"""Training and loading the gateway's learned policies (``leanscale-router``, ``leanscale-cascade``).

::

    from leanscale.cascade.gateway.policies import train_router, train_scorer
    train_router(prompts, {"small": small_ok, "big": big_ok}, {"small": small_usd, "big": big_usd},
                 "router/", completion_tokens={"small": small_toks, "big": big_toks})
    train_scorer(prompts, small_answers, small_ok, "scorer/")

Both write a folder (arrays + ``meta.json``, no pickle, atomic) that the config's ``router.path``
/ ``cascade.scorer`` name; the gateway loads them when the app is built. The inputs are what the
request log and an outcomes file give (the ``leanscale gateway train`` CLI calls these).
:func:`prompt_text` is the one definition of a request's prompt (the messages' contents joined
by newlines), shared by the policies' features and the request log's hash.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leanscale.core.errors import InvalidParameterError

__all__ = ["answer_text", "prompt_hash", "prompt_text", "train_router", "train_scorer"]


def prompt_text(body: Mapping[str, Any], chat: bool) -> str:
    """A request's prompt as the policies and the log see it: the chat messages' contents (text
    parts of a list content joined by spaces) joined by newlines, or the completion prompt."""
    if chat:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    return "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def prompt_hash(text: str) -> str:
    """``sha256:<hex>`` of the UTF-8 prompt text (the request log's key when prompts are hashed)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def answer_text(answer: Any, chat: bool) -> str:
    """The first choice's text of an OpenAI (chat) completion answer ('' when absent)."""
    try:
        choice = answer["choices"][0]
        text = choice["message"].get("content") if chat else choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return text if isinstance(text, str) else ""


def _per_request(name: str, value: Any, n: int, owner: str, *, allow_scalar: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64) if not isinstance(value, (str, bytes)) else np.asarray(math.nan)
    if allow_scalar and arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.ndim != 1 or len(arr) != n or not np.isfinite(arr).all() or (arr < 0).any():
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be " + ("a number >= 0 or " if allow_scalar else "")
            + f"an array of {n} finite numbers >= 0 (one per prompt). Got {str(value)[:80]!r}.")
    return arr


def train_router(prompts: Sequence[str], outcomes: Mapping[str, Any], costs: Mapping[str, Any],
                 path: str | os.PathLike, *, prompt_tokens: Any = None,
                 completion_tokens: Mapping[str, Any] | None = None, features: str = "tfidf", C: float = 1.0,
                 calibration: str = "cv", folds: int = 10, seed: int = 0) -> Path:
    """Fit a :class:`~leanscale.cascade.Router` on logged outcomes and save it with its per-request
    calibration as a :class:`~leanscale.cascade.gateway.router_policy.RouterPolicy` folder.

    Args:
        prompts: the training prompts (as :func:`prompt_text` makes them).
        outcomes: ``{model name: bool array}``, whether each model answered each prompt correctly
            (>= 2 configured model names).
        costs: ``{model name: USD}``, a mean cost per request or an array of per-request costs
            (their mean is used) -- the router's costs when no token counts are given.
        path: the folder to write (the config's ``router.path``).
        prompt_tokens: the prompts' token counts (a number or one per prompt); with
            ``completion_tokens``, the gateway prices each model from the config as
            ``cost(mean prompt tokens, mean completion tokens of the model)``, so changing a
            price in the config needs no retraining.
        completion_tokens: ``{model name: number or array}``, the answers' token counts.
        features, C: the Router's parameters ("tfidf" or "minilm").
        calibration: "cv" (default: out-of-fold probabilities, ``folds`` folds) or "train"
            (in-sample) for the per-request thresholds (see ``router_policy``).
        folds, seed: the cross-validation folds and their shuffle seed.

    Returns:
        The folder written.
    """
    from leanscale.cascade.router import Router

    from .router_policy import RouterPolicy

    owner = "train_router"
    if calibration not in ("cv", "train"):
        raise InvalidParameterError(f"The 'calibration' parameter of {owner} must be 'cv' or 'train'. "
                                    f"Got {calibration!r}.")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InvalidParameterError(f"The 'folds' parameter of {owner} must be an int >= 2. Got {folds!r}.")
    if not isinstance(costs, Mapping):
        raise InvalidParameterError(f"The 'costs' parameter of {owner} must be a dict {{model: USD}}. "
                                    f"Got {type(costs).__name__}.")
    prompts = list(prompts) if not isinstance(prompts, (str, bytes)) else prompts
    if isinstance(prompts, (str, bytes)):
        raise InvalidParameterError(f"The 'prompts' parameter of {owner} must be a list of strings. Got a string.")
    n = len(prompts)
    mean_costs = {m: float(_per_request(f"costs[{m!r}]", c, n, owner, allow_scalar=True).mean()) if n else c
                  for m, c in costs.items()}
    router = Router(features=features, C=C, seed=seed).fit(prompts, outcomes, mean_costs)
    names = router.models_
    if (prompt_tokens is None) != (completion_tokens is None):
        raise InvalidParameterError(f"The parameters 'prompt_tokens' and 'completion_tokens' of {owner} go together "
                                    "(the typical cost of a request needs both). Got only one.")
    pt = ct = None
    if prompt_tokens is not None:
        pt = float(_per_request("prompt_tokens", prompt_tokens, n, owner, allow_scalar=True).mean())
        if not isinstance(completion_tokens, Mapping) or set(completion_tokens) != set(names):
            raise InvalidParameterError(
                f"The 'completion_tokens' parameter of {owner} must be a dict with one entry per model of 'outcomes' "
                f"({', '.join(map(repr, names))}). Got {str(completion_tokens)[:80]!r}.")
        ct = {m: float(_per_request(f"completion_tokens[{m!r}]", completion_tokens[m], n, owner,
                                    allow_scalar=True).mean()) for m in names}
    if calibration == "train":
        cal = router._proba_matrix(prompts, owner)
    else:
        folds = min(folds, n)
        rng = np.random.default_rng(seed)
        fold_of = rng.permutation(np.arange(n) % folds)
        outs = {m: np.asarray(outcomes[m]) for m in names}
        cal = np.zeros((n, len(names)))
        for f in range(folds):
            test = np.flatnonzero(fold_of == f)
            train = np.flatnonzero(fold_of != f)
            sub = Router(features=features, C=C, seed=seed).fit([prompts[i] for i in train],
                                                               {m: outs[m][train] for m in names}, mean_costs)
            P = sub._proba_matrix([prompts[i] for i in test], owner)
            cal[test] = P[:, [sub.models_.index(m) for m in names]]
    policy = RouterPolicy(router, cal, pt, ct, calibration)
    return policy.save(path)


def train_scorer(prompts: Sequence[str], cheap_answers: Sequence[str], cheap_correct: Any,
                 path: str | os.PathLike | None = None, *, C: float = 1.0, max_features: int = 20_000):
    """Fit the cascade's :class:`~leanscale.cascade.gateway.scorer.AnswerScorer` on (prompt, cheap
    answer, was it correct) triples; save it to ``path`` when given (the config's
    ``cascade.scorer``). Returns the fitted scorer."""
    from .scorer import AnswerScorer

    scorer = AnswerScorer(C=C, max_features=max_features).fit(prompts, cheap_answers, cheap_correct)
    if path is not None:
        scorer.save(path)
    return scorer
