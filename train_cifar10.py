"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                                  # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --pretrained ./ddpm-cifar10-32   # the same weights from a local folder
    python train_cifar10.py --dataset digits                 # 8x8 digits, small U-Net, CPU minutes

TensorBoard (tensorboard --logdir exps) shows val_loss (nats per image), val_bpd (bits/dim of the
continuous density on [-1, 1]), the MSE curve against the data-matched Gaussian's MMSE, and model
samples. Nothing is downloaded unless a dataset or the weights are missing locally and the server
answers within seconds (never with --offline or HF_HUB_OFFLINE=1).

The U-Net adapter (below) makes a diffusers UNet2DModel a denoiser eps_hat = denoiser(z, logsnr):
a log SNR becomes the continuous timestep at which the model's own schedule has it (docs/maths.md),
and the output, whatever the scheduler's prediction_type (epsilon, v_prediction or sample), becomes
the noise prediction.
Outside the trained range (DDPM: -10.12 ... +9.21) the timestep is clamped ("clamp": the U-Net
still sees how noisy z is, and fine-tuning teaches it those SNRs) or the data-matched Gaussian's
optimal predictor takes over ("gaussian"); both are denoisers, so estimates stay upper bounds.
"""
import functools
import json
import os
import re
import time
import warnings

import cli

SCRIPT = "train_cifar10.py"
DEFAULTS = {  # per dataset; the first is the default dataset
    # CIFAR-10: the paper's continuous density of the 8-bit pixels scaled to [-1, 1]; the original
    # ITD code's (loc, scale) = (6, 3); a small constant learning rate for fine-tuning.
    "cifar10": dict(pretrained="google/ddpm-cifar10-32", dequantize=False, logsnr_loc=6.,
                    logsnr_scale=3., learning_rate=1e-4, lr_schedule="constant", batch_size=64,
                    num_epochs=50, val_every=1, val_npoints=8, eval_batch_size=100, num_samples=16,
                    fit_proposal=0),
    # digits: 17 grey levels, and border pixels that are always 0 in the training set: without
    # dequantisation the data-matched Gaussian is degenerate there.
    # loc, scale: the crossings of its MSE curve (suggested_logsnr_loc/scale) after one run.
    "digits": dict(pretrained="none", dequantize=True, logsnr_loc=4., logsnr_scale=2.,
                   learning_rate=2e-3, lr_schedule="onecycle", batch_size=64, num_epochs=30,
                   val_every=5, val_npoints=16, eval_batch_size=100, num_samples=16,
                   fit_proposal=0),
    "fake": dict(pretrained="none", dequantize=False, logsnr_loc=2., logsnr_scale=3.,
                 learning_rate=1e-3, lr_schedule="constant", batch_size=32, num_epochs=1,
                 val_every=1, val_npoints=8, eval_batch_size=100, num_samples=16,
                 fit_proposal=0),
}


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (cli.parse; None for a --resume before checkpoint_args is given)."""
    parser = cli.build_parser(__doc__.split("\n\n")[0], cli.IMAGE_DATASETS, DEFAULTS)
    group = parser.add_argument_group("images")
    group.add_argument("--data_dir", default="data",
                       help="folder holding cifar-10-batches-py (CIFAR-10 is downloaded there if "
                            "missing and the server is reachable)")
    group.add_argument("--offline", action="store_true",
                       help="never download; also implied by HF_HUB_OFFLINE=1 for the weights")
    group.add_argument("--dequantize", type=cli.str2bool, default=None,
                       help=cli.per_dataset(DEFAULTS, "dequantize", "add uniform noise "
                                                   "within each pixel's bin, making the data a "
                                                   "genuine continuous density"))
    group.add_argument("--image_size", type=cli.positive(int), default=32,
                       help="fake: image side")
    group.add_argument("--fake_size", type=cli.positive(int), default=512,
                       help="fake: training images (a quarter as many for validation)")
    group.add_argument("--reference_size", type=cli.positive(int), default=5000,
                       help="training images the data-matched Gaussian reference is fit on")
    group = parser.add_argument_group("the U-Net")
    group.add_argument("--pretrained", default=None, metavar="ID|DIR|none",
                       help=cli.per_dataset(DEFAULTS, "pretrained", "U-Net weights: a "
                                                   "Hugging Face hub id, a local folder written by "
                                                   "save_pretrained, or none (a small U-Net sized "
                                                   "for the data, random weights); with "
                                                   "--eval_only and no --ckpt, evaluated as it is"))
    group.add_argument("--from_scratch", action="store_true",
                       help="use only the --pretrained config, with random weights")
    group.add_argument("--unet_width", type=cli.positive(int), default=32,
                       help="channels of the small U-Net (--pretrained none)")
    group.add_argument("--gaussian_residual", type=cli.str2bool, default=None,
                       help="eps_hat = Gaussian optimal predictor + U-Net, the U-Net's output "
                            "layer zeroed at the start (training starts at the Gaussian bound); "
                            "default: true with --pretrained none, else false")
    group.add_argument("--outside", default="clamp", choices=("clamp", "gaussian"),
                       help="log SNRs outside the U-Net's trained range: clamp the timestep, or "
                            "use the data-matched Gaussian's optimal predictor")
    group = parser.add_argument_group("image training")
    group.add_argument("--batch_size", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "batch_size"))
    group.add_argument("--max_steps", type=int, default=-1,
                       help="stop after this many steps (-1: no limit)")
    group.add_argument("--lr_schedule", default=None, choices=("constant", "onecycle"),
                       help=cli.per_dataset(DEFAULTS, "lr_schedule", "Adam with a constant "
                                                   "or a one-cycle learning rate"))
    group.add_argument("--num_workers", type=int, default=default_num_workers(),
                       help="data loader workers per process")
    group.add_argument("--curve_samples", type=cli.positive(int), default=64,
                       help="validation images the MSE curve is averaged over (at most the "
                            "first validation batch: --eval_batch_size)")
    args = cli.parse(parser, argv, DEFAULTS, checkpoint_args, without_ckpt=True)
    if args is None or args.eval_only and args.ckpt:
        return args
    if args.dataset == "fake":  # PIL images, uint8 and float copies: about 6 bytes a pixel
        cli.check_fits(parser, "--fake_size", args.fake_size,
                              6 * 3 * args.image_size ** 2 * args.fake_size * 5 // 4)
    if args.eval_only and args.pretrained.lower() == "none":
        parser.error("--eval_only needs --ckpt PATH [PATH ...] or a --pretrained U-Net")
    args.pretrained = "none" if args.pretrained.lower() == "none" else args.pretrained
    if args.gaussian_residual is None:
        args.gaussian_residual = args.pretrained == "none"
    if args.eval_only and args.gaussian_residual:
        parser.error("argument --gaussian_residual: a pretrained U-Net is evaluated as it is, "
                     "not as a residual on the Gaussian")
    return args


def default_num_workers():
    """Half the CPUs this process may use, at most 4: the images are decoded once and held in
    memory, so workers only index and scale them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus // 2)


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import pytorch_lightning as pl  # noqa: E402
import torch as t  # noqa: E402

import datasets  # noqa: E402
import experiment  # noqa: E402
import utils  # noqa: E402
import viz  # noqa: E402
from diffusionmodel import DiffusionModel  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The U-Net adapter: a diffusers UNet2DModel as denoiser(z, logsnr)
# ---------------------------------------------------------------------------------------------
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


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler prediction_type
LEARNED_VARIANCES = ("learned", "learned_range")  # scheduler variance_types we refuse


def check_prediction_type(prediction_type):
    """prediction_type, if it is one of PREDICTION_TYPES; otherwise a ValueError."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError("prediction_type must be 'epsilon', 'v_prediction' or 'sample', got "
                         f"{prediction_type!r}")
    return prediction_type


