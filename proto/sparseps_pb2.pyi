from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class ConsistencyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[ConsistencyMode]
    ASYNC: _ClassVar[ConsistencyMode]
    SYNC: _ClassVar[ConsistencyMode]
    BOUNDED: _ClassVar[ConsistencyMode]

class Partition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARTITION_UNSPECIFIED: _ClassVar[Partition]
    MOD: _ClassVar[Partition]
    DIV: _ClassVar[Partition]
    WHOLE: _ClassVar[Partition]
    HASH: _ClassVar[Partition]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
CONSISTENCY_UNSPECIFIED: ConsistencyMode
ASYNC: ConsistencyMode
SYNC: ConsistencyMode
BOUNDED: ConsistencyMode
PARTITION_UNSPECIFIED: Partition
MOD: Partition
DIV: Partition
WHOLE: Partition
HASH: Partition

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Consistency(_message.Message):
    __slots__ = ("mode", "replicas_to_aggregate", "total_num_replicas", "average", "staleness")
    MODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TO_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    mode: ConsistencyMode
    replicas_to_aggregate: int
    total_num_replicas: int
    average: bool
    staleness: int
    def __init__(self, mode: _Optional[_Union[ConsistencyMode, str]] = ..., replicas_to_aggregate: _Optional[int] = ..., total_num_replicas: _Optional[int] = ..., average: _Optional[bool] = ..., staleness: _Optional[int] = ...) -> None: ...

class CreateOptimizerRequest(_message.Message):
    __slots__ = ("name", "config_json", "consistency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    consistency: Consistency
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., consistency: _Optional[_Union[Consistency, _Mapping]] = ...) -> None: ...

class GetOptimizerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("name", "class_name", "config_json", "iterations", "slot_names", "variables", "consistency", "nonslot_names", "weights", "nonslot")
    class NonslotEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SLOT_NAMES_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    NONSLOT_NAMES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NONSLOT_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_name: str
    config_json: str
    iterations: int
    slot_names: _containers.RepeatedScalarFieldContainer[str]
    variables: _containers.RepeatedScalarFieldContainer[str]
    consistency: Consistency
    nonslot_names: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[str]
    nonslot: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., class_name: _Optional[str] = ..., config_json: _Optional[str] = ..., iterations: _Optional[int] = ..., slot_names: _Optional[_Iterable[str]] = ..., variables: _Optional[_Iterable[str]] = ..., consistency: _Optional[_Union[Consistency, _Mapping]] = ..., nonslot_names: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[str]] = ..., nonslot: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers",)
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerInfo]
    def __init__(self, optimizers: _Optional[_Iterable[_Union[OptimizerInfo, _Mapping]]] = ...) -> None: ...

class CreateVariableRequest(_message.Message):
    __slots__ = ("name", "shape", "dtype", "optimizer", "initializer_json", "initial_value", "partition", "owner_shard", "dynamic", "table_json", "key_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OWNER_SHARD_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    TABLE_JSON_FIELD_NUMBER: _ClassVar[int]
    KEY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    optimizer: str
    initializer_json: str
    initial_value: Tensor
    partition: Partition
    owner_shard: int
    dynamic: bool
    table_json: str
    key_dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., optimizer: _Optional[str] = ..., initializer_json: _Optional[str] = ..., initial_value: _Optional[_Union[Tensor, _Mapping]] = ..., partition: _Optional[_Union[Partition, str]] = ..., owner_shard: _Optional[int] = ..., dynamic: _Optional[bool] = ..., table_json: _Optional[str] = ..., key_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class VariableInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "optimizer", "partition", "owner_shard", "local_rows", "bytes_held", "initializer_json", "dynamic", "table_json", "table_stats", "table_version")
    class TableStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OWNER_SHARD_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    TABLE_JSON_FIELD_NUMBER: _ClassVar[int]
    TABLE_STATS_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    optimizer: str
    partition: Partition
    owner_shard: int
    local_rows: int
    bytes_held: int
    initializer_json: str
    dynamic: bool
    table_json: str
    table_stats: _containers.ScalarMap[str, int]
    table_version: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., optimizer: _Optional[str] = ..., partition: _Optional[_Union[Partition, str]] = ..., owner_shard: _Optional[int] = ..., local_rows: _Optional[int] = ..., bytes_held: _Optional[int] = ..., initializer_json: _Optional[str] = ..., dynamic: _Optional[bool] = ..., table_json: _Optional[str] = ..., table_stats: _Optional[_Mapping[str, int]] = ..., table_version: _Optional[int] = ...) -> None: ...

class DescribeVariableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVariablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVariablesResponse(_message.Message):
    __slots__ = ("variables",)
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedCompositeFieldContainer[VariableInfo]
    def __init__(self, variables: _Optional[_Iterable[_Union[VariableInfo, _Mapping]]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("variable", "ids", "slot", "row_start", "row_stop", "min_iterations", "timeout_seconds", "worker_id", "since_step")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    MIN_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    variable: str
    ids: Tensor
    slot: str
    row_start: int
    row_stop: int
    min_iterations: int
    timeout_seconds: float
    worker_id: str
    since_step: int
    def __init__(self, variable: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., slot: _Optional[str] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., min_iterations: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., worker_id: _Optional[str] = ..., since_step: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("values", "ids", "iterations")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    ids: Tensor
    iterations: int
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., iterations: _Optional[int] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("variable", "ids", "values", "l2sum")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    L2SUM_FIELD_NUMBER: _ClassVar[int]
    variable: str
    ids: Tensor
    values: Tensor
    l2sum: float
    def __init__(self, variable: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., l2sum: _Optional[float] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("gradients", "client_id", "sequence", "step", "optimizers", "worker_id", "replicas", "last_chunk")
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    gradients: _containers.RepeatedCompositeFieldContainer[Gradient]
    client_id: str
    sequence: int
    step: int
    optimizers: _containers.RepeatedScalarFieldContainer[str]
    worker_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaRef]
    last_chunk: bool
    def __init__(self, gradients: _Optional[_Iterable[_Union[Gradient, _Mapping]]] = ..., client_id: _Optional[str] = ..., sequence: _Optional[int] = ..., step: _Optional[int] = ..., optimizers: _Optional[_Iterable[str]] = ..., worker_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaRef, _Mapping]]] = ..., last_chunk: _Optional[bool] = ...) -> None: ...

