"""gRPC transport shared by every service: server bootstrap, interceptor, status mapping, codecs.

- :mod:`.server`           ``build_server`` / ``serve`` / ``run_server`` / ``load_settings``:
                           health, reflection, graceful shutdown, metrics endpoint, tracing
- :mod:`.interceptors`     request id, domain error → status, canonical access log, metrics
- :mod:`.status`           the one mapping from domain errors to rich gRPC statuses
- :mod:`.metadata`         the per-RPC request id (``x-request-id``)
- :mod:`.resources`        the database pool a service opens at start-up and closes at shutdown
- :mod:`.plan_codec`, :mod:`.execution_codec`  protobuf ↔ domain values shared by services
"""
