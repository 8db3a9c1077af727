"""Every figure: MSE curves against the Gaussian's MMSE, the log-SNR proposal; for 2-D data
density contours (and the refined pointwise estimates behind them), the gap to the exact density,
i(x; y) maps, samples beside the data and the validation NLL against epoch; for images sample
grids and per-pixel information. matplotlib Figures drawn without pyplot's global state."""
import math

import matplotlib
import numpy as np
import torch as t
from matplotlib.figure import Figure

import cli
import proposals
import utils

CONTOUR_DEPTH = 8.0     # nats of log density the contour plot shows below its peak
CONTOUR_STDERR = 0.1    # target standard error (nats) of every cell it shows
GRID_CHUNK = 16384      # rows per denoiser call on the grid: cache-sized blocks run fastest on CPU


def _subplots(*grid, figsize, layout=None, **kwargs):
    """(figure, axes) as pyplot.subplots gives them, on a Figure of its own."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kwargs)


def plot_mse_curve(logsnrs, mse, mmse_ref, d, title=None):
    """Noise-prediction MSE of the model against the Gaussian reference's MMSE, over log SNR,
    with the 25/50/75% crossings of mse/d marked and the (loc, scale) they suggest."""
    logsnrs, mse, mmse_ref = (np.asarray(v, dtype=float) for v in (logsnrs, mse, mmse_ref))
    fig, ax = _subplots(figsize=(6, 4))
    ax.plot(logsnrs, mse, label="model MSE")
    ax.plot(logsnrs, mmse_ref, "--", label="Gaussian MMSE")
    quantiles = proposals.mse_quantiles(logsnrs, mse, d)
    for level, a in zip((25, 50, 75), quantiles):
        if np.isfinite(a):
            ax.axvline(a, color="grey", lw=0.8, ls=":")
            ax.text(a, 0.02 * d, f"{level}%", rotation=90, va="bottom", ha="right", fontsize=8)
    loc, scale = proposals.suggest_logsnr_params(logsnrs, mse, d)
    if np.isfinite(loc) and np.isfinite(scale):
        ax.set_title((title + "\n" if title else "") +
                     f"suggested logsnr_loc={loc:.2f}, logsnr_scale={scale:.2f}", fontsize=10)
    elif title:
        ax.set_title(title, fontsize=10)
    return _over_logsnr(fig, ax, r"$E\|\epsilon - \hat\epsilon(z_\alpha, \alpha)\|^2$")


def plot_proposal(proposal, title=None, points=400):
    """A fitted log-SNR importance density q against the logistic it was mixed with, with the
    mass it moved (proposals.FittedProposal.moved)."""
    a = t.linspace(*proposal.range, points, dtype=t.float64)
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.plot(a, 1 / proposals.LogisticProposal.weight(proposal, a), "--", label="logistic")
    ax.plot(a, proposal.density(a), label=f"fitted (mix {proposal.mix:g})")
    ax.set_title((title + "\n" if title else "") +
                 f"log-SNR proposal: {100 * proposal.moved():.0f}% of the mass moved", fontsize=10)
    return _over_logsnr(fig, ax, r"$q(\alpha)$")


def _over_logsnr(fig, ax, ylabel):
    """Finishes a figure of curves over log SNR (non-negative values)."""
    ax.set_xlabel(r"log SNR $\alpha$")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    return fig


def _data_limits(data, margin=0.15):
    """A square-ish window around 2-D data: its bounding box grown by `margin` of its size."""
    data = np.asarray(data, dtype=float)
    lo, hi = data.min(0), data.max(0)
    pad = margin * (hi - lo).max()
    return lo - pad, hi + pad


def density_grid(data, size=50, margin=0.15):
    """The (size, size) evaluation grid over the data window: xs, ys (1-D) and the flattened
    points (size**2, 2) in row-major order (y rows, x columns), as numpy arrays."""
    lo, hi = _data_limits(data, margin)
    xs, ys = np.linspace(lo[0], hi[0], size), np.linspace(lo[1], hi[1], size)
    gx, gy = np.meshgrid(xs, ys)
    return xs, ys, np.stack([gx.ravel(), gy.ravel()], 1)


def grid_nll(model, points, target=CONTOUR_STDERR, depth=CONTOUR_DEPTH, npoints=64,
             max_npoints=8192, seed=None):
    """-log p on grid points with the batched pointwise estimator, refined until every cell the
    contour plot shows (within `depth` nats of the peak) has a standard error <= target.

    A first pass gives every cell `npoints` evaluations, enough to tell the cells the plot shows
    from those it floors (far from the data, where estimates are large and noisy). Each cell that
    may be shown is then estimated afresh, so each estimate stays unbiased, with 16 independent
    replicates (a standard error with 15 degrees of freedom, reliable enough to stop on) and as
    many evaluations as its standard error asks for: it falls about as 1/n for these
    quasi-Monte Carlo points, so n * (stderr / target)^1.2, at least 256, rounded up to a power
    of 2 (at most max_npoints); cells with the same n share one batched call. Cells still above
    the target are refined again.
    Every pass draws its points from a seed of its own (utils.derive_seed), keyed by cell.
    Returns (nll, stderr, shown), `shown` marking the cells within `depth` of the peak.
    """
    seed, passes = utils.fresh_seed(seed), 0
    nll, stderr = model.nll_points(points, npoints, replicates=4, chunk_size=GRID_CHUNK,
                                   seed=utils.derive_seed(seed, passes))
    used = t.full_like(nll, npoints)
    first = True
    while True:
        maybe_shown = nll - 3 * stderr <= nll.min() + depth
        redo = maybe_shown & (used < max_npoints) & (first | (stderr > target))
        redo = redo.nonzero().squeeze(1)
        if len(redo) == 0:
            break
        wanted = used[redo] * (stderr[redo] / target).clamp_min(1).pow(1.2) * 1.3
        wanted = t.maximum(wanted, 2 * used[redo]).clamp(256, max_npoints)
        levels = 2 ** wanted.log2().ceil()
        for n in levels.unique().tolist():
            idx = redo[levels == n]
            passes += 1
            nll[idx], stderr[idx] = model.nll_points(
                points[idx], int(n), replicates=16, index=idx, chunk_size=GRID_CHUNK,
                seed=utils.derive_seed(seed, passes))
            used[idx] = n
        first = False
    return nll, stderr, nll <= nll.min() + depth


def plot_density(xs, ys, nll, data=None, title=None, depth=CONTOUR_DEPTH):
    """Filled contours of log p(x) = -nll on a grid (nll of shape (len(ys), len(xs)) or flat; or
    a dict {panel title: nll} of several side by side on one colour scale), floored `depth` nats
    below the maximum so that the shape, not the far tails, sets the colours (white = low
    density). Optionally a thin scatter of the data on top."""
    from matplotlib.ticker import MaxNLocator

    panels = nll if isinstance(nll, dict) else {None: nll}
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    logp = {k: -np.asarray(v, dtype=float).reshape(len(ys), len(xs)) for k, v in panels.items()}
    top = max(np.nanmax(v) for v in logp.values())
    levels = MaxNLocator(nbins=16).tick_values(top - depth, top)
    fig, axes = _subplots(1, len(logp), figsize=(0.6 + 4.8 * len(logp), 4.4), squeeze=False,
                          sharey=True)
    for ax, (name, v) in zip(axes[0], logp.items()):
        cs = ax.contourf(xs, ys, np.clip(v, levels[0], levels[-1]), levels=levels, cmap="Blues")
        if data is not None:
            data = np.asarray(data, dtype=float)
            ax.scatter(data[:, 0], data[:, 1], s=0.3, c="tab:red", alpha=0.3, lw=0, label="data")
            ax.legend(loc="upper right", fontsize=8, markerscale=10)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
        if name:
            ax.set_title(name, fontsize=10)
    axes[0, 0].set_ylabel("$x_2$")
    bar = fig.colorbar(cs, ax=list(axes[0]), ticks=MaxNLocator(nbins=8).tick_values(levels[0],
                                                                                      levels[-1]))
    bar.set_label(r"model $\log p(x)$ (nats)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_information(xs, ys, panels, title=None, floor=-4.):
    """Pointwise mutual information i(x; y) = log p(x | y) - log p(x) on a grid, one panel per
    {title: values (len(ys) * len(xs),)} in rows of equal length (a row per source, a column per
    label), on one diverging colour scale: red where the label makes x likelier, blue where it
    makes x less likely (floored at `floor` nats: far from a class the value only falls)."""
    rows = {}
    for name, values in panels.items():
        rows.setdefault(name.split(":")[0], []).append((name, values))
    top = max(float(np.nanmax(np.asarray(v, dtype=float))) for v in panels.values())
    vmax = max(top, -floor, 1e-3)
    fig, axes = _subplots(len(rows), max(len(r) for r in rows.values()), squeeze=False,
                          figsize=(0.8 + 3.6 * max(len(r) for r in rows.values()), 3.4 * len(rows)),
                          sharex=True, sharey=True, layout="constrained")
    for axs, row in zip(axes, rows.values()):
        for ax, (name, values) in zip(axs, row):
            grid = np.clip(np.asarray(values, dtype=float).reshape(len(ys), len(xs)), -vmax, vmax)
            cs = ax.pcolormesh(xs, ys, grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="auto")
            ax.set_title(name, fontsize=9)
            ax.set_aspect("equal")
    fig.colorbar(cs, ax=axes, label=r"$i(x; y)$ (nats)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_density_gap(xs, ys, nll_model, nll_exact, title=None, depth=CONTOUR_DEPTH, gap_range=None):
    """Three panels on a grid (nll_* of shape (len(ys), len(xs)) or flat, in nats): the exact log
    density, the model's on the same colour scale (both floored `depth` nats below the exact
    peak), and the pointwise gap -log p_model(x) - (-log p(x)) with a diverging colour map (red:
    the model puts too little density there, blue: too much), symmetric about 0 over +-gap_range
    (default: the 95th percentile of |gap| where it is shown, at most 2 nats). The gap is shown
    where either density is within `depth` of the exact peak (the dashed line: the exact
    density's floor); cells where the exact density is 0 (-log p = +inf) are masked dark grey,
    cells where both are below the floor light grey (their gap is large and says little)."""
    from matplotlib.ticker import MaxNLocator

    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    shape = (len(ys), len(xs))
    exact = -np.asarray(nll_exact, dtype=float).reshape(shape)   # log p, -inf outside the support
    model = -np.asarray(nll_model, dtype=float).reshape(shape)
    top = np.max(np.where(np.isfinite(exact), exact, -np.inf))   # a singular peak (+inf) left out
    levels = MaxNLocator(nbins=16).tick_values(top - depth, top)
    support = exact > -np.inf
    shown = support & np.isfinite(model) & (np.maximum(exact, model) >= top - depth)
    gap = np.ma.masked_where(~shown, exact - model)
    if gap_range is None:
        gap_range = (min(2.0, float(np.percentile(np.abs((exact - model)[shown]), 95)))
                     if shown.any() else 1.0)
    gap_range = max(gap_range, 1e-3)
    fig, axes = _subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True, layout="constrained")
    for ax, logp, name in zip(axes, (exact, model), ("exact", "model")):
        cs = ax.contourf(xs, ys, np.clip(np.nan_to_num(logp, posinf=levels[-1]), levels[0],
                                         levels[-1]), levels=levels, cmap="Blues")
        ax.set_title(f"{name} log density", fontsize=10)
    bar = fig.colorbar(cs, ax=axes[:2], ticks=MaxNLocator(nbins=8).tick_values(levels[0], levels[-1]))
    bar.set_label(r"$\log p(x)$ (nats)")
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=(0, 0, 0, 0))
    axes[2].set_facecolor("0.9")
    axes[2].pcolormesh(xs, ys, np.ma.masked_where(support, np.ones(shape)), cmap="Greys",
                       vmin=0, vmax=1.7, shading="nearest")
    mesh = axes[2].pcolormesh(xs, ys, gap, cmap=cmap, vmin=-gap_range, vmax=gap_range,
                              shading="nearest")
    axes[2].contour(xs, ys, np.where(support, exact, top - 2 * depth), levels=[top - depth],
                    colors="k", linewidths=0.6, linestyles="--")
    bar = fig.colorbar(mesh, ax=axes[2], extend="both")
    bar.set_label(r"$-\log p_{model}(x) + \log p(x)$ (nats)")
    axes[2].set_title("pointwise gap\ndark grey: exact density 0, light: both below the floor",
                      fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_samples(data, samples, title=None):
    """Model samples beside the data, on the same axes limits."""
    data, samples = np.asarray(data, dtype=float), np.asarray(samples, dtype=float)
    lo, hi = _data_limits(data, 0.1)
    fig, axes = _subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, name in zip(axes, (data, samples), ("data", "model samples")):
        ax.scatter(points[:, 0], points[:, 1], s=1, lw=0, alpha=0.6)
        ax.set_title(f"{name} ({len(points)})", fontsize=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_val_history(runs, references=None, title=None, ylim=None,
                     ylabel=r"validation $E[-\log p(x)]$ (nats)"):
    """Validation E[-log p] (nats) against epoch for one or more runs, with standard errors as
    error bars, and horizontal lines at known reference values.

    runs: {label: (epochs, nll, stderr or None)}; references: {label: value}; ylim: (low, high)
    to zoom in on the end of training (earlier values off the axis are marked by arrows).
    """
    fig, ax = _subplots(figsize=(6, 4))
    for label, (epochs, nll, stderr) in runs.items():
        ax.errorbar(np.asarray(epochs, dtype=float), np.asarray(nll, dtype=float),
                    yerr=None if stderr is None else np.asarray(stderr, dtype=float),
                    marker="o", ms=3, capsize=2, label=label)
    styles = iter(["--", ":", "-."] * 4)
    for label, value in (references or {}).items():
        ax.axhline(value, color="k", ls=next(styles), lw=1, label=f"{label} ({value:.4f})")
    if ylim is not None:
        ax.set_ylim(*ylim)
        for label, (epochs, nll, _) in runs.items():
            off = [e for e, v in zip(epochs, nll) if v > ylim[1]]
            if off:
                ax.plot(off, [ylim[1]] * len(off), "^", color="0.4", ms=5, clip_on=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path):
    """Writes a figure as PNG, whole or not at all (cli.write_file); returns the image, (H, W, 3)
    uint8, for TensorBoard: the figure is drawn once."""
    import io

    from PIL import Image
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    cli.write_file(str(path), png.getvalue())
    return np.asarray(Image.open(png).convert("RGB"))


def image_grid(x):
    """Images (n, C, H, W) in [-1, 1] as one grid image in [0, 1], tiny ones enlarged."""
    from torchvision.utils import make_grid
    grid = make_grid(((x + 1) / 2).clamp(0, 1), nrow=math.ceil(math.sqrt(len(x))), padding=1)
    zoom = max(1, 128 // grid.shape[-1])
    return grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2).cpu()


def plot_attribution(images, maps, labels, title=None):
    """Images (n, C, H, W) in [-1, 1] above where their label's information lives: the
    per-pixel part of i(x; y) (maps (n, C, H, W), summed over channels), on one diverging scale."""
    n = len(images)
    fig, axes = _subplots(2, n, figsize=(1.6 * n + 1, 3.6), squeeze=False, layout="constrained")
    heat = np.asarray(maps, dtype=float).sum(1)
    vmax = max(float(np.abs(heat).max()), 1e-6)
    for j in range(n):
        image = (np.asarray(images[j], dtype=float).transpose(1, 2, 0) + 1) / 2
        axes[0, j].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image.clip(0, 1),
                          cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"y = {int(labels[j])}", fontsize=9)
        cs = axes[1, j].imshow(heat[j], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(cs, ax=axes[1, :].tolist(), label=r"$i(x; y)$ per pixel (nats)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
