"""Tests of Ensemble: per log-SNR bin, the member with the lowest held-out MSE, chosen through the
library's held-out selection (estimators.heldout_errors, then the argmin per bin; tests/checks.py
fit_ensemble) and used as a DiffusionModel through tests/checks.py with_denoiser.

Two deliberately imperfect closed-form denoisers of tests/analytic.py's mixture_2d, each bad in a
different log-SNR region: A has the right weights and means but components 3x too broad (right at
low SNR, where only the overall moments matter, wrong from a ~ 0 up), B has the right components
but the weights (0.05, 0.15, 0.8) (wrong at low and middle SNR, right at high SNR, where the
posterior settles on the right component). All comparisons are paired: every model is scored
with the same seed, so the same (log SNR, noise) points (tests/checks.py).
"""
import pytest
import torch as t

from denoisers import GaussianDenoiser
from diffusionmodel import DiffusionModel
from tests.analytic import GaussianMixture, mixture_2d, reference_nll
from tests.checks import fit_ensemble, gen, paired_difference, repeated, with_denoiser
from utils import Grid


pytestmark = pytest.mark.usefixtures("one_thread")


def parts(dist):
    w = dist.log_weights.exp()
    means = t.stack([c.mean for c in dist.components])
    covs = t.stack([c.eigvecs @ t.diag(c.eigvals) @ c.eigvecs.T for c in dist.components])
    return w, means, covs


def model(denoiser, fit_to):
    dm = DiffusionModel(denoiser, x_shape=(2,)).double()
    return dm.fit_reference(fit_to)


def as_model(ensemble, like):
    """A DiffusionModel around the ensemble with `like`'s hyperparameters and the ensemble's
    Gaussian member (fitted to its held-out samples) as its reference."""
    return with_denoiser(like, ensemble, reference=ensemble.members[0].reference)


@pytest.fixture(scope="module")
def setup():
    dist = mixture_2d()
    w, means, covs = parts(dist)
    train = dist.sample(2000, generator=gen(0))
    a = model(GaussianMixture(w, means, 3 * covs), train)
    b = model(GaussianMixture([0.05, 0.15, 0.8], means, covs), train)
    ensemble = fit_ensemble([a, b], dist.sample(1000, generator=gen(1)), seed=2, bins=24)
    return dist, a, b, ensemble


def test_each_member_wins_somewhere(setup):
    # guards the tests below: the held-out choice uses the Gaussian, A and B each in some bins
    _, _, _, ensemble = setup
    assert set(ensemble.choice.tolist()) == {0, 1, 2}
    assert ensemble.heldout_mse.shape == (3, 24)


def test_ensemble_is_no_worse_than_any_member(setup):
    # -log p on 16 test points (20 repeats each), paired: the ensemble is within 4 standard errors
    # of or below every member (the Gaussian included), and clearly below the best of them
    dist, a, b, ensemble = setup
    gaussian = model(GaussianDenoiser(ensemble.members[0].reference),
                     dist.sample(2000, generator=gen(0)))
    x = dist.sample(16, generator=gen(3))
    ens = repeated(as_model(ensemble, a).nll_points, x, 20, npoints=256, seed=4)[0]
    gaps = {}
    for name, member in (("gaussian", gaussian), ("A", a), ("B", b)):
        other = repeated(member.nll_points, x, 20, npoints=256, seed=4)[0]
        gaps[name] = paired_difference(ens, other)
        assert gaps[name][0] < 4 * gaps[name][1], (name, gaps[name])
    best = min(gaps.values(), key=lambda g: -g[0])
    assert best[0] < -0.1 and best[0] < -10 * best[1], gaps
    # and it is still an upper bound: above the exact -log p on average
    truth = reference_nll(dist, x)
    assert (ens - truth).mean() > 0


