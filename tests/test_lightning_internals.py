"""What exact resume, the graceful Ctrl-C and SLURM's requeue rely on inside Lightning, checked
directly: pytorch-lightning (and diffusers) are pinned in requirements.txt to the versions these
tests and tests/test_runs.py pass with; a new version that moves any of this fails here, loudly,
before a resumed run silently skips steps."""
import os
import re

import diffusers
import pytorch_lightning as pl
import torch as t

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned(package):
    with open(os.path.join(REPO, "requirements.txt")) as f:
        return re.search(rf"^{package}==(\S+)$", f.read(), re.M)[1]


def test_the_installed_versions_are_the_pinned_ones():
    # exact resume (callbacks.Interrupted, datamodules.Data.train_dataloader) was verified with
    # these versions: changing the pin means re-running tests/test_runs.py and this file
    assert pl.__version__ == pinned("pytorch-lightning")
    assert diffusers.__version__ == pinned("diffusers")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = t.nn.Parameter(t.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return t.optim.SGD(self.parameters(), lr=0.1)


def test_the_loop_state_and_signal_hooks_exact_resume_uses(tmp_path):
    # callbacks.Interrupted defers a stop through the signal connector's received_sigterm flag
    # (Lightning raises SIGTERMException at the next step boundary) and repairs the batch
    # progress of checkpoints saved as an epoch starts; callbacks.SlurmJob points Lightning's
    # requeue checkpoint into the run through _default_root_dir
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    assert trainer._signal_connector.received_sigterm is False
    assert hasattr(trainer, "_default_root_dir")
    trainer.fit(Tiny(), t.utils.data.DataLoader(t.ones(6), batch_size=2))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    loop = t.load(path, weights_only=False)["loops"]["fit_loop"]
    assert set(loop["epoch_progress"]["current"]) >= {"ready", "started", "processed", "completed"}
    batches = loop["epoch_loop.batch_progress"]
    assert set(batches["current"]) >= {"ready", "started", "processed", "completed"}
    assert "is_last_batch" in batches
    assert trainer.global_step == 6 and batches["total"]["completed"] == 6


def test_without_nvml_the_gpu_check_skips_it_and_counts_the_same(monkeypatch):
    # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 on import; where libnvidia-ml cannot load,
    # torch then retries loading it before every CUDA check (each Adam step makes one) and falls
    # back to the CUDA runtime: experiment.count_gpus_directly asks the runtime straight away
    import ctypes
    import inspect

    import lightning_fabric

    import experiment
    source = inspect.getsource(lightning_fabric)
    assert 'os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"' in source
    count = t.cuda.device_count()

    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    experiment.count_gpus_directly()
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
    assert t.cuda.device_count() == count
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: object())  # NVML loads
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    experiment.count_gpus_directly()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_lightning_sets_the_epoch_of_the_sampler_that_serves_whole_batches():
    # datamodules.EpochSampler yields index tensors to a DataLoader(batch_size=None); each epoch's
    # order comes from the epoch Lightning sets on the loader's sampler
    from lightning_fabric.utilities.data import _set_sampler_epoch

    import datamodules
    sampler = datamodules.EpochSampler(20, 8, seed=3)
    loader = t.utils.data.DataLoader(datamodules.Samples(t.arange(20.)), None, sampler=sampler)
    _set_sampler_epoch(loader, 2)
    assert sampler.epoch == 2
