"""Gateway metrics, in a registry the app owns (so two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "conveyor_requests", "Requests answered, by HTTP status.", ["model", "endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "conveyor_request_duration_seconds",
            "Time from arrival to the last byte.",
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
            "conveyor_queue_depth", "Jobs waiting or running (at each admission, and every 5 s).", ["model"], registry=r
        )
        self.live_workers = Gauge(
            "conveyor_live_workers", "Live workers (at each admission, and every 5 s).", ["model"], registry=r
        )
        self.open_streams = Gauge("conveyor_open_streams", "Streams being relayed now.", registry=r)
