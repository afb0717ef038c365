import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditChainProblem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_CHAIN_PROBLEM_UNSPECIFIED: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_ALTERED: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_MISSING: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_UNCHAINED: _ClassVar[AuditChainProblem]
AUDIT_CHAIN_PROBLEM_UNSPECIFIED: AuditChainProblem
AUDIT_CHAIN_PROBLEM_ALTERED: AuditChainProblem
AUDIT_CHAIN_PROBLEM_MISSING: AuditChainProblem
AUDIT_CHAIN_PROBLEM_UNCHAINED: AuditChainProblem

class FeatureFlags(_message.Message):
    __slots__ = ("stage_e_enabled", "enabled_tenants", "record_only_tenants", "max_approval_level", "dispatch_paused", "all_tenants_enabled")
    STAGE_E_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ENABLED_TENANTS_FIELD_NUMBER: _ClassVar[int]
    RECORD_ONLY_TENANTS_FIELD_NUMBER: _ClassVar[int]
    MAX_APPROVAL_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_PAUSED_FIELD_NUMBER: _ClassVar[int]
    ALL_TENANTS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    stage_e_enabled: bool
    enabled_tenants: _containers.RepeatedScalarFieldContainer[str]
    record_only_tenants: _containers.RepeatedScalarFieldContainer[str]
    max_approval_level: int
    dispatch_paused: bool
    all_tenants_enabled: bool
    def __init__(self, stage_e_enabled: _Optional[bool] = ..., enabled_tenants: _Optional[_Iterable[str]] = ..., record_only_tenants: _Optional[_Iterable[str]] = ..., max_approval_level: _Optional[int] = ..., dispatch_paused: _Optional[bool] = ..., all_tenants_enabled: _Optional[bool] = ...) -> None: ...

class GetFeatureFlagsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFeatureFlagsResponse(_message.Message):
    __slots__ = ("flags",)
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    flags: FeatureFlags
    def __init__(self, flags: _Optional[_Union[FeatureFlags, _Mapping]] = ...) -> None: ...

class UpdateFeatureFlagsRequest(_message.Message):
    __slots__ = ("flags", "update_mask")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    flags: FeatureFlags
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, flags: _Optional[_Union[FeatureFlags, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateFeatureFlagsResponse(_message.Message):
    __slots__ = ("flags",)
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    flags: FeatureFlags
    def __init__(self, flags: _Optional[_Union[FeatureFlags, _Mapping]] = ...) -> None: ...

class DlqEntry(_message.Message):
    __slots__ = ("dlq_id", "execution_id", "tenant_id", "attempts", "error_class", "error_message", "created_at", "requeued_at", "requeued_by", "last_error")
    DLQ_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    dlq_id: str
    execution_id: str
    tenant_id: str
    attempts: int
    error_class: str
    error_message: str
    created_at: _timestamp_pb2.Timestamp
    requeued_at: _timestamp_pb2.Timestamp
    requeued_by: str
    last_error: _struct_pb2.Struct
    def __init__(self, dlq_id: _Optional[str] = ..., execution_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., attempts: _Optional[int] = ..., error_class: _Optional[str] = ..., error_message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requeued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requeued_by: _Optional[str] = ..., last_error: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListDlqEntriesRequest(_message.Message):
    __slots__ = ("tenant_id", "error_class", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    error_class: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., error_class: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDlqEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DlqEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[DlqEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RequeueDlqEntryRequest(_message.Message):
    __slots__ = ("dlq_id",)
    DLQ_ID_FIELD_NUMBER: _ClassVar[int]
    dlq_id: str
    def __init__(self, dlq_id: _Optional[str] = ...) -> None: ...

class RequeueDlqEntryResponse(_message.Message):
    __slots__ = ("entry", "job_id", "execution_id")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    entry: DlqEntry
    job_id: str
    execution_id: str
    def __init__(self, entry: _Optional[_Union[DlqEntry, _Mapping]] = ..., job_id: _Optional[str] = ..., execution_id: _Optional[str] = ...) -> None: ...

class GetQueueStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PriorityQueueStats(_message.Message):
    __slots__ = ("priority", "ready")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    priority: int
    ready: int
    def __init__(self, priority: _Optional[int] = ..., ready: _Optional[int] = ...) -> None: ...

class GetQueueStatsResponse(_message.Message):
    __slots__ = ("priorities", "leased", "delayed", "dlq_size", "oldest_ready_age_seconds", "dispatch_paused")
    PRIORITIES_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    DLQ_SIZE_FIELD_NUMBER: _ClassVar[int]
    OLDEST_READY_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_PAUSED_FIELD_NUMBER: _ClassVar[int]
    priorities: _containers.RepeatedCompositeFieldContainer[PriorityQueueStats]
    leased: int
    delayed: int
    dlq_size: int
    oldest_ready_age_seconds: float
    dispatch_paused: bool
    def __init__(self, priorities: _Optional[_Iterable[_Union[PriorityQueueStats, _Mapping]]] = ..., leased: _Optional[int] = ..., delayed: _Optional[int] = ..., dlq_size: _Optional[int] = ..., oldest_ready_age_seconds: _Optional[float] = ..., dispatch_paused: _Optional[bool] = ...) -> None: ...

class SetDrainRequest(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class SetDrainResponse(_message.Message):
    __slots__ = ("dispatch_paused",)
    DISPATCH_PAUSED_FIELD_NUMBER: _ClassVar[int]
    dispatch_paused: bool
    def __init__(self, dispatch_paused: _Optional[bool] = ...) -> None: ...

class VerifyAuditChainRequest(_message.Message):
    __slots__ = ("tenant_id", "execution_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    execution_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ...) -> None: ...

class VerifyAuditChainResponse(_message.Message):
    __slots__ = ("intact", "events_checked", "events_expected", "head_hash", "broken_seq", "problem", "detail")
    INTACT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    BROKEN_SEQ_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    intact: bool
    events_checked: int
    events_expected: int
    head_hash: str
    broken_seq: int
    problem: AuditChainProblem
    detail: str
    def __init__(self, intact: _Optional[bool] = ..., events_checked: _Optional[int] = ..., events_expected: _Optional[int] = ..., head_hash: _Optional[str] = ..., broken_seq: _Optional[int] = ..., problem: _Optional[_Union[AuditChainProblem, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class FlagChange(_message.Message):
    __slots__ = ("change_id", "flag", "old_value", "new_value", "changed_by", "changed_at")
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_BY_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    change_id: str
    flag: str
    old_value: _struct_pb2.Value
    new_value: _struct_pb2.Value
    changed_by: str
    changed_at: _timestamp_pb2.Timestamp
    def __init__(self, change_id: _Optional[str] = ..., flag: _Optional[str] = ..., old_value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., new_value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., changed_by: _Optional[str] = ..., changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListFlagChangesRequest(_message.Message):
    __slots__ = ("flag", "page_size", "page_token")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    flag: str
    page_size: int
    page_token: str
    def __init__(self, flag: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFlagChangesResponse(_message.Message):
    __slots__ = ("changes", "next_page_token")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[FlagChange]
    next_page_token: str
    def __init__(self, changes: _Optional[_Iterable[_Union[FlagChange, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
