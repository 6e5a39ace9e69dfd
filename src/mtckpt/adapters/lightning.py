"""PyTorch Lightning: Lightning's checkpoints kept in mtckpt's tiers.

::

    import lightning.pytorch as pl
    import mtckpt
    from mtckpt.integrations.lightning import MtckptCheckpointIO

    io = MtckptCheckpointIO(run="exp1", local=mtckpt.LocalTier("/mnt/nvme/ckpt", every=10))
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath="ckpt", every_n_epochs=1, save_last=True)
    trainer = pl.Trainer(plugins=[io], callbacks=[checkpoints])
    trainer.fit(model, data, ckpt_path="last")

The plugin takes a :class:`mtckpt.CheckpointManager`, or builds one from the same keyword
arguments (``run=``, ``memory=``, ``local=``, ...) and ``CheckpointManager.from_config``
(``config=`` a TOML file, ``MTCKPT_*`` variables). Lightning's checkpoint dict is saved as
mtckpt step ``checkpoint["global_step"]``: ``save_checkpoint`` returns once it is copied
into node memory, like ``CheckpointManager.save``.

Lightning keeps its checkpoints by path (``ModelCheckpoint`` names, rotates and removes
them; ``fit(ckpt_path=...)`` takes one; ``"last"`` is the newest ``last*.ckpt``). At each
path the plugin writes a small JSON pointer naming the run and step, once the step is
committed in node memory: a process killed meanwhile leaves the previous pointer, never one
to a step that is not complete. ``load_checkpoint`` follows the pointer and restores that
step (tensors on the CPU, ``map_location`` may name a device); a path holding a regular
``torch.save`` checkpoint is read as Lightning would, so training can move onto mtckpt.
``remove_checkpoint`` removes the pointer. A step that no pointer refers to any more (its
pointer removed, or its path, such as ``last.ckpt``, written again) is removed from every
tier at the next save or ``teardown`` after the saves in progress are done; pointers are
looked for in its directory and among those this plugin wrote. The tiers' ``keep`` applies
as well: keep at least as many steps as the checkpoints Lightning holds (``save_top_k``,
plus "last"), or a pointer may outlive its step (loading it raises ``StepNotFoundError``).

A second save at the same global step (the "last" checkpoint after a top-k one, as
``save_last`` does) refers to the step already saved, as ``save_last="link"`` would. A save
at a step the run already holds is refused (``StepExistsError``: steps must increase),
except after resuming when no pointer refers to the newer steps: those were left by the
killed process before it wrote their pointers, and are replaced.

Lightning's checkpoint holds Python values besides tensors (hyperparameters, loop and
callback states); JSON-like ones are saved as they are. Any other object (in
``hyper_parameters``, say) raises ``UnsupportedLeafError`` naming its key, unless the
manager has ``allow_pickle=True``. ``load_checkpoint(weights_only=True)`` never unpickles.

``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and cannot follow
a pointer: ``torch.save(io.load_checkpoint(path), "model.ckpt")`` makes a regular file.
Pointers must be local paths. Lightning saves from global rank 0 only, so the manager is
rank 0 of a world of 1 (other ranks load from the same node's tiers, or a shared one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from ..errors import (
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    StepExistsError,
    StepNotFoundError,
)
from ..manager import CheckpointManager
from ..pipeline.handle import SaveHandle

log = logging.getLogger(__name__)

__all__ = ["MtckptCheckpointIO"]

POINTER_FORMAT = "mtckpt-pointer"
POINTER_VERSION = 1
_MAX_POINTER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Pointer:
    """What a checkpoint path refers to: a step of a run, and the top-level keys of the
    checkpoint Lightning saved there."""

    run: str
    step: int
    keys: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"format": POINTER_FORMAT, "version": POINTER_VERSION, "run": self.run,
                           "step": self.step, "keys": list(self.keys)})  # fmt: skip


def read_pointer(path: str | os.PathLike) -> Pointer | None:
    """The pointer at ``path``; None when the file is not one (a ``torch.save`` checkpoint)."""
    with open(path, "rb") as file:
        head = file.read(_MAX_POINTER_BYTES + 1)
    if not head.lstrip().startswith(b"{") or len(head) > _MAX_POINTER_BYTES:
        return None
    try:
        data = json.loads(head)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != POINTER_FORMAT:
        return None
    if data.get("version") != POINTER_VERSION:
        raise FormatVersionError(
            f"{path}: mtckpt pointer version {data.get('version')!r}, this mtckpt reads "
            f"version {POINTER_VERSION}"
        )
    run, step, keys = data.get("run"), data.get("step"), data.get("keys")
    if (
        not isinstance(run, str)
        or isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or not isinstance(keys, list)
        or not all(isinstance(key, str) for key in keys)
    ):
        raise CorruptCheckpointError(
            f"{path}: malformed mtckpt pointer (expected a run name, a step >= 0 and a list "
            f"of keys): {data!r:.200}"
        )
    return Pointer(run, step, tuple(keys))


def _write_pointer(path: str, pointer: Pointer) -> None:
    """Write the pointer at ``path`` all at once: a reader sees the old one or the new one."""
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as file:
        file.write(pointer.to_json())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _local_path(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(
            f"MtckptCheckpointIO writes its pointers to local paths, got {text!r}; keep the "
            "checkpoint directory local (an mtckpt ObjectTier puts the checkpoints themselves "
            "in object storage)"
        )
    return os.path.abspath(text.removeprefix("file://"))


class MtckptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves checkpoints through a ``CheckpointManager`` and
    keeps a JSON pointer at each checkpoint path (see the module's documentation).

    ``manager``: the manager to use (its owner closes it); otherwise one is built from
    ``config`` (a TOML file, default ``$MTCKPT_CONFIG``) and ``options`` (``run=``,
    ``memory=``, ``local=``, ...), closed at ``teardown`` and built again on next use.
    """

    def __init__(
        self,
        manager: CheckpointManager | None = None,
        *,
        config: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if manager is not None and (config is not None or options):
            raise TypeError("pass a CheckpointManager or the options to build one, not both")
        self._config, self._options = config, options
        self._owns_manager = manager is None
        self._manager = manager if manager is not None else self._build_manager()
        if self._manager.world_size != 1:
            raise ConfigError(
                f"the manager of run {self._manager.run!r} has world size "
                f"{self._manager.world_size}: Lightning saves its checkpoint from global rank 0 "
                "only; build the manager with rank=0, world_size=1"
            )
        self._writer: ThreadPoolExecutor | None = None
        self._writes: dict[str, tuple[Future, Pointer]] = {}  # path -> its write in progress
        self._write_errors: list[BaseException] = []
        self._written: set[str] = set()  # every pointer path this plugin wrote
        self._handles: list[SaveHandle] = []
        self._unreferenced: dict[int, str] = {}  # step -> directory of its removed pointer
        self._latest: Pointer | None = None  # the newest step saved or loaded here
        self._latest_handle: SaveHandle | None = None
        self._resumed_from: int | None = None  # the step of the newest pointer loaded
        self._warned_schedule = False

    def _build_manager(self) -> CheckpointManager:
        options = {"rank": 0, "world_size": 1, **self._options}
        return CheckpointManager.from_config(self._config, **options)

    @property
    def manager(self) -> CheckpointManager:
        """The checkpoint manager (built again after ``teardown`` closed one it built)."""
        if self._manager is None:
            self._manager = self._build_manager()
        return self._manager

    # -- CheckpointIO --------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` as step ``checkpoint["global_step"]`` and return once it is in
        node memory; the pointer at ``path`` follows once the step is committed there."""
        if storage_options is not None:
            raise TypeError(f"MtckptCheckpointIO takes no storage_options, got {storage_options!r}")
        path = _local_path(path)
        self._raise_write_errors()
        step = checkpoint.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"checkpoint for {path}: global_step must be an int >= 0, got {step!r}"
            )
        self._delete_unreferenced()  # before this save: the previous ones are likely done
        keys = tuple(checkpoint)
        latest = self._latest
        if latest is not None and latest.step == step and set(keys) <= set(latest.keys):
            handle = self._latest_handle  # the same step again: refer to it
        else:
            if latest is not None and latest.step == step:  # now with more than saved before
                self.manager.delete(step)
            handle = self._save(step, checkpoint, path)
            self._latest, self._latest_handle = Pointer(self.manager.run, step, keys), handle
        replaced = self._pointer_at(path)
        if replaced is not None and replaced.step != step:
            self._unreferenced[replaced.step] = os.path.dirname(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)  # Lightning may link to it at once
        self._write_when_committed(path, Pointer(self.manager.run, step, keys), handle)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint the pointer at ``path`` refers to, restored from the fastest tier
        with a good copy (a ``torch.save`` file at ``path`` is loaded as it is)."""
        path = _local_path(path)
        if not (map_location is None or isinstance(map_location, (str, torch.device))):
            raise TypeError(
                f"map_location must be None, a device name or a torch.device, got {map_location!r}"
            )
        write = self._writes.get(path)
        if write is not None:
            write[0].result()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        pointer = read_pointer(path)
        if pointer is None:
            return TorchCheckpointIO().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        run = self.manager.run
        if pointer.run != run:
            raise ConfigError(
                f"{path} refers to step {pointer.step} of run {pointer.run!r}, but the manager "
                f"is for run {run!r}"
            )
        try:
            _, state = self.manager.restore(
                step=pointer.step, allow_pickle=False if weights_only else None
            )
        except StepNotFoundError as exc:
            raise StepNotFoundError(f"{path} refers to a step no tier holds: {exc}") from exc
        missing = [key for key in pointer.keys if not isinstance(state, dict) or key not in state]
        if missing:
            raise CorruptCheckpointError(
                f"{path}: step {pointer.step} of run {run!r} lacks the keys {missing}"
            )
        checkpoint = {key: state[key] for key in pointer.keys}
        if map_location is not None:
            device = torch.device(map_location)
            checkpoint = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.to(device))
        if self._latest is None or pointer.step >= self._latest.step:
            self._latest, self._latest_handle = pointer, None
        self._resumed_from = max(pointer.step, self._resumed_from or 0)
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Remove the pointer at ``path``; its step goes once nothing refers to it."""
        path = _local_path(path)
        write = self._writes.pop(path, None)
        if write is not None:
            self._keep_error(write[0])
        if os.path.islink(path):  # a link to another pointer ("last" in link mode)
            os.unlink(path)
            return
        if os.path.isdir(path):
            shutil.rmtree(path)
            return
        if not os.path.exists(path):
            return
        pointer = self._pointer_at(path)
        os.remove(path)
        self._written.discard(path)
        if pointer is not None:
            self._unreferenced[pointer.step] = os.path.dirname(path)
            self._delete_unreferenced()

    def teardown(self) -> None:
        """Wait for the pending pointers, steps and tiers; close the manager if it built it."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self._owns_manager and self._manager is not None:
                manager, self._manager = self._manager, None
                self._latest, self._latest_handle, self._handles = None, None, []
                manager.close()

    def wait(self) -> None:
        """Wait until every pointer is written, unreferenced steps are removed and the manager's
        pending work is done; raise the first error among them."""
        self._collect_writes(wait=True)
        self._raise_write_errors()
        if self._manager is None:
            return
        self._manager.wait()
        self._delete_unreferenced()

    # -- saving and pointers ---------------------------------------------------------------------

    def _save(self, step: int, checkpoint: dict[str, Any], path: str) -> SaveHandle:
        manager = self.manager
        try:
            handle = manager.save(step, checkpoint)
        except StepExistsError:
            if self._resumed_from is None:  # not resuming: those steps are another training's
                raise
            self._replace_orphans(step, path)
            handle = manager.save(step, checkpoint)
        if not handle.tiers:  # Lightning asked for this checkpoint: it must exist somewhere
            if not self._warned_schedule:
                log.warning(
                    "no tier of run %r takes step %d on its schedule; Lightning's checkpoints are "
                    "saved to every tier then: give the memory tier every=1 (the default)",
                    manager.run, step,
                )  # fmt: skip
                self._warned_schedule = True
            handle = manager.save(step, checkpoint, force=True)
        handle.wait("staged")  # Lightning changes the parameters as soon as this returns
        self._handles = [h for h in self._handles if not h.done()] + [handle]
        return handle

    def _replace_orphans(self, step: int, path: str) -> None:
        """After resuming, steps >= ``step`` that no pointer refers to are the killed
        process's last saves, whose pointers were never written: remove them so that ``step``
        can be saved."""
        manager = self.manager
        newer = sorted({s for steps in manager.steps().values() for s in steps if s >= step})
        directories = {os.path.dirname(path)} | {os.path.dirname(p) for p in self._written}
        referenced = [s for s in newer if self._referenced(s, directories)]
        if referenced:
            raise StepExistsError(
                f"cannot save step {step} to {path}: run {manager.run!r} already holds step(s) "
                f"{referenced}, which checkpoints in {sorted(directories)} refer to (training "
                "resumed from an older checkpoint?); remove those checkpoints or use another run"
            )
        log.warning(
            "run %r: removing step(s) %s, which no checkpoint refers to (left by a process "
            "killed before it wrote their pointers)", manager.run, newer,
        )  # fmt: skip
        for orphan in newer:
            manager.delete(orphan)

    def _write_when_committed(self, path: str, pointer: Pointer, handle: SaveHandle | None) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtckpt-pointer")

        def write() -> None:
            if handle is not None:
                handle.wait("memory")
            _write_pointer(path, pointer)

        self._collect_writes()
        self._writes[path] = (self._writer.submit(write), pointer)
        self._written.add(path)

    def _collect_writes(self, wait: bool = False) -> None:
        """Forget the finished pointer writes, keeping their errors (all of them: ``wait``)."""
        for path, (future, _) in list(self._writes.items()):
            if wait or future.done():
                del self._writes[path]
                self._keep_error(future)

    def _keep_error(self, future: Future) -> None:
        """Wait for a pointer write; its error is raised by the next save, wait or teardown."""
        error = future.exception()
        if error is not None:
            self._write_errors.append(error)

    def _raise_write_errors(self) -> None:
        self._collect_writes()
        if self._write_errors:
            error, self._write_errors = self._write_errors[0], []
            raise error

    # -- references and removal ----------------------------------------------------------------

    def _pointer_at(self, path: str) -> Pointer | None:
        """The pointer of this run at ``path`` (the one being written there, if any)."""
        write = self._writes.get(path)
        if write is not None:
            return write[1]
        if os.path.islink(path) or not os.path.isfile(path):
            return None
        try:
            pointer = read_pointer(path)
        except (OSError, CorruptCheckpointError, FormatVersionError):
            return None
        return pointer if pointer is not None and pointer.run == self.manager.run else None

    def _referenced(self, step: int, directories) -> bool:
        """Whether a pointer of this run refers to ``step``: one being written, one in
        ``directories``, or one this plugin wrote elsewhere."""
        pending = {path: pointer for path, (_, pointer) in self._writes.items()}
        if any(p.step == step for p in pending.values()):
            return True
        candidates = set(self._written)
        for directory in directories:
            try:
                candidates.update(str(entry) for entry in Path(directory).iterdir())
            except FileNotFoundError:
                continue
        for candidate in candidates - set(pending):
            pointer = self._pointer_at(candidate)
            if pointer is not None and pointer.step == step:
                return True
        return False

    def _delete_unreferenced(self) -> None:
        """Remove the steps whose pointers were removed, once no save is in progress (a
        delete waits for the manager's pending work, which must not stall training)."""
        if not self._unreferenced or self._manager is None:
            return
        if any(not h.done() for h in self._handles):
            return
        self._collect_writes()
        if self._writes:
            return
        for step, directory in sorted(self._unreferenced.items()):
            if not self._referenced(step, [directory]):
                try:
                    self._manager.delete(step)
                except Exception as exc:  # a tier's error, reported by the manager: retry later
                    log.warning("run %r: step %d not removed yet: %s", self._manager.run, step, exc)
                    continue
                if self._latest is not None and self._latest.step == step:
                    self._latest, self._latest_handle = None, None
            del self._unreferenced[step]
