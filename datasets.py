"""Datasets.

2-D toy densities (`DATASETS_2D`), 8000 points unless asked for more, standardised to zero mean and unit
variance per coordinate, and reproducible from a seed:

- dino:   a dinosaur outline (a closed polyline drawn for this project) sampled uniformly along its
          length with small Gaussian jitter: a density sharply peaked on a 1-D manifold.
- moons:  scikit-learn's two moons, noise 0.03.
- scg:    a strongly correlated Gaussian, unit variances, correlation rho = -0.495/0.505. Its exact
          density is known (`scg_nll`), so its entropy log(2 pi e) + 1/2 log(1 - rho^2) = 1.2185
          nats, and the exact NLL of any sample, can be shown beside the model's estimate.
- line:   uniform in a rectangle, x ~ U(-1/2, 1/2), y ~ U(-1, 1): flat inside, sharp edges.
- circle: points on the unit circle at a few discrete angles, pushed off it by a radial jitter of
          length U(0, 0.03) in a random direction.

`get_2d_dataset(name)` is the entry point; `split_2d` makes the train/validation split. All five
have exact densities: `exact_nll_2d(name)` gives -log p of the standardised points, `entropy_2d`
the entropy.
"""
import math
import os
import shutil
import urllib.parse

import numpy as np
import pytorch_lightning as pl
import torch as t
from torch.utils.data import DataLoader, TensorDataset

import utils
from cli import DATASETS_2D, IMAGE_DATASETS  # the names the scripts accept

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


def get_2d_dataset(name, n=8000, seed=42):
    """`n` points (float32, shape (n, 2)) of the named 2-D dataset, standardised; the same seed
    gives the same points."""
    x, standardisation = _raw_2d(name, n, seed)
    if standardisation is not None:
        mean, std = standardisation
        x = (x - mean) / std
    return t.as_tensor(x, dtype=t.float32)


def exact_nll_2d(name, n=8000, seed=42):
    """The exact -log p(y) in nats of the standardised dataset `get_2d_dataset(name, n, seed)`, as
    a function of points y (m, 2) -> (m,) float64, vectorised.

    The raw points are regenerated (same generator calls) to recover the sample mean and std the
    standardisation used, y = (x - mean) / std, and the log-Jacobian is included:
    -log p_std(y) = -log p_raw(mean + std * y) - log(std_1 std_2). scg is not standardised: its
    function is `scg_nll` itself. +inf outside the support (line, circle); see the raw functions
    `dino_nll`, `moons_nll`, `line_nll`, `circle_nll`.
    """
    if name == "scg":
        return scg_nll
    _, (mean, std) = _raw_2d(name, n, seed)
    mean, std = t.as_tensor(mean, dtype=t.float64), t.as_tensor(std, dtype=t.float64)
    raw_nll = _raw_nll(name, n)
    log_jacobian = t.log(std).sum()

    def nll(y):
        return raw_nll(mean + std * t.as_tensor(y, dtype=t.float64)) - log_jacobian
    return nll


def scg_nll(x):
    """Exact -log p(x) of the strongly correlated Gaussian N(0, [[1, rho], [rho, 1]]), in nats."""
    x = t.as_tensor(x, dtype=t.float64)
    quad = (x[:, 0] ** 2 - 2 * SCG_RHO * x[:, 0] * x[:, 1] + x[:, 1] ** 2) / (1 - SCG_RHO ** 2)
    return math.log(2 * math.pi) + 0.5 * math.log(1 - SCG_RHO ** 2) + 0.5 * quad


# ---------------------------------------------------------------------------------------------
# Exact densities of the other 2-D datasets, in raw units (before standardisation)
# ---------------------------------------------------------------------------------------------
# Each xxx_nll(x) takes points x (m, 2) (anything torch.as_tensor accepts) and returns -log p(x)
# in nats, float64, shape (m,). exact_nll_2d wraps them for the standardised data.
MOONS_NOISE = 0.03    # std of make_moons' Gaussian noise
MOONS_NODES = 512     # Gauss-Legendre nodes in theta per arc (see moons_nll)
CIRCLE_JITTER = 0.03  # _circle's jitter radius R: points lie within R of their lattice direction
# The nonzero points of the lattice {-2, ..., 2}^2; _circle picks one uniformly, keeps its direction
CIRCLE_LATTICE = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)])
_CHUNK = 2048         # points per chunk: bounds the (points, segments or nodes) temporaries


