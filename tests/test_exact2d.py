"""Exact densities of the 2-D datasets: densities.dino_nll, moons_nll, line_nll, circle_nll and
blobs_log_given (raw units), datasets.exact_nll_2d and exact_log_given_2d (standardised units)
and datasets.entropy_2d.

Expected values come from probability itself (a density integrates to 1; bin probabilities
predict the counts of fresh samples from the generating functions in densities.py; the mean of
-log p over fresh samples estimates the entropy), from the definitions of the generators (the
outline, the arcs, the rectangle, the 16 directions, the blobs' Gaussians through scipy), and from
short derivations in comments.
"""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch as t

import datasets
import densities as D

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = {"dino": D.dino_nll, "moons": D.moons_nll, "line": D.line_nll, "circle": D.circle_nll}
STANDARDISED = ("dino", "moons", "line", "circle")
# raw-unit boxes holding the support plus 10 noise stds, and each dataset's noise scale
SIGMA = {"dino": D.DINO_JITTER, "moons": D.MOONS_NOISE}
BOX = {"dino": (D.DINO_OUTLINE.min(0) - 10 * D.DINO_JITTER,
                D.DINO_OUTLINE.max(0) + 10 * D.DINO_JITTER),
       "moons": (np.array([-1.3, -0.8]), np.array([2.3, 1.3]))}


def fresh(name, n, seed):
    """n raw points from the generating function itself, with a seed unlike get_2d_dataset's 42."""
    made = datasets.SETS_2D[name].make(n, np.random.default_rng(seed))
    return made[0] if datasets.SETS_2D[name].classes else made  # a labelled set: its points


def standardisation(name, n=8000, seed=42):
    """The mean and std get_2d_dataset standardised with, recomputed here the way it did before
    exact_nll_2d existed (numpy sample mean and std, ddof=0, of the generator's raw points)."""
    x = fresh(name, n, seed)
    return x.mean(0), x.std(0)


def grid(lo, hi, h, offset=0.5):
    axes = [np.arange(a + offset * h, b, h) for a, b in zip(lo, hi)]
    return t.as_tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2))


def bin_probabilities(nll, lo, width, shape, q=8):
    """Integral of exp(-nll) over each bin of a regular grid of bins (q x q Gauss-Legendre nodes
    per bin), shape `shape`."""
    u, w = np.polynomial.legendre.leggauss(q)
    u, w = (u + 1) / 2 * width, w / 2 * width
    corner = [lo[d] + width * np.arange(shape[d]) for d in range(2)]
    px = (corner[0][:, None] + u[None, :]).ravel()
    py = (corner[1][:, None] + u[None, :]).ravel()
    pts = np.stack(np.meshgrid(px, py, indexing="ij"), -1).reshape(-1, 2)
    p = t.exp(-nll(t.as_tensor(pts))).numpy().reshape(shape[0], q, shape[1], q)
    return np.einsum("iajb,a,b->ij", p, w, w)


def chi_square(prob, counts, n, min_expected=20):
    """Pearson's chi-square of counts against n * prob, bins with fewer than min_expected
    expected counts lumped into one; returns (statistic, degrees of freedom)."""
    expected = n * prob.ravel()
    counts = counts.ravel()
    big = expected >= min_expected
    e = np.append(expected[big], n - expected[big].sum())
    c = np.append(counts[big], n - counts[big].sum())
    return ((c - e) ** 2 / e).sum(), len(e) - 1


# --- normalisation --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dino", "moons"])
def test_smooth_densities_integrate_to_one_and_give_the_entropy(name):
    # rectangle rule on a grid of spacing sigma / 1.7 (not entropy_2d's sigma, and shifted):
    # for a density smooth on the scale sigma the error is ~exp(-2 pi^2 1.7^2) ~ 1e-25, so the
    # mass must be 1 to rounding, and -sum p log p h^2 must reproduce entropy_2d's quadrature
    # (after the log-Jacobian of the standardisation, -log(std_1 std_2))
    h = SIGMA[name] / 1.7
    nll = RAW[name](grid(*BOX[name], h, offset=0.3))
    p = t.exp(-nll)
    assert (p.sum() * h * h).item() == pytest.approx(1, abs=1e-9)
    _, std = standardisation(name)
    entropy = (p * nll).sum().item() * h * h - math.log(std[0] * std[1])
    assert datasets.entropy_2d(name) == pytest.approx(entropy, abs=1e-6)


