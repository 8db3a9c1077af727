"""Tests of the direct estimate for data on a grid, -log P(x) = 1/2 Int E_eps ||eps - eps_hat||^2 da
(DiffusionModel.nll_discrete_points), its closed-form tails, rounding to the grid, and the
discrete-limit conversions.

Exact answers come from distributions on a few grid points (tests/analytic.py DiscreteAtoms): the
posterior over atoms given z is a softmax, so the optimal denoiser is closed form and
-log P(x_m) = -log pi_m. Statistical checks are seeded and pooled as in tests/test_estimators.py
(tests/checks.py); expected values that are not -log pi say where they come from.
"""
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch as t

import estimators
import utils
from denoisers import GridRounding
from diffusionmodel import DiffusionModel
from utils import Grid
from tests.analytic import (DiscreteAtoms, GaussianMixture, Zero, discretised_gaussian,
                            gaussian)
from tests.checks import (assert_unbiased_and_calibrated, fit_ensemble, gen, paired_difference,
                          repeated, rounded, with_denoiser)


pytestmark = pytest.mark.usefixtures("one_thread")


def atoms_1d():
    """Four atoms on the 5-level grid -1 + k/2 (0.5 is empty), unequal weights."""
    return DiscreteAtoms([[-1.0], [-0.5], [0.0], [1.0]], [0.1, 0.4, 0.2, 0.3]), Grid(0.5, -1., 5)


def atoms_2d():
    """Five atoms on the grid -1 + k/4 in 2-D, two of them neighbours."""
    return DiscreteAtoms([[-1, -1], [-0.5, 0.25], [0, 0], [0.25, 0], [0.75, -0.5]],
                         [0.15, 0.25, 0.3, 0.1, 0.2]), Grid(0.25, -1., 9)


def moment_reference(dist):
    """The Gaussian reference with the exact mean and covariance of an atom distribution."""
    atoms, p = dist.support()
    x = atoms.flatten(1)
    mean = p @ x
    cov = (p[:, None] * (x - mean)).T @ (x - mean)
    ref = utils.GaussianReference(x.shape[1]).double()
    ref.mean, (ref.eigvals, ref.eigvecs) = mean, t.linalg.eigh(cov)
    return ref


def exact_model(dist, reference="moments", **kwargs):
    dm = DiffusionModel(dist, x_shape=dist.x_shape, **kwargs).double()
    if reference == "moments":
        dm.reference.load_state_dict(moment_reference(dist).state_dict())
    return dm


def smoothed(dist, std=0.15):
    """An imperfect, continuous denoiser for atom data: the optimal denoiser of the atoms blurred by
    N(0, std^2 I). It never resolves the grid, so its error tends to d at high SNR."""
    atoms, p = dist.support()
    d = atoms.flatten(1).shape[1]
    covs = std ** 2 * t.eye(d, dtype=t.float64).expand(len(p), d, d)
    return GaussianMixture(p, atoms.flatten(1), covs)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["moments", "standard"])
@pytest.mark.parametrize("make", [atoms_1d, atoms_2d])
def test_discrete_estimate_is_exact_on_atoms(make, reference):
    # the optimal denoiser of the atoms: E[estimate] = -log pi_m (the tails at the default range
    # +-12 are below 1e-5, test_tails_are_negligible_with_the_default_range)
    dist, grid = make()
    dm = exact_model(dist, reference)
    x, _ = dist.support()
    est, se = repeated(dm.nll_discrete_points, x, 100, grid=grid, seed=1)
    assert_unbiased_and_calibrated(est, se, dist.nll(x))


