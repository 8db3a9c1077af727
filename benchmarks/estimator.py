"""Pointwise -log p(x) estimators at equal cost, against the exact answer.

For 2-D Gaussian mixtures with their closed-form optimal denoiser (tests/analytic.py), every
estimator below spends the same number of denoiser evaluations per point and is repeated with
independent randomness; printed are the spread over repeats (std), the error of the mean against
the exact -log p (bias), the calibration of the reported standard error, and the wall time.

1. original-style (the original ITD code's estimator): iid logistic log SNR (loc 0, scale 3,
   clip 3), one noise draw each, N(0, I)
   reference and the integrand mse - d s(a).
2. ours, original settings: data-matched reference, control variate, shifted Sobol (u, eps) points,
   loc 0, scale 3, clip 4.
3. ours, gap rule: (loc, scale, clip) from gap_logsnr_params (below) on the denoiser's MSE curve.
4. ours, fitted proposal: DiffusionModel.fit_proposal on the `data` samples, starting from row 3's
   logistic: the mixture (1 - mix) logistic + mix bins, bin weights the pilot's rms integrand.

Then a trained U-Net (digits, train_cifar10.py; --digits CKPT, else one is trained first, about
4 minutes): -log p of dequantised validation digits at 128 evaluations per image with 1. the
original-style estimator over the run's logistic, 2. ours with the run's logistic, 4. ours with
the proposal fitted on 64 training digits; and the evaluations per image each needs for an
integration error of 0.01 bits/dim per image (std^2 falling as 1/n).

Run from the repository root: python benchmarks/estimator.py
A quick check that it runs (seconds to minutes; no measurement):
    python benchmarks/estimator.py --points 4 --repeats 2 --npoints 64 --digits CKPT \
        --digit_images 2 --digit_repeats 2
"""
import argparse
import copy
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch as t

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import estimators  # noqa: E402
from diffusionmodel import DiffusionModel  # noqa: E402
from proposals import LogisticProposal  # noqa: E402
from tests.analytic import mixture_2d, ring_2d  # noqa: E402


def gen(seed):
    return t.Generator().manual_seed(seed)


def gap_logsnr_params(logsnrs, mse, mmse_ref, tail=1e-3, min_clip=4.):
    """(logsnr_loc, logsnr_scale, clip) for the control-variate estimator, from a measured MSE curve.

    Its integrand is the gap between the model's MSE and the Gaussian reference's MMSE, so
    |mmse_ref(a) - mse(a)| is treated as a density over a: loc is its median, scale its
    interquartile range / (2 ln 3) (as for a logistic), and clip makes loc +- clip * scale cover
    its [tail, 1 - tail] quantiles, so truncating the integral there costs no visible bias.
    The grid must extend past both ends of the gap.
    """
    a = np.asarray(logsnrs, dtype=float)
    gap = np.abs(np.asarray(mmse_ref, dtype=float) - np.asarray(mse, dtype=float))
    if not gap.sum() > 0:
        raise ValueError("the MSE curve equals the Gaussian MMSE everywhere: no gap to place points on")
    cdf = np.cumsum(gap) / gap.sum()
    lo, q25, loc, q75, hi = np.interp([tail, 0.25, 0.5, 0.75, 1 - tail], cdf, a)
    scale = (q75 - q25) / (2 * math.log(3))
    return float(loc), float(scale), float(max(min_clip, (loc - lo) / scale, (hi - loc) / scale))


def seed_style(dm, x, n, generator, proposal=None):
    """d/2 log(2 pi e) + 1/2 mean_k w_k (mse_k - d s(a_k)), iid a_k, one eps each (default
    proposal: the original code's loc 0, scale 3, clip 3)."""
    proposal = proposal or LogisticProposal(0., 3., clip=3.)
    a, w = proposal.sample((len(x), n), stratified=False, generator=generator, dtype=x.dtype)
    xs, af = x.repeat_interleave(n, 0), a.flatten()
    eps = t.randn(xs.shape, generator=generator, dtype=x.dtype)
    mse = estimators.sq_error(dm, xs, af, eps).view(len(x), n)
    return 0.5 * dm.d * math.log(2 * math.pi * math.e) + 0.5 * (w * (mse - dm.d * t.sigmoid(a))).mean(1)


