"""Train an information-theoretic diffusion model on a 2-D toy density and look at what it learned.

    python train_2d.py --dataset moons

Logs go to TensorBoard under exps/<dataset>-<experiment_name>/ (a new folder per run): train_loss,
val_loss (E[-log p] in nats) with its standard error, the exact value on the same points,
the MSE curve with its suggested (logsnr_loc, logsnr_scale), density contours and model samples.
The same figures are written as PNGs to the run's figures/ folder, and a summary to stdout and
summary.json. `--eval_only --ckpt PATH` evaluates checkpoints instead (experiment.Evaluation).
"""
import json
import math
import os
import time

import cli

# Per-dataset defaults, used where a flag is not given; the first is the default dataset. Sharp
# sets (a density on a curve, sharp edges, tight clusters) need high-frequency input features;
# for the smooth Gaussian they only slow training down. They learn more from more distinct
# points than from more epochs over the same ones (at equal steps, dino's gap: 8000 points 0.094,
# 16000 0.085, 32000 0.076, 64000 no better) and from a log-SNR proposal refitted to the model
# during training (--fit_proposal: about 0.01 lower). 64 evaluations per validation point keep
# val_loss's noise under 0.01 nats over 3200 points; they validate 5 times. Their log-SNR range, loc +- 4 scale, reaches 13.5: the density's
# detail sits at high SNR (a jitter of std s at log SNR -2 log s: 8 for dino), and the NLL above
# the range, h(X + e^(-a/2) N) - h(X), is 0.002 nats for dino and moons at 13.5 against 0.009 at
# 12. circle's 1/r peaks make it decay only as e^(-a/2): 0.11 nats above 12, 0.015 above 16;
# its discs (radius 0.042) want input frequencies up to 100.
SHARP = dict(num_points=32000, num_epochs=75, val_every=15, input_embedding_scale=25.0,
             embedding_size=64, learning_rate=1e-2, logsnr_loc=4.5, logsnr_scale=2.25,
             val_npoints=64, fit_proposal=256)
COMMON = dict(eval_batch_size=1024, num_samples=2000)
DEFAULTS = {"moons": dict(COMMON, **SHARP), "dino": dict(COMMON, **SHARP),
            "scg": dict(COMMON, num_points=8000, num_epochs=60, input_embedding_scale=0.0,
                        embedding_size=32, learning_rate=3e-3, logsnr_loc=0.0, logsnr_scale=3.0,
                        val_npoints=64, fit_proposal=0),
            "line": dict(COMMON, **SHARP),
            "circle": dict(COMMON, **dict(SHARP, input_embedding_scale=100.0, logsnr_loc=5.0,
                                          logsnr_scale=2.75))}
OLDER = {"input_embedding_period": 1e4, "fit_proposal": 0}  # what checkpoints written before a flag existed used
VAL_FRACTION = 0.1


def build_parser():
    p = cli.build_parser(
        "Information-theoretic diffusion on a 2-D toy density: trains a denoiser, reports "
        "E[-log p] in nats, and draws the MSE curve, density contours and samples (TensorBoard, "
        "and PNGs in <log_dir>/<dataset>-<experiment_name>/figures/).", cli.DATASETS_2D,
        DEFAULTS)
    group = p.add_argument_group("data and model: an MLP denoiser")
    group.add_argument("--num_points", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "num_points", "points drawn from the "
                                            f"density; {VAL_FRACTION * 100:.0f}%% are held out "
                                            "for validation"))
    group.add_argument("--hidden_size", type=cli.positive(int), default=128, help="MLP width")
    group.add_argument("--hidden_layers", type=cli.positive(int), default=3,
                       help="number of hidden layers")
    group.add_argument("--embedding_size", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "embedding_size",
                                                   "size of each sinusoidal embedding (of the log "
                                                   "SNR, and of each input coordinate); even"))
    group.add_argument("--input_embedding_scale", type=float, default=None,
                       help=cli.per_dataset(DEFAULTS, "input_embedding_scale",
                                                   "highest frequency of the sinusoidal input "
                                                   "embedding; 0 feeds the raw coordinates only"))
    group.add_argument("--input_embedding_period", type=cli.positive(float), default=100.,
                       help="ratio of the input embedding's highest frequency to its lowest "
                            "(checkpoints from before this flag used 1e4)")
    group.add_argument("--gaussian_residual", type=cli.str2bool, default=True,
                       help="true: the MLP adds to the data-matched Gaussian's optimal noise "
                            "predictor, so training starts at the Gaussian bound; false: the MLP "
                            "alone predicts the noise")
    group.add_argument("--train_batch_size", type=cli.positive(int), default=512,
                       help="training points per step")
    group.add_argument("--num_threads", type=int, default=1,
                       help="PyTorch CPU threads per process: this MLP is too small to gain from "
                            "more, and extra threads slow it down on a busy machine (0: PyTorch's "
                            "default)")
    group.add_argument("--grid_size", type=cli.positive(int), default=40,
                       help="the density contours are computed on a grid_size x grid_size grid")
    return p


