"""CheckpointManager save / restore across the memory and local tiers, on both backends."""

import json
import logging
import os

import numpy as np
import pytest

import mtckpt
from mtckpt import (
    CheckpointManager,
    ClosedError,
    LocalTier,
    MemoryTier,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedLeafError,
)
from states import assert_same_state, make_state

pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
def tiers(shm_dir, tmp_path):
    return {"memory": MemoryTier(str(shm_dir), keep=2), "local": LocalTier(str(tmp_path / "nvme"))}


def manager(tiers, run="exp", **kwargs):
    return CheckpointManager(run, tiers["memory"], tiers.get("local"), **kwargs)


def step_dir(tier, step, run="exp"):
    return os.path.join(tier.path, run, f"step-{step:012d}")


def test_save_then_restore_is_bit_exact(tiers):
    with manager(tiers) as mgr:
        for step in range(3):
            handle = mgr.save(step, make_state(step))
            assert handle.tiers == ("memory", "local")
        mgr.wait()
        step, state = mgr.restore()
    assert step == 2
    assert_same_state(state, make_state(2))


def test_save_returns_before_background_work_and_handle_tracks_stages(tiers):
    with manager(tiers) as mgr:
        handle = mgr.save(0, make_state(0))
        assert handle.done("staged")
        handle.wait("memory")
        assert os.path.exists(os.path.join(step_dir(tiers["memory"], 0), "COMMIT"))
        handle.wait()
        assert handle.done() and handle.exception() is None
        assert os.path.exists(os.path.join(step_dir(tiers["local"], 0), "COMMIT"))
        with pytest.raises(ValueError, match="unknown stage 'remote'"):
            handle.wait("remote")
        assert "done" in repr(handle)


def test_arrays_may_change_right_after_save(tiers):
    state = {"w": np.arange(1_000_000, dtype=np.float64)}
    with manager(tiers) as mgr:
        mgr.save(0, state)
        state["w"][:] = -1  # training continues to update in place
        mgr.wait()
        _, restored = mgr.restore()
    assert np.array_equal(restored["w"], np.arange(1_000_000, dtype=np.float64))


def test_restore_fills_target_arrays_in_place(tiers):
    saved = make_state(5)
    with manager(tiers) as mgr:
        mgr.save(5, saved)
        target = make_state(0)  # same structure, other values
        weights = target["model"]["embed.weight"]
        step, result = mgr.restore(target)
    assert step == 5
    assert result["model"]["embed.weight"] is weights
    assert_same_state(result, saved)


def test_restore_into_non_contiguous_and_fortran_targets(tiers):
    data = np.arange(24, dtype=np.int32).reshape(4, 6)
    with manager(tiers) as mgr:
        mgr.save(1, {"a": data, "b": data.T.copy()})
        base = np.zeros((4, 12), dtype=np.int32)
        strided = base[:, ::2]
        fortran = np.zeros((6, 4), dtype=np.int32, order="F")
        _, result = mgr.restore({"a": strided, "b": fortran})
    assert result["a"] is strided and np.array_equal(strided, data)
    assert result["b"] is fortran and np.array_equal(fortran, data.T)
    assert (base[:, 1::2] == 0).all()


def test_strided_and_byte_swapped_sources_are_saved_by_value(tiers):
    big_endian = np.arange(10, dtype=">f8")
    strided = np.arange(100, dtype=np.int16).reshape(10, 10)[::3, 1::2]
    with manager(tiers) as mgr:
        mgr.save(0, {"be": big_endian, "strided": strided})
        _, result = mgr.restore()
    assert result["be"].dtype == np.dtype("<f8") and np.array_equal(result["be"], big_endian)
    assert np.array_equal(result["strided"], strided) and result["strided"].flags.c_contiguous


def test_scalars_strings_bytes_and_special_floats_roundtrip(tiers):
    state = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "tiny": 5e-324,
        "neg0": -0.0,
        "big": 2**100,
        "s": "ünïcödé / ~",
        "b": b"\x00\xff" * 10,
        "ba": bytearray(b"xy"),
        "e": b"",
        "t": True,
        "n": None,
        "np32": np.float32(1.5),
        "npbool": np.bool_(True),
        "zero": np.zeros((0, 3), np.float32),
        "scalar0d": np.array(7, np.int8),
    }
    with manager(tiers) as mgr:
        mgr.save(0, state)
        _, result = mgr.restore()
    assert np.isnan(result["nan"]) and result["inf"] == float("-inf")
    assert result["tiny"].hex() == (5e-324).hex() and str(result["neg0"]) == "-0.0"
    assert result["big"] == 2**100 and result["s"] == state["s"]
    assert result["b"] == state["b"] and type(result["ba"]) is bytearray and result["ba"] == b"xy"
    assert result["e"] == b"" and result["t"] is True and result["n"] is None
    assert type(result["np32"]) is np.float32 and result["np32"] == 1.5
    assert type(result["npbool"]) is np.bool_
    assert result["zero"].shape == (0, 3) and result["scalar0d"].shape == ()


