"""The runs both scripts share: `main(family, argv)` parses, then trains or evaluates; the Trainer,
run folders, checkpoints (`load_model`), summaries. A `Family` makes a script: docs/extending.md."""
import argparse
import ctypes
import dataclasses
import errno
import glob
import itertools
import json
import logging
import os
import pathlib
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
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
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

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}  # a full, read-only or forbidden disk: exit status 74 (EX_IOERR)
REFITS = 5  # --fit_proposal refits per run (20 gave the same gaps: docs/2d.md)
SCRIPTS = ("train_2d.py", "train_cifar10.py")


@dataclasses.dataclass(frozen=True)
class Family:
    """What one script's runs are made of."""
    script: str  # the script's file name (checkpoints name it)
    parse: Callable  # (argv, checkpoint_args) -> args
    data: Callable  # (args, evaluation) -> a datamodules.Data
    data_keys: tuple  # the run arguments that fix the data
    callbacks: Callable = lambda args, data, curve: []  # (args, data, curve) -> figures' callbacks
    trainer: dict = dataclasses.field(default_factory=dict)  # Trainer keyword arguments
    describe: Callable = lambda *a: None  # (args, trainer, model, values) -> a line at the start
    pretrained: Optional[Callable] = None  # (args, data) -> (model, name) without --ckpt


def main(family, argv=None):
    """A script's run from its command line."""
    args = family.parse(argv, lambda path: load_checkpoint(path, family.script)["run_args"])
    set_threads(args.num_threads)
    count_gpus_directly()
    return evaluate(args, family) if args.eval_only else train(args, family)


def set_threads(n):
    """PyTorch's CPU threads for this process, with a warning beyond the cores it may use."""
    if n > (cores := cli.available_cores()):
        print(f"warning: --num_threads {n} is more than the {cores} cores this process may use; "
              "it will run slower, not faster", file=sys.stderr, flush=True)
    t.set_num_threads(n)


def count_gpus_directly():
    """Where NVML cannot load, torch's GPU count without it (no retry per count: docs/runs.md)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:  # torch counts with the CUDA runtime either way: the same answer
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def end_process():
    """Ends a finished run's process at once, its output flushed (why: docs/runs.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_cli(main):
    """Runs main(): a mistake, disk error or stop ends in one line, an exit status: docs/runs.md."""
    # Lightning's: a deprecation; doubts about mid-epoch resumes (the loaders resume exactly)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)|You're "
                            "resuming from a checkpoint that ended before")
    cb.Interrupted.message = cb.Interrupted.status = cb.Interrupted.kept = None  # this run's only
    for name in ("pytorch_lightning.utilities.rank_zero",  # Lightning's lines on Ctrl-C; its ads
                 "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(lambda record: not re.search(
            "KeyboardInterrupt|weights_only|litlogger", record.getMessage()))
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
        if t.distributed.is_available() and t.distributed.is_initialized():  # else gloo's
            t.distributed.destroy_process_group()  # threads abort the interpreter's exit


class RunLogger(TensorBoardLogger):
    """Logs in log_dir/<run> or <run>-2, -3, ...: the first free name, taken when first needed."""

    def __init__(self, log_dir, run, resume=False):
        super().__init__(log_dir, name="", version=run if resume else None, default_hp_metric=False)
        self.run = run

    def finalize(self, status):
        if self._experiment is not None:
            self._experiment.flush()  # not closed: train() writes after trainer.fit
        if status == "success":
            self.save()

    def _get_next_version(self):
        names = itertools.chain([self.run], (f"{self.run}-{k}" for k in itertools.count(2)))
        return next(n for n in names if not os.path.exists(os.path.join(self.root_dir, n)))


