"""The contract between the worker and an action handler: context in, bounded result out.

A handler is any object with the `ActionHandler` shape, registered under its ``name`` (built-ins
and plugins alike, see ``registry``). The api calls ``validate`` and ``estimate_ms`` at submit,
with the plan's params as submitted (secret *references*, no I/O allowed); the worker calls
``run`` with an `ActionContext` whose params have this step's secrets resolved.

Every outcome of ``run`` is one of:

* an `ActionResult`: the step succeeded (``output["cancelled"]`` is true when it stopped early
  because the execution was cancelled, ``output["record_only"]`` when it was short-circuited);
* `ActionFailedError` (reason ``ACTION_FAILED``): the action ran and failed (non-2xx, non-zero
  exit...); ``.output`` carries the partial result for the step record;
* `ActionTimeoutError` (reason ``ACTION_TIMEOUT``, also a ``TimeoutError``): it exceeded its time
  limit and was stopped.

Results are what the worker stores in ``execution_steps.result`` (capped at 10 KiB by a CHECK
constraint) and what events carry, so `ActionResult` masks secrets and truncates on
construction: whatever a handler puts in, what comes out is safe to store.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from opsconductor.common.errors import FieldViolation, OpsConductorError
from opsconductor.common.masking import mask, mask_text
from opsconductor.common.plan import ActionClass
from opsconductor.common.tenant_policy import TenantPolicy

__all__ = [
    "MAX_RESULT_BYTES",
    "TRUNCATION_MARKER",
    "ActionContext",
    "ActionError",
    "ActionFailedError",
    "ActionHandler",
    "ActionResult",
    "ActionTimeoutError",
    "decode_output",
    "fit_text",
    "record_only_result",
    "result_size_bytes",
]

#: Size limit of a stored step result (``valid_step_result_size``: ``octet_length(result::text)``).
MAX_RESULT_BYTES = 10 * 1024
#: Appended (or prepended) where text was cut.
TRUNCATION_MARKER = "...[truncated]"


@dataclass(frozen=True)
class ActionContext:
    """Everything a handler gets for one run of one step.

    ``params`` hold this step's secrets resolved (and nothing of other steps): the field is
    left out of ``repr`` so that printing a context never prints a secret. ``idempotency_key``
    (``execution_id:step_id``) is the same on every attempt of the step: pass it on to the
    system acted upon so that a retried or taken-over step is applied once. ``timeout_s`` is the
    step's remaining budget; ``cancel_event`` is set when the execution is cancelled;
    ``tenant_policy`` is what the tenant may do (handlers re-check it: never trust the api).
    """

    execution_id: str
    step_id: str
    idempotency_key: str
    tenant_id: str
    targets: tuple[str, ...]
    params: Mapping[str, Any] = field(repr=False)
    timeout_s: float
    record_only: bool
    cancel_event: asyncio.Event = field(repr=False)
    #: The submitting tenant's policy as this worker loaded it (default: the most restrictive).
    tenant_policy: TenantPolicy = field(default=TenantPolicy(), repr=False)
    #: The request id of the submit (correlation): handlers pass it on (``http``: a header).
    request_id: str | None = None
    #: The W3C ``traceparent`` of this step's span (None without one): handlers pass it on so
    #: the system acted upon joins the execution's trace (``http``: the ``traceparent`` header).
    traceparent: str | None = None


def _jsonable(value: Any) -> Any:
    """A plain JSON copy of ``value`` that Postgres ``jsonb`` accepts.

    NUL characters become U+FFFD (jsonb rejects ``\\u0000``), non-finite floats and unknown
    objects become their ``str``, tuples and sets become lists, keys become strings.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {_jsonable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return _jsonable(str(value))


def result_size_bytes(value: Any) -> int:
    """UTF-8 size of ``value`` as Postgres prints ``jsonb`` (``", "`` and ``": "`` separators).

    That text is what the result CHECK constraint measures, and it is never smaller than the
    canonical (compact) JSON, so a result within this size fits both.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), sort_keys=True)
    return len(text.encode("utf-8"))


def _cut_bytes(text: str, max_bytes: int, *, keep: Literal["head", "tail"]) -> str:
    """At most ``max_bytes`` UTF-8 bytes of ``text`` from one end, cut on a character boundary."""
    data = text.encode("utf-8")
    if max_bytes <= 0:
        return ""
    if keep == "head":
        return data[:max_bytes].decode("utf-8", errors="ignore")
    return data[-max_bytes:].decode("utf-8", errors="ignore")


def fit_text(
    text: str, max_bytes: int, *, keep: Literal["head", "tail"] = "head"
) -> tuple[str, bool]:
    """``text`` masked, then cut to at most ``max_bytes`` UTF-8 bytes; and whether it was cut.

    Masking comes first so that a cut can never leave half a secret behind. A cut is marked
    with `TRUNCATION_MARKER`; ``keep="tail"`` keeps the end (command output, where errors
    are) and marks the start.
    """
    text = mask_text(text)
    if len(text.encode("utf-8")) <= max_bytes:
        return text, False
    room = max_bytes - len(TRUNCATION_MARKER)
    if keep == "head":
        return _cut_bytes(text, room, keep="head") + TRUNCATION_MARKER, True
    return TRUNCATION_MARKER + _cut_bytes(text, room, keep="tail"), True


def decode_output(data: bytes) -> str:
    """Bytes from a process or a socket as storable text (invalid UTF-8 and NUL replaced)."""
    return data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


_Path = tuple[str | int, ...]


def _string_leaves(value: Any, path: _Path = ()) -> Iterator[tuple[_Path, str]]:
    """Every string inside ``value`` (dict values and list items) with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _string_leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _string_leaves(item, (*path, index))


def _set(value: Any, path: _Path, new: Any) -> None:
    for part in path[:-1]:
        value = value[part]
    value[path[-1]] = new


def _water_level(sizes: list[int], needed: int) -> int | None:
    """The largest length L such that cutting every longer string to L (plus the marker)
    saves at least ``needed`` bytes; ``None`` if even cutting them all to nothing would not."""
    marker = len(TRUNCATION_MARKER)

    def saved(level: int) -> int:
        return sum(size - level - marker for size in sizes if size > level + marker)

    if not sizes or saved(0) < needed:
        return None
    low, high = 0, max(sizes)
    while low < high:
        middle = (low + high + 1) // 2
        if saved(middle) >= needed:
            low = middle
        else:
            high = middle - 1
    return low


def _truncate(output: dict[str, Any], limit: int) -> dict[str, Any]:
    """``output`` cut down to ``limit`` bytes, longest strings first, marked ``truncated``.

    Every string longer than a common length is cut to it (so one huge field does not wipe
    out the small ones, and many medium fields are shortened evenly). Sizes are counted in
    UTF-8 bytes, which JSON escaping only enlarges, so one pass suffices.
    """
    if result_size_bytes(output) <= limit:
        return output
    output = {**output, "truncated": True}
    excess = result_size_bytes(output) - limit
    leaves = list(_string_leaves(output))
    level = _water_level([len(text.encode("utf-8")) for _, text in leaves], excess)
    if level is not None:
        for path, text in leaves:
            if len(text.encode("utf-8")) > level + len(TRUNCATION_MARKER):
                _set(output, path, _cut_bytes(text, level, keep="head") + TRUNCATION_MARKER)
        # Always true (each UTF-8 byte cut shrinks the JSON by a byte or more); kept as a net.
        if result_size_bytes(output) <= limit:  # pragma: no branch
            return output
    # Mostly numbers, keys or structure: keep an excerpt of the JSON text instead.
    text = json.dumps(output, ensure_ascii=False, sort_keys=True)
    excerpt = {"truncated": True, "excerpt": ""}
    room = limit - result_size_bytes(excerpt) - len(TRUNCATION_MARKER) - 16
    excerpt["excerpt"] = fit_text(text, room)[0]
    while result_size_bytes(excerpt) > limit:  # JSON escapes made it longer than its bytes
        room -= result_size_bytes(excerpt) - limit
        excerpt["excerpt"] = fit_text(text, room)[0]
    return excerpt


@dataclass(frozen=True)
class ActionResult:
    """The JSON output of a step, safe to store: masked, and at most ``MAX_RESULT_BYTES``.

    Construction normalises ``output`` to plain JSON, masks secrets (registered values,
    denylisted keys, secret-shaped text) and, when still too large, shortens the largest
    strings and sets ``"truncated": true``.
    """

    output: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.output, Mapping):
            raise TypeError("an action result is a JSON object (a mapping)")
        # Mask before truncating: masking changes lengths, and a cut must not halve a secret.
        safe: dict[str, Any] = mask(_jsonable(self.output))
        object.__setattr__(self, "output", _truncate(safe, MAX_RESULT_BYTES))

    @property
    def truncated(self) -> bool:
        """Whether something was cut to fit the size limit."""
        return self.output.get("truncated") is True

    @property
    def cancelled(self) -> bool:
        """Whether the handler stopped early because the execution was cancelled."""
        return self.output.get("cancelled") is True

    @property
    def record_only(self) -> bool:
        """Whether the side effect was skipped because the tenant is in record-only mode."""
        return self.output.get("record_only") is True

    def to_dict(self) -> dict[str, Any]:
        """A copy of the output, for storing or sending."""
        copied: dict[str, Any] = json.loads(json.dumps(self.output))
        return copied


