"""Every figure (matplotlib, no pyplot state): MSE curves, the proposal, 2-D densities (grid_nll),
gaps, i(x; y) maps, samples, validation NLL by epoch; image grids and per-pixel i(x; y)."""
import io
import math

import numpy as np
import torch as t
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import cli
import proposals
import utils

CONTOUR_DEPTH = 8.0     # nats of log density the contour plot shows below its peak
CONTOUR_STDERR = 0.1    # target standard error (nats) of every cell it shows
CONTOUR_ODE_TOL = 1e-4  # the ODE panel's solver tolerance where it may show a cell (docs/2d.md)


def _subplots(*grid, figsize, layout=None, **kwargs):
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kwargs)


def _curves(fig, ax, ylabel, title=None, xlabel=r"log SNR $\alpha$", **legend):
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(**legend)
    fig.tight_layout()
    return fig


def _planes(fig, axes, title=None, size=10):
    for ax in axes:
        ax.set(aspect="equal", xlabel="$x_1$")
    axes[0].set_ylabel("$x_2$")
    return _suptitle(fig, title, size)


def _suptitle(fig, title, size=10):
    if title:
        fig.suptitle(title, fontsize=size)
    return fig


def plot_mse_curve(logsnrs, mse, mmse_ref, d, title=None):
    """Model MSE against the Gaussian MMSE over log SNR, with the mse/d quartiles' suggestion."""
    logsnrs, mse, mmse_ref = (np.asarray(v, dtype=float) for v in (logsnrs, mse, mmse_ref))
    fig, ax = _subplots(figsize=(6, 4))
    ax.plot(logsnrs, mse, label="model MSE")
    ax.plot(logsnrs, mmse_ref, "--", label="Gaussian MMSE")
    ax.set_ylim(bottom=0)
    for level, a in zip((25, 50, 75), proposals.mse_quantiles(logsnrs, mse, d)):
        if np.isfinite(a):
            ax.axvline(a, color="grey", lw=0.8, ls=":")
            ax.text(a, 0.02 * d, f"{level}%", rotation=90, va="bottom", ha="right", fontsize=8)
    loc, scale = proposals.suggest_logsnr_params(logsnrs, mse, d)
    if np.isfinite(loc) and np.isfinite(scale):
        title = (title + "\n" if title else "") + (
            f"suggested logsnr_loc={loc:.2f}, logsnr_scale={scale:.2f}")
    return _curves(fig, ax, r"$E\|\epsilon - \hat\epsilon(z_\alpha, \alpha)\|^2$", title)


def plot_proposal(proposal, title=None):
    """A fitted log-SNR proposal q against its logistic, with the mass it moved."""
    a = t.linspace(*proposal.range, 400, dtype=t.float64)
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.plot(a, 1 / proposals.LogisticProposal.weight(proposal, a), "--", label="logistic")
    ax.plot(a, proposal.density(a), label=f"fitted (mix {proposal.mix:g})")
    ax.set_ylim(bottom=0)
    moved = f"log-SNR proposal: {100 * proposal.moved():.0f}% of the mass moved"
    return _curves(fig, ax, r"$q(\alpha)$", (title + "\n" if title else "") + moved)


def _data_limits(data, margin=0.15):
    data = np.asarray(data, dtype=float)
    lo, hi = data.min(0), data.max(0)
    pad = margin * (hi - lo).max()
    return lo - pad, hi + pad


def density_grid(data, size=50, margin=0.15):
    """xs, ys and the (size**2, 2) row-major points (y rows) of a grid over the data."""
    xs, ys = np.linspace(*_data_limits(data, margin), size).T
    return xs, ys, np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def grid_nll(model, points, target=CONTOUR_STDERR, npoints=32, max_npoints=8192, seed=None):
    """(nll, stderr, shown) on grid points, stderr <= target where shown (docs/2d.md)."""
    seed, passes = utils.fresh_seed(seed), 0
    nll, stderr = model.nll_points(points, npoints, replicates=4, seed=utils.derive_seed(seed, 0))
    used, first = t.full_like(nll, npoints), True
    while True:
        floor = nll.min() + CONTOUR_DEPTH
        redo = (nll - 3 * stderr <= floor) & (used < max_npoints) & (first | (stderr > target))
        if len(redo := redo.nonzero()[:, 0]) == 0:
            break
        need = ((nll[redo] - floor) / 3).clamp_min(target)  # below the floor: 3 stderr to show it
        wanted = used[redo] * (stderr[redo] / need).clamp_min(1).pow(1.2) * 1.3
        wanted = t.maximum(wanted, 2 * used[redo]).clamp(256, max_npoints)
        levels = 2 ** wanted.log2().ceil()
        for n in levels.unique().tolist():
            idx = redo[levels == n]
            passes += 1
            nll[idx], stderr[idx] = model.nll_points(points[idx], int(n), replicates=16, index=idx,
                                                     seed=utils.derive_seed(seed, passes))
            used[idx] = n
        first = False
    return nll, stderr, nll <= nll.min() + CONTOUR_DEPTH


