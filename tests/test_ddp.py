"""Two DDP processes on CPU (Lightning's `ddp` strategy re-launches the script, so these run in
subprocesses): train_2d.py end to end, val_loss reduced over both processes' shards, evaluation
tables equal to one process's, and a datamodule that downloads once."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch as t

import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
TIMEOUT = 3600  # a safety net against a hung process only: a busy machine takes minutes
pytestmark = pytest.mark.slow  # every test here spawns processes


def test_train_2d_with_two_processes(tmp_path):
    logs = tmp_path / "exps"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_2d.py"), "--dataset", "scg", "--num_epochs", "2",
         "--num_points", "400", "--grid_size", "6", "--num_samples", "50", "--sample_steps", "5",
         "--val_npoints", "8", "--batch_size", "64", "--log_dir", str(logs), *DDP],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks wrote into one run directory, and only rank 0 reported
    assert os.listdir(logs) == ["scg-base"]
    assert proc.stdout.count("validation E[-log p(x)]") == 1
    with open(logs / "scg-base" / "summary.json") as f:
        summary = json.load(f)
    # 360 training points, 180 per process, batches of 64 (last one dropped): 2 steps per epoch
    assert summary["steps"] == 4 and math.isfinite(summary["val_nll"])
    assert os.path.isfile(logs / "scg-base" / "checkpoints" / "last.ckpt")


# The validation of a model whose estimate is exactly -log q(x): a zero net with the Gaussian
# residual (the gap is then exactly 0, see test_estimator.py), on 101 points whose odd-indexed
# half lies far out, so each process's shard (DistributedSampler: rank r gets r, r+3, ...) has a
# very different mean from the whole set. 101 is not a multiple of the 3 processes: Lightning's
# DistributedSampler pads the shards with repeats of the first samples, which must not count.
SCRIPT = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    import torch as t
    from diffusionmodel import DiffusionModel

    class Zero(t.nn.Module):
        def forward(self, z, logsnr):
            return t.zeros_like(z)

    x = t.randn(101, 2, generator=t.Generator().manual_seed(0))
    x[1::2] *= 3
    model = DiffusionModel(Zero(), x_shape=(2,), gaussian_residual=True, val_npoints=4)
    model.fit_reference(x)
    trainer = pl.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, t.utils.data.DataLoader(x, batch_size=10), verbose=False)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        json.dump(metrics, open(sys.argv[1], "w"))
    t.distributed.destroy_process_group()  # else gloo's threads can abort the exit
""")


