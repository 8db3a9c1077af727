"""The runs both scripts share: `main(family, argv)` parses a script's command line, then trains
(`train`) or evaluates checkpoints (`evaluate`); a `Family` is what a script's runs are made of
(its data, its figures, how it describes a run). Also here: the Trainer built from the flags, run
folders, checkpoints (`load_model`) and the run's summary.
"""
import argparse
import csv
import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable, Optional

import pytorch_lightning as pl
import torch as t
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import callbacks as cb
import cli
import denoisers
import evaluation
import ode
import utils
from callbacks import shown_path
from cli import UserError
from diffusionmodel import DiffusionModel
from proposals import FittedProposal


@dataclasses.dataclass(frozen=True)
class Family:
    """What one script's runs are made of.

    script: the script's file name (checkpoints name it); parse(argv, checkpoint_args) -> args;
    data(args, evaluation) -> a datamodules.Data; data_keys: the run arguments that fix the data;
    callbacks(args, data, curve) -> its figures' callbacks; trainer: Trainer keyword arguments;
    describe(args, trainer, model, values) -> a line printed at the start, or None;
    pretrained(args, data) -> (model, name) evaluated as it is without --ckpt.
    """
    script: str
    parse: Callable
    data: Callable
    data_keys: tuple
    callbacks: Callable = lambda args, data, curve: []
    trainer: dict = dataclasses.field(default_factory=dict)
    describe: Optional[Callable] = None
    pretrained: Optional[Callable] = None


def main(family, argv=None):
    """A script's run from its command line."""
    args = family.parse(argv, checkpoint_args(family.script))
    set_threads(args.num_threads)
    return evaluate(args, family) if args.eval_only else train(args, family)


def set_threads(n):
    """PyTorch's CPU threads for this process, with a warning beyond the cores it may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if n > (cores or n):
        print(f"warning: --num_threads {n} is more than the {cores} cores this process may use; "
              "it will run slower, not faster", file=sys.stderr, flush=True)
    t.set_num_threads(n)


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}  # a full, read-only or forbidden disk: exit status 74 (EX_IOERR)


def run_cli(main):
    """Runs main(); a user error ends with one line on stderr and exit status 2 (with the newest
    complete checkpoint where training wrote one), a file that cannot be written with one line
    naming it, what was kept and how to resume (exit status 74), Ctrl-C or SIGTERM with one line
    saying what was kept (exit status 130 or 143: callbacks.Interrupted). A process group left by
    DDP is closed first: gloo's threads abort the interpreter's exit otherwise."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's
    # Lightning doubts mid-epoch resumes: the training loaders resume exactly themselves
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before")
    cb.Interrupted.message = cb.Interrupted.status = cb.Interrupted.kept = None  # this run's only
    for name in ("pytorch_lightning.utilities.rank_zero",  # Lightning's own lines on Ctrl-C
                 "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(lambda record: not re.search(
            "KeyboardInterrupt|weights_only", record.getMessage()))
    hook = threading.excepthook  # TensorBoard's writer thread: the main thread raises it again
    threading.excepthook = lambda a: type(a.thread).__name__ == "_AsyncWriterThread" or hook(a)
    try:
        main()
    except (SystemExit, KeyboardInterrupt):
        if cb.Interrupted.message is None:
            raise
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            print(cb.Interrupted.message, file=sys.stderr)
        sys.exit(cb.Interrupted.status)
    except Exception as err:
        disk = err
        while disk is not None and not (isinstance(disk, OSError) and disk.errno in DISK_ERRORS):
            disk = disk.__cause__ or disk.__context__  # Lightning wraps a logger's in ValueError
        if os.environ.get("ITD_TRACEBACK") or not (disk or isinstance(err, (
                ValueError, FileNotFoundError, FloatingPointError, UserError))):
            raise  # ITD_TRACEBACK: to tell a bug from a mistake
        if disk is not None:
            where = shown_path(disk.filename) or "the run's TensorBoard files"  # (its thread's)
            print(f"error: cannot write {where}: {disk.strerror}; {cb.kept(command=True)}",
                  file=sys.stderr)
            sys.exit(74)
        print(f"error: {err}" + (f"; {cb.kept()}" if cb.Interrupted.kept else ""), file=sys.stderr)
        sys.exit(2)
    finally:
        threading.excepthook = hook
        if t.distributed.is_available() and t.distributed.is_initialized():
            t.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The Trainer and run folders
