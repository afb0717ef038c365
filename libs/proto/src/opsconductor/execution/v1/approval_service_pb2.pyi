from opsconductor.execution.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetApprovalRequest(_message.Message):
    __slots__ = ("tenant_id", "approval_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    approval_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., approval_id: _Optional[str] = ...) -> None: ...

class GetApprovalResponse(_message.Message):
    __slots__ = ("approval",)
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    approval: _types_pb2.Approval
    def __init__(self, approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...

class ListPendingApprovalsRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPendingApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[_types_pb2.Approval]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[_types_pb2.Approval, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("tenant_id", "approval_id", "comment")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    approval_id: str
    comment: str
    def __init__(self, tenant_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ApproveResponse(_message.Message):
    __slots__ = ("approval",)
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    approval: _types_pb2.Approval
    def __init__(self, approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...

class RejectRequest(_message.Message):
    __slots__ = ("tenant_id", "approval_id", "comment")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    approval_id: str
    comment: str
    def __init__(self, tenant_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class RejectResponse(_message.Message):
    __slots__ = ("approval",)
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    approval: _types_pb2.Approval
    def __init__(self, approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...

class ApproveStepRequest(_message.Message):
    __slots__ = ("tenant_id", "execution_id", "step_id", "comment")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    execution_id: str
    step_id: str
    comment: str
    def __init__(self, tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ..., step_id: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ApproveStepResponse(_message.Message):
    __slots__ = ("approval",)
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    approval: _types_pb2.Approval
    def __init__(self, approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...
