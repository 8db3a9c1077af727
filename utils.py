"""Numerical pieces shared by the model and the scripts.

- Logistic importance sampling over log SNR a (iid, stratified, or midpoint quadrature).
- The closed-form Gaussian reference q = N(mean, U diag(eigvals) U^T): entropy, -log q(x), MMSE
  curve and optimal noise predictor, used as control variate and as the baseline in every figure.
- The log-SNR range read off a measured MSE curve, or from the data covariance spectrum.
- Counter-based random numbers (keyed by seed and sample index, not by batch layout) and
  randomised Sobol sets built on them.
- Grid data: dequantisation, the discrete-limit conversion, and the closed-form error integral of
  rounding to the grid.
- Helpers the two training scripts share (Trainer flags, run directories, clean error exits).

Notation follows itd-math.md: z = sqrt(s(a)) x + sqrt(s(-a)) eps, s = sigmoid.
"""
import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch as t
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Logistic importance sampling over log SNR
# ---------------------------------------------------------------------------------------------
def check_logistic(scale, clip):
    if not scale > 0:
        raise ValueError(f"logsnr_scale must be > 0, got {scale}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")


def logistic_weight(logsnr, loc, scale, clip):
    """Importance weight w(a) = 1 / q(a), q(a) = s(v) s(-v) / (scale tanh(c/2)), v = (a - loc)/scale.

    Computed in log space: log s(v) + log s(-v) = -softplus(-v) - softplus(v)."""
    v = (logsnr - loc) / scale
    return scale * math.tanh(clip / 2) * t.exp(F.softplus(v) + F.softplus(-v))


def logistic_logsnr(shape, loc, scale, clip=4., stratified=True, generator=None, device=None,
                    dtype=t.float32):
    """Samples a ~ q(a), the logistic(loc, scale) clipped to loc +- clip*scale; returns (a, w = 1/q(a)).

    u ~ U(s(-c), s(c)), a = loc + scale * logit(u). With stratified=True the last dimension of `shape`
    holds one draw per equal-probability stratum, u_k = (k + U_k)/n, in increasing order: the mean of
    w(a_k) f(a_k) over that dimension is still an unbiased estimate of Int f(a) da over the clipped
    range, with far lower variance for smooth f.
    """
    check_logistic(scale, clip)
    shape = tuple(shape)
    u = t.rand(shape, generator=generator, device=device, dtype=t.float64)
    if stratified:
        n = shape[-1]
        u = (t.arange(n, device=device, dtype=t.float64) + u) / n
    return logistic_from_uniform(u, loc, scale, clip, dtype)


def logistic_quadrature(n, loc, scale, clip=4., device=None, dtype=t.float32):
    """Deterministic midpoint rule in quantile space, u_k = (k + 1/2)/n: biased by O(1/n^2)."""
    check_logistic(scale, clip)
    u = (t.arange(n, device=device, dtype=t.float64) + 0.5) / n
    return logistic_from_uniform(u, loc, scale, clip, dtype)


def logistic_from_uniform(u, loc, scale, clip=4., dtype=t.float32):
    """The clipped logistic quantile a(u) = loc + scale * logit(s(-c) + (s(c) - s(-c)) u) and w(a)."""
    check_logistic(scale, clip)
    lo, hi = 1 / (1 + math.exp(clip)), 1 / (1 + math.exp(-clip))
    logsnr = loc + scale * t.logit(lo + (hi - lo) * u.to(t.float64))
    return logsnr.to(dtype), logistic_weight(logsnr, loc, scale, clip).to(dtype)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: draws named by (seed, sample index, ...), not by batch layout
# ---------------------------------------------------------------------------------------------
def _signed64(c):
    return c - 2 ** 64 if c >= 2 ** 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                  0x94D049BB133111EB))


