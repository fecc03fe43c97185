"""Distributed scoring: shards tile the data, gathering is the identity in one process, and under
torchrun (2 gloo processes) sharded scoring passes and a DDP-trained DataPruner equal one process."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leanscale.core.errors import InvalidParameterError
from leanscale.pruning.distributed import gather_rows, map_sharded, shard_indices
from leanscale.pruning.grand import grand_scores
from leanscale.pruning.scores import collect_probs
from tests.distributed import run_torchrun
from tests.pruning._ddp_scoring_worker import fixed_model, pruner, tiny_data

WORKER = Path(__file__).with_name("_ddp_scoring_worker.py")


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 3), (0, 2), (7, 1), (64, 2)])
def test_shards_tile_range_in_rank_order(n, world):
    blocks = [shard_indices(n, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(blocks), np.arange(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert all(b.dtype == np.int64 for b in blocks)


def test_single_process_is_the_identity():
    assert np.array_equal(shard_indices(5), np.arange(5))
    rows = np.arange(12.0).reshape(4, 3)
    assert np.array_equal(gather_rows(rows, 4), rows)
    out = map_sharded(lambda idx: torch.as_tensor(idx * 10)[:, None].float(), 4)  # a tensor comes back as numpy
    assert isinstance(out, np.ndarray) and out.shape == (4, 1)
    assert np.array_equal(out[:, 0], [0, 10, 20, 30])


def test_bad_input():
    with pytest.raises(InvalidParameterError, match="'rank'"):
        shard_indices(10, rank=2, world=2)
    with pytest.raises(InvalidParameterError, match="'world'"):
        shard_indices(10, rank=0, world=0)
    with pytest.raises(InvalidParameterError, match="'local'.*4 rows"):
        gather_rows(np.zeros((3, 2)), 4)
    with pytest.raises(InvalidParameterError, match="'fn'.*one row per index"):
        map_sharded(lambda idx: np.zeros(len(idx) + 1), 4)
    with pytest.raises(InvalidParameterError, match="'fn'"):
        map_sharded("not callable", 4)


@pytest.mark.distributed
def test_two_process_scoring_equals_single_process(tmp_path):
    run_torchrun(WORKER, tmp_path, nproc=2, timeout=120)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    # Every rank ends with the same gathered arrays.
    for key in ("probs", "grand", "bytes", "scores", "kept", "resumed_scores", "forgetting", "bn_buffers"):
        assert rank0[key] == rank1[key], key
    assert set(rank0["bn_buffers"]) == {"net.1.running_mean", "net.1.running_var"}  # averaged over ranks
    # int64 and bool rows over an uneven split (7 rows over 2 ranks) travel exactly
    assert rank0["bytes"] == [[i, -i, i % 2 == 0] for i in range(7)]

    # (a) sharded scoring passes on a fixed model equal one process on all rows
    x, y = tiny_data()
    model = fixed_model()
    np.testing.assert_allclose(np.array(rank0["probs"]), collect_probs(model, x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(rank0["grand"]), grand_scores(model, (x, y)), rtol=1e-6, atol=1e-6)

    # (b) DDP-trained EL2N pruner equals the single-process pruner trained on the same global batches
    single = pruner().fit(x.numpy(), y.numpy())
    ddp_scores = np.array(rank0["scores"])
    np.testing.assert_allclose(ddp_scores, single.scores_, rtol=0, atol=1e-4)
    # the same examples are kept, except where two scores tie within the DDP tolerance
    flipped = set(rank0["kept"]) ^ set(single.kept_indices_.tolist())
    boundary = np.sort(single.scores_)[::-1][len(single.kept_indices_) - 1]  # lowest kept score
    assert all(abs(single.scores_[i] - boundary) < 2e-4 for i in flipped)
    assert len(flipped) <= 2
    assert rank0["manifest"]["n_kept"] == len(single.kept_indices_)
    # resumed under torchrun: rank 0 loaded the saved seed and every rank got it
    assert rank0["resumed_scores"] == rank0["scores"]
    assert len(rank0["resumed_reused"]) == 1 and rank0["resumed_reused"] == rank1["resumed_reused"]
    # forgetting events from the gathered slices equal one process seeing the global batches
    np.testing.assert_array_equal(rank0["forgetting"], pruner("forgetting", epochs=3).fit(x.numpy(), y.numpy()).scores_)


def test_docstring_examples_run():
    import doctest

    from leanscale.pruning import distributed as distributed_module

    result = doctest.testmod(distributed_module)
    assert result.attempted >= 2 and result.failed == 0