def test_choice_is_made_on_heldout_data_only(setup):
    # Held-out data from the wrong distribution (B's own mixture, on which B is exact) makes B
    # win the bins where A wins on the real distribution. Scored on test data from the real
    # mixture, that ensemble must therefore do worse than one chosen on real held-out data:
    # the choice comes from the held-out samples, never from the data being scored.
    dist, a, b, ensemble = setup
    w, means, covs = parts(dist)
    wrong = GaussianMixture([0.05, 0.15, 0.8], means, covs)
    misled = fit_ensemble([a, b], wrong.sample(1000, generator=gen(1)), seed=2, bins=24)
    switched = (ensemble.choice == 1) & (misled.choice == 2)
    assert switched.sum() >= 2, (ensemble.choice, misled.choice)
    x = dist.sample(16, generator=gen(5))
    choice, heldout = ensemble.choice.clone(), ensemble.heldout_mse.clone()
    right = repeated(as_model(ensemble, a).nll_points, x, 20, npoints=256, seed=6)[0]
    wrong_est = repeated(as_model(misled, a).nll_points, x, 20, npoints=256, seed=6)[0]
    diff, se = paired_difference(wrong_est, right)
    assert diff > 4 * se, (diff, se)
    # scoring left the choice alone
    assert t.equal(ensemble.choice, choice) and t.equal(ensemble.heldout_mse, heldout)


def test_forward_is_the_chosen_members_prediction(setup):
    # at every log SNR, inside the bins and beyond both ends, the ensemble returns the prediction
    # of the member its bin chose (to float64 rounding: the members run on different batches)
    _, _, _, ensemble = setup
    a = t.linspace(-20, 20, 301, dtype=t.float64)
    z = t.randn(301, 2, generator=gen(7), dtype=t.float64)
    edges = ensemble.edges
    bins = (a[:, None] >= edges[None, 1:-1]).sum(1)    # bin k: edges[k] <= a < edges[k + 1]
    expected = t.stack([ensemble.members[int(ensemble.choice[k])](z[i:i + 1], a[i:i + 1])[0]
                        for i, k in enumerate(bins)])
    assert t.allclose(ensemble(z, a), expected, rtol=1e-12, atol=1e-14)


def test_fit_does_not_depend_on_chunk_size_and_respects_the_seed(setup):
    dist, a, b, _ = setup
    heldout = dist.sample(300, generator=gen(8))
    state = t.random.get_rng_state()
    one = fit_ensemble([a, b], heldout, seed=9, bins=12)
    other = fit_ensemble([a, b], heldout, seed=9, bins=12, chunk_size=37)
    assert t.equal(state, t.random.get_rng_state())
    assert t.allclose(one.heldout_mse, other.heldout_mse, rtol=1e-12, atol=0)
    assert t.equal(one.choice, other.choice)
    assert not t.equal(one.heldout_mse, fit_ensemble([a, b], heldout, seed=10,
                                                     bins=12).heldout_mse)


def test_with_denoiser_keeps_the_estimators_working(setup):
    dist, a, _, ensemble = setup
    dm = as_model(ensemble, a)
    assert dm.hparams.logsnr_loc == a.hparams.logsnr_loc and not dm.hparams.gaussian_residual
    ref = ensemble.members[0].reference
    assert t.equal(dm.reference.mean, ref.mean) and t.equal(dm.reference.eigvals, ref.eigvals)
    x = dist.sample(5, generator=gen(11))
    nll, se = dm.nll_points(x, 64, seed=12)
    assert nll.shape == se.shape == (5,) and t.isfinite(nll).all()
    mse, mmse = dm.mse_curve(x, dm.curve_logsnrs(8).double(), generator=gen(13))
    assert mse.shape == mmse.shape == (8,)
    on_grid = (x * 4).round() / 4
    nll, se = dm.nll_discrete_points(on_grid, Grid(0.25, 0.), 32, seed=14)
    assert t.isfinite(nll).all()


def test_bad_input_raises_value_error(setup):
    dist, a, b, _ = setup
    x = dist.sample(10, generator=gen(0))
    with pytest.raises(ValueError, match="logsnr_range"):
        fit_ensemble([a.model, b.model], x, seed=0)
    with pytest.raises(ValueError, match="bins"):
        fit_ensemble([a, b], x, seed=0, bins=0)
    with pytest.raises(ValueError, match="logsnr_range"):
        fit_ensemble([a, b], x, seed=0, logsnr_range=(3., -3.))
