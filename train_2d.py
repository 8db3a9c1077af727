"""Train an information-theoretic diffusion model on a 2-D toy density and look at what it learned.

    python train_2d.py --dataset moons

Logs go to TensorBoard under exps/<dataset>-<experiment_name>/ (a new folder per run): train_loss,
val_loss (E[-log p] in nats) with its standard error, the exact value for scg, the MSE curve with
its quantiles and suggested (logsnr_loc, logsnr_scale), the density contours and model samples.
The same figures are written as PNGs to the run's figures/ folder, and a summary to stdout and to
summary.json.
"""
import argparse
import json
import math
import os
import time

import pytorch_lightning as pl
import torch as t
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import datasets
import utils
import viz
from diffusionmodel import DiffusionModel

# Per-dataset defaults, used where a flag is not given. Sharp sets (a density on a curve, sharp
# edges, tight clusters) need high-frequency input features; for the smooth Gaussian they only
# slow training down, so scg sees the raw coordinates alone. Their validation estimates are also
# noisier: 256 evaluations per point keep val_loss's noise under 0.01 nats (64 suffice for scg).
DEFAULTS = {
    "scg": dict(num_epochs=60, input_embedding_scale=0.0, val_npoints=64),
    "moons": dict(num_epochs=150, input_embedding_scale=25.0, val_npoints=256),
    "dino": dict(num_epochs=150, input_embedding_scale=25.0, val_npoints=256),
    "line": dict(num_epochs=150, input_embedding_scale=25.0, val_npoints=256),
    "circle": dict(num_epochs=150, input_embedding_scale=25.0, val_npoints=256),
}
VAL_FRACTION = 0.1
CONTOUR_DEPTH = 8.0     # nats of log density the contour plot shows below its peak
CONTOUR_STDERR = 0.1    # target standard error (nats) of every cell it shows
GRID_CHUNK = 16384      # rows per denoiser call on the grid: cache-sized blocks run fastest on CPU
RUN_DIR_ENV = "ITD_2D_RUN_DIR"  # hands rank 0's run folder to the DDP worker processes


def sinusoidal(v, size, max_period):
    """[sin(v f_k), cos(v f_k)] for `size // 2` frequencies f_k from 1 down to 1/max_period."""
    half = size // 2
    freqs = t.exp(-math.log(max_period) * t.arange(half, device=v.device, dtype=v.dtype) / half)
    angles = v.unsqueeze(-1) * freqs
    return t.cat([angles.sin(), angles.cos()], -1)