def _shr(x, k):
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x):
    """The SplitMix64 output function on int64 tensors (wrapping arithmetic): a bijection of the
    64-bit integers whose outputs pass the usual statistical test batteries for distinct inputs."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def stream_seed(generator=None):
    """A 62-bit seed for counter_hash, drawn from `generator` (the global RNG if None)."""
    device = generator.device if generator is not None else "cpu"
    return int(t.randint(0, 2 ** 62, (1,), generator=generator, device=device).item())


def counter_hash(seed, *keys, device=None):
    """64 random bits (int64) for each element of the broadcast integer keys: a function of
    (seed, keys) only, so a draw does not depend on which other draws are made with it or in what
    order. Keys are chained through splitmix64 one at a time."""
    h = splitmix64(t.tensor(seed, dtype=t.int64, device=device))
    for key in keys:
        h = splitmix64(h ^ t.as_tensor(key, dtype=t.int64, device=device))
    return h


def counter_uniform(seed, *keys, device=None):
    """U(0, 1) draws in float64 (53 random bits, never exactly 0 or 1) named by (seed, keys)."""
    return (_shr(counter_hash(seed, *keys, device=device), 11).double() + 0.5) * 2.0 ** -53


@functools.lru_cache(maxsize=8)
def _sobol_digits(n, dim, device=None):
    """The first n points of the dim-dimensional Sobol sequence as MAXBIT-bit integers, (n, dim)."""
    points = t.quasirandom.SobolEngine(dim).draw(n, dtype=t.float64)
    return (points * 2 ** t.quasirandom.SobolEngine.MAXBIT).long().to(device)


def keyed_sobol(seed, set_keys, point, n, dims, device=None):
    """Point `point` of the randomised n-point Sobol set named by `set_keys`, in dimensions `dims`.

    set_keys: tuple of int64 tensors (rows,) naming each row's set (e.g. sample index, replicate);
    point: (rows,) point indices in [0, n); dims: (k,) dimension indices. Returns (rows, k) float64.

    The randomisation is a random digital shift per set and dimension (XOR of the points' binary
    expansions with random digits, which keeps the Sobol net structure) plus uniform noise within
    the finest cell, so every point is exactly uniform; every random digit is
    counter_hash(seed, *set_keys, dim, ...): a set's
    points are the same whatever other sets are drawn alongside, so estimates built on them do not
    depend on batch or chunk sizes. Dimensions beyond SobolEngine.MAXDIM are iid uniforms.
    """
    bits, maxdim = t.quasirandom.SobolEngine.MAXBIT, t.quasirandom.SobolEngine.MAXDIM
    dims = t.as_tensor(dims, dtype=t.int64, device=device).view(1, -1)
    keys = tuple(t.as_tensor(k, dtype=t.int64, device=device).view(-1, 1) for k in set_keys)
    point = t.as_tensor(point, dtype=t.int64, device=device).view(-1, 1)
    in_sobol = dims < maxdim
    top = int(dims[in_sobol].max()) + 1 if in_sobol.any() else 1
    table = _sobol_digits(n, top, device)[point, dims.clamp(max=top - 1)]
    digits = _shr(counter_hash(seed, *keys, dims, 0, device=device), 64 - bits)
    fine = counter_uniform(seed, *keys, point, dims, 1, device=device)
    u = ((table ^ digits) + fine) / 2 ** bits
    if not in_sobol.all():
        u = t.where(in_sobol, u, counter_uniform(seed, *keys, point, dims, 2, device=device))
    return u.clamp(2 ** -53, 1 - 2 ** -53)


# ---------------------------------------------------------------------------------------------
# Gaussian reference
# ---------------------------------------------------------------------------------------------
class GaussianReference(t.nn.Module):
    """q = N(mean, U diag(eigvals) U^T) over flattened x, with everything about it in closed form.

    `eigvecs` of shape (0,) means U = I (an axis-aligned reference, the default N(0, I)), which
    keeps checkpoints small for images. The buffers follow the module's device and dtype and are
    saved in checkpoints; loading adopts the checkpoint's shapes.
    """

    def __init__(self, d):
        super().__init__()
        self.d = int(d)
        self.register_buffer("mean", t.zeros(self.d))
        self.register_buffer("eigvals", t.ones(self.d))
        self.register_buffer("eigvecs", t.zeros(0))

    @t.no_grad()
    def fit(self, x, min_eigval=1e-6, diagonal=False):
        """Moment-match q to data x (n, ...): mean and covariance eigen-decomposition, in float64.

        With n <= d the sample covariance is singular, so Ledoit-Wolf shrinkage (scikit-learn) is
        used instead; eigenvalues are floored at min_eigval * mean eigenvalue so that directions
        in which the data does not vary (a pixel always black) keep a finite density.
        """
        x = x.detach().flatten(1).to("cpu", t.float64)
        n, d = x.shape
        if d != self.d:
            raise ValueError(f"reference data has {d} dimensions per sample, expected {self.d}")
        if n < 2:
            raise ValueError(f"need at least 2 samples to fit a Gaussian reference, got {n}")
        if not t.isfinite(x).all():
            raise ValueError("reference data contains non-finite values")
        mean = x.mean(0)
        xc = x - mean
        if diagonal:
            eigvals, eigvecs = xc.var(0), t.zeros(0, dtype=t.float64)
        else:
            if n <= d:
                from sklearn.covariance import ledoit_wolf
                cov = t.from_numpy(ledoit_wolf(xc.numpy(), assume_centered=True)[0])
            else:
                cov = xc.T @ xc / (n - 1)
            eigvals, eigvecs = t.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(min_eigval * eigvals.clamp_min(0).mean().clamp_min(1e-300))
        for name, value in (("mean", mean), ("eigvals", eigvals), ("eigvecs", eigvecs)):
            setattr(self, name, value.to(self.mean.device, self.mean.dtype))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mean", "eigvals", "eigvecs"):
            if prefix + name in state_dict:
                setattr(self, name, t.empty_like(state_dict[prefix + name], device=self.mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _rotate(self, x):
        """Coordinates in the eigenbasis, U^T x, for flattened x (n, d); never in reduced precision."""
        if self.eigvecs.numel() == 0:
            return x
        with t.autocast(x.device.type, enabled=False):
            return x @ self.eigvecs.to(x.dtype)

    def _unrotate(self, y):
        if self.eigvecs.numel() == 0:
            return y
        with t.autocast(y.device.type, enabled=False):
            return y @ self.eigvecs.to(y.dtype).T

    def entropy(self):
        """h(q) = d/2 log(2 pi e) + 1/2 sum_i log lambda_i."""
        return 0.5 * self.d * (LOG_2PI + 1) + 0.5 * self.eigvals.log().sum()

    def nll(self, x):
        """-log q(x) = d/2 log(2 pi) + 1/2 sum_i log lambda_i + 1/2 sum_i y_i^2 / lambda_i, y = U^T (x - mean)."""
        y = self._rotate(x.flatten(1) - self.mean.to(x.dtype))
        lam = self.eigvals.to(x.dtype)
        return 0.5 * (self.d * LOG_2PI + lam.log().sum() + (y ** 2 / lam).sum(1))

    def mmse(self, logsnr):
        """mmse_G(a) = sum_i s(a + log lambda_i), the noise-prediction MMSE of q (any shape of a)."""
        return t.sigmoid(logsnr.unsqueeze(-1) + self.eigvals.to(logsnr.dtype).log()).sum(-1)

    def error_integral(self, x, lo, hi):
        """Int_lo^hi E_eps ||eps - eps_G(z, a)||^2 da for each sample of x, in closed form (lo may
        be -inf; hi must be finite, since the integrand tends to d at high SNR). lo, hi: scalars or
        per-sample tensors.

        With y = U^T (x - mean) and v_i = a + log lambda_i, the pointwise expected error is
        sum_i s(v_i)^2 + (y_i^2 / lambda_i) s(v_i) s(-v_i), whose antiderivative in a is
        F(a) = sum_i softplus(v_i) + s(-v_i) - (y_i^2 / lambda_i) s(-v_i). Below the integration
        range this is the error of any denoiser to leading order in e^a, e^a ||x - E x||^2, when
        the reference mean is the data mean.
        """
        y = self._rotate(x.flatten(1) - self.mean.to(x.dtype))
        lam = self.eigvals.to(x.dtype)
        r = y ** 2 / lam

        def antiderivative(a):
            v = t.as_tensor(a, dtype=x.dtype, device=x.device).view(-1, 1) + lam.log()
            return (F.softplus(v) + t.sigmoid(-v) * (1 - r)).sum(1)
        return antiderivative(hi) - antiderivative(lo)

    def eps(self, z, logsnr):
        """Optimal noise predictor of q: eps_G = U diag(1 / (sqrt(s(-a)) (1 + lambda e^a))) U^T (z - sqrt(s(a)) mean).

        (From x_hat_G = mean + sqrt(s(a)) Sigma (s(a) Sigma + s(-a) I)^-1 (z - sqrt(s(a)) mean) and
        eps_G = (z - sqrt(s(a)) x_hat_G) / sqrt(s(-a)).) Computed in z's dtype.
        """
        a = logsnr.to(z.dtype).view(-1, 1)
        zf = z.flatten(1) - t.sigmoid(a).sqrt() * self.mean.to(z.dtype)
        log_gain = -0.5 * F.logsigmoid(-a) - F.softplus(a + self.eigvals.to(z.dtype).log())
        return self._unrotate(self._rotate(zf) * log_gain.exp()).view_as(z)

    def sample(self, n, logsnr=None, generator=None):
        """Draws from q, or from its noisy marginal N(sqrt(s(a)) mean, s(a) Sigma + s(-a) I) at log SNR a."""
        e = t.randn(n, self.d, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        if logsnr is None:
            return self.mean + self._unrotate(e * self.eigvals.sqrt())
        a = t.as_tensor(logsnr, dtype=self.mean.dtype, device=self.mean.device)
        std = (t.sigmoid(a) * self.eigvals + t.sigmoid(-a)).sqrt()
        return t.sigmoid(a).sqrt() * self.mean + self._unrotate(e * std)


def nats_to_bpd(nats, d):
    """bits/dim = nats / (d ln 2)."""
    return nats / (d * math.log(2))


# ---------------------------------------------------------------------------------------------
# Discrete data on the grid lo + k * delta (8-bit images in [-1, 1]: delta = 2/255, 256 levels)
# ---------------------------------------------------------------------------------------------
def dequantize(x, delta, generator=None):
    """x + delta * (U - 1/2), U ~ U(0, 1) per coordinate: uniform noise over each bin, which turns
    grid data into a genuine continuous density (see discrete_limit_nats)."""
    u = t.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + delta * (u - 0.5)


def discrete_limit_nats(nll_continuous, delta, d):
    """-log P(x) ~= -log p(x) - d log(delta): the mass of a bin is about density x bin volume."""
    return nll_continuous - d * math.log(delta)


def discrete_limit_bpd(bpd_continuous, delta):
    """bits/dim of the discrete limit: bpd + log2(1 / delta) (+6.99 for 8-bit data in [-1, 1])."""
    return bpd_continuous + math.log2(1 / delta)


def grid_index(x, delta, lo=-1., levels=None, atol=1e-3):
    """k (int64, shape of x) with x = lo + k * delta; ValueError unless every value is within
    atol bins of the grid and, when `levels` is given, 0 <= k < levels."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if not t.isfinite(x).all():
        raise ValueError("x contains non-finite values (nan or inf)")
    pos = (x.double() - lo) / delta
    k = pos.round()
    off = (pos - k).abs().max().item() if x.numel() else 0.
    if off > atol:
        raise ValueError(f"x is not on the grid {lo} + k * {delta}: a value is {off:.3g} bins off "
                         "(dequantised or rescaled data?)")
    k = k.long()
    if levels is not None and x.numel() and (k.min() < 0 or k.max() >= levels):
        raise ValueError(f"x leaves the {levels}-level grid starting at {lo}: levels "
                         f"{int(k.min())} .. {int(k.max())}")
    return k


