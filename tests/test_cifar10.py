"""train_cifar10.py end to end on CPU without network: short runs on images of one's own (--data:
random 16x16 RGB images written here) and digits (with a U-Net loaded from a save_pretrained
folder), resuming, bits/dim, the image datasets, a denoiser class of one's own, and the offline
error paths."""
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch as t
from diffusers import UNet2DModel

import cli
import datamodules
import datasets
import experiment
import train_cifar10
import unet
import utils
from diffusionmodel import DiffusionModel
from proposals import LogisticProposal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY16 = dict(unet.small_unet_config(channels=3, size=16, width=8), layers_per_block=1)
FAST = ["--accelerator", "cpu", "--devices", "1", "--num_workers", "0", "--eval_batch_size", "16",
        "--val_npoints", "4", "--curve_samples", "8", "--sample_steps", "4", "--num_samples", "4"]
N_IMAGES = 80  # 8 held out for validation (val_fraction 0.1), 72 to train on


def random_images(n, shape, seed=0):
    """n uint8 images (n, H, W, C) and labels 0 .. 9, each label as often."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.permutation(np.arange(n) % 10))


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """80 random 3x16x16 images with labels as an .npz (x, y): the images of one's own that the
    removed `--dataset fake` used to make (the run is named by the file: fake-base)."""
    path = tmp_path_factory.mktemp("images") / "fake.npz"
    x, y = random_images(N_IMAGES, (16, 16, 3))
    np.savez(path, x=x, y=y)
    return str(path)


def logged(run_dir):
    """Scalars (tag -> [values]) and image tags TensorBoard holds for a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def digits(*flags):
    """The digits datamodule of these flags, set up."""
    data = datamodules.images(train_cifar10.parse_args(["--dataset", "digits", *flags]))
    data.setup()
    return data


@pytest.mark.slow
def test_fake_run_from_a_saved_unet_then_resume(fake, tmp_path, capsys):
    folder = str(tmp_path / "tiny-unet")
    t.manual_seed(0)
    UNet2DModel.from_config(TINY16).save_pretrained(folder)
    logs = str(tmp_path / "exps")
    # log SNR range 2 +- 4 * 3 = [-10, 14] reaches beyond DDPM's +9.21: the Gaussian takes over.
    # A constant learning rate: a resumed one-cycle schedule could not be made longer.
    args = ["--data", fake, "--batch_size", "24", "--logsnr_loc", "2", "--logsnr_scale", "3",
            "--lr_schedule", "constant", "--pretrained", folder, "--outside", "gaussian",
            "--log_dir", logs, *FAST]
    s = train_cifar10.main(args + ["--num_epochs", "1"])
    assert s["steps"] == 3  # 72 training images, batches of 24
    model = experiment.load_model(s["checkpoint"])  # before the resumed run rewrites last.ckpt
    run_dir = os.path.join(logs, "fake-base")
    scalars, images = logged(run_dir)
    assert {"mse_curve", "samples"} <= set(images)
    # bits/dim = nats / (d ln 2), d = 3 * 16 * 16.
    nats, bpd = scalars["val_loss"][-1], scalars["val_bpd"][-1]
    assert math.isfinite(nats) and bpd == pytest.approx(nats / (768 * math.log(2)), rel=1e-5)

    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    s = train_cifar10.main(args + ["--num_epochs", "2", "--resume", last])
    assert s["steps"] == 6 and os.listdir(logs) == ["fake-base"]  # continued in its run
    resumed = experiment.load_model(s["checkpoint"])
    assert logged(run_dir)[0]["val_loss"][-1] != nats  # a second validation was logged there
    # The reference came from the checkpoint (not refit): it equals the first run's.
    assert t.equal(resumed.reference.eigvals, model.reference.eigvals)

    # --resume takes the data from the checkpoint; other data given with it is an error
    other = str(tmp_path / "other.npy")
    np.save(other, random_images(20, (16, 16, 3))[0])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_cifar10.main(["--data", other, "--resume", last, "--log_dir", logs, *FAST])
    assert f"--data: {other} contradicts the checkpoint's --data {fake}" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_run_bf16(tmp_path, capsys):
    logs = str(tmp_path / "exps")
    s = train_cifar10.main(
        ["--dataset", "digits", "--batch_size", "300", "--num_epochs", "1", "--val_every", "1",
         "--log_dir", logs, "--precision", "bf16-mixed", "--unet_width", "8", *FAST])
    assert s["steps"] == 4  # 1497 training digits, batches of 300
    model = experiment.load_model(s["checkpoint"])
    assert model.x_shape == (1, 8, 8) and model.hparams.gaussian_residual
    scalars, images = logged(os.path.join(logs, "digits-base"))
    assert math.isfinite(scalars["val_loss"][-1]) and "mse_curve" in images
    # The baseline logged beside val_loss: -log q of the validation digits under the Gaussian.
    val = digits().val_data()  # dequantised as validation serves them (noise seeded per sample)
    assert scalars["gaussian_val_loss"][0] == pytest.approx(
        model.reference.nll(val).mean().item(), rel=1e-5)
    # The closing summary repeats the final val_loss beside that baseline.
    out = capsys.readouterr().out
    assert f"validation E[-log p(x)] = {scalars['val_loss'][-1]:.4f} +- " in out
    assert f"data-matched Gaussian: {scalars['gaussian_val_loss'][0]:.4f} nats" in out
    assert "MSE curve below the Gaussian MMSE at " in out


