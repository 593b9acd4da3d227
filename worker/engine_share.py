"""How much of the engine batch lines may hold, so interactive requests never wait long behind them.

An engine step (one forward pass) runs every request the engine holds at its start, and a request that arrives
during a step waits for that step to end: behind 128 batch lines that was ~0.7 s on one CPU core, where a line costs
about as much as a request of its own. So:

- while an interactive request runs, no batch call enters the engine (those inside finish);
- between interactive requests (one ran within the last ``QUIET_SECONDS``), batch lines hold at most
  ``busy_inputs`` inputs of the engine (default 1), in calls of half that: the next interactive request waits for
  one short step at most;
- otherwise batch calls are as large as their chunk.

Measured with MiniLM on one core (``bench/bulk.py``'s layout, a 5,000-line batch, interactive requests back to
back): at 16 inputs an interactive embedding's p50 was 103 ms during the batch (idle 17 ms); at 2, 37 ms; at 1,
28 ms. The batch then ran at 71 lines/s instead of 169: it yields to interactive traffic, and gets all of the engine
back 2 s after the last interactive request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

#: interactive traffic counts as present for this long after its last request ended
QUIET_SECONDS = 2.0

#: the default of ``CONVEYOR_WORKER_BULK_BUSY_INPUTS``
BUSY_INPUTS = 1


class EngineShare:
    def __init__(self, busy_inputs: int) -> None:
        self.busy_inputs = busy_inputs
        self._interactive = 0
        self._last_interactive = float("-inf")
        self._held = 0
        self._released = asyncio.Condition()

    # --- interactive side ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def interactive(self) -> AsyncIterator[None]:
        """Around an interactive request: batch lines wait while it runs and shrink their share for a while after."""
        self._interactive += 1
        try:
            yield
        finally:
            self._interactive -= 1
            self._last_interactive = time.monotonic()
            async with self._released:
                self._released.notify_all()

    def busy(self) -> bool:
        return self._interactive > 0 or time.monotonic() - self._last_interactive < QUIET_SECONDS

    # --- batch side ---------------------------------------------------------------------------------------------

    def call_size(self, remaining: int) -> int:
        """How many of ``remaining`` inputs the next engine call of batch lines may carry."""
        return min(remaining, max(1, self.busy_inputs // 2)) if self.busy() else remaining

    @asynccontextmanager
    async def hold(self, inputs: int) -> AsyncIterator[None]:
        """Around an engine call of batch lines: waits while an interactive request runs, then while recent
        interactive traffic leaves no room for ``inputs`` (a call runs when no batch input is in the engine)."""
        async with self._released:
            await self._released.wait_for(lambda: self._interactive == 0 and (not self.busy() or self._fits(inputs)))
            self._held += inputs
        try:
            yield
        finally:
            async with self._released:
                self._held -= inputs
                self._released.notify_all()

    def _fits(self, inputs: int) -> bool:
        return self._held == 0 or self._held + inputs <= self.busy_inputs
