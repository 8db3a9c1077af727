"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                                  # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --pretrained ./ddpm-cifar10-32   # the same weights from a local folder
    python train_cifar10.py --dataset digits                 # 8x8 digits, small U-Net, CPU minutes

TensorBoard (tensorboard --logdir exps) shows val_loss (nats per image), val_bpd (bits/dim of the
continuous density on [-1, 1]), the MSE curve against the data-matched Gaussian's MMSE, and model
samples. Nothing is downloaded unless a dataset or the weights are missing locally and the server
answers within seconds (never with --offline or HF_HUB_OFFLINE=1).

The U-Net adapter (below) makes a diffusers UNet2DModel a denoiser eps_hat = denoiser(z, logsnr).

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
import argparse
import json
import os
import re
import warnings

import torch as t

import datasets
import utils

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
        if state.get("outside", self.outside) != self.outside:
            raise ValueError(f"the checkpoint's U-Net was trained with --outside "
                             f"{state['outside']}, not {self.outside}")
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


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------
DEFAULTS = {  # per dataset; any of them can be overridden on the command line
    # CIFAR-10: the paper's continuous density of the 8-bit pixels scaled to [-1, 1]; the original ITD code's
    # (loc, scale) = (6, 3); a small constant learning rate for fine-tuning the pretrained U-Net.
    "cifar10": dict(pretrained="google/ddpm-cifar10-32", dequantize=False, logsnr_loc=6.,
                    logsnr_scale=3., learning_rate=1e-4, lr_schedule="constant", batch_size=64,
                    num_epochs=50, val_every=1, val_npoints=8),
    # digits: 17 grey levels, and border pixels that are always 0 in the training set: without
    # dequantisation the data-matched Gaussian is degenerate there.
    # loc, scale: the crossings of its MSE curve (suggested_logsnr_loc/scale) after one run.
    "digits": dict(pretrained="none", dequantize=True, logsnr_loc=4., logsnr_scale=2.,
                   learning_rate=2e-3, lr_schedule="onecycle", batch_size=64, num_epochs=30,
                   val_every=5, val_npoints=16),
    "fake": dict(pretrained="none", dequantize=False, logsnr_loc=2., logsnr_scale=3.,
                 learning_rate=1e-3, lr_schedule="constant", batch_size=32, num_epochs=1,
                 val_every=1, val_npoints=8),
}


