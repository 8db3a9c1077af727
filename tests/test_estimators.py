"""Tests of the estimators (estimators.py, and DiffusionModel, the LightningModule built on them)
against exact answers.

The exact answers come from closed-form optimal denoisers (tests/analytic.py): a Gaussian and a
Gaussian mixture, whose -log p(x) is known (computed independently with torch.distributions).
With the optimal denoiser the estimator is exact in expectation, so every statistical test checks
that the error is zero within the estimator's own standard error, over seeded repeats:

- per point, |mean error| / (its standard error) < 4.5, and the sum of squared z-scores is below
  the 1e-4 upper quantile of a chi-square with one degree of freedom per point (this pools the
  points, so a small systematic error shared by all of them still fails);
- the reported standard error is calibrated: the spread of the repeats over the mean reported
  standard error lies in a band several standard deviations of that ratio wide.

Truncating the log-SNR integral to loc +- clip * scale (+-12 at the defaults) is a bias the
estimator accepts: for the Gaussians below it is under 2e-4 nats (the closed-form expected
integrand of test_control_variate_identity_by_quadrature, integrated over the tails), for
mixture_2d under 1e-3 (measured by widening the clip to 8); both under a tenth of the smallest
standard error these tests resolve.
"""
import copy
import math
import re

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch as t

import estimators as est
import utils
from diffusionmodel import DiffusionModel
from proposals import LogisticProposal
from tests.analytic import Recorder, Zero, gaussian, mixture_2d, reference_nll
from tests.checks import gen

LOC, SCALE, CLIP = 0., 3., 4.


pytestmark = pytest.mark.usefixtures("one_thread")


def random_cov(d, seed, floor=0.05):
    g = gen(seed)
    a = t.randn(d, d, generator=g, dtype=t.float64)
    return a @ a.T / d + floor * t.eye(d, dtype=t.float64)


def gaussian_3d():
    # full covariance, eigenvalues 0.13, 0.47, 2.0, mean away from 0
    return gaussian([0.8, -0.5, 0.3], random_cov(3, seed=11))


DISTRIBUTIONS = {"gaussian": gaussian_3d, "mixture": mixture_2d}


def exact(dist, reference, dtype=t.float64, fit_n=2000):
    """(denoiser, reference, proposal) for the functions of estimators.py: the optimal denoiser of
    `dist` (a copy cast to dtype; `dist` itself stays float64), the N(0, I) reference or one fitted
    to fit_n samples (a finite sample, so it differs from the data's own moments), and the default
    logistic proposal over loc +- clip * scale."""
    denoiser = dist if dtype == t.float64 else copy.deepcopy(dist).to(dtype)
    ref = utils.GaussianReference(math.prod(dist.x_shape)).to(dtype)
    if reference == "fitted":
        ref.fit(dist.sample(fit_n, generator=gen(123)).to(dtype))
    return denoiser, ref, LogisticProposal(LOC, SCALE, CLIP)


def make_model(dist, reference, x_shape=None, dtype=t.float64, fit_n=2000, **kwargs):
    """DiffusionModel around the optimal denoiser of `dist`, with the N(0, I) reference or one
    fitted to fit_n samples (a finite sample, so it differs from the data's own moments).
    `dist` itself stays float64 (the model casts a copy)."""
    denoiser = dist if dtype == t.float64 else copy.deepcopy(dist)
    dm = DiffusionModel(denoiser, x_shape=x_shape or dist.x_shape, **kwargs).to(dtype)
    if reference == "fitted":
        dm.fit_reference(dist.sample(fit_n, generator=gen(123)).to(dtype))
    return dm


def assert_unbiased_and_calibrated(est, se, truth, band=(0.7, 1.4)):
    """est, se: (R, J) estimates and reported standard errors of J points over R repeats."""
    r, j = est.shape
    err = (est - truth).double()
    var = se.double().pow(2).mean(0)          # mean of se^2: unbiased for each estimate's variance
    z = err.mean(0) / (var / r).sqrt()
    assert z.abs().max() < 4.5, f"z-scores {z.tolist()}"
    assert (z ** 2).sum() < scipy.stats.chi2.isf(1e-4, j), f"z-scores {z.tolist()}"
    ratio = (err.var(0) / var).mean().sqrt().item()
    assert band[0] < ratio < band[1], f"spread / reported stderr = {ratio:.3f}"


