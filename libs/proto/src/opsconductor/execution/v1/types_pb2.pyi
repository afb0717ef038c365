import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecutionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_STATUS_UNSPECIFIED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_PENDING: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_AWAITING_APPROVAL: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_QUEUED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_RUNNING: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_SUCCEEDED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_FAILED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_CANCELLED: _ClassVar[ExecutionStatus]
    EXECUTION_STATUS_REJECTED: _ClassVar[ExecutionStatus]

class ExecutionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_MODE_UNSPECIFIED: _ClassVar[ExecutionMode]
    EXECUTION_MODE_IMMEDIATE: _ClassVar[ExecutionMode]
    EXECUTION_MODE_BACKGROUND: _ClassVar[ExecutionMode]

class SlaClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLA_CLASS_UNSPECIFIED: _ClassVar[SlaClass]
    SLA_CLASS_FAST: _ClassVar[SlaClass]
    SLA_CLASS_MEDIUM: _ClassVar[SlaClass]
    SLA_CLASS_LONG: _ClassVar[SlaClass]

class ActionClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_CLASS_UNSPECIFIED: _ClassVar[ActionClass]
    ACTION_CLASS_READ: _ClassVar[ActionClass]
    ACTION_CLASS_MODIFY: _ClassVar[ActionClass]
    ACTION_CLASS_DEPLOY: _ClassVar[ActionClass]

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_REJECTED: _ClassVar[ApprovalState]
    APPROVAL_STATE_INVALIDATED: _ClassVar[ApprovalState]
    APPROVAL_STATE_EXPIRED: _ClassVar[ApprovalState]

class StepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATUS_UNSPECIFIED: _ClassVar[StepStatus]
    STEP_STATUS_PENDING: _ClassVar[StepStatus]
    STEP_STATUS_RUNNING: _ClassVar[StepStatus]
    STEP_STATUS_SUCCEEDED: _ClassVar[StepStatus]
    STEP_STATUS_FAILED: _ClassVar[StepStatus]
    STEP_STATUS_SKIPPED: _ClassVar[StepStatus]
    STEP_STATUS_AWAITING_APPROVAL: _ClassVar[StepStatus]
EXECUTION_STATUS_UNSPECIFIED: ExecutionStatus
EXECUTION_STATUS_PENDING: ExecutionStatus
EXECUTION_STATUS_AWAITING_APPROVAL: ExecutionStatus
EXECUTION_STATUS_QUEUED: ExecutionStatus
EXECUTION_STATUS_RUNNING: ExecutionStatus
EXECUTION_STATUS_SUCCEEDED: ExecutionStatus
EXECUTION_STATUS_FAILED: ExecutionStatus
EXECUTION_STATUS_CANCELLED: ExecutionStatus
EXECUTION_STATUS_REJECTED: ExecutionStatus
EXECUTION_MODE_UNSPECIFIED: ExecutionMode
EXECUTION_MODE_IMMEDIATE: ExecutionMode
EXECUTION_MODE_BACKGROUND: ExecutionMode
SLA_CLASS_UNSPECIFIED: SlaClass
SLA_CLASS_FAST: SlaClass
SLA_CLASS_MEDIUM: SlaClass
SLA_CLASS_LONG: SlaClass
ACTION_CLASS_UNSPECIFIED: ActionClass
ACTION_CLASS_READ: ActionClass
ACTION_CLASS_MODIFY: ActionClass
ACTION_CLASS_DEPLOY: ActionClass
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPROVED: ApprovalState
APPROVAL_STATE_REJECTED: ApprovalState
APPROVAL_STATE_INVALIDATED: ApprovalState
APPROVAL_STATE_EXPIRED: ApprovalState
STEP_STATUS_UNSPECIFIED: StepStatus
STEP_STATUS_PENDING: StepStatus
STEP_STATUS_RUNNING: StepStatus
STEP_STATUS_SUCCEEDED: StepStatus
STEP_STATUS_FAILED: StepStatus
STEP_STATUS_SKIPPED: StepStatus
STEP_STATUS_AWAITING_APPROVAL: StepStatus

