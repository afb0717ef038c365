"""Requests that cannot be decoded, or hold text no column can store, refused as INVALID_ARGUMENT.

grpcio answers a request whose bytes its deserializer rejects (invalid UTF-8 in a ``string``
field, truncated or garbage bytes, a ``Struct`` nested deeper than the decoder allows) with
``UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: …"``: the wrong code, and a
class name on the wire. The server interceptor therefore wraps every method's request
deserializer with :func:`tolerant_deserializer`, which turns such bytes into an
:class:`UndecodableRequest` placeholder; the wrapped handler then refuses it through the normal
error mapping, naming the message type and nothing of the decoder.

:func:`check_text_fields` refuses the other kind of text a column cannot hold: NUL characters
(Postgres ``text`` cannot store them). It looks at every string field of a request except those
inside a ``Plan`` (which ``parse_plan`` validates with field paths), inside ``Struct`` values,
and fields named ``tenant_id``: a requested tenant can only match the caller's own, valid one,
so any other value is a tenant mismatch, which RBAC denies *and audits* (a NUL refused here
would leave no trace of a cross-tenant probe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from opsconductor.common.errors import InvalidArgumentError

__all__ = ["UndecodableRequest", "check_text_fields", "tolerant_deserializer"]

#: Message types whose strings are validated elsewhere (``parse_plan``) or are free JSON.
_VALIDATED_ELSEWHERE: Final = frozenset(
    {"opsconductor.execution.v1.Plan", "google.protobuf.Struct", "google.protobuf.Value"}
)
#: Checked by RBAC's tenant comparison instead (denied and audited).
_AUDITED_FIELDS: Final = frozenset({"tenant_id"})
_STRING: Final = FieldDescriptor.TYPE_STRING
_MESSAGE: Final = FieldDescriptor.TYPE_MESSAGE


class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid message of its type."""

    __slots__ = ("message_type",)

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type

    def error(self) -> InvalidArgumentError:
        """The caller-facing refusal (no decoder text: it may name classes or quote bytes)."""
        return InvalidArgumentError(
            f"the request could not be decoded as {self.message_type}: it is truncated, not "
            "protobuf, holds a string that is not valid UTF-8, or nests deeper than allowed",
            message_type=self.message_type,
        )


def tolerant_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns an :class:`UndecodableRequest` instead of raising."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "name", "the request message")

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        # DecodeError, and whatever else a decoder raises on hostile bytes: all mean "bad request".
        except Exception:  # noqa: BLE001
            return UndecodableRequest(message_type)

    return decode


def check_text_fields(message: Any) -> None:
    """Raise ``InvalidArgumentError`` naming the first string field holding a NUL character."""
    if isinstance(message, Message):
        _check(message, "")


def _check(message: Message, prefix: str) -> None:
    if message.DESCRIPTOR.full_name in _VALIDATED_ELSEWHERE:
        return
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == _STRING and field.name in _AUDITED_FIELDS:
            continue
        if field.type == _STRING:
            values = value if _is_repeated(field) else (value,)
            if any("\x00" in text for text in values):
                raise InvalidArgumentError(f"{path} must not contain NUL characters", field=path)
        elif field.type == _MESSAGE and not _is_map(field):
            items = value if _is_repeated(field) else (value,)
            for index, item in enumerate(items):
                where = f"{path}[{index}]." if _is_repeated(field) else f"{path}."
                _check(item, where)
        elif field.type == _MESSAGE:  # a map<string, string>: check keys and values
            for key, item in value.items():
                if "\x00" in str(key) or (isinstance(item, str) and "\x00" in item):
                    raise InvalidArgumentError(
                        f"{path} must not contain NUL characters", field=path
                    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    message_type = field.message_type
    return message_type is not None and bool(message_type.GetOptions().map_entry)
