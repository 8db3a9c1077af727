"""Conditional models: -log p(x | y), pointwise mutual information i(x; y) and classification by
log p(y | x) from one denoiser (DiffusionModel(num_classes=...)), against the closed forms of a
Gaussian mixture labelled by component (tests/analytic.py LabelledMixture: its optimal
conditional and unconditional denoisers, -log p(x | y), and the posterior p(y | x)), then through
both scripts' command lines.
"""
import math

import numpy as np
import pytest
import torch as t

import datamodules
import densities
import estimators as est
import experiment
import train_2d
import train_cifar10
from diffusionmodel import DiffusionModel
from tests.analytic import Zero, overlapping_2d
from tests.checks import assert_unbiased_and_calibrated, gen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    """80 random 3x8x8 RGB images with labels 0 .. 9 (8 each) in fake.npz (x, y): 8 held out for
    validation."""
    path = tmp_path_factory.mktemp("images") / "fake.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
             y=rng.permutation(np.arange(80) % 10))
    return str(path)


def labelled_model():
    """overlapping_2d's exact conditional denoiser as a float64 DiffusionModel (three labels),
    its reference and label prior fitted on samples, and 12 labelled points to score."""
    mix = overlapping_2d()
    dm = DiffusionModel(mix, x_shape=(2,), logsnr_loc=0., logsnr_scale=3., clip=4.,
                        num_classes=3).double()
    x, y = mix.sample_labelled(4000, generator=gen(0))
    dm.fit_reference(x).fit_label_prior(y)
    points, labels = mix.sample_labelled(12, generator=gen(1))
    return mix, dm, points, labels


def test_conditional_nll_and_mutual_information_are_unbiased_per_point():
    # 60 repeats of 12 points in one batch (copy r of point j has index 12 r + j: independent
    # points); each estimate's mean within its standard errors of the closed form, with the
    # reported standard error calibrated (tests/checks.py)
    mix, dm, x, y = labelled_model()
    reps = 60
    xs, ys, index = x.repeat(reps, 1), y.repeat(reps), t.arange(12 * reps)
    nll, se = dm.nll_points(xs, 128, seed=3, index=index, y=ys)
    assert_unbiased_and_calibrated(nll.view(reps, 12), se.view(reps, 12), mix.nll_given(x, y))
    mi, se = dm.mi_points(xs, ys, 128, seed=4, index=index)
    exact = mix.nll(x) - mix.nll_given(x, y)  # i(x; y) = log p(x | y) - log p(x)
    assert exact.std() > 0.2  # overlapping components: i(x; y) differs from point to point
    assert_unbiased_and_calibrated(mi.view(reps, 12), se.view(reps, 12), exact)
    # the per-coordinate parts sum to the integral part of i(x; y) on the same points: the rest
    # is the references' log q(x | y) - log q(x) (each label has its own data-matched Gaussian)
    parts = dm.mi_points(x, y, 128, seed=4, per_dim=True)
    references = dm.reference.nll(x) - dm.reference.nll(x, y)
    assert references.abs().max() > 0.1
    assert t.allclose(parts.sum(1) + references, dm.mi_points(x, y, 128, seed=4)[0], atol=1e-9)


def test_class_posterior_matches_bayes_on_common_points():
    # log p(y = k | x) - log p(y = 0 | x) = log p(x | k) - log p(x | 0) + log-prior terms: linear
    # in the estimates, so unbiased; 40 repeats of 12 points (independent copies by index)
    mix, dm, x, _ = labelled_model()
    reps = 40
    xs, index = x.repeat(reps, 1), t.arange(12 * reps)
    posterior = dm.class_log_posterior(xs, 128, seed=5, index=index)
    # jackknifed over the replicates: Bayes' rule on the mean estimates, normalised, shifted by
    # one bias correction of the log normaliser per sample, the same for every label
    terms = est.label_terms(dm, dm.reference, dm.proposal, xs, t.arange(3), 128, seed=5,
                            index=index)
    plain = (dm.label_log_prior - terms.mean(1)).log_softmax(1)
    shift = posterior - plain
    assert t.allclose(shift, shift[:, :1].expand(-1, 3), atol=1e-12)
    odds = (posterior - posterior[:, :1]).view(reps, 12, 3)[..., 1:]
    exact = mix.log_posterior(x)  # the component weights are the label prior here
    exact = (exact - exact[:, :1])[:, 1:]
    z = (odds.mean(0) - exact) / (odds.std(0) / math.sqrt(reps))
    assert z.abs().max() < 4.5, z
    # and the posterior itself, at 1024 points: within 0.03 of Bayes' (measured max 0.01)
    close = dm.class_log_posterior(x, 1024, seed=7).exp()
    assert (close - mix.log_posterior(x).exp()).abs().max() < 0.03
    # i(x; y) = log p(y | x) - log p(y) (Bayes' rule, the summary's second estimate) from the
    # conditional densities alone: within 0.06 of the exact value (measured 0.028: integration
    # error and the label prior's, fitted on 4000 samples; leaving out the prior errs by ~1 nat)
    _, _, _, y = labelled_model()
    by_bayes = close.log()[t.arange(12), y] - dm.label_log_prior[y]
    assert (by_bayes - (mix.nll(x) - mix.nll_given(x, y))).abs().max() < 0.06
    # a prior given explicitly replaces the training labels' frequencies
    flat = dm.class_log_posterior(x, 1024, seed=7, log_prior=t.full((3,), -math.log(3)))
    joint = -t.stack([mix.nll_given(x, t.full((12,), k)) for k in range(3)], 1)
    assert (flat.exp() - joint.softmax(1)).abs().max() < 0.03


