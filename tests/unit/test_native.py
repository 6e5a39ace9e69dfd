"""The fast path: mtckpt._native (C) and mtckpt._fallback (numpy) run the same tests and
must give the same bytes, crcs and errors; mtckpt._fastpath picks between them."""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import random
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable

import numpy as np
import pytest

from mtckpt import _fallback, _fastpath

try:
    from mtckpt import _native
except ImportError:  # not built: the native cases skip, the fallback's still run
    _native = None

MiB = 1 << 20
POLY = 0x82F63B78


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC-32C straight from its definition, one bit at a time: slow, plainly right."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (POLY if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _reference_table() -> list[int]:
    table = []
    for byte in range(256):
        reg = byte
        for _ in range(8):
            reg = (reg >> 1) ^ (POLY if reg & 1 else 0)
        table.append(reg)
    return table


REFERENCE_TABLE = _reference_table()


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """The bitwise definition with its 8 steps per byte tabulated: fast enough for MiBs."""
    reg = crc ^ 0xFFFFFFFF
    for byte in data:
        reg = REFERENCE_TABLE[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


POOL = random_bytes(4 * MiB, seed=1)


@functools.cache
def reference_of_pool(offset: int, size: int, value: int = 0) -> int:
    return crc32c_reference(POOL[offset : offset + size], value)


def load(name: str) -> types.ModuleType:
    if name == "python":
        return _fallback
    if _native is None:
        pytest.skip("mtckpt._native is not built")
    return _native


@pytest.fixture(params=["native", "python"])
def mod(request: pytest.FixtureRequest) -> types.ModuleType:
    return load(request.param)


@pytest.fixture(
    params=[
        "native.crc32c",
        "native.crc32c_sw",
        "native.crc32c_hw",
        "python.crc32c",
        "python.crc32c_sw",
    ]
)
def crc(request: pytest.FixtureRequest) -> Callable[..., int]:
    name, func = request.param.split(".")
    module = load(name)
    if func == "crc32c_hw" and module.hardware == "none":
        pytest.skip("this CPU has no CRC-32C instruction")
    return getattr(module, func)


def test_reference_matches_bitwise_definition() -> None:
    for size in (0, 1, 2, 3, 31, 64, 257):
        data = random_bytes(size, seed=size)
        assert crc32c_reference(data) == crc32c_bitwise(data)
        assert crc32c_reference(data, 0xDEADBEEF) == crc32c_bitwise(data, 0xDEADBEEF)


# RFC 3720 (iSCSI) appendix B.4: a 48-byte SCSI read command.
ISCSI_READ = bytes.fromhex(
    "01c00000 00000000 00000000 00000000 14000000 00000400"
    "00000014 00000018 28000000 00000000 02000000 00000000"
)
KNOWN_VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (ISCSI_READ, 0xD9963A56),
]


@pytest.mark.parametrize(("data", "expected"), KNOWN_VECTORS)
def test_known_vectors(crc: Callable[..., int], data: bytes, expected: int) -> None:
    assert crc(data) == expected
    assert crc32c_bitwise(data) == expected


SIZES = [0, 1, 7, 8, 255, 256, 257, 767, 768, 769, 8191, 8192, 24577, 100003, MiB + 13, 3 * MiB + 5]


@pytest.mark.parametrize("size", SIZES)
def test_matches_reference_at_unaligned_offsets(crc: Callable[..., int], size: int) -> None:
    offset = random.Random(size).randrange(1, 8)
    view = memoryview(POOL)[offset : offset + size]
    assert crc(view) == reference_of_pool(offset, size)
    assert crc(POOL[:size]) == reference_of_pool(0, size)
    if size <= 100003:
        assert crc(view, 0x9E3779B9) == reference_of_pool(offset, size, 0x9E3779B9)


def test_continuation(crc: Callable[..., int]) -> None:
    data = POOL[: 300 * 1024 + 7]
    whole = crc(data)
    for cut in (0, 1, 5, 4096, 24577, 100000, len(data)):
        assert crc(data[cut:], crc(data[:cut])) == whole, cut


def test_accepts_every_buffer_kind(mod: types.ModuleType) -> None:
    data = POOL[: 64 * 1024]
    expected = crc32c_reference(data)
    anonymous = mmap.mmap(-1, len(data))
    anonymous.write(data)
    as_floats = np.frombuffer(data, dtype=np.float64).reshape(128, 64)
    for buf in (data, bytearray(data), memoryview(data), anonymous, as_floats):
        assert mod.crc32c(buf) == expected, type(buf)
    anonymous.close()