class MLPDenoiser(nn.Module):
    """eps_hat(z, a) for 2-D data: an MLP (SiLU) on the raw z, the log SNR (raw and as a sinusoidal
    embedding) and, if input_embedding_scale > 0, a sinusoidal embedding of each coordinate of
    input_embedding_scale * z (frequencies up to that scale, for sharp densities)."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=32, input_embedding_scale=0.):
        super().__init__()
        if embedding_size < 2 or embedding_size % 2:
            raise ValueError(f"embedding_size must be an even number >= 2, got {embedding_size}")
        self.embedding_size, self.input_embedding_scale = embedding_size, input_embedding_scale
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
            features += [sinusoidal(scaled[:, 0], self.embedding_size, 1e4),
                         sinusoidal(scaled[:, 1], self.embedding_size, 1e4)]
        return self.net(t.cat(features, -1))


def build_parser():
    p = argparse.ArgumentParser(
        description="Information-theoretic diffusion on a 2-D toy density: trains a denoiser, "
                    "reports E[-log p] in nats, and draws the MSE curve, density contours and "
                    "samples (TensorBoard, and PNGs in <log_dir>/<dataset>-<experiment_name>/"
                    "figures/).",
        formatter_class=utils.HelpFormatter)
    per_dataset = lambda key, fmt="{}": ", ".join(f"{k} {fmt.format(v[key])}"  # noqa: E731
                                                  for k, v in DEFAULTS.items())
    group = p.add_argument_group("data")
    group.add_argument("--dataset", default=None, choices=datasets.DATASETS_2D,
                       help="the 2-D density (standardised points; scg's density is known "
                            "exactly); default: moons, or with --eval_only the checkpoint's")
    group.add_argument("--num_points", type=utils.positive(int), default=8000,
                       help=f"points drawn from it; {VAL_FRACTION * 100:.0f}%% are held out for "
                            "validation")
    group = p.add_argument_group("model: an MLP denoiser")
    group.add_argument("--hidden_size", type=utils.positive(int), default=128, help="MLP width")
    group.add_argument("--hidden_layers", type=utils.positive(int), default=3,
                       help="number of hidden layers")
    group.add_argument("--embedding_size", type=utils.positive(int), default=32,
                       help="size of each sinusoidal embedding (of the log SNR, and of each input "
                            "coordinate); even")
    group.add_argument("--input_embedding_scale", type=float, default=None,
                       help="highest frequency of the sinusoidal input embedding; 0 feeds the raw "
                            "coordinates only (default: per dataset, "
                            + per_dataset("input_embedding_scale", "{:g}") + ")")
    group.add_argument("--gaussian_residual", type=utils.str2bool, default=True,
                       help="true: the MLP adds to the data-matched Gaussian's optimal noise "
                            "predictor, so training starts at the Gaussian bound; false: the MLP "
                            "alone predicts the noise")
    group = p.add_argument_group("log-SNR importance distribution (logistic)")
    group.add_argument("--logsnr_loc", type=float, default=0.0,
                       help="its location; the integral over log SNR covers loc +- 4 scale. The "
                            "run's summary and MSE-curve figure suggest a value")
    group.add_argument("--logsnr_scale", type=utils.positive(float), default=3.0,
                       help="its scale (> 0)")
    group = p.add_argument_group("training")
    group.add_argument("--num_epochs", type=utils.positive(int), default=None,
                       help="passes over the training points (default: per dataset, "
                            + per_dataset("num_epochs") + ")")
    group.add_argument("--train_batch_size", type=utils.positive(int), default=512,
                       help="training points per step")
    group.add_argument("--learning_rate", type=utils.positive(float), default=3e-3,
                       help="peak learning rate of Adam's one-cycle schedule")
    group.add_argument("--num_threads", type=int, default=1,
                       help="PyTorch CPU threads per process: this MLP is too small to gain from "
                            "more, and extra threads slow it down on a busy machine (0: PyTorch's "
                            "default)")
    group = p.add_argument_group("evaluation and figures")
    group.add_argument("--eval_batch_size", type=utils.positive(int), default=1024,
                       help="validation points per batch")
    group.add_argument("--val_npoints", type=utils.positive(int), default=None,
                       help="log-SNR and noise draws per validation point (a power of two); more "
                            "make val_loss less noisy (default: per dataset, "
                            + per_dataset("val_npoints") + ")")
    group.add_argument("--val_every", type=utils.positive(int), default=None,
                       help="validate every this many epochs, and after the last one "
                            "(default: num_epochs // 10, so about ten validations)")
    group.add_argument("--grid_size", type=utils.positive(int), default=40,
                       help="the density contours are computed on a grid_size x grid_size grid")
    group.add_argument("--num_samples", type=utils.positive(int), default=2000,
                       help="model samples drawn for the samples figure")
    group.add_argument("--sample_steps", type=utils.positive(int), default=100,
                       help="steps of the deterministic sampler")
    group = p.add_argument_group("output")
    group.add_argument("--log_dir", default="exps",
                       help="runs go to log_dir/<dataset>-<experiment_name>[-2, -3, ...]")
    group.add_argument("--experiment_name", default="base", help="the run's name")
    utils.add_trainer_args(p)
    utils.add_eval_args(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    utils.check_eval_args(parser, args)
    if args.eval_only:
        return args
    args.dataset = args.dataset or "moons"
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.input_embedding_scale < 0:
        parser.error(f"argument --input_embedding_scale: must be >= 0, got {args.input_embedding_scale}")
    if args.embedding_size % 2:
        parser.error(f"argument --embedding_size: must be even, got {args.embedding_size}")
    if args.num_points < 20:
        parser.error(f"argument --num_points: must be at least 20, got {args.num_points}")
    if args.num_threads < 0:
        parser.error(f"argument --num_threads: must be >= 0, got {args.num_threads}")
    if args.val_every is None:
        args.val_every = max(1, args.num_epochs // 10)
    return args


class Figures2D(pl.Callback):
    """Validation history (and the exact val NLL where the density is known) during training;
    density contours, samples beside the data, the MSE curve and the val-NLL-vs-epoch figure
    at the end, to TensorBoard and as PNGs in <run_dir>/figures/."""

    def __init__(self, args, train, val, exact_nll, run_dir):
        self.args, self.train, self.val, self.run_dir = args, train, val, run_dir
        self.exact_val = None if exact_nll is None else float(exact_nll(val).mean())
        self.history = []  # (epoch, val_loss, val_loss_stderr)
        self.results = {}

    def on_train_epoch_start(self, trainer, pl_module):
        # Validate after the last epoch even when num_epochs is not a multiple of the interval,
        # so that the final val_loss belongs to the final model.
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.exact_val is not None and not trainer.sanity_checking:
            pl_module.log("val_loss_exact", self.exact_val, sync_dist=True)

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val_loss" in metrics:
            self.history.append((trainer.current_epoch + 1, float(metrics["val_loss"]),
                                 float(metrics["val_loss_stderr"])))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        args, name = self.args, self.args.dataset
        generator = t.Generator(pl_module.device).manual_seed(args.seed)
        folder = os.path.join(self.run_dir, "figures")
        os.makedirs(folder, exist_ok=True)
        tb = trainer.logger.experiment
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()

        # Density on a grid: batched pointwise estimates, refined where the contours need it.
        xs, ys, grid = viz.density_grid(self.train, args.grid_size)
        grid = t.as_tensor(grid, dtype=t.float32, device=pl_module.device)
        nll, stderr, shown = grid_nll(pl_module, grid, generator=generator)
        fig = viz.plot_density(xs, ys, nll.cpu(), title=f"{name}: model density", depth=CONTOUR_DEPTH)
        tb.add_figure("density", fig, step, close=False)
        viz.save(fig, os.path.join(folder, "density.png"))

        samples = pl_module.sample(args.num_samples, steps=args.sample_steps, generator=generator)
        fig = viz.plot_samples(self.train[:args.num_samples], samples.cpu(), title=name)
        tb.add_figure("samples", fig, step, close=False)
        viz.save(fig, os.path.join(folder, "samples.png"))

        # The MSE curve over the whole validation set, four noise draws per point.
        logsnrs = pl_module.curve_logsnrs().to(pl_module.device)
        mse, mmse = pl_module.mse_curve(self.val.repeat(4, 1).to(pl_module.device), logsnrs,
                                        generator=generator)
        loc, scale = utils.suggest_logsnr_params(logsnrs.cpu(), mse.cpu(), 2)
        viz.save(viz.plot_mse_curve(logsnrs.cpu(), mse.cpu(), mmse.cpu(), 2,
                                    title=f"{name}: MSE curve"),
                 os.path.join(folder, "mse_curve.png"))

        if self.history:
            epochs, values, errors = zip(*self.history)
            references = {} if self.exact_val is None else {
                "exact, this validation set": self.exact_val, "entropy": datasets.SCG_ENTROPY}
            fig = viz.plot_val_history({"model estimate": (epochs, values, errors)}, references,
                                       title=f"{name}: validation NLL (error bars: standard error)")
            tb.add_figure("val_loss_history", fig, step, close=False)
            viz.save(fig, os.path.join(folder, "val_loss.png"))
        pl_module.train(was_training)

        self.results = dict(
            contour_cells=int(shown.sum()), contour_stderr_median=float(stderr[shown].median()),
            contour_stderr_max=float(stderr[shown].max()),
            suggested_logsnr_loc=loc, suggested_logsnr_scale=scale, figures=folder,
            samples_mean=samples.mean(0).tolist(), samples_cov=t.cov(samples.T).tolist())


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


def run_dir_for(args):
    """A fresh log_dir/<dataset>-<experiment_name> folder; DDP workers reuse rank 0's."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        if os.environ.get(RUN_DIR_ENV):
            return os.environ[RUN_DIR_ENV]
    run_dir = os.path.abspath(utils.new_run_dir(args.log_dir, f"{args.dataset}-{args.experiment_name}"))
    os.makedirs(run_dir)
    os.environ[RUN_DIR_ENV] = run_dir
    return run_dir


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    if args.eval_only:
        return evaluate(args)
    pl.seed_everything(args.seed, verbose=False)
    if args.num_threads > 0:
        t.set_num_threads(args.num_threads)

    data = datasets.get_2d_dataset(args.dataset, n=args.num_points)
    train, val = datasets.split_2d(data, VAL_FRACTION, seed=args.seed)
    exact_nll = datasets.exact_nll_2d(args.dataset)

    denoiser = MLPDenoiser(args.hidden_size, args.hidden_layers, args.embedding_size,
                           args.input_embedding_scale)
    if args.gaussian_residual:  # start exactly at the Gaussian predictor, not near it
        nn.init.zeros_(denoiser.net[-1].weight)
        nn.init.zeros_(denoiser.net[-1].bias)
    model = DiffusionModel(denoiser, x_shape=(2,), learning_rate=args.learning_rate,
                           logsnr_loc=args.logsnr_loc, logsnr_scale=args.logsnr_scale,
                           gaussian_residual=args.gaussian_residual, val_npoints=args.val_npoints,
                           lr_schedule="onecycle").fit_reference(train)

    train_loader = DataLoader(TensorDataset(train), batch_size=args.train_batch_size, shuffle=True,
                              drop_last=len(train) > args.train_batch_size)
    val_loader = DataLoader(TensorDataset(val), batch_size=args.eval_batch_size)

    run_dir = run_dir_for(args)
    figures = Figures2D(args, train, val, exact_nll, run_dir)
    trainer = utils.make_trainer(args, run_dir, "train_2d.py", callbacks=[figures],
                                 check_val_every_n_epoch=args.val_every,
                                 num_sanity_val_steps=0,
                                 log_every_n_steps=max(1, min(10, len(train_loader))))
    # The number val_loss should end below: -log q under the data-matched Gaussian reference.
    gaussian_val = model.reference.nll(val).mean().item()
    trainer.logger.log_metrics({"gaussian_val_loss": gaussian_val}, step=0)
    trainer.fit(model, train_loader, val_loader)
    if not trainer.is_global_zero:
        return None
    os.environ.pop(RUN_DIR_ENV, None)

    summary = dict(dataset=args.dataset, run_dir=run_dir, epochs=args.num_epochs,
                   steps=trainer.global_step, wall_time_s=time.time() - start,
                   val_nll=figures.history[-1][1], val_nll_stderr=figures.history[-1][2],
                   val_nll_exact=figures.exact_val, val_nll_gaussian=gaussian_val,
                   checkpoint=trainer.checkpoint_callback.last_model_path,
                   best_checkpoint=trainer.checkpoint_callback.best_model_path,
                   history=figures.history, **figures.results, args=vars(args))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    return summary


