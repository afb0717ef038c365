"""Test-only OpsConductor action plugin (installed editable into the dev venv, never shipped)."""

from __future__ import annotations

from opsc_test_actions.probe import ProbeAction, ProbeOverlapError, read_ledger

__all__ = ["ProbeAction", "ProbeOverlapError", "read_ledger"]
