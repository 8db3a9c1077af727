"""Tests of the discrete-time variational bound of a T-step schedule
(vb.variational_bound, DDPM's -ELBO = L_T + sum_{t=2}^T L_{t-1} + L_0).

Expected numbers come from closed forms written out here, independently of VBSchedule: the Gaussian
posterior q(x_{t-1} | x_t, x_0) of Ho et al. (2020) eqs. (6)-(7), the optimal denoiser of Gaussian
data (its posterior mean, by a linear solve), the KL between two Gaussians, and for atoms on a grid
(tests/analytic.py DiscreteAtoms) the exact -log P(x_m) = -log pi_m.
"""
import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch as t

from tests.analytic import DiscreteAtoms, Recorder, gaussian
from tests.checks import assert_unbiased_and_calibrated, gen
from utils import Grid
from vb import VBSchedule, _log_bin_mass, variational_bound, vb_terms


pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(T, hi=6., lo=-6.):
    """alphas_cumprod linear in log SNR: ab_t = sigmoid(a_t), a from hi (t = 1) to lo (t = T)."""
    return t.sigmoid(t.linspace(hi, lo, T, dtype=t.float64))


def posterior_mean(x_mean, cov, z, ab):
    """E[x_0 | x_t = z] for x_0 ~ N(x_mean, cov): x_mean + sqrt(ab) cov (ab cov + (1 - ab) I)^-1
    (z - sqrt(ab) x_mean), rows of z (n, d), ab (n,)."""
    d = len(x_mean)
    out = []
    for zi, abi in zip(z, ab):
        eye = t.eye(d, dtype=t.float64)
        gain = math.sqrt(abi) * cov @ t.linalg.inv(abi * cov + (1 - abi) * eye)
        out.append(x_mean + gain @ (zi - math.sqrt(abi) * x_mean))
    return t.stack(out)


def bin_mass(x0, x_hat, sigma, delta):
    """The N(x_hat, sigma^2) mass of [x0 - delta/2, x0 + delta/2] by scipy (numpy arrays), from the
    side of the nearer tail so that it is not 1 - 1."""
    u, l = (x0 + delta / 2 - x_hat) / sigma, (x0 - delta / 2 - x_hat) / sigma
    return np.where(u + l > 0, scipy.stats.norm.sf(l) - scipy.stats.norm.sf(u),
                    scipy.stats.norm.cdf(u) - scipy.stats.norm.cdf(l))


def direct_kl(x0, z, x_hat, ab, t_step):
    """KL(q(x_{t-1} | x_t, x_0) || N(mu_tilde(x_t, x_hat), sigma^2 I)) for each row, written out
    from Ho et al. (2020) eq. (7): mu_tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t)
    (1 - ab_{t-1}) / (1 - ab_t) x_t, beta_tilde = (1 - ab_{t-1}) / (1 - ab_t) beta_t, and DDPM's
    fixed_small variances sigma^2 = beta_tilde."""
    out = []
    for x0i, zi, xhi, ti in zip(x0, z, x_hat, t_step.tolist()):
        ab_t, ab_p = ab[ti - 1].item(), ab[ti - 2].item()
        beta = 1 - ab_t / ab_p
        bt = (1 - ab_p) / (1 - ab_t) * beta
        var = bt
        c0 = math.sqrt(ab_p) * beta / (1 - ab_t)
        ct = math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t)
        mu_q, mu_p = c0 * x0i + ct * zi, c0 * xhi + ct * zi
        kl = 0.5 * (math.log(var / bt) + (bt + (mu_q - mu_p) ** 2) / var - 1)
        out.append(kl.sum())
    return t.stack(out)


COV = t.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=t.float64)
MEAN = t.tensor([0.1, -0.2], dtype=t.float64)


