"""Information-theoretic diffusion (Kong, Brekelmans, Ver Steeg, ICLR 2023) as a LightningModule.

Any denoiser eps_hat = denoiser(z, logsnr) (output shape = input shape) becomes a density model:

    -log p(x) = -log q(x) + 1/2 Int E_eps[ ||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2 ] da

with z = sqrt(s(a)) x + sqrt(s(-a)) eps, q a Gaussian reference (N(0, I) unless fit_reference is
called) and eps_G its optimal noise predictor, evaluated on the same eps. For the optimal denoiser
this is exact; for any other denoiser it is an upper bound in expectation, so it is both the
training loss and the evaluation metric. The integral over a = log SNR is estimated by logistic
importance sampling: stratified over log SNR for the training loss, and randomly shifted
quasi-Monte Carlo points in (log SNR, noise) for evaluation (utils.shifted_sobol).

The Gaussian term is a control variate: it has no parameters (the gradient is unchanged and
unbiased) and it cancels the noise of ||eps - eps_hat||^2 wherever the two predictors agree, at
high and low SNR. See README.md for the measured variance reduction.
"""
import math

import numpy as np
import pytorch_lightning as pl
import torch as t
from pytorch_lightning.loggers import TensorBoardLogger
from torchmetrics import SumMetric

import utils
import viz