def per_dataset(key, text=""):
    return (text + "; " if text else "") + "default: " + ", ".join(
        f"{name} {values[key]}" for name, values in DEFAULTS.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=utils.HelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None, choices=("cifar10", "digits", "fake"),
                       help="cifar10 (torchvision), digits (scikit-learn's bundled 8x8 digits, 17 "
                            "grey levels) or fake (torchvision FakeData, random images); default: "
                            "cifar10, or with --eval_only the checkpoint's")
    group.add_argument("--data_dir", default="data",
                       help="folder holding cifar-10-batches-py (CIFAR-10 is downloaded there if "
                            "missing and the server is reachable)")
    group.add_argument("--offline", action="store_true",
                       help="never download; also implied by HF_HUB_OFFLINE=1 for the weights")
    group.add_argument("--dequantize", type=utils.str2bool, default=None,
                       help=per_dataset("dequantize", "add uniform noise within each pixel's "
                                        "bin, making the data a genuine continuous density "
                                        "(-log P_discrete ~= -log p - d log(bin width))"))
    group.add_argument("--image_size", type=utils.positive(int), default=32,
                       help="fake: image side")
    group.add_argument("--fake_size", type=utils.positive(int), default=512,
                       help="fake: training images (a quarter as many for validation)")
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained", default=None, metavar="ID|DIR|none",
                       help=per_dataset("pretrained", "U-Net weights: a Hugging Face hub id, a "
                                        "local folder written by save_pretrained, or none (a "
                                        "small U-Net sized for the data, random weights)"))
    group.add_argument("--from_scratch", action="store_true",
                       help="use only the --pretrained config, with random weights")
    group.add_argument("--unet_width", type=utils.positive(int), default=32,
                       help="channels of the small U-Net (--pretrained none)")
    group.add_argument("--gaussian_residual", type=utils.str2bool, default=None,
                       help="eps_hat = Gaussian optimal predictor + U-Net, the U-Net's output "
                            "layer zeroed at the start (training starts at the Gaussian bound); "
                            "default: true with --pretrained none, else false")
    group.add_argument("--outside", default="clamp", choices=("clamp", "gaussian"),
                       help="log SNRs outside the U-Net's trained range: clamp the timestep, or "
                            "use the data-matched Gaussian's optimal predictor")
    group = parser.add_argument_group("diffusion")
    group.add_argument("--logsnr_loc", type=float, default=None,
                       help=per_dataset("logsnr_loc", "centre of the logistic over log SNR"))
    group.add_argument("--logsnr_scale", type=utils.positive(float), default=None,
                       help=per_dataset("logsnr_scale", "its scale"))
    group.add_argument("--clip", type=utils.positive(float), default=4.,
                       help="log SNR range: loc +- clip * scale")
    group.add_argument("--reference_size", type=utils.positive(int), default=5000,
                       help="training images the data-matched Gaussian reference is fit on")
    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", type=utils.positive(int), default=None,
                       help=per_dataset("batch_size"))
    group.add_argument("--eval_batch_size", type=utils.positive(int), default=100,
                       help="validation images per batch")
    group.add_argument("--num_epochs", type=utils.positive(int), default=None,
                       help=per_dataset("num_epochs"))
    group.add_argument("--max_steps", type=int, default=-1,
                       help="stop after this many steps (-1: no limit)")
    group.add_argument("--learning_rate", type=utils.positive(float), default=None,
                       help=per_dataset("learning_rate"))
    group.add_argument("--lr_schedule", default=None, choices=("constant", "onecycle"),
                       help=per_dataset("lr_schedule", "Adam with a constant or a one-cycle "
                                        "learning rate"))
    group.add_argument("--num_workers", type=int, default=default_num_workers(),
                       help="data loader workers per process")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue from a checkpoint (e.g. exps/cifar10/checkpoints/last.ckpt), "
                            "logging into its run directory; a one-cycle schedule keeps the "
                            "length it was planned with, so keep --num_epochs")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--val_every", type=utils.positive(int), default=None,
                       help=per_dataset("val_every", "validate (val_loss, MSE curve, samples) "
                                        "every this many epochs"))
    group.add_argument("--val_npoints", type=utils.positive(int), default=None,
                       help=per_dataset("val_npoints", "log-SNR points per validation image (a "
                                        "power of two)"))
    group.add_argument("--curve_samples", type=utils.positive(int), default=64,
                       help="validation images the MSE curve is averaged over")
    group.add_argument("--num_samples", type=int, default=16,
                       help="model samples shown in TensorBoard after each validation (0: none)")
    group.add_argument("--sample_steps", type=utils.positive(int), default=100,
                       help="steps of the sampler for those")
    group = parser.add_argument_group("output")
    group.add_argument("--log_dir", default="exps", help="runs go to log_dir/experiment_name[-k]")
    group.add_argument("--experiment_name", default=None, help="default: the dataset's name")
    utils.add_trainer_args(parser)
    utils.add_eval_args(parser)
    args = parser.parse_args(argv)
    if args.eval_only and args.ckpt:
        utils.check_eval_args(parser, args)
        return args  # everything else comes from the checkpoints
    args.dataset = args.dataset or "cifar10"
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained.lower() == "none":
        args.pretrained = None
    if args.gaussian_residual is None:
        args.gaussian_residual = args.pretrained is None
    utils.check_eval_args(parser, args, without_ckpt=args.pretrained is not None)
    if args.eval_only and args.gaussian_residual:
        parser.error("argument --gaussian_residual: a pretrained U-Net is evaluated as it is, "
                     "not as a residual on the Gaussian")
    return args


