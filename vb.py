"""The discrete-time variational bound of a T-step schedule (DDPM; docs/maths.md)."""
import torch as t

import utils
from estimators import default_chunk, in_chunks

_VB_STREAM = 0x5642  # tags the bound's random numbers apart from the other keyed streams


class VBSchedule:
    """The bound's float64 coefficients of alphas_cumprod (T,) with DDPM's fixed_small variances,
    indexed by t = 0 .. T (ab_0 = 1): ab, logsnr, sigma2, coef_x, coef (docs/maths.md)."""

    def __init__(self, alphas_cumprod, device=None):
        ab = t.as_tensor(alphas_cumprod).detach().to("cpu", t.float64)
        if ab.dim() != 1 or len(ab) < 3:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 3 timesteps, got shape "
                             f"{tuple(ab.shape)}")
        self.T = len(ab)
        zero = t.zeros(1, dtype=t.float64)
        ab = t.cat([t.ones(1, dtype=t.float64), ab])  # schedule_logsnr checks (0, 1), decreasing
        a = t.cat([t.full((1,), float("inf"), dtype=t.float64), utils.schedule_logsnr(ab[1:])])
        beta = t.cat([zero, -t.expm1(ab.log().diff())])
        beta_tilde = t.cat([zero, (1 - ab[:-1]) / (1 - ab[1:]) * beta[1:]])
        sigma2 = t.cat([beta_tilde[2].expand(2), beta_tilde[2:]])  # sigma_1^2 = beta_tilde_2 (DDPM)
        coef = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - ab))
        coef_x = t.cat([zero, ab[:-1]]) * beta ** 2 / (2 * sigma2 * (1 - ab) ** 2)
        coef[:2] = coef_x[:2] = 0
        self.ab, self.logsnr, self.sigma2, self.coef, self.coef_x = (
            v.to(device) for v in (ab, a, sigma2, coef, coef_x))

    def prior(self, x):
        """L_T = KL(N(sqrt(ab_T) x, (1 - ab_T) I) || N(0, I)) per sample, float64."""
        ab = self.ab[-1]
        return 0.5 * (ab * (x.double().flatten(1) ** 2 - 1) - t.log1p(-ab)).sum(1)


def vb_terms(model, x, timesteps, eps, schedule, grid=None, clip=True):
    """The terms L_{t-1} in nats (float64 (rows,)) for rows (x, t, eps): KL for t >= 2, decoder
    for t = 1; clip: x_hat clipped to the grid's range, as DDPM published (docs/maths.md)."""
    timesteps = t.as_tensor(timesteps, dtype=t.int64, device=x.device).view(-1)
    if len(timesteps) and not (1 <= int(timesteps.min()) and int(timesteps.max()) <= schedule.T):
        raise ValueError(f"timesteps must lie in 1 .. {schedule.T}")
    if clip and (grid is None or grid.hi is None):
        raise ValueError("clipping x_hat needs the range of the data's grid (a Grid with levels); "
                         "clip=False gives the unclipped bound")
    a = schedule.logsnr.to(x.device)[timesteps]
    z = utils.noisy_channel(x, a, eps)
    eps_hat = model(z, a.to(x.dtype)).to(x.dtype)
    x_hat = utils.x_from_eps(z.double(), a, eps_hat.double())
    if clip:
        x_hat = x_hat.clamp(grid.lo, grid.hi)
        kl = schedule.coef_x.to(x.device)[timesteps] * utils.sq_norm(x.double() - x_hat)
    else:
        kl = schedule.coef.to(x.device)[timesteps] * utils.sq_norm((eps - eps_hat).double())
    rows = (timesteps == 1).nonzero().squeeze(1)
    if not len(rows):
        return kl
    if grid is None:
        raise ValueError("the decoder term (t = 1) needs the data's grid")
    log_mass = _log_bin_mass(x[rows].double(), x_hat[rows], schedule.sigma2[1].sqrt().item(), grid)
    return kl.index_put((rows,), -log_mass.flatten(1).sum(1))


def _log_bin_mass(x, mean, std, grid):
    delta, lo, levels = grid
    below = (x - delta / 2 - mean) / std
    above = (x + delta / 2 - mean) / std
    if levels is not None:
        k = ((x - lo) / delta).round()
        below = below.masked_fill(k <= 0, float("-inf"))
        above = above.masked_fill(k >= levels - 1, float("inf"))
    return utils.log_ndtr_diff(below, above)


@t.no_grad()
def variational_bound(model, x, grid, alphas_cumprod, steps=None, seed=None, index=None,
                      chunk_size=None, clip=True):
    """(DDPM's -ELBO >= -log P(x) in nats per sample of grid data x, its standard error); steps:
    None sums all T - 1 KL terms, k draws k per sample, unbiased (docs/maths.md)."""
    schedule = VBSchedule(alphas_cumprod, device=x.device)
    T = schedule.T
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 2 <= steps <= T - 1):
        raise ValueError(f"steps must be None or an int in 2 .. T - 1 = {T - 1} (the KL terms "
                         f"t = 2 .. T), got {steps!r}")
    grid.index(x)
    b, dev, d = len(x), x.device, x[0].numel()
    seed, key = utils.fresh_seed(seed), utils.sample_index(index, b, dev)
    candidates = t.arange(2, T + 1, device=dev)
    if steps is None:
        chosen = candidates.expand(b, -1)
    else:
        u = utils.counter_uniform(seed, _VB_STREAM, key[:, None], candidates, -1, device=dev)
        chosen = candidates[u.topk(steps, 1, largest=False).indices].sort(1).values
    m = chosen.shape[1]
    timesteps = t.cat([chosen, t.ones(b, 2, dtype=t.int64, device=dev)], 1).flatten()
    draw = t.cat([t.zeros(m, dtype=t.int64), t.arange(2)]).to(dev).repeat(b)

    def block(rows):
        s = rows // (m + 2)
        u = utils.counter_uniform(seed, _VB_STREAM, key[s, None], timesteps[rows, None],
                                  draw[rows, None], t.arange(d, device=dev), device=dev)
        eps = t.special.ndtri(u).to(x.dtype).view((-1,) + x.shape[1:])
        return vb_terms(model, x[s], timesteps[rows], eps, schedule, grid, clip)
    terms = in_chunks(block, chunk_size or default_chunk(d, dev),
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
