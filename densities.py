"""The shipped 2-D densities, in numpy (docs/extending.md): make_xxx(n, rng) draws raw points (and
labels); xxx_nll(x, n) is -log p(x) (m,) of raw points x (m, 2), xxx_entropy(n) the entropy."""
import functools
import math

import numpy as np
from scipy.special import logsumexp

SCG_RHO = -0.495 / 0.505
SCG_ENTROPY = math.log(2 * math.pi * math.e) + 0.5 * math.log(1 - SCG_RHO ** 2)  # 1.2185 nats

# The dinosaur: a sauropod facing right, as a closed polygon (x, y) in arbitrary units.
DINO_OUTLINE = np.array([
    (0.0, 2.3), (1.0, 2.9), (2.0, 3.5), (3.0, 4.0), (4.0, 4.3), (5.0, 4.3),    # tail tip, back
    (6.0, 4.0), (6.7, 4.4), (7.2, 5.2), (7.6, 6.1), (7.9, 6.7),                # withers, neck
    (8.3, 7.0), (8.8, 7.0), (9.3, 6.8), (9.5, 6.5), (9.1, 6.3), (8.5, 6.3),    # head and snout
    (8.2, 5.8), (7.9, 4.9), (7.6, 3.8), (7.5, 2.9),                            # throat, chest
    (7.6, 0.0), (6.8, 0.0), (6.7, 2.1),                                        # front leg
    (5.9, 2.1), (5.8, 0.0), (5.0, 0.0), (4.9, 2.2),                            # second front leg
    (4.2, 2.2), (4.1, 0.0), (3.3, 0.0), (3.2, 2.4),                            # hind leg
    (2.0, 2.2), (1.0, 2.0),                                                    # tail underside
])
DINO_SEGMENTS = np.roll(DINO_OUTLINE, -1, 0) - DINO_OUTLINE  # each vertex to the next
DINO_LENGTHS = np.linalg.norm(DINO_SEGMENTS, axis=1)
DINO_JITTER = 0.04  # std of the jitter, in the outline's units (the body is ~10 units long)
MOONS_NOISE = 0.03    # std of make_moons' Gaussian noise
MOONS_NODES = 512     # Gauss-Legendre nodes per arc (moons_log_given)
_gauss_legendre = functools.lru_cache(maxsize=4)(np.polynomial.legendre.leggauss)  # 20 ms a size
CIRCLE_JITTER = 0.03  # make_circle's jitter radius R
# The nonzero points of the lattice {-2, ..., 2}^2; make_circle keeps the direction of one
CIRCLE_LATTICE = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)])
# blobs: three overlapping isotropic Gaussians labelled by component
BLOBS_WEIGHTS = (0.5, 0.3, 0.2)
BLOBS_MEANS = ((-1.0, 0.0), (1.0, 0.0), (0.0, 1.2))
BLOBS_STDS = (0.6, 0.5, 0.4)
_CHUNK = 2048  # points per chunk: bounds the (points, segments or nodes) temporaries


def _chunked(f, x):  # f over chunks of the points x (m, 2), concatenated (m = 0: one empty call)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"need points of shape (m, 2), got {tuple(x.shape)}")
    return np.concatenate([f(x[i:i + _CHUNK]) for i in range(0, max(len(x), 1), _CHUNK)])


def make_scg(n, rng):
    return rng.multivariate_normal(np.zeros(2), [[1.0, SCG_RHO], [SCG_RHO, 1.0]], size=n)


def make_moons(n, rng):
    """n points and their arc (0 outer, 1 inner)."""
    from sklearn.datasets import make_moons
    return make_moons(n, noise=MOONS_NOISE, random_state=int(rng.integers(2 ** 31)))


def make_blobs(n, rng):
    """n points and their component."""
    y = rng.choice(len(BLOBS_WEIGHTS), size=n, p=BLOBS_WEIGHTS)
    x = np.asarray(BLOBS_MEANS)[y] + np.asarray(BLOBS_STDS)[y, None] * rng.standard_normal((n, 2))
    return x, y


def make_line(n, rng):
    return np.stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-1, 1, n)], 1)


def make_circle(n, rng):
    """A CIRCLE_LATTICE point's direction on the unit circle, moved by U(0, R) in any direction."""
    angle = np.arctan2(*CIRCLE_LATTICE[rng.integers(len(CIRCLE_LATTICE), size=n)].T[::-1])
    jitter_angle, radius = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, CIRCLE_JITTER, n)
    return np.stack([np.cos(angle) + radius * np.cos(jitter_angle),
                     np.sin(angle) + radius * np.sin(jitter_angle)], 1)


def make_dino(n, rng):
    """Uniform along the outline (a segment by length, then a point on it), plus jitter."""
    seg = rng.choice(len(DINO_OUTLINE), size=n, p=DINO_LENGTHS / DINO_LENGTHS.sum())
    points = DINO_OUTLINE[seg] + rng.uniform(0, 1, n)[:, None] * DINO_SEGMENTS[seg]
    return points + DINO_JITTER * rng.standard_normal((n, 2))


# --- Exact densities and entropies, in raw units ---
def scg_nll(x, n=None):
    """The correlated Gaussian N(0, [[1, rho], [rho, 1]])."""
    x = np.asarray(x, dtype=np.float64)
    quad = (x[:, 0] ** 2 - 2 * SCG_RHO * x[:, 0] * x[:, 1] + x[:, 1] ** 2) / (1 - SCG_RHO ** 2)
    return math.log(2 * math.pi) + 0.5 * math.log(1 - SCG_RHO ** 2) + 0.5 * quad


