"""What a daemon holds: its node's own committed shards in the memory tier (and in the local
tier, with a local root), and the replicas it keeps for other nodes
(``{memory_root}/.replicas/{origin}/{run}/step-.../``, the same files). Names from the
wire are validated and only ever mapped to these paths; a replica is written under a
temporary name, verified chunk by chunk against its manifest as it arrives, and complete
only once its manifest is written after it."""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import _fastpath, incremental
from ..errors import CorruptCheckpointError
from ..format import commit, naming
from ..format.manifest import RankManifest
from ..tiers.base import close_mapping
from ..tiers.directory import DirectoryStorage
from ..tiers.local import LocalStorage
from .frames import CHUNK_BYTES
from .incoming import Incoming, NoBase, PatchedIncoming
from .kept import KeptSteps
from .spares import zeroed_file
from .sync import sync_steps

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
class Outgoing:
    """A held file a peer may fetch, with what describes its chunks (a manifest, or a
    parity's checksums): whole, or ``length`` bytes from ``offset``."""

    path: Path
    manifest: RankManifest  # or anything with file_size, chunk_size and chunk_crc32c
    offset: int = 0
    length: int | None = None  # None: the whole file


@dataclass(frozen=True)
class Held:
    shard: Shard
    world_size: int
    data_size: int
    replica: bool
    manifest_crc: int = 0  # crc32c of the manifest: two saves of one step differ in it