def test_one_dimensional_formula_by_hand():
    # docs/maths.md: for x ~ N(0, lam) in 1-D with its optimal denoiser eps_hat = g z,
    # g = sqrt(s(-a)) / (s(a) lam + s(-a)), the pointwise mse is
    # E(eps - g z)^2 = (1 - g sqrt(s(-a)))^2 + g^2 s(a) x^2, and
    # 1/2 log(2 pi e) + 1/2 Int [mse - s(a)] da = 1/2 log(2 pi lam) + x^2 / (2 lam).
    sig = scipy.special.expit
    for lam, x in ((0.3, 0.0), (0.3, 1.1), (4.0, -2.5)):
        def integrand(a):
            s, sm = sig(a), sig(-a)
            g = math.sqrt(sm) / (s * lam + sm)
            return (1 - g * math.sqrt(sm)) ** 2 + g * g * s * x * x - s
        integral = sum(scipy.integrate.quad(integrand, lo, hi, epsabs=1e-12, epsrel=1e-12)[0]
                       for lo, hi in ((-np.inf, 0), (0, np.inf)))
        got = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * integral
        assert got == pytest.approx(0.5 * math.log(2 * math.pi * lam) + x * x / (2 * lam), abs=1e-8)

    # and the estimator on the same 1-D Gaussian, N(0, I) reference
    lam = 0.3
    model = exact(gaussian([0.0], [[lam]]), "standard")
    x = t.tensor([[0.0], [1.1], [-2.0]], dtype=t.float64)
    runs = [est.nll_points(*model, x, 256, seed=r) for r in range(24)]
    nll, se = (t.stack(v) for v in zip(*runs))
    assert_unbiased_and_calibrated(nll, se, 0.5 * math.log(2 * math.pi * lam) + x[:, 0] ** 2 / (2 * lam))


def expected_sq_error(ref, x, a):
    """E_eps ||eps - eps_G(z, a)||^2 for a fixed x, eps_G the optimal predictor of the Gaussian `ref`.

    With H = U diag(1 / (1 + lambda e^a)) U^T, eps - eps_G = (I - H) eps - sqrt(e^a) H (x - mu), so
    the expectation is ||I - H||_F^2 + e^a ||H (x - mu)||^2 (no sampling)."""
    d = ref.d
    u = ref.eigvecs if ref.eigvecs.numel() else t.eye(d, dtype=t.float64)
    h = u @ t.diag(1 / (1 + ref.eigvals.double() * math.exp(a))) @ u.T
    return ((t.eye(d, dtype=t.float64) - h) ** 2).sum().item() + math.exp(a) * (
        h @ (x - ref.mean.double())).pow(2).sum().item()


@pytest.mark.parametrize("reference", ["standard", "fitted"])
def test_control_variate_identity_by_quadrature(reference):
    # docs/maths.md: -log p(x) = -log q(x) + 1/2 Int E_eps[||eps - eps_hat||^2 - ||eps - eps_G||^2] da,
    # exact for the optimal eps_hat. For Gaussian data both expectations are closed-form, so the
    # integral is done by scipy quadrature and must give the exact -log p (torch.distributions) to
    # quadrature accuracy, with eps_G from the reference (N(0, I) or a fitted one).
    dist = gaussian_3d()
    _, ref, _ = exact(dist, reference, fit_n=200)
    for x in dist.sample(3, generator=gen(9)):
        def integrand(a):
            return 0.5 * (expected_sq_error(dist.components[0], x, a)
                          - expected_sq_error(ref, x, a))
        integral = sum(scipy.integrate.quad(integrand, lo, hi, epsabs=1e-11, limit=200)[0]
                       for lo, hi in ((-60, 0), (0, 60)))
        got = ref.nll(x[None])[0].item() + integral
        assert got == pytest.approx(reference_nll(dist, x[None])[0].item(), abs=1e-7)


@pytest.mark.parametrize("reference", ["standard", "fitted"])
@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_nll_points_is_exact_within_its_stderr(name, reference):
    dist = DISTRIBUTIONS[name]()
    model = exact(dist, reference, fit_n=200 if name == "gaussian" else 5000)
    x = dist.sample(7, generator=gen(1))
    truth = reference_nll(dist, x)
    runs = [est.nll_points(*model, x, 256, replicates=4, seed=100 + r) for r in range(24)]
    nll, se = (t.stack(v) for v in zip(*runs))
    assert_unbiased_and_calibrated(nll, se, truth)


@pytest.mark.parametrize("reference", ["standard", "fitted"])
def test_one_sample_is_exact(reference):
    dist = mixture_2d()
    model = exact(dist, reference)
    x = dist.sample(1, generator=gen(2))
    truth = reference_nll(dist, x)[0].item()
    nll = t.stack([est.nll_points(*model, x, 256, seed=r)[0][0] for r in range(40)])
    # one sample: the spread of the repeats is its standard error (t with 39 dof, 4.5 is p ~ 6e-5)
    assert abs(nll.mean().item() - truth) < 4.5 * nll.std().item() / math.sqrt(len(nll))


