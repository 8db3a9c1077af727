"""The U-Net adapter: log SNR <-> timestep against diffusers' own schedule, the out-of-range
policies, the prediction types (epsilon, v_prediction, sample), and loading a UNet2DModel from a
local folder or the hub cache without network."""
import functools
import math
import os

import numpy as np

import pytest
import torch as t
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import FrozenDict

import denoisers
import estimators
import experiment
import utils
from cli import UserError
from diffusionmodel import DiffusionModel
from proposals import LogisticProposal
from tests.analytic import gaussian, reference_nll
from tests.checks import assert_unbiased_and_calibrated, gen
from unet import (DDPM_CIFAR10, PREDICTION_TYPES, UNetDenoiser, load,
                  logsnr_to_timestep, small_unet_config)

# one PyTorch thread (tests/conftest.py): on a busy machine two threads made one 192 x 192
# eigendecomposition take seconds instead of milliseconds
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(small_unet_config(channels=3, size=8, width=8), layers_per_block=1)


def ddpm_logsnr():
    """log SNR of DDPM's timesteps from diffusers' scheduler, computed here independently."""
    ab = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                       beta_end=0.02).alphas_cumprod.double()
    return (ab / (1 - ab)).log()


def tiny_denoiser(outside="clamp", seed=0):
    t.manual_seed(seed)
    return UNetDenoiser(UNet2DModel.from_config(TINY), outside=outside).eval()


def test_schedule_range_matches_ddpm():
    # DDPM (docs/maths.md)'s log SNR runs from +9.21 (t = 0) to -10.12 (t = 999).
    lo, hi = tiny_denoiser().logsnr_range
    assert hi == pytest.approx(9.21, abs=5e-3) and lo == pytest.approx(-10.12, abs=5e-3)


def test_timestep_round_trip_below_1e_3():
    # Every integer timestep's log SNR (float32, as the model receives it) maps back to that
    # timestep to < 1e-3: the accuracy the continuous mapping promises. The original ITD code's 10,000-step
    # argmin table was off by 1.4 at t = 500 and 3.3 at t = 900.
    denoiser = tiny_denoiser()
    logsnr = ddpm_logsnr()
    steps = denoiser.timestep(logsnr.float())
    assert (steps.double() - t.arange(1000)).abs().max() < 1e-3
    # Between two timesteps the map is linear, so midpoints land half-way.
    mid = denoiser.timestep(((logsnr[:-1] + logsnr[1:]) / 2).float())
    assert (mid.double() - (t.arange(999) + 0.5)).abs().max() < 1e-3


def test_timestep_is_continuous_and_monotone():
    denoiser = tiny_denoiser()
    a = t.linspace(-10.1, 9.2, 20001)
    steps = denoiser.timestep(a).double()
    assert (steps[1:] < steps[:-1]).all()  # higher SNR, earlier timestep
    assert steps.diff().abs().max() < 0.1  # no jumps: 1e-3 log SNR apart is < 0.1 step


def test_timestep_memory_is_linear_in_batch():
    # 4 million log SNRs: a (batch x table) argmin would need 16 GB, interpolation needs O(batch).
    a = t.empty(4_000_000).uniform_(-12, 12)
    steps = tiny_denoiser().timestep(a)
    assert steps.shape == a.shape and t.isfinite(steps).all()


def test_inverse_of_linear_interpolation():
    # The table's linear interpolation at continuous timesteps (numpy's interp, independently of
    # the adapter) maps back to those timesteps.
    table = utils.schedule_logsnr(DDPMScheduler().alphas_cumprod)
    steps = t.rand(1000, dtype=t.float64) * 999
    logsnr = t.from_numpy(np.interp(steps.numpy(), np.arange(1000), table.numpy()))
    back = logsnr_to_timestep(logsnr, table)
    assert (back - steps).abs().max() < 1e-9


def test_clamp_outside_the_trained_range():
    denoiser = tiny_denoiser("clamp")
    a = t.tensor([30., 12., 9.5, -10.5, -40.])
    assert denoiser.timestep(a).tolist() == [0., 0., 0., 999., 999.]
    # The U-Net is then evaluated exactly as at the boundary timestep.
    z = t.randn(5, 3, 8, 8)
    with t.no_grad():
        expected = denoiser.unet(z, t.tensor([0., 0., 0., 999., 999.])).sample
        assert t.equal(denoiser(z, a), expected)


