"""The project extended from outside, as a researcher would, from this file alone: a new
denoiser class (given to --denoiser as module:Class), a new 2-D dataset with an exact density
(one entry of datasets.SETS_2D) and a new evaluation row (one entry of estimates.ROWS); trained,
evaluated through the script's command line, and the new set's density checked by the
exact-density tests."""
import json
import math

import numpy as np
import pytest
import torch as t

import datasets
import estimates
import train_2d


class Ramp(t.nn.Module):
    """A denoiser of our own: a small MLP on (z, a), its width a keyword argument."""

    def __init__(self, width=16):
        super().__init__()
        self.net = t.nn.Sequential(t.nn.Linear(3, width), t.nn.SiLU(), t.nn.Linear(width, 2))

    def forward(self, z, logsnr):
        return self.net(t.cat([z, logsnr.to(z.dtype).unsqueeze(1) / 10], 1))


def make_laplace(n, rng):
    """Independent standard Laplace coordinates."""
    return rng.laplace(size=(n, 2))


def laplace_nll(x, n=None):
    """-log p(x) = 2 log 2 + |x_1| + |x_2| in nats."""
    return 2 * math.log(2) + np.abs(np.asarray(x, dtype=np.float64)).sum(1)


def laplace_entropy(n=None):
    return 2 * (1 + math.log(2))


def gaussian_share(plan, entry):
    """The new row: -log q(x) of the entry's Gaussian reference, the part of the continuous
    estimate that needs no denoiser (so it costs nothing)."""
    return (lambda x, index, y: entry.reference.nll(x).double()), None


LAPLACE = datasets.Set2D(make_laplace, datasets.SETS_2D["scg"].defaults, laplace_nll,
                         laplace_entropy)


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setitem(datasets.SETS_2D, "laplace", LAPLACE)
    monkeypatch.setitem(estimates.ROWS, "gaussian share", estimates.RowKind(
        "-log q(x) under the model's Gaussian reference", build=gaussian_share))


@pytest.mark.slow
def test_a_new_denoiser_dataset_and_row_from_outside(extended, tmp_path, capsys):
    common = ["--log_dir", str(tmp_path), "--num_threads", "1"]
    s = train_2d.main(["--dataset", "laplace", "--num_epochs", "2", "--num_points", "400",
                       "--grid_size", "6", "--num_samples", "20", "--sample_steps", "4",
                       "--val_npoints", "8", "--denoiser", f"{__name__}:Ramp",
                       "--denoiser_args", '{"width": 8}', *common])
    out = capsys.readouterr().out
    assert math.isfinite(s["val_nll"]) and "val_nll_exact" in s and "exact E[-log p(x)]" in out
    assert (tmp_path / "laplace-base" / "figures" / "density_gap.png").exists()
    ckpt = t.load(s["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["denoiser"] == {"target": f"{__name__}:Ramp", "kwargs": {"width": 8}}

    results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8", *common])
    out = capsys.readouterr().out
    rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
    # the exact row: the new set's closed form on the scored points; the Gaussian's continuous
    # estimate is -log q exactly (its integrand is zero), as the new row says for every model
    assert ("exact", "continuous") in rows
    for model in ("gaussian", "laplace-base/last.ckpt", "ensemble"):
        row = rows[(model, "gaussian share")]
        assert row["meaning"] == "-log q(x) under the model's Gaussian reference"
        assert row["nats"] == pytest.approx(rows[("gaussian", "continuous")]["nats"], rel=1e-6)
        assert f"{model:<24} gaussian share" in out
    saved = json.load(open(results["path"]))
    assert [r["estimate"] for r in saved["rows"]].count("gaussian share") == 3
    assert "gaussian share: -log q(x) under the model's Gaussian reference" in out


def test_the_exact_density_tests_cover_the_new_set(extended, monkeypatch):
    # the checks of tests/test_exact2d.py, unedited, on the set registered above: it integrates
    # to one and gives its entropy, matches a histogram of fresh samples, its Monte Carlo entropy,
    # the served density is the raw one through the standardisation, and far away it is finite
    from tests import test_exact2d as exactness
    for check in (exactness.test_integrates_to_one_and_gives_the_entropy,
                  exactness.test_monte_carlo_entropy,
                  exactness.test_served_is_raw_plus_log_jacobian_and_vectorised,
                  exactness.test_far_away_is_finite_or_inf_never_nan):
        check("laplace")
    exactness.test_matches_a_histogram_of_fresh_samples("laplace", monkeypatch)
