"""HTTP transport of the progress service: WebSocket, SSE, long-poll, grpc-web and the UI.

Every route authenticates like gRPC (a bearer token, or a short-lived ticket where a browser
cannot send headers) and reads through the same :class:`~opsconductor.progress.logic.access.
EventAccess`, so the tenant rules and the audit of refusals are the ones of ``StreamEvents``.
"""
