"""The plan model: what the execution stage is asked to run, validated strictly at the door.

A plan is an ordered list of steps; each step applies one registered action to a set of targets
with JSON parameters. The models are frozen pydantic v2 models matching the ``Plan``/``Step``/
``Target`` messages of ``opsconductor/execution/v1/types.proto``. :func:`parse_plan` turns any
mapping into a :class:`Plan` or raises :class:`PlanValidationError` listing every problem with
its field path (``steps[0].targets[2].ref``) and what to do about it. Descriptions never quote a
parameter value: a value might be a secret pasted where a reference belongs.

Limits (all counts inclusive; lengths in characters, sizes in UTF-8 bytes of canonical JSON):

==========================  ====================================================================
``MAX_STEPS``               1..100 steps per plan, step ids unique within the plan
``MAX_TARGETS_PER_STEP``    1..500 targets per step, refs unique within the step
``MAX_TARGETS_PER_PLAN``    at most 10 000 targets over all steps (counted before anything else)
``IDENTIFIER_PATTERN``      step ids and action names: a letter or digit, then up to 99 of
                            letters, digits, ``_ . -`` (they are part of keys and DB columns)
``MAX_TARGET_REF_LENGTH``   target refs: 1..300 printable characters, no whitespace (part of the
                            lock key ``lock:v1:{tenant}:{ref}:{action}``)
``MAX_TAGS``                32 tags per target; keys match ``TAG_KEY_PATTERN`` (1..63 chars),
                            values 0..256 printable characters
``MAX_NAME_LENGTH``         plan name: 1..200 printable characters, not blank
``MAX_DESCRIPTION_LENGTH``  description: 0..4000 printable characters, newlines and tabs allowed
``MAX_RUNBOOK_URL_LENGTH``  runbook URL: absolute http(s), at most 2000 characters, no
                            credentials (empty string means none)
``MAX_PARAMS_BYTES``        params: a JSON object of at most 64 KiB, nested at most
                            ``MAX_PARAMS_DEPTH`` (16) containers deep, no NUL characters, finite
                            numbers, integers within ±(2^53 - 1) (also when sent as a double)
``MAX_PLAN_BYTES``          the whole plan: at most 512 KiB
==========================  ====================================================================

Unknown fields are rejected everywhere. In params, integral floats (``3.0``) become integers so
a plan hashes the same after a trip through ``google.protobuf.Struct``, which has only doubles.

A secret appears in params only as a reference, a dict that is exactly
``{"$secret": "<provider>:<name>"}`` with provider ``env`` or ``file``; a ``"$secret"`` key next to
anything else, or a malformed reference, is an error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.common.hashing import canonical_json
from opsconductor.contract.plan_limits import MAX_STEPS, MAX_TARGETS_PER_PLAN, MAX_TARGETS_PER_STEP

__all__ = [
    "IDENTIFIER_PATTERN",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_PARAMS_BYTES",
    "MAX_PARAMS_DEPTH",
    "MAX_PLAN_BYTES",
    "MAX_REPORTED_VIOLATIONS",
    "MAX_RUNBOOK_URL_LENGTH",
    "MAX_SAFE_INTEGER",
    "MAX_STEPS",
    "MAX_TAGS",
    "MAX_TAG_KEY_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "MAX_TARGETS_PER_PLAN",
    "MAX_TARGETS_PER_STEP",
    "MAX_TARGET_REF_LENGTH",
    "SECRET_PROVIDERS",
    "SECRET_REF_KEY",
    "TAG_KEY_PATTERN",
    "ActionClass",
    "Plan",
    "SecretRef",
    "SlaClass",
    "Step",
    "Target",
    "format_field_path",
    "iter_secret_refs",
    "parse_plan",
    "parse_secret_ref",
    "to_wire_dict",
]

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MAX_TARGET_REF_LENGTH = 300
MAX_TAGS = 32
MAX_TAG_KEY_LENGTH = 63
MAX_TAG_VALUE_LENGTH = 256
TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$"
MAX_NAME_LENGTH = 200
MAX_DESCRIPTION_LENGTH = 4000
MAX_RUNBOOK_URL_LENGTH = 2000
MAX_PARAMS_BYTES = 64 * 1024
MAX_PARAMS_DEPTH = 16
MAX_PLAN_BYTES = 512 * 1024
#: Largest integer a double (google.protobuf.Struct, JavaScript) represents exactly.
MAX_SAFE_INTEGER = 2**53 - 1
SECRET_REF_KEY = "$secret"  # noqa: S105 - the marker key, not a password
SECRET_PROVIDERS = frozenset({"env", "file"})

# fullmatch, not match: "$" would also accept a trailing newline.
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_TAG_KEY = re.compile(TAG_KEY_PATTERN)
#: Secret names per provider: environment variable names; a file name in the mounted secrets
#: directory (one path segment, so a reference cannot climb out of it).
_SECRET_NAMES = {
    "env": re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}"),
    "file": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}"),
}
_SECRET_REF_SHAPE = '{"$secret": "<provider>:<name>"}'  # noqa: S105 - shown in messages
#: Keys shown as ".key" in field paths; others are quoted (and shortened).
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
#: More violations than this are summarised: they travel in gRPC trailers, which are bounded.
MAX_REPORTED_VIOLATIONS = 20

_Str = Annotated[str, Strict()]
_Path = tuple[str | int, ...]


class ActionClass(StrEnum):
    """Risk class of a step. Ordered by risk: ``read < modify < deploy`` (not alphabetically)."""

    READ = "read"
    MODIFY = "modify"
    DEPLOY = "deploy"

    @property
    def rank(self) -> int:
        """0 for read, 1 for modify, 2 for deploy."""
        return _ACTION_CLASS_RANKS[self.value]

    def _rank_of(self, other: object) -> int:
        # Without this, str comparison would order the classes alphabetically.
        if isinstance(other, str) and other in _ACTION_CLASS_RANKS:
            return _ACTION_CLASS_RANKS[other]
        raise TypeError("an ActionClass compares only with another action class")

    def __lt__(self, other: object) -> bool:
        return self.rank < self._rank_of(other)

    def __le__(self, other: object) -> bool:
        return self.rank <= self._rank_of(other)

    def __gt__(self, other: object) -> bool:
        return self.rank > self._rank_of(other)

    def __ge__(self, other: object) -> bool:
        return self.rank >= self._rank_of(other)


_ACTION_CLASS_RANKS = {"read": 0, "modify": 1, "deploy": 2}


class SlaClass(StrEnum):
    """Time budget of an execution: fast 10 s, medium 30 s, long 10 min."""

    FAST = "fast"
    MEDIUM = "medium"
    LONG = "long"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A reference to a secret, resolved just in time by the worker, e.g. ``env:DB_PASSWORD``."""

    provider: str
    name: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.name}"


