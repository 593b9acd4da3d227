"""``conveyor.metric_labels.Children``: a label set's child is looked up once, and what it counts is what the registry
exports; the gateway's request metrics go through it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from conveyor.metric_labels import Children
from gateway.metrics import GatewayMetrics


def test_a_label_set_is_looked_up_once_and_counts_what_is_exported() -> None:
    registry = CollectorRegistry()
    jobs = Counter("jobs", "Jobs.", ["model", "outcome"], registry=registry)
    labelled = Children()
    assert labelled(jobs, "m", "ok") is labelled(jobs, "m", "ok")
    assert labelled(jobs, "m", "ok") is not labelled(jobs, "m", "error")
    labelled(jobs, "m", "ok").inc()
    labelled(jobs, "m", "ok").inc()
    labelled(jobs, "m", "error").inc()
    assert registry.get_sample_value("jobs_total", {"model": "m", "outcome": "ok"}) == 2
    assert registry.get_sample_value("jobs_total", {"model": "m", "outcome": "error"}) == 1


def test_the_gateways_request_metrics_look_their_children_up_once() -> None:
    metrics = GatewayMetrics()
    metrics.known_models.add("m")
    looked_up = []
    labels_of = metrics.requests.labels
    metrics.requests.labels = lambda *values: looked_up.append(values) or labels_of(*values)  # type: ignore[method-assign]
    for _ in range(3):
        metrics.observe("m", "/v1/embeddings", 200, None, arrived=0.0)
    assert looked_up == [("m", "/v1/embeddings", "200")]
    labels = {"model": "m", "endpoint": "/v1/embeddings"}
    assert metrics.registry.get_sample_value("conveyor_requests_total", labels | {"status": "200"}) == 3
    assert metrics.registry.get_sample_value("conveyor_request_duration_seconds_count", labels) == 3