def test_line_integrates_to_one():
    # cells of 0.01 tile [-0.6, 0.6] x [-1.1, 1.1] with the rectangle's edges between cells:
    # 100 x 200 cells of density 1/2 inside, none outside
    h = 0.01
    p = t.exp(-D.line_nll(grid((-0.6, -1.1), (0.6, 1.1), h)))
    assert set(p.unique().tolist()) == {0.0, 0.5}
    assert (p.sum() * h * h).item() == pytest.approx(1, abs=1e-9)


def _polar_masses(r_lo, r_hi, q=8, m=64):
    """Integral of the circle's density over the annuli r_lo < |x - c_k| < r_hi around each of the
    16 centres c_k, in polar coordinates (p r is constant in r on a disc, so Gauss-Legendre in r
    and the midpoint rule in angle are exact for the correct density)."""
    centre, _ = D._circle_directions()
    u, w = np.polynomial.legendre.leggauss(q)
    r = r_lo + (u + 1) / 2 * (r_hi - r_lo)
    phi = (np.arange(m) + 0.5) * 2 * np.pi / m
    d = np.stack([np.outer(r, np.cos(phi)), np.outer(r, np.sin(phi))], -1)   # (q, m, 2)
    pts = centre.numpy()[:, None, None, :] + d[None]                          # (16, q, m, 2)
    p = t.exp(-D.circle_nll(t.as_tensor(pts.reshape(-1, 2)))).numpy().reshape(16, q, m)
    return np.einsum("kqm,q->k", p * r[None, :, None], w * (r_hi - r_lo) / 2) * 2 * np.pi / m


def test_circle_integrates_to_one_and_vanishes_off_the_discs():
    # the mass within R of the centres, integrated in polar coordinates around each (which tames
    # the 1 / r singularity), is 1; the lattice gives the axes and diagonals 2 / 24 each, the 8
    # other directions 1 / 24
    R = D.CIRCLE_JITTER
    mass = _polar_masses(0, R)
    assert mass.sum() == pytest.approx(1, abs=1e-10)
    assert sorted(np.round(mass * 24, 9)) == [1.0] * 8 + [2.0] * 8
    # nothing in the annuli R < |x - c_k| < 2 R, and nothing on a grid away from the discs
    assert (_polar_masses(R * (1 + 1e-9), 2 * R) == 0).all()
    pts = grid((-1.2, -1.2), (1.2, 1.2), 0.01)
    off = t.cdist(pts, D._circle_directions()[0]).min(1).values >= R
    nll = D.circle_nll(pts)
    assert off.sum() > 0 and (nll[off] == math.inf).all() and t.isfinite(nll[~off]).all()


# --- against fresh samples ------------------------------------------------------------------

@pytest.mark.parametrize("name, width", [("dino", 0.2), ("moons", 0.1)])
def test_smooth_densities_match_a_histogram_of_fresh_samples(name, width, monkeypatch):
    # bin probabilities (the density integrated over each bin, 8 x 8 Gauss-Legendre nodes: bins
    # are 5 and 3.3 noise stds wide, quadrature error < 3e-6 relative against 16 x 16 nodes, far
    # below the >= 2% counting noise) against the counts of 10^6 fresh samples: Pearson's
    # chi-square with p > 1e-4 (make_moons spaces its points evenly along the arcs, so its counts
    # fluctuate a little less than multinomial ones: its chi-square is on the low side) ...
    n = 10 ** 6
    lo, hi = BOX[name]
    shape = tuple(np.ceil((hi - lo) / width).astype(int))
    edges = [lo[d] + width * np.arange(shape[d] + 1) for d in range(2)]
    x = fresh(name, n, seed=11)
    counts = np.histogram2d(x[:, 0], x[:, 1], bins=edges)[0]
    stat, dof = chi_square(bin_probabilities(RAW[name], lo, width, shape), counts, n)
    assert dof > 150 and scipy.stats.chi2.sf(stat, dof) > 1e-4
    # ... and the test has power: a density whose noise std is 5% too large fails it badly
    # (measured: p ~ 1e-69 for dino, far smaller for moons; 2% already gives p ~ 0.02, 1e-13)
    monkeypatch.setattr(D, "DINO_JITTER" if name == "dino" else "MOONS_NOISE", 1.05 * SIGMA[name])
    stat, dof = chi_square(bin_probabilities(RAW[name], lo, width, shape), counts, n)
    assert scipy.stats.chi2.sf(stat, dof) < 1e-10