@pytest.mark.parametrize("reference", ["standard", "fitted"])
@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_training_loss_is_unbiased(name, reference):
    # the training loss (estimators.loss; its mean is DiffusionModel.nll(batch)) estimates the
    # entropy E[-log p]. Two checks over K seeded batches:
    # paired with the exact mean -log p of the same batch (only the log-SNR/noise error remains),
    # and against the entropy itself (Gaussian: MultivariateNormal.entropy(); mixture: Monte Carlo
    # of -log p over 200000 samples, whose standard error is added).
    dist = DISTRIBUTIONS[name]()
    model = exact(dist, reference)
    k, b = 48, 512
    with t.random.fork_rng():
        t.manual_seed(0)
        batches = [dist.sample(b) for _ in range(k)]
        losses = t.stack([est.loss(*model, x).mean() for x in batches])
    truth = t.stack([reference_nll(dist, x).mean() for x in batches])
    paired = losses - truth
    assert abs(paired.mean().item()) < 4.5 * paired.std().item() / math.sqrt(k)
    if name == "gaussian":
        comp = dist.components[0]
        mvn = t.distributions.MultivariateNormal(comp.mean, comp.eigvecs @ t.diag(comp.eigvals)
                                                 @ comp.eigvecs.T)
        entropy, entropy_se = mvn.entropy().item(), 0.0
    else:
        nlls = reference_nll(dist, dist.sample(200000, generator=gen(3)))
        entropy, entropy_se = nlls.mean().item(), nlls.std().item() / math.sqrt(len(nlls))
    se = math.sqrt(losses.var().item() / k + entropy_se ** 2)
    assert abs(losses.mean().item() - entropy) < 4.5 * se


def test_training_loss_is_unbiased_for_every_sample():
    # The log SNRs are stratified across the batch, so each sample must get a random stratum:
    # on a batch whose order correlates with x (first half one point, second half another; the
    # exact -log p of each is known) the mean loss must still be the mean exact -log p, within
    # 4.5 standard errors over K seeded batches.
    dist = mixture_2d()
    model = exact(dist, "standard")
    points = t.tensor([[0.3, -1.3], [-2.5, 2.5]], dtype=t.float64)
    x = points.repeat_interleave(64, 0)
    truth = reference_nll(dist, points).mean().item()
    with t.random.fork_rng():
        t.manual_seed(1)
        losses = t.stack([est.loss(*model, x).mean() for _ in range(200)])
    assert abs(losses.mean().item() - truth) < 4.5 * losses.std().item() / math.sqrt(len(losses))


class MLP(t.nn.Module):
    """A small denoiser with parameters (its matmuls run in bf16 under CPU autocast)."""

    def __init__(self, d, width=32, seed=0):
        super().__init__()
        with t.random.fork_rng():
            t.manual_seed(seed)
            self.net = t.nn.Sequential(t.nn.Linear(d + 1, width), t.nn.SiLU(),
                                       t.nn.Linear(width, d))

    def forward(self, z, logsnr):
        h = t.cat([z.flatten(1), logsnr.view(-1, 1).to(z.dtype) / 10], 1)
        return self.net(h).view_as(z)


def test_training_gradient_is_the_plain_weighted_loss():
    # The control variate has no parameters, so for every draw the gradient of nll equals that of
    # the plain importance-weighted loss mean_i 1/2 w(a_i) ||eps_i - eps_hat(z_i, a_i)||^2, and the
    # losses differ by mean_i [-log q(x_i) - 1/2 w(a_i) ||eps_i - eps_G(z_i, a_i)||^2]. The draws
    # (a_i, eps_i) are read back from the denoiser's inputs.
    dist = mixture_2d()
    rec = Recorder(MLP(2).double())
    dm = DiffusionModel(rec, x_shape=(2,)).double()
    dm.fit_reference(dist.sample(1000, generator=gen(0)))
    assert list(dm.reference.parameters()) == []
    x = dist.sample(64, generator=gen(1))
    with t.random.fork_rng():
        t.manual_seed(5)
        loss = dm.nll(x)
    grads = t.autograd.grad(loss, list(rec.parameters()))
    (z, a), = rec.calls
    s = t.sigmoid(a)[:, None]
    eps = (z - s.sqrt() * x) / (1 - s).sqrt()
    w = LogisticProposal(LOC, SCALE, CLIP).weight(a)
    plain = (0.5 * w * (eps - rec.inner(z, a)).pow(2).sum(1)).mean()
    plain_grads = t.autograd.grad(plain, list(rec.parameters()))
    for g1, g2 in zip(grads, plain_grads):
        assert t.allclose(g1, g2, rtol=1e-9, atol=1e-12)
    cv = (dm.reference.nll(x) - 0.5 * w * (eps - dm.reference.eps(z, a)).pow(2).sum(1)).mean()
    assert loss.item() == pytest.approx((plain + cv).item(), abs=1e-9)