def test_stateful_objects_are_loaded(tiers):
    class Loader:
        def __init__(self, position):
            self.position = position

        def state_dict(self):
            return {"position": self.position, "order": np.arange(5)}

        def load_state_dict(self, state):
            self.position = state["position"]
            self.order = state["order"]

    with manager(tiers) as mgr:
        mgr.save(3, {"loader": Loader(42)})
        fresh = Loader(0)
        _, result = mgr.restore({"loader": fresh})
        assert result["loader"] is fresh and fresh.position == 42
        assert np.array_equal(fresh.order, np.arange(5))
        _, plain = mgr.restore()
        assert plain["loader"]["position"] == 42


def test_pickle_needs_opt_in_on_save_and_restore(tiers):
    import collections

    state = {"q": collections.deque([1, 2, 3])}
    with manager(tiers) as mgr:
        with pytest.raises(UnsupportedLeafError, match="'q'.*allow_pickle=True"):
            mgr.save(0, state)
    with manager(tiers, allow_pickle=True) as mgr:
        mgr.save(1, state)
        mgr.wait()
    with manager(tiers) as mgr:
        with pytest.raises(UnsupportedLeafError, match="key 'q' was saved with pickle"):
            mgr.restore()
        _, result = mgr.restore(allow_pickle=True)
    assert result["q"] == collections.deque([1, 2, 3])


def test_key_mismatch_lists_names_and_strict_false_restores_the_rest(tiers):
    with manager(tiers) as mgr:
        mgr.save(0, {"a": np.ones(3), "b": np.ones(2), "gone": 1})
        target = {"a": np.zeros(3), "b": np.zeros(2), "new": np.full(4, 7.0)}
        with pytest.raises(StateMismatchError) as info:
            mgr.restore(target)
        message = str(info.value)
        assert "missing from the checkpoint: ['new']" in message
        assert "not in the target: ['gone']" in message and "strict=False" in message
        assert np.array_equal(target["a"], np.zeros(3))  # nothing touched before the check
        _, result = mgr.restore(target, strict=False)
    assert np.array_equal(result["a"], np.ones(3)) and np.array_equal(
        result["new"], np.full(4, 7.0)
    )
    assert "gone" not in result


@pytest.mark.parametrize(
    "target, message",
    [
        (
            {"w": np.zeros((3, 2), np.float32)},
            r"key 'w': the checkpoint holds F32 \(2, 3\), the target expects F32 \(3, 2\)",
        ),
        (
            {"w": np.zeros((2, 3), np.float64)},
            r"key 'w': the checkpoint holds F32 \(2, 3\), the target expects F64 \(2, 3\)",
        ),
    ],
)
def test_shape_and_dtype_mismatch_name_the_key(tiers, target, message):
    with manager(tiers) as mgr:
        mgr.save(0, {"w": np.ones((2, 3), np.float32)})
        with pytest.raises(StateMismatchError, match=message):
            mgr.restore(target)


def test_array_target_for_a_non_array_leaf_and_read_only_target(tiers):
    with manager(tiers) as mgr:
        mgr.save(0, {"n": 3, "w": np.ones(2)})
        with pytest.raises(StateMismatchError, match="key 'n': the target is a numpy array"):
            mgr.restore({"n": np.zeros(1), "w": np.zeros(2)})
        frozen = np.zeros(2)
        frozen.flags.writeable = False
        with pytest.raises(StateMismatchError, match="key 'w': the target array is read-only"):
            mgr.restore({"n": 0, "w": frozen})


def test_steps_must_increase(tiers):
    with manager(tiers) as mgr:
        mgr.save(5, {"x": 1})
        with pytest.raises(StepExistsError, match="step 5 is not newer than step 5"):
            mgr.save(5, {"x": 1})
        with pytest.raises(StepExistsError, match="step 3 is not newer"):
            mgr.save(3, {"x": 1})
    with manager(tiers) as mgr:  # a new process sees what is on disk
        with pytest.raises(StepExistsError, match="step 4 is not newer than step 5.*delete"):
            mgr.save(4, {"x": 1})
        mgr.delete(5)
        mgr.save(4, {"x": 2})
        assert mgr.restore() == (4, {"x": 2})