def _chunked(f, x):
    x = t.as_tensor(x, dtype=t.float64)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"need points of shape (m, 2), got {tuple(x.shape)}")
    return t.cat([f(c) for c in x.split(_CHUNK)]) if len(x) else x.new_zeros(0)


def dino_nll(x):
    """Exact -log p(x) of `_dino` in the outline's units: uniform along the closed polyline
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


def moons_nll(x, n=8000, nodes=MOONS_NODES):
    """-log p(x) of `_moons` (scikit-learn's make_moons(n, noise=0.03)) in its raw units, in the
    continuum limit: the outer arc (cos u, sin u) with weight (n // 2) / n and the inner arc
    (1 - cos u, 1/2 - sin u) with the rest, u uniform on [0, pi], plus N(0, 0.03^2 I) noise:
    p(x) = sum_arcs w_arc (1/pi) int_0^pi N(x; c_arc(u), 0.03^2 I) du, by Gauss-Legendre with
    `nodes` nodes per arc, summed in log space (finite however far x is).

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
    n_out = n // 2
    const = log_w - math.log(2 * math.pi * sigma ** 2)
    log_out, log_in = const + math.log(n_out / n), const + math.log((n - n_out) / n)

    def f(x):
        # |x - c(u)|^2 expanded: outer c = (cos, sin); inner c = (1, 1/2) - (cos, sin)
        z = x - t.tensor([1.0, 0.5], dtype=t.float64)
        d_out = (x ** 2).sum(1, keepdim=True) + 1 - 2 * (x[:, :1] * cos + x[:, 1:] * sin)
        d_in = (z ** 2).sum(1, keepdim=True) + 1 + 2 * (z[:, :1] * cos + z[:, 1:] * sin)
        log_terms = t.cat([log_out - d_out / (2 * sigma ** 2), log_in - d_in / (2 * sigma ** 2)], 1)
        return -t.logsumexp(log_terms, 1)
    return _chunked(f, x)


def line_nll(x):
    """Exact -log p(x) of `_line`, uniform on [-1/2, 1/2] x [-1, 1]: log 2 inside, +inf outside."""
    def f(x):
        inside = (x[:, 0].abs() <= 0.5) & (x[:, 1].abs() <= 1)
        return t.full_like(x[:, 0], math.log(2)).masked_fill(~inside, math.inf)
    return _chunked(f, x)


def _circle_directions():
    """The 16 distinct directions of CIRCLE_LATTICE, as unit-circle centres (16, 2) float64 computed
    as `_circle` computes them, and their probabilities (the count of lattice points on each / 24:
    1/12 for the 4 axes and 4 diagonals, 1/24 for the 8 others)."""
    angle, count = np.unique(np.arctan2(*CIRCLE_LATTICE.T[::-1]), return_counts=True)
    centre = np.stack([np.cos(angle), np.sin(angle)], 1)
    return t.as_tensor(centre), t.as_tensor(count / count.sum())


def circle_nll(x):
    """Exact -log p(x) of `_circle` in its raw units. A point is its direction's centre c_k on the
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


def _raw_nll(name, n=8000):
    """The raw-unit -log p function of a standardised 2-D dataset of n points."""
    if name == "moons":
        return lambda x: moons_nll(x, n=n)
    return {"dino": dino_nll, "line": line_nll, "circle": circle_nll}[name]


def _raw_2d(name, n, seed):
    """The raw points of `get_2d_dataset(name, n, seed)` (float64 numpy, (n, 2)) and the (mean,
    std) that standardise them (numpy sample mean and std, ddof=0), or None for scg."""
    if name not in _MAKERS:
        raise ValueError(f"unknown dataset {name!r}; valid 2-D datasets: {', '.join(DATASETS_2D)}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"need an integer number of points >= 2, got {n!r}")
    x = _MAKERS[name](n, np.random.default_rng(seed))
    if name == "scg":  # scg is standard by construction: keep its exact density exact
        return x, None
    return x, (x.mean(0), x.std(0))


def _grid_entropy(nll, lo, hi, h):
    """-int p log p over the box [lo, hi] (2-D) by the rectangle rule on a grid of spacing h:
    spectrally accurate for densities smooth on the scale h that vanish at the box's edges."""
    grid = [t.arange(a, b + h / 2, h, dtype=t.float64) for a, b in zip(lo, hi)]
    pts = t.stack(t.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 2)
    v = nll(pts)
    return (t.exp(-v) * v).sum().item() * h * h


def entropy_2d(name, n=8000, seed=42):
    """The exact differential entropy, in nats, of `get_2d_dataset(name, n, seed)`'s density
    (standardised units; scg: SCG_ENTROPY). Standardising subtracts log(std_1 std_2) from the raw
    entropy. Raw entropies: line log 2 (area 2); circle in closed form (below); dino and moons by
    the rectangle rule on a grid of spacing sigma / 2 over the support plus 10 sigma, accurate to
    ~1e-9 nats (quadrature error ~exp(-2 pi^2 (sigma / h)^2)); about 1 s each."""
    if name == "scg":
        return SCG_ENTROPY
    _, (_, std) = _raw_2d(name, n, seed)
    if name == "line":
        h_raw = math.log(2)
    elif name == "circle":
        # On disc k, -log p = -log w_k + log(2 pi R) + log r with r ~ U(0, R), and
        # E[log r] = log R - 1: H = H(w) + log(2 pi R^2) - 1.
        _, w = _circle_directions()
        h_raw = -(w * t.log(w)).sum().item() + math.log(2 * math.pi * CIRCLE_JITTER ** 2) - 1
    elif name == "dino":
        pad = 10 * DINO_JITTER
        h_raw = _grid_entropy(dino_nll, DINO_OUTLINE.min(0) - pad, DINO_OUTLINE.max(0) + pad,
                              DINO_JITTER / 2)
    else:  # moons: the arcs span [-1, 2] x [-1/2, 1]
        pad = 10 * MOONS_NOISE
        h_raw = _grid_entropy(_raw_nll("moons", n), (-1 - pad, -0.5 - pad), (2 + pad, 1 + pad),
                              MOONS_NOISE / 2)
    return h_raw - math.log(std[0] * std[1])


def split_2d(x, val_fraction=0.1, seed=0):
    """A seeded random split of x into (train, validation); validation gets round(n * fraction)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(x) * val_fraction))
    perm = t.randperm(len(x), generator=t.Generator().manual_seed(seed))
    return x[perm[n_val:]], x[perm[:n_val]]


def _scg(n, rng):
    cov = np.array([[1.0, SCG_RHO], [SCG_RHO, 1.0]])
    return rng.multivariate_normal(np.zeros(2), cov, size=n)


def _moons(n, rng):
    from sklearn.datasets import make_moons
    return make_moons(n, noise=MOONS_NOISE, random_state=int(rng.integers(2 ** 31)))[0]


def _line(n, rng):
    return np.stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-1, 1, n)], 1)


def _circle(n, rng):
    # Directions of the nonzero points of the lattice {-2, ..., 2}^2: 16 distinct angles, with
    # the diagonals and the axes twice as likely (hit by (1, 1) and (2, 2), (1, 0) and (2, 0)).
    grid = CIRCLE_LATTICE
    angle = np.arctan2(*grid[rng.integers(len(grid), size=n)].T[::-1])
    jitter_angle = rng.uniform(0, 2 * np.pi, n)
    radius = rng.uniform(0, CIRCLE_JITTER, n)
    return np.stack([np.cos(angle) + radius * np.cos(jitter_angle),
                     np.sin(angle) + radius * np.sin(jitter_angle)], 1)


def _dino(n, rng):
    start = DINO_OUTLINE
    end = np.roll(DINO_OUTLINE, -1, axis=0)
    lengths = np.linalg.norm(end - start, axis=1)
    # Uniform along the outline: pick a segment by length, then a point on it.
    seg = rng.choice(len(start), size=n, p=lengths / lengths.sum())
    frac = rng.uniform(0, 1, n)[:, None]
    points = start[seg] + frac * (end[seg] - start[seg])
    return points + DINO_JITTER * rng.standard_normal((n, 2))


_MAKERS = {"dino": _dino, "moons": _moons, "scg": _scg, "line": _line, "circle": _circle}


# ---------------------------------------------------------------------------------------------
# Image datasets (train_cifar10.py): integer pixel levels served as float32 in [-1, 1]
# ---------------------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision extracts into --data_dir


class ImageSet(t.utils.data.Dataset):
    """Images stored as integer levels 0 .. levels-1 in a uint8 tensor (N, C, H, W), served as
    float32 x = 2 k / (levels - 1) - 1 in [-1, 1] (bin width 2 / (levels - 1)).

    dequantize=True adds uniform noise over the bin (utils.dequantize), making the data a genuine
    continuous density: -log P(k) <= -log p(x) - d log(width) in expectation. With a seed the
    noise is fixed per image (validation), otherwise fresh at every access (training).
    """

    def __init__(self, images, levels, dequantize=False, seed=None):
        if images.dtype != t.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if int(images.max()) >= levels:
            raise ValueError(f"pixel level {int(images.max())} out of range for {levels} levels")
        self.images, self.levels, self.dequantize, self.seed = images, int(levels), dequantize, seed
        self.bin_width = 2 / (self.levels - 1)

    def __len__(self):
        return len(self.images)

    @property
    def x_shape(self):
        return tuple(self.images.shape[1:])

    def __getitem__(self, i):
        return self._served(self.images[i:i + 1], i)[0]

    def tensor(self, n=None):
        """The first n images (all by default) as one float tensor, as served."""
        n = min(len(self), n or len(self))
        return self._served(self.images[:n], t.arange(n))

    def _served(self, images, index):
        x = images.float() * self.bin_width - 1
        if not self.dequantize:
            return x
        seed = self.seed if self.seed is not None else int(t.randint(2 ** 62, ()))
        return utils.dequantize(x, self.bin_width, seed, index)


IMAGE_SHAPES = {"cifar10": lambda size: (3, 32, 32), "digits": lambda size: (1, 8, 8),
                "fake": lambda size: (3, size, size)}
IMAGE_LEVELS = {"cifar10": 256, "digits": 17, "fake": 256}


def load_image_dataset(name, data_dir="data", dequantize=False, seed=0, image_size=32,
                       fake_size=512):
    """(train, validation) ImageSets of a named image dataset, from local files (download_cifar10
    fetches CIFAR-10).

    - cifar10: torchvision's CIFAR-10 (50000 training / 10000 test images, 3x32x32, 256 levels)
      from data_dir/cifar-10-batches-py.
    - digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 1x8x8, 17 grey levels
      0..16, so bins are 1/8 wide in [-1, 1]); a seeded 1497/300 split.
    - fake: torchvision's FakeData, random 3 x image_size x image_size 8-bit images, fake_size for
      training and fake_size // 4 for validation. For smoke tests.
    """
    if name == "cifar10":
        train, val = _cifar10(data_dir)
    elif name == "digits":
        from sklearn.datasets import load_digits
        images = t.as_tensor(load_digits().images, dtype=t.uint8).unsqueeze(1)
        perm = t.randperm(len(images), generator=t.Generator().manual_seed(seed))
        train, val = images[perm[300:]], images[perm[:300]]
    elif name == "fake":
        from torchvision.datasets import FakeData
        n_val = max(1, fake_size // 4)
        fake = FakeData(size=fake_size + n_val, image_size=(3, image_size, image_size),
                        random_offset=seed)
        images = t.stack([t.from_numpy(np.array(img)) for img, _ in fake]).permute(0, 3, 1, 2)
        train, val = images[:fake_size], images[fake_size:]
    else:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
    levels = IMAGE_LEVELS[name]
    return (ImageSet(train.contiguous(), levels, dequantize),
            ImageSet(val.contiguous(), levels, dequantize, seed=seed))


def cifar10_missing(data_dir, can_download):
    """None if CIFAR-10 is in data_dir or may be downloaded (can_download() is asked only then),
    else the message saying where it looked and how to provide it."""
    folder = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), CIFAR10_FOLDER)
    if os.path.isdir(folder) or can_download():
        return None
    return (f"CIFAR-10 not found: looked for {folder}, and cannot download it "
            f"({urllib.parse.urlsplit(CIFAR10_URL).hostname} is not reachable, or --offline is "
            f"set). Get {CIFAR10_URL} on a machine with internet, extract it into a folder DIR "
            f"(giving DIR/{CIFAR10_FOLDER}) and pass --data_dir DIR.")


def _cifar10(data_dir):
    from torchvision.datasets import CIFAR10

    root = os.path.abspath(os.path.expanduser(data_dir))
    folder = os.path.join(root, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        raise FileNotFoundError(cifar10_missing(data_dir, lambda: False))
    try:
        parts = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 in {folder} is incomplete or corrupted ({err}); delete "
                                "it and download it again") from None
    return [t.from_numpy(p.data).permute(0, 3, 1, 2) for p in parts]


def download_cifar10(data_dir):
    """torchvision's download into data_dir unless it is there; on failure everything it created
    is removed again."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    root = os.path.abspath(os.path.expanduser(data_dir))
    if os.path.isdir(os.path.join(root, CIFAR10_FOLDER)):
        return
    top = root  # the highest directory that does not exist yet: removed on failure
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    leftovers = [top] if not os.path.exists(root) else [
        p for p in (os.path.join(root, CIFAR10.filename), os.path.join(root, CIFAR10_FOLDER))
        if not os.path.exists(p)]
    try:
        download_and_extract_archive(CIFAR10_URL, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except BaseException as err:
        for path in leftovers:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        if isinstance(err, Exception):
            raise ConnectionError(f"downloading CIFAR-10 from {CIFAR10_URL} failed: {err}") from None
        raise


def reachable(url, timeout=3.0):
    """Whether `url` answers an HTTP HEAD request within `timeout` seconds (any status counts: the
    server answered), through the proxies urllib is configured with. A quick test before a
    download that would otherwise retry for tens of seconds without a network."""
    import threading
    import urllib.error
    import urllib.request

    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)  # bounds slow name lookups too
    thread.start()
    thread.join(timeout)
    return bool(answered)


# ---------------------------------------------------------------------------------------------
# LightningDataModules: downloads in prepare_data (once per node), loading and splits in setup
# ---------------------------------------------------------------------------------------------
class Points2D(pl.LightningDataModule):
    """A 2-D density (get_2d_dataset) with a seeded split holding out `val_fraction`."""

    def __init__(self, name, num_points=8000, seed=0, val_fraction=0.1, batch_size=512,
                 eval_batch_size=1024):
        super().__init__()
        if name not in DATASETS_2D:
            raise ValueError(f"unknown dataset {name!r}; valid 2-D datasets: {', '.join(DATASETS_2D)}")
        self.name, self.num_points, self.seed, self.val_fraction = name, num_points, seed, val_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.x_shape, self.train = (2,), None

    def setup(self, stage=None):
        if self.train is None:
            points = get_2d_dataset(self.name, n=self.num_points)
            self.train, self.val = split_2d(points, self.val_fraction, seed=self.seed)

    def reference_data(self):
        return self.train

    def val_data(self):
        return self.val

    def eval_data(self):
        """What --eval_only scores: the validation points (no grid)."""
        return self.val, None

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train), batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.train) > self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val), batch_size=self.eval_batch_size)


