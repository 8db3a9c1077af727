"""ode.nll_ode and DiffusionModel.nll_ode: -log p(x) of the density the probability-flow ODE defines.

With a denoiser that is optimal for its data, the ODE's density is the data's density, so the
expected numbers are the closed-form -log p(x) of the Gaussians and Gaussian mixtures of
tests/analytic.py. The ends of the log-SNR range are closed forms of the Gaussian reference's
flow (docs/maths.md): a model whose denoiser *is* the reference's gives -log q(x) exactly.
"""
import math

import pytest
import torch as t

import evaluation
import ode
from denoisers import GaussianDenoiser
from diffusionmodel import DiffusionModel
from tests.analytic import Zero, gaussian, mixture_2d, ring_2d
from tests.checks import Points, gen, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(mix, n_reference=4000):
    """mix's exact denoiser as a float64 DiffusionModel over [-12, 12], with a data-matched
    reference fitted on its samples."""
    dm = DiffusionModel(mix, x_shape=(2,), logsnr_loc=0., logsnr_scale=3., clip=4.).double()
    return dm.fit_reference(mix.sample(n_reference, generator=gen(1)))


@pytest.mark.parametrize("make", [lambda: gaussian([0.3, -0.2], [[1.0, 0.6], [0.6, 0.8]]),
                                  mixture_2d, ring_2d], ids=["gaussian", "mixture", "ring"])
def test_exact_trace_recovers_the_exact_density(make):
    # measured rms errors at the default tolerances (1e-5): 1e-4, 4e-4, 3e-4 nats
    mix = make()
    x = mix.sample(32, generator=gen(0))
    nll, info = model_of(mix).nll_ode(x)
    err = nll - mix.nll(x)
    assert err.pow(2).mean().sqrt() < 0.01, err
    assert info["trace"] == "exact" and info["rtol"] == info["atol"] == 1e-5
    assert info["nfe"].shape == (32,) and (info["nfe"] >= 8).all()
    assert info["logsnr_range"] == [-12., 12.]


def test_the_reference_alone_gives_its_own_density():
    # the denoiser is the reference's own optimal predictor: every part of the flow is the
    # Gaussian's, so the two closed-form end terms and the solved middle must add up to -log q
    # (to the solver's tolerance: 3e-5 nats at the default 1e-5, 1e-8 at 1e-10)
    mix = mixture_2d()
    dm = model_of(mix)
    x = mix.sample(16, generator=gen(2))
    nll, _ = ode.nll_ode(GaussianDenoiser(dm.reference), dm.reference, dm.proposal.range, x,
                         rtol=1e-10, atol=1e-10)
    assert (nll - dm.reference.nll(x)).abs().max() < 1e-6


def test_hutchinson_is_unbiased_and_keyed_by_sample():
    # 400 repeats of 5 points in one batch (probes named by (seed, index): independent across
    # the copies); the mean of each point's repeats is within 4 standard errors of the exact
    # trace's value, and the spread is the one-probe estimator's (measured ~0.8 nats)
    mix = mixture_2d()
    dm = model_of(mix)
    x = mix.sample(5, generator=gen(3))
    exact, _ = dm.nll_ode(x)
    reps = 400
    est, info = dm.nll_ode(x.repeat(reps, 1), trace="hutchinson", seed=7,
                           index=t.arange(5 * reps))
    est = est.view(reps, 5)
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(reps))
    assert z.abs().max() < 4, z
    assert 0.2 < est.std(0).mean() < 3
    assert info["trace"] == "hutchinson" and info["probes"] == 1
    # deterministic given the seed and the indices, whatever the batch
    again, _ = dm.nll_ode(x, trace="hutchinson", seed=7, index=t.arange(5))
    assert t.allclose(again, est[0], rtol=0, atol=1e-9)


def test_a_sample_does_not_depend_on_its_batch():
    # every sample keeps its own step size: the same numbers in any batch (any DDP layout)
    mix = ring_2d()
    dm = model_of(mix)
    x = mix.sample(12, generator=gen(4))
    whole, info = dm.nll_ode(x)
    parts = t.cat([dm.nll_ode(x[:5])[0], dm.nll_ode(x[5:])[0]])
    assert t.allclose(whole, parts, rtol=0, atol=1e-9)
    assert info["nfe"].min() < info["nfe"].max()  # samples took different numbers of steps


def test_the_ode_row_is_nll_ode_on_the_scored_points():
    mix = mixture_2d()
    dm = model_of(mix)
    x = mix.sample(24, generator=gen(5))
    settings = ode.settings("auto", 2)
    ev = evaluation.Evaluation([dm], ["mixture"], Points(x), seed=3, npoints=16, batch_size=7,
                               ode=settings)
    ev.run(quiet_trainer())
    scored = ev.samples["score"]
    expected, info = dm.nll_ode(scored, seed=3, index=t.arange(len(scored)), **settings)
    assert t.allclose(ev.per_sample[("mixture", "ode")][0], expected, rtol=0, atol=1e-9)
    row = next(r for r in ev.rows if (r["model"], r["estimate"]) == ("mixture", "ode"))
    assert row["evaluations"] == pytest.approx(info["nfe"].double().mean().item())
    assert "rtol 1e-05, atol 1e-05, divergence exact" in row["meaning"]
    # the Gaussian's ODE row is -log q of the same points, to the solver's tolerance
    gauss = ev.per_sample[("gaussian", "ode")][0]
    assert t.allclose(gauss, dm.reference.nll(scored), rtol=0, atol=2e-4)


class Bias(t.nn.Module):
    """eps_hat = b for every input: a map of its parameters alone (no gradient to z)."""

    def __init__(self, b):
        super().__init__()
        self.b = t.nn.Parameter(t.tensor(b, dtype=t.float64))

    def forward(self, z, logsnr):
        return self.b.expand_as(z)


@pytest.mark.parametrize("bias", [None, [0.01, -0.02]], ids=["zero", "parameters only"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_a_denoiser_that_ignores_its_input_gives_the_closed_form(bias, trace):
    # eps_hat = b (b = 0: tests/analytic.py Zero) under N(0, I) over the default range [-12, 12]:
    # the divergence is 0 and dy/d sigma = b, so y moves by b (e^6 - e^-6) from
    # y0 = x sqrt(1 + e^-12) (the Gaussian's flow above 12), and (ode.py)
    #   -log p(x) = 1/2 (2 ln 2 pi + 2 ln(1 + e^12) + |y_end|^2 / (1 + e^12)) - ln(1 + e^-12),
    # 13.8379 nats at x = 0, b = 0 (the report's value). Exact arithmetic in float64 but for
    # the solver's sum of stages: 1e-9 nats.
    denoiser = Zero() if bias is None else Bias(bias)
    dm = DiffusionModel(denoiser, x_shape=(2,)).double()
    x = t.tensor([[0., 0.], [0.5, -1.], [2., 3.]], dtype=t.float64)
    nll, info = dm.nll_ode(x, trace=trace)
    b = t.zeros(2, dtype=t.float64) if bias is None else t.tensor(bias, dtype=t.float64)
    y = x * math.sqrt(1 + math.exp(-12)) + b * (math.exp(6) - math.exp(-6))
    var = 1 + math.exp(12)
    expected = (math.log(2 * math.pi) + math.log(var) + 0.5 * (y ** 2).sum(1) / var
                - math.log(1 + math.exp(-12)))
    assert t.allclose(nll, expected, rtol=0, atol=1e-9), (nll, expected)
    if bias is None:
        assert nll[0].item() == pytest.approx(13.8379, abs=5e-5)
    assert (info["nfe"] > 0).all()
