"""Run one execution: take its mutexes, run its steps under the timeout policy, honour
cancellation, and record every outcome through the state machine.

The same runner serves the immediate path (``lease_token=None``) and, later, the queue (every
write fenced by the job's lease token). What it guarantees:

* locks of all the plan's (target, action) pairs are taken in one stable order before anything
  runs, and released in ``finally`` whatever happens (success, failure, timeout, cancellation);
  a run of one key takes it in its first step's start statement (with the cancel check), one
  round trip less, still after the policy, approval and RBAC checks and before any handler;
* the execution's time budget comes from its ``timeout_policies`` row: the whole run is bounded
  by ``execution_timeout_ms`` and each step by ``min(step_timeout_ms, what is left)``; on expiry
  the execution ends ``failed`` with ``timed_out = true`` and ``ExecutionTimeoutError`` is raised;
* cancellation is checked between steps (each check counted) and signalled live: the running
  step's handler sees ``cancel_event`` and finishes best-effort; steps not started are skipped;
* secrets are resolved per step, just in time, and never written anywhere;
* the tenant's policy (``tenant_policy.yaml`` as this worker loaded it) is checked again before
  the locks and the first step, whatever the api decided, and handed to every step's handler;
* an execution that needed an approval runs only if its approval is granted and bound to its
  exact plan (checked before the locks and the first step), and a level-3 one stops before each
  step not approved yet, keeping its locks (see :mod:`.approval_checks`);
* whatever goes wrong once the execution is ``running`` (a stored plan that no longer parses, a
  lock key that cannot be built, a bug) ends it ``failed`` at once with the real error class —
  never left ``running`` for the reaper to call a timeout (:meth:`ExecutionRunner.execute`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import structlog

from opsconductor.actions.base import (
    ActionContext,
    ActionFailedError,
    ActionResult,
    ActionTimeoutError,
    record_only_result,
)
from opsconductor.actions.planning import MAX_PARALLEL_STEPS, HandlerLookup, can_parallelize
from opsconductor.common.errors import (
    ExecutionTimeoutError,
    FailedPreconditionError,
    OpsConductorError,
    ResourceBusyError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.common.masking import default_masker, mask_text
from opsconductor.common.plan import Plan, Step, parse_plan
from opsconductor.common.secrets import SecretResolver
from opsconductor.common.tenant_policy import TenantPolicies, TenantPolicyDeniedError
from opsconductor.common.tracing import current_traceparent, tracer
from opsconductor.lifecycle.execution_logging import bind_execution
from opsconductor.lifecycle.facade import (
    CancelSignals,
    DeadLetter,
    ExecutionLifecycle,
    ExecutionRecord,
    LeasedJob,
    LockRequest,
    LockSet,
    PoolOrConnection,
    StepRecord,
    TimeoutPolicy,
    sorted_requests,
)
from opsconductor.policy.enforcement import (
    SecretUseDeniedError,
    enforce_secret_uses,
    enforce_tenant_policy,
    step_secret_use,
)

from . import metrics
from .approval_checks import ApprovalChecks

log = structlog.get_logger(__name__)

#: Steps ``skip_remaining_steps`` marks skipped when a run ends (none: nothing to write).
_SKIPPABLE = frozenset({StepStatus.PENDING, StepStatus.AWAITING_APPROVAL})
#: Locks outlive the execution budget by this much, so only a dead worker's locks expire.
LOCK_TTL_BUFFER = timedelta(seconds=30)


@dataclass(frozen=True)
class _WantedLocks:
    """The locks a run takes before its first step: the plan's keys, sorted and distinct."""

    requests: list[LockRequest]
    owner_token: UUID
    ttl: timedelta
    plan: Plan