def test_val_loss_is_reduced_over_processes(tmp_path):
    script, out = tmp_path / "validate.py", tmp_path / "metrics.json"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        metrics = json.load(f)
    # the same data and reference here: the expected values over all 101 points, each once
    x = t.randn(101, 2, generator=t.Generator().manual_seed(0))
    x[1::2] *= 3
    nll = utils.GaussianReference(2).fit(x).nll(x)
    assert metrics["val_samples"] == 101
    assert math.isclose(metrics["val_loss"], nll.mean().item(), rel_tol=1e-5)
    stderr = (nll.var() / len(nll)).sqrt().item()  # the unbiased variance
    assert math.isclose(metrics["val_loss_stderr"], stderr, rel_tol=1e-3)
    # rank 0's shard alone would be far off, and so would the padded set (the first sample
    # counted twice: 0.004 nats off, against a tolerance of 4e-5 above): the test tells a value
    # reduced over every sample once from a local or a padded one
    assert abs(nll[0::3].mean().item() - nll.mean().item()) > 0.1
    padded = t.cat([nll, nll[:1]])
    assert abs(padded.mean().item() - nll.mean().item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Evaluation across processes: the same table for 1 and 2 processes
# ---------------------------------------------------------------------------------------------
def evaluate_in(script, processes, ckpts, results, *flags):
    """Runs `script --eval_only` on the checkpoints with 1 or 2 CPU processes; the JSON results."""
    devices = ["--devices", "1"] if processes == 1 else ["--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), "--eval_only", "--ckpt",
                           *ckpts, "--accelerator", "cpu", *devices, "--results", str(results),
                           *flags], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("written to") == 1  # rank 0 alone prints and writes
    with open(results) as f:
        return json.load(f)


def assert_same_tables(one, two):
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # every row, ensembles and rounding choices included: each sample's points are named by
    # (seed, sample index), and the per-sample values are gathered in index order. What may
    # differ is float32 rounding in the denoiser, whose kernels block differently for other
    # batches (measured: relative differences of 1e-8), and through it the held-out choice of a
    # log-SNR bin where two candidates tie to that rounding (measured with --seed 0 on the image
    # checkpoint below: the ensemble rows' standard errors 1e-6 to 5e-6 apart, the other rows
    # bit for bit equal). The ODE rows' adaptive steps turn such rounding into differences up to
    # the solver's tolerance (rtol = atol = 1e-5 per step; measured: relative 8e-6).
    assert [(r["model"], r["estimate"]) for r in one["rows"]] == \
        [(r["model"], r["estimate"]) for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        rel = 1e-4 if a["estimate"] == "ode" else 1e-6
        assert a["nats"] == pytest.approx(b["nats"], rel=rel), (a, b)
        assert a["nats_stderr"] == pytest.approx(b["nats_stderr"], rel=rel), (a, b)


def test_2d_evaluation_is_the_same_on_one_and_two_processes(tmp_path):
    import train_2d
    ckpts = []
    for seed in (0, 1):  # two checkpoints, so the ensemble row is there too
        s = train_2d.main(["--dataset", "scg", "--num_epochs", "2", "--num_points", "300",
                           "--grid_size", "4", "--num_samples", "0", "--val_npoints", "8",
                           "--batch_size", "64", "--seed", "0", "--experiment_name", str(seed),
                           "--learning_rate", str(3e-3 * (1 + seed)), "--log_dir", str(tmp_path),
                           "--accelerator", "cpu", "--devices", "1", "--num_threads", "1"])
        ckpts.append(os.path.abspath(s["checkpoint"]))
    one = evaluate_in("train_2d.py", 1, ckpts, tmp_path / "one.json", "--npoints", "16",
                      "--eval_batch_size", "7")
    two = evaluate_in("train_2d.py", 2, ckpts, tmp_path / "two.json", "--npoints", "16")
    assert {r["model"] for r in one["rows"]} == {"exact", "gaussian", "scg-0/last.ckpt",
                                                 "scg-1/last.ckpt", "ensemble"}
    assert_same_tables(one, two)


def test_image_evaluation_is_the_same_on_one_and_two_processes(tmp_path):
    import numpy as np
    import train_cifar10
    # 90 random 3 x 8 x 8 images: 81 for training, 9 for validation (4 for the selection, 5
    # scored in the evaluation)
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (90, 8, 8, 3), dtype=np.uint8))
    train_cifar10.main(["--data", str(images), "--batch_size", "12", "--unet_width", "8",
                        "--num_epochs", "1", "--val_npoints", "2", "--curve_samples", "4",
                        "--num_samples", "0", "--num_workers", "0", "--accelerator", "cpu",
                        "--devices", "1", "--num_threads", "1", "--log_dir", str(tmp_path)])
    ckpt = str(tmp_path / "images-base" / "checkpoints" / "last.ckpt")
    flags = ("--npoints", "8", "--eval_batch_size", "3", "--seed", "1")  # no tie: see above
    one = evaluate_in("train_cifar10.py", 1, [ckpt], tmp_path / "one.json", *flags)
    two = evaluate_in("train_cifar10.py", 2, [ckpt], tmp_path / "two.json", *flags)
    estimates = {e for _, e in ((r["model"], r["estimate"]) for r in one["rows"])}
    assert {"continuous", "dequantized", "discrete, no rounding", "discrete, hard rounding",
            "discrete, soft rounding"} <= estimates
    assert "ensemble" in {r["model"] for r in one["rows"]}
    assert_same_tables(one, two)


# ---------------------------------------------------------------------------------------------
# Downloads happen once per node, in prepare_data
# ---------------------------------------------------------------------------------------------
DOWNLOAD_SCRIPT = textwrap.dedent("""
    import argparse, dataclasses, os, sys
    import numpy as np
    import pytorch_lightning as pl
    import torch as t
    import datamodules
    import datasets
    from diffusionmodel import DiffusionModel

    log, data_dir = sys.argv[1], sys.argv[2]

    def fake_download(name, root):  # stands in for torchvision's download: records who called it
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.makedirs(os.path.join(root, datasets.CIFAR10_FOLDER), exist_ok=True)

    def fake_files(root, seed=0):  # and for reading the files
        rng = np.random.default_rng(0)
        return [v for n in (8, 8) for v in (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                                            rng.integers(0, 10, n))]

    datasets.IMAGE_SETS["cifar10"] = dataclasses.replace(datasets.IMAGE_SETS["cifar10"],
                                                         load=fake_files)
    datasets.download = fake_download

    class Zero(t.nn.Module):
        def forward(self, z, logsnr):
            return t.zeros_like(z)

    args = argparse.Namespace(data=None, dataset="cifar10", data_dir=data_dir, seed=0,
                              batch_size=4, eval_batch_size=4, conditional=False,
                              dequantize=False, reference_size=8, num_workers=0, offline=True)
    data = datamodules.images(args)
    model = DiffusionModel(Zero(), x_shape=data.x_shape, val_npoints=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=data, verbose=False)
    t.distributed.destroy_process_group()
""")


def test_datamodule_downloads_once_for_two_processes(tmp_path):
    script, log = tmp_path / "download.py", tmp_path / "calls.txt"
    script.write_text(DOWNLOAD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(log), str(tmp_path / "data")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(log.read_text().split()) == 1  # two processes, one download