# ---------------------------------------------------------------------------------------------
class RunLogger(TensorBoardLogger):
    """TensorBoard logs in log_dir/<run>, or <run>-2, -3, ...: a run never overwrites another.
    The free name is chosen when the folder is first needed, so failed starts leave nothing."""

    def __init__(self, log_dir, run, resume=False):
        super().__init__(log_dir, name="", version=run if resume else None, default_hp_metric=False)
        self.run = run

    def finalize(self, status):
        """Flushed, not closed: what a run writes after trainer.fit (a validation, the figures)
        goes to the same events file; experiment.train closes it."""
        if self._experiment is not None:
            self._experiment.flush()
        if status == "success":
            self.save()

    def _get_next_version(self):
        path, k = self.run, 1
        while os.path.exists(os.path.join(self.root_dir, path)):
            k += 1
            path = f"{self.run}-{k}"
        return path


REFITS = 5  # --fit_proposal refits per run (20 gave the same gaps: docs/2d.md)


def make_trainer(args, script=None, callbacks=(), run=None, **kwargs):
    """A Trainer from the shared flags, or a UserError for settings Lightning rejects; nothing is
    written yet. With `run` (a name, or the folder of a run to resume) it logs to TensorBoard and
    checkpoints the last and the best val_loss into <run>/checkpoints, each with the run's
    arguments, so a checkpoint alone rebuilds its model and data."""
    class RunArgs(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["run_args"] = dict(vars(args), script=script)
            checkpoint["run_dir"] = os.path.abspath(trainer.log_dir)

    logger, folder = False, None
    if run is not None:  # absolute paths: a resumed run's checkpoint folder is the same one
        resume = os.path.isdir(run)
        folder = os.path.dirname(os.path.abspath(run)) if resume else os.path.abspath(args.log_dir)
        logger = RunLogger(folder, os.path.basename(run), True) if resume else RunLogger(folder, run)
        # best-*: lowest val_loss; last.ckpt: the latest model at every validation and at the
        # end, saved after best-* (the newest complete checkpoint: callbacks.Interrupted.kept)
        callbacks = [ModelCheckpoint(monitor="val_loss", filename="best-{epoch}"),
                     ModelCheckpoint(filename="last", enable_version_counter=False),
                     RunArgs(), cb.ValidateLastEpoch(), cb.RunSize(), cb.LogInterval(),
                     cb.SlurmJob(), *callbacks]
        if getattr(args, "fit_proposal", 0):
            callbacks.append(cb.FitProposal(args.fit_proposal, args.num_epochs, REFITS, args.seed))
        callbacks.append(cb.Interrupted())  # the last: it defers stops asked for by the others
    try:
        trainer = pl.Trainer(accelerator=args.accelerator, devices=_devices(args.devices),
                             strategy=args.strategy, num_nodes=args.num_nodes,
                             precision=args.precision, logger=logger,
                             use_distributed_sampler=False,  # datamodules.Data shards itself
                             plugins=[cb.AtomicCheckpointIO()],
                             callbacks=[cb.show_progress(), *callbacks], **kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as err:
        raise UserError(f"cannot set up the Trainer (--accelerator {args.accelerator} --devices "
                        f"{args.devices} --strategy {args.strategy} --precision "
                        f"{args.precision}): {str(err).splitlines()[0]}") from None
    if folder is not None and trainer.is_global_zero:
        check_writable(folder if resume else args.log_dir, "--log_dir")
    return trainer


def _devices(value):
    """--devices as Lightning takes it: 'auto', a count, or a list like '0,1'."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def check_writable(folder, flag):
    """A UserError unless `folder` exists or can be created, and can be written; the folders the
    check creates are removed again."""
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


def resumed_run_dir(checkpoint, recorded=None):
    """The run a checkpoint continues: RUN for a checkpoint in RUN/checkpoints/, else the run
    folder the checkpoint recorded if it is still there; None if neither is."""
    if not checkpoint:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    for run in ([os.path.dirname(folder)] if os.path.basename(folder) == "checkpoints" else []) + [
            recorded]:
        if run and os.path.isfile(os.path.join(run, "hparams.yaml")):
            return run
    return None


def requeued_checkpoint(log_dir, resume=None):
    """In a SLURM job started again after a requeue: the newest checkpoint of the run this job
    trained (callbacks.SlurmJob marked it; under log_dir, or the run its --resume named)."""
    job = cb.slurm_job_id()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT", 0)) < 1:
        return None
    runs = glob.glob(os.path.join(glob.escape(log_dir), "*")) + [resumed_run_dir(resume, None)]
    for mark in [os.path.join(run, cb.SLURM_MARK) for run in runs if run]:
        if not os.path.isfile(mark):
            continue
        with open(mark) as f:
            if f.read().strip() != job:
                continue
        found = glob.glob(os.path.join(glob.escape(os.path.dirname(mark)), "checkpoints", "*.ckpt"))
        if found:
            newest = max(found, key=os.path.getmtime)
            print(f"SLURM job {job} requeued: resuming {shown_path(newest)}", flush=True)
            return newest
    return None


def fit(trainer, model, data, ckpt_path=None):
    """trainer.fit (from a checkpoint whose training is complete: its state restored), then a
    validation of the final model if training stopped elsewhere than at the end of an epoch that
    validated (--max_steps), and its last.ckpt saved. The last validation's metrics are in
    trainer.callback_metrics (a finished run's from its checkpoint)."""
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    last = next(c for c in trainer.callbacks if isinstance(c, cb.ValidateLastEpoch))
    if last.step != trainer.global_step and trainer.global_step > 0:
        if trainer.is_global_zero:
            print(f"validating the final model (step {trainer.global_step})", flush=True)
        trainer.validate(model, datamodule=data, verbose=False)
        checkpoint = trainer.checkpoint_callbacks[1]
        path = os.path.join(checkpoint.dirpath, "last.ckpt")
        trainer.save_checkpoint(path)
        checkpoint.best_model_path = checkpoint.last_model_path = path
    for key, value in last.metrics.items():
        trainer.callback_metrics.setdefault(key, t.tensor(value))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
SCRIPTS = ("train_2d.py", "train_cifar10.py")


def load_checkpoint(path, script=None):
    """A checkpoint written by `script` (by default either script), or a UserError saying what
    is wrong with it."""
    if os.path.isdir(path):
        found = sorted(os.path.relpath(p, path) for p in glob.glob(os.path.join(path, "**", "*.ckpt"),
                                                                     recursive=True))
        raise UserError(f"{path} is a folder, not a checkpoint; "
                        + (f"the checkpoints in it: {', '.join(found)}" if found else
                           "it holds no checkpoints"))
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = t.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...: all mean the same to the user
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}") from None
    saved = ckpt.get("run_args") if isinstance(ckpt, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    if (saved.get("script") not in ((script,) if script else SCRIPTS)
            or not isinstance(ckpt.get("state_dict"), dict)
            or not isinstance(ckpt.get("hyper_parameters"), dict)):
        raise UserError(f"{path} is not a checkpoint written by {script or ' or '.join(SCRIPTS)}"
                        + (f" (it comes from {saved['script']})" if saved.get("script")
                           else " (it holds no saved run arguments)"))
    return ckpt


def load_model(path, script=None):
    """The trained DiffusionModel of a checkpoint either script wrote, in eval mode, on the CPU."""
    return model_from_checkpoint(load_checkpoint(path, script), path)


def model_from_checkpoint(ckpt, path="the checkpoint"):
    """The trained DiffusionModel of a loaded checkpoint (its denoiser rebuilt from its record),
    in eval mode."""
    record = ckpt.get("denoiser")
    try:
        denoiser = denoisers.rebuild(record)  # its errors are prefixed with the path below
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    model = DiffusionModel(denoiser, record=record, **ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)
    return model.eval()


def checkpoint_args(script):
    """path -> the run arguments of a checkpoint `script` wrote (for cli.parse's --resume)."""
    return lambda path: load_checkpoint(path, script)["run_args"]


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
# The summary of a run
# ---------------------------------------------------------------------------------------------
SUMMARY_LINES = ("title", "time", "validation", "gaussian", "exact", "information", "accuracy", "curve",
                 "suggested", "proposal", "contours", "logs", "checkpoint", "figures", "view")


def summarize(trainer, model, curve, values, start):
    """The end of a run as a dict: validation E[-log p] beside the baselines, where the last MSE
    curve stands against the Gaussian MMSE and what it suggests, where things went."""
    metrics, log_dir = trainer.callback_metrics, trainer.logger.log_dir
    s = dict(epochs=trainer.current_epoch, steps=trainer.global_step,
             wall_time_s=time.time() - start, run_dir=shown_path(log_dir),
             checkpoint=shown_path(trainer.checkpoint_callbacks[1].best_model_path
                                   or (cb.Interrupted.kept or ("",))[0]),  # a moved run's
             best_checkpoint=shown_path(trainer.checkpoint_callbacks[0].best_model_path),
             val_nll=float(metrics["val_loss"]), val_nll_stderr=float(metrics["val_loss_stderr"]),
             d=model.d, conditional=model.num_classes is not None, **values)
    if isinstance(model.proposal, FittedProposal):
        s["proposal"] = dict(model.proposal.state(), moved=model.proposal.moved())
    if curve.last is not None:
        c = curve.last
        s.update(suggested_logsnr_loc=c["suggested"][0], suggested_logsnr_scale=c["suggested"][1],
                 curve_below=int((c["mse"] <= c["mmse"]).sum()), curve_points=len(c["logsnrs"]),
                 curve_range=[float(c["logsnrs"][0]), float(c["logsnrs"][-1])])
    return s


def summary_lines(s):
    """The summary as text: its named lines in SUMMARY_LINES order."""
    bpd = utils.nats_to_bpd(s["val_nll"], s["d"])
    given = "(x | y)" if s.get("conditional") else "(x)"
    lines = dict(title=f"\n{s['dataset']}: {s['epochs']} epochs ({s['steps']} steps) in "
                       f"{s['wall_time_s']:.1f} s",
                 time="  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.get("time_s", {}).items()),
                 validation=f"  validation E[-log p{given}] = {s['val_nll']:.4f} +- "
                            f"{s['val_nll_stderr']:.4f} nats = {bpd:.4f} bits/dim",
                 gaussian=f"  (data-matched Gaussian: {s['gaussian_val_loss']:.4f} nats = "
                          f"{s['gaussian_val_bpd']:.4f} bits/dim)",
                 logs=f"  logs:        {shlex.quote(s['run_dir'])}",
                 checkpoint=f"  checkpoint:  {shlex.quote(s['checkpoint'])}",
                 view="  view with:   tensorboard --logdir "
                      f"{shlex.quote(os.path.dirname(s['run_dir']) or '.')}")
    if "val_nll_exact" in s:
        outside = s["exact_outside_support"]
        lines["exact"] = (f"  exact E[-log p{given}] on the validation set = {s['val_nll_exact']:.4f} "
                          f"nats (gap {s['val_nll'] - s['val_nll_exact']:+.4f}"
                          f"{f'; {outside} points outside the support left out' if outside else ''})")
    if "val_mi" in s:
        exact = (f" (exact on these points {s['val_mi_exact']:.4f} +- "
                 f"{s['val_mi_exact_stderr']:.4f})" if "val_mi_exact" in s else "")
        lines["information"] = (f"  pointwise mutual information i(x; y) = {s['val_mi']:.4f} +- "
                                f"{s['val_mi_stderr']:.4f} nats on average{exact};\n    by "
                                f"Bayes' rule, log p(y | x) - log p(y) from p(x | y) alone: "
                                f"{s['val_mi_bayes']:.4f} +- {s['val_mi_bayes_stderr']:.4f}")
        other = (f"Bayes classifier {s['val_accuracy_bayes']:.1%}" if "val_accuracy_bayes" in s
                 else f"LogisticRegression on the pixels {s['val_accuracy_logistic']:.1%}")
        lines["accuracy"] = (f"  classified by log p(y | x): {s['val_accuracy']:.1%} +- "
                             f"{s['val_accuracy_stderr']:.1%} correct ({other}); "
                             f"{s['label_evaluations']} denoiser evaluations per sample")
    if "curve_below" in s:
        lines["curve"] = (f"  MSE curve below the Gaussian MMSE at {s['curve_below']} of "
                          f"{s['curve_points']} log SNRs in [{s['curve_range'][0]:.1f}, "
                          f"{s['curve_range'][1]:.1f}]")
        loc, scale = s["suggested_logsnr_loc"], s["suggested_logsnr_scale"]
        if loc == loc and scale == scale:  # not nan
            lines["suggested"] = f"  MSE curve suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f}"
    if "proposal" in s:
        lines["proposal"] = (f"  log-SNR proposal fitted to the model: "
                             f"{100 * s['proposal']['moved']:.0f}% of the logistic's mass moved")
    if "contour_cells" in s:
        lines["contours"] = (f"  density contours: {s['contour_cells']} cells shown, standard "
                             f"error median {s['contour_stderr_median']:.3f}, max "
                             f"{s['contour_stderr_max']:.3f} nats")
        lines["figures"] = f"  figures:     {shlex.quote(s['figures'])}"
    return "\n".join(lines[k] for k in SUMMARY_LINES if k in lines)


# ---------------------------------------------------------------------------------------------
# The drivers
# ---------------------------------------------------------------------------------------------
def new_model(args, data, denoiser=None, record=None):
    """The DiffusionModel of a run's arguments for the data's samples (and labels), around
    `denoiser` (default: a new one from --denoiser: denoisers.from_args)."""
    if denoiser is None:
        denoiser, record, _ = denoisers.from_args(args, data)
    return DiffusionModel(
        denoiser, x_shape=data.x_shape, learning_rate=args.learning_rate,
        logsnr_loc=args.logsnr_loc, logsnr_scale=args.logsnr_scale, clip=args.clip,
        gaussian_residual=args.gaussian_residual, val_npoints=args.val_npoints,
        lr_schedule=args.lr_schedule, seed=args.seed, num_classes=data.num_classes,
        label_dropout=args.label_dropout, record=record)


def train(args, family):
    """Trains a new run, or resumes one (--resume): TensorBoard logs, checkpoints, figures, and
    the summary printed and written to summary.json (global rank 0, which returns it)."""
    start = time.time()
    args.resume = requeued_checkpoint(args.log_dir, args.resume) or args.resume
    ckpt = load_checkpoint(args.resume, family.script) if args.resume else None
    run = resumed_run_dir(args.resume, ckpt and ckpt.get("run_dir"))
    if ckpt is not None:
        _check_unfinished(ckpt, args, run)
        if run is None and ckpt.get("run_dir"):
            print(f"note: the run folder {shown_path(ckpt['run_dir'])} of {args.resume} no longer "
                  f"exists: the resumed run continues in a new folder under {args.log_dir}",
                  flush=True)
    pl.seed_everything(args.seed, verbose=False)  # before any random initialisation
    data = family.data(args)
    if ckpt is not None:
        _check_missing(data)
        _check_shape(ckpt, data, args.resume)
        data.resumed_steps = ckpt["global_step"]
        model = model_from_checkpoint(ckpt, args.resume).train()
    else:
        model = _check_missing(data, lambda: new_model(args, data))
    if args.fit_proposal and not data.missing():  # the refits draw from the reference data
        data.setup()
        n = min(len(data.train), data.reference_size or len(data.train))
        if args.fit_proposal > n:
            raise UserError(f"argument --fit_proposal: {args.fit_proposal} is more than the {n} "
                            "training samples the refits draw from")
    baselines = cb.Baselines(lambda *a: family.describe and family.describe(args, *a),
                             fit=ckpt is None)
    curve = cb.MSECurve(getattr(args, "curve_samples", 256), seed=args.seed)
    extra = [cb.Labels(args.val_npoints, args.seed, fit=ckpt is None)] if data.num_classes else []
    extra += family.callbacks(args, data, curve)
    timings = cb.Timings(cli.STARTED or start)
    trainer = make_trainer(args, family.script, [baselines, curve, timings, *extra],
                           run=run or f"{data.name}-{args.experiment_name}",
                           max_epochs=args.num_epochs, max_steps=args.max_steps,
                           check_val_every_n_epoch=args.val_every, **family.trainer)
    cb.Interrupted.kept = (args.resume, ckpt["global_step"]) if ckpt else None
    fit(trainer, model, data, args.resume)
    if not trainer.is_global_zero:
        return None
    with cb.final_stage(trainer):  # the end-of-training passes, then the summary
        final = time.time()
        for callback in extra:
            if hasattr(callback, "final"):
                callback.final(trainer, model)
        timings.seconds["final"] = time.time() - final
        s = dict(dataset=data.name, time_s=timings.seconds,
                 **summarize(trainer, model, curve, baselines.values, cli.STARTED or start))
        for callback in extra:
            s.update(getattr(callback, "values", {}), **getattr(callback, "results", {}))
        s["args"] = vars(args)
        print(summary_lines(s), flush=True)
        cli.write_file(os.path.join(trainer.logger.log_dir, "summary.json"), json.dumps(s, indent=1))
        trainer.logger.experiment.close()
    return s


def evaluate(args, family):
    """--eval_only: the evaluation table of the checkpoints (and their ensemble with the
    data-matched Gaussian) on their run's validation data, or on every sample of --data, through
    a Trainer built from the device flags; printed and written as JSON by global rank 0 (never
    over an existing file), every sample's values to --per_sample. Without --ckpt, the family's
    pretrained model as it is."""
    start, scored, files, scored_path = time.time(), None, None, args.data
    if args.ckpt:
        ckpts = [load_checkpoint(path, family.script) for path in args.ckpt]
        run_args = argparse.Namespace(**dict(vars(args), **checkpoints_data(args, ckpts,
                                                                              family.data_keys)))
        models = [model_from_checkpoint(c, p) for c, p in zip(ckpts, args.ckpt)]
        data = family.data(run_args, evaluation=True) if not scored_path else None
        if scored_path:  # every sample of the file scored; the run's own data for the selection
            whole = family.data(argparse.Namespace(**dict(vars(run_args), data=scored_path)),
                                evaluation=True, whole=True)
            whole.setup()
            scored, files = (whole.eval_data()[0], whole.eval_labels()), whole.files
            try:
                data = family.data(run_args, evaluation=True)
            except (FileNotFoundError, ValueError):
                print(f"note: the data {run_args.data or run_args.dataset} the run was trained on "
                      f"is not here: the selection pass uses {scored_path} itself, so the "
                      "ensemble and rounding rows are chosen on the scored samples", flush=True)
                data = whole
        _check_missing(data)
        for c, p in zip(ckpts, args.ckpt):
            _check_shape(c, whole if scored_path else data, p)
        names = checkpoint_names(args.ckpt)
        info = dict(script=family.script, dataset=data.name, scored=scored_path)
        path = evaluation.results_path(args.results, ckpt=args.ckpt[0])
    else:
        data = family.data(args, evaluation=True)
        model, name = _check_missing(data, lambda: family.pretrained(args, data))
        data.prepare_data()
        data.setup()
        models, names = [model.fit_reference(data.reference_data()).eval()], [name]
        info = dict(script=family.script, dataset=data.name, pretrained=args.pretrained)
        path = evaluation.results_path(args.results, name=name, folder=args.log_dir)
    trainer = make_trainer(args, inference_mode=True, enable_model_summary=False,
                           enable_checkpointing=False, callbacks=[cb.Interrupted()])
    if type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher":
        raise UserError(f"--strategy {args.strategy}: evaluation keeps its selection between "
                        "two passes, which spawned processes lose; use --strategy ddp (or "
                        "torchrun, SLURM)")
    ode_settings = ode.settings(args.ode_trace, models[0].d, args.ode_probes,
                                args.ode_tol) if args.ode else None
    ev = evaluation.Evaluation(models, names, data, scored, args.seed, args.npoints,
                               args.eval_batch_size, args.select_fraction, vb_steps=args.vb_steps,
                               proposal=args.eval_proposal, ode=ode_settings,
                               limit=args.eval_samples)
    outputs = [p for p in (path, args.per_sample) if p]
    if trainer.is_global_zero:
        for k, output in enumerate(outputs):
            try:
                evaluation.claim_results_file(output)
            except UserError:  # the files claimed before it are not left behind, empty
                for claimed in outputs[:k]:
                    os.remove(claimed)
                raise
        for ckpt in args.ckpt or []:
            if os.path.basename(ckpt).startswith("best"):
                print(f"warning: {ckpt} was chosen by its validation loss on the samples it "
                      "is now scored on, so its numbers are optimistic; last.ckpt is not",
                      flush=True)
    try:
        with cb.stop_at_once():
            ev.run(trainer)
        results = ev.results(info, args.ckpt or [], time.time() - start)
        if trainer.is_global_zero:  # the table first: a disk that fails the files keeps it
            print(evaluation.format_results(results["rows"], results["header"]), flush=True)
            cb.Interrupted.kept = "the table above is complete; nothing was written"
            cli.write_file(path, json.dumps(results, indent=1))
            if args.per_sample:
                header, rows = evaluation.per_sample_table(ev, files)
                cli.write_file(args.per_sample, _csv([header, *rows]))
    except BaseException:
        if trainer.is_global_zero:
            for output in outputs:  # nothing half-written stays behind
                if os.path.exists(output):
                    os.remove(output)
        raise
    if trainer.is_global_zero:
        print(f"written to {shown_path(path)}"
              + (f"; every sample's values to {shown_path(args.per_sample)}" if args.per_sample else ""))
    return dict(results, per_sample=ev.per_sample, path=path)


def _csv(rows):
    with tempfile.SpooledTemporaryFile(mode="w+", newline="") as f:
        csv.writer(f).writerows(rows)
        f.seek(0)
        return f.read()


def _check_unfinished(ckpt, args, run):
    """A UserError if the checkpoint to resume holds the whole run and the run its summary; if
    only the summary is missing, a line saying that the resume finishes the run."""
    epochs = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    if epochs < args.num_epochs and not 0 < args.max_steps <= ckpt["global_step"]:
        return
    if not (run and os.path.isfile(os.path.join(run, "summary.json"))):
        print(f"training is complete ({ckpt['global_step']} steps): finishing the run with its "
              "end-of-training passes, figures and summary", flush=True)
    else:
        raise UserError(f"already finished: {args.resume} holds all {epochs} epochs "
                        f"({ckpt['global_step']} steps) of its run; evaluate it with "
                        f"--eval_only --ckpt {shlex.quote(args.resume)}")


def _check_shape(ckpt, data, path):
    shape = tuple(ckpt["hyper_parameters"]["x_shape"])
    if shape != tuple(data.x_shape):
        raise UserError(f"{path} was trained on samples of shape {shape}; {data.name}'s are "
                        f"{tuple(data.x_shape)}")


def _check_missing(data, build=None):
    """A UserError if the data is neither here nor to be downloaded; else build()'s result.
    build (the model, whose weights may be missing too) is tried either way, so that one error
    names every missing input, a line each."""
    problem = data.missing()
    if not problem:
        return build() if build is not None else None
    try:
        if build is not None:
            build()
    except (UserError, ValueError) as err:
        raise UserError(f"{problem}\nerror: {err}") from None
    raise UserError(problem)


def checkpoints_data(args, ckpts, keys):
    """The run arguments that fix the evaluation data, checked to agree across checkpoints and
    with --dataset."""
    def saved(ckpt):
        return {k: ckpt["run_args"].get(k) for k in keys}
    first = saved(ckpts[0])
    for path, ckpt in zip(args.ckpt[1:], ckpts[1:]):
        other = saved(ckpt)
        if other != first:
            diff = ", ".join(f"{k} {first[k]!r} vs {other[k]!r}" for k in keys if first[k] != other[k])
            raise UserError(f"{args.ckpt[0]} and {path} were trained on different data ({diff}): "
                            "an ensemble needs one data set")
    if args.dataset is not None and args.dataset != first["dataset"]:
        raise UserError(f"--dataset {args.dataset}, but {args.ckpt[0]} was trained on "
                        f"{first['dataset'] or first.get('data')}")
    run_args = ckpts[0]["run_args"]
    for key, value in run_args.items():  # the settings the run was trained with
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return first
