"""Flatten nested states into leaves with stable key paths, and build them back.

A state is a tree of dicts (str or int keys), lists, tuples and named tuples, objects with
``state_dict()`` / ``load_state_dict()``, a framework's own containers (JAX pytree nodes:
flax struct dataclasses, ``TrainState``), and leaves. A leaf's key path joins the keys on
the way to it with ``/``; inside a key ``~`` is written ``~0`` and ``/`` is written ``~1``
(as in JSON Pointer), so distinct paths never collide. The structure is kept as a
:class:`Node` tree that serializes to JSON for the manifest.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import arrays
from .errors import KeyCollisionError, UnsupportedLeafError
from .format.structure import Node

_VALUE_TYPES: dict[type, str] = {
    type(None): "none",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
}


@dataclass(frozen=True)
class Leaf:
    """One leaf of a flattened state.

    ``value`` is the object itself for value kinds, the array for array kinds (a 0-d array
    for ``npscalar``, a detached tensor for ``torch``), and the bytes to store for
    ``bytes``, ``bytearray`` and ``pickle``. An array held here as several distinct shards
    has them in ``parts`` (each a leaf named by its key in the data file) and no value.
    """

    key: str
    kind: str
    value: Any
    sharding: arrays.Sharding | None = None
    parts: tuple[Leaf, ...] = ()


def data_leaves(leaves: list[Leaf]) -> list[Leaf]:
    """The leaves with bytes of their own: whole leaves, and the parts of leaves in parts."""
    return [part for leaf in leaves for part in leaf.parts or (leaf,)]


def part_key(path: str, global_offset: tuple[int, ...]) -> str:
    """The data file key of the shard of ``path`` at ``global_offset``: ``~`` followed by
    neither 0 nor 1 never occurs in a key path, so it cannot collide with one."""
    return f"{path}~shard@{','.join(str(o) for o in global_offset)}"


def escape_key(key: str | int) -> str:
    """One key-path segment for a dict key or sequence index."""
    return str(key).replace("~", "~0").replace("/", "~1")


def join_path(prefix: str, key: str | int) -> str:
    segment = escape_key(key)
    return f"{prefix}/{segment}" if prefix else segment


def describe(path: str) -> str:
    """A key path as shown in messages."""
    return repr(path) if path else "<root>"


def flatten(
    state: Any, *, allow_pickle: bool = False, as_target: bool = False
) -> tuple[Node, list[Leaf]]:
    """Split ``state`` into its structure and its leaves, in a stable order.

    ``as_target`` flattens a restore target: leaves of any type are accepted (kind
    ``"object"``, to be replaced by the saved value) and nothing is pickled.
    """
    leaves: list[Leaf] = []
    mode = "target" if as_target else "pickle" if allow_pickle else "strict"
    node = _flatten(state, "", leaves, mode, set())
    return node, leaves


def _flatten(obj: Any, path: str, leaves: list[Leaf], mode: str, active: set) -> Node:
    kind = _VALUE_TYPES.get(type(obj))
    if kind is not None:
        if kind == "str" and mode != "target":
            _check_text(obj, f"key {describe(path)}: the string value")
        leaves.append(Leaf(path, kind, obj))
        return Node("leaf", name=path)
    adapter = arrays.for_value(obj)
    if adapter is not None:
        leaves.append(
            Leaf(path, "object", obj) if mode == "target" else _array_leaf(adapter, obj, path)
        )
        return Node("leaf", name=path)
    if type(obj) in (bytes, bytearray):
        leaves.append(Leaf(path, type(obj).__name__, bytes(obj)))
        return Node("leaf", name=path)

    if id(obj) in active:
        raise UnsupportedLeafError(f"key {describe(path)}: the state contains a reference cycle")
    active.add(id(obj))
    try:
        if isinstance(obj, dict):
            return _flatten_pairs(obj.items(), path, leaves, mode, active)
        if isinstance(obj, (list, tuple)):
            children = tuple(
                _flatten(item, join_path(path, index), leaves, mode, active)
                for index, item in enumerate(obj)
            )
            if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
                return Node(
                    "namedtuple",
                    children=children,
                    keys=tuple(obj._fields),
                    name=_class_name(obj),
                    obj=type(obj),
                )
            return Node("tuple" if isinstance(obj, tuple) else "list", children=children)
        if _is_stateful(obj):
            child = _flatten(obj.state_dict(), path, leaves, mode, active)
            return Node("stateful", children=(child,), name=_class_name(obj), obj=obj)
        container = arrays.container(obj)
        if container is not None:
            keys, items, rebuild = container
            node = _flatten_pairs(zip(keys, items, strict=True), path, leaves, mode, active)
            return replace(node, type="pytree", name=_class_name(obj), obj=rebuild)
    finally:
        active.discard(id(obj))

    if mode == "target":
        leaves.append(Leaf(path, "object", obj))
        return Node("leaf", name=path)
    if mode == "pickle":
        leaves.append(Leaf(path, "pickle", pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        return Node("leaf", name=path)
    raise UnsupportedLeafError(
        f"key {describe(path)}: cannot save a {_class_name(obj)}; supported leaves are numpy "
        "arrays and scalars, None, bool, int, float, str, bytes and objects with "
        "state_dict()/load_state_dict(); pass allow_pickle=True to pickle other objects"
    )


def _flatten_pairs(pairs, path: str, leaves: list[Leaf], mode: str, active: set) -> Node:
    seen: dict[str, Any] = {}
    keys, children = [], []
    for key, item in pairs:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise UnsupportedLeafError(
                f"key {describe(path)}: dict key {key!r} of type {type(key).__name__} is not "
                "supported; keys must be str or int"
            )
        if isinstance(key, str):
            _check_text(key, f"key {describe(join_path(path, key))}")
        child_path = join_path(path, key)
        if child_path in seen:
            raise KeyCollisionError(
                f"keys {seen[child_path]!r} and {key!r} of {describe(path)} both flatten to "
                f"key path {child_path!r}"
            )
        seen[child_path] = key
        keys.append(key)
        children.append(_flatten(item, child_path, leaves, mode, active))
    return Node("dict", children=tuple(children), keys=tuple(keys))


def _check_text(text: str, what: str) -> None:
    """UnsupportedLeafError naming ``what`` if ``text`` is not valid Unicode (a lone
    surrogate), which the manifest (UTF-8 JSON) and the safetensors header cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedLeafError(
            f"{what} is not valid Unicode text: {exc.reason} at position {exc.start} "
            f"({text[exc.start]!r}); keys and strings are stored as UTF-8"
        ) from None


