from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardId(_message.Message):
    __slots__ = ("run", "step", "rank", "origin")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    rank: int
    origin: str
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., origin: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("changed_since", "wait_seconds", "brief")
    CHANGED_SINCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    changed_since: int
    wait_seconds: float
    brief: bool
    def __init__(self, changed_since: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., brief: _Optional[bool] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("address", "node_id", "zone", "reachable", "error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    node_id: str
    zone: str
    reachable: bool
    error: str
    def __init__(self, address: _Optional[str] = ..., node_id: _Optional[str] = ..., zone: _Optional[str] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("shard", "targets", "stored", "error")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    targets: _containers.RepeatedScalarFieldContainer[str]
    stored: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ..., targets: _Optional[_Iterable[str]] = ..., stored: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "zone", "address", "memory_root", "replicas", "peers", "replication", "draining", "local_root", "remote_url", "flushes", "version", "sync_stride", "sync_ttl", "redundancy", "memory_budget", "memory")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ROOT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROOT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_URL_FIELD_NUMBER: _ClassVar[int]
    FLUSHES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SYNC_STRIDE_FIELD_NUMBER: _ClassVar[int]
    SYNC_TTL_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    zone: str
    address: str
    memory_root: str
    replicas: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    replication: _containers.RepeatedCompositeFieldContainer[ReplicaState]
    draining: bool
    local_root: str
    remote_url: str
    flushes: _containers.RepeatedCompositeFieldContainer[FlushState]
    version: int
    sync_stride: int
    sync_ttl: float
    redundancy: str
    memory_budget: int
    memory: _containers.RepeatedCompositeFieldContainer[MemoryUse]
    def __init__(self, node_id: _Optional[str] = ..., zone: _Optional[str] = ..., address: _Optional[str] = ..., memory_root: _Optional[str] = ..., replicas: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., replication: _Optional[_Iterable[_Union[ReplicaState, _Mapping]]] = ..., draining: _Optional[bool] = ..., local_root: _Optional[str] = ..., remote_url: _Optional[str] = ..., flushes: _Optional[_Iterable[_Union[FlushState, _Mapping]]] = ..., version: _Optional[int] = ..., sync_stride: _Optional[int] = ..., sync_ttl: _Optional[float] = ..., redundancy: _Optional[str] = ..., memory_budget: _Optional[int] = ..., memory: _Optional[_Iterable[_Union[MemoryUse, _Mapping]]] = ...) -> None: ...

class MemoryUse(_message.Message):
    __slots__ = ("kind", "bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    bytes: int
    def __init__(self, kind: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class FlushState(_message.Message):
    __slots__ = ("shard", "phase", "error")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        QUEUED: _ClassVar[FlushState.Phase]
        FLUSHING: _ClassVar[FlushState.Phase]
        DONE: _ClassVar[FlushState.Phase]
        SKIPPED: _ClassVar[FlushState.Phase]
        FAILED: _ClassVar[FlushState.Phase]
    QUEUED: FlushState.Phase
    FLUSHING: FlushState.Phase
    DONE: FlushState.Phase
    SKIPPED: FlushState.Phase
    FAILED: FlushState.Phase
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    phase: FlushState.Phase
    error: str
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ..., phase: _Optional[_Union[FlushState.Phase, str]] = ..., error: _Optional[str] = ...) -> None: ...

class ListShardsRequest(_message.Message):
    __slots__ = ("run", "origin", "manifests", "parities_only", "complete", "wait")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    PARITIES_ONLY_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    run: str
    origin: str
    manifests: bool
    parities_only: bool
    complete: _containers.RepeatedCompositeFieldContainer[StripeId]
    wait: float
    def __init__(self, run: _Optional[str] = ..., origin: _Optional[str] = ..., manifests: _Optional[bool] = ..., parities_only: _Optional[bool] = ..., complete: _Optional[_Iterable[_Union[StripeId, _Mapping]]] = ..., wait: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard", "world_size", "data_size", "replica", "manifest_crc")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_CRC_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    world_size: int
    data_size: int
    replica: bool
    manifest_crc: int
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ..., world_size: _Optional[int] = ..., data_size: _Optional[int] = ..., replica: _Optional[bool] = ..., manifest_crc: _Optional[int] = ...) -> None: ...

class ListShardsReply(_message.Message):
    __slots__ = ("node_id", "shards", "parities")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARITIES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    parities: _containers.RepeatedCompositeFieldContainer[ParityInfo]
    def __init__(self, node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., parities: _Optional[_Iterable[_Union[ParityInfo, _Mapping]]] = ...) -> None: ...

class StripeId(_message.Message):
    __slots__ = ("run", "step", "code", "group", "stripe")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    code: str
    group: _containers.RepeatedScalarFieldContainer[str]
    stripe: int
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ..., code: _Optional[str] = ..., group: _Optional[_Iterable[str]] = ..., stripe: _Optional[int] = ...) -> None: ...

class Contributor(_message.Message):
    __slots__ = ("origin", "ranks", "manifest_crcs", "data_sizes", "manifests")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_CRCS_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZES_FIELD_NUMBER: _ClassVar[int]
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    manifest_crcs: _containers.RepeatedScalarFieldContainer[int]
    data_sizes: _containers.RepeatedScalarFieldContainer[int]
    manifests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, origin: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., manifest_crcs: _Optional[_Iterable[int]] = ..., data_sizes: _Optional[_Iterable[int]] = ..., manifests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ParityInfo(_message.Message):
    __slots__ = ("stripe", "row", "contributors", "complete", "size", "world_size", "awaiting")
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    AWAITING_FIELD_NUMBER: _ClassVar[int]
    stripe: StripeId
    row: int
    contributors: _containers.RepeatedCompositeFieldContainer[Contributor]
    complete: bool
    size: int
    world_size: int
    awaiting: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stripe: _Optional[_Union[StripeId, _Mapping]] = ..., row: _Optional[int] = ..., contributors: _Optional[_Iterable[_Union[Contributor, _Mapping]]] = ..., complete: _Optional[bool] = ..., size: _Optional[int] = ..., world_size: _Optional[int] = ..., awaiting: _Optional[_Iterable[str]] = ...) -> None: ...

class ContributeHeader(_message.Message):
    __slots__ = ("stripe", "contributor", "piece_size", "upstream")
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    PIECE_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    stripe: StripeId
    contributor: Contributor
    piece_size: int
    upstream: _containers.RepeatedCompositeFieldContainer[Contributor]
    def __init__(self, stripe: _Optional[_Union[StripeId, _Mapping]] = ..., contributor: _Optional[_Union[Contributor, _Mapping]] = ..., piece_size: _Optional[int] = ..., upstream: _Optional[_Iterable[_Union[Contributor, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("shard", "manifest", "offset", "length", "parity", "rebuild_for")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    REBUILD_FOR_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    manifest: bool
    offset: int
    length: int
    parity: StripeId
    rebuild_for: str
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ..., manifest: _Optional[bool] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., parity: _Optional[_Union[StripeId, _Mapping]] = ..., rebuild_for: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32c")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("shard", "manifest", "data_size", "base_step")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    manifest: bytes
    data_size: int
    base_step: int
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ..., manifest: _Optional[bytes] = ..., data_size: _Optional[int] = ..., base_step: _Optional[int] = ...) -> None: ...

class PushMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: DataChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class BulkTicket(_message.Message):
    __slots__ = ("ticket", "port", "tls")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    tls: bool
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., tls: _Optional[bool] = ...) -> None: ...

class NotifyRequest(_message.Message):
    __slots__ = ("run", "step")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class NotifyReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("rank", "size", "count")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    size: int
    count: int
    def __init__(self, rank: _Optional[int] = ..., size: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("bytes", "ready", "failed")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    ready: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes: _Optional[int] = ..., ready: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class RecoverRequest(_message.Message):
    __slots__ = ("run", "step", "none_is_an_answer")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NONE_IS_AN_ANSWER_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    none_is_an_answer: bool
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ..., none_is_an_answer: _Optional[bool] = ...) -> None: ...

class RecoverReply(_message.Message):
    __slots__ = ("step", "ranks", "bytes", "sources", "complete", "unreachable")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    step: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    bytes: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    complete: _containers.RepeatedScalarFieldContainer[int]
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., bytes: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., complete: _Optional[_Iterable[int]] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardId
    def __init__(self, shard: _Optional[_Union[ShardId, _Mapping]] = ...) -> None: ...

class FlushReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