class PushPullRequest(_message.Message):
    __slots__ = ("push", "pulls")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    push: PushRequest
    pulls: _containers.RepeatedCompositeFieldContainer[PullRequest]
    def __init__(self, push: _Optional[_Union[PushRequest, _Mapping]] = ..., pulls: _Optional[_Iterable[_Union[PullRequest, _Mapping]]] = ...) -> None: ...

class PushPullResponse(_message.Message):
    __slots__ = ("push", "pulls")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    push: PushResponse
    pulls: _containers.RepeatedCompositeFieldContainer[PullResponse]
    def __init__(self, push: _Optional[_Union[PushResponse, _Mapping]] = ..., pulls: _Optional[_Iterable[_Union[PullResponse, _Mapping]]] = ...) -> None: ...

class ReplicaRef(_message.Message):
    __slots__ = ("client_id", "sequence")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sequence: int
    def __init__(self, client_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class OptimizerIterations(_message.Message):
    __slots__ = ("optimizer", "iterations")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    iterations: int
    def __init__(self, optimizer: _Optional[str] = ..., iterations: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("iterations", "stale", "duplicate", "prepared")
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    iterations: _containers.RepeatedCompositeFieldContainer[OptimizerIterations]
    stale: bool
    duplicate: bool
    prepared: bool
    def __init__(self, iterations: _Optional[_Iterable[_Union[OptimizerIterations, _Mapping]]] = ..., stale: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., prepared: _Optional[bool] = ...) -> None: ...

class SyncVoteRequest(_message.Message):
    __slots__ = ("optimizer", "step", "replica", "timeout_seconds")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    step: int
    replica: ReplicaRef
    timeout_seconds: float
    def __init__(self, optimizer: _Optional[str] = ..., step: _Optional[int] = ..., replica: _Optional[_Union[ReplicaRef, _Mapping]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class SyncVoteResponse(_message.Message):
    __slots__ = ("stale", "iterations")
    STALE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    stale: bool
    iterations: int
    def __init__(self, stale: _Optional[bool] = ..., iterations: _Optional[int] = ...) -> None: ...

class SyncCommitRequest(_message.Message):
    __slots__ = ("optimizer", "step", "replicas")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    step: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaRef]
    def __init__(self, optimizer: _Optional[str] = ..., step: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaRef, _Mapping]]] = ...) -> None: ...

class SyncCommitResponse(_message.Message):
    __slots__ = ("iterations",)
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    def __init__(self, iterations: _Optional[int] = ...) -> None: ...

class GetSlotRequest(_message.Message):
    __slots__ = ("variable", "slot", "ids", "row_start", "row_stop")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    variable: str
    slot: str
    ids: Tensor
    row_start: int
    row_stop: int
    def __init__(self, variable: _Optional[str] = ..., slot: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ...) -> None: ...

class WeightWrite(_message.Message):
    __slots__ = ("variable", "slot", "ids", "values")
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    variable: str
    slot: str
    ids: Tensor
    values: Tensor
    def __init__(self, variable: _Optional[str] = ..., slot: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("optimizer", "set_iterations", "iterations", "writes", "nonslot")
    class NonslotEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SET_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    NONSLOT_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    set_iterations: bool
    iterations: int
    writes: _containers.RepeatedCompositeFieldContainer[WeightWrite]
    nonslot: _containers.ScalarMap[str, float]
    def __init__(self, optimizer: _Optional[str] = ..., set_iterations: _Optional[bool] = ..., iterations: _Optional[int] = ..., writes: _Optional[_Iterable[_Union[WeightWrite, _Mapping]]] = ..., nonslot: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SetWeightsResponse(_message.Message):
    __slots__ = ("iterations",)
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    def __init__(self, iterations: _Optional[int] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "backend", "device", "shard_index", "num_shards", "cluster", "instance_id", "data_port", "data_tls", "live_rows", "role", "epoch", "log_end")
    class LiveRowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_TLS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ROWS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOG_END_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    device: str
    shard_index: int
    num_shards: int
    cluster: _containers.RepeatedScalarFieldContainer[str]
    instance_id: str
    data_port: int
    data_tls: bool
    live_rows: _containers.ScalarMap[str, int]
    role: str
    epoch: int
    log_end: int
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., cluster: _Optional[_Iterable[str]] = ..., instance_id: _Optional[str] = ..., data_port: _Optional[int] = ..., data_tls: _Optional[bool] = ..., live_rows: _Optional[_Mapping[str, int]] = ..., role: _Optional[str] = ..., epoch: _Optional[int] = ..., log_end: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("variable",)
    VARIABLE_FIELD_NUMBER: _ClassVar[int]
    variable: str
    def __init__(self, variable: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted",)
    class EvictedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.ScalarMap[str, int]
    def __init__(self, evicted: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "bytes", "iterations")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    iterations: _containers.RepeatedCompositeFieldContainer[OptimizerIterations]
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., iterations: _Optional[_Iterable[_Union[OptimizerIterations, _Mapping]]] = ...) -> None: ...
