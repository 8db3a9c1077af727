"""Every Lightning callback of a run: what the model is read against, proposal refits, the MSE
curve and figures (drawn by viz.py), the run's size and time, progress, and what Ctrl-C keeps."""
import contextlib
import math
import os
import shlex
import signal
import sys
import time

import pytorch_lightning as pl
import torch as t
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

import cli
import estimators as est
import proposals
import utils
import viz
from proposals import FittedProposal

LABEL_SEED = 0x4C  # names the end-of-training label pass's points apart from validation's
SLURM_MARK = "slurm_job_id"  # the file in a run folder naming the SLURM job that trains it


def tensorboard(trainer):
    """Global rank 0's TensorBoard writer, or None (another process or logger)."""
    if trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
        return trainer.logger.experiment


class _Saved(pl.Callback):
    saved = ()  # the attributes that travel in checkpoints

    def state_dict(self):
        return {k: getattr(self, k) for k in self.saved}

    def load_state_dict(self, state):
        self.__dict__.update({k: state[k] for k in self.saved if k in state})


class Baselines(pl.Callback):
    """What val_loss is read against (`values`, logged): the Gaussian's, the exact if known."""

    def __init__(self, describe=None, fit=True):
        self.describe, self.fit, self.values = describe, fit, {}

    def setup(self, trainer, pl_module, stage):
        data = trainer.datamodule
        if stage == "fit" and self.fit:  # fit=False: a resumed run keeps its own
            pl_module.fit_reference(data.reference_data(), data.reference_labels())
        given = data.num_classes and data.exact_labels(data.val_data(), data.val_labels)
        nll = given[0] if given else data.exact_nll(data.val_data())  # -log p(x | y) with labels
        if nll is not None:  # points outside the support are counted apart
            finite = nll.isfinite()
            self.values.update(val_nll_exact=float(nll[finite].mean()),
                               exact_outside_support=int((~finite).sum()))

    def on_fit_start(self, trainer, model):
        if not trainer.is_global_zero:
            return
        val = trainer.datamodule.val_data().to(model.reference.mean)
        nats = model.reference.nll(val).mean().item()
        gaussian = dict(gaussian_val_loss=nats, gaussian_val_bpd=utils.nats_to_bpd(nats, model.d))
        self.values.update(gaussian)
        trainer.logger.log_metrics(gaussian, step=0)
        if text := self.describe and self.describe(trainer, model, self.values):
            print(text, flush=True)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val_nll_exact" in self.values:
            pl_module.log("val_loss_exact", self.values["val_nll_exact"], sync_dist=True)


class Labels(pl.Callback):
    """A conditional model's end-of-training pass (`values`): mean i(x; y) and the accuracy."""

    def __init__(self, npoints, seed=0, fit=True):
        self.npoints, self.seed, self.fit, self.values = npoints, seed, fit, {}

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.fit:
            pl_module.fit_label_prior(trainer.datamodule.train_labels)

    @t.no_grad()
    def final(self, trainer, model):
        data, was_training = trainer.datamodule, model.training
        model.eval()
        x, y = data.val_data().to(model.device, model.dtype), data.val_labels.to(model.device)
        print(f"labels: scoring {len(x)} validation samples under every label", flush=True)
        stats = label_pass(model, x, self.npoints, utils.derive_seed(self.seed, LABEL_SEED), y)
        mi, bayes, correct = (stats[k][0].cpu() for k in ("information", "bayes", "correct"))
        v = dict(_means(val_mi=mi, val_mi_bayes=bayes, val_accuracy=correct),
                 label_evaluations=self.npoints * (1 + model.num_classes),
                 label_entropy=t.special.entr(model.label_log_prior.exp()).sum().item())
        if (exact := data.exact_labels(x.cpu(), y.cpu())) is not None:
            v.update(_means(val_mi_exact=exact[1]), val_accuracy_bayes=exact[2].mean().item())
        else:
            from sklearn.linear_model import LogisticRegression
            pixels = data.reference_data().flatten(1).numpy()
            fit = LogisticRegression(max_iter=2000).fit(pixels, data.reference_labels().numpy())
            v["val_accuracy_logistic"] = fit.score(x.flatten(1).cpu().numpy(), y.cpu().numpy())
        self.values = v
        trainer.logger.log_metrics(v, step=trainer.global_step)
        model.train(was_training)


