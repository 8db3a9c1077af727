"""The 2-D densities that ship with the project: how to draw them and, in closed form, their exact
-log p and entropy in raw units (before the standardisation datasets.py applies). Each
make_xxx(n, rng) draws n raw points (numpy (n, 2)) from a numpy Generator; xxx_nll(x, n) takes
points x (m, 2) (anything torch.as_tensor accepts) and returns -log p(x) in nats, float64, shape
(m,), and xxx_entropy(n) the differential entropy in nats, for a set of n points (only moons
depends on n: its arcs hold n // 2 and n - n // 2 points). datasets.SETS_2D names them.
"""
import math

import numpy as np
import torch as t

import utils

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
DINO_JITTER = 0.04  # std of the jitter, in the outline's units (the body is ~10 units long)


def scg_nll(x, n=None):
    """Exact -log p(x) of the strongly correlated Gaussian N(0, [[1, rho], [rho, 1]]), in nats."""
    x = t.as_tensor(x, dtype=t.float64)
    quad = (x[:, 0] ** 2 - 2 * SCG_RHO * x[:, 0] * x[:, 1] + x[:, 1] ** 2) / (1 - SCG_RHO ** 2)
    return math.log(2 * math.pi) + 0.5 * math.log(1 - SCG_RHO ** 2) + 0.5 * quad


def scg_entropy(n=None):
    return SCG_ENTROPY


# ---------------------------------------------------------------------------------------------
# Exact densities of the other 2-D datasets, in raw units (before standardisation)
# ---------------------------------------------------------------------------------------------
# Each xxx_nll(x) takes points x (m, 2) (anything torch.as_tensor accepts) and returns -log p(x)
# in nats, float64, shape (m,). exact_nll_2d wraps them for the data as served.
MOONS_NOISE = 0.03    # std of make_moons' Gaussian noise
MOONS_NODES = 512     # Gauss-Legendre nodes in theta per arc (see moons_nll)
CIRCLE_JITTER = 0.03  # make_circle's jitter radius R: points lie within R of their lattice direction
# The nonzero points of the lattice {-2, ..., 2}^2; make_circle picks one uniformly, keeps its direction
CIRCLE_LATTICE = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)])
_CHUNK = 2048         # points per chunk: bounds the (points, segments or nodes) temporaries


def _chunked(f, x, *shape):
    """f over chunks of the points x (m, 2), concatenated: (m, *shape)."""
    x = t.as_tensor(x, dtype=t.float64)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"need points of shape (m, 2), got {tuple(x.shape)}")
    return t.cat([f(c) for c in x.split(_CHUNK)]) if len(x) else x.new_zeros((0, *shape))


def dino_nll(x, n=None):
    """Exact -log p(x) of `make_dino` in the outline's units: uniform along the closed polyline
    DINO_OUTLINE (total length L) convolved with N(0, DINO_JITTER^2 I),
    p(x) = (1/L) sum_s (1/sigma) phi(n_s/sigma) [Phi(t_s/sigma) - Phi((t_s - L_s)/sigma)], with
    t_s the coordinate of x along segment s from its start, n_s its distance from the segment's
    line, L_s the segment's length. Summed in log space: finite (~ d^2 / (2 sigma^2) at distance d
    from the outline) however far x is."""
    start = t.as_tensor(DINO_OUTLINE, dtype=t.float64)
    seg = t.roll(start, -1, 0) - start
    length = seg.norm(dim=1)
    along = seg / length[:, None]
    across = t.stack([-along[:, 1], along[:, 0]], 1)
    sigma = DINO_JITTER
    const = -math.log(length.sum().item()) - math.log(sigma) - 0.5 * math.log(2 * math.pi)

    def f(x):
        rel = x[:, None, :] - start[None]                 # (m, segments, 2)
        t_s, n_s = (rel * along).sum(-1) / sigma, (rel * across).sum(-1) / sigma
        log_terms = -0.5 * n_s ** 2 + utils.log_ndtr_diff(t_s - length / sigma, t_s)
        return -(const + t.logsumexp(log_terms, 1))
    return _chunked(f, x)


def _gauss_legendre(nodes, _cache={}):
    if nodes not in _cache:  # numpy's nodes and weights on [-1, 1], computed once per size
        _cache[nodes] = np.polynomial.legendre.leggauss(nodes)
    return _cache[nodes]


