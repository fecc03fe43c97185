"""RouteLLM's matrix-factorisation router score, trained on pairwise win labels (torch, CPU).

Ong et al. 2024 ("RouteLLM", arXiv 2406.18665) score a model ``m`` on a prompt ``q`` with a
bilinear function of a learned model embedding ``v_m`` and a projection of the prompt embedding
``x_q`` (the "matrix factorization" router of the paper; the formula below is the one of the
reference implementation, lm-sys/RouteLLM ``routellm/routers/matrix_factorization/model.py``)::

    delta(m, q) = w2 . ( normalize(v_m) * (W1 x_q) )        # W1: (dim, d), w2: (dim,), no biases

and model ``a`` beats model ``b`` on ``q`` with probability ``sigmoid(delta(a, q) - delta(b, q))``
(a Bradley-Terry model whose strengths depend on the prompt). RouteLLM trains it on pairwise
preferences, ties dropped (``train_matrix_factorization.py``: BCE of ``sigmoid(delta_win -
delta_lose)`` against 1, Adam, weight decay). Here a "win" of ``a`` over ``b`` on ``q`` is ``a``
right and ``b`` wrong (pairs where both are right or both wrong are ties, dropped), for every
ordered pair of models.

Our outcomes say, per model, whether it was right, and :class:`~leanscale.cascade.router.Router`
also needs ``P(m correct | q)`` (budgets over more than two models), which pairwise labels
cannot give (they fix ``delta`` only up to a per-prompt constant). So a pointwise term is added:
``P(m correct | q) = sigmoid(delta(m, q) + b_m)`` with a per-model bias ``b_m``, BCE on each
model's outcome; the loss is the mean pairwise BCE plus the mean pointwise BCE. RouteLLM's
Gaussian noise on the prompt embeddings (their ``alpha``) is replaced by weight decay (the
prompt features here may be sparse TF-IDF rows, where dense noise would cost ``n x vocabulary``).

Full-batch Adam, a fixed number of epochs, seeded: the same data gives the same weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__: list[str] = []  # used by leanscale.cascade.router (Router(learner="mf"))

MF_DIM = 32  # latent dimension (RouteLLM uses 128 with 64 models; we route between few models)
MF_EPOCHS = 300
MF_LR = 1e-2
MF_POINTWISE_WEIGHT = 1.0


def _as_torch(X: Any):
    """Dense float32 tensor, or a sparse COO tensor for a scipy sparse matrix."""
    import torch

    if hasattr(X, "tocoo"):
        X = X.tocoo().astype(np.float32)
        idx = torch.from_numpy(np.vstack([X.row, X.col]).astype(np.int64))
        return torch.sparse_coo_tensor(idx, torch.from_numpy(X.data), size=X.shape,
                                       check_invariants=True).coalesce()
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))


def _delta(Xt, W1, P, w2):
    import torch

    proj = torch.sparse.mm(Xt, W1) if Xt.is_sparse else Xt @ W1  # (n, dim)
    v = torch.nn.functional.normalize(P, p=2, dim=1)  # (M, dim)
    return (proj[:, None, :] * v[None, :, :]) @ w2  # (n, M)


def fit_mf(X: Any, Y: np.ndarray, *, dim: int = MF_DIM, epochs: int = MF_EPOCHS, lr: float = MF_LR,
           weight_decay: float = 1e-4, seed: int = 0) -> dict[str, np.ndarray]:
    """Fit the bilinear score on prompts ``X`` (n, d) and outcomes ``Y`` (n, M) bool.

    Returns:
        ``{"W1": (d, dim), "P": (M, dim), "w2": (dim,), "bias": (M,)}`` float64 arrays.
    """
    import torch

    n, M = Y.shape
    d = X.shape[1]
    g = torch.Generator().manual_seed(int(seed))
    Xt = _as_torch(X)
    Yt = torch.from_numpy(Y.astype(np.float32))
    W1 = (torch.randn(d, dim, generator=g) / np.sqrt(max(d, 1))).requires_grad_()
    P = torch.randn(M, dim, generator=g).requires_grad_()
    w2 = (torch.randn(dim, generator=g) / np.sqrt(dim)).requires_grad_()
    rate = Yt.mean(0).clamp(0.5 / (n + 1), 1 - 0.5 / (n + 1))
    bias = torch.log(rate / (1 - rate)).clone().requires_grad_()
    # ordered pairs (win, lose) per prompt: a right, b wrong
    qi, wi, li = [], [], []
    for a in range(M):
        for b in range(M):
            if a != b:
                rows = np.flatnonzero(Y[:, a] & ~Y[:, b])
                qi.append(rows)
                wi.append(np.full(len(rows), a))
                li.append(np.full(len(rows), b))
    q_idx = torch.from_numpy(np.concatenate(qi).astype(np.int64))
    w_idx = torch.from_numpy(np.concatenate(wi).astype(np.int64))
    l_idx = torch.from_numpy(np.concatenate(li).astype(np.int64))
    opt = torch.optim.Adam([W1, P, w2, bias], lr=lr, weight_decay=weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    threads = torch.get_num_threads()
    # one thread: the matrices are small, and on a loaded machine torch's worker threads spin-wait
    # (measured 88 s with 2 threads vs 4 s with 1 for 800 x 12 features, 5 models, load 17 on 2 cores)
    torch.set_num_threads(1)
    try:
        _train(opt, bce, epochs, Xt, Yt, W1, P, w2, bias, q_idx, w_idx, l_idx)
    finally:
        torch.set_num_threads(threads)
    return {k: t.detach().double().numpy().copy() for k, t in (("W1", W1), ("P", P), ("w2", w2), ("bias", bias))}


def _train(opt, bce, epochs, Xt, Yt, W1, P, w2, bias, q_idx, w_idx, l_idx) -> None:
    import torch

    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            delta = _delta(Xt, W1, P, w2)  # (n, M)
            loss = MF_POINTWISE_WEIGHT * bce(delta + bias, Yt)
            if len(q_idx):
                margin = delta[q_idx, w_idx] - delta[q_idx, l_idx]
                loss = loss + bce(margin, torch.ones_like(margin))
            loss.backward()
            opt.step()


def mf_logits(X: Any, params: dict[str, np.ndarray]) -> np.ndarray:
    """``delta(m, q) + b_m`` for every prompt and model: (n, M) float64 (the logit of P(correct))."""
    proj = np.asarray(X @ params["W1"])  # (n, dim)
    P = params["P"]
    v = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)  # (M, dim), as F.normalize
    return (proj * params["w2"]) @ v.T + params["bias"]
