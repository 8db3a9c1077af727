"""Information-theoretic diffusion on images: fine-tune the pretrained DDPM U-Net
(google/ddpm-cifar10-32) on CIFAR-10 with the -log p(x) loss, or train a U-Net from scratch.

    python train_cifar10.py                                  # CIFAR-10, pretrained DDPM U-Net
    python train_cifar10.py --pretrained ./ddpm-cifar10-32   # the same weights from a local folder
    python train_cifar10.py --dataset digits                 # 8x8 digits, small U-Net, CPU minutes

TensorBoard (tensorboard --logdir exps) shows val_loss (nats per image), val_bpd (bits/dim of the
continuous density on [-1, 1]), the MSE curve against the data-matched Gaussian's MMSE, and model
samples. Nothing is downloaded unless a dataset or the weights are missing locally and the server
answers within seconds (never with --offline or HF_HUB_OFFLINE=1).
The U-Net enters through unet.py's adapter (a diffusers UNet2DModel as denoiser(z, logsnr)).
"""
import os

import cli

DEFAULTS = {  # per dataset; the first is the default dataset
    # CIFAR-10: the paper's continuous density of the 8-bit pixels scaled to [-1, 1]; the original
    # ITD code's (loc, scale) = (6, 3); a small constant learning rate for fine-tuning.
    "cifar10": dict(pretrained="google/ddpm-cifar10-32", dequantize=False, logsnr_loc=6.,
                    logsnr_scale=3., learning_rate=1e-4, lr_schedule="constant", batch_size=64,
                    num_epochs=50, val_every=1, val_npoints=8, eval_batch_size=100, num_samples=16,
                    fit_proposal=0, ode=False),
    # digits: 17 grey levels, and border pixels that are always 0 in the training set: without
    # dequantisation the data-matched Gaussian is degenerate there.
    # loc, scale: the crossings of its MSE curve (suggested_logsnr_loc/scale) after one run.
    "digits": dict(pretrained="none", dequantize=True, logsnr_loc=4., logsnr_scale=2.,
                   learning_rate=2e-3, lr_schedule="onecycle", batch_size=64, num_epochs=30,
                   val_every=5, val_npoints=16, eval_batch_size=100, num_samples=16,
                   fit_proposal=0, ode=False),
    "fake": dict(pretrained="none", dequantize=False, logsnr_loc=2., logsnr_scale=3.,
                 learning_rate=1e-3, lr_schedule="constant", batch_size=32, num_epochs=1,
                 val_every=1, val_npoints=8, eval_batch_size=100, num_samples=16,
                 fit_proposal=0, ode=False),
}


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (cli.parse; None for a --resume before checkpoint_args is given)."""
    parser = cli.build_parser(__doc__.split("\n\n")[0], DEFAULTS, ["max_steps", "curve_samples"])
    group = parser.add_argument_group("images")
    group.add_argument("--data_dir", default="data",
                       help="folder holding cifar-10-batches-py (CIFAR-10 is downloaded there if "
                            "missing and the server is reachable)")
    group.add_argument("--offline", action="store_true",
                       help="never download; also implied by HF_HUB_OFFLINE=1 for the weights")
    group.add_argument("--dequantize", type=cli.str2bool, nargs="?", const=True,
                       default=None,
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
    group.add_argument("--gaussian_residual", type=cli.str2bool, nargs="?", const=True,
                       default=None,
                       help="eps_hat = Gaussian optimal predictor + U-Net, the U-Net's output "
                            "layer zeroed at the start (training starts at the Gaussian bound); "
                            "default: true with --pretrained none, else false")
    group.add_argument("--outside", default="clamp", choices=("clamp", "gaussian"),
                       help="log SNRs outside the U-Net's trained range: clamp the timestep, or "
                            "use the data-matched Gaussian's optimal predictor")
    group = parser.add_argument_group("image training")
    group.add_argument("--batch_size", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "batch_size"))
    group.add_argument("--max_steps", type=cli.whole(-1), default=-1,
                       help="stop after this many steps (-1: no limit)")
    group.add_argument("--lr_schedule", default=None, choices=("constant", "onecycle"),
                       help=cli.per_dataset(DEFAULTS, "lr_schedule", "Adam with a constant "
                                                   "or a one-cycle learning rate"))
    group.add_argument("--num_workers", type=cli.whole(0), default=default_num_workers(),
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
import datasets  # noqa: E402
import experiment  # noqa: E402
import unet  # noqa: E402
import utils  # noqa: E402
import viz  # noqa: E402
from proposals import LogisticProposal, spectrum_logsnr_params  # noqa: E402


class ImageRuns(experiment.Experiment):
    """train_cifar10.py's runs: a diffusers U-Net on an image dataset."""

    script, defaults = "train_cifar10.py", DEFAULTS
    data_keys = ("dataset", "image_size", "fake_size", "seed", "dequantize", "reference_size",
                 "conditional")

    def parse_args(self, argv=None, checkpoint_args=None):
        return parse_args(argv, checkpoint_args)

    def data(self, args, evaluation=False):
        """The Images datamodule (evaluation: the grid data, not dequantised); downloads only when
        allowed and reachable."""
        def can_download():
            return not args.offline and datasets.reachable(datasets.CIFAR10_URL)
        return datasets.Images(args.dataset, args.data_dir, args.dequantize and not evaluation,
                               args.seed, args.image_size, args.fake_size, args.batch_size,
                               args.eval_batch_size, args.num_workers, args.reference_size,
                               download=can_download, conditional=bool(args.conditional))

    def denoiser(self, args, data):
        """The U-Net of --pretrained (or a small one sized for the data); both inputs are checked
        before either is reported missing, so one message says all."""
        def can_download():
            from huggingface_hub import constants
            return (not args.offline and not constants.HF_HUB_OFFLINE
                    and datasets.reachable(constants.ENDPOINT))
        problems = [data.missing()]
        try:
            logsnrs = LogisticProposal(args.logsnr_loc, args.logsnr_scale, args.clip).range
            denoiser, self.source = unet.build(args.pretrained, data.x_shape, logsnrs,
                                               args.from_scratch, args.unet_width, args.outside,
                                               args.gaussian_residual, can_download,
                                               data.num_classes)
        except cli.UserError as err:
            problems.append(str(err))
        if any(problems):
            raise cli.UserError("\nerror: ".join(p for p in problems if p))
        return denoiser

    def callbacks(self, args, data, curve):
        return ([viz.SampleImages(args.num_samples, args.sample_steps, args.seed)]
                if args.num_samples > 0 else []) + (
            [viz.InformationMaps(seed=args.seed)] if data.num_classes else [])

    def trainer_kwargs(self, args):
        return dict(max_steps=args.max_steps, log_every_n_steps=50)

    def pretrained(self, args, data):
        if data.num_classes:  # its label embeddings would be new: every label alike
            raise cli.UserError("--conditional with --pretrained evaluates untrained labels; "
                                "fine-tune first, then --eval_only --ckpt")
        model = self.model(args, self.denoiser(args, data), data)
        return model, (os.path.basename(os.path.normpath(args.pretrained))
                       if os.path.isdir(args.pretrained) else args.pretrained)

    def describe(self, args, trainer, model, values):
        """What is trained, on what, over which log-SNR range, and the Gaussian baseline."""
        train, val = trainer.datamodule.train, trainer.datamodule.val
        entropy = model.reference.entropy().item()
        lo, hi = model.model.logsnr_range
        a_lo, a_hi = model.proposal.range
        params = sum(p.numel() for p in model.model.parameters()) / 1e6
        loc, scale, clip = spectrum_logsnr_params(model.reference.eigvals)
        return "\n".join([
            f"data: {args.dataset}, {len(train)} training / {len(val)} validation images of shape "
            f"{train.x_shape}{', dequantized' if args.dequantize else ''}",
            f"U-Net: {getattr(self, 'source', 'the checkpoint')}, {params:.2f}M parameters, timesteps cover log SNR "
            f"[{lo:.2f}, {hi:.2f}]{' (Gaussian residual)' if args.gaussian_residual else ''}; "
            f"integrating over [{a_lo:.2f}, {a_hi:.2f}], outside the timesteps' range: "
            f"{args.outside}",
            f"data-matched Gaussian: entropy {entropy:.1f} nats "
            f"({utils.nats_to_bpd(entropy, model.d):.3f} bits/dim), -log q(validation) "
            f"{values['gaussian_val_loss']:.1f} nats ({values['gaussian_val_bpd']:.3f} bits/dim); "
            f"its spectrum suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f} "
            f"--clip {clip:.2f}"])


main = ImageRuns().main

if __name__ == "__main__":
    experiment.run_cli(main)