@pytest.mark.slow
def test_seed_fixes_the_initial_unet(tmp_path):
    # --seed seeds the U-Net's random initialisation: the same seed gives the same trained
    # weights (one step), another seed other weights
    def weights(seed, name):
        s = train_cifar10.main(
            ["--dataset", "digits", "--batch_size", "300", "--max_steps", "1", "--num_epochs", "1",
             "--seed", str(seed), "--experiment_name", name, "--log_dir", str(tmp_path),
             "--unet_width", "8", "--num_samples", "0", *FAST[:-2]])
        model = experiment.load_model(s["checkpoint"])
        return t.cat([p.detach().flatten() for p in model.model.parameters()])
    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert t.equal(first, again) and not t.equal(first, other)


def test_small_unet_starts_at_the_gaussian_predictor():
    # --pretrained none: a Gaussian residual with a zeroed output layer, and timesteps spanning
    # the integration range 4 +- 4 * 2, so the first loss is exactly the Gaussian's -log q.
    args = train_cifar10.parse_args(["--dataset", "digits"])
    logsnr_range = LogisticProposal(args.logsnr_loc, args.logsnr_scale, args.clip).range
    denoiser, _ = unet.build(args.pretrained, (1, 8, 8), logsnr_range, width=args.unet_width,
                             residual=args.gaussian_residual)
    assert denoiser.logsnr_range == pytest.approx((-4., 12.))
    model = DiffusionModel(denoiser, x_shape=(1, 8, 8), gaussian_residual=True)
    x = digits().eval_data()[0][:64]
    model.fit_reference(x)
    a = t.linspace(-4, 12, 64)
    with t.no_grad():
        assert t.equal(model(x, a), model.reference.eps(x, a))


def test_seed_result_in_bits_per_dim():
    # The original ITD code's README: about -8400 nats per CIFAR-10 image is -3.94 bits/dim.
    assert utils.nats_to_bpd(-8400, 3 * 32 * 32) == pytest.approx(-3.945, abs=1e-3)


def test_digits_dataset():
    data = digits("--dequantize", "false")
    train, val = data.train, data.val
    assert (len(train), len(val), data.x_shape) == (1497, 300, (1, 8, 8))  # sklearn: 1797 digits
    x = train.tensor()
    levels = (x + 1) * 8  # 17 grey levels 0..16 scaled to [-1, 1]: steps of 1/8
    assert t.equal(levels, levels.round()) and levels.min() == 0 and levels.max() == 16
    dequantized = digits("--dequantize", "true")
    train_d, val_d = dequantized.train, dequantized.val
    xd = train_d.tensor()
    assert ((xd - x).abs() <= 1 / 16).all()  # within each pixel's bin
    # and moved, all but the rare value whose noise is below half a float32 ulp of its level
    # (about 5e-7 of the draws at -1 or 1; training data get fresh noise at every access)
    assert (xd != x).double().mean() > 0.999
    assert t.equal(val_d[5], val_d[5]) and not t.equal(train_d[5], train_d[5])


def test_images_of_ones_own(fake, tmp_path):
    # what replaced the fake set: an .npz array (N, H, W, C) with labels, and the same images as a
    # folder of PNGs, one sub-folder per label; served in [-1, 1], split 90 / 10
    from PIL import Image
    with np.load(fake) as f:
        x, y = f["x"], f["y"]
    for label in range(10):
        os.makedirs(tmp_path / "folder" / str(label))
    for k, (image, label) in enumerate(zip(x, y)):
        Image.fromarray(image).save(tmp_path / "folder" / str(label) / f"{k:03d}.png")
    images, labels, files = datasets.read_images(str(tmp_path / "folder"))
    order = np.argsort([int(os.path.basename(f)[:3]) for f in files])  # by label, then name
    assert t.equal(t.as_tensor(images[order]), t.as_tensor(x.transpose(0, 3, 1, 2)))
    assert (labels[order] == y).all()
    for path in (fake, str(tmp_path / "folder")):
        data = datamodules.images(train_cifar10.parse_args(["--data", path, "--dequantize",
                                                           "false"]))
        data.setup()
        assert (len(data.train), len(data.val), data.x_shape) == (72, 8, (3, 16, 16))
        served = data.train.tensor()
        assert served.min() >= -1 and served.max() <= 1 and t.equal(data.train[3], data.train[3])
        assert data.grid.levels == 256 and data.name in ("fake", "folder")


