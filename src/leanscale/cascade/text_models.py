"""Former home of the cascade's text classifiers and their persistence (kept for one release).

The pieces now live where they belong:

* :class:`~leanscale.cascade.TfidfClassifier` -- :mod:`leanscale.cascade.tfidf`;
* :class:`~leanscale.cascade.EmbeddingClassifier` -- :mod:`leanscale.cascade.embedding_head`;
* saving and loading (``save_state``, ``load_state``, ``save_arrays``, ``load_arrays``, and
  ``load_model`` / ``model_from_state``, now :func:`~leanscale.core.persistence.load_fitted` /
  :func:`~leanscale.core.persistence.fitted_from_state`) -- :mod:`leanscale.core.persistence`.

Import them from there (or the classes from :mod:`leanscale.cascade`); this module will be
removed in the next release.
"""

from __future__ import annotations

from leanscale.core.deprecation import moved_attributes

__all__: list[str] = []  # nothing is exported from here any more: see the module docstring

__getattr__ = moved_attributes(__name__, {
    "DEFAULT_TOKEN_PATTERN": "leanscale.cascade._shared:DEFAULT_TOKEN_PATTERN",
    "EmbeddingClassifier": "leanscale.cascade.embedding_head:EmbeddingClassifier",
    "TfidfClassifier": "leanscale.cascade.tfidf:TfidfClassifier",
    "model_from_state": "leanscale.core.persistence:fitted_from_state",
    "load_model": "leanscale.core.persistence:load_fitted",
    "load_arrays": "leanscale.core.persistence:load_arrays",
    "load_state": "leanscale.core.persistence:load_state",
    "save_arrays": "leanscale.core.persistence:save_arrays",
    "save_state": "leanscale.core.persistence:save_state",
})
