"""Datasets: each one entry of a table, served by LightningDataModules.

- 2-D densities (`SETS_2D`): a generator of raw points and, where known, the exact density
  (`exact_nll_2d`, `entropy_2d` in the standardised units the model sees). A set without an exact
  density works too: the runs then show no exact value. Six ship with the project:
  - dino:   a dinosaur outline (a closed polyline drawn for this project) sampled uniformly along
            its length with small Gaussian jitter: a density sharply peaked on a 1-D manifold;
  - moons:  scikit-learn's two moons, noise 0.03;
  - scg:    a strongly correlated Gaussian, unit variances, correlation rho = -0.495/0.505
            (entropy log(2 pi e) + 1/2 log(1 - rho^2) = 1.2185 nats; not standardised);
  - line:   uniform in a rectangle, x ~ U(-1/2, 1/2), y ~ U(-1, 1): flat inside, sharp edges;
  - circle: points on the unit circle at a few discrete angles, pushed off it by a radial jitter
            of length U(0, 0.03) in a random direction;
  - blobs:  three overlapping isotropic Gaussians, labelled by component (moons is labelled by
            half circle).
- Image sets (`IMAGE_SETS`): integer pixel levels served as float32 in [-1, 1] (`ImageSet`).

`DataSource` writes down what the runs and the evaluation expect of a data module.
"""
import dataclasses
import math
import os
import shutil
import urllib.parse
from typing import Callable, Optional, Protocol

import numpy as np
import pytorch_lightning as pl
import torch as t
from torch.utils.data import DataLoader

import densities
import utils


class DataSource(Protocol):
    """What training (experiment.py) and evaluation (evaluation.py) need of a LightningDataModule,
    besides Lightning's own hooks (prepare_data, setup, train_dataloader, val_dataloader)."""

    x_shape: tuple  # the shape of one sample

    def reference_data(self) -> t.Tensor:
        """Training samples the data-matched Gaussian is fitted on, the same in every process."""

    def val_data(self) -> t.Tensor:
        """The validation samples as one tensor, as validation scores them."""

    def eval_data(self) -> tuple:
        """(x, grid): what --eval_only scores, and its utils.Grid (None for continuous data)."""

    def exact_nll(self, x: t.Tensor) -> Optional[t.Tensor]:
        """The exact -log p(x) in nats of points x, or None where the density is not known."""

    # labelled data (conditional models): num_classes is None for unlabelled data
    num_classes: Optional[int]
    train_labels: Optional[t.Tensor]  # int64 (N,), after setup

    def eval_labels(self) -> Optional[t.Tensor]:
        """The labels of eval_data()'s samples, or None."""

    def exact_log_given(self, x: t.Tensor) -> Optional[t.Tensor]:
        """log p(x | y) for every label, (m, num_classes), or None where not known."""

    def exact_log_prior(self) -> t.Tensor:
        """log p(y), (num_classes,), where exact_log_given is known."""


def exact_labels(source, x, y=None):
    """From a DataSource's exact densities, for points x and their labels y (every label where
    y is None: (m, K) each): -log p(x | y), the pointwise mutual information i(x; y) =
    log p(y | x) - log p(y), and 1 where Bayes' classifier argmax_k p(k | x) says y, else 0.
    None where the densities are not known."""
    log_given = source.exact_log_given(x)
    if log_given is None:
        return None
    prior = source.exact_log_prior().to(log_given)
    posterior = (log_given + prior).log_softmax(1)
    right = posterior.argmax(1, keepdim=True) == t.arange(len(prior))
    values = (-log_given, posterior - prior, right.double())
    return values if y is None else tuple(v.gather(1, y.view(-1, 1))[:, 0] for v in values)


