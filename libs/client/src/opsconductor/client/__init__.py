"""Typed async Python client for OpsConductor Execution.

    async with ExecutionClient("127.0.0.1:50051", token) as client:
        result = await client.submit(plan, tenant_id="acme")

Failures raise the domain exceptions re-exported here (``ResourceBusyError``,
``PermissionDeniedError`` — also a ``PermissionError`` —, ``ApprovalInvalidatedError``,
``FSMError``, ``ExecutionTimeoutError`` — also an ``asyncio.TimeoutError`` —,
``QuotaExceededError`` with the server's ``retry_after_s`` ...).
"""

from opsconductor.contract.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ApprovalLevelNotEnabledError,
    AuthenticationError,
    ConflictError,
    ExecutionTimeoutError,
    FailedPreconditionError,
    FeatureDisabledError,
    FSMError,
    NotFoundError,
    OpsConductorError,
    PermissionDeniedError,
    PlanValidationError,
    QueueUnavailableError,
    QuotaExceededError,
    ResourceBusyError,
    ResourceExhaustedError,
    SelfApprovalError,
    StorageError,
    SubscriberLaggedError,
    UnimplementedError,
    WorkerUnavailableError,
)

from .approvals import Approval, ApprovalClient
from .base import DEFAULT_TIMEOUT_S, ChannelClient
from .client import ExecutionClient, ExecutionContext
from .errors import RpcError, map_rpc_error
from .models import (
    AuditChainVerdict,
    DlqEntry,
    DlqRequeue,
    Execution,
    ExecutionEvent,
    ExecutionStep,
    FeatureFlags,
    FlagChange,
    Preview,
    QueueStats,
)
from .progress import ProgressTracker
from .tls import ClientTls

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Approval",
    "ApprovalClient",
    "ApprovalDecidedError",
    "ApprovalExpiredError",
    "ApprovalInvalidatedError",
    "ApprovalLevelNotEnabledError",
    "AuditChainVerdict",
    "AuthenticationError",
    "ChannelClient",
    "ClientTls",
    "ConflictError",
    "DlqEntry",
    "DlqRequeue",
    "Execution",
    "ExecutionClient",
    "ExecutionContext",
    "ExecutionEvent",
    "ExecutionStep",
    "ExecutionTimeoutError",
    "FSMError",
    "FailedPreconditionError",
    "FeatureDisabledError",
    "FeatureFlags",
    "FlagChange",
    "NotFoundError",
    "OpsConductorError",
    "PermissionDeniedError",
    "PlanValidationError",
    "Preview",
    "ProgressTracker",
    "QueueStats",
    "QueueUnavailableError",
    "QuotaExceededError",
    "ResourceBusyError",
    "ResourceExhaustedError",
    "RpcError",
    "SelfApprovalError",
    "StorageError",
    "SubscriberLaggedError",
    "UnimplementedError",
    "WorkerUnavailableError",
    "map_rpc_error",
]