def test_line_matches_a_histogram_of_fresh_samples():
    # 0.1 x 0.1 bins over [-0.6, 0.6] x [-1.1, 1.1], edges on the rectangle's: 200 bins of
    # probability 0.1^2 / 2 inside (from line_nll), none outside; chi-square of 10^6 samples
    n, width = 10 ** 6, 0.1
    lo, shape = np.array([-0.6, -1.1]), (12, 22)
    prob = bin_probabilities(D.line_nll, lo, width, shape, q=2)
    assert (np.isclose(prob, 0.005, rtol=1e-12) | (prob == 0)).all() and (prob > 0).sum() == 200
    edges = [lo[d] + width * np.arange(shape[d] + 1) for d in range(2)]
    x = fresh("line", n, seed=12)
    counts = np.histogram2d(x[:, 0], x[:, 1], bins=edges)[0]
    assert counts[prob == 0].sum() == 0
    stat, dof = chi_square(prob, counts, n)
    assert dof == 200 and scipy.stats.chi2.sf(stat, dof) > 1e-4


def test_circle_matches_fresh_samples_by_direction_and_radius():
    # cells: the 16 discs x 5 annuli of width R / 5; their probabilities integrated from
    # circle_nll in polar coordinates, against the counts of 10^6 fresh samples (each assigned
    # to its nearest centre). The radius is U(0, R), so each annulus holds 1/5 of a disc's mass.
    n, R = 10 ** 6, D.CIRCLE_JITTER
    prob = np.stack([_polar_masses(R * i / 5, R * (i + 1) / 5) for i in range(5)], 1)  # (16, 5)
    assert np.allclose(prob / prob.sum(1, keepdims=True), 0.2, rtol=0, atol=1e-9)
    x = t.as_tensor(fresh("circle", n, seed=13))
    r, k = t.cdist(x, D._circle_directions()[0]).min(1)
    assert (r < R).all()
    counts = np.bincount((k * 5 + (r / R * 5).long()).numpy(), minlength=80).reshape(16, 5)
    stat, dof = chi_square(prob, counts, n)
    assert dof == 80 and scipy.stats.chi2.sf(stat, dof) > 1e-4


@pytest.mark.parametrize("name, n", [("dino", 10 ** 5), ("moons", 5 * 10 ** 4), ("line", 10 ** 4),
                                     ("circle", 10 ** 5)])
def test_monte_carlo_entropy(name, n):
    # the mean of -log p_std over fresh samples, standardised as get_2d_dataset's points are,
    # estimates the entropy: within 4 standard errors of entropy_2d (quadrature for dino and
    # moons, closed forms for line and circle). Line: -log p is constant, so exactly equal.
    mean, std = standardisation(name)
    nll = datasets.exact_nll_2d(name)(t.as_tensor((fresh(name, n, seed=21) - mean) / std))
    assert t.isfinite(nll).all()
    stderr = nll.std().item() / math.sqrt(n)
    assert abs(nll.mean().item() - datasets.entropy_2d(name)) <= 4 * stderr + 1e-12


def test_closed_form_entropies():
    # line: log(area 2) minus log(std_1 std_2); circle: H(w) + log(2 pi R^2) - 1 - log(std_1 std_2)
    # with H(w) = 8 (1/12) log 12 + 8 (1/24) log 24 (16 directions, axes and diagonals doubled)
    _, std = standardisation("line")
    assert datasets.entropy_2d("line") == pytest.approx(math.log(2) - math.log(std[0] * std[1]),
                                                        abs=1e-12)
    _, std = standardisation("circle")
    h_w = 2 / 3 * math.log(12) + 1 / 3 * math.log(24)
    expected = h_w + math.log(2 * math.pi * D.CIRCLE_JITTER ** 2) - 1 - math.log(std[0] * std[1])
    assert datasets.entropy_2d("circle") == pytest.approx(expected, abs=1e-12)
    assert datasets.entropy_2d("scg") == D.SCG_ENTROPY


# --- the closed form and the quadrature themselves ------------------------------------------

