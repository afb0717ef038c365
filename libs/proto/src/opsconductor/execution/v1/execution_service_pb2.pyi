from opsconductor.execution.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitExecutionRequest(_message.Message):
    __slots__ = ("tenant_id", "plan", "requested_mode", "priority", "approval_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    plan: _types_pb2.Plan
    requested_mode: _types_pb2.ExecutionMode
    priority: int
    approval_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., plan: _Optional[_Union[_types_pb2.Plan, _Mapping]] = ..., requested_mode: _Optional[_Union[_types_pb2.ExecutionMode, str]] = ..., priority: _Optional[int] = ..., approval_id: _Optional[str] = ...) -> None: ...

class SubmitExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: _types_pb2.Execution
    def __init__(self, execution: _Optional[_Union[_types_pb2.Execution, _Mapping]] = ...) -> None: ...

class GetExecutionRequest(_message.Message):
    __slots__ = ("tenant_id", "execution_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    execution_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ...) -> None: ...

class GetExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: _types_pb2.Execution
    def __init__(self, execution: _Optional[_Union[_types_pb2.Execution, _Mapping]] = ...) -> None: ...

class ListExecutionsRequest(_message.Message):
    __slots__ = ("tenant_id", "statuses", "execution_mode", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    statuses: _containers.RepeatedScalarFieldContainer[_types_pb2.ExecutionStatus]
    execution_mode: _types_pb2.ExecutionMode
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_types_pb2.ExecutionStatus, str]]] = ..., execution_mode: _Optional[_Union[_types_pb2.ExecutionMode, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExecutionsResponse(_message.Message):
    __slots__ = ("executions", "next_page_token")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Execution]
    next_page_token: str
    def __init__(self, executions: _Optional[_Iterable[_Union[_types_pb2.Execution, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelExecutionRequest(_message.Message):
    __slots__ = ("tenant_id", "execution_id", "reason")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    execution_id: str
    reason: str
    def __init__(self, tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: _types_pb2.Execution
    def __init__(self, execution: _Optional[_Union[_types_pb2.Execution, _Mapping]] = ...) -> None: ...

class PreviewPlanRequest(_message.Message):
    __slots__ = ("tenant_id", "plan", "requested_mode")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    plan: _types_pb2.Plan
    requested_mode: _types_pb2.ExecutionMode
    def __init__(self, tenant_id: _Optional[str] = ..., plan: _Optional[_Union[_types_pb2.Plan, _Mapping]] = ..., requested_mode: _Optional[_Union[_types_pb2.ExecutionMode, str]] = ...) -> None: ...

class PreviewPlanResponse(_message.Message):
    __slots__ = ("execution_mode", "approval_level", "timeout_policy_id", "plan_hash", "idempotency_key", "estimated_duration_ms", "can_parallelize", "execution_timeout_ms", "step_timeout_ms", "action_class")
    EXECUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CAN_PARALLELIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    execution_mode: _types_pb2.ExecutionMode
    approval_level: int
    timeout_policy_id: str
    plan_hash: str
    idempotency_key: str
    estimated_duration_ms: int
    can_parallelize: bool
    execution_timeout_ms: int
    step_timeout_ms: int
    action_class: _types_pb2.ActionClass
    def __init__(self, execution_mode: _Optional[_Union[_types_pb2.ExecutionMode, str]] = ..., approval_level: _Optional[int] = ..., timeout_policy_id: _Optional[str] = ..., plan_hash: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., estimated_duration_ms: _Optional[int] = ..., can_parallelize: _Optional[bool] = ..., execution_timeout_ms: _Optional[int] = ..., step_timeout_ms: _Optional[int] = ..., action_class: _Optional[_Union[_types_pb2.ActionClass, str]] = ...) -> None: ...
