"""Lightning callbacks for the training scripts."""
import math

import pytorch_lightning as pl
import torch as t
from pytorch_lightning.loggers import TensorBoardLogger


class SampleImages(pl.Callback):
    """A grid of model samples in TensorBoard ("samples") after each validation epoch, for image
    models: DiffusionModel.sample (DDIM in log-SNR space) from a fixed seed, so that epochs are
    comparable. Runs on global rank 0 only; it calls the module directly, outside DDP, so the
    other ranks are not waited for."""

    def __init__(self, n=16, steps=100, seed=0):
        self.n, self.steps, self.seed = n, steps, seed

    def on_validation_epoch_end(self, trainer, pl_module):
        if (trainer.sanity_checking or not trainer.is_global_zero
                or not isinstance(trainer.logger, TensorBoardLogger)):
            return
        from torchvision.utils import make_grid

        generator = t.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.sample(self.n, self.steps, generator=generator).float()
        grid = make_grid(((x + 1) / 2).clamp(0, 1), nrow=math.ceil(math.sqrt(self.n)), padding=1)
        zoom = max(1, 128 // grid.shape[-1])  # tiny images (digits: 8x8) are enlarged
        grid = grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
        trainer.logger.experiment.add_image("samples", grid.cpu(), trainer.global_step)