def label_pass(model, x, npoints, seed, y=None, chunk=1024):
    """estimators.label_statistics of a conditional model on x (labels y, or every label)."""
    labels = t.arange(-1, model.num_classes, device=x.device)
    parts = zip(x.split(chunk), t.arange(len(x), device=x.device).split(chunk))
    terms = t.cat([est.label_terms(model, model.reference, model.proposal, xs, labels, npoints,
                                   seed=seed, index=i) for xs, i in parts])
    return est.label_statistics(terms, model.label_log_prior, y)


def _means(**values):  # {name: the mean of the values, name_stderr: its standard error}
    return {key: mean for name, v in values.items() for key, mean in (
        (name, v.mean().item()), (f"{name}_stderr", (v.var() / len(v)).sqrt().item()))}


class FitProposal(pl.Callback):
    """--fit_proposal N: the proposal refitted on N training samples `refits` times (maths.md)."""

    def __init__(self, samples, epochs, refits, seed=0):
        self.samples, self.seed, self.seconds = samples, seed, 0.  # seconds spent refitting
        self.epochs = sorted({round(k * epochs / (refits + 1)) for k in range(1, refits + 1)}
                             & set(range(1, epochs)))  # epoch 0: the model starts at the Gaussian

    def on_train_epoch_start(self, trainer, pl_module):
        if (epoch := trainer.current_epoch) not in self.epochs:
            return
        started, was_training = time.perf_counter(), pl_module.training
        x = trainer.datamodule.reference_data()[:self.samples].to(pl_module.device, pl_module.dtype)
        proposal = pl_module.eval().fit_proposal(x, seed=utils.derive_seed(self.seed, epoch))
        pl_module.train(was_training)
        self.seconds += time.perf_counter() - started
        if not isinstance(proposal, FittedProposal):  # the model is still the Gaussian
            return
        trainer.logger.log_metrics({"proposal_moved": proposal.moved()}, step=trainer.global_step)
        if epoch == self.epochs[-1] and (board := tensorboard(trainer)):  # costs more than a refit
            board.add_figure("proposal", viz.plot_proposal(proposal), trainer.global_step)


class Timings(pl.Callback):
    """Where a run's wall time goes (`seconds`); says how many steps the run takes and, after its
    first epoch, how long the rest should take."""

    def __init__(self, started):
        self.started = started
        self.seconds = dict.fromkeys(("start-up", "steps", "validation", "refits", "final"), 0.)

    def on_train_start(self, trainer, pl_module):
        self.train_started, self.step, self.said = time.time(), trainer.global_step, False
        self.seconds["start-up"] = self.train_started - self.started
        if trainer.is_global_zero:
            total = trainer.estimated_stepping_batches
            print(f"training: {trainer.max_epochs - trainer.current_epoch} epochs of "
                  f"{trainer.num_training_batches} steps, {total - trainer.global_step} steps to "
                  f"go of {total}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        done = trainer.global_step - self.step
        left = trainer.estimated_stepping_batches - trainer.global_step
        if trainer.is_global_zero and done > 0 and left > 0 and not self.said:
            self.said = True
            minutes = (time.time() - self.train_started) / done * left / 60
            print(f"expected: about {minutes:.1f} more minutes for the remaining {left} steps "
                  "(without validation)", flush=True)

    def on_validation_start(self, trainer, pl_module):
        self.validation_started = time.time()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seconds["validation"] += time.time() - self.validation_started

    def on_train_end(self, trainer, pl_module):
        refits = sum(c.seconds for c in trainer.callbacks if isinstance(c, FitProposal))
        self.seconds.update(refits=refits, steps=time.time() - self.train_started - refits
                            - self.seconds["validation"])


class LogInterval(pl.Callback):
    """Trainer(log_every_n_steps) capped at an epoch's steps, so that short epochs log too."""

    def setup(self, trainer, pl_module, stage):
        steps = len(trainer.datamodule.train) // trainer.datamodule.batch_size
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))


class ValidateLastEpoch(_Saved):
    """Validation after the last epoch; the last one's `step` and `metrics` are checkpointed."""

    step, metrics, saved = -1, {}, ("step", "metrics")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