def test_discrete_limit_on_a_fine_grid():
    # N(0.1, 0.5^2) binned with delta = 0.05 (10 bins per standard deviation): the exact mass of a
    # bin is p(x) delta (1 + O(delta^2)), so -log P(x) = -log p(x) - log delta to 2e-3 here, far
    # below the estimator's resolution, and the direct discrete estimate must reproduce it.
    delta = 0.05
    dist = discretised_gaussian(0.1, 0.5, delta, lo=-1.)
    dm = exact_model(dist)
    x = t.tensor([[-0.9], [-0.4], [0.1], [0.5], [1.3]], dtype=t.float64)
    limit = utils.discrete_limit_nats(-t.distributions.Normal(0.1, 0.5).log_prob(x[:, 0]), delta, 1)
    assert (dist.nll(x) - limit).abs().max() < 2e-3
    est, se = repeated(dm.nll_discrete_points, x, 40, grid=Grid(delta), seed=2)
    assert_unbiased_and_calibrated(est, se, limit, band=(0.6, 1.6))
    # the continuous estimate of the undiscretised Gaussian, converted, says the same
    cont = DiffusionModel(gaussian([0.1], [[0.25]]), x_shape=(1,)).double()
    nll_c, se_c = cont.nll_points(x, 256, seed=3)
    converted = utils.discrete_limit_nats(nll_c, delta, 1)
    gap = est.mean(0) - converted
    assert (gap.abs() < 4.5 * (se.pow(2).mean(0) / 40 + se_c ** 2).sqrt()).all(), gap
    # and in bits/dim the conversion is + log2(1 / delta) (+6.99 for 8-bit data in [-1, 1])
    bpd = utils.nats_to_bpd(nll_c, 1)
    assert t.allclose(utils.nats_to_bpd(converted, 1), bpd + math.log2(1 / delta))
    assert utils.nats_to_bpd(utils.discrete_limit_nats(0., 2 / 255, 3072), 3072) == pytest.approx(
        math.log2(127.5))


def test_dequantize():
    x = -1 + 2 / 255 * t.randint(0, 256, (2000, 3), generator=gen(0)).double()
    state = t.random.get_rng_state()
    y = utils.dequantize(x, 2 / 255, seed=1, index=t.arange(2000))
    assert t.equal(state, t.random.get_rng_state())  # no global random numbers
    # the noise of a sample is named by (seed, its index): the same in any batch
    assert t.equal(y[700:710], utils.dequantize(x[700:710], 2 / 255, seed=1, index=700 + t.arange(10)))
    assert not t.equal(y[:10], utils.dequantize(x[:10], 2 / 255, seed=2, index=t.arange(10)))
    u = (y - x) / (2 / 255) + 0.5          # must be U(0, 1)
    assert u.min() > 0 and u.max() < 1
    assert scipy.stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Tails of the integral
# ---------------------------------------------------------------------------------------------
def expected_gaussian_error(ref, x, a):
    """E_eps ||eps - eps_G(z, a)||^2 = ||I - H||_F^2 + e^a ||H (x - mu)||^2, H = U diag(1 / (1 +
    lambda e^a)) U^T: the textbook form, independent of the code under test."""
    d = ref.d
    h = ref.eigvecs @ t.diag(1 / (1 + ref.eigvals * math.exp(a))) @ ref.eigvecs.T
    return ((t.eye(d, dtype=t.float64) - h) ** 2).sum().item() + math.exp(a) * (
        h @ (x - ref.mean)).pow(2).sum().item()


def test_lower_tail_is_the_gaussian_error_integral():
    # GaussianReference.error_integral against scipy quadrature of the textbook integrand
    ref = moment_reference(atoms_2d()[0])
    for x in (t.tensor([0.3, -0.7], dtype=t.float64), t.tensor([-1., 1.], dtype=t.float64)):
        for lo, hi in ((-np.inf, -3.), (-np.inf, 2.), (-2., 5.)):
            quad = scipy.integrate.quad(lambda a: expected_gaussian_error(ref, x, a),
                                        max(lo, -80), hi, epsabs=1e-12, limit=200)[0]
            assert ref.error_integral(x[None], lo, hi).item() == pytest.approx(quad, abs=1e-9)


