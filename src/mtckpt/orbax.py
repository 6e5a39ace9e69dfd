"""Orbax's ``CheckpointManager`` over mtckpt's tiers: Orbax users change one import.

``from mtckpt.orbax import CheckpointManager`` takes Orbax's arguments
(``CheckpointManagerOptions``, ``item_names``) and ``ocp.args`` (``StandardSave`` /
``PyTreeSave`` / ``JsonSave``, alone or in a ``Composite``, and their ``Restore``
counterparts). A save costs a copy into node memory; the step reaches ``directory`` (local
disk, or an object store URL) in the background. ``directory`` holds mtckpt's format,
under a run named after it: ``mtckpt ls`` and ``mtckpt export`` read it. Orbax features
this does not provide raise ``NotImplementedError`` naming them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orbax.checkpoint as ocp

from . import manager as _manager
from .config import LocalTier, MemoryTier, ObjectTier, PeerTier

__all__ = ["CheckpointManager"]

SUPPORTED_OPTIONS = frozenset({
    "save_interval_steps", "max_to_keep", "save_on_steps", "should_save_fn", "create",
    "enable_async_checkpointing", "read_only", "cleanup_tmp_directories", "async_options",
    "multiprocessing_options", "file_options", "save_root_metadata", "step_prefix",
    "step_format_fixed_length", "prevent_write_metrics", "lightweight_initialize",
    "enable_should_save_is_saving_in_progress_check", "enable_background_delete",
    "num_deletion_threads",
})  # fmt: skip
_SAVES = (ocp.args.StandardSave, ocp.args.PyTreeSave, ocp.args.JsonSave)
_RESTORES = (ocp.args.StandardRestore, ocp.args.PyTreeRestore, ocp.args.JsonRestore)
KEEP_ALL = 1 << 30  # max_to_keep=None: every step stays


class CheckpointManager:
    """Orbax's ``CheckpointManager`` API; the tiers are mtckpt's: node memory (``memory``,
    default ``MemoryTier()``), ``directory`` (a path: ``LocalTier``; ``s3://``, ``gs://``,
    ``file://``...: ``ObjectTier``), and with ``peers`` copies on other nodes. ``run``:
    the mtckpt run name (default: from ``directory``)."""

    def __init__(self, directory: str | os.PathLike, checkpointers: Any = None,
                 options: ocp.CheckpointManagerOptions | None = None,
                 metadata: Mapping[str, Any] | None = None,
                 item_names: Sequence[str] | None = None, item_handlers: Any = None,
                 logger: Any = None, handler_registry: Any = None, *, run: str | None = None,
                 memory: MemoryTier | None = None, peers: PeerTier | None = None,
                 **mtckpt_options: Any) -> None:  # fmt: skip
        given = {"checkpointers": checkpointers, "item_handlers": item_handlers,
                 "logger": logger, "handler_registry": handler_registry,
                 "metadata": metadata}  # fmt: skip
        for name, value in given.items():
            if value is not None:
                _unsupported(f"the {name} argument")
        self._options = options = options or ocp.CheckpointManagerOptions()
        _check_options(options)
        self.directory = directory
        self._item_names = tuple(item_names) if item_names is not None else None
        self._last, self._last_step = None, None  # the save in flight, and its step
        keep = options.max_to_keep or KEEP_ALL
        where = os.fspath(directory)
        if re.match(r"^[a-z][a-z0-9+.-]*://", where):
            durable: dict[str, Any] = {"remote": ObjectTier(url=where, keep=keep)}
        else:
            durable = {"local": LocalTier(path=where, keep=keep)}
        if peers is not None:
            durable["peers"] = peers
        elif memory is not None or not options.read_only:
            durable["memory"] = memory or MemoryTier()
        self._mgr = _manager.CheckpointManager(run or run_name(where), **durable, **mtckpt_options)

    # -- saving ----------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Orbax's rule: not at or before the latest step; then ``should_save_fn(step,
        latest)`` if given, else every ``save_interval_steps``, the ``save_on_steps``, and
        the first save of a run."""
        options = self._options
        if options.read_only:
            return False
        latest = max((s for s in (self.latest_step(), self._last_step) if s is not None),
                     default=None)  # fmt: skip
        if latest is not None and latest >= step:
            return False
        if options.should_save_fn is not None:
            return bool(options.should_save_fn(step, latest))
        return (
            (options.save_interval_steps is not None and step % options.save_interval_steps == 0)
            or (options.save_on_steps is not None and step in options.save_on_steps)
            or latest is None
        )

    def save(self, step: int, args: Any = None, metrics: Any = None, force: bool = False,
             **kwargs: Any) -> bool:  # fmt: skip
        """Save ``args`` (``StandardSave(tree)``, ``Composite(name=StandardSave(...), ...)``)
        as ``step`` if :meth:`should_save` (or ``force``): True once it is in node memory
        (with ``enable_async_checkpointing=False``, once in every tier). As with Orbax, a
        save first waits for the previous one to finish in the background."""
        if kwargs:
            _unsupported(f"save() arguments {sorted(kwargs)} (pass args=ocp.args....)")
        if metrics is not None:
            _unsupported("metrics (and best_fn): mtckpt keeps the newest max_to_keep steps")
        if self._options.read_only:
            return False
        if not force and not self.should_save(step):
            return False
        state = self._state_of(args)
        if self._last is not None:  # as Orbax: one save in flight, so every one completes
            self._last.wait()
        self._last = self._mgr.save(step, state, force=True)
        self._last_step = step
        if not self._options.enable_async_checkpointing:
            self._last.wait()
        return True

    def _state_of(self, args: Any) -> Any:
        if isinstance(args, ocp.args.Composite):
            names = list(args.keys())
            if self._item_names is not None and set(names) - set(self._item_names):
                raise ValueError(f"items {sorted(set(names) - set(self._item_names))} are not "
                                 f"among item_names {list(self._item_names)}")  # fmt: skip
            return {name: _item(name, args[name], _SAVES) for name in names}
        if args is None:
            raise ValueError("save(step, args=...) needs args, e.g. ocp.args.StandardSave(state)")
        return _item("", args, _SAVES)

    # -- restoring -------------------------------------------------------------------------

    def restore(self, step: int | None = None, args: Any = None, **kwargs: Any) -> Any:
        """The state of ``step`` (default: the latest) shaped as ``args`` asks:
        ``StandardRestore(abstract)`` builds arrays with the abstract tree's shardings (any
        mesh); ``Composite(name=...)`` returns a ``Composite`` of the items asked for."""
        if kwargs:
            _unsupported(f"restore() arguments {sorted(kwargs)} (pass args=ocp.args....)")
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        if isinstance(args, ocp.args.Composite):
            names = list(args.keys())
            targets = {name: _item(name, args[name], _RESTORES) for name in names}
            given = {n: _numpy_where_unsharded(t) for n, t in targets.items() if t is not None}
            state = self._mgr.restore(given, step=step, strict=False)[1] if given else {}
            if len(given) < len(names):  # items without a target: as saved, numpy arrays
                state = {**self._mgr.restore(step=step)[1], **state}
            missing = [name for name in names if name not in state]
            if missing:
                raise KeyError(f"step {step} has no item(s) {missing}; it holds "
                               f"{sorted(state)}")  # fmt: skip
            return ocp.args.Composite(**{name: state[name] for name in names})
        target = None if args is None else _numpy_where_unsharded(_item("", args, _RESTORES))
        _, state = self._mgr.restore(target, step=step)
        return state

    # -- inspecting ------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self, read: bool = False) -> list[int]:
        """Every step complete in some tier, ascending."""
        return sorted({s for steps in self._mgr.steps().values() for s in steps})

    def reached_preemption(self, step: int) -> bool:
        return False

    def wait_until_finished(self) -> None:
        """Until every started save is in every tier it is due for."""
        self._mgr.wait()

    def delete(self, step: int) -> None:
        self._mgr.delete(step)

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_name(directory: str) -> str:
    """A run name unique to ``directory``: its last part (made safe) and a hash of it."""
    path = directory if "://" in directory else os.path.abspath(directory)
    base = re.sub(r"[^A-Za-z0-9._-]", "-", path.rstrip("/").rsplit("/", 1)[-1])[:100]
    digest = hashlib.blake2b(path.encode(), digest_size=4).hexdigest()
    return f"{base.lstrip('.-_') or 'orbax'}-{digest}"


def _check_options(options: ocp.CheckpointManagerOptions) -> None:
    defaults = ocp.CheckpointManagerOptions()
    for field in dataclasses.fields(options):
        if field.name in SUPPORTED_OPTIONS:
            continue
        if getattr(options, field.name) != getattr(defaults, field.name):
            _unsupported(f"CheckpointManagerOptions.{field.name}")


def _item(name: str, args: Any, kinds: tuple[type, ...]) -> Any:
    """The tree inside an ``ocp.args`` item (a Restore's may be None: no target)."""
    if not isinstance(args, kinds):
        what = f"item {name!r}: " if name else ""
        _unsupported(f"{what}{type(args).__name__} (mtckpt takes "
                     f"{', '.join(k.__name__ for k in kinds)})")  # fmt: skip
    return getattr(args, "item", None)


def _numpy_where_unsharded(tree: Any) -> Any:
    """An abstract leaf without a sharding (``to_shape_dtype_struct`` of a numpy array)
    comes back as a numpy array, as Orbax restores it."""
    import jax
    import numpy as np

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            return np.empty(x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map(leaf, tree)


def _unsupported(what: str) -> None:
    raise NotImplementedError(f"mtckpt.orbax.CheckpointManager does not support {what}")

