"""The diffusers U-Net adapter: a UNet2DModel as a denoiser eps_hat = denoiser(z, logsnr[, y]).

A log SNR becomes the continuous timestep at which the model's own schedule has it, and the
output, whatever the scheduler's prediction_type, becomes the noise prediction. Outside the
trained range the timestep is clamped ("clamp") or the data-matched Gaussian's optimal predictor
takes over ("gaussian"); both are denoisers, so estimates stay upper bounds (docs/images.md).
`build` makes one from a hub id, a local folder or a small random U-Net sized for the data.
"""
import contextlib
import json
import logging
import os
import re
import warnings

import torch as t

import utils
import cli
from cli import UserError
from denoisers import no_label_last

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


def small_unet_config(channels=3, size=32, width=32, num_classes=None):
    """A small two-level U-Net (attention at the lower resolution) for tiny images and CPU runs;
    with num_classes, class-conditional (one more embedding for "no label")."""
    return {
        "sample_size": size, "in_channels": channels, "out_channels": channels,
        "block_out_channels": [width, 2 * width], "layers_per_block": 2, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "num_class_embeds": None if num_classes is None else num_classes + 1,
    }


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler prediction_type
LEARNED_VARIANCES = ("learned", "learned_range")  # scheduler variance_types we refuse


def logsnr_to_timestep(logsnr, table):
    """Continuous timestep t(a) with table(t) = a, by linear interpolation of the decreasing table
    `table` (log SNR at t = 0 .. T-1); clamped to [0, T-1] outside the table's range."""
    asc = table.flip(0)  # increasing, index k <-> t = T - 1 - k
    a = logsnr.to(asc.dtype).clamp(asc[0], asc[-1])
    k = t.searchsorted(asc, a).clamp(1, len(asc) - 1)
    lo, hi = asc[k - 1], asc[k]
    return (len(asc) - k) - (a - lo) / (hi - lo)


