"""Prometheus children looked up once per label set.

prometheus-client's own ``labels()`` takes a lock and checks and joins the values into a key on every call, and the
serving paths call it on every request: two or three times in the gateway (and once a stream for its first token),
five times in the worker per job (and once a published chunk). A gateway request's two usual look-ups cost 2.3 us
through ``labels()`` and 0.6 us here (200,000 rounds). Their label values are few and bounded (models, routes,
statuses, job kinds and outcomes), so the children are kept. No label set is ever removed from these metrics, so a
kept child is always the exported one.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Children:
    """``metric.labels(*values)`` for any metric, looked up once per label set and kept as long as this object."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], Any] = {}

    def __call__(self, metric: M, *values: str) -> M:
        key = (metric, *values)
        child = self._known.get(key)
        if child is None:
            child = self._known[key] = metric.labels(*values)
        return cast(M, child)