def split_2d(x, val_fraction=0.1, seed=0):
    """A seeded random split of x into (train, validation); validation gets round(n * fraction).
    x may be a tuple of tensors (points and labels), split alike into two tuples."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    parts = x if isinstance(x, tuple) else (x,)
    n_val = max(1, round(len(parts[0]) * val_fraction))
    perm = t.randperm(len(parts[0]), generator=t.Generator().manual_seed(seed))
    train, val = tuple(v[perm[n_val:]] for v in parts), tuple(v[perm[:n_val]] for v in parts)
    return (train, val) if isinstance(x, tuple) else (train[0], val[0])


@dataclasses.dataclass(frozen=True)
class Set2D:
    """A 2-D dataset. make(n, rng) draws n raw points (numpy (n, 2)) from a numpy Generator, or
    (points, labels) for a labelled set. Where the density is known, nll(x, n) is its exact -log p
    in nats of raw points x (m, 2) -> (m,) float64 (+inf outside the support) and entropy(n) its
    differential entropy, both for a set of n points (moons' arcs hold n // 2 and n - n // 2).
    A labelled set with known conditional densities gives log_given(x, n) -> (m, classes)
    log p(x | y) and log_prior(n) -> (classes,) log p(y) instead of nll (the marginal follows).
    standardise: served with zero mean and unit variance per coordinate (the exact functions
    follow)."""
    make: Callable
    nll: Optional[Callable] = None
    entropy: Optional[Callable] = None
    standardise: bool = True
    classes: Optional[int] = None
    log_given: Optional[Callable] = None
    log_prior: Optional[Callable] = None


SETS_2D = {
    "dino": Set2D(densities.make_dino, densities.dino_nll, densities.dino_entropy),
    "moons": Set2D(densities.make_moons, None, densities.moons_entropy, classes=2,
                   log_given=densities.moons_log_given, log_prior=densities.moons_log_prior),
    "scg": Set2D(densities.make_scg, densities.scg_nll, densities.scg_entropy, standardise=False),
    "line": Set2D(densities.make_line, densities.line_nll, densities.line_entropy),
    "circle": Set2D(densities.make_circle, densities.circle_nll, densities.circle_entropy),
    "blobs": Set2D(densities.make_blobs, None, densities.blobs_entropy, classes=3,
                   log_given=densities.blobs_log_given, log_prior=densities.blobs_log_prior),
}


def _set_2d(name):
    if name not in SETS_2D:
        raise ValueError(f"unknown dataset {name!r}; valid 2-D datasets: {', '.join(SETS_2D)}")
    return SETS_2D[name]


def _raw_2d(name, n, seed):
    """The raw points of `get_2d_dataset(name, n, seed)` (float64 numpy, (n, 2)), their labels (or
    None), and the (mean, std) that standardise them (numpy sample mean and std, ddof=0), or
    None."""
    spec = _set_2d(name)
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"need an integer number of points >= 2, got {n!r}")
    made = spec.make(n, np.random.default_rng(seed))
    x, y = made if spec.classes else (made, None)
    return x, y, ((x.mean(0), x.std(0)) if spec.standardise else None)


def get_2d_dataset(name, n=8000, seed=42, labels=False):
    """`n` points (float32, shape (n, 2)) of the named 2-D dataset, standardised where its entry
    says so, and with labels=True their labels (int64); the same seed gives the same points."""
    x, y, standardisation = _raw_2d(name, n, seed)
    if standardisation is not None:
        mean, std = standardisation
        x = (x - mean) / std
    x = t.as_tensor(x, dtype=t.float32)
    if not labels:
        return x
    if y is None:
        raise ValueError(f"the 2-D dataset {name!r} has no labels; labelled ones: "
                         f"{', '.join(k for k, v in SETS_2D.items() if v.classes)}")
    return x, t.as_tensor(y, dtype=t.int64)


def _served(name, n, seed, fn):
    """fn of raw points as a function of served (standardised) points y, with the
    standardisation's log-Jacobian: -log p_std(y) = -log p_raw(mean + std * y) - log(std_1 std_2).
    The raw points are regenerated (same generator calls) to recover the sample mean and std."""
    _, _, standardisation = _raw_2d(name, n, seed)
    if standardisation is None:
        return lambda y: fn(t.as_tensor(y, dtype=t.float64)), 0.
    mean, std = (t.as_tensor(v, dtype=t.float64) for v in standardisation)
    return lambda y: fn(mean + std * t.as_tensor(y, dtype=t.float64)), t.log(std).sum().item()


def exact_nll_2d(name, n=8000, seed=42):
    """The exact -log p(y) in nats of the dataset `get_2d_dataset(name, n, seed)` as a function of
    points y (m, 2) -> (m,) float64, vectorised; None where the density is not known."""
    spec = _set_2d(name)
    if spec.nll is not None:
        raw, log_jacobian = _served(name, n, seed, lambda x: spec.nll(x, n))
        return lambda y: raw(y) - log_jacobian
    log_given = exact_log_given_2d(name, n, seed)
    if log_given is None:
        return None
    prior = spec.log_prior(n)
    return lambda y: -(log_given(y) + prior).logsumexp(1)


def exact_log_given_2d(name, n=8000, seed=42):
    """log p(y | label) in nats of a labelled dataset's served points y, (m, 2) -> (m, classes)
    float64; None where not known."""
    spec = _set_2d(name)
    if spec.log_given is None:
        return None
    raw, log_jacobian = _served(name, n, seed, lambda x: spec.log_given(x, n))
    return lambda y: raw(y) + log_jacobian


def entropy_2d(name, n=8000, seed=42):
    """The exact differential entropy in nats of `get_2d_dataset(name, n, seed)`'s density, in
    the units served (standardising subtracts log(std_1 std_2)); None where it is not known."""
    spec = _set_2d(name)
    if spec.entropy is None:
        return None
    _, _, standardisation = _raw_2d(name, n, seed)
    shift = 0. if standardisation is None else math.log(standardisation[1].prod())
    return spec.entropy(n) - shift


# ---------------------------------------------------------------------------------------------
# Image datasets: integer pixel levels served as float32 in [-1, 1]
# ---------------------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision extracts into --data_dir


class ImageSet(t.utils.data.Dataset):
    """Images stored as integer levels 0 .. levels-1 in a uint8 tensor (N, C, H, W), served as
    float32 x = 2 k / (levels - 1) - 1 in [-1, 1] (bin width 2 / (levels - 1)).

    dequantize=True adds uniform noise over the bin (utils.dequantize), making the data a genuine
    continuous density: -log P(k) <= -log p(x) - d log(width) in expectation. With a seed the
    noise is fixed per image (validation), otherwise fresh at every access (training). With
    labels (int64 (N,)), items are (image, label).
    """

    def __init__(self, images, levels, dequantize=False, seed=None, labels=None):
        if images.dtype != t.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if int(images.max()) >= levels:
            raise ValueError(f"pixel level {int(images.max())} out of range for {levels} levels")
        self.images, self.levels, self.dequantize, self.seed = images, int(levels), dequantize, seed
        self.labels = labels
        self.bin_width = 2 / (self.levels - 1)

    def __len__(self):
        return len(self.images)

    @property
    def x_shape(self):
        return tuple(self.images.shape[1:])

    def __getitem__(self, i):
        x = self._served(self.images[i:i + 1], i)[0]
        return x if self.labels is None else (x, self.labels[i])

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


def _cifar10(data_dir, seed=0, image_size=32, fake_size=0):
    """torchvision's CIFAR-10 from data_dir/cifar-10-batches-py: 50000 training and 10000 test
    images, 3x32x32, 256 levels."""
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
    return [(t.from_numpy(p.data).permute(0, 3, 1, 2), t.as_tensor(p.targets)) for p in parts]


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


DIGITS_VAL = 300  # validation digits of the seeded split


def _digits(data_dir=None, seed=0, image_size=8, fake_size=0):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels 0..16, so bins
    are 1/8 wide in [-1, 1]), split (seeded) into DIGITS_VAL for validation and the rest."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = t.as_tensor(digits.images, dtype=t.uint8).unsqueeze(1)
    labels = t.as_tensor(digits.target, dtype=t.int64)
    perm = t.randperm(len(images), generator=t.Generator().manual_seed(seed))
    return [(images[p], labels[p]) for p in (perm[DIGITS_VAL:], perm[:DIGITS_VAL])]


def _fake(data_dir=None, seed=0, image_size=32, fake_size=512):
    """torchvision's FakeData: random 3 x image_size x image_size 8-bit images, fake_size for
    training and fake_size // 4 for validation. For smoke tests."""
    from torchvision.datasets import FakeData
    n_val = max(1, fake_size // 4)
    fake = FakeData(size=fake_size + n_val, image_size=(3, image_size, image_size),
                    random_offset=seed)
    images = t.stack([t.from_numpy(np.array(img)) for img, _ in fake]).permute(0, 3, 1, 2)
    labels = t.as_tensor([label for _, label in fake], dtype=t.int64)
    return [(images[part], labels[part]) for part in (slice(0, fake_size), slice(fake_size, None))]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """An image dataset. load(data_dir, seed, image_size, fake_size) -> (train, validation), each
    (uint8 images (N, C, H, W) of pixel levels 0 .. levels - 1, int64 labels (N,) in
    0 .. classes - 1); shape(image_size): one image's shape,
    known before loading (the U-Net is checked against it); for sets not bundled with a package,
    download(data_dir) fetches them and missing(data_dir, can_download) says what is missing and
    how to provide it (None if nothing)."""
    load: Callable
    levels: int
    shape: Callable
    classes: int
    download: Optional[Callable] = None
    missing: Optional[Callable] = None


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


IMAGE_SETS = {
    "cifar10": ImageSpec(_cifar10, 256, lambda size: (3, 32, 32), 10, download_cifar10,
                         cifar10_missing),
    "digits": ImageSpec(_digits, 17, lambda size: (1, 8, 8), 10),
    "fake": ImageSpec(_fake, 256, lambda size: (3, size, size), 10),
}


def image_spec(name):
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_SETS)}")
    return IMAGE_SETS[name]