def run(name, estimate, truth, repeats):
    """Runs estimate(seed) -> (nll (J,), stderr (J,) or None) `repeats` times; one summary row."""
    start = time.perf_counter()
    runs = [estimate(1000 + r) for r in range(repeats)]
    wall = time.perf_counter() - start
    est = t.stack([r[0] for r in runs])
    err = est - truth
    var = err.var(0)                               # per point, over repeats
    std = var.mean().sqrt().item()                 # rms over points
    bias = err.mean().item()
    bias_se = (var.mean() / err.numel()).sqrt().item()
    row = {"name": name, "std": std, "bias": bias, "bias_se": bias_se, "wall": wall}
    if runs[0][1] is not None:
        se = t.stack([r[1] for r in runs])
        row["stderr"] = se.pow(2).mean().sqrt().item()  # rms: unbiased for the variance
    return row


def print_rows(rows):
    print(f"{'estimator':<52} {'std':>7} {'bias +- se':>18} {'orig/ours':>9} "
          f"{'stderr':>7} {'stderr/std':>10} {'wall s':>7}")
    for row in rows:
        ratio = f"{rows[0]['std'] / row['std']:9.1f}" if row is not rows[0] else f"{'-':>9}"
        calib = (f"{row['stderr']:7.4f} {row['stderr'] / row['std']:10.2f}" if "stderr" in row
                 else f"{'-':>7} {'-':>10}")
        print(f"{row['name']:<52} {row['std']:7.4f} {row['bias']:+9.4f} +- {row['bias_se']:.4f} "
              f"{ratio} {calib} {row['wall']:7.2f}")


def benchmark(label, mix, points, repeats, n, fit_n, curve_n, grid, fit_proposal_n):
    x = mix.sample(points, generator=gen(0))
    truth = mix.nll(x)
    print(f"\n== {label}: {points} test points x {repeats} repeats, {n} denoiser evaluations "
          f"per point ==")

    plain = DiffusionModel(mix, x_shape=mix.x_shape).double()
    rows = [run("1 original-style (iid, N(0,I), scale 3 clip 3)",
                lambda s: (seed_style(plain, x, n, gen(s)), None), truth, repeats)]

    data = mix.sample(fit_n, generator=gen(1))
    ours = DiffusionModel(mix, x_shape=mix.x_shape, logsnr_loc=0., logsnr_scale=3., clip=4.)
    ours = ours.double().fit_reference(data)
    rows.append(run("2 ours, original settings (loc 0, scale 3, clip 4)",
                    lambda s: ours.nll_points(x, n, replicates=4, seed=s), truth, repeats))

    start = time.perf_counter()
    mse, mmse_ref = ours.mse_curve(data[:curve_n], grid, generator=gen(2))
    loc, scale, clip = gap_logsnr_params(grid, mse, mmse_ref)
    curve_wall = time.perf_counter() - start
    gap = DiffusionModel(mix, x_shape=mix.x_shape, logsnr_loc=loc, logsnr_scale=scale, clip=clip)
    gap = gap.double().fit_reference(data)
    name = f"3 ours, gap rule (loc {loc:.2f}, scale {scale:.2f}, clip {clip:.2f})"
    rows.append(run(name, lambda s: gap.nll_points(x, n, replicates=4, seed=s),
                    truth, repeats))

    start = time.perf_counter()
    fitted = copy.deepcopy(gap).fit_proposal(data[:fit_proposal_n], seed=3)
    fit_wall = time.perf_counter() - start
    rows.append(run(f"4 ours, fitted proposal (gap rule + {len(fitted.weights)} bins, mix "
                    f"{fitted.mix:g})",
                    lambda s: gap.nll_points(x, n, replicates=4, seed=s, proposal=fitted),
                    truth, repeats))

    print_rows(rows)
    print(f"(std: rms over points of the spread over repeats; bias: mean error vs the exact -log p, "
          f"+- its standard error; stderr: rms reported standard error; the MSE curve for the gap "
          f"rule, {curve_n} samples x {len(grid)} log SNRs, took {curve_wall:.2f} s; fitting the "
          f"proposal ({fit_proposal_n} samples x {len(fitted.weights)} bins x 4 pilot points) took "
          f"{fit_wall:.2f} s)")


