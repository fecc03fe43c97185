"""The shared training loop: the same steps as a hand-written loop, accumulation, hooks, stops, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from leanscale.core.errors import DataFormatError
from leanscale.train import Checkpoint, MicroBatches, fit, lr_factor, seeded, train_step


def _problem(n=32, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _model(seed=0):
    with seeded(seed):
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(n, b, n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:b] for _ in range(n_steps)]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fit_takes_the_steps_of_a_hand_written_loop_bit_for_bit():
    x, y = _problem()
    batches = _batches(32, 8, 12)
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = 0.1 * lr_factor(step, 12, warmup_steps=3)
        opt.zero_grad()
        F.mse_loss(ref(x[idx]), y[idx]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
    model = _model()
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lrs = []
    result = fit(model, opt2, batches, lambda net, idx: F.mse_loss(net(x[idx]), y[idx]), n_steps=12, lr=0.1,
                 schedule=lambda s: lr_factor(s, 12, warmup_steps=3), clip_grad_norm=0.5,
                 on_step=lambda out: lrs.append(out.lr))
    assert torch.equal(_flat(model), _flat(ref))
    assert result.steps == 12 and result.stopped is None and result.resumed_from == 0
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1 * lr_factor(11, 12, warmup_steps=3))


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    x, y = _problem()
    idx = torch.arange(24)
    whole, parts = _model(), _model()
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(parts.parameters(), lr=0.1)
    loss_w, _ = train_step(whole, opt_w, idx, lambda net, i: F.mse_loss(net(x[i]), y[i]))
    # each part's mean loss weighted by its share: the sum is the whole batch's mean loss
    loss_p, extras = train_step(parts, opt_p, MicroBatches(idx.split(10)),
                                lambda net, i: (F.mse_loss(net(x[i]), y[i]) * (len(i) / 24), len(i)))
    assert extras == [10, 10, 4]
    assert float(loss_p) == pytest.approx(float(loss_w), rel=1e-6)
    assert torch.allclose(_flat(parts), _flat(whole), atol=1e-6)


def test_extra_loss_and_after_backward_hooks():
    x, y = _problem()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}

    def after_backward(m):
        seen["grad"] = m[2].bias.grad.clone()

    # extra loss = 3 * bias: adds exactly 3 to the bias gradient, and is not in the reported loss
    loss, _ = train_step(model, opt, torch.arange(8), lambda net, i: F.mse_loss(net(x[i]), y[i]),
                         extra_loss=lambda m: 3.0 * m[2].bias.sum(), after_backward=after_backward)
    plain = _model()
    F.mse_loss(plain(x[:8]), y[:8]).backward()
    assert torch.allclose(seen["grad"], plain[2].bias.grad + 3.0)
    assert float(loss) == pytest.approx(F.mse_loss(plain(x[:8]), y[:8]).detach().item())


def test_on_step_and_time_limit_stop_the_run():
    x, y = _problem()
    mse = lambda net, i: F.mse_loss(net(x[i]), y[i])  # noqa: E731
    model = _model()
    r = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), _batches(32, 8, 10), mse, n_steps=10,
            on_step=lambda out: out.step == 4)
    assert (r.steps, r.stopped) == (4, "on_step")
    model = _model()
    r = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), _batches(32, 8, 10), mse, n_steps=10,
            time_limit_s=0.0)
    assert (r.steps, r.stopped) == (1, "time_limit")  # the step that crossed the limit is kept
    lasts = []
    model = _model()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.01), _batches(32, 8, 3), mse, n_steps=3,
        on_step=lambda out: lasts.append(out.last))
    assert lasts == [False, False, True]


def _noisy_run(tmp_path, crash_at=None, every=3, n_steps=10):
    """SGD whose loss draws noise from a generator: resuming must restore the generator too."""
    x, y = _problem()
    gen = torch.Generator().manual_seed(7)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"losses": []}

    def loss_fn(net, idx):
        noise = 0.01 * torch.randn(len(idx), 1, generator=gen)
        return F.mse_loss(net(x[idx]) + noise, y[idx])

    def on_step(out):
        state["losses"].append(float(out.loss))
        if crash_at is not None and out.step == crash_at:
            raise KeyboardInterrupt  # a crash after step `crash_at`

    ck = Checkpoint(tmp_path / "ck.pt", every=every, state=lambda: {"losses": list(state["losses"])},
                    load_state=lambda s: state.update(losses=list(s["losses"])))
    result = fit(model, opt, _batches(32, 8, n_steps), loss_fn, n_steps=n_steps, lr=0.05,
                 schedule=lambda s: lr_factor(s, n_steps), checkpoint=ck, generators=[gen], on_step=on_step)
    return model, state["losses"], result


def test_checkpoint_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight, losses, _ = _noisy_run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _noisy_run(tmp_path / "b", crash_at=7)
    assert (tmp_path / "b" / "ck.pt").is_file()  # saved after step 6
    resumed, resumed_losses, result = _noisy_run(tmp_path / "b")
    assert result.resumed_from == 6 and result.steps == 10
    assert torch.equal(_flat(resumed), _flat(straight))
    assert resumed_losses == losses  # the caller's state came back with the checkpoint
    assert not (tmp_path / "b" / "ck.pt").exists()  # a finished run removes its checkpoint


def test_a_checkpoint_of_another_run_is_refused_naming_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _noisy_run(tmp_path / "a", crash_at=4)
    with pytest.raises(DataFormatError, match=r"ck\.pt.*another run"):
        _noisy_run(tmp_path / "a", n_steps=12)
    (tmp_path / "a" / "ck.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataFormatError, match=r"ck\.pt"):
        _noisy_run(tmp_path / "a")


_KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    import torch.nn.functional as F
    from leanscale.train import Checkpoint, fit, seeded
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    with seeded(0):
        model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kill_at = int(sys.argv[2])
    def on_step(out):
        if out.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    batches = [torch.arange(i % 8 * 8, i % 8 * 8 + 8) for i in range(20)]
    fit(model, opt, batches, lambda net, i: F.mse_loss(net(x[i]), y[i]), n_steps=20,
        checkpoint=Checkpoint(sys.argv[1], every=5), on_step=on_step)
    torch.save(model.state_dict(), sys.argv[1] + ".final")
""")