# ---------------------------------------------------------------------------------------------
# 1. Exactness against closed forms, the same eps fed to both
# ---------------------------------------------------------------------------------------------
def test_kl_terms_match_the_gaussian_posterior_in_closed_form():
    # 2-D Gaussian data with its exact denoiser (tests/analytic.py gaussian): every L_{t-1},
    # t = 2 .. 10, equals the KL written out from Ho et al.'s eq. (7) with x_hat the Gaussian
    # posterior mean (direct_kl), for the same eps, to 1e-6 relative (measured: ~1e-13)
    T = 10
    ab = schedule(T)
    sched = VBSchedule(ab)
    x0 = t.tensor([[0.4, -0.7]], dtype=t.float64).expand(T - 1, 2)
    steps = t.arange(2, T + 1)
    eps = t.randn(T - 1, 2, generator=gen(0), dtype=t.float64)
    got = vb_terms(gaussian(MEAN, COV), x0, steps, eps, sched, clip=False)
    abt = ab[steps - 1]
    z = abt.sqrt()[:, None] * x0 + (1 - abt).sqrt()[:, None] * eps
    expected = direct_kl(x0, z, posterior_mean(MEAN, COV, z, abt), ab, steps)
    assert t.allclose(got, expected, rtol=1e-6, atol=0)
    # and in x-space the coefficient is VDM's (SNR_{t-1} - SNR_t) / 2 (Kingma et al. 2021)
    snr = ab / (1 - ab)
    coef_x = sched.coef[2:] * snr[1:]   # ||eps - eps_hat||^2 = SNR_t ||x - x_hat||^2
    assert t.allclose(coef_x, 0.5 * (snr[:-1] - snr[1:]), rtol=1e-10)


def test_whole_bound_matches_a_direct_computation():
    # variational_bound(steps=None) on grid data (delta = 0.1) with the exact Gaussian denoiser:
    # the test records every (z, a) the model is called with, recovers eps = (z - sqrt(ab) x) /
    # sqrt(1 - ab), and recomputes L_T (KL to N(0, I)), each L_{t-1} (direct_kl) and L_0 (the
    # decoder's bin mass by scipy, sigma_1^2 = beta_tilde_2, mean of the two draws): equal to 1e-6
    T, delta = 10, 0.1
    ab = schedule(T)
    model = Recorder(gaussian(MEAN, COV))
    x = t.tensor([[0.4, -0.7], [-0.1, 0.2]], dtype=t.float64)
    nll, _ = variational_bound(model, x, Grid(delta), ab, clip=False, seed=3)
    z = t.cat([c[0] for c in model.calls])
    a = t.cat([c[1] for c in model.calls])
    logsnr = (ab / (1 - ab)).log()
    steps = (a[:, None] - logsnr).abs().argmin(1) + 1
    assert len(z) == 2 * (T - 1 + 2)
    sample = t.arange(2).repeat_interleave(T - 1 + 2)
    x0 = x[sample]
    abt = ab[steps - 1]
    x_hat = posterior_mean(MEAN, COV, z, abt)
    terms = t.zeros(len(z), dtype=t.float64)
    kl_rows = steps >= 2
    terms[kl_rows] = direct_kl(x0[kl_rows], z[kl_rows], x_hat[kl_rows], ab, steps[kl_rows])
    beta2 = 1 - ab[1] / ab[0]
    sigma = math.sqrt((1 - ab[0]) / (1 - ab[1]) * beta2)
    dec = ~kl_rows
    mass = bin_mass(x0[dec].numpy(), x_hat[dec].numpy(), sigma, delta)
    terms[dec] = -t.from_numpy(np.log(mass)).sum(1)
    weight = t.where(kl_rows, 1.0, 0.5).double()     # L_0 is the mean of its two draws
    prior = 0.5 * (ab[-1] * x ** 2 + (1 - ab[-1]) - 1 - math.log(1 - ab[-1])).sum(1)
    expected = prior + (weight * terms).view(2, -1).sum(1)
    assert t.allclose(nll, expected, rtol=1e-6, atol=0)


