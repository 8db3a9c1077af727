"""Every Lightning callback of a run: the values the model must be read against (Baselines,
Labels), the log-SNR proposal refitted during training, the MSE curve and the figures (drawn by
viz.py), the run's size and last validation, the progress display, and what Ctrl-C keeps."""
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
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

import cli
import estimators as est
import proposals
import utils
import viz
from proposals import FittedProposal

LABEL_SEED = 0x4C  # names the end-of-training label pass's points apart from validation's


class Baselines(pl.Callback):
    """What val_loss is read against. At the start of training the data-matched Gaussian
    reference (and each label's, for a conditional model) is fitted on the datamodule's
    reference data (fit=False: a resumed run keeps its checkpoint's); -log q of the validation
    data is logged as gaussian_val_loss / gaussian_val_bpd and, where the density is known, the
    exact value of what val_loss estimates (E[-log p(x | y)] for a conditional model) as
    val_loss_exact (points outside the support left out and counted). Kept in `values`."""

    def __init__(self, describe=None, fit=True):
        self.describe, self.fit, self.values = describe, fit, {}

    def setup(self, trainer, pl_module, stage):
        data = trainer.datamodule
        if stage == "fit" and self.fit:
            pl_module.fit_reference(data.reference_data(),
                                    data.reference_labels() if data.num_classes else None)
        given = data.num_classes and data.exact_labels(data.val_data(), data.val_labels)
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
    """A conditional model at the end of training, on the validation samples and labels, from one
    pass over every label and none (estimators.label_statistics): the mean i(x; y) (difference
    form and Bayes' rule) and the accuracy of argmax p(y | x), each with its standard error,
    beside the exact densities' values (the Bayes classifier) where known, else scikit-learn's
    LogisticRegression on the training pixels. The label prior is the training labels'
    frequencies. To TensorBoard and `values`; global rank 0."""

    def __init__(self, npoints, seed=0, chunk=1024, fit=True):
        self.npoints, self.seed, self.chunk, self.fit, self.values = npoints, seed, chunk, fit, {}

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.fit:
            pl_module.fit_label_prior(trainer.datamodule.train_labels)

    @t.no_grad()
    def final(self, trainer, pl_module):
        """The end-of-training pass (experiment.train calls it after training)."""
        if not trainer.is_global_zero:
            return
        data, was_training = trainer.datamodule, pl_module.training
        pl_module.eval()
        x, y = data.val_data().to(pl_module.device, pl_module.dtype), data.val_labels.to(pl_module.device)
        print(f"labels: scoring {len(x)} validation samples under every label", flush=True)
        stats = label_pass(pl_module, x, self.npoints, utils.derive_seed(self.seed, LABEL_SEED),
                           y, self.chunk)
        mi, bayes, correct = (stats[k][0].cpu() for k in ("information", "bayes", "correct"))
        v = dict(val_mi=mi.mean().item(), val_mi_stderr=_stderr(mi),
                 val_mi_bayes=bayes.mean().item(), val_mi_bayes_stderr=_stderr(bayes),
                 val_accuracy=correct.mean().item(), val_accuracy_stderr=_stderr(correct),
                 label_evaluations=self.npoints * (1 + pl_module.num_classes))
        exact = data.exact_labels(x.cpu(), y.cpu())
        if exact is not None:
            v.update(val_mi_exact=exact[1].mean().item(), val_mi_exact_stderr=_stderr(exact[1]),
                     val_accuracy_bayes=exact[2].mean().item())
        else:
            from sklearn.linear_model import LogisticRegression
            pixels = data.reference_data().flatten(1).numpy()
            fit = LogisticRegression(max_iter=2000).fit(pixels, data.reference_labels().numpy())
            v["val_accuracy_logistic"] = float(fit.score(x.flatten(1).cpu().numpy(), y.cpu().numpy()))
        self.values = v
        if trainer.logger:
            trainer.logger.log_metrics(v, step=trainer.global_step)
        pl_module.train(was_training)


