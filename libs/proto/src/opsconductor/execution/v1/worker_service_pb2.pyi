from opsconductor.execution.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunImmediateRequest(_message.Message):
    __slots__ = ("tenant_id", "execution_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    execution_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., execution_id: _Optional[str] = ...) -> None: ...

class RunImmediateResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: _types_pb2.Execution
    def __init__(self, execution: _Optional[_Union[_types_pb2.Execution, _Mapping]] = ...) -> None: ...
