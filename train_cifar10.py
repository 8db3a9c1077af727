"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                                  # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --dataset digits                 # 8x8 digits, small U-Net, CPU minutes
    python train_cifar10.py --data images/                   # your own images

TensorBoard (tensorboard --logdir exps) shows val_loss (nats per image), val_bpd, the MSE curve
against the data-matched Gaussian's MMSE, and model samples. Nothing is downloaded unless a
dataset or the weights are missing locally and the server answers within seconds (never with
--offline or HF_HUB_OFFLINE=1). docs/images.md.
"""
import os

import cli
import datasets


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (None for a --resume before checkpoint_args is given)."""
    defaults = datasets.entries(datasets.IMAGE_SETS)
    p = cli.build_parser(__doc__.split("\n\n")[0], defaults,
                         "a folder of PNG/JPEG images of one size and mode (labels from "
                         "sub-folder names) or a .npy/.npz uint8 array (N, H, W[, C])", "unet",
                         threads=max(1, cli.available_cores() // 2))
    group = p.add_argument_group("images")
    group.add_argument("--data_dir", default="data",
                       help="folder holding the downloaded datasets (CIFAR-10 is downloaded there "
                            "if missing and the server is reachable)")
    group.add_argument("--offline", action="store_true",
                       help="never download; also implied by HF_HUB_OFFLINE=1 for the weights")
    group.add_argument("--dequantize", type=cli.str2bool, nargs="?", const=True, default=None,
                       help=cli.per_dataset(defaults, "dequantize", "add uniform noise within "
                                            "each pixel's bin, making the data a continuous "
                                            "density"))
    group.add_argument("--reference_size", type=cli.number(int, 2), default=5000,
                       help="training images the data-matched Gaussian reference is fit on")
    group.add_argument("--num_workers", type=cli.whole(0, 65), default=min(4, cli.available_cores() // 2),
                       help="data loader workers per process")
    group.add_argument("--curve_samples", type=cli.positive(int), default=64,
                       help="validation images the MSE curve is averaged over (at most the "
                            "first validation batch)")
    group = p.add_argument_group("the U-Net (--denoiser unet)")
    group.add_argument("--pretrained", default=None, metavar="ID|DIR|none",
                       help=cli.per_dataset(defaults, "pretrained", "U-Net weights: a Hugging "
                                            "Face hub id, a folder written by save_pretrained, or "
                                            "none (a small U-Net sized for the data); with "
                                            "--eval_only and no --ckpt, evaluated as it is"))
    group.add_argument("--from_scratch", action="store_true",
                       help="use only the --pretrained config, with random weights")
    group.add_argument("--unet_width", type=cli.number(int, 8, 1024), default=32,
                       help="channels of the small U-Net (--pretrained none); a multiple of 8")
    group.add_argument("--gaussian_residual", type=cli.str2bool, nargs="?", const=True,
                       default=None,
                       help="eps_hat = Gaussian optimal predictor + the denoiser, the U-Net's "
                            "output layer zeroed at the start; default: true with --pretrained "
                            "none, else false")
    group.add_argument("--outside", default="clamp", choices=("clamp", "gaussian"),
                       help="log SNRs outside the U-Net's trained range: clamp the timestep, or "
                            "use the data-matched Gaussian's optimal predictor")
    args = cli.parse(p, argv, defaults, datasets.IMAGES_DEFAULTS, checkpoint_args,
                     without_ckpt=True)
    if args is None or args.eval_only and args.ckpt:
        return args
    if args.unet_width % 8:
        p.error(f"argument --unet_width: must be a multiple of 8 (group norm), got {args.unet_width}")
    if args.eval_only and args.pretrained.lower() == "none":
        p.error("--eval_only needs --ckpt PATH [PATH ...] or a --pretrained U-Net")
    args.pretrained = "none" if args.pretrained.lower() == "none" else args.pretrained
    if args.gaussian_residual is None:
        args.gaussian_residual = args.pretrained == "none"
    if args.pretrained == "none" and not args.eval_only:  # its schedule spans the range
        import utils  # torch: only once every other flag is known to be good
        lo, hi = cli.logsnr_range(args)
        try:
            utils.schedule_logsnr(utils.logsnr_schedule(lo, hi))
        except ValueError as err:
            p.error(f"argument --clip: the small U-Net's 1000 timesteps over the log-SNR range "
                    f"[{lo:g}, {hi:g}] ({cli.range_flags(args)}): {err}")
    if args.eval_only and args.gaussian_residual:
        p.error("argument --gaussian_residual: a pretrained U-Net is evaluated as it is, "
                "not as a residual on the Gaussian")
    return args


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import callbacks  # noqa: E402
import datamodules  # noqa: E402
import experiment  # noqa: E402
import utils  # noqa: E402
from proposals import spectrum_logsnr_params  # noqa: E402


def figures(args, data, curve):
    """Model samples after each validation; for a conditional model, where labels matter."""
    return ([callbacks.SampleImages(args.num_samples, args.sample_steps, args.seed)]
            if args.num_samples > 0 else []) + (
        [callbacks.InformationMaps(seed=args.seed)] if data.num_classes else [])


def describe(args, trainer, model, values):
    """What is trained, on what, over which log-SNR range, and the Gaussian baseline."""
    train, val = trainer.datamodule.train, trainer.datamodule.val
    entropy = model.reference.entropy().item()
    a_lo, a_hi = model.proposal.range
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    trained = getattr(model.model, "logsnr_range", None)
    loc, scale, clip = spectrum_logsnr_params(model.reference.eigvals)
    return "\n".join([
        f"data: {trainer.datamodule.name}, {len(train)} training / {len(val)} validation images "
        f"of shape {tuple(model.x_shape)}{', dequantized' if args.dequantize else ''}",
        f"denoiser: {args.denoiser}, {params:.2f}M parameters"
        + (f", timesteps cover log SNR [{trained[0]:.2f}, {trained[1]:.2f}], outside: "
           f"{args.outside}" if trained else "")
        + f"{' (Gaussian residual)' if args.gaussian_residual else ''}; integrating over "
          f"[{a_lo:.2f}, {a_hi:.2f}]",
        f"data-matched Gaussian: entropy {entropy:.1f} nats "
        f"({utils.nats_to_bpd(entropy, model.d):.3f} bits/dim), -log q(validation) "
        f"{values['gaussian_val_loss']:.1f} nats ({values['gaussian_val_bpd']:.3f} bits/dim); "
        f"its spectrum suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f} --clip {clip:.2f}"])


def pretrained(args, data):
    """--eval_only without --ckpt: the --pretrained U-Net as it is."""
    if data.num_classes:  # its label embeddings would be new: every label alike
        raise cli.UserError("--conditional with --pretrained evaluates untrained labels; "
                            "fine-tune first, then --eval_only --ckpt")
    model = experiment.new_model(args, data)
    return model, (os.path.basename(os.path.normpath(args.pretrained))
                   if os.path.isdir(args.pretrained) else args.pretrained)


FAMILY = experiment.Family(
    "train_cifar10.py", parse_args, datamodules.images,
    ("dataset", "data", "seed", "dequantize", "reference_size", "conditional", "val_fraction"),
    figures, dict(log_every_n_steps=50), describe, pretrained)


def main(argv=None):
    return experiment.main(FAMILY, argv)


if __name__ == "__main__":
    experiment.run_cli(main)