def test_dino_closed_form_matches_brute_force_integral_along_the_outline():
    # p(x) = (1/L) int_0^L N(x; o(s), sigma^2 I) ds along the outline o, by the trapezoid rule
    # per segment (4001 nodes) with its end correction -(h^2/12) (f'(end) - f'(start)) (error
    # O(h^4)), at points near the outline, off its corners and inside the body where -log p < 12
    rng = np.random.default_rng(3)
    x = np.concatenate([fresh("dino", 40, seed=4), D.DINO_OUTLINE[:10] + 0.05,
                        rng.uniform(BOX["dino"][0], BOX["dino"][1], (10, 2)) * 0.3 + 2])
    start, end = D.DINO_OUTLINE, np.roll(D.DINO_OUTLINE, -1, 0)
    s2 = D.DINO_JITTER ** 2
    p = np.zeros(len(x))
    for a, b in zip(start, end):
        ell = np.linalg.norm(b - a)
        s = np.linspace(0, ell, 4001)
        rel = x[:, None] - (a + s[:, None] * (b - a) / ell)[None]               # (m, nodes, 2)
        f = np.exp(-(rel ** 2).sum(-1) / (2 * s2)) / (2 * np.pi * s2)
        df = f * (rel @ ((b - a) / ell)) / s2                                  # d f / d s
        h = s[1] - s[0]
        p += np.trapezoid(f, s, axis=1) - h * h / 12 * (df[:, -1] - df[:, 0])
    nll = -np.log(p / np.linalg.norm(end - start, axis=1).sum())
    keep = nll < 12
    assert keep.sum() >= 50
    assert np.allclose(D.dino_nll(x).numpy()[keep], nll[keep], rtol=0, atol=1e-7)


def test_moons_quadrature_converges():
    # doubling the Gauss-Legendre nodes (512 -> 1024) changes -log p by < 1e-8 nats on data
    # points and out to a distance ~5 from the arcs
    rng = np.random.default_rng(5)
    x = np.concatenate([fresh("moons", 2000, seed=6), rng.uniform(-5, 5, (200, 2))])
    assert np.abs(D.moons_nll(x, nodes=512) - D.moons_nll(x, nodes=1024)).max() < 1e-8


def _moons_finite_mixture_nll(x, n=8000):
    """-log p under make_moons' actual points: n Gaussians of std 0.03 at u = linspace(0, pi)."""
    n_out = n // 2
    u_out, u_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n - n_out)
    c = np.concatenate([np.stack([np.cos(u_out), np.sin(u_out)], 1),
                        np.stack([1 - np.cos(u_in), 1 - np.sin(u_in) - 0.5], 1)])
    d2 = t.cdist(t.as_tensor(x), t.as_tensor(c)) ** 2
    s2 = D.MOONS_NOISE ** 2
    return -(t.logsumexp(-d2 / (2 * s2), 1) - math.log(n) - math.log(2 * math.pi * s2)).numpy()


def test_moons_continuum_vs_the_finite_mixture():
    # In the bulk the finite mixture is (n_arc - 1)/n_arc times the continuum (1/n_arc per point,
    # spacing h = pi/(n_arc - 1), and the Gaussian rule over many points of spacing h << 0.03 is
    # exact), so -log p_cont - -log p_fin = -log(4000/3999). At an arc end the trapezoid rule's
    # end correction adds f(0)/2 per point to (1/h) int f, int f = sigma sqrt(pi/2) f(0):
    # finite/continuum = (3999/4000) (1 + h / (2 sigma sqrt(pi/2))) = 0.010143 nats.
    h = math.pi / 3999
    bulk = np.array([[0.0, 1.0], [0.5, -0.3], [0.3, 0.3], [-0.7, 0.72], [1.5, -0.33]])
    ends = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [2.0, 0.5]])
    diff = lambda x: D.moons_nll(x).numpy() - _moons_finite_mixture_nll(x)
    assert np.allclose(diff(bulk), -math.log(4000 / 3999), rtol=0, atol=1e-7)
    end_gap = math.log(3999 / 4000) + math.log1p(h / (2 * D.MOONS_NOISE * math.sqrt(math.pi / 2)))
    assert np.allclose(diff(ends), end_gap, rtol=0, atol=1e-4)
    # averaged over the default validation split (the raw points of get_2d_dataset's, split as
    # train_2d.py splits them) the two differ by 7e-5 nats, well below any model's gap
    _, val = datasets.split_2d(t.arange(8000), 0.1, seed=0)
    assert abs(diff(fresh("moons", 8000, seed=42)[val.numpy()]).mean()) < 2e-4