def rounding_error(x, a, grid):
    """E_eps e^a (x_R - x)^2 for one coordinate, x_R the grid value nearest x + e^{-a/2} eps: an
    exact sum over the decoded values (normal cdf differences), clamped to `levels` values or on a
    grid wide enough to be unbounded."""
    delta, lo, levels = grid
    sigma = math.exp(-a / 2)
    k = np.arange(levels) if levels else np.arange(-200, 200)
    g = lo + delta * k
    edges = np.concatenate([[-np.inf], (g[:-1] + g[1:]) / 2, [np.inf]])
    p = np.diff(scipy.stats.norm.cdf((edges - x) / sigma))
    return math.exp(a) * (p * (g - x) ** 2).sum()


def test_rounding_tail_matches_quadrature():
    for grid in (Grid(0.25, -1., 9), Grid(0.25, -1.)):
        for x in (-1., -0.75, 0., 1.):
            for a_hi in (2., 5.):
                quad = 0.5 * scipy.integrate.quad(lambda a: rounding_error(x, a, grid),
                                                  a_hi, 60, epsabs=1e-13, limit=400)[0]
                got = utils.rounding_tail(t.tensor([[x]], dtype=t.float64), grid, a_hi)
                assert got.item() == pytest.approx(quad, rel=1e-8, abs=1e-14)
    # per sample: the sum over coordinates
    x = t.tensor([[-1., 0.], [0.5, 1.]], dtype=t.float64)
    both = utils.rounding_tail(x, Grid(0.25, -1., 9), 3.)
    single = utils.rounding_tail(x.view(4, 1), Grid(0.25, -1., 9), 3.).view(2, 2).sum(1)
    assert t.allclose(both, single)


def test_grid_resolved_logsnr():
    # the log SNR where one interior coordinate's rounding tail falls to the requested level: for
    # 8-bit data 14.2, while the default range's end, 12, leaves 0.38 nats (0.55 bits) per dimension
    one = t.zeros(1, 1, dtype=t.float64)
    for delta, tail in ((2 / 255, 1e-5), (2 / 16, 1e-5), (0.5, 1e-8)):
        a = utils.grid_resolved_logsnr(delta, tail)
        assert utils.rounding_tail(one, Grid(delta, 0.), a).item() == pytest.approx(tail, rel=1e-6)
    # 14.18 is where the j = 1 term below falls to 1e-5 (the loop above checks the level itself);
    # pinned because the docs quote it
    assert utils.grid_resolved_logsnr(2 / 255) == pytest.approx(14.18, abs=0.01)
    # by hand: r0 = delta e^(12/2) = 3.164; of the two-sided sum only j = 1 (c = 1/2) matters:
    # 2 * 1/2 * (4 / c) G(r0 / 2), G(u) = ((1 - u^2) Q(u) + u phi(u)) / 2 at u = 1.582:
    # Q = 0.0568, phi = 0.1141, G = 0.0476, so 8 * 0.0476 = 0.381 (j = 2 adds < 1e-5)
    assert utils.rounding_tail(one, Grid(2 / 255, 0.), 12.).item() == pytest.approx(0.381, abs=1e-3)


def test_hard_rounding_of_z_has_the_closed_form_error():
    # GridRounding(hard) around a zero noise predictor (x_hat = z / sqrt(s(a))) is the decoder
    # whose error utils.rounding_tail integrates: its Monte Carlo mean error at fixed a must match
    # rounding_error within 5 standard errors
    class Zero(t.nn.Module):
        def forward(self, z, logsnr):
            return t.zeros_like(z)
    grid = Grid(0.25, -1., 9)
    hard = GridRounding(Zero(), grid, "hard")
    for x0, a in ((-1., 3.), (0.25, 4.), (0.5, 6.)):
        x = t.full((40000, 1), x0, dtype=t.float64)
        eps = t.randn(x.shape, generator=gen(4), dtype=t.float64)
        err = estimators.sq_error(hard, x, t.full((40000,), a, dtype=t.float64), eps)
        exact = rounding_error(x0, a, grid)
        assert abs(err.mean().item() - exact) < 5 * err.std().item() / math.sqrt(len(err))