class Holdings:
    def __init__(
        self,
        node_id: str,
        memory_root: str | os.PathLike,
        keep: int,
        local_root: str | os.PathLike | None = None,
    ) -> None:
        self.node_id = naming.check_node_id(node_id)
        self.root = Path(memory_root)
        self.keep = keep
        self.own = DirectoryStorage(self.root, "memory", durable=False, populate=False)
        self.local = None if local_root is None else LocalStorage(local_root)
        self.kept = KeptSteps(self.own)
        self.spares = keep + 1  # expired replicas' data files kept for new ones
        self._world: dict[Shard, int] = {}  # world size of replicas, from their manifests
        self._spares: dict[str, mmap.mmap] = {}  # free files mapped with their pages present
        self._lock = threading.Lock()

    def storage(self, origin: str) -> DirectoryStorage:
        """Where shards saved by ``origin`` are kept on this node."""
        if origin == self.node_id:
            return self.own
        path = self.root / REPLICAS_DIR / naming.check_node_id(origin)
        return DirectoryStorage(path, f"replicas of {origin}", durable=False, populate=False)

    def _origins(self) -> list[str]:
        return _valid_names(self.root / REPLICAS_DIR, naming.check_node_id)

    def runs(self, storage: DirectoryStorage) -> list[str]:
        return _valid_names(storage.root, naming.check_run)

    def own_storages(self) -> list[DirectoryStorage]:
        """Where this node's own shards are: the memory tier, the local tier, the sync steps
        kept after the trainers expired them."""
        local = [] if self.local is None else [self.local]
        return [self.own, *local, self.kept.storage]

    def list(self, run: str = "", origin: str = "") -> list[Held]:
        """Every complete shard held: own shards of steps committed in the memory or the
        local tier, and whole replicas."""
        held: dict[Shard, Held] = {}
        storages = [(self.node_id, s) for s in self.own_storages()]
        storages += [(source, self.storage(source)) for source in self._origins()]
        for source, storage in storages:
            if origin and source != origin:
                continue
            for name in [run] if run else self.runs(storage):
                for shard in self._list_run(storage, source, name):
                    held.setdefault(shard.shard, shard)
        return list(held.values())

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
                    manifest = storage.read_bytes(run, step, naming.manifest_file(rank))
                    crc = _fastpath.backend().crc32c(manifest)
                    world = world or self._world_of(storage, shard)
                    held.append(Held(shard, world, size, replica, crc))
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

    def outgoing(self, shard: Shard, offset: int = 0, length: int = 0) -> Outgoing:
        """What a peer may fetch of a held shard's data file (for the data port): whole, or
        ``length`` bytes from ``offset`` (ValueError past its end)."""
        storage = self.holding(shard)
        path = storage.path(shard.run, shard.step, naming.data_file(shard.rank))
        manifest = self.manifest(shard, storage)
        if not offset and not length:
            return Outgoing(path, manifest)
        if offset < 0 or length <= 0 or offset + length > manifest.file_size:
            raise ValueError(f"{shard}: {length} bytes at offset {offset} asked for; its data "
                             f"file has {manifest.file_size}")  # fmt: skip
        return Outgoing(path, manifest, offset, length)

    def holding(self, shard: Shard) -> DirectoryStorage:
        """The storage holding ``shard`` whole, or FileNotFoundError."""
        own = shard.origin == self.node_id
        for storage in self.own_storages() if own else [self.storage(shard.origin)]:
            whole = storage.exists(shard.run, shard.step, naming.manifest_file(shard.rank))
            if whole and (not own or commit.is_committed(storage, shard.run, shard.step)):
                return storage
        raise FileNotFoundError(f"{shard} is not held here")

    def read(
        self, shard: Shard, manifest: bool, offset: int, length: int
    ) -> Iterator[tuple[int, memoryview]]:
        """``(offset, bytes)`` pieces of a held file, at most CHUNK_BYTES each."""
        storage = self.holding(shard)
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
        """Keep a replica (or, for this node's own shard, a recovered copy) from ``(offset,
        bytes)`` pieces in order. Returns the bytes stored."""
        incoming = self.receive(shard, manifest_json, data_size)
        try:
            for offset, data in pieces:
                incoming.put(offset, data)
            incoming.commit()
        finally:
            incoming.close()
        return incoming.size

    def receive(self, shard: Shard, manifest_json: bytes, data_size: int | None = None):
        """An :class:`Incoming` data file for ``shard``, checked against its manifest."""
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
        storage.make_step_dir(shard.run, shard.step)
        final = storage.path(shard.run, shard.step, naming.data_file(shard.rank))
        temp = final.with_name(naming.temp_name(final.name))
        reused, spare = self._take_free(temp, data_size)
        return Incoming(storage, shard, manifest, manifest_json, temp, final, reused, where, spare)

    def receive_patch(self, shard: Shard, manifest_json: bytes, data_size: int,
                      base_step: int) -> PatchedIncoming:  # fmt: skip
        """A replica of ``shard`` made of this node's replica of ``base_step`` and the
        blocks changed since, which the sender streams; NoBase if that replica is not
        here or not of the step's lineage."""
        base_shard = Shard(shard.run, base_step, shard.rank, shard.origin)
        storage = self.storage(shard.origin)
        try:
            raw = storage.read_bytes(shard.run, base_step, naming.manifest_file(shard.rank))
            base = RankManifest.from_json(raw, f"{base_shard}: manifest")
            data = storage.map(shard.run, base_step, naming.data_file(shard.rank))
        except (OSError, CorruptCheckpointError) as exc:
            raise NoBase(f"{base_shard}: no replica here to build {shard} on ({exc})") from None
        incoming = None
        try:
            incoming = self.receive(shard, manifest_json, data_size)
            changes = incoming.manifest.changes
            if not incremental.continues(incoming.manifest, base) or len(data) != base.file_size:
                raise NoBase(f"{base_shard}: not an earlier step of the lineage of {shard}")
            size, block = incoming.manifest.file_size, changes.block_size
            changed = incremental.changed_blocks(incoming.manifest, base)
            kept = sorted(set(range(len(changes.since))) - set(changed))
            view = memoryview(data)
            for offset, length in incremental.runs_of(kept, block, size):
                incoming.write_at(offset, view[offset : offset + length])
            view.release()
            return PatchedIncoming(incoming, incremental.runs_of(changed, block, size))
        except BaseException:
            if incoming is not None:
                incoming.close()
            raise
        finally:
            close_mapping(data)

    def _take_free(self, temp: Path, size: int) -> tuple[bool, mmap.mmap | None]:
        """Move a free data file to ``temp``: one already mapped at ``size`` bytes if there
        is one. Whether one was taken, and its mapping."""
        with self._lock:
            names = self._free_names()
            names.sort(key=lambda n: (n not in self._spares or len(self._spares[n]) != size, n))
            for name in names:
                try:
                    os.replace(self.root / FREE_DIR / name, temp)
                except FileNotFoundError:
                    continue
                spare = self._spares.pop(name, None)
                if spare is not None and len(spare) != size:
                    spare.close()
                    spare = None
                return True, spare
        return False, None

    def _map_spare(self, name: str) -> None:
        """Map a free data file and make its pages present, off the receive path: a replica
        later received into it starts at once."""
        try:
            fd = os.open(self.root / FREE_DIR / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            spare = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            _fastpath.backend().prefault(spare)
        except OSError:
            return  # the next receive maps it itself
        finally:
            os.close(fd)
        with self._lock:
            old = self._spares.pop(name, None)
            self._spares[name] = spare
        if old is not None:
            old.close()

    def ready_spare(self, size: int, fits: Callable[[int], bool]) -> None:
        """After a replica of ``size`` bytes is stored, while no free file is left (the
        first steps of a run, before any expires): one zeroed file of that size made and
        mapped for the next, if ``fits(size)`` (the memory budget has room). Made off the
        receive path, as the trainer's ``reserve`` makes its slots."""
        if size and not self._free_count() and fits(size):
            self._make_spare(size)

    def ready_spares(self, size: int, count: int, fits: Callable[[int], bool]) -> None:
        """Zeroed files of ``size`` bytes made and mapped until ``count`` free files of that
        size are ready, each only if ``fits(size)``: a peer's trainer reserved them for its
        first steps."""
        while size and self.free_of_size(size) < count and fits(size):
            self._make_spare(size)

    def _make_spare(self, size: int) -> None:
        (self.root / FREE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"zeroed-{secrets.token_hex(4)}"
        mapping = zeroed_file(self.root / FREE_DIR / name, size)
        with self._lock:
            self._spares[name] = mapping

    def free_of_size(self, size: int) -> int:
        """Free files of ``size`` bytes ready, mapped."""
        with self._lock:
            return sum(len(mapping) == size for mapping in self._spares.values())

    def expire_replicas(self, origin: str, run: str, stride: int = 1) -> None:
        """Keep the newest ``keep`` steps of ``origin``'s replicas of ``run`` and, with a
        sync ``stride`` above 1, its newest sync steps; the data files of older ones are
        kept (a few) for the next replicas to be written into."""
        storage = self.storage(origin)
        steps = storage.steps(run)
        kept = set(steps[-self.keep :]) | set(sync_steps(steps, stride))
        for step in (s for s in steps if s not in kept):
            names = storage.files(run, step)
            for name in sorted(names, key=lambda n: not n.endswith(".json")):  # manifests first
                path = storage.step_path(run, step) / name
                if name.endswith(".safetensors") and self._free_count() < self.spares:
                    (self.root / FREE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
                    free = f"{origin}-{run}-{step}-{name}"
                    os.replace(path, self.root / FREE_DIR / free)
                    self._map_spare(free)
                else:
                    _unlink(path)
            storage.remove_step_dir(run, step)
            with self._lock:
                for shard in [
                    s for s in self._world if (s.origin, s.run, s.step) == (origin, run, step)
                ]:
                    del self._world[shard]

    def drop_spares(self) -> None:
        """Delete the spare replica files (a memory budget needs their room)."""
        with self._lock:
            spares, self._spares = self._spares, {}
            for spare in spares.values():
                spare.close()
            try:
                names = os.listdir(self.root / FREE_DIR)
            except FileNotFoundError:
                names = []
            for name in names:
                _unlink(self.root / FREE_DIR / name)

    def clean_after_crash(self) -> None:
        """At start-up: remove replicas a killed daemon was still receiving (temporary
        files, possibly hundreds of MB each), the step directories they leave empty, and
        a spare replica file it was still making."""
        try:
            making = [n for n in os.listdir(self.root / FREE_DIR) if naming.temp_target(n)]
        except FileNotFoundError:
            making = []
        for name in making:
            _unlink(self.root / FREE_DIR / name)
        for origin in self._origins():
            storage = self.storage(origin)
            for run in self.runs(storage):
                for step in storage.steps(run):
                    for name in storage.files(run, step):
                        if naming.temp_target(name) is not None:
                            _unlink(storage.step_path(run, step) / name)
                    if not storage.files(run, step):
                        storage.remove_step_dir(run, step)

    def _free_count(self) -> int:
        return len(self._free_names())

    def _free_names(self) -> list[str]:
        """The free data files (not one still being made)."""
        try:
            return [n for n in os.listdir(self.root / FREE_DIR) if naming.temp_target(n) is None]
        except FileNotFoundError:
            return []


def _valid_names(directory: Path, check) -> list[str]:
    """The names in ``directory`` (none if it is missing) that ``check`` accepts, sorted."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _valid(check, name))


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
