"""Numerical pieces (a leaf module): the Gaussian channel, schedules, counter-based random numbers
named by (seed, sample index, ...), the Gaussian reference in closed form, and grid data.
Notation (docs/maths.md): s = sigmoid, a = log SNR, z = sqrt(s(a)) x + sqrt(s(-a)) eps."""
import functools
import hashlib
import math
from typing import NamedTuple, Optional

import torch as t
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
_BUFFERS = ("mean", "eigvals", "eigvecs", "class_mean", "class_eigvals", "class_eigvecs")


# --- The Gaussian channel ---
def append_dims(v, ndim):
    """v (B,) viewed as (B, 1, ..., 1) with `ndim` dimensions in all, to broadcast over samples."""
    return v.view(v.shape + (1,) * (ndim - v.dim()))


def noisy_channel(x, logsnr, eps):
    """z = sqrt(s(a)) x + sqrt(s(-a)) eps, one log SNR per sample."""
    a = append_dims(logsnr.to(x.dtype), x.dim())
    return t.sigmoid(a).sqrt() * x + t.sigmoid(-a).sqrt() * eps


def x_from_eps(z, logsnr, eps):
    """The x that z came from given its noise: x = (z - sqrt(s(-a)) eps) / sqrt(s(a))."""
    return eps_from_x(z, -logsnr, eps)  # the same map with a and -a swapped


def eps_from_x(z, logsnr, x):
    """The noise in z given x: eps = (z - sqrt(s(a)) x) / sqrt(s(-a))."""
    a = append_dims(logsnr.to(z.dtype), z.dim())
    return (z - t.sigmoid(a).sqrt() * x) / t.sigmoid(-a).sqrt()


def sq_norm(v):
    """Per-sample squared norm over all but the first dimension."""
    return v.flatten(1).pow(2).sum(1)


def logsnr_schedule(lo, hi, steps=1000):
    """alphas_cumprod of a schedule whose log SNR falls linearly from hi (t = 0) to lo."""
    if not -36 < lo < hi < 36:  # beyond, alpha_bar rounds to 0 or 1 in float64
        raise ValueError(f"log SNR range must lie within (-36, 36), got [{lo}, {hi}]")
    return t.sigmoid(t.linspace(hi, lo, steps, dtype=t.float64))


def schedule_logsnr(alphas_cumprod):
    """log SNR of every integer timestep, log(alpha_bar / (1 - alpha_bar)), float64, decreasing."""
    ab = t.as_tensor(alphas_cumprod).to("cpu", t.float64)
    if ab.dim() != 1 or len(ab) < 2 or not ((ab > 0) & (ab < 1)).all():
        raise ValueError("alphas_cumprod must be a 1-D schedule with values in (0, 1)")
    logsnr = ab.log() - (-ab).log1p()
    if not (logsnr[1:] < logsnr[:-1]).all():
        raise ValueError("alphas_cumprod must decrease strictly (t = 1: the least noisy step)")
    return logsnr


# --- Counter-based random numbers: draws named by (seed, sample index, ...), not by batches ---
# SplitMix64's constants, all >= 2^63, as signed int64
_GOLDEN, _MIX1, _MIX2 = (c - 2 ** 64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                              0x94D049BB133111EB))


def _shr(x, k):  # logical right shift of int64 (torch's >> is arithmetic)
    return (x >> k) & ((1 << (64 - k)) - 1)


def sample_index(index, b, device):
    """Positions of a batch's samples in the data set: None (0 .. b-1), an int offset, or (b,)."""
    if index is None or isinstance(index, int):
        return t.arange(b, device=device) + (index or 0)
    index = t.as_tensor(index, dtype=t.int64, device=device).flatten()
    if len(index) != b:
        raise ValueError(f"index has {len(index)} entries for a batch of {b} samples")
    return index


def fresh_seed(seed=None):
    """The seed of a keyed stream: `seed` itself, or a fresh 62-bit one from torch's global RNG."""
    return int(seed) if seed is not None else int(t.randint(0, 2 ** 62, (1,)).item())


