"""An API key's limits as the client sees them: OpenAI's ``x-ratelimit-*`` headers and the 429s, from what the key's
reservation (``gateway.key_admission``) read of its windows (``conveyor/rate_window.lua``) as it admitted the job."""

from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor.contract import TenantRef
from conveyor.errors import ConveyorError, ModelNotFound, RateLimited, Unauthorized

#: the span of every window, seconds (``SPAN`` in conveyor/rate_window.lua): limits are per minute
WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Window:
    """One window of a key as admission found it, before the job: its limit, what was used, how long until the job
    would fit (0: it fits now) and until the window is empty."""

    unit: str  # requests | tokens
    limit: int
    used: int
    retry_ms: int
    reset_ms: int

    @classmethod
    def parse(cls, unit: str, values: list[int]) -> Window | None:
        limit, used, retry_ms, reset_ms = (int(v) for v in values)
        return None if limit < 0 else cls(unit, limit, used, retry_ms, reset_ms)


#: every header these answers may carry, for a browser to read them (CORS ``Access-Control-Expose-Headers``)
HEADERS = (
    *(f"x-ratelimit-{part}-{unit}" for unit in ("requests", "tokens") for part in ("limit", "remaining", "reset")),
    "Retry-After",
    "retry-after-ms",
)


def duration(ms: int) -> str:
    """A wait as OpenAI writes it in ``x-ratelimit-reset-*``: ``250ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def headers(windows: list[Window], cost: dict[str, int], admitted: bool, now: float, second: int) -> dict[str, str]:
    """``x-ratelimit-limit-*``, ``-remaining-*`` and ``-reset-*`` for each window the key limits, after this job."""
    out: dict[str, str] = {}
    for w in windows:
        used = w.used + (cost[w.unit] if admitted else 0)
        reset = max(w.reset_ms, math.ceil((second + WINDOW_SECONDS - now) * 1000)) if admitted else w.reset_ms
        out[f"x-ratelimit-limit-{w.unit}"] = str(w.limit)
        out[f"x-ratelimit-remaining-{w.unit}"] = str(max(w.limit - used, 0))
        out[f"x-ratelimit-reset-{w.unit}"] = duration(reset)
    return out


def _retry_headers(ms: int) -> dict[str, str]:
    """``Retry-After`` in whole seconds (HTTP), and ``retry-after-ms``, which the openai SDK reads first."""
    return {"Retry-After": str(max(math.ceil(ms / 1000), 1)), "retry-after-ms": str(max(ms, 1))}


UNIT_TITLE = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


def refusal(
    code: int, tenant: TenantRef, model: str, windows: dict[str, Window], cost: dict[str, int], queue_retry: int
) -> ConveyorError:
    """The error of a refused reservation (``gateway.key_admission.KeyAdmission``: 5 to 10)."""
    if code == 5:
        return Unauthorized("This API key has been revoked.", code="invalid_api_key")
    if code == 6:
        return ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
    shown = headers(list(windows.values()), cost, False, 0, 0)  # as they stand: nothing was charged
    if code in (7, 8):
        w = windows["requests" if code == 7 else "tokens"]
        message = (
            f"Rate limit reached for API key {tenant.name!r} on {UNIT_TITLE[w.unit]}: Limit {w.limit}, Used {w.used}, "
            f"Requested {cost[w.unit]}. Please try again in {duration(w.retry_ms)}."
        )
        return RateLimited(message, limit=w.unit, headers=_retry_headers(w.retry_ms) | shown)
    if code == 9:
        w = windows["tokens"]
        message = (
            f"Request too large for API key {tenant.name!r} on {UNIT_TITLE['tokens']}: Limit {w.limit}, Requested "
            f"{cost['tokens']} (estimated). Ask for fewer output tokens (max_tokens) or a shorter input."
        )
        return RateLimited(message, limit="tokens", headers=shown)
    message = f"API key {tenant.name!r} has its limit of queued requests waiting or running; retry when one finishes."
    return RateLimited(message, limit="requests", headers=_retry_headers(queue_retry * 1000) | shown)
