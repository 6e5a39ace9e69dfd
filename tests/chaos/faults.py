"""Random fault-injection trials on real tiers: steps saved to node memory (tmpfs), local
disk and, in some trials, an S3 endpoint (moto_server over HTTP, through s3fs); then random
damage to their files (flipped bytes, truncation, an emptied, deleted or garbage file) and
to whole tiers (wiped, mounted read-only); then a new manager, its start-up retention
included, restores into a target.

The oracle, per trial: a step whose files are untouched on some tier is intact. Restore
must return exactly one saved step, bit-exact, no older than the newest intact step (so
retention kept it); a damaged copy may still be used only where the damage left what it
read valid (a flipped digit of COMMIT's world size, say), and then it must still be
bit-exact. With no intact step, restore may instead raise a named error (an MtckptError)
and must leave the target as it was.

``run_trials`` returns the counts of outcomes and of faults injected; the tests and the
soak call it, and docs/reliability.md reports a soak's counts.
"""

from __future__ import annotations

import collections
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np

from mtckpt import CheckpointManager, LocalTier, MemoryTier, MtckptError, ObjectTier
from states import assert_same_state, make_state

RUN = "faults"
FILE_FAULTS = ("flip", "flip_many", "truncate", "empty", "delete", "garbage")
FILES = {"data": "rank-00000.safetensors", "manifest": "rank-00000.json", "commit": "COMMIT"}
CHUNK = 16 * 1024  # small chunks: many checksums per file
KEEP = 2
RESTORED, NAMED_ERROR = "restored a saved step bit-exact", "raised a named error"


