"""The spine both scripts share: command-line flags, the Trainer, run folders, checkpoints, the
evaluation of checkpoints through the Trainer, and the error path. A script adds only its own
denoiser, data and figures (see the README's layout table)."""
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch as t
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import utils
import viz
from diffusionmodel import DiffusionModel, Ensemble, GaussianDenoiser, GridRounding, bin_edges
from diffusionmodel import heldout_errors, variational_bound

RESULTS_SCHEMA = "itd-eval/3"
SELECTION_STREAM = 1 << 40  # seed offset of the ensemble choice's random numbers
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's


class UserError(RuntimeError):
    """A problem the user can fix (missing data, weights or files): printed without a traceback."""


class Interrupted(pl.Callback):
    """Ctrl-C: during training the state is saved to <run>/checkpoints/interrupted.ckpt, and
    run_cli ends with one line (global rank 0) naming it and the command that resumes, exit
    status 130; during an evaluation nothing is written."""

    message, log_dir = None, None

    def on_train_start(self, trainer, pl_module):
        self.log_dir = trainer.log_dir  # rank 0's, shared with every process

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, KeyboardInterrupt):
            return
        if self.log_dir is None:
            Interrupted.message = "interrupted: nothing was written"
            return
        path = os.path.join(self.log_dir, "checkpoints", "interrupted.ckpt")
        trainer.save_checkpoint(path)
        argv, skip = [], False  # the command as given, resuming from the checkpoint
        for word in sys.argv[1:]:
            if skip or word == "--resume" or word.startswith("--resume="):
                skip = word == "--resume"
                continue
            argv.append(word)
        Interrupted.message = (f"interrupted at epoch {trainer.current_epoch + 1}, step "
                               f"{trainer.global_step}: kept {shown_path(path)}; resume with "
                               f"python {' '.join([sys.argv[0], *argv])} --resume "
                               f"{shown_path(path)}")


def run_cli(main):
    """Runs main(); a user error ends with one line on stderr and exit status 2, Ctrl-C during
    training with one line saying what was kept (exit status 130). A process group left by DDP is
    closed first: gloo's threads abort the interpreter's exit otherwise."""
    # Lightning's own lines on Ctrl-C: ours (Interrupted) says what was kept
    for name in ("pytorch_lightning.utilities.rank_zero",
                 "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(lambda record: not re.search(
            "KeyboardInterrupt|weights_only", record.getMessage()))
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, UserError) as err:
        if os.environ.get("ITD_TRACEBACK"):  # to tell a bug from a mistake
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (SystemExit, KeyboardInterrupt):
        if Interrupted.message is None:
            raise
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            print(Interrupted.message, file=sys.stderr)
        sys.exit(130)
    finally:
        if t.distributed.is_available() and t.distributed.is_initialized():
            t.distributed.destroy_process_group()


def show_progress():
    """The progress display: Lightning's bar on a terminal, one line at a time in a log."""
    return TQDMProgressBar() if sys.stdout.isatty() else LineProgress()


