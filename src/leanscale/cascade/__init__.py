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

# Each module's __all__ is what this package exports from it (one list per name, kept there).
import leanscale.cascade.cascade as _cascade
import leanscale.cascade.embedding_head as _embedding_head
import leanscale.cascade.evaluation as _evaluation
import leanscale.cascade.router as _router
import leanscale.cascade.rules as _rules
import leanscale.cascade.search as _search
import leanscale.cascade.stages as _stages
import leanscale.cascade.student as _student
import leanscale.cascade.tfidf as _tfidf
from leanscale.cascade.cascade import *  # noqa: F403
from leanscale.cascade.embedding_head import *  # noqa: F403
from leanscale.cascade.evaluation import *  # noqa: F403
from leanscale.cascade.router import *  # noqa: F403
from leanscale.cascade.rules import *  # noqa: F403
from leanscale.cascade.search import *  # noqa: F403
from leanscale.cascade.stages import *  # noqa: F403
from leanscale.cascade.student import *  # noqa: F403
from leanscale.cascade.tfidf import *  # noqa: F403

__all__ = ["create_app", "serve"]  # leanscale.cascade.server, imported when first asked for (below)
__all__ += _cascade.__all__
__all__ += _stages.__all__
__all__ += _search.__all__
__all__ += _rules.__all__
__all__ += _router.__all__
__all__ += _tfidf.__all__
__all__ += _embedding_head.__all__
__all__ += _evaluation.__all__
__all__ += _student.__all__


def __getattr__(name: str):
    # the server needs FastAPI (pip install 'leanscale[serve]'): imported only when asked for
    if name in ("create_app", "serve"):
        from leanscale.cascade import server

        return getattr(server, name)
    raise AttributeError(f"module 'leanscale.cascade' has no attribute {name!r}")