def load_image_dataset(name, data_dir="data", dequantize=False, seed=0, image_size=32,
                       fake_size=512, labels=False):
    """(train, validation) ImageSets of a named image dataset (IMAGE_SETS) from local files; the
    validation images are dequantised (if so) with noise fixed by the seed; labels: items are
    (image, label)."""
    spec = image_spec(name)
    (train, train_y), (val, val_y) = spec.load(data_dir, seed, image_size, fake_size)
    return (ImageSet(train.contiguous(), spec.levels, dequantize,
                     labels=train_y if labels else None),
            ImageSet(val.contiguous(), spec.levels, dequantize, seed=seed,
                     labels=val_y if labels else None))


# ---------------------------------------------------------------------------------------------
# LightningDataModules: downloads in prepare_data (once per node), loading and splits in setup
# ---------------------------------------------------------------------------------------------
class EpochSampler(t.utils.data.Sampler):
    """This process's share of a permutation of n training samples named by (seed, epoch)
    (Lightning calls set_epoch): samples rank, rank + world, ... of it, n // world of them, so
    every process takes the same number of steps. A run resumed mid-epoch sees the order the
    interrupted one did; `skip` leaves out the first samples of the next iteration once
    (Sharded.train_loader sets it)."""

    def __init__(self, n, seed, rank=0, world=1):
        self.n, self.seed, self.rank, self.world, self.epoch, self.skip = n, seed, rank, world, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world

    def __iter__(self):  # a generator: skip is read at the first draw, after a resume set it
        order = t.randperm(self.n, generator=t.Generator().manual_seed(
            utils.derive_seed(self.seed, self.epoch)))
        share, self.skip = order[self.rank::self.world][:len(self)][self.skip:], 0
        yield from share.tolist()


