"""``conveyor up``'s supervisor: keeps this host's worker processes equal to the fleet's desired state in Redis.

Every ``TICK_SECONDS`` it reads the desired state (``conveyor.fleet``, changed by the gateway's ``/admin/models``) and:

- starts the workers of an added model, and more or fewer when only its replicas changed;
- rolls a changed model: the new workers start beside the old ones, which drain (SIGTERM: finish what they hold,
  hand back the rest) only once every new one serves; if the new ones cannot start, the old ones go on serving;
- drains and stops a removed model's workers, then forgets the model (it answers 404, not 503);
- scales a model with ``min_workers`` below its replicas: up to its replicas as soon as work waits for it (queued
  or running, interactive or bulk), down to ``min_workers`` after ``idle_seconds`` without any; a model that may
  have no worker at all is marked so in Redis (``key_layout.scale_to_zero_key``), and its requests wait in the queue;
- restarts a worker that exited (a crash; exit code 3 is its engine dying or hanging, ``worker.main``) after an
  exponential backoff, and stops restarting a model whose workers exited ``restart_limit`` times within
  ``CRASH_WINDOW_SECONDS``: the model is ``failed``, with its last log lines, and the rest of the fleet goes on;
- writes each model's state (loading, serving, restarting, draining, scaled_to_zero, failed) for ``/admin/models``,
  ``/v1/models`` and ``conveyor status``, and every change of the desired state back to the models file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import SettingsConfigDict
from redis.asyncio import Redis

from conveyor import key_layout, redis_client, registry
from conveyor.contract import JobEnvelope, Reply, StreamFrame
from conveyor.errors import ModelNotFound
from conveyor.fleet import FleetStore, ModelRun, ModelSpec, RunState
from conveyor.redis_client import RedisUrl
from conveyor.redis_settings import RedisSettings
from launcher import models_file, processes
from worker.job_source import Delivery
from worker.key_usage import KeyUsage
from worker.queue_backends import open_source

TICK_SECONDS = 0.5
#: a worker's exits within this long count towards its model's crash-loop limit
CRASH_WINDOW_SECONDS = 600.0
#: the longest wait before a restart
MAX_BACKOFF_SECONDS = 60.0
#: a draining worker (SIGTERM) is killed after this long: its own grace period (25 s) and some
DRAIN_SECONDS = 40.0
#: how long the supervisor's presence key lives without renewal (the admin API refuses changes without it)
PRESENCE_SECONDS = 5
LOG_LINES = 20
#: at most this many requests still queued for a removed model are answered (the queue bound is far below)
WAITING_LIMIT = 100_000
#: the line ``conveyor up`` writes to a worker's log before each start
START_MARK = "--- conveyor up: starting worker"
#: a loading worker is mentioned this often
PROGRESS_SECONDS = 10.0
EXIT_REASONS = {3: "its engine died or hung", -int(signal.SIGKILL): "it was killed (SIGKILL)"}

Say = Callable[[str], None]


class UpSettings(RedisSettings):
    """How ``conveyor up`` restarts what exits (env prefix ``CONVEYOR_UP_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_UP_", extra="ignore")

    #: ``CONVEYOR_REDIS_URL`` (``launcher.up`` reads it); unset, ``conveyor up`` starts its embedded Redis
    redis_url: RedisUrl | None = Field(default=None, validation_alias="CONVEYOR_REDIS_URL")  # type: ignore[assignment]

    #: the first wait before restarting a worker that exited; it doubles with each exit (at most 60 s)
    restart_backoff: float = Field(default=1.0, gt=0)
    #: a model whose workers exit this many times within 10 minutes is marked failed and not restarted again
    restart_limit: int = Field(default=5, ge=1)
    #: a serving worker whose process runs but whose heartbeat has been missing this long is killed and restarted
    hung_seconds: float = Field(default=30.0, gt=0)
    # queue_backend (the fleet's; its workers and gateway read the same variable) comes from RedisSettings


def tail(log: Path, lines: int = LOG_LINES) -> list[str]:
    """The last lines a worker's latest run wrote to its log (each run starts with ``START_MARK``)."""
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    return text[text.rfind(START_MARK) :].splitlines()[1:][-lines:]


def exit_reason(code: int) -> str:
    return EXIT_REASONS.get(code, f"it exited with code {code}")


@dataclass
class Worker:
    """One worker process of a model (a slot: restarted in place when it exits)."""

    model: str
    index: int
    spec: ModelSpec
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: when its loading progress was last shown
    reported_at: float = 0.0
    serving: bool = False
    #: when the supervisor asked it to stop (SIGTERM), or None
    stopping_since: float | None = None
    #: when to start it (again)
    start_at: float = 0.0
    #: since when a serving worker's heartbeat is missing from the registry; whether it was killed for that
    lapsed_since: float | None = None
    hung: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class Model:
    spec: ModelSpec
    workers: list[Worker] = field(default_factory=list)
    #: workers of the spec before a change, serving until the new ones do
    outgoing: list[Worker] = field(default_factory=list)
    exits: deque[float] = field(default_factory=deque)
    restarts: int = 0
    failed: str | None = None
    message: str = ""
    last_log: list[str] = field(default_factory=list)
    removed: bool = False
    #: scaled up to its replicas (a model that keeps fewer while idle: ``ModelSpec.min_workers``)
    active: bool = False
    #: when work last waited for it or ran on it
    busy_at: float = field(default_factory=time.monotonic)

    @property
    def wanted(self) -> int:
        """Workers it should have now."""
        return self.spec.replicas if self.active else self.spec.idle_workers


class Supervisor:
    def __init__(
        self,
        redis: Redis,
        redis_url: str,
        logs: Path,
        models_path: Path,
        say: Say,
        settings: UpSettings,
    ) -> None:
        self.redis = redis
        self.redis_url = redis_url
        self.fleet = FleetStore(redis)
        self.logs = logs
        self.models_path = models_path
        self.say = say
        self.settings = settings
        self.models: dict[str, Model] = {}
        self._written: dict[str, ModelSpec] = {}

    # --- the loop ---------------------------------------------------------------------------------------------

    async def start(self, specs: list[ModelSpec]) -> None:
        """Make ``specs`` (the models file's) the desired state and start their workers. What an earlier run left in
        Redis of models no longer in the file, and without a live worker, is forgotten (they answer 404)."""
        await self.fleet.replace(specs)
        await self.fleet.set_runs({}, gone=(await self.fleet.runs()).keys())
        for name in await registry.known_models(self.redis) - {s.name for s in specs}:
            if not await registry.live_workers(self.redis, name):
                await registry.forget_model(self.redis, name)
        self._written = {s.name: s for s in specs}
        await self.step()

    def settled(self) -> bool:
        return all(m.failed or all(w.serving for w in m.workers) for m in self.models.values())

    async def step(self) -> None:
        await self.redis.set(key_layout.FLEET_SUPERVISOR, os.getpid(), ex=PRESENCE_SECONDS)
        if not await self.fleet.saved():  # Redis restarted empty: the fleet is what was last written to the file
            self.say("Redis lost the fleet's desired state (restarted empty?); restoring it from the models file")
            await self.fleet.replace(list(self._written.values()))
        desired = await self.fleet.specs()
        self._write_back(desired)
        for name, spec in desired.items():
            self._reconcile(name, spec)
        for name, model in self.models.items():
            if name not in desired and not model.removed:
                model.removed = True
                self.say(f"model {name} removed: draining its {len(model.workers)} worker(s)")
                for worker in model.workers + model.outgoing:
                    self._stop(worker)
        now = time.monotonic()
        await self.fleet.allow_zero(m.spec for m in self.models.values() if self._may_be_at_zero(m))
        for name, model in list(self.models.items()):
            await self._scale(name, model, now)
            live = {w.pid for w in await registry.live_workers(self.redis, name)}
            for worker in [*model.workers, *model.outgoing]:
                self._watch(model, worker, live, now)
            self._finish_roll(model)
            if model.removed and not model.workers and not model.outgoing:
                await self._refuse_waiting(name)
                await registry.forget_model(self.redis, name)
                await self.fleet.set_runs({}, gone=[name])
                del self.models[name]  # only now: a Redis error above leaves it for the next round
                self.say(f"model {name} stopped and forgotten (it now answers 404)")
        await self.fleet.set_runs({name: self._run(m) for name, m in self.models.items()})

    # --- desired state ------------------------------------------------------------------------------------------

    def _write_back(self, desired: dict[str, ModelSpec]) -> None:
        if desired == self._written:
            return
        self._written = dict(desired)
        names = ", ".join(sorted(desired)) or "no models"
        try:
            models_file.save(self.models_path, list(desired.values()))
        except OSError as exc:  # the fleet still changes; only a restart would not see it
            self.say(f"fleet changed: {names}; could NOT write {self.models_path} ({exc}): a restart would lose it")
            return
        self.say(f"fleet changed: {names} (written to {self.models_path})")

    def _reconcile(self, name: str, spec: ModelSpec) -> None:
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = Model(spec)
            if not model.wanted:
                self.say(f"model {name}: scaled to zero; its workers start when a request arrives")
                return
            self.say(f"model {name}: starting {model.wanted} worker(s)")
            model.workers = [self._worker(name, i, spec) for i in range(model.wanted)]
            return
        if model.removed:  # added again while its old workers drain: they go on draining, new ones start
            model.removed = False
            model.outgoing += model.workers
            model.workers = []
        elif model.spec == spec:
            return
        model.failed, model.exits, model.message = None, deque(), ""
        if model.workers:  # running: a change (of min_workers, say) does not scale it down before it is idle
            model.active, model.busy_at = True, time.monotonic()
        if model.spec.same_workers(spec):
            before = model.wanted
            model.spec = spec
            self.say(f"model {name}: {before} -> {model.wanted} worker(s)")
            self._resize(name, model, model.wanted)
            return
        current = model.workers + model.outgoing
        # workers already running this spec stay (a change reverted while its roll was unfinished)
        keep = [w for w in current if w.spec.same_workers(spec) and w.process and w.stopping_since is None]
        model.spec = spec
        keep = keep[: model.wanted]
        for worker in current:
            if worker not in keep and not worker.serving:
                self._stop(worker)  # nothing to wait for: a worker still loading or waiting for a restart goes now
        model.outgoing = [w for w in current if w not in keep]  # the serving ones drain once the new ones serve
        first = max([w.index for w in current], default=-1) + 1
        starting = model.wanted - len(keep)
        self.say(f"model {name} changed: starting {starting} new worker(s); the old ones serve until they are up")
        model.workers = keep + [self._worker(name, first + i, spec) for i in range(starting)]

    def _resize(self, name: str, model: Model, count: int) -> None:
        """Start or drain workers of the same spec until it has ``count``. New ones take the lowest slot numbers no
        worker of the model holds (one still draining keeps its own, and its log file); with no worker left, the old
        ones of an unfinished roll drain too (no new one will ever serve to end the roll)."""
        for worker in model.workers[count:]:
            self._stop(worker)
            model.outgoing.append(worker)
        model.workers = model.workers[:count]
        taken = {w.index for w in model.workers + model.outgoing}
        free = (i for i in range(count + len(taken)) if i not in taken)
        model.workers += [self._worker(name, next(free), model.spec) for _ in range(len(model.workers), count)]
        if not model.workers:
            for worker in model.outgoing:
                self._stop(worker)

    async def _scale(self, name: str, model: Model, now: float) -> None:
        """A model that keeps fewer workers while idle: all of its replicas while work waits or runs, its
        ``min_workers`` once it has had none for ``idle_seconds``."""
        if model.removed or model.failed or model.spec.idle_workers >= model.spec.replicas:
            return
        status = await registry.model_status(self.redis, name)
        if status.outstanding:
            model.busy_at = now
            if not model.active:
                model.active = True
                self.say(f"model {name}: {status.outstanding} job(s) waiting; starting {model.wanted} worker(s)")
                self._resize(name, model, model.wanted)
        elif model.active and now - model.busy_at > model.spec.idle_seconds:
            model.active = False
            self.say(f"model {name}: idle for {model.spec.idle_seconds:.0f} s; scaling to {model.wanted} worker(s)")
            self._resize(name, model, model.wanted)

    def _finish_roll(self, model: Model) -> None:
        """Once every new worker serves, the old ones drain."""
        waiting = [w for w in model.outgoing if w.stopping_since is None]
        if waiting and model.workers and all(w.serving for w in model.workers):
            self.say(f"model {model.spec.name}: new workers serving; draining {len(waiting)} old one(s)")
            for worker in waiting:
                self._stop(worker)

    async def _refuse_waiting(self, model: str) -> None:
        """Answer the requests still queued for a removed model (its workers are gone): 404, instead of leaving their
        clients waiting for their deadline. Batch chunks stay on the bulk lane (their batch expires, or the model
        comes back)."""
        source = open_source(
            self.settings.queue_backend, self.redis, model, f"conveyor-up-{os.getpid()}", DRAIN_SECONDS
        )
        refusal = ModelNotFound(f"The model `{model}` was removed before this request ran.", param="model").info()
        for claim in await source.claim(limit=WAITING_LIMIT):
            fields = claim.envelope
            delivery = None
            if fields.get("stream"):  # numbered on from what a worker sent of it before it was cut
                sent = await self.redis.llen(key_layout.progress_key(model, claim.job_id))  # type: ignore[misc]
                channel = key_layout.stream_channel(model, claim.job_id)
                await redis_client.publish(self.redis, channel, StreamFrame.failure(int(sent), refusal).encode())
            elif fields.get("reply_to"):
                reply = Reply(claim.job_id, error=refusal).encode()
                delivery = Delivery(key_layout.inbox_key(str(fields["reply_to"])), reply)
            try:
                usage = KeyUsage.of(JobEnvelope.model_validate(fields), 0)  # its key's place and charge back
            except ValidationError:
                usage = None
            await source.finish(claim.job_id, delivery, usage)

    # --- processes ----------------------------------------------------------------------------------------------

    def _worker(self, model: str, index: int, spec: ModelSpec) -> Worker:
        log = self.logs / f"worker-{model.replace('/', '_')}-{index}.log"
        worker = Worker(model, index, spec, log)
        self._start(worker)
        return worker

    def _start(self, worker: Worker) -> None:
        slots = worker.spec.workers()  # on GPUs each slot has its own GPU
        args, env = slots[worker.index % len(slots)]
        with worker.log.open("ab") as output:
            output.write(f"{START_MARK} {worker.model} #{worker.index}\n".encode())
            output.flush()
            worker.process = processes.spawn(
                processes.conveyor_command("worker", "--model", worker.model, *args),
                {"CONVEYOR_REDIS_URL": self.redis_url, **env},
                output,
            )
        worker.started_at = worker.reported_at = time.monotonic()
        worker.serving = False

    def _stop(self, worker: Worker) -> None:
        """Ask a worker to drain (SIGTERM); ``_watch`` kills it if it takes longer than ``DRAIN_SECONDS``."""
        if worker.stopping_since is None:
            worker.stopping_since = time.monotonic()
            if worker.process is not None and worker.process.poll() is None:
                with processes.no_such_process():
                    os.killpg(worker.process.pid, signal.SIGTERM)

    def _watch(self, model: Model, worker: Worker, live: set[int], now: float) -> None:
        process = worker.process
        if worker.stopping_since is not None:
            self._watch_stopping(model, worker, now)
        elif process is None:
            if not model.failed and now >= worker.start_at:
                self._start(worker)
        elif (code := process.poll()) is not None:
            self._exited(model, worker, code, now)
        elif worker.serving:
            self._watch_heartbeat(worker, process, process.pid in live, now)
        elif process.pid in live:
            worker.serving = True
            self.say(f"worker {worker.model} #{worker.index} is serving ({now - worker.started_at:.0f} s)")
        elif now - worker.reported_at >= PROGRESS_SECONDS:
            worker.reported_at = now
            self.say(
                f"still loading {worker.model} #{worker.index} ({now - worker.started_at:.0f} s; log: {worker.log})"
            )

    def _watch_heartbeat(self, worker: Worker, process: subprocess.Popen[bytes], beating: bool, now: float) -> None:
        """A serving worker whose process runs but whose heartbeat lapsed (the registry declared it dead: its event
        loop is stuck, or it was stopped) is killed after ``hung_seconds``, and restarted like any exit."""
        if beating:
            worker.lapsed_since = None
            return
        worker.lapsed_since = worker.lapsed_since or now
        if now - worker.lapsed_since > self.settings.hung_seconds and not worker.hung:
            worker.hung = True
            self.say(f"worker {worker.model} #{worker.index} runs but stopped heartbeating: killing it (hung)")
            _kill_group(process)

    def _watch_stopping(self, model: Model, worker: Worker, now: float) -> None:
        """A worker asked to drain: gone once it exited (with whatever it left behind), killed if it takes too long."""
        process = worker.process
        if process is None or process.poll() is not None:
            if process is not None:
                _kill_group(process)
            self._forget(model, worker)
        elif now - (worker.stopping_since or now) > DRAIN_SECONDS:
            _kill_group(process)

    def _exited(self, model: Model, worker: Worker, code: int, now: float) -> None:
        """A worker exited on its own: restart it after a backoff, or mark its model failed when it keeps exiting."""
        assert worker.process is not None
        _kill_group(worker.process)  # whatever it started (vLLM's engine core) goes with it
        worker.process, worker.serving = None, False
        model.last_log = tail(worker.log)
        model.exits.append(now)
        while model.exits and now - model.exits[0] > CRASH_WINDOW_SECONDS:
            model.exits.popleft()
        why = "it stopped heartbeating (hung) and was killed" if worker.hung else exit_reason(code)
        worker.hung, worker.lapsed_since = False, None
        if len(model.exits) >= self.settings.restart_limit:
            model.failed = f"worker #{worker.index} exited {len(model.exits)} times in a row; last: {why}"
            self.say(f"model {worker.model} FAILED: {model.failed}; not restarting it. Last log lines:")
            for line in model.last_log:
                self.say(f"  {line}")
            return
        delay = min(self.settings.restart_backoff * 2 ** (len(model.exits) - 1), MAX_BACKOFF_SECONDS)
        worker.start_at = now + delay
        model.restarts += 1
        model.message = f"worker #{worker.index}: {why}; restarting in {delay:.0f} s (restart {model.restarts})"
        self.say(f"worker {worker.model} #{worker.index}: {why}; restarting in {delay:.1f} s")

    def _forget(self, model: Model, worker: Worker) -> None:
        if worker in model.workers:
            model.workers.remove(worker)
        if worker in model.outgoing:
            model.outgoing.remove(worker)

    # --- state --------------------------------------------------------------------------------------------------

    @staticmethod
    def _may_be_at_zero(model: Model) -> bool:
        return model.spec.idle_workers == 0 and not model.removed and not model.failed

    def _run(self, model: Model) -> ModelRun:
        serving = sum(w.serving for w in model.workers + model.outgoing)
        state: RunState
        if model.removed:
            state, message = "draining", "removed: its workers are draining"
        elif model.failed:
            state, message = "failed", model.failed
        elif not model.workers and not model.wanted:
            state, message = "scaled_to_zero", "no workers: they start when a request arrives"
        elif any(w.process is None for w in model.workers):
            state, message = "restarting", model.message
        elif all(w.serving for w in model.workers):
            state, message = "serving", ""
        else:
            elapsed = time.monotonic() - min((w.started_at for w in model.workers if not w.serving), default=0)
            ready = sum(w.serving for w in model.workers)
            state, message = "loading", f"{ready}/{len(model.workers)} new worker(s) serving after {elapsed:.0f} s"
        return ModelRun(
            state=state,
            replicas=model.spec.replicas,
            serving=serving,
            restarts=model.restarts,
            message=message,
            last_log=model.last_log,
        )

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every worker process still running (for the final stop)."""
        found = [w.process for m in self.models.values() for w in m.workers + m.outgoing]
        return [p for p in found if p is not None]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with processes.no_such_process():
        os.killpg(process.pid, signal.SIGKILL)
