"""Exact densities of the 2-D datasets: the raw-unit functions of densities.py that the registry
(datasets.SETS_2D) names, and the served ones of datasets.points_2d (its datasets.Exact: nll,
log_given, log_prior, entropy, labels in the standardised units the model sees).

Every set of SETS_2D with an exact density (an nll, or log p(x | y) with log_given) present when
the tests are collected is checked by the generic tests (normalisation, histogram of fresh
samples, Monte Carlo entropy, served = raw plus the log-Jacobian, finite or +inf far away, and for
labelled sets each conditional and Exact.labels). Their per-set domains and tolerances come from
small dicts below with a generic fallback from fresh samples; set-specific tests follow.

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


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """numpy's BLAS on one thread too (the moons' Gauss-Legendre nodes come from a 512 x 512
    eigenproblem at every call: measured 0.08 s on one thread, up to 1.5 s on two of a busy
    machine's)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")  # installed with scikit-learn
    with threadpoolctl.threadpool_limits(1):
        yield

N, SEED = 8000, 42  # the served points these tests standardise like (points_2d's default seed)
# every registered set with an exact density, at collection time
EXACT = [name for name, spec in datasets.SETS_2D.items()
         if spec.nll is not None or spec.log_given is not None]
LABELLED = [name for name in EXACT if datasets.SETS_2D[name].log_given is not None]
SHIPPED = {"dino", "moons", "scg", "line", "circle", "blobs"}  # the project's own

# Smooth densities: raw-unit boxes holding the support plus 10 noise stds, and each set's smallest
# length scale (the noise std; scg: its smaller principal std sqrt(1 + rho), rho < 0). Sets not
# named here (line and circle jump or are singular: their own cell rules below; a set registered
# elsewhere: the generic fallback from fresh samples, `domain`).
SIGMA = {"dino": D.DINO_JITTER, "moons": D.MOONS_NOISE, "blobs": min(D.BLOBS_STDS),
         "scg": math.sqrt(1 + D.SCG_RHO)}
BOX = {"dino": (D.DINO_OUTLINE.min(0) - 10 * D.DINO_JITTER,
                D.DINO_OUTLINE.max(0) + 10 * D.DINO_JITTER),
       "moons": (np.array([-1.3, -0.8]), np.array([2.3, 1.3])),
       "blobs": (np.min(D.BLOBS_MEANS, 0) - 10 * max(D.BLOBS_STDS),
                 np.max(D.BLOBS_MEANS, 0) + 10 * max(D.BLOBS_STDS)),
       "scg": (np.array([-10.0, -10.0]), np.array([10.0, 10.0])),  # 10 marginal stds
       # the rectangle, with histogram bin edges on its edges
       "line": (np.array([-0.6, -1.1]), np.array([0.6, 1.1]))}
# histogram bin widths (raw units) and Gauss-Legendre nodes per bin side
WIDTH = {"dino": 0.2, "moons": 0.1, "line": 0.1, "blobs": 0.2, "scg": 0.2}
NODES = {"line": 2}  # constant on each bin: 2 nodes are exact; others 8
# the tolerance of the generic fallback's normalisation and entropy (a set registered without an
# entry in SIGMA: its box and scale guessed from its samples, so only to ~1e-3)
FALLBACK_MASS_TOL = 1e-3


def spec(name):
    return datasets.SETS_2D[name]


def fresh(name, n, seed, labels=False):
    """n raw points from the generating function itself, with a seed unlike points_2d's 42 (and
    their labels, for a labelled set, with labels=True)."""
    made = spec(name).make(n, np.random.default_rng(seed))
    x, y = made if spec(name).classes else (made, None)
    return (np.asarray(x, dtype=np.float64), y) if labels else np.asarray(x, dtype=np.float64)


def raw_nll(name, n=N):
    """-log p of raw points as the entry defines it: the mixture of log_given and log_prior for a
    labelled set (as points_2d serves it), else its nll."""
    s = spec(name)
    if s.log_given is not None:
        return lambda x: -scipy.special.logsumexp(s.log_given(np.asarray(x, np.float64), n)
                                                  + s.log_prior(n), axis=1)
    return lambda x: s.nll(np.asarray(x, np.float64), n)


