"""Erasure codes over a group of shards: ``xor`` (one parity, the XOR of the data shards:
any one loss) and ``rs`` (Reed–Solomon with M parities over GF(2^8): any M losses).

The code is systematic: the K data shards stay as they are and M parity shards are added,
``parity[j] = sum_i C[j][i] * data[i]``. For ``rs``, C is the Cauchy matrix
``1 / (x_j + y_i)`` with x_j = K + j and y_i = i, all distinct, so every K x K submatrix of
the generator ``[I; C]`` is invertible and any K shards of the K + M rebuild the others;
for ``xor`` C is all ones. Shards of unequal sizes are taken as padded with zeros to the
longest, and parity has that length; a rebuilt data shard is cut back to its own length.
Encoding and decoding stream over regions (``offset``, ``length``), so a daemon never needs
a whole extra copy of a shard to compute parity, and the byte work is the fast path's
``gf256_muladd``: identical bytes from C and from numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .. import _fastpath, gf256

MAX_SHARDS = 255  # data + parity in one group: the x and y of the Cauchy matrix must differ
BLOCK = 1 << 16  # bytes of each region worked on at once: the group's blocks stay in cache


@dataclass(frozen=True)
class Code:
    kind: str  # "xor" or "rs"
    data: int  # K
    parity: int  # M

    def __post_init__(self) -> None:
        if self.kind not in ("xor", "rs"):
            raise ValueError(f"erasure code {self.kind!r}: expected 'xor' or 'rs'")
        if self.data < 1 or self.parity < 1 or self.data + self.parity > MAX_SHARDS:
            raise ValueError(
                f"{self}: needs at least 1 data and 1 parity shard, at most {MAX_SHARDS} in all"
            )
        if self.kind == "xor" and self.parity != 1:
            raise ValueError(f"{self}: xor has exactly one parity shard")

    def __str__(self) -> str:
        return f"{self.kind}:{self.data}+{self.parity}"

    def coefficients(self) -> list[list[int]]:
        """C, M rows of K: parity j is the sum over i of C[j][i] * data i."""
        if self.kind == "xor":
            return [[1] * self.data]
        return [
            [gf256.inv((self.data + j) ^ i) for i in range(self.data)] for j in range(self.parity)
        ]

    def encode(self, data: Sequence, parity: Sequence) -> None:
        """Fill the M writable ``parity`` regions from the K ``data`` regions (each as long
        as the longest data region; shorter data counts as zeros beyond its end)."""
        sources = [_bytes(d) for d in self._check(data, self.data, "data")]
        targets = [_bytes(p, writable=True) for p in self._check(parity, self.parity, "parity")]
        size = max(s.size for s in sources)
        for target in targets:
            if target.size != size:
                raise ValueError(f"{self}: a parity region of {target.size} bytes; the longest "
                                 f"data region has {size}")  # fmt: skip
        _combine(self.coefficients(), sources, targets, size)

    def decode(self, present: Mapping[int, object], sizes: Sequence[int]) -> dict[int, np.ndarray]:
        """The data shards missing from ``present`` (shard index -> region at one offset:
        0..K-1 data, shorter where that shard ends sooner, K..K+M-1 parity), rebuilt from
        any K of them; ``sizes``: each data region's own length, to cut the rebuilt ones
        back to."""
        if len(sizes) != self.data:
            raise ValueError(f"{self}: {len(sizes)} data sizes given, expected {self.data}")
        missing = [i for i in range(self.data) if i not in present]
        if not missing:
            return {}
        usable = sorted(i for i in present if 0 <= i < self.data + self.parity)[: self.data]
        if len(usable) < self.data:
            raise ValueError(
                f"{self}: {len(usable)} shard(s) present ({sorted(present)}), {self.data} needed "
                f"to rebuild data shard(s) {missing}"
            )
        generator = [[int(i == r) for i in range(self.data)] for r in range(self.data)]
        generator += self.coefficients()
        inverse = gf256.invert([generator[i] for i in usable])
        sources = [_bytes(present[i]) for i in usable]
        length = max(s.size for s in sources)
        outputs = [np.empty(length, np.uint8) for _ in missing]
        _combine([inverse[i] for i in missing], sources, outputs, length)
        return {i: out[: min(length, sizes[i])] for i, out in zip(missing, outputs, strict=True)}

    def _check(self, regions: Sequence, expected: int, what: str) -> Sequence:
        if len(regions) != expected:
            raise ValueError(f"{self}: {len(regions)} {what} regions given, expected {expected}")
        return regions


def _combine(matrix: list[list[int]], sources: list[np.ndarray], targets: list[np.ndarray],
             size: int) -> None:  # fmt: skip
    """``targets[j] = sum_i matrix[j][i] * sources[i]`` over ``size`` bytes (a source
    shorter than that counts as zeros past its end), a BLOCK of every region at a time so
    that they stay in cache between the passes."""
    fast = _fastpath.backend()
    for start in range(0, size, BLOCK):
        end = min(size, start + BLOCK)
        for row, target in zip(matrix, targets, strict=True):
            block = target[start:end]
            block[:] = 0
            for coef, source in zip(row, sources, strict=True):
                stop = min(end, source.size)
                if stop > start:
                    fast.gf256_muladd(block[: stop - start], source[start:stop], coef)


def _bytes(region, writable: bool = False) -> np.ndarray:
    view = memoryview(region)
    if writable and view.readonly:
        raise ValueError("a parity region must be writable")
    return np.frombuffer(view.cast("B") if view.format != "B" else view, np.uint8)