# --- the standardised functions -------------------------------------------------------------

@pytest.mark.parametrize("name", STANDARDISED)
def test_standardised_is_raw_plus_log_jacobian_and_vectorised(name):
    mean, std = standardisation(name)
    # the standardisation recomputed here is the one get_2d_dataset applied
    assert t.equal(datasets.get_2d_dataset(name), t.as_tensor((fresh(name, 8000, 42) - mean) / std,
                                                       dtype=t.float32))
    x = np.concatenate([fresh(name, 500, seed=7), [[0.0, 0.0], [5.0, -3.0], [0.4, 0.9]]])
    y = t.as_tensor((x - mean) / std)
    nll = datasets.exact_nll_2d(name)
    got = nll(y)
    assert got.dtype == t.float64 and got.shape == (len(x),)
    # -log p_std(y) = -log p_raw(mean + std y) - log(std_1 std_2)
    expected = RAW[name](x) - math.log(std[0] * std[1])
    assert t.equal(t.isinf(got), t.isinf(expected))
    fin = t.isfinite(expected)
    assert t.allclose(got[fin], expected[fin], rtol=1e-12, atol=1e-9)
    # one by one as in the batch
    one_by_one = t.cat([nll(y[i:i + 1]) for i in (0, 1, 2, len(x) - 2)])
    assert t.allclose(one_by_one, got[[0, 1, 2, len(x) - 2]], rtol=1e-12, atol=0)
    # another n and seed: that dataset's own standardisation
    mean7, std7 = standardisation(name, 500, 7)
    y7 = t.as_tensor((x - mean7) / std7)
    got7 = datasets.exact_nll_2d(name, n=500, seed=7)(y7)[fin]
    expected7 = RAW[name](x)[fin] - math.log(std7[0] * std7[1])  # (moons: even n, weights 1/2)
    assert t.allclose(got7, expected7, rtol=1e-12, atol=1e-9)


def test_exact_nll_2d_names():
    x = datasets.get_2d_dataset("scg", n=100)
    assert t.equal(datasets.exact_nll_2d("scg")(x), D.scg_nll(x))  # served as drawn
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.exact_nll_2d("spiral")


# --- the labelled set: blobs ----------------------------------------------------------------

def blobs_scipy_log_given(x):
    """log p(x | k) for the three components, (m, 3), from make_blobs' definition (component k
    is BLOBS_MEANS[k] + BLOBS_STDS[k] * standard normal) through scipy, not densities.py."""
    return np.stack([scipy.stats.multivariate_normal(m, s ** 2 * np.eye(2)).logpdf(x)
                     for m, s in zip(D.BLOBS_MEANS, D.BLOBS_STDS)], 1)


def blobs_scipy_nll(x):
    return -scipy.special.logsumexp(blobs_scipy_log_given(x) + np.log(D.BLOBS_WEIGHTS), axis=1)


def test_blobs_densities_raw_and_standardised():
    # points from the generator and far off it, in raw units
    x = np.concatenate([fresh("blobs", 500, seed=8), [[0.0, 0.0], [5.0, -3.0], [-4.0, 6.0]]])
    expected = blobs_scipy_log_given(x)
    got = D.blobs_log_given(x)
    assert got.dtype == t.float64 and got.shape == (len(x), 3)
    assert np.allclose(got.numpy(), expected, rtol=1e-12, atol=1e-9)
    # the prior is make_blobs' component weights
    assert np.allclose(D.blobs_log_prior().numpy(), np.log(D.BLOBS_WEIGHTS), rtol=0, atol=1e-15)
    # served points: the standardisation recomputed here is the one get_2d_dataset applied ...
    mean, std = standardisation("blobs")
    assert t.equal(datasets.get_2d_dataset("blobs"),
                   t.as_tensor((fresh("blobs", 8000, 42) - mean) / std, dtype=t.float32))
    # ... and the served densities are the raw ones plus the log-Jacobian: log p_std(y | k) =
    # log p_raw(mean + std y | k) + log(std_1 std_2), -log p_std(y) the same for the marginal
    y = t.as_tensor((x - mean) / std)
    log_jacobian = math.log(std[0] * std[1])
    given = datasets.exact_log_given_2d("blobs")(y)
    assert given.dtype == t.float64 and given.shape == (len(x), 3)
    assert np.allclose(given.numpy(), expected + log_jacobian, rtol=1e-12, atol=1e-9)
    nll = datasets.exact_nll_2d("blobs")(y)
    assert nll.shape == (len(x),)
    assert np.allclose(nll.numpy(), blobs_scipy_nll(x) - log_jacobian, rtol=1e-12, atol=1e-9)