def standardisation(name, n=N, seed=SEED):
    """The mean and std points_2d standardised with, recomputed here (numpy sample mean and std,
    ddof=0, of the generator's raw points), or none for a set served as drawn."""
    if not spec(name).standardise:
        return np.zeros(2), np.ones(2)
    x = fresh(name, n, seed)
    return x.mean(0), x.std(0)


def domain(name):
    """(box lo, box hi, smallest length scale) in raw units: the dicts' for the shipped sets, else
    the range of 10^5 fresh samples padded by a quarter of it on each side, and a scale of 1/100
    of its smaller side."""
    if name in SIGMA:
        return (*BOX[name], SIGMA[name])
    x = fresh(name, 10 ** 5, seed=99)
    lo, hi = x.min(0), x.max(0)
    pad = (hi - lo) / 4
    return lo - pad, hi + pad, (hi - lo).min() / 100


def grid(lo, hi, h, offset=0.5):
    axes = [np.arange(a + offset * h, b, h) for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)


def bin_probabilities(nll, lo, width, shape, q=8):
    """Integral of exp(-nll) over each bin of a regular grid of bins (q x q Gauss-Legendre nodes
    per bin), shape `shape` (+ the trailing shape of nll's output, e.g. one per label)."""
    u, w = np.polynomial.legendre.leggauss(q)
    u, w = (u + 1) / 2 * width, w / 2 * width
    corner = [lo[d] + width * np.arange(shape[d]) for d in range(2)]
    px = (corner[0][:, None] + u[None, :]).ravel()
    py = (corner[1][:, None] + u[None, :]).ravel()
    pts = np.stack(np.meshgrid(px, py, indexing="ij"), -1).reshape(-1, 2)
    v = np.exp(-nll(pts))
    p = v.reshape(shape[0], q, shape[1], q, *v.shape[1:])
    return np.einsum("iajb...,a,b->ij...", p, w, w)


def chi_square(prob, counts, n, min_expected=20):
    """Pearson's chi-square of counts against n * prob, bins with fewer than min_expected
    expected counts lumped into one; returns (statistic, degrees of freedom)."""
    expected = n * prob.ravel()
    counts = counts.ravel()
    big = expected >= min_expected
    e = np.append(expected[big], n - expected[big].sum())
    c = np.append(counts[big], n - counts[big].sum())
    return ((c - e) ** 2 / e).sum(), len(e) - 1


def _polar_masses(r_lo, r_hi, q=8, m=64):
    """Integral of the circle's density over the annuli r_lo < |x - c_k| < r_hi around each of the
    16 centres c_k, in polar coordinates (p r is constant in r on a disc, so Gauss-Legendre in r
    and the midpoint rule in angle are exact for the correct density)."""
    centre, _ = D._circle_directions()
    u, w = np.polynomial.legendre.leggauss(q)
    r = r_lo + (u + 1) / 2 * (r_hi - r_lo)
    phi = (np.arange(m) + 0.5) * 2 * np.pi / m
    d = np.stack([np.outer(r, np.cos(phi)), np.outer(r, np.sin(phi))], -1)   # (q, m, 2)
    pts = centre[:, None, None, :] + d[None]                                  # (16, q, m, 2)
    p = np.exp(-D.circle_nll(pts.reshape(-1, 2))).reshape(16, q, m)
    return np.einsum("kqm,q->k", p * r[None, :, None], w * (r_hi - r_lo) / 2) * 2 * np.pi / m


def test_the_shipped_sets_are_all_checked():
    # the generic tests below are parametrised over the registry: the shipped sets are there
    assert SHIPPED <= set(EXACT) and {"moons", "blobs"} <= set(LABELLED)


# --- normalisation: every set ---------------------------------------------------------------

