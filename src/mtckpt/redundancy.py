"""How a node's shards survive its loss: ``replicas:R`` (R whole copies on other nodes),
``xor:G`` (groups of G nodes, one parity piece per stripe: any one loss in a group) or
``rs:K+M`` (groups of K + M nodes, Reed–Solomon: any M losses in a group). The same text
names it in the daemon's ``--redundancy`` flag, the config file and
``PeerTier(redundancy=...)``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .options import Rule

MAX_GROUP = 255  # nodes of one coded group: the erasure code's limit
_FORMS = "'replicas:R', 'xor:G' (G >= 3) or 'rs:K+M'"


@dataclass(frozen=True)
class Redundancy:
    kind: str  # "replicas", "xor" or "rs"
    data: int  # replicas: R; coded: K, the data pieces of a stripe
    parity: int = 0  # coded: M, the parity pieces of a stripe

    @classmethod
    def parse(cls, text: str) -> Redundancy:
        """From ``replicas:R``, ``xor:G`` or ``rs:K+M``; ValueError saying what was expected."""
        match = re.fullmatch(r"\s*(replicas|xor|rs):(\d+)(?:\+(\d+))?\s*", str(text))
        if match is None or (match[1] == "rs") != (match[3] is not None):
            raise ValueError(f"redundancy {text!r}: expected {_FORMS}")
        kind, first = match[1], int(match[2])
        if kind == "replicas":
            return cls("replicas", first)
        if kind == "xor":
            if not 3 <= first <= MAX_GROUP:
                raise ValueError(f"redundancy {text!r}: a xor group has 3 to {MAX_GROUP} nodes")
            return cls("xor", first - 1, 1)
        data, parity = first, int(match[3])
        if data < 1 or parity < 1 or data + parity > MAX_GROUP:
            raise ValueError(
                f"redundancy {text!r}: rs:K+M needs K >= 1, M >= 1 and K + M <= {MAX_GROUP}"
            )
        return cls("rs", data, parity)

    @classmethod
    def replicas(cls, count: int) -> Redundancy:
        return cls("replicas", count)

    @property
    def coded(self) -> bool:
        return self.kind != "replicas"

    @property
    def group_size(self) -> int:
        """Nodes of a coded group at least (K + M); for replicas the copies and the node."""
        return self.data + self.parity if self.coded else self.data + 1

    @property
    def losses(self) -> int:
        """Node losses it survives (per group when coded)."""
        return self.parity if self.coded else self.data

    @property
    def peer_fraction(self) -> float:
        """Peer memory per node, as a fraction of the node's own shards."""
        return self.parity / self.data if self.coded else float(self.data)

    def __str__(self) -> str:
        if self.kind == "replicas":
            return f"replicas:{self.data}"
        if self.kind == "xor":
            return f"xor:{self.data + 1}"
        return f"rs:{self.data}+{self.parity}"


def _valid(text) -> bool:
    try:
        Redundancy.parse(text)
    except ValueError:
        return False
    return True


RULE = Rule(lambda v: v is None or (isinstance(v, str) and _valid(v)), _FORMS + " or None")