def exact_error(dist, x, a, nodes=4001):
    """E_eps ||eps - eps_hat(z, a)||^2 for a 1-D atom distribution and its optimal denoiser, by the
    trapezoid rule over eps in [-10, 10]."""
    e = t.linspace(-10, 10, nodes, dtype=t.float64)
    w = t.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi) * (e[1] - e[0])
    aa = t.full((nodes,), a, dtype=t.float64)
    z = math.sqrt(1 / (1 + math.exp(-a))) * x + math.sqrt(1 / (1 + math.exp(a))) * e
    return (w * (e - dist(z.view(-1, 1), aa)[:, 0]) ** 2).sum().item()


def tail_terms(model, x, grid):
    """The closed-form tails nll_discrete_points adds, each (B,): below its range the reference's
    error, above it hard rounding's (docs/maths.md)."""
    lo, hi = model.proposal.range
    return 0.5 * model.reference.error_integral(x, -math.inf, lo), utils.rounding_tail(x, grid, hi)


def exact_tails(dist, x, lo, hi):
    """1/2 the integral of exact_error below lo and above hi (scipy quadrature)."""
    f = lambda a: exact_error(dist, x, a)  # noqa: E731
    return (0.5 * scipy.integrate.quad(f, -40, lo, limit=200, epsabs=1e-10)[0],
            0.5 * scipy.integrate.quad(f, hi, 40, limit=200, epsabs=1e-10)[0])


def test_tails_are_negligible_with_the_default_range():
    # discrete estimate, default range +-12: both closed-form tails are below 1e-5 nats, and adding
    # them changes the estimate by exactly that
    dist, grid = atoms_1d()
    dm = exact_model(dist)
    x, _ = dist.support()
    below, above = tail_terms(dm, x, grid)
    assert (below < 1e-5).all() and (above < 1e-12).all()
    with_tails = dm.nll_discrete_points(x, grid, 64, seed=0)[0]
    without = dm.nll_discrete_points(x, grid, 64, seed=0, tails=False)[0]
    assert t.allclose(with_tails - without, below + above, rtol=0, atol=1e-14)
    # The continuous control-variate estimator needs no correction: for a 1-D Gaussian mixture and
    # its exact denoiser, with the reference matched to the mixture's moments, the gap integrand
    # (quadrature over a, trapezoid over eps) integrates to under 1e-12 nats below -12 (both
    # errors are e^a ||x - E x||^2 + the same O(e^2a)) and to under 3e-4 above +12 (the gap decays
    # like e^-a there), below the resolution of any estimate in these tests.
    mix = GaussianMixture([0.3, 0.7], [[-1.0], [0.8]], [[[0.2]], [[0.05]]])
    mean = 0.3 * -1.0 + 0.7 * 0.8
    var = 0.3 * 0.2 + 0.7 * 0.05 + 0.3 * (-1.0 - mean) ** 2 + 0.7 * (0.8 - mean) ** 2
    ref = utils.GaussianReference(1).double()
    ref.mean, ref.eigvals = t.tensor([mean], dtype=t.float64), t.tensor([var], dtype=t.float64)
    for x0 in (-1.5, 0.0, 0.8):
        def gap(a):
            return exact_error(mix, x0, a) - expected_gaussian_error_1d(ref, x0, a)
        below, above = (0.5 * scipy.integrate.quad(gap, lo, hi, limit=200, epsabs=1e-13)[0]
                        for lo, hi in ((-40, -12), (12, 40)))
        assert abs(below) < 1e-12 and abs(above) < 3e-4, (below, above)


def expected_gaussian_error_1d(ref, x, a):
    h = 1 / (1 + ref.eigvals.item() * math.exp(a))
    return (1 - h) ** 2 + math.exp(a) * (h * (x - ref.mean.item())) ** 2