def test_decoder_mass_is_stable_in_the_tails():
    # log of the N(mean, std^2) mass of a bin, against mpmath at 50 digits: bins near the mean,
    # 40 standard deviations out on either side (where the difference of CDFs is 0 in float64) and
    # the outermost bins reaching -+inf when `levels` is given
    mpmath.mp.dps = 50
    delta, std, lo, levels = 0.1, 0.01, -1., 21
    cases = [(0.0, 0.003), (0.0, -0.04), (0.5, 0.5 - 0.45), (0.3, 0.3 + 0.45), (-1.0, -0.6),
             (1.0, 0.6), (-1.0, -1.3), (1.0, 1.2), (0.0, 0.07)]
    x = t.tensor([c[0] for c in cases], dtype=t.float64)
    mean = t.tensor([c[1] for c in cases], dtype=t.float64)
    got = _log_bin_mass(x, mean, std, Grid(delta, lo, levels))
    for (xi, mi), g in zip(cases, got.tolist()):
        k = round((xi - lo) / delta)
        upper = mpmath.inf if k == levels - 1 else (mpmath.mpf(xi) + delta / 2 - mi) / std
        lower = -mpmath.inf if k == 0 else (mpmath.mpf(xi) - delta / 2 - mi) / std
        exact = mpmath.log(mpmath.ncdf(upper) - mpmath.ncdf(lower))
        assert math.isfinite(g)
        assert abs(g - float(exact)) <= 1e-9 * max(1., abs(float(exact))), (xi, mi, g, exact)


# ---------------------------------------------------------------------------------------------
# 2. Discrete data: a bound on -log P(x) that tightens with T
# ---------------------------------------------------------------------------------------------
def test_bound_on_atoms_tightens_with_T():
    # four atoms on the 5-level grid -1 + k/2 with their exact denoiser: E[VB(x_m)] >= -log pi_m
    # within noise for every atom, and the gap shrinks as T grows on ab = sigmoid(linspace(10,
    # -10, T)), roughly as 1/T: the discretisation of 1/2 Int E||eps - eps_hat||^2 da (the
    # fixed_small KL weighs step t's error by (e^{a_{t-1} - a_t} - 1) / 2 >= its width / 2).
    # The exact E_P[gap], 3.5732 / 0.3007 / 0.0528 nats at T = 10 / 50 / 250: every term is an
    # expectation over one standard normal eps (1-D data), integrated on a uniform grid of step
    # 1e-4 over [-12, 12] (step 2e-4 gives the same digits). The Monte Carlo gaps must match it.
    dist = DiscreteAtoms([[-1.0], [-0.5], [0.0], [1.0]], [0.1, 0.4, 0.2, 0.3])
    x, p = dist.support()
    exact = dist.nll(x)
    reps = 200
    gaps, exact_gaps = [], (3.5732, 0.3007, 0.0528)
    for T, exact_gap in zip((10, 50, 250), exact_gaps):
        est, se = variational_bound(dist, x.repeat(reps, 1), Grid(0.5, -1., 5),
                                    schedule(T, 10., -10.), seed=T, clip=False)
        est = est.view(reps, 4)
        mean, err = est.mean(0), est.std(0) / math.sqrt(reps)
        assert (mean - exact > -4 * err).all(), (T, (mean - exact).tolist(), err.tolist())
        gaps.append((p * (mean - exact)).sum().item())
        assert abs(gaps[-1] - exact_gap) < 4 * (p ** 2 * err ** 2).sum().sqrt() + 5e-4, (T, gaps)
    assert gaps[0] > 2 and gaps[0] > 5 * gaps[1] > 0 and gaps[1] > 4 * gaps[2]
    assert gaps[2] < 0.1