def make_trainer(args, script=None, callbacks=(), run=None, **kwargs):
    """A Trainer from the shared flags, or a UserError for settings Lightning rejects. With `run`
    (a name, or a folder to resume) it logs and checkpoints (last, best val_loss) to <run>/."""
    run_args = pl.callbacks.LambdaCallback(on_save_checkpoint=lambda trainer, _, ckpt: ckpt.update(
        run_args=dict(vars(args), script=script), run_dir=os.path.abspath(trainer.log_dir)))
    logger, folder, devices = False, None, args.devices
    if run is not None:  # absolute paths: a resumed run's checkpoint folder is the same one
        resume = os.path.isabs(run)  # a resumed run's folder (resumed_run_dir), not a new name
        folder = os.path.dirname(os.path.abspath(run)) if resume else os.path.abspath(args.log_dir)
        logger = RunLogger(folder, os.path.basename(run) if resume else run, resume)
        # last.ckpt: every validation and the end, saved after best-* (the newest: Interrupted.kept)
        callbacks = [ModelCheckpoint(monitor="val_loss", filename="best-{epoch}"),
                     ModelCheckpoint(filename="last", enable_version_counter=False),
                     run_args, cb.ValidateLastEpoch(), cb.LogInterval(),
                     cb.SlurmJob(), *callbacks]
        if getattr(args, "fit_proposal", 0):
            callbacks.append(cb.FitProposal(args.fit_proposal, args.num_epochs, REFITS, args.seed))
        callbacks.append(cb.Interrupted())  # the last: it defers stops asked for by the others
    progress = TQDMProgressBar() if sys.stdout.isatty() else cb.LineProgress()  # a log: lines
    try:
        trainer = pl.Trainer(accelerator=args.accelerator, strategy=args.strategy,
                             devices=int(devices) if str(devices).isdigit() else devices,
                             num_nodes=args.num_nodes, precision=args.precision, logger=logger,
                             use_distributed_sampler=False,  # datamodules.Data shards itself
                             plugins=[cb.AtomicCheckpointIO()],
                             callbacks=[progress, *callbacks], **kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as err:
        raise UserError(f"cannot set up the Trainer (--accelerator {args.accelerator} --devices "
                        f"{args.devices} --strategy {args.strategy} --precision "
                        f"{args.precision}): {str(err).splitlines()[0]}") from None
    if folder is not None and trainer.is_global_zero:
        check_writable(folder if resume else args.log_dir, "--log_dir")
    return trainer


def check_writable(folder, flag):
    """A UserError unless `folder` can be (created and) written; what the check creates goes."""
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
    """The existing run a checkpoint continues: RUN of RUN/checkpoints/*.ckpt, else `recorded`."""
    if not checkpoint:
        return None
    folder = os.path.dirname(os.path.abspath(checkpoint))
    runs = [os.path.dirname(folder)] if os.path.basename(folder) == "checkpoints" else []
    return next((run for run in runs + [recorded]
                 if run and os.path.isfile(os.path.join(run, "hparams.yaml"))), None)


def requeued_checkpoint(log_dir, resume=None):
    """In a requeued SLURM job: the newest checkpoint of the run it trained (callbacks.SlurmJob)."""
    job = cb.slurm_job_id()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT", 0)) < 1:
        return None
    runs = glob.glob(os.path.join(glob.escape(log_dir), "*")) + [resumed_run_dir(resume)]
    for run in filter(None, runs):
        mark = pathlib.Path(run, cb.SLURM_MARK)
        found = glob.glob(os.path.join(glob.escape(run), "checkpoints", "*.ckpt"))
        if mark.is_file() and mark.read_text().strip() == job and found:
            newest = max(found, key=os.path.getmtime)
            print(f"SLURM job {job} requeued: resuming {shown_path(newest)}", flush=True)
            return newest
    return None


def fit(trainer, model, data, ckpt_path=None):
    """trainer.fit, then, if it stopped between validations (--max_steps), a validation and
    last.ckpt; the last validation's metrics end up in trainer.callback_metrics."""
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


def load_checkpoint(path, script=None):
    """A checkpoint written by `script` (default: either), or a UserError saying what is wrong."""
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join("**", "*.ckpt"), root_dir=path, recursive=True))
        raise UserError(f"{path} is a folder, not a checkpoint; " + (
            f"the checkpoints in it: {', '.join(found)}" if found else "it holds no checkpoints"))
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = t.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...: all mean the same to the user
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}") from None
    saved = ckpt.get("run_args") if isinstance(ckpt, dict) else None
    written = saved.get("script") if isinstance(saved, dict) else None
    if written not in ((script,) if script else SCRIPTS) or not all(
            isinstance(ckpt.get(key), dict) for key in ("state_dict", "hyper_parameters")):
        raise UserError(f"{path} is not a checkpoint written by {script or ' or '.join(SCRIPTS)}"
                        + (f" (it comes from {written})" if written
                           else " (it holds no saved run arguments)"))
    return ckpt