def _log_densities(fig, axes, xs, ys, logps, top, depth, label):
    levels = MaxNLocator(nbins=16).tick_values(top - depth, top)
    for ax, logp in zip(axes, logps):
        cs = ax.contourf(xs, ys, np.clip(logp, levels[0], levels[-1]), levels=levels, cmap="Blues")
    ticks = MaxNLocator(nbins=8).tick_values(levels[0], levels[-1])
    fig.colorbar(cs, ax=list(axes), ticks=ticks).set_label(label)


def plot_density(xs, ys, nll, data=None, title=None, depth=CONTOUR_DEPTH):
    """Contours of log p = -nll (or {title: nll} side by side) to `depth` nats below the peak."""
    panels = nll if isinstance(nll, dict) else {None: nll}
    logp = [-np.asarray(v, dtype=float).reshape(len(ys), len(xs)) for v in panels.values()]
    fig, axes = _subplots(1, len(logp), figsize=(0.6 + 4.8 * len(logp), 4.4), squeeze=False,
                          sharey=True)
    _log_densities(fig, axes[0], xs, ys, logp, max(np.nanmax(v) for v in logp), depth,
                   r"model $\log p(x)$ (nats)")
    for ax, name in zip(axes[0], panels):
        if data is not None:
            data = np.asarray(data, dtype=float)
            ax.scatter(data[:, 0], data[:, 1], s=0.3, c="tab:red", alpha=0.3, lw=0, label="data")
            ax.legend(loc="upper right", fontsize=8, markerscale=10)
        if name:
            ax.set_title(name, fontsize=10)
    return _planes(fig, axes[0], title)


def plot_information(xs, ys, panels, title=None, floor=-4.):
    """i(x; y) on a grid, a panel per {"source: label": values}, a row per source, on one
    diverging scale floored at `floor` nats (far from a class the value only falls)."""
    rows = {}
    for name, values in panels.items():
        rows.setdefault(name.split(":")[0], []).append((name, values))
    top = max(float(np.nanmax(np.asarray(v, dtype=float))) for v in panels.values())
    vmax, columns = max(top, -floor, 1e-3), max(len(r) for r in rows.values())
    fig, axes = _subplots(len(rows), columns, squeeze=False, sharex=True, sharey=True,
                          figsize=(0.8 + 3.6 * columns, 3.4 * len(rows)), layout="constrained")
    for axs, row in zip(axes, rows.values()):
        for ax, (name, values) in zip(axs, row):
            grid = np.clip(np.asarray(values, dtype=float).reshape(len(ys), len(xs)), -vmax, vmax)
            cs = ax.pcolormesh(xs, ys, grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="auto")
            ax.set_title(name, fontsize=9)
            ax.set_aspect("equal")
    fig.colorbar(cs, ax=axes, label=r"$i(x; y)$ (nats)")
    return _suptitle(fig, title)


