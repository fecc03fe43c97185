"""InfoBatch (Qin et al. 2024): the epoch plans, the weights, unbiasedness, annealing, resume and
bad input. The torchrun test is in test_infobatch_ddp.py."""

import doctest
import io
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import leanscale.pruning.infobatch as infobatch_mod
from leanscale.core.errors import InvalidParameterError
from leanscale.pruning.infobatch import InfoBatch


def _scripted(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).exponential(1.0, n)  # (n,) skewed: mean above the median


def test_doctests():
    assert doctest.testmod(infobatch_mod, raise_on_error=False).failed == 0


def test_first_epoch_yields_every_example_with_weight_one():
    ib = InfoBatch(50, epochs=4, seed=1)
    idx = ib.epoch_indices(0)
    assert idx.dtype == torch.int64 and sorted(idx.tolist()) == list(range(50))
    assert idx.tolist() != list(range(50))  # shuffled
    assert list(ib.sampler(0)) == idx.tolist() and len(ib) == 50
    assert torch.equal(ib.weights(idx), torch.ones(50))
    assert ib.history_[0]["n_pruned"] == 0 and ib.fraction_skipped_ == 0.0


@pytest.mark.parametrize("prune_ratio", [0.3, 0.5, 0.7])
def test_pruned_set_is_a_fraction_of_the_below_mean_examples(prune_ratio):
    n = 101
    losses = _scripted(n)
    ib = InfoBatch(n, epochs=8, prune_ratio=prune_ratio, seed=2)
    ib.set_epoch(0)
    ib.update(np.arange(n), losses)
    kept = set(ib.epoch_indices(1).tolist())
    pruned = set(range(n)) - kept
    below = set(np.flatnonzero(losses < losses.mean()).tolist())
    assert pruned <= below
    # round rule: floor(r * n_wl) or floor(r * n_wl) + 1 examples are pruned
    assert len(pruned) in {math.floor(prune_ratio * len(below)), math.floor(prune_ratio * len(below)) + 1}
    w = ib.weights(torch.arange(n)).numpy()
    for i in range(n):
        expected = 1 / (1 - prune_ratio) if i in below and i in kept else 1.0
        assert w[i] == pytest.approx(expected, rel=1e-6), i
    rec = ib.history_[-1]
    assert rec["threshold"] == pytest.approx(losses.mean())
    assert (rec["n_well_learned"], rec["n_pruned"], rec["n_kept"]) == (len(below), len(pruned), len(kept))
    assert ib.fraction_skipped_ == pytest.approx(len(pruned) / (2 * n))


def test_dataloader_iterates_the_epoch_and_the_weights_follow_the_plan():
    n = 64
    losses = _scripted(n, 3)
    ib = InfoBatch(n, epochs=4, prune_ratio=0.5, seed=0)
    ib.set_epoch(0)
    ib.update(torch.arange(n), torch.from_numpy(losses).float())
    ds = TensorDataset(torch.arange(n))
    seen = torch.cat([b for (b,) in DataLoader(ds, batch_size=10, sampler=ib.sampler(1))])
    assert torch.equal(seen, ib.epoch_indices(1))
    assert len(seen) < n and len(DataLoader(ds, batch_size=10, sampler=ib)) == math.ceil(len(seen) / 10)
    # a float32 loss tensor is recorded exactly (as float64)
    np.testing.assert_array_equal(ib.losses_, losses.astype(np.float32).astype(np.float64))


