"""Speed and accuracy of the default 2-D runs, measured end to end.

    python benchmarks/train_2d.py                    # scg and moons, the targets below
    python benchmarks/train_2d.py --datasets scg moons dino line circle

For each dataset this runs the user's command, `python train_2d.py --dataset NAME` (into a
temporary --log_dir, removed afterwards unless --keep), as a separate process, and reports:

- wall time end to end (process start to exit, imports included) and the CPU time it used (on a
  shared machine wall time also counts waiting for the CPU; CPU time does not);
- the final validation E[-log p] with its standard error, the exact value on the same validation
  points (datasets.exact_nll_2d) and the gap (target for scg: within 0.03 nats);
- the noise of val_loss: the standard deviation of the validation estimate itself, re-running
  Lightning's validation of the final checkpoint --repeats times with other points (val_seed;
  a run validates on the same points every epoch) (target: <= 0.01 nats; the model is fixed,
  so this is the estimator's noise alone);
- the density contours' per-cell standard errors over the cells the plot shows (target: <= 0.1);
- where a training step's time goes (step_breakdown): the denoiser, the reference, the
  proposal's draws, the optimizer, the data loader and Lightning's loop.

Targets: every default command <= 50 s end to end on a quiet 2-core machine.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TARGET_SECONDS = 50
TARGET_GAP, TARGET_NOISE, TARGET_CELL = 0.03, 0.01, 0.1


def run(name, log_dir, extra):
    """Runs the default command (its output to a pipe, as in a batch job); returns (wall seconds,
    CPU seconds, summary with the log's size)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_2d.py"), "--dataset", name,
                           "--log_dir", log_dir, *extra],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run_dir = os.path.join(log_dir, f"{name}-base")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return wall, cpu, dict(json.load(f), log_bytes=len(proc.stdout) + len(proc.stderr))