def test_gaussian_residual_with_a_zero_net_is_the_reference():
    # eps_hat = eps_G + 0: every gap term vanishes, so -log p = -log q exactly with zero stderr
    dist = mixture_2d()
    dm = DiffusionModel(Zero(), x_shape=(2,), gaussian_residual=True).double()
    dm.fit_reference(dist.sample(500, generator=gen(0)))
    x = dist.sample(5, generator=gen(1))
    nll, se = dm.nll_points(x, 64, seed=2)
    assert t.allclose(nll, dm.reference.nll(x), atol=1e-12) and (se == 0).all()


def test_a_residual_denoiser_shares_the_gaussian_prediction(monkeypatch):
    # predictions gives forward's eps_hat bit for bit while computing eps_G once; mse_gap, the
    # training loss and fit_proposal go through it, so their values are those of two calls
    from denoisers import MLPDenoiser
    dist = mixture_2d()
    dm = DiffusionModel(MLPDenoiser(16, 2, 8), x_shape=(2,), gaussian_residual=True).double()
    dm.fit_reference(dist.sample(500, generator=gen(0)))
    z, a = dist.sample(64, generator=gen(1)), t.linspace(-3, 5, 64, dtype=t.float64)
    calls, eps = [], dm.reference.eps
    monkeypatch.setattr(dm.reference, "eps", lambda *args: calls.append(1) or eps(*args))
    eps_hat, eps_g = est.predictions(dm, dm.reference, z, a)
    assert len(calls) == 1 and dm.residual_of is dm.reference
    assert t.equal(eps_hat, dm(z, a)) and t.equal(eps_g, eps(z, a))
    plain = DiffusionModel(dm.model, x_shape=(2,)).double()  # no residual: the network alone
    assert plain.residual_of is None
    assert t.equal(est.predictions(plain, dm.reference, z, a)[0], dm.model(z, a))


@pytest.mark.parametrize("dtype", [t.float32, t.float64])
@pytest.mark.parametrize("x_shape, reference", [((1, 4, 4), "fitted"), ((3, 2, 2), "standard"),
                                                ((1, 4, 4), "standard"), ((3, 2, 2), "fitted")])
def test_any_sample_shape_and_dtype(x_shape, reference, dtype):
    # a Gaussian with full covariance on image-shaped samples
    d = int(np.prod(x_shape))
    dist = gaussian(0.3 * t.randn((1,) + x_shape, generator=gen(3), dtype=t.float64)[0],
                    random_cov(d, seed=4, floor=0.1))
    model = exact(dist, reference, dtype=dtype, fit_n=200)
    x = dist.sample(4, generator=gen(5)).to(dtype)
    truth = reference_nll(dist, x)
    runs = [est.nll_points(*model, x, 256, seed=10 + r) for r in range(12)]
    nll, se = (t.stack(v) for v in zip(*runs))
    assert nll.dtype == se.dtype == dtype and nll.shape == (12, 4)
    # 4 points x 11 dof: a wider calibration band
    assert_unbiased_and_calibrated(nll, se, truth, band=(0.55, 1.7))
    with t.random.fork_rng():
        t.manual_seed(0)
        loss = est.loss(*model, x)
    assert loss.dtype == dtype and loss.shape == (4,) and t.isfinite(loss).all()
    # the same through the LightningModule (DiffusionModel casts a copy of the denoiser)
    dm = make_model(dist, reference, dtype=dtype, fit_n=200)
    assert t.equal(dm.nll_points(x, 256, seed=10)[0], runs[0][0])
    with t.random.fork_rng():
        t.manual_seed(0)
        assert dm.nll(x).item() == loss.mean().item()


