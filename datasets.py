"""Datasets.

2-D toy densities (`DATASETS_2D`), each 8000 points by default, standardised to zero mean and unit
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

`get_2d_dataset(name)` is the entry point; `split_2d` makes the train/validation split.
"""
import math

import numpy as np
import torch as t

DATASETS_2D = ("dino", "moons", "scg", "line", "circle")

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
    if name not in _MAKERS:
        raise ValueError(f"unknown dataset {name!r}; valid 2-D datasets: {', '.join(DATASETS_2D)}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"need an integer number of points >= 2, got {n!r}")
    x = _MAKERS[name](n, np.random.default_rng(seed))
    if name != "scg":  # scg is standard by construction: keep its exact density exact
        x = (x - x.mean(0)) / x.std(0)
    return t.as_tensor(x, dtype=t.float32)


def exact_nll_2d(name):
    """The exact -log p(x) of a dataset as a function of x (n, 2) -> (n,), or None if unknown."""
    return scg_nll if name == "scg" else None


def scg_nll(x):
    """Exact -log p(x) of the strongly correlated Gaussian N(0, [[1, rho], [rho, 1]]), in nats."""
    x = t.as_tensor(x, dtype=t.float64)
    quad = (x[:, 0] ** 2 - 2 * SCG_RHO * x[:, 0] * x[:, 1] + x[:, 1] ** 2) / (1 - SCG_RHO ** 2)
    return math.log(2 * math.pi) + 0.5 * math.log(1 - SCG_RHO ** 2) + 0.5 * quad


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
    return make_moons(n, noise=0.03, random_state=int(rng.integers(2 ** 31)))[0]


def _line(n, rng):
    return np.stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-1, 1, n)], 1)


def _circle(n, rng):
    # Directions of the nonzero points of the lattice {-2, ..., 2}^2: 16 distinct angles, with
    # the diagonals twice as likely (they are hit by (1, 1) and (2, 2)).
    grid = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) != (0, 0)])
    angle = np.arctan2(*grid[rng.integers(len(grid), size=n)].T[::-1])
    jitter_angle = rng.uniform(0, 2 * np.pi, n)
    radius = rng.uniform(0, 0.03, n)
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
IMAGE_DATASETS = ("cifar10", "digits", "fake")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision extracts into --data_dir


class ImageSet(t.utils.data.Dataset):
    """Images stored as integer levels 0 .. levels-1 in a uint8 tensor (N, C, H, W), served as
    float32 x = 2 k / (levels - 1) - 1 in [-1, 1] (bin width 2 / (levels - 1)).

    dequantize=True adds uniform noise over the bin, x + width * (U - 1/2), which makes the data a
    genuine continuous density: -log P(k) ~= -log p(x) - d log(width). With a seed the noise is
    fixed per image (validation), otherwise it is fresh at every access (training).
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
        x = self.images[i].float() * self.bin_width - 1
        if self.dequantize:
            g = None if self.seed is None else t.Generator().manual_seed(self.seed * 2 ** 32 + int(i))
            x = x + self.bin_width * (t.rand(x.shape, generator=g) - 0.5)
        return x

    def tensor(self, n=None):
        """The first n images (all by default) as one float tensor, as served."""
        n = min(len(self), n or len(self))
        if self.dequantize:  # per-image noise, as __getitem__ draws it
            return t.stack([self[i] for i in range(n)])
        return self.images[:n].float() * self.bin_width - 1


def load_image_dataset(name, data_dir="data", dequantize=False, seed=0, image_size=32,
                       fake_size=512, download=None):
    """(train, validation) ImageSets of a named image dataset; nothing is downloaded unless needed
    and allowed.

    - cifar10: torchvision's CIFAR-10 (50000 training / 10000 test images, 3x32x32, 256 levels)
      from data_dir/cifar-10-batches-py. If that folder is missing it is downloaded only when
      download() returns True (it is called only then); otherwise utils.UserError says where it
      looked and how to provide it, and no directory is created.
    - digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 1x8x8, 17 grey levels
      0..16, so bins are 1/8 wide in [-1, 1]); a seeded 1497/300 split. No download.
    - fake: torchvision's FakeData, random 3 x image_size x image_size 8-bit images, fake_size for
      training and fake_size // 4 for validation. For smoke tests.
    """
    if name == "cifar10":
        (train, val), levels = _cifar10(data_dir, download), 256
    elif name == "digits":
        from sklearn.datasets import load_digits
        images = t.as_tensor(load_digits().images, dtype=t.uint8).unsqueeze(1)
        perm = t.randperm(len(images), generator=t.Generator().manual_seed(seed))
        train, val, levels = images[perm[300:]], images[perm[:300]], 17
    elif name == "fake":
        from torchvision.datasets import FakeData
        n_val = max(1, fake_size // 4)
        fake = FakeData(size=fake_size + n_val, image_size=(3, image_size, image_size),
                        random_offset=seed)
        images = t.stack([t.from_numpy(np.array(img)) for img, _ in fake]).permute(0, 3, 1, 2)
        train, val, levels = images[:fake_size], images[fake_size:], 256
    else:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
    return (ImageSet(train.contiguous(), levels, dequantize),
            ImageSet(val.contiguous(), levels, dequantize, seed=seed))


def _cifar10(data_dir, download):
    import os
    import urllib.parse

    import utils

    root = os.path.abspath(os.path.expanduser(data_dir))
    folder = os.path.join(root, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        if download is None or not download():
            raise utils.UserError(
                f"CIFAR-10 not found: looked for {folder}, and cannot download it "
                f"({urllib.parse.urlsplit(CIFAR10_URL).hostname} is not reachable, or --offline is "
                f"set). Get {CIFAR10_URL} on a machine with internet, extract it into a folder DIR "
                f"(giving DIR/{CIFAR10_FOLDER}) and pass --data_dir DIR.")
        _download_cifar10(root)
    from torchvision.datasets import CIFAR10
    try:
        parts = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise utils.UserError(f"CIFAR-10 in {folder} is incomplete or corrupted ({err}); delete "
                              "it and download it again") from None
    return [t.from_numpy(p.data).permute(0, 3, 1, 2) for p in parts]


def _download_cifar10(root):
    """torchvision's download into root; on failure everything it created is removed again."""
    import os
    import shutil

    import utils
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

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
            raise utils.UserError(f"downloading CIFAR-10 from {CIFAR10_URL} failed: {err}") from None
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
