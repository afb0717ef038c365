"""The runbooks' fenced command blocks, read the way tests run and check them.

``console`` blocks hold commands an operator runs locally: each ``$ `` line (a trailing ``\\``
continues it). ``bash`` blocks act on a cluster (kubectl); they are syntax-checked and their
object names checked against the rendered manifests, never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"

#: The alerts of the observability rules and the runbook each one leads to.
ALERTS = {
    "OpscExecutionTimeoutRateHigh": "execution-stuck",
    "OpscDlqTooLarge": "dlq",
    "OpscLeaseExpirations": "restart-worker",
    "OpscStaleLocksReaped": "stale-lock",
    "OpscRbacViolation": "rbac-violation-burst",
    "OpscServiceDown": "service-down",
    "OpscQueueWaitHigh": "queue-backlog",
}

_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a runbook."""

    runbook: str
    language: str
    line: int  # of the opening fence, 1-based
    text: str

    def commands(self) -> list[str]:
        """The ``$ `` commands of a console block, continuation lines joined."""
        commands: list[str] = []
        pending: str | None = None
        for raw in self.text.splitlines():
            if pending is not None:
                pending += "\n" + raw
            elif raw.startswith("$ "):
                pending = raw[2:]
            else:
                continue  # sample output
            if not pending.endswith("\\"):
                commands.append(pending)
                pending = None
        assert pending is None, f"{self.runbook}:{self.line}: unfinished command"
        return commands


def runbook_names() -> list[str]:
    return sorted(p.stem for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def blocks(name: str) -> list[Block]:
    """Every fenced block of ``docs/runbooks/<name>.md``, in page order."""
    return page_blocks(RUNBOOKS / f"{name}.md")


def page_blocks(path: Path) -> list[Block]:
    """Every fenced block of the Markdown page ``path``, in page order."""
    name = path.stem
    found: list[Block] = []
    language: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if match and language is None:
            language, start, body = match.group(1), number, []
        elif line.strip() == "```" and language is not None:
            found.append(Block(name, language, start, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    assert language is None, f"{name}: unclosed fence at line {start}"
    return found


def console_commands(name: str) -> list[str]:
    return [c for b in blocks(name) if b.language == "console" for c in b.commands()]


def alert_line(name: str) -> str:
    """The ``**Alert:**`` line every runbook opens with."""
    for line in (RUNBOOKS / f"{name}.md").read_text().splitlines():
        if line.startswith("**Alert:**"):
            return line
    raise AssertionError(f"{name}: no **Alert:** line")
