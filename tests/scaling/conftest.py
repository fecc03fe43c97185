import numpy as np
import pytest

from leanscale.scaling import EPOCH_2024

# Chinchilla's IsoFLOP budgets (Hoffmann et al. 2022, figure 3) and model sizes 70M..16B.
BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21)


def chinchilla_like_runs(law=EPOCH_2024, noise=0.0, seed=0, per_budget=12):
    """Runs at the paper's budgets and sizes, losses from ``law`` with log-normal noise."""
    rng = np.random.default_rng(seed)
    n, d, c = [], [], []
    for budget in BUDGETS:
        for size in np.geomspace(7e7, 1.6e10, per_budget):
            tokens = budget / (6 * size)
            if tokens >= 1e8:
                n.append(size), d.append(tokens), c.append(budget)
    n, d, c = map(np.array, (n, d, c))
    loss = law.predict(n, d) * np.exp(rng.normal(0.0, noise, n.size))
    return n, d, loss, c


@pytest.fixture
def exact_runs():
    return chinchilla_like_runs(noise=0.0)


@pytest.fixture
def noisy_runs():
    return chinchilla_like_runs(noise=0.01, seed=1)
