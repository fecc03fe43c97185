"""The scheduled bias update rate of ``benchmarks/moe/balance.py`` (issue 17,
``lossfree_fine_shared_decay``): a half cosine from ``start`` to ``end`` over the first
``until_fraction`` of the steps, then ``end``; the variant's settings record the schedule and
build its layers at the final rate."""

import math

import pytest

from benchmarks.moe.balance import scheduled_rate, variants

SCHEDULE = {"kind": "cosine_then_constant", "start": 4e-3, "end": 1e-3, "until_fraction": 0.25}


@pytest.mark.parametrize("step", [0, 1, 30, 61, 100, 121])
def test_cosine_part_matches_the_closed_form(step):
    t = step / (0.25 * 488)
    expected = 1e-3 + 3e-3 * (1 + math.cos(math.pi * t)) / 2
    assert scheduled_rate(SCHEDULE, step, 488) == pytest.approx(expected, rel=1e-12)


def test_ends_and_middle():
    assert scheduled_rate(SCHEDULE, 0, 488) == pytest.approx(4e-3)
    assert scheduled_rate(SCHEDULE, 61, 488) == pytest.approx(2.5e-3)  # half way: the mean of the ends
    assert [scheduled_rate(SCHEDULE, s, 488) for s in (122, 123, 300, 488)] == [1e-3] * 4
    rates = [scheduled_rate(SCHEDULE, s, 488) for s in range(489)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises


def test_the_decay_variant_records_its_schedule():
    kw = variants(1e-3)["lossfree_fine_shared_decay"]
    assert kw["bias_rate_schedule"] == SCHEDULE
    assert kw["bias_update_rate"] == 1e-3  # the layers' own rate: the schedule's end
    shared = variants(1e-3)["lossfree_fine_shared"]
    assert {k: v for k, v in kw.items() if k != "bias_rate_schedule"} == shared  # otherwise the same model
    with pytest.raises(ValueError, match="unknown bias_rate_schedule kind"):
        scheduled_rate(SCHEDULE | {"kind": "linear"}, 1, 488)