class Images(pl.LightningDataModule):
    """An image dataset (load_image_dataset). CIFAR-10 is downloaded in prepare_data (Lightning
    runs it once per node, for training and evaluation alike) when missing; `missing()` says
    beforehand whether it is there or may be downloaded (download() allows it)."""

    def __init__(self, name, data_dir="data", dequantize=False, seed=0, image_size=32,
                 fake_size=512, batch_size=64, eval_batch_size=100, num_workers=0,
                 reference_size=5000, download=None):
        super().__init__()
        if name not in IMAGE_DATASETS:
            raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
        self.name, self.data_dir, self.dequantize, self.seed = name, data_dir, dequantize, seed
        self.image_size, self.fake_size, self.reference_size = image_size, fake_size, reference_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.download, self.train = download, None
        self.x_shape, self.levels = IMAGE_SHAPES[name](image_size), IMAGE_LEVELS[name]
        self.train_size = {"cifar10": 50000, "digits": 1497, "fake": fake_size}[name]
        self.bin_width = 2 / (self.levels - 1)

    def missing(self):
        """None if the data is here or may be downloaded, else what is missing and how to fix it."""
        if self.name != "cifar10":
            return None
        return cifar10_missing(self.data_dir, lambda: bool(self.download and self.download()))

    def prepare_data(self):
        if self.name == "cifar10":
            download_cifar10(self.data_dir)

    def setup(self, stage=None):
        if self.train is None:
            self.train, self.val = load_image_dataset(self.name, self.data_dir, self.dequantize,
                                                      self.seed, self.image_size, self.fake_size)

    def reference_data(self):
        """The first reference_size training images, dequantised (if so) with seeded noise, so
        that every process fits the same reference."""
        train = ImageSet(self.train.images, self.levels, self.dequantize, seed=self.seed + 1)
        return train.tensor(self.reference_size)

    def val_data(self):
        return self.val.tensor()

    def eval_data(self):
        """What --eval_only scores: the validation images as the grid data they are (never
        dequantised), and the grid (delta, lo, levels)."""
        return ImageSet(self.val.images, self.levels).tensor(), (self.bin_width, -1., self.levels)

    def _loader(self, data, batch_size, shuffle):
        return DataLoader(data, batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=t.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train, self.batch_size, True)

    def val_dataloader(self):
        return self._loader(self.val, self.eval_batch_size, False)
