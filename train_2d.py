"""Train an information-theoretic diffusion model on a 2-D toy density and look at what it learned.

    python train_2d.py --dataset moons

Logs go to TensorBoard under exps/<dataset>-<experiment_name>/ (a new folder per run): train_loss,
val_loss (E[-log p] in nats) with its standard error, the exact value on the same points where
the density is known, the MSE curve with its suggested (logsnr_loc, logsnr_scale), density
contours and model samples. The same figures are written as PNGs to the run's figures/ folder,
and a summary to stdout and summary.json. `--eval_only --ckpt PATH` evaluates checkpoints instead.
"""
import os
import shlex

import cli

# Per-dataset defaults, used where a flag is not given; the first is the default dataset. A new
# dataset (datasets.SETS_2D) needs an entry here. How these values were chosen: docs/2d.md.
SHARP = dict(num_points=32000, num_epochs=75, val_every=15, input_embedding_scale=25.0,
             embedding_size=64, learning_rate=1e-2, logsnr_loc=4.5, logsnr_scale=2.25,
             val_npoints=64, fit_proposal=256)
COMMON = dict(eval_batch_size=1024, num_samples=2000, lr_schedule="onecycle", val_fraction=0.1,
              ode=True)
DEFAULTS = {"moons": dict(COMMON, **SHARP), "dino": dict(COMMON, **SHARP),
            "scg": dict(COMMON, num_points=8000, num_epochs=60, input_embedding_scale=0.0,
                        embedding_size=32, learning_rate=3e-3, logsnr_loc=0.0, logsnr_scale=3.0,
                        val_npoints=64, fit_proposal=0),
            "line": dict(COMMON, **SHARP),
            "circle": dict(COMMON, **dict(SHARP, input_embedding_scale=100.0, logsnr_loc=5.0,
                                          logsnr_scale=2.75)),
            "blobs": dict(COMMON, num_points=16000, num_epochs=40, input_embedding_scale=0.0,
                          embedding_size=32, learning_rate=3e-3, logsnr_loc=1.0, logsnr_scale=3.0,
                          val_npoints=64, fit_proposal=0)}
OLDER = {"input_embedding_period": 1e4, "fit_proposal": 0, "val_fraction": 0.1}  # what
# checkpoints written before a flag (or setting) existed used