def validation_noise(run_dir, repeats):
    """Standard deviation of val_loss over `repeats` validations of the final model."""
    import pytorch_lightning as pl
    import torch as t

    import datasets
    import experiment

    t.set_num_threads(1)
    path = os.path.join(run_dir, "checkpoints", "last.ckpt")
    a = experiment.load_checkpoint(path)["run_args"]
    model = experiment.load_model(path)
    data = datasets.Points2D(a["dataset"], a["num_points"], a["seed"], a["val_fraction"],
                             eval_batch_size=a["eval_batch_size"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    values = []
    for seed in range(repeats):  # validation's points are fixed by model.val_seed
        model.val_seed = seed
        values.append(trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"])
    return statistics.stdev(values), statistics.mean(values)


def step_breakdown(run_dir, repeats=200):
    """Where a training step's time goes, in ms, for the run's final model and data: the whole
    step in Lightning's loop (two epochs of Trainer.fit, no validation), and alone: the loss's
    forward and backward (DiffusionModel.nll), of which the denoiser's forward and backward, the
    reference's optimal predictor and the log-SNR proposal's draws; the optimizer step and the
    data loader. What remains of the step is Lightning's loop (hooks, logging, gradient clipping)."""
    import pytorch_lightning as pl
    import torch as t

    import datasets
    import experiment

    t.set_num_threads(1)
    path = os.path.join(run_dir, "checkpoints", "last.ckpt")
    a = experiment.load_checkpoint(path)["run_args"]
    model = experiment.load_model(path).train()
    data = datasets.Points2D(a["dataset"], a["num_points"], a["seed"], a["val_fraction"],
                             a["train_batch_size"], a["eval_batch_size"])
    data.setup()
    x, g = data.train[:a["train_batch_size"]], t.Generator().manual_seed(0)
    a_, _ = model.proposal.sample((len(x),), generator=g)
    z, _ = model.noisy_channel(x, a_, generator=g)
    optimizer = t.optim.Adam(model.parameters(), lr=1e-6, fused=True)
    loader = iter(())

    def fetch():
        nonlocal loader
        try:
            next(loader)
        except StopIteration:
            loader = iter(data.train_dataloader())

    def backward(fn):
        def run():
            model.zero_grad(set_to_none=True)
            fn().sum().backward()
        return run

    def ms(fn):
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    parts = {"loss forward + backward": ms(backward(lambda: model.nll(x, generator=g))),
             "  denoiser forward + backward": ms(backward(lambda: model.model(z, a_))),
             "  reference's predictor": ms(lambda: model.reference.eps(z, a_)),
             "  proposal's draws": ms(lambda: model.proposal.sample((len(x),), generator=g)),
             "optimizer step (fused Adam)": ms(optimizer.step),
             "data loader": ms(fetch)}

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.step = (time.perf_counter() - self.start) / trainer.num_training_batches * 1e3
    timer = Timer()
    pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               gradient_clip_val=1.0, use_distributed_sampler=False, callbacks=[timer]
               ).fit(model, datamodule=data)
    outside = timer.step - sum(v for k, v in parts.items() if not k.startswith("  "))
    return dict(parts, **{"Lightning's loop (the rest)": outside, "whole step": timer.step})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["scg", "moons"])
    p.add_argument("--repeats", type=int, default=10, help="re-validations for the noise")
    p.add_argument("--keep", action="store_true", help="keep the runs (their folder is printed)")
    p.add_argument("extra", nargs="*", help="more train_2d.py flags, after --")
    args = p.parse_args()
    log_dir = tempfile.mkdtemp(prefix="itd-bench-")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"runs in {log_dir}")
    rows = []
    try:
        for name in args.datasets:
            wall, cpu, s = run(name, log_dir, args.extra)
            noise, mean = validation_noise(os.path.join(log_dir, f"{name}-base"), args.repeats)
            line = [f"{name}: python train_2d.py --dataset {name} {' '.join(args.extra)}".rstrip(),
                    f"  wall {wall:.1f} s end to end, CPU {cpu:.1f} s; {s['steps']} steps; "
                    f"log (stdout + stderr) {s['log_bytes'] / 1024:.1f} KB",
                    f"  final val E[-log p] = {s['val_nll']:.4f} +- {s['val_nll_stderr']:.4f} nats"]
            checks = []
            checks.append((f"wall <= {TARGET_SECONDS} s", wall <= TARGET_SECONDS))
            gap = s["val_nll"] - s["val_nll_exact"]
            line.append(f"  exact on the same validation points {s['val_nll_exact']:.4f}, "
                        f"Gaussian {s['gaussian_val_loss']:.4f}: gap {gap:+.4f} nats")
            if name == "scg":
                checks.append((f"|gap| <= {TARGET_GAP}", abs(gap) <= TARGET_GAP))
            line.append(f"  val_loss noise: std {noise:.4f} nats over {args.repeats} "
                        f"re-validations of the final model (mean {mean:.4f})")
            checks.append((f"noise <= {TARGET_NOISE}", noise <= TARGET_NOISE))
            line.append(f"  contours: {s['contour_cells']} cells shown, per-cell standard error "
                        f"median {s['contour_stderr_median']:.3f}, max {s['contour_stderr_max']:.3f}")
            checks.append((f"cells <= {TARGET_CELL}", s["contour_stderr_max"] <= TARGET_CELL))
            line.append(f"  suggested --logsnr_loc {s['suggested_logsnr_loc']:.2f} "
                        f"--logsnr_scale {s['suggested_logsnr_scale']:.2f}")
            steps = step_breakdown(os.path.join(log_dir, f"{name}-base"))
            line.append("  a training step, ms: " + "; ".join(
                f"{k.strip()} {v:.2f}" for k, v in steps.items()))
            line.append("  targets: " + ", ".join(f"{c} {'met' if ok else 'MISSED'}"
                                                  for c, ok in checks))
            print("\n".join(line), flush=True)
            rows.append(all(ok for _, ok in checks))
    finally:
        if not args.keep:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
