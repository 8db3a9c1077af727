"""A diffusers UNet2DModel (e.g. the pretrained DDPM U-Net `google/ddpm-cifar10-32`) as a denoiser
eps_hat = denoiser(z, logsnr).

The U-Net was trained on integer timesteps t of a variance-preserving schedule alpha_bar_t, with
z_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps: the same channel as ours at log SNR
a = log(alpha_bar_t / (1 - alpha_bar_t)). So a log SNR is turned into the continuous timestep t(a)
at which the model's own schedule (diffusers' DDPMScheduler.alphas_cumprod) has that log SNR, by
linear interpolation between the two neighbouring integer timesteps. Positional (sinusoidal)
timestep embeddings accept any real t, so nothing is rounded; memory is O(batch).

Outside the trained range [logsnr(T-1), logsnr(0)] (DDPM: -10.12 ... +9.21) there is no timestep to
map to. Two policies, both valid denoisers, so both keep the estimate an upper bound:
- "clamp" (default): t is clamped to [0, T-1]. The U-Net still sees z and can tell the noise level
  from it; fine-tuning then teaches it the SNRs beyond the range, which is where the fine structure
  of 8-bit images (and most of the continuous-density gain) lies.
- "gaussian": there the denoiser is the data-matched Gaussian reference's optimal predictor, so
  the control-variate integrand is exactly zero outside the trained range: the bound only uses the
  U-Net where it was trained (no gain beyond it, and no noise from it either).
"""
import json
import os
import re
import warnings

import torch as t

import utils

DDPM_CIFAR10 = "google/ddpm-cifar10-32"

# config.json of google/ddpm-cifar10-32 (35.7M parameters), so that --from_scratch and the
# benchmarks build the real architecture without network access.
DDPM_CIFAR10_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def small_unet_config(channels=3, size=32, width=32):
    """A small two-level U-Net (attention at the lower resolution) for tiny images and CPU runs."""
    return {
        "sample_size": size, "in_channels": channels, "out_channels": channels,
        "block_out_channels": [width, 2 * width], "layers_per_block": 2, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }


def schedule_logsnr(alphas_cumprod):
    """log SNR of every integer timestep, log(alpha_bar / (1 - alpha_bar)), float64, decreasing."""
    ab = t.as_tensor(alphas_cumprod).to("cpu", t.float64)
    if ab.dim() != 1 or len(ab) < 2 or not ((ab > 0) & (ab < 1)).all():
        raise ValueError("alphas_cumprod must be a 1-D schedule with values in (0, 1)")
    logsnr = ab.log() - (-ab).log1p()
    if not (logsnr[1:] < logsnr[:-1]).all():
        raise ValueError("the schedule's log SNR must decrease strictly with the timestep")
    return logsnr


def logsnr_schedule(lo, hi, steps=1000):
    """alphas_cumprod of a schedule whose log SNR falls linearly from hi (t = 0) to lo (t = steps-1):
    for U-Nets trained from scratch, so that timesteps cover exactly the integration range."""
    if not -36 < lo < hi < 36:  # beyond, alpha_bar rounds to 0 or 1 in float64
        raise ValueError(f"log SNR range must lie within (-36, 36), got [{lo}, {hi}]")
    return t.sigmoid(t.linspace(hi, lo, steps, dtype=t.float64))


def logsnr_to_timestep(logsnr, table):
    """Continuous timestep t(a) with table(t) = a, by linear interpolation of the decreasing table
    `table` (log SNR at t = 0 .. T-1); clamped to [0, T-1] outside the table's range."""
    asc = table.flip(0)  # increasing, index k <-> t = T - 1 - k
    a = logsnr.to(asc.dtype).clamp(asc[0], asc[-1])
    k = t.searchsorted(asc, a).clamp(1, len(asc) - 1)
    lo, hi = asc[k - 1], asc[k]
    return (len(asc) - k) - (a - lo) / (hi - lo)


def timestep_to_logsnr(timestep, table):
    """table(t) at continuous t in [0, T-1], by linear interpolation (the inverse of the above)."""
    tt = t.as_tensor(timestep, dtype=table.dtype, device=table.device).clamp(0, len(table) - 1)
    i = tt.floor().long().clamp(max=len(table) - 2)
    return t.lerp(table[i], table[i + 1], tt - i)


