"""What the servers and the client share beyond the generated messages.

- :mod:`.errors`        the domain exception tree (each class's ``reason`` is on the wire)
- :mod:`.status_codes`  the one table between those classes and gRPC status codes
- :mod:`.identifiers`   what tenant ids, actor ids and auth methods may look like
- :mod:`.metadata`      the ``x-request-id`` metadata key and the per-RPC request id
- :mod:`.plan_limits`, :mod:`.plan_codec`  plan count limits; plans between JSON and ``Plan``

Nothing here imports asyncpg, redis, OpenTelemetry or ``opsconductor.common``: the client
distribution stands on this package and the generated code alone.
"""
