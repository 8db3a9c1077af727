"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                      # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --dataset digits     # 8x8 digits, small U-Net, CPU minutes
    python train_cifar10.py --data images/       # your own images

Only what is missing is downloaded, never with --offline (docs/images.md).
"""
import os

import cli
import datasets


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (None for a --resume before checkpoint_args is given)."""
    defaults = datasets.entries(datasets.IMAGE_SETS)
    cores = cli.available_cores()
    p = cli.build_parser(__doc__.split("\n\n")[0], defaults,
                         "a folder of PNG/JPEG images of one size and mode (labels from "
                         "sub-folder names) or a .npy/.npz uint8 array (N, H, W[, C])", "unet",
                         threads=max(1, cores // 2))
    arg = p.add_argument_group("images").add_argument
    arg("--data_dir", default="data",
        help="folder of the datasets (CIFAR-10 is downloaded there if missing)")
    arg("--offline", action="store_true",
        help="never download; also implied by HF_HUB_OFFLINE=1 for the weights")
    arg("--dequantize", type=cli.str2bool, nargs="?", const=True,
        help="add uniform noise within each pixel's bin: a continuous density")
    arg("--reference_size", type=cli.number(int, 2), default=5000,
        help="training images the data-matched Gaussian reference is fit on")
    arg("--num_workers", type=cli.number(int, 0, 64), default=min(4, cores // 2),
        help="data loader workers per process")
    arg("--curve_samples", type=cli.positive(int), default=64,
        help="validation images the MSE curve averages (at most the first batch)")
    arg = p.add_argument_group("the U-Net (--denoiser unet)").add_argument
    arg("--pretrained", metavar="ID|DIR|none",
        help="U-Net weights: a Hugging Face hub id, a save_pretrained folder, or none (a small "
             "U-Net); with --eval_only and no --ckpt, evaluated as it is")
    arg("--from_scratch", action="store_true",
        help="use only the --pretrained config, with random weights")
    arg("--unet_width", type=cli.number(int, 8, 1024), default=32,
        help="channels of the small U-Net (--pretrained none); a multiple of 8")
    arg("--gaussian_residual", type=cli.str2bool, nargs="?", const=True,
        help="eps_hat = the Gaussian's optimal predictor + the U-Net, its output layer zeroed "
             "(default: true with --pretrained none, else false)")
    arg("--outside", default="clamp", choices=("clamp", "gaussian"),
        help="log SNRs outside the U-Net's trained range: clamp the timestep, or the "
             "data-matched Gaussian's optimal predictor")
    args = cli.parse(p, argv, defaults, datasets.IMAGES_DEFAULTS, checkpoint_args,
                     without_ckpt=True)
    if args is None or args.eval_only and args.ckpt:
        return args
    cli.check(p, args, [("unet_width", lambda v: v % 8, "must be a multiple of 8 (group norm)")])
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
    return ([callbacks.SampleImages(args.num_samples, args.sample_steps, args.seed)]
            if args.num_samples > 0 else []) + (
        [callbacks.InformationMaps(seed=args.seed)] if data.num_classes else [])


def describe(args, trainer, model, values):
    data, entropy = trainer.datamodule, model.reference.entropy().item()
    (a_lo, a_hi), trained = model.proposal.range, getattr(model.model, "logsnr_range", None)
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    loc, scale, clip = spectrum_logsnr_params(model.reference.eigvals)
    return "\n".join([
        f"data: {data.name}, {len(data.train)} training / {len(data.val)} validation images "
        f"of shape {tuple(model.x_shape)}{', dequantized' if args.dequantize else ''}",
        f"denoiser: {args.denoiser}, {params:.2f}M parameters"
        + (f", timesteps cover log SNR [{trained[0]:.2f}, {trained[1]:.2f}], outside: "
           f"{args.outside}" if trained else "")
        + f"{' (Gaussian residual)' if args.gaussian_residual else ''}; integrating over "
          f"[{a_lo:.2f}, {a_hi:.2f}]",
        f"data-matched Gaussian: entropy {entropy:.1f} nats "
        f"({utils.nats_to_bpd(entropy, model.d):.3f} bits/dim), -log q(validation) "
        f"{values['gaussian_val_loss']:.1f} nats ({values['gaussian_val_bpd']:.3f} bits/dim); "
        f"its spectrum suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f} "
        f"--clip {clip:.2f}"])


def pretrained(args, data):
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
    experiment.end_process()