def label_pass(model, x, npoints, seed, y=None, chunk=1024):
    """estimators.label_statistics of a conditional model on samples x (for their labels y, or
    every label), from label_terms of no label and every label in chunks of samples."""
    labels = t.arange(-1, model.num_classes, device=x.device)
    index = t.arange(len(x), device=x.device)
    terms = t.cat([est.label_terms(model, model.reference, model.proposal, xs, labels, npoints,
                                   seed=seed, index=i) for xs, i in zip(x.split(chunk),
                                                                        index.split(chunk))])
    return est.label_statistics(terms, model.label_log_prior, y)


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

    seconds = 0.  # spent refitting (Timings)

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        started = time.perf_counter()
        x = trainer.datamodule.reference_data()[:self.samples].to(pl_module.device, pl_module.dtype)
        was_training = pl_module.training
        pl_module.eval()
        proposal = pl_module.fit_proposal(x, seed=utils.derive_seed(self.seed, epoch))
        pl_module.train(was_training)
        self.seconds += time.perf_counter() - started
        if not isinstance(proposal, FittedProposal):  # the model is still the Gaussian
            return
        trainer.logger.log_metrics({"proposal_moved": proposal.moved()}, step=trainer.global_step)
        last = epoch == self.epochs[-1]  # a figure costs more than a refit: the last one's
        if last and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("proposal", viz.plot_proposal(proposal),
                                                 trainer.global_step)


class Timings(pl.Callback):
    """Where a run's wall time goes, `seconds`: start-up (from the script's start, imports
    included; cli.STARTED), training steps, validation, proposal refits (FitProposal), and the
    final figures and summary (timed by experiment.train)."""

    def __init__(self, started=None):
        self.started = started or time.time()
        self.seconds = dict.fromkeys(("start-up", "steps", "validation", "refits", "final"), 0.)

    def on_train_start(self, trainer, pl_module):
        self.train_started = time.time()
        self.seconds["start-up"] = self.train_started - self.started

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

    def setup(self, trainer, pl_module, stage):  # after the data's setup, before the loops'
        steps = len(trainer.datamodule.train) // trainer.datamodule.batch_size
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))


class ValidateLastEpoch(pl.Callback):
    """Validation after the last epoch whatever the interval, so the final val_loss (and the
    summary) belongs to the final model; `step` is the step of the last validation and `metrics`
    its metrics, both in checkpoints (a resume that finishes a run reports them)."""

    step, metrics = -1, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.step = trainer.global_step
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def state_dict(self):
        return {"step": self.step, "metrics": self.metrics}

    def load_state_dict(self, state):
        self.step, self.metrics = state["step"], state["metrics"]


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


class MSECurve(pl.Callback):
    """After each validation: the MSE curve of the first `samples` points of global rank 0's first
    validation batch (one noise draw each, a fixed seed) against the reference's MMSE, with the
    suggested (logsnr_loc, logsnr_scale) logged and the figure sent to TensorBoard; the last one
    is kept in `last` for the run's summary. Global rank 0 only (no collectives)."""

    def __init__(self, samples=256, points=48, seed=0):
        self.samples, self.points, self.seed = samples, points, seed
        self.first, self.last = None, None

    def state_dict(self):
        return {"last": self.last}

    def load_state_dict(self, state):
        self.last = state.get("last")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if batch_idx == 0:
            self.first = (batch[0] if isinstance(batch, (list, tuple)) else batch)[:self.samples]

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or self.first is None:
            return
        self.last = self.measure(pl_module, self.first)
        loc, scale = self.last["suggested"]
        if math.isfinite(loc) and math.isfinite(scale):
            pl_module.log_dict({"suggested_logsnr_loc": loc, "suggested_logsnr_scale": scale},
                               rank_zero_only=True)
        if isinstance(trainer.logger, TensorBoardLogger):
            fig = viz.plot_mse_curve(self.last["logsnrs"], self.last["mse"], self.last["mmse"],
                                     pl_module.d)
            trainer.logger.experiment.add_figure("mse_curve", fig, trainer.global_step)

    def measure(self, model, x):
        """{logsnrs, mse, mmse (the reference's), suggested (loc, scale)} of `model` on x."""
        logsnrs = model.curve_logsnrs(self.points).to(model.device)
        generator = t.Generator(model.device).manual_seed(self.seed)
        mse, mmse = model.mse_curve(x.to(model.device), logsnrs, generator=generator)
        logsnrs, mse, mmse = logsnrs.cpu(), mse.cpu(), mmse.cpu()
        return dict(logsnrs=logsnrs, mse=mse, mmse=mmse,
                    suggested=proposals.suggest_logsnr_params(logsnrs, mse, model.d))


class SampleImages(pl.Callback):
    """A grid of model samples in TensorBoard ("samples") after each validation epoch, from a
    fixed seed so that epochs compare. Global rank 0, outside DDP."""

    def __init__(self, n=16, steps=100, seed=0):
        self.n, self.steps, self.seed = n, steps, seed

    def on_validation_epoch_end(self, trainer, pl_module):
        if (trainer.sanity_checking or not trainer.is_global_zero
                or not isinstance(trainer.logger, TensorBoardLogger)):
            return
        generator = t.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.sample(self.n, self.steps, generator=generator).float()
        trainer.logger.experiment.add_image("samples", viz.image_grid(x), trainer.global_step)


