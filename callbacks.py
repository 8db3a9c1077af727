"""Lightning callbacks of a training run besides the figures (viz.py): the reference values the
model must beat, the log-SNR proposal refitted during training, the progress display, the run's
size and the last validation, and what Ctrl-C keeps."""
import contextlib
import os
import shlex
import signal
import sys
import time

import pytorch_lightning as pl
import torch as t
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

import datasets
import utils
import viz
from proposals import FittedProposal


class Baselines(pl.Callback):
    """The numbers val_loss must be read against. At the start of training the data-matched
    Gaussian reference is fitted on the datamodule's reference_data() (fit=False: a resumed run
    keeps its checkpoint's); its -log q of the validation data is logged as gaussian_val_loss /
    gaussian_val_bpd. Where the data's density is known (datasets.DataSource), the exact value of
    what val_loss estimates on the same validation points, E[-log p(x)] (E[-log p(x | y)] for a
    conditional model), is logged as val_loss_exact beside every val_loss (points outside the
    support, -log p = +inf, are left out and counted). All kept in `values`;
    describe(trainer, model, values) -> text is printed at the start (rank 0)."""

    def __init__(self, describe=None, fit=True):
        self.describe, self.fit, self.values = describe, fit, {}

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.fit:  # not on a resume (trainer.ckpt_path is not set yet)
            pl_module.fit_reference(trainer.datamodule.reference_data())
        data = trainer.datamodule
        given = data.num_classes and datasets.exact_labels(data, data.val_data(), data.val_labels)
        nll = given[0] if given else data.exact_nll(data.val_data())
        if nll is not None:
            finite = nll.isfinite()
            self.values.update(val_nll_exact=float(nll[finite].mean()),
                               exact_outside_support=int((~finite).sum()))

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        val = trainer.datamodule.val_data().to(pl_module.reference.mean)
        nats = pl_module.reference.nll(val).mean().item()
        self.values.update(gaussian_val_loss=nats, gaussian_val_bpd=utils.nats_to_bpd(nats, pl_module.d))
        if trainer.logger:
            trainer.logger.log_metrics({k: self.values[k] for k in ("gaussian_val_loss",
                                                                     "gaussian_val_bpd")}, step=0)
        text = self.describe and self.describe(trainer, pl_module, self.values)
        if text:
            print(text, flush=True)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val_nll_exact" in self.values:
            pl_module.log("val_loss_exact", self.values["val_nll_exact"], sync_dist=True)