def test_crc32c_combine(mod: types.ModuleType) -> None:
    for len_a, len_b in [(0, 0), (0, 9), (9, 0), (1, 1), (1000, 24577), (100003, MiB)]:
        a, b = POOL[:len_a], POOL[len_a : len_a + len_b]
        combined = mod.crc32c_combine(mod.crc32c(a), mod.crc32c(b), len(b))
        assert combined == mod.crc32c(a + b), (len_a, len_b)


def test_crc32c_combine_range_checks(mod: types.ModuleType) -> None:
    assert 0 <= mod.crc32c_combine(0xFFFFFFFF, 0, 2**64 - 1) <= 0xFFFFFFFF
    with pytest.raises(ValueError, match=r"^crc32c_combine\(\): len2 must be between 0 and"):
        mod.crc32c_combine(0, 0, 2**64)
    with pytest.raises(ValueError, match=r"^crc32c_combine\(\): crc1 must be between 0 and"):
        mod.crc32c_combine(-1, 0, 0)


def test_crc_value_checks(mod: types.ModuleType) -> None:
    with pytest.raises(
        ValueError,
        match=r"^crc32c\(\): value must be between 0 and 4294967295, got 4294967296$",
    ):
        mod.crc32c(b"", 2**32)
    with pytest.raises(ValueError, match=r"got -1$"):
        mod.crc32c(b"", -1)
    with pytest.raises(TypeError):
        mod.crc32c(b"", 1.5)
    assert mod.crc32c(b"", np.uint32(7)) == 7  # anything with __index__


def test_fallback_has_no_hardware_path() -> None:
    assert _fallback.hardware == "none"
    with pytest.raises(RuntimeError, match="no CRC-32C instruction"):
        _fallback.crc32c_hw(b"abc")


@pytest.mark.skipif(_native is None, reason="mtckpt._native is not built")
def test_native_dispatch_and_backends_agree() -> None:
    assert _native.hardware in ("sse4.2", "armv8-crc", "none")
    if _native.hardware == "none":
        with pytest.raises(RuntimeError, match="no CRC-32C instruction"):
            _native.crc32c_hw(b"abc")
    for value in (0, 1, 0xFFFFFFFF):
        assert _native.crc32c_combine(value, 5, 2**64 - 1) == _fallback.crc32c_combine(
            value, 5, 2**64 - 1
        )


CHUNKED = random_bytes(10 * MiB + 5, seed=2)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_crc32c_chunks(mod: types.ModuleType, threads: int) -> None:
    for chunk_size in (MiB, 3 * MiB + 1, 64 * MiB):
        expected = [
            mod.crc32c(CHUNKED[start : start + chunk_size])
            for start in range(0, len(CHUNKED), chunk_size)
        ]
        assert mod.crc32c_chunks(CHUNKED, chunk_size, threads) == expected, chunk_size
    assert mod.crc32c_chunks(b"", 4, threads) == []
    assert mod.crc32c_chunks(b"123456789", 4, threads) == [
        crc32c_reference(b"1234"),
        crc32c_reference(b"5678"),
        crc32c_reference(b"9"),
    ]