def rounding_tail(x, delta, logsnr, lo=-1., levels=None):
    """1/2 Int_logsnr^inf E_eps ||eps - eps_R(z, a)||^2 da for each sample x on the grid, in closed
    form. eps_R is the noise predictor of hard rounding: x_R = the grid value nearest to
    y = z / sqrt(s(a)) = x + e^{-a/2} eps (clamped to the `levels` values, if given).

    Per coordinate with n grid values on one side, eps - eps_R = e^{a/2} (x_R - x), so with
    r = delta e^{a/2} and Q the normal tail, E ||.||^2 = r^2 sum_{j<=n} (2j - 1) Q((j - 1/2) r);
    integrating (da = 2 dr / r) gives sum_{j<=n} (4 / c_j) G(c_j r_0), c_j = j - 1/2,
    G(u) = Int_u^inf v Q(v) dv = ((1 - u^2) Q(u) + u phi(u)) / 2. An MMSE denoiser does no worse
    than rounding in expectation over x, so this bounds its tail in expectation (pointwise it is
    an estimate: a rare value next to a likely one is rounded away more often by the MMSE
    denoiser). It is small once r_0 = delta e^{logsnr/2} is a few units: logsnr >= 2 log(3 / delta).
    """
    k = grid_index(x, delta, lo, levels).flatten(1)
    r0 = delta * math.exp(logsnr / 2)
    steps = math.ceil(40 / r0) + 1          # terms beyond c_j r0 = 40 are below 1e-300
    if levels is not None:
        steps = min(steps, levels - 1)
    if steps > 10 ** 7:
        raise ValueError(f"log SNR {logsnr} is far below where the grid of width {delta} is "
                         "resolved")
    c = t.arange(1, steps + 1, dtype=t.float64) - 0.5
    u = c * r0
    q = 0.5 * t.special.erfc(u / math.sqrt(2))
    phi = t.exp(-0.5 * u ** 2) / math.sqrt(2 * math.pi)
    cum = F.pad((4 / c * 0.5 * ((1 - u ** 2) * q + u * phi)).cumsum(0), (1, 0)).to(x.device)
    if levels is None:
        per_coord = 2 * cum[-1].expand(k.shape)
    else:
        per_coord = cum[(levels - 1 - k).clamp(max=steps)] + cum[k.clamp(max=steps)]
    return (0.5 * per_coord.sum(1)).to(x.dtype)


