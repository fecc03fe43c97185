"""Tests of the cost ledger: FLOP rules against FlopCounterMode, measure(), CostLedger."""

from __future__ import annotations

import doctest
import json
import time

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import leanscale.core.flops as flops_module
import leanscale.core.ledger as ledger_module
import leanscale.core.measure as measure_module
from leanscale.core.errors import DataFormatError, InvalidParameterError
from leanscale.core.flops import (
    NORM_BACKWARD_FACTOR,
    NORM_STATS_FLOPS_PER_ELEMENT,
    FlopCount,
    count_flops,
    get_flop_rule,
    register_flop_rule,
    track_flops,
)
from leanscale.core.ledger import CostEntry, CostLedger
from leanscale.core.measure import measure
from leanscale.models import GPT, CausalSelfAttention, GPTConfig

MB = 1024 * 1024


@pytest.mark.parametrize("module", [flops_module, measure_module, ledger_module], ids=lambda m: m.__name__)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_the_old_home_still_imports_the_flop_and_measure_names():
    # Callers written before the split import these from core.ledger; they are the same objects.
    old = {name: getattr(ledger_module, name) for name in flops_module.__all__ + measure_module.__all__}
    assert old == {**{n: getattr(flops_module, n) for n in flops_module.__all__},
                   **{n: getattr(measure_module, n) for n in measure_module.__all__}}
    assert set(ledger_module.__all__) == {"CostEntry", "CostLedger"}


def flop_counter(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FlopCounterMode's forward and backward FLOPs of ``module(x)``."""
    with FlopCounterMode(display=False) as fwd:
        y = module(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


# ----------------------------------------------------------------------------- FLOP rules


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
def test_linear_matches_flop_counter_mode(bias, input_grad, shape):
    layer = nn.Linear(12, 9, bias=bias)
    x = torch.randn(*shape, requires_grad=input_grad)
    ours = count_flops(layer, x)
    fwd, bwd = flop_counter(layer, x)
    rows = 7 if len(shape) == 2 else 3 * 5
    assert ours.forward == fwd == 2 * rows * 12 * 9
    assert ours.backward == bwd  # 2x forward with an input gradient, 1x without


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(3, 5, 4, stride=3), (2, 3, 20)),
        (nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2), (2, 4, 9, 9)),
        (nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=1, bias=False), (2, 3, 10, 11)),
        (nn.Conv3d(2, 4, 3, padding=1), (1, 2, 5, 6, 7)),
    ],
)
def test_conv_matches_flop_counter_mode(layer, shape):
    x = torch.randn(*shape, requires_grad=True)
    ours = count_flops(layer, x)
    fwd, bwd = flop_counter(layer, x)
    assert ours.forward == fwd
    assert ours.backward == bwd == 2 * fwd


def test_grouped_conv_forward_matches_and_backward_is_2x():
    layer = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    ours = count_flops(layer, x)
    fwd, bwd = flop_counter(layer, x)
    assert ours.forward == fwd
    # The weight gradient of a grouped conv has the forward's MACs; FlopCounterMode multiplies
    # that half by the number of groups (it counts it as an ungrouped conv).
    assert ours.backward == 2 * fwd
    assert bwd == fwd + 2 * fwd


def test_conv_transpose_forward_matches():
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    ours = count_flops(layer, x)
    fwd, _ = flop_counter(layer, x)
    assert ours.forward == fwd and ours.backward == 2 * fwd


def test_first_layer_and_frozen_layers_skip_gradients():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)  # data: no input gradient for the first layer
    f0, f1 = 2 * 5 * 8 * 16, 2 * 5 * 16 * 4
    c = count_flops(net, x)
    assert (c.forward, c.backward) == (f0 + f1, f0 + 2 * f1)
    assert c.by_module == {"0": (f0, f0), "2": (f1, 2 * f1)}
    net[2].weight.requires_grad_(False)
    c = count_flops(net, x)
    assert c.backward == f0 + f1  # last layer: input gradient only
    with torch.no_grad(), track_flops(net) as live:
        net(x)
    assert (live.forward, live.backward) == (f0 + f1, 0)  # inference: no backward


def test_embedding_and_norm_rules():
    emb = nn.Embedding(10, 6)
    c = count_flops(emb, torch.randint(0, 10, (3, 4)))
    assert (c.forward, c.backward) == (0, 3 * 4 * 6)
    ln = nn.LayerNorm(6)
    x = torch.randn(3, 4, 6, requires_grad=True)
    c = count_flops(ln, x)
    per_element = NORM_STATS_FLOPS_PER_ELEMENT + 2  # + weight multiply + bias add
    assert c.forward == per_element * x.numel()
    assert c.backward == NORM_BACKWARD_FACTOR * per_element * x.numel()
    bn = nn.BatchNorm2d(3, affine=False)
    y = torch.randn(2, 3, 4, 4)
    assert count_flops(bn, y).forward == NORM_STATS_FLOPS_PER_ELEMENT * y.numel()
    assert count_flops(bn.eval(), y).forward == 2 * y.numel()  # running statistics
    if hasattr(nn, "RMSNorm"):
        assert count_flops(nn.RMSNorm(6), x).forward == 4 * x.numel()


