"""Plans between their JSON form and the ``Plan`` message, defined in the contract package the
client shares (:mod:`opsconductor.contract.plan_codec`); re-exported here for the server code.
"""

from __future__ import annotations

from opsconductor.contract.plan_codec import check_plan_counts, plan_from_proto, plan_to_proto

__all__ = ["check_plan_counts", "plan_from_proto", "plan_to_proto"]
