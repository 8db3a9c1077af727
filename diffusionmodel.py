"""Information-theoretic diffusion (Kong, Brekelmans, Ver Steeg, ICLR 2023) as a LightningModule.

Any denoiser eps_hat = denoiser(z, logsnr) (output shape = input shape) becomes a density model:

    -log p(x) = -log q(x) + 1/2 Int E_eps[ ||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2 ] da

with z = sqrt(s(a)) x + sqrt(s(-a)) eps, q a Gaussian reference and eps_G its optimal noise
predictor on the same eps (a control variate without parameters). Exact for the optimal denoiser,
an upper bound in expectation for any other: both the training loss and the metric. Grid data
(8-bit images) have a mass instead, -log P(x) = 1/2 Int E_eps ||eps - eps_hat||^2 da. The
derivations and the measured variance reductions are in docs/maths.md and README.md.
variational_bound gives the discrete-time bound of a T-step schedule (DDPM), for comparison.
"""
import math

import pytorch_lightning as pl
import torch as t
from torchmetrics import SumMetric

import utils


VAL_SEED = 0x7661  # the validation points' seed (keyed by sample index, so any fixed value)


class DiffusionModel(pl.LightningModule):
    def __init__(self, denoiser, x_shape=(2,), reference=None, learning_rate=1e-3, logsnr_loc=0.,
                 logsnr_scale=3., clip=4., gaussian_residual=False, val_npoints=16,
                 lr_schedule="constant"):
        """
        Args:
            denoiser: module called as denoiser(z, logsnr) -> eps_hat, logsnr of shape (batch,).
            x_shape: the shape of one sample.
            reference: a utils.GaussianReference (default N(0, I); see fit_reference).
            logsnr_loc, logsnr_scale, clip: the importance distribution over log SNR
                (utils.LogisticProposal), truncated to loc +- clip * scale.
            gaussian_residual: eps_hat = eps_G + denoiser(z, a), so an untrained net starts at
                the reference's MMSE curve instead of above it.
            val_npoints: denoiser evaluations per validation sample.
            lr_schedule: "constant" (Adam) or "onecycle" (Adam with a one-cycle learning rate).
        """
        super().__init__()
        if lr_schedule not in ("constant", "onecycle"):
            raise ValueError(f"lr_schedule must be 'constant' or 'onecycle', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["denoiser", "reference"])
        self.model = denoiser
        self.x_shape = tuple(x_shape)
        self.d = math.prod(self.x_shape)
        self.proposal = utils.LogisticProposal(logsnr_loc, logsnr_scale, clip)
        self.reference = reference if reference is not None else utils.GaussianReference(self.d)
        self.val_sums = t.nn.ModuleList([SumMetric().set_dtype(t.float64) for _ in range(3)])
        self.val_seed = VAL_SEED  # the validation points' seed: fixed, so epochs compare paired

    # ------------------------------------------------------------------ the Gaussian channel
    def noisy_channel(self, x, logsnr, eps=None, generator=None):
        """z = sqrt(s(a)) x + sqrt(s(-a)) eps, eps ~ N(0, I). Returns (z, eps)."""
        if eps is None:
            eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return utils.noisy_channel(x, logsnr, eps), eps

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
        return -self(z, logsnr) / utils.append_dims(t.sigmoid(-logsnr).sqrt(), z.dim())

    # ------------------------------------------------------------------ the integrand
    def mse(self, x, logsnr, eps=None, generator=None):
        """mse(x, a) = ||eps - eps_hat(z, a)||^2 for one noise draw per sample."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        return utils.sq_norm(eps - self(z, logsnr))

    def mse_gap(self, x, logsnr, eps=None, generator=None):
        """||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2, the same eps in both terms."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        return utils.sq_norm(eps - self(z, logsnr)) - utils.sq_norm(eps - self.reference.eps(z, logsnr))

    # ------------------------------------------------------------------ the estimators
    def nll(self, batch, generator=None):
        """E[-log p(x)] over the batch in nats, the training loss (unbiased, unbiased gradient):
        mean_i -log q(x_i) + 1/2 w(a_i) mse_gap(x_i, a_i), one log SNR per sample, stratified
        across the batch and assigned at random."""
        x = self._data(batch)
        a, w = self.proposal.sample((len(x),), generator=generator, device=x.device, dtype=x.dtype)
        perm = t.randperm(len(x), generator=generator, device=x.device)
        g = 0.5 * w[perm] * self.mse_gap(x, a[perm], generator=generator)
        return _finite(self.reference.nll(x) + g, x, a[perm], g).mean()

    @t.no_grad()
    def nll_points(self, x, npoints=200, replicates=4, generator=None, chunk_size=None, index=None,
                   proposal=None):
        """-log p(x) in nats for every sample of x (B, *x_shape), with standard errors:

            -log p(x_i) ~= -log q(x_i) + mean_k 1/2 w(a_k) mse_gap(x_i, a_k, eps_k)

        Args:
            npoints: denoiser evaluations per sample, as `replicates` independent randomised
                Sobol sets (_rqmc_terms); the standard error is std_r / sqrt(replicates), whose
                square is unbiased (with 4 replicates the standard error itself is on average 8%
                low, the factor c4 of a normal sample's standard deviation).
            index: the samples' positions in the data set (an int offset or a (B,) tensor;
                default 0 .. B-1): sample i's points depend only on (generator's seed, index[i]),
                so a data set scored in batches gives the same numbers for any batch size.
            chunk_size: at most this many rows per denoiser call (bounded memory).
            proposal: the log-SNR importance distribution (default: this model's).
        Returns:
            (nll, stderr), each (B,).
        """
        _check_points(npoints, replicates)
        x = self._data(x)
        a, g = self._rqmc_terms(x, npoints, replicates, self.mse_gap, generator, chunk_size, index,
                                proposal)
        nll = _finite(self.reference.nll(x) + g.flatten(1).mean(1), x, a, g)
        return nll, g.mean(-1).std(-1) / math.sqrt(replicates)

    def nll_x(self, x, npoints=200, generator=None):
        """-log p(x) in nats for ONE sample x of shape x_shape."""
        return self.nll_points(x.unsqueeze(0), npoints, generator=generator)[0][0]

    def _rqmc_terms(self, x, npoints, replicates, integrand, generator=None, chunk_size=None,
                    index=None, proposal=None):
        """Terms 1/2 w(a) integrand(x, a, eps) at `npoints` randomised QMC points per sample, whose
        mean estimates the log-SNR integral. Returns (log SNRs, terms), each (B, R, npoints // R).

        The points of sample i are `replicates` digitally shifted Sobol sets in (u, noise) named by
        (seed, index[i], r) (utils.keyed_sobol; the seed is one draw from `generator`), with
        a = the proposal's quantile of u and eps = Phi^-1 of the rest: two models given the same
        seed and index see the same (a, eps), so their difference is a paired comparison.
        """
        proposal = proposal or self.proposal
        chunk_size = chunk_size or self._default_chunk()
        b, m = len(x), npoints // replicates
        seed = utils.stream_seed(generator)
        sample = _sample_index(index, b, x.device).repeat_interleave(replicates * m)
        replicate = t.arange(replicates, device=x.device).repeat_interleave(m).repeat(b)
        point = t.arange(m, device=x.device).repeat(b * replicates)
        u = utils.keyed_sobol(seed, (sample, replicate), point, m, [0], x.device)[:, 0]
        a, w = proposal.from_uniform(u, x.dtype)
        dims = t.arange(1, 1 + self.d, device=x.device)

        def block(rows):
            u = utils.keyed_sobol(seed, (sample[rows], replicate[rows]), point[rows], m, dims, x.device)
            eps = t.special.ndtri(u).to(x.dtype).view((-1,) + self.x_shape)
            return integrand(x[rows // (replicates * m)], a[rows], eps)
        values = _in_chunks(block, chunk_size, t.arange(len(a), device=x.device))
        return a.view(b, replicates, m), (0.5 * w * values).view(b, replicates, m)

    # ------------------------------------------------------------------ discrete data
    @t.no_grad()
    def nll_discrete_points(self, x, delta, npoints=256, replicates=4, rounding="none", lo=-1.,
                            generator=None, chunk_size=None, tails=True, levels=None,
                            temperature=1., index=None, proposal=None):
        """-log P(x) in nats for every sample of grid data x (values lo + k * delta), with standard
        errors:

            -log P(x) = 1/2 Int_{-inf}^{inf} E_eps ||eps - eps_hat(z, a)||^2 da

        exact for the optimal denoiser of the discrete distribution, an upper bound in
        expectation for any other. The proposal's range uses the points of nll_points (same seed
        and index: the same (a, eps)); the standard error covers that part. tails=True adds the
        rest in closed form (tail_terms); it is negligible above once the range reaches
        utils.grid_resolved_logsnr(delta). rounding: "none", "hard" or "soft" snaps x_hat to the
        grid at every log SNR (GridRounding, with levels and temperature).
        """
        _check_points(npoints, replicates)
        x = self._data(x)
        utils.grid_index(x, delta, lo, levels)
        proposal = proposal or self.proposal
        if rounding not in ("none", "hard", "soft"):
            raise ValueError(f"rounding must be 'none', 'hard' or 'soft', got {rounding!r}")
        denoiser = self if rounding == "none" else GridRounding(self, delta, rounding, lo, levels,
                                                                 temperature)

        def mse(xs, a, eps):
            z = utils.noisy_channel(xs, a, eps)
            return utils.sq_norm(eps - denoiser(z, a))
        a, g = self._rqmc_terms(x, npoints, replicates, mse, generator, chunk_size, index, proposal)
        nll = g.flatten(1).mean(1)
        if tails:
            nll = nll + sum(self.tail_terms(x, delta, lo, levels, proposal))
        return _finite(nll, x, a, g), g.mean(-1).std(-1) / math.sqrt(replicates)

    def tail_terms(self, x, delta, lo=-1., levels=None, proposal=None):
        """The parts of 1/2 Int E_eps ||eps - eps_hat||^2 da outside the proposal's range, for grid
        data x: (below, above), each (B,), in nats. Below: the reference's error in closed form
        (exact to leading order in e^a for a data-matched reference); above: the error of hard
        rounding (utils.rounding_tail). Both are errors of actual denoisers, so the total stays
        an upper bound in expectation: that of the hybrid denoiser using them outside the range."""
        a_lo, a_hi = (proposal or self.proposal).range
        below = 0.5 * self.reference.error_integral(x, float("-inf"), a_lo)
        return below, utils.rounding_tail(x, delta, a_hi, lo, levels)

    def rounded(self, delta, mode="hard", lo=-1., levels=None, temperature=1.):
        """This model with x_hat snapped to the grid at every log SNR (GridRounding), sharing its
        denoiser, as a DiffusionModel with the same proposal and reference: an ensemble member."""
        return self.with_denoiser(GridRounding(self, delta, mode, lo, levels, temperature))

    def with_denoiser(self, denoiser, reference=None):
        """A DiffusionModel around `denoiser` (used as it is: no Gaussian residual) with this one's
        hyperparameters and proposal and a copy of `reference` (default: this one's)."""
        source = self.reference if reference is None else reference
        copy = utils.GaussianReference(self.d)
        copy.load_state_dict(source.state_dict())
        hparams = dict(self.hparams, gaussian_residual=False)
        model = DiffusionModel(denoiser, reference=copy, **hparams).to(source.mean.device)
        model.proposal = self.proposal
        return model

    # ------------------------------------------------------------------ curves and samples
    @t.no_grad()
    def mse_curve(self, x, logsnrs, generator=None, chunk_size=None):
        """E_x E_eps mse(x, a) at each a of `logsnrs` (one noise draw per sample and a), batched
        over samples and log SNRs. Returns (model MSE, reference MMSE), each (K,)."""
        x = self._data(x)
        b, k = len(x), len(logsnrs)
        logsnrs = logsnrs.to(x.device, x.dtype)
        xs = x.repeat((k,) + (1,) * (x.dim() - 1))
        mse = _in_chunks(lambda xx, aa: self.mse(xx, aa, generator=generator),
                         chunk_size or self._default_chunk(), xs, logsnrs.repeat_interleave(b))
        return mse.view(k, b).mean(1), self.reference.mmse(logsnrs)

    def curve_logsnrs(self, n=48):
        """The grid MSE curves are shown on: n points over the proposal's range."""
        return self.proposal.grid(n)

    @t.no_grad()
    def sample(self, n, steps=200, generator=None):
        """Deterministic DDIM-style sampler in log-SNR space, on the proposal's quadrature grid
        (steps are spent where the MSE curve changes): from the reference's noisy marginal at the
        lowest log SNR, step a -> a' with x_hat = x_from_eps(z, a, eps_hat) and
        z' = noisy_channel(x_hat, a', eps_hat). Returns x_hat at the highest log SNR."""
        grid, _ = self.proposal.quadrature(steps, device=self.device, dtype=self.reference.mean.dtype)
        z = self.reference.sample(n, grid[0], generator).view((n,) + self.x_shape)
        for i in range(steps):
            a = grid[i].expand(n)
            eps_hat = self(z, a)
            x_hat = utils.x_from_eps(z, a, eps_hat)
            if i + 1 < steps:
                z = utils.noisy_channel(x_hat, grid[i + 1].expand(n), eps_hat)
        return x_hat

    def fit_reference(self, x, **kwargs):
        """Make the Gaussian reference data-matched (mean, covariance) from a data tensor."""
        self.reference.fit(self._data(x), **kwargs)
        return self

    @t.no_grad()
    def fit_proposal(self, x, pilot_points=4, bins=48, mix=0.5, generator=None, chunk_size=None):
        """Fit the log-SNR proposal to this model's integrand on held-out samples x; set and
        return it (a utils.FittedProposal over the current proposal's range; its logistic where
        the model equals the reference, as an untrained Gaussian residual does).

        The variance of the estimate per point, Int E f^2 / q - (Int f)^2 with f = 1/2 mse_gap,
        is smallest for q proportional to sqrt(E f^2); among densities constant on equal-width
        bins, for q_k proportional to the rms of f over the bin (docs/maths.md). The pilot is
        heldout_errors' (model and reference on common noise): for every sample, bin and one of
        `pilot_points` draws, a log SNR uniform in the bin and a noise vector, named by (seed,
        sample, draw), in one batched, chunked pass; utils.FittedProposal.from_terms. The result
        mixes the bins with the current logistic: q = (1 - mix) q_logistic + mix q_bins.
        Fit the reference first (the integrand is the gap to it), and score other samples than x.
        """
        x = self._data(x)
        if len(x) < utils.FittedProposal.MIN_SAMPLES:  # draws of one sample are not independent
            raise ValueError(f"fit_proposal needs at least {utils.FittedProposal.MIN_SAMPLES} "
                             f"held-out samples, got {len(x)}")
        if pilot_points < 1 or bins < 1:
            raise ValueError(f"need pilot_points >= 1 and bins >= 1, got {pilot_points}, {bins}")
        draws = x.repeat_interleave(pilot_points, 0)  # each draw keyed as a sample of its own
        errors = heldout_errors(lambda z, a: [self(z, a), self.reference.eps(z, a)], draws,
                                t.arange(len(draws), device=x.device), utils.stream_seed(generator),
                                bin_edges(self.proposal.range, bins, x.device),
                                chunk_size=chunk_size)
        self.proposal = utils.FittedProposal.from_terms(
            self.proposal, 0.5 * (errors[..., 0] - errors[..., 1]), mix)
        return self.proposal

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_idx):
        loss = self.nll(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_start(self):
        self._val_seen = 0

    def validation_step(self, batch, batch_idx):
        """Sample j of this process's shard gets the points of global index j * world + rank
        under val_seed: the same points every epoch (epochs compare paired), different points
        for every sample (DDP too), and no draw from the global RNG (training's)."""
        x = self._data(batch)
        index = (self._val_seen + t.arange(len(x), device=x.device)) * self.trainer.world_size
        index = index + self.global_rank
        self._val_seen += len(x)
        _, g = self._rqmc_terms(x, self.hparams.val_npoints, 1, self.mse_gap,
                                t.Generator().manual_seed(self.val_seed), index=index)
        nll = self.reference.nll(x) + g.flatten(1).mean(1)
        for metric, value in zip(self.val_sums, (nll, nll ** 2, t.ones_like(nll))):
            metric.update(value)

    def on_validation_epoch_end(self):
        """val_loss = E[-log p] in nats (and bits/dim) over the validation set, with its standard
        error over data and log SNR together: sqrt(Var_i(nll_i) / N)."""
        total, total_sq, n = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        mean, stderr = total / n, utils.stderr_from_sums(total, total_sq, n)
        self.log_dict({"val_loss": mean.float(), "val_loss_stderr": stderr.float(),
                       "val_bpd": utils.nats_to_bpd(mean, self.d).float()}, sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        """A fitted proposal travels with the checkpoint (the hyperparameters hold the logistic)."""
        if isinstance(self.proposal, utils.FittedProposal):
            checkpoint["fitted_proposal"] = self.proposal.state()

    def on_load_checkpoint(self, checkpoint):
        if "fitted_proposal" in checkpoint:
            self.proposal = utils.FittedProposal.from_state(checkpoint["fitted_proposal"])

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

    def _default_chunk(self):
        return default_chunk(self.d, self.device)


class GridRounding(t.nn.Module):
    """A denoiser whose estimate of x is snapped to the data grid lo + k * delta, per coordinate:

    - "hard": x_r = the nearest grid value (clamped to the `levels` values, if given);
    - "soft": x_r = the posterior mean over grid values g_k given x_hat ~ N(x, T e^-a) and a
      uniform prior over the grid, sum_k g_k softmax_k(-(x_hat - g_k)^2 e^a / (2 T)), over the
      2 * window grid values nearest x_hat. T = 1 is the softest temperature a denoiser can
      justify (docs/maths.md); smaller T are sharper variants to choose between on held-out data.

    eps_r = eps_from_x(z, a, x_r). Any function of z is a denoiser, so rounding keeps every
    estimate an upper bound; it helps at high SNR (x_hat within half a bin of x), hurts at low.
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
        return self.round_eps(z, logsnr, self.inner(z, logsnr))

    def round_eps(self, z, logsnr, eps_hat):
        """The rounded noise prediction from the inner denoiser's eps_hat."""
        x_hat = utils.x_from_eps(z, logsnr, eps_hat.to(z.dtype))
        x_r = self._hard(x_hat) if self.mode == "hard" else self._soft(x_hat, logsnr)
        return utils.eps_from_x(z, logsnr, x_r)

    def _clamp(self, k):
        return k.clamp(0, self.levels - 1) if self.levels is not None else k

    def _hard(self, x_hat):
        return self.lo + self.delta * self._clamp(((x_hat - self.lo) / self.delta).round())

    def _soft(self, x_hat, logsnr):
        a = utils.append_dims(logsnr.to(x_hat.dtype), x_hat.dim())
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
    """eps_hat(z, a) = eps_hat_m(z, a) with m = choice[bin of a]: per log-SNR bin, the member with
    the lowest MSE on held-out data. Log SNRs outside the bins use the nearest bin. Choosing by log
    SNR alone keeps it a denoiser, so its estimates stay upper bounds, and its expected error is
    at most each member's wherever the held-out choice is right. members[0] is the data-matched
    Gaussian (GaussianDenoiser) when built by `fit`.
    """

    def __init__(self, members, edges, choice, heldout_mse=None):
        super().__init__()
        self.members = t.nn.ModuleList(members)
        self.register_buffer("edges", t.as_tensor(edges, dtype=t.float64))
        self.register_buffer("choice", t.as_tensor(choice, dtype=t.long))
        if heldout_mse is None:
            heldout_mse = t.full((len(self.members), len(self.choice)), float("nan"))
        self.register_buffer("heldout_mse", t.as_tensor(heldout_mse, dtype=t.float64))

    @classmethod
    def from_heldout(cls, members, edges, heldout_mse):
        """The ensemble choosing, per bin, the member with the lowest held-out MSE (members x bins)."""
        heldout_mse = t.as_tensor(heldout_mse, dtype=t.float64)
        return cls(members, edges, heldout_mse.argmin(0), heldout_mse)

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

        Args:
            members: denoisers member(z, logsnr) -> eps_hat (DiffusionModels, rounded() variants).
            x: held-out samples, never the data the ensemble is scored on.
            bins, logsnr_range: equal-width bins over logsnr_range (default: the first
                DiffusionModel member's proposal range).
            draws: (log SNR, noise) draws per sample and bin (heldout_errors).
            reference: the Gaussian member (default: fitted to x).
        """
        members = list(members)
        x = x[0] if isinstance(x, (list, tuple)) else x
        if logsnr_range is None:
            like = next((m for m in members if isinstance(m, DiffusionModel)), None)
            if like is None:
                raise ValueError("give logsnr_range when no member is a DiffusionModel")
            logsnr_range = like.proposal.range
        if reference is None:
            reference = utils.GaussianReference(x[0].numel()).to(x.device, x.dtype).fit(x)
        everyone = [GaussianDenoiser(reference)] + members
        edges = bin_edges(logsnr_range, bins, x.device)
        errors = heldout_errors(lambda z, a: [m(z, a) for m in everyone], x, t.arange(len(x)),
                                utils.stream_seed(generator), edges, draws, chunk_size)
        return cls.from_heldout(everyone, edges, errors.mean(0).T)

    def as_model(self, like):
        """A DiffusionModel around this ensemble with `like`'s hyperparameters and the Gaussian
        member as its reference: nll_points, nll_discrete_points and mse_curve then apply."""
        return like.with_denoiser(self, reference=self.members[0].reference)


def bin_edges(logsnr_range, bins, device=None):
    """bins + 1 equal-width log-SNR bin edges over logsnr_range (float64)."""
    if not logsnr_range[0] < logsnr_range[1] or bins < 1:
        raise ValueError(f"need logsnr_range lo < hi and bins >= 1, got {logsnr_range}, {bins}")
    return t.linspace(*logsnr_range, bins + 1, dtype=t.float64, device=device)


@t.no_grad()
def heldout_errors(candidates, x, index, seed, edges, draws=1, chunk_size=None):
    """Held-out errors ||eps - eps_hat_m(z, a)||^2 of every candidate m, per sample and log-SNR bin.

    Args:
        candidates: (z, a) -> list of M noise predictions (sharing work between candidates, e.g.
            one base denoiser and its rounded variants).
        x, index: samples and their positions in the data set. Each (sample, bin, draw) has a log
            SNR uniform in the bin and a noise vector, common to all candidates (a paired
            comparison) and named by (seed, index, bin, draw): independent of the batch layout.
        edges: the bins' edges (bin_edges).
    Returns:
        (B, bins, M) float64 errors, averaged over the draws.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n, bins, dev = len(x), len(edges) - 1, x.device
    d, edges = x[0].numel(), edges.to(dev)
    sample, k, j = (v.flatten() for v in t.meshgrid(
        t.arange(n, device=dev), t.arange(bins, device=dev), t.arange(draws, device=dev),
        indexing="ij"))
    key = t.as_tensor(index, device=dev).view(-1)[sample]
    u = utils.counter_uniform(seed, key, k, j, 0, device=dev)
    a = (edges[k] + (edges[k + 1] - edges[k]) * u).to(x.dtype)
    dims = t.arange(1, d + 1, device=dev)

    def block(rows):
        u = utils.counter_uniform(seed, key[rows, None], k[rows, None], j[rows, None], dims,
                                  device=dev)
        eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x.shape[1:])
        z = utils.noisy_channel(x[sample[rows]], a[rows], eps)
        return t.stack([utils.sq_norm(eps - e.to(z.dtype)) for e in candidates(z, a[rows])], 1)
    errors = _in_chunks(block, chunk_size or default_chunk(d, dev), t.arange(len(a), device=dev))
    return errors.view(n, bins, draws, -1).double().mean(2)


# ---------------------------------------------------------------------------------------------
# The discrete-time variational bound of a T-step schedule (DDPM, Ho et al. 2020)
# ---------------------------------------------------------------------------------------------
POSTERIOR_VARIANCES = ("fixed_small", "fixed_large")
_VB_STREAM = 0x5642  # tags the bound's random numbers apart from the other keyed streams


class VBSchedule:
    """The coefficients of the discrete-time bound of a schedule alphas_cumprod (T,), float64,
    indexed by t = 0 .. T (ab_0 = 1; DDPM's t is alphas_cumprod's index + 1):

    a_t = log(ab_t / (1 - ab_t)), beta_t = 1 - ab_t / ab_{t-1}, beta_tilde_t = (1 - ab_{t-1}) /
    (1 - ab_t) beta_t, sigma_t^2 = beta_tilde_t ("fixed_small") or beta_t ("fixed_large") for
    t >= 2; the decoder's sigma_1^2 = beta_tilde_2 with either choice (beta_tilde_1 = 0; DDPM's
    code clips the log variance to it). Per coordinate the KL of step t is
    coef_t (eps - eps_hat)^2 + const_t with coef_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t))
    and const_t = (log r + 1 / r - 1) / 2, r = sigma_t^2 / beta_tilde_t (docs/maths.md).
    """

    def __init__(self, alphas_cumprod, posterior_variance="fixed_small", device=None):
        if posterior_variance not in POSTERIOR_VARIANCES:
            raise ValueError(f"posterior_variance must be one of {POSTERIOR_VARIANCES}, got "
                             f"{posterior_variance!r}")
        ab = t.as_tensor(alphas_cumprod).detach().to("cpu", t.float64)
        if ab.dim() != 1 or len(ab) < 3:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 3 timesteps, got shape "
                             f"{tuple(ab.shape)}")
        if not (t.isfinite(ab).all() and (ab > 0).all() and (ab < 1).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        if not (ab[1:] < ab[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (t = 1 is the least noisy "
                             "step, as in diffusers' DDPMScheduler.alphas_cumprod)")
        self.T, self.posterior_variance = len(ab), posterior_variance
        ab = t.cat([t.ones(1, dtype=t.float64), ab])
        log_ab = ab.log()
        a = t.cat([t.full((1,), float("inf"), dtype=t.float64), utils.schedule_logsnr(ab[1:])])
        beta = t.cat([t.zeros(1, dtype=t.float64), -t.expm1(log_ab[1:] - log_ab[:-1])])
        beta_tilde = t.cat([t.zeros(1, dtype=t.float64), (1 - ab[:-1]) / (1 - ab[1:]) * beta[1:]])
        sigma2 = (beta_tilde if posterior_variance == "fixed_small" else beta).clone()
        sigma2[:2] = beta_tilde[2]
        ratio = t.ones_like(sigma2)
        ratio[2:] = sigma2[2:] / beta_tilde[2:]
        coef = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - ab))
        coef[:2] = 0
        const = 0.5 * (ratio.log() + 1 / ratio - 1)
        const[:2] = 0
        self.ab, self.logsnr, self.beta, self.beta_tilde, self.sigma2, self.coef, self.const = (
            v.to(device) for v in (ab, a, beta, beta_tilde, sigma2, coef, const))

    def prior(self, x):
        """L_T = KL(N(sqrt(ab_T) x, (1 - ab_T) I) || N(0, I)) per sample, float64:
        1/2 sum_i [ab_T (x_i^2 - 1) - log(1 - ab_T)]."""
        ab = self.ab[-1]
        return 0.5 * (ab * (x.double().flatten(1) ** 2 - 1) - t.log1p(-ab)).sum(1)


def vb_terms(model, x, timesteps, eps, schedule, delta=None, lo=-1., levels=None):
    """The terms of the discrete-time bound for rows (x, t, eps), in nats (float64, (rows,)):
    z = noisy_channel(x, a_t, eps) (DDPM's x_t), eps_hat = model(z, a_t), and

    - t >= 2: L_{t-1} = KL(q(x_{t-1} | x_t, x) || p(x_{t-1} | x_t)) = sum_i coef_t (eps_i -
      eps_hat_i)^2 + d const_t: the Gaussians' means differ by sqrt(ab_{t-1}) beta_t / (1 - ab_t)
      (x - x_hat) with x_hat = x_from_eps(z, a_t, eps_hat), unclipped;
    - t = 1: L_0 = -log of the discretised Gaussian decoder's mass at grid data x (needs delta):
      per coordinate the mass of N(x_hat, sigma_1^2) over [x - delta/2, x + delta/2], the outermost
      bins reaching -+inf when `levels` is given (mu_theta(x_1) = x_hat since ab_0 = 1).

    schedule: a VBSchedule. Exposed so that the terms can be checked against closed forms.
    """
    timesteps = t.as_tensor(timesteps, dtype=t.int64, device=x.device).view(-1)
    if len(timesteps) and not (1 <= int(timesteps.min()) and int(timesteps.max()) <= schedule.T):
        raise ValueError(f"timesteps must lie in 1 .. {schedule.T}")
    a = schedule.logsnr.to(x.device)[timesteps]
    z = utils.noisy_channel(x, a, eps)
    eps_hat = model(z, a.to(x.dtype)).to(x.dtype)
    d = x[0].numel()
    kl = (schedule.coef.to(x.device)[timesteps] * utils.sq_norm((eps - eps_hat).double())
          + d * schedule.const.to(x.device)[timesteps])
    first = timesteps == 1
    if not first.any():
        return kl
    if delta is None:
        raise ValueError("the decoder term (t = 1) needs the grid's delta")
    rows = first.nonzero().squeeze(1)
    x_hat = utils.x_from_eps(z[rows].double(), a[rows], eps_hat[rows].double())
    std = schedule.sigma2[1].sqrt().item()
    log_mass = _log_bin_mass(x[rows].double(), x_hat, std, delta, lo, levels)
    return kl.index_put((rows,), -log_mass.flatten(1).sum(1))


def _log_bin_mass(x, mean, std, delta, lo=-1., levels=None):
    """log of the mass of N(mean, std^2) over x's grid bin [x - delta/2, x + delta/2] (the
    outermost bins reach -+inf when `levels` is given), elementwise, stably
    (utils.log_ndtr_diff)."""
    below = (x - delta / 2 - mean) / std
    above = (x + delta / 2 - mean) / std
    if levels is not None:
        k = ((x - lo) / delta).round()
        below = below.masked_fill(k <= 0, float("-inf"))
        above = above.masked_fill(k >= levels - 1, float("inf"))
    return utils.log_ndtr_diff(below, above)


@t.no_grad()
def variational_bound(model, x, delta, alphas_cumprod, lo=-1., levels=None, steps=None,
                      posterior_variance="fixed_small", generator=None, index=None, chunk_size=None):
    """The negative ELBO of a T-step discrete-time diffusion (DDPM, Ho et al. 2020) for every
    sample of grid data x (values lo + k * delta), in nats: an upper bound on -log P(x),

        -L = L_T + sum_{t=2}^{T} L_{t-1} + L_0          (vb_terms; docs/maths.md)

    Args:
        model: a DiffusionModel or any denoiser model(z, a) -> eps_hat, called at each step's log
            SNR a_t = log(ab_t / (1 - ab_t)) (our channel at a_t is DDPM's x_t).
        alphas_cumprod: (T,) strictly decreasing, e.g. diffusers' DDPMScheduler.alphas_cumprod.
        levels: the number of grid values; then the decoder's outermost bins reach -+inf.
        steps: None sums all T - 1 KL terms (one noise draw each); an int k in 2 .. T - 1 draws
            k timesteps per sample uniformly without replacement among 2 .. T and scales their sum
            by (T - 1) / k (unbiased). L_T is exact; L_0 is the mean of two noise draws.
        posterior_variance: "fixed_small" (sigma_t^2 = beta_tilde_t) or "fixed_large" (beta_t).
        index: the samples' positions in the data set (int offset or (B,); default 0 .. B-1):
            every random number is named by (seed from generator, index, t, draw), so a sample's
            value does not depend on the batch it is in.
        chunk_size: at most this many (sample, t) rows per denoiser call.
    Returns:
        (nll, stderr), each (B,), in x's dtype. stderr^2 = var_KL + (L_0' - L_0'')^2 / 4 (the two
        decoder draws); var_KL = (T - 1)^2 s^2 / k for subsampled steps (s^2 the sample variance of
        the k terms; no finite-population correction, since the terms' own noise is not reduced
        by sampling without replacement: conservative by at most a factor 1 / (1 - k / (T - 1))),
        and for steps=None the successive-difference estimate
        n / (2 (n - 1)) sum_t (L_t - L_{t-1})^2 of the variance of the sum of n = T - 1
        independent terms (conservative by the terms' trend in t only).
    """
    if isinstance(model, DiffusionModel):
        x = model._data(x)
    schedule = VBSchedule(alphas_cumprod, posterior_variance, device=x.device)
    T = schedule.T
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 2 <= steps <= T - 1):
        raise ValueError(f"steps must be None or an int in 2 .. T - 1 = {T - 1} (the KL terms "
                         f"t = 2 .. T), got {steps!r}")
    utils.grid_index(x, delta, lo, levels)
    b, dev, d = len(x), x.device, x[0].numel()
    seed = utils.stream_seed(generator)
    key = _sample_index(index, b, dev)
    candidates = t.arange(2, T + 1, device=dev)
    if steps is None:
        chosen = candidates.expand(b, -1)
    else:
        u = utils.counter_uniform(seed, _VB_STREAM, key[:, None], candidates, -1, device=dev)
        chosen = candidates[u.topk(steps, 1, largest=False).indices].sort(1).values
    m = chosen.shape[1]
    timesteps = t.cat([chosen, t.ones(b, 2, dtype=t.int64, device=dev)], 1).flatten()
    draw = t.cat([t.zeros(m, dtype=t.int64), t.arange(2)]).to(dev).repeat(b)
    dims = t.arange(d, device=dev)

    def block(rows):
        s = rows // (m + 2)
        u = utils.counter_uniform(seed, _VB_STREAM, key[s, None], timesteps[rows, None],
                                  draw[rows, None], dims, device=dev)
        eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x.shape[1:])
        return vb_terms(model, x[s], timesteps[rows], eps, schedule, delta, lo, levels)
    terms = _in_chunks(block, chunk_size or default_chunk(d, dev),
                       t.arange(b * (m + 2), device=dev)).view(b, m + 2)
    if not t.isfinite(terms).all():
        bad = sorted(set(timesteps.view(b, m + 2)[~t.isfinite(terms)].tolist()))
        raise FloatingPointError(f"non-finite variational-bound terms at t = {bad[:10]}")
    kl, decoder = terms[:, :m], terms[:, m:]
    if steps is None:
        total, var = kl.sum(1), m / (2 * (m - 1)) * kl.diff(dim=1).pow(2).sum(1)
    else:
        total, var = (T - 1) / m * kl.sum(1), (T - 1) ** 2 * kl.var(1) / m
    nll = schedule.prior(x) + total + decoder.mean(1)
    stderr = (var + (decoder[:, 0] - decoder[:, 1]) ** 2 / 4).sqrt()
    return nll.to(x.dtype), stderr.to(x.dtype)


def default_chunk(d, device):
    """Rows per denoiser call: cache-sized on CPU; on an accelerator large enough to fill it (682
    CIFAR-10 images) while activations stay within a few GB."""
    return max(1, (2 ** 18 if t.device(device).type == "cpu" else 2 ** 21) // d)


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


def _in_chunks(fn, chunk_size, *rows):
    """fn applied to consecutive row blocks of at most chunk_size rows, concatenated."""
    n = len(rows[0])
    if chunk_size is None or n <= chunk_size:
        return fn(*rows)
    return t.cat([fn(*(r[i:i + chunk_size] for r in rows)) for i in range(0, n, chunk_size)])


def _finite(nll, x, logsnr, terms):
    """nll, or an error naming the cause: non-finite data, reference, or log SNRs."""
    if t.isfinite(nll).all():
        return nll
    if not t.isfinite(x).all():
        raise ValueError("x contains non-finite values (nan or inf)")
    bad = sorted({round(v, 3) for v in logsnr.expand_as(terms)[~t.isfinite(terms)].tolist()})
    if not bad:
        raise FloatingPointError("non-finite -log q(x) under the Gaussian reference")
    raise FloatingPointError(f"non-finite loss at log SNR {bad[:10]}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
