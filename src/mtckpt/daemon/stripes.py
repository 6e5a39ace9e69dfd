"""What names a parity stripe of a coded group (daemon/groups.py) and who contributes to
it: the :class:`StripeKey` every message about a stripe carries, the :class:`Contributor`
record of each data node's piece (its manifests, checked against the stripe), and the
checks of a contribution's header (:func:`summed`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import _fastpath
from ..format import naming
from ..format.manifest import RankManifest
from ..proto import mtckpt_pb2 as pb
from ..redundancy import MAX_GROUP, Redundancy
from .groups import Group, piece_range
from .holdings import MAX_SHARD_BYTES

MAX_RANKS = 4096  # ranks of one node in one contribution


@dataclass(frozen=True)
class StripeKey:
    run: str
    step: int
    code: str
    group: tuple[str, ...]
    stripe: int

    @classmethod
    def checked(cls, ident: pb.StripeId) -> StripeKey:
        """From a StripeId off the wire; ValueError naming what is wrong."""
        naming.check_run(ident.run)
        naming.check_step(ident.step)
        scheme = Redundancy.parse(ident.code)
        if not scheme.coded:
            raise ValueError(f"stripe of {ident.code!r}: not a coded redundancy")
        group = tuple(naming.check_node_id(n) for n in ident.group)
        if len(set(group)) != len(group) or not scheme.group_size <= len(group) <= MAX_GROUP:
            raise ValueError(f"{scheme} stripe: a group of {len(group)} distinct node(s) "
                             f"{list(group)}; expected {scheme.group_size} to {MAX_GROUP}")
        if not 0 <= ident.stripe < len(group):
            raise ValueError(f"stripe {ident.stripe} of a group of {len(group)}")
        return cls(ident.run, ident.step, str(scheme), group, ident.stripe)

    @property
    def group_of(self) -> Group:
        return Group(Redundancy.parse(self.code), self.group)

    @property
    def name(self) -> str:
        digest = hashlib.blake2b(f"{self.code}|{','.join(self.group)}".encode(), digest_size=6)
        return f"{digest.hexdigest()}-{self.stripe}"

    def ident(self) -> pb.StripeId:
        return pb.StripeId(run=self.run, step=self.step, code=self.code, group=self.group,
                           stripe=self.stripe)  # fmt: skip

    def __str__(self) -> str:
        return f"run {self.run!r} step {self.step} stripe {self.stripe} of the {self.group_of}"


@dataclass
class Contributor:
    origin: str
    ranks: tuple[int, ...]
    crcs: tuple[int, ...]
    sizes: tuple[int, ...]
    manifests: tuple[bytes, ...]
    world_size: int

    @classmethod
    def empty(cls, origin: str) -> Contributor:
        """A data node that holds nothing of the stripe's step (daemon/absent.py): its
        piece counts as zeros."""
        return cls(origin, (), (), (), (), 0)

    @property
    def is_empty(self) -> bool:
        return not self.ranks

    @property
    def blob_size(self) -> int:
        return sum(self.sizes)

    def info(self, manifests: bool) -> pb.Contributor:
        return pb.Contributor(origin=self.origin, ranks=self.ranks, manifest_crcs=self.crcs,
                              data_sizes=self.sizes,
                              manifests=self.manifests if manifests else ())  # fmt: skip

    @classmethod
    def checked(cls, info: pb.Contributor, key: StripeKey) -> Contributor:
        """From a contribution's header: its manifests parsed and matched to its ranks."""
        origin = naming.check_node_id(info.origin)
        where = f"{key}: contribution of {origin!r}"
        if not 1 <= len(info.manifests) <= MAX_RANKS:
            raise ValueError(f"{where}: {len(info.manifests)} manifests; expected 1..{MAX_RANKS}")
        crc32c = _fastpath.backend().crc32c
        parsed = [RankManifest.from_json(raw, f"{where}: manifest") for raw in info.manifests]
        ranks = tuple(m.rank for m in parsed)
        if list(ranks) != sorted(set(ranks)) or any(
            (m.run, m.step) != (key.run, key.step) for m in parsed
        ):
            raise ValueError(f"{where}: manifests of ranks {list(ranks)} (in order, of run "
                             f"{key.run!r} step {key.step}) expected")  # fmt: skip
        worlds = {m.world_size for m in parsed}
        if len(worlds) != 1:
            raise ValueError(f"{where}: manifests of world sizes {sorted(worlds)}")
        sizes = tuple(m.file_size for m in parsed)
        if sum(sizes) > MAX_SHARD_BYTES:
            raise ValueError(f"{where}: {sum(sizes)} bytes; at most {MAX_SHARD_BYTES}")
        crcs = tuple(crc32c(raw) for raw in info.manifests)
        return cls(origin, ranks, crcs, sizes, tuple(info.manifests), worlds.pop())

    def to_json(self) -> dict:
        return {"origin": self.origin, "ranks": list(self.ranks), "crcs": list(self.crcs),
                "sizes": list(self.sizes), "world_size": self.world_size,
                "manifests": [m.decode() for m in self.manifests]}  # fmt: skip

    @classmethod
    def from_json(cls, item: dict) -> Contributor:
        return cls(item["origin"], tuple(item["ranks"]), tuple(item["crcs"]),
                   tuple(item["sizes"]), tuple(m.encode() for m in item["manifests"]),
                   item["world_size"])  # fmt: skip


def summed(header: pb.ContributeHeader, key: StripeKey,
           data_nodes: list[str]) -> list[Contributor]:  # fmt: skip
    """The contributors whose pieces a contribution's bytes sum (a chain's upstream
    first, the sender last), after checking that they are distinct data nodes of the
    stripe and that ``header.piece_size`` is the longest of their pieces: ValueError
    naming what is wrong."""
    if len(header.upstream) >= len(data_nodes):
        raise ValueError(f"{key}: {len(header.upstream) + 1} pieces summed; the stripe has "
                         f"{len(data_nodes)}")  # fmt: skip
    contributors = [Contributor.checked(c, key) for c in (*header.upstream, header.contributor)]
    origins = [c.origin for c in contributors]
    if len(set(origins)) != len(origins) or not set(origins) <= set(data_nodes):
        raise ValueError(f"{key}: pieces of {origins}; expected distinct nodes of {data_nodes}")
    k = key.group_of.scheme.data
    expected = max(piece_range(c.blob_size, k, data_nodes.index(c.origin))[1]
                   for c in contributors)  # fmt: skip
    if header.piece_size != expected:
        raise ValueError(f"{key}: {header.piece_size} bytes of {pieces_of(contributors)}; "
                         f"their steps' sizes make {expected}")  # fmt: skip
    return contributors


def pieces_of(contributors: list[Contributor]) -> str:
    origins = [c.origin for c in contributors]
    return f"the piece of {origins[0]!r}" if len(origins) == 1 else f"the sum of {origins}'s pieces"
