"""One exception tree, in one module: every reason a server can send names a client exception.

The servers build a status from the contract's table (``opsconductor.rpc.status``) with the
raised class's ``reason`` in the ``ErrorInfo``; the client maps that reason back through the same
contract (``opsconductor.client.errors``). A class defined outside the contract module would send
a reason the client does not know and come back as its base class, so every class a caller can
receive by a reason of its own lives in :mod:`opsconductor.contract.errors`. Elsewhere only: a
class that reports as its base (same reason), the failures of a step's action (they carry the
step's output, are recorded on the step and never end an RPC) and start-up or configuration
failures, reported as INTERNAL.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import grpc
import grpc.aio
import pytest

from opsconductor.client.errors import RpcError, map_rpc_error
from opsconductor.contract import errors as e
from opsconductor.contract.status_codes import class_for_reason, error_classes
from opsconductor.rpc.status import code_for_exception, status_for_exception

#: Every package of server code (the client's own RpcError is the client's, never sent).
SERVER_PACKAGES = (
    "opsconductor.common",
    "opsconductor.lifecycle",
    "opsconductor.actions",
    "opsconductor.policy",
    "opsconductor.rpc",
    "opsconductor.devstack",
    "opsconductor.api",
    "opsconductor.worker",
    "opsconductor.approvals",
    "opsconductor.progress",
)
#: Raised inside a step, caught by the runner and recorded as the step's error class: they carry
#: the step's output (an action type), so they live with the actions.
STEP_FAILURES = {
    "ActionFailedError",
    "ActionTimeoutError",
    "EgressDeniedError",
    "SandboxUnavailableError",
}
#: Start-up and configuration failures: a caller is told "internal error", never their reason.
INTERNAL_ONLY = {
    "ActionError",
    "ActionPluginError",
    "EmbeddedServerError",
    "RbacPolicyError",
    "StackStartError",
}


def _import_all() -> None:
    for name in SERVER_PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            if module.name.endswith("__main__"):
                continue
            importlib.import_module(module.name)


def _subclasses(cls: type[e.OpsConductorError]) -> list[type[e.OpsConductorError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


_import_all()
SERVER_CLASSES = sorted(
    {
        cls
        for cls in _subclasses(e.OpsConductorError)
        # Server code only: the client's own classes, and classes of test code and test plugins
        # (opsc_test_actions, imported by other tests of the same session), are not the contract.
        if cls.__module__.startswith("opsconductor.")
        and not cls.__module__.startswith("opsconductor.client")
    },
    key=lambda cls: f"{cls.__module__}.{cls.__name__}",
)
OWN_REASON = [cls for cls in SERVER_CLASSES if "reason" in cls.__dict__]


def _instance(cls: type[e.OpsConductorError]) -> e.OpsConductorError:
    if issubclass(cls, e.PlanValidationError):
        return cls(violations=[e.FieldViolation("steps[0].id", "must be set")])
    return cls()


def test_the_scan_sees_the_server_classes() -> None:
    names = {cls.__name__ for cls in SERVER_CLASSES}
    assert {"DlqEntryRequeuedError", "MigrationError", "ActionFailedError"} <= names
    assert len(SERVER_CLASSES) >= 45


def _reports_as_its_base(cls: type[e.OpsConductorError]) -> bool:
    return any(cls.reason == base.reason for base in cls.__mro__[1:] if "reason" in base.__dict__)


def _internal(cls: type[e.OpsConductorError]) -> bool:
    return code_for_exception(_instance(cls)) is grpc.StatusCode.INTERNAL


def _over_the_wire(sent: e.OpsConductorError) -> Exception:
    status = status_for_exception(sent, request_id="r-1")
    return map_rpc_error(
        grpc.aio.AioRpcError(
            status.code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*status.trailing_metadata),
            details=status.details,
        )
    )


def test_every_class_a_caller_can_receive_by_its_own_reason_is_in_the_contract() -> None:
    outside = {
        cls.__name__
        for cls in OWN_REASON
        if cls.__module__ != e.__name__ and not _reports_as_its_base(cls)
    }
    # The exceptions are exactly these, so a new class cannot slip in beside them.
    assert outside == STEP_FAILURES | INTERNAL_ONLY
    assert {cls.__name__ for cls in SERVER_CLASSES if _internal(cls)} == (
        STEP_FAILURES | INTERNAL_ONLY
    )


@pytest.mark.parametrize(
    "cls",
    [cls for cls in SERVER_CLASSES if cls.__name__ not in STEP_FAILURES | INTERNAL_ONLY],
    ids=lambda cls: cls.__name__,
)
def test_every_server_reason_maps_to_a_client_exception(cls: type[e.OpsConductorError]) -> None:
    """Server status → wire → client: the client raises a class carrying the server's reason,
    the server's own class or the contract ancestor it reports as."""
    got = _over_the_wire(_instance(cls))
    mapped = class_for_reason(cls.reason)
    assert mapped is not None, f"{cls.__name__}: reason {cls.reason} unknown to the client"
    assert issubclass(cls, mapped)
    assert mapped.reason == cls.reason
    assert isinstance(got, mapped)
    if cls.__module__ == e.__name__:
        assert type(got) is cls


@pytest.mark.parametrize("name", sorted(STEP_FAILURES | INTERNAL_ONLY))
def test_internal_only_errors_reach_a_caller_as_internal_and_say_nothing(name: str) -> None:
    (cls,) = [c for c in SERVER_CLASSES if c.__name__ == name]
    got = _over_the_wire(_instance(cls))
    assert isinstance(got, RpcError)
    assert got.details["code"] == "INTERNAL"
    assert "r-1" in got.message
    assert _instance(cls).message not in got.message


def test_reasons_are_unique_but_for_a_subclass_reporting_as_its_base() -> None:
    """Two classes of the tree with the same reason would map to one: only a subclass that
    deliberately reports as its base (e.g. a page request error with field violations) may."""
    by_reason: dict[str, type[e.OpsConductorError]] = {}
    for cls in error_classes():
        if "reason" not in cls.__dict__:
            continue
        first = by_reason.setdefault(cls.reason, cls)
        assert first is cls or issubclass(cls, first), (cls.__name__, first.__name__)


def test_the_documented_tree_names_every_class_with_its_base_and_reason() -> None:
    """The contract's docstring draws its own classes (``tests/unit/test_errors.py`` checks that
    drawing) and lists every other class of every server package with its base and reason."""
    listed = re.findall(r"^ {4}(\w+) < (\w+): (\w+) \(([\w.]+)[;)]", e.__doc__ or "", re.M)
    drawn = re.findall(r"^ *[*+-] (\w+)(?: \([\w.]+\))? \.+ ([A-Z_]+)$", e.__doc__ or "", re.M)
    documented = {name: reason for name, reason in drawn}
    for name, base, reason, module in listed:
        documented[name] = reason
        if name == "RpcError":
            assert RpcError.__bases__[0].__name__ == base
            continue
        (cls,) = [c for c in SERVER_CLASSES if c.__name__ == name]
        assert cls.__bases__[0].__name__ == base, name
        assert cls.__module__ == f"opsconductor.{module}", name
    assert documented.pop("RpcError") == RpcError.reason
    assert documented == {
        cls.__name__: cls.reason for cls in [e.OpsConductorError, *SERVER_CLASSES]
    }


def test_the_secret_use_denial_reports_the_denial_reason_the_audit_records() -> None:
    """The contract spells the reason out (it imports no policy); the audit's enum must agree."""
    from opsconductor.policy.rbac import DenialReason

    assert e.SecretUseDeniedError.reason == DenialReason.SECRET_USE_DENIED.value