@pytest.mark.parametrize(
    "step", [-1, 10**12, 1.0, True, "3", np.bool_(True), np.float64(2), np.int64(-1)]
)
def test_bad_step_values(tiers, step):
    with manager(tiers) as mgr:
        with pytest.raises((TypeError, ValueError), match="step"):
            mgr.save(step, {"x": 1})


@pytest.mark.parametrize("kind", [np.int64, np.uint32, np.int8])
def test_numpy_integer_steps_are_steps(tiers, kind):
    with manager(tiers) as mgr:
        assert mgr.should_save(kind(3))
        mgr.save(kind(3), {"x": 3}).wait()
        handle = mgr.save(kind(4), {"x": 4})
        assert type(handle.step) is int and handle.step == 4
        handle.wait()
        manifest = json.loads(open(os.path.join(step_dir(tiers["local"], 4), "rank-00000.json"))
                              .read())  # fmt: skip
        assert manifest["step"] == 4
        step, state = mgr.restore(step=kind(3))
        assert (type(step), step, state) == (int, 3, {"x": 3})
        mgr.delete(kind(4))
        assert mgr.steps() == {"memory": [3], "local": [3]}


def test_deleting_a_step_no_tier_holds_names_it_and_the_tiers(tiers):
    with manager(tiers) as mgr:
        mgr.save(1, {"x": 1}).wait()
        with pytest.raises(StepNotFoundError) as missing:
            mgr.delete(999)
        assert str(missing.value) == (
            f"cannot delete step 999 of run 'exp': no tier holds it (looked in memory tier "
            f"({tiers['memory'].path}), local tier ({tiers['local'].path}))"
        )
        assert mgr.steps() == {"memory": [1], "local": [1]}


@pytest.mark.parametrize(
    ("state", "named"),
    [
        ({"w\ud800": np.ones(3)}, "key 'w\\ud800' is not valid Unicode text"),
        ({"a": [{"\udfff": 1}]}, "key 'a/0/\\udfff' is not valid Unicode text"),
        ({"a": {"b": "text\ud800"}}, "key 'a/b': the string value is not valid Unicode text"),
    ],
)
def test_a_lone_surrogate_in_a_key_or_string_names_the_key(tiers, state, named):
    with manager(tiers) as mgr:
        with pytest.raises(UnsupportedLeafError) as refused:
            mgr.save(1, state)
        assert str(refused.value).startswith(named), str(refused.value)
        assert "surrogates not allowed at position" in str(refused.value)
        assert mgr.steps() == {"memory": [], "local": []}
        mgr.save(1, {"w": np.ones(3)}).wait()  # nothing was staged for the refused one


def test_unknown_step_and_empty_run(tiers):
    with manager(tiers) as mgr:
        with pytest.raises(
            StepNotFoundError,
            match=r"no checkpoint of run 'exp' is complete for rank 0 in .* holds none\)",
        ):
            mgr.restore()
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
        with pytest.raises(StepNotFoundError, match=r"step 7 .* complete steps: \[2, 1\]"):
            mgr.restore(step=7)
        assert mgr.restore(step=1) == (1, {"x": 1})
    assert issubclass(StepNotFoundError, FileNotFoundError)


def test_schedules_and_retention_per_tier(shm_dir, tmp_path):
    tiers = {
        "memory": MemoryTier(str(shm_dir), keep=3),
        "local": LocalTier(str(tmp_path / "l"), every=4, keep=2),
    }
    with manager(tiers) as mgr:
        due = []
        for step in range(11):
            handle = mgr.save(step, {"x": np.full(10, step)})
            due.append(handle.tiers)
            if "local" in handle.tiers:
                handle.wait()  # keep the local tier from falling behind (see the next test)
        mgr.wait()
        assert due[:5] == [("memory", "local")] + [("memory",)] * 3 + [("memory", "local")]
        assert mgr.steps() == {"memory": [8, 9, 10], "local": [4, 8]}
        assert sorted(os.listdir(os.path.join(tiers["local"].path, "exp"))) == [
            ".rank-00000.lock",
            "step-000000000004",
            "step-000000000008",
        ]
        assert mgr.latest_step() == 10