def test_tails_are_right_when_the_range_is_cut_short():
    # Range [-3, 3.5]: the integral left outside is ~0.02 below and ~0.3 above, many standard
    # errors. Expected values, from quadrature of the exact denoiser's error (exact_tails):
    # - the lower tail (the Gaussian's error integral) is the exact one to 1%: both errors are
    #   e^a ||x - E x||^2 to leading order;
    # - the upper tail (hard rounding of z) is an upper bound on the exact one in expectation;
    # - E[estimate] = -log P(x) - exact tails + closed-form tails, within the estimator's error,
    #   while without tails the estimate is off by the exact tails.
    dist, grid = atoms_1d()
    dm = exact_model(dist, logsnr_loc=0.25, logsnr_scale=1.3, clip=2.5)
    x, p = dist.support()
    exact = t.tensor([exact_tails(dist, v.item(), -3., 3.5) for v in x[:, 0]], dtype=t.float64)
    below, above = tail_terms(dm, x, grid)
    assert t.allclose(below, exact[:, 0], rtol=0.01)
    assert (p * above).sum() >= (p * exact[:, 1]).sum()
    est, se = repeated(dm.nll_discrete_points, x, 100, grid=grid, seed=5)
    bare, bare_se = repeated(dm.nll_discrete_points, x, 100, grid=grid, seed=5, tails=False)
    truth = dist.nll(x)
    assert_unbiased_and_calibrated(est, se, truth - exact.sum(1) + below + above)
    assert_unbiased_and_calibrated(bare, bare_se, truth - exact.sum(1))
    # the tails do matter: against -log P(x) itself the bare estimate is far off
    z = (bare.mean(0) - truth) / (bare_se.pow(2).mean(0) / 100).sqrt()
    assert (z ** 2).sum() > 1000, z
    # for data uniform on the grid the rounding tail is tight: within 1.4x of the exact one
    uniform = DiscreteAtoms(t.linspace(-1, 1, 5).view(-1, 1), t.ones(5))
    ux, up = uniform.support()
    for a_hi in (3.5, 5.):
        exact_above = sum(pi * exact_tails(uniform, v.item(), -12., a_hi)[1]
                          for v, pi in zip(ux[:, 0], up))
        bound = (up * utils.rounding_tail(ux, grid, a_hi)).sum().item()
        assert exact_above <= bound <= 1.4 * exact_above


# ---------------------------------------------------------------------------------------------
# Rounding to the grid
# ---------------------------------------------------------------------------------------------
def test_soft_rounding_of_z_is_the_optimal_denoiser_of_a_uniform_grid():
    # eps_hat = 0 means x_hat = z / sqrt(s(a)) = x + e^{-a/2} eps, and soft rounding is the
    # posterior mean over grid values under a uniform prior: exactly the optimal
    # denoiser of the uniform distribution on the 5-level grid (DiscreteAtoms), at every SNR
    uniform = DiscreteAtoms(t.linspace(-1, 1, 5).view(-1, 1), t.ones(5))
    soft = GridRounding(Zero(), Grid(0.5, -1., 5), "soft")
    z = 2.5 * t.randn(400, 1, generator=gen(0), dtype=t.float64)
    a = t.linspace(-8, 12, 400, dtype=t.float64)
    assert t.allclose(soft(z, a), uniform(z, a), rtol=1e-9, atol=1e-9)
    # hard rounding snaps x_hat to the nearest level within range
    hard = GridRounding(Zero(), Grid(0.5, -1., 5), "hard")
    a = t.full((4,), 30., dtype=t.float64)
    z = t.tensor([[-3.], [-0.3], [0.2], [0.8]], dtype=t.float64) * t.sigmoid(a[:1]).sqrt()
    x_r = (z - t.sigmoid(-a).sqrt()[:, None] * hard(z, a)) / t.sigmoid(a).sqrt()[:, None]
    assert t.allclose(x_r[:, 0], t.tensor([-1., -0.5, 0., 1.], dtype=t.float64), atol=1e-6)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_rounding_lowers_the_high_snr_error(mode):
    # An imperfect denoiser (smoothed(): the atoms blurred, so its error tends to d at high SNR):
    # rounded to the grid, its error at a = 6, 8, 10 falls by more than half (paired noise, many
    # standard errors), while at a = 3 rounding makes it worse: where to round must be chosen.
    dist, grid = atoms_2d()
    dm = exact_model(smoothed(dist), reference="standard")
    snap = rounded(dm, grid, mode)
    x = dist.sample(4000, generator=gen(6))
    eps = t.randn(x.shape, generator=gen(7), dtype=t.float64)
    for a, better in ((3., False), (6., True), (8., True), (10., True)):
        a = t.full((len(x),), a, dtype=t.float64)
        plain, snapped = estimators.sq_error(dm, x, a, eps), estimators.sq_error(snap, x, a, eps)
        diff = snapped - plain
        se = diff.std().item() / math.sqrt(len(diff))
        if better:
            assert snapped.mean() < 0.5 * plain.mean() and diff.mean() < -10 * se
        else:
            assert diff.mean() > 4 * se


