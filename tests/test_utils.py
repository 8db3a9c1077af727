"""Tests of utils and proposals: logistic importance sampling over log SNR and the log-SNR range
read off an MSE curve (proposals), randomised Sobol points and the Gaussian reference (utils).

Statistical tests are seeded (deterministic) and compare against closed forms with a tolerance of
4-5 standard errors of the Monte Carlo estimate, so a correct implementation passes with very high
probability while a wrong constant moves the estimate by many standard errors.
"""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch as t

import utils
from proposals import LogisticProposal, mse_quantiles, suggest_logsnr_params
from tests.checks import gen


pytestmark = pytest.mark.usefixtures("one_thread")


def softplus(v):
    return math.log1p(math.exp(-abs(v))) + max(v, 0.0)


# ---------------------------------------------------------------------------------------------
# Logistic importance sampling
# ---------------------------------------------------------------------------------------------
# Test integrand f(a) = s(a - 1) - s(a - 2): its integral over [L, H] is exact because
# Int s(a) da = softplus(a), and over the whole line it is 1; clipping to loc +- clip*scale
# (here [-2.5, 3.5]) removes a visible part of it, so a wrong clip normalisation shows.
LOC, SCALE, CLIP = 0.5, 1.2, 2.5


def f_test(a):
    return t.sigmoid(a - 1) - t.sigmoid(a - 2)


def clipped_integral(loc=LOC, scale=SCALE, clip=CLIP):
    lo, hi = loc - clip * scale, loc + clip * scale
    return (softplus(hi - 1) - softplus(hi - 2)) - (softplus(lo - 1) - softplus(lo - 2))


def test_clipped_integral_is_not_the_full_line():
    # guards the tests below: they must be able to tell the clipped integral from 1
    assert abs(clipped_integral() - 1) > 0.1


def test_logistic_weight_is_one_over_a_normalised_density():
    # Int q(a) da over the clipped range = 1 with q = 1/w; checked by scipy quadrature
    import scipy.integrate
    for loc, scale, clip in ((0., 3., 4.), (LOC, SCALE, CLIP), (-2., 0.7, 9.)):
        def q(a):
            return 1 / LogisticProposal(loc, scale, clip).weight(t.tensor(a, dtype=t.float64)).item()
        total, _ = scipy.integrate.quad(q, loc - clip * scale, loc + clip * scale, epsabs=1e-12)
        assert total == pytest.approx(1.0, abs=1e-9)
    # at the centre: q(loc) = 1/4 / (scale tanh(c/2))
    w0 = LogisticProposal(0., 3., 4.).weight(t.tensor(0.))
    assert w0.item() == pytest.approx(4 * 3 * math.tanh(2), rel=1e-6)


@pytest.mark.parametrize("stratified", [False, True])
def test_logistic_logsnr_is_unbiased(stratified):
    # K independent sets of n points, each set's mean of w f an estimate of the clipped integral;
    # their average must sit within 4 standard errors (from the spread of the K sets) of the
    # closed form.
    k, n = 4000, 32
    a, w = LogisticProposal(LOC, SCALE, CLIP).sample((k, n), stratified=stratified,
                                                     generator=gen(0), dtype=t.float64)
    assert a.min() >= LOC - CLIP * SCALE and a.max() <= LOC + CLIP * SCALE
    est = (w * f_test(a)).mean(1)
    se = est.std() / math.sqrt(k)
    assert abs(est.mean().item() - clipped_integral()) < 4 * se.item()
    if stratified:
        assert (a.diff(dim=1) > 0).all(), "stratified draws are in increasing order"


def test_stratified_has_lower_variance():
    # Stratification of a smooth integrand: variance O(1/n^3) instead of O(1/n); at n = 32 the
    # ratio is far below the 0.05 asserted (measured about 0.001).
    k, n = 2000, 32
    variances = []
    for stratified in (False, True):
        a, w = LogisticProposal(LOC, SCALE, CLIP).sample((k, n), stratified=stratified,
                                                         generator=gen(1), dtype=t.float64)
        variances.append((w * f_test(a)).mean(1).var().item())
    assert variances[1] < 0.05 * variances[0]


def test_logistic_quadrature_converges_at_second_order():
    # midpoint rule in quantile space: the error ratio between n and 2n tends to 4
    errors = []
    for n in (16, 32, 64, 128):
        a, w = LogisticProposal(LOC, SCALE, CLIP).quadrature(n, dtype=t.float64)
        errors.append((w * f_test(a)).mean().item() - clipped_integral())
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert all(3.6 < r < 4.4 for r in ratios), ratios
    # deterministic
    assert t.equal(a, LogisticProposal(LOC, SCALE, CLIP).quadrature(128, dtype=t.float64)[0])