def test_a_slower_tier_that_falls_behind_takes_the_newest_due_step(tiers, caplog):
    import threading

    from mtckpt.tiers.local import LocalStorage

    entered, gate = threading.Event(), threading.Event()
    real_write = LocalStorage.write_stream

    def slow_write(self, *args, **kwargs):
        entered.set()
        gate.wait(30)  # a slow disk: hold the local worker on its first step
        return real_write(self, *args, **kwargs)

    with manager(tiers) as mgr:
        LocalStorage.write_stream = slow_write
        try:
            first = mgr.save(0, {"x": 0})
            assert entered.wait(30)
            skipped = [mgr.save(step, {"x": step}) for step in (1, 2)]
            last = mgr.save(3, {"x": 3})
            for handle in skipped + [last]:
                handle.wait("memory")
            gate.set()
            mgr.wait()
        finally:
            LocalStorage.write_stream = real_write
        assert first.skipped == frozenset() and last.skipped == frozenset()
        assert [h.skipped for h in skipped] == [frozenset({"local"})] * 2
        assert mgr.steps()["local"] == [0, 3]
    assert "local tier: skipping step 1 because step 3 is already due" in caplog.text


def test_nothing_due_saves_nothing(shm_dir):
    tiers = {"memory": MemoryTier(str(shm_dir), every=5)}
    with manager(tiers) as mgr:
        assert not mgr.should_save(3) and mgr.should_save(5)
        handle = mgr.save(3, {"x": 1})
        assert handle.tiers == () and handle.done()
        handle.wait("memory")  # not due: nothing to wait for
        mgr.save(5, {"x": 1})
        forced = mgr.save(6, {"x": 1}, force=True)
        mgr.wait()
        assert forced.tiers == ("memory",)
        assert mgr.steps() == {"memory": [5, 6]}


def test_interval_schedule(shm_dir, tmp_path, monkeypatch):
    import mtckpt.manager as manager_module

    clock = [1000.0]
    monkeypatch.setattr(manager_module.time, "monotonic", lambda: clock[0])
    tiers = {
        "memory": MemoryTier(str(shm_dir)),
        "local": LocalTier(str(tmp_path / "l"), every=None, interval=30),
    }
    with manager(tiers) as mgr:
        due = []
        for step in range(6):
            due.append(mgr.save(step, {"x": step}).tiers)
            clock[0] += 12.0
    assert [("local" in d) for d in due] == [True, False, False, True, False, False]


def test_memory_slots_are_reused_across_steps(shm_dir):
    tiers = {"memory": MemoryTier(str(shm_dir), keep=2)}
    state = {"w": np.ones(1 << 20, np.float32)}
    inodes = []
    with manager(tiers) as mgr:
        for step in range(8):
            mgr.save(step, state).wait()
            path = os.path.join(step_dir(tiers["memory"], step), "rank-00000.safetensors")
            inodes.append(os.stat(path).st_ino)
        mgr.wait()
        slots = os.listdir(os.path.join(shm_dir, "exp", ".slots", "rank-00000"))
    assert len(set(inodes)) == 3, inodes  # keep + 1 files serve every step
    assert len(slots) == 1  # one spare