class UNetDenoiser(t.nn.Module):
    """denoiser(z, logsnr[, y]) -> eps_hat for a UNet2DModel (or its config) with positional
    timestep embeddings, trained on the schedule `alphas_cumprod` (default: DDPM's) to predict
    `prediction_type` ("epsilon", "v_prediction" or "sample"), converted to the noise at the
    channel's own log SNR. `config` holds what rebuilds it (denoisers.record)."""

    def __init__(self, unet, alphas_cumprod=None, outside="clamp", prediction_type="epsilon"):
        super().__init__()
        if isinstance(unet, dict):  # a config (a checkpoint's record): random weights
            from diffusers import UNet2DModel
            unet = UNet2DModel.from_config(unet)
        if outside not in ("clamp", "gaussian"):
            raise ValueError(f"outside must be 'clamp' or 'gaussian', got {outside!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                             f"{prediction_type!r}")
        self.prediction_type = prediction_type
        if unet.config.time_embedding_type != "positional":
            raise ValueError("only U-Nets with positional timestep embeddings are supported, got "
                             f"time_embedding_type={unet.config.time_embedding_type!r}")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(f"the U-Net has {unet.config.out_channels} output channels for "
                             f"{unet.config.in_channels} input channels (a learned variance?): "
                             "only U-Nets whose output has the input's shape are supported")
        if alphas_cumprod is None:
            from diffusers import DDPMScheduler
            alphas_cumprod = DDPMScheduler().alphas_cumprod
        self.unet = unet
        self.outside = outside
        self._set_schedule(alphas_cumprod)
        self.fallback = None  # eps predictor used outside the range under outside="gaussian"

    def _set_schedule(self, alphas_cumprod):
        # A plain attribute, not a buffer: "16-true"/"bf16-true" precision would otherwise round
        # the table to 8 bits of mantissa. Device copies are cached on first use. float64 also
        # from a list (a checkpoint's record), which as_tensor would make float32.
        self.alphas_cumprod = t.as_tensor(alphas_cumprod, dtype=t.float64, device="cpu")
        self.logsnr_table = utils.schedule_logsnr(self.alphas_cumprod)
        self._tables = {}

    @property
    def config(self):
        return dict(unet=_plain_config(self.unet.config), alphas_cumprod=self.alphas_cumprod.tolist(),
                    outside=self.outside, prediction_type=self.prediction_type)

    def set_fallback(self, reference):
        """Outside the trained range under outside="gaussian": reference.eps(z, a, y) (the model's
        data-matched Gaussian, kept as a bound method so it is not registered twice), or 0 for
        reference=None (a U-Net added to the Gaussian's prediction)."""
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

    @property
    def num_classes(self):
        """The labels of a class-conditional U-Net (num_class_embeds - 1: the last embedding is
        "no label"), None for an unconditional one."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        return None if n is None else n - 1

    def forward(self, z, logsnr, y=None):
        labels = {} if self.num_classes is None else dict(class_labels=no_label_last(
            y, len(z), self.num_classes, z.device))
        out = self.unet(z, self.timestep(logsnr), return_dict=False, **labels)[0]
        eps = self.to_eps(z, logsnr, out)
        if self.outside == "gaussian":
            if self.fallback is None:
                raise RuntimeError("outside='gaussian' needs set_fallback(reference) first")
            lo, hi = self.logsnr_range
            inside = ((logsnr >= lo) & (logsnr <= hi)).view((-1,) + (1,) * (z.dim() - 1))
            # The U-Net runs on the whole batch so that every parameter takes part in each step
            # (DDP requires it); rows outside the range take the Gaussian prediction.
            eps = t.where(inside, eps, self.fallback(z, logsnr, y).to(eps.dtype))
        return eps

    def to_eps(self, z, logsnr, out):
        """The noise prediction from the U-Net's output, in z's dtype (float32 under autocast)
        unless it is already the noise. It uses the channel's log SNR a even where the timestep
        was clamped: z is at log SNR a, whatever noise level the U-Net assumed."""
        if self.prediction_type == "epsilon":
            return out
        out = out.to(z.dtype)
        if self.prediction_type == "sample":
            return utils.eps_from_x(z, logsnr, out)
        a = utils.append_dims(logsnr.to(z.dtype), z.dim())  # v_prediction
        return t.sigmoid(-a).sqrt() * z + t.sigmoid(a).sqrt() * out


def _zero(z, logsnr, y=None):
    return t.zeros_like(z)


def _plain_config(config):
    """A UNet2DModel config as a plain JSON-able dict without diffusers' bookkeeping keys (safe for
    torch.load(weights_only=True))."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _layout(directory):
    """Subfolders holding the U-Net and the scheduler configs: a model saved with
    UNet2DModel.save_pretrained (both at the top) or a whole pipeline (unet/, scheduler/)."""
    def sub(config, folder):
        return None if os.path.isfile(os.path.join(directory, config)) else folder
    return sub("config.json", "unet"), sub("scheduler_config.json", "scheduler")


def _fetch(source, from_scratch, unet_sub=None, sched_sub=None, **kwargs):
    """(U-Net, alphas_cumprod or None, prediction_type) through diffusers' from_pretrained /
    load_config; the scheduler config, when there is one, gives the schedule and what the U-Net
    predicts (else DDPM's schedule and "epsilon"). Learned-variance schedulers are refused."""
    from diffusers import DDPMScheduler, UNet2DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hub deprecation chatter
        if from_scratch:
            unet = UNet2DModel.from_config(UNet2DModel.load_config(source, subfolder=unet_sub,
                                                                   **kwargs))
        else:  # low_cpu_mem_usage=False: accelerate is not a dependency (and avoids its warning)
            unet = UNet2DModel.from_pretrained(source, subfolder=unet_sub, low_cpu_mem_usage=False,
                                               **kwargs)
        try:
            scheduler = DDPMScheduler.from_pretrained(source, subfolder=sched_sub, **kwargs)
        except (OSError, ValueError):  # no scheduler_config.json: DDPM's schedule, epsilon
            return unet.train(), None, "epsilon"
    variance_type = scheduler.config.get("variance_type")
    if variance_type in LEARNED_VARIANCES:
        raise ValueError(f"it learns its variance (its scheduler's variance_type is "
                         f"{variance_type!r}): not supported")
    # from_pretrained returns the U-Net in eval mode
    return unet.train(), scheduler.alphas_cumprod, scheduler.config.prediction_type