@pytest.mark.parametrize("name", EXACT)
def test_integrates_to_one_and_gives_the_entropy(name):
    exact = datasets.points_2d(name, N)[2]
    _, std = standardisation(name)
    if name == "line":
        # cells of 0.01 tile [-0.6, 0.6] x [-1.1, 1.1] with the rectangle's edges between cells:
        # 100 x 200 cells of density 1/2 inside, none outside
        h = 0.01
        p = np.exp(-D.line_nll(grid(*BOX["line"], h)))
        assert set(np.unique(p).tolist()) == {0.0, 0.5}
        assert p.sum() * h * h == pytest.approx(1, abs=1e-9)
        return
    if name == "circle":
        # the mass within R of the centres, integrated in polar coordinates around each (which
        # tames the 1 / r singularity), is 1 (the rest of the circle: its own test below)
        assert _polar_masses(0, D.CIRCLE_JITTER).sum() == pytest.approx(1, abs=1e-10)
        return
    # rectangle rule on a grid of spacing sigma / 1.7 (not _grid_entropy's sigma or sigma / 2, and
    # shifted): for a density smooth on the scale sigma the error is ~exp(-2 pi^2 1.7^2) ~ 1e-25,
    # so the mass must be 1 to rounding, and -sum p log p h^2 must reproduce the entry's entropy
    # (quadrature or closed form; served: after the log-Jacobian of the standardisation,
    # -log(std_1 std_2)). A set without an entry here: to FALLBACK_MASS_TOL, at two spacings.
    lo, hi, sigma = domain(name)
    tol, ent_tol = (1e-9, 1e-6) if name in SIGMA else (FALLBACK_MASS_TOL, FALLBACK_MASS_TOL)
    for h in ([sigma / 1.7] if name in SIGMA else [sigma, sigma / 2]):
        pts = grid(lo, hi, h, offset=0.3)
        if name in LABELLED:  # raw_nll's mixture, from the one evaluation of log p(x | y)
            given = spec(name).log_given(pts, N)
            nll = -scipy.special.logsumexp(given + spec(name).log_prior(N), axis=1)
        else:
            nll = raw_nll(name)(pts)
        p = np.exp(-nll)
        assert p.sum() * h * h == pytest.approx(1, abs=tol)
        if exact.entropy is not None:
            entropy = (p * nll).sum() * h * h - math.log(std[0] * std[1])
            assert exact.entropy() == pytest.approx(entropy, abs=ent_tol)
        if name in LABELLED:
            # each label's density p(x | y) integrates to one too, and the prior sums to one
            assert np.exp(given).sum(0) * h * h == pytest.approx(np.ones(spec(name).classes),
                                                                  abs=tol)
    if name in LABELLED:
        assert np.exp(exact.log_prior).sum() == pytest.approx(1, abs=1e-12)


def test_circle_vanishes_off_the_discs():
    # the lattice gives the axes and diagonals 2 / 24 each, the 8 other directions 1 / 24
    R = D.CIRCLE_JITTER
    mass = _polar_masses(0, R)
    assert sorted(np.round(mass * 24, 9)) == [1.0] * 8 + [2.0] * 8
    # nothing in the annuli R < |x - c_k| < 2 R, and nothing on a grid away from the discs
    assert (_polar_masses(R * (1 + 1e-9), 2 * R) == 0).all()
    pts = grid((-1.2, -1.2), (1.2, 1.2), 0.01)
    off = np.linalg.norm(pts[:, None] - D._circle_directions()[0], axis=-1).min(1) >= R
    nll = D.circle_nll(pts)
    assert off.sum() > 0 and (nll[off] == math.inf).all() and np.isfinite(nll[~off]).all()


# --- against fresh samples: every set -------------------------------------------------------

# a density slightly off that the histogram test must reject (its power): (attribute of
# densities.py, its perturbed value)
PERTURBED = {"dino": ("DINO_JITTER", 1.05 * D.DINO_JITTER),
             "moons": ("MOONS_NOISE", 1.05 * D.MOONS_NOISE),
             "blobs": ("BLOBS_STDS", tuple(1.05 * s for s in D.BLOBS_STDS))}


def _histogram_test(name, n, seed):
    """(statistic, dof) of Pearson's chi-square of n fresh samples (with their labels, for a
    labelled set: cells bin x label) against the density's bin probabilities, and a function
    recomputing the statistic from the density as it is then (for the power check)."""
    s = spec(name)
    if name in BOX:
        lo, hi = BOX[name]
        width = WIDTH[name]
    else:
        lo, hi, _ = domain(name)
        width = (hi - lo).min() / 60
    shape = tuple(np.ceil((hi - lo) / width - 1e-9).astype(int))
    edges = [lo[d] + width * np.arange(shape[d] + 1) for d in range(2)]
    x, y = fresh(name, n, seed, labels=True)
    q = NODES.get(name, 8)
    if s.log_given is not None:
        counts = np.stack([np.histogram2d(x[y == k, 0], x[y == k, 1], bins=edges)[0]
                           for k in range(s.classes)], -1)

        def prob():  # p(x | k) p(k) over each bin
            return bin_probabilities(lambda v: -(s.log_given(v, N) + s.log_prior(N)), lo,
                                     width, shape, q)
    else:
        counts = np.histogram2d(x[:, 0], x[:, 1], bins=edges)[0]

        def prob():
            return bin_probabilities(raw_nll(name), lo, width, shape, q)
    p = prob()
    return (*chi_square(p, counts, n), lambda: chi_square(prob(), counts, n)[0], p)


