"""The cascade's runtime as a server uses it: every stage with a timeout has its own bounded
threads (a hung stage never starves another), ``predict_detailed`` says which requests no stage
answered and why, and a torch ``ModelStage`` is safe to call from many threads (never a
prediction with dropout on)."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from leanscale.cascade import FALLBACK, CallableStage, Cascade, ModelStage, RegexStage


def _fitted(stages, **kw) -> Cascade:
    c = Cascade(stages, **kw)
    c.thresholds_ = {s.name: 0.5 for s in stages[:-1]}
    c.costs_ = {s.name: 1.0 for s in stages}
    c.errors_ = {s.name: 0 for s in stages}
    return c


def test_a_hung_stage_holds_only_its_own_slots():
    """Before: one 8-thread pool for all stages; 8 hung calls of one stage made every other stage
    with a timeout time out too (no answer). Now the hung stage fails fast once its own 8 slots
    are held, and the last stage answers every time."""
    release = threading.Event()
    calls = {"hang": 0}

    def hang(items):
        calls["hang"] += 1
        release.wait(30)
        return [("never", 1.0)] * len(items)

    stages = [CallableStage(hang, name="hang", batched=True, timeout=0.05),
              CallableStage(lambda its: [("ok", 1.0)] * len(its), name="last", batched=True, timeout=1.0)]
    c = _fitted(stages)
    try:
        t0 = time.perf_counter()
        outs = [c.predict_detailed(["a", "b"]) for _ in range(30)]
        elapsed = time.perf_counter() - t0
        hung_threads = [t for t in threading.enumerate() if t.name == "leanscale-stage-hang"]
        assert len(hung_threads) == 8 and all(t.daemon for t in hung_threads)
    finally:
        release.set()
    assert calls["hang"] == 8 == Cascade.STAGE_CONCURRENCY
    assert all(list(o.labels) == ["ok", "ok"] and list(o.stage) == ["last", "last"] for o in outs)
    assert all(o.answered.all() for o in outs)
    assert "exceeded its timeout" in outs[0].reasons["hang"]
    assert "saturated" in outs[-1].reasons["hang"]  # later calls did not even wait for the timeout
    assert elapsed < 8 * 0.05 + 1.5
    assert c.errors_["hang"] == 60 and c.errors_["last"] == 0
    # the slots come back when the hung calls return
    deadline = time.monotonic() + 5
    while any(t.name == "leanscale-stage-hang" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    out = c.predict_detailed(["c"])
    assert list(out.stage) == ["hang"] and list(out.labels) == ["never"]


def test_predict_detailed_marks_requests_no_stage_answered():
    def dead(items):
        raise RuntimeError("down")

    regex = RegexStage([(r"zzz", "z")], name="r")
    c = _fitted([regex, CallableStage(dead, name="big", batched=True)])
    out = c.predict_detailed(["a", "zzz"])
    assert list(out.labels) == [None, "z"] and list(out.stage) == [FALLBACK, "r"]
    assert list(out.answered) == [False, True]
    assert list(out.failed) == [("big",), ()]
    assert out.reasons == {"big": "stage 'big' raised RuntimeError: down"}
    # the most confident answer below its threshold is an answer (stage "fallback", answered)
    unsure = CallableStage(lambda its: [("maybe", 0.2)] * len(its), name="unsure", batched=True)
    c2 = _fitted([unsure, CallableStage(dead, name="big", batched=True)])
    out = c2.predict_detailed(["a"])
    assert list(out.labels) == ["maybe"] and list(out.stage) == [FALLBACK] and list(out.answered) == [True]
    # a configured fallback_label fills in, still marked as not answered by a stage
    c3 = _fitted([regex, CallableStage(dead, name="big", batched=True)], fallback_label="unknown")
    out = c3.predict_detailed(["a"])
    assert list(out.labels) == ["unknown"] and list(out.answered) == [False]
    assert list(c3.predict(["a", "zzz"])) == ["unknown", "z"]


def test_cascade_with_timeouts_copies_and_pickles():
    import pickle

    stage = CallableStage(lambda its: [("x", 1.0)] * len(its), name="s", batched=True, timeout=1.0)
    c = _fitted([stage])
    c.predict_detailed(["a"])  # creates the stage's slots
    c2 = copy.deepcopy(c)
    assert list(c2.predict_detailed(["b"]).labels) == ["x"]
    c3 = pickle.loads(pickle.dumps(_fitted([RegexStage([("a", "A")], name="r")])))
    assert list(c3.predict(["a"])) == ["A"]


class _DropoutNet(torch.nn.Module):
    """Two dropout layers around a pause: a mode switch by another thread mid-forward shows."""

    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(6, 16)
        self.drop1 = torch.nn.Dropout(p=0.5)
        self.lin2 = torch.nn.Linear(16, 5)
        self.drop2 = torch.nn.Dropout(p=0.5)

    def forward(self, x):
        h = self.drop1(torch.relu(self.lin1(x)))
        time.sleep(0.0005)  # let other threads run in the middle of the forward
        return self.lin2(self.drop2(h))


@pytest.mark.parametrize("start_in_training_mode", [True, False])
def test_torch_model_stage_is_deterministic_from_many_threads(start_in_training_mode):
    """Issue #13 item 11: 64 of 40,000 predictions from several threads ran with dropout on,
    because each call switched the shared module to eval and back."""
    torch.manual_seed(0)
    net = _DropoutNet()
    net.train(start_in_training_mode)
    net.drop2.eval()  # a submodule in its own mode: restored as it was
    x = torch.randn(12, 6)
    net_eval = copy.deepcopy(net).eval()
    with torch.no_grad():
        expected = torch.softmax(net_eval(x), dim=-1).numpy()
    stage = ModelStage(net, name="net", classes=list("abcde"), transform=lambda batch: torch.stack(batch))
    items = list(x)
    results, errors = [], []

    def worker():
        try:
            for _ in range(25):
                results.append(stage.predict_proba(items))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 200
    for p in results:
        np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-7)
    assert net.training == start_in_training_mode and net.drop1.training == start_in_training_mode
    assert not net.drop2.training
    out = stage.predict(items)
    assert list(out.labels) == [list("abcde")[i] for i in expected.argmax(1)]


def test_model_stage_copies_with_its_lock():
    torch.manual_seed(0)
    net = _DropoutNet().eval()
    stage = ModelStage(net, name="net", classes=list("abcde"), transform=lambda batch: torch.stack(batch))
    clone = copy.deepcopy(stage)
    x = list(torch.randn(3, 6))
    np.testing.assert_allclose(clone.predict_proba(x), stage.predict_proba(x), rtol=1e-6)