def test_count_flops_restores_batchnorm_buffers():
    bn = nn.BatchNorm1d(4)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    count_flops(bn, torch.randn(8, 4) + 3.0)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_gpt_matmuls_match_flop_counter_mode():
    """Linear + attention rules over a whole GPT equal FlopCounterMode's matmul count."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 40, (2, 10))
    with sdpa_kernel(SDPBackend.MATH):  # attention matmuls visible to FlopCounterMode on a CPU
        ours = count_flops(model, idx)
        with FlopCounterMode(display=False) as fwd:
            logits, _ = model(idx)
        with FlopCounterMode(display=False) as bwd:
            logits.sum().backward()
    matmul_modules = {
        name for name, m in model.named_modules() if isinstance(m, (nn.Linear, CausalSelfAttention))
    }
    assert ours.unsupported == []
    assert sum(ours.by_module[n][0] for n in matmul_modules) == fwd.get_total_flops()
    assert sum(ours.by_module[n][1] for n in matmul_modules) == bwd.get_total_flops()
    # Attention: Q K^T and A V, each 2 * B * T * T * C FLOPs.
    assert ours.by_module["transformer.h.0.attn"][0] == 2 * 2 * 2 * 10 * 10 * 16


def test_subclasses_inherit_rules_unless_they_register_their_own():
    class MyLinear(nn.Linear):
        pass

    class CheapLinear(nn.Linear):
        pass

    register_flop_rule(CheapLinear, lambda module, inputs, output: (1, 2))
    x = torch.randn(4, 3)
    assert get_flop_rule(MyLinear(3, 2)) is get_flop_rule(nn.Linear)
    assert count_flops(MyLinear(3, 2), x).forward == 2 * 4 * 3 * 2
    assert (count_flops(CheapLinear(3, 2), x).forward, count_flops(CheapLinear(3, 2), x).backward) == (1, 2)

    class Scale(nn.Module):
        def forward(self, x):
            return 3 * x

    @register_flop_rule(Scale)
    def _scale_flops(module, inputs, output):
        return output.numel(), 0

    assert count_flops(Scale(), x).forward == 12


def test_register_flop_rule_rejects_bad_input():
    with pytest.raises(InvalidParameterError, match="subclass of torch.nn.Module"):
        register_flop_rule(int, lambda *a: (0, 0))
    with pytest.raises(InvalidParameterError, match="'rule' parameter of register_flop_rule"):
        register_flop_rule(nn.Module, 3)
    with pytest.raises(InvalidParameterError, match="'model' parameter of count_flops"):
        count_flops(lambda x: x, torch.randn(2))


class _Gain(nn.Module):
    """A module with its own parameter and no FLOP rule."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.g


def test_unsupported_modules_warn_once_and_are_listed():
    net = nn.Sequential(_Gain(), nn.Linear(3, 3), _Gain())
    with pytest.warns(UserWarning, match="no FLOP rule for _Gain") as record:
        c = count_flops(net, torch.randn(2, 3))
    assert len(record) == 1
    assert c.unsupported == ["_Gain"]
    assert c.forward == 2 * 2 * 3 * 3  # the Linear is still counted


def test_hooks_are_removed_even_on_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        count_flops(model, torch.randn(1, 2))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    c = count_flops(nn.Linear(2, 2), torch.randn(1, 2))
    assert all(len(m._forward_hooks) == 0 for m in model.modules()) and c.forward == 8


# ----------------------------------------------------------------------------- measure


def test_measure_cpu_sees_a_big_allocation():
    with measure("cpu") as m:
        x = torch.ones(50 * MB)  # 200 MiB of float32, written (so resident)
    assert m.method == "proc_statm_rss"
    assert m.peak_memory_bytes >= 150 * MB
    assert m.seconds > 0 and m.device == "cpu"
    del x


def test_measure_cpu_sees_a_freed_peak():
    with measure("cpu", interval_seconds=0.001) as m:
        x = torch.ones(50 * MB)  # 200 MiB
        time.sleep(0.05)  # the sampler thread looks while it is alive
        del x
    assert m.peak_memory_bytes >= 150 * MB