def build_parser():
    p = cli.build_parser(
        "Information-theoretic diffusion on a 2-D toy density: trains a denoiser, reports "
        "E[-log p] in nats, and draws the MSE curve, density contours and samples (TensorBoard, "
        "and PNGs in <log_dir>/<dataset>-<experiment_name>/figures/).", DEFAULTS, ["grid_size"])
    group = p.add_argument_group("data and model: an MLP denoiser")
    group.add_argument("--num_points", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "num_points", "points drawn from the "
                                            f"density; {COMMON['val_fraction'] * 100:.0f}%% are "
                                            "held out for validation"))
    group.add_argument("--hidden_size", type=cli.positive(int), default=128, help="MLP width")
    group.add_argument("--hidden_layers", type=cli.positive(int), default=3,
                       help="number of hidden layers")
    group.add_argument("--embedding_size", type=cli.positive(int), default=None,
                       help=cli.per_dataset(DEFAULTS, "embedding_size", "size of each sinusoidal "
                                            "embedding (of the log SNR, and of each input "
                                            "coordinate); even"))
    group.add_argument("--input_embedding_scale", type=float, default=None,
                       help=cli.per_dataset(DEFAULTS, "input_embedding_scale", "highest frequency "
                                            "of the sinusoidal input embedding; 0 feeds the raw "
                                            "coordinates only"))
    group.add_argument("--input_embedding_period", type=cli.positive(float), default=100.,
                       help="ratio of the input embedding's highest frequency to its lowest "
                            "(checkpoints from before this flag used 1e4)")
    group.add_argument("--gaussian_residual", type=cli.str2bool, nargs="?", const=True,
                       default=True,
                       help="true: the MLP adds to the data-matched Gaussian's optimal noise "
                            "predictor, so training starts at the Gaussian bound; false: the MLP "
                            "alone predicts the noise")
    group.add_argument("--train_batch_size", type=cli.positive(int), default=512,
                       help="training points per step")
    group.add_argument("--num_threads", type=cli.whole(0), default=1,
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
    return args


cli.answer_early(__name__, parse_args)
# torch and Lightning load only once the arguments are known to be good (hence noqa: E402)
import pytorch_lightning as pl  # noqa: E402
import torch as t  # noqa: E402

import datasets  # noqa: E402
import experiment  # noqa: E402
import ode  # noqa: E402
import viz  # noqa: E402
from denoisers import MLPDenoiser  # noqa: E402
from proposals import FittedProposal  # noqa: E402

GRAD_CLIP = 1.0  # gradient norm clip: a safeguard, lr 1e-2 is near where runs collapse


class TwoD(experiment.Experiment):
    """train_2d.py's runs: an MLP denoiser on a 2-D density, and its figures."""

    script, defaults, older = "train_2d.py", DEFAULTS, OLDER
    data_keys = ("dataset", "num_points", "seed", "val_fraction", "conditional")

    def parse_args(self, argv=None, checkpoint_args=None):
        return parse_args(argv, checkpoint_args)

    def prepare(self, args):
        if args.num_threads > 0:
            t.set_num_threads(args.num_threads)

    def data(self, args, evaluation=False):
        return datasets.Points2D(args.dataset, args.num_points, args.seed, args.val_fraction,
                                 args.train_batch_size, args.eval_batch_size, args.conditional)

    def denoiser(self, args, data):
        return MLPDenoiser(args.hidden_size, args.hidden_layers, args.embedding_size,
                           args.input_embedding_scale, args.input_embedding_period,
                           zero_output=args.gaussian_residual,
                           num_classes=data.num_classes if data is not None else None)

    def callbacks(self, args, data, curve):
        self.figures = Figures2D(args, curve)
        return [self.figures]

    def trainer_kwargs(self, args):
        return dict(num_sanity_val_steps=0, gradient_clip_val=GRAD_CLIP, log_every_n_steps=10)

    def summary(self, args, s):
        s.update(history=self.figures.history, **self.figures.results)
        if "contour_cells" not in s:
            return {}
        return {"contours": f"  density contours: {s['contour_cells']} cells shown, standard error "
                            f"median {s['contour_stderr_median']:.3f}, max "
                            f"{s['contour_stderr_max']:.3f} nats",
                "figures": f"  figures:     {shlex.quote(s['figures'])}"}


class Figures2D(pl.Callback):
    """The validation history during training; at the end, density contours (with --ode, beside
    the probability-flow ODE's; where the density is known, the exact density beside the model's
    and their pointwise gap; with labels, each label's pointwise mutual information), samples
    beside the data, the MSE curve, the fitted proposal and the val-NLL-vs-epoch figure, to
    TensorBoard and as PNGs in <run>/figures/."""

    def __init__(self, args, curve):
        self.args, self.curve = args, curve
        self.history, self.results = [], {}  # history: (epoch, nll, stderr)

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val_loss" in metrics:
            self.history.append((trainer.current_epoch + 1, float(metrics["val_loss"]),
                                 float(metrics["val_loss_stderr"])))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        args, name, data = self.args, self.args.dataset, trainer.datamodule
        folder = os.path.join(trainer.logger.log_dir, "figures")
        os.makedirs(folder, exist_ok=True)

        def show(tag, fig, file=None):
            trainer.logger.experiment.add_figure(tag, fig, trainer.global_step, close=False)
            viz.save(fig, os.path.join(folder, f"{file or tag}.png"))
        was_training = pl_module.training
        pl_module.eval()
        xs, ys, grid = viz.density_grid(data.train, args.grid_size)
        grid = t.as_tensor(grid, dtype=pl_module.dtype, device=pl_module.device)
        nll, stderr, shown = viz.grid_nll(pl_module, grid, seed=args.seed)
        show("density", viz.plot_density(xs, ys, nll.cpu(), title=f"{name}: model density"))
        if args.ode:  # the density the model's probability-flow ODE defines, beside the IT one
            flow, _ = pl_module.nll_ode(grid, **ode.settings(args.ode_trace, 2, args.ode_probes,
                                                             args.ode_tol))
            show("density_ode", viz.plot_density(
                xs, ys, {"IT estimate": nll.cpu(), "probability-flow ODE": flow.cpu()},
                title=f"{name}: the model's density, two ways"))
        if data.num_classes:  # where each label's information lives, beside the exact values
            show("information", viz.plot_information(
                xs, ys, information_maps(pl_module, data, grid, args),
                title=f"{name}: pointwise mutual information of each label"))
        exact = data.exact_nll(grid.double().cpu())
        if exact is not None:
            show("density_gap", viz.plot_density_gap(
                xs, ys, nll.cpu(), exact,
                title=f"{name}: exact and model density, and the pointwise gap in nats"))
        samples = t.zeros(0, 2)
        if args.num_samples > 0:
            generator = t.Generator(pl_module.device).manual_seed(args.seed)
            samples = pl_module.sample(args.num_samples, steps=args.sample_steps,
                                       generator=generator).cpu()
            show("samples", viz.plot_samples(data.train[:args.num_samples], samples, title=name))
        if isinstance(pl_module.proposal, FittedProposal):  # --fit_proposal
            viz.save(viz.plot_proposal(pl_module.proposal, title=name),
                     os.path.join(folder, "proposal.png"))
        if self.curve.last is not None:
            c = self.curve.last
            viz.save(viz.plot_mse_curve(c["logsnrs"], c["mse"], c["mmse"], 2,
                                        title=f"{name}: MSE curve"),
                     os.path.join(folder, "mse_curve.png"))
        if self.history:
            references = {"exact, this validation set": trainer.callback_metrics.get(
                "val_loss_exact"), "entropy": None if data.num_classes else data.entropy()}
            references = {k: float(v) for k, v in references.items() if v is not None}
            show("val_loss_history", viz.plot_val_history(
                {"model estimate": tuple(zip(*self.history))}, references,
                title=f"{name}: validation NLL (error bars: standard error)"), "val_loss")
        pl_module.train(was_training)
        self.results = dict(
            contour_cells=int(shown.sum()), contour_stderr_median=float(stderr[shown].median()),
            contour_stderr_max=float(stderr[shown].max()),
            figures=experiment.shown_path(folder), samples_mean=samples.mean(0).tolist(),
            samples_cov=t.cov(samples.T).tolist() if len(samples) > 1 else None)


def information_maps(model, data, grid, args):
    """{"mi_points: y = k": i(x; k), "Bayes' rule: y = k": ..., "exact: y = k": ...} over the grid
    points, for every label k: the model's as the difference of its two bounds (as mi_points) and
    as log p(k | x) - log p(k) (as class_log_posterior), from one pass over every label and none
    at --val_npoints; the exact from the data's densities, where known."""
    terms = model.label_terms(grid, t.arange(-1, data.num_classes, device=grid.device),
                              args.val_npoints, seed=args.seed).mean(1)  # no label, 0 .. k-1
    by_bayes = model.label_log_posterior(terms[:, 1:]) - model.label_log_prior
    maps = {f"mi_points: y = {j}": v.cpu() for j, v in enumerate((terms[:, :1] - terms[:, 1:]).T)}
    maps.update({f"Bayes' rule: y = {j}": v.cpu() for j, v in enumerate(by_bayes.T)})
    exact = datasets.exact_labels(data, grid.double().cpu())
    if exact is not None:
        maps.update({f"exact: y = {j}": v for j, v in enumerate(exact[1].T)})
    return maps


main = TwoD().main

if __name__ == "__main__":
    experiment.run_cli(main)