def derive_seed(seed, *keys):
    """A 62-bit seed for another stream, named by the integers (seed, keys) (BLAKE2b)."""
    text = ",".join(str(int(k)) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2


def counter_hash(seed, *keys, device=None):
    """64 random bits (int64) per element of the broadcast keys, a function of (seed, keys) only:
    SplitMix64's output function (wrapping arithmetic) on the seed, then on each key xor-ed in."""
    h = 0
    for key in (seed, *keys):
        h = (h ^ t.as_tensor(key, dtype=t.int64, device=device)) + _GOLDEN
        h = (h ^ _shr(h, 30)) * _MIX1
        h = (h ^ _shr(h, 27)) * _MIX2
        h = h ^ _shr(h, 31)
    return h


def counter_uniform(seed, *keys, device=None):
    """U(0, 1) draws in float64 (53 random bits, never exactly 0 or 1) named by (seed, keys)."""
    return (_shr(counter_hash(seed, *keys, device=device), 11).double() + 0.5) * 2.0 ** -53


@functools.lru_cache(maxsize=8)
def _sobol_digits(n, dim, device=None):
    points = t.quasirandom.SobolEngine(dim).draw(n, dtype=t.float64)
    return (points * 2 ** t.quasirandom.SobolEngine.MAXBIT).long().to(device)


def keyed_sobol(seed, set_keys, point, n, dims, device=None):
    """Exactly uniform (rows, len(dims)) float64: points of a randomised Sobol set named by keys."""
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


class GaussianReference(t.nn.Module):
    """q = N(mean, U diag(eigvals) U^T) over flattened x, and q(x | y) per label (docs/maths.md)."""

    def __init__(self, d, num_classes=None):
        super().__init__()
        self.d, k = int(d), num_classes or 0
        values = (t.zeros(self.d), t.ones(self.d), t.zeros(0), t.zeros(k, self.d),
                  t.ones(k, self.d), t.zeros(0))
        for name, value in zip(_BUFFERS, values):
            self.register_buffer(name, value)

    @t.no_grad()
    def fit(self, x, y=None, min_eigval=1e-6):
        """Moment-match q (and q(x | k) given labels y) to data x (n, ...) (docs/maths.md)."""
        x = x.detach().flatten(1).to("cpu", t.float64)
        if x.shape[1] != self.d:
            raise ValueError(f"reference data has {x.shape[1]} dimensions per sample, "
                             f"expected {self.d}")
        if not t.isfinite(x).all():
            raise ValueError("reference data contains non-finite values")
        parts = [_moments(x, min_eigval)]
        if y is not None:
            y = self._labels(y, "cpu")
            parts += [_moments(x[y == k], min_eigval, f"samples of label {k}")
                      for k in range(self.num_classes)]
        values = list(parts[0]) + [t.stack(v) for v in zip(*parts[1:])]
        for name, value in zip(_BUFFERS, values):
            setattr(self, name, value.to(self.mean.device, self.mean.dtype))  # kept as they were
        return self

    @property
    def num_classes(self):
        """The labels it holds a Gaussian for, or None."""
        return len(self.class_mean) or None

    def _labels(self, y, device):
        if not self.num_classes:
            raise ValueError("labels given to a reference without classes (num_classes)")
        return t.as_tensor(y, device=device).view(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _BUFFERS:
            if (like := state_dict.get(prefix + name)) is not None:
                setattr(self, name, t.empty_like(like, device=self.mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _per_label(self, fn, y, *rows):  # fn((mean, eigvals, eigvecs), *rows) per label present
        marginal = self.mean, self.eigvals, self.eigvecs
        if y is None:
            return fn(marginal, *rows)
        k = self._labels(y, rows[0].device)
        out = None
        for j in k.unique().tolist():
            at = (k == j).nonzero().squeeze(1)
            vecs = self.class_eigvecs[j] if self.class_eigvecs.numel() else self.class_eigvecs
            parts = marginal if j == -1 else (self.class_mean[j], self.class_eigvals[j], vecs)
            part = fn(parts, *(r[at] for r in rows))
            out = part.new_empty((len(k),) + part.shape[1:]) if out is None else out
            out[at] = part
        return out

    def rotate(self, x, vecs=None, inverse=False):
        """U^T x (U x if inverse) for x (n, d), U the eigenvectors (or `vecs`)."""
        vecs = self.eigvecs if vecs is None else vecs
        if vecs.numel() == 0:
            return x
        with t.autocast(x.device.type, enabled=False):
            return x @ (vecs.to(x.dtype).T if inverse else vecs.to(x.dtype))

    def _whitened(self, parts, x, noise=0.):  # (y^2 / lambda, lambda), y = U^T (x - mean)
        mean, lam, vecs = parts
        lam = lam.to(x.dtype) + noise
        y = self.rotate(x.flatten(1) - mean.to(x.dtype), vecs)
        return y ** 2 / lam, lam

    def entropy(self):
        """h(q) = d/2 log(2 pi e) + 1/2 sum_i log lambda_i."""
        return 0.5 * self.d * (LOG_2PI + 1) + 0.5 * self.eigvals.log().sum()

    def nll(self, x, y=None, noise=0.):
        """-log q(x), or -log q(x | y) with labels; noise: of q convolved with N(0, noise I)."""
        def nll(parts, x):
            r, lam = self._whitened(parts, x, noise)
            return 0.5 * (self.d * LOG_2PI + lam.log().sum() + r.sum(1))
        return self._per_label(nll, y, x)

    def mmse(self, logsnr):
        """mmse_G(a) = sum_i s(a + log lambda_i), the marginal's noise-prediction MMSE."""
        return t.sigmoid(logsnr.unsqueeze(-1) + self.eigvals.to(logsnr.dtype).log()).sum(-1)

    def error_integral(self, x, lo, hi):
        """Int_lo^hi E ||eps - eps_G(z, a)||^2 da per sample (lo may be -inf), docs/maths.md."""
        r, lam = self._whitened((self.mean, self.eigvals, self.eigvecs), x)

        def antiderivative(a):
            v = t.as_tensor(a, dtype=x.dtype, device=x.device).view(-1, 1) + lam.log()
            return (F.softplus(v) + t.sigmoid(-v) * (1 - r)).sum(1)
        return antiderivative(hi) - antiderivative(lo)

    def eps(self, z, logsnr, y=None):
        """The optimal noise predictor eps_G(z, a), in z's dtype (docs/maths.md)."""
        def eps(parts, z, logsnr):
            mean, lam, vecs = parts
            a = logsnr.to(z.dtype).view(-1, 1)
            zf = z.flatten(1) - t.sigmoid(a).sqrt() * mean.to(z.dtype)
            log_gain = -0.5 * F.logsigmoid(-a) - F.softplus(a + lam.to(z.dtype).log())
            scaled = self.rotate(zf, vecs) * log_gain.exp()
            return self.rotate(scaled, vecs, inverse=True).view_as(z)
        return self._per_label(eps, y, z, logsnr.expand(len(z)))

    def sample(self, n, logsnr=None, generator=None):
        """Draws from z's marginal at log SNR `logsnr`, or from q itself (a = inf, exactly)."""
        e = t.randn(n, self.d, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        a = t.as_tensor(math.inf if logsnr is None else logsnr, dtype=e.dtype, device=e.device)
        std = (t.sigmoid(a) * self.eigvals + t.sigmoid(-a)).sqrt()
        return t.sigmoid(a).sqrt() * self.mean + self.rotate(e * std, inverse=True)


def _moments(x, min_eigval, what="reference data"):
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a Gaussian to the {what}, got {n}")
    mean = x.mean(0)
    xc = x - mean
    if n < 10 * d:
        from sklearn.covariance import ledoit_wolf
        shrunk = ledoit_wolf(xc.numpy(), assume_centered=True)[0]
        eigvals, eigvecs = t.linalg.eigh(t.from_numpy(shrunk))
    else:
        eigvals, eigvecs = t.linalg.eigh(xc.T @ xc / (n - 1))
    eigvals = eigvals.clamp_min(min_eigval * eigvals.clamp_min(0).mean().clamp_min(1e-300))
    return mean, eigvals, eigvecs


def log_ndtr_diff(a, b):
    """log(Phi(b) - Phi(a)) for a < b (either may be infinite), stable in both tails."""
    flip = a + b > 0
    a, b = t.where(flip, -b, a), t.where(flip, -a, b)
    log_b = t.special.log_ndtr(b)
    d = t.special.log_ndtr(a) - log_b  # <= 0
    return log_b + t.where(d > -math.log(2), t.log(-t.expm1(d)), t.log1p(-t.exp(d)))


def stderr_from_sums(total, total_sq, n):
    """sqrt(s^2 / n), s^2 the unbiased variance, from the sums of n values and of their squares."""
    var = (total_sq - total ** 2 / n) / (n - 1)
    return var.clamp_min(0) ** 0.5 / n ** 0.5


def nats_to_bpd(nats, d):
    """bits/dim = nats / (d ln 2)."""
    return nats / (d * math.log(2))


# --- Discrete data on a grid (Grid) ---
def dequantize(x, delta, seed, index):
    """x + delta * (U - 1/2), U named by (seed, the samples' positions `index`, coordinate)."""
    index = sample_index(index, len(x), x.device)
    coord = t.arange(x[0].numel(), device=x.device)
    u = counter_uniform(seed, index.view(-1, 1), coord, 2 ** 40, device=x.device).view_as(x)
    return x + delta * (u.to(x.dtype) - 0.5)


def discrete_limit_nats(nll_continuous, delta, d):
    """-log P(x) ~= -log p(x) - d log(delta): a change of units, not a bound."""
    return nll_continuous - d * math.log(delta)


class Grid(NamedTuple):
    """The grid lo + k delta, k < levels (None: unbounded); 8-bit pixels: Grid(2 / 255, -1, 256)."""
    delta: float
    lo: float = -1.
    levels: Optional[int] = None

    @property
    def hi(self):
        return None if self.levels is None else self.lo + (self.levels - 1) * self.delta

    def index(self, x, atol=1e-3):
        """k (int64) with x = lo + k * delta; a ValueError for values off the grid or its levels."""
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if not t.isfinite(x).all():
            raise ValueError("x contains non-finite values (nan or inf)")
        pos = (x.double() - self.lo) / self.delta
        k = pos.round()
        off = (pos - k).abs().max().item() if x.numel() else 0.
        if off > atol:
            raise ValueError(f"x is not on the grid {self.lo} + k * {self.delta}: a value is "
                             f"{off:.3g} bins off (dequantised or rescaled data?)")
        if self.levels is not None and x.numel() and (k.min() < 0 or k.max() >= self.levels):
            raise ValueError(f"x leaves the {self.levels}-level grid starting at {self.lo}: levels "
                             f"{int(k.min())} .. {int(k.max())}")
        return k.long()


def rounding_tail(x, grid, logsnr):
    """1/2 Int_logsnr^inf E ||eps - eps_R(z, a)||^2 da per sample x on the grid (docs/maths.md)."""
    k, levels = grid.index(x).flatten(1), grid.levels
    r0 = grid.delta * math.exp(logsnr / 2)
    # terms beyond c_j r0 = 40 are below 1e-300; a bounded grid has levels - 1 at most
    steps = min(math.ceil(40 / r0) + 1, (levels or math.inf) - 1)
    if steps > 10 ** 7:
        raise ValueError(f"log SNR {logsnr} is far below where the grid of width {grid.delta} is "
                         "resolved")
    c = t.arange(1, steps + 1, dtype=t.float64) - 0.5
    u = c * r0
    q = 0.5 * t.special.erfc(u / math.sqrt(2))
    phi = t.exp(-0.5 * u ** 2) / math.sqrt(2 * math.pi)
    cum = F.pad((4 / c * 0.5 * ((1 - u ** 2) * q + u * phi)).cumsum(0), (1, 0)).to(x.device)
    per_coord = (2 * cum[-1].expand(k.shape) if levels is None
                 else cum[(levels - 1 - k).clamp(max=steps)] + cum[k.clamp(max=steps)])
    return (0.5 * per_coord.sum(1)).to(x.dtype)


def grid_resolved_logsnr(delta, tail=1e-5):
    """The log SNR above which a coordinate's rounding tail is below `tail` nats (docs/maths.md)."""
    one = t.zeros(1, 1, dtype=t.float64)
    lo, hi = 2 * math.log(1 / delta), 2 * math.log(60 / delta)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rounding_tail(one, Grid(delta, 0.), mid) > tail else (lo, mid)
    return hi