class UNetDenoiser(t.nn.Module):
    """denoiser(z, logsnr) -> eps_hat for an epsilon-predicting UNet2DModel with positional timestep
    embeddings, trained on the schedule `alphas_cumprod` (default: DDPM, linear betas 1e-4..0.02,
    T = 1000).

    The U-Net's config and the schedule travel in the module's state dict (extra state), so a
    checkpoint alone rebuilds the architecture (`unet_from_state_dict`).
    """

    def __init__(self, unet, alphas_cumprod=None, outside="clamp"):
        super().__init__()
        if outside not in ("clamp", "gaussian"):
            raise ValueError(f"outside must be 'clamp' or 'gaussian', got {outside!r}")
        if unet.config.time_embedding_type != "positional":
            raise ValueError("only U-Nets with positional timestep embeddings are supported, got "
                             f"time_embedding_type={unet.config.time_embedding_type!r}")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError("the U-Net must predict noise of the input's shape "
                             f"(in_channels {unet.config.in_channels} != out_channels "
                             f"{unet.config.out_channels})")
        if alphas_cumprod is None:
            from diffusers import DDPMScheduler
            alphas_cumprod = DDPMScheduler().alphas_cumprod
        self.unet = unet
        self.outside = outside
        self._set_schedule(alphas_cumprod)
        self.fallback = None  # eps predictor used outside the range under outside="gaussian"

    def _set_schedule(self, alphas_cumprod):
        # A plain attribute, not a buffer: "16-true"/"bf16-true" precision would otherwise round
        # the table to 8 bits of mantissa. Device copies are cached on first use.
        self.alphas_cumprod = t.as_tensor(alphas_cumprod).to("cpu", t.float64)
        self.logsnr_table = schedule_logsnr(self.alphas_cumprod)
        self._tables = {}

    def set_fallback(self, reference):
        """Outside the trained range, eps_hat = reference.eps(z, a) (a utils.GaussianReference,
        normally the DiffusionModel's own, data-matched one). Stored as a bound method so the
        reference is not registered twice in the state dict. reference=None gives 0 there: the
        fallback for a U-Net whose output is added to the Gaussian predictor
        (DiffusionModel(gaussian_residual=True))."""
        self.fallback = _zero if reference is None else reference.eps
        return self

    @property
    def logsnr_range(self):
        """(lowest, highest) log SNR the U-Net was trained on."""
        return float(self.logsnr_table[-1]), float(self.logsnr_table[0])

    def _table(self, device):
        # float64 where the device has it (MPS does not; float32 still round-trips to < 1e-3 steps).
        if device not in self._tables:
            self._tables[device] = self.logsnr_table.to(
                device, t.float32 if device.type == "mps" else t.float64)
        return self._tables[device]

    def timestep(self, logsnr):
        """Continuous timestep (float32) for each log SNR, clamped to [0, T-1]."""
        return logsnr_to_timestep(logsnr, self._table(logsnr.device)).float()

    def forward(self, z, logsnr):
        eps = self.unet(z, self.timestep(logsnr), return_dict=False)[0]
        if self.outside == "gaussian":
            if self.fallback is None:
                raise RuntimeError("outside='gaussian' needs set_fallback(reference) first")
            lo, hi = self.logsnr_range
            inside = ((logsnr >= lo) & (logsnr <= hi)).view((-1,) + (1,) * (z.dim() - 1))
            # The U-Net runs on the whole batch so that every parameter takes part in each step
            # (DDP requires it); rows outside the range take the Gaussian prediction.
            eps = t.where(inside, eps, self.fallback(z, logsnr).to(eps.dtype))
        return eps

    def get_extra_state(self):
        return {"unet_config": _plain_config(self.unet.config),
                "alphas_cumprod": self.alphas_cumprod.clone(), "outside": self.outside}

    def set_extra_state(self, state):
        if state["unet_config"] != _plain_config(self.unet.config):
            raise ValueError("the checkpoint's U-Net config differs from this model's")
        self._set_schedule(state["alphas_cumprod"])


def _zero(z, logsnr):
    return t.zeros_like(z)


