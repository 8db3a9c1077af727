"""The command line as a user meets it: every mistake ends with one `error:` line, exit status 2,
no traceback and nothing written; Ctrl-C keeps a checkpoint and says how to resume; --resume
takes the run's settings from the checkpoint.

The mistakes run in-process through experiment.run_cli (the scripts' entry point), which is what
`python train_2d.py ...` runs; test_train_2d.py and test_cifar10.py run a few as real processes.
"""
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

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
    (train_2d, ["--learning_rate", "-1e-3"], "--learning_rate: must be a number > 0, got -1e-3"),
    (train_2d, ["--val_npoints", "100"], "--val_npoints: must be a power of 2, got 100"),
    (train_2d, ["--num_points", "1000000000"], "GiB of memory"),
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
    (train_cifar10, ["--dataset", "fake", "--fake_size", "100000000"], "GiB of memory"),
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
    (train_2d, ["--conditional", "--label_dropout", "0"], "--label_dropout: must be in (0, 1)"),
    (train_2d, ["--conditional", "maybe"], "expected a boolean (true/false), got 'maybe'"),
    (train_cifar10, ["--dataset", "digits", "--conditional", "--eval_only", "--pretrained", "x"],
     "--conditional with --pretrained evaluates untrained labels"),
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
    assert message in err.strip().splitlines()[-1], err
    assert os.listdir(tmp_path) == ["afile"]


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
        if script is train_2d:
            assert "exps/moons-base/checkpoints/last.ckpt" in resume and "--grid_size" in resume
            assert "--max_steps" not in text and "--curve_samples" not in text
        else:
            assert "exps/cifar10-base/checkpoints/last.ckpt" in resume and "--max_steps" in resume
            assert "moons-base" not in text and "--grid_size" not in text


def test_a_pretrained_folder_without_weights_is_one_error_line(tmp_path):
    # a UNet2DModel config.json alone (save_config, no weights): one error line, and nothing from
    # diffusers (it logs the missing file and its advice on unsafe serialization to stderr). A
    # real process: diffusers' handler writes to the stderr of the process it was made in.
    from diffusers import UNet2DModel

    import unet
    config = dict(unet.small_unet_config(channels=3, size=8, width=8), layers_per_block=1)
    UNet2DModel.from_config(config).save_config(str(tmp_path / "unet"))
    assert os.listdir(tmp_path / "unet") == ["config.json"]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_cifar10.py"), "--dataset", "fake",
         "--image_size", "8", "--fake_size", "32", "--num_epochs", "1", "--num_workers", "0",
         "--pretrained", "unet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert err.startswith("error: cannot load the U-Net from unet: ")
    assert sorted(os.listdir(tmp_path)) == ["unet"]


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
    assert "scg: 4 epochs" in done.stdout and "exact value on the validation set" in done.stdout
    assert os.listdir(tmp_path / "exps") == ["scg-base"]
    assert os.path.isfile(tmp_path / "exps" / "scg-base" / "checkpoints" / "last.ckpt")


def test_resume_gives_flags_a_checkpoint_predates_their_old_values(tmp_path):
    # a checkpoint written before --input_embedding_period existed used a period of 1e4
    # (train_2d.OLDER); resuming it must rebuild that network, not the new default's (100)
    import torch as t
    s = train_2d.main(["--dataset", "scg", "--num_epochs", "1", "--num_points", "200",
                       "--grid_size", "4", "--num_samples", "0", "--val_npoints", "8",
                       "--log_dir", str(tmp_path), "--accelerator", "cpu", "--devices", "1"])
    ckpt = t.load(s["checkpoint"], weights_only=False)
    assert ckpt["run_args"]["input_embedding_period"] == 100.
    del ckpt["run_args"]["input_embedding_period"]
    old = tmp_path / "old.ckpt"
    t.save(ckpt, old)
    resume = experiment.checkpoint_args("train_2d.py")
    assert train_2d.parse_args(["--resume", str(old)], resume).input_embedding_period == 1e4
    assert train_2d.parse_args(["--resume", s["checkpoint"]], resume).input_embedding_period == 100.


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
