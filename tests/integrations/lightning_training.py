"""A tiny Lightning training run for the plugin's tests: an MLP on fixed random data, 4 steps
an epoch, Adam with a step LR schedule, checkpoints at the end of every epoch. Run as a
script it trains with the plugin and SIGKILLs itself in the middle of an epoch."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch

import mtckpt
from mtckpt.integrations.lightning import MtckptCheckpointIO

RUN = "lit"
STEPS_PER_EPOCH = 4


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )
        self.loaded_step: int | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_load_checkpoint(self, checkpoint) -> None:
        self.loaded_step = checkpoint["global_step"]


def data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def plugin(root: Path) -> MtckptCheckpointIO:
    return MtckptCheckpointIO(
        run=RUN,
        memory=mtckpt.MemoryTier(path=str(root / "mem"), keep=10),
        local=mtckpt.LocalTier(path=str(root / "local"), keep=10),
    )


class KillAt(pl.Callback):
    """SIGKILL the process at the end of ``step``, once the checkpoints before it are
    committed (the plugin's pointers written), so that the resume point is known."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(root: Path | None, max_epochs: int, callbacks=(), io=None) -> pl.Trainer:
    """A Trainer saving through ``io`` into ``root``/ckpt, or one without checkpoints."""
    options = dict(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True)  # fmt: skip
    if io is None:
        return pl.Trainer(enable_checkpointing=False, callbacks=list(callbacks), **options)
    every_epoch = pl.callbacks.ModelCheckpoint(
        dirpath=root / "ckpt", every_n_epochs=1, save_last=True
    )
    return pl.Trainer(
        default_root_dir=root, plugins=[io], callbacks=[every_epoch, *callbacks], **options
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--kill-at", type=int, required=True)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer(args.root, args.epochs, [KillAt(args.kill_at)], plugin(args.root)).fit(model, data())
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
