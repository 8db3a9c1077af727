"""The command line as a user meets it: every mistake ends with one `error:` line, exit status 2,
no traceback and nothing written; Ctrl-C keeps a checkpoint and says how to resume; --resume
takes the run's settings from the checkpoint.

The mistakes run in-process through experiment.run_cli (the scripts' entry point), which is what
`python train_2d.py ...` runs; test_train_2d.py and test_cifar10.py run a few as real processes.
"""
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest

import cli
import experiment
import train_2d
import train_cifar10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = "error: cannot set up the Trainer"
ONE_FOLDER = "--experiment_name: must be one folder name"
MISTAKES = [  # (script, flags, what the last line of stderr says)
    (train_2d, ["--dataset", "spiral"], "invalid choice: 'spiral'"),
    (train_2d, ["--devices", "two"], TRAINER),
    (train_2d, ["--devices", "0"], TRAINER),
    (train_2d, ["--accelerator", "gpu"], TRAINER),
    (train_2d, ["--devices", "2", "--accelerator", "gpu"], TRAINER),
    (train_2d, ["--accelerator", "tpu"], TRAINER),
    (train_2d, ["--strategy", "bogus"], TRAINER),
    (train_2d, ["--precision", "bf16-true"], "would cast the Gaussian reference"),
    (train_2d, ["--log_dir", "afile/exps"], "afile/exps cannot be written: "),
    (train_2d, ["--learning_rate", "-1e-3"],
     "--learning_rate: must be a finite number > 0 and <= 10, got -1e-3"),
    (train_2d, ["--val_npoints", "100"], "--val_npoints: must be a power of 2, got 100"),
    (train_2d, ["--num_points", "1000000000"], "--num_points: must be a whole number >= 20 and "
                                                "<= 100000000, got 1000000000"),
    (train_2d, ["--hidden_size", "65536"], "GiB of memory"),  # 400 GiB of weights
    (train_2d, ["--num_epochs", "0"], "--num_epochs: must be a whole number > 0, got 0"),
    (train_2d, ["--fit_proposal", "3"], "--fit_proposal: needs at least 8 samples"),
    (train_2d, ["--eval_only", "--ckpt", "x.ckpt", "--eval_proposal", "flat"], "invalid choice: 'flat'"),
    (train_2d, ["--resume", "nope.ckpt"], "error: checkpoint nope.ckpt not found"),
    (train_2d, ["--resume", "afile"], "error: cannot read checkpoint afile"),
    (train_2d, ["--eval_only"], "--eval_only needs --ckpt"),
    (train_2d, ["--ckpt", "x.ckpt"], "--ckpt: only used with --eval_only"),
    (train_2d, ["--eval_only", "--ckpt", "nope.ckpt"], "error: checkpoint nope.ckpt not found"),
    (train_cifar10, ["--dataset", "digits", "--val_npoints", "100"], "must be a power of 2"),
    (train_cifar10, ["--dataset", "digits", "--log_dir", "afile/x", "--unet_width", "8"],
     "afile/x cannot be written: "),
    (train_cifar10, ["--dataset", "fake"], "invalid choice: 'fake'"),  # the fake set is gone
    (train_cifar10, ["--dataset", "digits", "--image_size", "16"], "unrecognized arguments"),
    (train_cifar10, ["--eval_only", "--dataset", "digits"], "or a --pretrained U-Net"),
    (train_cifar10, ["--dataset", "digits", "--precision", "16-true"], "would cast"),
    # a run name is one folder under --log_dir: nothing may be written outside it, or nowhere
    (train_2d, ["--experiment_name", "../../../escape_out"], ONE_FOLDER),
    (train_2d, ["--experiment_name", "../../escape"], ONE_FOLDER),
    (train_2d, ["--experiment_name", "/tmp/abs"], ONE_FOLDER),
    (train_2d, ["--experiment_name", "a b/ c"], ONE_FOLDER),
    (train_2d, ["--experiment_name", ""], ONE_FOLDER),
    (train_cifar10, ["--dataset", "digits", "--experiment_name", "../x"], ONE_FOLDER),
    (train_2d, ["--seed", "-1"], "--seed: must be a whole number >= 0"),
    (train_2d, ["--num_epochs", "1.5"], "--num_epochs: must be a whole number > 0, got 1.5"),
    (train_2d, ["--conditional", "--label_dropout", "0"],
     "--label_dropout: must be a finite number > 0 and < 1, got 0"),
    (train_2d, ["--conditional", "maybe"], "expected a boolean (true/false), got 'maybe'"),
    (train_cifar10, ["--dataset", "digits", "--conditional", "--eval_only", "--pretrained", "x"],
     "--conditional with --pretrained evaluates untrained labels"),
    # flags of the restructure: --train_batch_size became --batch_size, --num_threads is >= 1
    (train_2d, ["--train_batch_size", "128"], "unrecognized arguments: --train_batch_size"),
    (train_2d, ["--num_threads", "0"], "--num_threads: must be a whole number >= 1, got 0"),
    (train_cifar10, ["--dataset", "digits", "--num_threads", "0"], "must be a whole number >= 1"),
    (train_2d, ["--dataset", "scg", "--data", "p.csv"], "give --dataset or --data, not both"),
    (train_2d, ["--per_sample", "out.csv"], "--per_sample: only used with --eval_only"),
    # the network is the script's own or a module:Class, never the other script's
    (train_2d, ["--denoiser", "unet"], "--denoiser: this script's network is mlp"),
    (train_cifar10, ["--dataset", "digits", "--denoiser", "mlp"],
     "--denoiser: this script's network is unet"),
    (train_2d, ["--denoiser", "torch.nn:Linear", "--denoiser_args", "{width"],
     "error: --denoiser_args is not JSON"),
    (train_2d, ["--denoiser", "torch.nn:Linear", "--denoiser_args", "[2, 2]"],
     "error: --denoiser_args must be a JSON object of keyword arguments, got [2, 2]"),
]