def moons_log_given(x, n=8000, nodes=MOONS_NODES):
    """log p(x | arc) of `make_moons` (scikit-learn's make_moons(n, noise=0.03), labelled by its
    arc: 0 outer, 1 inner) in its raw units, (m, 2), in the continuum limit: the outer arc
    (cos u, sin u) or the inner arc (1 - cos u, 1/2 - sin u), u uniform on [0, pi], plus
    N(0, 0.03^2 I) noise: p(x | arc) = (1/pi) int_0^pi N(x; c_arc(u), 0.03^2 I) du, by
    Gauss-Legendre with `nodes` nodes per arc, in log space (finite however far x is). The arcs
    hold n // 2 and n - n // 2 points (moons_log_prior).

    make_moons itself places its points at u evenly spaced over [0, pi], both ends included (for
    n = 8000 the spacing is pi / 3999 = 8e-4 rad, against a noise of 0.03 rad along the arc), so
    its marginal density is the finite mixture of those n Gaussians. That differs from this
    continuum by log(n_arc / (n_arc - 1)) = 2.5e-4 nats in the bulk, and near the four arc ends,
    where an end point carries a full 1 / n_arc instead of half of one, by 0.010 nats at the end
    itself, up to 0.03 nats on data points just beyond it. Averaged over data points the two agree
    to ~1e-4 nats (7e-5 on the default validation split; tests/test_exact2d.py checks these).
    The quadrature (512 nodes) is accurate to < 1e-8 nats within a distance ~10 of the arcs, and
    to a relative 1e-7 beyond.
    """
    sigma = MOONS_NOISE
    u, w = _gauss_legendre(nodes)
    u = t.as_tensor((u + 1) * math.pi / 2, dtype=t.float64)
    log_w = t.log(t.as_tensor(w / 2, dtype=t.float64))  # (pi/2) w / pi: 1/pi-normalised weights
    cos, sin = t.cos(u), t.sin(u)
    const = log_w - math.log(2 * math.pi * sigma ** 2)

    def f(x):
        # |x - c(u)|^2 expanded: outer c = (cos, sin); inner c = (1, 1/2) - (cos, sin)
        z = x - t.tensor([1.0, 0.5], dtype=t.float64)
        d_out = (x ** 2).sum(1, keepdim=True) + 1 - 2 * (x[:, :1] * cos + x[:, 1:] * sin)
        d_in = (z ** 2).sum(1, keepdim=True) + 1 + 2 * (z[:, :1] * cos + z[:, 1:] * sin)
        return t.stack([t.logsumexp(const - d / (2 * sigma ** 2), 1) for d in (d_out, d_in)], 1)
    return _chunked(f, x, 2)