def load_model(path):
    """The trained DiffusionModel of a checkpoint either script wrote, in eval mode, on the CPU."""
    return model_from_checkpoint(load_checkpoint(path), path)


def model_from_checkpoint(ckpt, path):
    """The trained DiffusionModel of a loaded checkpoint, its denoiser rebuilt, in eval mode."""
    record = ckpt.get("denoiser")
    try:
        denoiser = denoisers.rebuild(record)  # its errors are prefixed with the path below
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    model = DiffusionModel(denoiser, record=record, **ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)
    return model.eval()


def checkpoint_names(paths):
    """Short unique names for the table: RUN/last.ckpt for RUN/checkpoints/last.ckpt."""
    names = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if os.path.basename(folder) == "checkpoints":
            name = f"{os.path.basename(os.path.dirname(folder))}/{name}"
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names


def summarize(trainer, model, curve, values, start):
    """The end of a run as a dict: validation E[-log p], baselines, the last MSE curve, paths."""
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
    if (c := curve.last) is not None:
        s.update(suggested_logsnr_loc=c["suggested"][0], suggested_logsnr_scale=c["suggested"][1],
                 curve_below=int((c["mse"] <= c["mmse"]).sum()), curve_points=len(c["logsnrs"]),
                 curve_range=[float(c["logsnrs"][0]), float(c["logsnrs"][-1])])
    return s


def summary_lines(s):
    """The summary as text."""
    bpd = utils.nats_to_bpd(s["val_nll"], s["d"])
    given = "(x | y)" if s.get("conditional") else "(x)"
    lines = [f"\n{s['dataset']}: {s['epochs']} epochs ({s['steps']} steps) in "
             f"{s['wall_time_s']:.1f} s",
             "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.get("time_s", {}).items()),
             f"  validation E[-log p{given}] = {s['val_nll']:.4f} +- {s['val_nll_stderr']:.4f} "
             f"nats = {bpd:.4f} bits/dim",
             f"  (data-matched Gaussian: {s['gaussian_val_loss']:.4f} nats = "
             f"{s['gaussian_val_bpd']:.4f} bits/dim)"]
    if "val_nll_exact" in s:
        outside = s["exact_outside_support"]
        lines.append(f"  exact E[-log p{given}] on the validation set = {s['val_nll_exact']:.4f} "
                     f"nats (gap {s['val_nll'] - s['val_nll_exact']:+.4f}"
                     f"{f'; {outside} points outside the support left out' if outside else ''})")
    if "val_mi" in s:
        exact = (f" (exact on these points {s['val_mi_exact']:.4f} +- "
                 f"{s['val_mi_exact_stderr']:.4f})" if "val_mi_exact" in s else "")
        other = (f"Bayes classifier {s['val_accuracy_bayes']:.1%}" if "val_accuracy_bayes" in s
                 else f"LogisticRegression on the pixels {s['val_accuracy_logistic']:.1%}")
        lines += [f"  pointwise mutual information i(x; y) = {s['val_mi']:.4f} +- "
                  f"{s['val_mi_stderr']:.4f} nats on average{exact};\n    by Bayes' rule, "
                  f"log p(y | x) - log p(y) from p(x | y) alone: {s['val_mi_bayes']:.4f} +- "
                  f"{s['val_mi_bayes_stderr']:.4f}",
                  f"  classified by log p(y | x): {s['val_accuracy']:.1%} +- "
                  f"{s['val_accuracy_stderr']:.1%} correct ({other}); "
                  f"{s['label_evaluations']} denoiser evaluations per sample"]
        h = s["label_entropy"]  # I(X; Y) is in [0, H(Y)]; a mean 2 errors outside it is the model's
        if any(not -2 * s[k + "_stderr"] <= s[k] <= h + 2 * s[k + "_stderr"]
               for k in ("val_mi", "val_mi_bayes")):
            lines.append(f"  note: I(X; Y) lies in [0, H(Y) = {h:.4f}] nats; a mean outside it "
                         "says the two bounds' gaps differ or p(y | x) is confidently wrong "
                         "(docs/conditional.md)")
    if "curve_below" in s:
        lines.append(f"  MSE curve below the Gaussian MMSE at {s['curve_below']} of "
                     f"{s['curve_points']} log SNRs in [{s['curve_range'][0]:.1f}, "
                     f"{s['curve_range'][1]:.1f}]")
        loc, scale = s["suggested_logsnr_loc"], s["suggested_logsnr_scale"]
        if loc == loc and scale == scale:  # not nan
            lines.append(f"  MSE curve suggests --logsnr_loc {loc:.2f} --logsnr_scale {scale:.2f}")
    if "proposal" in s:
        lines.append(f"  log-SNR proposal fitted to the model: "
                     f"{100 * s['proposal']['moved']:.0f}% of the logistic's mass moved")
    if "contour_cells" in s:
        lines.append(f"  density contours: {s['contour_cells']} cells shown, standard error median "
                     f"{s['contour_stderr_median']:.3f}, max {s['contour_stderr_max']:.3f} nats")
    lines += [f"  logs:        {shlex.quote(s['run_dir'])}",
              f"  checkpoint:  {shlex.quote(s['checkpoint'])}"]
    if "contour_cells" in s:
        lines.append(f"  figures:     {shlex.quote(s['figures'])}")
    return "\n".join(lines + ["  view with:   tensorboard --logdir "
                              f"{shlex.quote(os.path.dirname(s['run_dir']) or '.')}"])


