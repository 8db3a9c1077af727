"""Numerical pieces shared by the model and the scripts.

- Logistic importance sampling over log SNR a (iid, stratified, or midpoint quadrature).
- The closed-form Gaussian reference q = N(mean, U diag(eigvals) U^T): entropy, -log q(x), MMSE
  curve and optimal noise predictor, used as control variate and as the baseline in every figure.
- The log-SNR range read off a measured MSE curve.
- Helpers the two training scripts share (Trainer flags, run directories, clean error exits).

Notation follows itd-math.md: z = sqrt(s(a)) x + sqrt(s(-a)) eps, s = sigmoid.
"""
import argparse
import functools
import math
import os
import sys

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


def shifted_sobol(sets, n, dim, generator=None, device=None):
    """`sets` independent randomisations of one n-point Sobol set in [0, 1)^dim, shape (sets, n, dim).

    Each set XORs the points' 30-bit binary expansions with its own random digits (a random
    digital shift, which keeps the Sobol net structure) and adds uniform noise within the finest
    cell: every point is then exactly uniform, so averages stay unbiased, while each set keeps the
    even spread that makes its average far less noisy than n iid points for smooth integrands.
    Use n a power of two. Dimensions beyond what SobolEngine supports are iid uniforms.
    """
    qdim = min(dim, t.quasirandom.SobolEngine.MAXDIM)
    bits = t.quasirandom.SobolEngine.MAXBIT
    points = t.quasirandom.SobolEngine(qdim).draw(n, dtype=t.float64).to(device)
    digits = t.randint(0, 2 ** bits, (sets, 1, qdim), generator=generator, device=device)
    fine = t.rand(sets, n, qdim, generator=generator, device=device, dtype=t.float64)
    u = (((points * 2 ** bits).long() ^ digits) + fine) / 2 ** bits
    if qdim < dim:
        rest = t.rand(sets, n, dim - qdim, generator=generator, device=device, dtype=t.float64)
        u = t.cat([u, rest], -1)
    return u.clamp(2 ** -53, 1 - 2 ** -53)


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
def _sobol_digits(n, dim):
    """The first n points of the dim-dimensional Sobol sequence as MAXBIT-bit integers, (n, dim)."""
    points = t.quasirandom.SobolEngine(dim).draw(n, dtype=t.float64)
    return (points * 2 ** t.quasirandom.SobolEngine.MAXBIT).long()


def keyed_sobol(seed, set_keys, point, n, dims, device=None):
    """Point `point` of the randomised n-point Sobol set named by `set_keys`, in dimensions `dims`.

    set_keys: tuple of int64 tensors (rows,) naming each row's set (e.g. sample index, replicate);
    point: (rows,) point indices in [0, n); dims: (k,) dimension indices. Returns (rows, k) float64.

    The randomisation is that of shifted_sobol (a random digital shift per set and dimension, plus
    uniform noise within the finest cell, so every point is exactly uniform and each set keeps the
    net structure), but every random digit is counter_hash(seed, *set_keys, dim, ...): a set's
    points are the same whatever other sets are drawn alongside, so estimates built on them do not
    depend on batch or chunk sizes. Dimensions beyond SobolEngine.MAXDIM are iid uniforms.
    """
    bits, maxdim = t.quasirandom.SobolEngine.MAXBIT, t.quasirandom.SobolEngine.MAXDIM
    dims = t.as_tensor(dims, dtype=t.int64, device=device).view(1, -1)
    keys = tuple(t.as_tensor(k, dtype=t.int64, device=device).view(-1, 1) for k in set_keys)
    point = t.as_tensor(point, dtype=t.int64, device=device).view(-1, 1)
    in_sobol = dims < maxdim
    top = int(dims[in_sobol].max()) + 1 if in_sobol.any() else 1
    table = _sobol_digits(n, top).to(device)[point, dims.clamp(max=top - 1)]
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


def make_trainer(args, run_dir, callbacks=(), **kwargs):
    """A Trainer from the shared flags, logging to TensorBoard in run_dir and checkpointing to
    run_dir/checkpoints (the best val_loss and the last epoch)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    checkpoint = ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="val_loss",
                                 filename="best-{epoch}", save_last=True)
    return pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                      num_nodes=args.num_nodes, precision=args.precision,
                      max_epochs=args.num_epochs, logger=TensorBoardLogger(run_dir, name="", version="",
                                               default_hp_metric=False),
                      callbacks=[checkpoint, *callbacks], **kwargs)


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
