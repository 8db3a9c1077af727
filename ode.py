"""-log p(x) under a denoiser's probability-flow ODE, by Dormand-Prince 5(4) (docs/maths.md)."""
import math

import torch as t

import utils

# Dormand-Prince 5(4): nodes, stages, 5th-order weights, error weights (7 stages, FSAL)
_C = (0., 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_B = (35 / 384, 0., 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0., 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
TRACES = ("exact", "hutchinson")
EXACT_UP_TO = 16  # dimensions: beyond, the exact divergence's d products cost too much
_PROBE_STREAM = 0x4F44  # names the Hutchinson probes apart from the other keyed streams


def settings(trace, d, probes=1, tol=1e-5):
    """nll_ode's keyword arguments; trace "auto": exact up to EXACT_UP_TO dimensions."""
    if trace == "auto":
        trace = "exact" if d <= EXACT_UP_TO else "hutchinson"
    return dict(trace=trace, probes=probes, rtol=tol, atol=tol)


def divergence(fn, z, trace="exact", probes=None):
    """(fn(z), div_z fn(z)) per sample: exact or Hutchinson's over `probes` (K, B, d)."""
    with t.inference_mode(False), t.enable_grad():  # also under Trainer(inference_mode=True)
        z = z.clone().requires_grad_(True)
        out = fn(z)
        flat = out.flatten(1)
        if not flat.requires_grad:  # a constant map
            return out.detach(), t.zeros(len(z), dtype=out.dtype, device=z.device)

        def vjp(v, retain):
            grad = t.autograd.grad(flat, z, v, retain_graph=retain, materialize_grads=True)[0]
            return grad.flatten(1)
        if trace == "exact":
            eye = t.eye(flat.shape[1], dtype=flat.dtype, device=z.device)
            div = sum(vjp(eye[i].expand_as(flat), i + 1 < flat.shape[1])[:, i]
                      for i in range(flat.shape[1]))
        else:
            div = sum((vjp(v.to(flat.dtype).view_as(flat), k + 1 < len(probes)) * v).sum(1)
                      for k, v in enumerate(probes)) / len(probes)
    return out.detach(), div.detach()


def nll_ode(denoiser, reference, logsnr_range, x, trace="exact", probes=1, rtol=1e-5, atol=1e-5,
            seed=None, index=None, max_steps=10000):
    """(-log p(x) per sample, info: "nfe" (B,) and the settings); the denoiser over logsnr_range,
    the reference beyond; probes named by (seed, index, probe, dimension)."""
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if not (0 < rtol < 1 and 0 < atol < 1):
        raise ValueError(f"the ODE's tolerances must be in (0, 1), got rtol {rtol}, atol {atol}")
    ref, (a_lo, a_hi), dtype = reference, logsnr_range, x.dtype
    b, d, dev = len(x), x[0].numel(), x.device
    lam, m = ref.eigvals.double(), ref.mean.double()
    # the Gaussian's flow from a = +inf down to a_hi, in closed form
    stretch = 1 + math.exp(-a_hi) / lam  # of the variance along each eigenvector
    y = m + ref.rotate(ref.rotate(x.double().flatten(1) - m) * stretch.sqrt(), inverse=True)
    log_det = 0.5 * stretch.log().sum()
    probe_vectors = None
    if trace == "hutchinson":
        key = utils.sample_index(index, b, dev).view(-1, 1)
        u = utils.counter_uniform(utils.fresh_seed(seed), _PROBE_STREAM,
                                  key.unsqueeze(0), t.arange(probes, device=dev).view(-1, 1, 1),
                                  t.arange(d, device=dev).view(1, 1, -1), device=dev)
        probe_vectors = (u < 0.5).double() * 2 - 1  # (probes, B, d)

    sigma_lo = math.exp(-a_hi / 2)

    def field(s, state, rows):  # d(y, log p)/d sigma at sigma = sigma_lo + s (docs/maths.md)
        a = -2 * (sigma_lo + s).log()
        alpha = t.sigmoid(a).sqrt()
        z = (alpha.unsqueeze(1) * state[:, :d]).to(dtype).view((-1,) + x.shape[1:])
        pr = None if probe_vectors is None else probe_vectors[:, rows].to(dtype)
        eps, div = divergence(lambda zz: denoiser(zz, a.to(dtype)), z, trace, pr)
        return t.cat([eps.flatten(1).double(), (alpha * div.double()).unsqueeze(1)], 1)

    state = t.cat([y, t.zeros(b, 1, dtype=t.float64, device=dev)], 1)
    state, nfe = _dopri5(field, state, math.exp(-a_lo / 2) - sigma_lo, rtol, atol, max_steps)
    y_end, integral = state[:, :d], state[:, d]
    nll_end = ref.nll(y_end, noise=math.exp(-a_lo))  # at a_lo: N(m, Sigma + e^(-a_lo) I)
    info = dict(nfe=nfe, trace=trace, probes=probes if trace == "hutchinson" else None,
                rtol=rtol, atol=atol, logsnr_range=[a_lo, a_hi])
    return (nll_end - integral - log_det).to(dtype), info


def _dopri5(field, y0, span, rtol, atol, max_steps):
    # (y(span), evaluations per row) of dy/ds = field(s, y, rows), scipy RK45's step control
    b, dev = len(y0), y0.device
    rows, s, y = t.arange(b, device=dev), t.zeros(b, dtype=t.float64, device=dev), y0.clone()
    nfe = t.full((b,), 2, dtype=t.long, device=dev)  # the initial step's two evaluations

    def norm(v, scale):
        return ((v / scale) ** 2).mean(1).sqrt()

    f = field(s, y, rows)  # the initial step (scipy's select_initial_step)
    scale = atol + rtol * y.abs()
    d0, d1 = norm(y, scale), norm(f, scale)
    h0 = t.where((d0 < 1e-5) | (d1 < 1e-5), t.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
    big = t.maximum(d1, norm(field(h0, y + h0.unsqueeze(1) * f, rows) - f, scale) / h0)
    h1 = t.where(big <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), (0.01 / big) ** (1 / 5))
    h = t.minimum(100 * h0, h1).clamp(max=span)
    active = t.ones(b, dtype=t.bool, device=dev)
    for _ in range(max_steps):
        if not active.any():
            return y, nfe
        i = rows if bool(active.all()) else active.nonzero().squeeze(1)
        si, yi, fi, hi = s[i], y[i], f[i], h[i].unsqueeze(1)
        k = [fi]
        for c, a_row in zip(_C[1:], _A[1:]):
            k.append(field(si + c * hi[:, 0], yi + hi * sum(w * kk for w, kk in zip(a_row, k)), i))
        y_new = yi + hi * sum(w * kk for w, kk in zip(_B, k))
        f_new = field(si + hi[:, 0], y_new, i)
        nfe[i] += 6
        err = norm(hi * sum(w * kk for w, kk in zip(_E, k + [f_new])),
                   atol + rtol * t.maximum(yi.abs(), y_new.abs()))
        ok = err <= 1  # a rejected step shrinks: 0.9 err^(-1/5) < 1 where err > 1
        factor = (0.9 * err.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.)
        acc = i[ok]
        s[acc], y[acc], f[acc] = s[acc] + h[acc], y_new[ok], f_new[ok]
        h[i] = hi[:, 0] * factor
        active = active & ~(s >= span * (1 - 1e-12))
        h = t.minimum(h, (span - s).clamp(min=0))
    raise FloatingPointError(f"the probability-flow ODE did not reach the end of its range in "
                             f"{max_steps} steps (rtol {rtol}, atol {atol})")
