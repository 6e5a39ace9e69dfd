"""The erasure codes (issue 21): GF(2^8) region arithmetic identical in C and numpy and
equal to a bit-by-bit reference; xor and Reed–Solomon encoding, and decoding from any K of
K + M shards, for random sizes (unequal ones included) and random erasures."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from mtckpt import _fallback, gf256
from mtckpt.daemon.erasure import Code

native = pytest.importorskip("mtckpt._native")


def reference_mul(a: int, b: int) -> int:
    """Shift-and-add multiplication modulo 0x11d, written independently of the tables."""
    product = 0
    for bit in range(8):
        if b >> bit & 1:
            product ^= a << bit
    for bit in range(15, 7, -1):
        if product >> bit & 1:
            product ^= 0x11D << (bit - 8)
    return product


def test_the_field_tables_match_the_reference():
    table = gf256.products()
    for a, b in itertools.product(range(256), repeat=2):
        assert table[a, b] == reference_mul(a, b), (a, b)
    assert all(gf256.mul(a, gf256.inv(a)) == 1 for a in range(1, 256))
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 33, 100, 4096 + 7])
def test_muladd_is_the_same_bytes_in_c_and_numpy(size):
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size, np.uint8)
    start = rng.integers(0, 256, size, np.uint8)
    for coef in (0, 1, 2, 0x1D, 0x80, 0xFF, *rng.integers(0, 256, 8)):
        c_out, np_out = start.copy(), start.copy()
        native.gf256_muladd(c_out, src, int(coef))
        _fallback.gf256_muladd(np_out, src, int(coef))
        expected = start ^ np.array([reference_mul(int(coef), int(v)) for v in src], np.uint8)
        assert np.array_equal(c_out, expected) and np.array_equal(np_out, expected), coef


@pytest.mark.parametrize("module", [native, _fallback], ids=["c", "numpy"])
def test_muladd_refuses_bad_arguments_naming_them(module):
    with pytest.raises(ValueError, match=r"gf256_muladd\(\): dst has 3 bytes but src has 4"):
        module.gf256_muladd(bytearray(3), bytes(4), 2)
    with pytest.raises(ValueError, match=r"gf256_muladd\(\): coef must be between 0 and 255"):
        module.gf256_muladd(bytearray(3), bytes(3), 256)
    with pytest.raises((TypeError, BufferError, ValueError)):
        module.gf256_muladd(bytes(3), bytes(3), 2)  # dst read-only


def encoded(code: Code, shards: list[np.ndarray]) -> list[np.ndarray]:
    size = max(s.size for s in shards)
    parity = [np.zeros(size, np.uint8) for _ in range(code.parity)]
    code.encode(shards, parity)
    return parity


@pytest.mark.parametrize("seed", range(40))
def test_any_k_of_k_plus_m_shards_rebuild_the_data(seed):
    rng = random.Random(seed)
    kind = "xor" if seed % 4 == 0 else "rs"
    k, m = rng.randint(1, 8), 1 if kind == "xor" else rng.randint(1, 4)
    code = Code(kind, k, m)
    sizes = [rng.choice([0, 1, 31, 64, rng.randint(0, 5000)]) for _ in range(k)]
    sizes[0] = max(sizes[0], 1)
    data = [np.frombuffer(rng.randbytes(n), np.uint8) for n in sizes]
    parity = encoded(code, data)
    for j, row in enumerate(code.coefficients()):  # against the definition, byte by byte
        expected = np.zeros(max(sizes), np.uint8)
        for coef, shard in zip(row, data, strict=True):
            expected[: shard.size] ^= np.array([reference_mul(coef, v) for v in shard], np.uint8)
        assert np.array_equal(parity[j], expected)
    shards = dict(enumerate(data + parity))
    lost = rng.sample(range(k + m), rng.randint(1, m))
    present = {i: s for i, s in shards.items() if i not in lost}
    rebuilt = code.decode(present, sizes)
    assert sorted(rebuilt) == sorted(i for i in lost if i < k)
    for index, shard in rebuilt.items():
        assert np.array_equal(shard, data[index]), (code, lost, index)


def test_one_loss_more_than_the_code_survives_is_a_clear_error():
    code = Code("rs", 4, 2)
    data = [np.full(10, i, np.uint8) for i in range(4)]
    shards = dict(enumerate(data + encoded(code, data)))
    for lost in (0, 1, 5):
        del shards[lost]
    with pytest.raises(ValueError, match=r"^rs:4\+2: 3 shard\(s\) present \(\[2, 3, 4\]\), 4 "
                       r"needed to rebuild data shard\(s\) \[0, 1\]$"):  # fmt: skip
        code.decode(shards, [10] * 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("xor", 3, 2), r"^xor:3\+2: xor has exactly one parity shard$"),
        (("rs", 0, 2), r"^rs:0\+2: needs at least 1 data and 1 parity shard, at most 255"),
        (("rs", 250, 6), r"at most 255 in all"),
        (("raid", 3, 1), r"^erasure code 'raid': expected 'xor' or 'rs'$"),
    ],
)
def test_a_bad_code_is_refused_naming_it(args, message):
    with pytest.raises(ValueError, match=message):
        Code(*args)
