"""cached_text_embeddings: MiniLM embeddings computed once, cached on disk, damaged entries redone."""

import numpy as np

from leanscale.data.embeddings import cached_text_embeddings


def _fake_encoder(monkeypatch):
    calls = []

    def fake_embed(texts, batch_size=128):
        calls.append(len(texts))
        return np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4)

    monkeypatch.setattr("leanscale.models.encoders.embed_texts", fake_embed)
    return calls


def test_text_embeddings_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSCALE_CACHE", str(tmp_path))
    calls = _fake_encoder(monkeypatch)
    a = cached_text_embeddings(["a cat", "a dog", "tax"])
    b = cached_text_embeddings(["a cat", "a dog", "tax"])
    c = cached_text_embeddings(["a cat", "a dog", "taxes"])
    assert calls == [3, 3] and np.array_equal(a, b) and a.shape == (3, 4) and c.shape == (3, 4)
    assert a.dtype == np.float32
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 2


def test_damaged_cache_entry_is_recomputed_and_cache_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSCALE_CACHE", str(tmp_path))
    calls = _fake_encoder(monkeypatch)
    a = cached_text_embeddings(["x", "y"])
    (path,) = (tmp_path / "embeddings").glob("*.npy")
    path.write_bytes(b"not a numpy file")
    b = cached_text_embeddings(["x", "y"])
    assert calls == [2, 2] and np.array_equal(a, b)
    np.save(path, np.full((2, 4), np.nan, dtype=np.float32))  # non-finite: recomputed too
    assert np.isfinite(cached_text_embeddings(["x", "y"])).all() and calls == [2, 2, 2]
    cached_text_embeddings(["new"], cache=False)
    assert calls[-1] == 1 and len(list((tmp_path / "embeddings").glob("*.npy"))) == 1


def test_pruning_wordnet_loader_uses_the_same_function():
    from leanscale.pruning import datasets

    assert datasets.cached_text_embeddings is cached_text_embeddings
