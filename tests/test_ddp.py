"""Two DDP processes on CPU (Lightning's `ddp` strategy re-launches the script, so these run in
subprocesses): train_2d.py end to end, and val_loss reduced over both processes' shards."""
import json
import math
import os
import subprocess
import sys
import textwrap

import torch as t

import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def test_train_2d_with_two_processes(tmp_path):
    logs = tmp_path / "exps"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_2d.py"), "--dataset", "scg", "--num_epochs", "2",
         "--num_points", "400", "--grid_size", "6", "--num_samples", "50", "--sample_steps", "5",
         "--val_npoints", "8", "--train_batch_size", "64", "--log_dir", str(logs), *DDP],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks wrote into one run directory, and only rank 0 reported
    assert os.listdir(logs) == ["scg-base"]
    assert proc.stdout.count("validation E[-log p]") == 1
    with open(logs / "scg-base" / "summary.json") as f:
        summary = json.load(f)
    # 360 training points, 180 per process, batches of 64 (last one dropped): 2 steps per epoch
    assert summary["steps"] == 4 and math.isfinite(summary["val_nll"])
    assert os.path.isfile(logs / "scg-base" / "checkpoints" / "last.ckpt")


# The validation of a model whose estimate is exactly -log q(x): a zero net with the Gaussian
# residual (the gap is then exactly 0, see test_estimator.py), on 100 points whose odd-indexed
# half lies far out, so each process's shard (DistributedSampler: rank r gets r, r+2, ...) has a
# very different mean from the whole set.
SCRIPT = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    import torch as t
    from diffusionmodel import DiffusionModel

    class Zero(t.nn.Module):
        def forward(self, z, logsnr):
            return t.zeros_like(z)

    x = t.randn(100, 2, generator=t.Generator().manual_seed(0))
    x[1::2] *= 3
    model = DiffusionModel(Zero(), x_shape=(2,), gaussian_residual=True, val_npoints=4)
    model.fit_reference(x)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, t.utils.data.DataLoader(x, batch_size=10), verbose=False)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        json.dump(metrics, open(sys.argv[1], "w"))
""")


def test_val_loss_is_reduced_over_processes(tmp_path):
    script, out = tmp_path / "validate.py", tmp_path / "metrics.json"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        metrics = json.load(f)
    # the same data and reference here: the expected values over all 100 points
    x = t.randn(100, 2, generator=t.Generator().manual_seed(0))
    x[1::2] *= 3
    nll = utils.GaussianReference(2).fit(x).nll(x)
    assert math.isclose(metrics["val_loss"], nll.mean().item(), rel_tol=1e-5)
    stderr = (nll.var(unbiased=False) / len(nll)).sqrt().item()
    assert math.isclose(metrics["val_loss_stderr"], stderr, rel_tol=1e-3)
    # rank 0's shard alone would be far off (0.76 nats, against a tolerance of 4e-5 above): the
    # test tells a reduced value from a local one
    assert abs(nll[0::2].mean().item() - nll.mean().item()) > 0.5