def test_bf16_autocast():
    dist = mixture_2d()
    dm = DiffusionModel(MLP(2), x_shape=(2,))
    dm.fit_reference(dist.sample(1000, generator=gen(0)))
    x = dist.sample(256, generator=gen(1)).float()
    with t.autocast("cpu", dtype=t.bfloat16):
        assert dm.model(x, t.zeros(256)).dtype == t.bfloat16  # the matmuls do run in bf16
        loss = dm.nll(x)
        nll, se = dm.nll_points(x[:8], 64, seed=2)
    assert loss.dtype == t.float32 and t.isfinite(loss)
    assert nll.dtype == se.dtype == t.float32 and t.isfinite(nll).all() and t.isfinite(se).all()
    loss.backward()
    assert all(t.isfinite(p.grad).all() for p in dm.parameters())


class ZeroMatmul(MLP):
    """Runs its matmuls (in bf16 under autocast) and returns exactly 0 whatever the precision."""

    def forward(self, z, logsnr):
        return super().forward(z, logsnr) * 0


@pytest.mark.parametrize("d", [2, 48])
def test_bf16_autocast_keeps_the_gaussian_terms_in_float32(d):
    # -log q(x) and eps_G have no parameters and must be computed in float32 under autocast. With a
    # denoiser that returns exactly 0, autocast must then not change nll_points beyond float32
    # rounding; bf16 (8-bit mantissa) in the rotation U^T (x - mu) is off by ~1e-3 relative.
    dist = gaussian(t.zeros(d), random_cov(d, seed=6))
    dm = DiffusionModel(ZeroMatmul(d), x_shape=(d,))
    dm.fit_reference(dist.sample(4 * d, generator=gen(0)))
    x = dist.sample(8, generator=gen(1)).float()
    plain = dm.nll_points(x, 64, seed=3)[0]
    with t.autocast("cpu", dtype=t.bfloat16):
        cast = dm.nll_points(x, 64, seed=3)[0]
    assert t.allclose(cast, plain, rtol=1e-5, atol=1e-5), (cast - plain).tolist()


def test_reproducible_with_a_seed():
    dist = mixture_2d()
    model = exact(dist, "fitted")
    x = dist.sample(6, generator=gen(0))
    state = t.random.get_rng_state()
    first = est.nll_points(*model, x, 64, seed=1)
    again = est.nll_points(*model, x, 64, seed=1)
    other = est.nll_points(*model, x, 64, seed=2)
    assert t.equal(state, t.random.get_rng_state()), "a seed was given: global RNG untouched"
    assert t.equal(first[0], again[0]) and t.equal(first[1], again[1])
    assert not t.equal(first[0], other[0])
    # seed=None: a fresh seed from the global RNG (utils.fresh_seed), so seeding torch repeats it
    with t.random.fork_rng():
        t.manual_seed(3)
        fresh = est.nll_points(*model, x, 64)
        t.manual_seed(3)
        assert t.equal(fresh[0], est.nll_points(*model, x, 64)[0])


def test_mse_curve_of_the_optimal_denoiser_is_the_mmse():
    # For the Gaussian's own denoiser E_x mse(x, a) = sum_i s(a + log lambda_i). The per-sample
    # error is a sum of independent N(0, m_i)^2 terms, variance 2 sum_i m_i^2 <= 2d, which gives
    # the standard error of the mean over n samples; 5 of those is the tolerance.
    dist = gaussian_3d()
    denoiser, reference, _ = exact(dist, "fitted")
    n = 4000
    x = dist.sample(n, generator=gen(0))
    logsnrs = t.linspace(-6, 6, 7, dtype=t.float64)
    mse, ref = est.mse_curve(denoiser, reference, x, logsnrs, generator=gen(1))
    mmse = dist.components[0].mmse(logsnrs)
    m = t.sigmoid(logsnrs[:, None] + dist.components[0].eigvals.log())
    assert ((mse - mmse).abs() < 5 * (2 * m.pow(2).sum(1) / n).sqrt()).all()
    assert t.allclose(ref, reference.mmse(logsnrs))


def test_sampler_reproduces_a_gaussian():
    # With the exact denoiser DDIM follows the probability-flow ODE, so the samples are N(mu, Sigma)
    # up to discretisation. For a Gaussian every step is affine, so the exact output law can be
    # computed by pushing the basis through the steps: at 200 steps its covariance is off by
    # 1.7% of sqrt(S_ii S_jj) (first order: 3.4% at 100 steps, 0.9% at 400) and its mean by
    # 0.004 (the start from N(0, I) instead of the marginal at log SNR -12). Tolerance: 5 standard
    # errors of the sample mean, sqrt(S_ii / n), and of the sample covariance (Wishart),
    # sqrt((S_ij^2 + S_ii S_jj) / n), plus 3% of sqrt(S_ii S_jj) for the covariance discretisation.
    dist = gaussian_3d()
    comp = dist.components[0]
    cov = comp.eigvecs @ t.diag(comp.eigvals) @ comp.eigvecs.T
    n = 20000
    draws = est.sample(*exact(dist, "standard"), n, (3,), steps=200, generator=gen(0))
    assert draws.shape == (n, 3)
    var = cov.diag()
    assert ((draws.mean(0) - comp.mean).abs() < 5 * (var / n).sqrt()).all()
    scale = (var[:, None] * var[None, :]).sqrt()
    tol = 5 * ((cov ** 2 + scale ** 2) / n).sqrt() + 0.03 * scale
    assert ((draws.T.cov() - cov).abs() < tol).all(), (draws.T.cov() - cov)