class MSECurve(_Saved):
    """After each validation (rank 0): the MSE curve of `samples` points (`last`), its figure."""

    def __init__(self, samples=256, seed=0):
        self.samples, self.seed, self.first, self.last = samples, seed, None, None
        self.saved = ("last",)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if batch_idx == 0:
            self.first = (batch[0] if isinstance(batch, (list, tuple)) else batch)[:self.samples]

    def on_validation_epoch_end(self, trainer, model):
        if trainer.sanity_checking or not trainer.is_global_zero or self.first is None:
            return
        logsnrs = model.curve_logsnrs().to(model.device)
        generator = t.Generator(model.device).manual_seed(self.seed)
        mse, mmse = model.mse_curve(self.first.to(model.device), logsnrs, generator=generator)
        logsnrs, mse, mmse = logsnrs.cpu(), mse.cpu(), mmse.cpu()
        suggested = proposals.suggest_logsnr_params(logsnrs, mse, model.d)
        self.last = dict(logsnrs=logsnrs, mse=mse, mmse=mmse, suggested=suggested)
        if all(math.isfinite(v) for v in suggested):
            model.log_dict(dict(zip(("suggested_logsnr_loc", "suggested_logsnr_scale"), suggested)),
                           rank_zero_only=True)
        if tensorboard(trainer):
            fig = viz.plot_mse_curve(logsnrs, mse, mmse, model.d)
            tensorboard(trainer).add_figure("mse_curve", fig, trainer.global_step)


class SampleImages(pl.Callback):
    """A grid of model samples in TensorBoard after each validation, from a fixed seed (rank 0)."""

    def __init__(self, n=16, steps=100, seed=0):
        self.n, self.steps, self.seed = n, steps, seed

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not tensorboard(trainer):
            return
        generator = t.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.sample(self.n, self.steps, generator=generator).float()
        tensorboard(trainer).add_image("samples", viz.image_grid(x), trainer.global_step)


class InformationMaps(pl.Callback):
    """The first `n` validation images above their per-pixel i(x; y), at the end of training."""

    def __init__(self, n=8, npoints=256, seed=0):
        self.n, self.npoints, self.seed = n, npoints, seed

    def final(self, trainer, pl_module):
        if not tensorboard(trainer):
            return
        print(f"information maps: i(x; y) per pixel of {self.n} validation images", flush=True)
        x = trainer.datamodule.val_data()[:self.n].to(pl_module.device, pl_module.dtype)
        y = trainer.datamodule.val_labels[:self.n].to(pl_module.device)
        maps = pl_module.mi_points(x, y, self.npoints, seed=self.seed, per_dim=True)
        fig = viz.plot_attribution(x.cpu(), maps.cpu(), y.cpu(),
                                   title="where each label's information lives")
        image = viz.save(fig, os.path.join(trainer.logger.log_dir, "information.png"))
        tensorboard(trainer).add_image("information", image, trainer.global_step, dataformats="HWC")


