"""Self-supervised (SimCLR) training of an image encoder: leanscale.pruning.embed."""

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanscale.core.errors import InvalidParameterError
from leanscale.models.encoders import ConvEncoder, embed_images
from leanscale.pruning import embed
from leanscale.pruning.embed import nt_xent_loss, simclr_augment, train_ssl_encoder


def test_doctests():
    assert doctest.testmod(embed, raise_on_error=False).failed == 0


# ------------------------------------------------------------------------------------- SimCLR


def test_augment_keeps_shape_and_is_random_but_seeded():
    x = torch.randn(8, 1, 28, 28)
    a = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    b = simclr_augment(x, generator=torch.Generator().manual_seed(1))
    a2 = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert simclr_augment(x, size=(20, 18)).shape == (8, 1, 20, 18)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.allclose(a, b)
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(simclr_augment(x, generator=g), simclr_augment(x, generator=g))
    assert not torch.allclose(a, x)
    with pytest.raises(InvalidParameterError, match=r"shape \(28, 28\)"):
        simclr_augment(x[0, 0])


def test_augment_without_distortions_is_identity_or_flip():
    """Full-size crop, no rotation, no jitter/noise/erasing: the sampling grid hits the pixel
    centres exactly, so each view is the image or its mirror image."""
    x = torch.randn(64, 2, 9, 7)
    out = simclr_augment(
        x, generator=torch.Generator().manual_seed(3), scale=(1.0, 1.0), max_rotation_deg=0.0,
        jitter=0.0, noise=0.0, erase_p=0.0,
    )
    same = (out - x).flatten(1).abs().amax(1) < 1e-5
    flipped = (out - x.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54  # flips happen with probability 1/2


def test_augment_erasing_sets_a_rectangle_to_the_mean():
    x = torch.randn(16, 1, 20, 20)
    out = simclr_augment(
        x, generator=torch.Generator().manual_seed(0), scale=(1.0, 1.0), max_rotation_deg=0.0,
        jitter=0.0, noise=0.0, erase_p=1.0,
    )
    for i in range(16):
        base = x[i] if torch.isclose(out[i], x[i], atol=1e-5).float().mean() > 0.5 else x[i].flip(-1)
        changed = ~torch.isclose(out[i], base, atol=1e-5)
        frac = changed.float().mean().item()
        assert 0.0 < frac <= 0.25  # 2-20% of the area, rounded to whole pixels
        torch.testing.assert_close(out[i][changed], x[i].mean().expand(int(changed.sum())))


def _nt_xent_reference(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[j] / t) / denom)
    return total / n


def test_nt_xent_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for t in (0.1, 0.5, 1.0):
        torch.testing.assert_close(nt_xent_loss(z1, z2, t).double(), _nt_xent_reference(z1, z2, t),
                                   rtol=1e-5, atol=1e-6)
    # Identical, mutually orthogonal pairs: log(1 + (2B - 2) exp(-1/T) / exp(1/T)) per view.
    e = torch.eye(3)
    torch.testing.assert_close(nt_xent_loss(e, e, 0.5), torch.log(1 + 4 * torch.exp(torch.tensor(-2.0))))


def _shapes(n_per_class=48, size=16, seed=0):
    """Four easy classes of 16x16 images: a horizontal bar, a vertical bar, a square, a cross,
    at random positions and brightnesses."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label in range(4):
        for _ in range(n_per_class):
            img = torch.zeros(size, size)
            r, c = torch.randint(3, size - 9, (2,), generator=g).tolist()
            v = 0.5 + 0.5 * torch.rand(1, generator=g).item()
            if label == 0:
                img[r + 3 : r + 5, c : c + 8] = v
            elif label == 1:
                img[r : r + 8, c + 3 : c + 5] = v
            elif label == 2:
                img[r + 1 : r + 7, c + 1 : c + 7] = v
            else:
                img[r + 3 : r + 5, c : c + 8] = v
                img[r : r + 8, c + 3 : c + 5] = v
            xs.append(img)
            ys.append(label)
    return torch.stack(xs)[:, None], torch.tensor(ys)


def test_train_ssl_encoder_learns_deterministically_without_touching_the_global_rng():
    x, y = _shapes()
    state = torch.get_rng_state()
    kw = {"epochs": 6, "batch_size": 64, "dim": 16, "seed": 0}
    enc = train_ssl_encoder(x, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(enc, ConvEncoder) and not enc.training
    h = enc.history_
    assert h.steps == h.planned_steps == 6 * 3 and not h.stopped_early
    assert np.mean(h.losses[-3:]) < np.mean(h.losses[:3]) - 0.1
    e = embed_images(enc, x)
    assert e.shape == (len(x), 16) and e.dtype == np.float32
    # Same seed -> same weights; another seed -> other weights (one epoch is enough to tell).
    short = {**kw, "epochs": 1}
    e1 = embed_images(train_ssl_encoder(x, **short), x)
    np.testing.assert_array_equal(embed_images(train_ssl_encoder(x, **short), x), e1)
    assert not np.allclose(embed_images(train_ssl_encoder(x, **{**short, "seed": 1}), x), e1)
    # The labels were never seen, yet the nearest neighbour (cosine) mostly shares the class.
    u = F.normalize(torch.from_numpy(e), dim=1)
    sim = (u @ u.T).fill_diagonal_(-2)
    nn_acc = (y[sim.argmax(1)] == y).float().mean().item()
    assert nn_acc > 0.6  # chance is 0.25


def test_time_budget_stops_early():
    x, _ = _shapes(n_per_class=16)
    enc = train_ssl_encoder(x, epochs=50, batch_size=16, dim=4, time_budget_s=1e-9)
    assert enc.history_.steps == 1 and enc.history_.stopped_early
    assert enc.history_.planned_steps == 50 * 4


def test_train_ssl_encoder_accepts_numpy_hw_images_and_small_n():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 12, 12)).astype(np.uint8)  # raw pixel values, no channel axis
    enc = train_ssl_encoder(x, epochs=1, batch_size=256, dim=5)  # batch capped at n = 10
    assert enc.history_.steps == 1
    assert float(enc.mean) == pytest.approx(float(x.mean()), rel=1e-5)
    assert embed_images(enc, x, batch_size=3).shape == (10, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"images": torch.zeros(5, 4)}, r"'images'.*shape \(5, 4\)"),
        ({"images": torch.zeros(1, 1, 8, 8)}, r"n >= 2"),
        ({"images": torch.full((4, 1, 8, 8), float("nan"))}, "finite"),
        ({"epochs": 0}, "'epochs'"),
        ({"temperature": 0.0}, "'temperature'"),
        ({"time_budget_s": -1.0}, "'time_budget_s'"),
        ({"batch_size": 1}, "'batch_size'"),
        ({"view_size": 3}, "'view_size'"),
        ({"view_size": (8, 2)}, "'view_size'"),
    ],
)
def test_train_ssl_encoder_bad_input(kwargs, match):
    args = {"images": torch.zeros(4, 1, 8, 8), **kwargs}
    with pytest.raises(InvalidParameterError, match=match):
        train_ssl_encoder(args.pop("images"), **args)
