"""Gateway metrics, in a registry the app owns (so two apps in one process never collide).

Label values are bounded: a model label is a model this deployment knows (configured, or registered by a worker),
else ``OTHER``; an endpoint label is a route template, else ``OTHER``; a key label is a managed key's name (made by an
admin, never its secret). A client cannot create series.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor.metric_labels import Children

log = logging.getLogger("conveyor.gateway")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: the label value of every model and route the gateway does not know
OTHER = "other"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.labelled = Children()
        #: models that may appear as label values (kept current by the service's gauge refresh)
        self.known_models: set[str] = set()
        r = self.registry
        self.requests = Counter(
            "conveyor_requests", "Requests answered, by HTTP status.", ["model", "endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "conveyor_request_duration_seconds",
            "Time from arrival to the last byte, every outcome.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "conveyor_time_to_first_token_seconds",
            "Streams: arrival to the first chunk.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "conveyor_request_failures", "Failed requests by reason (the error code).", ["model", "reason"], registry=r
        )
        self.queue_depth = Gauge(
            "conveyor_queue_depth", "Jobs waiting or running, read at each scrape.", ["model"], registry=r
        )
        self.live_workers = Gauge("conveyor_live_workers", "Live workers, read at each scrape.", ["model"], registry=r)
        self.open_streams = Gauge("conveyor_open_streams", "Streams being relayed now.", registry=r)
        self.key_refusals = Counter(
            "conveyor_key_rate_limited",
            "Requests refused over a managed API key's limit, by key name and limit (requests, tokens).",
            ["key", "limit"],
            registry=r,
        )
        self.batch_lines = Gauge(
            "conveyor_batch_lines",
            "Lines of the batches not yet finished, by state (pending, completed, failed); read at each scrape.",
            ["model", "state"],
            registry=r,
        )

    def set_batch_progress(self, progress: dict[str, dict[str, int]]) -> None:
        """Every known model's unfinished batch lines (0 when it runs no batch), so the series never vanish."""
        totals: dict[str, dict[str, int]] = {model: {} for model in self.known_models}
        for model, counts in progress.items():
            total = totals.setdefault(self.model_label(model), {})
            for state, lines in counts.items():
                total[state] = total.get(state, 0) + lines
        for label, counts in totals.items():
            for state in ("pending", "completed", "failed"):
                self.batch_lines.labels(label, state).set(counts.get(state, 0))

    def model_label(self, model: str | None) -> str:
        return model if model and model in self.known_models else OTHER

    def observe(self, model: str | None, endpoint: str, status: int, reason: str | None, arrived: float) -> None:
        """One request ended: its status, its failure reason if any, its duration to the last byte. Failures are
        logged here too, once each (the line names the request: see ``conveyor.logs``)."""
        label = self.model_label(model)
        seconds = time.time() - arrived
        self.labelled(self.requests, label, endpoint, str(status)).inc()
        self.labelled(self.duration, label, endpoint).observe(seconds)
        if status >= 400:
            self.labelled(self.failures, label, reason or "unknown").inc()
            level = logging.WARNING if status >= 500 else logging.INFO
            log.log(level, "%s answered %d %s after %.2f s", endpoint, status, reason or "", seconds)