def parse_args(argv=None, checkpoint_args=None):
    """The run's arguments (cli.parse; None for a --resume before checkpoint_args is given)."""
    parser = build_parser()
    args = cli.parse(parser, argv, DEFAULTS, checkpoint_args, older=OLDER)
    if args is None or args.eval_only:
        return args
    if args.input_embedding_scale < 0:
        parser.error(f"argument --input_embedding_scale: must be >= 0, got {args.input_embedding_scale}")
    if args.embedding_size % 2:
        parser.error(f"argument --embedding_size: must be even, got {args.embedding_size}")
    if args.num_points < 20:
        parser.error(f"argument --num_points: must be at least 20, got {args.num_points}")
    # generated in float64, standardised, kept in float32: about 48 bytes a point at the peak
    cli.check_fits(parser, "--num_points", args.num_points, 48 * args.num_points)
    if args.num_threads < 0:
        parser.error(f"argument --num_threads: must be >= 0, got {args.num_threads}")
    return args


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import pytorch_lightning as pl  # noqa: E402
import torch as t  # noqa: E402
import torch.nn as nn  # noqa: E402

import datasets  # noqa: E402
import experiment  # noqa: E402
import utils  # noqa: E402
import viz  # noqa: E402
from diffusionmodel import DiffusionModel  # noqa: E402

GRAD_CLIP = 1.0         # gradient norm clip: a safeguard, lr 1e-2 is near where runs collapse
                        # to the Gaussian (2e-2, or width 256, did without it)
CONTOUR_DEPTH = 8.0     # nats of log density the contour plot shows below its peak
CONTOUR_STDERR = 0.1    # target standard error (nats) of every cell it shows
GRID_CHUNK = 16384      # rows per denoiser call on the grid: cache-sized blocks run fastest on CPU


def sinusoidal(v, size, max_period):
    """[sin(v f_k), cos(v f_k)] for `size // 2` frequencies f_k from 1 down to 1/max_period."""
    half = size // 2
    freqs = t.exp(-math.log(max_period) * t.arange(half, device=v.device, dtype=v.dtype) / half)
    angles = v.unsqueeze(-1) * freqs
    return t.cat([angles.sin(), angles.cos()], -1)