def test_training_drops_labels_at_the_given_rate():
    seen = []

    class Recorder(t.nn.Module):
        def forward(self, z, logsnr, y=None):
            seen.append(y)
            return t.zeros_like(z)
    dm = DiffusionModel(Recorder(), x_shape=(2,), num_classes=3, label_dropout=0.25)
    x, y = t.randn(4000, 2), t.randint(0, 3, (4000,))
    dm.nll((x, y), generator=gen(6))
    dropped = (seen[0] == -1).double().mean().item()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)  # binomial, 4 std
    assert ((seen[0] == y) | (seen[0] == -1)).all()
    with pytest.raises(ValueError, match="labels must be one per sample"):
        dm.nll((x, t.full((4000,), 3)))


def test_a_label_given_to_an_unconditional_model_is_refused_by_every_estimator():
    # DiffusionModel.forward refuses labels without num_classes, so every estimator that takes
    # labels refuses them in one line, whether called as a method or as estimators.* with the
    # model as the denoiser; class_log_posterior needs a conditional model
    dm = DiffusionModel(Zero(), x_shape=(2,))
    x, y, a = t.randn(4, 2), t.tensor([0, 1, 0, 1]), t.zeros(4)
    ref, prop, message = dm.reference, dm.proposal, "labels given to an unconditional model"
    calls = {
        "forward": lambda: dm(x, a, y),
        "nll_points": lambda: dm.nll_points(x, 8, y=y),
        "mi_points": lambda: dm.mi_points(x, y, 8),
        "est.loss": lambda: est.loss(dm, ref, prop, x, y),
        "est.nll_points": lambda: est.nll_points(dm, ref, prop, x, 8, y=y),
        "est.mi_points": lambda: est.mi_points(dm, ref, prop, x, y, 8),
        "est.label_terms": lambda: est.label_terms(dm, ref, prop, x, t.tensor([0, 1]), 8),
        "est.class_log_posterior": lambda: est.class_log_posterior(dm, ref, prop, x,
                                                                   t.zeros(2), 8),
        "est.mse_gap": lambda: est.mse_gap(dm, ref, x, a, t.randn(4, 2), y),
        "class_log_posterior": lambda: dm.class_log_posterior(x, 8),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        text = str(err.value)
        assert "\n" not in text and (message in text or "needs a conditional model" in text), (
            name, text)


@pytest.mark.slow
def test_a_2d_conditional_run_reports_against_the_exact_answers(tmp_path, capsys):
    flags = ["--dataset", "blobs", "--conditional", "true", "--num_points", "1000",
             "--num_epochs", "2", "--grid_size", "6", "--num_samples", "0", "--val_npoints", "8",
             "--num_threads", "1", "--log_dir", str(tmp_path)]
    s = train_2d.main(flags)
    out = capsys.readouterr().out
    assert "validation E[-log p(x | y)]" in out and "pointwise mutual information" in out
    assert "Bayes classifier" in out
    for key in ("val_mi", "val_mi_exact", "val_mi_bayes", "val_accuracy", "val_accuracy_bayes",
                "val_nll_exact"):
        assert math.isfinite(s[key]), key
    # the exact -log p(x | y) of the validation points and their labels, from the data's
    # densities (densities.py through datasets.Exact)
    data = datamodules.points(train_2d.parse_args(flags))
    data.setup()
    given, _, _ = data.exact_labels(data.val_data(), data.val_labels)
    assert len(given) == 100 and s["val_nll_exact"] == pytest.approx(given.mean().item(), rel=1e-9)
    # H(Y) of the summary's [0, H(Y)] check: the entropy of the training labels' frequencies
    p = np.bincount(np.asarray(data.train_labels)) / len(data.train_labels)
    assert s["label_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert (tmp_path / "blobs-base" / "figures" / "information.png").is_file()
    # the evaluation table: conditional rows of the model, beside the exact ones
    results = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                             "--ode", "false"])
    rows = {(r["model"], r["estimate"]): r for r in results["rows"]}
    for estimate in ("conditional", "mutual information", "accuracy"):
        assert ("blobs-base/last.ckpt", estimate) in rows and ("exact", estimate) in rows
        assert ("gaussian", estimate) not in rows  # an unconditional model has none
    accuracy = rows[("blobs-base/last.ckpt", "accuracy")]
    assert accuracy["unit"] == "fraction" and 0 <= accuracy["value"] <= 1
    assert accuracy["nats"] is None and accuracy["evaluations"] == 8 * 4  # one pass: no label and the 3 labels
    # i(x; y) by Bayes' rule from the same pass's posteriors: log p(y | x) <= 0, so each
    # sample's value is at most -log p(y), and the row spent no evaluations of its own
    bayes = rows[("blobs-base/last.ckpt", "information, Bayes' rule")]
    assert bayes["evaluations"] == 8 * 4 and bayes["unit"] == "nats, not per dimension"
    assert bayes["nats"] <= -math.log(min(densities.BLOBS_WEIGHTS))


