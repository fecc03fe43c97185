import sys

import numpy as np
import pytest

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.data import (
    DOCUMENT_SEPARATOR,
    cache_dir,
    corpus_cache_key,
    encode_corpus,
    encode_text,
    load_corpus,
    train_bpe_tokenizer,
)
from leanscale.data import text as text_module

pytest.importorskip("tokenizers")

SAMPLE = (
    "def f(x):\n    return x ** 2  # squared\n\n\n"
    "Naïve café — ünïcödé, 日本語, emoji 🤖, tabs\tand\r\nCRLF;   many   spaces  \n"
    "\n\n  leading and trailing whitespace   "
)


@pytest.fixture
def corpus_dir(tmp_path):
    """A small corpus: a slice of the installed stdlib sources (about 200 KB)."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.py").write_text(load_corpus("stdlib", max_bytes=150_000), encoding="utf-8")
    (d / "b.txt").write_text(SAMPLE * 20, encoding="utf-8")
    return d


def test_round_trip_and_special_token(corpus_dir):
    tok = train_bpe_tokenizer(corpus_dir, vocab_size=512)
    assert 300 < tok.get_vocab_size() <= 512
    assert tok.token_to_id("<|endoftext|>") == 0
    for text in (SAMPLE, load_corpus(corpus_dir)[:20_000], "", " ", "\n\n\n"):
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode("a" + DOCUMENT_SEPARATOR + "b").ids
    assert ids.count(0) == 1


def test_cache_is_reused_without_retraining(corpus_dir, monkeypatch):
    tok = train_bpe_tokenizer(corpus_dir, vocab_size=400)
    key = corpus_cache_key(corpus_dir, 400)
    path = cache_dir() / "tokenizers" / f"{key}.json"
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(text_module, "_train", no_training)
    again = train_bpe_tokenizer(corpus_dir, vocab_size=400)
    assert again.to_str() == tok.to_str()
    assert path.stat().st_mtime_ns == mtime


def test_training_is_deterministic(corpus_dir, tmp_path, monkeypatch):
    a = train_bpe_tokenizer(corpus_dir, vocab_size=400)
    monkeypatch.setenv("LEANSCALE_CACHE", str(tmp_path / "other-cache"))
    b = train_bpe_tokenizer(corpus_dir, vocab_size=400)
    assert (tmp_path / "other-cache" / "tokenizers").is_dir()
    assert a.to_str() == b.to_str()


def test_cache_key_tracks_source_size_limit_and_content(corpus_dir):
    key = corpus_cache_key(corpus_dir, 512)
    assert key.startswith("path-corpus-all-v512-")
    assert corpus_cache_key(corpus_dir, 512) == key
    assert corpus_cache_key(corpus_dir, 1024) != key
    assert corpus_cache_key(corpus_dir, 512, max_bytes=1000) != key
    assert corpus_cache_key("stdlib", 512).startswith("stdlib-all-v512-")
    (corpus_dir / "b.txt").write_text("changed", encoding="utf-8")
    assert corpus_cache_key(corpus_dir, 512) != key


def test_encode_corpus_matches_whole_text_and_is_cached(corpus_dir, monkeypatch):
    ids = encode_corpus(corpus_dir, vocab_size=512)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    tok = train_bpe_tokenizer(corpus_dir, vocab_size=512)
    text = load_corpus(corpus_dir)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
    assert ids.tolist() == tok.encode(text, add_special_tokens=False).ids
    npy = cache_dir() / "tokenizers" / f"{corpus_cache_key(corpus_dir, 512)}.npy"
    assert npy.is_file()
    monkeypatch.setattr(text_module, "encode_text", lambda *a, **k: pytest.fail("re-encoded"))
    monkeypatch.setattr(text_module, "_train", lambda *a, **k: pytest.fail("re-trained"))
    assert np.array_equal(encode_corpus(corpus_dir, vocab_size=512), ids)
    assert not list(npy.parent.glob(".*.tmp"))  # atomic write left no temporary file


@pytest.mark.parametrize("damage", ["truncate", "text", "ids_out_of_range"])
def test_a_damaged_token_cache_is_encoded_again(corpus_dir, damage):
    ids = encode_corpus(corpus_dir, vocab_size=512)
    npy = cache_dir() / "tokenizers" / f"{corpus_cache_key(corpus_dir, 512)}.npy"
    if damage == "truncate":  # a copy killed half-way
        npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    elif damage == "text":
        npy.write_text("not an array")
    else:
        np.save(npy, np.full(10, 600, dtype=np.uint16), allow_pickle=False)
    with pytest.warns(RuntimeWarning, match="token cache .* is damaged"):
        again = encode_corpus(corpus_dir, vocab_size=512)
    assert np.array_equal(again, ids)
    assert np.array_equal(encode_corpus(corpus_dir, vocab_size=512), ids)  # the cache is whole again


def test_chunked_encoding_equals_whole_encoding(corpus_dir, monkeypatch):
    tok = train_bpe_tokenizer(corpus_dir, vocab_size=512)
    text = load_corpus(corpus_dir)
    monkeypatch.setattr(text_module, "_CHUNK_CHARS", 500)
    monkeypatch.setattr(text_module, "_CHUNKS_PER_BATCH", 7)
    chunks = list(text_module._chunks(text))
    assert len(chunks) > 20 and "".join(chunks) == text
    assert encode_text(tok, text).tolist() == tok.encode(text).ids


def test_installed_corpus_small_prefix():
    ids = encode_corpus("stdlib", vocab_size=300, max_bytes=100_000)
    tok = train_bpe_tokenizer("stdlib", vocab_size=300, max_bytes=100_000)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == load_corpus("stdlib", max_bytes=100_000)


def test_bad_parameters(corpus_dir):
    with pytest.raises(InvalidParameterError, match=r"'vocab_size'.*range \[257, inf\)"):
        train_bpe_tokenizer(corpus_dir, vocab_size=100)
    with pytest.raises(InvalidParameterError, match="'max_bytes'"):
        encode_corpus(corpus_dir, max_bytes=-5)
    with pytest.raises(InvalidParameterError, match="Did you mean 'stdlib'"):
        encode_corpus("stdlb")


def test_missing_tokenizers_names_the_extra(corpus_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[text\]'"):
        train_bpe_tokenizer(corpus_dir, vocab_size=512)
    with pytest.raises(MissingDependencyError, match=r"leanscale\[text\]"):
        encode_corpus(corpus_dir, vocab_size=512)