class Target(_message.Message):
    __slots__ = ("ref", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, ref: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("id", "action", "action_class", "targets", "params")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    action: str
    action_class: ActionClass
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    params: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., action: _Optional[str] = ..., action_class: _Optional[_Union[ActionClass, str]] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("name", "steps", "sla_class", "runbook_url", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SLA_CLASS_FIELD_NUMBER: _ClassVar[int]
    RUNBOOK_URL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    sla_class: SlaClass
    runbook_url: str
    description: str
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., sla_class: _Optional[_Union[SlaClass, str]] = ..., runbook_url: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ExecutionStep(_message.Message):
    __slots__ = ("step_id", "position", "action", "status", "attempt", "started_at", "ended_at", "duration_ms", "result", "error_class", "error_message", "idempotency_key")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    position: int
    action: str
    status: StepStatus
    attempt: int
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    duration_ms: int
    result: _struct_pb2.Struct
    error_class: str
    error_message: str
    idempotency_key: str
    def __init__(self, step_id: _Optional[str] = ..., position: _Optional[int] = ..., action: _Optional[str] = ..., status: _Optional[_Union[StepStatus, str]] = ..., attempt: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[int] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error_class: _Optional[str] = ..., error_message: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("execution_id", "tenant_id", "actor_id", "status", "execution_mode", "sla_class", "approval_level", "approval_id", "plan_hash", "plan_snapshot_hash", "idempotency_key", "job_id", "priority", "timeout_policy_id", "timed_out", "created_at", "started_at", "ended_at", "duration_ms", "cancelled_by", "cancelled_at", "cancel_reason", "result_summary", "error_class", "error_message", "worker_id", "lease_renewals", "cancel_checks_performed", "attempts", "last_transition_at", "last_transition_by", "last_transition_from", "estimated_duration_ms", "record_only", "plan", "steps", "deduplicated")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    SLA_CLASS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    PLAN_SNAPSHOT_HASH_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_AT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    RESULT_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_RENEWALS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_CHECKS_PERFORMED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_FROM_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    RECORD_ONLY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    tenant_id: str
    actor_id: str
    status: ExecutionStatus
    execution_mode: ExecutionMode
    sla_class: SlaClass
    approval_level: int
    approval_id: str
    plan_hash: str
    plan_snapshot_hash: str
    idempotency_key: str
    job_id: str
    priority: int
    timeout_policy_id: str
    timed_out: bool
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    duration_ms: int
    cancelled_by: str
    cancelled_at: _timestamp_pb2.Timestamp
    cancel_reason: str
    result_summary: _struct_pb2.Struct
    error_class: str
    error_message: str
    worker_id: str
    lease_renewals: int
    cancel_checks_performed: int
    attempts: int
    last_transition_at: _timestamp_pb2.Timestamp
    last_transition_by: str
    last_transition_from: ExecutionStatus
    estimated_duration_ms: int
    record_only: bool
    plan: Plan
    steps: _containers.RepeatedCompositeFieldContainer[ExecutionStep]
    deduplicated: bool
    def __init__(self, execution_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., actor_id: _Optional[str] = ..., status: _Optional[_Union[ExecutionStatus, str]] = ..., execution_mode: _Optional[_Union[ExecutionMode, str]] = ..., sla_class: _Optional[_Union[SlaClass, str]] = ..., approval_level: _Optional[int] = ..., approval_id: _Optional[str] = ..., plan_hash: _Optional[str] = ..., plan_snapshot_hash: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., job_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout_policy_id: _Optional[str] = ..., timed_out: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[int] = ..., cancelled_by: _Optional[str] = ..., cancelled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_reason: _Optional[str] = ..., result_summary: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error_class: _Optional[str] = ..., error_message: _Optional[str] = ..., worker_id: _Optional[str] = ..., lease_renewals: _Optional[int] = ..., cancel_checks_performed: _Optional[int] = ..., attempts: _Optional[int] = ..., last_transition_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_transition_by: _Optional[str] = ..., last_transition_from: _Optional[_Union[ExecutionStatus, str]] = ..., estimated_duration_ms: _Optional[int] = ..., record_only: _Optional[bool] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[ExecutionStep, _Mapping]]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("approval_id", "tenant_id", "execution_id", "level", "state", "plan_hash", "plan_snapshot_hash", "requested_by", "decided_by", "auth_method", "source_ip", "decided_at", "comment", "created_at", "expires_at", "runbook_url", "plan", "step_id", "target_refs", "actions")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    PLAN_SNAPSHOT_HASH_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RUNBOOK_URL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_REFS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    tenant_id: str
    execution_id: str
    level: int
    state: ApprovalState
    plan_hash: str
    plan_snapshot_hash: str
    requested_by: str
    decided_by: str
    auth_method: str
    source_ip: str
    decided_at: _timestamp_pb2.Timestamp
    comment: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    runbook_url: str
    plan: Plan
    step_id: str
    target_refs: _containers.RepeatedScalarFieldContainer[str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, approval_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ..., level: _Optional[int] = ..., state: _Optional[_Union[ApprovalState, str]] = ..., plan_hash: _Optional[str] = ..., plan_snapshot_hash: _Optional[str] = ..., requested_by: _Optional[str] = ..., decided_by: _Optional[str] = ..., auth_method: _Optional[str] = ..., source_ip: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., comment: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., runbook_url: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., step_id: _Optional[str] = ..., target_refs: _Optional[_Iterable[str]] = ..., actions: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecutionEvent(_message.Message):
    __slots__ = ("execution_id", "seq", "type", "payload", "created_at", "tenant_id", "actor_id")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    seq: int
    type: str
    payload: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    tenant_id: str
    actor_id: str
    def __init__(self, execution_id: _Optional[str] = ..., seq: _Optional[int] = ..., type: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant_id: _Optional[str] = ..., actor_id: _Optional[str] = ...) -> None: ...