def test_gaussian_outside_the_trained_range():
    denoiser = tiny_denoiser("gaussian")
    x = t.randn(64, 3, 8, 8) * t.linspace(0.2, 2, 192).view(3, 8, 8)
    with pytest.raises(RuntimeError, match="set_fallback"):
        denoiser(x[:2], t.zeros(2))
    # a DiffusionModel sets its reference as the fallback itself (the bound method, so a later
    # fit_reference is seen)
    model = DiffusionModel(denoiser, x_shape=(3, 8, 8))
    model.fit_reference(x)
    a = t.tensor([-30., -10.5, -5., 0., 9., 9.5, 20.])
    inside = t.tensor([False, False, True, True, True, False, False])
    z = t.randn(7, 3, 8, 8)
    with t.no_grad():
        out = denoiser(z, a)
        net = denoiser.unet(z, denoiser.timestep(a)).sample
        gauss = model.reference.eps(z, a)
        assert t.equal(out[inside], net[inside]) and t.equal(out[~inside], gauss[~inside])
        # So the control-variate integrand is exactly 0 outside the trained range.
        gap = estimators.mse_gap(model, model.reference, x[:7], a, eps=t.randn(7, 3, 8, 8))
    assert (gap[~inside] == 0).all() and (gap[inside] != 0).all()


def test_from_scratch_schedule_covers_a_given_range():
    # A schedule linear in log SNR from +12 (t = 0) to -4 (t = 999): t(a) = 999 (12 - a) / 16.
    denoiser = UNetDenoiser(UNet2DModel.from_config(TINY), utils.logsnr_schedule(-4., 12.))
    assert denoiser.logsnr_range == pytest.approx((-4., 12.))
    a = t.tensor([12., 4., -4., 0.])
    assert denoiser.timestep(a).tolist() == pytest.approx([0., 499.5, 999., 749.25], abs=1e-3)
    with pytest.raises(ValueError):
        utils.logsnr_schedule(-50., 50.)


def test_zero_fallback_for_a_gaussian_residual():
    denoiser = UNetDenoiser(UNet2DModel.from_config(TINY), outside="gaussian").set_fallback(None)
    z = t.randn(2, 3, 8, 8)
    with t.no_grad():
        out = denoiser(z, t.tensor([20., 0.]))
    assert (out[0] == 0).all() and (out[1] != 0).any()


def save_tiny(folder, beta_end=0.01, pipeline=False, scheduler=True, unet_config=TINY,
              **scheduler_config):
    """A tiny U-Net and a non-default scheduler saved with save_pretrained; returns the U-Net."""
    t.manual_seed(1)
    net = UNet2DModel.from_config(unet_config)
    net.save_pretrained(os.path.join(folder, "unet") if pipeline else folder)
    if scheduler:
        DDPMScheduler(beta_end=beta_end, **scheduler_config).save_pretrained(
            os.path.join(folder, "scheduler") if pipeline else folder)
    return net


def same_weights(a, b):
    """The same tensors under the same names (in any order: a U-Net that gained label embeddings
    registers them last, its rebuilt copy where diffusers' constructor does)."""
    sa, sb = a.state_dict(), b.state_dict()
    tensors = {k for k, v in sa.items() if t.is_tensor(v)}
    return tensors == {k for k, v in sb.items() if t.is_tensor(v)} and all(
        t.equal(sa[k], sb[k]) for k in tensors)


@pytest.mark.parametrize("pipeline", [False, True])
def test_load_local_directory(tmp_path, pipeline):
    saved = save_tiny(str(tmp_path), pipeline=pipeline)
    denoiser, source = load(str(tmp_path))
    assert same_weights(denoiser.unet, saved) and source == str(tmp_path)
    # The schedule is the folder's own (beta_end 0.01), not DDPM's default.
    assert t.allclose(denoiser.alphas_cumprod, DDPMScheduler(beta_end=0.01).alphas_cumprod.double())
    assert denoiser.prediction_type == "epsilon"  # DDPMScheduler's default
    scratch = load(str(tmp_path), from_scratch=True)[0]
    assert scratch.config["unet"] == denoiser.config["unet"]
    assert not same_weights(scratch.unet, saved)


