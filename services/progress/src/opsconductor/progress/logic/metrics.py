"""The progress service's own metrics: who follows events over which transport, what they get,
how late, and who was cut off as too slow.

Every label is the transport (``grpc``, ``grpc_web``, ``sse``, ``websocket``, ``long_poll``,
``other``): bounded, never an execution, tenant or subscriber id. Counted where every transport
passes, the :class:`~opsconductor.progress.logic.subscription.Subscription`.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

#: The audit ``resource`` each transport subscribes with, to its label.
_TRANSPORTS: Final = {
    "ProgressService/StreamEvents": "grpc",
    "grpc-web/StreamEvents": "grpc_web",
    "http/sse": "sse",
    "http/ws": "websocket",
    "http/poll": "long_poll",
}

SUBSCRIBERS: Final = Gauge(
    "opsc_progress_subscribers", "Live event subscriptions, by transport.", ["transport"]
)
EVENTS_DELIVERED: Final = Counter(
    "opsc_progress_events_delivered",
    "Events handed to subscribers (replayed or live), by transport.",
    ["transport"],
)
SLOW_DISCONNECTS: Final = Counter(
    "opsc_progress_slow_subscriber_disconnects",
    "Subscribers cut off because their buffer overflowed (they resume with after_seq).",
    ["transport"],
)
DELIVERY_LAG: Final = Histogram(
    "opsc_progress_delivery_lag_seconds",
    "From an event's commit to its hand-over to a live subscriber (replays not counted).",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def transport_of(resource: str) -> str:
    """The transport label of a subscription's audit ``resource``."""
    return _TRANSPORTS.get(resource, "other")


def _export_zeros() -> None:
    """Every transport's series from the start: an alert's ``increase()`` needs the zero."""
    for transport in (*_TRANSPORTS.values(), "other"):
        for metric in (SUBSCRIBERS, EVENTS_DELIVERED, SLOW_DISCONNECTS, DELIVERY_LAG):
            metric.labels(transport)


_export_zeros()