def _fail(description: str, *subpath: str | int) -> PydanticCustomError:
    """A validation error; ``subpath`` locates it below the field being validated."""
    return PydanticCustomError(
        "plan_constraint", "{description}", {"description": description, "subpath": subpath}
    )


def parse_secret_ref(value: Mapping[str, Any]) -> SecretRef | None:
    """The reference ``value`` holds, or ``None`` if it has no ``"$secret"`` key.

    Raises ``ValueError`` (whose message never quotes the value) for a malformed reference.
    """
    if SECRET_REF_KEY not in value:
        return None
    if len(value) != 1:
        raise ValueError(f"a secret reference must be exactly {_SECRET_REF_SHAPE}, no other keys")
    ref = value[SECRET_REF_KEY]
    provider, sep, name = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not sep or provider not in _SECRET_NAMES:
        raise ValueError(
            f"a secret reference must be a string '<provider>:<name>' with provider one of "
            f"{', '.join(sorted(SECRET_PROVIDERS))}"
        )
    if not _SECRET_NAMES[provider].fullmatch(name):
        raise ValueError(
            f"invalid secret name for provider {provider!r}: expected "
            f"{_SECRET_NAMES[provider].pattern}"
        )
    return SecretRef(provider, name)


def iter_secret_refs(value: Any) -> Iterator[SecretRef]:
    """Every secret reference inside validated params, depth first, in document order."""
    if isinstance(value, Mapping):
        ref = parse_secret_ref(value)
        if ref is not None:
            yield ref
            return
        for item in value.values():
            yield from iter_secret_refs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_secret_refs(item)