def damaged(data: bytes, kind: str, rng: random.Random) -> bytes | None:
    """``data`` after the fault ``kind``; None for a deleted file."""
    if kind == "delete":
        return None
    out = bytearray(data)
    if kind in ("flip", "flip_many") and out:
        for _ in range(1 if kind == "flip" else rng.randint(2, 50)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate" and out:
        del out[rng.randrange(len(out)) :]
    elif kind == "empty":
        out.clear()
    elif kind == "garbage":
        out[:] = rng.randbytes(rng.randint(1, 4096))
    return bytes(out)


class Trial:
    """One trial: its tiers, the steps saved, the faults injected and which steps they hit."""

    def __init__(self, base: Path, rng: random.Random, s3: tuple[str, dict] | None) -> None:
        self.rng = rng
        self.memory = Path("/dev/shm") / f"mtckpt-faults-{uuid.uuid4().hex[:10]}"
        self.local = base / "local"
        self.s3 = s3  # (bucket, storage options) or None
        self.steps = list(range(1, rng.randint(2, 4) + 1))
        self.broken: dict[int, set[str]] = collections.defaultdict(set)  # step -> tiers
        self.faults: list[str] = []
        self.mounts: list[Path] = []

    def names(self) -> list[str]:
        return ["memory", "local"] + (["remote"] if self.s3 else [])

    def manager(self) -> CheckpointManager:
        tiers = {"memory": MemoryTier(str(self.memory), keep=KEEP),
                 "local": LocalTier(str(self.local), keep=KEEP)}  # fmt: skip
        if self.s3:
            bucket, options = self.s3
            tiers["remote"] = ObjectTier(url=f"s3://{bucket}", keep=KEEP, compression=None,
                                         storage_options=options)  # fmt: skip
        return CheckpointManager(RUN, chunk_size=CHUNK, **tiers)

    def save(self) -> None:
        with self.manager() as mgr:
            for step in self.steps:
                mgr.save(step, make_state(step, scale=4)).wait()

    def _file(self, tier: str, step: int, name: str):
        step_dir = f"{RUN}/step-{step:012d}/{FILES[name]}"
        if tier == "remote":
            return f"{self.s3[0]}/{step_dir}"
        return (self.memory if tier == "memory" else self.local) / step_dir

    def _fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.s3[1])

    def _rewrite(self, tier: str, step: int, name: str, kind: str) -> bool:
        """Apply ``kind`` to one file; False if the file is not there."""
        path = self._file(tier, step, name)
        if tier == "remote":
            fs = self._fs()
            if not fs.exists(path):
                return False
            data = damaged(fs.cat_file(path), kind, self.rng)
            fs.rm_file(path) if data is None else fs.pipe_file(path, data)
            return True
        if not path.exists():
            return False
        data = damaged(path.read_bytes(), kind, self.rng)
        path.unlink() if data is None else path.write_bytes(data)
        return True

    def inject(self) -> None:
        for _ in range(self.rng.randint(1, 4)):
            tier = self.rng.choice(self.names())
            if tier != "remote" and self.rng.random() < 0.08:
                shutil.rmtree(self.memory if tier == "memory" else self.local, ignore_errors=True)
                self.faults.append(f"{tier}: tier wiped")
                for step in self.steps:
                    self.broken[step].add(tier)
                continue
            step = self.rng.choice(self.steps[-KEEP:])  # the steps retention kept
            name, kind = self.rng.choice(list(FILES)), self.rng.choice(FILE_FAULTS)
            if self._rewrite(tier, step, name, kind):
                self.faults.append(f"{tier}: {name} file {kind}")
                self.broken[step].add(tier)
        if self.rng.random() < 0.1 and self.local.exists():
            subprocess.run(["mount", "--bind", str(self.local), str(self.local)], check=True)
            self.mounts.append(self.local)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.local)], check=True)
            self.faults.append("local: tier read-only")

    def newest_intact(self) -> int | None:
        """The newest step untouched on some tier, among those retention kept when saving."""
        kept = self.steps[-KEEP:]
        return max((s for s in kept if set(self.names()) - self.broken[s]), default=None)

    def restore(self) -> str:
        """Restore into a fresh target and check it against the oracle; the outcome."""
        intact = self.newest_intact()
        target = make_state(0, scale=4)
        before = {key: value.tobytes() for key, value in arrays(target)}
        try:
            with self.manager() as mgr:
                step, state = mgr.restore(target)
        except MtckptError as exc:
            assert intact is None, (
                f"step {intact} is intact, yet restore raised {type(exc).__name__}: {exc} "
                f"(faults: {self.faults})"
            )
            for key, value in arrays(target):
                assert value.tobytes() == before[key], f"{key} changed (faults: {self.faults})"
            return NAMED_ERROR
        assert step in self.steps and step >= (intact or 0), (
            f"restored step {step}; the newest intact step is {intact} (faults: {self.faults})"
        )
        assert_same_state(state, make_state(step, scale=4))
        return RESTORED

    def close(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", str(path)], check=False)
        shutil.rmtree(self.memory, ignore_errors=True)


def arrays(state, prefix=""):
    """(path, array) for every numpy array in a nested state."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from arrays(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from arrays(value, f"{prefix}/{index}")
    elif isinstance(state, np.ndarray):
        yield prefix, state


def run_trials(base: Path, trials: int, seed: int, moto=None) -> collections.Counter:
    """``trials`` random trials (about a third with the object tier when ``moto`` is an
    endpoint): the counts of outcomes and of each fault injected. The first failing
    trial raises AssertionError naming its seed and faults."""
    counts: collections.Counter = collections.Counter()
    for index in range(trials):
        rng = random.Random(seed * 1_000_003 + index)
        directory = base / f"trial-{index}"
        directory.mkdir(parents=True)
        s3 = (moto.make_bucket(), moto.options()) if moto and rng.random() < 0.35 else None
        trial = Trial(directory, rng, s3)
        try:
            trial.save()
            trial.inject()
            try:
                outcome = trial.restore()
            except AssertionError as exc:
                raise AssertionError(f"trial {index} of seed {seed}: {exc}") from None
        finally:
            trial.close()
            shutil.rmtree(directory, ignore_errors=True)
        counts[f"outcome: {outcome}"] += 1
        counts["trials with the object tier" if s3 else "trials with memory and local"] += 1
        for fault in trial.faults:
            counts[f"fault: {fault}"] += 1
    return counts