class Figures2D(_Saved):
    """A 2-D run's figures to TensorBoard and figures/, and their `results` (docs/2d.md)."""

    def __init__(self, curve, grid_size=40, num_samples=2000, sample_steps=100, val_npoints=64,
                 ode_settings=None, seed=0):
        self.curve, self.grid_size, self.num_samples = curve, grid_size, num_samples
        self.sample_steps, self.val_npoints, self.ode = sample_steps, val_npoints, ode_settings
        self.seed, self.history, self.results = seed, [], {}  # history: (epoch, nll, stderr)
        self.saved = ("history",)

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val_loss" in metrics:
            self.history.append((trainer.current_epoch + 1, float(metrics["val_loss"]),
                                 float(metrics["val_loss_stderr"])))

    @t.no_grad()
    def final(self, trainer, model):
        data, name, was_training = trainer.datamodule, trainer.datamodule.name, model.training
        folder = os.path.join(trainer.logger.log_dir, "figures")
        os.makedirs(folder, exist_ok=True)

        def show(tag, fig, file=None):
            image = viz.save(fig, os.path.join(folder, f"{file or tag}.png"))
            trainer.logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
        model.eval()
        print("figures: density contours, samples and curves", flush=True)
        xs, ys, grid = viz.density_grid(data.train.data, self.grid_size)
        grid = t.as_tensor(grid, dtype=model.dtype, device=model.device)
        nll, stderr, shown = viz.grid_nll(model, grid, seed=self.seed)
        show("density", viz.plot_density(xs, ys, nll.cpu(), title=f"{name}: model density"))
        if self.ode:  # every cell at 1e-3, those near the shown ones at CONTOUR_ODE_TOL (2d.md)
            rough, tol = ({k: max(self.ode[k], v) for k in ("rtol", "atol")}
                          for v in (1e-3, viz.CONTOUR_ODE_TOL))  # looser settings win
            flow, _ = model.nll_ode(grid, **dict(self.ode, **rough))
            near = flow <= flow.min() + viz.CONTOUR_DEPTH + 2
            flow[near] = model.nll_ode(grid[near], **dict(self.ode, **tol))[0]
            show("density_ode", viz.plot_density(
                xs, ys, {"IT estimate": nll.cpu(), "probability-flow ODE": flow.cpu()},
                title=f"{name}: the model's density, two ways"))
        if data.num_classes:  # each label's i(x; y): mi_points, Bayes' rule, the exact if known
            stats = label_pass(model, grid, self.val_npoints, self.seed)
            maps = {f"{source}: y = {k}": v.cpu() for source, key in (("mi_points", "information"),
                                                                   ("Bayes' rule", "bayes"))
                    for k, v in enumerate(stats[key][0].T)}
            if (exact := data.exact_labels(grid.double().cpu())) is not None:
                maps.update({f"exact: y = {k}": v for k, v in enumerate(exact[1].T)})
            show("information", viz.plot_information(
                xs, ys, maps, title=f"{name}: pointwise mutual information of each label"))
        if (exact := data.exact_nll(grid.double().cpu())) is not None:
            show("density_gap", viz.plot_density_gap(
                xs, ys, nll.cpu(), exact,
                title=f"{name}: exact and model density, and the pointwise gap in nats"))
        samples = t.zeros(0, 2)
        if self.num_samples > 0:
            generator = t.Generator(model.device).manual_seed(self.seed)
            samples = model.sample(self.num_samples, self.sample_steps, generator).cpu()
            show("samples", viz.plot_samples(data.train.data[:self.num_samples], samples, name))
        if isinstance(model.proposal, FittedProposal):
            viz.save(viz.plot_proposal(model.proposal, name), os.path.join(folder, "proposal.png"))
        if (c := self.curve.last) is not None:
            viz.save(viz.plot_mse_curve(c["logsnrs"], c["mse"], c["mmse"], 2, f"{name}: MSE curve"),
                     os.path.join(folder, "mse_curve.png"))
        if self.history:
            exact = trainer.callback_metrics.get("val_loss_exact")
            references = {"exact, this validation set": exact,
                          "entropy": None if data.num_classes else data.entropy()}
            quantity = "-log p(x | y)" if data.num_classes else "-log p(x)"
            show("val_loss_history", viz.plot_val_history(
                {"model estimate": tuple(zip(*self.history))},
                {k: float(v) for k, v in references.items() if v is not None},
                title=f"{name}: validation NLL (error bars: standard error)",
                ylabel=f"validation E[{quantity}] (nats)"), "val_loss")
        model.train(was_training)
        self.results = dict(
            history=list(self.history),  # (epoch, val_loss, stderr) per validation
            contour_cells=int(shown.sum()), contour_stderr_median=float(stderr[shown].median()),
            contour_stderr_max=float(stderr[shown].max()), figures=shown_path(folder),
            samples_mean=samples.mean(0).tolist(),
            samples_cov=t.cov(samples.T).tolist() if len(samples) > 1 else None)