def digits(path, images, repeats, n, fit_n):
    """The digits U-Net rows: spread of each estimator over repeats per image, at n evaluations."""
    import datamodules
    import experiment
    if path is None:
        folder = tempfile.mkdtemp(prefix="itd-digits-")
        command = [sys.executable, os.path.join(REPO, "train_cifar10.py"), "--dataset", "digits",
                   "--log_dir", folder, "--offline"]
        print(f"\ntraining a digits U-Net ({' '.join(command[1:])}; about 4 minutes) ...",
              flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        path = os.path.join(folder, "digits-base", "checkpoints", "last.ckpt")
    a = experiment.load_checkpoint(path, "train_cifar10.py")["run_args"]
    model = experiment.load_model(path)
    data = datamodules.images(argparse.Namespace(**a))
    data.setup()
    x, pilot = data.val_data()[:images], data.reference_data()[:fit_n]  # dequantised digits
    d, proposal = model.d, model.proposal
    print(f"\n== digits U-Net ({path}): {images} dequantised validation images x {repeats} "
          f"repeats, {n} denoiser evaluations per image, d = {d}, logistic loc "
          f"{proposal.loc:g} scale {proposal.scale:g} clip {proposal.clip:g} ==")
    start = time.perf_counter()
    fitted = copy.deepcopy(model).fit_proposal(pilot, seed=3)
    fit_wall = time.perf_counter() - start
    # the truth is unknown: the mean of the most precise estimator (the bias column is relative)
    truth = t.stack([model.nll_points(x, 4096, replicates=4, seed=900 + r,
                                      proposal=fitted)[0] for r in range(2)]).mean(0)
    rows = [run("1 original-style (iid, N(0,I), the run's logistic)",
                lambda s: (seed_style(model, x, n, gen(s), proposal), None), truth, repeats),
            run("2 ours, the run's logistic",
                lambda s: model.nll_points(x, n, replicates=4, seed=s), truth, repeats),
            run(f"4 ours, fitted proposal ({fit_n} training digits)",
                lambda s: model.nll_points(x, n, replicates=4, seed=s, proposal=fitted),
                truth, repeats)]
    print_rows(rows)
    target = 0.01 * d * math.log(2)  # 0.01 bits/dim per image, in nats
    print(f"(bias against the mean of 2 x 4096-point fitted estimates; fitting took {fit_wall:.1f} s, "
          f"moving {100 * fitted.moved():.0f}% of the logistic's mass)")
    print(f"ours fitted / ours logistic: {rows[1]['std'] / rows[2]['std']:.1f}x lower std; "
          f"evaluations per image for a {target:.3f}-nat (0.01 bits/dim) integration error: "
          + ", ".join(f"{row['name'].split(' (')[0]} {n * (row['std'] / target) ** 2:,.0f}"
                      for row in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--npoints", type=int, default=1024, help="denoiser evaluations per point")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the 2-D denoisers are too small to gain from more, "
                             "and a busy machine makes extra threads much slower)")
    parser.add_argument("--digits", default=None, metavar="CKPT",
                        help="a digits checkpoint of train_cifar10.py (default: train one)")
    parser.add_argument("--digit_images", type=int, default=8, help="validation digits scored")
    parser.add_argument("--digit_repeats", type=int, default=12)
    parser.add_argument("--skip_digits", action="store_true")
    args = parser.parse_args()
    t.set_num_threads(args.threads)
    grid = t.linspace(-20, 25, 451, dtype=t.float64)
    common = dict(points=args.points, repeats=args.repeats, n=args.npoints, fit_n=20000,
                  curve_n=4000, grid=grid, fit_proposal_n=4000)
    benchmark("mixture_2d (3 Gaussians, one nearly degenerate)", mixture_2d(), **common)
    benchmark("ring (8 Gaussians, radius 1.3, covariance 0.02 I)", ring_2d(), **common)
    if not args.skip_digits:
        t.set_num_threads(max(args.threads, 2))
        digits(args.digits, args.digit_images, args.digit_repeats, n=128, fit_n=64)


if __name__ == "__main__":
    main()
