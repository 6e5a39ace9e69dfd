"""The transformers callback: a Trainer SIGKILLed mid-epoch resumes from mtckpt bit-identical
to an uninterrupted run (data order, skipped batches, dropout, optimizer, schedule); bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import hf_training as training  # noqa: E402
import torch  # noqa: E402

import mtckpt  # noqa: E402
from mtckpt.integrations.transformers import MtckptCallback  # noqa: E402
from states import assert_same_tensors  # noqa: E402

KILL_AT = 17  # mid-epoch 2 (10 steps an epoch)


def test_killed_trainer_resumes_from_mtckpt_bit_identical(tmp_path):
    uninterrupted = training.trainer(tmp_path / "reference")
    uninterrupted.train()

    killed = subprocess.run(
        [sys.executable, training.__file__, "--root", str(tmp_path), "--kill-at", str(KILL_AT)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    mgr = training.manager(tmp_path)
    assert mgr.steps() == {"memory": [KILL_AT - 1, KILL_AT], "local": [10, 15]}
    callback = MtckptCallback(mgr)
    trainer = training.trainer(tmp_path, [callback])  # its model starts from other weights
    folder = callback.resume_checkpoint(trainer)
    assert folder.endswith(f"checkpoint-{KILL_AT}")
    with open(os.path.join(folder, "trainer_state.json")) as file:
        assert json.load(file)["global_step"] == KILL_AT
    trainer.train(resume_from_checkpoint=folder)
    mgr.close()

    assert not os.path.exists(folder)  # removed once the Trainer had read it
    total = training.EPOCHS * training.STEPS_PER_EPOCH
    assert trainer.state.global_step == uninterrupted.state.global_step == total
    assert trainer.state.epoch == uninterrupted.state.epoch
    assert_same_tensors(trainer.model.state_dict(), uninterrupted.model.state_dict(), "model")
    assert_same_tensors(
        trainer.optimizer.state_dict(), uninterrupted.optimizer.state_dict(), "optimizer"
    )
    assert_same_tensors(
        trainer.lr_scheduler.state_dict(), uninterrupted.lr_scheduler.state_dict(), "scheduler"
    )
    # the log of the steps before the kill came back with the TrainerState
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [5, 10, 15, 20, 25, 30]


def test_fresh_run_saves_on_the_tiers_schedule(tmp_path):
    mgr = training.manager(tmp_path)
    callback = MtckptCallback(mgr, every=4)
    trainer = training.trainer(tmp_path, [callback])
    assert callback.resume_checkpoint(trainer) is None  # nothing to resume from
    trainer.train()
    # every=4 offers steps 4, 8, ..., 28; memory keeps the newest 2, local takes multiples of 5
    assert mgr.steps() == {"memory": [24, 28], "local": [20]}
    step, saved = mgr.restore()
    assert step == 28 and json.loads(saved["trainer_state"])["global_step"] == 28
    mgr.close()


def test_resume_bad_input(tmp_path):
    mgr = training.manager(tmp_path)
    callback = MtckptCallback(mgr)
    trainer = training.trainer(tmp_path, [callback])
    with pytest.raises(mtckpt.ConfigError, match="not one of the trainer's callbacks"):
        MtckptCallback(mgr).resume_checkpoint(trainer)
    with pytest.raises(mtckpt.StepNotFoundError, match="step 99 of run 'hf'"):
        callback.resume_checkpoint(trainer, step=99)
    mgr.save(5, {"weights": torch.ones(3)}).wait()
    with pytest.raises(mtckpt.StateMismatchError, match="step 5 of run 'hf' was not saved by"):
        callback.resume_checkpoint(trainer)
    with pytest.raises(mtckpt.ConfigError, match="every must be a positive int"):
        MtckptCallback(mgr, every=0)
    mgr.close()