def test_logistic_from_uniform_endpoints():
    # u = 0, 1/2, 1 -> the clipped range's ends and the centre
    q = LogisticProposal(LOC, SCALE, CLIP)
    a, w = q.from_uniform(t.tensor([0., 0.5, 1.], dtype=t.float64), dtype=t.float64)
    expected = [LOC - CLIP * SCALE, LOC, LOC + CLIP * SCALE]
    assert a.tolist() == pytest.approx(expected, abs=1e-9)
    assert list(q.range) == pytest.approx([expected[0], expected[2]])
    # w = 1/q with q the truncated logistic density, written out independently
    v = (a.numpy() - LOC) / SCALE
    norm = scipy.special.expit(CLIP) - scipy.special.expit(-CLIP)
    pdf = scipy.special.expit(v) * scipy.special.expit(-v) / (SCALE * norm)
    np.testing.assert_allclose(w.numpy(), 1 / pdf, rtol=1e-12)


def test_widened_reaches_the_top_with_the_same_logistic():
    q = LogisticProposal(LOC, SCALE, CLIP)
    assert q.widened(q.range[1] - 1) is q  # already reaches it
    wide = q.widened(14.2)
    assert (wide.loc, wide.scale) == (q.loc, q.scale) and wide.range[1] == pytest.approx(14.2)
    assert wide.range[0] == pytest.approx(2 * LOC - 14.2)


def test_logistic_respects_generator_and_dtype():
    q = LogisticProposal(0., 2.)
    a1, w1 = q.sample((3, 8), generator=gen(5))
    a2, w2 = q.sample((3, 8), generator=gen(5))
    assert t.equal(a1, a2) and t.equal(w1, w2)
    assert a1.dtype == w1.dtype == t.float32
    assert not t.equal(a1, q.sample((3, 8), generator=gen(6))[0])


@pytest.mark.parametrize("scale, clip, match", [(0., 4., "logsnr_scale"), (-1., 4., "logsnr_scale"),
                                                (float("nan"), 4., "logsnr_scale"),
                                                (3., 0., "clip"), (3., -2., "clip")])
def test_bad_scale_or_clip_raise(scale, clip, match):
    with pytest.raises(ValueError, match=match):
        LogisticProposal(0., scale, clip)


# ---------------------------------------------------------------------------------------------
# Randomised Sobol points
# ---------------------------------------------------------------------------------------------
SETS, N, DIM = 2000, 64, 5


def keyed(seed, sets, n, dims):
    """utils.keyed_sobol as the estimators use it: `sets` randomised n-point sets, (sets, n, dims)."""
    names = t.arange(sets).repeat_interleave(n)
    point = t.arange(n).repeat(sets)
    return utils.keyed_sobol(seed, (names,), point, n, t.arange(dims)).view(sets, n, dims)


@pytest.fixture(scope="module")
def sobol():
    return keyed(0, SETS, N, DIM)


def test_keyed_sobol_shape_and_range(sobol):
    assert sobol.shape == (SETS, N, DIM) and sobol.dtype == t.float64
    assert sobol.min() > 0 and sobol.max() < 1


def test_keyed_sobol_keeps_the_net(sobol):
    # every 1-D projection of 2^m Sobol points has one point in each interval [j/2^m, (j+1)/2^m);
    # a digital shift permutes those intervals, so each set keeps the property
    cells = (sobol * N).long().sort(dim=1).values
    assert t.equal(cells, t.arange(N).view(1, N, 1).expand_as(cells))


def test_keyed_sobol_points_are_uniform(sobol):
    # one point index across the independent sets is an iid U(0, 1) sample in every dimension
    for k in (0, 1, 37):
        for j in range(DIM):
            assert scipy.stats.kstest(sobol[:, k, j].numpy(), "uniform").pvalue > 1e-3
    # overall mean 1/2; iid standard error sqrt(1/12 / count) is conservative for stratified points
    assert abs(sobol.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / sobol.numel())


