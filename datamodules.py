"""The LightningDataModule of every run (`points`, `images`): in-memory samples, split seeded and
sharded by its own samplers (every validation sample scored once; a resumed run keeps its order)."""
import functools
import os

import numpy as np
import pytorch_lightning as pl
import torch as t
from torch.utils.data import DataLoader

import cli
import datasets
import utils


class Samples(t.utils.data.Dataset):
    """Float points, or uint8 levels k served as grid.lo + k grid.delta and dequantised with noise
    fixed per sample by `seed` (fresh each access without); a batch is one indexing operation."""

    def __init__(self, data, labels=None, grid=None, dequantize=False, seed=None):
        self.data, self.labels, self.grid = data, labels, grid
        self.dequantize, self.seed = dequantize, seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):  # an index tensor: its batch (EpochSampler); an int: a batch of 1
        return self.__getitems__(i if t.is_tensor(i) else [i])

    def __getitems__(self, indices):
        indices = t.as_tensor(indices, dtype=t.long)
        x = self.served(self.data[indices], indices)
        return x if self.labels is None else (x, self.labels[indices])

    def served(self, data, index):
        if self.grid is None:
            return data
        x = data.float() * self.grid.delta + self.grid.lo
        if not self.dequantize:
            return x
        return utils.dequantize(x, self.grid.delta, utils.fresh_seed(self.seed), index)

    def tensor(self, n=None):
        """The first n samples (all by default) as one tensor, as served."""
        n = min(len(self), n or len(self))
        return self.served(self.data[:n], t.arange(n))


