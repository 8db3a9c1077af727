"""The diffusers U-Net adapter: a UNet2DModel as a denoiser eps_hat(z, a[, y]) (docs/images.md)."""
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

# config.json of google/ddpm-cifar10-32 (35.7M parameters): --from_scratch needs no network
DDPM_CIFAR10_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def small_unet_config(channels=3, size=32, width=32, num_classes=None):
    """A small two-level U-Net config for tiny images and CPU runs (num_classes: conditional)."""
    return dict(sample_size=size, in_channels=channels, out_channels=channels,
                block_out_channels=[width, 2 * width], layers_per_block=2, norm_num_groups=8,
                down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                num_class_embeds=None if num_classes is None else num_classes + 1)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler prediction_type
LEARNED_VARIANCES = ("learned", "learned_range")  # scheduler variance_types we refuse


def logsnr_to_timestep(logsnr, table):
    """Continuous timestep t with table(t) = a (log SNR at t = 0 .. T-1), clamped to [0, T-1]."""
    asc = table.flip(0)  # increasing, index k <-> t = T - 1 - k
    a = logsnr.to(asc.dtype).clamp(asc[0], asc[-1])
    k = t.searchsorted(asc, a).clamp(1, len(asc) - 1)
    lo, hi = asc[k - 1], asc[k]
    return (len(asc) - k) - (a - lo) / (hi - lo)


class UNetDenoiser(t.nn.Module):
    """eps_hat = denoiser(z, logsnr[, y]) of a UNet2DModel (or its config) on `alphas_cumprod`."""

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
        self.unet, self.outside, self.prediction_type = unet, outside, prediction_type
        # A plain float64 attribute, not a buffer: "bf16-true" precision would round a buffer
        self.alphas_cumprod = t.as_tensor(alphas_cumprod, dtype=t.float64, device="cpu")
        self.logsnr_table = utils.schedule_logsnr(self.alphas_cumprod)
        self._tables = {}  # the table on each device, made on first use
        self.fallback = None  # eps predictor used outside the range under outside="gaussian"

    @property
    def config(self):
        plain = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return dict(unet=json.loads(json.dumps(plain)), alphas_cumprod=self.alphas_cumprod.tolist(),
                    outside=self.outside, prediction_type=self.prediction_type)

    def set_fallback(self, reference):
        """Predict reference.eps (0 for None) outside the trained range under outside="gaussian"."""
        self.fallback = _zero if reference is None else reference.eps  # not registered twice
        return self

    @property
    def logsnr_range(self):
        """(lowest, highest) log SNR the U-Net was trained on."""
        return float(self.logsnr_table[-1]), float(self.logsnr_table[0])

    def timestep(self, logsnr):
        """Continuous float32 timestep of each log SNR (table in float64 except on MPS)."""
        device = logsnr.device
        if device not in self._tables:
            dtype = t.float32 if device.type == "mps" else t.float64
            self._tables[device] = self.logsnr_table.to(device, dtype)
        return logsnr_to_timestep(logsnr, self._tables[device]).float()

    @property
    def num_classes(self):
        """The labels of a class-conditional U-Net (its last class embedding is "no label")."""
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
            inside = utils.append_dims((logsnr >= lo) & (logsnr <= hi), z.dim())
            # the U-Net runs on the whole batch: DDP needs every parameter in each step
            eps = t.where(inside, eps, self.fallback(z, logsnr, y).to(eps.dtype))
        return eps

    def to_eps(self, z, logsnr, out):
        """The noise prediction from the U-Net's output at the log SNR z is really at."""
        if self.prediction_type == "epsilon":
            return out
        out = out.to(z.dtype)
        if self.prediction_type == "sample":
            return utils.eps_from_x(z, logsnr, out)
        return utils.noisy_channel(z, -logsnr, out)  # v_prediction: sqrt(s(-a)) z + sqrt(s(a)) v


def _zero(z, logsnr, y=None):
    return t.zeros_like(z)