class Labels(pl.Callback):
    """A conditional model at the end of training, on the validation samples and labels, from
    one pass over every label and none on the same points (DiffusionModel.label_terms): the mean
    pointwise mutual information i(x; y) (as mi_points; and by Bayes' rule, log p(y | x) -
    log p(y), from the conditional densities alone) and the accuracy of classifying by
    log p(y | x) (as class_log_posterior), each with its standard error over the
    samples, beside the same numbers of the data's exact densities where known (the Bayes
    classifier) or, for images, of scikit-learn's LogisticRegression on the training pixels.
    The log prior is the training labels' frequencies (fitted at the start). All to TensorBoard
    and `values` (the summary); global rank 0."""

    def __init__(self, npoints, seed=0, chunk=1024, fit=True):
        self.npoints, self.seed, self.chunk, self.fit, self.values = npoints, seed, chunk, fit, {}

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.fit:  # not on a resume
            pl_module.fit_label_prior(trainer.datamodule.train_labels)

    @t.no_grad()
    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        data, was_training = trainer.datamodule, pl_module.training
        pl_module.eval()
        x, y = data.val_data().to(pl_module.device, pl_module.dtype), data.val_labels.to(pl_module.device)
        k, index = pl_module.hparams.num_classes, t.arange(len(x), device=x.device)
        labels = t.arange(-1, k, device=x.device)  # no label, then 0 .. k-1
        terms = t.cat([pl_module.label_terms(xs, labels, self.npoints, seed=utils.derive_seed(
            self.seed, 0x4C), index=i).mean(1) for xs, i in zip(x.split(self.chunk),
                                                                  index.split(self.chunk))])
        posterior = pl_module.label_log_posterior(terms[:, 1:])
        mi = (terms[:, 0] - terms[:, 1:].gather(1, y[:, None])[:, 0]).cpu()
        correct = (posterior.argmax(1) == y).double().cpu()
        by_bayes = (posterior.gather(1, y[:, None])[:, 0] - pl_module.label_log_prior[y]).cpu()
        v = dict(val_mi=mi.mean().item(), val_mi_stderr=_stderr(mi),
                 val_mi_bayes=by_bayes.mean().item(), val_mi_bayes_stderr=_stderr(by_bayes),
                 val_accuracy=correct.mean().item(), val_accuracy_stderr=_stderr(correct),
                 label_evaluations=self.npoints * (k + 1))
        exact = datasets.exact_labels(data, x.cpu(), y.cpu())
        if exact is not None:  # the exact densities: the exact i(x; y), the Bayes classifier
            v.update(val_mi_exact=exact[1].mean().item(), val_mi_exact_stderr=_stderr(exact[1]),
                     val_accuracy_bayes=exact[2].mean().item())
        else:
            from sklearn.linear_model import LogisticRegression
            pixels = data.reference_data().flatten(1).numpy()
            fit = LogisticRegression(max_iter=2000).fit(pixels,
                                                        data.train_labels[:len(pixels)].numpy())
            v["val_accuracy_logistic"] = float(fit.score(x.flatten(1).cpu().numpy(), y.cpu().numpy()))
        self.values = v
        if trainer.logger:
            trainer.logger.log_metrics(v, step=trainer.global_step)
        pl_module.train(was_training)


def _stderr(v):
    return (v.var() / len(v)).sqrt().item()


class FitProposal(pl.Callback):
    """--fit_proposal N: the model's log-SNR proposal refitted to the model
    (DiffusionModel.fit_proposal) on N training samples at the start of `refits` epochs spread
    evenly over the run's E (epochs round(k E / (refits + 1)), k = 1 .. refits: exactly
    `refits` when E > refits, every epoch but the first otherwise), so that the training loss and
    val_loss are estimated with it. Both stay unbiased (every point keeps its exact weight, and
    the pilot never sees the validation data); a checkpoint carries the proposal. The pilot is
    seeded by (seed, epoch), so every process fits the same one. Logs proposal_moved (the mass
    moved from the logistic) at every refit and, on TensorBoard, the last one's shape."""

    def __init__(self, samples, epochs, refits, seed=0):
        self.samples, self.seed = samples, seed
        self.epochs = sorted({round(k * epochs / (refits + 1)) for k in range(1, refits + 1)}
                             & set(range(1, epochs)))  # epoch 0: the model starts at the Gaussian

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        x = trainer.datamodule.reference_data()[:self.samples].to(pl_module.device, pl_module.dtype)
        was_training = pl_module.training
        pl_module.eval()
        proposal = pl_module.fit_proposal(x, seed=utils.derive_seed(self.seed, epoch))
        pl_module.train(was_training)
        if not isinstance(proposal, FittedProposal):  # the model is still the Gaussian
            return
        trainer.logger.log_metrics({"proposal_moved": proposal.moved()}, step=trainer.global_step)
        last = epoch == self.epochs[-1]  # a figure costs more than a refit: the last one's
        if last and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("proposal", viz.plot_proposal(proposal),
                                                 trainer.global_step)


class LogInterval(pl.Callback):
    """Trainer(log_every_n_steps) capped at an epoch's steps, so that short epochs log too."""

    def setup(self, trainer, pl_module, stage):  # after the data's setup, before the loops'
        steps = len(trainer.datamodule.train) // trainer.datamodule.batch_size
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))


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