def grid_resolved_logsnr(delta, tail=1e-5):
    """The log SNR above which the hard-rounding tail (rounding_tail) of one interior coordinate
    is below `tail` nats: an upper end for the integration range of nll_discrete_points that makes
    its closed-form upper tail negligible (14.2 for 8-bit data, delta = 2/255; 8.6 for 17 levels)."""
    one = t.zeros(1, 1, dtype=t.float64)
    lo, hi = 2 * math.log(1 / delta), 2 * math.log(60 / delta)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rounding_tail(one, delta, mid, 0.) > tail else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------
# The log-SNR range from the data covariance spectrum
# ---------------------------------------------------------------------------------------------
def data_spectrum(x, method="auto", min_eigval=1e-6):
    """Eigenvalues (ascending, float64) of the covariance of data x (n, ...).

    method: "full" (sample covariance, d x d eigendecomposition), "ledoit_wolf" (shrinkage towards
    a multiple of I; computed from the n x n Gram matrix, so it costs O(n^2 d) and never forms a
    d x d matrix: the spectrum of the estimate is (1 - rho) * (the n - 1 nonzero sample
    eigenvalues, padded with zeros) + rho * mu), "diagonal" (per-dimension variances, for d too
    large for either), or "auto": full if n > d, else ledoit_wolf. Eigenvalues are floored at
    min_eigval * their mean, as in GaussianReference.fit.
    ValueError for fewer than 2 samples, non-finite values, or data that never varies.
    """
    x = x.detach().flatten(1).to("cpu", t.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance spectrum, got {n}")
    if not t.isfinite(x).all():
        raise ValueError("data for the covariance spectrum contains non-finite values")
    xc = x - x.mean(0)
    if not xc.abs().max() > 0:
        raise ValueError("the data never varies: its covariance spectrum is zero")
    if method == "auto":
        method = "full" if n > d else "ledoit_wolf"
    if method == "full":
        eigvals = t.linalg.eigvalsh(xc.T @ xc / (n - 1))
    elif method == "ledoit_wolf":
        eigvals = _ledoit_wolf_spectrum(xc)
    elif method == "diagonal":
        eigvals = xc.var(0).sort().values
    else:
        raise ValueError(f"method must be auto, full, ledoit_wolf or diagonal, got {method!r}")
    return eigvals.clamp_min(min_eigval * eigvals.clamp_min(0).mean())


def _ledoit_wolf_spectrum(xc):
    """Eigenvalues of sklearn.covariance.ledoit_wolf(xc, assume_centered=True), from the Gram matrix.

    With G = X X^T and S = X^T X / n: tr S = tr G / n, mu = tr S / d, ||S||_F^2 = ||G||_F^2 / n^2,
    sum_k ||x_k||^4 = sum_k G_kk^2; the shrinkage is rho = min(beta, delta) / delta with
    delta = (||S||_F^2 - 2 mu tr S + d mu^2) / d and beta = (sum_k G_kk^2 / n - ||S||_F^2) / (d n).
    """
    n, d = xc.shape
    gram = xc @ xc.T
    trace = gram.diagonal().sum() / n
    mu = trace / d
    frob = gram.pow(2).sum() / n ** 2
    delta = (frob - 2 * mu * trace + d * mu ** 2) / d
    beta = (gram.diagonal().pow(2).sum() / n - frob) / (d * n)
    rho = 0. if delta == 0 else (t.minimum(beta, delta) / delta).item()
    sample = t.linalg.eigvalsh(gram / n).clamp_min(0)
    if d > n:
        sample = t.cat([t.zeros(d - n, dtype=sample.dtype), sample])
    else:
        sample = sample[n - d:]
    return (1 - rho) * sample + rho * mu


SPECTRUM_RULES = {"moment": 3 / math.pi ** 2, "paper": 3 / math.pi}


def spectrum_logsnr_params(eigvals, rule="paper", margin=8., min_clip=4.):
    """(logsnr_loc, logsnr_scale, clip) from covariance eigenvalues lambda_i (e.g. data_spectrum(x)).

    For Gaussian data the MSE curve is mmse(a)/d = mean_i s(a + log lambda_i), a mixture of
    logistic CDFs at -log lambda_i: its density has mean loc = -mean_i log lambda_i and variance
    pi^2/3 + Var(log lambda). scale = sqrt(1 + c Var(log lambda)) with c from `rule`:
    "moment": c = 3/pi^2 matches that variance with a logistic's pi^2 scale^2 / 3;
    "paper" (default): c = 3/pi, the paper code's wider choice.
    The default is decided by tests/test_spectrum.py: Gaussian data with a 1/k spectrum (d = 32),
    its exact denoiser and an N(0, I) reference, both rules at a clip reaching past every crossing
    (so neither is biased), 64 points per estimate: per-point variance of nll_points 1.9 (paper)
    against 3.3 (moment). The same comparison on other spectra (1/k^2; the sklearn digits') also
    favoured the paper rule; only log lambda spread evenly over a narrow band favoured the moment
    rule, slightly: the wider scale is the safer default.
    clip makes loc +- clip * scale reach `margin` beyond the outermost crossings -log lambda_i, so
    the logistic tails s(+-(a + log lambda)) left outside are below e^-margin per dimension.
    """
    if rule not in SPECTRUM_RULES:
        raise ValueError(f"rule must be one of {sorted(SPECTRUM_RULES)}, got {rule!r}")
    lam = t.as_tensor(eigvals, dtype=t.float64).flatten()
    if lam.numel() == 0 or not t.isfinite(lam).all() or not (lam > 0).all():
        raise ValueError("eigenvalues must be finite and > 0 (floor them, e.g. with data_spectrum)")
    log = lam.log()
    var = log.var(unbiased=False).item() if lam.numel() > 1 else 0.
    loc, scale = -log.mean().item(), math.sqrt(1 + SPECTRUM_RULES[rule] * var)
    reach = max(-log.min().item() + margin - loc, loc + log.max().item() + margin)
    return loc, scale, max(min_clip, reach / scale)


# ---------------------------------------------------------------------------------------------
# Reading the log-SNR range off an MSE curve
# ---------------------------------------------------------------------------------------------
def mse_quantiles(logsnrs, mse, d, levels=(0.25, 0.5, 0.75)):
    """Log SNRs at which mse(a)/d first reaches each level (linear interpolation on the grid).

    mse/d rises from 0 at low SNR towards 1 at high SNR, like a CDF over a. Returns NaN for a level
    the curve never reaches on this grid (e.g. data on a manifold, whose MSE falls back to 0).
    """
    a = np.asarray(logsnrs, dtype=float)
    y = np.asarray(mse, dtype=float) / d
    out = []
    for q in levels:
        above = np.nonzero(y >= q)[0]
        if len(above) == 0:
            out.append(float("nan"))
        elif above[0] == 0:
            out.append(float(a[0]))
        else:
            i = above[0]
            out.append(float(np.interp(q, [y[i - 1], y[i]], [a[i - 1], a[i]])))
    return out


def suggest_logsnr_params(logsnrs, mse, d):
    """(logsnr_loc, logsnr_scale) from a measured MSE curve.

    loc is the median crossing, mse/d = 1/2. A logistic CDF s((a - loc)/scale) reaches 1/4 and 3/4
    at loc -+ scale ln 3, so scale = (a_75 - a_25) / (2 ln 3). Returns (nan, nan) if the curve
    does not cover its quartiles on the grid.
    """
    a25, a50, a75 = mse_quantiles(logsnrs, mse, d)
    return a50, (a75 - a25) / (2 * math.log(3))


def gap_logsnr_params(logsnrs, mse, mmse_ref, tail=1e-3, min_clip=4.):
    """(logsnr_loc, logsnr_scale, clip) for the control-variate estimator, from a measured MSE curve.

    Its integrand is the gap between the model's MSE and the Gaussian reference's MMSE, so
    |mmse_ref(a) - mse(a)| is treated as a density over a: loc is its median, scale its
    interquartile range / (2 ln 3) (as for a logistic), and clip makes loc +- clip * scale cover
    its [tail, 1 - tail] quantiles, so truncating the integral there costs no visible bias.
    The grid must extend past both ends of the gap.
    """
    a = np.asarray(logsnrs, dtype=float)
    gap = np.abs(np.asarray(mmse_ref, dtype=float) - np.asarray(mse, dtype=float))
    if not gap.sum() > 0:
        raise ValueError("the MSE curve equals the Gaussian MMSE everywhere: no gap to place points on")
    cdf = np.cumsum(gap) / gap.sum()
    lo, q25, loc, q75, hi = np.interp([tail, 0.25, 0.5, 0.75, 1 - tail], cdf, a)
    scale = (q75 - q25) / (2 * math.log(3))
    return float(loc), float(scale), float(max(min_clip, (loc - lo) / scale, (hi - loc) / scale))


# ---------------------------------------------------------------------------------------------
# Pieces the training scripts share
# ---------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help does not already say the default (the
    per-dataset ones)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def str2bool(value):
    """argparse type for booleans that parse: 'False', 'no', '0' are false."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def positive(kind):
    """argparse type: a number of the given kind that must be > 0."""
    def parse(value):
        number = kind(value)
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number
    return parse


def add_trainer_args(parser):
    """Lightning Trainer flags shared by both scripts."""
    group = parser.add_argument_group("trainer (PyTorch Lightning)")
    group.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto (default: auto)")
    group.add_argument("--devices", default="auto",
                       help="number of devices, a list like 0,1, or auto (default: auto)")
    group.add_argument("--strategy", default="auto", help="e.g. ddp, ddp_spawn, fsdp (default: auto)")
    group.add_argument("--num_nodes", type=positive(int), default=1, help="machines for multi-node DDP")
    group.add_argument("--precision", default="32-true",
                       help="32-true, 64-true, bf16-mixed, 16-mixed (the loss is always float32)")
    group.add_argument("--seed", type=int, default=0, help="seeds data splits, init and noise")
    return group


def make_trainer(args, run_dir, script, callbacks=(), **kwargs):
    """A Trainer from the shared flags, logging to TensorBoard in run_dir and checkpointing to
    run_dir/checkpoints (the best val_loss and the last epoch). Every checkpoint also holds the
    run's arguments and the script's name ("run_args"), so --eval_only can rebuild the model and
    its data from the checkpoint alone."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    class RunArgs(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["run_args"] = dict(vars(args), script=script)

    checkpoint = ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="val_loss",
                                 filename="best-{epoch}", save_last=True)
    logger = TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False)
    return pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                      num_nodes=args.num_nodes, precision=args.precision,
                      max_epochs=args.num_epochs, logger=logger,
                      callbacks=[checkpoint, RunArgs(), *callbacks], **kwargs)


