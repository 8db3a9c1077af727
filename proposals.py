"""The importance distribution q over log SNR and how its range is chosen (docs/maths.md)."""
import math

import numpy as np
import torch as t
import torch.nn.functional as F

BINS = 48  # equal-width log-SNR bins of a fitted proposal and of the held-out choices


class LogisticProposal:
    """q(a): the logistic(loc, scale) truncated to loc +- clip * scale."""

    def __init__(self, loc=0., scale=3., clip=4.):
        if not (scale > 0 and clip > 0):
            raise ValueError(f"logsnr_scale and clip must be > 0, got {scale} and {clip}")
        self.loc, self.scale, self.clip = float(loc), float(scale), float(clip)

    def __repr__(self):
        return f"LogisticProposal(loc={self.loc:g}, scale={self.scale:g}, clip={self.clip:g})"

    @property
    def range(self):
        """(lowest, highest) log SNR: loc -+ clip * scale."""
        return self.loc - self.clip * self.scale, self.loc + self.clip * self.scale

    def weight(self, logsnr):
        """w(a) = 1 / q(a), q(a) = s(v) s(-v) / (scale tanh(c/2)), v = (a - loc) / scale."""
        v = (logsnr - self.loc) / self.scale
        return self.scale * math.tanh(self.clip / 2) * t.exp(F.softplus(v) + F.softplus(-v))

    def from_uniform(self, u, dtype=t.float32):
        """(a(u), w(a(u))) for uniforms u in [0, 1], a rounded into the range in `dtype`."""
        lo, hi = 1 / (1 + math.exp(self.clip)), 1 / (1 + math.exp(-self.clip))
        return self._at(self.loc + self.scale * t.logit(lo + (hi - lo) * u.to(t.float64)), dtype)

    def _at(self, logsnr, dtype):
        # the range's ends rounded inwards: every draw lies in the support in `dtype`
        lo, hi = (t.tensor(v, dtype=t.float64).to(dtype) for v in self.range)
        inf = t.tensor(math.inf, dtype=dtype)
        lo = t.nextafter(lo, inf) if lo.double() < self.range[0] else lo
        hi = t.nextafter(hi, -inf) if hi.double() > self.range[1] else hi
        a = logsnr.to(dtype).clamp(lo.to(logsnr.device), hi.to(logsnr.device))
        return a, self.weight(a.double()).to(dtype)

    def sample(self, shape, stratified=True, generator=None, device=None, dtype=t.float32):
        """(a, w) of the given shape; stratified: one draw per stratum along the last dimension."""
        u = t.rand(shape, generator=generator, device=device, dtype=t.float64)
        if stratified:
            u = (t.arange(shape[-1], device=device, dtype=t.float64) + u) / shape[-1]
        return self.from_uniform(u, dtype)

    def quadrature(self, n, device=None, dtype=t.float32):
        """The midpoint rule in quantile space, u_k = (k + 1/2) / n: biased by O(1/n^2)."""
        return self.from_uniform((t.arange(n, device=device, dtype=t.float64) + 0.5) / n, dtype)

    def widened(self, hi):
        """The same proposal with clip grown so that the range reaches at least `hi`."""
        return self if self.range[1] >= hi else self._with_clip((hi - self.loc) / self.scale)

    def _with_clip(self, clip):
        return LogisticProposal(self.loc, self.scale, clip)


