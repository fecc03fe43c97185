"""The Chinchilla Approach-3 objective and a batched second-order solver for it.

Hoffmann et al. (2022, arXiv 2203.15556, section 3.3 and Appendix D.2) fit

    log L_hat(N, D) = LSE(a - alpha * log N, b - beta * log D, e)        # A = e^a, B = e^b, E = e^e

by minimising the sum over runs of Huber_delta(log L_hat_i - log L_i) with delta = 1e-3, using
L-BFGS from a grid of initialisations and keeping the best. Besiroglu et al. (2024,
arXiv 2404.10102) showed the published fit stopped early; they refit with the same objective summed
(not averaged) over the runs.

This module evaluates that objective with its exact gradient and Hessian for K parameter vectors
at once, and minimises all K problems together with a damped (Levenberg-Marquardt) Newton method.
Running every grid start at once, each to a tight stationary point, reaches the same minimum over
starts as running L-BFGS from each start one by one (the reference), in one vectorised pass.
The same solver refits thousands of bootstrap resamples at once: a resample is the same objective
with integer weights on the runs.

Parameter order everywhere: theta = (e, a, b, alpha, beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PARAM_NAMES", "SolveResult", "huber_objective", "solve_batched"]

PARAM_NAMES = ("e", "a", "b", "alpha", "beta")


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray):
    # theta: (K, 5); log_n, log_d: (n,)
    e, a, b, alpha, beta = (theta[:, i : i + 1] for i in range(5))  # each (K, 1)
    t1 = a - alpha * log_n[None, :]  # (K, n)  log of A / N^alpha
    t2 = b - beta * log_d[None, :]  # (K, n)  log of B / D^beta
    t3 = np.broadcast_to(e, t1.shape)  # (K, n)  log of E
    m = np.maximum(np.maximum(t1, t2), t3)
    z1, z2, z3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = z1 + z2 + z3
    pred = m + np.log(s)  # (K, n)  log L_hat
    return pred, z1 / s, z2 / s, z3 / s


def huber_objective(
    theta: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_loss: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = 1e-3,
    order: int = 0,
):
    """Summed Huber loss of log-loss residuals for each row of ``theta`` (K, 5).

    Args:
        theta: (K, 5) parameter vectors (e, a, b, alpha, beta).
        log_n, log_d, log_loss: (n,) logs of parameters, tokens and observed loss.
        weights: (K, n) or (n,) non-negative weights of the runs (bootstrap counts), default 1.
        delta: Huber threshold.
        order: 0 -> f; 1 -> (f, grad); 2 -> (f, grad, hess).

    Returns:
        f (K,), and with ``order`` >= 1 the gradient (K, 5) and Hessian (K, 5, 5).
    """
    pred, s1, s2, s3 = _terms(theta, log_n, log_d)
    r = pred - log_loss[None, :]  # (K, n) residuals in log space
    absr = np.abs(r)
    quad = absr <= delta
    w = 1.0 if weights is None else np.broadcast_to(weights, r.shape)
    huber = np.where(quad, 0.5 * r * r, delta * (absr - 0.5 * delta))
    f = (w * huber).sum(axis=1)
    if order == 0:
        return f
    c = w * np.where(quad, r, delta * np.sign(r))  # (K, n)  w * psi'(r)
    cs1, cs2, cs3 = c * s1, c * s2, c * s3
    x, y = log_n[None, :], log_d[None, :]
    grad = np.stack(
        [cs3.sum(1), cs1.sum(1), cs2.sum(1), -(cs1 * x).sum(1), -(cs2 * y).sum(1)], axis=1
    )  # (K, 5)
    if order == 1:
        return f, grad
    # d pred / d theta for each run: (K, n, 5)
    g = np.stack([s3, s1, s2, -s1 * x, -s2 * y], axis=2)
    # Hessian of pred is sum_p s_p u_p u_p^T - g g^T, with u_p the rows of the Jacobian of the
    # three log-terms; so H = sum_n (w psi'' - c) g g^T + c * sum_p s_p u_p u_p^T.
    d = (w * quad) - c  # (K, n)
    hess = np.matmul((g * d[:, :, None]).transpose(0, 2, 1), g)  # (K, 5, 5)
    hess[:, 0, 0] += cs3.sum(1)
    hess[:, 1, 1] += cs1.sum(1)
    hess[:, 2, 2] += cs2.sum(1)
    h13 = -(cs1 * x).sum(1)
    h24 = -(cs2 * y).sum(1)
    hess[:, 1, 3] += h13
    hess[:, 3, 1] += h13
    hess[:, 2, 4] += h24
    hess[:, 4, 2] += h24
    hess[:, 3, 3] += (cs1 * x * x).sum(1)
    hess[:, 4, 4] += (cs2 * y * y).sum(1)
    return f, grad, hess


@dataclass
class SolveResult:
    theta: np.ndarray  # (K, 5) final parameters
    f: np.ndarray  # (K,) final objective
    grad_norm: np.ndarray  # (K,) max-abs gradient at the end
    n_iter: np.ndarray  # (K,) iterations used
    converged: np.ndarray  # (K,) bool


def solve_batched(
    theta0: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_loss: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = 1e-3,
    max_iter: int = 500,
    ftol: float = 1e-15,
    xtol: float = 1e-11,
) -> SolveResult:
    """Minimise the objective from every row of ``theta0`` at once (damped Newton, per-row damping).

    Each row keeps its own Levenberg-Marquardt damping ``lam``: a step that lowers the objective is
    accepted and ``lam`` shrinks; otherwise it is rejected and ``lam`` grows, which turns the step
    towards scaled gradient descent (so indefinite Hessians are handled). A row stops when an accepted
    step changes the objective by less than ``ftol`` relative (and the parameters by less than
    ``xtol``), or when no damping up to 1e12 lowers the objective (a stationary point to working
    precision). Finished rows drop out of the computation, so the work shrinks as rows converge.
    """
    theta = np.array(theta0, dtype=np.float64, copy=True)
    k = theta.shape[0]
    w_full = None if weights is None else np.broadcast_to(np.asarray(weights, np.float64), (k, log_n.size))
    f = huber_objective(theta, log_n, log_d, log_loss, w_full, delta)
    lam = np.full(k, 1e-4)
    active = np.ones(k, dtype=bool)
    converged = np.zeros(k, dtype=bool)
    n_iter = np.zeros(k, dtype=np.int64)
    grad_norm = np.full(k, np.inf)
    eye = np.eye(5)
    need_derivs = np.ones(k, dtype=bool)
    grad = np.zeros((k, 5))
    hess = np.zeros((k, 5, 5))
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        # Derivatives only where the point moved (a rejected step keeps the old ones).
        upd = idx[need_derivs[idx]]
        if upd.size:
            wu = None if w_full is None else w_full[upd]
            _, grad[upd], hess[upd] = huber_objective(theta[upd], log_n, log_d, log_loss, wu, delta, order=2)
            grad_norm[upd] = np.abs(grad[upd]).max(axis=1)
            need_derivs[upd] = False
        h = hess[idx]
        scale = np.maximum(np.abs(np.diagonal(h, axis1=1, axis2=2)), 1e-12)  # Marquardt scaling
        lhs = h + lam[idx, None, None] * (scale[:, :, None] * eye[None])
        try:
            step = -np.linalg.solve(lhs, grad[idx][:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.stack([_safe_solve(m, -gv) for m, gv in zip(lhs, grad[idx])])
        cand = theta[idx] + step
        wi = None if w_full is None else w_full[idx]
        f_new = huber_objective(cand, log_n, log_d, log_loss, wi, delta)
        ok = np.isfinite(f_new) & (f_new < f[idx])
        n_iter[idx] += 1
        acc = idx[ok]
        small_f = (f[acc] - f_new[ok]) <= ftol * np.maximum(np.abs(f[acc]), 1e-300)
        small_x = np.abs(step[ok]).max(axis=1) <= xtol * (1.0 + np.abs(theta[acc]).max(axis=1))
        theta[acc] = cand[ok]
        f[acc] = f_new[ok]
        lam[acc] = np.maximum(lam[acc] / 3.0, 1e-12)
        need_derivs[acc] = True
        done = acc[small_f | small_x]
        converged[done] = True
        active[done] = False
        rej = idx[~ok]
        lam[rej] *= 8.0
        stuck = rej[lam[rej] > 1e12]  # nothing lowers f: stationary to working precision
        converged[stuck] = True
        active[stuck] = False
    # Final gradients for the rows that moved last.
    upd = np.flatnonzero(need_derivs)
    if upd.size:
        wu = None if w_full is None else w_full[upd]
        _, g_u = huber_objective(theta[upd], log_n, log_d, log_loss, wu, delta, order=1)
        grad_norm[upd] = np.abs(g_u).max(axis=1)
    return SolveResult(theta=theta, f=f, grad_norm=grad_norm, n_iter=n_iter, converged=converged)


def _safe_solve(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(m, v)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(m, v, rcond=None)[0]