class EpochSampler(t.utils.data.Sampler):
    """Batches (index tensors) of this process's n // world of a (seed, epoch) permutation, less
    `skip` samples once (on resume); no short last batch where the share holds more than one, or
    with drop_last."""

    def __init__(self, n, batch_size, seed, rank=0, world=1, drop_last=False):
        self.n, self.seed, self.rank, self.world, self.epoch, self.skip = n, seed, rank, world, 0, 0
        self.batch_size, self.share = batch_size, n // world
        self.drop_last = drop_last or self.share > batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return (self.share // self.batch_size if self.drop_last
                else -(-self.share // self.batch_size))

    def __iter__(self):  # a generator: skip is read at the first draw, after a resume set it
        order = t.randperm(self.n, generator=t.Generator().manual_seed(
            utils.derive_seed(self.seed, self.epoch)))
        share, self.skip = order[self.rank::self.world][:self.share][self.skip:], 0
        end = len(share) - len(share) % self.batch_size if self.drop_last else len(share)
        if end:  # (split makes one empty piece of an empty tensor)
            yield from share[:end].split(self.batch_size)


def _as_is(batch):
    return batch


class Data(pl.LightningDataModule):
    """load() -> dict(train=, val=, train_labels=, val_labels=) of numpy arrays (uint8 images with
    `levels`); prepare(): a download, once per node; missing() -> what is missing or None; exact: a
    datasets.Exact; files: validation names; resumed_steps: where a resumed run's loader starts."""

    resumed_steps = 0

    def __init__(self, name, load, x_shape, batch_size=512, eval_batch_size=1024, seed=0,
                 num_classes=None, levels=None, dequantize=False, reference_size=None,
                 num_workers=0, exact=None, prepare=None, missing=None, files=None):
        super().__init__()
        self.name, self.load, self.x_shape, self.seed = name, load, tuple(x_shape), seed
        self.missing, self.files, self.num_workers = missing or (lambda: None), files, num_workers
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_classes, self.dequantize, self.exact = num_classes, dequantize, exact
        self.reference_size, self.prepare = reference_size, prepare or (lambda: None)
        self.grid = None if levels is None else utils.Grid(2 / (levels - 1), -1., levels)
        self.train = None

    def prepare_data(self):
        self.prepare()

    def setup(self, stage=None):
        if self.train is not None:
            return
        parts = self.load()
        self.train_labels, self.val_labels = (
            t.as_tensor(np.asarray(parts[k]), dtype=t.int64)
            if self.num_classes and parts.get(k) is not None else None
            for k in ("train_labels", "val_labels"))
        self.train = Samples(t.as_tensor(parts["train"]), self.train_labels, self.grid,
                             self.dequantize)
        self.val = Samples(t.as_tensor(parts["val"]), self.val_labels, self.grid, self.dequantize,
                           seed=self.seed)

    def reference_data(self):
        """The first reference_size training samples, dequantised alike in every process."""
        return Samples(self.train.data, None, self.grid, self.dequantize,
                       self.seed + 1).tensor(self.reference_size)

    def reference_labels(self):
        return None if self.train_labels is None else self.train_labels[:len(self.reference_data())]

    def val_data(self):
        return self.val.tensor()

    def eval_data(self):
        """What --eval_only scores: the validation samples, never dequantised, and their grid."""
        return Samples(self.val.data, grid=self.grid).tensor(), self.grid

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
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader_kwargs(self):  # Samples returns whole batches: nothing to collate
        return dict(collate_fn=_as_is, num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0,
                    pin_memory=t.cuda.is_available() and self.grid is not None)

    def train_dataloader(self):  # a resumed run's epoch and samples done are set here: Lightning
        # makes the loader after the checkpoint's restore, and workers draw indices at once
        sampler = EpochSampler(len(self.train), self.batch_size, self.seed, *self._rank_world(),
                               drop_last=self.grid is not None)
        loader = DataLoader(self.train, None, sampler=sampler, **self._loader_kwargs())
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


# --- The two families' datamodules: 2-D points and images, built-in or a user's file ---
def points(args, evaluation=False, whole=False):
    """The 2-D points of a run, split seeded (whole: every sample in both, in order)."""
    exact = None
    if args.data:
        x, y = datasets.read_points(args.data)
        classes = None if y is None else int(y.max()) + 1
    else:
        x, y, exact = datasets.points_2d(args.dataset, args.num_points)
        classes = datasets.set_2d(args.dataset).classes
    _need_labels(args, classes)
    parts = _split(x.astype(np.float32), y, args, whole)[0]
    return Data(run_name(args), lambda: parts, (2,), args.batch_size, args.eval_batch_size,
                args.seed, classes if args.conditional else None, exact=exact)


def images(args, evaluation=False, whole=False):
    """The images of a run, split as points are; evaluation: never dequantised."""
    files = None
    if args.data:
        x, y, names = datasets.read_images(args.data)
        classes = None if y is None else int(y.max()) + 1
        _need_labels(args, classes, " (put the images in one sub-folder per label)")
        parts, val = _split(x, y, args, whole)
        files = None if names is None else [names[i] for i in val]
        load, levels, shape, prepare, missing = (lambda: parts), 256, x.shape[1:], None, None
    else:
        spec = datasets.image_set(args.dataset)
        classes, levels, shape = spec.classes, spec.levels, spec.shape

        def load():
            return dict(zip(("train", "train_labels", "val", "val_labels"),
                            spec.load(args.data_dir, args.seed)))
        prepare = functools.partial(datasets.download, args.dataset, args.data_dir)
        missing = functools.partial(datasets.missing, args.dataset, args.data_dir,
                                    lambda: not args.offline and cli.reachable(spec.url))
    return Data(run_name(args), load, shape, args.batch_size, args.eval_batch_size, args.seed,
                classes if args.conditional else None, levels, args.dequantize and not evaluation,
                args.reference_size, args.num_workers, prepare=prepare, missing=missing,
                files=files)


def _need_labels(args, classes, hint=""):
    if args.conditional and classes is None:
        raise ValueError(f"--conditional: {args.data or args.dataset} has no labels{hint}")


def _split(x, y, args, whole):  # (Data.load's parts, validation indices)
    n = len(x)
    train, val = (np.arange(n),) * 2 if whole else datasets.split(n, args.val_fraction, args.seed)
    labels = (None, None) if y is None else (y[train], y[val])
    return dict(train=x[train], val=x[val], train_labels=labels[0], val_labels=labels[1]), val


def run_name(args):
    """The data's name in run folders and tables: the dataset, or the file's stem."""
    data = getattr(args, "data", None)
    return os.path.splitext(os.path.basename(os.path.normpath(data)))[0] if data else args.dataset