def test_resume_after_kill_9(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILLED)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "a.pt"), "0"], env=env, timeout=120)
    assert done.returncode == 0
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "b.pt"), "13"], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "b.pt"), "0"], env=env, timeout=120)
    assert again.returncode == 0
    a = torch.load(tmp_path / "a.pt.final", weights_only=True)
    b = torch.load(tmp_path / "b.pt.final", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_infobatch_plugs_in_as_the_batches_and_an_on_step_hook():
    """A technique's sampler is just ``batches``; its bookkeeping an ``on_step`` (InfoBatch)."""
    from leanscale.pruning import InfoBatch

    x, y = _problem(n=64)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ib = InfoBatch(64, epochs=4, prune_ratio=0.5, seed=0)

    def loss_fn(net, idx):
        losses = (net(x[idx]) - y[idx]).pow(2).reshape(-1)  # (b,) per-example losses
        return (losses * ib.weights(idx)).mean(), losses.detach()

    steps = []
    for epoch in range(4):
        batches = list(ib.epoch_indices(epoch).split(16))
        r = fit(model, opt, batches, loss_fn, n_steps=len(batches),
                on_step=lambda out: ib.update(out.batch, out.extra))
        steps.append(r.steps)
    assert steps[0] == 4 and steps[1] < 4  # every example in epoch 0; well-learned ones skipped after
    assert 0 < ib.fraction_skipped_ < 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_steps=-1), "'n_steps' parameter of fit"),
    (dict(n_steps=2, clip_grad_norm=0.0), "'clip_grad_norm' parameter of fit"),
    (dict(n_steps=2, time_limit_s=-1.0), "'time_limit_s' parameter of fit"),
    (dict(n_steps=2, checkpoint="run.pt"), "'checkpoint' parameter of fit must be None or an instance of Checkpoint"),
    (dict(n_steps=2, checkpoint=Checkpoint("x.pt", every=0)), "'checkpoint.every' parameter of fit"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    from leanscale.core.errors import InvalidParameterError

    model = _model()
    with pytest.raises(InvalidParameterError, match=match):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), [], lambda net, b: net(b).sum(), **kwargs)
