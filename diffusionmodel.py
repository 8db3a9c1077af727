"""Information-theoretic diffusion (Kong, Brekelmans, Ver Steeg, ICLR 2023) as a LightningModule.

Any denoiser eps_hat = denoiser(z, logsnr) (output shape = input shape) becomes a density model:

    -log p(x) = -log q(x) + 1/2 Int E_eps[ ||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2 ] da

with z = sqrt(s(a)) x + sqrt(s(-a)) eps, q a Gaussian reference (N(0, I) unless fit_reference is
called) and eps_G its optimal noise predictor, evaluated on the same eps. For the optimal denoiser
this is exact; for any other denoiser it is an upper bound in expectation, so it is both the
training loss and the evaluation metric. The integral over a = log SNR is estimated by logistic
importance sampling: stratified over log SNR for the training loss, and randomly shifted
quasi-Monte Carlo points in (log SNR, noise) for evaluation (utils.keyed_sobol).

The Gaussian term is a control variate: it has no parameters (the gradient is unchanged and
unbiased) and it cancels the noise of ||eps - eps_hat||^2 wherever the two predictors agree, at
high and low SNR. See README.md for the measured variance reduction.

Data on a grid (8-bit images) have a probability mass instead, -log P(x) = 1/2 Int E_eps
||eps - eps_hat||^2 da with no reference term (nll_discrete_points); snapping x_hat to the grid
(GridRounding) and choosing among denoisers per log SNR on held-out data (Ensemble) can only
tighten either bound.
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
    def _pointwise(self, x, npoints, replicates=1, generator=None, chunk_size=None, index=None):
        """-log p(x_i) ~= -log q(x_i) + mean_k 1/2 w(a_k) gap(x_i, a_k, eps_k), with `npoints`
        denoiser evaluations per sample.

        npoints = 1 (training): one log SNR per sample, stratified across the batch and assigned
        at random (unbiased per sample), iid noise. npoints >= 2: the randomised QMC points of
        _rqmc_terms. Returns the estimates (B,) and the terms g (B, replicates, npoints // replicates)
        they average.
        """
        b = len(x)
        if npoints == 1:
            a, w = self.logsnr_samples((b,), generator, x.device, x.dtype)
            perm = t.randperm(b, generator=generator, device=x.device)
            a, w = a[perm].view(b, 1, 1), w[perm].view(b, 1, 1)
            eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            g = 0.5 * w * _in_chunks(self.mse_gap, chunk_size, x, a.flatten(), eps).view_as(w)
        else:
            a, g = self._rqmc_terms(x, npoints, replicates, self.mse_gap, generator, chunk_size, index)
        nll = self.reference.nll(x) + g.flatten(1).mean(1)
        if not t.isfinite(nll).all():
            _raise_non_finite(x, a, g)
        return nll, g

    def _rqmc_terms(self, x, npoints, replicates, integrand, generator=None, chunk_size=None,
                    index=None):
        """Terms 1/2 w(a) integrand(x, a, eps) whose mean over (a, eps) estimates the log-SNR
        integral of sample x, at `npoints` randomised QMC points per sample. Returns the log SNRs
        and the terms, each (B, replicates, npoints // replicates).

        The points of sample i are `replicates` independently shifted Sobol sets in (u, noise),
        a = logistic quantile of u and eps = Phi^-1 of the rest, named by (seed, index[i], r)
        (utils.keyed_sobol; the seed is one draw from `generator`): the estimate of a sample does
        not depend on the batch it is in, nor on chunk_size, and two models given the same seed and
        index see the same (a, eps), so their difference is a paired comparison. The noise is
        drawn chunk by chunk, so memory is bounded by chunk_size rows.
        """
        b, m = len(x), npoints // replicates
        seed = utils.stream_seed(generator)
        sample = _sample_index(index, b, x.device).repeat_interleave(replicates * m)
        replicate = t.arange(replicates, device=x.device).repeat_interleave(m).repeat(b)
        point = t.arange(m, device=x.device).repeat(b * replicates)
        u = utils.keyed_sobol(seed, (sample, replicate), point, m, [0], x.device)[:, 0]
        a, w = utils.logistic_from_uniform(u, *self._logistic(), x.dtype)
        dims = t.arange(1, 1 + self.d, device=x.device)

        def block(rows):
            u = utils.keyed_sobol(seed, (sample[rows], replicate[rows]), point[rows], m, dims, x.device)
            eps = t.special.ndtri(u).to(x.dtype).view((-1,) + self.x_shape)
            return integrand(x[rows // (replicates * m)], a[rows], eps)
        values = _in_chunks(block, chunk_size, t.arange(len(a), device=x.device))
        return a.view(b, replicates, m), (0.5 * w * values).view(b, replicates, m)

    def nll(self, batch, npoints=1):
        """Estimate of E[-log p(x)] over the batch in nats; the training loss (unbiased, with an
        unbiased gradient)."""
        return self._pointwise(self._data(batch), npoints)[0].mean()

    @t.no_grad()
    def nll_points(self, x, npoints=200, replicates=4, generator=None, chunk_size=None, index=None):
        """-log p(x) in nats for every sample of x (B, *x_shape), and each estimate's standard error.

        The npoints evaluations per sample form `replicates` independent randomised sets; the
        standard error is the spread of their means, std_r / sqrt(replicates). Memory is bounded
        by evaluating at most chunk_size rows at a time.

        index: the samples' positions in the data set (an int offset or a (B,) tensor; default
        0 .. B-1). The estimate of sample i depends only on (generator's seed, index[i]), so a data
        set scored in batches with index=offset gives the same numbers whatever the batch size.
        """
        _check_points(npoints, replicates)
        x = self._data(x)
        nll, g = self._pointwise(x, npoints, replicates, generator,
                                 chunk_size or self._default_chunk(), index)
        return nll, g.mean(-1).std(-1) / math.sqrt(replicates)

    # ------------------------------------------------------------------ discrete data
    @t.no_grad()
    def nll_discrete_points(self, x, delta, npoints=256, replicates=4, rounding="none", lo=-1.,
                            generator=None, chunk_size=None, tails=True, levels=None,
                            temperature=1., index=None):
        """-log P(x) in nats for every sample of grid data x (values lo + k * delta), and each
        estimate's standard error:

            -log P(x) = 1/2 Int_{-inf}^{inf} E_eps ||eps - eps_hat(z, a)||^2 da

        exact for the optimal denoiser of the discrete distribution (its error vanishes at high
        SNR once the posterior settles on one grid value) and an upper bound in expectation for any
        other denoiser, since no denoiser has lower expected error than the MMSE at any a.

        The integral over loc +- clip * scale uses the randomised QMC points of nll_points (same
        seed and index: the same (a, eps)); the standard error covers that part only. With
        tails=True the rest is added in closed form (tail_terms). rounding: "none", or "hard" /
        "soft" to snap this model's x_hat to the grid at every log SNR (GridRounding; levels and
        temperature as there). Rounding only helps at high SNR: to use it only where it helps,
        make rounded() variants ensemble members (Ensemble.fit chooses per log SNR on held-out
        data). The upper tail is negligible once loc + clip * scale >= utils.grid_resolved_logsnr
        (delta) (14.2 for 8-bit data); in float32, z's rounding (~1e-7 e^{a/2} per coordinate in
        eps units) leaves an error floor on a resolved grid, 1e-4 per 3072-dim sample at a = 16
        and 0.4 at a = 24, whose integral stays below 1e-4 bits/dim up to a = 24.
        """
        _check_points(npoints, replicates)
        x = self._data(x)
        utils.grid_index(x, delta, lo, levels)
        if rounding == "none":
            denoiser = self
        elif rounding in ("hard", "soft"):
            denoiser = GridRounding(self, delta, rounding, lo, levels, temperature)
        else:
            raise ValueError(f"rounding must be 'none', 'hard' or 'soft', got {rounding!r}")

        def mse(xs, a, eps):
            z, eps = self.noisy_channel(xs, a, eps)
            return _sq_norm(eps - denoiser(z, a))
        a, g = self._rqmc_terms(x, npoints, replicates, mse, generator,
                                chunk_size or self._default_chunk(), index)
        nll = g.flatten(1).mean(1)
        if tails:
            nll = nll + sum(self.tail_terms(x, delta, lo, levels))
        if not t.isfinite(nll).all():
            _raise_non_finite(x, a, g)
        return nll, g.mean(-1).std(-1) / math.sqrt(replicates)

    def tail_terms(self, x, delta, lo=-1., levels=None):
        """The parts of 1/2 Int E_eps ||eps - eps_hat||^2 da outside loc +- clip * scale, for grid
        data x: (below, above), each (B,), in nats.

        below: 1/2 Int_{-inf}^{a_lo} E_eps ||eps - eps_G(z, a)||^2 da (GaussianReference.
            error_integral). Every denoiser's error is e^a ||x - E x||^2 + O(e^{3a/2}) at low SNR,
            so with a data-matched reference (fit_reference) this is exact to leading order.
        above: 1/2 Int_{a_hi}^{inf} of the error of hard rounding z / sqrt(s(a)) to the grid
            (utils.rounding_tail), which the MMSE denoiser beats in expectation; negligible once
            delta e^{a_hi/2} is a few units.
        Both are the errors of actual denoisers (used below and above the range), so the total
        stays an upper bound in expectation.
        """
        h = self.hparams
        a_lo = h.logsnr_loc - h.clip * h.logsnr_scale
        a_hi = h.logsnr_loc + h.clip * h.logsnr_scale
        below = 0.5 * self.reference.error_integral(x, float("-inf"), a_lo)
        return below, utils.rounding_tail(x, delta, a_hi, lo, levels)

    def rounded(self, delta, mode="hard", lo=-1., levels=None, temperature=1.):
        """This model with x_hat snapped to the grid lo + k * delta at every log SNR (GridRounding),
        as a new DiffusionModel with the same importance distribution and reference: an ensemble
        member. It shares this model's denoiser (no copy)."""
        return self._with_denoiser(GridRounding(self, delta, mode, lo, levels, temperature))

    def _with_denoiser(self, denoiser, reference=None):
        """A DiffusionModel around `denoiser` with this one's hyperparameters (no Gaussian residual:
        the denoiser is used as is) and a copy of `reference` (default: this one's)."""
        hparams = dict(self.hparams, gaussian_residual=False)
        model = DiffusionModel(denoiser, **hparams)
        source = self.reference if reference is None else reference
        model.reference.load_state_dict(source.state_dict())
        return model.to(source.mean.device)

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
        # rows per denoiser call: cache-sized on CPU; on an accelerator large enough to fill it
        # (682 CIFAR-10 images) while the activations stay within a few GB
        return max(1, (2 ** 18 if self.device.type == "cpu" else 2 ** 21) // self.d)


class GridRounding(t.nn.Module):
    """A denoiser whose estimate of x is snapped to the data grid lo + k * delta.

    From the inner denoiser's x_hat = (z - sqrt(s(-a)) eps_hat) / sqrt(s(a)), per coordinate:
    - "hard": x_r = the nearest grid value (clamped to the `levels` values, if given);
    - "soft": x_r = the posterior mean over grid values g_k given x_hat ~ N(x, T e^-a) and a
      uniform prior over the grid, sum_k g_k softmax_k(-(x_hat - g_k)^2 e^a / (2 T)).
      With T = 1 this is the exact posterior mean of x given the channel output z / sqrt(s(a)) =
      x + e^{-a/2} eps alone (for a denoiser that knows nothing, eps_hat = 0, it is the optimal
      denoiser of data uniform on the grid). The MMSE x_hat is at least that accurate (its
      x-error is e^-a mmse / d <= e^-a per coordinate, since eps_hat = 0 already has mse = d), so
      T = 1 is the softest temperature a denoiser can justify; smaller T are sharper variants to
      choose between on held-out data. The sum runs over the 2 * window grid values nearest x_hat,
      exact to exp(-(window - 1)^2 delta^2 e^a / (2 T)) (at low SNR it is a local average, still a
      valid denoiser, and rounding is not chosen there anyway).
    Then eps_r = (z - sqrt(s(a)) x_r) / sqrt(s(-a)). Any function of z is a denoiser, so a rounded
    model keeps every estimate an upper bound in expectation; it helps at high SNR, where x_hat is
    within half a bin of x, and hurts at low SNR.
    """

    def __init__(self, denoiser, delta, mode="hard", lo=-1., levels=None, temperature=1., window=8):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
        if not delta > 0 or not temperature > 0:
            raise ValueError(f"delta and temperature must be > 0, got {delta}, {temperature}")
        if levels is not None and levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.inner = denoiser
        self.delta, self.mode, self.lo, self.levels = float(delta), mode, float(lo), levels
        self.temperature, self.window = float(temperature), int(window)

    def forward(self, z, logsnr):
        a = logsnr.to(z.dtype).view((-1,) + (1,) * (z.dim() - 1))
        x_hat = (z - t.sigmoid(-a).sqrt() * self.inner(z, logsnr)) / t.sigmoid(a).sqrt()
        x_r = self._hard(x_hat) if self.mode == "hard" else self._soft(x_hat, a)
        return (z - t.sigmoid(a).sqrt() * x_r) / t.sigmoid(-a).sqrt()

    def _clamp(self, k):
        return k.clamp(0, self.levels - 1) if self.levels is not None else k

    def _hard(self, x_hat):
        return self.lo + self.delta * self._clamp(((x_hat - self.lo) / self.delta).round())

    def _soft(self, x_hat, a):
        k0 = self._clamp(((x_hat - self.lo) / self.delta).floor())
        offsets = t.arange(1 - self.window, self.window + 1, device=x_hat.device, dtype=x_hat.dtype)
        k = k0.unsqueeze(-1) + offsets
        grid = self.lo + self.delta * k
        logits = -(x_hat.unsqueeze(-1) - grid) ** 2 * (a.exp() / (2 * self.temperature)).unsqueeze(-1)
        if self.levels is not None:
            logits = logits.masked_fill((k < 0) | (k > self.levels - 1), float("-inf"))
        return (logits.softmax(-1) * grid).sum(-1)


class GaussianDenoiser(t.nn.Module):
    """The optimal noise predictor of a Gaussian reference, eps_G(z, a), as a denoiser module."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference

    def forward(self, z, logsnr):
        return self.reference.eps(z, logsnr)


class Ensemble(t.nn.Module):
    """eps_hat(z, a) = eps_hat_m(z, a) with m = choice[bin of a]: the member with the lowest MSE in
    a's log-SNR bin, measured on held-out data (Ensemble.fit). Log SNRs outside the bins use the
    nearest bin. members[0] is always the data-matched Gaussian (GaussianDenoiser), so the
    ensemble's MSE curve never lies above the Gaussian's by more than the held-out noise.

    Choosing by log SNR alone keeps it a denoiser (a function of (z, a)), so every estimate made
    with it remains an upper bound in expectation, and since each member is a candidate in every
    bin, its expected error is at most each member's wherever the held-out choice is right.
    """

    def __init__(self, members, edges, choice, heldout_mse=None):
        super().__init__()
        self.members = t.nn.ModuleList(members)
        self.register_buffer("edges", t.as_tensor(edges, dtype=t.float64))
        self.register_buffer("choice", t.as_tensor(choice, dtype=t.long))
        if heldout_mse is None:
            heldout_mse = t.full((len(self.members), len(self.choice)), float("nan"))
        self.register_buffer("heldout_mse", t.as_tensor(heldout_mse, dtype=t.float64))

    def member_of(self, logsnr):
        """The index of the member used at each log SNR: bin k holds edges[k] <= a < edges[k+1]."""
        inner = self.edges[1:-1].to(logsnr.device)
        return self.choice[t.bucketize(logsnr.detach().double(), inner.double(), right=True)]

    def forward(self, z, logsnr):
        which = self.member_of(logsnr)
        out = t.empty_like(z)
        for m, member in enumerate(self.members):
            rows = (which == m).nonzero().squeeze(1)
            if len(rows):
                out[rows] = member(z[rows], logsnr[rows]).to(out.dtype)
        return out

    @classmethod
    @t.no_grad()
    def fit(cls, members, x, generator=None, bins=48, logsnr_range=None, draws=1, reference=None,
            chunk_size=None):
        """The ensemble of the data-matched Gaussian and `members`, chosen on held-out data x.

        members: denoisers called as member(z, logsnr) -> eps_hat, e.g. DiffusionModels and their
            rounded() variants. x: held-out samples (never the data the ensemble is scored on).
        bins, logsnr_range: equal-width log-SNR bins over logsnr_range (default: the integration
            range loc +- clip * scale of the first DiffusionModel member).
        draws: (log SNR, noise) draws per held-out sample and bin: the log SNR uniform in the bin,
            the noise common to all members (so the comparison is paired), both named by
            (seed, sample, bin, draw) and so independent of chunk_size.
        reference: the Gaussian member (default: fitted to x, GaussianReference.fit).
        The per-bin held-out MSEs are kept in `heldout_mse` (members x bins).
        """
        members = list(members)
        x = x[0] if isinstance(x, (list, tuple)) else x
        n, x_shape = len(x), tuple(x.shape[1:])
        d = int(np.prod(x_shape))
        if logsnr_range is None:
            like = next((m for m in members if isinstance(m, DiffusionModel)), None)
            if like is None:
                raise ValueError("give logsnr_range when no member is a DiffusionModel")
            h = like.hparams
            logsnr_range = (h.logsnr_loc - h.clip * h.logsnr_scale,
                            h.logsnr_loc + h.clip * h.logsnr_scale)
        if not logsnr_range[0] < logsnr_range[1] or bins < 1 or draws < 1:
            raise ValueError(f"need logsnr_range lo < hi, bins >= 1 and draws >= 1, got "
                             f"{logsnr_range}, {bins}, {draws}")
        if reference is None:
            reference = utils.GaussianReference(d).to(x.device, x.dtype).fit(x)
        everyone = [GaussianDenoiser(reference)] + members
        edges = t.linspace(*logsnr_range, bins + 1, dtype=t.float64, device=x.device)
        seed = utils.stream_seed(generator)
        sample, k, j = (v.flatten() for v in t.meshgrid(
            t.arange(n, device=x.device), t.arange(bins, device=x.device),
            t.arange(draws, device=x.device), indexing="ij"))
        u = utils.counter_uniform(seed, sample, k, j, 0, device=x.device)
        a = (edges[k] + (edges[k + 1] - edges[k]) * u).to(x.dtype)
        dims = t.arange(1, d + 1, device=x.device)

        def block(rows):
            u = utils.counter_uniform(seed, sample[rows, None], k[rows, None], j[rows, None], dims,
                                      device=x.device)
            eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x_shape)
            s = a[rows].view((-1,) + (1,) * len(x_shape))
            z = t.sigmoid(s).sqrt() * x[sample[rows]] + t.sigmoid(-s).sqrt() * eps
            return t.stack([_sq_norm(eps - member(z, a[rows]).to(z.dtype)) for member in everyone], 1)
        rows = t.arange(len(a), device=x.device)
        chunk_size = chunk_size or max(1, (2 ** 18 if x.device.type == "cpu" else 2 ** 21) // d)
        errors = _in_chunks(block, chunk_size, rows)
        heldout = errors.view(n, bins, draws, len(everyone)).double().mean((0, 2)).T
        return cls(everyone, edges, heldout.argmin(0), heldout)

    def as_model(self, like):
        """A DiffusionModel around this ensemble with `like`'s hyperparameters (x_shape, the
        logistic importance distribution) and the Gaussian member as its reference: nll_points,
        nll_discrete_points and mse_curve then work on the ensemble unchanged."""
        return like._with_denoiser(self, reference=self.members[0].reference)


def _check_points(npoints, replicates):
    if npoints < 2:
        raise ValueError(f"npoints must be >= 2, got {npoints}")
    if not 2 <= replicates <= npoints:
        raise ValueError(f"replicates must be between 2 and npoints={npoints}, got {replicates}")


def _sample_index(index, b, device):
    """Positions of a batch's samples in the data set: None (0 .. b-1), an int offset, or (b,)."""
    if index is None or isinstance(index, int):
        return t.arange(b, device=device) + (index or 0)
    index = t.as_tensor(index, dtype=t.int64, device=device).flatten()
    if len(index) != b:
        raise ValueError(f"index has {len(index)} entries for a batch of {b} samples")
    return index


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
