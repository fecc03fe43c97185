"""The semantic cache's static embedder (``cache.embedder: static``): MiniLM-L6 distilled into static
token embeddings by model2vec, built once into a folder (atomically), loaded without code or
pickle, and compared here with a reference computation of what it claims to be (the SIF-weighted
mean of the tokens' rows, normalised) and with MiniLM's own judgement of paraphrases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leanscale.cascade.gateway import GatewayConfig, create_gateway_app
from leanscale.cascade.gateway.cache import (
    DEFAULT_THRESHOLDS,
    ResponseCache,
    check_cache_config,
)
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.models import StaticTextEncoder, static_text_encoder

from .conftest import client, serve_app, two_model_config

pytestmark = pytest.mark.slow  # one distillation of MiniLM (~16 s alone on 2 cores)

PAIRS_SAME = [  # (question, a rewording as in benchmarks/gateway/cache_quality.py)
    ("How do I reset my password?", "Question: How do I reset my password?"),
    ("What is the capital of France?", "what is the capital of france"),
    ("Janet has 3 apples and buys 5 more. How many apples does she have?",
     "janet has 3 apples and buys 5 more. how many apples does she have"),
]
PAIRS_OTHER = [  # different questions
    ("How do I reset my password?", "How do I change my email address?"),
    ("What is the capital of France?", "What is the population of Brazil?"),
    ("Janet has 3 apples and buys 5 more. How many apples does she have?",
     "A train travels 3 hours at 5 miles per hour. How far does it go?"),
]


@pytest.fixture(scope="module")
def static_dir(static_encoder_dir):
    """The session's one distillation (tests/conftest.py)."""
    return static_encoder_dir


def test_built_atomically_and_loaded_from_the_folder(static_dir):
    assert sorted(p.name for p in static_dir.parent.iterdir()) == [static_dir.name]  # no temporary left over
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (static_dir / name).is_file()
    assert not list(static_dir.glob("*.pkl")) and not list(static_dir.glob("*.bin"))
    enc = static_text_encoder(static_dir, build=False)
    assert isinstance(enc, StaticTextEncoder) and enc.dim == 256
    out = enc.encode(["one text", "another, longer text of several words"])
    assert out.shape == (2, 256) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, enc.encode(["one text", "another, longer text of several words"]))


def test_encode_is_the_normalised_mean_of_the_token_rows(static_dir):
    """The reference: read the table (safetensors) and the tokenizer ourselves; a text's vector is
    the mean of its tokens' rows (special tokens and unknown pieces dropped, as model2vec does),
    normalised. Checked against our wrapper for a few texts."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    tables = load_file(str(static_dir / "model.safetensors"))
    table = next(iter(tables.values())).astype(np.float32)  # (vocab, 256)
    tok = Tokenizer.from_file(str(static_dir / "tokenizer.json"))
    enc = static_text_encoder(static_dir, build=False)
    texts = ["How do I reset my password?", "The quick brown fox jumps over the lazy dog."]
    for text, got in zip(texts, enc.encode(texts)):
        ids = tok.encode(text, add_special_tokens=False).ids
        ids = [i for i in ids if i < table.shape[0]]
        ref = table[ids].mean(axis=0)
        ref /= np.linalg.norm(ref)
        np.testing.assert_allclose(got, ref, atol=2e-3)  # the table is stored as float16


def test_paraphrases_closer_than_other_questions_and_above_the_default_threshold(static_dir):
    enc = static_text_encoder(static_dir, build=False)

    def cos(a: str, b: str) -> float:
        x, y = enc.encode([a, b])
        return float(x @ y)

    same = [cos(a, b) for a, b in PAIRS_SAME]
    other = [cos(a, b) for a, b in PAIRS_OTHER]
    assert min(same) >= DEFAULT_THRESHOLDS["static"], same
    assert max(other) < DEFAULT_THRESHOLDS["static"] - 0.1, other


def test_bad_folders_are_refused_with_the_path(tmp_path, static_dir):
    missing = tmp_path / "nope"
    with pytest.raises(InvalidParameterError, match="does not exist"):
        static_text_encoder(missing, build=False)
    assert not missing.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(InvalidParameterError, match="a file"):
        static_text_encoder(afile)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(InvalidParameterError, match="has no model.safetensors"):
        static_text_encoder(partial)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((static_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidParameterError, match="could not be read"):
        static_text_encoder(broken)
    for bad in (None, "", 3):
        with pytest.raises(InvalidParameterError, match="'path'"):
            static_text_encoder(bad)
    with pytest.raises(InvalidParameterError, match="pca_dims"):
        static_text_encoder(static_dir, pca_dims=4)


def test_config_keys_defaults_and_errors(tmp_path):
    assert check_cache_config({})["threshold"] == 0.95 and check_cache_config({})["embedder"] == "minilm"
    s = check_cache_config({"embedder": "static", "embedder_path": "enc"}, base=tmp_path)
    assert s["threshold"] == 0.975 and s["embedder_path"] == str((tmp_path / "enc").resolve())
    assert check_cache_config({"embedder": "static", "threshold": 0.9})["threshold"] == 0.9
    with pytest.raises(InvalidParameterError, match=r"cache.embedder must be one of 'minilm', 'static'. Got 'bert'"):
        check_cache_config({"embedder": "bert"})
    with pytest.raises(InvalidParameterError, match="needs cache.embedder: static"):
        check_cache_config({"embedder_path": "enc"})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidParameterError, match="is a file"):
        check_cache_config({"embedder": "static", "embedder_path": str(tmp_path / "afile")})
    # a file config: relative to the file, DataFormatError naming the file
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(json.dumps({"models": [{"name": "m", "base_url": "http://127.0.0.1:1/v1"}],
                               "cache": {"embedder": "static", "embedder_path": 7}}))
    with pytest.raises(DataFormatError, match=r"gw.yaml.*cache.embedder_path must be a folder path"):
        GatewayConfig.from_yaml(cfg)


def test_cache_with_the_static_embedder_hits_paraphrases_only(static_dir):
    cache = ResponseCache({"embedder": "static", "embedder_path": str(static_dir), "embed_batch_ms": 0})

    def body(text: str) -> dict:
        return {"model": "small", "temperature": 0, "messages": [{"role": "user", "content": text}]}

    answer = {"choices": [{"message": {"role": "assistant", "content": "Use the reset link."}}]}
    cache.put(body(PAIRS_SAME[0][0]), answer)
    hit = cache.get(body(PAIRS_SAME[0][1]))
    assert hit is not None and hit[1] == "semantic"
    assert hit[0]["choices"] == answer["choices"]
    assert cache.get(body(PAIRS_OTHER[0][1])) is None


def test_gateway_with_the_static_embedder_end_to_end(backends, static_dir):
    small, big = backends
    config = two_model_config(small, big, cache={"embedder": "static", "embedder_path": str(static_dir)})
    with serve_app(create_gateway_app(config)) as url:
        c = client(url)

        def ask(text: str):
            return c.chat.completions.with_raw_response.create(
                model="small", messages=[{"role": "user", "content": text}], temperature=0)

        first = ask(PAIRS_SAME[1][0])
        assert "x-leanscale-cache" not in first.headers and small.calls == 1
        again = ask(PAIRS_SAME[1][1])
        assert again.headers["x-leanscale-cache"] == "semantic" and small.calls == 1
        assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
        other = ask(PAIRS_OTHER[1][1])
        assert "x-leanscale-cache" not in other.headers and small.calls == 2