def _plain_config(config):
    """A UNet2DModel config as a plain JSON-able dict without diffusers' bookkeeping keys (safe for
    torch.load(weights_only=True))."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def unet_from_state_dict(state_dict, prefix="model."):
    """(U-Net with random weights, alphas_cumprod) from a DiffusionModel state dict saved with a
    UNetDenoiser; the caller then loads the weights."""
    from diffusers import UNet2DModel
    try:
        state = state_dict[prefix + "_extra_state"]
    except KeyError:
        raise utils.UserError("the checkpoint holds no U-Net config (was it written by "
                              "train_cifar10.py?)") from None
    return UNet2DModel.from_config(state["unet_config"]), state["alphas_cumprod"]


# ---------------------------------------------------------------------------------------------
# Loading: a local directory or a Hugging Face hub id
# ---------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _layout(directory):
    """Subfolders holding the U-Net and the scheduler configs: a model saved with
    UNet2DModel.save_pretrained (both at the top) or a whole pipeline (unet/, scheduler/)."""
    def sub(config, folder):
        return None if os.path.isfile(os.path.join(directory, config)) else folder
    return sub("config.json", "unet"), sub("scheduler_config.json", "scheduler")


def _fetch(source, from_scratch, unet_sub=None, sched_sub=None, **kwargs):
    """(U-Net, alphas_cumprod or None) through diffusers' from_pretrained / load_config."""
    from diffusers import DDPMScheduler, UNet2DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hub deprecation chatter
        if from_scratch:
            config = UNet2DModel.load_config(source, subfolder=unet_sub, **kwargs)
            unet = UNet2DModel.from_config(config)
        else:  # low_cpu_mem_usage=False: accelerate is not a dependency (and avoids its warning)
            unet = UNet2DModel.from_pretrained(source, subfolder=unet_sub, low_cpu_mem_usage=False,
                                               **kwargs)
        try:
            scheduler = DDPMScheduler.from_pretrained(source, subfolder=sched_sub, **kwargs)
            schedule = scheduler.alphas_cumprod
        except (OSError, ValueError):  # no scheduler_config.json: DDPM's schedule
            schedule = None
    return unet.train(), schedule  # from_pretrained returns the model in eval mode


def load_unet(source, from_scratch=False, online=None):
    """(UNet2DModel, alphas_cumprod or None, where it came from) for a local directory or a hub id.

    A directory is read as it is. A hub id is looked up in the local Hugging Face cache first and
    downloaded only if `online()` says the hub is reachable; otherwise a utils.UserError explains
    what is missing and how to provide it. `from_scratch` reads only the config (random weights);
    for google/ddpm-cifar10-32 the config is built in, so that needs no network.
    The schedule is None when the source has no scheduler_config.json (then DDPM's is used).
    """
    if os.path.isdir(source):
        unet_sub, sched_sub = _layout(source)
        if not os.path.isfile(os.path.join(source, unet_sub or "", "config.json")):
            raise utils.UserError(f"{source} holds no U-Net: expected config.json (and the "
                                  "weights) from UNet2DModel.save_pretrained, or a pipeline "
                                  "folder with unet/config.json")
        try:
            return (*_fetch(source, from_scratch, unet_sub, sched_sub), os.path.abspath(source))
        except (OSError, ValueError) as err:
            raise utils.UserError(f"cannot load the U-Net from {source}: {err}") from None

    if not _HUB_ID.match(source):
        raise utils.UserError(f"--pretrained {source}: no such directory, and not a hub id of the "
                              "form owner/name")
    if from_scratch and source == DDPM_CIFAR10:
        from diffusers import UNet2DModel
        return UNet2DModel.from_config(DDPM_CIFAR10_CONFIG), None, f"{source} config (built in)"
    try:
        return (*_fetch(source, from_scratch, local_files_only=True), f"{source} (hub cache)")
    except OSError:
        pass
    from huggingface_hub import constants
    if online is not None and online():
        try:
            return (*_fetch(source, from_scratch), f"{source} (downloaded)")
        except (OSError, ValueError) as err:
            raise utils.UserError(f"cannot download the U-Net {source} from {constants.ENDPOINT}: "
                                  f"{str(err).splitlines()[0]}") from None
    name = source.split("/")[-1]
    raise utils.UserError(
        f"pretrained U-Net {source!r} not found: it is not a local directory, not in the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}), and {constants.ENDPOINT} is not reachable (or "
        "--offline / HF_HUB_OFFLINE=1 is set). On a machine with internet run\n"
        f"    python -c \"from huggingface_hub import snapshot_download; "
        f"snapshot_download('{source}', local_dir='{name}')\"\n"
        f"copy the folder {name}/ here and pass --pretrained {name}; or start from random weights "
        "with --from_scratch.")