def scg_entropy(n=None):
    return SCG_ENTROPY


def dino_nll(x, n=None):
    """Uniform along the closed polyline (length L) convolved with N(0, sigma^2 I), in log space:
    p(x) = (1/L) sum_s (1/sigma) phi(n_s/sigma) [Phi(t_s/sigma) - Phi((t_s - L_s)/sigma)]."""
    length, sigma = DINO_LENGTHS, DINO_JITTER
    along = DINO_SEGMENTS / length[:, None]
    across = np.stack([-along[:, 1], along[:, 0]], 1)
    const = -math.log(length.sum()) - math.log(sigma) - 0.5 * math.log(2 * math.pi)

    def f(x):  # torch loads when a density is asked for, not on import (datasets, --help)
        import torch
        import utils
        rel = x[:, None, :] - DINO_OUTLINE[None]
        t_s, n_s = (rel * along).sum(-1) / sigma, (rel * across).sum(-1) / sigma
        mass = utils.log_ndtr_diff(torch.from_numpy(t_s - length / sigma), torch.from_numpy(t_s))
        return -(const + logsumexp(-0.5 * n_s ** 2 + mass.numpy(), 1))
    return _chunked(f, x)


def dino_entropy(n=None):
    return _grid_entropy(dino_nll, DINO_OUTLINE, DINO_JITTER)


def moons_log_given(x, n=8000):
    """log p(x | arc) (m, 2) of make_moons' n -> inf limit (docs/extending.md)."""
    sigma = MOONS_NOISE
    u, w = _gauss_legendre(MOONS_NODES)
    u = (u + 1) * math.pi / 2
    const = np.log(w / 2) - math.log(2 * math.pi * sigma ** 2)  # 1/pi-normalised weights
    cos, sin = np.cos(u), np.sin(u)

    def f(x):  # |x - c(u)|^2 expanded: outer c = (cos, sin); inner c = (1, 1/2) - (cos, sin)
        z = x - np.array([1.0, 0.5])
        d_out = (x ** 2).sum(1, keepdims=True) + 1 - 2 * (x[:, :1] * cos + x[:, 1:] * sin)
        d_in = (z ** 2).sum(1, keepdims=True) + 1 + 2 * (z[:, :1] * cos + z[:, 1:] * sin)
        return np.stack([logsumexp(const - d / (2 * sigma ** 2), 1) for d in (d_out, d_in)], 1)
    return _chunked(f, x)


def moons_log_prior(n=8000):
    """make_moons puts n // 2 points on the outer arc, the rest on the inner."""
    return np.log([(n // 2) / n, (n - n // 2) / n])


def moons_nll(x, n=8000):
    return -logsumexp(moons_log_given(x, n) + moons_log_prior(n), 1)


def moons_entropy(n=8000):
    return _grid_entropy(lambda x: moons_nll(x, n), [(-1, -0.5), (2, 1)], MOONS_NOISE)


def blobs_log_given(x, n=None):
    """log p(x | component), (m, 3): isotropic Gaussians."""
    means, stds = np.asarray(BLOBS_MEANS), np.asarray(BLOBS_STDS)

    def f(x):
        d2 = ((x[:, None, :] - means) ** 2).sum(-1)
        return -d2 / (2 * stds ** 2) - np.log(2 * math.pi * stds ** 2)
    return _chunked(f, x)


def blobs_log_prior(n=None):
    return np.log(BLOBS_WEIGHTS)


def blobs_entropy(n=None):
    return _grid_entropy(lambda x: -logsumexp(blobs_log_given(x) + blobs_log_prior(), 1),
                         BLOBS_MEANS, min(BLOBS_STDS) / 2, pad=10 * max(BLOBS_STDS))


def line_nll(x, n=None):
    """Uniform on [-1/2, 1/2] x [-1, 1]: log 2 inside, +inf outside."""
    x = np.asarray(x, dtype=np.float64)
    inside = (np.abs(x[:, 0]) <= 0.5) & (np.abs(x[:, 1]) <= 1)
    return np.where(inside, math.log(2), math.inf)


def line_entropy(n=None):
    return math.log(2)


def _circle_directions():  # make_circle's 16 directions (16, 2) and their probabilities
    angle, count = np.unique(np.arctan2(*CIRCLE_LATTICE.T[::-1]), return_counts=True)
    return np.stack([np.cos(angle), np.sin(angle)], 1), count / count.sum()


def circle_nll(x, n=None):
    """p(x) = w_k / (2 pi R |x - c_k|) within R of the centre c_k (discs apart), 0 beyond."""
    centre, weight = _circle_directions()
    R = CIRCLE_JITTER

    def f(x):
        r = np.linalg.norm(x[:, None, :] - centre, axis=-1)
        with np.errstate(divide="ignore"):  # -inf at a centre, +inf outside the discs
            return -np.log(np.where(r < R, weight / (2 * math.pi * R * r), 0).sum(1))
    return _chunked(f, x)


def circle_entropy(n=None):
    """-log p = -log w_k + log(2 pi R) + log r with r ~ U(0, R), E log r = log R - 1."""
    _, w = _circle_directions()
    return -(w * np.log(w)).sum() + math.log(2 * math.pi * CIRCLE_JITTER ** 2) - 1


def _grid_entropy(nll, support, h, pad=None):  # the rectangle rule: docs/extending.md
    pad = 10 * h if pad is None else pad
    lo, hi = np.min(support, 0) - pad, np.max(support, 0) + pad
    grid = [np.arange(a, b + h / 2, h) for a, b in zip(lo, hi)]
    pts = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2)
    v = nll(pts)
    return float((np.exp(-v) * v).sum() * h * h)
