"""The runs both scripts share: an `Experiment` owns training, the evaluation of checkpoints and
the error path; a script subclasses it with its data, its denoiser and its figures (its flags and
DEFAULTS live at the script's top, cli.py parses them). Also here: the Trainer built from the
flags, run folders, checkpoints and the run's summary."""
import argparse
import functools
import glob
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch as t
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import callbacks as cb
import evaluation
import ode
import utils
import viz
from callbacks import shown_path
from cli import UserError
import unet
from denoisers import MLPDenoiser
from diffusionmodel import DiffusionModel
from proposals import FittedProposal


def run_cli(main):
    """Runs main(); a user error ends with one line on stderr and exit status 2, Ctrl-C or SIGTERM
    with one line saying what was kept (exit status 130 or 143: callbacks.Interrupted). A process
    group left by DDP is closed first: gloo's threads abort the interpreter's exit otherwise."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's
    # Lightning's doubt about mid-epoch resumes: the training loaders resume exactly themselves
    # (datasets.Sharded.train_loader)
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before")
    cb.Interrupted.message = cb.Interrupted.status = None  # a run's own interruption only
    # Lightning's own lines on Ctrl-C: ours (callbacks.Interrupted) says what was kept
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
        if cb.Interrupted.message is None:
            raise
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            print(cb.Interrupted.message, file=sys.stderr)
        sys.exit(cb.Interrupted.status)
    finally:
        if t.distributed.is_available() and t.distributed.is_initialized():
            t.distributed.destroy_process_group()


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


REFITS = 20  # --fit_proposal refits per run


def make_trainer(args, script=None, callbacks=(), run=None, **kwargs):
    """A Trainer from the shared flags, or a UserError for settings Lightning rejects; nothing is
    written yet. With `run` (a name, or the folder of a run to resume) it logs to TensorBoard and
    checkpoints the best val_loss and the last epoch into <run folder>/checkpoints, each with the
    run's arguments ("run_args"), so a checkpoint alone rebuilds its model and data; with
    --fit_proposal, callbacks.FitProposal refits the log-SNR proposal during training."""
    class RunArgs(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["run_args"] = dict(vars(args), script=script)
            checkpoint["run_dir"] = os.path.abspath(trainer.log_dir)

    logger, folder = False, None
    if run is not None:  # absolute paths: a resumed run's checkpoint folder is the same one
        resume = os.path.isdir(run)
        folder = os.path.dirname(os.path.abspath(run)) if resume else os.path.abspath(args.log_dir)
        logger = RunLogger(folder, os.path.basename(run), True) if resume else RunLogger(folder, run)
        # last.ckpt: the latest model at every validation (save_last=True would follow only
        # improvements of val_loss); best-*.ckpt: the lowest val_loss
        callbacks = [ModelCheckpoint(filename="last", enable_version_counter=False),
                     ModelCheckpoint(monitor="val_loss", filename="best-{epoch}"),
                     RunArgs(), cb.ValidateLastEpoch(), cb.Interrupted(), cb.RunSize(),
                     cb.LogInterval(), cb.SlurmJob(), *callbacks]
        if getattr(args, "fit_proposal", 0):
            callbacks.append(cb.FitProposal(args.fit_proposal, args.num_epochs, REFITS, args.seed))
    try:
        trainer = pl.Trainer(accelerator=args.accelerator, devices=_devices(args.devices),
                             strategy=args.strategy, num_nodes=args.num_nodes,
                             precision=args.precision, logger=logger,
                             use_distributed_sampler=False,  # the datamodules shard (datasets.Sharded)
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
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


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


def resumed_run_dir(checkpoint, recorded=None):
    """The run a checkpoint continues, so that a resumed run continues its TensorBoard curves and
    checkpoints there: RUN for a checkpoint in RUN/checkpoints/, else the run folder the
    checkpoint recorded (`recorded`) if it is still there; None if neither is."""
    if not checkpoint:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    for run in ([os.path.dirname(folder)] if os.path.basename(folder) == "checkpoints" else []) + [
            recorded]:
        if run and os.path.isfile(os.path.join(run, "hparams.yaml")):
            return run
    return None


def requeued_checkpoint(log_dir, resume=None):
    """In a SLURM job started again after a requeue (SLURM_RESTART_COUNT > 0): the newest
    checkpoint of the run this job trained (callbacks.SlurmJob marked it; a run under log_dir,
    or the one the job's own --resume named), to resume from; None otherwise."""
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
    """trainer.fit, then a validation of the final model if training stopped elsewhere than at
    the end of an epoch that validated (--max_steps)."""
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    last = next((c for c in trainer.callbacks if isinstance(c, cb.ValidateLastEpoch)), None)
    if last is not None and last.step != trainer.global_step:
        trainer.validate(model, datamodule=data, verbose=False)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
SCRIPTS = ("train_2d.py", "train_cifar10.py")


def load_checkpoint(path, script=None):
    """A checkpoint written by `script` (by default either script; its run arguments are saved
    with it), or a UserError saying what is wrong with it."""
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


def rebuild_denoiser(state_dict, prefix="model.", where=None):
    """The denoiser a DiffusionModel state dict holds, from the architecture it saved (the 2-D
    MLP's or the U-Net's extra state), with random weights; if it saved none, None, or with
    `where` (the checkpoint's name) a UserError."""
    state = state_dict.get(prefix + "_extra_state")
    if isinstance(state, dict) and "mlp" in state:
        return MLPDenoiser(**state["mlp"])
    if isinstance(state, dict) and "unet_config" in state:
        return unet.from_state_dict(state_dict, prefix)
    if where is not None:
        raise UserError(f"{where} does not say how to rebuild its denoiser (written before "
                        "denoisers saved their architecture: load it through its script)")
    return None


def load_model(path, script=None):
    """The trained DiffusionModel of a checkpoint either script wrote (or `script` alone), in
    eval mode, on the CPU."""
    ckpt = load_checkpoint(path, script)
    return model_from_checkpoint(ckpt, rebuild_denoiser(ckpt["state_dict"], where=path))


def model_from_checkpoint(ckpt, denoiser):
    """The trained DiffusionModel of a loaded checkpoint around `denoiser` (its architecture, with
    any weights), in eval mode."""
    model = DiffusionModel(denoiser, **ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)  # a fitted proposal, if it has one
    return unet.with_fallback(model).eval()


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
# The summary's lines in the order they print; a script adds its own by name (Experiment.summary)
SUMMARY_LINES = ("title", "validation", "gaussian", "exact", "information", "accuracy", "curve",
                 "suggested", "proposal", "contours", "logs", "checkpoint", "figures", "view")


def summarize(trainer, model, curve, values, start):
    """The end of a run as a dict: validation E[-log p] beside the baselines (callbacks.Baselines:
    the Gaussian's, the exact one where known), where the last MSE curve stands against the
    Gaussian MMSE and what it suggests, where things went."""
    metrics, log_dir = trainer.callback_metrics, trainer.logger.log_dir
    s = dict(epochs=trainer.current_epoch, steps=trainer.global_step,
             wall_time_s=time.time() - start, run_dir=shown_path(log_dir),
             checkpoint=shown_path(trainer.checkpoint_callbacks[0].best_model_path),
             best_checkpoint=shown_path(trainer.checkpoint_callbacks[1].best_model_path),
             val_nll=float(metrics["val_loss"]), val_nll_stderr=float(metrics["val_loss_stderr"]),
             d=model.d, **values)
    if isinstance(model.proposal, FittedProposal):  # --fit_proposal
        s["proposal"] = dict(model.proposal.state(), moved=model.proposal.moved())
    if curve.last is not None:
        c = curve.last
        s.update(suggested_logsnr_loc=c["suggested"][0], suggested_logsnr_scale=c["suggested"][1],
                 curve_below=int((c["mse"] <= c["mmse"]).sum()), curve_points=len(c["logsnrs"]),
                 curve_range=[float(c["logsnrs"][0]), float(c["logsnrs"][-1])])
    return s


def summary_lines(s, extra=None):
    """The summary as text: the named lines of a summarize() dict and the script's `extra` ones,
    in SUMMARY_LINES order (names it does not know go before the paths)."""
    bpd = utils.nats_to_bpd(s["val_nll"], s["d"])
    given = "(x | y)" if "val_mi" in s else ""  # a conditional model's val_loss is -log p(x | y)
    lines = dict(title=f"\n{s['dataset']}: {s['epochs']} epochs ({s['steps']} steps) in "
                       f"{s['wall_time_s']:.1f} s",
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
        exact = s["val_nll_exact"]
        lines["exact"] = (f"  exact value on the validation set = {exact:.4f} nats (gap "
                          f"{s['val_nll'] - exact:+.4f}"
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
    lines.update(extra or {})
    order = list(SUMMARY_LINES)
    order[order.index("logs"):order.index("logs")] = [k for k in lines if k not in order]
    return "\n".join(lines[k] for k in order if k in lines)


# ---------------------------------------------------------------------------------------------
# The experiment: one driver per mode
# ---------------------------------------------------------------------------------------------
class Experiment:
    """The runs of one script. `main(argv)` parses the command line and either trains (`train`)
    or evaluates checkpoints (`evaluate`, --eval_only). A script subclasses it and provides:

    - `script`, `parse_args` (its command line: cli.parse with its DEFAULTS), `defaults` (those
      DEFAULTS), `data_keys` (the run arguments that fix its evaluation data) and `older` (values
      of flags its checkpoints may predate);
    - `data(args, evaluation)`: its LightningDataModule (a datasets.DataSource);
    - `denoiser(args, data)`: a new denoiser (a checkpoint's is rebuilt from the architecture
      it saved, rebuild_denoiser, or for older ones from its run arguments);
    - optionally `prepare`, `callbacks` (its figures), `trainer_kwargs`, `describe`, `summary`
      (its lines, by name) and `pretrained` (a model evaluated without a checkpoint).
    """

    script = None
    parse_args = None
    defaults = {}
    data_keys = ("dataset", "seed")
    older = {}

    # -- what a script provides
    def data(self, args, evaluation=False):
        raise NotImplementedError

    def denoiser(self, args, data):
        raise NotImplementedError

    def rebuild(self, ckpt, where="the checkpoint"):
        """The checkpoint's denoiser, with random weights; for a script with `older` defaults,
        a checkpoint from before denoisers saved their architecture gets the one its run
        arguments build."""
        if not self.older:
            return rebuild_denoiser(ckpt["state_dict"], where=where)
        denoiser = rebuild_denoiser(ckpt["state_dict"])
        return denoiser or self.denoiser(argparse.Namespace(**dict(self.older, **ckpt["run_args"])),
                                         None)

    def prepare(self, args):
        """Process settings, before anything else."""

    def callbacks(self, args, data, curve):
        return []

    def trainer_kwargs(self, args):
        return {}

    def describe(self, args, trainer, model, values):
        return None

    def summary(self, args, s):
        """Extra summary keys (added to s) and lines {name: text}."""
        return {}

    def pretrained(self, args, data):
        """(model, name) evaluated as it is when --eval_only has no --ckpt."""
        raise NotImplementedError

    # -- the drivers
    def main(self, argv=None):
        args = self.parse_args(argv, checkpoint_args(self.script))
        self.prepare(args)
        return self.evaluate(args) if args.eval_only else self.train(args)

    def model(self, args, denoiser, data):
        """The DiffusionModel of a run's arguments around `denoiser`, for the data's samples (and
        labels, for a conditional run)."""
        return unet.with_fallback(DiffusionModel(
            denoiser, x_shape=data.x_shape, learning_rate=args.learning_rate,
            logsnr_loc=args.logsnr_loc, logsnr_scale=args.logsnr_scale, clip=args.clip,
            gaussian_residual=args.gaussian_residual, val_npoints=args.val_npoints,
            lr_schedule=args.lr_schedule, seed=args.seed, num_classes=data.num_classes,
            label_dropout=args.label_dropout))

    def from_checkpoint(self, ckpt, data, path):
        """The trained model of a loaded checkpoint, in eval mode, checked against the data."""
        _check_shape(ckpt, data, path)
        return model_from_checkpoint(ckpt, self.rebuild(ckpt, path))

    def train(self, args):
        """Trains a new run, or resumes one (--resume): TensorBoard logs, checkpoints, figures, and
        the summary printed and written to summary.json (global rank 0, which returns it)."""
        start = time.time()
        # a requeued job continues where it stopped, also when its command resumes an older point
        args.resume = requeued_checkpoint(args.log_dir, args.resume) or args.resume
        ckpt = load_checkpoint(args.resume, self.script) if args.resume else None
        run = resumed_run_dir(args.resume, ckpt and ckpt.get("run_dir"))
        if ckpt is not None:
            _check_unfinished(ckpt, args)
            if run is None and ckpt.get("run_dir"):
                print(f"note: the run folder {shown_path(ckpt['run_dir'])} of {args.resume} no longer "
                      f"exists: the resumed run continues in a new folder under {args.log_dir}",
                      flush=True)
        run = run or f"{args.dataset}-{args.experiment_name}"
        pl.seed_everything(args.seed, verbose=False)  # before any random initialisation
        data = self.data(args)
        if ckpt is not None:
            _check_shape(ckpt, data, args.resume)
            data.resumed_steps = ckpt["global_step"]
        model = self.model(args, self.rebuild(ckpt, args.resume) if ckpt else self.denoiser(args, data),
                           data)
        baselines = cb.Baselines(functools.partial(self.describe, args), fit=ckpt is None)
        curve = viz.MSECurve(getattr(args, "curve_samples", 256), seed=args.seed)
        labels = [cb.Labels(args.val_npoints, args.seed, fit=ckpt is None)] if data.num_classes else []
        trainer = make_trainer(
            args, self.script, [baselines, curve, *labels, *self.callbacks(args, data, curve)],
            run=run,
            max_epochs=args.num_epochs, check_val_every_n_epoch=args.val_every,
            **self.trainer_kwargs(args))
        fit(trainer, model, data, args.resume)
        if not trainer.is_global_zero:
            return None
        values = dict(baselines.values, **(labels[0].values if labels else {}))
        s = dict(dataset=args.dataset, **summarize(trainer, model, curve, values, start))
        extra = self.summary(args, s)
        s["args"] = vars(args)
        with open(os.path.join(trainer.logger.log_dir, "summary.json"), "w") as f:
            json.dump(s, f, indent=1)
        print(summary_lines(s, extra))
        return s

    def evaluate(self, args):
        """--eval_only: the evaluation table of the checkpoints (and their ensemble with the
        data-matched Gaussian) on their run's validation data, through a Trainer built from the
        device flags; printed and written as JSON by global rank 0 (never over an existing file).
        Without --ckpt, the script's pretrained model as it is."""
        start = time.time()
        if args.ckpt:
            ckpts = [load_checkpoint(path, self.script) for path in args.ckpt]
            saved = checkpoints_data(args, ckpts, self.data_keys, self.defaults, self.older)
            data = self.data(argparse.Namespace(**dict(vars(args), **saved)), evaluation=True)
            _check_data(data)
            models = [self.from_checkpoint(c, data, p) for c, p in zip(ckpts, args.ckpt)]
            names, info = checkpoint_names(args.ckpt), dict(script=self.script,
                                                            dataset=saved["dataset"])
            path = evaluation.results_path(args.results, ckpt=args.ckpt[0])
        else:
            data = self.data(args, evaluation=True)
            _check_data(data)
            model, name = self.pretrained(args, data)
            models, names = [model.eval()], [name]
            info = dict(script=self.script, dataset=args.dataset, pretrained=args.pretrained)
            path = evaluation.results_path(args.results, name=name, folder=args.log_dir)
        trainer = make_trainer(args, inference_mode=True, enable_model_summary=False,
                               enable_checkpointing=False,
                               callbacks=[cb.Interrupted()])
        if type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher":
            raise UserError(f"--strategy {args.strategy}: evaluation keeps its selection between "
                            "two passes, which spawned processes lose; use --strategy ddp (or "
                            "torchrun, SLURM)")
        ode_settings = ode.settings(args.ode_trace, models[0].d, args.ode_probes,
                                    args.ode_tol) if args.ode else None
        ev = evaluation.Evaluation(models, names, data, args.seed, args.npoints,
                                   args.eval_batch_size, args.select_fraction,
                                   fit_reference=not args.ckpt, vb_steps=args.vb_steps,
                                   proposal=args.eval_proposal, ode=ode_settings)
        if trainer.is_global_zero:
            evaluation.claim_results_file(path)
            for ckpt in args.ckpt or []:
                if os.path.basename(ckpt).startswith("best"):
                    print(f"warning: {ckpt} was chosen by its validation loss on the samples it "
                          "is now scored on, so its numbers are optimistic; last.ckpt is not",
                          flush=True)
        try:
            with cb.stop_at_once():
                ev.run(trainer)
        except BaseException:
            if trainer.is_global_zero and os.path.exists(path):
                os.remove(path)  # nothing half-written stays behind
            raise
        results = ev.results(info, args.ckpt or [], time.time() - start)
        if trainer.is_global_zero:
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            print(evaluation.format_results(results["rows"], results["header"]))
            print(f"written to {shown_path(path)}")
        return dict(results, per_sample=ev.per_sample, path=path)


def _check_unfinished(ckpt, args):
    """A UserError if the checkpoint to resume holds the whole run already."""
    epochs = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    max_steps = getattr(args, "max_steps", -1)
    if epochs >= args.num_epochs or 0 < max_steps <= ckpt["global_step"]:
        raise UserError(f"already finished: {args.resume} holds all {epochs} epochs "
                        f"({ckpt['global_step']} steps) of its run; evaluate it with "
                        f"--eval_only --ckpt {shlex.quote(args.resume)}")


def _check_shape(ckpt, data, path):
    shape = tuple(ckpt["hyper_parameters"]["x_shape"])
    if shape != tuple(data.x_shape):
        raise UserError(f"{path} was trained on samples of shape {shape}; {data.name}'s are "
                        f"{tuple(data.x_shape)}")


def _check_data(data):
    """A UserError if the data is neither here nor to be downloaded (datasets.Images.missing)."""
    problem = data.missing() if hasattr(data, "missing") else None
    if problem:
        raise UserError(problem)


def checkpoints_data(args, ckpts, keys, defaults, older=None):
    """The run arguments that fix the evaluation data (`older` for checkpoints that predate one),
    checked to agree across checkpoints and with --dataset; flags left unset take the
    checkpoints' dataset's defaults."""
    def saved(ckpt):
        return {k: ckpt["run_args"].get(k, (older or {}).get(k)) for k in keys}
    first = saved(ckpts[0])
    for path, ckpt in zip(args.ckpt[1:], ckpts[1:]):
        other = saved(ckpt)
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
