"""Denoisers: modules eps_hat = denoiser(z, logsnr) that predict the noise in z at log SNR a
(logsnr of shape (batch,), output of z's shape). Anything with that signature works with
DiffusionModel; these are the project's own. The diffusers U-Net adapter is in unet.py.

- `MLPDenoiser`: the 2-D MLP with sinusoidal embeddings of the log SNR and of the input;
- `GaussianDenoiser`: the optimal predictor of a Gaussian reference (utils.GaussianReference);
- `GridRounding`: any denoiser with its estimate of x snapped to the data grid;
- `Ensemble`: per log-SNR bin, the member with the lowest held-out error.
"""
import math

import torch as t
import torch.nn as nn

import utils


def sinusoidal(v, size, max_period):
    """[sin(v f_k), cos(v f_k)] for `size // 2` frequencies f_k from 1 down to 1/max_period."""
    half = size // 2
    freqs = t.exp(-math.log(max_period) * t.arange(half, device=v.device, dtype=v.dtype) / half)
    angles = v.unsqueeze(-1) * freqs
    return t.cat([angles.sin(), angles.cos()], -1)


class MLPDenoiser(nn.Module):
    """eps_hat(z, a) for 2-D data: an MLP (SiLU) on the raw z, the log SNR (raw and as a sinusoidal
    embedding) and, if input_embedding_scale > 0, a sinusoidal embedding of each coordinate of
    input_embedding_scale * z (frequencies from that scale down to it / input_embedding_period,
    for sharp densities). zero_output: the last layer starts at zero (a Gaussian residual then
    starts exactly at the Gaussian predictor). num_classes: conditional, eps_hat(z, a, y), with a
    learned embedding of the label (one more for "no label": y = -1 or None)."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=32, input_embedding_scale=0.,
                 input_embedding_period=1e4, zero_output=False, num_classes=None):
        super().__init__()
        if embedding_size < 2 or embedding_size % 2:
            raise ValueError(f"embedding_size must be an even number >= 2, got {embedding_size}")
        self.config = dict(hidden_size=hidden_size, hidden_layers=hidden_layers,
                           embedding_size=embedding_size, input_embedding_scale=input_embedding_scale,
                           input_embedding_period=input_embedding_period)
        if num_classes is not None:
            self.config["num_classes"] = num_classes
            self.labels = nn.Embedding(num_classes + 1, embedding_size)
        self.embedding_size, self.input_embedding_scale = embedding_size, input_embedding_scale
        self.input_embedding_period = input_embedding_period
        width = 2 + 1 + embedding_size + (2 * embedding_size if input_embedding_scale > 0 else 0)
        width += embedding_size if num_classes is not None else 0
        layers = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_size), nn.SiLU()]
            width = hidden_size
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        if zero_output:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    # The architecture travels in the state dict, so a checkpoint alone rebuilds it
    def get_extra_state(self):
        return {"mlp": dict(self.config)}

    def set_extra_state(self, state):
        if state["mlp"] != self.config:
            raise ValueError(f"the checkpoint's MLP is {state['mlp']}, this one {self.config}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # older checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z, logsnr, y=None):
        a = logsnr.to(z.dtype)
        features = [z, (a / 10).unsqueeze(-1), sinusoidal(a, self.embedding_size, 100.)]
        if "num_classes" in self.config:
            features.append(self.labels(no_label_last(y, len(z), self.config["num_classes"],
                                                      z.device)).to(z.dtype))
        if self.input_embedding_scale > 0:
            scaled = self.input_embedding_scale * z
            period = self.input_embedding_period
            features += [sinusoidal(scaled[:, 0], self.embedding_size, period),
                         sinusoidal(scaled[:, 1], self.embedding_size, period)]
        return self.net(t.cat(features, -1))


def no_label_last(y, n, num_classes, device):
    """Labels as embedding indices: 0 .. num_classes - 1 as they are, "no label" (y None, or -1)
    as num_classes."""
    if y is None:
        return t.full((n,), num_classes, dtype=t.long, device=device)
    return t.where(y < 0, num_classes, y)


class GaussianDenoiser(nn.Module):
    """The optimal noise predictor of a Gaussian reference, eps_G(z, a), as a denoiser module."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference

    def forward(self, z, logsnr):
        return self.reference.eps(z, logsnr)


