"""The parities a daemon holds for its coded group (daemon/groups.py), under
``{memory_root}/.parity/{run}/step-.../``: for each stripe, a parity file into which each
contributor's piece is multiplied as its frames arrive (checked frame by frame; no copy of
a piece is ever held whole), and, once every data piece of the stripe is in, a JSON record
of the stripe, its contributors with their manifests, and a crc32c per chunk of the parity.
A parity is served (and listed as complete) only with that record; it is verified against
it whenever it is sent. A contribution that fails part way clears the stripe: the
contributors send their pieces again. A data node that holds nothing of the step is
recorded with an empty piece, zeros (daemon/absent.py)."""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import _fastpath
from ..errors import CorruptCheckpointError, MtckptError
from ..format import naming
from ..proto import mtckpt_pb2 as pb
from ..redundancy import Redundancy
from ..tiers.base import close_mapping_later
from .incoming import check_next
from .spares import ZeroedSpares
from .stripes import Contributor, StripeKey, pieces_of, summed
from .sync import sync_steps

log = logging.getLogger(__name__)

PARITY_DIR = ".parity"
CHUNK_BYTES = 4 << 20  # a crc32c per this many bytes of a parity


class ParityError(MtckptError):
    """A contribution or a parity was refused or is damaged; the message says which."""


class AlreadyHeld(ValueError):
    """The piece offered is in the stripe already."""


@dataclass(frozen=True)
class Chunks:
    """A parity file's checksums, in the shape bulk.py sends a file by."""

    file_size: int
    chunk_size: int
    chunk_crc32c: tuple[int, ...]


@dataclass
class Stripe:
    """One parity this node holds: being accumulated, or complete."""

    key: StripeKey
    row: int
    path: Path
    contributors: dict[str, Contributor] = field(default_factory=dict)
    arriving: set[str] = field(default_factory=set)  # origins of contributions under way
    generation: int = 0
    opened: float = field(default_factory=time.monotonic)  # this generation's start
    size: int = 0
    chunks: Chunks | None = None  # complete
    lock: threading.Lock = field(default_factory=threading.Lock)
    mapping: mmap.mmap | None = None

    def info(self, origin: str, manifests: bool) -> pb.ParityInfo:
        reply = pb.ParityInfo(stripe=self.key.ident(), row=self.row, size=self.size,
                              complete=self.chunks is not None)  # fmt: skip
        for c in self.contributors.values():
            if not origin or c.origin == origin or c.is_empty:  # empty ones: for the chains
                reply.contributors.append(c.info(manifests))
            if not c.is_empty:
                reply.world_size = c.world_size
        if self.chunks is None:
            data_nodes = self.key.group_of.data_nodes(self.key.stripe)
            reply.awaiting.extend(n for n in data_nodes if n not in self.contributors)
        return reply

    def grow(self, size: int) -> None:
        """The parity at ``size`` bytes at least (zeros past the old end), mapped."""
        if size <= self.size and (self.mapping is not None or size == 0):
            return
        if self.mapping is not None and size <= len(self.mapping):  # a spare's zeros
            self.size = size
            return
        self.close_mapping()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.size = max(self.size, size)
            os.ftruncate(fd, self.size)
            if self.size:
                _fastpath.backend().fallocate(fd, 0, self.size)  # a full tmpfs fails here
                self.mapping = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED)
                _fastpath.backend().prefault(self.mapping)  # not a fault per page as it fills
        finally:
            os.close(fd)

    def adopt(self, mapping: mmap.mmap | None, size: int) -> None:
        """Take a zeroed file's mapping (already at this stripe's path, of ``size`` bytes
        or more) as the parity."""
        if mapping is not None:
            self.mapping, self.size = mapping, size

    def clear(self) -> None:
        """Back to zeros, with no contributor: a new generation."""
        size = self.size
        self.close_mapping()
        self.size = 0
        self.path.unlink(missing_ok=True)
        self.contributors.clear()
        self.arriving.clear()  # those arriving are of the old generation: they fail
        self.chunks = None
        self.generation += 1
        self.opened = time.monotonic()
        self.grow(size)

    def close_mapping(self, later: bool = False) -> None:
        """``later``: unmapped on the unmapping thread (20 MiB takes milliseconds here)."""
        if self.mapping is not None:
            if later:
                close_mapping_later(self.mapping)
            else:
                self.mapping.close()
            self.mapping = None

    def chunk_crc(self, index: int) -> int:
        """The crc32c of chunk ``index`` of the parity as it is now."""
        with memoryview(self.mapping) as view:
            end = min(self.size, (index + 1) * CHUNK_BYTES)
            return _fastpath.backend().crc32c(view[index * CHUNK_BYTES : end])