def fake_hub_cache(cache, repo, beta_end=0.01):
    """The Hugging Face cache layout (models--owner--name/{refs/main, snapshots/<rev>/}) that
    from_pretrained(repo_id) reads when offline."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    revision = "0" * 40
    saved = save_tiny(os.path.join(folder, "snapshots", revision), beta_end)
    os.makedirs(os.path.join(folder, "refs"))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(revision)
    return saved


def test_load_hub_id_from_cache_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    saved = fake_hub_cache(str(tmp_path), "itd-test/tiny-unet")

    def no_network():
        raise AssertionError("the cache must be used before any network check")

    denoiser, source = load("itd-test/tiny-unet", online=no_network)
    assert same_weights(denoiser.unet, saved) and "hub" in source
    assert t.allclose(denoiser.alphas_cumprod, DDPMScheduler(beta_end=0.01).alphas_cumprod.double())


def test_missing_hub_id_offline_message(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    asked = []
    with pytest.raises(UserError) as err:
        load("google/ddpm-cifar10-32", online=lambda: asked.append(1) or False)
    message = str(err.value)
    assert asked == [1]  # the network is consulted once, after the cache
    for part in ("google/ddpm-cifar10-32", str(tmp_path), "huggingface.co", "--pretrained",
                 "--from_scratch"):
        assert part in message
    assert os.listdir(tmp_path) == []  # nothing left in the cache


def test_bad_pretrained_path():
    with pytest.raises(UserError, match="no such directory"):
        load("./no/such/folder/")


def test_builtin_ddpm_cifar10_config():
    # The DDPM paper (Ho et al. 2020): "Our CIFAR10 model has 35.7 million parameters".
    denoiser, _ = load(DDPM_CIFAR10, from_scratch=True, online=lambda: False)
    # DDPM's schedule, noise prediction
    assert t.equal(denoiser.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())
    assert denoiser.prediction_type == "epsilon"
    assert round(sum(p.numel() for p in denoiser.unet.parameters()) / 1e6, 1) == 35.7


def checkpoint(model, path):
    """What a checkpoint holds for experiment.model_from_checkpoint (the denoiser's record, the
    hyperparameters, the weights), saved and read back as plain data (weights_only)."""
    t.save({"denoiser": model.record, "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict()}, path)
    return t.load(path, weights_only=True)


def test_checkpoint_rebuilds_the_unet(tmp_path):
    schedule = DDPMScheduler(beta_end=0.01).alphas_cumprod
    denoiser = UNetDenoiser(UNet2DModel.from_config(TINY), schedule, prediction_type="v_prediction")
    model = DiffusionModel(denoiser, x_shape=(3, 8, 8))
    # the record names the class and its arguments; the weights carry no extra state
    assert model.record["target"] == "unet:UNetDenoiser"
    assert not any(k.endswith("_extra_state") for k in model.state_dict())
    path = str(tmp_path / "model.ckpt")
    rebuilt = experiment.model_from_checkpoint(checkpoint(model, path), path)
    # the prediction type, the schedule and the architecture travel in the record
    assert rebuilt.model.prediction_type == "v_prediction"
    assert t.equal(rebuilt.model.alphas_cumprod, denoiser.alphas_cumprod)
    assert t.equal(rebuilt.model.logsnr_table, denoiser.logsnr_table)
    assert rebuilt.model.config["unet"] == denoiser.config["unet"]
    assert same_weights(rebuilt, model)
    # a record of a different architecture with the same parameter shapes rebuilds that one
    other = denoisers.rebuild({"target": "unet:UNetDenoiser",
                               "kwargs": dict(model.record["kwargs"],
                                              unet=dict(model.record["kwargs"]["unet"],
                                                        norm_eps=1e-3))})
    assert other.unet.config.norm_eps == 1e-3 and other.prediction_type == "v_prediction"


def test_a_pretrained_unet_gains_labels_that_start_at_zero(tmp_path):
    # fine-tuning an unconditional U-Net with --conditional: new label embeddings (and "no
    # label"), zero at the start, so for every label it predicts what the pretrained one does;
    # the config records them, so a checkpoint rebuilds the conditional U-Net
    import unet
    saved = save_tiny(str(tmp_path)).eval()
    denoiser, where = unet.build(str(tmp_path), (3, 8, 8), (-4., 12.), num_classes=10)
    assert denoiser.num_classes == 10 and where.endswith("+ labels")
    z, a = t.randn(4, 3, 8, 8, generator=gen(0)), t.tensor([-2., 0., 3., 8.])
    plain = UNetDenoiser(saved, denoiser.alphas_cumprod).eval()
    with t.no_grad():
        for y in (t.tensor([0, 3, 9, -1]), None):
            assert t.equal(denoiser.eval()(z, a, y), plain(z, a))
    model = DiffusionModel(denoiser, x_shape=(3, 8, 8), num_classes=10)
    path = str(tmp_path / "model.ckpt")
    rebuilt = experiment.model_from_checkpoint(checkpoint(model, path), path)
    assert rebuilt.model.num_classes == 10 and rebuilt.num_classes == 10
    assert same_weights(rebuilt, model)


def test_rejects_unsupported_unets():
    with pytest.raises(ValueError, match="positional"):
        UNetDenoiser(UNet2DModel.from_config(dict(TINY, time_embedding_type="fourier")))
    with pytest.raises(ValueError, match="outside"):
        UNetDenoiser(UNet2DModel.from_config(TINY), outside="extrapolate")
    with pytest.raises(ValueError, match=r"6 output channels for 3 input channels \(a learned "
                                         r"variance\?\)"):
        UNetDenoiser(UNet2DModel.from_config(dict(TINY, out_channels=6)))
    with pytest.raises(ValueError) as err:
        UNetDenoiser(UNet2DModel.from_config(TINY), prediction_type="mean")
    assert str(err.value) == ("prediction_type must be one of epsilon, v_prediction, sample, "
                              "got 'mean'")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_load_reads_the_prediction_type(tmp_path, prediction_type):
    # The scheduler saved next to the U-Net says what it predicts; a folder without one: epsilon.
    save_tiny(str(tmp_path / "with"), prediction_type=prediction_type)
    assert load(str(tmp_path / "with"))[0].prediction_type == prediction_type
    save_tiny(str(tmp_path / "without"), scheduler=False)
    denoiser, _ = load(str(tmp_path / "without"))
    # DDPM's schedule
    assert t.equal(denoiser.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())
    assert denoiser.prediction_type == "epsilon"


@pytest.mark.parametrize("folder, match", [
    (dict(variance_type="learned_range"), "learns its variance.*'learned_range'"),
    (dict(variance_type="learned"), "learns its variance.*'learned'"),
    (dict(prediction_type="mean"), "prediction_type must be one of epsilon, v_prediction, sample, "
                                   "got 'mean'"),
    (dict(unet_config=dict(TINY, out_channels=6)), "6 output channels for 3 input channels"),
])
def test_load_refuses_unsupported_unets(tmp_path, folder, match):
    save_tiny(str(tmp_path), **folder)
    with pytest.raises(UserError, match=match) as err:
        load(str(tmp_path))
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("a", [-20., -10., -3., 0., 4., 9., 20.])
def test_conversions_recover_the_noise(a):
    # From the definitions alone: z = alpha x + sigma eps, v = alpha eps - sigma x (alpha^2 +
    # sigma^2 = 1), so sigma z + alpha v = eps and (z - alpha x) / sigma = eps. a = +-20 lie outside
    # DDPM's timesteps (clamped there): the conversion still uses the channel's a.
    x, eps = t.randn(2, 3, 8, 8, dtype=t.float64, generator=gen(5)).unbind()
    logsnr = t.tensor([a], dtype=t.float64)
    alpha, sigma = math.sqrt(1 / (1 + math.exp(-a))), math.sqrt(1 / (1 + math.exp(a)))
    z = alpha * x + sigma * eps
    outputs = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "sample": x}
    for kind, out in outputs.items():
        denoiser = UNetDenoiser(UNet2DModel.from_config(TINY), prediction_type=kind)
        got = denoiser.to_eps(z[None], logsnr, out[None])[0]
        assert (got - eps).abs().max() < 1e-12 * max(1., 1 / sigma), kind


class FakeUNet(t.nn.Module):
    """A "U-Net" that outputs the optimal prediction of `dist` in one of the three
    parametrisations: it maps the timestep back to its log SNR a by linear interpolation of the
    same `table` (log SNR at t = 0 .. T-1) the adapter inverts, takes eps = dist(z, a) and gives
    eps, v = alpha eps - sigma x_hat or x_hat = (z - sigma eps) / alpha at that a."""

    def __init__(self, dist, table, prediction_type):
        super().__init__()
        channels = dist.x_shape[0]
        # diffusers' own config type (a dict with attribute access), as the adapter's record
        # reads a UNet2DModel's config
        self.config = FrozenDict(time_embedding_type="positional", in_channels=channels,
                                 out_channels=channels)
        self.dist, self.table, self.prediction_type = dist, table, prediction_type

    def forward(self, z, timestep, return_dict=True):
        steps = timestep.double()
        k = steps.floor().long().clamp(0, len(self.table) - 2)
        a = self.table[k] + (steps - k) * (self.table[k + 1] - self.table[k])
        eps = self.dist(z, a)
        x = utils.x_from_eps(z, a, eps)
        alpha = utils.append_dims(t.sigmoid(a).sqrt(), z.dim())
        sigma = utils.append_dims(t.sigmoid(-a).sqrt(), z.dim())
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "sample": x}
        return (out[self.prediction_type],)


def test_the_three_parametrisations_give_the_same_density():
    # The optimal denoiser of a 4-D Gaussian (1 x 2 x 2 images, tests/analytic.py), expressed as
    # noise, velocity and sample prediction, must give the exact -log p of torch.distributions
    # within the estimator's standard error (tests/checks.py), and the same nll_points on the same
    # random points. The schedule is linear in log SNR over the proposal's range (+-12), so no
    # timestep is clamped.
    dist = gaussian(t.tensor([0.4, -0.3, 0.1, 0.6]).view(1, 2, 2),
                    t.tensor([[1.0, 0.3, 0.0, 0.1], [0.3, 0.5, 0.1, 0.0],
                              [0.0, 0.1, 0.2, 0.05], [0.1, 0.0, 0.05, 0.08]]))
    loc, scale, clip = 0., 3., 4.
    schedule = utils.logsnr_schedule(*LogisticProposal(loc, scale, clip).range)
    x = dist.sample(6, generator=gen(1))
    truth = reference_nll(dist, x)

    def estimates(kind, float64_timesteps=False):
        denoiser = UNetDenoiser(FakeUNet(dist, utils.schedule_logsnr(schedule), kind), schedule,
                                prediction_type=kind)
        assert denoiser.logsnr_range == pytest.approx((-12., 12.))
        if float64_timesteps:  # the fake then recovers a to float64 rounding
            denoiser.timestep = functools.partial(logsnr_to_timestep, table=denoiser.logsnr_table)
        dm = DiffusionModel(denoiser, x_shape=(1, 2, 2), logsnr_loc=loc, logsnr_scale=scale,
                            clip=clip).double()
        runs = [dm.nll_points(x, 256, seed=100 + r) for r in range(24)]
        return tuple(t.stack(v) for v in zip(*runs))

    est, se = estimates("epsilon")
    assert_unbiased_and_calibrated(est, se, truth)
    for kind in ("v_prediction", "sample"):
        # The adapter's timesteps are float32: the fake's a is off by up to half an ulp of t
        # (3e-5 steps near t = 999, 0.024 log SNR per step: 7e-7), and v and x at a slightly
        # wrong a convert back to a slightly different eps; measured 1.6e-7 nats at most.
        assert (estimates(kind)[0] - est).abs().max() < 1e-6, kind
    # With float64 timesteps only the conversions' rounding is left: measured 1e-13 nats.
    exact = estimates("epsilon", float64_timesteps=True)[0]
    assert (exact - est).abs().max() < 1e-6
    for kind in ("v_prediction", "sample"):
        assert (estimates(kind, float64_timesteps=True)[0] - exact).abs().max() < 1e-11, kind


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_step_runs_in_bf16_autocast(prediction_type):
    # The loss stays float32 under bf16 autocast (DiffusionModel casts eps_hat to z's dtype; the
    # v and x conversions are done in z's dtype).
    t.manual_seed(0)
    denoiser = UNetDenoiser(UNet2DModel.from_config(TINY), prediction_type=prediction_type)
    model = DiffusionModel(denoiser, x_shape=(3, 8, 8), logsnr_loc=2.)
    x = t.rand(8, 3, 8, 8) * 2 - 1
    with t.autocast("cpu", dtype=t.bfloat16):
        if prediction_type != "epsilon":
            z, a = t.randn(2, 3, 8, 8), t.tensor([0., 3.])
            assert denoiser(z, a).dtype == t.float32
        loss = model.nll(x)
    loss.backward()
    assert loss.dtype == t.float32 and math.isfinite(loss.item())
