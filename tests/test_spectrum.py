"""Tests of the log-SNR range from the data covariance spectrum (the fitted GaussianReference's
eigenvalues, proposals.spectrum_logsnr_params), including the test that decides between the paper
code's c = 3/pi and the moment-matching c = 3/pi^2 in scale = sqrt(1 + c Var(log lambda)): the
library keeps the paper's (proposals.SPECTRUM_VARIANCE); the moment rule is defined here.
"""
import math

import pytest
import torch as t

import estimators
import proposals
import utils
from proposals import LogisticProposal
from tests.analytic import gaussian, reference_nll
from tests.checks import gen


pytestmark = pytest.mark.usefixtures("one_thread")

# c in scale = sqrt(1 + c Var(log lambda)): the paper code's 3/pi, and moment matching's 3/pi^2
# (the variance of a standard logistic is pi^2/3)
RULES = {"paper": 3 / math.pi, "moment": 3 / math.pi ** 2}


def spectrum_params(eigvals, rule):
    """proposals.spectrum_logsnr_params with the constant c of `rule` in place of the library's."""
    saved = proposals.SPECTRUM_VARIANCE
    proposals.SPECTRUM_VARIANCE = RULES[rule]
    try:
        return proposals.spectrum_logsnr_params(eigvals)
    finally:
        proposals.SPECTRUM_VARIANCE = saved


def rotated(eigvals, seed):
    """A covariance with the given eigenvalues and a random orthogonal eigenbasis."""
    d = len(eigvals)
    q, _ = t.linalg.qr(t.randn(d, d, generator=gen(seed), dtype=t.float64))
    return q @ t.diag(eigvals) @ q.T


def test_params_by_hand():
    # log lambda = (-4, -1, 0, 1): mean -1, population variance (9 + 0 + 1 + 4) / 4 = 3.5;
    # the outermost crossings -log lambda are 4 and -1, so loc +- clip * scale must reach
    # 4 + 8 and -1 - 8: 11 units above loc = 1 is the farther
    lam = t.tensor([-4., -1., 0., 1.], dtype=t.float64).exp()
    for rule, c in (("paper", 3 / math.pi), ("moment", 3 / math.pi ** 2)):
        loc, scale, clip = spectrum_params(lam, rule)
        assert loc == pytest.approx(1.0) and scale == pytest.approx(math.sqrt(1 + c * 3.5))
        assert clip == pytest.approx(max(4., 11 / scale))
    # the library's rule is the paper's
    assert proposals.SPECTRUM_VARIANCE == 3 / math.pi
    assert proposals.spectrum_logsnr_params(lam) == spectrum_params(lam, "paper")
    # one eigenvalue: scale 1 (a single logistic CDF), clip from the margin
    assert proposals.spectrum_logsnr_params([math.exp(2.)]) == pytest.approx((-2., 1., 8.))


def test_params_from_data_with_a_known_covariance():
    # n = 20000 samples of a 6-D Gaussian with eigenvalues e^(-5 .. 1): each sample eigenvalue is
    # within 5 standard errors lambda sqrt(2/n) of the truth (plus the spread of neighbouring
    # eigenvalues, absent here: they are e apart), so log lambda within 5 sqrt(2/n), and loc and
    # scale within the same bound
    lam = t.linspace(-5, 1, 6, dtype=t.float64).exp()
    n = 20000
    x = t.distributions.MultivariateNormal(t.zeros(6, dtype=t.float64), rotated(lam, 0)).sample((n,))
    est = utils.GaussianReference(6).double().fit(x).eigvals
    tol = 5 * math.sqrt(2 / n)
    assert ((est.log() - lam.log()).abs() < tol).all()
    for rule in ("paper", "moment"):
        got = spectrum_params(est, rule)
        true = spectrum_params(lam, rule)
        assert got[0] == pytest.approx(true[0], abs=tol) and got[1] == pytest.approx(true[1], abs=tol)


def test_spectrum_with_fewer_samples_than_dimensions_is_ledoit_wolfs():
    # n <= d: the sample covariance is singular; the reference uses scikit-learn's Ledoit-Wolf
    # shrinkage, whose spectrum is positive, and the range derived from it is finite
    from sklearn.covariance import ledoit_wolf
    x = t.randn(5, 12, generator=gen(1), dtype=t.float64)
    lw = t.linalg.eigvalsh(t.from_numpy(ledoit_wolf((x - x.mean(0)).numpy(), assume_centered=True)[0]))
    eig = utils.GaussianReference(12).double().fit(x).eigvals
    assert t.allclose(eig, lw) and (eig > 0).all()
    assert all(math.isfinite(v) for v in proposals.spectrum_logsnr_params(eig))


