"""What a daemon holds: its node's own committed shards in the memory tier, and the replicas
it keeps for other nodes (``{memory_root}/.replicas/{origin}/{run}/step-.../``, the same
files). Names from the wire are validated and only ever mapped to these paths; a replica is
written under a temporary name, verified chunk by chunk against its manifest as it arrives,
and complete only once its manifest is written after it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import _fastpath, commit, naming
from ..errors import ChecksumMismatchError, CorruptCheckpointError
from ..manifest import RankManifest
from ..restore import close_mapping
from ..tiers.directory import DirectoryStorage
from .rpc import CHUNK_BYTES

REPLICAS_DIR = ".replicas"
FREE_DIR = ".replicas-free"  # expired replicas' data files, reused for new ones
MAX_SHARD_BYTES = 1 << 44  # 16 TiB: larger sizes from the wire are refused


@dataclass(frozen=True)
class Shard:
    run: str
    step: int
    rank: int
    origin: str  # the node that saved it

    def __str__(self) -> str:
        return f"run {self.run!r} step {self.step} rank {self.rank} of node {self.origin!r}"

    @classmethod
    def checked(cls, run: str, step: int, rank: int, origin: str) -> Shard:
        """From values off the wire: ValueError naming what is wrong."""
        naming.check_run(run)
        naming.check_step(step)
        if not 0 <= rank <= naming.MAX_RANK:
            raise ValueError(f"rank {rank} is out of range 0..{naming.MAX_RANK}")
        naming.check_node_id(origin)
        return cls(run, step, rank, origin)


@dataclass(frozen=True)
class Held:
    shard: Shard
    world_size: int
    data_size: int
    replica: bool


class Holdings:
    def __init__(self, node_id: str, memory_root: str | os.PathLike, keep: int) -> None:
        self.node_id = naming.check_node_id(node_id)
        self.root = Path(memory_root)
        self.keep = keep
        self.own = DirectoryStorage(self.root, "memory", durable=False, populate=False)
        self._world: dict[Shard, int] = {}  # world size of replicas, from their manifests
        self._lock = threading.Lock()

    def storage(self, origin: str) -> DirectoryStorage:
        """Where shards saved by ``origin`` are kept on this node."""
        if origin == self.node_id:
            return self.own
        path = self.root / REPLICAS_DIR / naming.check_node_id(origin)
        return DirectoryStorage(path, f"replicas of {origin}", durable=False, populate=False)

    def _origins(self) -> list[str]:
        try:
            names = os.listdir(self.root / REPLICAS_DIR)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if _valid(naming.check_node_id, name))

    def runs(self, storage: DirectoryStorage) -> list[str]:
        try:
            names = os.listdir(storage.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if _valid(naming.check_run, name))

    def list(self, run: str = "", origin: str = "") -> list[Held]:
        """Every complete shard held: own shards of committed steps, and whole replicas."""
        held = []
        origins = [self.node_id, *self._origins()]
        for source in origins:
            if origin and source != origin:
                continue
            storage = self.storage(source)
            for name in [run] if run else self.runs(storage):
                held.extend(self._list_run(storage, source, name))
        return held

    def _list_run(self, storage: DirectoryStorage, origin: str, run: str) -> list[Held]:
        held = []
        replica = origin != self.node_id
        for step in storage.steps(run):
            if not replica and not commit.is_committed(storage, run, step):
                continue
            try:
                world = None if replica else commit.saved_world_size(storage, run, step)
            except CorruptCheckpointError:
                continue
            for rank in sorted(commit.ranks_present(storage, run, step)):
                shard = Shard(run, step, rank, origin)
                try:
                    size = storage.path(run, step, naming.data_file(rank)).stat().st_size
                    held.append(Held(shard, world or self._world_of(storage, shard), size, replica))
                except (OSError, CorruptCheckpointError):
                    continue  # removed meanwhile, or a damaged manifest: not offered
        return held

    def _world_of(self, storage: DirectoryStorage, shard: Shard) -> int:
        with self._lock:
            if shard in self._world:
                return self._world[shard]
        manifest = self.manifest(shard, storage)
        with self._lock:
            self._world[shard] = manifest.world_size
        return manifest.world_size

    def manifest(self, shard: Shard, storage: DirectoryStorage | None = None) -> RankManifest:
        storage = storage or self.storage(shard.origin)
        name = naming.manifest_file(shard.rank)
        where = f"{storage.describe()}: step {shard.step} {name}"
        try:
            raw = storage.read_bytes(shard.run, shard.step, name)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: not held here") from None
        return RankManifest.from_json(raw, where)

    def read(
        self, shard: Shard, manifest: bool, offset: int, length: int
    ) -> Iterator[tuple[int, memoryview]]:
        """``(offset, bytes)`` pieces of a held file, at most CHUNK_BYTES each."""
        storage = self.storage(shard.origin)
        whole = storage.exists(shard.run, shard.step, naming.manifest_file(shard.rank))
        if not whole or (
            storage is self.own and not commit.is_committed(storage, shard.run, shard.step)
        ):
            raise FileNotFoundError(f"{shard} is not held here")
        name = naming.manifest_file(shard.rank) if manifest else naming.data_file(shard.rank)
        mapping = storage.map(shard.run, shard.step, name)
        try:
            size = len(mapping)
            end = size if length == 0 else min(size, offset + length)
            view = memoryview(mapping)
            try:
                for start in range(offset, end, CHUNK_BYTES):
                    yield start, view[start : min(end, start + CHUNK_BYTES)]
            finally:
                view.release()
        finally:
            close_mapping(mapping)

    def store(
        self,
        shard: Shard,
        manifest_json: bytes,
        pieces: Iterable[tuple[int, bytes]],
        data_size: int | None = None,
    ) -> int:
        """Keep a replica (or, for this node's own shard, a recovered copy): the data file
        from ``(offset, bytes)`` pieces in order, each manifest chunk's crc32c checked as it
        completes, then the manifest. Returns the bytes stored."""
        where = f"{shard}"
        manifest = RankManifest.from_json(manifest_json, f"{where}: manifest")
        if (manifest.run, manifest.step, manifest.rank) != (shard.run, shard.step, shard.rank):
            raise CorruptCheckpointError(
                f"{where}: the manifest is of run {manifest.run!r} step {manifest.step} rank "
                f"{manifest.rank}"
            )
        data_size = manifest.file_size if data_size is None else data_size
        if data_size != manifest.file_size or not 0 <= data_size <= MAX_SHARD_BYTES:
            raise CorruptCheckpointError(
                f"{where}: {data_size} data bytes announced, the manifest records "
                f"{manifest.file_size} (at most {MAX_SHARD_BYTES})"
            )
        storage = self.storage(shard.origin)
        checker = _ChunkCheck(manifest, where)
        final = storage.path(shard.run, shard.step, naming.data_file(shard.rank))
        storage.make_step_dir(shard.run, shard.step)
        temp = final.with_name(naming.temp_name(final.name))
        self._write(temp, data_size, checker.feed(pieces))
        os.replace(temp, final)
        storage.write_bytes(shard.run, shard.step, naming.manifest_file(shard.rank), manifest_json)
        return data_size

    def _write(self, temp: Path, size: int, pieces: Iterable) -> None:
        """Write a data file at ``temp``, into an expired replica's file when there is one:
        its tmpfs pages are already allocated (a fresh file costs a fault per page)."""
        fastpath = _fastpath.backend()
        reused = self._take_free(temp)
        fd = os.open(temp, os.O_WRONLY | os.O_CLOEXEC | (0 if reused else os.O_CREAT | os.O_EXCL),
                     0o644)  # fmt: skip
        try:
            os.ftruncate(fd, size)
            offset = 0
            for piece in pieces:
                fastpath.pwrite_all(fd, piece, offset)
                offset += memoryview(piece).nbytes
            if offset != size:
                raise CorruptCheckpointError(f"{temp.name}: {offset} of {size} bytes arrived")
        except BaseException:
            os.close(fd)
            _unlink(temp)
            raise
        os.close(fd)

    def _take_free(self, temp: Path) -> bool:
        with self._lock:
            try:
                names = sorted(os.listdir(self.root / FREE_DIR))
            except FileNotFoundError:
                return False
            for name in names:
                try:
                    os.replace(self.root / FREE_DIR / name, temp)
                    return True
                except FileNotFoundError:
                    continue
        return False

    def expire_replicas(self, origin: str, run: str) -> None:
        """Keep the newest ``keep`` steps of ``origin``'s replicas of ``run``; the data files
        of older ones are kept (a few) for the next replicas to be written into."""
        storage = self.storage(origin)
        for step in storage.steps(run)[: -self.keep]:
            names = storage.files(run, step)
            for name in sorted(names, key=lambda n: not n.endswith(".json")):  # manifests first
                path = storage.step_path(run, step) / name
                if name.endswith(".safetensors") and self._free_count() < self.keep + 1:
                    (self.root / FREE_DIR).mkdir(parents=True, exist_ok=True)
                    os.replace(path, self.root / FREE_DIR / f"{origin}-{run}-{step}-{name}")
                else:
                    _unlink(path)
            storage.remove_step_dir(run, step)
            with self._lock:
                for shard in [
                    s for s in self._world if (s.origin, s.run, s.step) == (origin, run, step)
                ]:
                    del self._world[shard]

    def _free_count(self) -> int:
        try:
            return len(os.listdir(self.root / FREE_DIR))
        except FileNotFoundError:
            return 0


class _ChunkCheck:
    """Checks arriving data against the manifest's per-chunk crc32c, as it arrives."""

    def __init__(self, manifest: RankManifest, where: str) -> None:
        self.manifest, self.where = manifest, where

    def feed(self, pieces: Iterable[tuple[int, bytes]]) -> Iterator[bytes]:
        fastpath = _fastpath.backend()
        size, expected = self.manifest.chunk_size, self.manifest.chunk_crc32c
        position, crc = 0, 0
        for offset, data in pieces:
            if offset != position:
                raise CorruptCheckpointError(
                    f"{self.where}: data at offset {offset}, expected {position}"
                )
            if position + len(data) > self.manifest.file_size:
                raise CorruptCheckpointError(
                    f"{self.where}: more than the {self.manifest.file_size} bytes announced"
                )
            view = memoryview(data)
            while view.nbytes:
                index = position // size
                take = min(view.nbytes, (index + 1) * size - position)
                crc = fastpath.crc32c(view[:take], crc)
                position += take
                view = view[take:]
                if position % size == 0 or position == self.manifest.file_size:
                    if crc != expected[index]:
                        raise ChecksumMismatchError(
                            f"{self.where}: chunk {index} arrived with crc32c {crc:#010x}, the "
                            f"manifest records {expected[index]:#010x}"
                        )
                    crc = 0
            yield data
        if position != self.manifest.file_size:
            raise CorruptCheckpointError(
                f"{self.where}: {position} of {self.manifest.file_size} bytes arrived"
            )


def _valid(check, name: str) -> bool:
    try:
        check(name)
    except ValueError:
        return False
    return True


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