def new_model(args, data):
    """The DiffusionModel of a run's arguments for the data, its denoiser a new --denoiser."""
    denoiser, record, _ = denoisers.from_args(args, data)
    keys = ("learning_rate", "logsnr_loc", "logsnr_scale", "clip", "gaussian_residual",
            "val_npoints", "lr_schedule", "seed", "label_dropout")
    return DiffusionModel(denoiser, x_shape=data.x_shape, num_classes=data.num_classes,
                          record=record, **{key: getattr(args, key) for key in keys})


def train(args, family):
    """Trains or resumes a run; rank 0 prints, writes (summary.json) and returns its summary."""
    start = time.time()
    args.resume = requeued_checkpoint(args.log_dir, args.resume) or args.resume
    ckpt = load_checkpoint(args.resume, family.script) if args.resume else None
    run = resumed_run_dir(args.resume, ckpt and ckpt.get("run_dir"))
    if ckpt is not None:
        epochs = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        if epochs >= args.num_epochs or 0 < args.max_steps <= ckpt["global_step"]:
            if run and os.path.isfile(os.path.join(run, "summary.json")):
                raise UserError(f"already finished: {args.resume} holds all {epochs} epochs "
                                f"({ckpt['global_step']} steps) of its run; evaluate it with "
                                f"--eval_only --ckpt {shlex.quote(args.resume)}")
            print(f"training is complete ({ckpt['global_step']} steps): finishing the run with "
                  "its end-of-training passes, figures and summary", flush=True)
        if run is None and ckpt.get("run_dir"):
            print(f"note: the run folder {shown_path(ckpt['run_dir'])} of {args.resume} no longer "
                  f"exists: the resumed run continues in a new folder under {args.log_dir}",
                  flush=True)
    pl.seed_everything(args.seed, verbose=False)  # before any random initialisation
    data = family.data(args)
    model = _check_missing(data, lambda: model_from_checkpoint(ckpt, args.resume).train()
                           if ckpt else new_model(args, data))
    if ckpt is not None:
        _check_shape(ckpt, data, args.resume)
        data.resumed_steps = ckpt["global_step"]
    if args.fit_proposal and not data.missing():  # the refits draw from the reference data
        data.setup()
        n = min(len(data.train), data.reference_size or len(data.train))
        if args.fit_proposal > n:
            raise UserError(f"argument --fit_proposal: {args.fit_proposal} is more than the {n} "
                            "training samples the refits draw from")
    baselines = cb.Baselines(lambda *a: family.describe(args, *a), fit=ckpt is None)
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
    with cb.stop_at_once(trainer):  # the end-of-training passes, then the summary
        final = time.time()
        for callback in filter(lambda c: hasattr(c, "final"), extra):
            callback.final(trainer, model)
        timings.seconds["final"] = time.time() - final
        s = dict(dataset=data.name, time_s=timings.seconds,
                 **summarize(trainer, model, curve, baselines.values, cli.STARTED or start))
        for callback in extra:
            s.update(getattr(callback, "values", {}), **getattr(callback, "results", {}))
        s["args"] = vars(args)
        print(summary_lines(s), flush=True)
        cli.write_file(os.path.join(trainer.logger.log_dir, "summary.json"),
                       json.dumps(s, indent=1))
        trainer.logger.experiment.close()
    return s


