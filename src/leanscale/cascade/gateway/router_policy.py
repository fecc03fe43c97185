"""The gateway's learned router: a :class:`leanscale.cascade.Router` plus what a per-request
decision needs, saved together (arrays + JSON, no pickle).

A :class:`~leanscale.cascade.Router` ranks a *batch* of requests (``route(texts,
strong_fraction=0.3)`` sends the top 30% by predicted gain to the strong model). A gateway sees
one request at a time, so :class:`RouterPolicy` turns the knob into a per-request rule calibrated
on the training prompts:

* **fraction** ``f`` (``leanscale-router:0.3``, two models): the router's gains
  ``P(strong correct) - P(weak correct)`` of the ``n`` calibration prompts, sorted in decreasing
  order ``g_1 >= ... >= g_n``; with ``k = floor(f n)``, a request goes to the strong model iff its
  gain is ``> g_(k+1)`` (``f = 0``: never; ``k = n``: always). On the calibration prompts that
  is at most ``k <= f n`` strong calls, exactly ``k`` without ties, i.e. Router.route's choice
  with "at most" rounding; on new prompts from the same distribution the strong fraction is
  ``f`` up to sampling noise.
* **budget** ``$b`` (``leanscale-router:$0.002``): the expected cost of a request to model ``m``
  is its config prices times the typical token counts recorded at training (mean prompt tokens,
  mean completion tokens of ``m``). Two models: ``f = Router.fraction_for_budget(b)`` on those
  costs, then the fraction rule (``floor``: the mean cost stays within ``b``). More models:
  Router.route's Lagrangian choice ``argmax_m P_m - lambda c_m`` (ties: the cheaper model), with
  ``lambda`` found by bisection on the calibration prompts so that their mean expected cost is
  within ``b``, then applied to the request.
* A fraction with more than two models is the budget ``c_weak + f (c_strong - c_weak)``; every
  model costs at least ``c_weak``, so the strong share is then at most ``f`` as well.

The calibration prompts' probabilities are *out-of-fold* by default (``calibration="cv"``:
each training prompt scored by a router fitted on the other folds), because the in-sample gains
of a logistic regression are more spread out than those of prompts it has not seen, which would
shift the fraction on new traffic; ``calibration="train"`` uses the final router's in-sample
probabilities instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from leanscale.cascade.router import Router
from leanscale.core.errors import InvalidParameterError
from leanscale.core.persistence import (
    Fitted,
    from_state_of_file,
    load_state,
    register_fitted,
)

__all__ = ["RouterPolicy"]

_VERSION = 1
_MAX_CACHE = 256


@register_fitted("GatewayRouterPolicy")
class RouterPolicy(Fitted):
    """A fitted :class:`Router`, the calibration probabilities ``calibration_`` (n, n_models) in
    ``router.models_`` order and the typical token counts. Build it with
    :func:`leanscale.cascade.gateway.policies.train_router`; :meth:`decide` routes one request."""

    def __init__(self, router: Router, calibration: np.ndarray, prompt_tokens: float | None = None,
                 completion_tokens: Mapping[str, float] | None = None, calibration_kind: str = "cv"):
        self.router = router
        self.calibration_ = np.asarray(calibration, dtype=np.float64)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = dict(completion_tokens) if completion_tokens is not None else None
        self.calibration_kind = calibration_kind
        self.costs = dict(router.costs_)  # expected cost per request; set from the prices by use_prices
        self._cache: dict[tuple, Any] = {}
        self._order()

    @property
    def models(self) -> list[str]:
        return list(self.router.models_)

    def _order(self) -> None:
        names = self.router.models_
        order = sorted(range(len(names)), key=lambda j: self.costs[names[j]])  # stable, as Router.fit
        self.weak, self.strong = names[order[0]], names[order[-1]]
        self._cache.clear()

    def use_prices(self, cost_of) -> RouterPolicy:
        """Set the expected cost of each model to ``cost_of(name, prompt_tokens, completion_tokens)``
        (the config's prices times the typical token counts recorded at training); without
        recorded token counts the router's training costs stay. Returns self."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return self
        self.costs = {m: float(cost_of(m, self.prompt_tokens, self.completion_tokens[m])) for m in self.models}
        # the Router's own budget arithmetic (fraction_for_budget) works on these costs
        self.router.costs_ = dict(self.costs)
        self._order()
        self.router.weak_, self.router.strong_ = self.weak, self.strong
        return self

    # -- decisions ------------------------------------------------------------------------------

    def _gains(self, P: np.ndarray) -> np.ndarray:
        names = self.router.models_
        return P[:, names.index(self.strong)] - P[:, names.index(self.weak)]

    def threshold(self, fraction: float) -> float:
        """The gain above which a request goes to the strong model, for a strong fraction
        ``fraction`` (two models): ``+inf`` = never, ``-inf`` = always."""
        key = ("thr", fraction)
        if key in self._cache:
            return self._cache[key]
        g = np.sort(self._gains(self.calibration_))[::-1]
        n = len(g)
        k = min(n, math.floor(fraction * n + 1e-9))
        thr = math.inf if k == 0 else (-math.inf if k >= n else float(g[k]))
        if len(self._cache) >= _MAX_CACHE:  # bounded: knobs come from clients
            self._cache.clear()
        self._cache[key] = thr
        return thr

    def _lambda(self, budget: float) -> float:
        key = ("lam", budget)
        if key in self._cache:
            return self._cache[key]
        names = self.router.models_
        cost = np.asarray([self.costs[m] for m in names])
        by_cost = np.argsort(cost, kind="stable")
        Pc, cc = self.calibration_[:, by_cost], cost[by_cost]

        def mean_cost(lam: float) -> float:
            return float(cc[np.argmax(Pc - lam * cc, axis=1)].mean())

        lam = 0.0
        if mean_cost(0.0) > budget:
            gaps = cc - cc[0]
            lo, hi = 0.0, 2.0 / gaps[gaps > 0].min()
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                if mean_cost(mid) <= budget:
                    hi = mid
                else:
                    lo = mid
            lam = hi
        if len(self._cache) >= _MAX_CACHE:  # bounded: knobs come from clients
            self._cache.clear()
        self._cache[key] = lam
        return lam

    def decide(self, text: str, knob: tuple[str, float]) -> tuple[str, dict[str, Any]]:
        """The model for one request and what the decision rests on (for the log).

        Args:
            text: the request's prompt.
            knob: ``("fraction", f)`` or ``("budget", usd)`` (see
                :func:`~leanscale.cascade.gateway.config.parse_router_knob`).

        Raises:
            InvalidParameterError: a budget below the cheapest model's expected cost.
        """
        kind, value = knob
        names = self.router.models_
        P = self.router._proba_matrix([text], "RouterPolicy.decide")  # (1, n_models)
        info: dict[str, Any] = {"knob": f"${value:g}" if kind == "budget" else value}
        if len(names) == 2:
            if kind == "budget":
                fraction = self.router.fraction_for_budget(value)  # errors when below the weak cost
                info["fraction"] = fraction
            else:
                fraction = value
            gain = float(self._gains(P)[0])
            thr = self.threshold(fraction)
            info.update(gain=gain, threshold=thr if math.isfinite(thr) else ("never" if thr > 0 else "always"))
            return (self.strong if gain > thr else self.weak), info
        cost = {m: self.costs[m] for m in names}
        if kind == "fraction":
            value = cost[self.weak] + value * (cost[self.strong] - cost[self.weak])
            info["budget"] = value
        elif value < min(cost.values()):
            raise InvalidParameterError(
                f"the budget ${value:g} per request is below the cheapest model's expected cost "
                f"(${cost[self.weak]:.6g} for {self.weak!r}).")
        lam = self._lambda(value)
        order = sorted(range(len(names)), key=lambda j: cost[names[j]])
        utility = [P[0, j] - lam * cost[names[j]] for j in order]
        pick = names[order[int(np.argmax(utility))]]
        info["lambda"] = lam
        return pick, info

    # -- state ----------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The router's state (its arrays prefixed ``router.``), the calibration and the tokens."""
        r_meta, r_arrays = self.router.get_state()
        meta = {"class": "GatewayRouterPolicy", "version": _VERSION, "router": r_meta,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "calibration": self.calibration_kind}
        arrays = {f"router.{k}": v for k, v in r_arrays.items()}
        arrays["calibration"] = self.calibration_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RouterPolicy:
        owner = "RouterPolicy.from_state"
        if not isinstance(meta, Mapping) or meta.get("class") != "GatewayRouterPolicy" or meta.get("version") != _VERSION:
            raise InvalidParameterError(
                f"The 'meta' parameter of {owner} must describe a 'GatewayRouterPolicy' of version {_VERSION}.")
        router = Router.from_state(meta.get("router"), {k[7:]: v for k, v in arrays.items() if k.startswith("router.")})
        cal = np.asarray(arrays.get("calibration"))
        if cal.ndim != 2 or cal.shape[1] != len(router.models_) or cal.shape[0] < 1 or cal.dtype.kind != "f" \
                or not np.isfinite(cal).all() or (cal < 0).any() or (cal > 1).any():
            raise InvalidParameterError(
                f"The 'arrays' parameter of {owner} must hold 'calibration', probabilities of shape (n, "
                f"{len(router.models_)}). Got shape {cal.shape}.")
        pt, ct = meta.get("prompt_tokens"), meta.get("completion_tokens")
        if (pt is None) != (ct is None):
            raise InvalidParameterError(f"The 'meta' parameter of {owner} must give both token counts or neither.")
        if pt is not None:
            if isinstance(pt, bool) or not isinstance(pt, (int, float)) or not math.isfinite(pt) or pt < 0:
                raise InvalidParameterError(f"The 'meta' parameter of {owner} has a malformed 'prompt_tokens'.")
            if not isinstance(ct, Mapping) or set(ct) != set(router.models_) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in ct.values()):
                raise InvalidParameterError(
                    f"The 'meta' parameter of {owner} must give 'completion_tokens' >= 0 for each of "
                    f"{router.models_}.")
        kind = meta.get("calibration", "cv")
        return cls(router, cal, pt, ct, kind if kind in ("cv", "train") else "cv")

    @classmethod
    def load(cls, path: str | os.PathLike) -> RouterPolicy:
        """Rebuild a policy saved with :meth:`save` (errors in the files name the folder)."""
        meta, arrays = load_state(path)
        return from_state_of_file(path, cls.from_state, meta, arrays)