# the slow tier's: those whose bin probabilities take seconds (dino's 34 segments, moons' 1024
# quadrature nodes, at ~10^5 points each)
SLOW_HISTOGRAM = {"dino", "moons"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_HISTOGRAM else [])
    for name in EXACT if name != "circle"])  # circle: by direction and radius, below
def test_matches_a_histogram_of_fresh_samples(name, monkeypatch):
    # bin probabilities (the density integrated over each bin, 8 x 8 Gauss-Legendre nodes: bins
    # are 5 and 3.3 noise stds wide for dino and moons, quadrature error < 3e-6 relative against
    # 16 x 16 nodes, far below the >= 2% counting noise; measured 3e-15 for blobs, 1e-14 for scg;
    # line: 2 x 2, exact for its constant bins) against the counts of 10^6 fresh samples
    # (labelled sets: per label, the bins of p(x | k) p(k)): Pearson's chi-square with p > 1e-4
    # (make_moons spaces its points evenly along the arcs, so its counts fluctuate a little less
    # than multinomial ones: its chi-square is on the low side) ...
    n = 10 ** 6
    stat, dof, again, prob = _histogram_test(name, n, seed=11)
    assert dof > 150 and scipy.stats.chi2.sf(stat, dof) > 1e-4
    if name == "line":
        # 200 bins of probability 0.1^2 / 2 inside (from line_nll), none outside
        assert (np.isclose(prob, 0.005, rtol=1e-12) | (prob == 0)).all() and (prob > 0).sum() == 200
        assert dof == 200
    # ... and the test has power: a density whose noise std is 5% too large fails it badly
    # (measured: p ~ 1e-69 for dino, far smaller for moons; 2% already gives p ~ 0.02, 1e-13)
    if name in PERTURBED:
        monkeypatch.setattr(D, *PERTURBED[name])
        assert scipy.stats.chi2.sf(again(), dof) < 1e-10


def test_circle_matches_fresh_samples_by_direction_and_radius():
    # cells: the 16 discs x 5 annuli of width R / 5; their probabilities integrated from
    # circle_nll in polar coordinates, against the counts of 10^6 fresh samples (each assigned
    # to its nearest centre). The radius is U(0, R), so each annulus holds 1/5 of a disc's mass.
    n, R = 10 ** 6, D.CIRCLE_JITTER
    prob = np.stack([_polar_masses(R * i / 5, R * (i + 1) / 5) for i in range(5)], 1)  # (16, 5)
    assert np.allclose(prob / prob.sum(1, keepdims=True), 0.2, rtol=0, atol=1e-9)
    x = t.as_tensor(fresh("circle", n, seed=13))
    r, k = t.cdist(x, t.as_tensor(D._circle_directions()[0])).min(1)
    assert (r < R).all()
    counts = np.bincount((k * 5 + (r / R * 5).long()).numpy(), minlength=80).reshape(16, 5)
    stat, dof = chi_square(prob, counts, n)
    assert dof == 80 and scipy.stats.chi2.sf(stat, dof) > 1e-4


# sample sizes of the Monte Carlo entropy (default 10^5)
MC_SIZE = {"moons": 5 * 10 ** 4, "line": 10 ** 4}


@pytest.mark.parametrize("name", EXACT)
def test_monte_carlo_entropy(name):
    # the mean of -log p_std over fresh samples, standardised as points_2d's points are,
    # estimates the entropy: within 4 standard errors of the served entropy (quadrature for
    # dino, moons and blobs, closed forms for scg, line and circle). Line: -log p is constant,
    # so exactly equal.
    exact = datasets.points_2d(name, N)[2]
    if exact.entropy is None:
        pytest.skip(f"{name} has no entropy")
    n = MC_SIZE.get(name, 10 ** 5)
    mean, std = standardisation(name)
    nll = exact.nll((fresh(name, n, seed=21) - mean) / std)
    assert np.isfinite(nll).all()
    stderr = nll.std() / math.sqrt(n)
    assert abs(nll.mean() - exact.entropy()) <= 4 * stderr + 1e-12