class Contribution:
    """A piece arriving over the data port (the sink bulk.receive_frames fills), or the
    sum of several contributors' pieces (a chain's, daemon/chain.py): each frame lands in
    a scratch buffer, is checked against its crc32c there, then multiplied into the
    parity. A chain's sum, every piece of its stripe at once, checksums each chunk of the
    parity as it fills: the stripe then completes without reading it all again."""

    def __init__(self, store: ParityStore, stripe: Stripe, contributors: list[Contributor],
                 coefficient: int, size: int) -> None:  # fmt: skip
        self.store, self.stripe, self.contributors = store, stripe, contributors
        self.coefficient, self.size = coefficient, size
        self.generation = stripe.generation
        self.received = 0
        self.where = f"{stripe.key}: {pieces_of(contributors)}"
        data_nodes = stripe.key.group_of.data_nodes(stripe.key.stripe)
        self.whole = {c.origin for c in contributors} == set(data_nodes) and size == stripe.size
        self.chunk_crcs: list[int] = []  # of the chunks filled (only where whole)
        self.completed = False  # it completed its stripe (its sender is told)
        self._scratch = bytearray()
        self._done = False

    def whole_chunks(self, offset: int, length: int) -> bool:
        return False  # the frames' own crc32c are checked

    def region(self, offset: int, length: int) -> memoryview:
        check_next(self.where, offset, length, self.received, self.size, ParityError)
        if len(self._scratch) < length:
            self._scratch = bytearray(length)
        return memoryview(self._scratch)[:length]

    def accept(self, offset: int, length: int) -> None:
        stripe = self.stripe
        with stripe.lock:
            if stripe.generation != self.generation:
                raise ParityError(f"{self.where}: the stripe was cleared meanwhile (another "
                                  "contribution failed or a newer save arrived)")  # fmt: skip
            with memoryview(stripe.mapping)[offset : offset + length] as target:
                src = memoryview(self._scratch)[:length]
                _fastpath.backend().gf256_muladd(target, src, self.coefficient)
                src.release()
            self.received += length
            if self.whole:
                while (len(self.chunk_crcs) + 1) * CHUNK_BYTES <= self.received:
                    self.chunk_crcs.append(stripe.chunk_crc(len(self.chunk_crcs)))

    def commit(self) -> None:
        if self.received != self.size:
            raise ParityError(f"{self.where}: {self.received} of {self.size} bytes arrived")
        self.completed = self.store.contributed(self)
        self._done = True

    def close(self) -> None:
        if not self._done:
            self.store.failed(self)