class RunSize(pl.Callback):
    """Says how many steps a run takes, and after the first epoch how long the rest should take
    (from the time per step, so a run resumed mid-epoch estimates right)."""

    def on_train_start(self, trainer, pl_module):
        self._start, self._step, self._said = time.time(), trainer.global_step, False
        if trainer.is_global_zero:
            left = trainer.estimated_stepping_batches - trainer.global_step
            print(f"training: {trainer.max_epochs - trainer.current_epoch} epochs of "
                  f"{trainer.num_training_batches} steps, {left} steps to go of "
                  f"{trainer.estimated_stepping_batches}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        done, left = trainer.global_step - self._step, trainer.estimated_stepping_batches - trainer.global_step
        if trainer.is_global_zero and done > 0 and left > 0 and not self._said:
            self._said = True
            seconds = (time.time() - self._start) / done * left
            print(f"expected: about {seconds / 60:.1f} more minutes for the remaining {left} "
                  "steps (without validation)", flush=True)


class Interrupted(pl.Callback):
    """Ctrl-C or SIGTERM (what batch systems send before they kill): during training the state of
    the exact step is saved to <run>/checkpoints/interrupted.ckpt, and experiment.run_cli ends
    with one line (global rank 0) naming it and the command that resumes, exit status 130 (Ctrl-C)
    or 143 (SIGTERM); during an evaluation nothing is written."""

    message, status, log_dir = None, None, None

    def on_train_start(self, trainer, pl_module):
        self.log_dir = trainer.log_dir  # rank 0's, shared with every process

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            Interrupted.status, cause = 130, "interrupted"
        elif isinstance(exception, SIGTERMException):
            Interrupted.status, cause = 143, "stopped by SIGTERM"
        else:
            return
        if self.log_dir is None:
            Interrupted.message = f"{cause}: nothing was written"
            return
        path = os.path.join(self.log_dir, "checkpoints", "interrupted.ckpt")
        trainer.save_checkpoint(path)
        argv, skip = [], False  # the command as given, resuming from the checkpoint
        for word in sys.argv[1:]:
            if skip or word == "--resume" or word.startswith("--resume="):
                skip = word == "--resume"
                continue
            argv.append(word)
        command = shlex.join(["python", sys.argv[0], *argv, "--resume", shown_path(path)])
        Interrupted.message = (f"{cause} at epoch {trainer.current_epoch + 1}, step "
                               f"{trainer.global_step}: kept {shlex.quote(shown_path(path))}; resume with "
                               f"{command}")


@contextlib.contextmanager
def stop_at_once():
    """SIGTERM stops an evaluation at once (it has nothing to keep): Lightning's own handler
    waits for the end of a batch, minutes of work, and lets the last batch finish. Lightning
    calls this handler after its own; the exception ends the run as Interrupted says."""
    def stop(signum, frame):
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class SlurmJob(pl.Callback):
    """Under SLURM (Lightning's SLURMEnvironment requeues a job on its signal, SIGUSR1): the run
    folder is marked with the job's id, so that the requeued job, started again with the same
    command, continues this run (experiment.requeued_checkpoint), and Lightning's requeue
    checkpoint (hpc_ckpt_N.ckpt) is saved into <run>/checkpoints."""

    def on_train_start(self, trainer, pl_module):
        job = slurm_job_id()
        if job is None:
            return
        folder = os.path.join(trainer.log_dir, "checkpoints")
        trainer._default_root_dir = folder  # where Lightning's requeue handler saves
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(trainer.log_dir, SLURM_MARK), "w") as f:
                f.write(job)


SLURM_MARK = "slurm_job_id"  # the file in a run folder naming the SLURM job that trains it


def slurm_job_id():
    """The id of the SLURM job this process runs in (array jobs: JOB_TASK), or None."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def shown_path(path):
    """A path as printed: relative to the working directory when inside it, else absolute."""
    if not path:
        return path
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


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