@pytest.mark.slow
def test_an_image_conditional_run_and_its_table(labelled_images, tmp_path, capsys):
    # a class-conditional U-Net (diffusers' class embeddings, one more for "no label") on random
    # images with random labels of one's own (--data): the plumbing end to end
    flags = ["--data", labelled_images, "--conditional", "true", "--unet_width", "8",
             "--batch_size", "24", "--num_epochs", "1", "--num_workers", "0",
             "--num_samples", "0", "--val_npoints", "4", "--curve_samples", "4",
             "--log_dir", str(tmp_path)]
    s = train_cifar10.main(flags)
    out = capsys.readouterr().out
    assert "LogisticRegression on the pixels" in out and 0 <= s["val_accuracy"] <= 1
    assert (tmp_path / "fake-base" / "information.png").is_file()
    model = experiment.load_model(s["checkpoint"])
    assert model.model.num_classes == 10 and model.hparams.num_classes == 10
    results = train_cifar10.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                                  "--vb_steps", "4", "--num_workers", "0"])
    estimates = {r["estimate"] for r in results["rows"] if r["model"] == "fake-base/last.ckpt"}
    assert {"conditional", "mutual information", "accuracy", "continuous"} <= estimates


def test_the_summary_flags_a_mean_information_outside_zero_to_the_label_entropy():
    # I(X; Y) lies in [0, H(Y)]; the mnist numbers of docs/conditional.md (Bayes' rule -28.7 +- 7.7
    # against H(Y) = log 10) are flagged, means within two standard errors of the range are not
    s = dict(dataset="mnist", epochs=3, steps=210, wall_time_s=1.0, val_nll=-2232.7,
             val_nll_stderr=20.3, d=784, gaussian_val_loss=-568.7, gaussian_val_bpd=-1.05,
             conditional=True, val_mi=1.0, val_mi_stderr=0.1, val_mi_bayes=2.35,
             val_mi_bayes_stderr=0.05, val_accuracy=0.9, val_accuracy_stderr=0.01,
             val_accuracy_logistic=0.89, label_evaluations=176, label_entropy=math.log(10),
             run_dir="exps/mnist-base", checkpoint="exps/mnist-base/checkpoints/last.ckpt")
    assert "note: I(X; Y)" not in experiment.summary_lines(s)
    s.update(val_mi_bayes=-28.7429, val_mi_bayes_stderr=7.6593)
    text = experiment.summary_lines(s)
    assert "note: I(X; Y) lies in [0, H(Y) = 2.3026] nats" in text
    s.update(val_mi_bayes=1.0, val_mi=14.8, val_mi_stderr=0.7)  # the digits difference form
    assert "note: I(X; Y)" in experiment.summary_lines(s)