def evaluate(args):
    """--eval_only: the evaluation table of the checkpoints (and their ensemble with the
    data-matched Gaussian) on their run's validation points; for scg with the exact value on the
    same points."""
    paths = args.ckpt
    ckpts = [utils.load_checkpoint(path, "train_2d.py") for path in paths]
    data = utils.same_data(paths, ckpts, ("dataset", "num_points", "seed"))
    if args.dataset is not None and args.dataset != data["dataset"]:
        raise utils.UserError(f"--dataset {args.dataset}, but {paths[0]} was trained on "
                              f"{data['dataset']}")
    models = [model_from_checkpoint(ckpt) for ckpt in ckpts]
    points = datasets.get_2d_dataset(data["dataset"], n=data["num_points"])
    _, val = datasets.split_2d(points, VAL_FRACTION, seed=data["seed"])
    return utils.run_evaluation(args, models, utils.checkpoint_names(paths), val,
                                exact_nll=datasets.exact_nll_2d(data["dataset"]),
                                info=dict(script="train_2d.py", dataset=data["dataset"]))


def model_from_checkpoint(ckpt):
    """The trained DiffusionModel of a loaded checkpoint (its MLP rebuilt from the run's saved
    arguments), in eval mode."""
    a = ckpt["run_args"]
    denoiser = MLPDenoiser(a["hidden_size"], a["hidden_layers"], a["embedding_size"],
                           a["input_embedding_scale"])
    model = DiffusionModel(denoiser, **ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_run(run_dir, checkpoint="last.ckpt"):
    """The trained DiffusionModel of a finished run and the run's summary."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    path = os.path.join(run_dir, "checkpoints", checkpoint)
    return model_from_checkpoint(utils.load_checkpoint(path, "train_2d.py")), summary


def print_summary(s):
    lines = [f"\n{s['dataset']}: {s['epochs']} epochs ({s['steps']} steps) in {s['wall_time_s']:.1f} s",
             f"  validation E[-log p] = {s['val_nll']:.4f} +- {s['val_nll_stderr']:.4f} nats"]
    lines.append(f"  (data-matched Gaussian: {s['val_nll_gaussian']:.4f} nats)")
    if s["val_nll_exact"] is not None:
        lines.append(f"  exact value on the validation set = {s['val_nll_exact']:.4f} nats "
                     f"(gap {s['val_nll'] - s['val_nll_exact']:+.4f}; entropy "
                     f"{datasets.SCG_ENTROPY:.4f})")
    if math.isfinite(s["suggested_logsnr_loc"]) and math.isfinite(s["suggested_logsnr_scale"]):
        lines.append(f"  MSE curve suggests --logsnr_loc {s['suggested_logsnr_loc']:.2f} "
                     f"--logsnr_scale {s['suggested_logsnr_scale']:.2f}")
    else:
        lines.append("  MSE curve does not cross its quartiles in the integration range "
                     "(see figures/mse_curve.png)")
    lines += [f"  density contours: {s['contour_cells']} cells shown, standard error median "
              f"{s['contour_stderr_median']:.3f}, max {s['contour_stderr_max']:.3f} nats",
              f"  logs:        {s['run_dir']}",
              f"  checkpoint:  {s['checkpoint']}",
              f"  figures:     {s['figures']}",
              f"  view with:   tensorboard --logdir {os.path.dirname(s['run_dir'])}"]
    print("\n".join(lines))


if __name__ == "__main__":
    utils.run_cli(main)
