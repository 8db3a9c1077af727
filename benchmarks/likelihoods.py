"""The information-theoretic -log p(x) (DiffusionModel.nll_points) beside the probability-flow ODE's
(DiffusionModel.nll_ode), on exact denoisers and on trained models.

(a) Exact denoisers (tests/analytic.py: the 2-D mixture and the ring, float64): the same test
    points scored by nll_points at 64 ... 4096 denoiser evaluations per point and by nll_ode with
    the exact trace and with Hutchinson's (one Rademacher probe) at rtol = atol = 1e-3 and 1e-5;
    rms and mean error against the exact -log p, mean function evaluations (NFE) per point (an
    ODE evaluation is a forward pass plus its divergence: one vector-Jacobian product per
    dimension for the exact trace, one per probe for Hutchinson's) and wall time per run.
    For the optimal denoiser both estimate the same number, the exact -log p (up to end terms).
(b) Trained 2-D models (moons, dino: train_2d.py's default runs): on validation points, the IT
    estimate (nll_points at 1024), the ODE's density (exact trace, default tolerances) and the
    exact -log p of the data distribution. For a trained denoiser these are different densities,
    and both gaps to the exact -log p include the model's own error.
(c) The digits U-Net (train_cifar10.py --dataset digits, d = 64): spread over repeats (seeds) per
    image of nll_points and of nll_ode with Hutchinson's trace (rtol = atol = 1e-3 and
    --digit_tol, default 1e-5; nll_points at about the latter's wall time; and once with the
    exact trace at 1e-3), the
    time each needs for an integration error of 0.01 bits/dim per image (time * (std / target)^2,
    target = 0.01 * 64 * ln 2 nats: repeats averaged), and the mean difference between the two,
    which for a trained model is no error of either: the ODE's density is another density than
    the one the denoiser's errors bound (docs/maths.md), equal only for the optimal denoiser.

Checkpoints: --moons/--dino/--digits CKPT reuse existing ones; otherwise the scripts are run first
(train_2d.py about 1 minute each, train_cifar10.py --dataset digits about 5 minutes on 2 cores).

Run from the repository root:
    python benchmarks/likelihoods.py                       # trains the three models first
    python benchmarks/likelihoods.py --moons M.ckpt --dino D.ckpt --digits G.ckpt
    python benchmarks/likelihoods.py --skip_trained        # (a) alone, under a minute
    python benchmarks/likelihoods.py --points 4 --repeats 2 --val_points 16 --images 2 \
        --digit_repeats 2 --digit_tol 1e-3 --digit_exact_tol 1e-2 --moons M --dino D --digits G
                                                           # a quick check that it runs
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import torch as t

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import datamodules  # noqa: E402
import experiment  # noqa: E402
from diffusionmodel import DiffusionModel  # noqa: E402
from tests.analytic import mixture_2d, ring_2d  # noqa: E402

TOLS = (1e-3, 1e-5)


def gen(seed):
    return t.Generator().manual_seed(seed)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def train(script, dataset, folder, extra=()):
    """Runs a training script as a subprocess; the path of its last checkpoint."""
    command = [sys.executable, os.path.join(REPO, script), "--dataset", dataset, "--log_dir",
               folder, *extra]
    print(f"training: {' '.join(command[1:])} ...", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=REPO)
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return os.path.join(folder, f"{dataset}-base", "checkpoints", "last.ckpt")


# ---------------------------------------------------------------------------- (a) exact denoisers
def exact_denoisers(label, mix, points, repeats, npoints_list):
    x = mix.sample(points, generator=gen(0))
    truth = mix.nll(x)
    dm = DiffusionModel(mix, x_shape=mix.x_shape, logsnr_loc=0., logsnr_scale=3., clip=4.).double()
    dm.fit_reference(mix.sample(20000, generator=gen(1)))
    a_lo, a_hi = dm.proposal.range
    print(f"\n== (a) {label}: {points} points, float64, log SNR range [{a_lo:g}, {a_hi:g}], "
          f"IT and Hutchinson rows x {repeats} seeds ==")
    print(f"{'estimator':<40} {'rms err':>8} {'mean err +- se':>17} {'NFE/pt':>8} {'max':>5} "
          f"{'wall s':>7}")

    def row(name, runs, deterministic=False):
        errs = t.stack([nll - truth for nll, _, _ in runs])  # (repeats, points)
        nfe = t.stack([n.double() for _, n, _ in runs])
        wall = sum(w for _, _, w in runs) / len(runs)
        se = "" if deterministic else f"+- {errs.std() / math.sqrt(errs.numel()):.4f}"
        print(f"{name:<40} {errs.pow(2).mean().sqrt():8.4f} {errs.mean():+8.4f} {se:<9}"
              f"{nfe.mean():8.1f} {nfe.max():5.0f} {wall:7.3f}", flush=True)

    for n in npoints_list:
        runs = []
        for r in range(repeats):
            (nll, _), wall = timed(dm.nll_points, x, n, replicates=4, seed=1000 + r)
            runs.append((nll, t.full((points,), n), wall))
        row(f"IT nll_points, {n} evaluations", runs)
    for tol in TOLS:
        (nll, info), wall = timed(dm.nll_ode, x, trace="exact", rtol=tol, atol=tol)
        row(f"ODE exact trace, rtol=atol={tol:g}", [(nll, info["nfe"], wall)], deterministic=True)
        runs = []
        for r in range(repeats):
            (nll, info), wall = timed(dm.nll_ode, x, trace="hutchinson", rtol=tol, atol=tol,
                                      seed=1000 + r)
            runs.append((nll, info["nfe"], wall))
        row(f"ODE Hutchinson 1 probe, rtol=atol={tol:g}", runs)


# ---------------------------------------------------------------------------- (b) trained 2-D
def trained_2d(name, path, points, npoints):
    a = experiment.load_checkpoint(path)["run_args"]
    model = experiment.load_model(path)
    data = datamodules.points(argparse.Namespace(**a))
    data.setup()
    x = data.val_data()[:points]
    exact = data.exact_nll(x).double()
    (it, se), it_wall = timed(model.nll_points, x, npoints, replicates=4, seed=0)
    (ode, info), ode_wall = timed(model.nll_ode, x)
    it, ode = it.double(), ode.double()
    gi, go = it - exact, ode - exact
    ri, ro = gi.pow(2).mean().sqrt().item(), go.pow(2).mean().sqrt().item()
    frac = ((ode - exact).abs() < (it - exact).abs()).double().mean().item()
    return dict(name=name, path=path, n=len(x), it=it.mean().item(), ode=ode.mean().item(),
                exact=exact.mean().item(), gi=gi.mean().item(), go=go.mean().item(), ri=ri, ro=ro,
                se=se.double().pow(2).mean().sqrt().item(), frac=frac, it_wall=it_wall,
                ode_wall=ode_wall, nfe=info["nfe"].double().mean().item(),
                closer="IT" if ri < ro else "ODE", range=model.proposal.range,
                dtype=str(x.dtype).replace("torch.", ""))


def print_trained_2d(rows, npoints):
    print(f"\n== (b) trained 2-D models: validation points, IT = nll_points at {npoints} "
          f"evaluations (seed 0), ODE = nll_ode exact trace, rtol=atol=1e-5; nats ==")
    print(f"{'model':<6} {'points':>6} {'mean IT':>8} {'mean ODE':>8} {'exact':>8} "
          f"{'IT-exact':>9} {'rms':>6} {'ODE-exact':>9} {'rms':>6} {'closer':>6} {'ODE closer':>10} "
          f"{'IT s':>6} {'ODE s':>6} {'ODE NFE':>7}")
    for r in rows:
        print(f"{r['name']:<6} {r['n']:6d} {r['it']:8.4f} {r['ode']:8.4f} {r['exact']:8.4f} "
              f"{r['gi']:+9.4f} {r['ri']:6.3f} {r['go']:+9.4f} {r['ro']:6.3f} {r['closer']:>6} "
              f"{100 * r['frac']:9.0f}% {r['it_wall']:6.2f} {r['ode_wall']:6.2f} {r['nfe']:7.1f}")
    print("(mean X: mean over the points; X-exact: mean gap to the exact -log p, rms: its rms over "
          "points; closer: the smaller rms gap; ODE closer: points where |ODE - exact| < "
          "|IT - exact|; IT's rms reported standard error: "
          + ", ".join(f"{r['name']} {r['se']:.3f}" for r in rows)
          + f"; models in {rows[0]['dtype']}, log-SNR ranges "
          + ", ".join(f"{r['name']} [{r['range'][0]:g}, {r['range'][1]:g}]" for r in rows)
          + "; checkpoints " + ", ".join(r["path"] for r in rows) + ")")


# ---------------------------------------------------------------------------- (c) digits U-Net
def digits(path, images, repeats, tol, threads, exact_tol):
    a = experiment.load_checkpoint(path)["run_args"]
    model = experiment.load_model(path)
    data = datamodules.images(argparse.Namespace(**a))
    data.setup()
    x = data.val_data()[:images]
    d = model.d
    target = 0.01 * d * math.log(2)  # nats per image
    print(f"\n== (c) digits U-Net ({path}): {images} dequantised validation images, d = {d}, "
          f"{repeats} repeats (seeds), torch threads {threads}, log SNR range "
          f"[{model.proposal.range[0]:g}, {model.proposal.range[1]:g}] ==", flush=True)

    def repeat(fn, seed0):
        """`repeats` runs of fn(seed) -> (nll, nfe or None): (estimates (repeats, images), mean
        wall per run, mean NFE per image)."""
        runs, walls, nfes = [], [], []
        for r in range(repeats):
            (nll, nfe), wall = timed(fn, seed0 + r)
            runs.append(nll.double())
            walls.append(wall)
            nfes.append(nfe)
        return t.stack(runs), sum(walls) / repeats, sum(nfes) / repeats

    def ode_fn(tol):
        def fn(seed):
            nll, info = model.nll_ode(x, trace="hutchinson", rtol=tol, atol=tol, seed=seed)
            return nll, info["nfe"].double().mean().item()
        return fn

    odes = {tol_: repeat(ode_fn(tol_), 2000) for tol_ in sorted({1e-3, tol}, reverse=True)}
    # nll_points at about the wall time of the ODE at `tol`: its cost per evaluation from a pilot
    _, pilot = timed(model.nll_points, x, 256, replicates=4, seed=1)
    npoints = max(64, int(round(odes[tol][1] / (pilot / 256) / 64)) * 64)
    it = repeat(lambda seed: (model.nll_points(x, npoints, replicates=4, seed=seed)[0], npoints),
                1000)

    print(f"{'estimator':<42} {'NFE/image':>9} {'s/run':>7} {'s/image':>7} {'std':>7} "
          f"{'bits/dim':>8} {'s/image for 0.01 b/d':>21}")
    rows = [(f"IT nll_points, {npoints} evaluations", it)]
    rows += [(f"ODE Hutchinson 1 probe, rtol=atol={tol_:g}", odes[tol_]) for tol_ in odes]
    need = {}
    for name, (est, wall, nfe) in rows:
        std = est.var(0).mean().sqrt().item()  # rms over images of the per-image std
        need[name] = wall / images * (std / target) ** 2
        print(f"{name:<42} {nfe:9.1f} {wall:7.2f} {wall / images:7.3f} {std:7.3f} "
              f"{std / (d * math.log(2)):8.4f} {need[name]:21.2f}", flush=True)
    exact = None
    if exact_tol > 0:  # the exact trace: d products per evaluation, no probe noise
        (exact, info), wall = timed(model.nll_ode, x, trace="exact", rtol=exact_tol, atol=exact_tol)
        exact = exact.double()
        print(f"{f'ODE exact trace, rtol=atol={exact_tol:g}':<42} "
              f"{info['nfe'].double().mean().item():9.1f} {wall:7.2f} {wall / images:7.3f} "
              f"{'-':>7} {'-':>8} {wall / images:21.2f}", flush=True)
    it_name, ode_name = rows[0][0], f"ODE Hutchinson 1 probe, rtol=atol={tol:g}"
    print(f"(std: rms over images of the spread over repeats, nats (bits/dim: per dimension); "
          f"target {target:.4f} nats = 0.01 bits/dim per image; time for it = s/image * "
          f"(std / target)^2, averaging repeats, which leaves the ODE's tolerance error in place. "
          f"At rtol=atol={tol:g} the IT estimate needs {need[ode_name] / need[it_name]:.0f}x less "
          f"time than the ODE's Hutchinson trace for that target; NFE: the IT estimate's a "
          f"forward pass, Hutchinson's a forward pass and a vector-Jacobian product, the exact "
          f"trace's a forward pass and {d} of them; the exact trace is deterministic (std -): its "
          f"time is one run's, its error the solver's alone, not measured here)")
    it_est, ode_est = it[0], odes[tol][0]
    diff = ode_est.mean(0) - it_est.mean(0)  # per image, the repeats averaged
    bpd = d * math.log(2)
    print(f"mean ODE (rtol=atol={tol:g}) - IT over the images: {diff.mean():+.3f} nats "
          f"({diff.mean() / bpd:+.4f} bits/dim) +- {diff.std() / math.sqrt(images):.3f}, per image "
          f"from {diff.min():+.2f} to {diff.max():+.2f}; mean IT {it_est.mean():.2f} nats "
          f"({it_est.mean() / bpd:.4f} bits/dim), mean ODE {ode_est.mean():.2f} nats "
          f"({ode_est.mean() / bpd:.4f} bits/dim).")
    if exact is not None:
        diff = exact - it_est.mean(0)
        print(f"mean ODE (exact trace, rtol=atol={exact_tol:g}) - IT: {diff.mean():+.3f} nats "
              f"({diff.mean() / bpd:+.4f} bits/dim) +- {diff.std() / math.sqrt(images):.3f} (over "
              f"images), per image from {diff.min():+.2f} to {diff.max():+.2f}; mean ODE "
              f"{exact.mean():.2f} nats ({exact.mean() / bpd:.4f} bits/dim).")
    print("For a trained model these are different quantities, not two estimates of one: the ODE "
          "gives the density of the model's own probability flow, the IT estimate the density "
          "whose -log p the denoiser's errors bound; the two agree only for the optimal denoiser "
          "(part (a)).")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=32, help="(a) test points per density")
    parser.add_argument("--repeats", type=int, default=4, help="(a) seeds of the random rows")
    parser.add_argument("--val_points", type=int, default=256, help="(b) validation points")
    parser.add_argument("--images", type=int, default=8, help="(c) validation digits")
    parser.add_argument("--digit_repeats", type=int, default=8, help="(c) seeds per estimator")
    parser.add_argument("--digit_tol", type=float, default=1e-5, help="(c) the ODE's rtol = atol")
    parser.add_argument("--digit_exact_tol", type=float, default=1e-3,
                        help="(c) rtol = atol of one exact-trace ODE run (64 products per "
                             "evaluation; about 5 s per image); 0: skip it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for (a) and (b) (the 2-D denoisers are too small "
                             "to gain from more)")
    parser.add_argument("--digit_threads", type=int, default=1,
                        help="torch CPU threads for (c) (on a busy 2-core machine 2 threads made "
                             "the ODE's small per-step batches several times slower)")
    parser.add_argument("--moons", metavar="CKPT", help="a moons checkpoint of train_2d.py")
    parser.add_argument("--dino", metavar="CKPT", help="a dino checkpoint of train_2d.py")
    parser.add_argument("--digits", metavar="CKPT", help="a digits checkpoint of train_cifar10.py")
    parser.add_argument("--skip_trained", action="store_true", help="(a) only")
    parser.add_argument("--skip_digits", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()

    folder = None
    needed = [] if args.skip_trained else [k for k in ("moons", "dino") if getattr(args, k) is None]
    if not (args.skip_trained or args.skip_digits) and args.digits is None:
        needed.append("digits")
    if needed:
        folder = tempfile.mkdtemp(prefix="itd-likelihoods-")
        for name in needed:
            script, extra = (("train_cifar10.py", ["--offline"]) if name == "digits"
                             else ("train_2d.py", []))
            setattr(args, name, train(script, name, folder, extra))
    bench = time.perf_counter()

    t.set_num_threads(args.threads)
    npoints_list = (64, 256, 1024, 4096)
    exact_denoisers("mixture_2d (3 Gaussians, one nearly degenerate)", mixture_2d(), args.points,
                    args.repeats, npoints_list)
    exact_denoisers("ring (8 Gaussians, radius 1.3, covariance 0.02 I)", ring_2d(), args.points,
                    args.repeats, npoints_list)
    print("(rms err, mean err: over points and seeds, against the exact -log p, nats; +- the "
          "standard error of the mean; the exact trace is deterministic, one run; NFE/pt: mean "
          "(max) function evaluations per point; wall s: per run of all points)")
    part_a = time.perf_counter() - bench

    part_b = part_c = 0.
    if not args.skip_trained:
        t0 = time.perf_counter()
        rows = [trained_2d(name, getattr(args, name), args.val_points, 1024)
                for name in ("moons", "dino")]
        print_trained_2d(rows, 1024)
        part_b = time.perf_counter() - t0
        if not args.skip_digits:
            t0 = time.perf_counter()
            t.set_num_threads(args.digit_threads)
            digits(args.digits, args.images, args.digit_repeats, args.digit_tol,
                   args.digit_threads, args.digit_exact_tol)
            part_c = time.perf_counter() - t0
    print(f"\ntimings: (a) {part_a:.0f} s, (b) {part_b:.0f} s, (c) {part_c:.0f} s; benchmark "
          f"{time.perf_counter() - bench:.0f} s"
          + (f", training {bench - start:.0f} s (checkpoints under {folder})" if folder else ""))


if __name__ == "__main__":
    main()