class DiffusionModel(pl.LightningModule):
    def __init__(self, denoiser, x_shape=(2,), learning_rate=1e-3, logsnr_loc=0., logsnr_scale=3.,
                 clip=4., gaussian_residual=False, val_npoints=16,
                 lr_schedule="constant", curve_points=48, curve_samples=256):
        """
        denoiser: module called as denoiser(z, logsnr) -> eps_hat, logsnr of shape (batch,).
        logsnr_loc, logsnr_scale, clip: the logistic importance distribution over log SNR,
            truncated to loc +- clip * scale.
        gaussian_residual: eps_hat = eps_G + denoiser(z, a), so an untrained net starts at the
            Gaussian reference's MMSE curve instead of above it.
        val_npoints: denoiser evaluations per validation sample.
        lr_schedule: "constant" (Adam) or "onecycle" (Adam with a one-cycle learning rate).
        curve_points, curve_samples: log-SNR grid size and number of samples of the MSE curve
            logged each validation epoch.
        """
        super().__init__()
        utils.check_logistic(logsnr_scale, clip)
        if lr_schedule not in ("constant", "onecycle"):
            raise ValueError(f"lr_schedule must be 'constant' or 'onecycle', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["denoiser"])
        self.model = denoiser
        self.x_shape = tuple(x_shape)
        self.d = int(np.prod(self.x_shape))
        self.reference = utils.GaussianReference(self.d)
        self.val_sums = t.nn.ModuleList([SumMetric().set_dtype(t.float64) for _ in range(3)])
        self._curve_x = None

    # ------------------------------------------------------------------ the Gaussian channel
    def noisy_channel(self, x, logsnr, eps=None, generator=None):
        """z = sqrt(s(a)) x + sqrt(s(-a)) eps, eps ~ N(0, I). Returns (z, eps)."""
        a = logsnr.view((-1,) + (1,) * (x.dim() - 1))
        if eps is None:
            eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return t.sigmoid(a).sqrt() * x + t.sigmoid(-a).sqrt() * eps, eps

    def forward(self, z, logsnr):
        """eps_hat(z, a), in z's dtype (float32 under bf16 autocast, so losses stay float32)."""
        eps_hat = self.model(z, logsnr)
        if eps_hat.shape != z.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps_hat.shape)}, expected the input "
                             f"shape {tuple(z.shape)}")
        eps_hat = eps_hat.to(z.dtype)
        if self.hparams.gaussian_residual:
            eps_hat = eps_hat + self.reference.eps(z, logsnr)
        return eps_hat

    def score(self, z, logsnr):
        """grad_z log p_a(z) = -eps_hat(z, a) / sqrt(s(-a)); the data score as a -> inf."""
        return -self(z, logsnr) / t.sigmoid(-logsnr).sqrt().view((-1,) + (1,) * (z.dim() - 1))

    # ------------------------------------------------------------------ the integrand
    def mse(self, x, logsnr, eps=None, generator=None):
        """mse(x, a) = ||eps - eps_hat(z, a)||^2 for one noise draw per sample."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        return _sq_norm(eps - self(z, logsnr))

    def mse_gap(self, x, logsnr, eps=None, generator=None):
        """||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2, the same eps in both terms."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        return _sq_norm(eps - self(z, logsnr)) - _sq_norm(eps - self.reference.eps(z, logsnr))

    def logsnr_samples(self, shape, generator=None, device=None, dtype=t.float32):
        """(a, w) from the logistic importance distribution, stratified along the last dimension."""
        return utils.logistic_logsnr(shape, *self._logistic(), stratified=True, generator=generator,
                                     device=device, dtype=dtype)

    # ------------------------------------------------------------------ the estimators
    def _pointwise(self, x, npoints, replicates=1, generator=None, chunk_size=None):
        """-log p(x_i) ~= -log q(x_i) + mean_k 1/2 w(a_k) gap(x_i, a_k, eps_k), with `npoints`
        denoiser evaluations per sample.

        npoints = 1 (training): one log SNR per sample, stratified across the batch and assigned
        at random (unbiased per sample), iid noise. npoints >= 2: the (u, eps) pairs of each sample
        are `replicates` independently shifted Sobol sets (utils.shifted_sobol) with
        a = logistic quantile of u and eps = Phi^-1 of the rest. Returns the estimates (B,) and the
        terms g (B, replicates, npoints // replicates) they average.
        """
        b, (loc, scale, clip) = len(x), self._logistic()
        if npoints == 1:
            a, w = self.logsnr_samples((b,), generator, x.device, x.dtype)
            perm = t.randperm(b, generator=generator, device=x.device)
            a, w = a[perm].view(b, 1, 1), w[perm].view(b, 1, 1)
            eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            m = npoints // replicates
            u = utils.shifted_sobol(b * replicates, m, 1 + self.d, generator, x.device)
            a, w = utils.logistic_from_uniform(u[..., 0], loc, scale, clip, x.dtype)
            a, w = a.view(b, replicates, m), w.view(b, replicates, m)
            eps = t.special.ndtri(u[..., 1:]).to(x.dtype).view((-1,) + self.x_shape)
        xs = x.repeat_interleave(a[0].numel(), 0)
        gap = _in_chunks(self.mse_gap, chunk_size, xs, a.flatten(), eps)
        g = 0.5 * w * gap.view_as(w)
        nll = self.reference.nll(x) + g.flatten(1).mean(1)
        if not t.isfinite(nll).all():
            _raise_non_finite(x, a, g)
        return nll, g

    def nll(self, batch, npoints=1):
        """Estimate of E[-log p(x)] over the batch in nats; the training loss (unbiased, with an
        unbiased gradient)."""
        return self._pointwise(self._data(batch), npoints)[0].mean()

    @t.no_grad()
    def nll_points(self, x, npoints=200, replicates=4, generator=None, chunk_size=None):
        """-log p(x) in nats for every sample of x (B, *x_shape), and each estimate's standard error.

        The npoints evaluations per sample form `replicates` independent randomised sets; the
        standard error is the spread of their means, std_r / sqrt(replicates). Memory is bounded
        by evaluating at most chunk_size rows at a time.
        """
        if npoints < 2:
            raise ValueError(f"npoints must be >= 2, got {npoints}")
        if not 2 <= replicates <= npoints:
            raise ValueError(f"replicates must be between 2 and npoints={npoints}, got {replicates}")
        x = self._data(x)
        nll, g = self._pointwise(x, npoints, replicates, generator, chunk_size or self._default_chunk())
        return nll, g.mean(-1).std(-1) / math.sqrt(replicates)

    @t.no_grad()
    def nll_x(self, x, npoints=200, generator=None):
        """-log p(x) in nats for ONE sample x of shape x_shape."""
        return self.nll_points(x.unsqueeze(0), npoints, generator=generator)[0][0]

    @t.no_grad()
    def mse_curve(self, x, logsnrs, generator=None, chunk_size=None):
        """E_x E_eps mse(x, a) at each a of `logsnrs` (one noise draw per sample and a), batched over
        samples and log SNRs. Returns (model MSE, Gaussian reference MMSE), each of shape (K,)."""
        x = self._data(x)
        b, k = len(x), len(logsnrs)
        logsnrs = logsnrs.to(x.device, x.dtype)
        xs = x.repeat((k,) + (1,) * (x.dim() - 1))
        mse = _in_chunks(lambda xx, aa: self.mse(xx, aa, generator=generator),
                         chunk_size or self._default_chunk(), xs, logsnrs.repeat_interleave(b))
        return mse.view(k, b).mean(1), self.reference.mmse(logsnrs)

    def curve_logsnrs(self, n=None):
        """The grid the MSE curve is shown on: the integration range loc +- clip * scale."""
        h = self.hparams
        half = h.clip * h.logsnr_scale
        return t.linspace(h.logsnr_loc - half, h.logsnr_loc + half, n or h.curve_points)

    @t.no_grad()
    def sample(self, n, steps=200, generator=None):
        """Deterministic DDIM-style sampler in log-SNR space.

        Starts from the Gaussian reference's noisy marginal at the lowest log SNR of a
        `steps`-point logistic quadrature grid (steps are spent where the MSE curve changes) and
        steps a -> a' with x_hat = (z - sqrt(s(-a)) eps_hat) / sqrt(s(a)),
        z' = sqrt(s(a')) x_hat + sqrt(s(-a')) eps_hat. Returns x_hat at the highest log SNR.
        """
        grid, _ = utils.logistic_quadrature(steps, *self._logistic(), device=self.device,
                                            dtype=self.reference.mean.dtype)
        z = self.reference.sample(n, grid[0], generator).view((n,) + self.x_shape)
        for i in range(steps):
            a = grid[i].expand(n)
            eps_hat = self(z, a)
            x_hat = (z - t.sigmoid(-grid[i]).sqrt() * eps_hat) / t.sigmoid(grid[i]).sqrt()
            if i + 1 < steps:
                z = t.sigmoid(grid[i + 1]).sqrt() * x_hat + t.sigmoid(-grid[i + 1]).sqrt() * eps_hat
        return x_hat

    def fit_reference(self, x, **kwargs):
        """Make the Gaussian reference data-matched (mean, covariance) from a data tensor."""
        self.reference.fit(self._data(x), **kwargs)
        return self

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_idx):
        loss = self.nll(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x = self._data(batch)
        nll, _ = self._pointwise(x, self.hparams.val_npoints, chunk_size=self._default_chunk())
        for metric, value in zip(self.val_sums, (nll, nll ** 2, t.ones_like(nll))):
            metric.update(value)
        if batch_idx == 0:
            self._curve_x = x[:self.hparams.curve_samples]

    def on_validation_epoch_end(self):
        """val_loss = E[-log p] in nats (and bits/dim) over the validation set, with its standard
        error over data and log SNR together: sqrt(Var_i(nll_i) / N)."""
        total, total_sq, n = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        mean = total / n
        stderr = ((total_sq / n - mean ** 2).clamp_min(0) / n).sqrt()
        self.log_dict({"val_loss": mean.float(), "val_loss_stderr": stderr.float(),
                       "val_bpd": utils.nats_to_bpd(mean, self.d).float()}, sync_dist=True)
        if self._curve_x is not None:
            self._log_mse_curve(self._curve_x)
            self._curve_x = None

    def _log_mse_curve(self, x):
        """MSE curve of one validation batch, on rank 0 only (no collectives: DDP ranks may differ)."""
        if not self.trainer.is_global_zero:
            return
        logsnrs = self.curve_logsnrs().to(x.device)
        mse, mmse_ref = self.mse_curve(x, logsnrs)
        loc, scale = utils.suggest_logsnr_params(logsnrs.cpu(), mse.cpu(), self.d)
        if math.isfinite(loc) and math.isfinite(scale):
            self.log_dict({"suggested_logsnr_loc": loc, "suggested_logsnr_scale": scale},
                          rank_zero_only=True)
        if isinstance(self.logger, TensorBoardLogger):
            fig = viz.plot_mse_curve(logsnrs.cpu(), mse.cpu(), mmse_ref.cpu(), self.d)
            self.logger.experiment.add_figure("mse_curve", fig, self.global_step)

    def configure_optimizers(self):
        optimizer = t.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        schedule = t.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate,
            total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ plumbing
    def _data(self, batch):
        """x from a tensor or a (x, ...) list/tuple, checked against x_shape."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not t.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])}, expected x_shape {self.x_shape}")
        return x

    def _logistic(self):
        return self.hparams.logsnr_loc, self.hparams.logsnr_scale, self.hparams.clip

    def _default_chunk(self):
        return max(1, 2 ** 18 // self.d)


def _sq_norm(v):
    """Per-sample squared norm over all but the first dimension."""
    return v.flatten(1).pow(2).sum(1)


def _in_chunks(fn, chunk_size, *rows):
    """fn applied to consecutive row blocks of at most chunk_size rows, concatenated."""
    n = len(rows[0])
    if chunk_size is None or n <= chunk_size:
        return fn(*rows)
    return t.cat([fn(*(r[i:i + chunk_size] for r in rows)) for i in range(0, n, chunk_size)])


def _raise_non_finite(x, logsnr, terms):
    if not t.isfinite(x).all():
        raise ValueError("x contains non-finite values (nan or inf)")
    bad = sorted({round(v, 3) for v in logsnr.expand_as(terms)[~t.isfinite(terms)].tolist()})
    if not bad:
        raise FloatingPointError("non-finite -log q(x) under the Gaussian reference")
    raise FloatingPointError(f"non-finite loss at log SNR {bad[:10]}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