def new_run_dir(root, name):
    """`root/name`, or `root/name-2`, `-3`, ... : an earlier run is never overwritten."""
    path, k = os.path.join(root, name), 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(root, f"{name}-{k}")
    return path


class UserError(RuntimeError):
    """A problem the user can fix (missing data, weights or files): printed without a traceback."""


def run_cli(main):
    """Runs main(); a user error (bad value, missing data or weights, non-finite loss) ends with
    one line on stderr and exit status 2 instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Evaluating trained checkpoints (--eval_only)
# ---------------------------------------------------------------------------------------------
RESULTS_SCHEMA = "itd-eval/1"


def add_eval_args(parser):
    """--eval_only, --ckpt, --npoints, --select_fraction, --results: evaluate instead of training."""
    group = parser.add_argument_group(
        "evaluation of trained checkpoints (instead of training)")
    group.add_argument("--eval_only", action="store_true",
                       help="evaluate --ckpt on the validation data: a table of E[-log p] (nats, "
                            "bits/dim, standard errors), printed and written as JSON")
    group.add_argument("--ckpt", nargs="+", default=None, metavar="PATH",
                       help="checkpoint(s) written by this script; with several, their ensemble "
                            "(with the data-matched Gaussian) is scored too")
    group.add_argument("--npoints", type=positive(int), default=128,
                       help="(log SNR, noise) points per sample and estimate: 4 independent "
                            "randomised Sobol sets of npoints / 4 (a power of 2, >= 8)")
    group.add_argument("--select_fraction", type=float, default=0.5,
                       help="part of the validation data held out to choose, per log SNR, between "
                            "ensemble members and rounded variants; every row is scored on the rest")
    group.add_argument("--results", default=None, metavar="JSON",
                       help="where the table goes (default: eval-<checkpoint name>.json next to the "
                            "first checkpoint; an existing file is never overwritten: -2, -3, ...)")


def check_eval_args(parser, args, without_ckpt=False):
    """Argument errors of add_eval_args' flags; without_ckpt: --eval_only may go without --ckpt
    (train_cifar10.py then evaluates a --pretrained U-Net as it is)."""
    if not args.eval_only:
        if args.ckpt:
            parser.error("argument --ckpt: only used with --eval_only")
        return
    if not args.ckpt and not without_ckpt:
        parser.error("--eval_only needs --ckpt PATH [PATH ...]"
                     + (" or a --pretrained U-Net" if hasattr(args, "pretrained") else ""))
    if args.npoints < 8 or args.npoints & (args.npoints - 1):
        parser.error(f"argument --npoints: must be a power of 2 >= 8, got {args.npoints}")
    if not 0 < args.select_fraction < 1:
        parser.error(f"argument --select_fraction: must be in (0, 1), got {args.select_fraction}")


def load_checkpoint(path, script):
    """A checkpoint written by `script` (its run arguments are saved with it by make_trainer), or
    a UserError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = t.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...: all mean the same to the user
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}") from None
    saved = ckpt.get("run_args") if isinstance(ckpt, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    if (saved.get("script") != script or not isinstance(ckpt.get("state_dict"), dict)
            or not isinstance(ckpt.get("hyper_parameters"), dict)):
        raise UserError(f"{path} is not a checkpoint written by {script}"
                        + (f" (it comes from {saved['script']})" if saved.get("script")
                           else " (it holds no saved run arguments)"))
    return ckpt


def same_data(paths, ckpts, keys):
    """The run arguments that fix the evaluation data, checked to agree across checkpoints."""
    first = {k: ckpts[0]["run_args"].get(k) for k in keys}
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        other = {k: ckpt["run_args"].get(k) for k in keys}
        if other != first:
            diff = ", ".join(f"{k} {first[k]!r} vs {other[k]!r}" for k in keys if first[k] != other[k])
            raise UserError(f"{paths[0]} and {path} were trained on different data ({diff}): "
                            "an ensemble needs one data set")
    return first


def results_path(args, names, results_dir=None):
    """--results, or eval-<first checkpoint's name>.json next to it (in results_dir when there is
    no checkpoint), made unique: an existing file is never overwritten."""
    if args.results:
        path = args.results
    elif args.ckpt:
        stem = os.path.splitext(os.path.basename(args.ckpt[0]))[0]
        path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0])), f"eval-{stem}.json")
    else:
        stem = names[0].replace("/", "-").replace(" ", "_")
        path = os.path.join(results_dir or ".", f"eval-{stem}.json")
    root, ext = os.path.splitext(path)
    k = 2
    while os.path.exists(path):
        path, k = f"{root}-{k}{ext}", k + 1
    return path


