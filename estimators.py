"""The estimators of information-theoretic diffusion, in nats, over any denoiser (docs/maths.md)."""
import functools
import math

import torch as t

import utils
from proposals import BINS, FittedProposal

_NO_LABEL = -1


def denoise(denoiser, z, logsnr, y=None):
    """eps_hat(z, a[, y]) in z's dtype, checked to have z's shape."""
    eps_hat = denoiser(z, logsnr) if y is None else denoiser(z, logsnr, y)
    if eps_hat.shape != z.shape:
        raise ValueError(f"denoiser returned shape {tuple(eps_hat.shape)}, expected the input "
                         f"shape {tuple(z.shape)}")
    return eps_hat.to(z.dtype)


def predictions(denoiser, reference, z, logsnr, y=None):
    """(eps_hat, eps_G) at z; eps_G computed once where the denoiser adds it to its `model`'s."""
    if getattr(denoiser, "residual_of", None) is not reference:
        return denoise(denoiser, z, logsnr, y), reference.eps(z, logsnr, y)
    eps_g = reference.eps(z, logsnr, y)
    return denoise(denoiser.model, z, logsnr, y) + eps_g, eps_g


def mse_gap(denoiser, reference, x, logsnr, eps, y=None):
    """||eps - eps_hat(z, a[, y])||^2 - ||eps - eps_G(z, a[, y])||^2 on the same noise."""
    z = utils.noisy_channel(x, logsnr, eps)
    eps_hat, eps_g = predictions(denoiser, reference, z, logsnr, y)
    return utils.sq_norm(eps - eps_hat) - utils.sq_norm(eps - eps_g)


def loss(denoiser, reference, proposal, x, y=None, label_dropout=0., generator=None):
    """-log p(x_i) (or -log p(x_i | y_i)) per sample, unbiased, from one stratified log SNR each."""
    a, w = proposal.sample((len(x),), generator=generator, device=x.device, dtype=x.dtype)
    perm = t.randperm(len(x), generator=generator, device=x.device)
    a, w = a[perm], w[perm]
    if y is not None and label_dropout > 0:
        y = y.masked_fill(t.rand(len(y), generator=generator, device=y.device) < label_dropout,
                          _NO_LABEL)
    eps = t.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    g = 0.5 * w * mse_gap(denoiser, reference, x, a, eps, y)
    return finite(reference.nll(x, y) + g, x, a, g)


def rqmc_terms(x, npoints, replicates, integrand, proposal, seed=None, index=None,
               chunk_size=None, labels=None):
    """(log SNRs (B, R, m), terms 1/2 w(a) integrand(x, a, eps[, labels]) (B, R, m, ...)) on R
    `replicates` Sobol sets named by (seed, index[i], replicate), m = npoints // R."""
    if npoints < 1 or not 1 <= replicates <= npoints:
        raise ValueError(f"need npoints >= 1 and replicates between 1 and npoints, got {npoints}, "
                         f"{replicates}")
    b, m, d, dev = len(x), npoints // replicates, x[0].numel(), x.device
    seed = utils.fresh_seed(seed)
    sample = utils.sample_index(index, b, dev).repeat_interleave(replicates * m)
    replicate = t.arange(replicates, device=dev).repeat_interleave(m).repeat(b)
    point = t.arange(m, device=dev).repeat(b * replicates)
    u = utils.keyed_sobol(seed, (sample, replicate), point, m, [0], dev)[:, 0]
    a, w = proposal.from_uniform(u, x.dtype)
    dims = t.arange(1, 1 + d, device=dev)

    def block(rows):
        eps = t.special.ndtri(utils.keyed_sobol(seed, (sample[rows], replicate[rows]), point[rows],
                                                m, dims, dev)).to(x.dtype).view((-1,) + x.shape[1:])
        s = rows // (replicates * m)
        return integrand(x[s], a[rows], eps, *([] if labels is None else [labels[s]]))
    values = in_chunks(block, chunk_size or default_chunk(d, dev), t.arange(len(a), device=dev))
    terms = 0.5 * utils.append_dims(w, values.dim()) * values
    return a.view(b, replicates, m), terms.view((b, replicates, m) + values.shape[1:])