class Interrupted(pl.Callback):
    """Ctrl-C or SIGTERM (README: Stopping and resuming): `message`, `kept` (path, step)."""

    message, status, log_dir, ctrl_c, kept = None, None, None, False, None

    def on_train_start(self, trainer, pl_module):
        self.log_dir, self.deferred = trainer.log_dir, False  # rank 0's, shared with every process
        Interrupted.ctrl_c = False

        def graceful(signum, frame):  # Lightning's deferred stop, as for SIGTERM
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one: at once
            Interrupted.ctrl_c = True
            print("\ninterrupted: stopping after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        self.previous = signal.signal(signal.SIGINT, graceful)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a stop asked for while gradients accumulate waits for their step (the last callback)
        connector = trainer._signal_connector
        within = ((batch_idx + 1) % trainer.accumulate_grad_batches
                  and batch_idx + 1 < trainer.num_training_batches)
        if connector.received_sigterm and within:
            connector.received_sigterm, self.deferred = False, True
        elif self.deferred and not within:
            connector.received_sigterm = True

    def on_train_end(self, trainer, pl_module):
        signal.signal(signal.SIGINT, self.previous)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # a checkpoint saved as an epoch starts holds the finished epoch's batch progress, with
        # which Lightning would skip the next epoch
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epoch, batches = loop.get("epoch_progress", {}).get("current"), loop.get(
            "epoch_loop.batch_progress")
        if (epoch and batches and batches["current"]["ready"]
                and epoch["ready"] == epoch["started"] + 1 == epoch["processed"] + 1):
            batches["current"] = dict.fromkeys(batches["current"], 0)
            batches["is_last_batch"] = False

    def on_exception(self, trainer, pl_module, exception):
        if interruption(exception) and self.log_dir is None:
            Interrupted.message = f"{interruption(exception)}: nothing was written"
        elif interruption(exception):
            keep(trainer, exception)


def interruption(exception):
    """The cause of an interruption (its exit status: Interrupted.status), or None."""
    sigterm = isinstance(exception, SIGTERMException)
    if not (sigterm or isinstance(exception, KeyboardInterrupt)):
        return None
    ctrl_c = Interrupted.ctrl_c or not sigterm  # Ctrl-C during training arrives as SIGTERM
    Interrupted.status = 130 if ctrl_c else 143
    return "interrupted" if ctrl_c else "stopped by SIGTERM"


def keep(trainer, exception):
    """Saves the trainer's state to <run>/checkpoints/interrupted.ckpt; Interrupted.message."""
    path = os.path.join(trainer.log_dir, "checkpoints", "interrupted.ckpt")
    cause, steps = interruption(exception), trainer.global_step
    done = (trainer.fit_loop.epoch_progress.current.processed >= trainer.max_epochs
            or 0 < trainer.max_steps <= steps)
    where = f"after training ({steps} steps)" if done else (
        f"at epoch {trainer.current_epoch + 1}, step {steps}")
    try:
        trainer.save_checkpoint(path)
    except OSError as err:
        Interrupted.message = (f"{cause} {where}: cannot write {shown_path(path)} "
                               f"({err.strerror}); {kept()}")
        return
    Interrupted.message = (f"{cause} {where}: kept {shlex.quote(shown_path(path))}; "
                           f"{'finish the run' if done else 'resume'} with {resume_command(path)}")


def kept(command=False):
    """What a failure leaves: Interrupted.kept, and its resume."""
    if Interrupted.kept is None or isinstance(Interrupted.kept, str):  # str: said as it is
        return Interrupted.kept or "nothing was kept"
    path, step = Interrupted.kept
    return (f"kept {shlex.quote(shown_path(path))} (step {step})"
            + (f"; resume with {resume_command(path)}" if command else ""))


def resume_command(path):
    """The command line as given, resuming from the checkpoint at path."""
    words = sys.argv[1:]  # less --resume and the word after it, or --resume=...
    argv = [w for prev, w in zip(["", *words], words) if "--resume" not in (prev, w.split("=")[0])]
    return shlex.join(["python", sys.argv[0], *argv, "--resume", shown_path(path)])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all (cli.write_file); the newest is Interrupted.kept."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        cli.write_file(str(path), lambda f: t.save(checkpoint, f))
        Interrupted.kept = (str(path), checkpoint.get("global_step"))


@contextlib.contextmanager
def stop_at_once(trainer=None):
    """SIGTERM raises SIGTERMException at once (Lightning waits for the end of a batch); given the
    trainer (the work after training), an interruption keeps interrupted.ckpt."""
    def stop(signum, frame):
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (KeyboardInterrupt, SIGTERMException) as err:
        if trainer is not None:  # saved under the handler that was there before
            signal.signal(signal.SIGTERM, previous)
            keep(trainer, err)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


class SlurmJob(pl.Callback):
    """Under SLURM: the run folder marked with the job's id, and the requeue checkpoint there."""

    def on_train_start(self, trainer, pl_module):
        if (job := slurm_job_id()) is None:
            return
        folder = os.path.join(trainer.log_dir, "checkpoints")
        trainer._default_root_dir = folder  # where Lightning's requeue handler saves
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            cli.write_file(os.path.join(trainer.log_dir, SLURM_MARK), job)


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


class LineProgress(ProgressBar):
    """Progress for a log file: a line per epoch, at most one every `every` s in evaluation."""

    def __init__(self, every=10.):
        super().__init__()
        self.every, self.enabled, self.last = every, True, time.time()

    def disable(self):
        self.enabled = False

    def enable(self):
        self.enabled = True

    def on_train_epoch_end(self, trainer, pl_module):
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if "val_loss" in trainer.callback_metrics:
            shown["val_loss"] = float(trainer.callback_metrics["val_loss"])
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in shown.items())
        if self.enabled:
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {metrics}", flush=True)

    def tick(self, label, batch_idx, total):
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            print(f"{label}: batch {batch_idx + 1} of {int(total)}", flush=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        self.tick("validation", batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.tick(getattr(pl_module, "phase", "test"), batch_idx,
                  trainer.num_test_batches[dataloader_idx])
