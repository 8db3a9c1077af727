"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                                  # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --pretrained ./ddpm-cifar10-32   # the same weights from a local folder
    python train_cifar10.py --dataset digits                 # 8x8 digits, small U-Net, CPU minutes

TensorBoard (tensorboard --logdir exps) shows val_loss (nats per image), val_bpd (bits/dim of the
continuous density on [-1, 1]), the MSE curve against the data-matched Gaussian's MMSE, and model
samples. Nothing is downloaded unless a dataset or the weights are missing locally and the server
answers within seconds (never with --offline or HF_HUB_OFFLINE=1).
"""
import argparse
import math
import os

import torch as t

import datasets
import unet as unets
import utils

DEFAULTS = {  # per dataset; any of them can be overridden on the command line
    # CIFAR-10: the paper's continuous density of the 8-bit pixels scaled to [-1, 1]; the seed's
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # unless the help already says it (per-dataset defaults)
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def per_dataset(key, text=""):
    return (text + "; " if text else "") + "default: " + ", ".join(
        f"{name} {values[key]}" for name, values in DEFAULTS.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="cifar10", choices=("cifar10", "digits", "fake"),
                       help="cifar10 (torchvision), digits (scikit-learn's bundled 8x8 digits, 17 "
                            "grey levels) or fake (torchvision FakeData, random images)")
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
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrained.lower() == "none":
        args.pretrained = None
    if args.gaussian_residual is None:
        args.gaussian_residual = args.pretrained is None
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
        net, schedule = unets.unet_from_state_dict(ckpt["state_dict"])
        source = args.resume
    elif args.pretrained is None:  # sized for the data, which then exists (digits, fake)
        from diffusers import UNet2DModel
        channels, size = x_shape[0], x_shape[-1]
        net = UNet2DModel.from_config(unets.small_unet_config(channels, size, args.unet_width))
        # Its timesteps span the integration range linearly in log SNR: nothing is clamped.
        half = args.clip * args.logsnr_scale
        schedule = unets.logsnr_schedule(args.logsnr_loc - half, args.logsnr_loc + half)
        source = "small U-Net, random weights"
    else:
        def can_download():
            from huggingface_hub import constants
            return (not args.offline and not constants.HF_HUB_OFFLINE
                    and datasets.reachable(constants.ENDPOINT))
        net, schedule, source = unets.load_unet(args.pretrained, args.from_scratch, can_download)
    if args.gaussian_residual and ckpt is None:  # start exactly at the Gaussian predictor
        t.nn.init.zeros_(net.conv_out.weight)
        t.nn.init.zeros_(net.conv_out.bias)
    cfg = net.config
    levels = 2 ** (len(cfg.block_out_channels) - 1)
    if x_shape and (cfg.in_channels != x_shape[0] or x_shape[1] % levels or x_shape[2] % levels):
        raise utils.UserError(f"the U-Net ({source}) takes {cfg.in_channels}-channel images with "
                              f"sides divisible by {levels}; {args.dataset} images are {x_shape}")
    return unets.UNetDenoiser(net, schedule, args.outside), source


def main(argv=None):
    args = parse_args(argv)
    t.manual_seed(args.seed)
    # Both inputs are checked before either is reported missing, so one message says all.
    problems, train = [], None
    try:
        train, val = load_data(args)
    except utils.UserError as err:
        problems.append(str(err))
    ckpt = t.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    try:
        denoiser, source = load_denoiser(args, train.x_shape if train is not None else None, ckpt)
    except utils.UserError as err:
        problems.append(str(err))
    if problems:
        raise utils.UserError("\nerror: ".join(problems))
    # Lightning takes seconds to import: missing data or weights are reported before that.
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info

    from callbacks import SampleImages
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
        del ckpt
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
    callbacks = ([SampleImages(args.num_samples, args.sample_steps, args.seed)]
                 if args.num_samples > 0 else [])
    trainer = utils.make_trainer(args, run_dir, callbacks, max_steps=args.max_steps,
                                 log_every_n_steps=max(1, min(50, len(train_dl))),
                                 check_val_every_n_epoch=args.val_every)
    trainer.logger.log_metrics(baseline, step=0)  # the numbers val_loss and val_bpd should beat
    trainer.fit(model, train_dl, val_dl, ckpt_path=args.resume)
    rank_zero_info(f"run directory: {run_dir}")
    return trainer, model


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
    return "\n".join([
        f"data: {args.dataset}, {len(train)} training / {len(val)} validation images of shape "
        f"{train.x_shape}{', dequantized' if args.dequantize else ''}",
        f"U-Net: {source}, {params:.2f}M parameters, timesteps cover log SNR [{lo:.2f}, {hi:.2f}]"
        f"{' (Gaussian residual)' if args.gaussian_residual else ''}; integrating over "
        f"[{a_lo:.2f}, {a_hi:.2f}], outside the timesteps' range: {args.outside}",
        f"data-matched Gaussian: entropy {entropy:.1f} nats "
        f"({utils.nats_to_bpd(entropy, model.d):.3f} bits/dim), -log q(validation) "
        f"{baseline['gaussian_val_loss']:.1f} nats ({baseline['gaussian_val_bpd']:.3f} bits/dim)"])


if __name__ == "__main__":
    utils.run_cli(main)