def test_unscored_examples_are_never_pruned_and_not_in_the_mean():
    n = 40
    ib = InfoBatch(n, epochs=4, prune_ratio=0.9, seed=0)
    ib.set_epoch(0)
    scored = np.arange(0, n, 2)
    ib.update(scored, np.linspace(0.0, 1.0, scored.size))
    kept = set(ib.epoch_indices(1).tolist())
    assert set(range(1, n, 2)) <= kept
    assert ib.history_[-1]["threshold"] == pytest.approx(0.5)
    assert ib.history_[-1]["n_scored"] == scored.size and ib.history_[-1]["n_well_learned"] == 10
    assert torch.equal(ib.weights(torch.arange(1, n, 2)), torch.ones(n // 2))


def test_weighted_loss_is_unbiased_over_seeds():
    # Every well-learned example is skipped with probability exactly r (stochastic rounding), so
    # E[sum over the kept of w_i L_i] = sum of all L_i. r * n_wl is not an integer here.
    n, r, n_seeds = 30, 0.63, 4000
    losses = _scripted(n, 4)
    below = losses < losses.mean()
    assert (r * below.sum()) % 1 > 0.05
    weighted, unweighted, kept_count = [], [], np.zeros(n)
    for seed in range(n_seeds):
        ib = InfoBatch(n, epochs=8, prune_ratio=r, seed=seed)
        ib.set_epoch(0)
        ib.update(np.arange(n), losses)
        idx = ib.epoch_indices(1).numpy()
        w = ib.weights(idx).double().numpy()
        weighted.append(float((w * losses[idx]).sum()))
        unweighted.append(float(losses[idx].sum()))
        kept_count[idx] += 1
    weighted = np.array(weighted)
    se = weighted.std() / math.sqrt(n_seeds)
    assert abs(weighted.mean() - losses.sum()) < 4 * se
    assert losses.sum() - np.mean(unweighted) > 20 * se  # without the weights: clearly biased
    freq = kept_count / n_seeds
    np.testing.assert_allclose(freq[~below], 1.0)
    np.testing.assert_allclose(freq[below], 1 - r, atol=0.04)


@pytest.mark.parametrize(("epochs", "delta", "pruned_epochs"), [(8, 0.875, 7), (10, 0.875, 8), (5, 1.0, 5),
                                                               (4, 0.2, 0)])
def test_annealing_epochs_use_the_full_data(epochs, delta, pruned_epochs):
    n = 60
    ib = InfoBatch(n, epochs=epochs, prune_ratio=0.5, delta=delta, seed=0)
    assert ib.pruned_epochs == pruned_epochs
    losses = _scripted(n)
    for epoch in range(epochs):
        idx = ib.epoch_indices(epoch)
        ib.update(idx, losses[idx.numpy()])
        full = epoch == 0 or epoch >= pruned_epochs
        assert (len(idx) == n) == full, epoch
        if epoch >= pruned_epochs:
            assert torch.equal(ib.weights(torch.arange(n)), torch.ones(n))
            assert ib.history_[-1]["pruning"] is False
    assert [h["epoch"] for h in ib.history_] == list(range(epochs))


def _run(ib: InfoBatch, epochs, batch: int = 7, stop_after_batches: int | None = None):
    """Scripted training: the loss of example i in epoch e; returns each epoch's (order, weights)."""
    out = []
    for epoch in epochs:
        idx = ib.epoch_indices(epoch)
        out.append((idx.tolist(), ib.weights(idx).tolist()))
        for b, start in enumerate(range(0, len(idx), batch)):
            if stop_after_batches is not None and b == stop_after_batches:
                return out
            chunk = idx[start:start + batch].numpy()
            ib.update(chunk, np.cos(chunk * 1.7 + epoch) + 1.5 + 0.1 * epoch)
    return out


def test_same_seed_same_plans_other_seed_other_plans():
    a = _run(InfoBatch(80, epochs=6, seed=5), range(6))
    b = _run(InfoBatch(80, epochs=6, seed=5), range(6))
    c = _run(InfoBatch(80, epochs=6, seed=6), range(6))
    assert a == b and a != c
    assert any(len(order) < 80 for order, _ in a)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_resume_at_an_epoch_boundary_and_mid_epoch():
    n, epochs = 90, 8
    uninterrupted = InfoBatch(n, epochs=epochs, seed=1)
    reference = _run(uninterrupted, range(epochs))

    first = InfoBatch(n, epochs=epochs, seed=1)
    head = _run(first, range(3))
    resumed = InfoBatch(n, epochs=epochs, seed=1)
    assert resumed.load_state_dict(_roundtrip(first.state_dict())) is resumed  # returns self, as the others
    assert head + _run(resumed, range(3, epochs)) == reference
    assert resumed.history_ == uninterrupted.history_
    np.testing.assert_array_equal(resumed.losses_, uninterrupted.losses_)

    # interrupted after 4 batches of epoch 3: the resumed run finishes epoch 3 with the same plan
    first = InfoBatch(n, epochs=epochs, seed=1)
    _run(first, range(3))
    _run(first, [3], stop_after_batches=4)
    resumed = InfoBatch(n, epochs=epochs, seed=1)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert resumed.epoch == 3
    idx = resumed.epoch_indices(3)
    assert (idx.tolist(), resumed.weights(idx).tolist()) == reference[3]
    for start in range(4 * 7, len(idx), 7):
        chunk = idx[start:start + 7].numpy()
        resumed.update(chunk, np.cos(chunk * 1.7 + 3) + 1.5 + 0.3)
    assert _run(resumed, range(4, epochs)) == reference[4:]
    assert resumed.history_ == uninterrupted.history_
    assert resumed.fraction_skipped_ == uninterrupted.fraction_skipped_ > 0


def test_explicit_shards_split_the_epoch_like_distributed_sampler():
    n, world = 53, 3
    full = InfoBatch(n, epochs=4, seed=9)
    shards = [InfoBatch(n, epochs=4, seed=9, rank=r, world_size=world) for r in range(world)]
    cut = [InfoBatch(n, epochs=4, seed=9, rank=r, world_size=world, drop_last=True) for r in range(world)]
    idx = np.arange(n)
    for ib in (full, *shards, *cut):
        ib.set_epoch(0)
        ib.update(idx, _scripted(n, 7))
    order = full.epoch_indices(1).numpy()
    total = math.ceil(order.size / world) * world
    padded = np.resize(order, total)  # the order, then its first examples again
    for r, ib in enumerate(shards):
        np.testing.assert_array_equal(ib.epoch_indices(1).numpy(), padded[r::world])
        torch.testing.assert_close(ib.weights(ib.epoch_indices(1)), full.weights(ib.epoch_indices(1)))
    kept = (order.size // world) * world
    got = np.sort(np.concatenate([ib.epoch_indices(1).numpy() for ib in cut]))
    np.testing.assert_array_equal(got, np.sort(order[:kept]))


def test_weights_dtype_and_device_follow_the_indices():
    ib = InfoBatch(10, epochs=2, seed=0)
    ib.set_epoch(0)
    w = ib.weights([1, 2, 3])
    assert w.dtype == torch.float32 and w.device.type == "cpu" and w.shape == (3,)
    assert ib.weights(np.array([], dtype=np.int64)).shape == (0,)


def test_bad_inputs_name_the_parameter():
    with pytest.raises(InvalidParameterError, match=r"'prune_ratio'.*\[0, 1\)"):
        InfoBatch(10, epochs=2, prune_ratio=1.0)
    for bad in (-0.1, float("nan"), "0.5"):
        with pytest.raises(InvalidParameterError, match="'prune_ratio'"):
            InfoBatch(10, epochs=2, prune_ratio=bad)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(InvalidParameterError, match=r"'delta'.*\(0, 1\]"):
            InfoBatch(10, epochs=2, delta=bad)
    with pytest.raises(InvalidParameterError, match="'epochs'"):
        InfoBatch(10, epochs=0)
    with pytest.raises(InvalidParameterError, match="'n_examples'"):
        InfoBatch(0, epochs=2)
    with pytest.raises(InvalidParameterError, match="'rank'.*world_size=2"):
        InfoBatch(10, epochs=2, rank=2, world_size=2)

    ib = InfoBatch(10, epochs=3)
    with pytest.raises(InvalidParameterError, match="call set_epoch"):
        ib.weights([0])
    with pytest.raises(InvalidParameterError, match="call set_epoch"):
        list(ib)
    with pytest.raises(InvalidParameterError, match=r"'epoch'.*\[0, 2\]"):
        ib.set_epoch(3)
    ib.set_epoch(0)
    with pytest.raises(InvalidParameterError, match="'indices', 'losses'.*indices=3, losses=2"):
        ib.update([0, 1, 2], [0.1, 0.2])
    with pytest.raises(InvalidParameterError, match=r"'indices'.*\[0, 9\].*Got 10"):
        ib.update([0, 10], [0.1, 0.2])
    with pytest.raises(InvalidParameterError, match=r"'indices'.*Got -1"):
        ib.update(torch.tensor([-1]), torch.tensor([0.1]))
    with pytest.raises(InvalidParameterError, match="'indices'.*integer"):
        ib.update(torch.tensor([0.0]), torch.tensor([0.1]))
    with pytest.raises(InvalidParameterError, match="'indices'.*1-d"):
        ib.update(np.zeros((2, 1), dtype=np.int64), [0.1, 0.2])
    with pytest.raises(InvalidParameterError, match="'losses'.*finite.*nan"):
        ib.update([0, 1], torch.tensor([0.1, float("nan")]))
    with pytest.raises(InvalidParameterError, match="'losses'.*1-d"):
        ib.update([0, 1], np.zeros((2, 2)))
    assert np.isnan(ib.losses_).all()  # nothing was recorded by the failed calls

    other = InfoBatch(10, epochs=3, prune_ratio=0.3)
    with pytest.raises(InvalidParameterError, match="prune_ratio=0.5.*prune_ratio=0.3"):
        other.load_state_dict(ib.state_dict())
    with pytest.raises(InvalidParameterError, match="'state'"):
        other.load_state_dict({"losses": []})


def test_num_epochs_is_a_deprecated_alias_of_epochs_and_old_states_load():
    """#14 naming pass: ``epochs`` as everywhere else; ``num_epochs`` works one release with a FutureWarning."""
    with pytest.warns(FutureWarning, match="'num_epochs' parameter was renamed to 'epochs'"):
        old = InfoBatch(10, num_epochs=3, seed=1)
    assert old.epochs == 3 and "epochs=3" in repr(old) and "num_epochs" not in repr(old)
    with pytest.warns(FutureWarning, match="num_epochs was renamed"):
        assert old.num_epochs == 3
    with pytest.raises(InvalidParameterError, match="'num_epochs' parameter of InfoBatch was renamed.*Got both"):
        InfoBatch(10, epochs=3, num_epochs=3)
    with pytest.raises(InvalidParameterError, match="'epochs' parameter of InfoBatch.*Got None"):
        InfoBatch(10)  # missing
    # a state saved before the rename (key "num_epochs") restores the same plan
    ib = InfoBatch(10, epochs=3, seed=1)
    ib.set_epoch(0)
    ib.update(np.arange(10), np.linspace(0.1, 1.0, 10))
    ib.set_epoch(1)
    state = ib.state_dict()
    assert state["epochs"] == 3 and "num_epochs" not in state
    saved_before = {("num_epochs" if k == "epochs" else k): v for k, v in state.items()}
    resumed = InfoBatch(10, epochs=3, seed=1).load_state_dict(saved_before)
    np.testing.assert_array_equal(resumed.epoch_indices(1).numpy(), ib.epoch_indices(1).numpy())
    with pytest.raises(InvalidParameterError, match="epochs=4, but this object has epochs=3"):
        InfoBatch(10, epochs=3, seed=1).load_state_dict({**saved_before, "num_epochs": 4})
    with pytest.raises(InvalidParameterError, match="both 'epochs'.*'num_epochs'"):
        InfoBatch(10, epochs=3, seed=1).load_state_dict({**state, "num_epochs": 4})