def test_closed_form_entropies():
    # line: log(area 2) minus log(std_1 std_2); circle: H(w) + log(2 pi R^2) - 1 - log(std_1 std_2)
    # with H(w) = 8 (1/12) log 12 + 8 (1/24) log 24 (16 directions, axes and diagonals doubled)
    _, std = standardisation("line")
    assert datasets.points_2d("line", N)[2].entropy() == pytest.approx(
        math.log(2) - math.log(std[0] * std[1]), abs=1e-12)
    _, std = standardisation("circle")
    h_w = 2 / 3 * math.log(12) + 1 / 3 * math.log(24)
    expected = h_w + math.log(2 * math.pi * D.CIRCLE_JITTER ** 2) - 1 - math.log(std[0] * std[1])
    assert datasets.points_2d("circle", N)[2].entropy() == pytest.approx(expected, abs=1e-12)
    assert datasets.points_2d("scg", N)[2].entropy() == D.SCG_ENTROPY


# --- the served functions: every set --------------------------------------------------------

@pytest.mark.parametrize("name", EXACT)
def test_served_is_raw_plus_log_jacobian_and_vectorised(name):
    mean, std = standardisation(name)
    served, labels, exact = datasets.points_2d(name, N)
    # the standardisation recomputed here is the one points_2d applied
    raw_points, raw_labels = fresh(name, N, SEED, labels=True)
    assert np.array_equal(served, ((raw_points - mean) / std).astype(np.float32))
    assert raw_labels is None or np.array_equal(labels, raw_labels)
    x = np.concatenate([fresh(name, 500, seed=7), [[0.0, 0.0], [5.0, -3.0], [0.4, 0.9]]])
    y = (x - mean) / std
    got = exact.nll(y)
    assert got.dtype == np.float64 and got.shape == (len(x),)
    # -log p_std(y) = -log p_raw(mean + std y) - log(std_1 std_2)
    expected = raw_nll(name)(x) - math.log(std[0] * std[1])
    assert np.array_equal(np.isinf(got), np.isinf(expected)) and not np.isnan(got).any()
    fin = np.isfinite(expected)
    assert np.allclose(got[fin], expected[fin], rtol=1e-12, atol=1e-9)
    # one by one as in the batch
    one_by_one = np.concatenate([exact.nll(y[i:i + 1]) for i in (0, 1, 2, len(x) - 2)])
    assert np.allclose(one_by_one, got[[0, 1, 2, len(x) - 2]], rtol=1e-12, atol=0)
    # another n and seed: that dataset's own standardisation (and, for moons, its n)
    mean7, std7 = standardisation(name, 500, 7)
    got7 = datasets.points_2d(name, 500, seed=7)[2].nll((x - mean7) / std7)
    expected7 = raw_nll(name, 500)(x) - math.log(std7[0] * std7[1])
    assert np.array_equal(np.isinf(got7), np.isinf(expected7))
    fin7 = np.isfinite(expected7)
    assert np.allclose(got7[fin7], expected7[fin7], rtol=1e-12, atol=1e-9)
    if name in LABELLED:
        # log p_std(y | k) = log p_raw(mean + std y | k) + log(std_1 std_2), prior as given
        given = exact.log_given(y)
        assert given.shape == (len(x), spec(name).classes) and given.dtype == np.float64
        assert np.allclose(given, spec(name).log_given(x, N) + math.log(std[0] * std[1]),
                           rtol=1e-12, atol=1e-9)
        assert np.array_equal(exact.log_prior, spec(name).log_prior(N))
    else:
        assert exact.log_given is None and exact.labels(y) is None