def plot_density_gap(xs, ys, nll_model, nll_exact, title=None, depth=CONTOUR_DEPTH):
    """Exact and model log density beside the gap -log p_model + log p (docs/2d.md)."""
    shape = (len(ys), len(xs))
    exact, model = (-np.asarray(v, dtype=float).reshape(shape) for v in (nll_exact, nll_model))
    top = np.max(np.where(np.isfinite(exact), exact, -np.inf))   # a singular peak (+inf) left out
    support = exact > -np.inf   # exact: log p, -inf outside the support
    shown = support & np.isfinite(model) & (np.maximum(exact, model) >= top - depth)
    gap = np.ma.masked_where(~shown, exact - model)
    gap_range = (max(min(2.0, float(np.percentile(np.abs(gap.compressed()), 95))), 1e-3)
                 if shown.any() else 1.0)   # |gap|'s 95th percentile where shown, at most 2 nats
    fig, axes = _subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True, layout="constrained")
    _log_densities(fig, axes[:2], xs, ys, [np.nan_to_num(exact), np.nan_to_num(model)], top,
                   depth, r"$\log p(x)$ (nats)")
    for ax, name in zip(axes, ("exact", "model")):
        ax.set_title(f"{name} log density", fontsize=10)
    axes[2].set_facecolor("0.9")
    axes[2].pcolormesh(xs, ys, np.ma.masked_where(support, np.ones(shape)), cmap="Greys",
                       vmin=0, vmax=1.7, shading="nearest")
    mesh = axes[2].pcolormesh(xs, ys, gap, cmap="RdBu_r", vmin=-gap_range, vmax=gap_range,
                              shading="nearest")
    axes[2].contour(xs, ys, np.where(support, exact, top - 2 * depth), levels=[top - depth],
                    colors="k", linewidths=0.6, linestyles="--")
    fig.colorbar(mesh, ax=axes[2], extend="both", label=r"$-\log p_{model}(x) + \log p(x)$ (nats)")
    axes[2].set_title("pointwise gap\ndark grey: exact density 0, light: both below the floor",
                      fontsize=9)
    return _planes(fig, axes, title, size=11)


def plot_samples(data, samples, title=None):
    """Model samples beside the data, on the same axes limits."""
    data, samples = np.asarray(data, dtype=float), np.asarray(samples, dtype=float)
    lo, hi = _data_limits(data, 0.1)
    fig, axes = _subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, name in zip(axes, (data, samples), ("data", "model samples")):
        ax.scatter(points[:, 0], points[:, 1], s=1, lw=0, alpha=0.6)
        ax.set_title(f"{name} ({len(points)})", fontsize=10)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]))
    _planes(fig, axes, title)
    fig.tight_layout()
    return fig


def plot_val_history(runs, references=None, title=None, ylim=None,
                     ylabel=r"validation $E[-\log p(x)]$ (nats)"):
    """Validation E[-log p] against epoch, runs {label: (epochs, nll, stderr or None)} with error
    bars, lines at references {label: value}; ylim (low, high) zooms in, values above it marked."""
    fig, ax = _subplots(figsize=(6, 4))
    for label, (epochs, nll, stderr) in runs.items():
        ax.errorbar(epochs, nll, yerr=stderr, marker="o", ms=3, capsize=2, label=label)
    for (label, value), ls in zip((references or {}).items(), ["--", ":", "-."] * 4):
        ax.axhline(value, color="k", ls=ls, lw=1, label=f"{label} ({value:.4f})")
    if ylim is not None:
        ax.set_ylim(*ylim)
        for label, (epochs, nll, _) in runs.items():
            if off := [e for e, v in zip(epochs, nll) if v > ylim[1]]:
                ax.plot(off, [ylim[1]] * len(off), "^", color="0.4", ms=5, clip_on=False)
    return _curves(fig, ax, ylabel, title, xlabel="epoch", fontsize=8)


def save(fig, path):
    """Writes a figure as PNG (cli.write_file); returns the image (H, W, 3) uint8, drawn once."""
    canvas, png = FigureCanvasAgg(fig), io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    cli.write_file(str(path), png.getvalue())
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])  # the PNG's pixels


def image_grid(x):
    """Images (n, C, H, W) in [-1, 1] as one grid image in [0, 1], tiny ones enlarged."""
    from torchvision.utils import make_grid
    grid = make_grid(((x + 1) / 2).clamp(0, 1), nrow=math.ceil(math.sqrt(len(x))), padding=1)
    zoom = max(1, 128 // grid.shape[-1])
    return grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2).cpu()


def plot_attribution(images, maps, labels, title=None):
    """Images (n, C, H, W) in [-1, 1] above their per-pixel i(x; y) maps, summed over channels."""
    n = len(images)
    fig, axes = _subplots(2, n, figsize=(1.6 * n + 1, 3.6), squeeze=False, layout="constrained",
                          subplot_kw=dict(xticks=[], yticks=[]))
    heat = np.asarray(maps, dtype=float).sum(1)
    vmax = max(float(np.abs(heat).max()), 1e-6)
    for j in range(n):
        image = (np.asarray(images[j], dtype=float).transpose(1, 2, 0) + 1) / 2
        axes[0, j].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image.clip(0, 1),
                          cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"y = {int(labels[j])}", fontsize=9)
        cs = axes[1, j].imshow(heat[j], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.colorbar(cs, ax=axes[1, :].tolist(), label=r"$i(x; y)$ per pixel (nats)")
    return _suptitle(fig, title)
