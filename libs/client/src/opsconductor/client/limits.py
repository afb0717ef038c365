"""Message limits every client channel carries, matching the services' own."""

from __future__ import annotations

#: The services' own message limit (``OPSC_GRPC_MAX_MESSAGE_BYTES``, 4 MiB by default), set on
#: every channel so neither side decodes a message the other would refuse.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
