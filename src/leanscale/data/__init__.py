"""Open data sets and corpora (Fashion-MNIST, WordNet glosses, GCIDE, CPython's stdlib) and the user's own
data (:func:`load_dataset`: .npz, .csv, .jsonl, .parquet, image folders, Hugging Face datasets folders).

The data sets come from Debian packages (``make data``); :mod:`leanscale.data.paths` says where
they are looked for and how a missing one is reported. Everything here loads lazily: importing
this package reads no data and does not import ``tokenizers``.
"""

# Each module's __all__ is what this package exports from it (one list per name, kept there).
import leanscale.data.embeddings as _embeddings
import leanscale.data.fashion_mnist as _fashion_mnist
import leanscale.data.paths as _paths
import leanscale.data.text as _text
import leanscale.data.user as _user
import leanscale.data.wordnet as _wordnet
from leanscale.data.embeddings import *  # noqa: F403
from leanscale.data.fashion_mnist import *  # noqa: F403
from leanscale.data.paths import *  # noqa: F403
from leanscale.data.text import *  # noqa: F403
from leanscale.data.user import *  # noqa: F403
from leanscale.data.wordnet import *  # noqa: F403

__all__ = []
__all__ += _paths.__all__
__all__ += _fashion_mnist.__all__
__all__ += _wordnet.__all__
__all__ += _text.__all__
__all__ += _embeddings.__all__
__all__ += _user.__all__