@dataclass
class _Outcome:
    """How the run of the steps ended."""

    failed_step: str | None = None
    error_class: str | None = None
    error_message: str | None = None
    cancelled: bool = False
    timed_out: bool = False
    busy: ResourceBusyError | None = None
    #: The worker is shutting down: stop before the next step and requeue.
    interrupted: bool = False
    #: Level 3: the step that waits for its approval (the run stops there, locks kept).
    paused_step: str | None = None
    #: Refused before the first step (the approval binding); the execution fails.
    refused: OpsConductorError | None = None
    #: Set at worker shutdown. Per run, not per execution id: after a lost lease the same
    #: worker may take the execution over while its first run is still unwinding.
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: Step rows as this run's own writes returned them, by step id.
    steps: dict[str, StepRecord] = field(default_factory=dict)
    #: The final transition released the execution's locks (nothing left to release).
    locks_released: bool = False
    #: The locks this run holds (None: not taken, or refused as busy).
    lock_set: LockSet | None = None
    #: Locks still to take, with the first step's start in one statement (see ``_folds``).
    wanted: _WantedLocks | None = None
    #: The last step succeeded; its row is written with the execution's end (step id, result).
    deferred: tuple[str, Any] | None = None

    @property
    def stopped(self) -> bool:
        """No further step may start."""
        return bool(
            self.failed_step
            or self.cancelled
            or self.timed_out
            or self.interrupted
            or self.paused_step
            or self.busy is not None
        )

    @property
    def retryable(self) -> bool:
        """A later attempt may succeed: an action failed or a target was busy."""
        return (self.failed_step is not None or self.busy is not None) and not (
            self.timed_out or self.cancelled
        )


@dataclass(frozen=True)
class RunResult:
    """The execution as recorded after a run, and why it ended as it did."""

    record: ExecutionRecord
    retried: bool
    interrupted: bool
    retryable: bool
    timed_out: bool
    busy: ResourceBusyError | None
    error_class: str | None
    error_message: str | None
    #: Level 3: the run stopped before this step to wait for its approval (locks kept).
    paused_step: str | None = None
    #: Why the run was refused before its first step (the approval binding), if it was.
    refused: OpsConductorError | None = None

    def timeout_error(self) -> ExecutionTimeoutError:
        return ExecutionTimeoutError(
            self.error_message,
            execution_id=str(self.record.id),
            timeout_policy_id=self.record.timeout_policy_id or "",
            timeout_ms=self.record.timeout_ms,
        )


def _error_class(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, OpsConductorError) else type(exc).__name__