def record_only_result(would_run: Mapping[str, Any]) -> ActionResult:
    """The result of a short-circuited run: what would have been done (no secret values)."""
    return ActionResult({"record_only": True, "would_run": dict(would_run)})


class ActionError(OpsConductorError):
    """The action could not be completed."""

    reason = "ACTION_ERROR"


class ActionFailedError(ActionError):
    """The action failed.

    ``output`` (an `ActionResult`, or ``None``) is what the action produced before failing,
    for the step record. The message is masked: it may quote a remote system's response.
    """

    reason = "ACTION_FAILED"

    def __init__(
        self,
        message: str | None = None,
        *,
        output: Mapping[str, Any] | None = None,
        **details: object,
    ) -> None:
        super().__init__(None if message is None else mask_text(message), **mask(details))
        self.output: ActionResult | None = None if output is None else ActionResult(dict(output))


class ActionTimeoutError(ActionFailedError, TimeoutError):
    """The action did not finish within its time limit and was stopped.

    Details: ``timeout_s`` (the limit applied) and ``budget_exhausted``: true when that limit
    was the step's remaining budget (``ActionContext.timeout_s``: the execution timed out),
    false when it was the action's own, shorter ``timeout_s`` param (the step failed).
    """

    reason = "ACTION_TIMEOUT"


@runtime_checkable
class ActionHandler(Protocol):
    """What an action handler provides (built-ins and ``opsconductor.actions`` plugins).

    Optionally a handler also has ``required_action_class(params) -> ActionClass`` when the
    class a step must declare depends on its params (``http``: GET is read, POST is modify);
    without it ``min_action_class`` applies to every step. ``secret_destination(params) -> str |
    None`` names where the step's secrets go (``http``: the URL, ``shell``: the program), which
    the tenant's secret catalogue must allow; without it a secret needs the action itself
    listed in the catalogue (``actions:``).
    """

    @property
    def name(self) -> str:
        """The action name plans use (``step.action``)."""
        ...

    @property
    def min_action_class(self) -> ActionClass:
        """The lowest risk class a step using this action may declare."""
        ...

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """Expected duration of one step, for the immediate/background decision."""
        ...

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Problems of ``params`` (secret references unresolved); no I/O, no secret lookups."""
        ...

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Perform the action (or, when ``ctx.record_only``, describe it without doing it)."""
        ...
