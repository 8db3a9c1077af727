"""Denoisers eps_hat = denoiser(z, logsnr[, y]), by name and from a record (docs/extending.md)."""
import importlib
import json
import math

import torch as t
import torch.nn as nn

import utils

# --denoiser NAME: builders "module:function"(args, data) -> (denoiser, what it is)
ARCHITECTURES = {"mlp": "denoisers:mlp_from_args", "unet": "unet:from_args"}


def sinusoidal(v, size, max_period):
    """[sin(v f_k), cos(v f_k)] for `size // 2` frequencies f_k from 1 down to 1/max_period."""
    half = size // 2
    freqs = t.exp(-math.log(max_period) * t.arange(half, device=v.device, dtype=v.dtype) / half)
    angles = v.unsqueeze(-1) * freqs
    return t.cat([angles.sin(), angles.cos()], -1)


class MLPDenoiser(nn.Module):
    """eps_hat(z, a[, y]) for 2-D data: an MLP on z, the log SNR and, if input_embedding_scale
    > 0, sinusoidal embeddings of input_embedding_scale * z; num_classes: conditional."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=32,
                 input_embedding_scale=0., input_embedding_period=1e4, zero_output=False,
                 num_classes=None):
        super().__init__()
        if embedding_size < 2 or embedding_size % 2:
            raise ValueError(f"embedding_size must be an even number >= 2, got {embedding_size}")
        self.config = dict(hidden_size=hidden_size, hidden_layers=hidden_layers,
                           embedding_size=embedding_size,
                           input_embedding_scale=input_embedding_scale,
                           input_embedding_period=input_embedding_period, num_classes=num_classes)
        if num_classes is not None:
            self.labels = nn.Embedding(num_classes + 1, embedding_size)
        embeddings = 1 + 2 * (input_embedding_scale > 0) + (num_classes is not None)
        sizes, layers = [3 + embedding_size * embeddings] + [hidden_size] * hidden_layers, []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 2))
        if zero_output:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, z, logsnr, y=None):
        c, a = self.config, logsnr.to(z.dtype)
        features = [z, (a / 10).unsqueeze(-1), sinusoidal(a, c["embedding_size"], 100.)]
        if c["num_classes"] is not None:
            features.append(self.labels(no_label_last(y, len(z), c["num_classes"], z.device))
                            .to(z.dtype))
        if c["input_embedding_scale"] > 0:
            features += [sinusoidal(c["input_embedding_scale"] * z[:, i], c["embedding_size"],
                                    c["input_embedding_period"]) for i in range(2)]
        return self.net(t.cat(features, -1))


def mlp_from_args(args, data):
    """The 2-D MLP of a run's flags (zero output under a Gaussian residual)."""
    mlp = MLPDenoiser(args.hidden_size, args.hidden_layers, args.embedding_size,
                      args.input_embedding_scale, args.input_embedding_period,
                      zero_output=args.gaussian_residual, num_classes=data.num_classes)
    return mlp, f"MLP {args.hidden_layers} x {args.hidden_size}"


def no_label_last(y, n, num_classes, device):
    """Embedding indices: labels as they are, "no label" (None or -1) as num_classes."""
    if y is None:
        return t.full((n,), num_classes, dtype=t.long, device=device)
    return t.where(y < 0, num_classes, y)


class GaussianDenoiser(nn.Module):
    """The optimal noise predictor of a utils.GaussianReference (its label's, given labels)."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference

    def forward(self, z, logsnr, y=None):
        return self.reference.eps(z, logsnr, y)


class GridRounding(nn.Module):
    """x_hat snapped to the data grid: "hard" the nearest value, "soft" the posterior mean."""

    WINDOW = 8  # grid values on each side of x_hat that the soft rounding weighs

    def __init__(self, denoiser, grid, mode="hard"):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
        if not grid.delta > 0 or (grid.levels is not None and grid.levels < 2):
            raise ValueError(f"need delta > 0 and at least 2 levels, got {grid}")
        self.inner, self.grid, self.mode = denoiser, utils.Grid(*grid), mode

    def forward(self, z, logsnr):
        return self.round_eps(z, logsnr, self.inner(z, logsnr))

    def round_eps(self, z, logsnr, eps_hat):
        """The rounded noise prediction from the inner denoiser's eps_hat."""
        x_hat = utils.x_from_eps(z, logsnr, eps_hat.to(z.dtype))
        delta, lo, levels = self.grid
        if self.mode == "hard":
            x_r = lo + delta * self._clamp(((x_hat - lo) / delta).round())
        else:
            a = utils.append_dims(logsnr.to(x_hat.dtype), x_hat.dim())
            k = self._clamp(((x_hat - lo) / delta).floor()).unsqueeze(-1) + t.arange(
                1 - self.WINDOW, self.WINDOW + 1, device=x_hat.device, dtype=x_hat.dtype)
            values = lo + delta * k
            logits = -(x_hat.unsqueeze(-1) - values) ** 2 * (a.exp() / 2).unsqueeze(-1)
            if levels is not None:
                logits = logits.masked_fill((k < 0) | (k > levels - 1), float("-inf"))
            x_r = (logits.softmax(-1) * values).sum(-1)
        return utils.eps_from_x(z, logsnr, x_r)

    def _clamp(self, k):
        return k.clamp(0, self.grid.levels - 1) if self.grid.levels is not None else k


