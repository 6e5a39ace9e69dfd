"""A tiny transformers Trainer run for the callback's tests: an MLP with dropout on fixed
random data, shuffled, 10 steps an epoch, AdamW with a linear warmup schedule. Run as a
script it trains with the callback and SIGKILLs itself in the middle of an epoch."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import mtckpt
from mtckpt.integrations.transformers import MtckptCallback

RUN = "hf"
STEPS_PER_EPOCH = 10
EPOCHS = 3


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )

    def forward(self, x, labels):
        prediction = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels), "logits": prediction}


class Samples(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(4 * STEPS_PER_EPOCH, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


def manager(root: Path) -> mtckpt.CheckpointManager:
    return mtckpt.CheckpointManager(
        RUN,
        memory=mtckpt.MemoryTier(path=str(root / "mem")),
        local=mtckpt.LocalTier(path=str(root / "local"), every=5),
    )


def trainer(root: Path, callbacks=()) -> Trainer:
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(root / "out"), num_train_epochs=EPOCHS, per_device_train_batch_size=4,
        learning_rate=0.05, warmup_steps=3, lr_scheduler_type="linear", logging_steps=5,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(
        model=TinyRegressor(), args=args, train_dataset=Samples(), callbacks=list(callbacks)
    )


class KillAt(TrainerCallback):
    """SIGKILL the process at the end of ``step``, once the manager's pending work is done,
    so that the resume point is known."""

    def __init__(self, manager: mtckpt.CheckpointManager, step: int) -> None:
        self.manager, self.step = manager, step

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            self.manager.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--kill-at", type=int, required=True)
    args = parser.parse_args()
    mgr = manager(args.root)
    trainer(args.root, [MtckptCallback(mgr), KillAt(mgr, args.kill_at)]).train()
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