def test_keyed_sobol_sets_are_independent(sobol):
    # correlation of the same point between consecutive sets, and between dimensions of one
    # point, is 0 within 4/sqrt(n) (the null standard error of a correlation)
    for k in (0, 5):
        for j in range(DIM):
            r = np.corrcoef(sobol[0::2, k, j], sobol[1::2, k, j])[0, 1]
            assert abs(r) < 4 / math.sqrt(SETS // 2)
        r = np.corrcoef(sobol[:, k, 0], sobol[:, k, 1])[0, 1]
        assert abs(r) < 4 / math.sqrt(SETS)


def test_keyed_sobol_reduces_variance(sobol):
    # the set mean of a smooth function has variance O(1/n^2) vs 1/(12 n) per dimension for iid
    set_means = sobol.sum(-1).mean(1)
    assert set_means.var().item() < 0.1 * DIM / 12 / N


def test_keyed_sobol_seed_and_high_dimension():
    assert t.equal(keyed(1, 3, 8, 4), keyed(1, 3, 8, 4))
    assert not t.equal(keyed(1, 3, 8, 4), keyed(2, 3, 8, 4))
    state = t.random.get_rng_state()  # counter-based: the global generator is never touched
    keyed(1, 3, 8, 4)
    assert t.equal(state, t.random.get_rng_state())
    dim = t.quasirandom.SobolEngine.MAXDIM + 3  # iid uniforms beyond Sobol's dimensions
    u = keyed(3, 2, 4, dim)
    assert u.shape == (2, 4, dim) and u.min() > 0 and u.max() < 1


# ---------------------------------------------------------------------------------------------
# Gaussian reference
# ---------------------------------------------------------------------------------------------
D = 4


def random_gaussian(d=D, seed=0):
    g = gen(seed)
    a = t.randn(d, d, generator=g, dtype=t.float64)
    cov = a @ a.T / d + 0.1 * t.eye(d, dtype=t.float64)
    mean = t.randn(d, generator=g, dtype=t.float64)
    return mean, cov


def reference_for(mean, cov):
    ref = utils.GaussianReference(len(mean)).double()
    eigvals, eigvecs = t.linalg.eigh(cov)
    ref.mean, ref.eigvals, ref.eigvecs = mean, eigvals, eigvecs
    return ref


@pytest.fixture(scope="module")
def gaussian():
    mean, cov = random_gaussian()
    return mean, cov, reference_for(mean, cov)


def test_default_reference_is_standard_normal():
    ref = utils.GaussianReference(3).double()
    x = t.randn(5, 3, generator=gen(0), dtype=t.float64)
    mvn = t.distributions.MultivariateNormal(t.zeros(3, dtype=t.float64), t.eye(3, dtype=t.float64))
    assert t.allclose(ref.nll(x), -mvn.log_prob(x))
    a = t.linspace(-5, 5, 11, dtype=t.float64)
    assert t.allclose(ref.mmse(a), 3 * t.sigmoid(a))  # d s(a), docs/maths.md
    assert t.allclose(ref.eps(x, a[:5]), t.sigmoid(-a[:5]).sqrt().view(-1, 1) * x)


def test_reference_nll_and_entropy_match_torch(gaussian):
    mean, cov, ref = gaussian
    mvn = t.distributions.MultivariateNormal(mean, cov)
    x = mvn.sample((7,))
    assert t.allclose(ref.nll(x), -mvn.log_prob(x), atol=1e-10)
    assert ref.entropy().item() == pytest.approx(mvn.entropy().item(), abs=1e-10)
    # works on any sample shape: x is flattened
    assert t.allclose(ref.nll(x.view(7, 2, 2)), ref.nll(x))


def test_reference_eps_matches_textbook_formula(gaussian):
    # docs/maths.md: x_hat = mu + sqrt(s) Sigma (s Sigma + s(-a) I)^-1 (z - sqrt(s) mu),
    # eps = (z - sqrt(s) x_hat) / sqrt(s(-a)), with an explicit matrix inverse
    mean, cov, ref = gaussian
    logsnrs = t.tensor([-9., -2., 0., 1.5, 10.], dtype=t.float64)
    z = t.randn(len(logsnrs), D, generator=gen(1), dtype=t.float64) * 2
    expected = []
    for zi, a in zip(z, logsnrs):
        s, sm = t.sigmoid(a), t.sigmoid(-a)
        x_hat = mean + s.sqrt() * cov @ t.linalg.inv(s * cov + sm * t.eye(D, dtype=t.float64)) @ (
            zi - s.sqrt() * mean)
        expected.append((zi - s.sqrt() * x_hat) / sm.sqrt())
    assert t.allclose(ref.eps(z, logsnrs), t.stack(expected), rtol=1e-9, atol=1e-9)


def test_reference_mmse_matches_monte_carlo(gaussian):
    # mmse_G(a) = E ||eps - eps_G(z, a)||^2 with x ~ q, eps ~ N(0, I); within 4 standard errors
    mean, cov, ref = gaussian
    n = 20000
    g = gen(2)
    for a in (-4., 0., 3.):
        x = ref.sample(n, generator=g)
        eps = t.randn(n, D, generator=g, dtype=t.float64)
        logsnr = t.full((n,), a, dtype=t.float64)
        z = t.sigmoid(logsnr).sqrt()[:, None] * x + t.sigmoid(-logsnr).sqrt()[:, None] * eps
        err = (eps - ref.eps(z, logsnr)).pow(2).sum(1)
        mc, se = err.mean().item(), err.std().item() / math.sqrt(n)
        assert abs(mc - ref.mmse(t.tensor(a, dtype=t.float64)).item()) < 4 * se
    assert ref.mmse(t.zeros(2, 3, dtype=t.float64)).shape == (2, 3)


def test_reference_noisy_marginal_covariance(gaussian):
    # the draw at log SNR a is N(sqrt(s) mu, s Sigma + s(-a) I); sample mean and covariance within
    # 5 standard errors: sqrt(C_ii / n) and, for a Wishart, sqrt((C_ij^2 + C_ii C_jj) / n)
    mean, cov, ref = gaussian
    n = 40000
    for a in (None, -1.0, 2.0):
        draws = ref.sample(n, a, generator=gen(3))
        if a is None:
            m, c = mean, cov
        else:
            s = t.sigmoid(t.tensor(a, dtype=t.float64))
            m, c = s.sqrt() * mean, s * cov + (1 - s) * t.eye(D, dtype=t.float64)
        var = c.diag()
        assert ((draws.mean(0) - m).abs() < 5 * (var / n).sqrt()).all()
        se = ((c ** 2 + var[:, None] * var[None, :]) / n).sqrt()
        assert ((draws.T.cov() - c).abs() < 5 * se).all()


def test_fit_recovers_a_known_gaussian():
    mean, cov = random_gaussian(3, seed=4)
    n = 40000
    x = t.distributions.MultivariateNormal(mean, cov).sample((n,))
    ref = utils.GaussianReference(3).double().fit(x)
    fitted = ref.eigvecs @ t.diag(ref.eigvals) @ ref.eigvecs.T
    var = cov.diag()
    assert ((ref.mean - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((fitted - cov).abs() < 5 * ((cov ** 2 + var[:, None] * var[None, :]) / n).sqrt()).all()
    # and it is exactly the sample covariance
    assert t.allclose(fitted, x.T.cov(), atol=1e-10)


def test_fit_with_fewer_samples_than_dimensions():
    # n <= d: the sample covariance is singular; the fit must still give a proper density
    x = t.randn(5, 2, 3, 2, generator=gen(5), dtype=t.float64)
    ref = utils.GaussianReference(12).double().fit(x)
    assert t.isfinite(ref.eigvals).all() and (ref.eigvals > 0).all()
    # a proper density: no eigenvalue at the floor (Ledoit-Wolf shrinks towards a multiple of I)
    assert ref.eigvals.min() > 1e-3 * ref.eigvals.mean()
    assert t.isfinite(ref.nll(x)).all() and t.isfinite(ref.entropy())


def test_fit_floors_eigenvalues_of_constant_directions():
    x = t.randn(200, 3, generator=gen(6), dtype=t.float64)
    x[:, 1] = 0.5  # a pixel that never changes
    ref = utils.GaussianReference(3).double().fit(x, min_eigval=1e-4)
    assert ref.eigvals.min().item() == pytest.approx(1e-4 * ref.eigvals.mean().item(), rel=1e-3)
    assert t.isfinite(ref.nll(x)).all()


def test_reference_without_eigenvectors_is_diagonal():
    # eigvecs of shape (0,) stand for U = I (docs/maths.md): a diagonal Gaussian, set by hand here
    mean, cov = random_gaussian(3, seed=7)
    x = t.distributions.MultivariateNormal(mean, cov).sample((500,))
    ref = utils.GaussianReference(3).double()
    ref.mean, ref.eigvals = x.mean(0), x.var(0)
    assert ref.eigvecs.numel() == 0
    indep = t.distributions.Normal(x.mean(0), x.var(0).sqrt())
    assert t.allclose(ref.nll(x), -indep.log_prob(x).sum(1))


def test_fit_rejects_bad_data():
    ref = utils.GaussianReference(3)
    with pytest.raises(ValueError, match="dimensions"):
        ref.fit(t.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        ref.fit(t.randn(1, 3))
    bad = t.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ref.fit(bad)


def test_reference_state_dict_round_trip(gaussian):
    # a fresh module has N(0, I)-shaped buffers (eigvecs empty); loading adopts the saved shapes
    _, _, ref = gaussian
    fresh = utils.GaussianReference(D).double()
    fresh.load_state_dict(ref.state_dict())
    for name in ("mean", "eigvals", "eigvecs"):
        assert t.equal(getattr(fresh, name), getattr(ref, name))
    x = t.randn(4, D, generator=gen(8), dtype=t.float64)
    assert t.equal(fresh.nll(x), ref.nll(x))
    # and back to an axis-aligned one
    fresh.load_state_dict(utils.GaussianReference(D).double().state_dict())
    assert fresh.eigvecs.numel() == 0 and t.allclose(fresh.nll(x), -t.distributions.Normal(
        0., 1.).log_prob(x).sum(1))


def test_reference_has_no_parameters(gaussian):
    # the control variate must not receive gradients
    assert list(gaussian[2].parameters()) == []


# ---------------------------------------------------------------------------------------------
# Log-SNR range from an MSE curve
# ---------------------------------------------------------------------------------------------
def test_suggest_logsnr_params_recovers_a_logistic_curve():
    # mse = d s((a - loc)/scale) crosses d/4, d/2, 3d/4 at loc - scale ln 3, loc, loc + scale ln 3
    d, loc, scale = 5, 1.7, 2.3
    a = np.linspace(-30, 30, 6001)
    mse = d / (1 + np.exp(-(a - loc) / scale))
    got_loc, got_scale = suggest_logsnr_params(a, mse, d)
    assert got_loc == pytest.approx(loc, abs=1e-3)
    assert got_scale == pytest.approx(scale, abs=1e-3)
    q25, q50, q75 = mse_quantiles(a, mse, d)
    assert q75 - q50 == pytest.approx(scale * math.log(3), abs=1e-3)


def test_mse_quantiles_nan_when_a_level_is_never_reached():
    # a curve that rises to 0.4 d and falls back (data on a manifold)
    d = 2
    a = np.linspace(-10, 10, 201)
    mse = d * 0.4 * np.exp(-a ** 2 / 8)
    q25, q50, q75 = mse_quantiles(a, mse, d)
    assert math.isfinite(q25) and math.isnan(q50) and math.isnan(q75)
    # first crossing of 0.25: 0.4 exp(-a^2/8) = 0.25 at a = -sqrt(8 ln 1.6)
    assert q25 == pytest.approx(-math.sqrt(8 * math.log(1.6)), abs=1e-2)
    assert all(math.isnan(v) for v in suggest_logsnr_params(a, mse, d))
    # a curve already above a level at the first grid point gives that point
    assert mse_quantiles(a, np.full_like(a, d * 0.9), d)[0] == a[0]


def test_nats_to_bpd():
    # bits/dim = nats / (d ln 2): d ln 2 nats are one bit per dimension
    assert utils.nats_to_bpd(7 * math.log(2), 7) == pytest.approx(1.0)
    assert utils.nats_to_bpd(t.tensor(3.0), 3).item() == pytest.approx(1 / math.log(2))


def test_log_ndtr_diff_in_both_tails():
    # log(Phi(b) - Phi(a)) against scipy in the middle and, in the tails, against the asymptotic
    # log Phi(-|z|) of the nearer end (the other end is e^-(huge) smaller)
    a = t.tensor([-1.0, -3.0, 0.5, 30.0, -37.5, -500.0, 400.0], dtype=t.float64)
    b = t.tensor([1.0, -2.0, 2.0, 37.5, -30.0, -492.5, 407.5], dtype=t.float64)
    got = utils.log_ndtr_diff(a, b).numpy()
    naive = np.log(scipy.stats.norm.cdf(b[:3]) - scipy.stats.norm.cdf(a[:3]))
    assert np.allclose(got[:3], naive, rtol=1e-12)
    tail = scipy.special.log_ndtr(-np.abs(np.array([30.0, -30.0, -492.5, 400.0])))
    assert np.allclose(got[3:], tail, rtol=1e-12)
