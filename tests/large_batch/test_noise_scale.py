"""Gradient noise scale (McCandlish et al. 2018): estimators against a closed form, the three
measuring modes, advice formulas, bad input."""

import dataclasses
import doctest
import importlib
import json
import math

import pytest
import torch
from torch import nn

from leanscale.core.errors import InvalidParameterError, NotFittedError
from leanscale.large_batch.noise_scale import (
    BatchAdvice,
    GradientNoiseScale,
    NoiseScaleResult,
    advise,
    measure_noise_scale,
    two_batch_estimates,
)

noise_scale_module = importlib.import_module("leanscale.large_batch.noise_scale")

# ------------------------------------------------------------------ linear regression, closed form
D, SIGMA = 10, 1.0


def _problem(seed=0):
    """w*, and weights w = w* + u with |u| = 1."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=g, dtype=torch.float64)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    return w_star, w_star + u / u.norm()


def _closed_form(w_star, w):
    """Per-example loss l = 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + sigma eps, eps ~ N(0, 1).

    With u = w - w*, the per-example gradient is g = x (x.w - y) = x (x.u - sigma eps).

    * Mean: E[g] = E[x x^T] u - sigma E[x] E[eps] = u, so G = u and |G|^2 = |u|^2.
    * Second moment: the cross term has E[eps] = 0, so
      E[g g^T] = E[x x^T (x.u)^2] + sigma^2 E[x x^T].
      By Isserlis' theorem E[x_i x_j x_k x_l] = d_ij d_kl + d_ik d_jl + d_il d_jk, hence
      E[x_i x_j (x.u)^2] = d_ij |u|^2 + 2 u_i u_j, and E[g g^T] = |u|^2 I + 2 u u^T + sigma^2 I.
    * Covariance: Sigma = E[g g^T] - G G^T = (|u|^2 + sigma^2) I + u u^T, so
      tr(Sigma) = d (|u|^2 + sigma^2) + |u|^2 = (d + 1) |u|^2 + d sigma^2
      and B_simple = tr(Sigma) / |G|^2 = d + 1 + d sigma^2 / |u|^2 (= 21 for d = 10, |u| = sigma = 1).
    """
    u = w - w_star
    sigma_matrix = (u @ u + SIGMA**2) * torch.eye(D, dtype=torch.float64) + torch.outer(u, u)
    g2 = float(u @ u)
    tr = float(torch.trace(sigma_matrix))
    return u, sigma_matrix, g2, tr, tr / g2


def _draw(w_star, n, generator, dtype=torch.float64):
    x = torch.randn(n, D, generator=generator, dtype=torch.float64)
    y = x @ w_star + SIGMA * torch.randn(n, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _per_example_grads(w, x, y):  # (n, d): g_i = x_i (x_i.w - y_i)
    return x * (x @ w - y)[:, None]


def _linear_model(w):
    model = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w[None].float())
    return model


def _half_mse(out, y):  # mean over the batch of 0.5 (x.w - y)^2; out: (B, 1), y: (B,)
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def test_closed_form_covariance_matches_monte_carlo_and_autograd():
    w_star, w = _problem()
    u, sigma_matrix, g2, tr, b_simple = _closed_form(w_star, w)
    assert g2 == pytest.approx(1.0) and tr == pytest.approx((D + 1) + D * SIGMA**2)
    assert b_simple == pytest.approx(21.0)
    x, y = _draw(w_star, 400_000, torch.Generator().manual_seed(1))
    grads = _per_example_grads(w, x, y)  # (n, d)
    # the analytic per-example gradient is what autograd gives for the model and loss we test with
    model = _linear_model(w).double()
    for i in range(3):
        (auto,) = torch.autograd.grad(_half_mse(model(x[i:i + 1]), y[i:i + 1]), [model.weight])
        torch.testing.assert_close(auto[0], grads[i])
    mean = grads.mean(0)
    cov = torch.cov(grads.T)  # (d, d)
    n = grads.shape[0]
    # standard errors: mean ~ sqrt(Sigma_ii / n) ~ 0.0025; tr(cov) ~ 0.1; entries ~ 0.01
    torch.testing.assert_close(mean, u, atol=0.015, rtol=0)
    assert float(torch.trace(cov)) == pytest.approx(tr, rel=0.02)
    torch.testing.assert_close(cov, sigma_matrix, atol=0.08, rtol=0)
    assert n == 400_000


def test_two_batch_estimators_are_unbiased():
    """Mean over many draws of each estimator matches the truth within sampling error, also when
    the small batch is part of the big one."""
    w_star, w = _problem(1)
    _, _, g2_true, tr_true, _ = _closed_form(w_star, w)
    trials, b_small, b_big = 6000, 4, 32
    gen = torch.Generator().manual_seed(2)
    x, y = _draw(w_star, trials * b_big, gen)
    grads = _per_example_grads(w, x, y).reshape(trials, b_big, D)
    small = grads[:, :b_small].mean(1).pow(2).sum(-1)  # (trials,) |G_small|^2, nested in the big batch
    big = grads.mean(1).pow(2).sum(-1)  # (trials,) |G_big|^2
    # E |G_B|^2 = |G|^2 + tr(Sigma) / B (eq. A.1)
    assert float(small.mean()) == pytest.approx(g2_true + tr_true / b_small, rel=0.03)
    assert float(big.mean()) == pytest.approx(g2_true + tr_true / b_big, rel=0.03)
    est = torch.tensor([two_batch_estimates(float(s), b_small, float(b), b_big) for s, b in zip(small, big)],
                       dtype=torch.float64)  # (trials, 2)
    for column, truth in ((0, g2_true), (1, tr_true)):
        values = est[:, column]
        stderr = float(values.std()) / math.sqrt(trials)
        assert abs(float(values.mean()) - truth) < 4 * stderr, (column, float(values.mean()), truth, stderr)
    # the naive estimate |G_big|^2 of |G|^2 is biased upwards by tr(Sigma)/B_big, far beyond 4 s.e.
    assert float(big.mean()) - g2_true > 10 * float(big.std()) / math.sqrt(trials)


def test_two_batch_estimates_algebra():
    # |G|^2 = 1, tr(Sigma) = 16: E|G_8|^2 = 3, E|G_64|^2 = 1.25
    g2, tr = two_batch_estimates(3.0, 8, 1.25, 64)
    assert g2 == pytest.approx(1.0) and tr == pytest.approx(16.0)


def test_measure_noise_scale_recovers_known_b_simple():
    w_star, w = _problem()
    *_, g2, tr, b_true = _closed_form(w_star, w)
    x, y = _draw(w_star, 64 * 400, torch.Generator().manual_seed(3), dtype=torch.float32)
    res = measure_noise_scale(_linear_model(w), _half_mse, (x, y), batch_size=64, n_batches=400, seed=0)
    assert isinstance(res, NoiseScaleResult)
    assert (res.batch_small, res.batch_big, res.n_batches, len(res.small_sq_norms)) == (64, 25600, 400, 400)
    # one measurement from 400 batches: relative s.d. of B_simple ~ 3% (checked over seeds)
    assert res.b_simple == pytest.approx(b_true, rel=0.12)
    assert res.grad_sq_norm == pytest.approx(g2, rel=0.12)
    assert res.trace_sigma == pytest.approx(tr, rel=0.12)
    assert res.b_simple == pytest.approx(res.trace_sigma / res.grad_sq_norm)
    assert res.estimator.b_simple == pytest.approx(res.b_simple)
    assert res.advise().batch_size == 16  # 21 -> nearest power of two
    json.dumps(res.to_dict())


def test_measure_noise_scale_with_unequal_batches_from_an_iterable():
    """Sizes 32 and 96 alternate: B_small is their harmonic mean, 48, and the estimate is still unbiased."""
    w_star, w = _problem()
    *_, b_true = _closed_form(w_star, w)
    gen = torch.Generator().manual_seed(4)
    batches = [_draw(w_star, 32 if i % 2 == 0 else 96, gen, dtype=torch.float32) for i in range(300)]
    res = measure_noise_scale(_linear_model(w), _half_mse, iter(batches), n_batches=300)
    assert res.batch_small == pytest.approx(48.0)
    assert res.batch_big == 150 * 32 + 150 * 96
    assert res.b_simple == pytest.approx(b_true, rel=0.15)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_measure_noise_scale_leaves_the_model_unchanged():
    model = _bn_model()
    x, y = torch.randn(256, 5), torch.randint(0, 3, (256,))
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()  # running stats moved, .grad set
    model.eval()
    model[1].train()  # a mixed state to restore
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: (v.grad, v.grad.clone()) for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    res = measure_noise_scale(model, nn.functional.cross_entropy, (x, y), batch_size=32, n_batches=8)
    assert math.isfinite(res.b_simple) and res.b_simple > 0
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is grads[k][0] and torch.equal(v.grad, grads[k][1]), k
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert [m.training for m in model.modules()] == modes
    # eval mode also works (no BatchNorm batch statistics, no dropout) and is deterministic
    a = measure_noise_scale(model, nn.functional.cross_entropy, (x, y), batch_size=32, n_batches=8, train_mode=False)
    b = measure_noise_scale(model, nn.functional.cross_entropy, (x, y), batch_size=32, n_batches=8, train_mode=False)
    assert a == b


# ------------------------------------------------------------------------------ the estimator
def test_first_update_is_not_shrunk_and_ema_is_bias_corrected():
    gns = GradientNoiseScale(beta=0.9)
    gns.update(3.0, 8, 1.25, 64)
    assert (gns.grad_sq_norm, gns.trace_sigma) == pytest.approx((1.0, 16.0))
    assert gns.b_simple == pytest.approx(16.0)
    gns.update([5.0, 7.0], 8, 2.5, 64)  # mean 6: |G|^2 = 2, tr = 32
    g2_raw, tr_raw = two_batch_estimates(6.0, 8, 2.5, 64)
    assert (g2_raw, tr_raw) == pytest.approx((2.0, 32.0))
    norm = 1 - 0.9**2
    g2 = (0.9 * 0.1 * 1.0 + 0.1 * 2.0) / norm
    tr = (0.9 * 0.1 * 16.0 + 0.1 * 32.0) / norm
    assert (gns.grad_sq_norm, gns.trace_sigma) == pytest.approx((g2, tr))
    # the ratio of the averages, not the average of the ratios
    assert gns.b_simple == pytest.approx(tr / g2)
    assert gns.n_updates == 2 and len(gns.history) == 2
    h = gns.history[-1]
    assert h["small_sq_norm"] == 6.0 and h["big_sq_norm"] == 2.5 and h["b_simple"] == pytest.approx(tr / g2)
    assert (h["grad_sq_norm_raw"], h["trace_sigma_raw"]) == pytest.approx((2.0, 32.0))
    # tensors work as norms too; beta = 0 keeps only the last measurement
    last = GradientNoiseScale(beta=0.0).update(torch.tensor([3.0, 3.0]), 8, torch.tensor(1.25), 64)
    last.update(6.0, 8, 2.5, 64)
    assert last.b_simple == pytest.approx(16.0)


def test_noise_dominated_and_noise_free_conventions():
    gns = GradientNoiseScale().update(10.0, 8, 1.0, 64)  # |G|^2 estimate < 0
    assert gns.grad_sq_norm < 0 and gns.b_simple == math.inf
    gns = GradientNoiseScale().update(1.0, 8, 2.0, 64)  # tr(Sigma) estimate < 0
    assert gns.trace_sigma < 0 and gns.b_simple == 0.0


def test_state_dict_round_trip():
    gns = GradientNoiseScale(beta=0.8)
    for i, (s, b) in enumerate([(3.0, 1.25), (4.0, 1.5), (2.5, 1.2)]):
        gns.update(s, 16, b, 128, step=10 * i)
    state = json.loads(json.dumps(gns.state_dict()))  # plain values
    other = GradientNoiseScale().load_state_dict(state)
    assert other.beta == 0.8 and other.n_updates == 3 and other.history == gns.history
    assert (other.b_simple, other.grad_sq_norm, other.trace_sigma) == (gns.b_simple, gns.grad_sq_norm, gns.trace_sigma)
    gns.update(3.5, 16, 1.3, 128)
    other.update(3.5, 16, 1.3, 128)
    assert other.state_dict() == gns.state_dict()
    with pytest.raises(InvalidParameterError, match="'state'.*missing \\['history'\\]"):
        GradientNoiseScale().load_state_dict({k: v for k, v in state.items() if k != "history"})
    with pytest.raises(InvalidParameterError, match="'beta'"):
        GradientNoiseScale().load_state_dict({**state, "beta": 1.5})


def test_non_finite_norms_warn_and_skip():
    gns = GradientNoiseScale().update(3.0, 8, 1.25, 64)
    before = gns.state_dict()
    with pytest.warns(RuntimeWarning, match=r"skipped.*small_sq_norms=\[3\.0, nan\]"):
        gns.update([3.0, math.nan], 8, 1.25, 64)
    with pytest.warns(RuntimeWarning, match=r"skipped.*big_sq_norm=inf.*step 7"):
        gns.update(3.0, 8, math.inf, 64, step=7)
    assert gns.n_skipped == 2
    after = gns.state_dict()
    assert after.pop("n_skipped") == 2 and before.pop("n_skipped") == 0
    assert after == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.0}, "'beta' parameter of GradientNoiseScale must be a float in the range \\[0, 1\\)"),
        ({"beta": -0.1}, "'beta'"),
        ({"beta": math.nan}, "'beta'"),
        ({"beta": True}, "'beta'"),
        ({"keep_history": "yes"}, "'keep_history'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        GradientNoiseScale(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3.0, 64, 1.0, 64), "'batch_big' parameter of GradientNoiseScale.update must be greater than batch_small"),
        ((3.0, 64, 1.0, 8), "'batch_big'.*Got 8 instead"),
        ((3.0, 0, 1.0, 8), "'batch_small'.*Got 0 instead"),
        ((3.0, -4, 1.0, 8), "'batch_small'"),
        ((3.0, 8, 1.0, math.inf), "'batch_big'"),
        ((-1.0, 8, 1.0, 64), "'small_sq_norms'.*non-negative.*Got -1.0"),
        ((3.0, 8, -1.0, 64), "'big_sq_norm'.*non-negative"),
        (([], 8, 1.0, 64), "'small_sq_norms'.*at least one"),
        (("3", 8, 1.0, 64), "'small_sq_norms'.*Got str"),
        ((3.0, 8, [1.0, 2.0], 64), "'big_sq_norm'.*one squared norm"),
    ],
)
def test_bad_update_arguments(args, match):
    gns = GradientNoiseScale()
    with pytest.raises(InvalidParameterError, match=match):
        gns.update(*args)
    assert gns.n_updates == 0


def test_estimates_before_any_update_raise_not_fitted():
    gns = GradientNoiseScale()
    for name in ("b_simple", "grad_sq_norm", "trace_sigma"):
        with pytest.raises(NotFittedError, match="no measurement yet: call update"):
            getattr(gns, name)
    with pytest.raises(NotFittedError):
        gns.advise()
    assert gns.n_updates == 0 and gns.history == []
    with pytest.raises(InvalidParameterError, match="'batch_big'"):
        two_batch_estimates(1.0, 8, 1.0, 8)


# ------------------------------------------------------------------------ accumulation mode
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _flat_grad(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def _train(model, batches, sizes, gns=None, accumulate_last=True, scale="mean", steps_label=False):
    """SGD over ``batches`` with micro-batches of ``sizes``; returns the .grad seen by each step."""
    # summed losses give k times the gradient: k times smaller LR for the same trajectory
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if scale == "mean" else 0.1 / (len(batches[0][0]) // 8))
    seen = []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        parts = list(zip(x.split(sizes), y.split(sizes)))
        for j, (xm, ym) in enumerate(parts):
            loss = nn.functional.cross_entropy(model(xm), ym)
            weight = len(xm) / len(x) if scale == "mean" else 1.0
            (loss * weight).backward()
            if gns is not None and (accumulate_last or j < len(parts) - 1):
                gns.accumulate(model)
        if gns is not None:
            gns.step(model, sizes, grad_scale=1.0 if scale == "mean" else float(len(parts)),
                     step=t if steps_label else None)
        seen.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return seen


def _batches(n_steps=3, batch=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_steps)]


def test_accumulation_mode_leaves_training_unchanged_and_measures_each_micro_batch():
    batches = _batches()
    plain = _mlp()
    seen_plain = _train(plain, batches, 8)
    gns = GradientNoiseScale(beta=0.5)
    model = _mlp()
    seen = _train(model, batches, 8, gns=gns, steps_label=True)
    for a, b in zip(seen_plain, seen):  # the optimizer saw bit-identical gradients
        assert all(torch.equal(ga, gb) for ga, gb in zip(a, b))
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p, q)
    # ... and equal (up to summation order) to one full-batch backward
    full = _mlp()
    x, y = batches[0]
    nn.functional.cross_entropy(full(x), y).backward()
    for g, p in zip(seen[0], full.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    # the recorded norms are the micro-batch and the full-batch gradients' norms (replayed)
    replay = _mlp()
    opt = torch.optim.SGD(replay.parameters(), lr=0.1)
    assert [h["step"] for h in gns.history] == [0, 1, 2]
    for (x, y), h in zip(batches, gns.history):
        smalls = [float(_flat_grad(nn.functional.cross_entropy(replay(xm), ym), replay).pow(2).sum())
                  for xm, ym in zip(x.split(8), y.split(8))]
        big = float(_flat_grad(nn.functional.cross_entropy(replay(x), y), replay).pow(2).sum())
        assert h["small_sq_norm"] == pytest.approx(sum(smalls) / 4, rel=1e-5)
        assert h["big_sq_norm"] == pytest.approx(big, rel=1e-5)
        assert (h["batch_small"], h["batch_big"]) == (8, 32)
        opt.zero_grad()
        nn.functional.cross_entropy(replay(x), y).backward()
        opt.step()


def test_accumulation_variants_record_the_same_measurements():
    batches = _batches()
    reference = GradientNoiseScale()
    _train(_mlp(), batches, 8, gns=reference)
    # the last micro-batch recorded by step() instead of accumulate()
    lazy = GradientNoiseScale()
    _train(_mlp(), batches, 8, gns=lazy, accumulate_last=False)
    # summed micro-batch losses (no 1/k), declared with grad_scale=k
    summed = GradientNoiseScale()
    _train(_mlp(), batches, 8, gns=summed, scale="sum")
    keys = ("small_sq_norm", "big_sq_norm", "batch_small", "batch_big")
    for name, other in (("lazy", lazy), ("summed", summed)):
        assert other.n_updates == 3
        for h, r in zip(other.history, reference.history):
            for k in keys:
                assert h[k] == pytest.approx(r[k], rel=1e-5), (name, k)


def test_accumulation_with_unequal_micro_batches():
    (x, y), = _batches(1, batch=32)
    gns = GradientNoiseScale()
    model = _mlp()
    _train(model, [(x, y)], [8, 8, 16], gns=gns)
    fresh = _mlp()
    smalls = [float(_flat_grad(nn.functional.cross_entropy(fresh(xm), ym), fresh).pow(2).sum())
              for xm, ym in zip(x.split([8, 8, 16]), y.split([8, 8, 16]))]
    h = gns.history[0]
    assert h["batch_small"] == pytest.approx(3 / (1 / 8 + 1 / 8 + 1 / 16))  # harmonic mean 9.6
    assert h["batch_big"] == 32
    assert h["small_sq_norm"] == pytest.approx(sum(smalls) / 3, rel=1e-5)


def test_accumulation_mode_recovers_known_b_simple_online():
    """Fixed weights (no training), fresh data each step: the EMA settles at the closed form."""
    w_star, w = _problem()
    *_, b_true = _closed_form(w_star, w)
    model = _linear_model(w)
    gen = torch.Generator().manual_seed(6)
    gns = GradientNoiseScale(beta=0.99)
    for _ in range(400):
        model.zero_grad()
        x, y = _draw(w_star, 64, gen, dtype=torch.float32)
        for xm, ym in zip(x.split(16), y.split(16)):
            (_half_mse(model(xm), ym) / 4).backward()
            gns.accumulate(model)
        gns.step(model, 16)
    assert gns.n_updates == 400
    assert gns.b_simple == pytest.approx(b_true, rel=0.15)  # s.d. over seeds ~4%


def test_accumulation_bad_use():
    model = _mlp()
    gns = GradientNoiseScale()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="1 micro-batch"):
        gns.step(model, 8)  # one micro-batch: nothing to compare
    assert gns.n_updates == 0 and gns.n_skipped == 1
    model.zero_grad()
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        gns.accumulate(model)
    with pytest.raises(InvalidParameterError, match="'micro_batch_size'.*one size per micro-batch"):
        gns.step(model, [8, 8, 8])
    with pytest.raises(InvalidParameterError, match="'grad_scale'"):
        gns.step(model, 8, grad_scale=0.0)
    with pytest.raises(InvalidParameterError, match="'model'.*same model"):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        gns.accumulate(model)
        gns.accumulate(_mlp())
    with pytest.raises(InvalidParameterError, match="'step_ddp' needs attach_ddp|needs attach_ddp"):
        GradientNoiseScale().step_ddp(8)
    with pytest.raises(InvalidParameterError, match="'ddp_model'.*DistributedDataParallel"):
        GradientNoiseScale().attach_ddp(_mlp(), 8)


def test_non_finite_gradients_in_accumulation_and_offline_warn():
    model = _mlp()
    gns = GradientNoiseScale()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for xm, ym in zip(x.split(8), y.split(8)):
        (nn.functional.cross_entropy(model(xm), ym) * math.inf).backward()
        gns.accumulate(model)
    with pytest.warns(RuntimeWarning, match="skipped.*non-finite"):
        gns.step(model, 8)
    assert gns.n_updates == 0 and gns.n_skipped == 1

    def nan_loss(out, target):
        return nn.functional.cross_entropy(out, target) * math.nan

    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        res = measure_noise_scale(model, nan_loss, (x, y), batch_size=4, n_batches=4)
    assert math.isnan(res.b_simple)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_batches": 1}, "'n_batches' parameter of measure_noise_scale must be an int in the range \\[2, inf\\)"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"batch_size": 64, "n_batches": 8}, "'data'.*at least batch_size \\* n_batches = 512 examples. Got 100"),
        ({"seed": -1}, "'seed'"),
        ({"train_mode": 1}, "'train_mode'"),
    ],
)
def test_measure_noise_scale_bad_arguments(kwargs, match):
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    with pytest.raises(InvalidParameterError, match=match):
        measure_noise_scale(_mlp(), nn.functional.cross_entropy, (x, y), **kwargs)


def test_measure_noise_scale_bad_data_model_and_loss():
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    ce = nn.functional.cross_entropy
    with pytest.raises(InvalidParameterError, match="'data'.*same first dimension"):
        measure_noise_scale(_mlp(), ce, (x, y[:50]), batch_size=10, n_batches=2)
    with pytest.raises(InvalidParameterError, match="'data'.*at least 2 non-empty batches.*Got 1"):
        measure_noise_scale(_mlp(), ce, [(x, y)], n_batches=4)
    with pytest.raises(InvalidParameterError, match="'data'.*Got Tensor"):
        measure_noise_scale(_mlp(), ce, x, n_batches=4)
    with pytest.raises(InvalidParameterError, match="'loss_fn'.*scalar.*shape \\(10,\\)"):
        measure_noise_scale(_mlp(), lambda o, t: ce(o, t, reduction="none"), (x, y), batch_size=10, n_batches=2)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(InvalidParameterError, match="'model'.*requires_grad=True"):
        measure_noise_scale(frozen, ce, (x, y), batch_size=10, n_batches=2)


# ---------------------------------------------------------------------------------- advice
def test_advise_matches_mccandlish_formulas():
    b_noise, base_lr, base_batch = 300.0, 0.1, 64
    a = advise(b_noise, base_lr=base_lr, base_batch_size=base_batch)
    assert isinstance(a, BatchAdvice)
    assert a.batch_size == 256  # log2(300) = 8.2 -> 2^8
    assert a.steps_factor == pytest.approx(1 + b_noise / 256)  # S / S_min
    assert a.examples_factor == pytest.approx(1 + 256 / b_noise)  # E / E_min
    eps_max = base_lr * (1 + b_noise / base_batch)
    assert a.lr_max == pytest.approx(eps_max)
    assert a.lr == pytest.approx(eps_max / (1 + b_noise / 256))
    assert a.steps_vs_base == pytest.approx((1 + b_noise / 256) / (1 + b_noise / 64))
    assert a.examples_vs_base == pytest.approx((1 + 256 / b_noise) / (1 + 64 / b_noise))
    # the trade-off is symmetric: (S/S_min - 1)(E/E_min - 1) = 1 ...
    assert (a.steps_factor - 1) * (a.examples_factor - 1) == pytest.approx(1.0)
    # ... and at the knee B = B_noise both cost 2x their minimum
    knee = advise(512.0)
    assert (knee.batch_size, knee.steps_factor, knee.examples_factor, knee.lr) == (512, 2.0, 2.0, None)
    text = str(a)
    assert text == a.reasoning
    assert "Recommended batch size 256" in text and "eps_max" in text and "Hessian" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.batch_size = 1  # type: ignore[misc]


def test_advise_reduces_to_the_linear_rule_far_below_the_noise_scale():
    a = advise(1e9, base_lr=0.1, base_batch_size=32, max_batch=256)
    assert a.batch_size == 256
    assert a.lr == pytest.approx(0.1 * 256 / 32, rel=1e-6)
    inf = advise(math.inf, base_lr=0.1, base_batch_size=32, max_batch=256)
    assert (inf.batch_size, inf.lr, inf.examples_factor) == (256, pytest.approx(0.8), 1.0)
    assert "inf" in str(inf)


def test_advise_rounding_caps_and_devices():
    assert advise(300.0, power_of_two=False).batch_size == 300
    assert advise(0.3).batch_size == 1
    assert advise(0.0, base_lr=0.1, base_batch_size=8).lr == pytest.approx(0.1)  # no noise: eps_max at any B
    assert advise(3000.0, max_batch=1000).batch_size == 1000
    assert advise(3000.0, max_batch=1000, n_devices=3).batch_size == 999
    assert advise(1.0, n_devices=8).batch_size == 8
    gns = GradientNoiseScale().update(3.0, 8, 1.25, 64)  # B_simple = 16
    assert gns.advise(base_lr=0.1, base_batch_size=8).batch_size == 16


def test_advise_old_base_batch_keyword_warns_and_gives_the_same_advice():
    new = advise(300.0, base_lr=0.1, base_batch_size=64)
    assert new.base_batch_size == 64
    with pytest.warns(FutureWarning, match="advise: the 'base_batch' parameter was renamed to 'base_batch_size'"):
        old = advise(300.0, base_lr=0.1, base_batch=64)
    assert old == new
    gns = GradientNoiseScale().update(3.0, 8, 1.25, 64)  # the measurements pass it through
    with pytest.warns(FutureWarning, match="'base_batch' parameter was renamed"):
        assert gns.advise(base_lr=0.1, base_batch=8) == gns.advise(base_lr=0.1, base_batch_size=8)
    with pytest.warns(FutureWarning, match="BatchAdvice.base_batch was renamed"):
        assert new.base_batch == 64
    assert "base_batch_size" in new.to_dict() and "base_batch" not in new.to_dict()
    with pytest.raises(InvalidParameterError, match="'base_batch' parameter of advise was renamed.*Got both"):
        advise(300.0, base_lr=0.1, base_batch=64, base_batch_size=32)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((math.nan,), {}, "'b_simple' parameter of advise"),
        ((-1.0,), {}, "'b_simple'"),
        ((math.inf,), {}, "'max_batch'.*b_simple is inf"),
        ((100.0,), {"base_lr": 0.1}, "'base_batch_size'.*together with base_lr"),
        ((100.0,), {"base_batch_size": 64}, "'base_lr'.*together with base_batch_size"),
        ((100.0,), {"base_lr": 0.0, "base_batch_size": 64}, "'base_lr'"),
        ((100.0,), {"max_batch": 2, "n_devices": 4}, "'max_batch'.*at least n_devices"),
        ((100.0,), {"n_devices": 0}, "'n_devices'"),
    ],
)
def test_advise_bad_arguments(args, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        advise(*args, **kwargs)


def test_doctests():
    result = doctest.testmod(noise_scale_module, raise_on_error=False)
    assert result.attempted >= 4 and result.failed == 0


@pytest.mark.parametrize("name", ["estimators", "advice"])
def test_doctests_of_the_submodules(name):
    module = importlib.import_module(f"leanscale.large_batch.noise_scale.{name}")
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted >= 2 and result.failed == 0


def test_the_package_exports_the_public_names_from_their_modules():
    # The split keeps `leanscale.large_batch.noise_scale.X` and `leanscale.large_batch.X` the same objects.
    from leanscale import large_batch

    for name in noise_scale_module.__all__:
        obj = getattr(noise_scale_module, name)
        assert getattr(large_batch, name) is obj
        assert obj.__module__.startswith("leanscale.large_batch.noise_scale.")
        assert obj.__doc__