@pytest.mark.parametrize("name", LABELLED)
def test_labels_by_bayes_rule(name):
    # Exact.labels: -log p(x | k), i(x; k) = log p(k | x) - log p(k) and whether Bayes'
    # classifier argmax_k p(k | x) picks k, from log_given and log_prior by Bayes' rule here
    x, y, exact = datasets.points_2d(name, 1000)
    log_given = exact.log_given(x)
    joint = log_given + exact.log_prior
    posterior = joint - scipy.special.logsumexp(joint, axis=1, keepdims=True)
    nll_given, info, right = exact.labels(x)
    assert np.allclose(nll_given, -log_given, rtol=0, atol=0)
    assert np.allclose(info, posterior - exact.log_prior, rtol=1e-12, atol=1e-12)
    assert np.array_equal(right, np.eye(len(exact.log_prior))[posterior.argmax(1)])
    # the mixture is the marginal: -log p(x) = -logsumexp_k (log p(x | k) + log p(k))
    assert np.allclose(exact.nll(x), -scipy.special.logsumexp(joint, axis=1), rtol=1e-12, atol=0)
    # the information averages to a nonnegative mutual information; and per label as a column
    assert (np.exp(posterior) * info).sum(1).min() >= -1e-12
    picked = exact.labels(x, y)
    for got, every in zip(picked, (nll_given, info, right)):
        assert np.array_equal(got, every[np.arange(len(y)), y])


@pytest.mark.parametrize("name", EXACT)
def test_far_away_is_finite_or_inf_never_nan(name):
    # far from the data (3 to 3e6 half-widths of the set's box from its centre) the density is 0
    # or underflows: -log p is +inf (a bounded support) or a finite number above its value at any
    # of 1000 fresh samples, never nan or -inf, in raw and served units
    lo, hi = BOX[name] if name in BOX else domain(name)[:2]
    half = (hi - lo) / 2
    far = (lo + hi) / 2 + half * np.array([[3.0, 3.0], [-5.0, 1.0], [0.0, -4.0], [10.0, 0.0],
                                           [1e5, -1e5], [-3e6, 0.0]])
    near = fresh(name, 1000, seed=5)
    mean, std = standardisation(name)
    exact = datasets.points_2d(name, N)[2]
    for nll, at in ((raw_nll(name), far), (exact.nll, (far - mean) / std)):
        top = nll(near if nll is not exact.nll else (near - mean) / std)
        top = top[np.isfinite(top)].max()
        got = nll(at)
        assert not np.isnan(got).any() and (got > top).all(), got


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.points_2d("spiral", N)


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
    assert np.allclose(D.dino_nll(x)[keep], nll[keep], rtol=0, atol=1e-7)


def _moons_nll(x, nodes):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(D, "MOONS_NODES", nodes)
        return -scipy.special.logsumexp(D.moons_log_given(x) + D.moons_log_prior(), 1)


def test_moons_quadrature_converges():
    # doubling the Gauss-Legendre nodes (512 -> 1024) changes -log p by < 1e-8 nats on data
    # points and out to a distance ~5 from the arcs
    rng = np.random.default_rng(5)
    x = np.concatenate([fresh("moons", 2000, seed=6), rng.uniform(-5, 5, (200, 2))])
    assert np.allclose(D.moons_nll(x), _moons_nll(x, 512), rtol=0, atol=0)  # 512: the default
    assert np.abs(_moons_nll(x, 512) - _moons_nll(x, 1024)).max() < 1e-8


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

    def diff(x):
        return D.moons_nll(x) - _moons_finite_mixture_nll(x)
    assert np.allclose(diff(bulk), -math.log(4000 / 3999), rtol=0, atol=1e-7)
    end_gap = math.log(3999 / 4000) + math.log1p(h / (2 * D.MOONS_NOISE * math.sqrt(math.pi / 2)))
    assert np.allclose(diff(ends), end_gap, rtol=0, atol=1e-4)
    # averaged over the default validation split (the raw points of points_2d's, split as
    # datamodules.points splits them) the two differ by 7e-5 nats, well below any model's gap
    _, val = datasets.split(8000, 0.1, seed=0)
    assert abs(diff(fresh("moons", 8000, seed=42)[val]).mean()) < 2e-4


# --- the labelled set blobs against scipy ---------------------------------------------------

def blobs_scipy_log_given(x):
    """log p(x | k) for the three components, (m, 3), from make_blobs' definition (component k
    is BLOBS_MEANS[k] + BLOBS_STDS[k] * standard normal) through scipy, not densities.py."""
    return np.stack([scipy.stats.multivariate_normal(m, s ** 2 * np.eye(2)).logpdf(x)
                     for m, s in zip(D.BLOBS_MEANS, D.BLOBS_STDS)], 1)