def evaluate(models, names, x, seed=0, npoints=128, select_fraction=0.5, batch_size=256,
             grid=None, progress=True):
    """The evaluation table of trained DiffusionModels on data x: a list of rows
    {model, estimate, nats, nats_stderr, bpd, bpd_stderr}, and the split it used.

    x is split once (seeded) into a selection part, used only to choose per log SNR between
    ensemble members and rounding variants (diffusionmodel.Ensemble.fit), and a scoring part on
    which every row is computed, so no choice looks at the points it is scored on. Each sample's
    estimate depends only on (seed, its index), not on batch_size, and all rows use the same
    points. Standard errors are over the scored samples, each with its own (log SNR, noise) points:
    sqrt(Var_i(nll_i) / N), which covers the data and the log-SNR integral together (points shared
    across samples would make the integral's error common to all and hide it).

    Models: the data-matched Gaussian (the first model's reference), each given model, and the
    ensemble of all of them with the Gaussian. Estimates:
    - continuous: -log p(x), the density of x itself;
    with grid=(delta, lo, levels) for discrete data, also
    - discrete limit: continuous - d log(delta) (-log P ~= -log p - d log delta);
    - dequantized: -log p(x + delta (U - 1/2)) - d log(delta), an upper bound on -log P in
      expectation over U;
    - discrete, no rounding: the direct estimate 1/2 Int E||eps - eps_hat||^2 da with its tails in
      closed form, over a log-SNR range extended up to utils.grid_resolved_logsnr(delta), where
      the closed-form upper tail is negligible;
    - discrete, hard / soft rounding: the same with, per log SNR, the best of x_hat, x_hat rounded
      to the grid and the Gaussian, as chosen on the selection part.
    """
    from diffusionmodel import Ensemble, GaussianDenoiser

    n_select = int(round(select_fraction * len(x)))
    perm = t.randperm(len(x), generator=t.Generator().manual_seed(seed))
    x_select, x_score = x[perm[:n_select]], x[perm[n_select:]]
    if len(x_score) < 2 or n_select < 2:
        raise UserError(f"{len(x)} samples are too few to split into selection and scoring parts")
    first, device = models[0], models[0].device
    x_select = x_select.to(device)
    reference = first.reference
    gaussian = first._with_denoiser(GaussianDenoiser(reference))

    def ensemble(members, like):  # the choice draws from a stream of its own, not the scoring's
        return Ensemble.fit(members, x_select, generator=_generator(seed + _SELECTION_STREAM),
                            reference=reference, logsnr_range=_range(like)).as_model(like)

    entries = [("gaussian", [], gaussian)] + [(n, [m], m) for n, m in zip(names, models)]
    entries.append(("ensemble", list(models), ensemble(models, first)))
    d = first.d
    # (model name, estimate, model, fn(model, x batch, index of its first sample) -> nats), or
    # (model name, estimate, None, (row it is derived from, constant added))
    jobs = []
    if grid is not None:
        delta, lo, levels = grid
        shift, top = -d * math.log(delta), grid_resolved_logsnr(delta)
    for name, members, model in entries:
        jobs.append((name, "continuous", model, _continuous(npoints, seed)))
        if grid is None:
            continue
        jobs.append((name, "discrete limit", None, ((name, "continuous"), shift)))
        jobs.append((name, "dequantized", model, _continuous(npoints, seed, shift, delta)))
        wide = _widened(model, top)
        jobs.append((name, "discrete, no rounding", wide, _discrete(npoints, seed, grid)))
        bases = [_widened(m, top)
                 for m in ([gaussian] if name in ("gaussian", "ensemble") else []) + members]
        for mode in ("hard", "soft"):
            rounded = [b.rounded(delta, mode, lo, levels) for b in bases]
            jobs.append((name, f"discrete, {mode} rounding", ensemble(bases + rounded, wide),
                         _discrete(npoints, seed, grid)))

    rows, per_sample = [], {}
    batches = range(0, len(x_score), batch_size)
    bar = _progress(sum(model is not None for _, _, model, _ in jobs) * len(batches), progress)
    for name, estimate, model, fn in jobs:
        if model is None:
            source, constant = fn
            nll = per_sample[source] + constant
        else:
            parts = []
            for start in batches:
                xb = x_score[start:start + batch_size].to(device)
                parts.append(fn(model, xb, start).double().cpu())
                bar.update()
            nll = t.cat(parts)
        per_sample[(name, estimate)] = nll
        mean, stderr = nll.mean().item(), (nll.std() / math.sqrt(len(nll))).item()
        rows.append(dict(model=name, estimate=estimate, nats=mean, nats_stderr=stderr,
                         bpd=nats_to_bpd(mean, d), bpd_stderr=nats_to_bpd(stderr, d)))
    bar.close()
    return rows, dict(n_scored=len(x_score), n_selection=n_select, x_score=x_score,
                      per_sample=per_sample)