def test_heldout_choice_of_rounding_is_never_worse():
    # Ensemble of the smoothed denoiser and its hard and soft rounded variants, chosen per log-SNR
    # bin on held-out samples, scored on the support points (paired: the same seed for every
    # model). It must be no worse than any variant (4 standard errors of the paired difference)
    # and much better than the unrounded one.
    dist, grid = atoms_2d()
    dm = exact_model(smoothed(dist), reference="standard")
    variants = {"none": dm, "hard": rounded(dm, grid, "hard"), "soft": rounded(dm, grid, "soft")}
    ensemble = fit_ensemble(list(variants.values()), dist.sample(500, generator=gen(8)), seed=9,
                            bins=24)
    ensemble = with_denoiser(dm, ensemble, reference=ensemble.members[0].reference)
    x, _ = dist.support()
    score = {name: repeated(m.nll_discrete_points, x, 30, grid=grid, seed=10)[0]
             for name, m in variants.items()}
    ens = repeated(ensemble.nll_discrete_points, x, 30, grid=grid, seed=10)[0]
    for name, other in score.items():
        diff, se = paired_difference(ens, other)
        assert diff < 4 * se, (name, diff, se)
    diff, se = paired_difference(ens, score["none"])
    assert diff < -1.0 and diff < -10 * se


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes and bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["none", "hard", "soft"])
def test_image_shaped_float32(rounding):
    # 3x2x2 8-bit "images": runs in float32 with any rounding, finite, and the default chunking
    # gives the same numbers as tiny chunks
    x = -1 + 2 / 255 * t.randint(0, 256, (3, 3, 2, 2), generator=gen(0)).float()
    dm = DiffusionModel(Zero(), x_shape=(3, 2, 2), gaussian_residual=True)
    dm.fit_reference(-1 + 2 / 255 * t.randint(0, 256, (50, 3, 2, 2), generator=gen(1)).float())
    grid = Grid(2 / 255, -1., 256)
    nll, se = dm.nll_discrete_points(x, grid, 32, rounding=rounding, seed=2)
    assert nll.dtype == se.dtype == t.float32 and nll.shape == (3,)
    assert t.isfinite(nll).all() and t.isfinite(se).all()
    small = dm.nll_discrete_points(x, grid, 32, rounding=rounding, seed=2, chunk_size=5)[0]
    assert t.allclose(nll, small, rtol=1e-6)


def test_bad_input_raises_value_error():
    dist, grid = atoms_1d()
    dm = exact_model(dist)
    x, _ = dist.support()
    with pytest.raises(ValueError, match="not on the grid"):
        dm.nll_discrete_points(x + 0.1, grid)
    with pytest.raises(ValueError, match="levels"):
        dm.nll_discrete_points(x, Grid(0.5, -1., 3))
    with pytest.raises(ValueError, match="rounding"):
        dm.nll_discrete_points(x, grid, rounding="round")
    with pytest.raises(ValueError, match="npoints"):
        dm.nll_discrete_points(x, grid, npoints=1)
    with pytest.raises(ValueError, match="delta"):
        dm.nll_discrete_points(x, Grid(0., -1., 5))
    with pytest.raises(ValueError, match="non-finite"):
        dm.nll_discrete_points(x * float("nan"), grid)
    with pytest.raises(ValueError, match="mode"):
        rounded(dm, grid, "nearest")
    with pytest.raises(ValueError, match="index"):
        dm.nll_discrete_points(x, grid, index=t.arange(3))