class MLPDenoiser(nn.Module):
    """eps_hat(z, a) for 2-D data: an MLP (SiLU) on the raw z, the log SNR (raw and as a sinusoidal
    embedding) and, if input_embedding_scale > 0, a sinusoidal embedding of each coordinate of
    input_embedding_scale * z (frequencies from that scale down to it / input_embedding_period,
    for sharp densities)."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=32, input_embedding_scale=0.,
                 input_embedding_period=1e4):
        super().__init__()
        if embedding_size < 2 or embedding_size % 2:
            raise ValueError(f"embedding_size must be an even number >= 2, got {embedding_size}")
        self.embedding_size, self.input_embedding_scale = embedding_size, input_embedding_scale
        self.input_embedding_period = input_embedding_period
        width = 2 + 1 + embedding_size + (2 * embedding_size if input_embedding_scale > 0 else 0)
        layers = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_size), nn.SiLU()]
            width = hidden_size
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z, logsnr):
        a = logsnr.to(z.dtype)
        features = [z, (a / 10).unsqueeze(-1), sinusoidal(a, self.embedding_size, 100.)]
        if self.input_embedding_scale > 0:
            scaled = self.input_embedding_scale * z
            period = self.input_embedding_period
            features += [sinusoidal(scaled[:, 0], self.embedding_size, period),
                         sinusoidal(scaled[:, 1], self.embedding_size, period)]
        return self.net(t.cat(features, -1))


def build_denoiser(a):
    """The MLP of a run's arguments (a dict), its output layer zeroed with a Gaussian residual so
    that training starts exactly at the Gaussian predictor."""
    denoiser = MLPDenoiser(a["hidden_size"], a["hidden_layers"], a["embedding_size"],
                           a["input_embedding_scale"],
                           a.get("input_embedding_period", OLDER["input_embedding_period"]))
    if a["gaussian_residual"]:
        nn.init.zeros_(denoiser.net[-1].weight)
        nn.init.zeros_(denoiser.net[-1].bias)
    return denoiser


class Figures2D(pl.Callback):
    """The validation history (and the exact val NLL where the density is known) during training;
    density contours, samples beside the data, the MSE curve and the val-NLL-vs-epoch figure at
    the end, to TensorBoard and as PNGs in <run>/figures/."""

    def __init__(self, args, curve):
        self.args, self.curve = args, curve
        self.history, self.results = [], {}  # history: (epoch, nll, stderr)

    def setup(self, trainer, pl_module, stage):
        # every 2-D density is known exactly: -log p of the same validation points, in nats
        exact = datasets.exact_nll_2d(self.args.dataset, n=self.args.num_points)
        nll = exact(trainer.datamodule.val_data())
        self.outside = int((~nll.isfinite()).sum())  # points outside the support (+inf)
        self.exact_val = float(nll[nll.isfinite()].mean())

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("val_loss_exact", self.exact_val, sync_dist=True)

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val_loss" in metrics:
            self.history.append((trainer.current_epoch + 1, float(metrics["val_loss"]),
                                 float(metrics["val_loss_stderr"])))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        args, name, train = self.args, self.args.dataset, trainer.datamodule.train
        generator = t.Generator(pl_module.device).manual_seed(args.seed)
        folder = os.path.join(trainer.logger.log_dir, "figures")
        os.makedirs(folder, exist_ok=True)

        def show(tag, fig, file=None):
            trainer.logger.experiment.add_figure(tag, fig, trainer.global_step, close=False)
            viz.save(fig, os.path.join(folder, f"{file or tag}.png"))
        was_training = pl_module.training
        pl_module.eval()
        # Density on a grid: batched pointwise estimates, refined where the contours need it.
        xs, ys, grid = viz.density_grid(train, args.grid_size)
        grid = t.as_tensor(grid, dtype=t.float32, device=pl_module.device)
        nll, stderr, shown = grid_nll(pl_module, grid, generator=generator)
        show("density", viz.plot_density(xs, ys, nll.cpu(), title=f"{name}: model density",
                                         depth=CONTOUR_DEPTH))
        exact = datasets.exact_nll_2d(name, n=args.num_points)(grid.double().cpu())
        show("density_gap", viz.plot_density_gap(
            xs, ys, nll.cpu(), exact, depth=CONTOUR_DEPTH,
            title=f"{name}: exact and model density, and the pointwise gap in nats"))
        samples = t.zeros(0, 2)
        if args.num_samples > 0:
            samples = pl_module.sample(args.num_samples, steps=args.sample_steps,
                                       generator=generator).cpu()
            show("samples", viz.plot_samples(train[:args.num_samples], samples, title=name))
        if isinstance(pl_module.proposal, utils.FittedProposal):  # --fit_proposal
            viz.save(viz.plot_proposal(pl_module.proposal, title=name),
                     os.path.join(folder, "proposal.png"))
        if self.curve.last is not None:
            c = self.curve.last
            viz.save(viz.plot_mse_curve(c["logsnrs"], c["mse"], c["mmse"], 2,
                                        title=f"{name}: MSE curve"),
                     os.path.join(folder, "mse_curve.png"))
        if self.history:
            references = {"exact, this validation set": self.exact_val,
                          "entropy": datasets.entropy_2d(name, n=args.num_points)}
            show("val_loss_history", viz.plot_val_history(
                {"model estimate": tuple(zip(*self.history))}, references,
                title=f"{name}: validation NLL (error bars: standard error)"), "val_loss")
        pl_module.train(was_training)
        self.results = dict(
            contour_cells=int(shown.sum()), contour_stderr_median=float(stderr[shown].median()),
            contour_stderr_max=float(stderr[shown].max()), figures=experiment.shown_path(folder),
            samples_mean=samples.mean(0).tolist(),
            samples_cov=t.cov(samples.T).tolist() if len(samples) > 1 else None)


def grid_nll(model, points, target=CONTOUR_STDERR, depth=CONTOUR_DEPTH, npoints=64,
             max_npoints=8192, generator=None):
    """-log p on grid points with the batched pointwise estimator, refined until every cell the
    contour plot shows (within `depth` nats of the peak) has a standard error <= target.

    A first pass gives every cell `npoints` evaluations, enough to tell the cells the plot shows
    from those it floors (far from the data, where estimates are large and noisy). Each cell that
    may be shown is then estimated afresh, so each estimate stays unbiased, with 16 independent
    replicates (a standard error with 15 degrees of freedom, reliable enough to stop on) and as
    many evaluations as its standard error asks for: it falls about as 1/n for these
    quasi-Monte Carlo points, so n * (stderr / target)^1.2, at least 256, rounded up to a power
    of 2 (at most max_npoints); cells with the same n share one batched call. Cells still above
    the target are refined again.
    Returns (nll, stderr, shown), `shown` marking the cells within `depth` of the peak.
    """
    nll, stderr = model.nll_points(points, npoints, replicates=4, generator=generator,
                                   chunk_size=GRID_CHUNK)
    used = t.full_like(nll, npoints)
    first = True
    while True:
        maybe_shown = nll - 3 * stderr <= nll.min() + depth
        redo = maybe_shown & (used < max_npoints) & (first | (stderr > target))
        redo = redo.nonzero().squeeze(1)
        if len(redo) == 0:
            break
        wanted = used[redo] * (stderr[redo] / target).clamp_min(1).pow(1.2) * 1.3
        wanted = t.maximum(wanted, 2 * used[redo]).clamp(256, max_npoints)
        levels = 2 ** wanted.log2().ceil()
        for n in levels.unique().tolist():
            idx = redo[levels == n]
            nll[idx], stderr[idx] = model.nll_points(points[idx], int(n), replicates=16,
                                                     generator=generator, chunk_size=GRID_CHUNK)
            used[idx] = n
        first = False
    return nll, stderr, nll <= nll.min() + depth


def main(argv=None):
    start = time.time()
    args = parse_args(argv, experiment.checkpoint_args("train_2d.py"))
    if args.num_threads > 0:
        t.set_num_threads(args.num_threads)
    if args.eval_only:
        return evaluate(args)
    pl.seed_everything(args.seed, verbose=False)
    data = datasets.Points2D(args.dataset, args.num_points, args.seed, VAL_FRACTION,
                             args.train_batch_size, args.eval_batch_size)
    model = DiffusionModel(build_denoiser(vars(args)), x_shape=(2,),
                           learning_rate=args.learning_rate, logsnr_loc=args.logsnr_loc,
                           logsnr_scale=args.logsnr_scale, clip=args.clip,
                           gaussian_residual=args.gaussian_residual, val_npoints=args.val_npoints,
                           lr_schedule="onecycle")
    reference, curve = experiment.FitReference(), viz.MSECurve(seed=args.seed)
    figures = Figures2D(args, curve)
    n_train = args.num_points - max(1, round(args.num_points * VAL_FRACTION))
    trainer = experiment.make_trainer(
        args, "train_2d.py", [reference, curve, figures],
        run=experiment.resumed_run_dir(args.resume) or f"{args.dataset}-{args.experiment_name}",
        max_epochs=args.num_epochs, check_val_every_n_epoch=args.val_every, num_sanity_val_steps=0,
        gradient_clip_val=GRAD_CLIP,
        log_every_n_steps=max(1, min(10, n_train // args.train_batch_size)))
    experiment.fit(trainer, model, data, args.resume)
    if not trainer.is_global_zero:
        return None
    summary = dict(dataset=args.dataset,
                   **experiment.summarize(trainer, model, curve, reference.baseline, start),
                   val_nll_exact=figures.exact_val, exact_outside_support=figures.outside,
                   history=figures.history, **figures.results,
                   args=vars(args))
    with open(os.path.join(trainer.logger.log_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    return summary


def evaluate(args):
    """--eval_only: the evaluation table of the checkpoints (and their ensemble with the
    data-matched Gaussian) on their run's validation points, with the exact value on the same
    points where the density is known."""
    ckpts = [experiment.load_checkpoint(path, "train_2d.py") for path in args.ckpt]
    data = experiment.checkpoints_data(args, ckpts, ("dataset", "num_points", "seed"), DEFAULTS)
    models = [experiment.model_from_checkpoint(c, build_denoiser(c["run_args"])) for c in ckpts]
    points = datasets.Points2D(data["dataset"], data["num_points"], data["seed"], VAL_FRACTION)
    exact = datasets.exact_nll_2d(data["dataset"], n=data["num_points"])
    return experiment.run_evaluation(args, models, experiment.checkpoint_names(args.ckpt), points,
                                     exact_nll=exact,
                                     info=dict(script="train_2d.py", dataset=data["dataset"]))


def print_summary(s):
    lines = experiment.summary_lines(s)
    lines[0] = f"\n{s['dataset']}: {lines[0]}"
    outside = (f"; {s['exact_outside_support']} points outside the support left out"
               if s["exact_outside_support"] else "")
    lines.insert(3, f"  exact value on the validation set = {s['val_nll_exact']:.4f} nats "
                    f"(gap {s['val_nll'] - s['val_nll_exact']:+.4f}{outside})")
    if "contour_cells" in s:
        lines.insert(-3, f"  density contours: {s['contour_cells']} cells shown, standard error "
                         f"median {s['contour_stderr_median']:.3f}, max "
                         f"{s['contour_stderr_max']:.3f} nats")
        lines.insert(-1, f"  figures:     {s['figures']}")
    print("\n".join(lines))


if __name__ == "__main__":
    experiment.run_cli(main)