# ---------------------------------------------------------------------------------------------
# 3. Subsampled timesteps: unbiased, with a calibrated standard error
# ---------------------------------------------------------------------------------------------
def expected_bound_1d(x0, mean, var, ab, delta):
    """E_eps[VB(x0)] for 1-D data N(mean, var) and its exact denoiser, in closed form except for
    E[L_0] (1-D quadrature): x_hat = mean + k (x_t - sqrt(ab) mean), k = sqrt(ab) var / (ab var +
    1 - ab), so E(x0 - x_hat)^2 = (1 - k sqrt(ab))^2 (x0 - mean)^2 + k^2 (1 - ab); fixed_small."""
    ab = ab.tolist()
    T = len(ab)
    total = 0.5 * (ab[-1] * (x0 ** 2 - 1) - math.log(1 - ab[-1]))
    for step in range(2, T + 1):
        ab_t, ab_p = ab[step - 1], ab[step - 2]
        beta = 1 - ab_t / ab_p
        bt = (1 - ab_p) / (1 - ab_t) * beta
        c0 = math.sqrt(ab_p) * beta / (1 - ab_t)
        k = math.sqrt(ab_t) * var / (ab_t * var + 1 - ab_t)
        err = (1 - k * math.sqrt(ab_t)) ** 2 * (x0 - mean) ** 2 + k ** 2 * (1 - ab_t)
        total += c0 ** 2 * err / (2 * bt)
    ab1, ab2 = ab[0], ab[1]
    sigma = math.sqrt((1 - ab1) / (1 - ab2) * (1 - ab2 / ab1))
    k = math.sqrt(ab1) * var / (ab1 * var + 1 - ab1)

    def l0(e):
        x_hat = mean + k * (math.sqrt(ab1) * (x0 - mean) + math.sqrt(1 - ab1) * e)
        return -math.log(bin_mass(x0, x_hat, sigma, delta)) * scipy.stats.norm.pdf(e)
    return total + scipy.integrate.quad(l0, -10, 10, limit=200, epsabs=1e-12)[0]


def test_subsampled_timesteps_are_unbiased_and_calibrated():
    # 1-D N(0.1, 0.3) data scored at three grid points (delta = 0.1) with its exact denoiser,
    # T = 50 on ab = sigmoid(linspace(8, -8, 50)); expected = E[VB] in closed form
    # (expected_bound_1d). steps=10: mean of 300 repeats within 4.5 standard errors and spread /
    # reported stderr in 0.7 .. 1.4 (measured 0.89 .. 1.00 per point with these seeds); steps=None:
    # the same with the successive-difference stderr (measured 0.93 .. 0.99)
    var, mean, delta, T, reps = 0.3, 0.1, 0.1, 50, 300
    ab = schedule(T, 8., -8.)
    model = gaussian([mean], [[var]])
    x = t.tensor([[-0.5], [0.2], [0.8]], dtype=t.float64)
    expected = t.tensor([expected_bound_1d(v, mean, var, ab, delta) for v in x[:, 0].tolist()],
                        dtype=t.float64)
    xs = x.repeat(reps, 1)
    for steps in (10, None):
        est, se = variational_bound(model, xs, Grid(delta), ab, steps=steps, seed=7, clip=False)
        assert_unbiased_and_calibrated(est.view(reps, 3), se.view(reps, 3), expected)


# ---------------------------------------------------------------------------------------------
# 4. Keyed randomness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [None, 4])
def test_a_sample_does_not_depend_on_its_batch(steps):
    # the same seed: one batch of 6, or two batches with index offsets 0 and 2 and tiny chunks,
    # give the same numbers exactly (noise and timesteps are named by (seed, index, t, draw)).
    # Exactly with this seed: for some seeds the denoiser's own float64 arithmetic on a chunk of 5
    # rows rounds a row 1 ulp differently from the whole batch (PyTorch's CPU kernels), whatever
    # the noise.
    ab = schedule(12)
    model = gaussian(MEAN, COV)
    x = -1 + 0.1 * t.randint(0, 21, (6, 2), generator=gen(1)).double()
    grid = Grid(0.1)
    whole = variational_bound(model, x, grid, ab, steps=steps, seed=4, clip=False)
    first = variational_bound(model, x[:2], grid, ab, steps=steps, seed=4, index=0, clip=False)
    rest = variational_bound(model, x[2:], grid, ab, steps=steps, seed=4, index=2, chunk_size=5,
                             clip=False)
    for w, a, b in zip(whole, first, rest):
        assert t.equal(w, t.cat([a, b]))
    other = variational_bound(model, x, grid, ab, steps=steps, seed=6, clip=False)
    assert not t.equal(whole[0], other[0])