def _adapter(found, source, outside):
    """UNetDenoiser(*found), or a UserError naming the source and what is wrong with it."""
    try:
        return UNetDenoiser(found[0], found[1], outside, found[2])
    except ValueError as err:
        raise UserError(f"the U-Net {source}: {err}") from None


def load(source, from_scratch=False, online=None, outside="clamp"):
    """(UNetDenoiser, where it came from) for a local folder or a hub id.

    A folder (UNet2DModel.save_pretrained, or a pipeline with unet/ and scheduler/) is read as it
    is. A hub id is looked up in the local Hugging Face cache first and downloaded only if
    `online()` says the hub is reachable; otherwise a UserError says what is missing and how to
    provide it. `from_scratch` reads only the config (random weights); for google/ddpm-cifar10-32
    the config is built in, so that needs no network. Without a scheduler_config.json the
    schedule is DDPM's and the prediction "epsilon".
    """
    with _quiet_diffusers():
        return _load(source, from_scratch, online, outside)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' own log lines (its fetch errors and serialization advice) silenced: a failed
    load ends in one UserError of ours."""
    from diffusers.utils import logging as diffusers_logging
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load(source, from_scratch, online, outside):
    if os.path.isdir(source):
        unet_sub, sched_sub = _layout(source)
        if not os.path.isfile(os.path.join(source, unet_sub or "", "config.json")):
            raise UserError(f"{source} holds no U-Net: expected config.json (and the weights) "
                            "from UNet2DModel.save_pretrained, or a pipeline folder with "
                            "unet/config.json")
        try:
            found = _fetch(source, from_scratch, unet_sub, sched_sub)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the U-Net from {source}: "
                            f"{str(err).splitlines()[0]}") from None
        return _adapter(found, source, outside), os.path.abspath(source)
    if not _HUB_ID.match(source):
        raise UserError(f"--pretrained {source}: no such directory, and not a hub id of the form "
                        "owner/name")
    if from_scratch and source == DDPM_CIFAR10:
        from diffusers import UNet2DModel
        found = UNet2DModel.from_config(DDPM_CIFAR10_CONFIG), None, "epsilon"
        return _adapter(found, source, outside), f"{source} config (built in)"
    try:
        found = _fetch(source, from_scratch, local_files_only=True)
        return _adapter(found, source, outside), f"{source} (hub cache)"
    except OSError:
        pass
    from huggingface_hub import constants
    if online is not None and online():
        try:
            found = _fetch(source, from_scratch)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot download the U-Net {source} from {constants.ENDPOINT}: "
                            f"{str(err).splitlines()[0]}") from None
        return _adapter(found, source, outside), f"{source} (downloaded)"
    name = source.split("/")[-1]
    raise UserError(
        f"pretrained U-Net {source!r} not found: it is not a local directory, not in the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}), and {constants.ENDPOINT} is not reachable (or "
        "--offline / HF_HUB_OFFLINE=1 is set). On a machine with internet run\n"
        f"    python -c \"from huggingface_hub import snapshot_download; "
        f"snapshot_download('{source}', local_dir='{name}')\"\n"
        f"copy the folder {name}/ here and pass --pretrained {name}; or start from random weights "
        "with --from_scratch.")


def build(source, x_shape, logsnr_range, from_scratch=False, width=32, outside="clamp",
          residual=False, online=None, num_classes=None):
    """(UNetDenoiser, where it came from) for a run: `source` "none" is a small U-Net sized for
    images of x_shape whose timesteps span logsnr_range linearly in log SNR (nothing is
    clamped), anything else goes to `load`. residual: its output is added to the Gaussian's noise
    prediction, so it must predict the noise and starts at zero. num_classes: class-conditional.
    A U-Net that does not fit the images or the labels is a UserError."""
    if source == "none":
        from diffusers import UNet2DModel
        net = UNet2DModel.from_config(small_unet_config(x_shape[0], x_shape[-1], width,
                                                        num_classes))
        denoiser = UNetDenoiser(net, utils.logsnr_schedule(*logsnr_range), outside)
        where = "small U-Net, random weights"
    else:
        denoiser, where = load(source, from_scratch, online, outside)
        if num_classes is not None and denoiser.num_classes is None:
            denoiser, where = with_class_embeddings(denoiser, num_classes), where + " + labels"
    if residual and denoiser.prediction_type != "epsilon":
        raise UserError(f"--gaussian_residual adds the U-Net's output to the Gaussian's noise "
                        f"prediction, but {where} predicts {denoiser.prediction_type}")
    if residual:  # start exactly at the Gaussian predictor
        t.nn.init.zeros_(denoiser.unet.conv_out.weight)
        t.nn.init.zeros_(denoiser.unet.conv_out.bias)
    if denoiser.num_classes != num_classes:
        raise UserError(f"the U-Net ({where}) is for {denoiser.num_classes or 'no'} labels, the run "
                        f"for {num_classes or 'none'}")
    cfg = denoiser.unet.config
    levels = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.in_channels != x_shape[0] or x_shape[1] % levels or x_shape[2] % levels:
        raise UserError(f"the U-Net ({where}) takes {cfg.in_channels}-channel images with sides "
                        f"divisible by {levels}; the images are {tuple(x_shape)}")
    return denoiser, where


def with_class_embeddings(denoiser, num_classes):
    """An unconditional U-Net made class-conditional for fine-tuning: one new embedding per label
    and one for "no label" (the last), added to the timestep embedding as diffusers does, and
    zero at the start, so the network begins as it was for every label."""
    unet = denoiser.unet
    if unet.config.get("class_embed_type") is not None:
        raise UserError(f"the U-Net's class embedding ({unet.config.class_embed_type}) is not "
                        "one per label")
    width = unet.time_embedding.linear_2.out_features
    unet.class_embedding = t.nn.Embedding(num_classes + 1, width).to(unet.device, unet.dtype)
    t.nn.init.zeros_(unet.class_embedding.weight)
    unet.register_to_config(num_class_embeds=num_classes + 1)
    return denoiser


def from_args(args, data):
    """The U-Net of a run's flags (--pretrained, or a small one sized for the data) and where it
    came from; the hub is asked only when allowed and reachable."""
    from proposals import LogisticProposal

    def online():
        from huggingface_hub import constants
        return (not args.offline and not constants.HF_HUB_OFFLINE
                and cli.reachable(constants.ENDPOINT))
    logsnrs = LogisticProposal(args.logsnr_loc, args.logsnr_scale, args.clip).range
    if args.pretrained == "none" and not args.eval_only:  # the small U-Net, measured: about
        # 1000 width^2 parameters; a training sample 550 B per pixel and channel of the first level
        size = data.x_shape[1] * data.x_shape[2] * args.unet_width
        cli.check_fits(None, "--batch_size", f"{args.batch_size} (--unet_width {args.unet_width})",
                       16 * 1000 * args.unet_width ** 2 + 550 * size * args.batch_size)
    return build(args.pretrained, data.x_shape, logsnrs, args.from_scratch, args.unet_width,
                 args.outside, args.gaussian_residual, online, data.num_classes)