def test_blobs_entropy():
    # Monte Carlo: the mean of scipy's -log p over 10^5 fresh make_blobs points is within 4
    # standard errors (std of -log p ~0.84 measured: ~0.003 nats) of blobs_entropy's quadrature
    x = fresh("blobs", 10 ** 5, seed=31)
    v = blobs_scipy_nll(x)
    assert abs(v.mean() - D.blobs_entropy()) <= 4 * v.std() / math.sqrt(len(v))
    # and tighter, Gauss-Hermite: H = -sum_k w_k E_{x ~ N_k} log p(x), 160 x 160 nodes per
    # component (measured: 1.2e-8 from 80 x 80, 1.3e-9 from blobs_entropy; tolerance 1e-7)
    u, w = np.polynomial.hermite_e.hermegauss(160)
    nodes = np.stack(np.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    weights = np.outer(w, w).ravel() / w.sum() ** 2
    h = sum(-wk * (weights * -blobs_scipy_nll(np.asarray(m) + s * nodes)).sum()
            for wk, m, s in zip(D.BLOBS_WEIGHTS, D.BLOBS_MEANS, D.BLOBS_STDS))
    assert D.blobs_entropy() == pytest.approx(h, abs=1e-7)
    # served: minus the log-Jacobian of the standardisation
    _, std = standardisation("blobs")
    expected = D.blobs_entropy() - math.log(std[0] * std[1])
    assert datasets.entropy_2d("blobs") == pytest.approx(expected, abs=1e-12)


# --- outside the support --------------------------------------------------------------------

def test_outside_the_support():
    # line and circle: +inf off their supports (in raw and standardised units)
    off_line = np.array([[0.51, 0.0], [0.0, -1.01], [3.0, 3.0]])
    assert (D.line_nll(off_line) == math.inf).all()
    mean, std = standardisation("line")
    assert (datasets.exact_nll_2d("line")(t.as_tensor((off_line - mean) / std)) == math.inf).all()
    R = D.CIRCLE_JITTER
    off_circle = np.array([[0.0, 0.0], [1 + 1.01 * R, 0.0], [math.cos(0.2), math.sin(0.2)],
                           [5.0, 0.0]])
    assert (D.circle_nll(off_circle) == math.inf).all()
    assert math.isfinite(D.circle_nll(np.array([[1 + 0.99 * R, 0.0]])).item())
    mean, std = standardisation("circle")
    off_circle_std = t.as_tensor((off_circle - mean) / std)
    assert (datasets.exact_nll_2d("circle")(off_circle_std) == math.inf).all()
    # dino and moons: far away the density underflows float64 but -log p stays finite, close to
    # d^2 / (2 sigma^2) at distance d from the curve (the rest is a log of a modest factor)
    far = np.array([[30.0, 30.0], [-50.0, 7.0], [4.0, 20.0], [100.0, -1.0]])
    u = np.linspace(0, np.pi, 20001)
    curve = {"dino": np.concatenate([a + np.linspace(0, 1, 2000)[:, None] * (b - a) for a, b in
                                     zip(D.DINO_OUTLINE, np.roll(D.DINO_OUTLINE, -1, 0))]),
             "moons": np.concatenate([np.stack([np.cos(u), np.sin(u)], 1),
                                      np.stack([1 - np.cos(u), 0.5 - np.sin(u)], 1)])}
    for name in ("dino", "moons"):
        nll = RAW[name](far)
        d = t.cdist(t.as_tensor(far), t.as_tensor(curve[name])).min(1).values
        assert t.isfinite(nll).all() and ((nll - d ** 2 / (2 * SIGMA[name] ** 2)).abs() < 30).all()
        very_far = np.array([[1e6, -1e6], [-3e7, 0.0]])  # -log p ~ 1e15: finite, not inf or nan
        assert t.isfinite(RAW[name](very_far)).all() and (RAW[name](very_far) > 1e14).all()
        mean, std = standardisation(name)
        assert t.isfinite(datasets.exact_nll_2d(name)(t.as_tensor((far - mean) / std))).all()