# ---------------------------------------------------------------------------------------------
# 5. Mistakes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(x=t.tensor([[0.13, 0.2]], dtype=t.float64)), "not on the grid"),
    (dict(alphas_cumprod=schedule(10).flip(0)), "must decrease strictly"),
    (dict(alphas_cumprod=t.cat([schedule(5), t.ones(1)])), r"values in \(0, 1\)"),
    (dict(alphas_cumprod=schedule(2)), "at least 3 timesteps"),
    (dict(steps=10), r"2 \.\. T - 1 = 9"),
    (dict(steps=1), r"2 \.\. T - 1 = 9"),
    (dict(), "clipping x_hat needs the range of the data's grid"),  # Grid(0.1): no top
])
def test_mistakes_are_refused(change, message):
    args = dict(x=t.tensor([[0.1, 0.2]], dtype=t.float64), alphas_cumprod=schedule(10))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        variational_bound(gaussian(MEAN, COV), args.pop("x"), Grid(0.1), args.pop("alphas_cumprod"),
                          **args)


# ---------------------------------------------------------------------------------------------
# 6. As DDPM reported it: x_hat clipped to the data's range in every term
# ---------------------------------------------------------------------------------------------
def ddpm_clipped_terms(model, x0, steps, eps, ab, grid):
    """Each row's term of DDPM's calc_bpd_loop with clip_denoised=True, written out from Ho et
    al.'s code path (p_mean_variance: pred_xstart clipped to [-1, 1], the posterior mean of
    q(x_{t-1} | x_t, pred_xstart); normal_kl against q(x_{t-1} | x_t, x_0); at t = 1 the
    discretised Gaussian decoder around the clipped pred_xstart, log variance clipped to
    beta_tilde_2), fixed_small variances, in float64 numpy, one row at a time."""
    ab = np.concatenate([[1.], ab.numpy()])
    out = []
    for x0i, ti, ei in zip(x0.numpy(), steps.tolist(), eps.numpy()):
        ab_t, ab_p = ab[ti], ab[ti - 1]
        beta = 1 - ab_t / ab_p
        xt = math.sqrt(ab_t) * x0i + math.sqrt(1 - ab_t) * ei
        a = math.log(ab_t / (1 - ab_t))
        eps_hat = model(t.tensor(xt)[None], t.tensor([a], dtype=t.float64))[0].numpy()
        pred = np.clip((xt - math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(ab_t), -1, 1)
        c1, c2 = math.sqrt(ab_p) * beta / (1 - ab_t), math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t)
        if ti == 1:
            var = (1 - ab[1]) / (1 - ab[2]) * (1 - ab[2] / ab[1])  # beta_tilde_2
            lo = np.where(x0i <= -1 + 1e-9, -np.inf, x0i - grid.delta / 2)
            hi = np.where(x0i >= 1 - 1e-9, np.inf, x0i + grid.delta / 2)
            mass = bin_mass_between(lo, hi, pred, math.sqrt(var))
            out.append(-np.log(mass).sum())
        else:
            var = (1 - ab_p) / (1 - ab_t) * beta  # beta_tilde_t = sigma_t^2
            diff = c1 * x0i + c2 * xt - (c1 * pred + c2 * xt)
            out.append(np.sum(0.5 * diff ** 2 / var))
    return np.array(out)


def bin_mass_between(lo, hi, mean, std):
    return scipy.stats.norm.cdf((hi - mean) / std) - scipy.stats.norm.cdf((lo - mean) / std)


def test_the_clipped_bound_is_ddpms():
    # data on the 5-level grid of [-1, 1] with the exact denoiser of a much wider Gaussian,
    # N(0, 2^2 I): its x_hat overshoots [-1, 1] at low SNR, where clipping changes the terms
    grid = Grid(0.5, -1., 5)
    ab = schedule(10, 5., -5.)
    model = gaussian([0., 0.], [[4., 0.], [0., 4.]])
    x0 = -1 + 0.5 * t.randint(0, 5, (40, 2), generator=gen(3)).double()
    steps = t.arange(40) % 10 + 1
    eps = t.randn(40, 2, generator=gen(4), dtype=t.float64)
    sched = VBSchedule(ab)
    got = vb_terms(model, x0, steps, eps, sched, grid)
    expected = ddpm_clipped_terms(model, x0, steps, eps, ab, grid)
    assert np.allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
    # clipping matters here: the unclipped terms are larger
    unclipped = vb_terms(model, x0, steps, eps, sched, grid, clip=False)
    assert (unclipped - got).sum() > 1.
