"""Clients of other services the approvals service calls (the worker)."""