class GridRounding(nn.Module):
    """A denoiser whose estimate of x is snapped to the data grid (a utils.Grid), per coordinate:

    - "hard": x_r = the nearest grid value (clamped to the grid's levels, if it has a number);
    - "soft": x_r = the posterior mean over grid values g_k given x_hat ~ N(x, T e^-a) and a
      uniform prior over the grid, sum_k g_k softmax_k(-(x_hat - g_k)^2 e^a / (2 T)), over the
      2 * window grid values nearest x_hat. T = 1 is the softest temperature a denoiser can
      justify (docs/maths.md); smaller T are sharper variants to choose between on held-out data.

    eps_r = eps_from_x(z, a, x_r). Any function of z is a denoiser, so rounding keeps every
    estimate an upper bound; it helps at high SNR (x_hat within half a bin of x), hurts at low.
    """

    def __init__(self, denoiser, grid, mode="hard", temperature=1., window=8):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
        if not grid.delta > 0 or not temperature > 0:
            raise ValueError(f"delta and temperature must be > 0, got {grid.delta}, {temperature}")
        if grid.levels is not None and grid.levels < 2:
            raise ValueError(f"levels must be >= 2, got {grid.levels}")
        self.inner, self.grid, self.mode = denoiser, utils.Grid(*grid), mode
        self.temperature, self.window = float(temperature), int(window)

    def forward(self, z, logsnr):
        return self.round_eps(z, logsnr, self.inner(z, logsnr))

    def round_eps(self, z, logsnr, eps_hat):
        """The rounded noise prediction from the inner denoiser's eps_hat."""
        x_hat = utils.x_from_eps(z, logsnr, eps_hat.to(z.dtype))
        x_r = self._hard(x_hat) if self.mode == "hard" else self._soft(x_hat, logsnr)
        return utils.eps_from_x(z, logsnr, x_r)

    def _clamp(self, k):
        return k.clamp(0, self.grid.levels - 1) if self.grid.levels is not None else k

    def _hard(self, x_hat):
        delta, lo, _ = self.grid
        return lo + delta * self._clamp(((x_hat - lo) / delta).round())

    def _soft(self, x_hat, logsnr):
        delta, lo, levels = self.grid
        a = utils.append_dims(logsnr.to(x_hat.dtype), x_hat.dim())
        k0 = self._clamp(((x_hat - lo) / delta).floor())
        offsets = t.arange(1 - self.window, self.window + 1, device=x_hat.device, dtype=x_hat.dtype)
        k = k0.unsqueeze(-1) + offsets
        values = lo + delta * k
        logits = -(x_hat.unsqueeze(-1) - values) ** 2 * (a.exp() / (2 * self.temperature)).unsqueeze(-1)
        if levels is not None:
            logits = logits.masked_fill((k < 0) | (k > levels - 1), float("-inf"))
        return (logits.softmax(-1) * values).sum(-1)


class Ensemble(nn.Module):
    """eps_hat(z, a) = eps_hat_m(z, a) with m = choice[bin of a]: per log-SNR bin, the member with
    the lowest MSE on held-out data (from_heldout, fed by diffusionmodel.heldout_errors). Log SNRs
    outside the bins use the nearest bin. Choosing by log SNR alone keeps it a denoiser, so its
    estimates stay upper bounds, and its expected error is at most each member's wherever the
    held-out choice is right.
    """

    def __init__(self, members, edges, choice, heldout_mse=None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("edges", t.as_tensor(edges, dtype=t.float64))
        self.register_buffer("choice", t.as_tensor(choice, dtype=t.long))
        if heldout_mse is None:
            heldout_mse = t.full((len(self.members), len(self.choice)), float("nan"))
        self.register_buffer("heldout_mse", t.as_tensor(heldout_mse, dtype=t.float64))

    @classmethod
    def from_heldout(cls, members, edges, heldout_mse):
        """The ensemble choosing, per bin, the member with the lowest held-out MSE (members x bins)."""
        heldout_mse = t.as_tensor(heldout_mse, dtype=t.float64)
        return cls(members, edges, heldout_mse.argmin(0), heldout_mse)

    def member_of(self, logsnr):
        """The index of the member used at each log SNR: bin k holds edges[k] <= a < edges[k+1]."""
        inner = self.edges[1:-1].to(logsnr.device)
        return self.choice[t.bucketize(logsnr.detach().double(), inner.double(), right=True)]

    def forward(self, z, logsnr):
        which = self.member_of(logsnr)
        out = t.empty_like(z)
        for m, member in enumerate(self.members):
            rows = (which == m).nonzero().squeeze(1)
            if len(rows):
                out[rows] = member(z[rows], logsnr[rows]).to(out.dtype)
        return out