@pytest.mark.parametrize("script, flags, message", MISTAKES,
                         ids=[" ".join(m[1]) for m in MISTAKES])
def test_a_mistake_is_one_line_and_leaves_nothing(script, flags, message, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: script.main(flags + ["--num_epochs", "1"]
                                               if "--num_epochs" not in flags else flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: "), err  # one line
    assert message in err, err
    assert os.listdir(tmp_path) == ["afile"]


# The limits of the numeric flags, each at its edge (None: accepted) and just beyond (refused
# with that message), parsed only. Where they come from (cli.py, train_2d.py, train_cifar10.py):
# the log-SNR range and clip within +-36 (float64 tells sigmoid(a) from 1 only below ln 2^53 =
# 36.7); the small U-Net's 1000-step schedule over [lo, hi] keeps its steps apart only while
# hi < 36 + ln((hi - lo) / 999), 33.2 for lo = -30 (digits: loc 4, scale 2); an input
# embedding's float32 angles within 0.1 rad for |z| ~ 10 up to scale 1e5, its frequencies falling
# only for a period >= 1; a contour grid no finer than a 576-pixel panel; the schedule's 1000
# timesteps (vb_steps <= 999); the conditional label pass's 4 replicates.
RANGE = "must lie within [-36, 36]"
SCHEDULE = "the small U-Net's 1000 timesteps over the log-SNR range [-30, 34]"
LIMITS = [  # (script, flags, None or what the error line says)
    (train_2d, ["--logsnr_loc", "0", "--logsnr_scale", "1", "--clip", "36"], None),
    (train_2d, ["--logsnr_loc", "0", "--logsnr_scale", "1", "--clip", "36.01"],
     "--clip: must be a finite number > 0 and <= 36, got 36.01"),
    (train_2d, ["--logsnr_loc", "0.01", "--logsnr_scale", "1", "--clip", "36"],
     "[-35.99, 36.01] (--logsnr_loc 0.01 --logsnr_scale 1 --clip 36) " + RANGE),
    (train_2d, ["--logsnr_loc", "-0.01", "--logsnr_scale", "1", "--clip", "36"], RANGE),
    (train_2d, ["--logsnr_loc", "36", "--logsnr_scale", "1e-9", "--clip", "1"], RANGE),
    (train_2d, ["--logsnr_loc", "35", "--logsnr_scale", "1", "--clip", "1"], None),
    (train_2d, ["--logsnr_loc", "nan"], "--logsnr_loc: must be a finite number"),
    (train_2d, ["--logsnr_scale", "inf"], "--logsnr_scale: must be a finite number > 0, got inf"),
    (train_2d, ["--logsnr_scale", "100"], RANGE),
    (train_cifar10, ["--dataset", "digits", "--logsnr_loc", "1.5", "--logsnr_scale", "1",
                     "--clip", "31.5"], None),  # [-30, 33]
    (train_cifar10, ["--dataset", "digits", "--logsnr_loc", "2", "--logsnr_scale", "1",
                     "--clip", "32"], SCHEDULE),  # [-30, 34]: within +-36, not for the schedule
    (train_2d, ["--input_embedding_scale", "1e5"], None),
    (train_2d, ["--input_embedding_scale", "100001"], "--input_embedding_scale: must be a finite "
                                                       "number >= 0 and <= 100000, got 100001"),
    (train_2d, ["--input_embedding_scale", "nan"], "must be a finite number >= 0"),
    (train_2d, ["--input_embedding_period", "1"], None),
    (train_2d, ["--input_embedding_period", "0.99"], "--input_embedding_period: must be a finite "
                                                      "number >= 1"),
    (train_2d, ["--input_embedding_period", "inf"], "--input_embedding_period: must be a finite"),
    (train_2d, ["--grid_size", "2"], None),
    (train_2d, ["--grid_size", "1"], "--grid_size: must be a whole number >= 2 and <= 576, got 1"),
    (train_2d, ["--grid_size", "576"], None),
    (train_2d, ["--grid_size", "577"], "--grid_size: must be a whole number >= 2 and <= 576"),
    (train_2d, ["--max_steps", "-1"], None),
    (train_2d, ["--max_steps", "1"], None),
    (train_2d, ["--max_steps", "0"], "--max_steps: -1 (no limit) or >= 1, got 0"),
    (train_2d, ["--max_steps", "-2"], "--max_steps: must be a whole number >= -1, got -2"),
    (train_2d, ["--vb_steps", "999"], None),
    (train_2d, ["--vb_steps", "1000"], "--vb_steps: must be a whole number >= 0 and <= 999"),
    (train_2d, ["--dataset", "moons", "--conditional", "--val_npoints", "4"], None),
    (train_2d, ["--dataset", "moons", "--conditional", "--val_npoints", "2"],
     "--val_npoints: --conditional needs at least 4 (the label pass's 4 replicates), got 2"),
    (train_2d, ["--fit_proposal", "8"], None),
    (train_2d, ["--fit_proposal", "7"], "--fit_proposal: needs at least 8 samples"),
    (train_2d, ["--learning_rate", "10"], None),
    (train_2d, ["--learning_rate", "10.5"], "--learning_rate: must be a finite number > 0 and "
                                             "<= 10, got 10.5"),
    (train_2d, ["--learning_rate", "inf"], "--learning_rate: must be a finite number"),
    (train_2d, ["--num_points", "20"], None),
    (train_2d, ["--num_points", "19"], "--num_points: must be a whole number >= 20"),
    (train_2d, ["--embedding_size", "2"], None),
    (train_2d, ["--embedding_size", "3"], "--embedding_size: must be even, got 3"),
    (train_cifar10, ["--dataset", "digits", "--unet_width", "8"], None),
    (train_cifar10, ["--dataset", "digits", "--unet_width", "12"],
     "--unet_width: must be a multiple of 8 (group norm), got 12"),
    (train_cifar10, ["--dataset", "digits", "--unet_width", "4"], "--unet_width: must be a whole "
                                                                   "number >= 8"),
    (train_cifar10, ["--dataset", "digits", "--reference_size", "2"], None),
    (train_cifar10, ["--dataset", "digits", "--reference_size", "1"],
     "--reference_size: must be a whole number >= 2, got 1"),
]


def machine_memory(monkeypatch, nbytes):
    """This machine's memory, as cli.check_fits reads it (os.sysconf), made nbytes."""
    sysconf = os.sysconf
    pages = nbytes // sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf",
                        lambda name: pages if name == "SC_PHYS_PAGES" else sysconf(name))


@pytest.mark.parametrize("script, flags, message", LIMITS,
                         ids=[f"{m[0].__name__} {' '.join(m[1])}" for m in LIMITS])
def test_every_numeric_flag_is_refused_just_beyond_its_limit(script, flags, message, capsys,
                                                              monkeypatch):
    machine_memory(monkeypatch, 2 ** 40)  # the limits here, not this machine's
    if message is None:
        assert script.parse_args(flags) is not None
        assert capsys.readouterr().err == ""
        return
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error: argument --") and message in err, err


def test_argument_mistakes_are_one_line_and_help_is_argparse_s(capsys):
    # argparse's own errors (an unknown flag, a bad choice, a missing value) without its usage
    # block; --help prints the usage as argparse does
    for flags, message in ((["--bogus"], "unrecognized arguments: --bogus"),
                           (["--dataset"], "argument --dataset: expected one argument")):
        with pytest.raises(SystemExit) as exit_:
            train_2d.parse_args(flags)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err == f"error: {message}\n"
    with pytest.raises(SystemExit) as exit_:
        train_2d.parse_args(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


class Checked(Exception):
    """Raised in place of building the Trainer: every check before any work has passed."""


@pytest.mark.parametrize("script, flags, message", [
    # scg, 200 points: 180 for training (10% held out); the refits draw from them
    (train_2d, ["--dataset", "scg", "--num_points", "200", "--fit_proposal", "180"], None),
    (train_2d, ["--dataset", "scg", "--num_points", "200", "--fit_proposal", "181"],
     "error: argument --fit_proposal: 181 is more than the 180 training samples the refits draw "
     "from"),
    # 40 images: 36 for training; --reference_size 10 of them: the reference data
    (train_cifar10, ["--data", "images.npy", "--reference_size", "10", "--fit_proposal", "10"],
     None),
    (train_cifar10, ["--data", "images.npy", "--reference_size", "10", "--fit_proposal", "11"],
     "error: argument --fit_proposal: 11 is more than the 10 training samples"),
], ids=["2d 180", "2d 181", "images 10", "images 11"])
def test_sizes_beyond_the_data_are_refused_before_any_work(script, flags, message, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.save("images.npy", np.zeros((40, 8, 8), np.uint8))

    def checked(*args, **kwargs):
        raise Checked
    monkeypatch.setattr(experiment, "make_trainer", checked)
    flags = flags + ["--num_epochs", "2"] + ["--num_workers", "0"] * (script is train_cifar10)
    if message is None:
        with pytest.raises(Checked):
            script.main(flags)
        return
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: script.main(flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith(message), err
    assert os.listdir(tmp_path) == ["images.npy"]


# Memory estimates on a machine of 8 GiB (machine_memory): a size must fit in half, 4 GiB =
# 4294967296 B. The estimates (train_2d.parse_args, cli.parse, unet.from_args):
# scg's MLP (embedding 32, no input embedding: 35 inputs) of H units in L = 3 layers holds
# 16 B x ((35 + 3) H + 2 (H + 1) H + 2); a training point 9000 + 36 H B; a contour cell
# max(32000, that point's) B; validation 600 B per point of eval_batch_size x val_npoints; the
# small U-Net 16 B x 1000 width^2 + 550 B x pixels x width per training image.
MEMORY = [  # (script, flags, None or what the error line says)
    # the model alone beyond 4 GiB from H = 11576; with one training point from H = 11575
    (train_2d, ["--dataset", "scg", "--hidden_size", "11574", "--batch_size", "1"], None),
    (train_2d, ["--dataset", "scg", "--hidden_size", "11575", "--batch_size", "1"],
     "--batch_size: 1 needs about 4.0 GiB"),
    (train_2d, ["--dataset", "scg", "--hidden_size", "11576", "--batch_size", "1"],
     "--hidden_size: 11576 (3 layers) needs about 4.0 GiB of memory; this machine has 8.0 GiB"),
    (train_2d, ["--dataset", "scg", "--batch_size", "315576"], None),  # H = 128
    (train_2d, ["--dataset", "scg", "--batch_size", "315577"], "--batch_size: 315577 needs about "
                                                               "4.0 GiB"),
    (train_2d, ["--dataset", "scg", "--grid_size", "366"], None),  # 366^2 x 32000 B: 4.0 GiB
    (train_2d, ["--dataset", "scg", "--grid_size", "367"], "--grid_size: 367 needs about 4.0 GiB"),
    (train_2d, ["--dataset", "scg", "--val_npoints", "4096"], None),  # x 1024 x 600 B: 2.3 GiB
    (train_2d, ["--dataset", "scg", "--val_npoints", "8192"],
     "--val_npoints: 8192 (x --eval_batch_size 1024) needs about 4.7 GiB"),
    (train_cifar10, ["--dataset", "digits", "--batch_size", "3798"], None),  # 8 x 8, width 32
    (train_cifar10, ["--dataset", "digits", "--batch_size", "3799"],
     "--batch_size: 3799 (--unet_width 32) needs about 4.0 GiB"),
]


@pytest.mark.parametrize("script, flags, message", MEMORY,
                         ids=[f"{m[0].__name__} {' '.join(m[1])}" for m in MEMORY])
def test_sizes_beyond_half_the_memory_are_refused_with_the_estimate(script, flags, message,
                                                                     tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    machine_memory(monkeypatch, 8 * 2 ** 30)

    def checked(*args, **kwargs):
        raise Checked
    monkeypatch.setattr(experiment, "make_trainer", checked)
    flags = flags + ["--num_epochs", "1", "--num_workers", "0"] * (script is train_cifar10)
    # the U-Net's estimate is made as a run starts (main, up to the Trainer); the MLP's as the
    # arguments are parsed (not building a model of gigabytes)
    run = (lambda: script.main(flags)) if script is train_cifar10 else (
        lambda: script.parse_args(flags))
    if message is None:
        with pytest.raises(Checked) if script is train_cifar10 else contextlib.nullcontext():
            run()
        return
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(run)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error: argument ") and message in err, err
    assert os.listdir(tmp_path) == []


def test_check_fits_allows_half_the_memory(monkeypatch):
    machine_memory(monkeypatch, 8 * 2 ** 30)
    cli.check_fits(None, "--x", 1, 4 * 2 ** 30)
    with pytest.raises(cli.UserError, match=r"^argument --x: 1 needs about 4.0 GiB of memory; "
                                            r"this machine has 8.0 GiB$"):
        cli.check_fits(None, "--x", 1, 4 * 2 ** 30 + 1)


def test_threads_beyond_the_cores_are_one_warning_line(monkeypatch, capsys):
    # experiment.set_threads: more PyTorch threads than the cores this process may use (2 here)
    import torch as t
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    threads = t.get_num_threads()
    try:
        experiment.set_threads(2)
        assert capsys.readouterr().err == ""
        experiment.set_threads(3)
    finally:
        t.set_num_threads(threads)
    assert capsys.readouterr().err == ("warning: --num_threads 3 is more than the 2 cores this "
                                       "process may use; it will run slower, not faster\n")


@pytest.mark.parametrize("script, flags", [
    (train_2d, ["--eval_only", "--ckpt", "exps_folder"]), (train_2d, ["--resume", "exps_folder"]),
    (train_cifar10, ["--eval_only", "--ckpt", "exps_folder"])], ids=["2d ckpt", "2d resume",
                                                                     "cifar10 ckpt"])
def test_a_folder_given_for_a_checkpoint_names_the_checkpoints_in_it(script, flags, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exps_folder").mkdir()
    (tmp_path / "exps_folder" / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: script.main(flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: exps_folder is a folder, not a checkpoint; "
                                            "the checkpoints in it: last.ckpt")
    assert os.listdir(tmp_path) == ["exps_folder"]
    assert os.listdir(tmp_path / "exps_folder") == ["last.ckpt"]


@pytest.mark.slow
def test_paths_with_spaces_print_shell_quoted(tmp_path, monkeypatch, capsys):
    # a space is allowed in a run name (no separator); the summary's paths must paste into a shell
    monkeypatch.chdir(tmp_path)
    s = train_2d.main(["--dataset", "scg", "--num_points", "400", "--num_epochs", "1",
                       "--grid_size", "4", "--num_samples", "0", "--val_npoints", "8",
                       "--num_threads", "1", "--log_dir", "my exps", "--experiment_name", "a b"])
    assert s["run_dir"] == os.path.join("my exps", "scg-a b")
    lines = capsys.readouterr().out.splitlines()

    def pasted(prefix):  # the words a shell makes of the line after `prefix`
        line = next(line for line in lines if line.strip().startswith(prefix))
        return shlex.split(line.strip()[len(prefix):])
    assert pasted("logs:") == [os.path.join("my exps", "scg-a b")]
    assert pasted("checkpoint:") == [os.path.join("my exps", "scg-a b", "checkpoints", "last.ckpt")]
    assert pasted("view with:") == ["tensorboard", "--logdir", "my exps"]
    assert os.path.isfile(os.path.join("my exps", "scg-a b", "checkpoints", "last.ckpt"))


def test_help_shows_only_the_scripts_own_flags_and_paths(capsys):
    for script in (train_2d, train_cifar10):
        with pytest.raises(SystemExit) as exit_:
            script.parse_args(["--help"])
        assert exit_.value.code == 0
        # argparse wraps lines, also after a hyphen ("exps/moons-" / "base/..."): unwrapped
        text = " ".join(re.sub(r"-\n\s*", "-", capsys.readouterr().out).split())
        # --resume's example is the script's own first dataset's run; its list of the flags a
        # resumed run may change holds the script's own (cli.build_parser's may_change)
        resume = text[text.index("--resume CKPT continue"):text.index("(a one-cycle schedule")]
        assert "--max_steps" in resume  # both scripts' flag now
        if script is train_2d:
            assert "exps/moons-base/checkpoints/last.ckpt" in resume and "--grid_size" in resume
            assert "--curve_samples" not in text and "--pretrained" not in text
        else:
            assert "exps/cifar10-base/checkpoints/last.ckpt" in resume
            assert "--curve_samples" in resume
            assert "moons-base" not in text and "--grid_size" not in text


@pytest.mark.slow
def test_a_pretrained_folder_without_weights_is_one_error_line(tmp_path):
    # a UNet2DModel config.json alone (save_config, no weights): one error line, and nothing from
    # diffusers (it logs the missing file and its advice on unsafe serialization to stderr). A
    # real process: diffusers' handler writes to the stderr of the process it was made in.
    from diffusers import UNet2DModel

    import unet
    config = dict(unet.small_unet_config(channels=3, size=8, width=8), layers_per_block=1)
    UNet2DModel.from_config(config).save_config(str(tmp_path / "unet"))
    assert os.listdir(tmp_path / "unet") == ["config.json"]
    np.save(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3),
                                                                         dtype=np.uint8))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_cifar10.py"), "--data", "images.npy",
         "--num_epochs", "1", "--num_workers", "0", "--pretrained", "unet"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert err.startswith("error: cannot load the U-Net from unet: ")
    assert sorted(os.listdir(tmp_path)) == ["images.npy", "unet"]


@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_and_resume_continues_the_run(tmp_path):
    common = ["--dataset", "scg", "--num_points", "2000", "--grid_size", "4", "--num_samples",
              "10", "--sample_steps", "4", "--val_npoints", "8", "--num_threads", "1"]
    # 20000 epochs: the run must still be going when the signal arrives, on a fast machine too
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_2d.py"), *common,
                             "--num_epochs", "20000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a child inherits an ignored SIGINT (an earlier test's Lightning may
                            # leave one): Ctrl-C must reach it as it reaches a user's run
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # not a terminal: one line per epoch
        if line.startswith("epoch 2/20000"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    kept = os.path.join("exps", "scg-base", "checkpoints", "interrupted.ckpt")
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at epoch ") and f"kept {kept}" in last
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    command = last.split("resume with ")[1].split()  # the command as given, resuming
    assert command[1] == os.path.join(REPO, "train_2d.py") and command[-2:] == ["--resume", kept]
    assert " ".join(command[2:-2]) == " ".join(common + ["--num_epochs", "20000"])
    assert os.path.isfile(tmp_path / kept)

    # a flag that contradicts the checkpoint is an error naming both values
    bad = subprocess.run([sys.executable, *command[1:], "--dataset", "moons"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--dataset: moons contradicts the checkpoint's --dataset scg" \
        in bad.stderr
    # the resume command, with a shorter run: the same folder, the checkpoint's settings
    done = subprocess.run([sys.executable, *command[1:], "--num_epochs", "4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scg: 4 epochs" in done.stdout
    assert "exact E[-log p(x)] on the validation set" in done.stdout
    assert os.listdir(tmp_path / "exps") == ["scg-base"]
    assert os.path.isfile(tmp_path / "exps" / "scg-base" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_checkpoint_without_a_denoiser_record_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                     capsys):
    # checkpoints of earlier unreleased versions did not record how to rebuild their denoiser:
    # evaluating or resuming one is one error line, and nothing is written
    import torch as t
    s = train_2d.main(["--dataset", "scg", "--num_epochs", "1", "--num_points", "200",
                       "--grid_size", "4", "--num_samples", "0", "--val_npoints", "8",
                       "--log_dir", str(tmp_path / "exps"), "--accelerator", "cpu",
                       "--devices", "1", "--lr_schedule", "constant"])  # may run longer
    ckpt = t.load(s["checkpoint"], weights_only=False)
    assert ckpt["denoiser"]["target"] == "denoisers:MLPDenoiser"
    del ckpt["denoiser"]
    (tmp_path / "old").mkdir()
    t.save(ckpt, tmp_path / "old" / "old.ckpt")
    monkeypatch.chdir(tmp_path / "old")
    capsys.readouterr()
    for flags in (["--eval_only", "--ckpt", "old.ckpt"],
                  ["--resume", "old.ckpt", "--num_epochs", "2"]):
        with pytest.raises(SystemExit) as exit_:
            experiment.run_cli(lambda: train_2d.main(flags))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines() == [err.strip()], err  # one line
        assert err.startswith("error: old.ckpt") and "does not say how to rebuild its denoiser" in err
        assert os.listdir(".") == ["old.ckpt"]
    with pytest.raises(cli.UserError, match="train it again"):
        experiment.load_model(str(tmp_path / "old" / "old.ckpt"))


BAD_POINTS = {  # file name -> (content, what the error line says)
    "three.csv": ("1,2,3,4\n5,6,7,8\n", "need 2 numeric columns and an optional label column"),
    "words.csv": ("x,y\n1,2\na,b\n", "a value of the first two columns is not a number"),
    "labels.csv": ("1,2,0.5\n3,4,1\n", "labels must be whole numbers >= 0"),
    "empty.csv": ("x,y\n", "no data rows"),
    "points.txt": ("1 2\n", "points are read from .csv, .npy or .npz files"),
    "nan.npy": (np.array([[0.0, np.nan], [1.0, 2.0]]), "the data contain NaN or inf"),
    "wide.npy": (np.zeros((5, 3)), "need points of shape (n, 2), got (5, 3)"),
    "nox.npz": ({"points": np.zeros((5, 2))}, "an .npz needs an array named x, got points"),
    "broken.npy": (b"not numpy", "not a readable numpy file"),
}
BAD_IMAGES = {
    "float.npy": (np.zeros((4, 8, 8, 3)), "need a uint8 array (N, H, W) or (N, H, W, C)"),
    "five.npy": (np.zeros((4, 8, 8, 5), np.uint8), "with 1 or 3 channels"),
    "notes/": ({"a.png": (8, 8), "b.txt": None}, "b.txt is not a PNG or JPEG image"),
    "sizes/": ({"a.png": (8, 8), "b.png": (16, 16)}, "all images must be one size and mode"),
    "points.csv": ("1,2\n", "images are read from a folder or a .npy/.npz array"),
}


def write_data(path, content):
    """A data file or folder of the content BAD_POINTS / BAD_IMAGES give."""
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    elif path.suffix == ".npz":
        np.savez(path, **content)
    else:  # a folder of images (name -> (height, width)) and other files
        from PIL import Image
        path.mkdir()
        for name, size in content.items():
            if size is None:
                (path / name).write_text("not an image")
            else:
                Image.fromarray(np.zeros(size + (3,), np.uint8)).save(path / name)


@pytest.mark.parametrize("script, name, content, message", [
    *[(train_2d, name, *v) for name, v in BAD_POINTS.items()],
    *[(train_cifar10, name, *v) for name, v in BAD_IMAGES.items()],
    (train_2d, "none.csv", None, "No such file or directory"),
    (train_cifar10, "none.npy", None, "none.npy: no such file"),
    (train_2d, "unlabelled.csv", ("1,2\n3,4\n5,6\n", "--conditional: "), "has no labels"),
    (train_cifar10, "unlabelled.npy", (np.zeros((4, 8, 8), np.uint8), "--conditional: "),
     "has no labels"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_bad_data_is_one_line_and_no_run_folder(script, name, content, message, tmp_path,
                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--data", name, "--num_epochs", "1", "--accelerator", "cpu"]
    if isinstance(content, tuple) and content[1] == "--conditional: ":
        content, flags = content[0], flags + ["--conditional"]
    if content is not None:
        write_data(tmp_path / name.rstrip("/"), content)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: script.main(flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: "), err
    assert message in err and name.rstrip("/") in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no exps/ or run folder


DENOISERS = """
import torch as t


class Net(t.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = t.nn.Sequential(t.nn.Linear(3, width), t.nn.SiLU(), t.nn.Linear(width, 2))

    def forward(self, z, logsnr):
        return self.net(t.cat([z, logsnr[:, None]], 1))


class WrongShape(t.nn.Module):
    def forward(self, z, logsnr):
        return z[:, :1]


class Fails(t.nn.Module):
    def forward(self, z, logsnr):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def not_a_module():
    return 3
"""
DENOISER_MISTAKES = [  # (--denoiser, --denoiser_args, what the error says)
    ("itd_no_such_module:Net", "{}", "--denoiser itd_no_such_module:Net: cannot import "
                                     "itd_no_such_module: No module named 'itd_no_such_module'"),
    ("itd_cli_denoisers:Missing", "{}", "--denoiser itd_cli_denoisers:Missing: "
                                        "itd_cli_denoisers has no Missing"),
    ("itd_cli_denoisers:Net", '{"depth": 2}', "--denoiser itd_cli_denoisers:Net: its arguments "
                                              '{"depth": 2} do not fit: '),
    ("itd_cli_denoisers:Net", "{}", "--denoiser itd_cli_denoisers:Net: its arguments {} do not "
                                    "fit: "),
    ("itd_cli_denoisers:WrongShape", "{}", "the denoiser WrongShape returned torch.float32 (2, 1); "
                                           "it must return a floating tensor of the input's shape "
                                           "(2, 2)"),
    ("itd_cli_denoisers:Fails", "{}", "the denoiser Fails fails on samples of shape (2,): "
                                      "RuntimeError: mat1 and mat2"),
    ("itd_cli_denoisers:not_a_module", "{}", "made a int, not a torch.nn.Module"),
]


@pytest.fixture
def cli_denoisers(tmp_path, monkeypatch):
    """tests' own denoiser module on sys.path (tmp_path/mods), the working directory
    tmp_path/work."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "itd_cli_denoisers.py").write_text(DENOISERS)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    yield
    sys.modules.pop("itd_cli_denoisers", None)


@pytest.mark.parametrize("target, kwargs, message", DENOISER_MISTAKES,
                         ids=[m[0].split(":")[1] + m[1] for m in DENOISER_MISTAKES])
def test_a_denoiser_that_does_not_fit_is_one_clear_error(target, kwargs, message, cli_denoisers,
                                                         capsys):
    flags = ["--dataset", "scg", "--num_points", "200", "--num_epochs", "1", "--denoiser", target,
             "--denoiser_args", kwargs, "--accelerator", "cpu"]
    with pytest.raises((ValueError, cli.UserError)) as err:  # called as a library
        train_2d.main(flags)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_:  # and from the command line
        experiment.run_cli(lambda: train_2d.main(flags))
    out = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in out.err
    assert out.err.strip().splitlines() == [f"error: {err.value}"]
    assert os.listdir(".") == []


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, code", [
    ("train_2d.py", ["--help"], 0), ("train_2d.py", ["--learning_rate", "-1e-3"], 2),
    ("train_2d.py", ["--embedding_size", "7"], 2), ("train_cifar10.py", ["--help"], 0),
    ("train_cifar10.py", ["--dataset", "digits", "--val_npoints", "100"], 2)])
def test_help_and_argument_mistakes_answer_before_torch_loads(script, flags, code):
    # the scripts parse in cli.answer_early, before their heavy imports: --help and a bad flag
    # must exit without torch (or Lightning) in sys.modules -- that is what makes them answer
    # in a fraction of a second instead of the ~5 s the imports take
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}] + {flags!r}\n"
             "try:\n"
             f"    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    heavy = sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules)\n"
             "    print('EXIT', e.code, heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert f"EXIT {code} []" in out.stdout, out.stdout + out.stderr
