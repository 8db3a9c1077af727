"""The LightningDataModule every run uses: in-memory samples (2-D points, or images as integer
pixel levels served in [-1, 1]) with a seeded split, sharded across processes by samplers of its
own so that every validation sample is scored exactly once and a resumed run sees the order the
interrupted one did. `points` and `images` build it from datasets.py's entries or a user's file.
"""
import os

import numpy as np
import pytorch_lightning as pl
import torch as t
from torch.utils.data import DataLoader

import cli
import datasets
import utils


class Samples(t.utils.data.Dataset):
    """Samples held as one tensor (float points, or uint8 levels 0 .. levels - 1 served as
    2 k / (levels - 1) - 1, optionally dequantised: noise fixed per sample under `seed`, fresh at
    every access without one), with optional labels; a batch is one indexing operation."""

    def __init__(self, data, labels=None, levels=None, dequantize=False, seed=None):
        self.data, self.labels, self.levels = data, labels, levels
        self.dequantize, self.seed = dequantize, seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices):
        indices = t.as_tensor(indices, dtype=t.long)
        x = self.served(self.data[indices], indices)
        return x if self.labels is None else (x, self.labels[indices])

    def served(self, data, index):
        if self.levels is None:
            return data
        width = 2 / (self.levels - 1)
        x = data.float() * width - 1
        if not self.dequantize:
            return x
        seed = self.seed if self.seed is not None else int(t.randint(2 ** 62, ()))
        return utils.dequantize(x, width, seed, index)

    def tensor(self, n=None):
        """The first n samples (all by default) as one tensor, as served."""
        n = min(len(self), n or len(self))
        return self.served(self.data[:n], t.arange(n))


class EpochSampler(t.utils.data.Sampler):
    """This process's share (rank, rank + world, ...) of a permutation of n training samples named
    by (seed, epoch): n // world each, so every process takes the same number of steps; `skip`
    leaves out the first samples of the next iteration once (a resumed run)."""

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


def _as_is(batch):
    return batch