def blobs_scipy_nll(x):
    return -scipy.special.logsumexp(blobs_scipy_log_given(x) + np.log(D.BLOBS_WEIGHTS), axis=1)


def test_blobs_densities_raw_and_served():
    # points from the generator and far off it, in raw units
    x = np.concatenate([fresh("blobs", 500, seed=8), [[0.0, 0.0], [5.0, -3.0], [-4.0, 6.0]]])
    expected = blobs_scipy_log_given(x)
    got = D.blobs_log_given(x)
    assert got.dtype == np.float64 and got.shape == (len(x), 3)
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-9)
    # the prior is make_blobs' component weights
    assert np.allclose(D.blobs_log_prior(), np.log(D.BLOBS_WEIGHTS), rtol=0, atol=1e-15)
    # served points: the standardisation recomputed here is the one points_2d applied ...
    mean, std = standardisation("blobs")
    served, _, exact = datasets.points_2d("blobs", N)
    assert np.array_equal(served, ((fresh("blobs", N, SEED) - mean) / std).astype(np.float32))
    # ... and the served densities are the raw ones plus the log-Jacobian: log p_std(y | k) =
    # log p_raw(mean + std y | k) + log(std_1 std_2), -log p_std(y) the same for the marginal
    y = (x - mean) / std
    log_jacobian = math.log(std[0] * std[1])
    given = exact.log_given(y)
    assert given.dtype == np.float64 and given.shape == (len(x), 3)
    assert np.allclose(given, expected + log_jacobian, rtol=1e-12, atol=1e-9)
    nll = exact.nll(y)
    assert nll.shape == (len(x),)
    assert np.allclose(nll, blobs_scipy_nll(x) - log_jacobian, rtol=1e-12, atol=1e-9)


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
    assert datasets.points_2d("blobs", N)[2].entropy() == pytest.approx(expected, abs=1e-12)


# --- outside the support --------------------------------------------------------------------

def test_outside_the_support():
    # line and circle: +inf off their supports (in raw and served units)
    off_line = np.array([[0.51, 0.0], [0.0, -1.01], [3.0, 3.0]])
    assert (D.line_nll(off_line) == math.inf).all()
    mean, std = standardisation("line")
    assert (datasets.points_2d("line", N)[2].nll((off_line - mean) / std) == math.inf).all()
    R = D.CIRCLE_JITTER
    off_circle = np.array([[0.0, 0.0], [1 + 1.01 * R, 0.0], [math.cos(0.2), math.sin(0.2)],
                           [5.0, 0.0]])
    assert (D.circle_nll(off_circle) == math.inf).all()
    assert math.isfinite(D.circle_nll(np.array([[1 + 0.99 * R, 0.0]])).item())
    mean, std = standardisation("circle")
    assert (datasets.points_2d("circle", N)[2].nll((off_circle - mean) / std) == math.inf).all()
    # dino and moons: far away the density underflows float64 but -log p stays finite, close to
    # d^2 / (2 sigma^2) at distance d from the curve (the rest is a log of a modest factor)
    far = np.array([[30.0, 30.0], [-50.0, 7.0], [4.0, 20.0], [100.0, -1.0]])
    u = np.linspace(0, np.pi, 20001)
    curve = {"dino": np.concatenate([a + np.linspace(0, 1, 2000)[:, None] * (b - a) for a, b in
                                     zip(D.DINO_OUTLINE, np.roll(D.DINO_OUTLINE, -1, 0))]),
             "moons": np.concatenate([np.stack([np.cos(u), np.sin(u)], 1),
                                      np.stack([1 - np.cos(u), 0.5 - np.sin(u)], 1)])}
    for name in ("dino", "moons"):
        nll = raw_nll(name)(far)
        d = np.linalg.norm(far[:, None] - curve[name][None], axis=-1).min(1)
        assert np.isfinite(nll).all() and (np.abs(nll - d ** 2 / (2 * SIGMA[name] ** 2)) < 30).all()
        very_far = np.array([[1e6, -1e6], [-3e7, 0.0]])  # -log p ~ 1e15: finite, not inf or nan
        assert np.isfinite(raw_nll(name)(very_far)).all() and (raw_nll(name)(very_far) > 1e14).all()
        mean, std = standardisation(name)
        assert np.isfinite(datasets.points_2d(name, N)[2].nll((far - mean) / std)).all()
