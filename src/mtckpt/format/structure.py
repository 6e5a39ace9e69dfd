"""The structure of a saved state as the manifest records it: the leaf kinds (a value in
the manifest, bytes or an array in the data file) and the :class:`Node` tree of
containers down to leaves, with its JSON form. Flattening a live state into this is
:mod:`mtckpt.tree`'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .. import frameworks
from ..errors import CorruptCheckpointError

# Leaves whose value lives in the manifest, and leaves whose bytes live in the data file.
VALUE_KINDS = frozenset({"none", "bool", "int", "float", "str"})
BYTES_KINDS = frozenset({"bytes", "bytearray", "pickle"})
# Leaf kinds holding an array: numpy's, and each adapted framework's.
ARRAY_KINDS = frozenset({"ndarray", "npscalar", *frameworks.BY_NAME})
DATA_KINDS = ARRAY_KINDS | BYTES_KINDS


@dataclass(frozen=True)
class Node:
    """The structure of a state: containers down to leaves (named by key path)."""

    type: str  # "leaf" | "dict" | "list" | "tuple" | "namedtuple" | "stateful" | "pytree"
    children: tuple[Node, ...] = ()
    keys: tuple[Any, ...] = ()  # dict keys, a named tuple's field names, a pytree node's keys
    name: str = ""  # a leaf's key path, or a container's class name
    # A target's stateful object, named-tuple class or pytree node builder; never saved.
    obj: Any = field(default=None, compare=False)

    def leaf_keys(self) -> Iterator[str]:
        """Key paths of every leaf below this node, in flatten order."""
        if self.type == "leaf":
            yield self.name
        for child in self.children:
            yield from child.leaf_keys()

    def to_json(self) -> Any:
        if self.type == "leaf":
            return self.name
        items = [child.to_json() for child in self.children]
        if self.type == "dict":
            return {"dict": [[key, item] for key, item in zip(self.keys, items, strict=True)]}
        if self.type in ("list", "tuple"):
            return {self.type: items}
        if self.type == "namedtuple":
            return {"namedtuple": self.name, "fields": list(self.keys), "items": items}
        if self.type == "pytree":
            return {"pytree": self.name, "keys": list(self.keys), "items": items}
        return {"stateful": self.name, "state": items[0]}

    @staticmethod
    def from_json(data: Any, where: str = "manifest") -> Node:
        """Parse a structure written by :meth:`to_json`; malformed input raises."""
        try:
            return _node_from_json(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed tree structure ({exc})") from exc


def _node_from_json(data: Any) -> Node:
    if isinstance(data, str):
        return Node("leaf", name=data)
    if not isinstance(data, dict) or len(data) not in (1, 2, 3):
        raise ValueError(f"unexpected tree node {data!r:.80}")
    if "pytree" in data:
        keys, items = list(data["keys"]), list(data["items"])
        if len(keys) != len(items):
            raise ValueError("pytree node keys and items differ in length")
        data = {"dict": list(zip(keys, items, strict=True)), "name": str(data["pytree"])}
        return replace(_node_from_json(data), type="pytree", name=data["name"])
    if "dict" in data:
        pairs = data["dict"]
        for key, _ in pairs:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"dict key {key!r} is neither str nor int")
        return Node(
            "dict",
            children=tuple(_node_from_json(item) for _, item in pairs),
            keys=tuple(key for key, _ in pairs),
        )
    for kind in ("list", "tuple"):
        if kind in data:
            return Node(kind, children=tuple(_node_from_json(item) for item in data[kind]))
    if "namedtuple" in data:
        fields = tuple(str(name) for name in data["fields"])
        items = tuple(_node_from_json(item) for item in data["items"])
        if len(fields) != len(items):
            raise ValueError("named tuple fields and items differ in length")
        return Node("namedtuple", children=items, keys=fields, name=str(data["namedtuple"]))
    if "stateful" in data:
        return Node(
            "stateful", children=(_node_from_json(data["state"]),), name=str(data["stateful"])
        )
    raise ValueError(f"unknown tree node type in {data!r:.80}")
