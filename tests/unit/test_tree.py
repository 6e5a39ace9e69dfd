import collections
import json

import numpy as np
import pytest

from mtckpt import KeyCollisionError, UnsupportedLeafError
from mtckpt.format.structure import Node
from mtckpt.tree import flatten, unflatten

Point = collections.namedtuple("Point", ["x", "y"])


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def roundtrip(state, **kwargs):
    node, leaves = flatten(state, **kwargs)
    node = Node.from_json(json.loads(json.dumps(node.to_json())))
    values = {leaf.key: leaf.value for leaf in leaves}
    return unflatten(node, values.__getitem__), leaves


def test_nested_containers_roundtrip_with_stable_key_paths():
    state = {
        "a": [1, 2.5, (True, None)],
        "b": {"c": "text", 3: b"bytes"},
        "p": Point(x=np.zeros(2), y=7),
        "empty": {"l": [], "t": (), "d": {}},
    }
    rebuilt, leaves = roundtrip(state)
    assert [leaf.key for leaf in leaves] == [
        "a/0",
        "a/1",
        "a/2/0",
        "a/2/1",
        "b/c",
        "b/3",
        "p/0",
        "p/1",
    ]
    assert [leaf.kind for leaf in leaves] == [
        "int",
        "float",
        "bool",
        "none",
        "str",
        "bytes",
        "ndarray",
        "int",
    ]
    assert rebuilt["a"] == [1, 2.5, (True, None)]
    assert rebuilt["b"] == {"c": "text", 3: b"bytes"}
    assert list(rebuilt["b"]) == ["c", 3]  # int keys stay ints, order kept
    assert rebuilt["p"].x is state["p"].x and rebuilt["p"].y == 7
    assert type(rebuilt["p"]).__name__ == "Point" and rebuilt["p"]._fields == ("x", "y")
    assert rebuilt["empty"] == {"l": [], "t": (), "d": {}}
    assert type(rebuilt["empty"]["t"]) is tuple


def test_key_paths_escape_slash_and_tilde_so_they_never_collide():
    state = {"a/b": 1, "a": {"b": 2}, "~1": 3, "/": 4}
    _, leaves = flatten(state)
    keys = [leaf.key for leaf in leaves]
    assert keys == ["a~1b", "a/b", "~01", "~1"]
    assert len(set(keys)) == len(keys)
    rebuilt, _ = roundtrip(state)
    assert rebuilt == state


def test_int_and_str_keys_flattening_alike_are_a_collision():
    with pytest.raises(KeyCollisionError, match=r"keys '0' and 0 of 'opt' both flatten to"):
        flatten({"opt": {"0": 1, 0: 2}})


@pytest.mark.parametrize("key", [True, 1.5, (1, 2), None])
def test_unsupported_dict_keys_are_rejected_with_their_path(key):
    with pytest.raises(UnsupportedLeafError, match=r"key 'outer': dict key .* not supported"):
        flatten({"outer": {key: 1}})


def test_unsupported_leaf_names_key_and_type():
    with pytest.raises(UnsupportedLeafError) as info:
        flatten({"data": {"queue": collections.deque([1])}})
    message = str(info.value)
    assert "'data/queue'" in message and "collections.deque" in message
    assert "allow_pickle=True" in message


def test_object_arrays_are_rejected():
    with pytest.raises(UnsupportedLeafError, match="'x'.*dtype object"):
        flatten({"x": np.array([object()], dtype=object)})


def test_pickle_only_when_allowed():
    node, leaves = flatten({"q": collections.deque([1, 2])}, allow_pickle=True)
    assert leaves[0].kind == "pickle" and isinstance(leaves[0].value, bytes)


def test_stateful_objects_flatten_through_state_dict_and_load_in_place():
    counter = Counter(5)
    node, leaves = flatten({"c": counter, "n": 1})
    assert [(leaf.key, leaf.value) for leaf in leaves] == [("c/value", 5), ("n", 1)]
    # Saved structure without a target gives the plain state back.
    saved = Node.from_json(node.to_json())
    assert unflatten(saved, {"c/value": 9, "n": 2}.__getitem__) == {"c": {"value": 9}, "n": 2}
    # With the target's own structure, the object is loaded and returned itself.
    result = unflatten(node, {"c/value": 9, "n": 2}.__getitem__)
    assert result["c"] is counter and counter.value == 9


def test_reference_cycles_are_rejected():
    loop = []
    loop.append(loop)
    with pytest.raises(UnsupportedLeafError, match="reference cycle"):
        flatten({"loop": loop})


def test_shared_subtrees_are_not_cycles():
    shared = [1, 2]
    _, leaves = flatten({"a": shared, "b": shared})
    assert [leaf.key for leaf in leaves] == ["a/0", "a/1", "b/0", "b/1"]


def test_subclass_scalars_are_not_silently_narrowed():
    import enum

    class Color(enum.IntEnum):
        RED = 1

    with pytest.raises(UnsupportedLeafError, match="Color"):
        flatten({"c": Color.RED})


def test_target_mode_accepts_any_leaf_and_never_pickles():
    placeholder = object()
    _, leaves = flatten({"x": placeholder, "a": np.ones(2)}, as_target=True)
    assert [(leaf.kind, leaf.value is placeholder) for leaf in leaves] == [
        ("object", True),
        ("object", False),
    ]


@pytest.mark.parametrize(
    "bad", [{"weird": 1}, {"dict": [[1.5, "a"]]}, {"namedtuple": "P", "fields": ["x"], "items": []}]
)
def test_malformed_tree_json_raises(bad):
    from mtckpt import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="malformed tree structure"):
        Node.from_json(bad, "somewhere")


def test_a_pytree_node_round_trips_through_json_and_rebuilds_as_a_dict():
    node = Node("pytree", (Node("leaf", name="p/a"), Node("leaf", name="p/b")), keys=("a", "b"),
                name="flax.training.train_state.TrainState")  # fmt: skip
    parsed = Node.from_json(json.loads(json.dumps(node.to_json())))
    assert parsed == node
    assert unflatten(parsed, lambda key: key.upper()) == {"a": "P/A", "b": "P/B"}


def test_a_malformed_pytree_node_is_corrupt():
    from mtckpt import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="pytree node keys and items differ"):
        Node.from_json({"pytree": "C", "keys": ["a"], "items": []})