def _fetch(source, from_scratch, outside, unet_sub=None, sched_sub=None, **kwargs):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.utils import logging as diffusers_logging
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL + 1)  # its log lines, as it loads
    try:
        with warnings.catch_warnings(action="ignore"):  # hub deprecation chatter
            where = dict(subfolder=unet_sub, **kwargs)
            if from_scratch:
                unet = UNet2DModel.from_config(UNet2DModel.load_config(source, **where))
            else:  # low_cpu_mem_usage=False: accelerate isn't a dependency (and avoids its warning)
                unet = UNet2DModel.from_pretrained(source, low_cpu_mem_usage=False, **where)
            try:
                scheduler = DDPMScheduler.from_pretrained(source, subfolder=sched_sub, **kwargs)
                schedule, prediction = scheduler.alphas_cumprod, scheduler.config.prediction_type
            except (OSError, ValueError):  # no scheduler_config.json: DDPM's schedule, epsilon
                scheduler, schedule, prediction = None, None, "epsilon"
    finally:
        diffusers_logging.set_verbosity(level)
    if scheduler is not None and scheduler.config.get("variance_type") in LEARNED_VARIANCES:
        raise ValueError(f"it learns its variance (its scheduler's variance_type is "
                         f"{scheduler.config.variance_type!r}): not supported")
    try:
        return UNetDenoiser(unet.train(), schedule, outside, prediction)  # from eval mode
    except ValueError as err:
        raise UserError(f"the U-Net {source}: {err}") from None


def load(source, from_scratch=False, online=None, outside="clamp"):
    """(UNetDenoiser, where it came from) for a local folder or a hub id (cache, else downloaded
    if `online()`); from_scratch: the config alone, random weights (docs/images.md)."""
    if os.path.isdir(source):
        def sub(config, folder):  # at the top (save_pretrained) or in the pipeline's folder
            return None if os.path.isfile(os.path.join(source, config)) else folder
        unet_sub, sched_sub = sub("config.json", "unet"), sub("scheduler_config.json", "scheduler")
        if not os.path.isfile(os.path.join(source, unet_sub or "", "config.json")):
            raise UserError(f"{source} holds no U-Net: expected config.json (and the weights) "
                            "from UNet2DModel.save_pretrained, or a pipeline folder with "
                            "unet/config.json")
        try:
            denoiser = _fetch(source, from_scratch, outside, unet_sub, sched_sub)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the U-Net from {source}: "
                            f"{str(err).splitlines()[0]}") from None
        return denoiser, os.path.abspath(source)
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", source):
        raise UserError(f"--pretrained {source}: no such directory, and not a hub id of the form "
                        "owner/name")
    if from_scratch and source == DDPM_CIFAR10:  # random weights
        return UNetDenoiser(DDPM_CIFAR10_CONFIG, None, outside), f"{source} config (built in)"
    with contextlib.suppress(OSError):  # not in the hub cache
        return _fetch(source, from_scratch, outside, local_files_only=True), f"{source} (hub cache)"
    from huggingface_hub import constants
    if online is not None and online():
        try:
            return _fetch(source, from_scratch, outside), f"{source} (downloaded)"
        except (OSError, ValueError) as err:
            raise UserError(f"cannot download the U-Net {source} from {constants.ENDPOINT}: "
                            f"{str(err).splitlines()[0]}") from None
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
    """(UNetDenoiser, where it came from) for a run: source "none" is a small U-Net over
    logsnr_range, anything else goes to `load`; residual: added to the Gaussian's, from zero."""
    if source == "none":
        config = small_unet_config(x_shape[0], x_shape[-1], width, num_classes)
        denoiser = UNetDenoiser(config, utils.logsnr_schedule(*logsnr_range), outside)
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
        raise UserError(f"the U-Net ({where}) is for {denoiser.num_classes or 'no'} labels, the "
                        f"run for {num_classes or 'none'}")
    cfg = denoiser.unet.config
    levels = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.in_channels != x_shape[0] or x_shape[1] % levels or x_shape[2] % levels:
        raise UserError(f"the U-Net ({where}) takes {cfg.in_channels}-channel images with sides "
                        f"divisible by {levels}; the images are {tuple(x_shape)}")
    return denoiser, where


def with_class_embeddings(denoiser, num_classes):
    """The U-Net made class-conditional: zero-initialised embeddings per label and "no label"."""
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
    """The U-Net of a run's flags and where it came from (the hub only if allowed, reachable)."""
    def online():
        from huggingface_hub import constants
        return (not args.offline and not constants.HF_HUB_OFFLINE
                and cli.reachable(constants.ENDPOINT))
    if args.pretrained == "none" and not args.eval_only:  # small U-Net: measured, docs/images.md
        size = data.x_shape[1] * data.x_shape[2] * args.unet_width
        cli.check_fits(None, "--batch_size", f"{args.batch_size} (--unet_width {args.unet_width})",
                       16 * 1000 * args.unet_width ** 2 + 550 * size * args.batch_size)
    return build(args.pretrained, data.x_shape, cli.logsnr_range(args), args.from_scratch,
                 args.unet_width, args.outside, args.gaussian_residual, online, data.num_classes)
