"""A Redis Cluster master failover under load, measured: what clients saw, second by second.

    uv run --frozen --extra cpu python -m bench.cluster_failover [--after 20]

A cluster of three masters with a replica each (``launcher.redis_cluster``, Valkey 9), one gateway, a fake chat
worker and a fake embedding worker on the Streams backend, and the load of the Sentinel fault test
(``tests.faults.failover``: threads sending chat, streamed chat and embeddings one after another through the
official SDK, a 10 s deadline per request). The master holding the chat model's slots is SIGKILLed; the cluster
promotes its replica after the node timeout (``launcher.redis_cluster.NODE_TIMEOUT_MS``). Prints, for each second
from the kill, the outcomes of the requests sent in it by kind, then the totals: printed, not checked
(``tests/faults/test_cluster_failover.py`` checks the README's promise for a failover).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import machine, table
from conveyor import key_layout
from conveyor.contract import QueueBackend
from launcher import redis_cluster
from tests.conftest import BACKEND_VARIABLE, Processes, wait_for
from tests.faults.failover import KINDS, Load, Models, answer

MODELS = Models(chat="failover-chat", embed="failover-embed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--after", type=float, default=20, help="seconds of load after the replica is promoted")
    parser.add_argument("--gateway-log", type=Path, default=None, help="keep the gateway's log in this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = redis_cluster.start(Path(tmp) / "cluster", replicas=1)
        streams = {BACKEND_VARIABLE: QueueBackend.STREAMS.value}
        procs = Processes(cluster.url, files_dir=Path(tmp) / "files", env=streams)
        try:
            gateway = procs.gateway(models=f"{MODELS.chat},{MODELS.embed}", log=args.gateway_log)
            procs.fake_worker(MODELS.chat, "--fake-token-delay", "0.02")
            procs.fake_worker(MODELS.embed, embed=True)
            reference = gateway.client(timeout=30)
            load = Load(gateway, {kind: answer(reference, kind, MODELS) for kind in KINDS}, MODELS)
            try:
                wait_for(lambda: all(load.answered(kind) >= 2 for kind in KINDS), 30, "answers before the kill")
                dead = cluster.node_of(key_layout.model_card_key(MODELS.chat))
                killed = time.monotonic()
                cluster.kill(dead)
                wait_for(lambda: dead not in cluster.masters(), 60, "the replica's promotion")
                promoted = time.monotonic() - killed
                time.sleep(args.after)  # the load runs on; what it sees is the measurement
            finally:
                load.stop()
        finally:
            procs.stop_all()
            cluster.stop()
    outcomes = [o for o in load.outcomes if o.started >= killed - 2]
    results = sorted({o.result for o in outcomes}, key=lambda r: (r != "ok", r))
    rows = []
    for second in sorted({int(o.started - killed) for o in outcomes}):
        sent = Counter((o.kind, o.result) for o in outcomes if int(o.started - killed) == second)
        rows.append([second, *(_cell(sent, result) for result in results)])
    print(f"Cluster failover under load, {machine()}: replica promoted {promoted:.1f} s after the kill")
    print("Requests by the second they were sent in (from the kill), outcome by kind (chat / stream / embed):")
    print(table(["second", *results], rows))
    print("\nTotals:", dict(Counter(o.result for o in outcomes)))


def _cell(sent: Counter[tuple[str, str]], result: str) -> str:
    return " / ".join(str(sent[(kind, result)]) for kind in KINDS) if any(sent[(k, result)] for k in KINDS) else ""


if __name__ == "__main__":
    main()
