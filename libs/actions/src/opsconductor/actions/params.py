"""Reading a handler's params: typed values out, every problem collected as a field violation.

Handlers parse their params twice with the same code: at submit (``validate``: secret
references still in place, only the violations matter) and at run (resolved params: the values
matter). `ParamReader` serves both; a field that may hold a secret accepts a reference at
submit and the resolved string at run, and `require_text` refuses a reference that reached a
handler unresolved. Descriptions never quote a value: it might be a secret pasted in the wrong
place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.common.secrets import is_secret_ref

__all__ = ["ParamReader", "require_text"]

_MISSING = object()


def require_text(value: str | Mapping[str, Any], field: str) -> str:
    """``value`` as text; a secret reference here means the worker did not resolve it."""
    if isinstance(value, str):
        return value
    raise PlanValidationError.for_field(field, "secret reference was not resolved before the run")


class ParamReader:
    """Typed access to one step's params that records violations instead of raising.

    Unknown keys are violations (they are usually typos of an optional key, silently ignored
    otherwise). Each getter returns the value, or the default when the key is absent or wrong.
    """

    def __init__(
        self, params: Mapping[str, Any], *, allowed: Iterable[str], path: str = "params"
    ) -> None:
        self.params = params
        self.path = path
        self.violations: list[FieldViolation] = []
        known = set(allowed)
        for key in params:
            if key not in known:
                self.add(str(key), f"is not a parameter of this action (known: {sorted(known)})")

    def field(self, key: str) -> str:
        """The field path of ``key``."""
        return f"{self.path}.{key}"

    def add(self, key: str, description: str) -> None:
        """Record a violation of ``key`` (a sub-path such as ``headers.X`` is fine)."""
        self.violations.append(FieldViolation(self.field(key), description))

    def raise_if_invalid(self) -> None:
        """Raise `PlanValidationError` listing every violation found so far, if any."""
        if self.violations:
            raise PlanValidationError(violations=self.violations)

    def _get(self, key: str, required: bool) -> Any:
        value = self.params.get(key, _MISSING)
        if value is _MISSING and required:
            self.add(key, "is required")
        return value

    def number(
        self,
        key: str,
        *,
        default: float | None = None,
        minimum: float,
        maximum: float,
        required: bool = False,
        exclusive_minimum: bool = False,
    ) -> float | None:
        """A finite number within bounds."""
        value = self._get(key, required)
        if value is _MISSING:
            return default
        low = "more than" if exclusive_minimum else "at least"
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > minimum if exclusive_minimum else value >= minimum)
            and value <= maximum
        )
        if not ok:
            self.add(key, f"must be a number {low} {minimum:g} and at most {maximum:g}")
            return default
        return float(value)

    def integer(self, key: str, *, default: int, minimum: int, maximum: int) -> int:
        """An integer within bounds."""
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            self.add(key, f"must be an integer from {minimum} to {maximum}")
            return default
        return value

    def boolean(self, key: str, *, default: bool) -> bool:
        """A boolean."""
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.add(key, "must be true or false")
            return default
        return value

    def text(
        self,
        key: str,
        *,
        required: bool = False,
        max_length: int = 4096,
        secret_ok: bool = False,
    ) -> str | Mapping[str, Any] | None:
        """A string, or (``secret_ok``) a secret reference; ``None`` when absent or wrong."""
        value = self._get(key, required)
        if value is _MISSING:
            return None
        return self.text_value(value, key, max_length=max_length, secret_ok=secret_ok)

    def text_value(
        self, value: Any, key: str, *, max_length: int = 4096, secret_ok: bool = False
    ) -> str | Mapping[str, Any] | None:
        """Check one value found under ``key`` as in `text`."""
        if secret_ok and is_secret_ref(value):
            return value
        if not isinstance(value, str) or len(value) > max_length:
            extra = " or a secret reference" if secret_ok else ""
            self.add(key, f"must be a string of at most {max_length} characters{extra}")
            return None
        return value

    def mapping(self, key: str) -> Mapping[str, Any]:
        """A JSON object (empty when absent or wrong)."""
        value = self._get(key, False)
        if value is _MISSING:
            return {}
        if not isinstance(value, Mapping) or is_secret_ref(value):
            self.add(key, "must be an object")
            return {}
        return value

    def string_list(
        self, key: str, *, required: bool = False, max_items: int, max_length: int = 4096
    ) -> list[str] | None:
        """A list of strings (secret references are refused: lists are shown in summaries)."""
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, list) or len(value) > max_items:
            self.add(key, f"must be a list of at most {max_items} strings")
            return None
        items: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or len(item) > max_length:
                self.add(f"{key}[{index}]", f"must be a string of at most {max_length} characters")
            else:
                items.append(item)
        return items if len(items) == len(value) else None