class ParityStore:
    def __init__(self, root: str | os.PathLike, node_id: str, scheme: Redundancy, keep: int,
                 stride: Callable[[], int] = lambda: 1,
                 fits: Callable[[int], bool] = lambda size: True) -> None:  # fmt: skip
        """``stride``: the cluster's sync stride now (daemon/sync.py); ``fits(size)``:
        whether ``size`` more bytes keep within the memory budget (for spare parities)."""
        self.root = Path(root) / PARITY_DIR
        self.node_id, self.scheme, self.keep, self.stride = node_id, scheme, keep, stride
        self.spares = ZeroedSpares(root, fits)
        self._stripes: dict[StripeKey, Stripe] = {}
        self._lock = threading.Lock()
        self._completed = threading.Condition()  # notified as each stripe completes

    def load(self) -> None:
        """At start-up: the complete parities on disk, and nothing of those a killed daemon
        was still accumulating, nor spare files."""
        self.spares.drop()
        for record in sorted(self.root.glob("*/step-*/*.json")):
            try:
                stripe = _read_record(record)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("parity record %s is unreadable (%s): removed", record, exc)
                record.unlink(missing_ok=True)
                record.with_suffix(".parity").unlink(missing_ok=True)
                continue
            self._stripes[stripe.key] = stripe
        for path in self.root.glob("*/step-*/*.parity"):
            if not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)

    def receive(self, header: pb.ContributeHeader) -> Contribution:
        """A contribution's sink, after checking its header: ValueError saying what is
        wrong (this node holds no parity of that stripe, a piece of the wrong size, ...)."""
        key = StripeKey.checked(header.stripe)
        if key.code != str(self.scheme):
            raise ValueError(f"{key}: this daemon keeps {self.scheme}, not {key.code}")
        group = key.group_of
        parity_nodes, data_nodes = group.parity_nodes(key.stripe), group.data_nodes(key.stripe)
        if self.node_id not in parity_nodes:
            raise ValueError(f"{key}: its parities are held by {parity_nodes}, not "
                             f"{self.node_id!r}")  # fmt: skip
        contributors = summed(header, key, data_nodes)
        if len(contributors) > 1 and group.scheme.kind != "xor":
            raise ValueError(f"{key}: {pieces_of(contributors)} summed; only xor groups chain")
        index = data_nodes.index(contributors[0].origin)
        row = parity_nodes.index(self.node_id)
        coefficient = group.code.coefficients()[row][index]  # 1 for every piece under xor
        with self._lock:
            stripe = self._stripes.get(key)
            if stripe is None:
                path = self.root / key.run / naming.step_dir(key.step) / f"{key.name}.parity"
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                stripe = self._stripes[key] = Stripe(key, row, path)
        with stripe.lock:
            held = [stripe.contributors.get(c.origin) for c in contributors]
            if all(h is not None and h.crcs == c.crcs
                   for h, c in zip(held, contributors, strict=True)):  # fmt: skip
                raise AlreadyHeld(f"{key}: {pieces_of(contributors)} is here already")
            if any(c.origin in stripe.arriving for c in contributors):
                raise ParityError(f"{key}: {pieces_of(contributors)} arriving already "
                                  f"(from {sorted(stripe.arriving)})")  # fmt: skip
            if any(held) or stripe.chunks is not None:  # another save of the step
                stripe.clear()
            if stripe.mapping is None and not stripe.size:
                stripe.adopt(self.spares.take(header.piece_size, stripe.path), header.piece_size)
            stripe.grow(header.piece_size)
            stripe.arriving.update(c.origin for c in contributors)
            return Contribution(self, stripe, contributors, coefficient, header.piece_size)

    def contributed(self, contribution: Contribution) -> bool:
        """Take ``contribution``'s pieces into its stripe; whether that completed it."""
        stripe = contribution.stripe
        with stripe.lock:
            if stripe.generation != contribution.generation:
                raise ParityError(f"{contribution.where}: the stripe was cleared meanwhile")
            for contributor in contribution.contributors:
                stripe.contributors[contributor.origin] = contributor
                stripe.arriving.discard(contributor.origin)
            if not self._complete_if_whole(stripe, contribution.chunk_crcs):
                return False
        self._announce(stripe)
        return True

    def stalled(self, after: float) -> list[tuple[StripeKey, int, list[str], float]]:
        """The stripes still incomplete ``after`` seconds since their first piece came,
        with nothing of them arriving: each with its generation, the data nodes whose pieces
        are not in, and the seconds it has waited."""
        now, out = time.monotonic(), []
        with self._lock:
            stripes = list(self._stripes.values())
        for stripe in stripes:
            with stripe.lock:
                waited = now - stripe.opened
                if stripe.chunks is not None or stripe.arriving or waited < after or not any(
                    not c.is_empty for c in stripe.contributors.values()
                ):
                    continue
                missing = [n for n in stripe.key.group_of.data_nodes(stripe.key.stripe)
                           if n not in stripe.contributors]  # fmt: skip
                out.append((stripe.key, stripe.generation, missing, waited))
        return out

    def absent(self, key: StripeKey, generation: int, node: str) -> bool:
        """Data node ``node`` holds nothing of ``key``'s step: its piece counts as zeros
        (a save of that step it makes later replaces the stripe, as any other save does),
        unless the stripe was cleared or completed meanwhile. Whether it is complete now."""
        with self._lock:
            stripe = self._stripes.get(key)
        if stripe is None:
            return False
        with stripe.lock:
            if (stripe.generation != generation or stripe.chunks is not None
                    or node in stripe.contributors or node in stripe.arriving):  # fmt: skip
                return False
            stripe.contributors[node] = Contributor.empty(node)
            if not self._complete_if_whole(stripe, []):
                return False
        self._announce(stripe)
        return True

    def _complete_if_whole(self, stripe: Stripe, known: list[int]) -> bool:
        """Under ``stripe.lock``: record it complete if every data node's piece is in."""
        if set(stripe.contributors) != set(stripe.key.group_of.data_nodes(stripe.key.stripe)):
            return False
        self._complete(stripe, known)
        return True

    def _announce(self, stripe: Stripe) -> None:
        with self._completed:
            self._completed.notify_all()
        empty = sorted(c.origin for c in stripe.contributors.values() if c.is_empty)
        log.info("parity of %s complete (%d bytes%s)", stripe.key, stripe.size,
                 f"; {empty} hold nothing of the step" if empty else "")  # fmt: skip

    def tidy(self, key: StripeKey) -> None:
        """After a stripe of ``key``'s step completed (once its sender was told): older
        steps' parities expire, and zeroed spares are made for the next step's stripes."""
        self.expire(key.run, self.stride())
        with self._lock:
            step = [s.size for k, s in self._stripes.items()
                    if (k.run, k.step) == (key.run, key.step)]  # fmt: skip
        self.spares.want(len(step), max(step, default=0))

    def _complete(self, stripe: Stripe, known: list[int]) -> None:
        """Record the stripe as complete; ``known``: the crc32c of its first chunks."""
        size = stripe.size
        known = known[: size // CHUNK_BYTES]
        crcs = (*known, *(stripe.chunk_crc(i) for i in range(len(known), -(-size // CHUNK_BYTES))))
        spare = len(stripe.mapping) - size if stripe.mapping is not None else 0
        stripe.close_mapping(later=True)
        if spare > 0:  # a spare's zeros past the largest piece
            os.truncate(stripe.path, stripe.size)
        stripe.chunks = Chunks(stripe.size, CHUNK_BYTES, crcs)
        record = {"key": {"run": stripe.key.run, "step": stripe.key.step,
                          "code": stripe.key.code, "group": list(stripe.key.group),
                          "stripe": stripe.key.stripe},
                  "row": stripe.row, "size": stripe.size, "chunk_size": CHUNK_BYTES,
                  "chunk_crc32c": list(crcs),
                  "contributors": [c.to_json() for c in stripe.contributors.values()]}  # fmt: skip
        path = stripe.path.with_suffix(".json")
        temp = path.with_name(naming.temp_name(path.name))
        temp.write_bytes(json.dumps(record).encode())
        os.replace(temp, path)

    def failed(self, contribution: Contribution) -> None:
        stripe = contribution.stripe
        with stripe.lock:
            if stripe.generation == contribution.generation and stripe.chunks is None:
                stripe.clear()  # its partial piece is in the parity: everyone sends again

    def listing(self, run: str = "", origin: str = "", manifests: bool = False):
        with self._lock:
            stripes = list(self._stripes.values())
        infos = []
        for stripe in stripes:
            if run and stripe.key.run != run:
                continue
            with stripe.lock:
                if origin and origin not in stripe.contributors:
                    continue
                infos.append(stripe.info(origin, manifests))
        return infos

    def wait_complete(self, keys: list[StripeKey], timeout: float) -> bool:
        """Whether the parity of each stripe of ``keys`` is complete here, waiting up to
        ``timeout`` seconds for it."""

        def done() -> bool:
            with self._lock:
                stripes = [self._stripes.get(k) for k in keys]
            return all(s is not None and s.chunks is not None for s in stripes)

        with self._completed:
            return self._completed.wait_for(done, timeout)

    def complete(self, ident: pb.StripeId) -> Stripe:
        """The complete parity of a stripe this node holds, or FileNotFoundError."""
        key = StripeKey.checked(ident)
        with self._lock:
            stripe = self._stripes.get(key)
        if stripe is None or stripe.chunks is None:
            raise FileNotFoundError(f"{key}: no complete parity held here")
        return stripe

    def expire(self, run: str, stride: int = 1) -> None:
        """Keep the parities of the newest ``keep`` steps of ``run`` (and, with a sync
        ``stride`` above 1, of its newest sync steps)."""
        with self._lock:
            steps = sorted({k.step for k in self._stripes if k.run == run})
            kept = set(steps[-self.keep :]) | set(sync_steps(steps, stride))
            gone = [k for k in self._stripes if k.run == run and k.step not in kept]
            stripes = [self._stripes.pop(k) for k in gone]
        for stripe in stripes:
            with stripe.lock:
                stripe.close_mapping()
                stripe.generation += 1
        for step in {k.step for k in gone}:
            shutil.rmtree(self.root / run / naming.step_dir(step), ignore_errors=True)

    def usage(self) -> int:
        """Bytes of parity held."""
        with self._lock:
            return sum(s.size for s in self._stripes.values())


def _read_record(path: Path) -> Stripe:
    record = json.loads(path.read_bytes())
    key = StripeKey.checked(pb.StripeId(**record["key"]))
    stripe = Stripe(key, int(record["row"]), path.with_suffix(".parity"))
    stripe.size = int(record["size"])
    if path.with_suffix(".parity").stat().st_size != stripe.size:
        raise CorruptCheckpointError(f"{path}: the parity is not {stripe.size} bytes")
    stripe.chunks = Chunks(stripe.size, int(record["chunk_size"]),
                           tuple(int(c) for c in record["chunk_crc32c"]))  # fmt: skip
    for item in record["contributors"]:
        contributor = Contributor.from_json(item)
        stripe.contributors[contributor.origin] = contributor
    return stripe
