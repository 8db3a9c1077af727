"""The default 2-D commands against a bare PyTorch loop of the same training steps.

    python benchmarks/train_2d.py                    # scg and moons
    python benchmarks/train_2d.py --datasets scg moons dino line circle --repeats 3

For each dataset, back to back on the same machine, as separate processes:

- the user's command, `python train_2d.py --dataset NAME` (into a temporary --log_dir), end to
  end: process start to exit, imports included;
- a bare PyTorch loop of the same training work, also end to end: `import torch`, the same
  denoisers.MLPDenoiser (the dataset's width, layers and embeddings), the same number of steps
  and batch size, one stratified truncated-logistic log SNR and one noise draw per point, the
  weighted loss 1/2 w ||eps - eps_hat||^2, torch.optim.Adam with its defaults, one thread; no
  Lightning, validation, reference, proposal fitting or figures.

It prints the wall and CPU time of both and their ratio (time targets are ratios: machines
differ by 2x and more), the final validation E[-log p] against the exact value on the same
points (the gap) and the data-matched Gaussian's, and where the run's time went (its summary's
`time_s`: start-up, training steps, validation, proposal refits, final figures and evaluation).
With --repeats N each side runs N times, alternating, and keeps its fastest run: a machine's
noise only ever slows a run down.
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TARGET_RATIO = 2.0


def bare_loop(steps, batch_size, mlp, loc, scale, clip, learning_rate, points, seed=0):
    """The training work alone, in plain PyTorch (see the module's docstring); returns the loop's
    seconds (one warm-up step before the clock starts)."""
    import torch as t

    from denoisers import MLPDenoiser
    t.set_num_threads(1)
    g = t.Generator().manual_seed(seed)
    t.manual_seed(seed)
    model = MLPDenoiser(**mlp)
    optimizer = t.optim.Adam(model.parameters(), lr=learning_rate)
    x = t.randn(points, 2, generator=g)
    lo, hi = 1 / (1 + math.exp(clip)), 1 / (1 + math.exp(-clip))
    per_epoch = max(1, points // batch_size)

    def step(i):
        if i % per_epoch == 0:
            step.order = t.randperm(points, generator=g)
        xb = x[step.order[(i % per_epoch) * batch_size:][:batch_size]]
        u = (t.arange(len(xb)) + t.rand(len(xb), generator=g)) / len(xb)
        a = loc + scale * t.logit(lo + (hi - lo) * u)
        v = (a - loc) / scale
        w = scale * math.tanh(clip / 2) * t.exp(t.nn.functional.softplus(v)
                                                + t.nn.functional.softplus(-v))
        eps = t.randn(xb.shape, generator=g)
        z = t.sigmoid(a).sqrt()[:, None] * xb + t.sigmoid(-a).sqrt()[:, None] * eps
        loss = (0.5 * w * (eps - model(z, a)).pow(2).sum(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step(0)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return time.perf_counter() - start


def timed(argv):
    """(wall seconds, CPU seconds, stdout) of a child process end to end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, proc.stdout


def settings(name):
    """The default command's training work: steps, batch size, MLP, proposal, learning rate."""
    import datasets
    d = datasets.SETS_2D[name].defaults
    train = d["num_points"] - max(1, round(d["num_points"] * d["val_fraction"]))
    return dict(steps=d["num_epochs"] * -(-train // d["batch_size"]), batch_size=d["batch_size"],
                mlp=dict(hidden_size=d.get("hidden_size", 128), hidden_layers=d.get("hidden_layers", 3),
                         embedding_size=d["embedding_size"],
                         input_embedding_scale=d["input_embedding_scale"],
                         input_embedding_period=100., zero_output=True),
                loc=d["logsnr_loc"], scale=d["logsnr_scale"], clip=4.,
                learning_rate=d["learning_rate"], points=train)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["scg", "moons"])
    p.add_argument("--keep", action="store_true", help="keep the runs (their folder is printed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side this many times, alternating, and keep each one's fastest")
    p.add_argument("--bare", metavar="JSON", help=argparse.SUPPRESS)  # the bare loop's process
    args = p.parse_args()
    if args.bare:
        print(bare_loop(**json.loads(args.bare)))
        return 0
    log_dir = tempfile.mkdtemp(prefix="itd-bench-")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("| dataset | wall | bare loop | ratio | CPU ratio | steps | val E[-log p] (nats) | exact | "
          "gap | Gaussian | start-up | steps | validation | refits | figures and summary |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    met = True
    try:
        for name in args.datasets:
            work, runs, bares = settings(name), [], []
            for k in range(args.repeats):  # alternating: the machine's drift meets both sides
                folder = os.path.join(log_dir, str(k))
                runs.append((*timed([os.path.join(REPO, "train_2d.py"), "--dataset", name,
                                     "--log_dir", folder]), folder))
                bares.append(timed([os.path.abspath(__file__), "--bare", json.dumps(work)]))
            (wall, cpu, _, folder), (bare_wall, bare_cpu, _) = min(runs), min(bares)
            with open(os.path.join(folder, f"{name}-base", "summary.json")) as f:
                s = json.load(f)
            parts = s["time_s"]
            ratio = wall / bare_wall
            met &= ratio <= TARGET_RATIO
            print(f"| {name} | {wall:.1f} s | {bare_wall:.1f} s | **{ratio:.2f}** | "
                  f"{cpu / bare_cpu:.2f} | {s['steps']} | {s['val_nll']:.4f} ± {s['val_nll_stderr']:.3f} | "
                  f"{s['val_nll_exact']:.4f} | {s['val_nll'] - s['val_nll_exact']:+.4f} | "
                  f"{s['gaussian_val_loss']:.4f} | "
                  + " | ".join(f"{parts[k]:.1f} s" for k in ("start-up", "steps", "validation",
                                                             "refits", "final"))
                  + " |", flush=True)
    finally:
        if args.keep:
            print(f"runs kept in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    print(f"target: every ratio <= {TARGET_RATIO}: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