class FittedProposal(LogisticProposal):
    """(1 - mix) q_logistic + mix q_bins, q_bins flat on bins over `bins_range` (docs/maths.md)."""

    NEWTON_STEPS = 3  # Newton steps within a piece (from_uniform: 3 reach rounding)
    PIECE_WIDTH = 0.25  # at most this many scales per piece where Newton steps solve Q(a) = u
    MIN_SAMPLES = 8  # pilot samples per bin a fit needs

    def __init__(self, loc, scale, clip, weights, mix=0.5, bins_range=None):
        super().__init__(loc, scale, clip)
        weights = [float(v) for v in weights]
        if not (weights and all(math.isfinite(v) and v >= 0 for v in weights) and sum(weights) > 0):
            raise ValueError("bin weights must be finite, non-negative and not all zero, "
                             f"got {weights}")
        if not 0 <= mix < 1:
            raise ValueError(f"mix must be in [0, 1), got {mix}")
        lo, hi = (float(v) for v in (bins_range if bins_range is not None else self.range))
        if not (self.range[0] <= lo < hi <= self.range[1]):
            raise ValueError(f"bins_range {[lo, hi]} must lie within the range {list(self.range)}")
        self.weights, self.mix, self.bins_range = weights, float(mix), (lo, hi)
        self._width = (hi - lo) / len(weights)
        probs = t.tensor(weights, dtype=t.float64)
        probs = probs / probs.sum()
        cum = t.cat([t.zeros(1, dtype=t.float64), probs.cumsum(0)])
        self._tables = {"cpu": (probs, cum)}  # what _pieces needs (through cdf)
        self._tables["cpu"] += self._pieces()

    def __repr__(self):
        return (f"FittedProposal(loc={self.loc:g}, scale={self.scale:g}, clip={self.clip:g}, "
                f"bins={len(self.weights)}, mix={self.mix:g})")

    def state(self):
        """Plain floats and lists (for a checkpoint); FittedProposal.from_state rebuilds it."""
        return {"kind": "fitted", "loc": self.loc, "scale": self.scale, "clip": self.clip,
                "weights": list(self.weights), "mix": self.mix, "bins_range": list(self.bins_range)}

    @classmethod
    def from_state(cls, state):
        return cls(**{k: v for k, v in state.items() if k != "kind"})

    @classmethod
    def from_draws(cls, base, logsnr, terms, mix=0.5, bins=BINS):
        """The mixture with `base` whose bins hold the rms of the pilot terms (n, k) at logsnr
        (n, k) that fall in them; base's logistic for all-zero terms."""
        terms, a = (t.as_tensor(v).to(t.float64) for v in (terms, logsnr))
        if terms.dim() != 2 or terms.shape != a.shape or len(terms) < cls.MIN_SAMPLES:
            raise ValueError(f"fitting a proposal needs pilot terms and log SNRs of the same shape "
                             f"(samples, draws) with at least {cls.MIN_SAMPLES} samples, got "
                             f"{tuple(terms.shape)} and {tuple(a.shape)}")
        if not t.isfinite(terms).all():
            raise ValueError("non-finite pilot terms: the denoiser or reference is not finite "
                             "over the proposal's range")
        lo, hi = base.range
        inside = (a >= lo) & (a <= hi)
        j = ((a[inside] - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
        sums = t.zeros(bins, dtype=t.float64).index_add_(0, j, terms[inside] ** 2)
        mean_square = sums / t.bincount(j, minlength=bins).clamp(min=1)
        if not mean_square.sum() > 0:
            return LogisticProposal(base.loc, base.scale, base.clip)
        return cls(base.loc, base.scale, base.clip, mean_square.sqrt().tolist(), mix)

    def moved(self, points=20000):
        """The mass the bins moved from the logistic: 1/2 Int |q - q_logistic| da (midpoint)."""
        lo, hi = self.range
        a = lo + (hi - lo) * (t.arange(points, dtype=t.float64) + 0.5) / points
        q_l = 1 / LogisticProposal.weight(self, a)
        return 0.5 * float((self.density(a) - q_l).abs().sum()) * (hi - lo) / points

    def _bin(self, a):
        lo, hi = self.bins_range
        k = ((a - lo) / self._width).floor().clamp(0, len(self.weights) - 1).long()
        return k, (a >= lo) & (a <= hi)

    def _on(self, device):
        if str(device) not in self._tables:
            self._tables[str(device)] = tuple(v.to(device) for v in self._tables["cpu"])
        return self._tables[str(device)]

    def density(self, logsnr):
        """q(a) in float64 (0 outside the range)."""
        a = t.as_tensor(logsnr).to(t.float64)
        q_l = 1 / LogisticProposal.weight(self, a)
        k, inside = self._bin(a)
        q_b = t.where(inside, self._on(a.device)[0][k] / self._width, t.zeros_like(a))
        in_range = (a >= self.range[0]) & (a <= self.range[1])
        return t.where(in_range, (1 - self.mix) * q_l + self.mix * q_b, t.zeros_like(a))

    def cdf(self, logsnr):
        """Q(a) = Int_lo^a q, float64, clamped to [0, 1] outside the range."""
        a = t.as_tensor(logsnr).to(t.float64).clamp(*self.range)
        s_c = 1 / (1 + math.exp(self.clip))
        cdf_l = (t.sigmoid((a - self.loc) / self.scale) - s_c) / math.tanh(self.clip / 2)
        lo, hi = self.bins_range
        k, _ = self._bin(a)
        frac = ((a - lo) / self._width - k).clamp(0, 1)
        probs, cum = self._on(a.device)[:2]
        cdf_b = t.where(a > hi, t.ones_like(a), cum[k] + probs[k] * frac)  # below lo: frac = 0
        return ((1 - self.mix) * cdf_l + self.mix * cdf_b).clamp(0, 1)

    def weight(self, logsnr):
        """w(a) = 1 / q(a), in logsnr's dtype (computed in float64)."""
        return (1 / self.density(logsnr)).to(t.as_tensor(logsnr).dtype)

    def _pieces(self):
        # Q at the knots (the range's ends, the bins' edges, PIECE_WIDTH apart within bins) and
        # the pieces' (8, pieces) table: lo, hi, Q(lo), v_lo, s(v_lo), s(v_hi), beta, dv / ds
        probs = self._tables["cpu"][0]
        edges = t.linspace(*self.bins_range, len(self.weights) + 1, dtype=t.float64)
        ends = t.tensor(self.range, dtype=t.float64)
        knots = t.cat([ends[:1], edges, ends[1:]]).unique()
        k, inside = self._bin(0.5 * (knots[:-1] + knots[1:]))
        slope = t.where(inside, self.mix * probs[k] / self._width, t.zeros_like(k, dtype=t.float64))
        cuts, slopes = [knots[:1]], []
        for lo, hi, b in zip(knots[:-1].tolist(), knots[1:].tolist(), slope.tolist()):
            n = max(1, math.ceil((hi - lo) / self.scale / self.PIECE_WIDTH)) if b > 0 else 1
            cuts.append(t.linspace(lo, hi, n + 1, dtype=t.float64)[1:])
            slopes.append(t.full((n,), b, dtype=t.float64))
        knots, slope = t.cat(cuts), t.cat(slopes)
        lo, hi = knots[:-1], knots[1:]
        v_lo, v_hi = (lo - self.loc) / self.scale, (hi - self.loc) / self.scale
        s_lo, s_hi = t.sigmoid(v_lo), t.sigmoid(v_hi)
        beta = slope * self.scale * math.tanh(self.clip / 2) / (1 - self.mix)
        ds = (s_hi - s_lo) + beta * (v_hi - v_lo)  # (Q(hi) - Q(lo)) / A
        start = t.where(ds > 0, (v_hi - v_lo) / ds, t.zeros_like(ds))
        q_knots = self.cdf(knots)
        return q_knots, t.stack([lo, hi, q_knots[:-1], v_lo, s_lo, s_hi, beta, start])

    def from_uniform(self, u, dtype=t.float32):
        """(a = Q^-1(u), w(a)), a rounded into the range in `dtype` (docs/maths.md)."""
        shape, u = u.shape, u.to(t.float64).flatten()
        q_knots, table = self._on(u.device)[2:]
        k = (t.searchsorted(q_knots, u, right=True) - 1).clamp(0, table.shape[1] - 1)
        lo, hi, q_lo, v_lo, s_lo, s_hi, beta, start = table.gather(1, k.expand(len(table), -1))
        rho = (u - q_lo) / ((1 - self.mix) / math.tanh(self.clip / 2))  # (u - Q(lo)) / A
        target = s_lo + rho
        closed = t.logit(target.clamp(s_lo, s_hi))  # beta = 0
        dv = start * rho  # v - v_lo at the secant's root
        for _ in range(self.NEWTON_STEPS):  # f = s(v) - target + beta dv = 0
            s = t.sigmoid(v_lo + dv)
            dv = t.addcdiv(dv, t.addcmul(s - target, beta, dv), t.addcmul(beta, s, 1 - s), value=-1)
        v = t.where(beta > 0, v_lo + dv, closed)
        return self._at((self.loc + self.scale * v).clamp(lo, hi).view(shape), dtype)

    def _with_clip(self, clip):
        return FittedProposal(self.loc, self.scale, clip, self.weights, self.mix, self.bins_range)


# --- The log-SNR range from a covariance spectrum or a measured MSE curve ---
SPECTRUM_VARIANCE = 3 / math.pi  # c of spectrum_logsnr_params (docs/maths.md)


def spectrum_logsnr_params(eigvals, margin=8., min_clip=4.):
    """(logsnr_loc, logsnr_scale, clip) from covariance eigenvalues (docs/maths.md)."""
    lam = t.as_tensor(eigvals, dtype=t.float64).flatten()
    if lam.numel() == 0 or not t.isfinite(lam).all() or not (lam > 0).all():
        raise ValueError("eigenvalues must be finite and > 0")
    log = lam.log()
    var = log.var(unbiased=False).item()
    loc, scale = -log.mean().item(), math.sqrt(1 + SPECTRUM_VARIANCE * var)
    reach = max(-log.min().item() + margin - loc, loc + log.max().item() + margin)
    return loc, scale, max(min_clip, reach / scale)


def mse_quantiles(logsnrs, mse, d, levels=(0.25, 0.5, 0.75)):
    """Log SNRs at which mse(a)/d first reaches each level (interpolated; NaN if never)."""
    a, y = np.asarray(logsnrs, dtype=float), np.asarray(mse, dtype=float) / d

    def first(q):
        i = next(iter(np.flatnonzero(y >= q)), None)  # the first point at or above q
        if not i:  # never reached (None), or from the first point on (0)
            return float("nan") if i is None else float(a[0])
        return float(np.interp(q, [y[i - 1], y[i]], [a[i - 1], a[i]]))
    return [first(q) for q in levels]


def suggest_logsnr_params(logsnrs, mse, d):
    """(logsnr_loc, logsnr_scale) from an MSE curve's median and quartiles (NaN if not reached)."""
    a25, a50, a75 = mse_quantiles(logsnrs, mse, d)
    return a50, (a75 - a25) / (2 * math.log(3))
