"""Information-theoretic diffusion (Kong et al., ICLR 2023) as a LightningModule: any denoiser(z,
logsnr[, y]) -> eps_hat becomes a density model, measured by estimators.py (docs/maths.md)."""
import math

import pytorch_lightning as pl
import torch as t
from torchmetrics import SumMetric

import denoisers
import estimators as est
import ode
import utils
from proposals import BINS, FittedProposal, LogisticProposal

VAL_SEED = 0x7661  # the validation points' seed (keyed by sample index, so any fixed value)


class DiffusionModel(pl.LightningModule):
    def __init__(self, denoiser, x_shape=(2,), reference=None, learning_rate=1e-3, logsnr_loc=0.,
                 logsnr_scale=3., clip=4., gaussian_residual=False, val_npoints=16,
                 lr_schedule="constant", seed=None, num_classes=None, label_dropout=0.1,
                 record=None):
        """reference: a utils.GaussianReference (default N(0, I)); the logistic proposal spans
        logsnr_loc +- clip * logsnr_scale; gaussian_residual: eps_hat = eps_G + denoiser; seed:
        the training noise's (default fresh); num_classes: p(x | y), labels in 0 .. num_classes - 1
        (-1: none) dropped with probability label_dropout; record: denoisers.record."""
        super().__init__()
        if lr_schedule not in ("constant", "onecycle"):
            raise ValueError(f"lr_schedule must be 'constant' or 'onecycle', got {lr_schedule!r}")
        if num_classes is not None and not (num_classes >= 2 and 0 <= label_dropout < 1):
            raise ValueError(f"need num_classes >= 2 and 0 <= label_dropout < 1, got "
                             f"{num_classes}, {label_dropout}")
        seed = utils.fresh_seed(seed)
        self.save_hyperparameters(ignore=["denoiser", "reference", "record"])
        self.model, self.record = denoiser, record or denoisers.record(denoiser)
        self.x_shape, self.d = tuple(x_shape), math.prod(x_shape)
        self.proposal = LogisticProposal(logsnr_loc, logsnr_scale, clip)
        self.reference = reference or utils.GaussianReference(self.d, num_classes)
        self.val_sums = t.nn.ModuleList([SumMetric(nan_strategy="disable").set_dtype(t.float64)
                                         for _ in range(3)])  # NaN is kept, never dropped
        if num_classes is not None:  # log p(y), for class_log_posterior (fit_label_prior)
            self.register_buffer("label_log_prior", t.full((num_classes,), -math.log(num_classes)))
        if hasattr(denoiser, "set_fallback"):  # a U-Net's denoiser outside its trained range
            denoiser.set_fallback(None if gaussian_residual else self.reference)

    @property
    def num_classes(self):
        return self.hparams.get("num_classes")

    @property
    def residual_of(self):
        """The reference whose eps_G forward adds to the network's output, or None."""
        return self.reference if self.hparams.gaussian_residual else None

    def forward(self, z, logsnr, y=None):
        """eps_hat(z, a[, y]) in z's dtype (float32 under bf16 autocast: losses stay float32)."""
        if y is not None and self.num_classes is None:
            raise ValueError("labels given to an unconditional model (num_classes=None)")
        eps_hat = est.denoise(self.model, z, logsnr, y)
        return eps_hat if self.residual_of is None else eps_hat + self.reference.eps(z, logsnr, y)

    def nll(self, batch, generator=None):
        """The training loss: E[-log p(x)] (labelled: E[-log p(x | y)]) in nats, unbiased."""
        x, y = self._data(batch), self._labels(batch)
        return est.loss(self, self.reference, self.proposal, x, y, self.hparams.label_dropout,
                        generator).mean()

    def nll_points(self, x, npoints=200, replicates=4, seed=None, chunk_size=None, index=None,
                   proposal=None, y=None):
        """-log p(x) (-log p(x | y) with labels) per sample, with standard errors: (nll, stderr)."""
        return est.nll_points(self, self.reference, proposal or self.proposal, self._data(x),
                              npoints, replicates, seed, index, self._given(x, y), chunk_size)

    def mi_points(self, x, y, npoints=200, replicates=4, seed=None, chunk_size=None, index=None,
                  proposal=None, per_dim=False):
        """i(x; y) per sample (per_dim: per coordinate), with standard errors."""
        return est.mi_points(self, self.reference, proposal or self.proposal, self._data(x),
                             self._given(x, y, needed=True), npoints, replicates, seed, index,
                             chunk_size, per_dim)

    def class_log_posterior(self, x, npoints=200, log_prior=None, replicates=4, seed=None,
                            chunk_size=None, index=None, proposal=None):
        """log p(y | x), (B, num_classes), by Bayes' rule; log_prior default: fit_label_prior's."""
        if self.num_classes is None:
            raise ValueError("class_log_posterior needs a conditional model (num_classes)")
        prior = self.label_log_prior if log_prior is None else t.as_tensor(log_prior)
        return est.class_log_posterior(self, self.reference, proposal or self.proposal,
                                       self._data(x), prior, npoints, replicates, seed, index,
                                       chunk_size)[0]

    def nll_discrete_points(self, x, grid, npoints=256, replicates=4, rounding="none", seed=None,
                            chunk_size=None, tails=True, index=None, proposal=None):
        """-log P(x) per sample of grid data, with standard errors (rounding: GridRounding's)."""
        if rounding not in ("none", "hard", "soft"):
            raise ValueError(f"rounding must be 'none', 'hard' or 'soft', got {rounding!r}")
        denoiser = self if rounding == "none" else denoisers.GridRounding(self, grid, rounding)
        return est.nll_discrete_points(denoiser, self.reference, proposal or self.proposal,
                                       self._data(x), grid, npoints, replicates, seed, index,
                                       tails, chunk_size)

    @t.no_grad()
    def nll_ode(self, x, trace="exact", probes=1, rtol=1e-5, atol=1e-5, seed=None, index=None):
        """-log p(x) of the probability-flow ODE's density (ode.nll_ode), and its info."""
        return ode.nll_ode(self, self.reference, self.proposal.range, self._data(x), trace,
                           probes, rtol, atol, seed, index)

    def mse_curve(self, x, logsnrs, generator=None, chunk_size=None):
        """(model MSE, reference MMSE) at each log SNR of `logsnrs`."""
        return est.mse_curve(self, self.reference, self._data(x), logsnrs, generator, chunk_size)

    def curve_logsnrs(self, n=48):
        """The grid MSE curves are shown on: n evenly spaced points over the proposal's range."""
        return t.linspace(*self.proposal.range, n)

    def sample(self, n, steps=200, generator=None):
        """n samples of the deterministic sampler (estimators.sample), in bounded chunks."""
        chunk = est.default_chunk(self.d, self.device)
        return t.cat([est.sample(self, self.reference, self.proposal, min(chunk, n - i),
                                 self.x_shape, steps, generator)
                      for i in range(0, max(n, 1), chunk)])

    def fit_reference(self, x, y=None, **kwargs):
        """The data-matched Gaussian reference (and, with labels, each label's) from data."""
        self.reference.fit(self._data(x), y, **kwargs)
        return self

    def fit_proposal(self, x, pilot_points=4, bins=BINS, mix=0.5, seed=None, chunk_size=None):
        """Fits the log-SNR proposal to the integrand on held-out samples x; sets and returns it."""
        self.proposal = est.fit_proposal(self, self.reference, self.proposal, self._data(x),
                                         pilot_points, bins, mix, seed, chunk_size)
        return self.proposal

    def fit_label_prior(self, y):
        """log p(y): the label frequencies of y (the training labels)."""
        counts = t.bincount(t.as_tensor(y).flatten(), minlength=self.num_classes)
        self.label_log_prior = (counts / counts.sum()).log().to(self.label_log_prior)
        return self

    def training_step(self, batch, batch_idx):
        micro = batch_idx % self.trainer.accumulate_grad_batches  # batches of one step
        noise = utils.derive_seed(self.hparams.seed, self.global_step, micro, self.global_rank)
        try:
            loss = self.nll(batch, generator=t.Generator(self.device).manual_seed(noise))
        except FloatingPointError as err:
            self._diverged("training", err)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps Lightning
            self.log("train_loss", loss, prog_bar=True, sync_dist=True)  # writes (1 ms a call)
        return loss

    def on_validation_epoch_start(self):
        self.val_seen = 0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        # sample j of this shard is global index j * world + rank: the same points every epoch
        x, y = self._data(batch), self._labels(batch)
        index = (self.val_seen + t.arange(len(x), device=x.device)) * self.trainer.world_size
        index = index + self.global_rank
        self.val_seen += len(x)
        loaders = self.trainer.val_dataloaders
        keep = index < len((loaders[dataloader_idx] if isinstance(loaders, (list, tuple))
                            else loaders).dataset)
        try:
            nll, _ = est.nll_points(self, self.reference, self.proposal, x[keep],
                                    self.hparams.val_npoints, 1, VAL_SEED, index[keep],
                                    None if y is None else y[keep])
        except FloatingPointError as err:
            self._diverged("validation", err)
        for metric, value in zip(self.val_sums, (nll, nll ** 2, t.ones_like(nll))):
            metric.update(value)

    def on_validation_epoch_end(self):  # standard error over data and log SNR together
        total, total_sq, n = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        mean, stderr = total / n, utils.stderr_from_sums(total, total_sq, n)
        if not t.isfinite(mean):
            self._diverged("validation", f"mean {mean.item()}")
        self.log_dict({"val_loss": mean.float(), "val_loss_stderr": stderr.float(),
                       "val_bpd": utils.nats_to_bpd(mean, self.d).float(),
                       "val_samples": n.float()}, sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["denoiser"] = self.record
        if isinstance(self.proposal, FittedProposal):
            checkpoint["fitted_proposal"] = self.proposal.state()

    def on_load_checkpoint(self, checkpoint):
        if "fitted_proposal" in checkpoint:
            self.proposal = FittedProposal.from_state(checkpoint["fitted_proposal"])

    def configure_optimizers(self):
        # one kernel for all parameters (3x faster) where Lightning allows it: under mixed
        # precision it refuses gradient clipping with a fused optimizer
        fused = self.device.type in ("cpu", "cuda") and (
            self.trainer.precision.endswith("-true") or not self.trainer.gradient_clip_val)
        optimizer = t.optim.Adam(self.parameters(), lr=self.hparams.learning_rate,
                                 fused=fused or None)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        schedule = t.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate,
            total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _diverged(self, loss, detail):
        raise FloatingPointError(f"the {loss} loss is not finite at step {self.global_step} "
                                 f"({detail}): the model may have diverged; a learning rate lower "
                                 f"than {self.hparams.learning_rate:g} may help") from None

    def _data(self, batch):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not t.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x))}")
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])}, expected x_shape "
                             f"{self.x_shape}")
        return x

    def _labels(self, batch):
        labelled = isinstance(batch, (list, tuple)) and len(batch) > 1 and self.num_classes
        return self._given(batch[0], batch[1]) if labelled else None

    def _given(self, x, y, needed=False):
        if y is None:
            if needed:
                raise ValueError("labels y are needed, one per sample")
            return None
        k = self.num_classes
        if k is None:
            raise ValueError("labels given to an unconditional model (num_classes=None)")
        y = t.as_tensor(y, device=x.device).long().view(-1)
        if len(y) != len(x) or (len(y) and not (-1 <= y.min() and y.max() < k)):
            raise ValueError(f"labels must be one per sample, in -1 .. {k - 1} (-1: none)")
        return y