def _range(model):
    h = model.hparams
    return h.logsnr_loc - h.clip * h.logsnr_scale, h.logsnr_loc + h.clip * h.logsnr_scale


def _widened(model, hi):
    """`model` with its log-SNR range extended (clip grown) to reach at least `hi`."""
    h = model.hparams
    if h.logsnr_loc + h.clip * h.logsnr_scale >= hi:
        return model
    wide = model._with_denoiser(model, reference=model.reference)
    wide.hparams.clip = (hi - h.logsnr_loc) / h.logsnr_scale
    return wide


_SELECTION_STREAM = 1 << 40  # seed offset of the ensemble choice's random numbers


def _generator(seed):
    """A CPU generator: the stream seed drawn from it (utils.stream_seed) is then the same on
    every device, so a table depends on --seed, not on where it was computed."""
    return t.Generator().manual_seed(seed)


def _continuous(npoints, seed, shift=0., dequantize_width=None):
    def fn(model, x, start):
        if dequantize_width is not None:  # noise named by (seed, sample index), like the points
            index = t.arange(start, start + len(x), device=x.device).view(-1, 1)
            coord = t.arange(x[0].numel(), device=x.device)
            u = counter_uniform(seed, index, coord, 2 ** 40, device=x.device).view_as(x)
            x = x + dequantize_width * (u.to(x.dtype) - 0.5)
        return model.nll_points(x, npoints, generator=_generator(seed), index=start)[0] + shift
    return fn


