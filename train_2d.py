"""Train an information-theoretic diffusion model on a 2-D density and look at what it learned.

    python train_2d.py --dataset moons          # dino | moons | scg | line | circle | blobs
    python train_2d.py --data points.csv        # your own points

TensorBoard (tensorboard --logdir exps) shows train_loss, val_loss (E[-log p] in nats) with its
standard error beside the exact value where the density is known, the MSE curve, density contours
and samples; the same figures go to <run>/figures/ and a summary to stdout and summary.json.
`--eval_only --ckpt PATH` evaluates checkpoints instead (docs/2d.md).
"""
import cli
import datasets

GRAD_CLIP = 1.0  # gradient norm clip: a safeguard, lr 1e-2 is near where runs collapse


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (None for a --resume before checkpoint_args is given)."""
    p = cli.build_parser(
        "Information-theoretic diffusion on a 2-D density: trains a denoiser, reports E[-log p] "
        "in nats, and draws the MSE curve, density contours and samples.",
        datasets.entries(datasets.SETS_2D),
        "a .csv (two numeric columns, an optional integer label column and header), a .npy "
        "(n, 2) or an .npz (x, optional y)", "mlp", threads=1)
    defaults = datasets.entries(datasets.SETS_2D)
    group = p.add_argument_group("data and the MLP denoiser (--denoiser mlp)")
    group.add_argument("--num_points", type=cli.number(int, 20, 10 ** 8), default=None,
                       help=cli.per_dataset(defaults, "num_points", "points drawn from the "
                                            "density, 10%% held out for validation"))
    group.add_argument("--hidden_size", type=cli.number(int, 1, 2 ** 16), default=None,
                       help=cli.per_dataset(defaults, "hidden_size", "MLP width"))
    group.add_argument("--hidden_layers", type=cli.number(int, 1, 64), default=3,
                       help="number of hidden layers")
    group.add_argument("--embedding_size", type=cli.number(int, 2, 2 ** 12), default=None,
                       help=cli.per_dataset(defaults, "embedding_size", "size of each sinusoidal "
                                            "embedding (of the log SNR and of each coordinate); "
                                            "even"))
    group.add_argument("--input_embedding_scale", type=cli.number(float, 0, 1e5), default=None,
                       help=cli.per_dataset(defaults, "input_embedding_scale", "highest frequency "
                                            "of the input embedding; 0: the raw coordinates only; "
                                            "at most 1e5 (float32 angles of points |z| ~ 10 are "
                                            "then within 0.1 rad)"))
    group.add_argument("--input_embedding_period", type=cli.number(float, 1, 1e12),
                       default=100., help="ratio of the input embedding's highest frequency to its "
                                          "lowest")
    group.add_argument("--gaussian_residual", type=cli.str2bool, nargs="?", const=True,
                       default=True,
                       help="true: the denoiser adds to the data-matched Gaussian's optimal "
                            "predictor, so training starts at the Gaussian bound")
    group.add_argument("--grid_size", type=cli.number(int, 2, 576), default=40,
                       help="density contours on a grid_size x grid_size grid (at most 576: a "
                            "figure panel's pixels)")
    args = cli.parse(p, argv, defaults, datasets.POINTS_DEFAULTS, checkpoint_args)
    if args is None or args.eval_only:
        return args
    if args.embedding_size % 2:
        p.error(f"argument --embedding_size: must be even, got {args.embedding_size}")
    # memory, measured (docs/2d.md): 16 B per parameter (weights, gradients, Adam's moments), a
    # point with gradients 9 KB + 12 B per unit (training, the ODE), a contour cell's first pass
    # 32 KB
    h, layers = args.hidden_size, args.hidden_layers
    inputs = 3 + args.embedding_size * (1 + 2 * (args.input_embedding_scale > 0) + args.conditional)
    model = 16 * ((inputs + 3) * h + (layers - 1) * (h + 1) * h + 2)
    row = 9000 + 12 * layers * h
    cli.check_fits(p, "--num_points", args.num_points, 48 * args.num_points)
    cli.check_fits(p, "--hidden_size", f"{h} ({layers} layers)", model)
    cli.check_fits(p, "--batch_size", args.batch_size, model + args.batch_size * row)
    cli.check_fits(p, "--grid_size", args.grid_size, args.grid_size ** 2 * max(32000, row * args.ode))
    return args


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import callbacks  # noqa: E402
import datamodules  # noqa: E402
import experiment  # noqa: E402
import ode  # noqa: E402


def figures(args, data, curve):
    """The 2-D figures (callbacks.Figures2D), with the ODE's contours under --ode."""
    settings = ode.settings(args.ode_trace, 2, args.ode_probes, args.ode_tol) if args.ode else None
    return [callbacks.Figures2D(curve, args.grid_size, args.num_samples, args.sample_steps,
                                args.val_npoints, settings, args.seed)]


FAMILY = experiment.Family(
    "train_2d.py", parse_args, datamodules.points,
    ("dataset", "data", "num_points", "seed", "val_fraction", "conditional"), figures,
    dict(num_sanity_val_steps=0, gradient_clip_val=GRAD_CLIP, log_every_n_steps=10))


def main(argv=None):
    return experiment.main(FAMILY, argv)


if __name__ == "__main__":
    experiment.run_cli(main)