def logsnr_to_timestep(logsnr, table):
    """Continuous timestep t(a) with table(t) = a, by linear interpolation of the decreasing table
    `table` (log SNR at t = 0 .. T-1); clamped to [0, T-1] outside the table's range."""
    asc = table.flip(0)  # increasing, index k <-> t = T - 1 - k
    a = logsnr.to(asc.dtype).clamp(asc[0], asc[-1])
    k = t.searchsorted(asc, a).clamp(1, len(asc) - 1)
    lo, hi = asc[k - 1], asc[k]
    return (len(asc) - k) - (a - lo) / (hi - lo)


class UNetDenoiser(t.nn.Module):
    """denoiser(z, logsnr) -> eps_hat for a UNet2DModel with positional timestep embeddings, trained
    on the schedule `alphas_cumprod` (default: DDPM, linear betas 1e-4..0.02, T = 1000) to predict
    `prediction_type` (diffusers' scheduler names), converted to the noise with
    alpha = sqrt(s(a)), sigma = sqrt(s(-a)) at the channel's own log SNR a:

    - "epsilon": eps_hat = output;
    - "v_prediction": v = alpha eps - sigma x, so eps_hat = sigma z + alpha v;
    - "sample": x_hat = output, eps_hat = (z - alpha x_hat) / sigma (utils.eps_from_x).

    The U-Net's config, the schedule and the prediction type travel in the module's state dict
    (extra state), so a checkpoint alone rebuilds the architecture (`unet_from_state_dict`).
    """

    def __init__(self, unet, alphas_cumprod=None, outside="clamp", prediction_type="epsilon"):
        super().__init__()
        if outside not in ("clamp", "gaussian"):
            raise ValueError(f"outside must be 'clamp' or 'gaussian', got {outside!r}")
        self.prediction_type = check_prediction_type(prediction_type)
        if unet.config.time_embedding_type != "positional":
            raise ValueError("only U-Nets with positional timestep embeddings are supported, got "
                             f"time_embedding_type={unet.config.time_embedding_type!r}")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError("the U-Net's output must have the input's shape (in_channels "
                             f"{unet.config.in_channels} != out_channels "
                             f"{unet.config.out_channels}; learned-variance U-Nets are not "
                             "supported)")
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
        self.logsnr_table = utils.schedule_logsnr(self.alphas_cumprod)
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
        eps = self.to_eps(z, logsnr, self.unet(z, self.timestep(logsnr), return_dict=False)[0])
        if self.outside == "gaussian":
            if self.fallback is None:
                raise RuntimeError("outside='gaussian' needs set_fallback(reference) first")
            lo, hi = self.logsnr_range
            inside = ((logsnr >= lo) & (logsnr <= hi)).view((-1,) + (1,) * (z.dim() - 1))
            # The U-Net runs on the whole batch so that every parameter takes part in each step
            # (DDP requires it); rows outside the range take the Gaussian prediction.
            eps = t.where(inside, eps, self.fallback(z, logsnr).to(eps.dtype))
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

    def get_extra_state(self):
        return {"unet_config": _plain_config(self.unet.config),
                "alphas_cumprod": self.alphas_cumprod.clone(), "outside": self.outside,
                "prediction_type": self.prediction_type}

    def set_extra_state(self, state):
        if state["unet_config"] != _plain_config(self.unet.config):
            raise ValueError("the checkpoint's U-Net config differs from this model's")
        if state.get("outside", self.outside) != self.outside:
            raise ValueError(f"the checkpoint's U-Net was trained with --outside "
                             f"{state['outside']}, not {self.outside}")
        saved = state.get("prediction_type", "epsilon")  # older checkpoints: epsilon
        if saved != self.prediction_type:
            raise ValueError(f"the checkpoint's U-Net predicts {saved!r}, this model's "
                             f"{self.prediction_type!r}")
        self._set_schedule(state["alphas_cumprod"])


