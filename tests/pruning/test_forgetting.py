"""ForgettingTracker on scripted accuracy sequences, resume through state_dict, bad inputs."""

import doctest
import json

import numpy as np
import pytest
import torch

import leanscale.pruning.forgetting as forgetting_mod
from leanscale.core.errors import InvalidParameterError
from leanscale.pruning.forgetting import ForgettingTracker

# one row per update of examples 0..3 (example 4 is never updated):
#   0: correct, correct, wrong, correct, wrong -> 2 forgetting events
#   1: never correct                           -> never learned
#   2: always correct                          -> 0 events
#   3: wrong, correct, wrong, wrong, correct   -> 1 event
SCRIPT = [
    [True, False, True, False],
    [True, False, True, True],
    [False, False, True, False],
    [True, False, True, False],
    [False, False, True, True],
]


def _scripted(n=5):
    tracker = ForgettingTracker(n)
    for row in SCRIPT:
        assert tracker.update([0, 1, 2, 3], row) is tracker
    return tracker


def test_doctests():
    assert doctest.testmod(forgetting_mod, raise_on_error=False).failed == 0


def test_counts_on_a_scripted_sequence():
    tracker = _scripted()
    np.testing.assert_array_equal(tracker.counts_, [2, 0, 0, 1, 0])
    assert tracker.counts_.dtype == np.int64
    np.testing.assert_array_equal(tracker.ever_correct_, [True, False, True, True, False])
    np.testing.assert_array_equal(tracker.n_updates_, [5, 5, 5, 5, 0])
    np.testing.assert_array_equal(tracker.last_correct_, [False, False, True, True, False])
    # example 4 was never seen: an error unless allowed
    with pytest.raises(InvalidParameterError, match=r"'allow_unseen'.*1 of 5 were not \(first: \[4\]\)"):
        tracker.scores()
    got = tracker.scores(allow_unseen=True)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [2.0, 3.0, 0.0, 1.0, 0.0])  # never learned: max(2) + 1
    np.testing.assert_array_equal(tracker.scores("inf", allow_unseen=True), [2.0, np.inf, 0.0, 1.0, 0.0])
    # once example 4 is seen (correct), no error
    tracker.update([4], [True])
    np.testing.assert_array_equal(tracker.scores(), [2.0, 3.0, 0.0, 1.0, 0.0])


def test_never_learned_without_any_forgetting_scores_one():
    tracker = ForgettingTracker(2).update([0, 1], [False, True]).update([1, 0], [True, False])
    np.testing.assert_array_equal(tracker.scores(), [1.0, 0.0])


def test_tensor_inputs_batches_in_any_order_and_repeats():
    by_rows = _scripted(4)
    shuffled = ForgettingTracker(4)
    for row in SCRIPT:  # each update split into two batches in another order, as tensors / 0-1 ints
        row = np.array(row)
        shuffled.update(torch.tensor([3, 1]), torch.tensor(row[[3, 1]]))
        shuffled.update(np.array([2, 0], dtype=np.int32), row[[2, 0]].astype(np.int64))
    np.testing.assert_array_equal(shuffled.counts_, by_rows.counts_)
    np.testing.assert_array_equal(shuffled.scores(), by_rows.scores())
    # an index repeated in one update = consecutive presentations, in order
    repeated = ForgettingTracker(1).update([0, 0, 0, 0], [True, False, True, False])
    assert repeated.counts_.tolist() == [2] and repeated.n_updates_.tolist() == [4]
    # an empty update changes nothing
    before = by_rows.state_dict()
    by_rows.update([], [])
    assert by_rows.state_dict() == before


def test_state_dict_round_trip_resumes_exactly():
    full = _scripted()
    half = ForgettingTracker(5)
    for row in SCRIPT[:2]:
        half.update([0, 1, 2, 3], row)
    state = json.loads(json.dumps(half.state_dict()))  # JSON-able, as core.io.JobState stores it
    resumed = ForgettingTracker(5).load_state_dict(state)
    for row in SCRIPT[2:]:
        resumed.update([0, 1, 2, 3], row)
    assert resumed.state_dict() == full.state_dict()
    # arrays and tensors are accepted too
    tensors = {k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in full.state_dict().items()}
    assert ForgettingTracker(5).load_state_dict(tensors).state_dict() == full.state_dict()


def test_bad_input():
    with pytest.raises(InvalidParameterError, match=r"'n_examples'.*int in the range \[1, inf\)\. Got 0"):
        ForgettingTracker(0)
    tracker = ForgettingTracker(4)
    with pytest.raises(InvalidParameterError, match=r"'indices'.*must be in \[0, 4\).*Got 4 at position 1"):
        tracker.update([0, 4], [True, True])
    with pytest.raises(InvalidParameterError, match=r"'indices'.*Got -1 at position 0"):
        tracker.update([-1], [True])
    with pytest.raises(InvalidParameterError, match="'indices'.*integer example indices. Got dtype float64"):
        tracker.update([0.0, 1.0], [True, True])
    with pytest.raises(InvalidParameterError, match="'indices'.*1-d array"):
        tracker.update([[0, 1]], [True, True])
    with pytest.raises(InvalidParameterError, match=r"'correct'.*booleans.*values \[0, 2\]"):
        tracker.update([0, 1], [0, 2])
    with pytest.raises(InvalidParameterError, match="'correct'.*booleans"):
        tracker.update([0, 1], [0.5, 1.0])
    with pytest.raises(InvalidParameterError, match=r"same length\. Got indices=2, correct=3"):
        tracker.update([0, 1], [True, False, True])
    assert tracker.n_updates_.sum() == 0  # nothing was recorded by the failed calls
    with pytest.raises(InvalidParameterError, match=r"'never_learned'.*'inf', 'max'.*Got 'maximum'"):
        tracker.scores("maximum", allow_unseen=True)
    with pytest.raises(InvalidParameterError, match="'allow_unseen'.*bool"):
        tracker.scores(allow_unseen=1)


def test_load_state_dict_bad_input():
    good = _scripted().state_dict()
    with pytest.raises(InvalidParameterError, match=r"exactly the keys.*missing \['counts'\]"):
        ForgettingTracker(5).load_state_dict({k: v for k, v in good.items() if k != "counts"})
    with pytest.raises(InvalidParameterError, match="n_examples=6.*Got n_examples=5"):
        ForgettingTracker(6).load_state_dict(good)
    with pytest.raises(InvalidParameterError, match=r"'state\['counts'\]'.*5 non-negative integers. Got 4"):
        ForgettingTracker(5).load_state_dict({**good, "counts": [0, 0, 0, 0]})
    with pytest.raises(InvalidParameterError, match=r"'state\['ever_correct'\]'.*booleans"):
        ForgettingTracker(5).load_state_dict({**good, "ever_correct": [1, 0, 1, 1, 0]})
    with pytest.raises(InvalidParameterError, match="consistent"):
        ForgettingTracker(5).load_state_dict({**good, "ever_correct": [True] * 5})  # example 4 unseen
    with pytest.raises(InvalidParameterError, match="'state' parameter.*dict"):
        ForgettingTracker(5).load_state_dict([1, 2])
