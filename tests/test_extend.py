"""The project extended from outside, as a researcher would: a new 2-D dataset (without a known
density) and a new evaluation row, each added as one entry from this file alone, then trained for
an epoch and evaluated through the script's command line."""
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch as t

import datasets
import estimates
import train_2d


def make_spiral(n, rng):
    """A noisy spiral: no exact density is given for it."""
    u = rng.uniform(0.5, 3 * math.pi, n)
    return np.stack([u * np.cos(u), u * np.sin(u)], 1) + 0.1 * rng.standard_normal((n, 2))


def gaussian_share(ev, entry):
    """The new row: -log q(x) of the entry's data-matched Gaussian reference, the part of the
    continuous estimate that needs no denoiser (so it costs nothing)."""
    return (lambda x, index: entry.model.reference.nll(x).double()), None


def scored_points(results, num_points=400, seed=0):
    """The points the evaluation scored, rebuilt as tests/test_evaluate.py does: the run's
    validation split (the script's default val_fraction, split seed = the run's --seed), less the
    evaluation's seeded selection part."""
    points = datasets.get_2d_dataset("spiral", n=num_points)
    _, val = datasets.split_2d(points, train_2d.DEFAULTS["spiral"]["val_fraction"], seed=seed)
    perm = t.randperm(len(val), generator=t.Generator().manual_seed(results["seed"]))
    return val[perm[results["n_selection"]:]]


def reference_nll(checkpoint, x):
    """-log q(x) of the checkpoint's saved Gaussian reference N(mean, U diag(eigvals) U^T) (an
    empty U: the identity), by scipy."""
    state = t.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    mean, eigvals, eigvecs = (state[f"reference.{k}"].double().numpy()
                              for k in ("mean", "eigvals", "eigvecs"))
    cov = eigvecs @ np.diag(eigvals) @ eigvecs.T if eigvecs.size else np.diag(eigvals)
    return -scipy.stats.multivariate_normal(mean, cov).logpdf(x.double().numpy())


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setitem(datasets.SETS_2D, "spiral", datasets.Set2D(make_spiral))
    monkeypatch.setitem(train_2d.DEFAULTS, "spiral", train_2d.DEFAULTS["scg"])
    monkeypatch.setitem(estimates.ROWS, "gaussian share", estimates.RowKind(
        "-log q(x) under the model's Gaussian reference", build=gaussian_share))


def test_a_new_dataset_and_a_new_row_from_outside(extended, tmp_path, capsys):
    common = ["--log_dir", str(tmp_path), "--num_threads", "1"]
    s = train_2d.main(["--dataset", "spiral", "--num_epochs", "1", "--num_points", "400",
                       "--grid_size", "6", "--num_samples", "20", "--sample_steps", "4",
                       "--val_npoints", "8", *common])
    assert "val_nll_exact" not in s and "exact value" not in capsys.readouterr().out
    assert math.isfinite(s["val_nll"]) and s["epochs"] == 1
    assert not (tmp_path / "spiral-base" / "figures" / "density_gap.png").exists()
    assert (tmp_path / "spiral-base" / "figures" / "density.png").exists()

    results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8", *common])
    out = capsys.readouterr().out
    rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
    assert not any(model == "exact" for model, _ in rows)
    expected = reference_nll(s["checkpoint"], scored_points(results)).mean()
    for model in ("gaussian", "spiral-base/last.ckpt", "ensemble"):
        row = rows[(model, "gaussian share")]
        assert row["meaning"] == "-log q(x) under the model's Gaussian reference"
        # every row's reference is the checkpoint's data-matched Gaussian: its -log q on the
        # scored points, from the saved mean and covariance through scipy (float32 model)
        assert row["nats"] == pytest.approx(expected, rel=1e-6)
        assert f"{model:<24} gaussian share" in out
    # the Gaussian's continuous estimate is -log q exactly (its integrand is zero)
    assert rows[("gaussian", "continuous")]["nats"] == pytest.approx(
        rows[("gaussian", "gaussian share")]["nats"], rel=1e-6)
    saved = json.load(open(results["path"]))
    assert [r["estimate"] for r in saved["rows"]].count("gaussian share") == 3
    assert "gaussian share: -log q(x) under the model's Gaussian reference" in out