def _discrete(npoints, seed, grid):
    delta, lo, levels = grid

    def fn(model, x, start):
        return model.nll_discrete_points(x, delta, npoints, lo=lo, levels=levels,
                                         generator=_generator(seed), index=start)[0]
    return fn


def _progress(total, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="evaluating", disable=not enabled, unit="batch")


def format_results(rows):
    """The table as text: one line per (model, estimate)."""
    lines = [f"{'model':<24} {'estimate':<26} {'nats':>12} {'+-':>9} {'bits/dim':>9} {'+-':>7}"]
    for r in rows:
        lines.append(f"{r['model']:<24} {r['estimate']:<26} {r['nats']:12.4f} "
                     f"{r['nats_stderr']:9.4f} {r['bpd']:9.4f} {r['bpd_stderr']:7.4f}")
    return "\n".join(lines)


def claim_results_file(path):
    """Creates the results file now, empty, so that a bad path fails before the evaluation and
    no other evaluation can take the name meanwhile."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "x").close()
    except OSError as err:
        raise UserError(f"cannot write the results to {path}: {err.strerror or err}") from None


def eval_device(accelerator):
    """The device --eval_only computes on, from --accelerator: CUDA when asked for ("gpu",
    "cuda") or available ("auto"), else the CPU."""
    if accelerator in ("gpu", "cuda") and not t.cuda.is_available():
        raise UserError(f"--accelerator {accelerator}, but no CUDA device is available")
    if accelerator not in ("auto", "gpu", "cuda", "cpu"):
        raise UserError(f"--eval_only runs on cpu or cuda, not --accelerator {accelerator}")
    return t.device("cuda" if accelerator != "cpu" and t.cuda.is_available() else "cpu")


def run_evaluation(args, models, names, x, grid=None, exact_nll=None, info=None,
                   results_dir=None):
    """--eval_only for either script: the table of `evaluate` on x, printed and written as JSON
    (see results_path; never over an existing file)."""
    start = time.time()
    device = eval_device(args.accelerator)
    models = [m.to(device) for m in models]
    path = results_path(args, names, results_dir)
    claim_results_file(path)
    try:
        rows, split = evaluate(models, names, x, args.seed, args.npoints, args.select_fraction,
                               args.eval_batch_size, grid)
    except BaseException:
        os.remove(path)  # nothing half-written stays behind
        raise
    x_score, per_sample = split.pop("x_score"), split.pop("per_sample")
    d = models[0].d
    if exact_nll is not None:  # on the same scored points
        exact = exact_nll(x_score.cpu()).double()
        mean, stderr = exact.mean().item(), (exact.std() / math.sqrt(len(exact))).item()
        rows.insert(0, dict(model="exact", estimate="continuous", nats=mean, nats_stderr=stderr,
                            bpd=nats_to_bpd(mean, d), bpd_stderr=nats_to_bpd(stderr, d)))
    results = dict(schema=RESULTS_SCHEMA, **(info or {}),
                   checkpoints=[os.path.abspath(p) for p in args.ckpt or []],
                   x_shape=list(models[0].x_shape), d=d, npoints=args.npoints, seed=args.seed,
                   select_fraction=args.select_fraction, **split,
                   grid=None if grid is None else dict(zip(("delta", "lo", "levels"), grid)),
                   rows=rows, wall_time_s=time.time() - start)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(format_results(rows))
    print(f"written to {path}")
    return dict(results, per_sample=per_sample)


def checkpoint_names(paths):
    """Short unique names for the table: RUN/last.ckpt for RUN/checkpoints/last.ckpt."""
    names = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        if os.path.basename(folder) == "checkpoints":
            name = f"{os.path.basename(os.path.dirname(folder))}/{name}"
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names
