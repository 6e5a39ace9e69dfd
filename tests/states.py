"""Deterministic states, exact comparison and damage to a saved file, shared by the
tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def flip_byte(path: Path, offset: int = 5000, mask: int = 0xFF) -> None:
    """The bits ``mask`` of one byte of ``path`` flipped in place (not rewritten: a
    retention sweep that saw the file truncated meanwhile would remove its step as
    damaged). ``offset`` is taken modulo the file's size: -1 is its last byte."""
    with open(path, "r+b") as f:
        offset %= os.fstat(f.fileno()).st_size
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def make_state(step: int, rng_seed: int = 0, scale: int = 1) -> dict:
    """A deterministic training-like state for ``step``: arrays of several dtypes and
    shapes, nested containers and non-tensor leaves."""
    rng = np.random.default_rng(rng_seed * 100_003 + step)
    return {
        "model": {
            "embed.weight": rng.standard_normal((64 * scale, 32), dtype=np.float32),
            "layers": [
                {
                    "attn/qkv": rng.standard_normal((32, 96), dtype=np.float32),
                    "mlp.w1": rng.standard_normal((32, 128)).astype(np.float16),
                    "norm": rng.standard_normal(32),
                }
                for _ in range(3)
            ],
        },
        "optimizer": {
            "step": step,
            "lr": 1e-3 / (step + 1),
            "state": {0: {"exp_avg": rng.standard_normal(100, dtype=np.float32)}},
            "groups": [{"params": [0], "betas": (0.9, 0.999), "name": "default"}],
        },
        "counters": np.arange(step, step + 7, dtype=np.int64),
        "mask": rng.standard_normal(13) > 0,
        "tokens_seen": np.uint64(step * 4096),
        "note": f"step {step}",
        "blob": bytes(range(step % 256)) * 3,
        "nothing": None,
    }


def assert_same_state(actual, expected, path="state"):
    """Exact equality of two states: same structure, same types, bit-identical arrays."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: {type(actual)} is not an ndarray"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {type(actual)} is not a dict"
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert type(actual) is float and actual.hex() == expected.hex(), f"{path}: {actual!r}"
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_same_tensors(actual, expected, where=""):
    """Exact equality of nested dicts / lists of torch tensors and plain values."""
    import torch

    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tensors(a, e, f"{where}/{index}")
    else:
        assert actual == expected, where