def test_reachable():
    import http.server
    import threading
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    assert cli.reachable(f"http://127.0.0.1:{server.server_port}/")
    server.server_close()
    assert not cli.reachable(f"http://127.0.0.1:{server.server_port}/")  # closed
    assert not cli.reachable("https://example.invalid/")  # RFC 6761: never resolves
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.time()
        assert not cli.reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)
        assert time.time() - start < 1.5


def offline_args(tmp_path):
    return ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "exps")]


def test_offline_cifar10_and_weights_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(cli, "reachable", lambda url, timeout=3.0: False)
    with pytest.raises(cli.UserError) as err:
        train_cifar10.main(offline_args(tmp_path))
    message = str(err.value)
    # What is missing, where it was looked for, and how to provide it, for both inputs.
    for part in (os.path.join(str(tmp_path / "data"), "cifar-10-batches-py"), "--data_dir",
                 "google/ddpm-cifar10-32", str(tmp_path / "hub"), "--pretrained", "--from_scratch"):
        assert part in message
    assert os.listdir(tmp_path) == []  # no data, run or cache directory left behind


@pytest.mark.slow
def test_offline_cli_exits_fast_and_clean(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "train_cifar10.py", "--offline", *offline_args(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: cifar10 not found")
    assert proc.stderr.count("error: ") == 2  # the data, then the weights
    assert os.listdir(tmp_path) == []
    assert elapsed < 30, elapsed  # typically 3-4 s, mostly importing torch


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def interrupted(url, root, filename, md5=None):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, filename), "wb") as f:
            f.write(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", interrupted)
    with pytest.raises(ConnectionError, match="connection reset"):
        datasets.download("cifar10", str(tmp_path / "new" / "data"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine.txt").write_text("kept")
    with pytest.raises(ConnectionError):
        datasets.download("cifar10", str(tmp_path))
    assert os.listdir(tmp_path) == ["mine.txt"]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(fake, tmp_path):
    # The image path under Lightning's DDP launcher: the sample grid is drawn on rank 0 only (no
    # deadlock), and the ranks share one run directory.
    logs = str(tmp_path / "exps")
    proc = subprocess.run(
        [sys.executable, "train_cifar10.py", "--data", fake, "--batch_size", "8",
         "--unet_width", "8", "--num_epochs", "1", "--strategy", "ddp", "--log_dir", logs,
         *FAST[:2], "--devices", "2", *FAST[4:]],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(logs) == ["fake-base"]
    scalars, images = logged(os.path.join(logs, "fake-base"))
    assert "samples" in images and math.isfinite(scalars["val_loss"][-1])
    assert os.path.isfile(os.path.join(logs, "fake-base", "checkpoints", "last.ckpt"))


# --------------------------------------------------------------------------------------------
# A denoiser class of one's own on images
# --------------------------------------------------------------------------------------------
CONV = '''
import torch as t


class Conv(t.nn.Module):
    """eps_hat(z, logsnr): two 3x3 convolutions on z and a log-SNR channel."""

    def __init__(self, channels, width=8):
        super().__init__()
        self.net = t.nn.Sequential(t.nn.Conv2d(channels + 1, width, 3, padding=1), t.nn.SiLU(),
                                   t.nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z, logsnr):
        a = (logsnr.to(z.dtype) / 10)[:, None, None, None].expand(-1, 1, *z.shape[2:])
        return self.net(t.cat([z, a], 1))
'''


@pytest.mark.slow
def test_a_denoiser_class_of_ones_own_on_images(fake, tmp_path, monkeypatch):
    (tmp_path / "itd_own_images.py").write_text(CONV)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        s = train_cifar10.main(["--data", fake, "--denoiser", "itd_own_images:Conv",
                                "--denoiser_args", '{"channels": 3, "width": 4}',
                                "--batch_size", "24", "--num_epochs", "1",
                                "--log_dir", str(tmp_path / "exps"), *FAST])
        assert s["steps"] == 3 and math.isfinite(s["val_nll"])
        model = experiment.load_model(s["checkpoint"])
        assert type(model.model).__name__ == "Conv" and model.x_shape == (3, 16, 16)
        assert model.record == {"target": "itd_own_images:Conv",
                                "kwargs": {"channels": 3, "width": 4}}
        results = train_cifar10.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                                      "--vb_steps", "4", "--num_workers", "0"])
        rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
        # no schedule of its own: the variational bound runs over 1000 steps of its range
        assert math.isfinite(rows[("fake-base/last.ckpt", "variational bound")]["nats"])
        assert math.isfinite(rows[("fake-base/last.ckpt", "discrete, soft rounding")]["nats"])
    finally:
        sys.modules.pop("itd_own_images", None)