class Data(pl.LightningDataModule):
    """In-memory samples: load() -> dict(train=, val=, train_labels=, val_labels=) of numpy
    arrays (float points, or uint8 images with `levels`), called once in setup; prepare() (a
    download) runs once per node; missing() says what is missing and how to get it, or None.
    exact: the data's datasets.Exact density, where known; files: the validation samples' file
    names, where known. `resumed_steps`: the steps a resumed run's checkpoint had done (its
    training loader starts there)."""

    resumed_steps = 0

    def __init__(self, name, load, x_shape, batch_size=512, eval_batch_size=1024, seed=0,
                 num_classes=None, levels=None, dequantize=False, reference_size=None,
                 num_workers=0, exact=None, prepare=None, missing=None, files=None):
        super().__init__()
        self.name, self.load, self.x_shape, self.seed = name, load, tuple(x_shape), seed
        self.missing, self.files = missing or (lambda: None), files
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.num_classes, self.levels, self.dequantize = num_classes, levels, dequantize
        self.reference_size, self.exact, self.prepare = reference_size, exact, prepare
        self.grid = None if levels is None else utils.Grid(2 / (levels - 1), -1., levels)
        self.train = None

    def prepare_data(self):
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage=None):
        if self.train is not None:
            return
        parts = self.load()
        labels = [_tensor(parts.get(k)) if self.num_classes else None
                  for k in ("train_labels", "val_labels")]
        self.train_labels, self.val_labels = labels
        data = [t.as_tensor(parts[k]) for k in ("train", "val")]
        self.train = Samples(data[0], labels[0], self.levels, self.dequantize)
        self.val = Samples(data[1], labels[1], self.levels, self.dequantize, seed=self.seed)

    def reference_data(self):
        """Training samples the data-matched Gaussian is fitted on (the first reference_size,
        dequantised with seeded noise): the same in every process."""
        n = min(len(self.train), self.reference_size or len(self.train))
        return Samples(self.train.data[:n], None, self.levels, self.dequantize, self.seed + 1).tensor()

    def reference_labels(self):
        return None if self.train_labels is None else self.train_labels[:len(self.reference_data())]

    def val_data(self):
        return self.val.tensor()

    def eval_data(self):
        """What --eval_only scores: the validation samples as the grid data they are (never
        dequantised), and their grid (None for points)."""
        return Samples(self.val.data, levels=self.levels).tensor(), self.grid

    def eval_labels(self):
        return self.val_labels

    def exact_nll(self, x):
        """The exact -log p(x) of points x, float64, or None where the density is not known."""
        return None if self.exact is None else t.as_tensor(self.exact.nll(x.cpu().numpy()))

    def exact_labels(self, x, y=None):
        """datasets.Exact.labels as tensors: (-log p(x | y), i(x; y), Bayes classifier right)."""
        known = None if self.exact is None else self.exact.labels(
            x.cpu().numpy(), None if y is None else y.cpu().numpy())
        return None if known is None else tuple(t.as_tensor(v) for v in known)

    def entropy(self):
        return None if self.exact is None or self.exact.entropy is None else self.exact.entropy()

    def _rank_world(self):
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self):  # Samples returns whole batches: nothing to collate
        return dict(collate_fn=_as_is, num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0,
                    pin_memory=t.cuda.is_available() and self.levels is not None)

    def train_dataloader(self):
        """This process's share of a permutation per epoch; for a resumed run its epoch and the
        samples already done are set here, when Lightning makes the loader (before any hook
        after the checkpoint's restore, and DataLoader workers draw indices at once)."""
        rank, world = self._rank_world()
        sampler = EpochSampler(len(self.train), self.seed, rank, world)
        drop = self.levels is not None or len(sampler) > self.batch_size
        loader = DataLoader(self.train, self.batch_size, sampler=sampler, drop_last=drop,
                            **self._loader_kwargs())
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        steps_per_epoch = -(-len(loader) // accumulate)  # Lightning steps on an epoch's tail
        epoch, done = divmod(self.resumed_steps, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip, self.resumed_steps = done * accumulate * self.batch_size, 0
        return loader

    def val_dataloader(self):
        rank, world = self._rank_world()
        return DataLoader(self.val, self.eval_batch_size, sampler=range(rank, len(self.val), world),
                          **self._loader_kwargs())


def _tensor(v):
    return None if v is None else t.as_tensor(np.asarray(v), dtype=t.int64)


# ---------------------------------------------------------------------------------------------
# The datamodules of the two families: 2-D points and images, built-in or a user's file
# ---------------------------------------------------------------------------------------------
def points(args, evaluation=False, whole=False):
    """The 2-D points of a run: a built-in set (args.dataset, args.num_points) or a user's file
    (args.data), split with args.val_fraction under args.seed (whole: every sample validation, in
    order); labels where --conditional."""
    exact = None
    if args.data:
        x, y = datasets.read_points(args.data)
        classes = None if y is None else int(y.max()) + 1
    else:
        x, y, exact = datasets.points_2d(args.dataset, args.num_points)
        classes = datasets.set_2d(args.dataset).classes
    if args.conditional and classes is None:
        raise ValueError(f"--conditional: {args.data or args.dataset} has no labels")
    train, val = _split(len(x), args, whole)
    parts = dict(train=x[train].astype(np.float32), val=x[val].astype(np.float32),
                 train_labels=None if y is None else y[train], val_labels=None if y is None else y[val])
    return Data(run_name(args), lambda: parts, (2,), args.batch_size, args.eval_batch_size,
                args.seed, classes if args.conditional else None, exact=exact)


def images(args, evaluation=False, whole=False):
    """The images of a run: a built-in set (args.dataset, downloaded in prepare_data where it has
    a url and downloading is allowed) or a user's file or folder (args.data, split as points
    are); evaluation serves the grid data, never dequantised."""
    files = None
    if args.data:
        x, y, names = datasets.read_images(args.data)
        classes = None if y is None else int(y.max()) + 1
        train, val = _split(len(x), args, whole)
        files = None if names is None else [names[i] for i in val]

        def load():
            return dict(train=x[train], val=x[val], train_labels=None if y is None else y[train],
                        val_labels=None if y is None else y[val])
        levels, shape, prepare, missing = 256, x.shape[1:], None, None
    else:
        spec = datasets.image_set(args.dataset)
        classes, levels, shape = spec.classes, spec.levels, spec.shape

        def load():
            return dict(zip(("train", "train_labels", "val", "val_labels"),
                            spec.load(args.data_dir, args.seed)))

        def prepare():
            datasets.download(args.dataset, args.data_dir)

        def missing():
            return datasets.missing(args.dataset, args.data_dir, lambda: not args.offline and
                                    cli.reachable(spec.url))
    if args.conditional and classes is None:
        raise ValueError(f"--conditional: {args.data} has no labels (put the images in one "
                         "sub-folder per label)")
    return Data(run_name(args), load, shape, args.batch_size, args.eval_batch_size, args.seed,
                classes if args.conditional else None, levels, args.dequantize and not evaluation,
                args.reference_size, args.num_workers, prepare=prepare, missing=missing,
                files=files)


def _split(n, args, whole):
    """(train, validation) indices: a seeded split, or every sample for both (whole)."""
    if whole:
        return np.arange(n), np.arange(n)
    return datasets.split(n, args.val_fraction, args.seed)


def run_name(args):
    """The data's name in run folders and tables: the dataset, or the file's stem."""
    if not getattr(args, "data", None):
        return args.dataset
    return os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
