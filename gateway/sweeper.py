"""Expired files and the records of old finished batches leave Redis and the file store.

- **One sweeper at a time**, in whichever gateway holds the sweeper's lease (``key_layout.SWEEPER_LEASE``), taken or
  kept every round and lapsing ``LEASE_SECONDS`` after its holder died (two sweeping at once would only delete the
  same things twice).
- **Reads never wait for it**: a file is 404 from the moment its ``expires_at`` passed (``BatchStore.file``); the
  sweep reclaims the space and drops the record.
- **A file's bytes go first, then its record**: a sweeper that dies between leaves a record the next sweep finds
  again, never bytes that nothing points to.
- **The input of a batch still running is kept** (its chunks read their lines from it) and removed by the first sweep
  after that batch finished; the API answers 404 for it meanwhile.
- **A finished batch's record** (hash, chunk bookkeeping, index entries) is purged
  ``GatewaySettings.batch_retention_seconds`` after it reached its final status; its files follow their own expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from conveyor import key_layout
from conveyor.errors import BackendUnavailable, NotFound
from conveyor.filestore import FileStore
from conveyor.outage import Outage
from gateway.batch_store import BatchStore
from gateway.settings import GatewaySettings

log = logging.getLogger("conveyor.gateway")

SWEEP_SECONDS = 5.0
LEASE_SECONDS = 60.0
#: ids read from Redis at a time
PAGE = 100
#: at most this many files, and this many batches, per round: the rest waits for the next round
ROUND_LIMIT = 1000


@dataclass
class Swept:
    files: int = 0
    batches: int = 0


class Sweeper:
    def __init__(self, batches: BatchStore, store: FileStore, settings: GatewaySettings, outage: Outage) -> None:
        self.batches = batches
        self.store = store
        self.settings = settings
        self.outage = outage
        self.holder = f"sweeper-{uuid.uuid4().hex[:12]}"
        self._failures = 0

    async def run_forever(self) -> None:
        try:
            while True:
                delay = await self.round()
                await asyncio.sleep(delay)
        finally:  # stopping: another gateway may take over at once
            with contextlib.suppress(BackendUnavailable):
                await self.batches.release(key_layout.SWEEPER_LEASE, self.holder)

    async def round(self) -> float:
        """Sweep if this gateway holds (or now takes) the lease; returns how long to wait before the next round."""
        try:
            if await self.batches.hold(key_layout.SWEEPER_LEASE, self.holder, LEASE_SECONDS):
                swept = await self.sweep()
                if swept.files or swept.batches:
                    log.info("swept %d expired files and %d old batches", swept.files, swept.batches)
            self.outage.ok()
            self._failures = 0
        except BackendUnavailable as exc:
            return self.outage.failed(exc)
        except Exception:  # a store failure or a bug: logged (not every round); the next round tries again
            self._failures += 1
            if self._failures % 60 == 1:
                log.exception("sweeping expired files and old batches failed (%d times)", self._failures)
        return SWEEP_SECONDS

    async def sweep(self, now: float | None = None) -> Swept:
        """Remove what expired by ``now`` (default: the store's clock)."""
        now = self.batches.clock() if now is None else now
        files = await self._expire_files(now)
        batches = await self._purge_batches(now - self.settings.batch_retention_seconds)
        return Swept(files, batches)

    async def _expire_files(self, now: float) -> int:
        in_use: set[str] | None = None
        removed = kept = 0
        while removed < ROUND_LIMIT:
            ids = await self.batches.expired_files(now, kept, PAGE)
            if in_use is None and ids:
                in_use = await self._inputs_in_use()
            for file_id in ids:
                if in_use is not None and file_id in in_use:
                    kept += 1
                    continue
                stored = await self.batches.stored(file_id)
                if stored is not None:
                    await self.store.delete(stored.store_name)
                await self.batches.forget_file(file_id)
                removed += 1
            if len(ids) < PAGE:
                break
        return removed

    async def _inputs_in_use(self) -> set[str]:
        """Input files of the batches not yet in a final status."""
        used: set[str] = set()
        for batch_id in await self.batches.active():
            with contextlib.suppress(NotFound):  # finished and purged since it was listed
                used.add((await self.batches.batch(batch_id)).input_file_id)
        return used

    async def _purge_batches(self, cutoff: float) -> int:
        purged = 0
        while purged < ROUND_LIMIT:
            ids = await self.batches.finished_before(cutoff, PAGE)
            for batch_id in ids:
                await self.batches.purge_batch(batch_id)
            purged += len(ids)
            if len(ids) < PAGE:
                break
        return purged