def test_measure_cpu_peak_is_the_allocation_within_a_tolerance():
    # brute force: a block that holds a known 200 MiB tensor (written, so resident) and nothing
    # else big reads 200 MiB, give or take the allocator's and the sampler's few MiB
    with measure("cpu", interval_seconds=0.001) as m:
        x = torch.full((50 * MB,), 1.5)  # 50 Mi float32 = 200 MiB
    assert 195 * MB <= m.peak_memory_bytes <= 215 * MB
    del x


def test_measure_counts_memory_freed_before_the_block_and_reused_in_it():
    # 100 chunks of 1 MiB, written and freed twice, a live tensor above them: glibc keeps them
    # mapped (freeing a mmap'd chunk raised its mmap threshold, so the second round came from the
    # heap). The same allocation inside the block must still read ~100 MiB: without measure's
    # malloc_trim it read ~1 MiB here.
    for _ in range(2):
        chunks = [torch.full((MB // 4,), 1.0) for _ in range(100)]
        keep = torch.ones(10)  # noqa: F841 -- pins the top of the heap
        del chunks
    with measure("cpu", interval_seconds=0.001) as m:
        chunks = [torch.full((MB // 4,), 2.0) for _ in range(100)]  # 100 x 1 MiB
    assert 95 * MB <= m.peak_memory_bytes <= 115 * MB
    del chunks


def test_measure_children_counts_a_child_process():
    import subprocess
    import sys

    # the child writes 200 MiB, says so, and waits: the sampler sees its RSS; without children=True
    # this process's own RSS barely moves
    code = ("import sys, time; b = b'\\x01' * (200 * 2**20); print('ready', flush=True); "
            "sys.stdin.readline()")
    for children in (True, False):
        with measure("cpu", interval_seconds=0.005, children=children) as m:
            child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.05)  # a few samples while the child holds its 200 MiB
            child.communicate("\n", timeout=30)
        if children:
            assert m.method == "proc_statm_rss_tree"
            assert 195 * MB <= m.peak_memory_bytes <= 260 * MB  # + the interpreter's own ~10 MiB
        else:
            assert m.method == "proc_statm_rss" and m.peak_memory_bytes < 50 * MB


def test_tracked_memory_round_trips_through_the_ledger_file(tmp_path):
    ledger = CostLedger()
    with ledger.track("alloc", device="cpu", compare="c", side="technique"):
        x = torch.ones(25 * MB)  # 100 MiB
    del x
    ledger.record("base", seconds=2.0, peak_memory_bytes=123_456_789, compare="c", side="baseline")
    assert ledger.entries[0].peak_memory_bytes >= 90 * MB
    back = CostLedger.load(ledger.save(tmp_path / "ledger.json"))
    assert back.entries == ledger.entries
    assert [e.peak_memory_bytes for e in back] == [e.peak_memory_bytes for e in ledger]
    assert back.entries[0].meta["memory_method"] == "proc_statm_rss"
    assert "117.7 MiB" in back.summary_table()  # 123,456,789 B


def test_measure_rejects_bad_device():
    with pytest.raises(InvalidParameterError, match="'device' parameter of measure"):
        with measure("tpu"):
            pass
    with pytest.raises(InvalidParameterError, match="'children' parameter of measure"):
        with measure("cpu", children="yes"):
            pass
    with pytest.raises(InvalidParameterError, match="'interval_seconds' parameter of measure"):
        with measure("cpu", interval_seconds=0):
            pass


class _FakeCudaAllocator:
    """Stands in for torch.cuda's memory counters, to test measure()'s bookkeeping on a CPU."""

    def __init__(self):
        self.allocated = self.peak = 0

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n):
        self.allocated -= n

    def reset(self, device=None):
        self.peak = self.allocated


def test_measure_cuda_bookkeeping_with_a_fake_allocator(monkeypatch):
    fake = _FakeCudaAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    fake.alloc(1000)  # held before: not counted
    fake.alloc(5000)
    fake.free(5000)  # an old peak: not counted either
    with measure() as outer:  # the default device is the GPU when there is one
        fake.alloc(300)
        fake.free(300)
        with measure("cuda") as inner:
            fake.alloc(100)
            fake.free(100)
        fake.alloc(50)
    assert outer.device == inner.device == "cuda:0"
    assert outer.method == "cuda_max_memory_allocated"
    assert inner.peak_memory_bytes == 100
    assert outer.peak_memory_bytes == 300  # the inner reset did not hide the outer's peak
    with measure("cuda") as after:
        fake.alloc(10)
    assert after.peak_memory_bytes == 10


# ----------------------------------------------------------------------------- ledger


def test_record_total_rows_and_table():
    ledger = CostLedger()
    ledger.record("train", flops=100, seconds=2.0, peak_memory_bytes=5 * MB, n_examples=10, epoch=0)
    ledger.record("train", flops=300, seconds=1.0, peak_memory_bytes=7 * MB, n_examples=10, epoch=1)
    ledger.record("eval", flops=FlopCount(forward=40, backward=0), n_examples=4)
    total = ledger.total()
    assert (total.flops, total.seconds, total.peak_memory_bytes, total.n_examples) == (440, 3.0, 7 * MB, 24)
    assert ledger.total("train").flops == 400 and ledger.total("eval").seconds is None
    assert ledger.names() == ["train", "eval"]
    rows = ledger.to_rows()
    assert rows[0] == dict(name="train", flops=100, seconds=2.0, peak_memory_bytes=5 * MB,
                           n_examples=10, epoch=0)
    table = ledger.summary_table()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "entries", "FLOPs"]
    assert any(line.startswith("train") and "7.0 MiB" in line for line in lines)
    assert lines[-1].startswith("total") and "4.400e+02" in lines[-1]


def test_record_rejects_bad_values():
    ledger = CostLedger()
    with pytest.raises(InvalidParameterError, match="'flops' parameter of CostLedger.record"):
        ledger.record("x", flops=-1)
    with pytest.raises(InvalidParameterError, match="'n_examples' parameter"):
        ledger.record("x", n_examples=2.5)
    with pytest.raises(InvalidParameterError, match="'name' parameter"):
        ledger.record("")
    with pytest.raises(InvalidParameterError, match="reserved keys 'meta'"):
        ledger.record("x", meta=1)
    assert len(ledger) == 0


def test_track_measures_and_records_only_on_success():
    ledger = CostLedger()
    with ledger.track("alloc", n_examples=3, device="cpu", phase="a") as entry:
        x = torch.ones(25 * MB)  # 100 MiB
        entry.flops = 7
    del x
    (e,) = ledger.entries
    assert e.name == "alloc" and e.flops == 7 and e.n_examples == 3 and e.seconds > 0
    assert e.peak_memory_bytes >= 75 * MB
    assert e.meta["phase"] == "a" and e.meta["device"] == "cpu"
    with pytest.raises(ZeroDivisionError):
        with ledger.track("fails", device="cpu"):
            1 / 0
    assert ledger.names() == ["alloc"]


def test_save_load_round_trip_and_merge(tmp_path):
    a = CostLedger()
    a.record("train", flops=1.5e18, seconds=3600.0, peak_memory_bytes=2**34, n_examples=10**9,
             technique="large_batch", batch_size=8192, tags=["x", "y"])
    a.record("eval", n_examples=100)
    path = a.save(tmp_path / "sub" / "ledger.json")
    assert json.loads(path.read_text())["format"] == "leanscale.cost_ledger"
    b = CostLedger.load(path)
    assert b.entries == a.entries
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    merged = a.merge(b)
    assert len(merged) == 4 and len(a) == 2
    merged.entries[0].meta["technique"] = "changed"
    assert a.entries[0].meta["technique"] == "large_batch"  # merge copies
    with pytest.raises(DataFormatError, match="not a leanscale cost ledger"):
        (tmp_path / "other.json").write_text("{}")
        CostLedger.load(tmp_path / "other.json")
    with pytest.raises(InvalidParameterError, match="'others' parameter of CostLedger.merge"):
        a.merge([CostEntry("x")])


@pytest.mark.parametrize("field", ["seconds", "flops"])
def test_record_refuses_infinite_costs(field):
    """Issue #13: seconds=inf was recorded and summed into every total."""
    with pytest.raises(InvalidParameterError, match=f"'{field}' parameter of CostLedger.record"):
        CostLedger().record("x", **{field: float("inf")})


@pytest.mark.parametrize("entries, match", [
    ('"x"', "list under 'entries'"),
    ('[1]', "malformed entry 0"),
    ('[{"flops": 1}]', "malformed entry 0"),
    ('[{"name": "a", "meta": [1]}]', "malformed entry 0"),
    ('[{"name": "a", "seconds": -1}]', "invalid entry.*'seconds'"),
    ('[{"name": "a", "flops": "many"}]', "invalid entry.*'flops'"),
])
def test_a_damaged_ledger_file_is_one_error_naming_it(tmp_path, entries, match):
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "leanscale.cost_ledger", "entries": ' + entries + "}")
    with pytest.raises(DataFormatError, match=match) as info:
        CostLedger.load(path)
    assert str(path) in str(info.value)
    path.write_text('{"format": "leanscale.cost_ledger", "entr')  # truncated
    with pytest.raises(DataFormatError, match="must be valid JSON"):
        CostLedger.load(path)