def test_data_file_is_safetensors_readable_and_local_copy_is_identical(tiers):
    import safetensors.numpy as safetensors_numpy

    state = make_state(7)
    with manager(tiers) as mgr:
        mgr.save(7, state).wait()
    memory_file = os.path.join(step_dir(tiers["memory"], 7), "rank-00000.safetensors")
    local_file = os.path.join(step_dir(tiers["local"], 7), "rank-00000.safetensors")
    with open(memory_file, "rb") as a, open(local_file, "rb") as b:
        assert a.read() == b.read()
    from safetensors import safe_open

    with safe_open(local_file, "np") as f:
        assert f.metadata() == {"format": "mtckpt", "run": "exp", "step": "7", "rank": "0",
                                "world_size": "1"}  # fmt: skip
    loaded = safetensors_numpy.load_file(local_file)
    assert np.array_equal(loaded["model/embed.weight"], state["model"]["embed.weight"])
    assert np.array_equal(
        loaded["model/layers/1/attn~1qkv"], state["model"]["layers"][1]["attn/qkv"]
    )
    assert np.array_equal(loaded["mask"], state["mask"]) and loaded["mask"].dtype == np.bool_
    assert loaded["blob"].tobytes() == state["blob"]
    manifest = json.loads(open(os.path.join(step_dir(tiers["local"], 7), "rank-00000.json")).read())
    assert manifest["format_version"] == 1 and manifest["step"] == 7
    with open(local_file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert (8 + header_len) % 4096 == 0 == manifest["data_file"]["data_start"] % 4096


def test_restore_from_local_when_memory_is_gone(tiers):
    import shutil

    with manager(tiers) as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
    shutil.rmtree(tiers["memory"].path)  # node reboot: tmpfs is empty
    with manager(tiers) as mgr:
        assert mgr.steps()["memory"] == []
        step, state = mgr.restore()
    assert step == 2
    assert_same_state(state, make_state(2))


def test_closed_manager_refuses_work(tiers):
    mgr = manager(tiers)
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(ClosedError, match="run 'exp' is closed"):
        mgr.save(0, {})
    with pytest.raises(ClosedError):
        mgr.restore()


def test_chunked_checksums_with_small_chunks_and_many_threads(tiers):
    state = {f"t{i}": np.random.default_rng(i).standard_normal(5000 + i) for i in range(20)}
    with manager(tiers, chunk_size=4096, threads=4) as mgr:
        mgr.save(0, state).wait()
        manifest = json.loads(
            open(os.path.join(step_dir(tiers["memory"], 0), "rank-00000.json")).read()
        )
        assert len(manifest["data_file"]["crc32c"]) > 100
        _, result = mgr.restore()
    for key in state:
        assert np.array_equal(result[key], state[key])


def test_public_names():
    assert set(mtckpt.__all__) >= {"CheckpointManager", "MemoryTier", "LocalTier", "SaveHandle"}
    for name in mtckpt.__all__:
        assert hasattr(mtckpt, name)


def test_logs_which_tier_restored(tiers, caplog):
    with manager(tiers) as mgr:
        mgr.save(0, {"x": 1})
        with caplog.at_level(logging.INFO, logger="mtckpt"):
            mgr.restore()
    assert "restored step 0 from the memory tier" in caplog.text


class LazyOptimizer:
    """Like torch optimizers: no per-parameter state until the first step."""

    def __init__(self):
        self.state = {}
        self.lr = 0.1

    def state_dict(self):
        return {"state": self.state, "lr": self.lr}

    def load_state_dict(self, state):
        self.state, self.lr = state["state"], state["lr"]


def test_stateful_target_takes_the_saved_structure_of_its_state(tiers):
    trained = LazyOptimizer()
    trained.state = {0: {"m": np.arange(4.0)}, 1: {"m": np.ones(2)}}
    trained.lr = 0.05
    with manager(tiers) as mgr:
        mgr.save(1, {"opt": trained, "w": np.ones(3)})
        fresh = LazyOptimizer()
        w = np.zeros(3)
        _, result = mgr.restore({"opt": fresh, "w": w})
    assert result["opt"] is fresh and fresh.lr == 0.05
    assert list(fresh.state) == [0, 1] and np.array_equal(fresh.state[0]["m"], np.arange(4.0))
    assert result["w"] is w and np.array_equal(w, np.ones(3))


def test_stateful_target_keeps_its_own_entries_when_not_strict(tiers):
    with manager(tiers) as mgr:
        mgr.save(1, {"opt": LazyOptimizer()})
        fresh = LazyOptimizer()
        fresh.state = {7: {"m": np.full(2, 7.0)}}  # not in the checkpoint
        with pytest.raises(
            StateMismatchError, match=r"missing from the checkpoint: \['opt/state/7/m'\]"
        ):
            mgr.restore({"opt": fresh})
        mgr.restore({"opt": fresh}, strict=False)
    assert np.array_equal(fresh.state[7]["m"], np.full(2, 7.0))


@pytest.mark.parametrize("skipped", [["a"], ["b"], ["a", "c"], ["b", "c"]])
def test_skipping_leaves_still_verifies_every_byte_once(tiers, skipped):
    state = {
        "a": np.arange(1000.0),
        "b": np.arange(10, dtype=np.int8),
        "c": np.ones(77, np.float32),
    }
    with manager(tiers, chunk_size=4096) as mgr:
        mgr.save(0, state)
        kept = {k: np.zeros_like(v) for k, v in state.items() if k not in skipped}
        step, result = mgr.restore(kept, strict=False)  # the others are read checksum-only
    assert step == 0 and set(result) == set(kept)
    for key in kept:
        assert np.array_equal(result[key], state[key])


def test_async_staging_copies_off_the_training_thread(tiers):
    big = {"w": np.zeros(6 * 1024 * 1024, dtype=np.float64), "step": 0}  # 48 MiB
    returned_early = False
    with manager(tiers, staging="async") as mgr:
        for step in range(5):
            big["w"][:8] = step
            big["step"] = step
            handle = mgr.save(step, big)
            returned_early |= not handle.done("staged")  # the copy is still running
            handle.wait("staged")  # from here on the arrays may change
            big["w"][:8] = -1
        mgr.wait()
        for step in (3, 4):
            _, restored = mgr.restore(step=step)
            assert restored["step"] == step and (restored["w"][:8] == step).all()
            assert (restored["w"][8:] == 0).all()
    assert returned_early


def test_staging_mode_is_validated(tiers):
    with pytest.raises(mtckpt.ConfigError, match="staging must be 'blocking' or 'async'"):
        manager(tiers, staging="lazy")
