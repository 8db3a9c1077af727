"""A full, read-only or forbidden disk: every write a run makes (checkpoints, TensorBoard events,
hparams.yaml, figures, the summary, the evaluation's results and per-sample CSV, the SLURM mark,
interrupted.ckpt) that fails ends the run in one line naming the file and what was kept, with
exit status 74 (130 for a Ctrl-C whose checkpoint cannot be written); no file is left
half-written, and the command the line gives finishes the run once the disk is writable again.

The failures are injected (CI runs without root, so no full or read-only mount): the final rename
of cli.write_file, which every file of the run's own goes through, and builtins.open for
Lightning's and TensorBoard's own files raise the OSError a disk gives for paths matching a
pattern, as scratch/inject.py of report 29 does with a real tmpfs's errors.
"""
import builtins
import errno
import fnmatch
import io
import os
import shlex
import sys

import pytest
import pytorch_lightning as pl
import torch as t

import callbacks as cb
import experiment
import train_2d
from tests.test_runs import TINY, interrupt_at

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# 400 points: 360 for training, less than a batch: one step an epoch, validated at each end
FLAGS = TINY[:2] + ["--num_points", "400", "--num_epochs", "2", "--grid_size", "4",
                    "--num_samples", "8", "--sample_steps", "4", "--val_npoints", "8",
                    "--val_every", "1", "--num_threads", "1"]
RUN = os.path.join("exps", "scg-base")


def inject(patch, pattern, code, opens=True):
    """Writes to paths matching `pattern` (fnmatch, on the path as given) fail with OSError(code):
    the rename that completes cli.write_file, and (opens) builtins.open / io.open for writing."""
    replace, real_open = os.replace, builtins.open

    def failing_replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(dst), pattern):
            raise OSError(code, os.strerror(code))
        return replace(src, dst, *args, **kwargs)

    def failing_open(file, mode="r", *args, **kwargs):
        name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if any(c in mode for c in "wax+") and fnmatch.fnmatch(name, pattern):
            raise OSError(code, os.strerror(code), name)
        return real_open(file, mode, *args, **kwargs)
    patch.setattr(os, "replace", failing_replace)
    if opens:
        patch.setattr(builtins, "open", failing_open)
        patch.setattr(io, "open", failing_open)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A clean working folder and sys.argv as the command line gives it (the resume command
    the error line prints is built from it); callbacks.Interrupted without an earlier run's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_2d.py", *FLAGS])
    for name in ("message", "status", "kept"):
        monkeypatch.setattr(cb.Interrupted, name, None)
    return tmp_path


def fails(monkeypatch, capsys, main, pattern, code, status=74, opens=True):
    """(stdout, the error line) of main() run through run_cli with writes to `pattern` failing."""
    with monkeypatch.context() as patch:
        inject(patch, pattern, code, opens)
        with pytest.raises(SystemExit) as exit_:
            experiment.run_cli(main)
    out, err = capsys.readouterr()
    assert exit_.value.code == status and "Traceback" not in err, err[-3000:]
    assert "Exception in thread" not in err  # TensorBoard's writer thread says nothing itself
    line = err.strip().splitlines()[-1]
    return out, line


def no_partial_files(folder):
    """No temporary file of cli.write_file is left anywhere under folder."""
    left = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
            if name.endswith(".tmp")]
    assert not left, left


def finished_by(line, capsys):
    """Runs the resume command the error line ends with; its summary."""
    command = shlex.split(line.rsplit(" with ", 1)[1])
    assert command[:2] == ["python", "train_2d.py"]
    s = train_2d.main(command[2:])
    capsys.readouterr()
    assert os.path.isfile(os.path.join(RUN, "summary.json"))
    return s


# (pattern, errno, the file the line names, what it says was kept (its step; None: nothing))
TRAINING = [
    ("*/checkpoints/best-epoch=0.ckpt", errno.EACCES, "checkpoints/best-epoch=0.ckpt", None),
    ("*/checkpoints/last.ckpt", errno.ENOSPC, "checkpoints/last.ckpt", "best-epoch=0.ckpt"),
    ("*/hparams.yaml", errno.EROFS, "hparams.yaml", None),
    ("*/events.out.tfevents.*", errno.ENOSPC, "events.out.tfevents.", None),
    ("*/figures/density.png", errno.ENOSPC, "figures/density.png", "last.ckpt"),
    ("*/summary.json", errno.EDQUOT, "summary.json", "last.ckpt"),
]


