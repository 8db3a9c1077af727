"""Regenerates every figure in Figs/ (the ones the README shows) from fresh default runs.

    python benchmarks/make_figs.py            # about 5 minutes on 2 CPU cores
    python benchmarks/make_figs.py --quick --out /tmp/figs   # a check that it runs

Runs `python train_2d.py --dataset NAME` for the five datasets, `python train_2d.py --dataset
blobs --conditional`, and scg without the Gaussian residual (--gaussian_residual false
--num_epochs 140 --val_every 5, so its validation NLL visibly converges), in a temporary folder,
and writes into Figs/ (replacing what is there, file by file, each one named on stdout):

- density_<name>.png, samples_<name>.png for dino, moons, scg, line, circle, blobs;
- mse_curve_<name>.png, the MSE curve with its 25/50/75% quantiles and suggested (loc, scale);
- density_gap_<name>.png, the exact and model log densities beside the pointwise gap;
- density_ode_<name>.png, the IT estimate's density beside the probability-flow ODE's;
- information_blobs.png, each label's pointwise mutual information, the model's and the exact;
- scg_val_nll.png, the validation NLL of both scg runs against epoch, with the exact value on the
  validation points and the entropy 1.2185.

Training runs never write to Figs/: only this script does.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RUNS = [("dino", []), ("moons", []), ("scg", []), ("line", []), ("circle", []),
        ("blobs", ["--conditional"]),
        ("scg", ["--gaussian_residual", "false", "--num_epochs", "140", "--val_every", "5",
                 "--experiment_name", "no-residual"])]
QUICK = ("--num_epochs", "1", "--val_every", "1", "--num_points", "400", "--grid_size", "4",
         "--num_samples", "50", "--sample_steps", "10")
FIGURES = ("density", "samples", "mse_curve", "density_gap", "density_ode", "information")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "Figs"), help="where the figures go")
    p.add_argument("--quick", action="store_true",
                   help="tiny runs (1 epoch, 400 points, coarse grids): checks that it works, "
                        "with --out elsewhere; the figures mean nothing")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="itd-figs-")
    summaries = {}
    try:
        for name, extra in RUNS:
            print(f"training: train_2d.py --dataset {name} {' '.join(extra)}".rstrip(), flush=True)
            proc = subprocess.run([sys.executable, os.path.join(REPO, "train_2d.py"),
                                   "--dataset", name, "--log_dir", logs, *extra,
                                   *(QUICK if args.quick else ())],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"train_2d.py --dataset {name} failed:\n{proc.stderr[-3000:]}")
            named = "--experiment_name" in extra
            experiment = extra[extra.index("--experiment_name") + 1] if named else "base"
            run_dir = os.path.join(logs, f"{name}-{experiment}")
            with open(os.path.join(run_dir, "summary.json")) as f:
                summaries[(name, experiment)] = json.load(f)
            for figure in FIGURES if experiment == "base" else ():
                made = os.path.join(run_dir, "figures", f"{figure}.png")
                if os.path.exists(made):  # information: labelled runs only
                    copy(made, os.path.join(args.out, f"{figure}_{name}.png"))
        convergence_figure(summaries[("scg", "base")], summaries[("scg", "no-residual")],
                           os.path.join(args.out, "scg_val_nll.png"))
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def copy(src, dst):
    shutil.copyfile(src, dst)
    print(f"  wrote {os.path.relpath(dst, REPO)}", flush=True)


def convergence_figure(default, no_residual, path):
    import densities
    import viz

    runs = {}
    for label, s in (("MLP + Gaussian residual (default)", default),
                     ("MLP alone (--gaussian_residual false)", no_residual)):
        epochs, nll, stderr = zip(*s["history"])
        runs[label] = (epochs, nll, stderr)
    references = {"exact, these validation points": default["val_nll_exact"],
                  "entropy": densities.SCG_ENTROPY}
    exact = default["val_nll_exact"]
    fig = viz.plot_val_history(runs, references, ylim=(exact - 0.1, exact + 0.4),
                               title="scg: validation E[-log p] (error bars: standard error; "
                                     "triangles: off the axis)")
    viz.save(fig, path)
    print(f"  wrote {os.path.relpath(path, REPO)}", flush=True)


if __name__ == "__main__":
    main()
