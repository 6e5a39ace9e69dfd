"""The rank manifest: one JSON file per rank and step describing its data file.

It records the format version, who wrote it, the state's structure, every leaf (kind,
dtype, shape, where its bytes lie, or its value), and a crc32c for each fixed-size chunk of
the data file. The manifest carries a crc32c of its own content. Unknown format versions
and unknown leaf kinds raise; nothing is skipped silently.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .. import checksum
from ..errors import ChecksumMismatchError, CorruptCheckpointError, FormatVersionError
from . import shard
from .encoding import StoredFile
from .structure import DATA_KINDS, VALUE_KINDS, Node

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1024 * 1024


def writer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mtckpt {version('mtckpt')}"
    except PackageNotFoundError:
        return "mtckpt (source tree)"


@dataclass(frozen=True)
class LeafRecord:
    """One leaf: its value (value kinds) or its bytes' place in the data buffer (data kinds).

    ``global_shape`` / ``global_offset`` describe a shard of a larger tensor; both are None
    for a whole tensor. ``stored_by`` names the rank whose data file holds the bytes of a
    shard this rank holds a replica of (offset and nbytes are then None). A leaf this rank
    holds as several shards (a JAX array over several local devices) has ``parts``: one
    record per distinct shard, each named by its key in the data file; the leaf's own
    ``shape`` is then the global shape and it has no bytes of its own.
    """

    key: str
    kind: str
    value: Any = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    offset: int | None = None
    nbytes: int | None = None
    global_shape: tuple[int, ...] | None = None
    global_offset: tuple[int, ...] | None = None
    stored_by: int | None = None
    parts: tuple[LeafRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "kind": self.kind}
        if self.kind in VALUE_KINDS:
            out["value"] = self.value.hex() if self.kind == "float" else self.value
            return out
        out.update(dtype=self.dtype, shape=list(self.shape))
        if self.parts:
            out["parts"] = [part.to_json() for part in self.parts]
        elif self.stored_by is None:
            out.update(offset=self.offset, nbytes=self.nbytes)
        else:
            out["stored_by"] = self.stored_by
        if self.global_shape is not None:
            out.update(global_shape=list(self.global_shape), global_offset=list(self.global_offset))
        return out


@dataclass(frozen=True)
class Changes:
    """What changed in a step's data file since the previous step of its ``lineage`` (the
    steps one writer compared, each with the one before: :mod:`mtckpt.incremental`), in
    blocks of ``block_size`` bytes (dividing the chunks): ``since[i]``, the step since
    which block i holds the same bytes (this step: it changed here)."""

    lineage: str
    block_size: int
    since: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        runs: list[list[int]] = []  # [count, step]
        for step in self.since:
            if runs and runs[-1][1] == step:
                runs[-1][0] += 1
            else:
                runs.append([1, step])
        return {"lineage": self.lineage, "block_size": self.block_size, "since": runs}

    @classmethod
    def from_json(cls, body: Any, step: int, file_size: int, chunk_size: int,
                  where: str) -> Changes:  # fmt: skip
        lineage, block = body["lineage"], _int(body["block_size"], "changes.block_size", 1)
        if not isinstance(lineage, str) or not 0 < len(lineage) <= 64:
            raise ValueError(f"changes.lineage must be a string of 1 to 64 characters, "
                             f"got {lineage!r}")  # fmt: skip
        since: list[int] = []
        for run in body["since"]:
            if not isinstance(run, list) or len(run) != 2:
                raise ValueError(f"changes.since must hold [count, step] runs, got {run!r}")
            since += [_int(run[1], "changes.since")] * _int(run[0], "changes.since", 1)
        blocks = math.ceil(file_size / block)
        if chunk_size % block or len(since) != blocks or any(s > step for s in since):
            raise CorruptCheckpointError(
                f"{where}: changes name {len(since)} blocks of {block} bytes (steps up to "
                f"{max(since, default=0)}); the data file of step {step} has {blocks} "
                f"in chunks of {chunk_size}"
            )
        return cls(lineage, block, tuple(since))


@dataclass(frozen=True)
class RankManifest:
    run: str
    step: int
    rank: int
    world_size: int
    framework: str
    tree: Node
    leaves: tuple[LeafRecord, ...]
    data_file: str
    file_size: int
    data_start: int
    chunk_size: int
    chunk_crc32c: tuple[int, ...]
    stored: StoredFile | None = None  # how a tier that records it stores the data file
    changes: Changes | None = None  # since when each chunk is unchanged (incremental steps)
    created: float = field(default_factory=time.time)
    writer: str = field(default_factory=writer_version)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        body = {
            "format_version": self.format_version,
            "writer": self.writer,
            "run": self.run,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "framework": self.framework,
            "created": self.created,
            "data_file": {
                "name": self.data_file,
                "size": self.file_size,
                "data_start": self.data_start,
                "chunk_size": self.chunk_size,
                "crc32c": list(self.chunk_crc32c),
            },
            "tree": self.tree.to_json(),
            "leaves": [leaf.to_json() for leaf in self.leaves],
        }
        if self.stored is not None:
            body["data_file"]["stored"] = self.stored.to_json()
        if self.changes is not None:
            body["data_file"]["changes"] = self.changes.to_json()
        body["manifest_crc32c"] = _self_crc(body)
        return json.dumps(body, indent=1, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> RankManifest:
        """Parse and check a manifest; ``where`` names it in errors (a path, a tier)."""
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object")
        version = body.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: written in format version {version} by {body.get('writer', '?')}; "
                f"this mtckpt reads format versions up to {FORMAT_VERSION}: upgrade mtckpt"
            )
        if version != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{where}: unknown format_version {version!r}")
        recorded = body.pop("manifest_crc32c", None)
        actual = _self_crc(body)
        if recorded != actual:
            raise ChecksumMismatchError(
                f"{where}: manifest crc32c {actual:#010x} does not match the recorded "
                f"{recorded!r}; the manifest was altered or truncated"
            )
        try:
            return _parse(body, where)
        except (CorruptCheckpointError, FormatVersionError):
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{where}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from None

    def data_records(self, parts: bool = True) -> list[LeafRecord]:
        """Records whose bytes are in the data file, in file order: whole leaves, and the
        parts of leaves held in parts (unless ``parts`` is false)."""
        records = (p for r in self.leaves for p in (r.parts if parts else ()) or (r,))
        data = (r for r in records if r.kind in DATA_KINDS and r.stored_by is None and not r.parts)
        return sorted(data, key=lambda r: (r.offset, r.nbytes))  # empty leaves first

    def records_by_key(self) -> dict[str, LeafRecord]:
        """Every record by its key: leaves by key path, parts by their data file key."""
        found = {record.key: record for record in self.leaves}
        found.update((part.key, part) for record in self.leaves for part in record.parts)
        return found

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _self_crc(body: dict[str, Any]) -> int:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return checksum.crc32c(canonical.encode())


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {value!r}")
    return tuple(_int(d, what) for d in value)


def _parse(body: dict[str, Any], where: str) -> RankManifest:
    data = body["data_file"]
    file_size = _int(data["size"], "data_file.size")
    data_start = _int(data["data_start"], "data_file.data_start", 8)
    chunk_size = _int(data["chunk_size"], "data_file.chunk_size", 1)
    crcs = tuple(_int(c, "data_file.crc32c") for c in data["crc32c"])
    if data_start > file_size or len(crcs) != math.ceil(file_size / chunk_size):
        raise CorruptCheckpointError(
            f"{where}: data file size {file_size}, data start {data_start} and "
            f"{len(crcs)} chunk checksums of {chunk_size} bytes do not agree"
        )
    leaves = tuple(_parse_leaf(item, file_size - data_start, where) for item in body["leaves"])
    tree = Node.from_json(body["tree"], where)
    tree_keys = list(tree.leaf_keys())
    if sorted(tree_keys) != sorted(leaf.key for leaf in leaves) or len(set(tree_keys)) != len(
        tree_keys
    ):
        raise CorruptCheckpointError(f"{where}: tree structure and leaf list do not match")
    part_keys = [part.key for leaf in leaves for part in leaf.parts]
    if len(set(part_keys)) != len(part_keys) or set(part_keys) & set(tree_keys):
        raise CorruptCheckpointError(f"{where}: parts of leaves share a data file key")
    return RankManifest(
        run=str(body["run"]),
        step=_int(body["step"], "step"),
        rank=_int(body["rank"], "rank"),
        world_size=_int(body["world_size"], "world_size", 1),
        framework=str(body["framework"]),
        tree=tree,
        leaves=leaves,
        data_file=str(data["name"]),
        file_size=file_size,
        data_start=data_start,
        chunk_size=chunk_size,
        chunk_crc32c=crcs,
        stored=(
            StoredFile.from_json(data["stored"], file_size, chunk_size, where,
                                 _int(body["step"], "step"))
            if "stored" in data
            else None
        ),
        changes=(
            Changes.from_json(data["changes"], _int(body["step"], "step"), file_size,
                              chunk_size, where)
            if "changes" in data
            else None
        ),
        created=float(body["created"]),
        writer=str(body["writer"]),
        format_version=FORMAT_VERSION,
    )


def _parse_leaf(item: dict[str, Any], data_bytes: int, where: str) -> LeafRecord:
    key, kind = item["key"], item["kind"]
    if not isinstance(key, str):
        raise ValueError(f"leaf key {key!r} is not a string")
    if kind in VALUE_KINDS:
        return LeafRecord(key, kind, value=_parse_value(kind, item["value"], key))
    if kind not in DATA_KINDS:
        raise FormatVersionError(
            f"{where}: key {key!r} has leaf kind {kind!r}, unknown to this mtckpt "
            "(written by a newer version, or by an adapter that is not installed)"
        )
    dtype = item["dtype"]
    if dtype not in shard.ITEMSIZE:
        raise FormatVersionError(f"{where}: key {key!r} has unknown dtype {dtype!r}")
    shape = _shape(item["shape"], f"shape of {key!r}")
    if "parts" in item:
        return _parse_parted(key, kind, dtype, shape, item["parts"], data_bytes, where)
    stored_by = offset = nbytes = None
    if "stored_by" in item:
        stored_by = _int(item["stored_by"], f"stored_by of {key!r}")
        if "global_shape" not in item:
            raise CorruptCheckpointError(f"{where}: key {key!r} is stored_by but not sharded")
    else:
        offset, nbytes = _int(item["offset"], "offset"), _int(item["nbytes"], "nbytes")
    if stored_by is None and (
        nbytes != shard.ITEMSIZE[dtype] * math.prod(shape) or offset + nbytes > data_bytes
    ):
        raise CorruptCheckpointError(
            f"{where}: key {key!r}: dtype {dtype}, shape {shape}, offset {offset} and "
            f"{nbytes} bytes do not fit a data buffer of {data_bytes} bytes"
        )
    global_shape = global_offset = None
    if "global_shape" in item:
        global_shape = _shape(item["global_shape"], f"global_shape of {key!r}")
        global_offset = _shape(item["global_offset"], f"global_offset of {key!r}")
        if (
            len(global_shape) != len(shape)
            or len(global_offset) != len(shape)
            or any(o + s > g for o, s, g in zip(global_offset, shape, global_shape, strict=True))
        ):
            raise CorruptCheckpointError(
                f"{where}: key {key!r}: shard of shape {shape} at {global_offset} does not fit "
                f"global shape {global_shape}"
            )
    return LeafRecord(
        key, kind, None, dtype, shape, offset, nbytes, global_shape, global_offset, stored_by
    )


def _parse_parted(key, kind, dtype, shape, items, data_bytes, where) -> LeafRecord:
    if not isinstance(items, list) or not items:
        raise ValueError(f"parts of {key!r} must be a non-empty list")
    parts = tuple(_parse_leaf(item, data_bytes, where) for item in items)
    for part in parts:
        if part.kind != kind or part.dtype != dtype or part.global_shape != shape or part.parts:
            raise CorruptCheckpointError(
                f"{where}: key {key!r}: part {part.key!r} is not a {kind} {dtype} shard of "
                f"global shape {shape}"
            )
    return LeafRecord(key, kind, dtype=dtype, shape=shape, global_shape=shape,
                      global_offset=(0,) * len(shape), parts=parts)  # fmt: skip


def _parse_value(kind: str, value: Any, key: str) -> Any:
    expected = {"none": type(None), "bool": bool, "int": int, "str": str, "float": str}[kind]
    if type(value) is not expected:
        raise ValueError(f"value of {key!r} is {value!r}, expected a JSON {kind}")
    return float.fromhex(value) if kind == "float" else value
