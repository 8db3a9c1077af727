"""Statistical checks shared by the estimator tests of discrete data, ensembles and the log-SNR
range, `fit_ensemble`, the held-out ensemble these tests build, `with_denoiser` and `rounded`
(a DiffusionModel around another denoiser, with a model's settings), and `Points` with
`quiet_trainer` for running an evaluation.Evaluation on fixed points.

Estimates are repeated by scoring R copies of the same points in one batched call: copy r of point
j has sample index r * J + j, so its randomised QMC points are independent of every other copy's
(estimators.rqmc_terms names them by (seed, sample index)).
"""
import scipy.stats
import torch as t

import datamodules
import utils
from denoisers import Ensemble, GaussianDenoiser, GridRounding
from diffusionmodel import DiffusionModel
from estimators import bin_edges, heldout_errors
from proposals import BINS


def gen(seed):
    return t.Generator().manual_seed(seed)


def repeated(estimate, x, repeats, **kwargs):
    """estimate(x_repeated, **kwargs) -> (est, se) reshaped to (repeats, len(x)) each."""
    est, se = estimate(x.repeat((repeats,) + (1,) * (x.dim() - 1)), **kwargs)
    return est.view(repeats, len(x)), se.view(repeats, len(x))


def assert_unbiased_and_calibrated(est, se, expected, band=(0.7, 1.4)):
    """est, se: (R, J) estimates and reported standard errors of J points over R repeats.

    As in tests/test_estimators.py: per point |mean error| / its standard error < 4.5, the sum of
    squared z-scores below the 1e-4 upper quantile of a chi-square with J degrees of freedom (a
    small error shared by every point still fails), and the spread of the repeats over the mean
    reported standard error inside `band`.
    """
    r, j = est.shape
    err = (est - expected).double()
    var = se.double().pow(2).mean(0)
    z = err.mean(0) / (var / r).sqrt()
    assert z.abs().max() < 4.5, f"z-scores {z.tolist()}"
    assert (z ** 2).sum() < scipy.stats.chi2.isf(1e-4, j), f"z-scores {z.tolist()}"
    ratio = (err.var(0) / var).mean().sqrt().item()
    assert band[0] < ratio < band[1], f"spread / reported stderr = {ratio:.3f}"


def paired_difference(a, b):
    """Mean over points and repeats of a - b, (R, J) each, and its standard error over repeats."""
    diff = (a - b).double().mean(1)
    return diff.mean().item(), diff.std().item() / len(diff) ** 0.5


def fit_ensemble(members, x, seed, bins=BINS, logsnr_range=None, reference=None, chunk_size=None):
    """The Ensemble of the data-matched Gaussian and `members`, chosen per log-SNR bin on held-out
    samples x through the library's selection path (estimators.heldout_errors, then the lowest
    held-out MSE per bin): members[0] of the result is GaussianDenoiser(reference).

    bins, logsnr_range: equal-width bins over logsnr_range (default: the first DiffusionModel
    member's proposal range); one (log SNR, noise) draw per sample and bin, named by (seed,
    sample, bin); reference: the Gaussian member (default: fitted to x). A DiffusionModel
    around it: with_denoiser(like, ensemble) (add reference=ensemble.members[0].reference unless
    the ensemble was fitted with like's reference).
    """
    members = list(members)
    if logsnr_range is None:
        like = next((m for m in members if isinstance(m, DiffusionModel)), None)
        if like is None:
            raise ValueError("give logsnr_range when no member is a DiffusionModel")
        logsnr_range = like.proposal.range
    if reference is None:
        reference = utils.GaussianReference(x[0].numel()).to(x.device, x.dtype).fit(x)
    everyone = [GaussianDenoiser(reference)] + members
    edges = bin_edges(logsnr_range, bins, x.device)
    errors = heldout_errors(lambda z, a: [m(z, a) for m in everyone], x, t.arange(len(x)), seed,
                            edges, chunk_size)
    heldout_mse = errors.mean(0).T  # (members, bins)
    ensemble = Ensemble(everyone, edges, heldout_mse.argmin(0))  # as evaluation.Plan.denoiser
    ensemble.heldout_mse = heldout_mse  # what the choice was made on, for the tests
    return ensemble


def with_denoiser(like, denoiser, reference=None):
    """A DiffusionModel around `denoiser` (as it is: no Gaussian residual, no labels) with the
    settings and proposal of `like` and a copy of `reference` (default: like's)."""
    copy = utils.GaussianReference(like.d)
    copy.load_state_dict((like.reference if reference is None else reference).state_dict())
    hparams = dict(like.hparams, gaussian_residual=False, num_classes=None)
    model = DiffusionModel(denoiser, reference=copy, **hparams).to(copy.mean.device)
    model.proposal = like.proposal
    return model


def rounded(model, grid, mode="hard"):
    """The model with x_hat snapped to the grid (GridRounding), as a DiffusionModel."""
    return with_denoiser(model, GridRounding(model, grid, mode))


def Points(x, labels=None, grid_levels=None):
    """A datamodules.Data serving fixed points x as its evaluation data (no exact density)."""
    x = t.as_tensor(x)
    return datamodules.Data("points", lambda: dict(train=x, val=x, train_labels=labels,
                                                   val_labels=labels), x.shape[1:],
                            num_classes=None if labels is None else int(labels.max()) + 1,
                            levels=grid_levels)


def quiet_trainer():
    """A one-process CPU Trainer that prints nothing and writes nothing."""
    import pytorch_lightning as pl
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, inference_mode=True,
                      enable_progress_bar=False, enable_model_summary=False)