def _check_text(
    value: str,
    *,
    min_length: int,
    max_length: int,
    spaces: bool,
    newlines: bool = False,
) -> str:
    allowed = {" "} if spaces else set()
    if newlines:
        allowed |= {"\n", "\r", "\t"}
    if not (
        min_length <= len(value) <= max_length
        and all(char in allowed or (char.isprintable() and char != " ") for char in value)
    ):
        blanks = "" if spaces else " without whitespace"
        breaks = " (newlines and tabs allowed)" if newlines else ""
        raise _fail(
            f"must be {min_length}..{max_length} printable characters{blanks}{breaks}; "
            f"control, format and NUL characters are not allowed"
        )
    return value


def _check_identifier(value: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise _fail(
            f"{what} must be 1..100 characters of letters, digits, '_', '.' or '-', starting with "
            f"a letter or digit"
        )
    return value


def _normalize_param(value: Any, path: _Path, depth: int) -> Any:
    """Validated copy of one params value; ``depth`` counts enclosing containers."""
    if isinstance(value, Mapping | list | tuple) and depth > MAX_PARAMS_DEPTH:
        raise _fail(f"params must not nest more than {MAX_PARAMS_DEPTH} levels deep", *path)
    if isinstance(value, Mapping):
        try:
            if parse_secret_ref(value) is not None:
                return dict(value)
        except ValueError as exc:
            raise _fail(str(exc), *path) from None
        normalized: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail("object keys must be strings", *path)
            _check_param_text(key, (*path, key), "keys")
            normalized[key] = _normalize_param(item, (*path, key), depth + 1)
        return normalized
    if isinstance(value, list | tuple):
        return [_normalize_param(item, (*path, i), depth + 1) for i, item in enumerate(value)]
    if isinstance(value, str):
        return _check_param_text(value, path, "strings")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise _fail(
                f"integers must be within ±{MAX_SAFE_INTEGER}; pass larger numbers as strings",
                *path,
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail("numbers must be finite (no NaN or infinity)", *path)
        if value.is_integer():
            # Stored as an integer (canonical JSON), so the integer rule applies: a double
            # like 2^60 would otherwise pass here and be refused when the worker re-reads it.
            if abs(value) > MAX_SAFE_INTEGER:
                raise _fail(
                    f"integers must be within ±{MAX_SAFE_INTEGER}; pass larger numbers as strings",
                    *path,
                )
            return int(value)
        return value
    raise _fail(
        f"must be a JSON value (object, array, string, number, boolean or null), "
        f"not {type(value).__name__}",
        *path,
    )


def _check_param_text(value: str, path: _Path, what: str) -> str:
    if "\x00" in value:
        raise _fail(f"{what} must not contain NUL characters", *path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{what} must be valid Unicode (no unpaired surrogates)", *path) from None
    return value


class _Model(BaseModel):
    # hide_input_in_errors: a ValidationError printed or logged never shows submitted values.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class Target(_Model):
    """One asset a step acts on; ``ref`` is part of the lock key, ``tags`` feed approval policy."""

    ref: _Str
    tags: dict[_Str, _Str] = Field(default_factory=dict)

    @field_validator("ref")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        return _check_text(value, min_length=1, max_length=MAX_TARGET_REF_LENGTH, spaces=False)

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_TAGS:
            raise _fail(f"at most {MAX_TAGS} tags per target")
        for key, tag in value.items():
            if not _TAG_KEY.fullmatch(key):
                raise _fail(
                    f"tag keys must be 1..{MAX_TAG_KEY_LENGTH} characters of letters, digits, "
                    f"'_', '.', '/' or '-', starting with a letter or digit",
                    key,
                )
            try:
                _check_text(tag, min_length=0, max_length=MAX_TAG_VALUE_LENGTH, spaces=True)
            except PydanticCustomError:
                raise _fail(
                    f"tag values must be at most {MAX_TAG_VALUE_LENGTH} printable characters",
                    key,
                ) from None
        return value


class Step(_Model):
    """One action applied to a set of targets. ``params`` is a JSON object (see module limits)."""

    id: _Str
    action: _Str
    action_class: ActionClass
    targets: tuple[Target, ...] = Field(min_length=1, max_length=MAX_TARGETS_PER_STEP)
    params: dict[_Str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _check_identifier(value, "step ids")

    @field_validator("action")
    @classmethod
    def _check_action(cls, value: str) -> str:
        return _check_identifier(value, "action names")

    @field_validator("targets")
    @classmethod
    def _check_unique_refs(cls, value: tuple[Target, ...]) -> tuple[Target, ...]:
        first: dict[str, int] = {}
        for index, target in enumerate(value):
            if target.ref in first:
                raise _fail(
                    f"duplicate target ref (also targets[{first[target.ref]}]); list each target "
                    f"once per step",
                    index,
                    "ref",
                )
            first[target.ref] = index
        return value

    @field_validator("params")
    @classmethod
    def _check_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        normalized: dict[str, Any] = _normalize_param(value, (), 1)
        size = len(canonical_json(normalized).encode("utf-8"))
        if size > MAX_PARAMS_BYTES:
            raise _fail(
                f"params are {size} bytes as canonical JSON; the limit is {MAX_PARAMS_BYTES}"
            )
        return normalized


class Plan(_Model):
    """What the execution stage is asked to run: ordered steps, an SLA class, review metadata."""

    name: _Str
    steps: tuple[Step, ...] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("steps", mode="before")
    @classmethod
    def _check_total_targets(cls, value: Any) -> Any:
        # Before the steps are validated: counting is cheap, building 50 000 models is not.
        if isinstance(value, list | tuple):
            total = sum(
                len(targets)
                for step in value
                if isinstance(step, Mapping)
                and isinstance(targets := step.get("targets"), list | tuple)
            )
            if total > MAX_TARGETS_PER_PLAN:
                raise _fail(
                    f"the plan has {total} targets in all; the limit is {MAX_TARGETS_PER_PLAN}"
                )
        return value

    sla_class: SlaClass
    runbook_url: _Str | None = None
    description: _Str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        _check_text(value, min_length=1, max_length=MAX_NAME_LENGTH, spaces=True)
        if not value.strip():
            raise _fail("must not be blank")
        return value

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str) -> str:
        return _check_text(
            value, min_length=0, max_length=MAX_DESCRIPTION_LENGTH, spaces=True, newlines=True
        )

    @field_validator("runbook_url")
    @classmethod
    def _check_runbook_url(cls, value: str | None) -> str | None:
        if not value:  # proto3 sends "" for an unset string: same plan as no URL at all
            return None
        problem = _runbook_url_problem(value)
        if problem:
            raise _fail(problem)
        return value

    @field_validator("steps")
    @classmethod
    def _check_unique_ids(cls, value: tuple[Step, ...]) -> tuple[Step, ...]:
        first: dict[str, int] = {}
        for index, step in enumerate(value):
            if step.id in first:
                raise _fail(
                    f"duplicate step id (also steps[{first[step.id]}]); step ids must be unique "
                    f"within a plan",
                    index,
                    "id",
                )
            first[step.id] = index
        return value

    @model_validator(mode="after")
    def _check_size(self) -> Self:
        size = len(canonical_json(self).encode("utf-8"))
        if size > MAX_PLAN_BYTES:
            raise _fail(
                f"the plan is {size} bytes as canonical JSON; the limit is {MAX_PLAN_BYTES}"
            )
        return self

    @property
    def action_class(self) -> ActionClass:
        """The riskiest action class of any step: what the plan as a whole is."""
        return max(step.action_class for step in self.steps)

    @property
    def target_refs(self) -> tuple[str, ...]:
        """Every target ref of the plan, sorted, each once."""
        return tuple(sorted({target.ref for step in self.steps for target in step.targets}))

    @property
    def actions(self) -> tuple[str, ...]:
        """Every action name of the plan, sorted, each once."""
        return tuple(sorted({step.action for step in self.steps}))


def _runbook_url_problem(value: str) -> str | None:
    shape = f"must be an absolute http(s) URL of at most {MAX_RUNBOOK_URL_LENGTH} characters"
    if len(value) > MAX_RUNBOOK_URL_LENGTH or not all(
        char.isprintable() and char != " " for char in value
    ):
        return f"{shape}, without whitespace or control characters"
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError:
        return shape
    if parts.scheme.lower() not in {"http", "https"} or not hostname:
        return shape
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials (user:password@); link to the runbook page itself"
    return None


def to_wire_dict(plan: Plan) -> dict[str, Any]:
    """The plan's JSON form (the ``Plan`` message's fields); ``parse_plan`` reads it back."""
    return plan.model_dump(mode="json")


def format_field_path(parts: Iterable[str | int]) -> str:
    """``("steps", 0, "targets", 2, "ref")`` -> ``"steps[0].targets[2].ref"``.

    Keys that are not plain names are quoted and shortened, so a path stays readable and short.
    """
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the key itself" of a dict entry
            continue
        elif _PLAIN_KEY.fullmatch(part):
            path += f".{part}" if path else part
        else:
            shown = part if len(part) <= 64 else part[:61] + "..."
            path += f"[{json.dumps(shown)}]"
    return path


_DESCRIPTIONS = {
    "missing": "is required",
    "extra_forbidden": "is not a known field (unknown fields are rejected)",
    "string_type": "must be a string",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}


def _violation(error: ErrorDetails) -> FieldViolation:
    ctx = error.get("ctx") or {}
    loc: list[str | int] = list(error["loc"])
    kind = error["type"]
    if kind == "plan_constraint":
        loc += list(ctx["subpath"])
        description = str(ctx["description"])
    elif kind == "too_short":
        description = f"must have at least {ctx['min_length']} item(s)"
    elif kind == "too_long":
        description = f"must have at most {ctx['max_length']} item(s)"
    elif kind == "enum":
        description = f"must be one of {ctx['expected']}"
    else:
        # pydantic's own messages describe the expected shape and do not quote the input.
        description = _DESCRIPTIONS.get(kind, error["msg"])
    return FieldViolation(format_field_path(loc), description)


def parse_plan(data: Mapping[str, Any]) -> Plan:
    """Validate ``data`` (a plan's JSON form) into a :class:`Plan`.

    Raises :class:`PlanValidationError` with one :class:`FieldViolation` per problem (at most
    ``MAX_REPORTED_VIOLATIONS``, then a summary), e.g. ``steps[0].targets: must have at least
    1 item(s)``. Never quotes submitted parameter values.
    """
    if not isinstance(data, Mapping):
        raise PlanValidationError.for_field("", "the plan must be a JSON object")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        # from None: the pydantic error holds the submitted values, secrets possibly included.
        errors = exc.errors(include_url=False, include_input=False)
        # pydantic counts only the items that validated, so a list whose every item is invalid
        # is also reported "too short": noise next to the real errors inside it.
        inner = {error["loc"][:end] for error in errors for end in range(1, len(error["loc"]))}
        violations = [
            _violation(error)
            for error in errors
            if not (error["type"] == "too_short" and tuple(error["loc"]) in inner)
        ]
        if len(violations) > MAX_REPORTED_VIOLATIONS:
            hidden = len(violations) - MAX_REPORTED_VIOLATIONS
            violations = violations[:MAX_REPORTED_VIOLATIONS]
            violations.append(FieldViolation("", f"{hidden} more problem(s) not shown"))
        raise PlanValidationError(violations=violations) from None
