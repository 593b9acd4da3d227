"""Every Redis key, channel and file-store name Conveyor makes (arq's own keys come from arq, in its two seam
modules). Both sides import this module: one place for each name.

A model's keys and channels carry the model as their hash tag (``model_prefix``), so on a Redis Cluster one model's
scripts touch one slot; the control plane's keys share one tag of their own (``CONTROL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

KEY_PREFIX = "conveyor"
#: Prefix of every key of the control plane (API keys and their windows and usage, files, batches, the fleet, the
#: registry's indexes): one hash tag, so the scripts that join them touch one slot of a Redis Cluster. A model's keys
#: carry the model as their tag instead (``model_prefix``).
CONTROL = f"{KEY_PREFIX}:{{{KEY_PREFIX}}}"


# ---- Conveyor's own Redis key names (arq's own keys come from arq, in its two seam modules) -------------------


def queue_name(model: str) -> str:
    """The queue of one model: a sorted set of job ids by fair tag (``conveyor.fair_share``), running ones too."""
    return f"{KEY_PREFIX}:queue:{model}"


def inbox_key(gateway_id: str) -> str:
    """A gateway's reply list: workers push the answers of its non-streamed jobs here, one reader pops them."""
    return f"{KEY_PREFIX}:inbox:{gateway_id}"


# A job's own keys and channel carry its model's tag: the worker's scripts that join them with the model's lanes and
# leases touch one slot.


def abort_key(model: str, request_id: str) -> str:
    """Set (with an expiry) when a client cancels a running job; the worker holding it stops it."""
    return f"{model_prefix(model)}:abort:{request_id}"


def stream_channel(model: str, request_id: str) -> str:
    return f"{model_prefix(model)}:stream:{request_id}"


def progress_key(model: str, request_id: str) -> str:
    """List: one ``StreamProgress`` entry per frame a generation sent; expires after its deadline, removed with it."""
    return f"{model_prefix(model)}:progress:{request_id}"


def migrations_key(model: str, request_id: str) -> str:
    """How many times a generation was continued on another worker (the per-request migration limit)."""
    return f"{model_prefix(model)}:migrations:{request_id}"


def model_workers_key(model: str) -> str:
    """Sorted set: worker id -> unix time until which its last heartbeat keeps it alive."""
    return f"{model_prefix(model)}:workers"


def worker_info_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}"


def model_loading_key(model: str) -> str:
    """Sorted set: worker id -> heartbeat expiry, for workers whose engine is still loading."""
    return f"{model_prefix(model)}:loading"


def model_failure_key(model: str) -> str:
    """The last engine failure of a model's workers (JSON, expires): why it is not serving."""
    return f"{model_prefix(model)}:failed"


def scale_to_zero_key(model: str) -> str:
    """Set (expiring, refreshed) while a model may have no worker at all: a request for it then waits in its queue
    for a worker to start instead of a 503 (``min_workers = 0``, or ``CONVEYOR_GATEWAY_SCALE_TO_ZERO``). Its value
    is the model's capabilities as a JSON list (``[]``: not known, the check is left to the worker)."""
    return f"{model_prefix(model)}:zero"


#: how long a ``scale_to_zero_key`` lives unless refreshed (by ``conveyor up`` or the gateways that allow it)
SCALE_TO_ZERO_TTL_SECONDS = 30


def model_card_key(model: str) -> str:
    """What the workers of a model advertise (capabilities, context length); refreshed with every heartbeat."""
    return f"{model_prefix(model)}:model"


def wake_channel(model: str) -> str:
    """Pub/sub channel the gateway publishes to when a model's queue changes: ``WAKE_JOB``, or ``WAKE_ABORT``
    followed by the id of the job to stop."""
    return f"{model_prefix(model)}:wake"


WAKE_JOB = b"job"
WAKE_ABORT = b"abort:"


MODELS_KEY = f"{CONTROL}:models"  # set of every model name a worker has ever served
GATEWAYS_KEY = f"{CONTROL}:gateways"  # sorted set: each live gateway's scrape address -> heartbeat expiry


def bulk_queue_name(model: str) -> str:
    """A model's bulk lane: batch chunks, taken only when no interactive job waits."""
    return f"{KEY_PREFIX}:bulk:{model}"


#: A lane's fair-share state (``conveyor.fair_share``) is under ``<lane key><FAIR_SUFFIX>``: ``tags`` and ``jobs``
#: (hashes), ``tenant:<key id>`` (sorted sets), on arq ``behind`` (a job given back waits behind the clock:
#: ``worker.arq_source``); in the lane's slot, as the lane's hash tag is kept
FAIR_SUFFIX = ":fair:"


# ---- the Redis Streams queue backend (``CONVEYOR_QUEUE_BACKEND=streams``) --------------------------------------
# Every key of one model's lanes and jobs carries the model as its hash tag (``{model}``), so on Redis Cluster one
# model's queue scripts touch one slot. arq's backend keeps arq's own names (``arq:job:<id>`` ...).


#: the consumer group of a model's workers on each of its lanes
STREAM_GROUP = "workers"


def model_prefix(model: str) -> str:
    """Prefix of every key of one model: the model is its hash tag (``conveyor:{<model>}``)."""
    return f"{KEY_PREFIX}:{{{model}}}"


def stream_lane_key(model: str, bulk: bool = False) -> str:
    """A model's interactive lane (or its bulk lane): a stream of ``id`` entries, one per waiting or running job."""
    return f"{model_prefix(model)}:{'bulk' if bulk else 'queue'}"


#: a stream lane's waiting jobs by fair tag (``conveyor.fair_share``) are a sorted set under ``<lane><this>``: a lane's
#: entries are tokens a job waits with, and the one read goes to the fairest waiting job
STREAM_READY_SUFFIX = ":ready"