class LineProgress(ProgressBar):
    """Progress for a log file: one line per training epoch with its metrics, and during
    validation and evaluation at most one line every `every` seconds."""

    def __init__(self, every=10.):
        super().__init__()
        self.every, self.enabled, self._last = every, True, time.time()

    def disable(self):
        self.enabled = False

    def enable(self):
        self.enabled = True

    @rank_zero_only
    def _say(self, text):
        if self.enabled:
            print(text, flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        shown = dict(self.get_metrics(trainer, pl_module))
        shown.pop("v_num", None)
        if "val_loss" in trainer.callback_metrics:
            shown["val_loss"] = float(trainer.callback_metrics["val_loss"])
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in shown.items())
        self._say(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {metrics}")

    def _tick(self, label, batch_idx, total):
        now = time.time()
        if now - self._last >= self.every:
            self._last = now
            self._say(f"{label}: batch {batch_idx + 1} of {int(total)}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        self._tick("validation", batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._tick(getattr(pl_module, "phase", "test"), batch_idx,
                   trainer.num_test_batches[dataloader_idx])


# ---------------------------------------------------------------------------------------------
# The Trainer and run folders
# ---------------------------------------------------------------------------------------------
class RunLogger(TensorBoardLogger):
    """TensorBoard logs in log_dir/<run>, or <run>-2, -3, ... : a run never overwrites another.
    The free name is chosen when the folder is first needed, so failed starts leave nothing
    behind. Global rank 0's is the run's: use trainer.log_dir (broadcast) or rank 0's logger."""

    def __init__(self, log_dir, run, resume=False):
        super().__init__(log_dir, name="", version=run if resume else None, default_hp_metric=False)
        self.run = run

    def _get_next_version(self):
        path, k = self.run, 1
        while os.path.exists(os.path.join(self.root_dir, path)):
            k += 1
            path = f"{self.run}-{k}"
        return path


def make_trainer(args, script=None, callbacks=(), run=None, **kwargs):
    """A Trainer from the shared flags, or a UserError for settings Lightning rejects; nothing is
    written yet. With `run` (a name, or the folder of a run to resume) it logs to TensorBoard and
    checkpoints the best val_loss and the last epoch into <run folder>/checkpoints, each with the
    run's arguments ("run_args"), so a checkpoint alone rebuilds its model and data; with
    --fit_proposal, FitProposal refits the log-SNR proposal 20 times during training."""
    class RunArgs(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["run_args"] = dict(vars(args), script=script)

    logger, folder = False, None
    if run is not None:
        resume = os.path.isdir(run)
        folder = os.path.dirname(os.path.abspath(run)) if resume else args.log_dir
        logger = RunLogger(folder, os.path.basename(run), True) if resume else RunLogger(folder, run)
        callbacks = [ModelCheckpoint(monitor="val_loss", filename="best-{epoch}", save_last=True),
                     RunArgs(), ValidateLastEpoch(), Interrupted(), RunSize(), *callbacks]
        if getattr(args, "fit_proposal", 0):
            callbacks.append(FitProposal(args.fit_proposal, max(1, args.num_epochs // 20), args.seed))
    try:
        trainer = pl.Trainer(accelerator=args.accelerator, devices=_devices(args.devices),
                             strategy=args.strategy, num_nodes=args.num_nodes,
                             precision=args.precision, logger=logger,
                             callbacks=[show_progress(), *callbacks], **kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as err:
        raise UserError(f"cannot set up the Trainer (--accelerator {args.accelerator} --devices "
                        f"{args.devices} --strategy {args.strategy} --precision "
                        f"{args.precision}): {str(err).splitlines()[0]}") from None
    if folder is not None and trainer.is_global_zero:
        check_writable(folder, "--log_dir")
    return trainer


class ValidateLastEpoch(pl.Callback):
    """Validation after the last epoch whatever the interval, so the final val_loss (and the
    summary) belongs to the final model; `step` is the step of the last validation."""

    step = -1

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def fit(trainer, model, data, ckpt_path=None):
    """trainer.fit, then a validation of the final model if training stopped elsewhere than at
    the end of an epoch that validated (--max_steps)."""
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    last = next((c for c in trainer.callbacks if isinstance(c, ValidateLastEpoch)), None)
    if last is not None and last.step != trainer.global_step:
        trainer.validate(model, datamodule=data, verbose=False)


class FitReference(pl.Callback):
    """The data-matched Gaussian reference, fitted at the start of training on the datamodule's
    reference_data() (a resumed run keeps its checkpoint's); its -log q of the validation data
    is logged as gaussian_val_loss / gaussian_val_bpd, the numbers val_loss and val_bpd must beat,
    and kept in `baseline`. describe(trainer, model, baseline) -> text is printed then (rank 0)."""

    def __init__(self, describe=None):
        self.describe, self.baseline = describe, None

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and trainer.ckpt_path is None:
            pl_module.fit_reference(trainer.datamodule.reference_data())

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        val = trainer.datamodule.val_data().to(pl_module.reference.mean)
        nats = pl_module.reference.nll(val).mean().item()
        self.baseline = {"gaussian_val_loss": nats,
                         "gaussian_val_bpd": utils.nats_to_bpd(nats, pl_module.d)}
        if trainer.logger:
            trainer.logger.log_metrics(self.baseline, step=0)
        if self.describe is not None:
            print(self.describe(trainer, pl_module, self.baseline), flush=True)


class FitProposal(pl.Callback):
    """--fit_proposal N: the model's log-SNR proposal refitted to the model
    (DiffusionModel.fit_proposal) on N training samples at the start of every `every`-th epoch,
    so that the training loss and val_loss are estimated with it. Both stay unbiased (every point
    keeps its exact weight, and the pilot never sees the validation data); a checkpoint carries
    the proposal. The pilot is seeded by (seed, epoch), so every process fits the same one. Logs
    proposal_moved (the mass moved from the logistic) and, on TensorBoard, the proposal's shape."""

    def __init__(self, samples, every, seed=0):
        self.samples, self.every, self.seed = samples, every, seed

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch == 0 or epoch % self.every:  # epoch 0: the model starts at the Gaussian
            return
        x = trainer.datamodule.reference_data()[:self.samples].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        proposal = pl_module.fit_proposal(
            x, generator=t.Generator().manual_seed(self.seed * 100003 + epoch))
        pl_module.train(was_training)
        if not isinstance(proposal, utils.FittedProposal):  # the model is still the Gaussian
            return
        trainer.logger.log_metrics({"proposal_moved": proposal.moved()}, step=trainer.global_step)
        if trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("proposal", viz.plot_proposal(proposal),
                                                 trainer.global_step)


def summarize(trainer, model, curve, baseline, start):
    """The end of a run as a dict: validation E[-log p] beside the Gaussian baseline, where the
    last MSE curve stands against the Gaussian MMSE and what it suggests, where things went."""
    metrics, log_dir = trainer.callback_metrics, trainer.logger.log_dir
    s = dict(epochs=trainer.current_epoch, steps=trainer.global_step,
             wall_time_s=time.time() - start, run_dir=shown_path(log_dir),
             checkpoint=shown_path(trainer.checkpoint_callback.last_model_path),
             best_checkpoint=shown_path(trainer.checkpoint_callback.best_model_path),
             val_nll=float(metrics["val_loss"]), val_nll_stderr=float(metrics["val_loss_stderr"]),
             d=model.d, **baseline)
    if isinstance(model.proposal, utils.FittedProposal):  # --fit_proposal
        s["proposal"] = dict(model.proposal.state(), moved=model.proposal.moved())
    if curve.last is not None:
        c = curve.last
        s.update(suggested_logsnr_loc=c["suggested"][0], suggested_logsnr_scale=c["suggested"][1],
                 curve_below=int((c["mse"] <= c["mmse"]).sum()), curve_points=len(c["logsnrs"]),
                 curve_range=[float(c["logsnrs"][0]), float(c["logsnrs"][-1])])
    return s


def summary_lines(s):
    """The lines of a summarize() dict that both scripts print."""
    lines = [f"{s['epochs']} epochs ({s['steps']} steps) in {s['wall_time_s']:.1f} s",
             f"  validation E[-log p] = {s['val_nll']:.4f} +- {s['val_nll_stderr']:.4f} nats = "
             f"{utils.nats_to_bpd(s['val_nll'], s['d']):.4f} bits/dim",
             f"  (data-matched Gaussian: {s['gaussian_val_loss']:.4f} nats = "
             f"{s['gaussian_val_bpd']:.4f} bits/dim)"]
    if "curve_below" in s:
        lines.append(f"  MSE curve below the Gaussian MMSE at {s['curve_below']} of "
                     f"{s['curve_points']} log SNRs in [{s['curve_range'][0]:.1f}, "
                     f"{s['curve_range'][1]:.1f}]")
        if math.isfinite(s["suggested_logsnr_loc"]) and math.isfinite(s["suggested_logsnr_scale"]):
            lines.append(f"  MSE curve suggests --logsnr_loc {s['suggested_logsnr_loc']:.2f} "
                         f"--logsnr_scale {s['suggested_logsnr_scale']:.2f}")
    if "proposal" in s:
        lines.append(f"  log-SNR proposal fitted to the model: {100 * s['proposal']['moved']:.0f}% "
                     "of the logistic's mass moved")
    return lines + [f"  logs:        {s['run_dir']}", f"  checkpoint:  {s['checkpoint']}",
                    f"  view with:   tensorboard --logdir {os.path.dirname(s['run_dir']) or '.'}"]


def shown_path(path):
    """A path as printed: relative to the working directory when inside it, else absolute."""
    if not path:
        return path
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def check_writable(folder, flag):
    """A UserError unless `folder` exists or can be created, and can be written; the folders the
    check creates are removed again (the run creates its own when it starts)."""
    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as err:
        reason = f"{path} is a file" if not os.path.isdir(path) else err.strerror or str(err)
        raise UserError(f"{flag} {folder} cannot be written: {reason}") from None
    finally:
        for path in created:
            if os.path.isdir(path):
                os.rmdir(path)


class RunSize(pl.Callback):
    """Says how many steps a run takes, and after the first epoch how long it should take."""

    def on_train_start(self, trainer, pl_module):
        self._start = time.time()
        if trainer.is_global_zero:
            print(f"training: {trainer.max_epochs - trainer.current_epoch} epochs of "
                  f"{trainer.num_training_batches} steps, {trainer.estimated_stepping_batches} "
                  "steps in all", flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        epochs = trainer.max_epochs - trainer.current_epoch - 1
        if trainer.is_global_zero and epochs > 0 and not hasattr(self, "_said"):
            self._said = True
            left = (time.time() - self._start) * epochs
            print(f"expected: about {left / 60:.1f} more minutes for the remaining {epochs} "
                  "epochs (without validation)", flush=True)


def resumed_run_dir(checkpoint):
    """The run a checkpoint of RUN/checkpoints/ belongs to, so that a resumed run continues its
    TensorBoard curves and checkpoints there; None for a checkpoint found elsewhere."""
    if not checkpoint:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    run = os.path.dirname(folder)
    in_run = os.path.isfile(os.path.join(run, "hparams.yaml"))
    return run if os.path.basename(folder) == "checkpoints" and in_run else None


def _devices(value):
    """--devices as Lightning takes it: 'auto', a count, or a list like '0,1'."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def load_checkpoint(path, script):
    """A checkpoint written by `script` (its run arguments are saved with it), or a UserError
    saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = t.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...: all mean the same to the user
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}") from None
    saved = ckpt.get("run_args") if isinstance(ckpt, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    if (saved.get("script") != script or not isinstance(ckpt.get("state_dict"), dict)
            or not isinstance(ckpt.get("hyper_parameters"), dict)):
        raise UserError(f"{path} is not a checkpoint written by {script}"
                        + (f" (it comes from {saved['script']})" if saved.get("script")
                           else " (it holds no saved run arguments)"))
    return ckpt


def checkpoint_args(script):
    """path -> the run arguments of a checkpoint `script` wrote (for cli.parse's --resume)."""
    return lambda path: load_checkpoint(path, script)["run_args"]


def model_from_checkpoint(ckpt, denoiser):
    """The trained DiffusionModel of a loaded checkpoint around `denoiser` (rebuilt by the
    script from the checkpoint), in eval mode."""
    model = DiffusionModel(denoiser, **ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)  # a fitted proposal, if it has one
    return model.eval()


def checkpoints_data(args, ckpts, keys, defaults):
    """The run arguments that fix the evaluation data, checked to agree across checkpoints and
    with --dataset; flags left unset take the checkpoints' dataset's defaults."""
    first = {k: ckpts[0]["run_args"].get(k) for k in keys}
    for path, ckpt in zip(args.ckpt[1:], ckpts[1:]):
        other = {k: ckpt["run_args"].get(k) for k in keys}
        if other != first:
            diff = ", ".join(f"{k} {first[k]!r} vs {other[k]!r}" for k in keys if first[k] != other[k])
            raise UserError(f"{args.ckpt[0]} and {path} were trained on different data ({diff}): "
                            "an ensemble needs one data set")
    if args.dataset is not None and args.dataset != first["dataset"]:
        raise UserError(f"--dataset {args.dataset}, but {args.ckpt[0]} was trained on "
                        f"{first['dataset']}")
    for key, value in defaults[first["dataset"]].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return first


def checkpoint_names(paths):
    """Short unique names for the table: RUN/last.ckpt for RUN/checkpoints/last.ckpt."""
    names = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if os.path.basename(folder) == "checkpoints":
            name = f"{os.path.basename(os.path.dirname(folder))}/{name}"
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names


# ---------------------------------------------------------------------------------------------
# Evaluation through the Trainer
# ---------------------------------------------------------------------------------------------
class Evaluation(pl.LightningModule):
    """The evaluation table of trained DiffusionModels as two Trainer.test passes.

    "select" scores every candidate denoiser (the data-matched Gaussian, each model and, for grid
    data, their hard and soft roundings) per log-SNR bin on the selection samples; the ensembles
    and rounding choices follow from those held-out errors. "score" computes every row on the
    scoring samples. Samples are sharded across processes; every draw is named by (seed, sample
    index), and the per-sample values are gathered in index order, so the table is the same for
    any number of processes and any batch size.

    Rows, per model (the Gaussian, each model, their ensemble): continuous, -log p(x); and for
    grid data (delta, lo, levels): discrete limit (a unit change, not a bound), dequantized (an
    upper bound on -log P), and the direct discrete estimate without rounding and with hard or
    soft rounding chosen per log SNR, over a range extended to utils.grid_resolved_logsnr.
    With proposal="fitted" every row's log-SNR importance distribution is fitted to that row's
    integrand from the selection pass's errors (no extra evaluations; utils.FittedProposal).
    """

    def __init__(self, models, names, source, seed=0, npoints=128, batch_size=256,
                 select_fraction=0.5, fit_reference=False, bins=48, vb_steps=100,
                 proposal="fitted"):
        super().__init__()
        if proposal not in ("fitted", "logistic"):
            raise ValueError(f"proposal must be 'fitted' or 'logistic', got {proposal!r}")
        self.proposal = proposal
        self.vb_steps = vb_steps or None
        self.models, self.names, self.source = t.nn.ModuleList(models), list(names), source
        self.seed, self.npoints, self.batch_size, self.bins = seed, npoints, batch_size, bins
        self.select_fraction, self.fit_reference = select_fraction, fit_reference
        self.data, self.phase, self.heldout, self.rows, self.per_sample = None, "select", {}, [], {}
        self.errors = {}  # kind -> the selection samples' errors, samples x bins x candidates

    def prepare_data(self):  # Lightning calls it once per node: downloads
        self.source.prepare_data()

    def setup(self, stage):
        """The data (source.eval_data() -> (x, grid)), split once (seeded) into the selection and
        scoring parts, and the log-SNR bins of the held-out choice."""
        if self.data is not None:
            return
        self.source.setup()
        first = self.models[0]
        if self.fit_reference:  # a pretrained model evaluated as it is: the data-matched Gaussian
            first.fit_reference(self.source.reference_data())
        x, self.grid = self.source.eval_data()
        n_select = int(round(self.select_fraction * len(x)))
        perm = t.randperm(len(x), generator=t.Generator().manual_seed(self.seed))
        if min(n_select, len(x) - n_select) < max(2, self.trainer.world_size):
            raise UserError(f"{len(x)} samples are too few to split into selection and scoring "
                            f"parts for {self.trainer.world_size} process(es)")
        self.data = {"select": x[perm[:n_select]], "score": x[perm[n_select:]]}
        self.gaussian = first.with_denoiser(GaussianDenoiser(first.reference))
        self.edges = {"continuous": bin_edges(first.proposal.range, self.bins)}
        if self.grid is not None:
            top = utils.grid_resolved_logsnr(self.grid[0])
            ranges = [m.proposal.widened(top).range for m in self.models]
            self.edges["discrete"] = bin_edges((min(r[0] for r in ranges),
                                                max(r[1] for r in ranges)), self.bins)
        if self.trainer.is_global_zero:
            select, score = self.evaluations_per_sample()
            print(f"evaluating {len(self.names)} model(s) on {len(x) - n_select} scored samples "
                  f"({n_select} for selection) with {self.trainer.world_size} process(es): "
                  f"{select} + {score} denoiser evaluations per sample, "
                  f"{select * n_select + score * (len(x) - n_select):,} in all", flush=True)

    # -- the candidates and the rows
    def _bases(self, like=None):
        """The Gaussian (`like`'s reference, default the first model's), then the models."""
        return [GaussianDenoiser((like or self.models[0]).reference)] + list(self.models)

    def _candidates(self, kind):
        """(z, a) -> candidate predictions: the bases, then (discrete) their hard and soft roundings."""
        bases = self._bases()
        if kind == "continuous":
            return lambda z, a: [b(z, a) for b in bases]
        delta, lo, levels = self.grid
        hard, soft = (GridRounding(None, delta, mode, lo, levels) for mode in ("hard", "soft"))

        def predict(z, a):
            eps = [b(z, a) for b in bases]
            return (eps + [hard.round_eps(z, a, e) for e in eps]
                    + [soft.round_eps(z, a, e) for e in eps])
        return predict

    def _ensemble(self, kind, columns, like):
        """The Ensemble of the candidate columns, chosen on the held-out errors, as a model with
        `like`'s proposal and reference."""
        bases = self._bases(like)
        modules = bases
        if kind == "discrete":
            delta, lo, levels = self.grid
            modules = bases + [GridRounding(b, delta, mode, lo, levels)
                               for mode in ("hard", "soft") for b in bases]
        return Ensemble.from_heldout([modules[c] for c in columns], self.edges[kind],
                                     self.heldout[kind][columns]).as_model(like)

    def _fitted(self, kind, columns, proposal):
        """`proposal` fitted to the row whose denoiser takes, per log-SNR bin, the held-out best
        of the candidate `columns` (one column: that candidate), from its errors on the selection
        samples: the integrand is 1/2 (error - the Gaussian's) for continuous rows, 1/2 error for
        discrete ones, on the bins within the proposal's range (the logistic part alone covers
        the rest). `proposal` itself where there is nothing to follow (the Gaussian's row), with
        too few selection samples, or where its range holds fewer than half of the bins."""
        edges, (lo, hi) = self.edges[kind].double(), proposal.range
        tol = 1e-9 * (edges[-1] - edges[0]).item()
        inside = ((edges[:-1] >= lo - tol) & (edges[1:] <= hi + tol)).nonzero().squeeze(1)
        too_few = len(self.errors[kind]) < utils.FittedProposal.MIN_SAMPLES
        if self.proposal == "logistic" or too_few or len(inside) < len(edges) // 2:
            return proposal
        errors, columns = self.errors[kind], t.as_tensor(columns)
        chosen = errors[:, t.arange(errors.shape[1]), columns[self.heldout[kind][columns].argmin(0)]]
        terms = 0.5 * (chosen - errors[..., 0]) if kind == "continuous" else 0.5 * chosen
        terms = terms[:, inside]  # the bins within the proposal's range (ranges of models differ)
        bins_range = (max(edges[inside[0]].item(), lo), min(edges[inside[-1] + 1].item(), hi))
        return utils.FittedProposal.from_terms(proposal, terms, bins_range=bins_range)

    def _jobs(self):
        """(model name, estimate, fn(x, index) -> per-sample nats, its log-SNR proposal or
        range) for every computed row."""
        n, seed, grid = len(self.models), self.seed, self.grid
        # (row, model, the bases it may round: columns of the held-out errors)
        entries = [("gaussian", self.gaussian, [0])]
        entries += [(name, m, [1 + i]) for i, (name, m) in enumerate(zip(self.names, self.models))]
        entries.append(("ensemble", self._ensemble("continuous", list(range(n + 1)),
                                                    self.models[0]), list(range(n + 1))))
        jobs = []
        for name, model, bases in entries:
            like = self.models[0] if name in ("gaussian", "ensemble") else model
            fitted = self._fitted("continuous", bases, like.proposal)
            jobs.append((name, "continuous", _continuous(model, self.npoints, seed, fitted),
                         fitted))
            if grid is None:
                continue
            delta, lo, levels = grid
            jobs.append((name, "dequantized", _continuous(model, self.npoints, seed, fitted, delta),
                         fitted))
            plain = model if name != "ensemble" else self._ensemble("discrete", bases, like)
            schedule = self._schedule(like)
            jobs.append((name, "variational bound", _vb(plain, seed, grid, schedule, self.vb_steps),
                         tuple(utils.schedule_logsnr(schedule)[[-1, 0]].tolist())))
            # the rounded rows choose per log SNR among the Gaussian, the bases and their roundings
            wide = like.proposal.widened(utils.grid_resolved_logsnr(delta))
            for k, mode in enumerate(("none", "hard", "soft")):
                columns = bases if mode == "none" else sorted(
                    set([0] + bases + [c + k * (n + 1) for c in bases]))
                row = plain if mode == "none" else self._ensemble("discrete", columns, like)
                fitted = self._fitted("discrete", columns, wide)
                jobs.append((name, "discrete, no rounding" if mode == "none" else
                             f"discrete, {mode} rounding",
                             _discrete(row, self.npoints, seed, grid, fitted), fitted))
        return jobs

    @staticmethod
    def _schedule(model):
        """The T-step schedule of the variational bound: the denoiser's own (a U-Net's), else
        1000 steps linear in log SNR over the model's proposal range."""
        own = getattr(model.model, "alphas_cumprod", None)
        return own if own is not None else utils.logsnr_schedule(*model.proposal.range)

    # -- Lightning hooks
    def test_dataloader(self):
        x = self.data[self.phase]
        shard = range(self.global_rank, len(x), self.trainer.world_size)
        return t.utils.data.DataLoader(_Keyed(x, shard), batch_size=self.batch_size)

    def on_test_epoch_start(self):
        self.parts, self._start = [], time.time()
        if self.phase == "score":
            self.jobs = self._jobs()

    def test_step(self, batch, batch_idx):
        index, x = batch
        if self.phase == "select":
            seed = utils.stream_seed(t.Generator().manual_seed(self.seed + SELECTION_STREAM))
            values = [heldout_errors(self._candidates(kind), x, index, seed, edges).flatten(1)
                      for kind, edges in self.edges.items()]
        else:
            values = [fn(x, index).double().view(-1, 1) for _, _, fn, _ in self.jobs]
        self.parts.append((index, t.cat(values, 1)))
        batches = self.trainer.num_test_batches[0]
        if batch_idx == 0 and batches > 1 and self.trainer.is_global_zero:
            left = (time.time() - self._start) * (batches - 1)
            print(f"{self.phase}: about {left:.0f} s left for this pass", flush=True)

    def on_test_epoch_end(self):
        x = self.data[self.phase]
        values = _gather_rows(self, self.parts, len(x))
        if self.phase == "select":
            start = 0
            for kind, edges in self.edges.items():
                bins = len(edges) - 1
                m = (len(self.models) + 1) * (1 if kind == "continuous" else 3)
                block = values[:, start:start + bins * m].view(len(x), bins, m)
                self.heldout[kind] = block.mean(0).T  # candidates x bins
                self.errors[kind] = block
                start += bins * m
            return
        d, self.rows = self.models[0].d, []
        for j, (name, estimate, _, span) in enumerate(self.jobs):
            self.per_sample[(name, estimate)] = values[:, j]
            self.rows.append(table_row(name, estimate, values[:, j], d, span))
            if estimate == "continuous" and self.grid is not None:
                limit = utils.discrete_limit_nats(values[:, j], self.grid[0], d)
                self.per_sample[(name, "discrete limit")] = limit
                self.rows.append(table_row(name, "discrete limit", limit, d, span))

    def evaluations_per_sample(self):
        """Denoiser evaluations per selection sample and per scored sample (for the log)."""
        n = len(self.models)  # the Gaussian's evaluations cost next to nothing
        select = sum((len(e) - 1) * n for e in self.edges.values())
        per_row = 5 if self.grid is not None else 1  # continuous, dequantized, 3 discrete
        vb = (self.vb_steps or 1000) + 2 if self.grid is not None else 0
        return select, (self.npoints * per_row + vb) * (n + 1)


class _Keyed(t.utils.data.Dataset):
    """(index, x[index]) for the indices of one shard."""

    def __init__(self, x, indices):
        self.x, self.indices = x, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.indices[i], self.x[self.indices[i]]


def _gather_rows(module, parts, n):
    """Every process's (index, values) rows as one (n, k) float64 CPU tensor in index order."""
    index = t.cat([p[0] for p in parts]).to(module.device)
    values = t.cat([p[1] for p in parts]).to(module.device, t.float64)
    if module.trainer.world_size > 1:  # shards differ in size by at most one: pad, then gather
        size = -(-n // module.trainer.world_size)
        index = t.cat([index, index.new_full((size - len(index),), -1)])
        values = t.cat([values, values.new_zeros(size - len(values), values.shape[1])])
        index, values = module.all_gather(index).flatten(0, 1), module.all_gather(values).flatten(0, 1)
    out = t.zeros(n, values.shape[1], dtype=t.float64)
    out[index[index >= 0].cpu()] = values[index >= 0].cpu()
    return out


def _continuous(model, npoints, seed, proposal, dequantize=None):
    """fn(x, index): -log p(x), or with a bin width the dequantized estimate -log p(x + delta
    (U - 1/2)) - d log delta (U named by (seed, index))."""
    def fn(x, index):
        if dequantize is not None:
            x = utils.dequantize(x, dequantize, seed, index)
        nll = model.nll_points(x, npoints, generator=t.Generator().manual_seed(seed), index=index,
                               proposal=proposal)[0]
        return nll if dequantize is None else utils.discrete_limit_nats(nll, dequantize, model.d)
    return fn


def _vb(model, seed, grid, schedule, steps):
    delta, lo, levels = grid

    def fn(x, index):
        return variational_bound(model, x, delta, schedule, lo, levels, steps, index=index,
                                 generator=t.Generator().manual_seed(seed))[0]
    return fn


def _discrete(model, npoints, seed, grid, proposal):
    delta, lo, levels = grid

    def fn(x, index):
        return model.nll_discrete_points(x, delta, npoints, lo=lo, levels=levels, index=index,
                                         generator=t.Generator().manual_seed(seed),
                                         proposal=proposal)[0]
    return fn


MEANING = {  # what each row's number is
    "continuous": "estimate of E[-log p(x)] of the data as they are: an upper bound in expectation "
                  "for the hybrid denoiser (the model over logsnr_range, the Gaussian's optimal "
                  "predictor outside); for grid data it depends on the range's top",
    "discrete limit": "continuous - d log(delta): a change of units, not a bound",
    "dequantized": "upper bound on E[-log P(x)]: the continuous estimate of x + delta (U - 1/2), "
                   "- d log(delta)",
    "discrete": "upper bound on E[-log P(x)]: 1/2 Int E||eps - eps_hat||^2 da over logsnr_range, "
                "the tails in closed form",
    "variational bound": "upper bound on E[-log P(x)]: the -ELBO of the T-step schedule over "
                         "logsnr_range (DDPM's, fixed_small variances, discretised Gaussian "
                         "decoder; timesteps subsampled, unbiased)",
    "exact": "the exact value on the same points",
}


def table_row(model, estimate, nll, d, span=None):
    """A row {model, estimate, nats, nats_stderr, bpd, bpd_stderr, logsnr_range, proposal,
    meaning} from per-sample values: the standard error sqrt(Var_i(nll_i) / N) over the N scored
    samples covers the data and the log-SNR integral together. span: the row's log-SNR proposal
    (its range and kind are reported) or range."""
    proposal = None
    if isinstance(span, utils.LogisticProposal):
        proposal = {"kind": "logistic", "loc": span.loc, "scale": span.scale, "clip": span.clip}
        if isinstance(span, utils.FittedProposal):
            proposal.update(kind="fitted", mix=span.mix, moved=round(span.moved(), 4))
        span = span.range
    logsnr_range = None if span is None else [round(v, 3) for v in span]
    nll = nll.double()
    mean, stderr = nll.mean().item(), utils.stderr_from_sums(nll.sum(), nll.pow(2).sum(), len(nll)).item()
    meaning = MEANING["exact" if model == "exact" else estimate.split(",")[0]]
    return dict(model=model, estimate=estimate, nats=mean, nats_stderr=stderr,
                bpd=utils.nats_to_bpd(mean, d), bpd_stderr=utils.nats_to_bpd(stderr, d),
                logsnr_range=logsnr_range, proposal=proposal, meaning=meaning)


def format_results(rows, header):
    """The table as text: a header line, then one line per (model, estimate) with its log-SNR
    range, then what each kind of estimate means."""
    lines = [header, f"{'model':<24} {'estimate':<26} {'nats':>12} {'+-':>9} {'bits/dim':>9} "
                     f"{'+-':>7}  log SNR"]
    for r in rows:
        span = "" if r["logsnr_range"] is None else "[{:.1f}, {:.1f}]".format(*r["logsnr_range"])
        lines.append(f"{r['model']:<24} {r['estimate']:<26} {r['nats']:12.4f} "
                     f"{r['nats_stderr']:9.4f} {r['bpd']:9.4f} {r['bpd_stderr']:7.4f}  {span}")
    kinds = dict.fromkeys(("exact" if r["model"] == "exact" else r["estimate"].split(",")[0])
                          for r in rows)
    lines += [f"  {kind}: {MEANING[kind]}" for kind in kinds]
    moved = [r["proposal"]["moved"] for r in rows if (r["proposal"] or {}).get("kind") == "fitted"]
    if moved:
        lines.append(f"  log-SNR proposal: {len(moved)} rows use a fitted one ({100 * min(moved):.0f}-"
                     f"{100 * max(moved):.0f}% of the logistic's mass moved; --eval_proposal fitted "
                     "fits each row on the selection samples; unbiased either way)")
    return "\n".join(lines)


def results_path(args, names, results_dir=None):
    """--results, or eval-<first checkpoint's name>.json next to it (in results_dir when there is
    no checkpoint), made unique: an existing file is never overwritten."""
    if args.results:
        path = args.results
    elif args.ckpt:
        stem = os.path.splitext(os.path.basename(args.ckpt[0]))[0]
        path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0])), f"eval-{stem}.json")
    else:
        stem = names[0].replace("/", "-").replace(" ", "_")
        path = os.path.join(results_dir or ".", f"eval-{stem}.json")
    root, ext = os.path.splitext(path)
    k = 2
    while os.path.exists(path):
        path, k = f"{root}-{k}{ext}", k + 1
    return path


def claim_results_file(path):
    """Creates the results file now, empty, so a bad path fails before the evaluation."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "x").close()
    except OSError as err:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        reason = f"{parent} is a file, not a folder" if not os.path.isdir(parent) else (
            err.strerror or str(err))
        raise UserError(f"cannot write the results to {path}: {reason}") from None


def run_evaluation(args, models, names, source, exact_nll=None, info=None, results_dir=None,
                   fit_reference=False):
    """--eval_only for either script: the Evaluation table of `models` on source.eval_data()
    (a datamodule: prepare_data runs once per node), through a Trainer built from the device
    flags; printed and written as JSON by global rank 0 (never over an existing file)."""
    start = time.time()
    trainer = make_trainer(args, inference_mode=True, enable_model_summary=False,
                           enable_checkpointing=False, use_distributed_sampler=False,
                           callbacks=[Interrupted()])
    if type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher":
        raise UserError(f"--strategy {args.strategy}: evaluation keeps its selection between two "
                        "passes, which spawned processes lose; use --strategy ddp (or torchrun, "
                        "SLURM)")
    evaluation = Evaluation(models, names, source, args.seed, args.npoints, args.eval_batch_size,
                            args.select_fraction, fit_reference, vb_steps=args.vb_steps,
                            proposal=args.eval_proposal)
    path = results_path(args, names, results_dir)
    if trainer.is_global_zero:
        claim_results_file(path)
        for ckpt in args.ckpt or []:
            if os.path.basename(ckpt).startswith("best"):
                print(f"warning: {ckpt} was chosen by its validation loss on the images it is "
                      "now scored on, so its numbers are optimistic; last.ckpt is not", flush=True)
    try:
        for phase in ("select", "score"):
            evaluation.phase = phase
            trainer.test(evaluation, verbose=False)
    except BaseException:
        if trainer.is_global_zero and os.path.exists(path):
            os.remove(path)  # nothing half-written stays behind
        raise
    rows, d, x_score, grid = evaluation.rows, models[0].d, evaluation.data["score"], evaluation.grid
    n_select = len(evaluation.data["select"])
    if exact_nll is not None:  # on the same scored points
        rows.insert(0, table_row("exact", "continuous", exact_nll(x_score.cpu()), d))
    header = (f"E[-log p] on {len(x_score)} scored samples: nats per sample and bits/dim; +- is the "
              "standard error over the samples (data and log-SNR integral together)")
    if grid is not None:
        delta, lo, levels = grid
        header += (f"; grid data lo + k delta, lo = {lo:g}, delta = {delta:.5g}, "
                   f"{levels or 'unbounded'} levels")
    results = dict(schema=RESULTS_SCHEMA, **(info or {}), header=header,
                   checkpoints=[os.path.abspath(p) for p in args.ckpt or []],
                   x_shape=list(models[0].x_shape), d=d,
                   npoints=args.npoints, seed=args.seed, select_fraction=args.select_fraction,
                   proposal=args.eval_proposal,
                   n_scored=len(x_score), n_selection=n_select,
                   grid=None if grid is None else dict(zip(("delta", "lo", "levels"), grid)),
                   world_size=trainer.world_size, rows=rows, wall_time_s=time.time() - start)
    if trainer.is_global_zero:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(format_results(rows, header))
        print(f"written to {shown_path(path)}")
    return dict(results, per_sample=evaluation.per_sample, path=path)
