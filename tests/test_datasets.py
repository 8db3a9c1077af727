"""The 2-D datasets: shapes, standardisation, seeding, and what each is meant to look like.

Expected values come from the definitions in densities.py (rho = -0.495/0.505, a rectangle of
uniform points, 16 lattice directions on a circle) and, for scg, from scipy's multivariate normal.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch as t

import datasets
import densities


@pytest.mark.parametrize("name", datasets.SETS_2D)
def test_shape_dtype_and_standardisation(name):
    x = datasets.get_2d_dataset(name)
    assert x.shape == (8000, 2) and x.dtype == t.float32 and t.isfinite(x).all()
    if name == "scg":
        # drawn from N(0, [[1, rho], [rho, 1]]): standard by construction, so its exact density
        # stays exact; sample mean within 4 standard errors (1/sqrt(n)) of 0, sample variance
        # within 4 standard errors (sqrt(2/n)) of 1
        assert (x.mean(0).abs() < 4 / math.sqrt(8000)).all()
        assert ((x.var(0) - 1).abs() < 4 * math.sqrt(2 / 8000)).all()
    else:
        assert t.allclose(x.mean(0), t.zeros(2), atol=1e-5)
        assert t.allclose(x.std(0), t.ones(2), atol=1e-3)


@pytest.mark.parametrize("name", datasets.SETS_2D)
def test_seeded(name):
    a, b = datasets.get_2d_dataset(name, n=500), datasets.get_2d_dataset(name, n=500)
    c = datasets.get_2d_dataset(name, n=500, seed=7)
    assert t.equal(a, b)
    assert not t.allclose(a, c)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        datasets.get_2d_dataset("spiral")
    for name in datasets.SETS_2D:
        assert name in str(err.value)


def test_bad_sizes():
    with pytest.raises(ValueError, match="number of points"):
        datasets.get_2d_dataset("moons", n=1)
    with pytest.raises(ValueError, match="val_fraction"):
        datasets.split_2d(t.zeros(10, 2), val_fraction=1.5)


def test_split_is_seeded_disjoint_and_complete():
    x = t.arange(200.).view(100, 2)
    train, val = datasets.split_2d(x, 0.1, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert sorted(t.cat([train, val])[:, 0].tolist()) == x[:, 0].tolist()
    again = datasets.split_2d(x, 0.1, seed=3)
    assert t.equal(again[1], val)
    assert not t.equal(datasets.split_2d(x, 0.1, seed=4)[1], val)


def test_scg_exact_density_and_entropy():
    # -log p against scipy's multivariate normal, and the entropy against the reference value
    # log(2 pi e) + 1/2 log(1 - rho^2) = 1.2185 nats (docs/maths.md)
    rho = -0.495 / 0.505
    x = datasets.get_2d_dataset("scg", n=4000)
    truth = -scipy.stats.multivariate_normal([0, 0], [[1, rho], [rho, 1]]).logpdf(x.double().numpy())
    assert np.allclose(densities.scg_nll(x).numpy(), truth, rtol=0, atol=1e-9)
    assert densities.SCG_ENTROPY == pytest.approx(1.2185, abs=5e-5)
    # the sample mean of -log p estimates the entropy; Var(-log p) = d/2 = 1 for a Gaussian
    nll = densities.scg_nll(datasets.get_2d_dataset("scg", n=100000, seed=1))
    assert abs(nll.mean().item() - densities.SCG_ENTROPY) < 4 / math.sqrt(100000)
    # scg is served as drawn (not standardised): the exact density of the data is scg_nll itself
    assert t.equal(datasets.exact_nll_2d("scg")(x), densities.scg_nll(x))
    assert datasets.entropy_2d("scg") == densities.SCG_ENTROPY


def _local_flatness(x, k=200, n=200):
    """Median over n points of (smallest / largest) eigenvalue of the covariance of their k
    nearest neighbours: ~0 on a curve, ~1 for a 2-D spread. (k spans about 1/40 of the dino's
    outline, a length ~10 times its jitter.)"""
    x = x.double()
    centres = x[:n]
    idx = t.cdist(centres, x).topk(k, largest=False).indices
    ev = t.linalg.eigvalsh(t.stack([x[i].T.cov() for i in idx]))
    return (ev[:, 0] / ev[:, 1]).median().item()


def test_dino_is_peaked_on_a_curve():
    # points lie along the outline: locally one-dimensional, unlike the uniform rectangle
    assert _local_flatness(datasets.get_2d_dataset("dino")) < 0.1
    assert _local_flatness(datasets.get_2d_dataset("line")) > 0.3


def test_line_is_a_uniform_rectangle():
    # U(-w/2, w/2) standardised is U(-sqrt 3, sqrt 3), whatever w: both coordinates fill that
    # range, with sharp edges and a flat histogram. Tolerance 0.05: the sample mean and standard
    # deviation used to standardise are each off by ~0.01 (their standard errors at n = 8000).
    x = datasets.get_2d_dataset("line")
    edge = math.sqrt(3)
    assert (x.abs() <= edge + 0.05).all() and (x.abs().max(0).values > edge - 0.05).all()
    counts = t.histc(x[:, 0], bins=8, min=-edge, max=edge)
    assert (counts - 1000).abs().max() < 5 * math.sqrt(1000)


def test_circle_sits_at_sixteen_angles():
    # the 16 directions of the nonzero points of {-2..2}^2; a jitter of length at most 0.03 off
    # the unit circle moves a point by at most 0.03 rad, and standardising (a shift of ~0.01 and
    # per-coordinate factors equal to ~1%) by ~0.02 rad more
    x = datasets.get_2d_dataset("circle").double()
    angle = t.atan2(x[:, 1], x[:, 0])
    grid = t.tensor([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)],
                    dtype=t.float64)
    directions = t.atan2(grid[:, 1], grid[:, 0]).unique()
    assert len(directions) == 16
    diff = (angle[:, None] - directions[None, :] + math.pi) % (2 * math.pi) - math.pi
    nearest = diff.abs().min(1)
    assert nearest.values.max() < 0.06
    assert len(nearest.indices.unique()) == 16
    # and a thin ring: the jitter (up to 3% of the unit radius), the centring and the rescaling
    # (~1-2% each) keep every radius within 7% of the median (a disc would spread 100%)
    radius = x.norm(dim=1)
    assert ((radius / radius.median() - 1).abs() < 0.07).all()