class Ensemble(nn.Module):
    """eps_hat(z, a) = eps_hat_m(z, a) with m = choice[bin of a] (outside: the nearest bin's)."""

    def __init__(self, members, edges, choice):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("edges", t.as_tensor(edges, dtype=t.float64))
        self.register_buffer("choice", t.as_tensor(choice, dtype=t.long))

    def forward(self, z, logsnr):
        inner = self.edges[1:-1].to(logsnr.device)  # bin k: edges[k] <= a < edges[k+1]
        which = self.choice[t.bucketize(logsnr.detach().double(), inner.double(), right=True)]
        out = t.empty_like(z)
        for m, member in enumerate(self.members):
            rows = (which == m).nonzero().squeeze(1)
            if len(rows):
                out[rows] = member(z[rows], logsnr[rows]).to(out.dtype)
        return out


# --- Denoisers by name, by class, and from a checkpoint's record ---
def resolve(target):
    """The object "module:name" (name may be dotted) names, or a ValueError naming what is wrong."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"--denoiser {target}: give a name ({', '.join(ARCHITECTURES)}) or "
                         "module:Class")
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--denoiser {target}: cannot import {module}: {err}") from None
    for part in name.split("."):
        if not hasattr(found, part):
            raise ValueError(f"--denoiser {target}: {module} has no {name}")
        found = getattr(found, part)
    return found


def build(target, kwargs=None):
    """An instance of the class "module:Class" with keyword arguments, and its record."""
    cls, kwargs = resolve(target), dict(kwargs or {})
    try:
        return cls(**kwargs), {"target": target, "kwargs": kwargs}
    except TypeError as err:
        raise ValueError(f"--denoiser {target}: its arguments {json.dumps(kwargs)} do not fit: "
                         f"{err}") from None


def from_args(args, data):
    """(denoiser, record, what it is) of a run's --denoiser and --denoiser_args."""
    if args.denoiser in ARCHITECTURES:
        denoiser, where = resolve(ARCHITECTURES[args.denoiser])(args, data)
        return denoiser, record(denoiser), where
    try:
        kwargs = json.loads(args.denoiser_args or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"--denoiser_args is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--denoiser_args must be a JSON object of keyword arguments, got "
                         f"{args.denoiser_args}")
    denoiser, saved = build(args.denoiser, kwargs)
    if not isinstance(denoiser, nn.Module):
        raise ValueError(f"--denoiser {args.denoiser} made a {type(denoiser).__name__}, not a "
                         "torch.nn.Module")
    check(denoiser, data.x_shape, data.num_classes)
    return denoiser, saved, args.denoiser


def record(denoiser):
    """{"target": "module:Class", "kwargs": its `config`} that rebuilds a denoiser, or None."""
    config, cls = getattr(denoiser, "config", None), type(denoiser)
    if not isinstance(config, dict):
        return None
    return {"target": f"{cls.__module__}:{cls.__qualname__}", "kwargs": dict(config)}


def rebuild(saved):
    """The denoiser of a record, with fresh weights (the caller loads them)."""
    if not isinstance(saved, dict) or "target" not in saved:
        raise ValueError("the checkpoint does not say how to rebuild its denoiser (it was written "
                         "before denoisers were recorded: train it again)")
    return build(saved["target"], saved.get("kwargs"))[0]


def check(denoiser, x_shape, num_classes=None):
    """A ValueError unless the denoiser maps two samples of x_shape to a floating tensor of it."""
    z, a = t.zeros((2,) + tuple(x_shape)), t.zeros(2)
    try:
        with t.no_grad():
            out = denoiser(z, a) if num_classes is None else denoiser(z, a, t.tensor([0, -1]))
    except Exception as err:  # anything a foreign forward raises means the same to the user
        raise ValueError(f"the denoiser {type(denoiser).__name__} fails on samples of shape "
                         f"{tuple(x_shape)}: {type(err).__name__}: {err}") from None
    if not t.is_tensor(out) or not out.is_floating_point() or out.shape != z.shape:
        got = f"{out.dtype} {tuple(out.shape)}" if t.is_tensor(out) else type(out).__name__
        raise ValueError(f"the denoiser {type(denoiser).__name__} returned {got}; it must return "
                         f"a floating tensor of the input's shape {tuple(z.shape)}")
