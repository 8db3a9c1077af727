"""Information-theoretic diffusion (Kong, Brekelmans, Ver Steeg, ICLR 2023) as a LightningModule.

Any denoiser eps_hat = denoiser(z, logsnr) (output shape = input shape) becomes a density model:

    -log p(x) = -log q(x) + 1/2 Int E_eps[ ||eps - eps_hat(z, a)||^2 - ||eps - eps_G(z, a)||^2 ] da

with z = sqrt(s(a)) x + sqrt(s(-a)) eps, q a Gaussian reference and eps_G its optimal noise
predictor on the same eps (a control variate without parameters). Exact for the optimal denoiser,
an upper bound in expectation for any other: both the training loss and the metric. Grid data
(8-bit images) have a mass instead, -log P(x) = 1/2 Int E_eps ||eps - eps_hat||^2 da. The
derivations are in docs/maths.md.
"""
import math

import pytorch_lightning as pl
import torch as t
from torchmetrics import SumMetric

import ode
import utils
from denoisers import GridRounding
from proposals import BINS, FittedProposal, LogisticProposal

VAL_SEED = 0x7661  # the validation points' seed (keyed by sample index, so any fixed value)


class DiffusionModel(pl.LightningModule):
    def __init__(self, denoiser, x_shape=(2,), reference=None, learning_rate=1e-3, logsnr_loc=0.,
                 logsnr_scale=3., clip=4., gaussian_residual=False, val_npoints=16,
                 lr_schedule="constant", seed=None, num_classes=None, label_dropout=0.1):
        """
        Args:
            denoiser: module called as denoiser(z, logsnr) -> eps_hat, logsnr of shape (batch,);
                with num_classes, denoiser(z, logsnr, y) with y a LongTensor of labels in
                0 .. num_classes - 1, -1 where a sample has no label, or y=None for none.
            x_shape: the shape of one sample.
            reference: a utils.GaussianReference (default N(0, I); see fit_reference).
            logsnr_loc, logsnr_scale, clip: the importance distribution over log SNR
                (proposals.LogisticProposal), truncated to loc +- clip * scale.
            gaussian_residual: eps_hat = eps_G + denoiser(z, a), so an untrained net starts at
                the reference's MMSE curve instead of above it.
            val_npoints: denoiser evaluations per validation sample.
            lr_schedule: "constant" (Adam) or "onecycle" (Adam with a one-cycle learning rate).
            seed: names the training noise: optimizer step s on process r draws its log SNRs and
                noise from (seed, s, r), so a resumed run draws what the uninterrupted one did
                (default: a fresh seed from torch's global RNG).
            num_classes: a conditional model of p(x | y): batches are (x, y), and training drops
                a label with probability label_dropout, so the one denoiser gives p(x | y) and,
                without a label, p(x) (nll_points(y=...), mi_points, class_log_posterior).
        """
        super().__init__()
        if lr_schedule not in ("constant", "onecycle"):
            raise ValueError(f"lr_schedule must be 'constant' or 'onecycle', got {lr_schedule!r}")
        if num_classes is not None and not (num_classes >= 2 and 0 <= label_dropout < 1):
            raise ValueError(f"need num_classes >= 2 and 0 <= label_dropout < 1, got "
                             f"{num_classes}, {label_dropout}")
        seed = utils.fresh_seed(seed)
        self.save_hyperparameters(ignore=["denoiser", "reference"])
        self.model = denoiser
        self.x_shape = tuple(x_shape)
        self.d = math.prod(self.x_shape)
        self.proposal = LogisticProposal(logsnr_loc, logsnr_scale, clip)
        self.reference = reference if reference is not None else utils.GaussianReference(self.d)
        self.val_sums = t.nn.ModuleList([SumMetric().set_dtype(t.float64) for _ in range(3)])
        if num_classes is not None:  # log p(y), for class_log_posterior (fit_label_prior)
            self.register_buffer("label_log_prior", t.full((num_classes,), -math.log(num_classes)))
        self.val_seed = VAL_SEED  # the validation points' seed (fixed: docs/maths.md)

    # ------------------------------------------------------------------ the Gaussian channel
    def noisy_channel(self, x, logsnr, eps=None, generator=None):
        """z = sqrt(s(a)) x + sqrt(s(-a)) eps, eps ~ N(0, I). Returns (z, eps)."""
        if eps is None:
            eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return utils.noisy_channel(x, logsnr, eps), eps

    def forward(self, z, logsnr, y=None):
        """eps_hat(z, a[, y]), in z's dtype (float32 under bf16 autocast, so losses stay float32)."""
        residual = self.reference.eps(z, logsnr) if self.hparams.gaussian_residual else None
        return self._denoise(z, logsnr, residual, y)

    def with_reference(self, z, logsnr, y=None):
        """(eps_hat, eps_G) on the same z, the reference's computed once."""
        eps_g = self.reference.eps(z, logsnr)
        return self._denoise(z, logsnr, eps_g, y), eps_g

    def _denoise(self, z, logsnr, eps_g=None, y=None):
        """The denoiser's prediction (given the labels y of a conditional model; none: p(x)'s),
        plus eps_g (the reference's, computed by the caller) for a Gaussian residual."""
        if self.hparams.get("num_classes") is None:
            if y is not None:
                raise ValueError("labels given to an unconditional model (num_classes=None)")
            eps_hat = self.model(z, logsnr)
        else:
            eps_hat = self.model(z, logsnr, y)
        if eps_hat.shape != z.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps_hat.shape)}, expected the input "
                             f"shape {tuple(z.shape)}")
        eps_hat = eps_hat.to(z.dtype)
        return eps_hat + eps_g if self.hparams.gaussian_residual else eps_hat

    def score(self, z, logsnr):
        """grad_z log p_a(z) = -eps_hat(z, a) / sqrt(s(-a)); the data score as a -> inf."""
        return -self(z, logsnr) / utils.append_dims(t.sigmoid(-logsnr).sqrt(), z.dim())

    # ------------------------------------------------------------------ the integrand
    def mse(self, x, logsnr, eps=None, generator=None, y=None):
        """mse(x, a) = ||eps - eps_hat(z, a)||^2 for one noise draw per sample."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        return utils.sq_norm(eps - self(z, logsnr, y))

    def mse_gap(self, x, logsnr, eps=None, generator=None, y=None):
        """||eps - eps_hat(z, a[, y])||^2 - ||eps - eps_G(z, a)||^2, the same eps in both terms."""
        z, eps = self.noisy_channel(x, logsnr, eps, generator)
        eps_hat, eps_g = self.with_reference(z, logsnr, y)
        return utils.sq_norm(eps - eps_hat) - utils.sq_norm(eps - eps_g)

    # ------------------------------------------------------------------ the estimators
    def nll(self, batch, generator=None):
        """E[-log p(x)] over the batch in nats, the training loss (unbiased, unbiased gradient):
        mean_i -log q(x_i) + 1/2 w(a_i) mse_gap(x_i, a_i), one log SNR per sample, stratified
        across the batch and assigned at random. A conditional model's batch (x, y) gives
        E[-log p(x | y)], each label dropped (p(x)'s term) with probability label_dropout."""
        x, y = self._data(batch), self._labels(batch)
        a, w = self.proposal.sample((len(x),), generator=generator, device=x.device, dtype=x.dtype)
        perm = t.randperm(len(x), generator=generator, device=x.device)
        if y is not None and self.hparams.label_dropout > 0:
            dropped = t.rand(len(y), generator=generator, device=y.device) < self.hparams.label_dropout
            y = y.masked_fill(dropped, -1)
        g = 0.5 * w[perm] * self.mse_gap(x, a[perm], generator=generator, y=y)
        return _finite(self.reference.nll(x) + g, x, a[perm], g).mean()

    @t.no_grad()
    def nll_points(self, x, npoints=200, replicates=4, seed=None, chunk_size=None, index=None,
                   proposal=None, y=None):
        """-log p(x) in nats for every sample of x (B, *x_shape) -- with labels y of a
        conditional model, -log p(x | y) --, with standard errors:

            -log p(x_i) ~= -log q(x_i) + mean_k 1/2 w(a_k) mse_gap(x_i, a_k, eps_k)

        Args:
            npoints: denoiser evaluations per sample, as `replicates` independent randomised
                Sobol sets (_rqmc_terms); the standard error is std_r / sqrt(replicates), whose
                square is unbiased (with 4 replicates the standard error itself is on average 8%
                low, the factor c4 of a normal sample's standard deviation).
            index: the samples' positions in the data set (an int offset or a (B,) tensor;
                default 0 .. B-1): sample i's points depend only on (seed, index[i]),
                so a data set scored in batches gives the same numbers for any batch size.
            chunk_size: at most this many rows per denoiser call (bounded memory).
            proposal: the log-SNR importance distribution (default: this model's).
        Returns:
            (nll, stderr), each (B,).
        """
        _check_points(npoints, replicates)
        x, y = self._data(x), self._labels((x, y))

        def gap(xs, a, eps, ys=None):
            return self.mse_gap(xs, a, eps, y=ys)
        a, g = self._rqmc_terms(x, npoints, replicates, gap, seed, chunk_size, index, proposal, y)
        nll = _finite(self.reference.nll(x) + g.flatten(1).mean(1), x, a, g)
        return nll, g.mean(-1).std(-1) / math.sqrt(replicates)

    @t.no_grad()
    def label_terms(self, x, labels, npoints=200, replicates=4, seed=None, chunk_size=None,
                    index=None, proposal=None, per_dim=False):
        """For every sample and each of its labels k (labels: (B, L), or (L,) for every sample;
        -1: no label, p(x)'s denoiser) the integral

            1/2 Int E_eps[ ||eps - eps_hat(z, a, k)||^2 - ||eps - eps_G(z, a)||^2 ] da,

        all labels on the sample's points of nll_points (same seed and index), so -log p(x | k)
        = -log q(x) + its estimate and differences between labels are paired. Returns the
        replicates' estimates (B, R, L); per_dim: the integrand's mean in every coordinate
        instead, (B, L, *x_shape)."""
        _check_points(npoints, replicates)
        x = self._data(x)
        if self.hparams.get("num_classes") is None:
            raise ValueError("labels need a conditional model (num_classes)")
        labels = t.as_tensor(labels, device=x.device).long()
        labels = labels.expand(len(x), -1) if labels.dim() == 1 else labels
        n = labels.shape[1]

        def gaps(xs, a, eps, ys):  # ys (rows, n): every label of a row on its one (a, eps)
            z = utils.noisy_channel(xs, a, eps)
            eps_g = self.reference.eps(z, a)
            copies = (n,) + (1,) * (z.dim() - 1)
            eps_hat = self._denoise(z.repeat(copies), a.repeat(n), eps_g.repeat(copies),
                                    ys.T.flatten())
            gap = ((eps.repeat(copies) - eps_hat) ** 2).view((n, -1) + self.x_shape) - (
                eps - eps_g) ** 2
            gap = gap if per_dim else gap.flatten(2).sum(2)
            return gap.transpose(0, 1)  # (rows, n[, *x_shape])
        chunk = max(1, (chunk_size or self._default_chunk()) // n)
        _, g = self._rqmc_terms(x, npoints, replicates, gaps, seed, chunk, index, proposal, labels)
        return g.mean((1, 2)) if per_dim else g.mean(2)

    @t.no_grad()
    def mi_points(self, x, y, npoints=200, replicates=4, seed=None, chunk_size=None, index=None,
                  proposal=None, per_dim=False):
        """Pointwise mutual information i(x; y) = log p(x | y) - log p(x) in nats for every
        sample (x, y) of a conditional model, with standard errors:

            i(x; y) = 1/2 Int E_eps[ ||eps - eps_hat(z, a)||^2 - ||eps - eps_hat(z, a, y)||^2 ] da

        with the same noise in both terms (unbiased per point for optimal denoisers; Kong et al.
        2024): label_terms of "no label" minus those of y. per_dim: the integrand's part in
        every coordinate instead, (B, *x_shape) without errors: where the label's information
        lives (sums to i(x; y))."""
        y = self._labels((self._data(x), y))
        if y is None:
            raise ValueError("mi_points needs a conditional model and labels y")
        terms = self.label_terms(x, t.stack([t.full_like(y, -1), y], 1), npoints, replicates,
                                 seed, chunk_size, index, proposal, per_dim)
        gain = terms[:, 0] - terms[:, 1] if per_dim else terms[..., 0] - terms[..., 1]
        return gain if per_dim else (gain.mean(1), gain.std(1) / math.sqrt(replicates))

    @t.no_grad()
    def class_log_posterior(self, x, npoints=200, log_prior=None, replicates=4, seed=None,
                            chunk_size=None, index=None, proposal=None):
        """log p(y | x) for every sample and label of a conditional model, (B, num_classes):
        log p(y) + log p(x | y) normalised over the labels (Bayes' rule), with -log p(x | y)
        estimated for all labels on the same (log SNR, noise) points (label_terms).
        log_prior: log p(y) (default: label_log_prior, uniform until fit_label_prior sets the
        training labels' frequencies)."""
        k = self.hparams.get("num_classes")
        terms = self.label_terms(x, t.arange(k or 0), npoints, replicates, seed, chunk_size,
                                 index, proposal)
        return self.label_log_posterior(terms.mean(1), log_prior)

    def label_log_posterior(self, terms, log_prior=None):
        """log p(k | x), (B, K), from the label_terms of labels 0 .. K-1 (B, K) by Bayes' rule
        (-log q(x), common to all labels, cancels)."""
        prior = self.label_log_prior if log_prior is None else t.as_tensor(log_prior)
        return (prior.to(terms) - terms).log_softmax(1)

    def fit_label_prior(self, y):
        """log p(y): the label frequencies of y (the training labels)."""
        counts = t.bincount(t.as_tensor(y).flatten(), minlength=self.hparams.num_classes)
        self.label_log_prior = (counts / counts.sum()).log().to(self.label_log_prior)
        return self

    def nll_x(self, x, npoints=200, seed=None):
        """-log p(x) in nats for ONE sample x of shape x_shape."""
        return self.nll_points(x.unsqueeze(0), npoints, seed=seed)[0][0]

    def _rqmc_terms(self, x, npoints, replicates, integrand, seed=None, chunk_size=None,
                    index=None, proposal=None, labels=None):
        """Terms 1/2 w(a) integrand(x, a, eps[, labels]) at `npoints` randomised QMC points per
        sample, whose mean estimates the log-SNR integral. Returns (log SNRs (B, R, npoints // R),
        terms (B, R, npoints // R, *what the integrand returns per row))).

        The points of sample i are `replicates` digitally shifted Sobol sets in (u, noise) named by
        (seed, index[i], r) (utils.keyed_sobol; seed None: a fresh one), with
        a = the proposal's quantile of u and eps = Phi^-1 of the rest: two models given the same
        seed and index see the same (a, eps), so their difference is a paired comparison.
        """
        proposal = proposal or self.proposal
        chunk_size = chunk_size or self._default_chunk()
        b, m = len(x), npoints // replicates
        seed = utils.fresh_seed(seed)
        sample = utils.sample_index(index, b, x.device).repeat_interleave(replicates * m)
        replicate = t.arange(replicates, device=x.device).repeat_interleave(m).repeat(b)
        point = t.arange(m, device=x.device).repeat(b * replicates)
        u = utils.keyed_sobol(seed, (sample, replicate), point, m, [0], x.device)[:, 0]
        a, w = proposal.from_uniform(u, x.dtype)
        dims = t.arange(1, 1 + self.d, device=x.device)

        def block(rows):
            u = utils.keyed_sobol(seed, (sample[rows], replicate[rows]), point[rows], m, dims, x.device)
            eps = t.special.ndtri(u).to(x.dtype).view((-1,) + self.x_shape)
            s = rows // (replicates * m)
            return integrand(x[s], a[rows], eps, *([] if labels is None else [labels[s]]))
        values = in_chunks(block, chunk_size, t.arange(len(a), device=x.device))
        terms = 0.5 * utils.append_dims(w, values.dim()) * values
        return a.view(b, replicates, m), terms.view((b, replicates, m) + values.shape[1:])

    @t.no_grad()
    def nll_ode(self, x, trace="exact", probes=1, rtol=1e-5, atol=1e-5, seed=None, index=None):
        """-log p(x) in nats per sample of the density this model's probability-flow ODE defines
        (the denoiser over the proposal's range, the reference's exact one beyond), with
        info {"nfe": denoiser evaluations per sample, each with its divergence: exact, one
        vector-Jacobian product per dimension, or Hutchinson's with `probes` Rademacher vectors;
        "rtol", "atol", ...}: ode.nll_ode. Not an estimate of the same number as nll_points for a
        trained model: the ODE's density is another density than the one the denoiser's errors
        bound (they agree for the optimal denoiser)."""
        return ode.nll_ode(self, x, trace, probes, rtol, atol, seed, index)

    # ------------------------------------------------------------------ discrete data
    @t.no_grad()
    def nll_discrete_points(self, x, grid, npoints=256, replicates=4, rounding="none", seed=None,
                            chunk_size=None, tails=True, temperature=1., index=None, proposal=None):
        """-log P(x) in nats for every sample of data x on a utils.Grid, with standard errors:

            -log P(x) = 1/2 Int_{-inf}^{inf} E_eps ||eps - eps_hat(z, a)||^2 da

        exact for the optimal denoiser of the discrete distribution, an upper bound in
        expectation for any other. The proposal's range uses the points of nll_points (same seed
        and index: the same (a, eps)); the standard error covers that part. tails=True adds the
        rest in closed form (tail_terms); it is negligible above once the range reaches
        utils.grid_resolved_logsnr(delta). rounding: "none", "hard" or "soft" snaps x_hat to the
        grid at every log SNR (GridRounding, with temperature).
        """
        _check_points(npoints, replicates)
        x = self._data(x)
        grid.index(x)
        proposal = proposal or self.proposal
        if rounding not in ("none", "hard", "soft"):
            raise ValueError(f"rounding must be 'none', 'hard' or 'soft', got {rounding!r}")
        denoiser = self if rounding == "none" else GridRounding(self, grid, rounding, temperature)

        def mse(xs, a, eps):
            z = utils.noisy_channel(xs, a, eps)
            return utils.sq_norm(eps - denoiser(z, a))
        a, g = self._rqmc_terms(x, npoints, replicates, mse, seed, chunk_size, index, proposal)
        nll = g.flatten(1).mean(1)
        if tails:
            nll = nll + sum(self.tail_terms(x, grid, proposal))
        return _finite(nll, x, a, g), g.mean(-1).std(-1) / math.sqrt(replicates)

    def tail_terms(self, x, grid, proposal=None):
        """The parts of 1/2 Int E_eps ||eps - eps_hat||^2 da outside the proposal's range, for data
        x on a grid: (below, above), each (B,), in nats. Below: the reference's error in closed
        form (exact to leading order in e^a for a data-matched reference); above: the error of
        hard rounding (utils.rounding_tail). Both are errors of actual denoisers, so the total
        stays an upper bound in expectation: that of the hybrid denoiser using them outside the
        range."""
        a_lo, a_hi = (proposal or self.proposal).range
        below = 0.5 * self.reference.error_integral(x, float("-inf"), a_lo)
        return below, utils.rounding_tail(x, grid, a_hi)

    def rounded(self, grid, mode="hard", temperature=1.):
        """This model with x_hat snapped to the grid at every log SNR (GridRounding), sharing its
        denoiser, as a DiffusionModel with the same proposal and reference: an ensemble member."""
        return self.with_denoiser(GridRounding(self, grid, mode, temperature))

    def with_denoiser(self, denoiser, reference=None):
        """A DiffusionModel around `denoiser` (used as it is: no Gaussian residual) with this one's
        hyperparameters and proposal and a copy of `reference` (default: this one's)."""
        source = self.reference if reference is None else reference
        copy = utils.GaussianReference(self.d)
        copy.load_state_dict(source.state_dict())
        hparams = dict(self.hparams, gaussian_residual=False, num_classes=None)
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
        mse = in_chunks(lambda xx, aa: self.mse(xx, aa, generator=generator),
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
    def fit_proposal(self, x, pilot_points=4, bins=BINS, mix=0.5, seed=None, chunk_size=None):
        """Fit the log-SNR proposal to this model's integrand on held-out samples x; set and
        return it (a proposals.FittedProposal over the current proposal's range; its logistic where
        the model equals the reference, as an untrained Gaussian residual does).

        The variance of the estimate per point, Int E f^2 / q - (Int f)^2 with f = 1/2 mse_gap,
        is smallest for q proportional to sqrt(E f^2); among densities constant on equal-width
        bins, for q_k proportional to the rms of f over the bin (docs/maths.md). The pilot is
        heldout_errors' (model and reference on common noise): for every sample, bin and one of
        `pilot_points` draws, a log SNR uniform in the bin and a noise vector, named by (seed,
        sample, draw), in one batched, chunked pass; FittedProposal.from_draws. The result
        mixes the bins with the current logistic: q = (1 - mix) q_logistic + mix q_bins.
        Fit the reference first (the integrand is the gap to it), and score other samples than x.
        """
        x = self._data(x)
        if len(x) < FittedProposal.MIN_SAMPLES:  # draws of one sample are not independent
            raise ValueError(f"fit_proposal needs at least {FittedProposal.MIN_SAMPLES} "
                             f"held-out samples, got {len(x)}")
        if pilot_points < 1 or bins < 1:
            raise ValueError(f"need pilot_points >= 1 and bins >= 1, got {pilot_points}, {bins}")
        draws = x.repeat_interleave(pilot_points, 0)  # each draw keyed as a sample of its own
        index, seed = t.arange(len(draws), device=x.device), utils.fresh_seed(seed)
        edges = bin_edges(self.proposal.range, bins, x.device)
        errors = heldout_errors(lambda z, a: list(self.with_reference(z, a)), draws, index, seed,
                                edges, chunk_size=chunk_size)
        self.proposal = FittedProposal.from_draws(
            self.proposal, heldout_logsnrs(index, seed, edges)[..., 0],
            0.5 * (errors[..., 0] - errors[..., 1]), mix, bins)
        return self.proposal

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch, batch_idx):
        micro = batch_idx % self.trainer.accumulate_grad_batches  # batches of one step
        noise = utils.derive_seed(self.hparams.seed, self.global_step, micro, self.global_rank)
        loss = self.nll(batch, generator=t.Generator(self.device).manual_seed(noise))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the steps Lightning
            self.log("train_loss", loss, prog_bar=True, sync_dist=True)  # writes (1 ms a call)
        return loss

    def on_validation_epoch_start(self):
        self._val_seen = 0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        """Sample j of this process's shard gets the points of global index j * world + rank
        under val_seed: the same (u, noise) points every epoch (paired across epochs with the
        same proposal), different points for every sample (DDP too), and no draw from the global
        RNG (training's). Every sample is scored once: the repeats Lightning's DistributedSampler
        pads a shard with (global index >= the data set's size) are left out."""
        x = self._data(batch)
        index = (self._val_seen + t.arange(len(x), device=x.device)) * self.trainer.world_size
        index = index + self.global_rank
        self._val_seen += len(x)
        loaders = self.trainer.val_dataloaders
        size = len((loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders).dataset)
        keep = index < size
        x, index, y = x[keep], index[keep], self._labels(batch)
        y = None if y is None else y[keep]

        def gap(xs, a, eps, ys=None):
            return self.mse_gap(xs, a, eps, y=ys)
        _, g = self._rqmc_terms(x, self.hparams.val_npoints, 1, gap, self.val_seed, index=index,
                                labels=y)
        nll = self.reference.nll(x) + g.flatten(1).mean(1)
        for metric, value in zip(self.val_sums, (nll, nll ** 2, t.ones_like(nll))):
            metric.update(value)

    def on_validation_epoch_end(self):
        """val_loss = E[-log p] in nats (and bits/dim) over the N = val_samples validation
        samples, with its standard error over data and log SNR together: sqrt(Var_i(nll_i) / N)."""
        total, total_sq, n = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        mean, stderr = total / n, utils.stderr_from_sums(total, total_sq, n)
        self.log_dict({"val_loss": mean.float(), "val_loss_stderr": stderr.float(),
                       "val_bpd": utils.nats_to_bpd(mean, self.d).float(),
                       "val_samples": n.float()}, sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        """A fitted proposal travels with the checkpoint (the hyperparameters hold the logistic)."""
        if isinstance(self.proposal, FittedProposal):
            checkpoint["fitted_proposal"] = self.proposal.state()

    def on_load_checkpoint(self, checkpoint):
        if "fitted_proposal" in checkpoint:
            self.proposal = FittedProposal.from_state(checkpoint["fitted_proposal"])

    def configure_optimizers(self):
        # one kernel for all parameters (3x faster), where Lightning allows it: under mixed
        # precision it refuses gradient clipping with a fused optimizer
        fused = self.device.type in ("cpu", "cuda") and (
            self.trainer.precision.endswith("-true") or not self.trainer.gradient_clip_val)
        optimizer = t.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, fused=fused or None)
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

    def _labels(self, batch):
        """The labels of a (x, y) batch of a conditional model (checked), else None."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or batch[1] is None:
            return None
        y, k = batch[1], self.hparams.get("num_classes")
        if k is None:
            return None  # an unconditional model trains on the data alone
        y = t.as_tensor(y, device=batch[0].device).long().view(-1)
        if len(y) != len(batch[0]) or (len(y) and not (-1 <= y.min() and y.max() < k)):
            raise ValueError(f"labels must be one per sample, in -1 .. {k - 1} (-1: none)")
        return y

    def _default_chunk(self):
        return default_chunk(self.d, self.device)


def bin_edges(logsnr_range, bins, device=None):
    """bins + 1 equal-width log-SNR bin edges over logsnr_range (float64)."""
    if not logsnr_range[0] < logsnr_range[1] or bins < 1:
        raise ValueError(f"need logsnr_range lo < hi and bins >= 1, got {logsnr_range}, {bins}")
    return t.linspace(*logsnr_range, bins + 1, dtype=t.float64, device=device)


@t.no_grad()
def heldout_logsnrs(index, seed, edges, draws=1):
    """The log SNRs of heldout_errors' draws: for every sample (its position in `index`), bin of
    `edges` and draw, one uniform in the bin named by (seed, index, bin, draw); (n, bins, draws)
    float64."""
    index = t.as_tensor(index).view(-1)
    dev, bins = index.device, len(edges) - 1
    edges = t.as_tensor(edges, dtype=t.float64, device=dev)
    k, j = t.arange(bins, device=dev).view(1, -1, 1), t.arange(draws, device=dev).view(1, 1, -1)
    u = utils.counter_uniform(seed, index.view(-1, 1, 1), k, j, 0, device=dev)
    return edges[k] + (edges[k + 1] - edges[k]) * u


@t.no_grad()
def heldout_errors(candidates, x, index, seed, edges, draws=1, chunk_size=None):
    """Held-out errors ||eps - eps_hat_m(z, a)||^2 of every candidate m, per sample and log-SNR bin.

    Args:
        candidates: (z, a) -> list of M noise predictions (sharing work between candidates, e.g.
            one base denoiser and its rounded variants).
        x, index: samples and their positions in the data set. Each (sample, bin, draw) has a log
            SNR uniform in the bin (heldout_logsnrs) and a noise vector, common to all candidates
            (a paired comparison) and named by (seed, index, bin, draw): independent of the batch
            layout.
        edges: the bins' edges (bin_edges).
    Returns:
        (B, bins, M) float64 errors, averaged over the draws.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n, bins, dev, d = len(x), len(edges) - 1, x.device, x[0].numel()
    key = t.as_tensor(index, device=dev).view(-1)
    a = heldout_logsnrs(key, seed, edges, draws).flatten().to(x.dtype)
    sample, k, j = (v.flatten() for v in t.meshgrid(
        t.arange(n, device=dev), t.arange(bins, device=dev), t.arange(draws, device=dev),
        indexing="ij"))
    dims = t.arange(1, d + 1, device=dev)

    def block(rows):
        u = utils.counter_uniform(seed, key[sample[rows], None], k[rows, None], j[rows, None], dims,
                                  device=dev)
        eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x.shape[1:])
        z = utils.noisy_channel(x[sample[rows]], a[rows], eps)
        return t.stack([utils.sq_norm(eps - e.to(z.dtype)) for e in candidates(z, a[rows])], 1)
    errors = in_chunks(block, chunk_size or default_chunk(d, dev), t.arange(len(a), device=dev))
    return errors.view(n, bins, draws, -1).double().mean(2)


def default_chunk(d, device):
    """Rows per denoiser call: cache-sized on CPU; on an accelerator large enough to fill it (682
    CIFAR-10 images) while activations stay within a few GB."""
    return max(1, (2 ** 18 if t.device(device).type == "cpu" else 2 ** 21) // d)


def _check_points(npoints, replicates):
    if npoints < 2:
        raise ValueError(f"npoints must be >= 2, got {npoints}")
    if not 2 <= replicates <= npoints:
        raise ValueError(f"replicates must be between 2 and npoints={npoints}, got {replicates}")


def in_chunks(fn, chunk_size, *rows):
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