@t.no_grad()
def nll_points(denoiser, reference, proposal, x, npoints=200, replicates=4, seed=None,
               index=None, y=None, chunk_size=None):
    """(-log p(x) (or -log p(x | y)) per sample, its standard error over the replicates)."""
    gap = functools.partial(mse_gap, denoiser, reference)
    a, g = rqmc_terms(x, npoints, replicates, gap, proposal, seed, index, chunk_size, y)
    nll = finite(reference.nll(x, y) + g.flatten(1).mean(1), x, a, g)
    return nll, _replicate_stderr(g.mean(-1))


@t.no_grad()
def label_terms(denoiser, reference, proposal, x, labels, npoints=200, replicates=4, seed=None,
                index=None, chunk_size=None, per_dim=False):
    """The replicates' -log p(x | k) (B, R, L) for labels k ((B, L) or (L,); -1: none) on
    nll_points' points; per_dim: the integrand's mean per coordinate, (B, L, *x_shape)."""
    labels = t.as_tensor(labels, device=x.device).long().expand(len(x), -1)
    n = labels.shape[1]

    def gaps(xs, a, eps, ys):  # ys (rows, n): every label of a row on its one (a, eps)
        copies = (n,) + (1,) * (xs.dim() - 1)
        zs, aa, ee, yy = (utils.noisy_channel(xs, a, eps).repeat(copies), a.repeat(n),
                          eps.repeat(copies), ys.T.flatten())
        eps_hat, eps_g = predictions(denoiser, reference, zs, aa, yy)
        gap = ((ee - eps_hat) ** 2 - (ee - eps_g) ** 2).view((n, -1) + xs.shape[1:])
        return (gap if per_dim else gap.flatten(2).sum(2)).transpose(0, 1)
    _, g = rqmc_terms(x, npoints, replicates, gaps, proposal, seed, index,
                      max(1, (chunk_size or default_chunk(x[0].numel(), x.device)) // n), labels)
    if per_dim:
        return g.mean((1, 2))
    return t.stack([reference.nll(x, k) for k in labels.T], 1).unsqueeze(1) + g.mean(2)


def sq_error(denoiser, x, logsnr, eps):
    """||eps - eps_hat(z, a)||^2 per sample, z = noisy_channel(x, a, eps)."""
    return utils.sq_norm(eps - denoise(denoiser, utils.noisy_channel(x, logsnr, eps), logsnr))


@t.no_grad()
def mi_points(denoiser, reference, proposal, x, y, npoints=200, replicates=4, seed=None,
              index=None, chunk_size=None, per_dim=False):
    """(i(x; y) = log p(x | y) - log p(x) per sample, stderr); per_dim: (B, *x_shape) instead."""
    pairs = t.stack([t.full_like(y, _NO_LABEL), y], 1)
    terms = label_terms(denoiser, reference, proposal, x, pairs, npoints, replicates, seed, index,
                        chunk_size, per_dim)
    if per_dim:
        return terms[:, 0] - terms[:, 1]
    gain = terms[..., 0] - terms[..., 1]
    return gain.mean(1), _replicate_stderr(gain)


@t.no_grad()
def class_log_posterior(denoiser, reference, proposal, x, log_prior, npoints=200, replicates=4,
                        seed=None, index=None, chunk_size=None):
    """(log p(y | x) for every label (B, K) by Bayes' rule, jackknifed, its standard error)."""
    terms = label_terms(denoiser, reference, proposal, x, t.arange(len(log_prior), device=x.device),
                        npoints, replicates, seed, index, chunk_size)
    return label_log_posterior(terms, log_prior)


def label_log_posterior(nll_given, log_prior):
    """(log p(k | x), stderr) (B, K), jackknifed from -log p(x | k) (B, R, K) (docs/maths.md)."""
    prior = t.as_tensor(log_prior).to(nll_given)
    return jackknife(lambda v: (prior - v).log_softmax(-1), nll_given)


def label_statistics(terms, log_prior, y=None):
    """{"given", "information", "bayes", "correct"}: (values, stderrs) for labels y (or (B, K))
    from label_terms of no label and every label (B, R, 1 + K) (docs/conditional.md)."""
    prior = t.as_tensor(log_prior).to(terms)
    given, gain = terms[..., 1:], terms[..., :1] - terms[..., 1:]
    posterior, spread = label_log_posterior(given, prior)
    right = t.nn.functional.one_hot(posterior.argmax(1), len(prior)).to(terms)
    stats = dict(given=(given.mean(1), _replicate_stderr(given)),
                 information=(gain.mean(1), _replicate_stderr(gain)),
                 bayes=(posterior - prior, spread), correct=(right, t.zeros_like(right)))
    if y is None:
        return stats
    return {k: tuple(v.gather(1, y.view(-1, 1))[:, 0] for v in pair) for k, pair in stats.items()}


def jackknife(fn, replicates):
    """(The jackknife estimate of fn(mean over R) from replicates (B, R, ...), its stderr)."""
    r = replicates.shape[1]
    left_out = fn((replicates.sum(1, keepdim=True) - replicates) / (r - 1))  # (B, R, ...)
    mean = left_out.mean(1)
    stderr = ((r - 1) / r * (left_out - mean.unsqueeze(1)).pow(2).sum(1)).sqrt()
    return r * fn(replicates.mean(1)) - (r - 1) * mean, stderr


@t.no_grad()
def nll_discrete_points(denoiser, reference, proposal, x, grid, npoints=256, replicates=4,
                        seed=None, index=None, tails=True, chunk_size=None):
    """(-log P(x) per sample of grid data x, stderr); tails: beyond the range (docs/maths.md)."""
    grid.index(x)
    error = functools.partial(sq_error, denoiser)
    a, g = rqmc_terms(x, npoints, replicates, error, proposal, seed, index, chunk_size)
    nll = g.flatten(1).mean(1)
    if tails:  # beyond the range: the reference's error below, hard rounding's above
        lo, hi = proposal.range
        nll = nll + (0.5 * reference.error_integral(x, -math.inf, lo)
                     + utils.rounding_tail(x, grid, hi))
    return finite(nll, x, a, g), _replicate_stderr(g.mean(-1))


@t.no_grad()
def mse_curve(denoiser, reference, x, logsnrs, generator=None, chunk_size=None):
    """(E ||eps - eps_hat(z, a)||^2, the reference's MMSE) at each a of `logsnrs`: ((K,), (K,))."""
    b, k, logsnrs = len(x), len(logsnrs), logsnrs.to(x.device, x.dtype)

    def mse(xs, a):
        eps = t.randn(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype)
        return sq_error(denoiser, xs, a, eps)
    values = in_chunks(mse, chunk_size or default_chunk(x[0].numel(), x.device),
                       x.repeat((k,) + (1,) * (x.dim() - 1)), logsnrs.repeat_interleave(b))
    return values.view(k, b).mean(1), reference.mmse(logsnrs)


@t.no_grad()
def sample(denoiser, reference, proposal, n, x_shape, steps=200, generator=None):
    """x_hat of a deterministic DDIM-style sampler on the proposal's quadrature grid."""
    grid, _ = proposal.quadrature(steps, device=reference.mean.device, dtype=reference.mean.dtype)
    z = reference.sample(n, grid[0], generator).view((n,) + tuple(x_shape))
    for i, a in enumerate(grid[:, None].expand(-1, n)):
        eps_hat = denoise(denoiser, z, a)
        x_hat = utils.x_from_eps(z, a, eps_hat)
        if i + 1 < steps:
            z = utils.noisy_channel(x_hat, grid[i + 1].expand(n), eps_hat)
    return x_hat


# --- Held-out errors per log-SNR bin: the fitted proposal and the evaluation's choices ---
def bin_edges(logsnr_range, bins, device=None):
    """bins + 1 equal-width log-SNR bin edges over logsnr_range (float64)."""
    if not logsnr_range[0] < logsnr_range[1] or bins < 1:
        raise ValueError(f"need logsnr_range lo < hi and bins >= 1, got {logsnr_range}, {bins}")
    return t.linspace(*logsnr_range, bins + 1, dtype=t.float64, device=device)


def heldout_logsnrs(index, seed, edges):
    """(n, bins) float64 log SNRs uniform in each bin, named by (seed, index, bin)."""
    index = t.as_tensor(index).view(-1, 1)
    edges = t.as_tensor(edges, dtype=t.float64, device=index.device)
    k = t.arange(len(edges) - 1, device=index.device)
    u = utils.counter_uniform(seed, index, k, 0, 0, device=index.device)
    return edges[k] + (edges[k + 1] - edges[k]) * u


@t.no_grad()
def heldout_errors(candidates, x, index, seed, edges, chunk_size=None):
    """(B, bins, M) float64 held-out ||eps - eps_hat_m||^2 of candidates(z, a), one draw a bin."""
    n, bins, dev, d = len(x), len(edges) - 1, x.device, x[0].numel()
    key = t.as_tensor(index, device=dev).view(-1)
    a = heldout_logsnrs(key, seed, edges).flatten().to(x.dtype)
    dims = t.arange(1, d + 1, device=dev)

    def block(rows):
        s, k = rows // bins, rows % bins
        u = utils.counter_uniform(seed, key[s, None], k[:, None], 0, dims, device=dev)
        eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x.shape[1:])
        z = utils.noisy_channel(x[s], a[rows], eps)
        return t.stack([utils.sq_norm(eps - e.to(z.dtype)) for e in candidates(z, a[rows])], 1)
    errors = in_chunks(block, chunk_size or default_chunk(d, dev), t.arange(len(a), device=dev))
    return errors.view(n, bins, -1).double()


@t.no_grad()
def fit_proposal(denoiser, reference, proposal, x, pilot_points=4, bins=BINS, mix=0.5, seed=None,
                 chunk_size=None):
    """The logistic mixed with bins fitted to 1/2 mse_gap on held-out x (docs/maths.md)."""
    if len(x) < FittedProposal.MIN_SAMPLES:
        raise ValueError(f"fit_proposal needs at least {FittedProposal.MIN_SAMPLES} held-out "
                         f"samples, got {len(x)}")
    if pilot_points < 1 or bins < 1:
        raise ValueError(f"need pilot_points >= 1 and bins >= 1, got {pilot_points}, {bins}")
    draws = x.repeat_interleave(pilot_points, 0)  # each draw keyed as a sample of its own
    index, seed = t.arange(len(draws), device=x.device), utils.fresh_seed(seed)
    edges = bin_edges(proposal.range, bins, x.device)
    errors = heldout_errors(functools.partial(predictions, denoiser, reference), draws, index,
                            seed, edges, chunk_size=chunk_size)
    return FittedProposal.from_draws(proposal, heldout_logsnrs(index, seed, edges),
                                     0.5 * (errors[..., 0] - errors[..., 1]), mix, bins)


# --- Plumbing ---
def default_chunk(d, device):
    """Rows per denoiser call: cache-sized on CPU (docs/2d.md), larger on an accelerator."""
    return max(1, min(2 ** 14, 2 ** 18 // d) if t.device(device).type == "cpu" else 2 ** 21 // d)


def in_chunks(fn, chunk_size, *rows):
    chunks = list(zip(*(r.split(chunk_size) for r in rows)))
    return fn(*rows) if len(chunks) == 1 else t.cat([fn(*chunk) for chunk in chunks])


def _replicate_stderr(means):
    r = means.shape[1]
    if r < 2:
        return t.full_like(means[:, 0], math.nan)
    return means.std(1) / math.sqrt(r)


def finite(nll, x, logsnr, terms):
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
