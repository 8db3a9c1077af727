"""Figures: MSE curves (model vs Gaussian MMSE), shared by both training scripts."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import utils  # noqa: E402


def plot_mse_curve(logsnrs, mse, mmse_ref, d, title=None):
    """Noise-prediction MSE of the model against the Gaussian reference's MMSE, over log SNR,
    with the 25/50/75% crossings of mse/d marked and the (loc, scale) they suggest."""
    logsnrs, mse, mmse_ref = (np.asarray(v, dtype=float) for v in (logsnrs, mse, mmse_ref))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(logsnrs, mse, label="model MSE")
    ax.plot(logsnrs, mmse_ref, "--", label="Gaussian MMSE")
    quantiles = utils.mse_quantiles(logsnrs, mse, d)
    for level, a in zip((25, 50, 75), quantiles):
        if np.isfinite(a):
            ax.axvline(a, color="grey", lw=0.8, ls=":")
            ax.text(a, 0.02 * d, f"{level}%", rotation=90, va="bottom", ha="right", fontsize=8)
    loc, scale = utils.suggest_logsnr_params(logsnrs, mse, d)
    if np.isfinite(loc) and np.isfinite(scale):
        ax.set_title((title + "\n" if title else "") +
                     f"suggested logsnr_loc={loc:.2f}, logsnr_scale={scale:.2f}", fontsize=10)
    elif title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel(r"log SNR $\alpha$")
    ax.set_ylabel(r"$E\|\epsilon - \hat\epsilon(z_\alpha, \alpha)\|^2$")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    return fig
