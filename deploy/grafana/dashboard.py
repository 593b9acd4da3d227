"""The Grafana dashboard, written as data: ``python deploy/grafana/dashboard.py`` rewrites ``dashboards/conveyor.json``.

Every panel has a description and PromQL that the dashboard tier (``tests/prometheus/``) evaluates against a real
Prometheus scraping a running stack. Queries use Grafana's ``$model`` variable and ``$__rate_interval``. The vLLM row
reads the engine's own ``vllm:*`` metrics (the same families vLLM's own dashboard uses), from every worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "conveyor.json"
DATASOURCE = {"type": "prometheus", "uid": "conveyor-prometheus"}
M = 'model=~"$model"'  # the model filter of Conveyor's own metrics
V = 'model_name=~"$model"'  # the same for vLLM's
RATE = "[$__rate_interval]"


def quantiles(metric: str, by: str, where: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, one query each: (expr, legend)."""
    legend = "{{" + by.split(", ")[-1] + "}}"
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{where}}}{RATE})))",
            f"{legend} p{q * 100:g}",
        )
        for q in qs
    ]


# (title, description, unit, [(expr, legend)], kind) per panel, in rows
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], str]]]] = [
    (
        "Overview",
        [
            ("Requests/s", "Requests answered per second, every status.", "reqps",
             [(f"sum(rate(conveyor_requests_total{{{M}}}{RATE}))", "req/s")], "stat"),
            ("Server errors (5xx)", "Share of requests answered 5xx (Conveyor's or the engine's failures), "
             "including streams that failed after their first chunk.", "percentunit",
             [(f'(sum(rate(conveyor_requests_total{{{M}, status=~"5.."}}{RATE})) or vector(0)) / '
               f"clamp_min(sum(rate(conveyor_requests_total{{{M}}}{RATE})), 1e-9)", "5xx")], "stat"),
            ("Client errors (4xx)", "Share of requests refused as the client's fault: bad input, unknown model, "
             "429 back-pressure, and 499 (the client went away).", "percentunit",
             [(f'(sum(rate(conveyor_requests_total{{{M}, status=~"4.."}}{RATE})) or vector(0)) / '
               f"clamp_min(sum(rate(conveyor_requests_total{{{M}}}{RATE})), 1e-9)", "4xx")], "stat"),
            ("p95 latency", "95th percentile from arrival to the last byte (streams included), every outcome.", "s",
             [(f"histogram_quantile(0.95, sum by (le) (rate(conveyor_request_duration_seconds_bucket{{{M}}}{RATE})))",
               "p95")], "stat"),
            ("Queued jobs", "Interactive jobs waiting or running, read from Redis at each scrape.", "short",
             [(f"sum(max by (model) (conveyor_queue_depth{{{M}}}))", "jobs")], "stat"),
            ("Live workers", "Workers with a fresh heartbeat in the registry.", "short",
             [(f"sum(max by (model) (conveyor_live_workers{{{M}}}))", "workers")], "stat"),
            ("Scrape targets down", "Gateways and workers Prometheus found but could not scrape (0 is healthy).",
             "short", [("sum by (job) (1 - up)", "{{job}}")], "stat"),
        ],
    ),
    (
        "Gateway",
        [
            ("Request rate by model and status", "Requests answered per second.", "reqps",
             [(f"sum by (model, status) (rate(conveyor_requests_total{{{M}}}{RATE}))", "{{model}} {{status}}")],
             "timeseries"),
            ("Failures by reason", "Failed requests per second by error code (mid-stream failures included; "
             "client_closed_request is a 499).", "reqps",
             [(f"sum by (model, reason) (rate(conveyor_request_failures_total{{{M}}}{RATE}))",
               "{{model}} {{reason}}")], "timeseries"),
            ("Request latency p50 / p95 / p99", "Arrival to the last byte, every outcome, by model.", "s",
             quantiles("conveyor_request_duration_seconds", "model", M), "timeseries"),
            ("Time to first token p50 / p95 / p99 (streams)", "Arrival at the gateway to the first streamed chunk, "
             "queue wait included.", "s", quantiles("conveyor_time_to_first_token_seconds", "model", M), "timeseries"),
            ("Queue depth", "Interactive jobs waiting or running per model, at each scrape.", "short",
             [(f"max by (model) (conveyor_queue_depth{{{M}}})", "{{model}}")], "timeseries"),
            ("Live workers", "Workers per model with a fresh heartbeat.", "short",
             [(f"max by (model) (conveyor_live_workers{{{M}}})", "{{model}}")], "timeseries"),
            ("Open streams", "Streams being relayed now, per gateway.", "short",
             [("sum by (instance) (conveyor_open_streams)", "{{instance}}")], "timeseries"),
        ],
    ),
    (
        "Queue and workers",
        [
            ("Queue wait p50 / p95 / p99", "From the gateway's enqueue to the start on a worker.", "s",
             quantiles("conveyor_worker_queue_wait_seconds", "model", M), "timeseries"),
            ("Running jobs", "Jobs running on the workers of each model.", "short",
             [(f"sum by (model) (conveyor_worker_running_jobs{{{M}}})", "{{model}}")], "timeseries"),
            ("Job outcomes", "Jobs finished per second on the workers, by outcome.", "ops",
             [(f"sum by (model, outcome) (rate(conveyor_worker_jobs_total{{{M}}}{RATE}))", "{{model}} {{outcome}}")],
             "timeseries"),
            ("Stream migrations", "Streams cut on one worker (killed, drained, its engine dead) that reached another, "
             "per second: resumed where they were cut, or refused (migration off, over its limit, or not continuable "
             "exactly) with a worker_lost error event.", "ops",
             [(f"sum by (model, outcome) (rate(conveyor_worker_migrations_total{{{M}}}{RATE}))",
               "{{model}} {{outcome}}")], "timeseries"),
            ("Job duration p95 by kind", "Time a job ran on a worker (chat, completion, embedding, bulk chunk).", "s",
             quantiles("conveyor_worker_job_duration_seconds", "model, kind", M, (0.95,)), "timeseries"),
            ("Batch progress", "Lines of the batches still running, by state: pending, completed, failed.",
             "short", [(f"sum by (model, state) (conveyor_batch_lines{{{M}}})", "{{model}} {{state}}")],
             "timeseries"),
            ("Batch lines", "Batch (Batches API) lines finished per second, by outcome.", "ops",
             [(f"sum by (model, outcome) (rate(conveyor_worker_bulk_lines_total{{{M}}}{RATE}))",
               "{{model}} {{outcome}}")], "timeseries"),
            ("Batch engine calls", "Engine calls made for batch lines: merged (many lines in one call) or alone.",
             "ops", [(f"sum by (model, merged) (rate(conveyor_worker_bulk_engine_calls_total{{{M}}}{RATE}))",
                      "{{model}} merged={{merged}}")], "timeseries"),
        ],
    ),
    (
        "API keys",
        [
            ("Requests/s by API key", "Requests (and batch lines) answered per second for each managed API key, "
             "by key name.", "reqps",
             [(f"sum by (key) (rate(conveyor_key_requests_total{{{M}}}{RATE}))", "{{key}}")], "timeseries"),
            ("Tokens/s by API key", "Tokens the engines reported per second for each managed API key: prompt, "
             "completion and embedding (the usage `conveyor keys usage` reports per day).", "short",
             [(f"sum by (key, type) (rate(conveyor_key_tokens_total{{{M}}}{RATE}))", "{{key}} {{type}}")],
             "timeseries"),
            ("Rate-limited requests/s by API key", "Requests refused 429 over a key's limits, by key and limit "
             "(requests or tokens per minute).", "reqps",
             [(f"sum by (key, limit) (rate(conveyor_key_rate_limited_total{RATE}))", "{{key}} {{limit}}")],
             "timeseries"),
        ],
    ),
    (
        "Engine (vLLM)",
        [
            ("Engine running / waiting requests", "Requests inside each model's engines: running, and waiting "
             "for a slot (vLLM's scheduler queue).", "short",
             [(f"sum by (model_name) (vllm:num_requests_running{{{V}}})", "{{model_name}} running"),
              (f"sum by (model_name) (vllm:num_requests_waiting{{{V}}})", "{{model_name}} waiting")], "timeseries"),
            ("KV-cache usage", "Share of the KV cache in use (1 = full: new requests wait or running ones are "
             "preempted).", "percentunit",
             [(f"max by (model_name) (vllm:kv_cache_usage_perc{{{V}}})", "{{model_name}}")], "timeseries"),
            ("Tokens/s", "Prompt and generated tokens per second, per model.", "short",
             [(f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{V}}}{RATE}))", "{{model_name}} prompt"),
              (f"sum by (model_name) (rate(vllm:generation_tokens_total{{{V}}}{RATE}))",
               "{{model_name}} generated")], "timeseries"),
            ("Engine time to first token", "vLLM's TTFT (engine arrival to first token).", "s",
             quantiles("vllm:time_to_first_token_seconds", "model_name", V), "timeseries"),
            ("Inter-token latency", "Time between generated tokens (time per output token).", "s",
             quantiles("vllm:inter_token_latency_seconds", "model_name", V), "timeseries"),
            ("Engine end-to-end latency", "vLLM's request latency, engine arrival to finish.", "s",
             quantiles("vllm:e2e_request_latency_seconds", "model_name", V), "timeseries"),
            ("Engine queue time", "Time requests waited in vLLM's scheduler before running.", "s",
             quantiles("vllm:request_queue_time_seconds", "model_name", V), "timeseries"),
            ("Preemptions", "Running requests preempted per second (KV cache pressure).", "ops",
             [(f"sum by (model_name) (rate(vllm:num_preemptions_total{{{V}}}{RATE}))", "{{model_name}}")],
             "timeseries"),
            ("Prefix-cache hit rate", "Share of prompt tokens found in the prefix cache.", "percentunit",
             [(f"sum by (model_name) (rate(vllm:prefix_cache_hits_total{{{V}}}{RATE})) / clamp_min(sum by "
               f"(model_name) (rate(vllm:prefix_cache_queries_total{{{V}}}{RATE})), 1e-9)", "{{model_name}}")],
             "timeseries"),
            ("Prompt length p50 / p95", "Prompt tokens per request.", "short",
             quantiles("vllm:request_prompt_tokens", "model_name", V, (0.5, 0.95)), "timeseries"),
            ("Generation length p50 / p95", "Generated tokens per request.", "short",
             quantiles("vllm:request_generation_tokens", "model_name", V, (0.5, 0.95)), "timeseries"),
            ("Finish reasons", "Finished requests per second by why they stopped (stop, length, abort, ...).", "ops",
             [(f"sum by (model_name, finished_reason) (rate(vllm:request_success_total{{{V}}}{RATE}))",
               "{{model_name}} {{finished_reason}}")], "timeseries"),
        ],
    ),
]  # fmt: skip


