"""RS2Sampler (Okanovic et al. 2024): a fresh random subset per epoch, without replacement across
epochs, exact sizes, deterministic, sharded like DistributedSampler; and the scoring loop's sampler."""

import math

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning import RS2Sampler
from leanscale.pruning._train import train_scoring_model


@pytest.mark.parametrize("n, ratio", [(12, 0.25), (12, 0.5), (10, 1.0), (30, 0.1)])
def test_every_example_exactly_once_per_pass_when_m_divides_n(n, ratio):
    rs2 = RS2Sampler(n, ratio=ratio, seed=3)
    m = rs2.subset_size
    assert m == round(ratio * n) and n % m == 0
    per_pass = math.ceil(1 / ratio)  # = n / m here
    for p in range(3):  # three passes
        seen = np.concatenate([rs2.subset(e) for e in range(p * per_pass, (p + 1) * per_pass)])
        assert np.array_equal(np.sort(seen), np.arange(n))  # each example exactly once


@pytest.mark.parametrize("n, ratio", [(10, 0.3), (7, 0.4), (101, 0.07), (9, 0.9)])
def test_stream_is_a_sequence_of_permutations_with_exact_distinct_subsets(n, ratio):
    rs2 = RS2Sampler(n, ratio=ratio, seed=1)
    m = rs2.subset_size
    assert m == math.floor(ratio * n + 0.5)
    epochs = 6 * math.ceil(n / m)
    subsets = [rs2.subset(e) for e in range(epochs)]
    for s in subsets:
        assert s.size == m and np.unique(s).size == m  # exact size, no example twice in an epoch
    stream = np.concatenate(subsets)
    for c in range(stream.size // n):  # without replacement: all of P_c before any of P_{c+1}
        assert np.array_equal(np.sort(stream[c * n:(c + 1) * n]), np.arange(n))
    # the first ceil(n / m) epochs cover every example
    assert set(np.concatenate(subsets[:math.ceil(n / m)]).tolist()) == set(range(n))
    # consecutive epochs differ (fresh subsets), random access = sequential access
    assert all(not np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(subsets, subsets[1:]))
    fresh = RS2Sampler(n, ratio=ratio, seed=1)
    for e in (epochs - 1, 3, 0, epochs // 2):
        assert np.array_equal(fresh.subset(e), subsets[e])


def test_deterministic_given_seed_and_different_across_seeds():
    a, b, c = (RS2Sampler(50, ratio=0.2, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a.subset(e), b.subset(e)) for e in range(8))
    assert not all(np.array_equal(a.subset(e), c.subset(e)) for e in range(8))


def test_with_replacement_draws_independent_subsets():
    rs2 = RS2Sampler(20, ratio=0.5, replacement=True, seed=0)
    subsets = [rs2.subset(e) for e in range(40)]
    assert all(s.size == 10 and np.unique(s).size == 10 for s in subsets)
    # independent draws: two consecutive epochs overlap (without replacement they are disjoint here)
    assert any(np.intersect1d(a, b).size for a, b in zip(subsets, subsets[1:]))
    counts = np.bincount(np.concatenate(subsets), minlength=20)
    assert counts.min() >= 8 and counts.max() <= 32  # each example ~ 20 of 40 times (binomial, wide bounds)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(drop_last):
    world, n = 3, 40
    ref = RS2Sampler(n, ratio=0.3, seed=2, rank=0, world_size=1)  # m = 12, divisible by 3
    shards = [RS2Sampler(n, ratio=0.3, seed=2, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    for epoch in range(5):
        parts = [s.epoch_indices(epoch).numpy() for s in shards]
        assert {len(p) for p in parts} == {4}
        assert len(shards[0]) == 4 and list(iter(shards[1])) == parts[1].tolist()
        joined = np.concatenate(parts)
        assert np.unique(joined).size == joined.size  # disjoint
        assert np.array_equal(np.sort(joined), np.sort(ref.subset(epoch)))
        # DistributedSampler's positions rank, rank + world, ...
        assert np.array_equal(parts[1], ref.subset(epoch)[1::world])


def test_uneven_shards_pad_or_drop_like_distributed_sampler():
    n = 20  # m = 5 over 2 ranks
    pad = [RS2Sampler(n, ratio=0.25, rank=r, world_size=2).epoch_indices(0).numpy() for r in range(2)]
    cut = [RS2Sampler(n, ratio=0.25, rank=r, world_size=2, drop_last=True).epoch_indices(0).numpy() for r in range(2)]
    order = RS2Sampler(n, ratio=0.25, rank=0, world_size=1).subset(0)
    assert [len(p) for p in pad] == [3, 3] and pad[1][-1] == order[0]  # padded with the first example
    assert [len(p) for p in cut] == [2, 2] and set(np.concatenate(cut)) == set(order[:4])


@pytest.mark.parametrize("kwargs, name", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": float("nan")}, "ratio"),
    ({"ratio": True}, "ratio"), ({"seed": -1}, "seed"), ({"rank": 2, "world_size": 2}, "rank"),
    ({"replacement": "no"}, "replacement"),
])
def test_bad_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of RS2Sampler"):
        RS2Sampler(10, **kwargs)
    with pytest.raises(InvalidParameterError, match="'n_examples' parameter of RS2Sampler"):
        RS2Sampler(0, ratio=0.5)
    with pytest.raises(InvalidParameterError, match="no current epoch"):
        len(RS2Sampler(10, ratio=0.5))


def test_scoring_loop_trains_on_the_sampler_subsets():
    n, bs = 60, 6
    x = torch.randn(n, 4)
    y = torch.arange(n) % 3
    rs2 = RS2Sampler(n, ratio=0.5, seed=4)  # m = 30: 5 batches per epoch
    seen = []
    train_scoring_model(lambda: torch.nn.Linear(4, 3), x, y, epochs=3, batch_size=bs, sampler=rs2,
                        on_batch=lambda idx, logits, yb: seen.append(idx.numpy()))
    assert len(seen) == 15  # 3 epochs x (30 // 6) steps: the step count follows the subset size
    for epoch in range(3):
        got = np.concatenate(seen[5 * epoch:5 * epoch + 5])
        assert np.array_equal(got, rs2.subset(epoch))
    with pytest.raises(InvalidParameterError, match="'sampler' parameter of train_scoring_model"):
        train_scoring_model(lambda: torch.nn.Linear(4, 3), x, y, epochs=1, sampler=RS2Sampler(n + 1, ratio=0.5))