def _array_leaf(adapter: arrays.ArrayAdapter, obj: Any, path: str) -> Leaf:
    try:
        kind, value, sharding = adapter.leaf(obj)
    except ValueError as exc:
        raise UnsupportedLeafError(f"key {describe(path)}: {exc}") from None
    if isinstance(value, arrays.Parts):
        parts = tuple(
            Leaf(part_key(path, s.global_offset), kind, piece, s) for piece, s in value.pieces
        )
        return Leaf(path, kind, None, parts=parts)
    return Leaf(path, kind, value, sharding)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def unflatten(node: Node, value_of: Callable[[str], Any]) -> Any:
    """Build a state of ``node``'s structure, taking each leaf from ``value_of(key)``.

    Stateful objects recorded in ``node`` (a restore target) get ``load_state_dict`` with
    their rebuilt state (see :func:`arrays.load_state`) and are returned themselves;
    without one, their state is returned.
    """
    if node.type == "leaf":
        return value_of(node.name)
    items = [unflatten(child, value_of) for child in node.children]
    if node.type == "dict":
        return dict(zip(node.keys, items, strict=True))
    if node.type == "list":
        return items
    if node.type == "tuple":
        return tuple(items)
    if node.type == "namedtuple":
        cls = node.obj if node.obj is not None else _namedtuple_class(node.name, node.keys)
        return cls(*items)
    if node.type == "pytree":  # without the target's node, its fields as a dict
        return node.obj(items) if node.obj is not None else dict(zip(node.keys, items, strict=True))
    if node.obj is not None:
        arrays.load_state(node.obj, items[0])
        return node.obj
    return items[0]


def _namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    typename = name.rsplit(".", 1)[-1]
    if not typename.isidentifier():
        typename = "SavedNamedTuple"
    return collections.namedtuple(typename, fields, rename=True)


def graft(target: Node, saved: Node, filled: list | None = None, owner: Any = None) -> Node:
    """The restore target's structure, where an empty dict or list of the target takes the
    saved structure at that place: an optimizer that has not stepped yet holds no state,
    and restoring it must bring the saved state in. The stateful objects owning such
    places are appended to ``filled``."""
    if target.type != saved.type:
        return target
    if target.type in ("dict", "list") and not target.children:
        if saved.children and filled is not None and owner is not None:
            filled.append(owner)
        return saved
    owner = target.obj if target.type == "stateful" else owner
    if target.type == "dict":
        saved_at = dict(zip(saved.keys, saved.children, strict=True))
        children = tuple(
            graft(child, saved_at[key], filled, owner) if key in saved_at else child
            for key, child in zip(target.keys, target.children, strict=True)
        )
    else:
        pairs = zip(target.children, saved.children, strict=False)
        children = tuple(graft(t, s, filled, owner) for t, s in pairs)
        children += target.children[len(saved.children) :]
    return replace(target, children=children)