class Sharded(pl.LightningDataModule):
    """A datamodule whose samplers shard the data across processes themselves (the Trainer runs
    with use_distributed_sampler=False): training in a permutation per epoch (EpochSampler),
    validation in order with every sample scored exactly once, whatever the number of
    processes (Lightning's DistributedSampler would pad it with repeats). `resumed_steps`: the
    training steps a resumed run's checkpoint had done (experiment.py sets it), from which the
    training loader starts mid-epoch where the interrupted run stopped."""

    resumed_steps = 0

    def _rank_world(self):
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_loader(self, dataset, batch_size, drop_last, **kwargs):
        """The training loader: this process's share of a permutation per epoch (EpochSampler),
        one batch a step. For a resumed run its first epoch and the samples of it already done
        are set here, when the loader is made: Lightning makes the loader's iterator before any
        hook after the checkpoint's restore (to size the learning-rate schedule), and DataLoader
        workers draw the sampler's indices as soon as that iterator exists."""
        sampler = EpochSampler(len(self.train), self.seed, *self._rank_world())
        loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        epoch, done = divmod(self.resumed_steps, len(loader))
        sampler.set_epoch(epoch)
        sampler.skip, self.resumed_steps = done * batch_size, 0
        return loader

    def val_shard(self):
        rank, world = self._rank_world()
        return range(rank, len(self.val), world)