class ExecutionRunner:
    """Runs executions for one worker process."""

    def __init__(
        self,
        *,
        lifecycle: ExecutionLifecycle,
        pool: PoolOrConnection,
        handlers: HandlerLookup,
        secrets: SecretResolver,
        cancel_signals: CancelSignals,
        policies: Mapping[str, TimeoutPolicy],
        worker_id: str,
        approvals: ApprovalChecks | None = None,
        tenant_policies: TenantPolicies | None = None,
    ) -> None:
        #: Every read and write of the execution, its steps and locks (the lifecycle core).
        self._lifecycle = lifecycle
        #: Only where the tenant policy's refusals are audited (policy.enforcement).
        self._pool = pool
        #: What each tenant's steps may do; default: the packaged, strictest policy.
        self.tenant_policies = tenant_policies or TenantPolicies.load()
        #: Approval binding and level-3 step gates (None: executions needing approval fail).
        self.approvals = approvals
        self._handlers = handlers
        self._secrets = secrets
        self._cancel_signals = cancel_signals
        self._policies = policies
        self.worker_id = worker_id

    def _policy(self, record: ExecutionRecord) -> TimeoutPolicy | None:
        return self._policies.get(record.timeout_policy_id or "")

    async def run(self, record: ExecutionRecord) -> ExecutionRecord:
        """Immediate path: run a pending execution to a terminal state and return it.

        Raises ``ResourceBusyError`` when a target is locked (the execution ends failed, nothing
        ran, and its idempotency key is retired so the same plan can be retried), and
        ``ExecutionTimeoutError`` when the policy expired (the execution ends failed, timed out).
        """
        # An approved execution starts from awaiting_approval (checked by the caller).
        started = await self._lifecycle.start_run(record, worker_id=self.worker_id)
        # The steps as read with the record: nothing writes them between its read and the
        # compare-and-set above (a step is written only while its execution runs).
        record = replace(started, steps=record.steps)
        result = await self.execute(record, lease_token=None, retry_allowed=False)
        if result.refused is not None:
            raise result.refused
        if result.busy is not None:
            # Nothing ran: let the same plan be submitted again once the asset is free.
            await self._lifecycle.retire_key(record.id)
            raise result.busy
        if result.timed_out:
            raise result.timeout_error()
        return result.record

    async def execute(
        self,
        record: ExecutionRecord,
        *,
        lease_token: UUID | None,
        retry_allowed: bool,
        stop_event: asyncio.Event | None = None,
        dead_letter: LeasedJob | None = None,
    ) -> RunResult:
        """Run a ``running`` execution's steps and record how it ended.

        With ``retry_allowed`` a failure a later attempt may not repeat (an action failed, a
        target was busy) puts the execution back in the queue instead of failing it; timeouts
        and cancellations are always final. ``stop_event`` (worker shutdown) stops the run
        before its next step and requeues it without spending an attempt.

        Anything raised on the way (but a lost lease: another worker owns the execution now)
        first ends the execution ``failed`` with the error's class, then propagates.
        ``dead_letter``: the job dead-lettered with the final failure, in its transaction,
        when no retry is allowed for a retryable failure (``moved_to_dlq`` precedes
        ``execution_completed`` and neither exists without the other).
        """
        with bind_execution(record, worker_id=self.worker_id):
            try:
                return await self._execute(
                    record, lease_token, retry_allowed, stop_event, dead_letter
                )
            except StaleLeaseError:
                raise
            except Exception as exc:
                await self._fail_on_error(record, exc, lease_token)
                raise

    async def _fail_on_error(
        self, record: ExecutionRecord, exc: Exception, lease_token: UUID | None
    ) -> None:
        """End a ``running`` execution ``failed`` with ``exc``'s true class (best effort)."""
        if isinstance(exc, OpsConductorError):
            message = mask_text(exc.message)[:1000]
        else:
            # A bug: its text may quote internals; the class names it, the log has the rest.
            message = f"the worker failed while running this execution ({type(exc).__name__})"
        try:
            ended = await asyncio.shield(
                self._lifecycle.end_failed(
                    record.id,
                    error_class=_error_class(exc),
                    error_message=message,
                    by=self.worker_id,
                    lease_token=lease_token,
                    fail_running_steps=True,
                    clear_lease=True,
                    release_locks=True,
                )
            )
        except StaleLeaseError:
            return  # another worker took it over meanwhile: its outcome is that worker's
        except Exception:
            # The database itself is failing: the deadline reaper is the backstop then.
            log.exception("execution_fail_on_error_failed", exec_id=str(record.id))
            return
        log.warning(
            "execution_failed_on_error",
            exec_id=str(record.id),
            error_class=_error_class(exc),
            ended=ended,
            worker_id=self.worker_id,
            # Not a contract error: a bug, and its traceback is what fixes it.
            exc_info=not isinstance(exc, OpsConductorError),
        )

    async def _execute(
        self,
        record: ExecutionRecord,
        lease_token: UUID | None,
        retry_allowed: bool,
        stop_event: asyncio.Event | None,
        dead_letter: LeasedJob | None = None,
    ) -> RunResult:
        plan = parse_plan(record.plan_snapshot["plan"])
        started = time.monotonic()
        outcome = _Outcome(stop_event=stop_event or asyncio.Event())
        outcome.refused = await self._check_approval(record, background=lease_token is not None)
        if outcome.refused is None:
            outcome.refused = await self._check_tenant_policy(record, plan)
        if outcome.refused is not None:
            outcome.error_class = outcome.refused.reason
            outcome.error_message = outcome.refused.message
        else:
            requests = sorted_requests(
                LockRequest(record.tenant_id, target.ref, step.action)
                for step in plan.steps
                for target in step.targets
            )
            wanted = _WantedLocks(
                requests,
                owner_token=uuid4(),
                ttl=timedelta(milliseconds=record.timeout_ms) + LOCK_TTL_BUFFER,
                plan=plan,
            )
            if self._folds(record, plan, requests):
                # Taken by the first step's start statement (_run_one_step): one round trip less.
                outcome.wanted = wanted
            else:
                await self._take_locks(record, outcome, wanted)
        try:
            if outcome.lock_set is not None or outcome.wanted is not None:
                with self._cancel_signals.watch(record.id) as cancel_event:
                    try:
                        async with asyncio.timeout(record.timeout_ms / 1000):
                            await self._run_steps(
                                record, plan, outcome, cancel_event, started, lease_token
                            )
                    except TimeoutError:
                        outcome.timed_out = True
                        outcome.error_class = ExecutionTimeoutError.reason
                        outcome.error_message = (
                            f"execution exceeded its {record.timeout_policy_id} budget of "
                            f"{record.timeout_ms} ms"
                        )
            final, retried = await self._finish(
                record, outcome, lease_token, retry_allowed, dead_letter
            )
        finally:
            lock_set = outcome.lock_set
            if lock_set is not None and outcome.paused_step and self.approvals is not None:
                # Paused for a step approval: nobody may touch the targets until it resumes.
                await asyncio.shield(self.approvals.hold_locks(lock_set))
            elif lock_set is not None and not outcome.locks_released:
                # Shielded: a cancelled caller must not leave the assets locked.
                await asyncio.shield(self._lifecycle.release_locks(lock_set))
        if outcome.paused_step is not None:
            # Not an outcome (no metrics): the execution resumes once the step is approved.
            log.info(
                "execution_paused_for_approval",
                exec_id=str(record.id),
                step_id=outcome.paused_step,
                worker_id=self.worker_id,
            )
        else:
            reason = "shutdown" if outcome.interrupted else "retry"
            self._log_finished(final, plan, started, reason if retried else None)
        return RunResult(
            record=final,
            retried=retried and not outcome.interrupted,
            interrupted=outcome.interrupted,
            retryable=outcome.retryable,
            timed_out=outcome.timed_out,
            busy=outcome.busy,
            error_class=outcome.error_class,
            error_message=outcome.error_message,
            paused_step=outcome.paused_step,
            refused=outcome.refused,
        )

    def _folds(self, record: ExecutionRecord, plan: Plan, requests: list[LockRequest]) -> bool:
        """Whether the run's locks are taken by its first step's start statement: one key (one
        statement takes it, all or nothing), steps run in order, no step approval gates them,
        and a step is left to run. Any other run takes its locks on their own first."""
        if len(requests) != 1 or can_parallelize(plan):
            return False
        if self.approvals is not None and self.approvals.gates_steps(record):
            return False
        done = {s.step_id for s in record.steps if s.status == StepStatus.SUCCEEDED}
        return any(step.id not in done for step in plan.steps)

    async def _take_locks(
        self, record: ExecutionRecord, outcome: _Outcome, wanted: _WantedLocks
    ) -> None:
        """Take the run's locks on their own, all or nothing (``outcome.busy`` when held)."""
        try:
            outcome.lock_set = await self._lifecycle.acquire_locks(
                wanted.requests,
                owner_token=wanted.owner_token,
                owner_execution_id=record.id,
                ttl=wanted.ttl,
            )
        except ResourceBusyError as exc:
            outcome.busy = exc
            outcome.error_class, outcome.error_message = exc.reason, exc.message
            return
        self._log_started(record, wanted.plan)

    async def _check_approval(
        self, record: ExecutionRecord, *, background: bool
    ) -> OpsConductorError | None:
        """Before the first step: why the execution's approval does not let it run, if so."""
        if record.approval_level == 0:
            return None
        if self.approvals is None:
            return FailedPreconditionError(
                "this worker cannot check approvals", execution_id=str(record.id)
            )
        return await self.approvals.verify(record, background=background)

    async def _check_tenant_policy(
        self, record: ExecutionRecord, plan: Plan
    ) -> TenantPolicyDeniedError | SecretUseDeniedError | None:
        """Before the first step: the refusal (audited) if the tenant's policy forbids a step
        or its secret catalogue a secret use (never trust what the api decided)."""
        try:
            await enforce_secret_uses(
                self._pool,
                self._handlers,
                plan,
                self._secrets.catalogue,
                tier="worker",
                tenant_id=record.tenant_id,
                actor_id=record.actor_id,
                execution_id=record.id,
                resource="worker/run",
            )
            await enforce_tenant_policy(
                self._pool,
                self._handlers,
                plan,
                self.tenant_policies.for_tenant(record.tenant_id),
                tier="worker",
                tenant_id=record.tenant_id,
                actor_id=record.actor_id,
                execution_id=record.id,
                resource="worker/run",
            )
        except (TenantPolicyDeniedError, SecretUseDeniedError) as exc:
            return exc
        return None

    async def _run_steps(
        self,
        record: ExecutionRecord,
        plan: Plan,
        outcome: _Outcome,
        cancel_event: asyncio.Event,
        started: float,
        lease_token: UUID | None,
    ) -> None:
        done = {s.step_id for s in record.steps if s.status == StepStatus.SUCCEEDED}
        todo = [step for step in plan.steps if step.id not in done]
        gated = self.approvals is not None and self.approvals.gates_steps(record)
        if can_parallelize(plan) and not gated:
            slots = asyncio.Semaphore(MAX_PARALLEL_STEPS)

            async def run_one(step: Step) -> None:
                async with slots:
                    await self._run_one(record, step, outcome, cancel_event, started, lease_token)

            await asyncio.gather(*(run_one(step) for step in todo))
            return
        for step in todo:
            last = step is todo[-1]
            await self._run_one(record, step, outcome, cancel_event, started, lease_token, last)
            if outcome.stopped:
                return

    async def _run_one(
        self,
        record: ExecutionRecord,
        step: Step,
        outcome: _Outcome,
        cancel_event: asyncio.Event,
        started: float,
        lease_token: UUID | None,
        last: bool = False,
    ) -> None:
        # One span per step (a no-op unless tracing is configured: docs/observability.md).
        with tracer().start_as_current_span(
            f"step {step.id}",
            attributes={"opsc.step_id": step.id, "opsc.action": step.action},
        ):
            await self._run_one_step(
                record, step, outcome, cancel_event, started, lease_token, last
            )

    async def _run_one_step(
        self,
        record: ExecutionRecord,
        step: Step,
        outcome: _Outcome,
        cancel_event: asyncio.Event,
        started: float,
        lease_token: UUID | None,
        last: bool,
    ) -> None:
        if outcome.stopped:
            return
        wanted, outcome.wanted = outcome.wanted, None
        if wanted is not None and (outcome.stop_event.is_set() or cancel_event.is_set()):
            # Stopping before the first step: the locks first, on their own, as when they do
            # not fold, so a busy target still decides how the run ends.
            await self._take_locks(record, outcome, wanted)
            if outcome.busy is not None:
                return
            wanted = None
        if outcome.stop_event.is_set():
            outcome.interrupted = True
            return
        if cancel_event.is_set():
            outcome.cancelled = True
            return
        gated = (
            self.approvals is not None
            and self.approvals.gates_steps(record)
            and lease_token is not None
        )
        if gated:
            if await self._lifecycle.cancel_requested(record.id):
                outcome.cancelled = True
                return
            if self.approvals is not None and not await self.approvals.step_approved(
                record, step.id
            ):
                outcome.paused_step = step.id
                return
            outcome.steps[step.id] = await self._lifecycle.start_step(
                record.id, step.id, worker_id=self.worker_id, lease_token=lease_token
            )
        elif wanted is not None:
            # The run's lock, the cancellation check and the start in one statement.
            try:
                outcome.lock_set, begun = await self._lifecycle.lock_and_start_step(
                    record.id,
                    step.id,
                    worker_id=self.worker_id,
                    lease_token=lease_token,
                    lock=wanted.requests[0],
                    owner_token=wanted.owner_token,
                    ttl=wanted.ttl,
                )
            except ResourceBusyError as exc:
                outcome.busy = exc
                outcome.error_class, outcome.error_message = exc.reason, exc.message
                return
            self._log_started(record, wanted.plan)
            if begun is None:
                outcome.cancelled = True
                return
            outcome.steps[step.id] = begun
        else:
            # The cancellation check and the start in one statement.
            begun = await self._lifecycle.start_step_unless_cancelled(
                record.id, step.id, worker_id=self.worker_id, lease_token=lease_token
            )
            if begun is None:
                outcome.cancelled = True
                return
            outcome.steps[step.id] = begun
        step_started = time.monotonic()
        policy = self._policy(record)
        remaining = record.timeout_ms / 1000 - (time.monotonic() - started)
        step_budget = remaining if policy is None else min(policy.step_timeout_ms / 1000, remaining)
        status, result, error_class, error_message = await self._call_handler(
            record, step, cancel_event, step_budget
        )
        if last and status is StepStatus.SUCCEEDED and not cancel_event.is_set():
            # Written with the execution's end, in one statement (_finish), unless the run
            # ends otherwise after all (then _finish writes it first, as below).
            outcome.deferred = (step.id, result)
            outcome.steps[step.id] = replace(outcome.steps[step.id], status=status)
        else:
            outcome.steps[step.id] = await self._lifecycle.finish_step(
                record.id,
                step.id,
                status=status,
                result=result,
                error_class=error_class,
                error_message=error_message,
                lease_token=lease_token,
            )
        step_s = time.monotonic() - step_started
        metrics.STEP_DURATION.labels(step.action, record.sla_class, status.value).observe(step_s)
        # The execution's §7.2 fields are bound (bind_execution); the step's own are step_*.
        log.info(
            "step_finished",
            step_id=step.id,
            step_action=step.action,
            step_status=status.value,
            step_error_class=error_class,
            step_duration_ms=int(step_s * 1000),
        )
        if error_class == ExecutionTimeoutError.reason:
            # The step used up the policy's budget: the execution times out.
            outcome.timed_out = True
            outcome.error_class, outcome.error_message = error_class, error_message
        elif status is StepStatus.FAILED and not outcome.failed_step:
            outcome.failed_step = step.id
            outcome.error_class, outcome.error_message = error_class, error_message
        elif cancel_event.is_set():
            outcome.cancelled = True

    async def _call_handler(
        self,
        record: ExecutionRecord,
        step: Step,
        cancel_event: asyncio.Event,
        budget_s: float,
    ) -> tuple[StepStatus, dict[str, Any] | None, str | None, str | None]:
        """Run one step's handler; map its outcome to (status, result, error class, message)."""
        if record.record_only:
            # The dark launch (docs/rollout.md): the step is recorded, no handler is called and
            # no secret is resolved, whatever the handler would do with the flag. The result
            # says what would have been called, secrets as their references.
            would_run = record_only_result(
                {
                    "action": step.action,
                    "targets": [t.ref for t in step.targets],
                    "params": step.params,
                }
            )
            return StepStatus.SUCCEEDED, would_run.to_dict(), None, None
        values: list[str] = []
        try:
            handler = self._handlers.get(step.action)
            params, values = self._secrets.resolve_params(
                step.params, step_secret_use(self._handlers, step, record.tenant_id)
            )
            context = ActionContext(
                execution_id=str(record.id),
                step_id=step.id,
                idempotency_key=f"{record.id}:{step.id}",
                tenant_id=record.tenant_id,
                targets=tuple(t.ref for t in step.targets),
                params=params,
                timeout_s=max(budget_s, 0.0),
                record_only=record.record_only,
                cancel_event=cancel_event,
                tenant_policy=self.tenant_policies.for_tenant(record.tenant_id),
                request_id=record.request_id
                or structlog.contextvars.get_contextvars().get("request_id"),
                # The step's span is current here (_run_one).
                traceparent=current_traceparent(),
            )
            async with asyncio.timeout(max(budget_s, 0.0)):
                result: ActionResult = await handler.run(context)
        except ActionFailedError as exc:
            output = exc.output.to_dict() if exc.output is not None else None
            if isinstance(exc, ActionTimeoutError) and exc.details.get("budget_exhausted"):
                # The handler stopped itself because the policy's budget ran out.
                return StepStatus.FAILED, output, ExecutionTimeoutError.reason, exc.message
            return StepStatus.FAILED, output, exc.reason, exc.message
        except TimeoutError:
            return (
                StepStatus.FAILED,
                None,
                ExecutionTimeoutError.reason,
                f"step {step.id} exceeded the {record.timeout_policy_id} step budget",
            )
        except OpsConductorError as exc:
            return StepStatus.FAILED, None, exc.reason, exc.message
        except Exception as exc:
            # A handler bug: record it, masked, and fail the step rather than the worker.
            log.exception("action_crashed", execution_id=str(record.id), step_id=step.id)
            return StepStatus.FAILED, None, type(exc).__name__, mask_text(str(exc))[:1000]
        finally:
            # Registered by resolve_params; results and errors were masked on construction.
            default_masker().unregister_secrets(values)
        return StepStatus.SUCCEEDED, result.to_dict(), None, None

    async def _finish(
        self,
        record: ExecutionRecord,
        outcome: _Outcome,
        lease_token: UUID | None,
        retry_allowed: bool,
        dead_letter: LeasedJob | None = None,
    ) -> tuple[ExecutionRecord, bool]:
        """Record the end of a run: terminal, or back to the queue for a retry."""
        merge = (
            outcome.deferred is not None
            and not outcome.stopped
            and outcome.busy is None
            and outcome.refused is None
        )
        if outcome.deferred is not None and not merge:
            await self._write_deferred(record, outcome, lease_token)
        known = {s.step_id: s for s in record.steps} | outcome.steps
        steps = tuple(sorted(known.values(), key=lambda s: s.position))
        settled = len(known) == len(record.plan_snapshot["plan"]["steps"]) and all(
            s.status not in _SKIPPABLE and s.status != StepStatus.RUNNING for s in steps
        )
        if not settled and outcome.deferred is not None:
            await self._write_deferred(record, outcome, lease_token)
            merge = False
        if not settled:
            # A step still marked running was cut off by the execution timeout.
            steps = await self._lifecycle.load_steps(record.id)
        changed = False
        for step in steps:
            if step.status == StepStatus.RUNNING:
                changed = True
                await self._lifecycle.finish_step(
                    record.id,
                    step.step_id,
                    status=StepStatus.FAILED,
                    error_class=ExecutionTimeoutError.reason,
                    error_message="stopped: the execution's time budget ran out",
                    lease_token=lease_token,
                )
        if outcome.paused_step is not None:
            # Still running: the consumer gives the job up and opens the step's request.
            return await self._lifecycle.get(record.tenant_id, record.id), False
        if outcome.interrupted and lease_token is not None:
            requeued = await self._lifecycle.requeue(
                record.id, lease_token=lease_token, by=self.worker_id, reason="shutdown"
            )
            return requeued, True
        if retry_allowed and outcome.retryable and lease_token is not None:
            requeued = await self._lifecycle.requeue(
                record.id,
                lease_token=lease_token,
                by=self.worker_id,
                reason="retry",
                error_class=outcome.error_class,
                error_message=outcome.error_message,
            )
            return requeued, True
        reason = "timed_out" if outcome.timed_out else "cancelled" if outcome.cancelled else None
        if any(s.status in _SKIPPABLE for s in steps):
            changed = True
            await self._lifecycle.skip_remaining_steps(
                record.id, lease_token=lease_token, reason=reason or "failed"
            )
        if changed:
            steps = await self._lifecycle.load_steps(record.id)
        summary = {
            "steps": {s.step_id: str(s.status) for s in steps},
            "counts": {
                status.value: sum(1 for s in steps if s.status == status)
                for status in (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED)
            },
        }
        fields: dict[str, Any] = {"result_summary": summary}
        if outcome.timed_out:
            target = ExecutionStatus.FAILED
            fields |= {"timed_out": True}
        elif outcome.cancelled:
            target = ExecutionStatus.CANCELLED
        elif outcome.failed_step or outcome.busy is not None or outcome.refused is not None:
            target = ExecutionStatus.FAILED
        else:
            target = ExecutionStatus.SUCCEEDED
        if target is ExecutionStatus.FAILED:
            fields |= {"error_class": outcome.error_class, "error_message": outcome.error_message}
        exhausted = dead_letter is not None and lease_token is not None and outcome.retryable
        if merge and target is ExecutionStatus.SUCCEEDED and outcome.deferred is not None:
            step_id, result = outcome.deferred
            both = await self._lifecycle.finish_last_step(
                record.id,
                step_id,
                result=result,
                by=self.worker_id,
                lease_token=lease_token,
                fields=fields,
                tenant_id=record.tenant_id,
            )
            if both is not None:
                outcome.deferred = None
                outcome.locks_released = True
                final, written = both
                return replace(
                    final,
                    steps=tuple(written if s.step_id == step_id else s for s in steps),
                ), False
        if outcome.deferred is not None:
            # Refused as one statement: written one by one, each saying why it cannot be.
            await self._write_deferred(record, outcome, lease_token)

        final = await self._lifecycle.end_run(
            record.id,
            to=target,
            by=self.worker_id,
            lease_token=lease_token,
            fields=fields,
            tenant_id=record.tenant_id,
            dead_letter=(
                DeadLetter(dead_letter, outcome.error_class, outcome.error_message)
                if exhausted and dead_letter is not None
                else None
            ),
        )
        outcome.locks_released = True
        # The transition returns the row as written; the steps were just read and nothing writes
        # them once the execution is terminal.
        return replace(final, steps=steps), False

    async def _write_deferred(
        self, record: ExecutionRecord, outcome: _Outcome, lease_token: UUID | None
    ) -> None:
        """Write the last step's success on its own (the run does not end succeeded)."""
        if outcome.deferred is None:
            return
        step_id, result = outcome.deferred
        outcome.deferred = None
        outcome.steps[step_id] = await self._lifecycle.finish_step(
            record.id,
            step_id,
            status=StepStatus.SUCCEEDED,
            result=result,
            lease_token=lease_token,
        )

    def _log_started(self, record: ExecutionRecord, plan: Plan) -> None:
        log.info("execution_started", **self._log_fields(record, plan))

    def _log_finished(
        self, record: ExecutionRecord, plan: Plan, started: float, requeued: str | None
    ) -> None:
        fields = self._log_fields(record, plan)
        fields["duration_ms"] = int((time.monotonic() - started) * 1000)
        if requeued is not None:
            log.info("execution_requeued", reason=requeued, **fields)
            return
        # Outcome metrics are counted by the terminal transition (common.execution_metrics).
        log.info("execution_finished", **fields)

    def _log_fields(self, record: ExecutionRecord, plan: Plan) -> dict[str, Any]:
        """The fields spec §7.2 requires on every execution log line."""
        bound = structlog.contextvars.get_contextvars()
        return {
            "request_id": record.request_id or bound.get("request_id"),
            "plan_hash": record.plan_hash,
            "exec_id": str(record.id),
            "actor_id": record.actor_id,
            "tenant_id": record.tenant_id,
            "action": ",".join(plan.actions),
            "targets": list(plan.target_refs),
            "approval_level": record.approval_level,
            "timing": {
                "created_at": record.created_at.isoformat(),
                "started_at": record.started_at.isoformat() if record.started_at else None,
                "ended_at": record.ended_at.isoformat() if record.ended_at else None,
            },
            "status": str(record.status),
            "error_class": record.error_class,
            "duration_ms": record.duration_ms,
            "retries_total": max(record.attempts - 1, 0),
            "queue_wait_ms": bound.get("queue_wait_ms"),
            "worker_id": self.worker_id,
            "lease_renewals": record.lease_renewals,
            "cancel_checks_performed": record.cancel_checks_performed,
            "execution_mode": record.execution_mode,
            "sla_class": record.sla_class,
            "timeout_policy_id": record.timeout_policy_id,
        }