def default_num_workers():
    """Half the CPUs this process may use, at most 4: the images are decoded once and held in
    memory, so workers only index and scale them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus // 2)


def load_data(args):
    def can_download():
        return not args.offline and datasets.reachable(datasets.CIFAR10_URL)

    return datasets.load_image_dataset(args.dataset, args.data_dir, args.dequantize, args.seed,
                                       args.image_size, args.fake_size, download=can_download)


def load_denoiser(args, x_shape=None, ckpt=None):
    """The U-Net (from the checkpoint's config with --resume) wrapped as denoiser(z, logsnr),
    checked against the data's shape when known."""
    if ckpt is not None:
        saved = tuple(ckpt.get("hyper_parameters", {}).get("x_shape", ()))
        if x_shape and saved != tuple(x_shape):
            raise utils.UserError(f"{args.resume} was trained on images of shape {saved}; "
                                  f"{args.dataset} images are {tuple(x_shape)}")
        net, schedule = unet_from_state_dict(ckpt["state_dict"])
        source = args.resume
    elif args.pretrained is None:  # sized for the data, which then exists (digits, fake)
        from diffusers import UNet2DModel
        channels, size = x_shape[0], x_shape[-1]
        net = UNet2DModel.from_config(small_unet_config(channels, size, args.unet_width))
        # Its timesteps span the integration range linearly in log SNR: nothing is clamped.
        half = args.clip * args.logsnr_scale
        schedule = logsnr_schedule(args.logsnr_loc - half, args.logsnr_loc + half)
        source = "small U-Net, random weights"
    else:
        def can_download():
            from huggingface_hub import constants
            return (not args.offline and not constants.HF_HUB_OFFLINE
                    and datasets.reachable(constants.ENDPOINT))
        net, schedule, source = load_unet(args.pretrained, args.from_scratch, can_download)
    if args.gaussian_residual and ckpt is None:  # start exactly at the Gaussian predictor
        t.nn.init.zeros_(net.conv_out.weight)
        t.nn.init.zeros_(net.conv_out.bias)
    cfg = net.config
    levels = 2 ** (len(cfg.block_out_channels) - 1)
    if x_shape and (cfg.in_channels != x_shape[0] or x_shape[1] % levels or x_shape[2] % levels):
        raise utils.UserError(f"the U-Net ({source}) takes {cfg.in_channels}-channel images with "
                              f"sides divisible by {levels}; {args.dataset} images are {x_shape}")
    return UNetDenoiser(net, schedule, args.outside), source


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        return evaluate(args)
    t.manual_seed(args.seed)
    ckpt = utils.load_checkpoint(args.resume, "train_cifar10.py") if args.resume else None
    model, denoiser, source, train, val = prepare(args, ckpt)
    from pytorch_lightning.utilities import rank_zero_info

    import viz

    baseline = gaussian_baseline(model, val)
    rank_zero_info(describe(args, model, denoiser, source, train, val, baseline))

    loader = dict(num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                  pin_memory=t.cuda.is_available())
    train_dl = t.utils.data.DataLoader(train, args.batch_size, shuffle=True, drop_last=True,
                                       **loader)
    val_dl = t.utils.data.DataLoader(val, args.eval_batch_size, **loader)

    # Only now, with data and weights in hand, does the run get a directory.
    run_dir = resumed_run_dir(args.resume) or utils.new_run_dir(
        args.log_dir, args.experiment_name or args.dataset)
    callbacks = ([viz.SampleImages(args.num_samples, args.sample_steps, args.seed)]
                 if args.num_samples > 0 else [])
    trainer = utils.make_trainer(args, run_dir, "train_cifar10.py", callbacks, max_steps=args.max_steps,
                                 log_every_n_steps=max(1, min(50, len(train_dl))),
                                 check_val_every_n_epoch=args.val_every)
    trainer.logger.log_metrics(baseline, step=0)  # the numbers val_loss and val_bpd should beat
    trainer.fit(model, train_dl, val_dl, ckpt_path=args.resume)
    if trainer.is_global_zero:
        print(summary(trainer, model, val, baseline, args, run_dir))
    return trainer, model


def summary(trainer, model, val, baseline, args, run_dir):
    """The final validation NLL beside the Gaussian baseline, where the MSE curve stands against
    the Gaussian MMSE, and where everything went."""
    metrics, lines = trainer.callback_metrics, []
    if "val_loss" in metrics:
        nats, err = float(metrics["val_loss"]), float(metrics["val_loss_stderr"])
        lines.append(f"validation E[-log p] = {nats:.2f} +- {err:.2f} nats per image = "
                     f"{utils.nats_to_bpd(nats, model.d):.4f} bits/dim (data-matched Gaussian: "
                     f"{baseline['gaussian_val_loss']:.2f} nats = "
                     f"{baseline['gaussian_val_bpd']:.4f} bits/dim)")
    x = val.tensor(args.curve_samples).to(model.device)
    logsnrs = model.curve_logsnrs().to(model.device)
    generator = t.Generator(model.device).manual_seed(args.seed)
    was_training = model.training
    mse, mmse = model.eval().mse_curve(x, logsnrs, generator=generator)
    model.train(was_training)
    below = int((mse <= mmse).sum())
    lines += [f"MSE curve ({len(x)} validation images): below the Gaussian MMSE at {below} of "
              f"{len(logsnrs)} log SNRs in [{float(logsnrs[0]):.1f}, {float(logsnrs[-1]):.1f}]",
              f"run directory: {run_dir} (checkpoints in checkpoints/)",
              f"view with:     tensorboard --logdir {os.path.dirname(os.path.abspath(run_dir))}"]
    return "\n".join(lines)


def prepare(args, ckpt=None):
    """(model, denoiser, where the U-Net came from, train, validation): the data and the U-Net
    (from the checkpoint with --resume), with the Gaussian reference fitted (or restored)."""
    # Both inputs are checked before either is reported missing, so one message says all.
    problems, train = [], None
    try:
        train, val = load_data(args)
    except utils.UserError as err:
        problems.append(str(err))
    try:
        denoiser, source = load_denoiser(args, train.x_shape if train is not None else None, ckpt)
    except utils.UserError as err:
        problems.append(str(err))
    if problems:
        raise utils.UserError("\nerror: ".join(problems))
    # Lightning takes seconds to import: missing data or weights are reported before that.
    import pytorch_lightning as pl

    from diffusionmodel import DiffusionModel

    pl.seed_everything(args.seed, verbose=False)
    model = DiffusionModel(denoiser, x_shape=train.x_shape, learning_rate=args.learning_rate,
                           logsnr_loc=args.logsnr_loc, logsnr_scale=args.logsnr_scale,
                           clip=args.clip, gaussian_residual=args.gaussian_residual,
                           val_npoints=args.val_npoints,
                           lr_schedule=args.lr_schedule, curve_samples=args.curve_samples)
    if args.outside == "gaussian":  # a residual U-Net adds nothing to the Gaussian there
        denoiser.set_fallback(None if args.gaussian_residual else model.reference)
    if ckpt is None:
        model.fit_reference(train.tensor(args.reference_size))
    else:  # the checkpoint's reference (Trainer.fit restores it too, but only later)
        model.reference.load_state_dict({key.split(".", 1)[1]: value for key, value
                                         in ckpt["state_dict"].items()
                                         if key.startswith("reference.")})
    return model, denoiser, source, train, val


def evaluate(args):
    """--eval_only: with --ckpt, the checkpoints (see evaluate_checkpoints); without, the
    --pretrained U-Net as it is, with the data-matched Gaussian fitted to the training images."""
    if args.ckpt:
        return evaluate_checkpoints(args)
    model, _, source, _, val = prepare(args)
    grid = (val.bin_width, -1., val.levels)
    val = datasets.ImageSet(val.images, val.levels)  # the grid data itself, never dequantised
    name = (os.path.basename(os.path.normpath(args.pretrained))
            if os.path.isdir(args.pretrained) else args.pretrained)
    return utils.run_evaluation(args, [model.eval()], [name], val.tensor(),
                                grid=grid, results_dir=args.log_dir,
                                info=dict(script="train_cifar10.py", dataset=args.dataset,
                                          pretrained=args.pretrained))


def evaluate_checkpoints(args):
    """--eval_only: the evaluation table of the checkpoints (and their ensemble with the
    data-matched Gaussian) on the validation images, as the grid data they are (not dequantised):
    continuous, discrete-limit, dequantised and direct discrete estimates."""
    paths = args.ckpt
    ckpts = [utils.load_checkpoint(path, "train_cifar10.py") for path in paths]
    data = utils.same_data(paths, ckpts, ("dataset", "image_size", "fake_size", "seed"))
    if args.dataset is not None and args.dataset != data["dataset"]:
        raise utils.UserError(f"--dataset {args.dataset}, but {paths[0]} was trained on "
                              f"{data['dataset']}")
    loading = argparse.Namespace(**dict(vars(args), **data, dequantize=False))
    _, val = load_data(loading)
    from diffusionmodel import DiffusionModel

    models = []
    for path, ckpt in zip(paths, ckpts):
        hparams, saved = ckpt["hyper_parameters"], ckpt["run_args"]
        if tuple(hparams["x_shape"]) != val.x_shape:
            raise utils.UserError(f"{path} was trained on images of shape "
                                  f"{tuple(hparams['x_shape'])}; {data['dataset']} images are "
                                  f"{val.x_shape}")
        net, schedule = unet_from_state_dict(ckpt["state_dict"])
        denoiser = UNetDenoiser(net, schedule, saved["outside"])
        model = DiffusionModel(denoiser, **hparams)
        if saved["outside"] == "gaussian":
            denoiser.set_fallback(None if hparams["gaussian_residual"] else model.reference)
        model.load_state_dict(ckpt["state_dict"])
        models.append(model.eval())
    grid = (val.bin_width, -1., val.levels)
    return utils.run_evaluation(args, models, utils.checkpoint_names(paths), val.tensor(),
                                grid=grid, info=dict(script="train_cifar10.py",
                                                     dataset=data["dataset"]))


def resumed_run_dir(checkpoint):
    """The run a checkpoint of RUN/checkpoints/ belongs to, so that a resumed run continues its
    TensorBoard curves and checkpoints there; None for a checkpoint found elsewhere."""
    if not checkpoint:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    run = os.path.dirname(folder)
    in_run = os.path.isfile(os.path.join(run, "hparams.yaml"))
    return run if os.path.basename(folder) == "checkpoints" and in_run else None


def gaussian_baseline(model, val):
    """-log q of the validation images under the data-matched Gaussian reference, in nats and
    bits/dim: what val_loss and val_bpd should end below."""
    nats = model.reference.nll(val.tensor().to(model.reference.mean)).mean().item()
    return {"gaussian_val_loss": nats, "gaussian_val_bpd": utils.nats_to_bpd(nats, model.d)}


def describe(args, model, denoiser, source, train, val, baseline):
    """What is trained, on what, over which log-SNR range, and the Gaussian baseline."""
    entropy = model.reference.entropy().item()
    lo, hi = denoiser.logsnr_range
    a_lo, a_hi = (args.logsnr_loc + s * args.clip * args.logsnr_scale for s in (-1, 1))
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
    utils.run_cli(main)
