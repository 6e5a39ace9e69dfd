"""The Lightning plugin: a run SIGKILLed mid-epoch resumes from mtckpt bit-identical to an
uninterrupted one; pointers, removal, repeated steps and bad input."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys

import pytest

pl = pytest.importorskip("lightning.pytorch")
import lightning_training as training  # noqa: E402
import torch  # noqa: E402

import mtckpt  # noqa: E402
from mtckpt.adapters.lightning import MtckptCheckpointIO, Pointer, read_pointer  # noqa: E402
from states import assert_same_tensors  # noqa: E402

EPOCHS = 5
KILL_AT = 14  # mid-epoch 3: the newest checkpoint is the end of epoch 2, step 12


def test_killed_run_resumes_from_mtckpt_bit_identical(tmp_path):
    pl.seed_everything(0, verbose=False)
    reference = training.MLP()
    uninterrupted = training.trainer(None, EPOCHS)
    uninterrupted.fit(reference, training.data())

    killed = subprocess.run(
        [sys.executable, training.__file__, "--root", str(tmp_path), "--epochs", str(EPOCHS),
         "--kill-at", str(KILL_AT)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.stat().st_size < 1024  # a pointer, not a torch checkpoint
    assert read_pointer(last).step == 12 and read_pointer(last).run == training.RUN
    io = training.plugin(tmp_path)
    held = io.manager.steps()
    assert held["memory"] == [12] and held["local"] == [12]  # 4 and 8 removed with their pointers

    pl.seed_everything(1, verbose=False)  # the restore, not the seed, must bring the state back
    resumed = training.MLP()
    trainer = training.trainer(tmp_path, EPOCHS, io=io)
    trainer.fit(resumed, training.data(), ckpt_path="last")

    assert resumed.loaded_step == 12
    assert trainer.global_step == uninterrupted.global_step == EPOCHS * training.STEPS_PER_EPOCH
    assert_same_tensors(resumed.state_dict(), reference.state_dict(), "model")
    assert_same_tensors(
        trainer.optimizers[0].state_dict(), uninterrupted.optimizers[0].state_dict(), "optimizer"
    )
    assert_same_tensors(
        trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        uninterrupted.lr_scheduler_configs[0].scheduler.state_dict(),
        "scheduler",
    )
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=4-step=20.ckpt", "last.ckpt"]
    with mtckpt.CheckpointManager(
        training.RUN,
        mtckpt.MemoryTier(path=str(tmp_path / "mem")),
        mtckpt.LocalTier(path=str(tmp_path / "local")),
    ) as mgr:
        assert mgr.steps() == {"memory": [20], "local": [20]}


def test_last_checkpoint_as_a_link_to_a_pointer(tmp_path):
    io = training.plugin(tmp_path)
    every_3_steps = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last="link"
    )
    trainer = pl.Trainer(max_steps=7, plugins=[io], callbacks=[every_3_steps], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = training.MLP()
    trainer.fit(model, training.data())

    last = tmp_path / "ckpt" / "last.ckpt"
    assert os.readlink(last) == "epoch=1-step=6.ckpt"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert io.manager.steps() == {"memory": [6], "local": [6]}  # step 3 left with its pointer
    loaded = io.load_checkpoint(last)
    assert loaded["global_step"] == 6
    assert list(loaded["state_dict"]) == list(model.state_dict())
    io.teardown()


def test_plugin_built_from_a_config_file(tmp_path):
    config = tmp_path / "mtckpt.toml"
    memory = tmp_path / "mem"
    config.write_text(f'run = "cfg"\n[memory]\npath = "{memory}"\n')
    io = MtckptCheckpointIO(config=config)
    io.save_checkpoint(checkpoint(2), tmp_path / "a.ckpt")
    io.teardown()  # closes the manager it built; the next use builds another
    assert read_pointer(tmp_path / "a.ckpt") == Pointer("cfg", 2, tuple(checkpoint(2)))
    assert_same_tensors(io.load_checkpoint(tmp_path / "a.ckpt"), checkpoint(2))
    io.teardown()


def checkpoint(step: int, scale: float = 1.0) -> dict:
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale,
                       "b": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(float(step))}},
                              "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}],
        "hyper_parameters": {"lr": 0.1, "layers": [4, 16, 1], "name": None},
    }  # fmt: skip


def mtckpt_io(tmp_path, **options) -> MtckptCheckpointIO:
    return MtckptCheckpointIO(
        run="unit",
        memory=mtckpt.MemoryTier(path=str(tmp_path / "mem"), keep=10),
        local=mtckpt.LocalTier(path=str(tmp_path / "local"), keep=10),
        **options,
    )


def test_same_step_twice_refers_to_one_copy_removed_with_its_last_pointer(tmp_path):
    io = mtckpt_io(tmp_path)
    first, last = tmp_path / "ckpt" / "step=5.ckpt", tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint(checkpoint(5), first)
    io.save_checkpoint(checkpoint(5), last)
    io.wait()
    assert read_pointer(first) == read_pointer(last) == Pointer("unit", 5, tuple(checkpoint(5)))
    assert io.manager.steps() == {"memory": [5], "local": [5]}
    assert_same_tensors(io.load_checkpoint(last), checkpoint(5))

    io.remove_checkpoint(first)
    io.wait()
    assert not first.exists()
    assert io.manager.steps() == {"memory": [5], "local": [5]}  # last.ckpt still refers to it
    io.remove_checkpoint(last)
    io.wait()
    assert io.manager.steps() == {"memory": [], "local": []}
    io.teardown()


def test_overwritten_pointer_releases_its_step_and_map_location(tmp_path):
    io = mtckpt_io(tmp_path)
    last = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint(checkpoint(1), last)
    io.save_checkpoint(checkpoint(2, scale=2.0), last)
    io.wait()
    assert read_pointer(last).step == 2
    assert io.manager.steps() == {"memory": [2], "local": [2]}
    loaded = io.load_checkpoint(last, map_location="cpu")
    assert_same_tensors(loaded, checkpoint(2, scale=2.0))
    with pytest.raises(TypeError, match="map_location"):
        io.load_checkpoint(last, map_location=lambda storage, loc: storage)
    io.teardown()


def test_pointer_to_a_step_no_tier_holds(tmp_path):
    io = mtckpt_io(tmp_path)
    path = tmp_path / "ghost.ckpt"
    path.write_text(Pointer("unit", 99, ("state_dict",)).to_json())
    with pytest.raises(mtckpt.StepNotFoundError, match=r"ghost\.ckpt.*step 99 of run 'unit'"):
        io.load_checkpoint(path)
    path.write_text(Pointer("other", 3, ("state_dict",)).to_json())
    with pytest.raises(mtckpt.ConfigError, match="step 3 of run 'other'.*run 'unit'"):
        io.load_checkpoint(path)
    path.write_text(json.dumps({"format": "mtckpt-pointer", "version": 1, "run": "unit"}))
    with pytest.raises(mtckpt.CorruptCheckpointError, match="malformed mtckpt pointer"):
        io.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        io.load_checkpoint(tmp_path / "nothing.ckpt")
    io.teardown()


def test_torch_checkpoint_file_is_loaded_as_lightning_would(tmp_path):
    io = mtckpt_io(tmp_path)
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint(3), path)
    assert_same_tensors(io.load_checkpoint(path), checkpoint(3))
    io.teardown()


def test_objects_need_allow_pickle(tmp_path):
    saved = checkpoint(4)
    saved["hyper_parameters"]["warmup"] = datetime.timedelta(seconds=90)
    io = mtckpt_io(tmp_path / "strict")
    with pytest.raises(mtckpt.UnsupportedLeafError, match="hyper_parameters/warmup.*allow_pickle"):
        io.save_checkpoint(saved, tmp_path / "strict.ckpt")
    io.teardown()
    assert not (tmp_path / "strict.ckpt").exists()

    io = mtckpt_io(tmp_path / "pickle", allow_pickle=True)
    io.save_checkpoint(saved, tmp_path / "pickled.ckpt")
    assert_same_tensors(io.load_checkpoint(tmp_path / "pickled.ckpt"), saved)
    with pytest.raises(mtckpt.MtckptError, match="pickle"):
        io.load_checkpoint(tmp_path / "pickled.ckpt", weights_only=True)
    io.teardown()


def test_steps_left_without_pointers_by_a_killed_process_are_replaced(tmp_path):
    io = mtckpt_io(tmp_path)
    resume_from = tmp_path / "ckpt" / "step=5.ckpt"
    io.save_checkpoint(checkpoint(5), resume_from)
    io.manager.save(10, checkpoint(10))  # killed before its pointer was written
    io.teardown()

    io = mtckpt_io(tmp_path)
    io.load_checkpoint(resume_from)
    io.save_checkpoint(checkpoint(10, scale=3.0), tmp_path / "ckpt" / "step=10.ckpt")
    assert_same_tensors(io.load_checkpoint(tmp_path / "ckpt" / "step=10.ckpt"),
                        checkpoint(10, scale=3.0))  # fmt: skip
    io.teardown()

    io = mtckpt_io(tmp_path)  # not resuming: the run's steps are another training's
    with pytest.raises(mtckpt.StepExistsError, match="step 7 is not newer than step 10"):
        io.save_checkpoint(checkpoint(7), tmp_path / "other" / "step=7.ckpt")
    io.teardown()

    io = mtckpt_io(tmp_path)  # step 10 has a pointer now: going back to step 5 is refused
    io.load_checkpoint(resume_from)
    with pytest.raises(mtckpt.StepExistsError, match=r"step\(s\) \[10\].*refer to"):
        io.save_checkpoint(checkpoint(10), tmp_path / "ckpt" / "again.ckpt")
    io.teardown()


def test_manager_of_several_ranks_is_refused(tmp_path):
    mgr = mtckpt.CheckpointManager(
        "ranks", mtckpt.MemoryTier(path=str(tmp_path / "mem")), rank=0, world_size=2
    )
    with pytest.raises(mtckpt.ConfigError, match="world size 2.*rank=0, world_size=1"):
        MtckptCheckpointIO(mgr)
    with pytest.raises(TypeError, match="not both"):
        MtckptCheckpointIO(mgr, run="x")
    mgr.close()