@pytest.mark.parametrize("pattern, code, named, kept", TRAINING,
                         ids=[os.path.basename(p[0]) for p in TRAINING])
def test_a_write_that_fails_ends_the_run_in_one_line_and_its_command_finishes_it(
        pattern, code, named, kept, work, monkeypatch, capsys):
    out, line = fails(monkeypatch, capsys, lambda: train_2d.main(FLAGS), pattern, code)
    assert line.startswith(f"error: cannot write {os.path.join(RUN, named)}"), line
    assert f": {os.strerror(code)}; " in line
    no_partial_files(work)
    if kept is None:  # before any checkpoint: nothing to resume from
        assert line.endswith("; nothing was kept"), line
        return
    path = os.path.join(RUN, "checkpoints", kept)
    step = t.load(path, map_location="cpu", weights_only=False)["global_step"]
    assert f"; kept {path} (step {step}); resume with python train_2d.py " in line, line
    if named == "summary.json":  # printed before it was written
        assert "validation E[-log p(x)] = " in out
    s = finished_by(line, capsys)
    assert s["steps"] == 2 and os.path.isfile(os.path.join(RUN, "figures", "density.png"))


def test_a_checkpoint_cut_short_by_a_full_disk_leaves_the_previous_one_whole(work, monkeypatch,
                                                                            capsys):
    # the disk fills while last.ckpt of step 2 is written: the temporary file is removed and
    # last.ckpt of step 1 stays whole, loadable, named in the line
    save = t.save

    def filling(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")).startswith(".last.ckpt.") and \
                obj["global_step"] == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(t, "save", filling)
    _, line = fails(monkeypatch, capsys, lambda: train_2d.main(FLAGS), "none", 0)
    last = os.path.join(RUN, "checkpoints", "last.ckpt")
    assert line.startswith(f"error: cannot write {last}: No space left on device; kept "), line
    assert t.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    no_partial_files(work)


class CtrlCAtEpochStart(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_on_a_full_disk_names_the_newest_complete_checkpoint(work, monkeypatch, capsys):
    interrupt_at(monkeypatch, CtrlCAtEpochStart())
    _, line = fails(monkeypatch, capsys, lambda: train_2d.main(FLAGS),
                    "*/checkpoints/interrupted.ckpt", errno.ENOSPC, status=130)
    last = os.path.join(RUN, "checkpoints", "last.ckpt")
    assert line == (f"interrupted at epoch 2, step 1: cannot write "
                    f"{os.path.join(RUN, 'checkpoints', 'interrupted.ckpt')} (No space left on "
                    f"device); kept {last} (step 1)"), line
    assert not os.path.exists(os.path.join(RUN, "checkpoints", "interrupted.ckpt"))


def test_the_slurm_mark_that_cannot_be_written_is_one_line(work, monkeypatch, capsys):
    # what SLURM sets for one task (as tests/test_runs.py's requeue test)
    for key, value in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                           SLURM_JOB_NAME="itd", SLURM_PROCID="0", SLURM_LOCALID="0",
                           SLURM_NODEID="0", SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    _, line = fails(monkeypatch, capsys, lambda: train_2d.main(FLAGS), "*/slurm_job_id",
                    errno.EROFS)
    assert line == (f"error: cannot write {os.path.join(RUN, 'slurm_job_id')}: Read-only file "
                    "system; nothing was kept"), line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-epoch run's last.ckpt, for the evaluations."""
    folder = tmp_path_factory.mktemp("trained")
    return train_2d.main(FLAGS + ["--num_epochs", "1", "--log_dir", str(folder)])["checkpoint"]


@pytest.mark.parametrize("pattern", ["r.json", "values.csv"])
def test_an_evaluation_whose_files_cannot_be_written_keeps_its_table(pattern, checkpoint, work,
                                                                     monkeypatch, capsys):
    # a full disk lets the files be claimed (empty, an inode) but not written: the table is
    # printed before they are written; neither file is left (the claimed ones removed again)
    flags = ["--eval_only", "--ckpt", checkpoint, "--npoints", "8", "--num_threads", "1",
             "--results", "r.json", "--per_sample", "values.csv"]
    out, line = fails(monkeypatch, capsys, lambda: train_2d.main(flags), pattern, errno.ENOSPC,
                      opens=False)
    assert line == (f"error: cannot write {pattern}: No space left on device; the table "
                    "above is complete; nothing was written"), line
    assert "continuous" in out and sorted(os.listdir(work)) == []