def test_crc32c_chunks_argument_checks(mod: types.ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^crc32c_chunks\(\): chunk_size must be >= 1, got 0$"):
        mod.crc32c_chunks(b"abc", 0)
    with pytest.raises(ValueError, match=r"^crc32c_chunks\(\): threads must be >= 1, got 0$"):
        mod.crc32c_chunks(b"abc", 1, 0)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_equal_chunks_compares_each_chunk_in_bytes_and_length(mod, threads: int) -> None:
    changed = bytearray(CHUNKED)
    changed[3 * MiB + 7] ^= 1  # chunk 3
    changed[-1] ^= 0x80  # the last chunk's last byte
    same = mod.equal_chunks(CHUNKED, changed, MiB, threads)
    assert list(same) == [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0]
    assert list(mod.equal_chunks(CHUNKED, CHUNKED[: 4 * MiB + 1], MiB, threads)) == (
        [1, 1, 1, 1] + [0] * 7  # chunk 4 has one byte there: another length
    )
    assert list(mod.equal_chunks(CHUNKED[: 2 * MiB], CHUNKED, MiB, threads)) == [1, 1]
    assert mod.equal_chunks(b"", CHUNKED, MiB, threads) == b""
    assert list(mod.equal_chunks(b"123456789", b"1234567", 4, threads)) == [1, 0, 0]


def test_equal_chunks_argument_checks(mod: types.ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^equal_chunks\(\): chunk_size must be >= 1, got 0$"):
        mod.equal_chunks(b"abc", b"abc", 0)
    with pytest.raises(ValueError, match=r"^equal_chunks\(\): threads must be >= 1, got 0$"):
        mod.equal_chunks(b"abc", b"abc", 1, 0)


BIG = np.random.default_rng(3).integers(0, 256, 40 * MiB, dtype=np.uint8)
GUARD = 0xA5


def guarded(size: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """A buffer of GUARD bytes and an unaligned view of `size` bytes inside it."""
    outer = np.full(size + offset + 16, GUARD, dtype=np.uint8)
    return outer, outer[offset : offset + size]


def assert_guards_intact(outer: np.ndarray, offset: int, size: int) -> None:
    assert (outer[:offset] == GUARD).all()
    assert (outer[offset + size :] == GUARD).all()


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("size", [0, 1, 4095, MiB + 3, 9 * MiB + 7, 33 * MiB + 1])
def test_copy(mod: types.ModuleType, threads: int, size: int) -> None:
    src = BIG[5 : 5 + size]
    outer, dst = guarded(size, offset=3)
    assert mod.copy(dst, src, threads) is None
    assert np.array_equal(dst, src)
    assert_guards_intact(outer, 3, size)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_copy_many(mod: types.ModuleType, threads: int) -> None:
    # ~200 tensors of odd sizes, a few large, so a split falls inside and across pairs.
    rng = random.Random(threads)
    sizes = [rng.choice([0, 1, 7, 4093, rng.randrange(100_000)]) for _ in range(200)]
    sizes[17] = sizes[120] = 6 * MiB + 11
    outer = np.full(sum(sizes) + 8 * len(sizes), GUARD, dtype=np.uint8)
    dsts, srcs, spans = [], [], []
    position = source = 0
    for size in sizes:
        position += 3  # unaligned, with guard bytes between destinations
        dsts.append(memoryview(outer[position : position + size]))
        srcs.append(memoryview(BIG[source + 1 : source + 1 + size]))
        spans.append((position, size))
        position += size + 5
        source += size
    assert mod.copy_many(dsts, srcs, threads) is None
    for i, (dst, src) in enumerate(zip(dsts, srcs, strict=True)):
        assert bytes(dst) == bytes(src), i
    holes = np.ones(outer.size, dtype=bool)
    for start, size in spans:
        holes[start : start + size] = False
    assert (outer[holes] == GUARD).all()
    mod.copy_many([], [], threads)  # nothing to do is fine
    mod.copy_many((bytearray(3),), iter([b"abc"]), threads)  # any sequences


@pytest.mark.parametrize("size", [0, 1, 98305, 10 * MiB + 3])
def test_copy_crc32c(mod: types.ModuleType, size: int) -> None:
    src = BIG[7 : 7 + size]
    outer, dst = guarded(size, offset=1)
    expected = mod.crc32c(src, 0x1234)
    assert mod.copy_crc32c(dst, src, 0x1234) == expected
    assert np.array_equal(dst, src)
    assert_guards_intact(outer, 1, size)
    assert mod.copy_crc32c(bytearray(9), b"123456789") == 0xE3069283


def test_size_mismatch_errors(mod: types.ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^copy\(\): dst has 4 bytes but src has 5 bytes$"):
        mod.copy(bytearray(4), b"12345")
    with pytest.raises(ValueError, match=r"^copy_crc32c\(\): dst has 6 bytes but src has 5 bytes$"):
        mod.copy_crc32c(bytearray(6), b"12345")
    first = bytearray(b"xx")
    with pytest.raises(
        ValueError, match=r"^copy_many\(\): dsts\[1\] has 3 bytes but srcs\[1\] has 4 bytes$"
    ):
        mod.copy_many([first, bytearray(3)], [b"ab", b"abcd"])
    assert first == b"xx"  # checked before anything is copied
    with pytest.raises(ValueError, match=r"^copy_many\(\): 2 destinations but 1 sources$"):
        mod.copy_many([bytearray(1), bytearray(1)], [b"a"])
    with pytest.raises(TypeError, match=r"^copy_many\(\): dsts must be a sequence$"):
        mod.copy_many(5, [b"a"])


def test_threads_must_be_positive(mod: types.ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^copy\(\): threads must be >= 1, got 0$"):
        mod.copy(bytearray(1), b"a", 0)
    with pytest.raises(ValueError, match=r"^copy_many\(\): threads must be >= 1, got -2$"):
        mod.copy_many([bytearray(1)], [b"a"], -2)
    mod.copy(bytearray(1), b"a", 10_000)  # more than the cap is clamped, not refused


def test_non_contiguous_input_is_buffer_error(mod: types.ModuleType) -> None:
    strided = np.arange(64, dtype=np.uint8)[::2]
    with pytest.raises(BufferError, match=r"^crc32c\(\): data must be a C-contiguous buffer$"):
        mod.crc32c(strided)
    with pytest.raises(BufferError, match=r"^copy\(\): src must be a C-contiguous buffer$"):
        mod.copy(bytearray(32), strided)
    with pytest.raises(BufferError, match=r"^copy\(\): dst must be a writable C-contiguous"):
        mod.copy(np.zeros(64, dtype=np.uint8)[::2], bytes(32))
    with pytest.raises(BufferError, match=r"^copy_many\(\): srcs\[0\] must be a C-contiguous"):
        mod.copy_many([bytearray(32)], [strided])
    with pytest.raises(BufferError, match=r"^crc32c_chunks\(\): data must be a C-contiguous"):
        mod.crc32c_chunks(np.zeros((4, 4), order="F"), 8)
    with pytest.raises(BufferError):
        mod.crc32c(memoryview(b"abcdef")[::2])


def test_read_only_destination_is_buffer_error(mod: types.ModuleType) -> None:
    frozen = np.zeros(8, dtype=np.uint8)
    frozen.flags.writeable = False
    for dst in (b"12345678", memoryview(bytearray(8)).toreadonly(), frozen):
        with pytest.raises(BufferError, match=r"^copy\(\): dst must be a writable C-contig"):
            mod.copy(dst, b"abcdefgh")
        with pytest.raises(BufferError, match=r"^copy_many\(\): dsts\[0\] must be a writable"):
            mod.copy_many([dst], [b"abcdefgh"])
        with pytest.raises(BufferError, match=r"^copy_crc32c\(\): dst must be a writable"):
            mod.copy_crc32c(dst, b"abcdefgh")
        with pytest.raises(BufferError, match=r"^prefault\(\): buf must be a writable"):
            mod.prefault(dst)
    assert not frozen.any()


def test_non_buffer_is_type_error(mod: types.ModuleType) -> None:
    with pytest.raises(TypeError, match="bytes-like object is required, not 'int'"):
        mod.crc32c(123)
    with pytest.raises(TypeError, match="bytes-like object is required, not 'str'"):
        mod.copy(bytearray(1), "a")


def rss_kib_of_mapping(address: int) -> int:
    """Resident KiB of the mapping holding `address`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(part, 16) for part in first.split("-"))
                inside = start <= address < end
            elif inside and first == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_prefault_makes_pages_resident_and_keeps_contents(mod: types.ModuleType) -> None:
    size = 16 * MiB
    region = mmap.mmap(-1, size)
    region[: 4 * MiB] = POOL
    view = np.frombuffer(region, dtype=np.uint8)
    before = rss_kib_of_mapping(view.ctypes.data)
    assert before < size // 1024  # most of it never touched yet
    mod.prefault(region)
    assert rss_kib_of_mapping(view.ctypes.data) >= size // 1024
    assert region[: 4 * MiB] == POOL
    assert region[4 * MiB :] == bytes(size - 4 * MiB)
    del view
    region.close()


def test_prefault_on_unaligned_views(mod: types.ModuleType) -> None:
    data = bytearray(POOL[: MiB + 77])
    mod.prefault(memoryview(data)[13 : MiB + 5])
    mod.prefault(bytearray())
    assert data == POOL[: MiB + 77]


@pytest.fixture
def rw_fd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def test_pwrite_all_then_pread_into(mod: types.ModuleType, rw_fd: int) -> None:
    data = memoryview(POOL)[3 : 3 * MiB + 6]
    mod.pwrite_all(rw_fd, data, 4097)
    assert os.fstat(rw_fd).st_size == 4097 + len(data)
    assert os.pread(rw_fd, len(data), 4097) == data
    readback = bytearray(len(data))
    assert mod.pread_into(rw_fd, readback, 4097) == len(data)
    assert readback == data
    mod.pwrite_all(rw_fd, np.arange(16, dtype=np.uint16), 0)
    assert os.pread(rw_fd, 32, 0) == np.arange(16, dtype=np.uint16).tobytes()
    mod.pwrite_all(rw_fd, b"", 0)


def test_pread_into_stops_at_end_of_file(mod: types.ModuleType, rw_fd: int) -> None:
    os.write(rw_fd, b"0123456789")
    outer, buf = guarded(8, offset=1)
    assert mod.pread_into(rw_fd, buf, 6) == 4
    assert bytes(buf[:4]) == b"6789"
    assert (buf[4:] == GUARD).all()
    assert_guards_intact(outer, 1, 8)
    assert mod.pread_into(rw_fd, bytearray(5), 10) == 0
    assert mod.pread_into(rw_fd, bytearray(5), 1 << 40) == 0


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and /dev/null")
def test_io_loops_past_the_per_call_limit(mod: types.ModuleType) -> None:
    # Linux moves at most 0x7FFFF000 bytes per read/write call: a larger buffer needs
    # the retry loop. /dev/zero never reaches end of file, so the read must be whole.
    size = 0x7FFFF000 + 3 * 4096 + 5
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    markers = [0, 0x7FFFF000 - 1, 0x7FFFF000, size - 1]
    try:
        for marker in markers:
            region[marker] = 0xFF
        with open("/dev/zero", "rb", buffering=0) as zero:
            assert mod.pread_into(zero.fileno(), region, 0) == size
        assert [region[marker] for marker in markers] == [0, 0, 0, 0]
        with open("/dev/null", "wb", buffering=0) as null:
            mod.pwrite_all(null.fileno(), region, 0)
    finally:
        region.close()


def test_fallocate(mod: types.ModuleType, rw_fd: int) -> None:
    mod.fallocate(rw_fd, 4096, MiB)
    status = os.fstat(rw_fd)
    assert status.st_size == 4096 + MiB
    assert status.st_blocks * 512 >= MiB
    with pytest.raises(OSError) as caught:
        mod.fallocate(rw_fd, 0, 0)
    assert caught.value.errno == errno.EINVAL


def test_file_calls_on_bad_fd_raise_oserror(mod: types.ModuleType, tmp_path) -> None:
    for call in (
        lambda: mod.fallocate(-1, 0, 4096),
        lambda: mod.pwrite_all(-1, b"abc", 0),
        lambda: mod.pread_into(-1, bytearray(3), 0),
    ):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.EBADF
    path = tmp_path / "read-only"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            mod.pwrite_all(fd, b"x", 0)
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)


def main_thread_ran_during(call: Callable[[], object], repeats: int) -> bool:
    """Whether the main thread ran Python code while `call` ran in another thread.

    With a switch interval far longer than the test, a thread holding the GIL is never
    made to give it up, so the main thread can only count while the call has released
    it: the check does not depend on timing. The call is repeated (up to `repeats`
    times) only to give the OS a chance to schedule the main thread at all.
    """
    counter = [0]
    done = threading.Event()
    seen_running: list[bool] = []

    def worker() -> None:
        try:
            for _ in range(repeats):
                before = counter[0]
                call()
                if counter[0] != before:
                    seen_running.append(True)
                    return
        finally:
            done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        while not done.is_set():
            counter[0] += 1
            time.sleep(0)  # hands the GIL back as soon as the worker's call returns
        thread.join()
    finally:
        sys.setswitchinterval(old_interval)
    return bool(seen_running)


@pytest.fixture(scope="module")
def gil_buffers() -> dict[str, bytearray]:
    return {"large": bytearray(256 * MiB), "src": bytearray(64 * MiB), "dst": bytearray(64 * MiB)}


def test_gil_detector_sees_a_call_that_holds_it(gil_buffers: dict[str, bytearray]) -> None:
    src = memoryview(gil_buffers["src"])
    assert not main_thread_ran_during(lambda: bytes(src), repeats=5)


GIL_RELEASING_CALLS = {
    "crc32c": lambda n, b: n.crc32c(b["large"]),
    "crc32c_sw": lambda n, b: n.crc32c_sw(b["src"]),
    "crc32c_chunks": lambda n, b: n.crc32c_chunks(b["large"], 16 * MiB, 2),
    "copy": lambda n, b: n.copy(b["dst"], b["src"], 2),
    "copy_many": lambda n, b: n.copy_many([b["dst"]], [b["src"]], 1),
    "copy_crc32c": lambda n, b: n.copy_crc32c(b["dst"], b["src"]),
    "prefault": lambda n, b: n.prefault(b["large"]),
}


@pytest.mark.skipif(_native is None, reason="mtckpt._native is not built")
@pytest.mark.parametrize("name", sorted(GIL_RELEASING_CALLS))
def test_native_releases_the_gil(name: str, gil_buffers: dict[str, bytearray]) -> None:
    call = GIL_RELEASING_CALLS[name]
    assert main_thread_ran_during(lambda: call(_native, gil_buffers), repeats=20)


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No backend chosen yet and MTCKPT_NATIVE unset; both restored afterwards."""
    monkeypatch.setattr(_fastpath, "_chosen", None)
    monkeypatch.delenv("MTCKPT_NATIVE", raising=False)
    return monkeypatch


def without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> types.ModuleType:
        raise ImportError("No module named 'mtckpt._native'")

    monkeypatch.setattr(_fastpath, "_import_native", refuse)


def test_env_off_selects_python(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv("MTCKPT_NATIVE", " OFF ")
    assert _fastpath.backend() is _fallback
    assert _fastpath.backend_name() == "python"


@pytest.mark.skipif(_native is None, reason="mtckpt._native is not built")
@pytest.mark.parametrize("mode", [None, "auto", "require"])
def test_env_auto_and_require_select_native(fresh_choice: pytest.MonkeyPatch, mode) -> None:
    if mode is not None:
        fresh_choice.setenv("MTCKPT_NATIVE", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fastpath.backend() is _native
    assert _fastpath.backend_name() == "native"


def test_auto_without_native_warns_once(
    fresh_choice: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    without_native(fresh_choice)
    with caplog.at_level(logging.WARNING, logger="mtckpt._fastpath"):
        with pytest.warns(RuntimeWarning, match="checkpoints will be slower") as record:
            assert _fastpath.backend() is _fallback
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _fastpath.backend_name() == "python"
            assert _fastpath.backend() is _fallback
    assert len(record) == 1
    logged = [r for r in caplog.records if r.name == "mtckpt._fastpath"]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert "slower" in logged[0].getMessage()


def test_require_without_native_raises(fresh_choice: pytest.MonkeyPatch) -> None:
    without_native(fresh_choice)
    fresh_choice.setenv("MTCKPT_NATIVE", "require")
    with pytest.raises(ImportError, match=r"MTCKPT_NATIVE=require.*pip install"):
        _fastpath.backend()
    fresh_choice.setenv("MTCKPT_NATIVE", "off")  # a failed choice is not remembered
    assert _fastpath.backend_name() == "python"


def test_invalid_env_value(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv("MTCKPT_NATIVE", "fast")
    with pytest.raises(ValueError, match=r"MTCKPT_NATIVE='fast'.*auto, require, off"):
        _fastpath.backend()


def test_choice_is_made_once_on_first_call(fresh_choice: pytest.MonkeyPatch) -> None:
    fresh_choice.setenv("MTCKPT_NATIVE", "off")
    assert _fastpath._chosen is None  # nothing chosen until asked
    assert _fastpath.backend_name() == "python"
    fresh_choice.setenv("MTCKPT_NATIVE", "fast")  # read once: later changes are ignored
    assert _fastpath.backend_name() == "python"


def test_select(fresh_choice: pytest.MonkeyPatch) -> None:
    _fastpath.select("python")
    assert _fastpath.backend() is _fallback
    assert _fastpath.backend_name() == "python"
    with pytest.raises(ValueError, match="'turbo'"):
        _fastpath.select("turbo")
    assert _fastpath.backend_name() == "python"
    if _native is not None:
        _fastpath.select("native")
        assert _fastpath.backend() is _native
        assert _fastpath.backend_name() == "native"
    without_native(fresh_choice)
    with pytest.raises(ImportError, match="pip install"):
        _fastpath.select("native")
