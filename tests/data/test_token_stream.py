import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.data import TokenStream

N = 20_000  # token i has id i, so a token's value is its position


def _stream(n=N, val_fraction=0.05):
    return TokenStream(np.arange(n, dtype=np.int64), val_fraction=val_fraction)


def _positions(batches):
    xs, ys = [], []
    for x, y in batches:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_split_sizes_and_views():
    s = _stream()
    assert s.n_train_tokens == 19_000 and s.n_val_tokens == 1_000
    assert s.train_tokens[-1] + 1 == s.val_tokens[0]
    assert _stream(n=101, val_fraction=0.05).n_val_tokens == 6  # rounded up
    assert _stream(val_fraction=0.0).n_val_tokens == 0


def test_train_windows_never_overlap_and_never_touch_validation():
    s = _stream()
    B, T = 8, 16
    batches = s.train_batches(B, T, n_tokens=s.n_train_tokens - 500, seed=0)
    assert len(batches) == (s.n_train_tokens - 500) // (B * T)
    x, y = _positions(batches)
    assert x.shape == (len(batches) * B, T)
    assert np.array_equal(y, x + 1)  # targets are the next tokens
    flat = x.ravel()
    assert len(np.unique(flat)) == flat.size  # no input token seen twice
    assert np.all(x[:, 0] % T == 0)  # windows are aligned, consecutive tokens
    assert y.max() < s.n_train_tokens  # no validation token, even as a target


def test_all_windows_can_be_used_exactly_once():
    s = _stream(n=1_000, val_fraction=0.1)
    batches = s.train_batches(batch_size=1, block_size=10, n_tokens=890)
    x, _ = _positions(batches)
    assert sorted(x[:, 0].tolist()) == list(range(0, 890, 10))
    with pytest.raises(InvalidParameterError, match=r"at most the 890 training tokens available"):
        s.train_batches(batch_size=1, block_size=10, n_tokens=891)


def test_batches_are_int64_tensors_and_deterministic():
    s = _stream()
    x, y = next(s.train_batches(4, 32, n_tokens=4096, seed=7))
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and tuple(x.shape) == (4, 32)
    a, _ = _positions(s.train_batches(4, 32, n_tokens=4096, seed=7))
    b, _ = _positions(s.train_batches(4, 32, n_tokens=4096, seed=7))
    c, _ = _positions(s.train_batches(4, 32, n_tokens=4096, seed=8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ranks_get_disjoint_shares_of_the_same_global_batches():
    s = _stream()
    B, T, W = 4, 16, 3
    n_tokens = 30 * B * T * W
    per_rank = [list(s.train_batches(B, T, n_tokens, seed=1, rank=r, world_size=W)) for r in range(W)]
    assert all(len(p) == 30 for p in per_rank)
    starts = [np.concatenate([x[:, 0].numpy() for x, _ in p]) for p in per_rank]
    for i in range(W):
        for j in range(i + 1, W):
            assert not set(starts[i]) & set(starts[j])
    # step by step, the ranks together see exactly the single-process batch of B * W windows
    single = list(s.train_batches(B * W, T, n_tokens, seed=1))
    for step, (x_all, _) in enumerate(single):
        together = torch.cat([per_rank[r][step][0] for r in range(W)])
        assert torch.equal(together, x_all)


def test_validation_batches_are_fixed_and_held_out():
    s = _stream()
    val = list(s.val_batches(batch_size=4, block_size=16, max_batches=3))
    assert len(val) == 3
    again = list(s.val_batches(batch_size=4, block_size=16, max_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again, strict=True))
    x = torch.cat([v[0] for v in val])
    assert int(x.min()) == s.n_train_tokens  # starts at the first validation token
    all_val = list(s.val_batches(batch_size=4, block_size=16))
    assert len(all_val) == (s.n_val_tokens - 1) // 16 // 4
    assert int(torch.cat([v[1] for v in all_val]).max()) < N


def test_parameter_errors():
    s = _stream()
    with pytest.raises(InvalidParameterError, match=r"at most the 18,992 training tokens"):
        s.train_batches(8, 16, n_tokens=19_000)
    with pytest.raises(InvalidParameterError, match=r"at least one global batch .* 256 tokens"):
        s.train_batches(8, 16, n_tokens=255, world_size=2)
    with pytest.raises(InvalidParameterError, match=r"'rank' parameter .* range \[0, 1\]. Got 2"):
        s.train_batches(8, 16, n_tokens=4096, rank=2, world_size=2)
    with pytest.raises(InvalidParameterError, match="'batch_size'"):
        s.train_batches(0, 16, n_tokens=4096)
    with pytest.raises(InvalidParameterError, match="less than one batch"):
        s.val_batches(batch_size=100, block_size=16)
    with pytest.raises(InvalidParameterError, match="less than one batch"):
        _stream(val_fraction=0.0).val_batches(1, 1)
    with pytest.raises(InvalidParameterError, match="'val_fraction'"):
        TokenStream(np.arange(10), val_fraction=1.0)
    with pytest.raises(InvalidParameterError, match="1-d array of integer token ids"):
        TokenStream(np.zeros((2, 3)))


def test_from_corpus(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    s = TokenStream.from_corpus(tmp_path / "t.txt", vocab_size=300, val_fraction=0.1)
    assert s.tokens.dtype == np.uint16 and s.n_train_tokens + s.n_val_tokens == len(s.tokens)
    x, y = next(s.train_batches(2, 8, n_tokens=64))
    assert x.dtype == torch.int64 and tuple(y.shape) == (2, 8)