def test_ledoit_wolf_below_ten_samples_per_dimension_is_closer_to_the_truth():
    # Gaussian data, d = 48, a spectrum spread over e^-3 .. e^1, n = 78 (n/d = 1.63, as 5000
    # CIFAR-10 images are for d = 3072): the held-out -log q of the fitted reference against the
    # true Gaussian's, per dimension. The plain sample covariance overfits (its smallest
    # eigenvalues shrink towards 0); Ledoit-Wolf (the fit's choice below n = 10 d) is much closer.
    d, n = 48, 78
    cov = rotated(t.linspace(-3, 1, d, dtype=t.float64).exp(), 11)
    truth = t.distributions.MultivariateNormal(t.zeros(d, dtype=t.float64), cov)
    chol = t.linalg.cholesky(cov)
    train, test, big = (t.randn(m, d, generator=gen(12 + k), dtype=t.float64) @ chol.T
                        for k, m in enumerate((n, 4000, 10 * d)))
    exact = -truth.log_prob(test).mean().item()
    lw = utils.GaussianReference(d).double().fit(train).nll(test).mean().item()
    xc = train - train.mean(0)
    plain = utils.GaussianReference(d).double()
    plain.mean = train.mean(0)
    plain.eigvals, plain.eigvecs = t.linalg.eigh(xc.T @ xc / (n - 1))
    plain.eigvals = plain.eigvals.clamp_min(1e-6 * plain.eigvals.mean())
    excess_lw, excess_plain = (lw - exact) / d, (plain.nll(test).mean().item() - exact) / d
    assert 0 < excess_lw < 0.5 * excess_plain, (excess_lw, excess_plain)
    # from ten samples per dimension on, the sample covariance itself
    ref = utils.GaussianReference(d).double().fit(big)
    assert t.allclose(ref.eigvals, t.linalg.eigvalsh(big.T.cov()).clamp_min(0), rtol=1e-8)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="at least 2"):
        utils.GaussianReference(4).fit(t.randn(1, 4))
    bad = t.randn(10, 4)
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        utils.GaussianReference(4).fit(bad)
    for eig in ([], [1., 0.], [1., -2.], [float("nan")]):
        with pytest.raises(ValueError, match="eigenvalues"):
            proposals.spectrum_logsnr_params(eig)


def estimator_variance(rule, loglam, reference, points=8, repeats=100, npoints=64):
    """Per-point variance of nll_points (averaged over `points` data points) for Gaussian data with
    eigenvalues exp(loglam) and its exact denoiser, the range from spectrum_logsnr_params(rule),
    and a reference that is not the data's own Gaussian (else the integrand would vanish):
    "standard" N(0, I), or "diagonal" (the data's mean and per-coordinate variances). Also
    returns the mean error against the exact -log p and its standard error."""
    d = len(loglam)
    cov = rotated(loglam.exp(), 4)
    mean = 0.5 * t.randn(d, generator=gen(5), dtype=t.float64)
    dist = gaussian(mean, cov)
    proposal = LogisticProposal(*spectrum_params(loglam.exp(), rule))
    ref = utils.GaussianReference(d).double()
    if reference == "diagonal":
        ref.mean, ref.eigvals = mean.clone(), cov.diagonal().clone()
    x = dist.sample(points, generator=gen(6))
    est = estimators.nll_points(dist, ref, proposal, x.repeat(repeats, 1), npoints, replicates=2,
                                seed=7)[0]
    est = est.view(repeats, points)
    err = est.mean(0) - reference_nll(dist, x)
    return est.var(0).mean().item(), err.mean().item(), (est.var(0) / repeats).mean().sqrt().item()


@pytest.mark.parametrize("reference", ["standard", "diagonal"])
def test_paper_rule_has_the_lower_variance(reference):
    # Decides the default rule. Gaussian data with the power-law spectrum lambda_k = 1/k, d = 32
    # (log lambda spread over 3.5 nats, like the bulk of an image spectrum), its exact denoiser, 64
    # points per estimate. Both ranges reach 8 beyond every -log lambda_k, so neither rule is
    # biased (checked); c = 3/pi (wider) gives about 0.6 times the variance of c = 3/pi^2
    # (measured here: standard 1.76 vs 2.62, diagonal 1.01 vs 1.69 nats^2; with 400 repeats
    # 1.90 vs 3.14 and 1.00 vs 1.67). The margin 0.8 is about 4 standard errors of the ratio of
    # two 800-sample variance estimates away from the measured 0.60-0.67.
    loglam = -t.arange(1, 33, dtype=t.float64).log()
    paper, moment = (estimator_variance(rule, loglam, reference) for rule in ("paper", "moment"))
    for _, bias, se in (paper, moment):
        assert abs(bias) < 4.5 * se
    assert paper[0] < 0.8 * moment[0], (paper, moment)