def evaluate(args, family):
    """--eval_only: the table (docs/evaluation.md) of --ckpt or the pretrained model, written."""
    start, scored, files, scored_path = time.time(), None, None, args.data
    if args.ckpt:
        ckpts = [load_checkpoint(path, family.script) for path in args.ckpt]
        run_args = argparse.Namespace(**dict(vars(args), **checkpoints_data(args, ckpts,
                                                                              family.data_keys)))
        models = [model_from_checkpoint(c, p) for c, p in zip(ckpts, args.ckpt)]
        if scored_path:  # every sample of the file scored; the run's own data for the selection
            whole = family.data(argparse.Namespace(**dict(vars(run_args), data=scored_path)),
                                evaluation=True, whole=True)
            whole.setup()
            scored, files = (whole.eval_data()[0], whole.val_labels), whole.files
        try:
            data = family.data(run_args, evaluation=True)
        except (FileNotFoundError, ValueError):
            if not scored_path:
                raise
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
    claimed = []  # the output files this process created: removed unless complete
    try:
        if trainer.is_global_zero:
            for output in filter(None, (path, args.per_sample)):
                evaluation.claim_results_file(output)
                claimed.append(output)
            for ckpt in (p for p in args.ckpt or [] if os.path.basename(p).startswith("best")):
                print(f"warning: {ckpt} was chosen by its validation loss on the samples it is "
                      "now scored on, so its numbers are optimistic; last.ckpt is not", flush=True)
        with cb.stop_at_once():
            ev.run(trainer)
        results = ev.results(info, args.ckpt or [], time.time() - start)
        if trainer.is_global_zero:  # the table first: a disk that fails the files keeps it
            print(evaluation.format_results(results["rows"], results["header"]), flush=True)
            cb.Interrupted.kept = "the table above is complete; nothing was written"
            cli.write_file(path, json.dumps(results, indent=1))
            if args.per_sample:
                cli.write_file(args.per_sample, evaluation.per_sample_csv(ev, files))
    except BaseException:
        for output in claimed:
            pathlib.Path(output).unlink(missing_ok=True)
        raise
    if trainer.is_global_zero:
        print(f"written to {shown_path(path)}" + (
            f"; every sample's values to {shown_path(args.per_sample)}" if args.per_sample else ""))
    return dict(results, per_sample=ev.per_sample, path=path)


def _check_shape(ckpt, data, path):
    shape = tuple(ckpt["hyper_parameters"]["x_shape"])
    if shape != tuple(data.x_shape):
        raise UserError(f"{path} was trained on samples of shape {shape}; {data.name}'s are "
                        f"{tuple(data.x_shape)}")


def _check_missing(data, build=lambda: None):
    # one error names every missing input: build() (the model, its weights too) is tried either way
    if not (problem := data.missing()):
        return build()
    try:
        build()
    except (UserError, ValueError) as err:
        raise UserError(f"{problem}\nerror: {err}") from None
    raise UserError(problem)


def checkpoints_data(args, ckpts, keys):
    """The checkpoints' run arguments `keys` (must agree); args' None flags take the first's."""
    first, *others = [{k: ckpt["run_args"].get(k) for k in keys} for ckpt in ckpts]
    for path, other in zip(args.ckpt[1:], others):
        if other != first:
            diff = ", ".join(f"{k} {first[k]!r} vs {other[k]!r}"
                             for k in keys if first[k] != other[k])
            raise UserError(f"{args.ckpt[0]} and {path} were trained on different data ({diff}): "
                            "an ensemble needs one data set")
    if args.dataset is not None and args.dataset != first["dataset"]:
        raise UserError(f"--dataset {args.dataset}, but {args.ckpt[0]} was trained on "
                        f"{first['dataset'] or first.get('data')}")
    vars(args).update({k: v for k, v in ckpts[0]["run_args"].items()
                       if getattr(args, k, None) is None})  # the settings the run was trained with
    return first
