"""Filters and simpler models first: cascades, routers and a server (``leanscale.cascade``).

* :mod:`~leanscale.cascade.stages` -- regex, rule, model and callable stages with a cost per call;
* :class:`Cascade` -- exact cost-accuracy frontier of per-stage thresholds, target accuracy,
  budget, or a finite-sample accuracy guarantee;
* :func:`mine_rules` -- high-precision keyword rules learned from labelled text;
* :class:`Router` -- choose a model up front from the request text (RouteLLM's metrics in
  :func:`evaluate_router`);
* ``leanscale serve cascade.json`` -- an HTTP server with fallback, micro-batching and metrics.

See ``README.md`` in this folder (the method card).
"""

from leanscale.cascade.cascade import FALLBACK, Cascade, CascadeOutput, UnansweredWarning
from leanscale.cascade.router import Router, evaluate_router
from leanscale.cascade.rules import MinedRules, evaluate_rules, mine_rules
from leanscale.cascade.search import FrontierResult, frontier
from leanscale.cascade.stages import (
    CallableStage,
    ModelStage,
    RegexStage,
    RuleStage,
    Stage,
    StageError,
    StageOutput,
    check_regex_safety,
    measure_cost,
)
from leanscale.cascade.text_models import EmbeddingClassifier, TfidfClassifier

__all__ = [
    "FALLBACK",
    "CallableStage",
    "Cascade",
    "CascadeOutput",
    "UnansweredWarning",
    "EmbeddingClassifier",
    "FrontierResult",
    "MinedRules",
    "ModelStage",
    "RegexStage",
    "Router",
    "RuleStage",
    "Stage",
    "StageError",
    "StageOutput",
    "TfidfClassifier",
    "check_regex_safety",
    "create_app",
    "evaluate_router",
    "evaluate_rules",
    "frontier",
    "measure_cost",
    "mine_rules",
    "serve",
]


def __getattr__(name: str):
    # the server needs FastAPI (pip install 'leanscale[serve]'): imported only when asked for
    if name in ("create_app", "serve"):
        from leanscale.cascade import server

        return getattr(server, name)
    raise AttributeError(f"module 'leanscale.cascade' has no attribute {name!r}")
