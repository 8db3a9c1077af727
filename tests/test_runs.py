"""Runs that survive a cluster: SIGTERM keeps the exact step and says how to resume (exit status
143); SLURM's requeue through Lightning's SLURMEnvironment continues the run in its own folder;
a run interrupted mid-epoch and resumed does exactly the steps of the uninterrupted one, to the
same weights; resuming a finished run is refused, a moved checkpoint finds (or replaces) its run
folder; every precision --help lists trains, and 64-true end to end in both scripts.

Real processes only where a signal is sent; elsewhere an interruption is made in-process the way
Lightning's own SIGTERM handler makes it (trainer.received_sigterm set during a step). Runs are
tiny: scg with a few thousand points, a 4 x 4 contour grid, no samples.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.stats
import torch as t

import callbacks as cb
import datasets
import densities
import experiment
import train_2d
import train_cifar10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_2d.py")
# 2000 points: 1800 for training (val_fraction 0.1), batches of 512 (the default): 3 steps an epoch
TINY = ["--dataset", "scg", "--num_points", "2000", "--grid_size", "4", "--num_samples", "0",
        "--val_npoints", "8", "--num_threads", "1", "--batch_size", "512"]

pytestmark = pytest.mark.usefixtures("one_thread")


def clean_env(**extra):
    """This environment without any SLURM_* variable (the suite may itself run in a SLURM job,
    which would turn on Lightning's SLURM handling), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


@pytest.fixture
def fresh_interrupted(monkeypatch):
    """callbacks.Interrupted keeps what run_cli prints in class attributes: each test starts (and
    leaves the next one) without an earlier test's interruption."""
    monkeypatch.setattr(cb.Interrupted, "message", None)
    monkeypatch.setattr(cb.Interrupted, "status", None)


class SigtermAt(pl.Callback):
    """What Lightning's SIGTERM handler does when the signal arrives during step `step`: it sets
    trainer.received_sigterm, and the loop raises SIGTERMException after that step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


class CtrlCAt(pl.Callback):
    """Ctrl-C as a user presses it: SIGINT sent to this process once global step `step` is done,
    in the hook `hook` (on_train_batch_end: mid-epoch; on_validation_start: in the end-of-epoch
    validation; on_train_epoch_start: between two epochs)."""

    def __init__(self, step, hook):
        self.step, self.sent = step, False
        setattr(self, hook, self.interrupt)

    def interrupt(self, trainer, *args):
        if trainer.global_step == self.step and not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def sigint_restored():
    """The SIGINT handler as it was before each test (an interrupted run may leave another)."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def interrupt_at(monkeypatch, callback):
    """The next train_2d runs carry `callback` (an interruption)."""
    family = train_2d.FAMILY
    monkeypatch.setattr(train_2d, "FAMILY", dataclasses.replace(
        family, callbacks=lambda args, data, curve: family.callbacks(args, data, curve) + [callback]))


def sigterm_at(monkeypatch, step):
    """The next train_2d runs get a SIGTERM during global step `step`."""
    interrupt_at(monkeypatch, SigtermAt(step))


def read_until(proc, prefix, limit=120.):
    """proc's stdout lines up to the first that starts with `prefix`, read with a wall-clock
    limit of `limit` seconds: fails clearly if no such line comes in time or the output ends
    first. A thread keeps reading (so the pipe never fills) until the process exits."""
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    seen, deadline = [], time.monotonic() + limit
    while True:
        try:
            line = lines.get(timeout=max(0., deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no line starting {prefix!r} within {limit:.0f} s; stdout so far:\n"
                        + "".join(seen)[-3000:])
        if line is None:
            pytest.fail(f"stdout ended (exit status {proc.wait()}) before a line starting "
                        f"{prefix!r}:\n" + "".join(seen)[-3000:])
        seen.append(line)
        if line.startswith(prefix):
            return seen


def stop(proc):
    """Kills proc if it is still running (a failed test leaves no training behind)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def same(a, b):
    """a == b, tensors (and nested dicts and lists of them) compared bit for bit."""
    if t.is_tensor(a) or t.is_tensor(b):
        return t.is_tensor(a) and t.is_tensor(b) and a.dtype == b.dtype and t.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# SIGTERM and SLURM: real processes
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_keeps_the_exact_step_and_says_how_to_resume(tmp_path, monkeypatch, capsys,
                                                            fresh_interrupted):
    # a run name with a space: the kept path and the resume command must be shell-quoted
    flags = TINY + ["--experiment_name", "night run"]
    # 20000 epochs: the run must still be going when the signal arrives, on a fast machine too
    # stderr to a file: an unread pipe could fill and stall the run
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen([sys.executable, SCRIPT, *flags, "--num_epochs", "20000"],
                                cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=err_file, text=True)
    try:
        seen = read_until(proc, "epoch 2/20000")  # not a terminal: one line per epoch
        proc.send_signal(signal.SIGTERM)  # what SLURM, Kubernetes and `timeout` send
        proc.wait(timeout=120)
    finally:
        stop(proc)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM (15), as a shell reports it
    assert "training: 20000 epochs of 3 steps" in "".join(seen)  # 1800 points // 512
    assert "Traceback" not in err and "SIGTERMException" not in err
    kept = os.path.join("exps", "scg-night run", "checkpoints", "interrupted.ckpt")
    last = err.strip().splitlines()[-1]
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]  # one line says it, the last
    found = re.fullmatch(r"stopped by SIGTERM at epoch (\d+), step (\d+): kept (.+); resume "
                         r"with (.+)", last)
    assert found, last
    epoch, step = int(found[1]), int(found[2])
    assert found[3] == shlex.quote(kept) and kept != shlex.quote(kept)
    # the command as given (the flags in their order, the space quoted), resuming from the kept
    # checkpoint
    command = shlex.split(found[4])
    assert command == ["python", SCRIPT, *flags, "--num_epochs", "20000", "--resume", kept]
    # the checkpoint holds the step the line names: 2 epochs of 3 steps were done when
    # "epoch 2/20000" was printed, so at least 6
    ckpt = t.load(tmp_path / kept, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step >= 6 and ckpt["epoch"] == epoch - 1

    # the resume command: it may not be longer than the 20000 epochs its one-cycle schedule was
    # planned for, it may be shorter; in-process (no signal needed), in the same working folder
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: train_2d.main(command[2:] + ["--num_epochs", "20001"]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "--num_epochs: 20001 is longer than the 20000 epochs" in err.strip().splitlines()[-1]
    s = train_2d.main(command[2:] + ["--num_epochs", "4"])
    out = capsys.readouterr().out
    assert s["steps"] == 4 * 3 and s["epochs"] == 4  # 4 epochs of 3 steps, all of them
    assert f"{4 * 3 - step} steps to go of {4 * 3}" in out  # from the kept step on
    assert os.listdir("exps") == ["scg-night run"]  # in the interrupted run's folder
    assert s["run_dir"] == os.path.join("exps", "scg-night run")
    assert f"logs:        {shlex.quote(s['run_dir'])}" in out


@pytest.mark.slow
def test_sigterm_stops_an_evaluation_at_once_and_leaves_no_results(tmp_path, monkeypatch):
    # an evaluation has nothing to keep: it stops within seconds, not at the end of a batch of
    # minutes (Lightning's own handler waits for it, and lets the last batch finish)
    monkeypatch.chdir(tmp_path)
    s = train_2d.main(TINY + ["--num_epochs", "1"])
    # one batch of 200 samples at 2^16 points each: minutes of work on one thread
    proc = subprocess.Popen([sys.executable, SCRIPT, "--eval_only", "--ckpt", s["checkpoint"],
                             "--npoints", "65536", "--eval_batch_size", "1000", "--ode", "false",
                             "--num_threads", "1"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("evaluating"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # at once: the batch would take minutes
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM: nothing was written", err[-3000:]
    assert "Traceback" not in err and not list(tmp_path.rglob("eval-*.json"))


@pytest.mark.slow
def test_slurm_requeue_saves_requeues_and_the_requeued_job_continues_its_run(tmp_path,
                                                                           monkeypatch, capsys):
    # A fake scontrol first on PATH records how Lightning calls it (SLURM's own is not here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    log = tmp_path / "scontrol.log"
    work = tmp_path / "job"
    work.mkdir()
    # What SLURM sets for one task of job 4242 (Lightning's SLURMEnvironment.detect: SLURM_NTASKS
    # set, and a job name other than bash or interactive)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                 SLURM_JOB_NAME="itd", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                 SLURM_NODELIST="localhost")
    epochs = 30  # 30 epochs of 3 steps: 90 steps in all
    argv = TINY + ["--num_epochs", str(epochs)]
    # stderr to a file: an unread pipe could fill and stall the run
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=work,
                                stdout=subprocess.PIPE, stderr=err_file, text=True,
                                env=clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                                              SCONTROL_LOG=str(log), **slurm))
    try:
        read_until(proc, f"epoch 2/{epochs}")
        # SLURM's warning signal (sbatch --signal=USR1@...), then after the requeue the
        # SIGTERM. Sent while the run is stopped, so it cannot finish in between on a slow
        # machine; Python runs pending handlers in signal-number order, so Lightning's SIGUSR1
        # handler (save, requeue) completes before its SIGTERM handler marks the stop.
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err[-3000:]
    run = work / "exps" / "scg-base"
    # Lightning's requeue checkpoint, in the run's checkpoints (callbacks.SlurmJob), and the
    # requeue of this job by its id
    assert (run / "checkpoints" / "hpc_ckpt_1.ckpt").is_file(), os.listdir(run / "checkpoints")
    assert log.read_text() == "requeue 4242\n"
    assert (run / "slurm_job_id").read_text() == "4242"
    stopped = t.load(run / "checkpoints" / "hpc_ckpt_1.ckpt", map_location="cpu",
                     weights_only=False)["global_step"]
    assert 6 <= stopped < 3 * epochs  # from epoch 3 on (2 epochs of 3 steps printed), unfinished

    # SLURM starts the same command again, with SLURM_RESTART_COUNT=1 (in-process here: no signal
    # is involved): it continues that run, in its folder, to all of its steps
    monkeypatch.chdir(work)
    for key, value in dict(slurm, SLURM_RESTART_COUNT="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(log))
    for key in [k for k in os.environ if k.startswith("SLURM_") and k not in slurm
                and k != "SLURM_RESTART_COUNT"]:
        monkeypatch.delenv(key)
    kept = {name: os.path.getmtime(run / "checkpoints" / name)
            for name in os.listdir(run / "checkpoints")}
    kept_step = {name: t.load(run / "checkpoints" / name, map_location="cpu",
                              weights_only=False)["global_step"] for name in kept}
    capsys.readouterr()
    s = train_2d.main(list(argv))
    out = capsys.readouterr().out
    resumed = re.search(r"^SLURM job 4242 requeued: resuming exps/scg-base/checkpoints/(.+)$",
                        out, re.M)
    # the newest checkpoint of the run: interrupted.ckpt, written after hpc_ckpt_1.ckpt (file
    # times are coarse, a few ms: the two may tie)
    assert resumed and kept[resumed[1]] == max(kept.values()), (out[:2000], kept)
    assert os.listdir(work / "exps") == ["scg-base"]
    assert s["steps"] == 3 * epochs and s["epochs"] == epochs
    # counted from the resumed checkpoint's step (a restart from step 0 would say 90 to go)
    assert f"{3 * epochs - kept_step[resumed[1]]} steps to go of {3 * epochs}" in out
    assert s["run_dir"] == os.path.join("exps", "scg-base")
    assert log.read_text() == "requeue 4242\n"  # no further requeue


# ---------------------------------------------------------------------------------------------
# Exact resume, in-process
# ---------------------------------------------------------------------------------------------
def accumulating(patch, batches):
    """The next train_2d runs accumulate the gradients of `batches` batches per optimizer step."""
    family = train_2d.FAMILY
    patch.setattr(train_2d, "FAMILY", dataclasses.replace(
        family, trainer=dict(family.trainer, accumulate_grad_batches=batches)))


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """whole_run(accumulate): the uninterrupted run the interrupted ones are compared with, with
    gradients accumulated over that many batches (each trained once)."""
    done = {}

    def run(accumulate):
        if accumulate not in done:
            with pytest.MonkeyPatch.context() as patch:
                accumulating(patch, accumulate)
                done[accumulate] = train_2d.main(RESUMED + [
                    "--log_dir", str(tmp_path_factory.mktemp("whole")), "--experiment_name",
                    "whole"])
        return done[accumulate]
    return run


# 2000 points: 1800 for training in batches of 256, 7 steps an epoch; 3 epochs: 21 steps (with
# 2 batches a step, 4 steps an epoch, the last of one batch: 12 steps).
# --fit_proposal 16 refits the log-SNR proposal at the starts of epochs 1 and 2 (REFITS = 5
# spread over 3 epochs), so the resumed run must carry that proposal and refit as the whole does.
RESUMED = TINY + ["--num_epochs", "3", "--batch_size", "256", "--fit_proposal", "16",
                  "--val_every", "1"]


class RaiseAt(pl.Callback):
    """KeyboardInterrupt raised in the hook `hook` once global step `step` is done: a checkpoint
    saved there, as one that something other than the graceful stop saves (SLURM's requeue)."""

    def __init__(self, step, hook):
        self.step = step
        setattr(self, hook, self.interrupt)

    def interrupt(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SigtermWithin(pl.Callback):
    """SIGTERM during the first batch of the gradient accumulation that makes step `step`:
    stopping after that batch would lose its gradients."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step - 1 and (batch_idx + 1) % trainer.accumulate_grad_batches:
            trainer._signal_connector.received_sigterm = True


@pytest.mark.slow
@pytest.mark.parametrize("how, step, hook, kept_step, accumulate", [
    ("sigterm", 10, None, 10, 1),                      # the 4th of epoch 1's 7 steps
    ("ctrl-c", 10, "on_train_batch_end", 10, 1),       # the same, by Ctrl-C
    ("ctrl-c", 7, "on_validation_start", 7, 1),        # epoch 0 done, during its validation
    # between epochs 1 and 2: the run stops where Lightning can resume exactly, after a step
    ("ctrl-c", 14, "on_train_epoch_start", 15, 1),
    # a checkpoint saved as epoch 2 starts (its loop state normalised on load: Interrupted)
    ("raise", 14, "on_train_epoch_start", 14, 1),
    # 2 batches a step: SIGTERM within step 6's first batch stops after step 6 (epoch 1's 2nd)
    ("within", 6, None, 6, 2),
])
def test_an_interrupted_run_resumes_to_exactly_the_steps_and_weights_of_the_whole_run(
        how, step, hook, kept_step, accumulate, whole_run, tmp_path, monkeypatch, capsys,
        fresh_interrupted):
    common = RESUMED + ["--log_dir", str(tmp_path)]
    steps = 21 if accumulate == 1 else 12
    whole = whole_run(accumulate)
    interrupter = {"sigterm": lambda: SigtermAt(step), "ctrl-c": lambda: CtrlCAt(step, hook),
                   "raise": lambda: RaiseAt(step, hook), "within": lambda: SigtermWithin(step)}
    with monkeypatch.context() as patch:
        accumulating(patch, accumulate)
        with monkeypatch.context() as cut:
            interrupt_at(cut, interrupter[how]())
            with pytest.raises(SystemExit) as exit_:
                experiment.run_cli(lambda: train_2d.main(common + ["--experiment_name", "cut"]))
        assert exit_.value.code == (143 if how in ("sigterm", "within") else 130)
        kept = tmp_path / "scg-cut" / "checkpoints" / "interrupted.ckpt"
        cause = "stopped by SIGTERM" if how in ("sigterm", "within") else "interrupted"
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"{cause} at epoch ") and f", step {kept_step}: kept " in last, last
        assert t.load(kept, map_location="cpu", weights_only=False)["global_step"] == kept_step
        resumed = train_2d.main(common + ["--experiment_name", "cut", "--resume", str(kept)])
    assert f"{steps - kept_step} steps to go of {steps}" in capsys.readouterr().out

    a, b = (t.load(s["checkpoint"], map_location="cpu", weights_only=False)
            for s in (whole, resumed))
    assert a["global_step"] == b["global_step"] == steps and resumed["epochs"] == 3
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    assert "fitted_proposal" in a and same(a["fitted_proposal"], b["fitted_proposal"])
    # every tensor of the model, bit for bit (the same seed: same data order, same noise)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k, v in a["state_dict"].items() if not same(v, b["state_dict"][k])]
    assert not different, different
    assert same(a["optimizer_states"], b["optimizer_states"])


# 400 points: 360 for training, less than a batch: one step an epoch, validated at each end
FINAL = TINY[:2] + ["--num_points", "400", "--num_epochs", "2", "--grid_size", "4",
                    "--num_samples", "8", "--sample_steps", "4", "--val_npoints", "8",
                    "--val_every", "1", "--num_threads", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("where, how", [("viz.plot_density", "ctrl-c"),
                                        ("viz.plot_density", "sigterm"),
                                        ("experiment.summary_lines", "ctrl-c")])
def test_an_interruption_after_training_is_finished_by_the_command_it_prints(
        where, how, tmp_path, monkeypatch, capsys, fresh_interrupted):
    # Ctrl-C or SIGTERM during the final figures (the first, the density contours) or while the
    # summary is made: one line, whose command finishes the run (the figures and summary.json)
    # with the uninterrupted run's numbers, without training again; once finished, the same
    # command is refused
    monkeypatch.chdir(tmp_path)
    whole = train_2d.main(FINAL + ["--log_dir", "whole"])
    figures = sorted(os.listdir(os.path.join(whole["run_dir"], "figures")))
    module, name = where.split(".")
    real = getattr(sys.modules[module], name)

    def interrupt(*args, **kwargs):
        if how == "sigterm":  # at once: callbacks.stop_at_once's handler raises
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        raise KeyboardInterrupt
    flags = FINAL + ["--log_dir", "cut"]
    monkeypatch.setattr(sys, "argv", ["train_2d.py", *flags])
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules[module], name, interrupt)
        with pytest.raises(SystemExit) as exit_:
            experiment.run_cli(lambda: train_2d.main(flags))
    assert getattr(sys.modules[module], name) is real
    err = capsys.readouterr().err
    assert exit_.value.code == (143 if how == "sigterm" else 130)
    kept = os.path.join("cut", "scg-base", "checkpoints", "interrupted.ckpt")
    cause = "stopped by SIGTERM" if how == "sigterm" else "interrupted"
    assert err.strip().splitlines()[-1] == (f"{cause} after training (2 steps): kept {kept}; "
                                            f"finish the run with python train_2d.py "
                                            f"{shlex.join(flags)} --resume {kept}"), err[-2000:]
    assert not os.path.exists(os.path.join("cut", "scg-base", "summary.json"))

    command = shlex.split(err.strip().splitlines()[-1].split(" with ", 1)[1])
    s = train_2d.main(command[2:])
    out = capsys.readouterr().out
    assert "training is complete (2 steps): finishing the run" in out
    assert "steps to go" not in out  # nothing trained
    assert sorted(os.listdir(os.path.join("cut", "scg-base", "figures"))) == figures
    with open(os.path.join("cut", "scg-base", "summary.json")) as f:
        assert json.load(f)["val_nll"] == s["val_nll"]
    # the same model, validation points and figures: the whole run's numbers, its history too
    for key in ("steps", "epochs", "val_nll", "val_nll_stderr", "gaussian_val_loss", "history",
                "contour_cells", "suggested_logsnr_loc", "samples_mean"):
        assert s[key] == whole[key], key
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: train_2d.main(command[2:]))
    assert exit_.value.code == 2 and "error: already finished: " in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_2d, train_cifar10], ids=["2d", "images"])
def test_a_run_stopped_by_max_steps_before_any_validation_leaves_its_last_checkpoint(
        script, tmp_path, monkeypatch, capsys):
    # --max_steps ends the run inside its first epoch or at its end, before the first validation
    # (every 5 epochs): the final model is validated and saved as last.ckpt, which the summary
    # names. 2-D: 1800 points in batches of 512, 3 steps an epoch; images: 36 of 40 random 8 x 8
    # images in batches of 16, 2 steps an epoch
    monkeypatch.chdir(tmp_path)
    np.save("images.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), np.uint8))
    steps = 3 if script is train_2d else 2
    flags = (TINY if script is train_2d else [
        "--data", "images.npy", "--batch_size", "16", "--unet_width", "8", "--val_npoints", "4",
        "--curve_samples", "4", "--num_samples", "0", "--num_workers", "0", "--num_threads", "1"])
    s = script.main(flags + ["--num_epochs", "10", "--val_every", "5", "--max_steps", str(steps)])
    last = os.path.join(s["run_dir"], "checkpoints", "last.ckpt")
    assert s["checkpoint"] == last and s["steps"] == steps
    assert t.load(last, map_location="cpu", weights_only=False)["global_step"] == steps
    assert f"checkpoint:  {last}" in capsys.readouterr().out


class Diverge(pl.Callback):
    """The model's weights made NaN in the hook `hook` once global step `step` is done: a
    diverged run."""

    def __init__(self, step, hook):
        self.step = step
        setattr(self, hook, self.diverge)

    def diverge(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.data.fill_(math.nan)


@pytest.mark.slow
@pytest.mark.parametrize("hook, step, loss", [("on_train_batch_end", 4, "training"),
                                              ("on_validation_start", 6, "validation")])
def test_a_diverged_model_ends_the_run_in_one_line_keeping_the_last_good_checkpoint(
        hook, step, loss, tmp_path, monkeypatch, capsys, fresh_interrupted):
    # 3 steps an epoch, validated at each end: the weights turn NaN after step 4 (the next
    # step's loss is not finite) or before epoch 1's validation (at step 6); never a val_loss
    # of 0 (NaN dropped), no summary; the last checkpoint is epoch 0's (step 3), finite
    monkeypatch.chdir(tmp_path)
    interrupt_at(monkeypatch, Diverge(step, hook))
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: train_2d.main(TINY + ["--num_epochs", "3", "--val_every", "1"]))
    out, err = capsys.readouterr()
    last = os.path.join("exps", "scg-base", "checkpoints", "last.ckpt")
    line = err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "Traceback" not in err and "val_loss 0" not in out
    assert line.startswith(f"error: the {loss} loss is not finite at step {step} (non-finite "
                           "loss at log SNR [") and line.endswith(
        f"the model may have diverged; a learning rate lower than 0.003 may help; kept {last} "
        "(step 3)"), line
    assert not os.path.exists(os.path.join("exps", "scg-base", "summary.json"))
    ckpt = t.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_validation_sums_keep_nan():
    # DiffusionModel's validation sums: torchmetrics' SumMetric drops NaN by default (a diverged
    # model's val_loss would be 0 / n = 0); here NaN is kept
    import diffusionmodel
    from tests.analytic import Zero
    dm = diffusionmodel.DiffusionModel(Zero())
    dm.val_sums[0].update(t.tensor([1.0, math.nan]))
    assert math.isnan(dm.val_sums[0].compute().item())


def test_time_estimate_after_a_mid_epoch_resume_counts_steps(monkeypatch, capsys):
    # callbacks.Timings with a clock of our own: a run of 10 epochs of 7 steps (70 steps)
    # resumed at step 13, one step before the end of epoch 1 (epochs 0, 1, ...). Its first epoch
    # end comes 30 s later at step 14: 30 s a step, 56 steps left, 1680 s = 28.0 minutes. (Timing
    # the partial epoch instead, 30 s times the 8 epochs left, would say 4.0 minutes; the run is
    # resumed, so the steps done before it do not count either.)
    now = [1000.]
    monkeypatch.setattr(cb, "time", types.SimpleNamespace(time=lambda: now[0]))
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=13, current_epoch=1,
                                    max_epochs=10, num_training_batches=7,
                                    estimated_stepping_batches=70)
    size = cb.Timings(now[0])
    size.on_train_start(trainer, None)
    now[0] += 30.
    trainer.global_step = 14
    size.on_train_epoch_end(trainer, None)
    out = capsys.readouterr().out.splitlines()
    assert out == ["training: 9 epochs of 7 steps, 57 steps to go of 70",
                   "expected: about 28.0 more minutes for the remaining 56 steps (without "
                   "validation)"]


# ---------------------------------------------------------------------------------------------
# Finished runs and moved checkpoints
# ---------------------------------------------------------------------------------------------
def files(folder):
    """{path: (bytes, mtime)} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[path] = (f.read(), os.stat(path).st_mtime_ns)
    return found


@pytest.mark.slow
def test_finished_runs_are_refused_and_moved_checkpoints_find_their_run(tmp_path, monkeypatch,
                                                                       capsys, fresh_interrupted):
    # 400 points: 360 for training in batches of 128, 2 steps an epoch; 2 epochs: 4 steps
    logs = tmp_path / "exps"
    common = ["--dataset", "scg", "--num_points", "400", "--batch_size", "128",
              "--num_epochs", "2", "--grid_size", "4", "--num_samples", "0", "--val_npoints", "8",
              "--num_threads", "1", "--log_dir", str(logs), "--experiment_name", "r"]
    run = logs / "scg-r"
    with monkeypatch.context() as patch:
        sigterm_at(patch, 1)  # mid-epoch 0
        with pytest.raises(SystemExit) as exit_:
            experiment.run_cli(lambda: train_2d.main(common))
    assert exit_.value.code == 143
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = str(elsewhere / "kept.ckpt")
    shutil.copy(run / "checkpoints" / "interrupted.ckpt", copy)

    # a copy of the checkpoint whose run folder still exists continues in that folder
    capsys.readouterr()
    s = train_2d.main(common + ["--resume", copy])
    assert "note:" not in capsys.readouterr().out
    assert s["steps"] == 4 and os.listdir(logs) == ["scg-r"]
    assert os.path.samefile(s["run_dir"], run) and os.listdir(elsewhere) == ["kept.ckpt"]

    # the run is finished now: resuming its last checkpoint is one error line, and touches
    # nothing (summary.json included: the same bytes, the same mtime)
    last = str(run / "checkpoints" / "last.ckpt")
    before = files(logs)
    with pytest.raises(SystemExit) as exit_:
        experiment.run_cli(lambda: train_2d.main(common + ["--resume", last]))
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"error: already finished: {last} ") and \
        f"--eval_only --ckpt {shlex.quote(last)}" in err
    assert files(logs) == before

    # a checkpoint whose run folder was deleted: one note, and the run continues in a new folder
    shutil.rmtree(run)
    s = train_2d.main(common + ["--resume", copy])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(
        f"note: the run folder {experiment.shown_path(str(run))} of {copy} no longer exists")
    assert s["steps"] == 4 and os.path.dirname(os.path.abspath(s["run_dir"])) == str(logs)
    assert os.path.isfile(os.path.join(s["run_dir"], "checkpoints", "last.ckpt"))


# ---------------------------------------------------------------------------------------------
# Precisions
# ---------------------------------------------------------------------------------------------
PRECISIONS = ["32-true", "64-true", "bf16-mixed", "16-mixed"]


def help_text(script):
    """What `python <script> --help` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    # argparse wraps lines, also after a hyphen ("bf16-" / "mixed"): unwrapped
    return " ".join(re.sub(r"-\n\s*", "-", out.getvalue()).split())


@pytest.mark.slow
def test_a_new_run_goes_under_log_dir_even_beside_a_folder_of_its_name(tmp_path, monkeypatch):
    # experiment.make_trainer tells a resumed run's folder (an absolute path) from a new run's
    # name: a folder named like the new run in the working directory is not resumed into
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scg-base").mkdir()
    s = train_2d.main(TINY + ["--num_epochs", "1", "--log_dir", str(tmp_path / "runs")])
    assert s["run_dir"].endswith(os.path.join("runs", "scg-base"))
    assert (tmp_path / "runs" / "scg-base" / "summary.json").is_file()
    assert list((tmp_path / "scg-base").iterdir()) == []


def test_the_precisions_listed_are_those_tested():
    for script in (train_2d, train_cifar10):
        listed = re.search(r"--precision PRECISION (.*?) \(", help_text(script))[1]
        assert re.findall(r"(?:bf)?\d+-(?:true|mixed)", listed) == PRECISIONS, listed


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    """run_2d(precision): the summary of a one-step scg run in that precision, each trained once
    for the module (64-true's test compares with 32-true's run)."""
    done = {}

    def run(precision):
        # 400 points: 360 for training, less than a batch of 512: one step
        if precision not in done:
            done[precision] = train_2d.main([
                "--dataset", "scg", "--num_points", "400", "--num_epochs", "1", "--grid_size",
                "4", "--num_samples", "0", "--val_npoints", "8", "--num_threads", "1",
                "--precision", precision, "--log_dir", str(tmp_path_factory.mktemp(precision))])
        return done[precision]
    return run


def reference_nll(checkpoint, x):
    """-log q(x) of the checkpoint's saved Gaussian reference N(mean, U diag(eigvals) U^T), by
    scipy."""
    state = t.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    mean, eigvals, eigvecs = (state[f"reference.{k}"].double().numpy()
                              for k in ("mean", "eigvals", "eigvecs"))
    return -scipy.stats.multivariate_normal(mean, eigvecs @ np.diag(eigvals) @ eigvecs.T).logpdf(
        x.double().numpy())


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_listed_precision_trains_a_2d_run(precision, run_2d):
    s = run_2d(precision)
    assert s["steps"] == 1 and math.isfinite(s["val_nll"])
    # the same seed, data and single step in every precision: the same validation NLL as
    # 32-true's, within 1e-6 nats (measured: equal in all four, as logged; 64-true's float64
    # Gaussian validation loss 1.0e-8 away; 1e-6 is ~8 float32 ulps at 1.16 nats)
    assert abs(s["val_nll"] - run_2d("32-true")["val_nll"]) < 1e-6
    ckpt = t.load(s["checkpoint"], map_location="cpu", weights_only=False)
    dtypes = {v.dtype for v in ckpt["state_dict"].values()
              if t.is_tensor(v) and v.is_floating_point()}
    # mixed precision keeps float32 weights; 64-true trains in float64 throughout
    assert dtypes == {t.float64 if precision == "64-true" else t.float32}
    if precision == "64-true":  # the checkpoint evaluates, in the same precision
        r = train_2d.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                           "--precision", precision, "--num_threads", "1"])
        assert os.path.isfile(r["path"]) and all(math.isfinite(row["nats"]) for row in r["rows"])
        # the scored points, rebuilt: the run's validation split less the evaluation's seeded
        # selection part
        points, _, _ = datasets.points_2d("scg", 400)
        _, val = datasets.split(400, datasets.SETS_2D["scg"].defaults["val_fraction"], seed=0)
        val = t.as_tensor(points[val])
        perm = t.randperm(len(val), generator=t.Generator().manual_seed(r["seed"]))
        scored = val[perm[r["n_selection"]:]]
        rows = {(row["model"], row["estimate"]): row["nats"] for row in r["rows"]}
        # the exact row is scg's closed form on them (measured: equal)
        assert rows[("exact", "continuous")] == pytest.approx(
            densities.scg_nll(scored.numpy()).mean(), rel=1e-12)
        # the Gaussian's continuous estimate is -log q exactly (its integrand is zero): scipy's
        # on the checkpoint's reference within 1e-6 relative (measured 3.7e-8; per point up to
        # 2e-7, the saved eigenvectors being float32-rounded, so not quite orthonormal)
        assert rows[("gaussian", "continuous")] == pytest.approx(
            reference_nll(s["checkpoint"], scored).mean(), rel=1e-6)


@pytest.mark.slow
def test_64_true_trains_and_evaluates_an_image_run(tmp_path):
    # 40 random 3 x 8 x 8 images: 36 for training in batches of 16 (2 steps), 4 for validation,
    # 2 of them scored in evaluation; the same run in 32-true beside it
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    runs = {}
    for precision in ("64-true", "32-true"):
        fast = ["--num_workers", "0", "--accelerator", "cpu", "--devices", "1",
                "--eval_batch_size", "4", "--precision", precision]
        s = train_cifar10.main(["--data", str(images), "--batch_size", "16", "--unet_width", "8",
                                "--num_epochs", "1",
                                "--val_npoints", "4", "--curve_samples", "4", "--num_samples",
                                "0", "--log_dir", str(tmp_path / precision), *fast])
        # --vb_steps 2: the fewest KL terms the variational bound takes (vb.variational_bound)
        r = train_cifar10.main(["--eval_only", "--ckpt", s["checkpoint"], "--npoints", "8",
                                "--vb_steps", "2", *fast])
        runs[precision] = s, r
    (s, r), (s32, r32) = runs["64-true"], runs["32-true"]
    assert s["steps"] == 2 and r["n_scored"] == 2
    ckpt = t.load(s["checkpoint"], map_location="cpu", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values()
            if t.is_tensor(v) and v.is_floating_point()} == {t.float64}
    # two Adam steps from the same seed: the validation NLL within 1 nat of 32-true's (measured
    # 0.22 of 188 nats: the precisions' roundings move the two steps apart)
    assert abs(s["val_nll"] - s32["val_nll"]) < 1
    # the Gaussian's rows need no trained weights: 64-true's evaluation gives 32-true's numbers,
    # to 2e-6 relative (measured at most 2.1e-7, the float32 run's rounding)
    gaussian = {row["estimate"]: row["nats"] for row in r32["rows"] if row["model"] == "gaussian"}
    assert len(gaussian) == 7 and all(math.isfinite(row["nats"]) for row in r["rows"])
    for row in r["rows"]:
        if row["model"] == "gaussian":
            assert row["nats"] == pytest.approx(gaussian[row["estimate"]], rel=2e-6), row
