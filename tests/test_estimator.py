"""Tests of the estimator in DiffusionModel against exact answers.

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
    dm = make_model(gaussian([0.0], [[lam]]), "standard")
    x = t.tensor([[0.0], [1.1], [-2.0]], dtype=t.float64)
    runs = [dm.nll_points(x, 256, seed=r) for r in range(24)]
    est, se = (t.stack(v) for v in zip(*runs))
    assert_unbiased_and_calibrated(est, se, 0.5 * math.log(2 * math.pi * lam) + x[:, 0] ** 2 / (2 * lam))


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
    # quadrature accuracy, with eps_G from the model's reference (N(0, I) or a fitted one).
    dist = gaussian_3d()
    dm = make_model(dist, reference, fit_n=200)
    for x in dist.sample(3, generator=gen(9)):
        def integrand(a):
            return 0.5 * (expected_sq_error(dist.components[0], x, a)
                          - expected_sq_error(dm.reference, x, a))
        integral = sum(scipy.integrate.quad(integrand, lo, hi, epsabs=1e-11, limit=200)[0]
                       for lo, hi in ((-60, 0), (0, 60)))
        got = dm.reference.nll(x[None])[0].item() + integral
        assert got == pytest.approx(reference_nll(dist, x[None])[0].item(), abs=1e-7)


@pytest.mark.parametrize("reference", ["standard", "fitted"])
@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_nll_points_is_exact_within_its_stderr(name, reference):
    dist = DISTRIBUTIONS[name]()
    dm = make_model(dist, reference, fit_n=200 if name == "gaussian" else 5000)
    x = dist.sample(7, generator=gen(1))
    truth = reference_nll(dist, x)
    runs = [dm.nll_points(x, 256, replicates=4, seed=100 + r) for r in range(24)]
    est, se = (t.stack(v) for v in zip(*runs))
    assert_unbiased_and_calibrated(est, se, truth)


@pytest.mark.parametrize("reference", ["standard", "fitted"])
def test_nll_x_is_exact(reference):
    dist = mixture_2d()
    dm = make_model(dist, reference)
    x = dist.sample(1, generator=gen(2))[0]
    truth = reference_nll(dist, x[None])[0].item()
    est = t.stack([dm.nll_x(x, npoints=256, seed=r) for r in range(40)])
    # one sample: the spread of the repeats is its standard error (t with 39 dof, 4.5 is p ~ 6e-5)
    assert abs(est.mean().item() - truth) < 4.5 * est.std().item() / math.sqrt(len(est))
    # nll_x is nll_points on a batch of one
    same = dm.nll_points(x[None], 256, seed=7)[0][0]
    assert dm.nll_x(x, npoints=256, seed=7).item() == same.item()


@pytest.mark.parametrize("reference", ["standard", "fitted"])
@pytest.mark.parametrize("name", ["gaussian", "mixture"])
def test_training_loss_is_unbiased(name, reference):
    # nll(batch) estimates the entropy E[-log p]. Two checks over K seeded batches:
    # paired with the exact mean -log p of the same batch (only the log-SNR/noise error remains),
    # and against the entropy itself (Gaussian: MultivariateNormal.entropy(); mixture: Monte Carlo
    # of -log p over 200000 samples, whose standard error is added).
    dist = DISTRIBUTIONS[name]()
    dm = make_model(dist, reference)
    k, b = 48, 512
    with t.random.fork_rng():
        t.manual_seed(0)
        batches = [dist.sample(b) for _ in range(k)]
        losses = t.stack([dm.nll(x) for x in batches])
    exact = t.stack([reference_nll(dist, x).mean() for x in batches])
    paired = losses - exact
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
    dm = make_model(dist, "standard")
    points = t.tensor([[0.3, -1.3], [-2.5, 2.5]], dtype=t.float64)
    x = points.repeat_interleave(64, 0)
    exact = reference_nll(dist, points).mean().item()
    with t.random.fork_rng():
        t.manual_seed(1)
        losses = t.stack([dm.nll(x) for _ in range(200)])
    assert abs(losses.mean().item() - exact) < 4.5 * losses.std().item() / math.sqrt(len(losses))


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


@pytest.mark.parametrize("dtype", [t.float32, t.float64])
@pytest.mark.parametrize("x_shape, reference", [((1, 4, 4), "fitted"), ((3, 2, 2), "standard"),
                                                ((1, 4, 4), "standard"), ((3, 2, 2), "fitted")])
def test_any_sample_shape_and_dtype(x_shape, reference, dtype):
    # a Gaussian with full covariance on image-shaped samples
    d = int(np.prod(x_shape))
    dist = gaussian(0.3 * t.randn((1,) + x_shape, generator=gen(3), dtype=t.float64)[0],
                    random_cov(d, seed=4, floor=0.1))
    dm = make_model(dist, reference, dtype=dtype, fit_n=200)
    x = dist.sample(4, generator=gen(5)).to(dtype)
    truth = reference_nll(dist, x)
    runs = [dm.nll_points(x, 256, seed=10 + r) for r in range(12)]
    est, se = (t.stack(v) for v in zip(*runs))
    assert est.dtype == se.dtype == dtype and est.shape == (12, 4)
    # 4 points x 11 dof: a wider calibration band
    assert_unbiased_and_calibrated(est, se, truth, band=(0.55, 1.7))
    with t.random.fork_rng():
        t.manual_seed(0)
        loss = dm.nll(x)
    assert loss.dtype == dtype and t.isfinite(loss)


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
    dm = make_model(dist, "fitted")
    x = dist.sample(6, generator=gen(0))
    state = t.random.get_rng_state()
    first = dm.nll_points(x, 64, seed=1)
    again = dm.nll_points(x, 64, seed=1)
    other = dm.nll_points(x, 64, seed=2)
    assert t.equal(state, t.random.get_rng_state()), "a seed was given: global RNG untouched"
    assert t.equal(first[0], again[0]) and t.equal(first[1], again[1])
    assert not t.equal(first[0], other[0])
    assert dm.nll_x(x[0], 64, seed=1).item() == dm.nll_x(x[0], 64, seed=1).item()
    assert t.equal(state, t.random.get_rng_state())
    # seed=None: a fresh seed from the global RNG (utils.fresh_seed), so seeding torch repeats it
    with t.random.fork_rng():
        t.manual_seed(3)
        fresh = dm.nll_points(x, 64)
        t.manual_seed(3)
        assert t.equal(fresh[0], dm.nll_points(x, 64)[0])


def test_mse_curve_of_the_optimal_denoiser_is_the_mmse():
    # For the Gaussian's own denoiser E_x mse(x, a) = sum_i s(a + log lambda_i). The per-sample
    # error is a sum of independent N(0, m_i)^2 terms, variance 2 sum_i m_i^2 <= 2d, which gives
    # the standard error of the mean over n samples; 5 of those is the tolerance.
    dist = gaussian_3d()
    dm = make_model(dist, "fitted")
    n = 4000
    x = dist.sample(n, generator=gen(0))
    logsnrs = t.linspace(-6, 6, 7, dtype=t.float64)
    mse, ref = dm.mse_curve(x, logsnrs, generator=gen(1))
    exact = dist.components[0].mmse(logsnrs)
    m = t.sigmoid(logsnrs[:, None] + dist.components[0].eigvals.log())
    assert ((mse - exact).abs() < 5 * (2 * m.pow(2).sum(1) / n).sqrt()).all()
    assert t.allclose(ref, dm.reference.mmse(logsnrs))


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
    dm = make_model(dist, "standard")
    n = 20000
    draws = dm.sample(n, steps=200, generator=gen(0))
    assert draws.shape == (n, 3)
    var = cov.diag()
    assert ((draws.mean(0) - comp.mean).abs() < 5 * (var / n).sqrt()).all()
    scale = (var[:, None] * var[None, :]).sqrt()
    tol = 5 * ((cov ** 2 + scale ** 2) / n).sqrt() + 0.03 * scale
    assert ((draws.T.cov() - cov).abs() < tol).all(), (draws.T.cov() - cov)


def test_score_is_the_noisy_marginal_score():
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
    assert t.allclose(dm.score(z, logsnrs), t.stack(expected), rtol=1e-9, atol=1e-9)


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
        dm.nll_points(x, npoints=8, replicates=1)
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