class InformationMaps(pl.Callback):
    """A conditional image model at the end of training: the first `n` validation images above
    the per-pixel part of i(x; y) with their label (mi_points(per_dim=True)), to TensorBoard
    ("information") and <run>/information.png. Global rank 0."""

    def __init__(self, n=8, npoints=256, seed=0):
        self.n, self.npoints, self.seed = n, npoints, seed

    def final(self, trainer, pl_module):
        if not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        print(f"information maps: i(x; y) per pixel of {self.n} validation images", flush=True)
        data = trainer.datamodule
        x = data.val_data()[:self.n].to(pl_module.device, pl_module.dtype)
        y = data.val_labels[:self.n].to(pl_module.device)
        maps = pl_module.mi_points(x, y, self.npoints, seed=self.seed, per_dim=True)
        fig = viz.plot_attribution(x.cpu(), maps.cpu(), y.cpu(),
                                   title="where each label's information lives")
        image = viz.save(fig, os.path.join(trainer.logger.log_dir, "information.png"))
        trainer.logger.experiment.add_image("information", image, trainer.global_step,
                                            dataformats="HWC")


class Figures2D(pl.Callback):
    """A 2-D run's figures: the validation history during training; at the end density contours
    (beside the probability-flow ODE's with `ode` settings; beside the exact density and their
    pointwise gap where known; each label's i(x; y) for a conditional model), samples beside the
    data, the MSE curve, the fitted proposal and val_loss against epoch, to TensorBoard and as
    PNGs in <run>/figures/. `results` holds what the summary reports of them."""

    def __init__(self, curve, grid_size=40, num_samples=2000, sample_steps=100, val_npoints=64,
                 ode_settings=None, seed=0):
        self.curve, self.grid_size, self.num_samples = curve, grid_size, num_samples
        self.sample_steps, self.val_npoints, self.ode, self.seed = (sample_steps, val_npoints,
                                                                    ode_settings, seed)
        self.history, self.results = [], {}  # history: (epoch, nll, stderr)

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val_loss" in metrics:
            self.history.append((trainer.current_epoch + 1, float(metrics["val_loss"]),
                                 float(metrics["val_loss_stderr"])))

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))

    @t.no_grad()
    def final(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        data, name = trainer.datamodule, trainer.datamodule.name
        folder = os.path.join(trainer.logger.log_dir, "figures")
        os.makedirs(folder, exist_ok=True)

        def show(tag, fig, file=None):
            image = viz.save(fig, os.path.join(folder, f"{file or tag}.png"))
            trainer.logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
        was_training = pl_module.training
        pl_module.eval()
        print("figures: density contours, samples and curves", flush=True)
        xs, ys, grid = viz.density_grid(data.train.data, self.grid_size)
        grid = t.as_tensor(grid, dtype=pl_module.dtype, device=pl_module.device)
        nll, stderr, shown = viz.grid_nll(pl_module, grid, seed=self.seed)
        show("density", viz.plot_density(xs, ys, nll.cpu(), title=f"{name}: model density"))
        if self.ode:  # at 1e-3 everywhere (within 0.4 nats), at the run's tolerance where shown
            rough = {k: max(self.ode[k], 1e-3) for k in ("rtol", "atol")}
            flow, _ = pl_module.nll_ode(grid, **dict(self.ode, **rough))
            near = flow <= flow.min() + viz.CONTOUR_DEPTH + 1
            flow[near] = pl_module.nll_ode(grid[near], **self.ode)[0]
            show("density_ode", viz.plot_density(
                xs, ys, {"IT estimate": nll.cpu(), "probability-flow ODE": flow.cpu()},
                title=f"{name}: the model's density, two ways"))
        if data.num_classes:
            show("information", viz.plot_information(xs, ys, self.information(pl_module, data, grid),
                                                     title=f"{name}: pointwise mutual information "
                                                           "of each label"))
        exact = data.exact_nll(grid.double().cpu())
        if exact is not None:
            show("density_gap", viz.plot_density_gap(
                xs, ys, nll.cpu(), exact,
                title=f"{name}: exact and model density, and the pointwise gap in nats"))
        samples = t.zeros(0, 2)
        if self.num_samples > 0:
            generator = t.Generator(pl_module.device).manual_seed(self.seed)
            samples = pl_module.sample(self.num_samples, self.sample_steps, generator).cpu()
            show("samples", viz.plot_samples(data.train.data[:self.num_samples], samples, title=name))
        if isinstance(pl_module.proposal, FittedProposal):
            viz.save(viz.plot_proposal(pl_module.proposal, title=name),
                     os.path.join(folder, "proposal.png"))
        if self.curve.last is not None:
            c = self.curve.last
            viz.save(viz.plot_mse_curve(c["logsnrs"], c["mse"], c["mmse"], 2,
                                        title=f"{name}: MSE curve"), os.path.join(folder, "mse_curve.png"))
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
        pl_module.train(was_training)
        self.results = dict(
            history=list(self.history),  # (epoch, val_loss, stderr) per validation
            contour_cells=int(shown.sum()), contour_stderr_median=float(stderr[shown].median()),
            contour_stderr_max=float(stderr[shown].max()), figures=shown_path(folder),
            samples_mean=samples.mean(0).tolist(),
            samples_cov=t.cov(samples.T).tolist() if len(samples) > 1 else None)

    def information(self, model, data, grid):
        """{"mi_points: y = k": i(x; k), "Bayes' rule: y = k": ..., "exact: y = k": ...} over
        the grid points for every label k (label_pass at val_npoints; the exact where known)."""
        stats = label_pass(model, grid, self.val_npoints, self.seed)
        maps = {f"{source}: y = {k}": v.cpu() for source, key in (("mi_points", "information"),
                                                               ("Bayes' rule", "bayes"))
                for k, v in enumerate(stats[key][0].T)}
        exact = data.exact_labels(grid.double().cpu())
        if exact is not None:
            maps.update({f"exact: y = {k}": v for k, v in enumerate(exact[1].T)})
        return maps


class Interrupted(pl.Callback):
    """Ctrl-C or SIGTERM (what batch systems send before they kill). During training the first
    Ctrl-C, like SIGTERM, stops the run at the next point Lightning can resume exactly from (the
    end of the current step or validation batch, of the optimizer step when gradients
    accumulate; a second Ctrl-C stops at once); the state is saved to
    <run>/checkpoints/interrupted.ckpt and experiment.run_cli ends with one line naming it and
    the command that resumes, exit status 130 (Ctrl-C) or 143 (SIGTERM). During an evaluation
    nothing is written. `kept`: the newest complete checkpoint, (path, step)."""

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
        """A stop asked for while gradients accumulate waits for their optimizer step (a
        checkpoint in between would lose them). The last callback: after any that asks."""
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
        """A checkpoint saved as an epoch starts (SLURM's requeue, an exception in
        on_train_epoch_start) holds the finished epoch's batch progress, with which Lightning
        would skip the next epoch: the batch counters are reset to the epoch's start."""
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
    """The cause of an interruption (Ctrl-C, SIGTERM; with its exit status in Interrupted.status),
    or None."""
    if isinstance(exception, KeyboardInterrupt) or (
            isinstance(exception, SIGTERMException) and Interrupted.ctrl_c):
        Interrupted.status = 130
        return "interrupted"
    if isinstance(exception, SIGTERMException):
        Interrupted.status = 143
        return "stopped by SIGTERM"
    return None


def keep(trainer, exception):
    """The trainer's state saved to <run>/checkpoints/interrupted.ckpt on an interruption, and the
    line saying so and how to resume (Interrupted.message)."""
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
    """What a failure leaves: the newest complete checkpoint (Interrupted.kept), with the command
    resuming from it."""
    if Interrupted.kept is None or isinstance(Interrupted.kept, str):  # str: said as it is
        return Interrupted.kept or "nothing was kept"
    path, step = Interrupted.kept
    return (f"kept {shlex.quote(shown_path(path))} (step {step})"
            + (f"; resume with {resume_command(path)}" if command else ""))


def resume_command(path):
    """The command line as given, resuming from the checkpoint at path."""
    argv, skip = [], False
    for word in sys.argv[1:]:
        if skip or word == "--resume" or word.startswith("--resume="):
            skip = word == "--resume"
            continue
        argv.append(word)
    return shlex.join(["python", sys.argv[0], *argv, "--resume", shown_path(path)])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all (cli.write_file: a temporary file in the target
    folder, then a rename), every error raised; the newest is Interrupted.kept."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        cli.write_file(str(path), lambda f: t.save(checkpoint, f))
        Interrupted.kept = (str(path), checkpoint.get("global_step"))


@contextlib.contextmanager
def final_stage(trainer):
    """The work after training (figures, label pass, summary): SIGTERM stops it at once, and an
    interruption keeps the trained state as interrupted.ckpt, whose --resume finishes the run."""
    try:
        with stop_at_once():
            yield
    except (KeyboardInterrupt, SIGTERMException) as err:
        keep(trainer, err)
        raise


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
            cli.write_file(os.path.join(trainer.log_dir, SLURM_MARK), job)


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