def moons_log_prior(n=8000):
    """log p(arc): make_moons puts n // 2 points on the outer arc, the rest on the inner."""
    return t.tensor([math.log((n // 2) / n), math.log((n - n // 2) / n)], dtype=t.float64)


def moons_nll(x, n=8000, nodes=MOONS_NODES):
    """-log p(x) of `make_moons` in its raw units: -log sum_arcs p(arc) p(x | arc)."""
    return -(moons_log_given(x, n, nodes) + moons_log_prior(n)).logsumexp(1)


def line_nll(x, n=None):
    """Exact -log p(x) of `make_line`, uniform on [-1/2, 1/2] x [-1, 1]: log 2 inside, +inf outside."""
    def f(x):
        inside = (x[:, 0].abs() <= 0.5) & (x[:, 1].abs() <= 1)
        return t.full_like(x[:, 0], math.log(2)).masked_fill(~inside, math.inf)
    return _chunked(f, x)


def line_entropy(n=None):
    """Uniform on an area of 2."""
    return math.log(2)


def _circle_directions():
    """The 16 distinct directions of CIRCLE_LATTICE, as unit-circle centres (16, 2) float64 computed
    as `make_circle` computes them, and their probabilities (the count of lattice points on each / 24:
    1/12 for the 4 axes and 4 diagonals, 1/24 for the 8 others)."""
    angle, count = np.unique(np.arctan2(*CIRCLE_LATTICE.T[::-1]), return_counts=True)
    centre = np.stack([np.cos(angle), np.sin(angle)], 1)
    return t.as_tensor(centre), t.as_tensor(count / count.sum())


def circle_nll(x, n=None):
    """Exact -log p(x) of `make_circle` in its raw units. A point is its direction's centre c_k on the
    unit circle (probability w_k) plus a displacement of length U(0, R) (R = CIRCLE_JITTER) in a
    uniform direction, whose density is 1 / (2 pi R |d|) for |d| < R. The discs do not overlap
    (nearest centres 0.32 apart), so p(x) = w_k / (2 pi R |x - c_k|) within R of c_k and 0 beyond:
    -log p is +inf outside the 16 discs (and -inf at a centre itself)."""
    centre, weight = _circle_directions()
    R = CIRCLE_JITTER

    def f(x):
        r = (x[:, None, :] - centre).norm(dim=-1)  # (m, 16); not cdist, whose matmul form
        # loses the relative precision of small distances
        p = t.where(r < R, weight / (2 * math.pi * R * r), 0).sum(1)
        return -t.log(p)
    return _chunked(f, x)


def _grid_entropy(nll, lo, hi, h):
    """-int p log p over the box [lo, hi] (2-D) by the rectangle rule on a grid of spacing h:
    spectrally accurate for densities smooth on the scale h that vanish at the box's edges."""
    grid = [t.arange(a, b + h / 2, h, dtype=t.float64) for a, b in zip(lo, hi)]
    pts = t.stack(t.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2)
    v = nll(pts)
    return (t.exp(-v) * v).sum().item() * h * h


def make_scg(n, rng):
    cov = np.array([[1.0, SCG_RHO], [SCG_RHO, 1.0]])
    return rng.multivariate_normal(np.zeros(2), cov, size=n)


def make_moons(n, rng):
    """n points and their arc (0 outer, 1 inner)."""
    from sklearn.datasets import make_moons
    return make_moons(n, noise=MOONS_NOISE, random_state=int(rng.integers(2 ** 31)))


# blobs: three overlapping isotropic Gaussians labelled by component (a Bayes classifier errs on
# about a sixth of them)
BLOBS_WEIGHTS = (0.5, 0.3, 0.2)
BLOBS_MEANS = ((-1.0, 0.0), (1.0, 0.0), (0.0, 1.2))
BLOBS_STDS = (0.6, 0.5, 0.4)


def make_blobs(n, rng):
    """n points and their component."""
    y = rng.choice(len(BLOBS_WEIGHTS), size=n, p=BLOBS_WEIGHTS)
    x = np.asarray(BLOBS_MEANS)[y] + np.asarray(BLOBS_STDS)[y, None] * rng.standard_normal((n, 2))
    return x, y


def blobs_log_given(x, n=None):
    """log p(x | component) of `make_blobs`, (m, 3): isotropic Gaussians in closed form."""
    means, stds = t.tensor(BLOBS_MEANS, dtype=t.float64), t.tensor(BLOBS_STDS, dtype=t.float64)

    def f(x):
        d2 = ((x[:, None, :] - means) ** 2).sum(-1)
        return -d2 / (2 * stds ** 2) - t.log(2 * math.pi * stds ** 2)
    return _chunked(f, x, 3)


def blobs_log_prior(n=None):
    return t.tensor(BLOBS_WEIGHTS, dtype=t.float64).log()


def blobs_entropy(n=None):
    """The raw entropy of `make_blobs` by the rectangle rule (as dino_entropy)."""
    def nll(x):
        return -(blobs_log_given(x) + blobs_log_prior()).logsumexp(1)
    lo, hi = np.min(BLOBS_MEANS, 0) - 10 * max(BLOBS_STDS), np.max(BLOBS_MEANS, 0) + 10 * max(BLOBS_STDS)
    return _grid_entropy(nll, lo, hi, min(BLOBS_STDS) / 2)


def make_line(n, rng):
    return np.stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-1, 1, n)], 1)


def make_circle(n, rng):
    # Directions of the nonzero points of the lattice {-2, ..., 2}^2: 16 distinct angles, with
    # the diagonals and the axes twice as likely (hit by (1, 1) and (2, 2), (1, 0) and (2, 0)).
    grid = CIRCLE_LATTICE
    angle = np.arctan2(*grid[rng.integers(len(grid), size=n)].T[::-1])
    jitter_angle = rng.uniform(0, 2 * np.pi, n)
    radius = rng.uniform(0, CIRCLE_JITTER, n)
    return np.stack([np.cos(angle) + radius * np.cos(jitter_angle),
                     np.sin(angle) + radius * np.sin(jitter_angle)], 1)


def make_dino(n, rng):
    start = DINO_OUTLINE
    end = np.roll(DINO_OUTLINE, -1, axis=0)
    lengths = np.linalg.norm(end - start, axis=1)
    # Uniform along the outline: pick a segment by length, then a point on it.
    seg = rng.choice(len(start), size=n, p=lengths / lengths.sum())
    frac = rng.uniform(0, 1, n)[:, None]
    points = start[seg] + frac * (end[seg] - start[seg])
    return points + DINO_JITTER * rng.standard_normal((n, 2))


def dino_entropy(n=None):
    """The raw entropy of `make_dino` by the rectangle rule on a grid of spacing sigma over the
    outline plus 10 sigma: accurate to ~1e-8 nats (quadrature error ~exp(-2 pi^2 (sigma / h)^2);
    tests/test_exact2d.py checks it against a finer grid)."""
    pad = 10 * DINO_JITTER
    return _grid_entropy(dino_nll, DINO_OUTLINE.min(0) - pad, DINO_OUTLINE.max(0) + pad,
                         DINO_JITTER)


def moons_entropy(n=8000):
    """The raw entropy of `make_moons` by the rectangle rule (as dino_entropy); the arcs span
    [-1, 2] x [-1/2, 1]."""
    pad = 10 * MOONS_NOISE
    return _grid_entropy(lambda x: moons_nll(x, n), (-1 - pad, -0.5 - pad), (2 + pad, 1 + pad),
                         MOONS_NOISE)


def circle_entropy(n=None):
    """On disc k, -log p = -log w_k + log(2 pi R) + log r with r ~ U(0, R), and E[log r] = log R - 1:
    H = H(w) + log(2 pi R^2) - 1."""
    _, w = _circle_directions()
    return -(w * t.log(w)).sum().item() + math.log(2 * math.pi * CIRCLE_JITTER ** 2) - 1
