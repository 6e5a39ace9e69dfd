"""Hugging Face transformers: a Trainer's training state saved through mtckpt, and resumed.

::

    import mtckpt
    from mtckpt.integrations.transformers import MtckptCallback

    mgr = mtckpt.CheckpointManager("exp1", local=mtckpt.LocalTier("/mnt/nvme/ckpt", every=100))
    callback = MtckptCallback(mgr)
    args = TrainingArguments(output_dir="out", save_strategy="no", ...)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint(trainer))
    mgr.close()

Saving: at the end of each optimizer step (``on_step_end``) whose global step is a multiple
of ``every`` (default: every step) and that some tier of the manager takes on its schedule
(the memory tier's ``every``, the local tier's...), the callback saves the model, the
optimizer, the LR scheduler, the random generators (``mtckpt.torch.RNG``) and the
``TrainerState`` (global step, epoch, log history) as mtckpt step ``global_step``. It
returns once they are copied into node memory; the tiers follow in the background, and
``on_train_end`` waits for them (raising the first error among them).
``save_strategy="no"`` leaves checkpointing to mtckpt.

Resuming: a callback cannot make the Trainer resume by itself, since the Trainer works out
the epoch, the batches to skip and when to set the random generators from a checkpoint
folder before any callback runs. ``resume_checkpoint(trainer)`` restores the newest step
complete in some tier (or ``step=``) and writes it as such a folder, in the Trainer's own
formats (``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``), in a new temporary directory (or under ``directory``); given to
``trainer.train(resume_from_checkpoint=...)``, the Trainer resumes exactly as from its own
checkpoint: same data order, skipped batches, optimizer, scheduler and generators. It
returns None when the run holds no step (a fresh start). The folder holds a copy of the
model and optimizer state, written once per resume (for a large model, give a
``directory`` on fast storage); it is removed once training is past its first step.

Not saved: the fp16 ``GradScaler`` (bf16 and fp32 need none); the states of other callbacks
are those the TrainerState held (the Trainer updates them only when it saves itself).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.training_args import ParallelMode

from ..errors import ConfigError, StateMismatchError
from ..manager import CheckpointManager
from .torch import RNG

log = logging.getLogger(__name__)

__all__ = ["MtckptCallback"]

_SAVED_KEYS = ("model", "optimizer", "scheduler", "rng", "trainer_state")


class MtckptCallback(TrainerCallback):
    """Saves a ``transformers.Trainer``'s training state through ``manager`` at the end of
    optimizer steps, and writes the folder to resume from (see the module's documentation).

    ``every``: save only at global steps that are multiples of it (``args.save_steps``, say);
    None offers every step to the manager, whose tiers take the steps their schedules select.
    The manager belongs to the caller, who closes it.
    """

    def __init__(self, manager: CheckpointManager, every: int | None = None) -> None:
        if not isinstance(manager, CheckpointManager):
            raise ConfigError(f"manager must be a mtckpt.CheckpointManager, got {manager!r}")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"every must be a positive int or None, got {every!r}")
        self.manager = manager
        self.every = every
        self._resume_dirs: list[Path] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._remove_resume_dirs()  # the Trainer has read them by its first step
        step = state.global_step
        if self.every is not None and step % self.every:
            return
        if not self.manager.should_save(step):
            return
        saved = {
            "model": kwargs["model"],
            "optimizer": kwargs["optimizer"],
            "scheduler": kwargs["lr_scheduler"],
            "rng": RNG(),
            "trainer_state": json.dumps(asdict(state), sort_keys=True),
        }
        handle = self.manager.save(step, saved)
        handle.wait("staged")  # the next step changes the parameters

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._remove_resume_dirs()
        self.manager.wait()

    def resume_checkpoint(
        self, trainer, step: int | None = None, directory: str | os.PathLike | None = None
    ) -> str | None:
        """Restore the newest step (or ``step``) and write it as a Trainer checkpoint folder;
        its path, for ``trainer.train(resume_from_checkpoint=...)``, or None if the run holds
        no step."""
        if self not in trainer.callback_handler.callbacks:
            raise ConfigError("this MtckptCallback is not one of the trainer's callbacks: pass it "
                              "in Trainer(callbacks=[...]) first")  # fmt: skip
        if step is None and self.manager.latest_step() is None:
            return None
        step, saved = self.manager.restore(step=step)
        run = self.manager.run
        missing = [key for key in _SAVED_KEYS if not isinstance(saved, dict) or key not in saved]
        if missing:
            raise StateMismatchError(
                f"step {step} of run {run!r} was not saved by MtckptCallback: it lacks {missing}"
            )
        if directory is None:
            root = Path(tempfile.mkdtemp(prefix=f"mtckpt-resume-{run}-"))
            self._resume_dirs.append(root)
        else:
            root = Path(directory)
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        if directory is not None:
            self._resume_dirs.append(folder)
        torch.save(saved["model"], folder / "pytorch_model.bin")
        torch.save(saved["optimizer"], folder / "optimizer.pt")
        torch.save(saved["scheduler"], folder / "scheduler.pt")
        args = trainer.args
        rng_file = (
            "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
        )
        torch.save(_trainer_rng_state(saved["rng"], args), folder / rng_file)
        (folder / "trainer_state.json").write_text(saved["trainer_state"], encoding="utf-8")
        log.info("run %r: step %d written to %s for the Trainer to resume from", run, step, folder)
        return str(folder)

    def _remove_resume_dirs(self) -> None:
        while self._resume_dirs:
            shutil.rmtree(self._resume_dirs.pop(), ignore_errors=True)


def _trainer_rng_state(saved: dict[str, Any], args) -> dict[str, Any]:
    """The saved generators in the Trainer's ``rng_state.pth`` format: set them, read them
    as the Trainer does, and put this process's own generators back."""
    own = RNG().state_dict()
    RNG().load_state_dict(saved)
    try:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available() and saved["torch_cuda"]:
            distributed = args.parallel_mode == ParallelMode.DISTRIBUTED
            cuda = torch.cuda.random
            state["cuda"] = cuda.get_rng_state_all() if distributed else cuda.get_rng_state()
    finally:
        RNG().load_state_dict(own)
    return state
