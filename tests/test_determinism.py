"""Randomness named by (seed, sample index): counter-based uniforms (utils.counter_uniform), keyed
randomised Sobol sets (utils.keyed_sobol), and estimates that are the same whatever the batch or
chunk size they are computed with.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch as t

import diffusionmodel
import utils
from diffusionmodel import DiffusionModel
from tests.analytic import DiscreteAtoms, GaussianMixture, Recorder, Zero, mixture_2d
from tests.checks import fit_ensemble, gen, with_denoiser
from utils import Grid


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Counter-based draws
# ---------------------------------------------------------------------------------------------
def test_counter_uniform_is_uniform_and_named_by_its_keys():
    keys = t.arange(20000)
    u = utils.counter_uniform(123, keys)
    assert u.dtype == t.float64 and u.min() > 0 and u.max() < 1
    assert scipy.stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    # neighbouring keys and neighbouring seeds are uncorrelated (null standard error 1/sqrt(n))
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4 / math.sqrt(len(u))
    assert abs(np.corrcoef(u, utils.counter_uniform(124, keys))[0, 1]) < 4 / math.sqrt(len(u))
    # a draw depends on (seed, keys) only: the same keys in another order or company agree
    perm = t.randperm(20000, generator=gen(0))
    assert t.equal(utils.counter_uniform(123, keys[perm]), u[perm])
    # keys broadcast, and the key order matters
    grid = utils.counter_uniform(5, t.arange(3).view(3, 1), t.arange(4).view(1, 4))
    assert grid.shape == (3, 4) and grid[1, 2] == utils.counter_uniform(5, 1, 2)
    assert utils.counter_uniform(5, 1, 2) != utils.counter_uniform(5, 2, 1)


SETS, N, DIM = 2000, 64, 5


@pytest.fixture(scope="module")
def sobol():
    sets = t.arange(SETS)
    u = utils.keyed_sobol(7, (sets.repeat_interleave(N),), t.arange(N).repeat(SETS), N, t.arange(DIM))
    return u.view(SETS, N, DIM)


def test_keyed_sobol_keeps_the_net_and_is_uniform(sobol):
    # each set keeps one point per interval [j/n, (j+1)/n) in every
    # dimension, and one point index across sets is iid U(0, 1)
    cells = (sobol * N).long().sort(dim=1).values
    assert t.equal(cells, t.arange(N).view(1, N, 1).expand_as(cells))
    for k in (0, 1, 37):
        for j in range(DIM):
            assert scipy.stats.kstest(sobol[:, k, j].numpy(), "uniform").pvalue > 1e-3
    for j in range(DIM):
        r = np.corrcoef(sobol[0::2, 3, j], sobol[1::2, 3, j])[0, 1]
        assert abs(r) < 4 / math.sqrt(SETS // 2)
    # the set mean of a smooth function has variance far below iid's 1/(12 n) per dimension
    assert sobol.sum(-1).mean(1).var().item() < 0.1 * DIM / 12 / N


def test_keyed_sobol_rows_do_not_depend_on_their_company(sobol):
    rows = t.tensor([5, 77, 1000, 64 * 30 + 3])
    sets, points = rows // N, rows % N
    alone = utils.keyed_sobol(7, (sets,), points, N, t.arange(DIM))
    assert t.equal(alone, sobol.view(-1, DIM)[rows])
    assert t.equal(utils.keyed_sobol(7, (sets,), points, N, t.tensor([3, 1])), alone[:, [3, 1]])
    # beyond SobolEngine.MAXDIM: iid uniforms
    high = utils.keyed_sobol(7, (sets,), points, N, t.tensor([0, t.quasirandom.SobolEngine.MAXDIM + 4]))
    assert high.shape == (4, 2) and high.min() > 0 and high.max() < 1
    assert t.equal(high[:, 0], alone[:, 0])


# ---------------------------------------------------------------------------------------------
# Estimates do not depend on batch or chunk sizes
# ---------------------------------------------------------------------------------------------
def mixture_model():
    dist = mixture_2d()
    dm = DiffusionModel(dist, x_shape=(2,)).double()
    return dm.fit_reference(dist.sample(1000, generator=gen(0))), dist.sample(13, generator=gen(1))


def discrete_model():
    dist = DiscreteAtoms([[-1, -1], [-0.5, 0.25], [0, 0], [0.25, 0], [0.75, -0.5]],
                         [0.15, 0.25, 0.3, 0.1, 0.2])
    atoms, p = dist.support()
    blurred = GaussianMixture(p, atoms, 0.02 * t.eye(2, dtype=t.float64).expand(5, 2, 2))
    dm = DiffusionModel(blurred, x_shape=(2,)).double()
    return dm.fit_reference(dist.sample(1000, generator=gen(0))), dist.sample(13, generator=gen(1))


def ensemble_model():
    dm, x = mixture_model()
    dist = mixture_2d()
    w, means = dist.log_weights.exp(), t.stack([c.mean for c in dist.components])
    covs = t.stack([c.eigvecs @ t.diag(c.eigvals) @ c.eigvecs.T for c in dist.components])
    other = DiffusionModel(GaussianMixture(w, means, 3 * covs), x_shape=(2,)).double()
    ensemble = fit_ensemble([dm, other], dist.sample(200, generator=gen(2)), seed=3, bins=8)
    return with_denoiser(dm, ensemble, reference=ensemble.members[0].reference), x


ESTIMATES = {
    "continuous": (mixture_model, lambda dm, x, **kw: dm.nll_points(x, 64, **kw)),
    "discrete": (discrete_model, lambda dm, x, **kw: dm.nll_discrete_points(x, Grid(0.25), 64,
                                                                            **kw)),
    "discrete-soft": (discrete_model, lambda dm, x, **kw: dm.nll_discrete_points(
        x, Grid(0.25, -1., 9), 64, rounding="soft", **kw)),
    "discrete-hard": (discrete_model, lambda dm, x, **kw: dm.nll_discrete_points(
        x, Grid(0.25), 64, rounding="hard", **kw)),
    "ensemble": (ensemble_model, lambda dm, x, **kw: dm.nll_points(x, 64, **kw)),
}


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_estimates_do_not_depend_on_batching(name):
    # The same seed gives the same numbers for a data set scored in one batch, in batches of 4
    # with index offsets, shuffled with an index tensor, or in chunks of 7 rows. Equal up to
    # float64 rounding: the denoisers' matmuls may be blocked differently for other row counts.
    make, estimate = ESTIMATES[name]
    dm, x = make()
    state = t.random.get_rng_state()
    full = estimate(dm, x, seed=5)
    batched = [estimate(dm, x[i:i + 4], seed=5, index=i) for i in range(0, len(x), 4)]
    perm = t.randperm(len(x), generator=gen(6))
    shuffled = estimate(dm, x[perm], seed=5, index=perm)
    chunked = estimate(dm, x, seed=5, chunk_size=7)
    assert t.equal(state, t.random.get_rng_state()), "a seed was given: global RNG untouched"
    for k in range(2):
        for other in (t.cat([b[k] for b in batched]), shuffled[k][perm.argsort()], chunked[k]):
            assert t.allclose(other, full[k], rtol=1e-12, atol=1e-12)
    assert not t.allclose(estimate(dm, x, seed=6)[0], full[0])


def test_the_points_are_identical_whatever_the_batching():
    # what the estimator controls: every (log SNR, z) a sample's estimate is built from, read back
    # from the denoiser's inputs, is the same in one batch or in batches of 3 with index offsets
    # and chunks of 5 rows: the log SNRs bit for bit, z to the last bit of float64 (torch's
    # elementwise kernels may round the last bit differently for other tensor shapes)
    dist = mixture_2d()
    x = dist.sample(11, generator=gen(0))

    def points(batches, chunk_size=None):
        rec = Recorder(dist)
        dm = DiffusionModel(rec, x_shape=(2,)).double()
        for i, j in batches:
            dm.nll_discrete_points((x[i:j] * 4).round() / 4, Grid(0.25), 32, seed=1, index=i,
                                   chunk_size=chunk_size)
        z, a = (t.cat(v) for v in zip(*rec.calls))
        return z, a
    whole = points([(0, 11)])
    split = points([(0, 3), (3, 6), (6, 9), (9, 11)], chunk_size=5)
    assert t.equal(whole[1], split[1])
    assert t.allclose(whole[0], split[0], rtol=0, atol=4e-16)


def test_models_scored_with_one_seed_see_the_same_points():
    # paired comparisons: two different denoisers with the same importance distribution get the
    # same (log SNR, z) for the same samples and seed
    dist = mixture_2d()
    x = dist.sample(6, generator=gen(0))
    seen = []
    for inner in (dist, Zero()):
        rec = Recorder(inner)
        DiffusionModel(rec, x_shape=(2,)).double().nll_points(x, 32, seed=1)
        seen.append(rec.calls)
    (z1, a1), = seen[0]
    (z2, a2), = seen[1]
    assert t.equal(a1, a2) and t.equal(z1, z2)


def test_validation_points_are_fixed_and_named_by_sample(monkeypatch):
    # val_loss of a fixed model: the same for every validation (epochs compare paired), whatever
    # the global RNG's state, and for any batch size (points named by the sample's position);
    # other with another validation seed (diffusionmodel.VAL_SEED)
    import pytorch_lightning as pl
    mix = mixture_2d()
    x = mix.sample(60, generator=gen(0)).float()
    model = DiffusionModel(mix, x_shape=(2,), val_npoints=8).fit_reference(x)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)

    def val_loss(batch_size):
        loader = t.utils.data.DataLoader(x, batch_size=batch_size)
        return trainer.validate(model, loader, verbose=False)[0]["val_loss"]
    t.manual_seed(0)
    first = val_loss(60)
    t.manual_seed(1)
    assert val_loss(60) == first and val_loss(7) == pytest.approx(first, rel=1e-6)
    monkeypatch.setattr(diffusionmodel, "VAL_SEED", diffusionmodel.VAL_SEED + 1)
    assert val_loss(60) != first
