"""Information-theoretic diffusion on a 2-D density: trains a denoiser, reports E[-log p] in
nats, and draws the MSE curve, density contours and samples (docs/2d.md).

    python train_2d.py --dataset moons          # dino | moons | scg | line | circle | blobs
    python train_2d.py --data points.csv        # your own points
    python train_2d.py --eval_only --ckpt exps/moons-base/checkpoints/last.ckpt
"""
import cli
import datasets


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (None for a --resume before checkpoint_args is given)."""
    defaults = datasets.entries(datasets.SETS_2D)
    p = cli.build_parser(__doc__.split("\n\n")[0], defaults, "a .csv (two numeric columns, an "
                         "optional integer label column and header), a .npy (n, 2) or an .npz "
                         "(x, optional y)", "mlp", threads=1)
    arg = p.add_argument_group("data and the MLP denoiser (--denoiser mlp)").add_argument
    arg("--num_points", type=cli.number(int, 20, 10 ** 8),
        help="points drawn from the density, 10%% held out for validation")
    arg("--hidden_size", type=cli.number(int, 1, 2 ** 16), help="MLP width")
    arg("--hidden_layers", type=cli.number(int, 1, 64), default=3, help="number of hidden layers")
    arg("--embedding_size", type=cli.number(int, 2, 2 ** 12),
        help="size of each sinusoidal embedding (the log SNR's, each coordinate's); even")
    arg("--input_embedding_scale", type=cli.number(float, 0, 1e5),
        help="highest frequency of the input embedding, at most 1e5 (0: the raw coordinates only)")
    arg("--input_embedding_period", type=cli.number(float, 1, 1e12), default=100.,
        help="the input embedding's highest frequency / its lowest")
    arg("--gaussian_residual", type=cli.str2bool, nargs="?", const=True, default=True,
        help="add to the data-matched Gaussian's optimal predictor (training starts at the "
             "Gaussian bound)")
    arg("--grid_size", type=cli.number(int, 2, 576), default=40,
        help="density contours on a grid_size x grid_size grid, at most 576")
    args = cli.parse(p, argv, defaults, datasets.POINTS_DEFAULTS, checkpoint_args)
    if args is None or args.eval_only:
        return args
    cli.check(p, args, [("embedding_size", lambda v: v % 2, "must be even")])
    # bytes per parameter, training or ODE point and contour cell, as measured in docs/2d.md
    h, layers = args.hidden_size, args.hidden_layers
    inputs = 3 + args.embedding_size * (1 + 2 * (args.input_embedding_scale > 0) + args.conditional)
    model = 16 * ((inputs + 3) * h + (layers - 1) * (h + 1) * h + 2)
    row = 9000 + 12 * layers * h
    cli.check_fits(p, "--num_points", args.num_points, 48 * args.num_points)
    cli.check_fits(p, "--hidden_size", f"{h} ({layers} layers)", model)
    cli.check_fits(p, "--batch_size", args.batch_size, model + args.batch_size * row)
    cli.check_fits(p, "--grid_size", args.grid_size,
                   args.grid_size ** 2 * max(32000, row * args.ode))
    return args


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import callbacks  # noqa: E402
import datamodules  # noqa: E402
import experiment  # noqa: E402
import ode  # noqa: E402


def figures(args, data, curve):
    settings = ode.settings(args.ode_trace, 2, args.ode_probes, args.ode_tol) if args.ode else None
    return [callbacks.Figures2D(curve, args.grid_size, args.num_samples, args.sample_steps,
                                args.val_npoints, settings, args.seed)]


FAMILY = experiment.Family(
    "train_2d.py", parse_args, datamodules.points,
    ("dataset", "data", "num_points", "seed", "val_fraction", "conditional"), figures,
    dict(num_sanity_val_steps=0, log_every_n_steps=10,
         gradient_clip_val=1.0))  # a safeguard: lr 1e-2 is near where runs collapse


def main(argv=None):
    return experiment.main(FAMILY, argv)


if __name__ == "__main__":
    experiment.run_cli(main)
    experiment.end_process()