def stream_ready_key(lane: str) -> str:
    return lane + STREAM_READY_SUFFIX


#: a stream lane's entries that a fair pick gave to another job than the one their ``id`` names: a hash under
#: ``<lane><this>`` of entry -> job, read when a sweep finds such an entry (its worker died, or handed it back)
STREAM_OWNERS_SUFFIX = ":owners"


def stream_job_prefix(model: str) -> str:
    """Prefix of a job's record: a hash (``data``: the envelope; ``lane`` and ``entry``: where it waits; ``tries``)
    that expires at the job's deadline."""
    return f"{model_prefix(model)}:job:"


def stream_lease_prefix(model: str) -> str:
    """Prefix of a job's lease: the holding worker's id, expiring unless renewed (the fence, as arq's in-progress
    key is for arq)."""
    return f"{model_prefix(model)}:lease:"


# ---- the fleet of one host (``conveyor.fleet``) ------------------------------------------------------------------

FLEET_MODELS = f"{CONTROL}:fleet:models"  # hash: model name -> its ModelSpec (JSON): what ``conveyor up`` runs
FLEET_STATUS = f"{CONTROL}:fleet:status"  # hash: model name -> its ModelRun (JSON), written by ``conveyor up``
FLEET_SUPERVISOR = f"{CONTROL}:fleet:supervisor"  # set (expiring) while a ``conveyor up`` manages the fleet
FLEET_SAVED = f"{CONTROL}:fleet:saved"  # set with the desired state: its absence means Redis lost it


# ---- files and batches ----------------------------------------------------------------------------------------

FILES_INDEX = f"{CONTROL}:files"  # sorted set: file id -> created_at
BATCHES_INDEX = f"{CONTROL}:batches"  # sorted set: batch id -> created_at
ACTIVE_BATCHES = f"{CONTROL}:batches:active"  # set of batches not yet in a final state
FILES_EXPIRING = f"{CONTROL}:files:expiring"  # sorted set: id of a file that expires -> its expires_at
FINISHED_BATCHES = f"{CONTROL}:batches:finished"  # sorted set: batch id -> when it reached a final status
#: the lease of the one gateway at a time that removes expired files and the records of old finished batches
SWEEPER_LEASE = f"{CONTROL}:sweeper"


def file_key(file_id: str) -> str:
    """A file's record (JSON): OpenAI's file object plus where it is stored and what its lines ask for."""
    return f"{CONTROL}:file:{file_id}"


def batch_key(batch_id: str) -> str:
    """A batch's hash: ``record`` (OpenAI's batch object, JSON), ``plan`` (its chunks), ``completed``/``failed``
    (line counts, moved only through ``batch_chunks_key``), ``output_expiry`` (seconds its output and error files
    live, when the batch asked)."""
    return f"{CONTROL}:batch:{batch_id}"


def batch_chunks_key(batch_id: str) -> str:
    """Hash: chunk index -> ``<ok> <failed>`` once that chunk's results are stored; set once per chunk."""
    return f"{CONTROL}:batch:{batch_id}:chunks"


def batch_done_key(batch_id: str) -> str:
    """List where workers report finished chunks (``<index> <ok> <failed>``); the batch driver folds it."""
    return f"{CONTROL}:batch:{batch_id}:done"


def batch_driver_key(batch_id: str) -> str:
    """The lease of the one gateway driving this batch's lifecycle at a time."""
    return f"{CONTROL}:batch:{batch_id}:driver"


def chunk_job_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


def batch_released_key(batch_id: str) -> str:
    """Hash: chunk index -> 1 once the chunk was put on its bulk lane (its tokens charged to its key); set once."""
    return f"{CONTROL}:batch:{batch_id}:released"


# ---- managed API keys (``conveyor.keys``) and their limits ----------------------------------------------------

API_KEYS_INDEX = f"{CONTROL}:apikeys"  # sorted set: key id -> created_at, revoked ones included
API_KEY_HASHES = f"{CONTROL}:apikeys:hashes"  # hash: SHA-256 of an active key's secret -> key id
API_KEY_NAMES = f"{CONTROL}:apikeys:names"  # hash: name of an active key -> key id


def api_key_key(key_id: str) -> str:
    """A key's record (hash): name, limits, allowed models, created and revoked times; never its secret."""
    return f"{CONTROL}:apikey:{key_id}"


def rate_window_key(key_id: str, unit: Literal["requests", "tokens"]) -> str:
    """Hash: unix second -> requests admitted (or tokens charged) in it; the last 60 seconds are the window. Read and
    changed only by the Lua of ``RATE_WINDOW_LUA``."""
    return f"{CONTROL}:rate:{key_id}:{unit}"


#: the functions that read and change a rate window, prepended to every script that does (both sides)
RATE_WINDOW_LUA = (Path(__file__).parent / "rate_window.lua").read_text()


def key_jobs_key(key_id: str) -> str:
    """Sorted set: id of each of a key's interactive jobs not finished yet -> its deadline (the per-key queue bound)."""
    return f"{CONTROL}:apikey:{key_id}:jobs"


def usage_key(key_id: str, day: str) -> str:
    """Hash of one key's usage on one UTC day (``YYYY-MM-DD``): ``<model>|<counter>`` -> count."""
    return f"{CONTROL}:usage:{key_id}:{day}"


# ---- names inside the file store ------------------------------------------------------------------------------


def stored_file_name(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def chunk_part_name(batch_id: str, index: int, kind: Literal["out", "err"]) -> str:
    """One chunk's output or error lines, written whole by the worker that ran it."""
    return f"batches/{batch_id}/{index}.{kind}.jsonl"