def panel(pid: int, title: str, description: str, unit: str, queries: list[tuple[str, str]], kind: str,
          grid: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True,
         "instant": False}
        for i, (expr, legend) in enumerate(queries)
    ]  # fmt: skip
    body: dict[str, Any] = {
        "type": kind, "title": title, "id": pid, "description": description, "datasource": DATASOURCE,
        "gridPos": grid, "targets": targets,
    }  # fmt: skip
    if kind == "stat":
        body["fieldConfig"] = {"defaults": {"unit": unit}, "overrides": []}
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "area", "textMode": "auto",
        }  # fmt: skip
    else:
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        body["fieldConfig"] = {"defaults": {"unit": unit, "custom": custom}, "overrides": []}
        body["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return body


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": len(panels) + 1, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        y += 1
        stats = row_panels[0][4] == "stat"
        width, height = (24 // len(row_panels), 4) if stats else (12, 8)
        for i, (title, description, unit, queries, kind) in enumerate(row_panels):
            x = (i * width) % 24
            if i and x == 0:
                y += height
            grid = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel(len(panels) + 1, title, description, unit, queries, kind, grid))
        y += height
    model_variable = {
        "name": "model", "label": "Model", "type": "query", "datasource": DATASOURCE,
        "query": {"query": "label_values(conveyor_requests_total, model)", "refId": "model"},
        "refresh": 2, "includeAll": True, "multi": True,
        "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
    }  # fmt: skip
    return {
        "uid": "conveyor-overview", "title": "Conveyor",
        "description": "Gateway, queue, worker and vLLM engine metrics of a Conveyor deployment.",
        "tags": ["conveyor", "llm", "vllm"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []}, "links": [], "templating": {"list": [model_variable]}, "panels": panels,
    }  # fmt: skip


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