def _zero(z, logsnr):
    return t.zeros_like(z)


def _plain_config(config):
    """A UNet2DModel config as a plain JSON-able dict without diffusers' bookkeeping keys (safe for
    torch.load(weights_only=True))."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def unet_from_state_dict(state_dict, prefix="model."):
    """(U-Net with random weights, alphas_cumprod, prediction_type) from a DiffusionModel state
    dict saved with a UNetDenoiser (checkpoints from before prediction types: "epsilon"); the
    caller then loads the weights."""
    from diffusers import UNet2DModel
    try:
        state = state_dict[prefix + "_extra_state"]
    except KeyError:
        raise experiment.UserError("the checkpoint holds no U-Net config (was it written by "
                              "train_cifar10.py?)") from None
    return (UNet2DModel.from_config(state["unet_config"]), state["alphas_cumprod"],
            state.get("prediction_type", "epsilon"))


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
    """(U-Net, alphas_cumprod or None, prediction_type) through diffusers' from_pretrained /
    load_config; the scheduler config, when there is one, gives the schedule and what the U-Net
    predicts (else DDPM's schedule and "epsilon"). Learned-variance U-Nets are refused."""
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
        except (OSError, ValueError):  # no scheduler_config.json: DDPM's schedule, epsilon
            scheduler = None
    schedule, prediction_type = None, "epsilon"
    if scheduler is not None:
        schedule, prediction_type = scheduler.alphas_cumprod, scheduler.config.prediction_type
        variance_type = scheduler.config.get("variance_type")
        if prediction_type not in PREDICTION_TYPES:
            raise experiment.UserError(f"the U-Net {source} predicts {prediction_type!r} (its "
                                       "scheduler's prediction_type); supported: "
                                       f"{', '.join(PREDICTION_TYPES)}")
        if variance_type in LEARNED_VARIANCES:
            raise experiment.UserError(f"the U-Net {source} learns its variance (its scheduler's "
                                       f"variance_type is {variance_type!r}): not supported")
    cfg = unet.config
    if cfg.out_channels != cfg.in_channels:
        raise experiment.UserError(f"the U-Net {source} has {cfg.out_channels} output channels for "
                                   f"{cfg.in_channels} input channels (a learned variance?): only "
                                   "U-Nets whose output has the input's shape are supported")
    return unet.train(), schedule, prediction_type  # from_pretrained returns it in eval mode


def load_unet(source, from_scratch=False, online=None):
    """(UNet2DModel, alphas_cumprod or None, prediction_type, where it came from) for a local
    directory or a hub id.

    A directory is read as it is. A hub id is looked up in the local Hugging Face cache first and
    downloaded only if `online()` says the hub is reachable; otherwise an experiment.UserError explains
    what is missing and how to provide it. `from_scratch` reads only the config (random weights);
    for google/ddpm-cifar10-32 the config is built in, so that needs no network.
    The schedule is None and the prediction type "epsilon" when the source has no
    scheduler_config.json (then DDPM's schedule is used).
    """
    if os.path.isdir(source):
        unet_sub, sched_sub = _layout(source)
        if not os.path.isfile(os.path.join(source, unet_sub or "", "config.json")):
            raise experiment.UserError(f"{source} holds no U-Net: expected config.json (and the "
                                  "weights) from UNet2DModel.save_pretrained, or a pipeline "
                                  "folder with unet/config.json")
        try:
            return (*_fetch(source, from_scratch, unet_sub, sched_sub), os.path.abspath(source))
        except (OSError, ValueError) as err:
            raise experiment.UserError(f"cannot load the U-Net from {source}: {err}") from None

    if not _HUB_ID.match(source):
        raise experiment.UserError(f"--pretrained {source}: no such directory, and not a hub id of the "
                              "form owner/name")
    if from_scratch and source == DDPM_CIFAR10:
        from diffusers import UNet2DModel
        return (UNet2DModel.from_config(DDPM_CIFAR10_CONFIG), None, "epsilon",
                f"{source} config (built in)")
    try:
        return (*_fetch(source, from_scratch, local_files_only=True), f"{source} (hub cache)")
    except OSError:
        pass
    from huggingface_hub import constants
    if online is not None and online():
        try:
            return (*_fetch(source, from_scratch), f"{source} (downloaded)")
        except (OSError, ValueError) as err:
            raise experiment.UserError(f"cannot download the U-Net {source} from {constants.ENDPOINT}: "
                                  f"{str(err).splitlines()[0]}") from None
    name = source.split("/")[-1]
    raise experiment.UserError(
        f"pretrained U-Net {source!r} not found: it is not a local directory, not in the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}), and {constants.ENDPOINT} is not reachable (or "
        "--offline / HF_HUB_OFFLINE=1 is set). On a machine with internet run\n"
        f"    python -c \"from huggingface_hub import snapshot_download; "
        f"snapshot_download('{source}', local_dir='{name}')\"\n"
        f"copy the folder {name}/ here and pass --pretrained {name}; or start from random weights "
        "with --from_scratch.")


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------
def image_data(args, **overrides):
    """The Images datamodule of the run's arguments; downloads only when allowed and reachable."""
    a = dict(vars(args), **overrides)

    def can_download():
        return not a["offline"] and datasets.reachable(datasets.CIFAR10_URL)
    return datasets.Images(a["dataset"], a["data_dir"], a["dequantize"], a["seed"], a["image_size"],
                           a["fake_size"], a["batch_size"], a["eval_batch_size"], a["num_workers"],
                           a["reference_size"], download=can_download)


def load_denoiser(args, x_shape=None, ckpt=None):
    """The U-Net (from the checkpoint's config with --resume) wrapped as denoiser(z, logsnr),
    checked against the data's shape when known."""
    if ckpt is not None:
        saved = tuple(ckpt.get("hyper_parameters", {}).get("x_shape", ()))
        if x_shape and saved != tuple(x_shape):
            raise experiment.UserError(f"{args.resume} was trained on images of shape {saved}; "
                                       f"{args.dataset} images are {tuple(x_shape)}")
        net, schedule, prediction_type = unet_from_state_dict(ckpt["state_dict"])
        source = args.resume
    elif args.pretrained == "none":  # sized for the data, which then exists (digits, fake)
        from diffusers import UNet2DModel
        channels, size = x_shape[0], x_shape[-1]
        net = UNet2DModel.from_config(small_unet_config(channels, size, args.unet_width))
        # Its timesteps span the integration range linearly in log SNR: nothing is clamped.
        schedule = utils.logsnr_schedule(*utils.LogisticProposal(args.logsnr_loc, args.logsnr_scale,
                                                           args.clip).range)
        source, prediction_type = "small U-Net, random weights", "epsilon"
    else:
        def can_download():
            from huggingface_hub import constants
            return (not args.offline and not constants.HF_HUB_OFFLINE
                    and datasets.reachable(constants.ENDPOINT))
        net, schedule, prediction_type, source = load_unet(args.pretrained, args.from_scratch,
                                                           can_download)
    if args.gaussian_residual and prediction_type != "epsilon":
        raise experiment.UserError(f"--gaussian_residual adds the U-Net's output to the Gaussian's "
                                   f"noise prediction, but {source} predicts {prediction_type}")
    if args.gaussian_residual and ckpt is None:  # start exactly at the Gaussian predictor
        t.nn.init.zeros_(net.conv_out.weight)
        t.nn.init.zeros_(net.conv_out.bias)
    cfg = net.config
    levels = 2 ** (len(cfg.block_out_channels) - 1)
    if x_shape and (cfg.in_channels != x_shape[0] or x_shape[1] % levels or x_shape[2] % levels):
        raise experiment.UserError(f"the U-Net ({source}) takes {cfg.in_channels}-channel images "
                                   f"with sides divisible by {levels}; {args.dataset} images are "
                                   f"{x_shape}")
    return UNetDenoiser(net, schedule, args.outside, prediction_type), source


def build_model(args, data, ckpt=None):
    """(DiffusionModel, denoiser, where the U-Net came from): both inputs are checked before
    either is reported missing, so one message says all."""
    problems = [data.missing()]
    try:
        denoiser, source = load_denoiser(args, data.x_shape, ckpt)
    except experiment.UserError as err:
        problems.append(str(err))
    if any(problems):
        raise experiment.UserError("\nerror: ".join(p for p in problems if p))
    model = DiffusionModel(denoiser, x_shape=data.x_shape, learning_rate=args.learning_rate,
                           logsnr_loc=args.logsnr_loc, logsnr_scale=args.logsnr_scale,
                           clip=args.clip, gaussian_residual=args.gaussian_residual,
                           val_npoints=args.val_npoints, lr_schedule=args.lr_schedule)
    return with_fallback(model, args.outside), denoiser, source


def with_fallback(model, outside):
    """The U-Net's fallback outside its trained range for outside="gaussian": the model's
    data-matched Gaussian, or 0 for a residual U-Net (it adds nothing to the Gaussian there)."""
    if outside == "gaussian":
        model.model.set_fallback(None if model.hparams.gaussian_residual else model.reference)
    return model


def main(argv=None):
    start = time.time()
    args = parse_args(argv, experiment.checkpoint_args(SCRIPT))
    if args.eval_only:
        return evaluate(args)
    ckpt = experiment.load_checkpoint(args.resume, SCRIPT) if args.resume else None
    pl.seed_everything(args.seed, verbose=False)  # before the U-Net's random initialisation
    data = image_data(args)
    model, denoiser, source = build_model(args, data, ckpt)
    curve = viz.MSECurve(args.curve_samples, seed=args.seed)
    reference = experiment.FitReference(functools.partial(describe, args, denoiser, source))
    callbacks = [reference, curve] + ([viz.SampleImages(args.num_samples, args.sample_steps,
                                                        args.seed)] if args.num_samples > 0 else [])
    steps = max(1, data.train_size // args.batch_size)
    trainer = experiment.make_trainer(
        args, SCRIPT, callbacks, run=experiment.resumed_run_dir(args.resume) or
        f"{args.dataset}-{args.experiment_name}", max_epochs=args.num_epochs,
        max_steps=args.max_steps, log_every_n_steps=min(50, steps),
        check_val_every_n_epoch=args.val_every)
    experiment.fit(trainer, model, data, args.resume)
    if trainer.is_global_zero:
        s = experiment.summarize(trainer, model, curve, reference.baseline, start)
        print("\n".join(experiment.summary_lines(s)))
    return trainer, model


def evaluate(args):
    """--eval_only on the validation images as the grid data they are (not dequantised): with
    --ckpt the checkpoints (and their ensemble with the data-matched Gaussian); without, the
    --pretrained U-Net as it is, with the Gaussian fitted to the training images."""
    if args.ckpt:
        ckpts = [experiment.load_checkpoint(path, SCRIPT) for path in args.ckpt]
        saved = experiment.checkpoints_data(args, ckpts, ("dataset", "image_size", "fake_size",
                                                          "seed", "dequantize", "reference_size"),
                                            DEFAULTS)
        data = image_data(args, **dict(saved, dequantize=False))
        models, names = [model_from_checkpoint(path, c, data) for path, c in zip(args.ckpt, ckpts)], \
            experiment.checkpoint_names(args.ckpt)
        info = dict(script=SCRIPT, dataset=saved["dataset"])
    else:
        data = image_data(args, dequantize=False)  # the grid data; a seeded reference
        model, _, _ = build_model(args, data)
        models = [model.eval()]
        names = [os.path.basename(os.path.normpath(args.pretrained))
                 if os.path.isdir(args.pretrained) else args.pretrained]
        info = dict(script=SCRIPT, dataset=args.dataset, pretrained=args.pretrained)
    problem = data.missing()
    if problem:
        raise experiment.UserError(problem)
    return experiment.run_evaluation(args, models, names, data, info=info,
                                     results_dir=None if args.ckpt else args.log_dir,
                                     fit_reference=not args.ckpt)


def model_from_checkpoint(path, ckpt, data):
    """The trained model of a checkpoint of this script, checked against the data's shape."""
    hparams, saved = ckpt["hyper_parameters"], ckpt["run_args"]
    if tuple(hparams["x_shape"]) != data.x_shape:
        raise experiment.UserError(f"{path} was trained on images of shape "
                                   f"{tuple(hparams['x_shape'])}; {data.name} images are "
                                   f"{data.x_shape}")
    net, schedule, prediction_type = unet_from_state_dict(ckpt["state_dict"])
    denoiser = UNetDenoiser(net, schedule, saved["outside"], prediction_type)
    return with_fallback(experiment.model_from_checkpoint(ckpt, denoiser), saved["outside"])


def describe(args, denoiser, source, trainer, model, baseline):
    """What is trained, on what, over which log-SNR range, and the Gaussian baseline."""
    train, val = trainer.datamodule.train, trainer.datamodule.val
    entropy = model.reference.entropy().item()
    lo, hi = denoiser.logsnr_range
    a_lo, a_hi = model.proposal.range
    params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    loc, scale, clip = utils.spectrum_logsnr_params(model.reference.eigvals)
    return "\n".join([
        f"data: {args.dataset}, {len(train)} training / {len(val)} validation images of shape "
        f"{train.x_shape}{', dequantized' if args.dequantize else ''}",
        f"U-Net: {source}, {params:.2f}M parameters, timesteps cover log SNR [{lo:.2f}, {hi:.2f}]"
        f"{' (Gaussian residual)' if args.gaussian_residual else ''}; integrating over "
        f"[{a_lo:.2f}, {a_hi:.2f}], outside the timesteps' range: {args.outside}",
        f"data-matched Gaussian: entropy {entropy:.1f} nats "
        f"({utils.nats_to_bpd(entropy, model.d):.3f} bits/dim), -log q(validation) "
        f"{baseline['gaussian_val_loss']:.1f} nats ({baseline['gaussian_val_bpd']:.3f} bits/dim); "
        f"its spectrum suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f} --clip {clip:.2f}"])


if __name__ == "__main__":
    experiment.run_cli(main)
