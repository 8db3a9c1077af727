"""--eval_only of both scripts: the results table and its JSON file, every sample's values
(--per_sample), a subset of the samples (--eval_samples), determinism across batch sizes,
ensembles of checkpoints, discrete estimates of grid data, and the errors for bad checkpoints.

The checkpoints come from tiny training runs (a few hundred points or one U-Net step), so the
numbers are not good, only checkable: where a value is compared with something, the test says
where that number comes from.
"""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch as t

import datasets
import densities
import experiment
import train_2d
import train_cifar10
import unet

TINY_2D = ["--num_points", "400", "--grid_size", "6", "--num_samples", "50", "--sample_steps", "5",
           "--val_npoints", "8", "--batch_size", "128", "--accelerator", "cpu",
           "--devices", "1", "--num_threads", "1", "--hidden_size", "32", "--hidden_layers", "2"]
TINY_DIGITS = ["--dataset", "digits", "--batch_size", "300", "--max_steps", "2", "--num_epochs", "1",
               "--unet_width", "8", "--accelerator", "cpu", "--devices", "1", "--num_workers", "0",
               "--eval_batch_size", "100", "--val_npoints", "4", "--curve_samples", "8",
               "--num_samples", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scg_runs(tmp_path_factory):
    """Two scg checkpoints trained differently (seeds and epochs)."""
    logs = str(tmp_path_factory.mktemp("exps"))
    paths = []
    for seed, epochs in ((0, 3), (1, 1)):
        s = train_2d.main(["--dataset", "scg", "--num_epochs", str(epochs), "--seed", "0",
                           "--experiment_name", f"s{seed}", "--log_dir", logs,
                           "--learning_rate", str(3e-3 / (1 + seed)), *TINY_2D])
        paths.append(s["checkpoint"])
    return paths


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """80 random 3x16x16 RGB images (uint8, N H W C) in fake.npz: 8 held out for validation."""
    path = tmp_path_factory.mktemp("images") / "fake.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8))
    return str(path)


def rows_by(results):
    return {(r["model"], r["estimate"]): r for r in results["rows"]}


def read_csv(path):
    """(header, rows) of a --per_sample file."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


@pytest.mark.slow
def test_eval_table_json_and_never_overwrite(scg_runs, capsys):
    path = scg_runs[0]
    results = train_2d.main(["--eval_only", "--ckpt", path, "--npoints", "16"])
    out = capsys.readouterr().out
    written = os.path.join(os.path.dirname(path), "eval-last.json")
    assert f"written to {written}" in out and "continuous" in out
    with open(written) as f:
        saved = json.load(f)
    # The schema a reader of the file relies on.
    assert saved["schema"] == "itd-eval/4" and saved["script"] == "train_2d.py"
    assert saved["dataset"] == "scg" and saved["x_shape"] == [2] and saved["d"] == 2
    assert saved["npoints"] == 16 and saved["grid"] is None and saved["scored"] is None
    assert saved["n_scored"] + saved["n_selection"] == 40  # 10% of the 400 points
    for row in saved["rows"]:
        assert set(row) >= {"model", "estimate", "nats", "nats_stderr", "bpd", "bpd_stderr"}
        assert math.isclose(row["bpd"], row["nats"] / (2 * math.log(2)), rel_tol=1e-12)
    rows = rows_by(saved)
    # the IT estimate and, by default for 2-D data, the probability-flow ODE's, of every model
    assert set(rows) == {("exact", "continuous")} | {
        (model, estimate) for model in ("gaussian", "scg-s0/last.ckpt", "ensemble")
        for estimate in ("continuous", "ode")}
    # The exact row is scg's closed-form density (densities.scg_nll) on the scored points: the
    # run's validation split, less the seeded selection half.
    points, _, _ = datasets.points_2d("scg", 400)
    _, val = datasets.split(400, datasets.SETS_2D["scg"].defaults["val_fraction"], seed=0)
    perm = t.randperm(len(val), generator=t.Generator().manual_seed(0))
    scored = points[val][perm[saved["n_selection"]:].numpy()]
    assert rows[("exact", "continuous")]["nats"] == pytest.approx(
        densities.scg_nll(scored).mean(), rel=1e-6)
    assert results["rows"] == saved["rows"]
    # A second evaluation goes to a new file.
    train_2d.main(["--eval_only", "--ckpt", path, "--npoints", "16"])
    assert os.path.exists(written.replace(".json", "-2.json"))
    with open(written) as f:
        assert json.load(f) == saved


@pytest.mark.slow
def test_per_sample_values_average_to_the_table(scg_runs, tmp_path, capsys):
    # --per_sample: a line per scored sample, its index in the validation data, then per model
    # and row its nats, integration stderr and bits/dim; the means of the columns are the
    # table's rows to the digits it prints
    results = train_2d.main(["--eval_only", "--ckpt", *scg_runs, "--npoints", "16", "--ode",
                             "false", "--results", str(tmp_path / "table.json"),
                             "--per_sample", str(tmp_path / "samples.csv")])
    out = capsys.readouterr().out
    assert f"every sample's values to {tmp_path / 'samples.csv'}" in out
    header, lines = read_csv(tmp_path / "samples.csv")
    assert len(lines) == results["n_scored"] == 20 and header[0] == "index"
    index = [int(line[0]) for line in lines]
    assert index == sorted(index) and len(set(index)) == 20 and max(index) < 40
    columns = {name: np.array([float(line[k]) for line in lines]) for k, name in enumerate(header)}
    models = [r for r in results["rows"] if r["model"] != "exact"]
    assert len(models) == 4 and len(header) == 1 + 3 * len(models)
    for r in models:
        name = f"{r['model']}: {r['estimate']}"
        nats, bpd = columns[f"{name} (nats)"].mean(), columns[f"{name} (bits/dim)"].mean()
        assert f"{nats:.4f}" == f"{r['nats']:.4f}" and f"{bpd:.4f}" == f"{r['bpd']:.4f}", name
        stderr = columns[f"{name} (integration stderr, nats)"]
        assert f"{math.sqrt((stderr ** 2).mean()):.4f}" == f"{r['integration_nats']:.4f}"
        line = next(v for v in out.splitlines() if v.startswith(r["model"] + " ")
                    and r["estimate"] in v)
        assert f"{r['nats']:.4f}" in line
    # the values returned (in the scored samples' order) are the file's (in index order)
    values, _ = results["per_sample"][("scg-s0/last.ckpt", "continuous")]
    assert sorted(values.tolist()) == pytest.approx(
        sorted(columns["scg-s0/last.ckpt: continuous (nats)"].tolist()), rel=1e-12)


@pytest.mark.slow
def test_eval_samples_scores_the_first_n_samples(scg_runs, tmp_path):
    common = ["--eval_only", "--ckpt", scg_runs[0], "--npoints", "16", "--ode", "false"]
    every = train_2d.main(common + ["--results", str(tmp_path / "every.json")])
    five = train_2d.main(common + ["--eval_samples", "5", "--results", str(tmp_path / "five.json"),
                                   "--per_sample", str(tmp_path / "five.csv")])
    assert (every["n_scored"], five["n_scored"]) == (20, 5)
    assert five["n_selection"] == every["n_selection"] == 20  # the selection is the same
    assert len(read_csv(tmp_path / "five.csv")[1]) == 5
    assert "on 5 scored samples" in five["header"]
    # the first five of the same scored samples, with the same draws: the same values
    for key, (values, stderr) in five["per_sample"].items():
        assert values.tolist() == pytest.approx(every["per_sample"][key][0][:5].tolist(), rel=1e-6)
        assert stderr.tolist() == pytest.approx(every["per_sample"][key][1][:5].tolist(), rel=1e-6)


@pytest.mark.slow
def test_eval_proposal_logistic_means_the_logistic(tmp_path, capsys):
    # a checkpoint whose proposal was refitted in training (--fit_proposal): with
    # --eval_proposal logistic every row uses the logistic of its range (the checkpoint's loc,
    # scale and clip; widened to the grid-resolving log SNR for discrete rows), and the table
    # says which proposal each row used; with the default every model row is fitted
    s = train_2d.main(["--dataset", "moons", "--num_epochs", "3", "--fit_proposal", "16",
                       "--log_dir", str(tmp_path), *TINY_2D])
    saved = t.load(s["checkpoint"], weights_only=False)
    assert saved["fitted_proposal"]["kind"] == "fitted"
    hp = saved["hyper_parameters"]
    for kind in ("logistic", "fitted"):
        results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "16",
                                 "--eval_proposal", kind, "--results", str(tmp_path / f"{kind}.json")])
        out = capsys.readouterr().out
        rows = [r for r in results["rows"] if r["model"] != "exact" and r["estimate"] != "ode"]
        if kind == "logistic":
            assert all(r["proposal"]["kind"] == "logistic" for r in rows)
            assert all((r["proposal"]["loc"], r["proposal"]["scale"], r["proposal"]["clip"]) ==
                       (hp["logsnr_loc"], hp["logsnr_scale"], hp["clip"]) for r in rows)
            assert "rows use one fitted" not in out
        else:
            assert [r["proposal"]["kind"] for r in rows] == ["logistic", "fitted", "fitted"]
        line = next(v for v in out.splitlines() if v.startswith("moons-base/last.ckpt"))
        assert line.split()[-1] == kind


@pytest.mark.slow
def test_eval_is_deterministic_across_batch_sizes(scg_runs, tmp_path):
    common = ["--eval_only", "--ckpt", scg_runs[0], "--npoints", "16", "--seed", "3"]
    a = train_2d.main(common + ["--eval_batch_size", "7", "--results", str(tmp_path / "a.json")])
    b = train_2d.main(common + ["--eval_batch_size", "1000", "--results", str(tmp_path / "b.json")])
    # equal up to float rounding: kernels may block differently for other batch sizes
    assert [r["nats"] for r in a["rows"]] == pytest.approx([r["nats"] for r in b["rows"]],
                                                           rel=1e-6)
    c = train_2d.main(common[:-1] + ["4", "--results", str(tmp_path / "c.json")])
    assert [r["nats"] for r in c["rows"]] != [r["nats"] for r in a["rows"]]


@pytest.mark.slow
def test_ensemble_is_no_worse_than_its_members(scg_runs, tmp_path):
    results = train_2d.main(["--eval_only", "--ckpt", *scg_runs, "--npoints", "64",
                             "--results", str(tmp_path / "e.json")])
    rows = rows_by(results)
    assert {m for m, _ in rows} == {"exact", "gaussian", "scg-s0/last.ckpt", "scg-s1/last.ckpt",
                                    "ensemble"}
    nll = {key: values for key, (values, _) in results["per_sample"].items()}
    for member in ("gaussian", "scg-s0/last.ckpt", "scg-s1/last.ckpt"):
        # All rows use the same points, so the per-sample differences are paired: the ensemble
        # may exceed a member only by the noise of the paired mean difference (the per-log-SNR
        # check is in tests/test_ensemble.py; this one is end to end).
        diff = nll[("ensemble", "continuous")] - nll[(member, "continuous")]
        assert diff.mean() <= 3 * diff.std() / math.sqrt(len(diff)), member


@pytest.mark.slow
def test_eval_errors_are_one_clear_message(scg_runs, tmp_path, capsys):
    def run(*flags):  # in-process through the scripts' entry point (tests/test_cli.py)
        with pytest.raises(SystemExit) as exit_:
            experiment.run_cli(lambda: train_2d.main(["--eval_only", *flags]))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    missing = str(tmp_path / "nope.ckpt")
    assert run("--ckpt", missing) == f"error: checkpoint {missing} not found"
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    assert run("--ckpt", str(corrupt)).startswith(f"error: cannot read checkpoint {corrupt}")
    assert "trained on scg" in run("--ckpt", scg_runs[0], "--dataset", "moons")
    assert "needs --ckpt" in run()
    foreign = tmp_path / "foreign.ckpt"
    t.save({"state_dict": {}, "run_args": {"script": "train_cifar10.py"}}, foreign)
    assert "not a checkpoint written by train_2d.py" in run("--ckpt", str(foreign))
    # a --per_sample file that cannot be written: before the evaluation, and no results file
    (tmp_path / "afile").write_text("not a folder")
    folder = os.path.dirname(scg_runs[0])  # where the results would go
    before = sorted(os.listdir(folder))
    assert run("--ckpt", scg_runs[0], "--per_sample", str(tmp_path / "afile" / "x.csv")) == (
        f"error: cannot write the results to {tmp_path / 'afile' / 'x.csv'}: "
        f"{tmp_path / 'afile'} is a file, not a folder")
    assert "--eval_samples: must be a whole number > 0" in run("--ckpt", scg_runs[0],
                                                              "--eval_samples", "0")
    assert not list(tmp_path.glob("*.json")) and sorted(os.listdir(folder)) == before


@pytest.mark.slow
def test_digits_discrete_rows(tmp_path):
    logs = str(tmp_path / "exps")
    train_cifar10.main(TINY_DIGITS + ["--log_dir", logs])
    ckpt = os.path.join(logs, "digits-base", "checkpoints", "last.ckpt")
    results = train_cifar10.main(["--eval_only", "--ckpt", ckpt, "--npoints", "8",
                                  "--eval_batch_size", "64", "--vb_steps", "8"])
    assert results["grid"] == {"delta": 0.125, "lo": -1.0, "levels": 17}  # 17 levels on [-1, 1]
    rows = rows_by(results)
    estimates = {"continuous", "discrete limit", "dequantized", "discrete, no rounding",
                 "discrete, hard rounding", "discrete, soft rounding", "variational bound"}
    for model in ("gaussian", "digits-base/last.ckpt", "ensemble"):
        assert {e for m, e in rows if m == model} == estimates
        for e in estimates:
            assert math.isfinite(rows[(model, e)]["nats"])
    # the variational bound runs over the small U-Net's own schedule: its timesteps span the
    # integration range 4 +- 4 * 2 (train_cifar10.py's digits defaults)
    assert rows[("digits-base/last.ckpt", "variational bound")]["logsnr_range"] == [-4.0, 12.0]
    # discrete limit = continuous + log2(1 / delta) bits/dim, delta = 1/8: +3 bits/dim
    for model in ("gaussian", "digits-base/last.ckpt"):
        assert rows[(model, "discrete limit")]["bpd"] == pytest.approx(
            rows[(model, "continuous")]["bpd"] + 3)
    # The data-matched Gaussian alone already beats a uniform distribution over the 17 levels
    # (log2(17) = 4.09 bits/dim) on every discrete estimate that accounts for the grid.
    # Unrounded, its error stays near d at SNRs that resolve the grid, so the direct estimate
    # without rounding is far worse.
    for e in ("discrete limit", "dequantized", "discrete, hard rounding", "discrete, soft rounding"):
        assert rows[("gaussian", e)]["bpd"] < math.log2(17)
    assert rows[("gaussian", "discrete, no rounding")]["bpd"] > math.log2(17)
    # The rounded estimates choose per log SNR among x_hat, its rounding and the Gaussian on held-out
    # data, so they cannot be much worse than the unrounded one (here they are far better).
    for model in ("gaussian", "digits-base/last.ckpt", "ensemble"):
        for mode in ("hard", "soft"):
            assert (rows[(model, f"discrete, {mode} rounding")]["nats"]
                    < rows[(model, "discrete, no rounding")]["nats"])


@pytest.mark.slow
def test_image_checkpoint_shape_mismatch(fake, tmp_path, capsys):
    logs = str(tmp_path / "exps")
    train_cifar10.main(TINY_DIGITS + ["--log_dir", logs])
    ckpt = os.path.join(logs, "digits-base", "checkpoints", "last.ckpt")
    saved = t.load(ckpt, weights_only=False)
    saved["run_args"]["dataset"], saved["run_args"]["data"] = None, fake  # 3x16x16 images
    t.save(saved, tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit):
        experiment.run_cli(lambda: train_cifar10.main(["--eval_only", "--ckpt",
                                                       str(tmp_path / "moved.ckpt")]))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "was trained on samples of shape (1, 8, 8); fake's are (3, 16, 16)" in err
    # the same for images of another shape given to score (--data)
    with pytest.raises(SystemExit):
        experiment.run_cli(lambda: train_cifar10.main(["--eval_only", "--ckpt", ckpt,
                                                       "--data", fake]))
    err = capsys.readouterr().err
    assert "was trained on samples of shape (1, 8, 8); fake's are (3, 16, 16)" in err
    assert not list(tmp_path.glob("**/eval-*.json"))


@pytest.mark.slow
def test_pretrained_unet_evaluated_as_it_is(fake, tmp_path):
    # --eval_only without --ckpt: the U-Net of --pretrained DIR (saved here with save_pretrained,
    # the same path as a hub id) with the Gaussian fitted to the training images.
    from diffusers import UNet2DModel
    folder = str(tmp_path / "tiny-unet")
    t.manual_seed(0)
    UNet2DModel.from_config(dict(unet.small_unet_config(3, 16, 8),
                                 layers_per_block=1)).save_pretrained(folder)
    logs = str(tmp_path / "exps")
    results = train_cifar10.main(["--eval_only", "--data", fake, "--pretrained", folder,
                                  "--npoints", "8", "--log_dir", logs, "--accelerator", "cpu",
                                  "--num_workers", "0"])
    assert os.path.isfile(os.path.join(logs, "eval-tiny-unet.json"))
    assert results["pretrained"] == folder and results["checkpoints"] == []
    assert results["grid"] == {"delta": 2 / 255, "lo": -1.0, "levels": 256}  # 8-bit images
    assert results["n_scored"] + results["n_selection"] == 8  # fake.npz's validation images
    rows = rows_by(results)
    assert {m for m, _ in rows} == {"gaussian", "tiny-unet", "ensemble"}
    # The ensemble chooses among everything the others are made of, rounded variants included.
    nll = {key: values for key, (values, _) in results["per_sample"].items()}
    for e in ("continuous", "discrete, hard rounding", "discrete, soft rounding"):
        for member in ("gaussian", "tiny-unet"):
            diff = nll[("ensemble", e)] - nll[(member, e)]  # paired: same points
            assert diff.mean() <= 3 * diff.std().clamp_min(1e-9) / math.sqrt(len(diff)), (e, member)
