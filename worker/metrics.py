"""Worker metrics. One engine per process, so they live in the default registry beside vLLM's own ``vllm:*``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from conveyor.metric_labels import Children

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS = Counter(
    "conveyor_worker_jobs", "Jobs finished, by outcome (ok, error, cancelled, expired).", ["model", "kind", "outcome"]
)
QUEUE_WAIT = Histogram(
    "conveyor_worker_queue_wait_seconds",
    "From enqueue by the gateway to start on this worker.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
JOB_DURATION = Histogram(
    "conveyor_worker_job_duration_seconds",
    "Time a job spent running on this worker.",
    ["model", "kind"],
    buckets=LATENCY_BUCKETS,
)
RUNNING_JOBS = Gauge("conveyor_worker_running_jobs", "Jobs running on this worker now.", ["model"])
ENGINE_RUNNING = Gauge(
    "conveyor_worker_engine_running_requests", "Requests inside this worker's engine now.", ["model"]
)
MIGRATIONS = Counter(
    "conveyor_worker_migrations",
    "Streams cut on another worker that reached this one: resumed where they were cut, or refused (migration off, "
    "over its limit, or not continuable exactly) with an error event.",
    ["model", "outcome"],
)
STREAM_MESSAGES = Counter("conveyor_worker_stream_messages", "Stream messages published.", ["model"])
BULK_LINES = Counter(
    "conveyor_worker_bulk_lines", "Batch lines run on this worker, by outcome (ok, failed).", ["model", "outcome"]
)
BULK_CALLS = Counter(
    "conveyor_worker_bulk_engine_calls",
    "Engine calls made for batch lines: merged (many lines' embedding inputs in one call) or not (one line alone).",
    ["model", "merged"],
)
EMBED_CALL_REQUESTS = Histogram(
    "conveyor_worker_embedding_call_requests",
    "Interactive embedding requests per engine call: concurrent requests with the same parameters share one.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


#: ``labelled(metric, *values)``: the child of that label set (``conveyor.metric_labels``)
labelled = Children()