class Points2D(Sharded):
    """A 2-D dataset (SETS_2D) with a seeded split holding out `val_fraction`; conditional: a
    labelled set's batches are (points, labels)."""

    def __init__(self, name, num_points=8000, seed=0, val_fraction=0.1, batch_size=512,
                 eval_batch_size=1024, conditional=False):
        super().__init__()
        spec = _set_2d(name)
        if conditional and not spec.classes:
            raise ValueError(f"the 2-D dataset {name!r} has no labels; labelled ones: "
                             f"{', '.join(k for k, v in SETS_2D.items() if v.classes)}")
        self.name, self.num_points, self.seed, self.val_fraction = name, num_points, seed, val_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.x_shape, self.train = (2,), None
        self.num_classes = spec.classes if conditional else None
        self._exact = exact_nll_2d(name, n=num_points)
        self._log_given = exact_log_given_2d(name, n=num_points) if conditional else None
        self._log_prior = spec.log_prior(num_points) if self._log_given else None

    def setup(self, stage=None):
        if self.train is None:
            made = get_2d_dataset(self.name, n=self.num_points, labels=bool(self.num_classes))
            train, val = split_2d(made if self.num_classes else (made,), self.val_fraction,
                                  self.seed)
            (self.train, self.train_labels), (self.val, self.val_labels) = (
                (part + (None,))[:2] for part in (train, val))

    def reference_data(self):
        return self.train

    def val_data(self):
        return self.val

    def eval_data(self):
        """What --eval_only scores: the validation points (no grid)."""
        return self.val, None

    def eval_labels(self):
        return self.val_labels

    def exact_nll(self, x):
        return None if self._exact is None else self._exact(x)

    def exact_log_given(self, x):
        """log p(x | y) for every label (m, classes), or None."""
        return None if self._log_given is None else self._log_given(x)

    def exact_log_prior(self):
        return self._log_prior

    def entropy(self):
        """The density's differential entropy in nats (None where it is not known)."""
        return entropy_2d(self.name, n=self.num_points)

    def _rows(self, x, y):
        return Rows(x) if y is None else Rows(x, y)

    def train_dataloader(self):
        share = len(self.train) // self._rank_world()[1]
        return self.train_loader(self._rows(self.train, self.train_labels), self.batch_size,
                                 share > self.batch_size, collate_fn=_as_is)

    def val_dataloader(self):
        return DataLoader(self._rows(self.val, self.val_labels), batch_size=self.eval_batch_size,
                          sampler=self.val_shard(), collate_fn=_as_is)


class Rows(t.utils.data.Dataset):
    """The rows of one tensor (or of several, given as a tuple: points and labels), a batch
    fetched with one indexing operation (__getitems__) instead of a stack of single rows: the 2-D
    sets' batches cost microseconds."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return self.__getitems__(i)

    def __getitems__(self, indices):
        rows = tuple(v[indices] for v in self.tensors)
        return rows if len(rows) > 1 else rows[0]


def _as_is(batch):
    return batch


class Images(Sharded):
    """An image dataset (IMAGE_SETS). A set that is not bundled (CIFAR-10) is downloaded in
    prepare_data (Lightning runs it once per node, for training and evaluation alike) when
    missing; `missing()` says beforehand whether it is there or may be downloaded (download()
    allows it). conditional: batches are (images, labels)."""

    def __init__(self, name, data_dir="data", dequantize=False, seed=0, image_size=32,
                 fake_size=512, batch_size=64, eval_batch_size=100, num_workers=0,
                 reference_size=5000, download=None, conditional=False):
        super().__init__()
        self.spec = image_spec(name)
        self.num_classes = self.spec.classes if conditional else None
        self.name, self.data_dir, self.dequantize, self.seed = name, data_dir, dequantize, seed
        self.image_size, self.fake_size, self.reference_size = image_size, fake_size, reference_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.download, self.train = download, None
        self.x_shape = self.spec.shape(image_size)
        self.grid = utils.Grid(2 / (self.spec.levels - 1), -1., self.spec.levels)

    def missing(self):
        """None if the data is here or may be downloaded, else what is missing and how to fix it."""
        if self.spec.missing is None:
            return None
        return self.spec.missing(self.data_dir, lambda: bool(self.download and self.download()))

    def prepare_data(self):
        if self.spec.download is not None:
            self.spec.download(self.data_dir)

    def setup(self, stage=None):
        if self.train is None:
            self.train, self.val = load_image_dataset(self.name, self.data_dir, self.dequantize,
                                                      self.seed, self.image_size, self.fake_size,
                                                      labels=bool(self.num_classes))
            self.train_labels, self.val_labels = self.train.labels, self.val.labels

    def reference_data(self):
        """The first reference_size training images, dequantised (if so) with seeded noise, so
        that every process fits the same reference."""
        train = ImageSet(self.train.images, self.spec.levels, self.dequantize, seed=self.seed + 1)
        return train.tensor(self.reference_size)

    def val_data(self):
        return self.val.tensor()

    def eval_data(self):
        """What --eval_only scores: the validation images as the grid data they are (never
        dequantised), and their grid."""
        return ImageSet(self.val.images, self.spec.levels).tensor(), self.grid

    def eval_labels(self):
        return self.val_labels

    def exact_nll(self, x):
        return None

    def exact_log_given(self, x):
        return None

    def _workers(self):
        return dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                    pin_memory=t.cuda.is_available())

    def train_dataloader(self):
        return self.train_loader(self.train, self.batch_size, True, **self._workers())

    def val_dataloader(self):
        return DataLoader(self.val, self.eval_batch_size, sampler=self.val_shard(),
                          **self._workers())