def test_the_model_samples_in_chunks_of_bounded_size(monkeypatch):
    # DiffusionModel.sample: at most estimators.default_chunk samples per denoiser call (3 here:
    # 7 samples as 3 + 3 + 1, each chunk its own steps), so --num_samples bounds only the time
    monkeypatch.setattr(est, "default_chunk", lambda d, device: 3)
    recorder = Recorder(Zero())
    x = DiffusionModel(recorder, x_shape=(2,)).sample(7, steps=2, generator=gen(0))
    assert x.shape == (7, 2) and [len(z) for z, _ in recorder.calls] == [3, 3, 3, 3, 1, 1]


def test_score_is_the_noisy_marginal_score():
    # the score of the noisy marginal is -eps_hat(z, a) / sqrt(s(-a)) (Tweedie), which for the
    # Gaussian's optimal denoiser is
    # grad_z log N(z; sqrt(s) mu, s Sigma + s(-a) I) = -(s Sigma + s(-a) I)^-1 (z - sqrt(s) mu)
    dist = gaussian_3d()
    comp = dist.components[0]
    cov = comp.eigvecs @ t.diag(comp.eigvals) @ comp.eigvecs.T
    dm = make_model(dist, "standard")
    logsnrs = t.tensor([-5., -1., 0., 2., 6.], dtype=t.float64)
    z = t.randn(5, 3, generator=gen(0), dtype=t.float64)
    expected = []
    for zi, a in zip(z, logsnrs):
        s = t.sigmoid(a)
        expected.append(-t.linalg.inv(s * cov + (1 - s) * t.eye(3, dtype=t.float64))
                        @ (zi - s.sqrt() * comp.mean))
    score = -dm(z, logsnrs) / t.sigmoid(-logsnrs).sqrt()[:, None]
    assert t.allclose(score, t.stack(expected), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
class WrongShape(t.nn.Module):
    def forward(self, z, logsnr):
        return z[..., :1]


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        DiffusionModel(WrongShape(), x_shape=(2,)).nll(t.randn(4, 2))
    with pytest.raises(ValueError, match="logsnr_scale"):
        DiffusionModel(mixture_2d(), logsnr_scale=0.)
    with pytest.raises(ValueError, match="logsnr_scale"):
        DiffusionModel(mixture_2d(), logsnr_scale=-1.)
    with pytest.raises(ValueError, match="clip"):
        DiffusionModel(mixture_2d(), clip=0.)
    dm = make_model(mixture_2d(), "standard")
    x = mixture_2d().sample(3, generator=gen(0))
    with pytest.raises(ValueError, match="npoints"):
        dm.nll_points(x, npoints=1)
    with pytest.raises(ValueError, match="replicates"):
        dm.nll_points(x, npoints=8, replicates=9)
    with pytest.raises(ValueError, match="replicates"):
        dm.nll_points(x, npoints=8, replicates=0)
    # one replicate is allowed (validation uses it): no spread to measure, a NaN standard error
    nll, se = dm.nll_points(x, npoints=8, replicates=1, seed=1)
    assert t.isfinite(nll).all() and se.isnan().all()
    with pytest.raises(ValueError, match="unconditional"):
        dm.nll_points(x, 16, y=t.zeros(3, dtype=t.long))
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dm.nll_points(bad, 16, seed=1)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        dm.nll(bad)
    with pytest.raises(ValueError, match="sample shape"):
        dm.nll_points(t.randn(3, 3, dtype=t.float64), 16)
    with pytest.raises(ValueError, match="sample shape"):
        dm.nll(t.randn(3, 2, 1, dtype=t.float64))
    with pytest.raises(ValueError, match="floating-point"):
        dm.nll(t.ones(3, 2, dtype=t.long))


def lightning_trainer(**kwargs):
    import pytorch_lightning as pl
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def loader(x, batch_size=64):
    return t.utils.data.DataLoader(t.utils.data.TensorDataset(x), batch_size=batch_size)


def test_non_finite_loss_stops_training():
    # a denoiser that returns NaN above log SNR 5: fit must stop and name those log SNRs
    class NanAbove5(MLP):
        def forward(self, z, logsnr):
            out = super().forward(z, logsnr)
            return t.where((logsnr > 5).view(-1, 1), t.full_like(out, float("nan")), out)
    dm = DiffusionModel(NanAbove5(2), x_shape=(2,))
    x = mixture_2d().sample(512, generator=gen(0)).float()
    with pytest.raises(FloatingPointError, match="log SNR") as info:
        lightning_trainer(limit_val_batches=0).fit(dm, loader(x, 256))
    listed = re.search(r"\[(.*?)\]", str(info.value)).group(1)
    values = [float(v) for v in listed.split(",")]
    assert values and all(v > 5 for v in values), str(info.value)


def test_checkpoint_round_trip_keeps_the_fitted_reference(tmp_path):
    dist = mixture_2d()
    x = dist.sample(512, generator=gen(0)).float()
    dm = DiffusionModel(MLP(2), x_shape=(2,), logsnr_loc=1.5, clip=5., val_npoints=8)
    dm.fit_reference(x)
    trainer = lightning_trainer(limit_train_batches=4, limit_val_batches=1)
    trainer.fit(dm, loader(x), loader(x[:128], 128))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = DiffusionModel.load_from_checkpoint(path, denoiser=MLP(2, seed=1))
    assert loaded.reference.eigvecs.shape == (2, 2)
    for name in ("mean", "eigvals", "eigvecs"):
        assert t.equal(getattr(loaded.reference, name), getattr(dm.reference, name))
    assert (loaded.hparams.logsnr_loc, loaded.hparams.clip) == (1.5, 5.)
    for p, q in zip(loaded.parameters(), dm.parameters()):
        assert t.equal(p, q)
    assert t.equal(loaded.nll_points(x[:8], 32, seed=1)[0],
                   dm.nll_points(x[:8], 32, seed=1)[0])


# ---------------------------------------------------------------------------------------------
# Conditional estimates: i(x; y) by Bayes' rule, and the class-conditional reference
# ---------------------------------------------------------------------------------------------
def overlapping_classes():
    """Three overlapping labels, each a non-Gaussian pair of components (tests/analytic.py
    GroupedMixture): p(y | x) is far from certain, and the label terms' replicates are noisy."""
    from tests.analytic import GroupedMixture
    return GroupedMixture([0.2, 0.15, 0.15, 0.2, 0.15, 0.15],
                          [[-1.0, 0.0], [0.6, 0.8], [0.9, -0.6], [-0.2, 0.9], [-0.6, -0.8],
                           [0.3, 0.1]], [[[0.15, 0.05], [0.05, 0.10]]] * 6, [0, 0, 1, 1, 2, 2])


def labelled_exact_model(mix, **kwargs):
    """mix's exact conditional denoiser as a float64 DiffusionModel, its references (the
    marginal and each label's) fitted on 20000 samples, its label prior the exact one (a fitted
    prior would shift confident points' log p(y | x) by its own error)."""
    dm = DiffusionModel(mix, x_shape=(2,), num_classes=mix.num_classes, **kwargs).double()
    x, y = mix.sample_labelled(20000, generator=gen(0))
    dm.fit_reference(x, y).label_log_prior = mix.log_prior()
    return dm


def test_information_by_bayes_rule_is_unbiased_at_16_points_per_label():
    # log p(y | x) is a log-softmax of noisy per-label estimates: the plug-in leans low by
    # Jensen (measured -0.055 to -0.067 nats here at 16 points per label, R = 4 replicates, with
    # an integration spread of 0.38 nats per sample); the jackknife over the replicates removes
    # the first-order lean. 1000 points, 4 seeds: each mean within 3 standard errors (over the
    # points) + 0.01 of the exact mean of i(x; y) = log p(x | y) - log p(x) (closed forms)
    mix = overlapping_classes()
    dm = labelled_exact_model(mix)
    for seed in range(4):
        x, y = mix.sample_labelled(1000, generator=gen(10 + seed))
        terms = est.label_terms(dm, dm.reference, dm.proposal, x, t.arange(-1, 3), 16, seed=seed)
        bayes, spread = est.label_statistics(terms, dm.label_log_prior, y)["bayes"]
        err = bayes - (mix.nll(x) - mix.nll_given(x, y))
        stderr = err.std().item() / math.sqrt(len(x))
        assert abs(err.mean().item()) < 3 * stderr + 0.01, (seed, err.mean().item(), stderr)
        assert spread.pow(2).mean().sqrt() > 0.2  # the integration noise is measured, not 0


def test_jackknife_standard_error_is_calibrated():
    # 12 points scored 60 times (independent copies by index): the spread of the Bayes-rule
    # values over the repeats against the reported jackknife standard error, and unbiasedness
    from tests.checks import assert_unbiased_and_calibrated
    mix = overlapping_classes()
    dm = labelled_exact_model(mix)
    x, y = mix.sample_labelled(12, generator=gen(3))
    reps = 60
    terms = est.label_terms(dm, dm.reference, dm.proposal, x.repeat(reps, 1), t.arange(-1, 3), 64,
                            seed=4)
    bayes, spread = est.label_statistics(terms, dm.label_log_prior, y.repeat(reps))["bayes"]
    assert_unbiased_and_calibrated(bayes.view(reps, 12), spread.view(reps, 12),
                                   mix.nll(x) - mix.nll_given(x, y), band=(0.7, 1.5))


def test_class_posterior_is_the_jackknifed_bayes_rule():
    # log p(k | x) for every label: the jackknife's common shift keeps the posterior odds of the
    # plug-in (so the argmax, and accuracy, are the same), and at 1024 points the posterior is
    # within 0.03 of Bayes' exact one (closed forms)
    mix = overlapping_classes()
    dm = labelled_exact_model(mix)
    x, _ = mix.sample_labelled(50, generator=gen(5))
    post = dm.class_log_posterior(x, 64, seed=6)
    terms = est.label_terms(dm, dm.reference, dm.proposal, x, t.arange(3), 64, seed=6)
    plug = (dm.label_log_prior - terms.mean(1)).log_softmax(1)
    odds = post - post[:, :1]
    assert t.allclose(odds, plug - plug[:, :1], atol=1e-9)
    exact = (mix.log_prior() - t.stack([mix.nll_given(x, t.full((50,), k)) for k in range(3)], 1)
             ).log_softmax(1)
    close = dm.class_log_posterior(x, 1024, seed=7)
    assert (close.exp() - exact.exp()).abs().max() < 0.03
    with pytest.raises(ValueError, match="unconditional"):
        DiffusionModel(mix, x_shape=(2,)).double().nll_points(x, 16, y=t.zeros(50, dtype=t.long))


def test_class_conditional_reference_makes_the_low_snr_tail_exact():
    # Two labels with class means about -+2 (the data mean near -0.4) and an integration range
    # starting at log SNR -4.5 (moons' defaults: loc 4.5, scale 2.25, clip 4). Below the range
    # the estimate takes the reference's predictor; the unconditional one leans by about
    # 1/2 e^(a_min) |m_y - m|^2 = +0.024 nats on average (measured +0.025 +- 0.003 here, and
    # +0.023 +- 0.001 over 8 seeds), each label's own data-matched Gaussian by O(e^(3 a_min)).
    # 2000 labelled points at 256 points each: -log p(x | y) within 0.01 of the closed form.
    from tests.analytic import far_classes_2d
    mix = far_classes_2d()
    dm = labelled_exact_model(mix, logsnr_loc=4.5, logsnr_scale=2.25, clip=4.)
    assert dm.proposal.range[0] == -4.5
    x, y = mix.sample_labelled(2000, generator=gen(1))
    nll, _ = dm.nll_points(x, 256, seed=3, y=y)
    err = nll - mix.nll_given(x, y)
    assert abs(err.mean().item()) < 0.01, err.mean().item()
    # the same estimator with the unconditional reference for every label (what the first-order
    # term says) leans by more than 0.01: the test tells the two apart
    unconditional = utils.GaussianReference(2, 2).double()
    unconditional.fit(mix.sample_labelled(20000, generator=gen(0))[0])
    marginal = unconditional.state_dict()
    for k in range(2):
        marginal["class_mean"][k], marginal["class_eigvals"][k] = marginal["mean"], marginal["eigvals"]
    marginal["class_eigvecs"] = marginal["eigvecs"].expand(2, 2, 2).clone()
    unconditional.load_state_dict(marginal)
    leaning, _ = est.nll_points(dm, unconditional, dm.proposal, x, 256, seed=3, y=y)
    assert (leaning - mix.nll_given(x, y)).mean() > 0.015
    # i(x; y) by the difference form, on the same noise: within 0.01 of exact too
    mi, _ = dm.mi_points(x, y, 256, seed=3)
    assert abs((mi - (mix.nll(x) - mix.nll_given(x, y))).mean().item()) < 0.01
