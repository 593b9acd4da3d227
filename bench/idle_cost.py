"""What an idle worker costs, by poll delay: CPU of one fake-engine worker with an empty queue.

    uv run --frozen --extra cpu python -m bench.idle_cost [--seconds 10]

Jobs start on the gateway's wake-up, so the poll delay only bounds how late a lost wake-up or a job handed back by
a dead worker is noticed; this table shows what a shorter fallback would cost while idle.
"""

from __future__ import annotations

import argparse
import time

from bench.common import cpu_seconds, machine, stack, table
from launcher import processes

DELAYS = ("0.5", "0.1", "0.01", "0.002")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rows = []
    with stack() as conveyor:
        for delay in DELAYS:
            info = conveyor.worker(f"idle-{delay}", "--engine", "fake", "--poll-delay", delay)
            time.sleep(1)  # let start-up work finish before measuring
            before, started = cpu_seconds(info.pid), time.monotonic()
            time.sleep(args.seconds)
            used = cpu_seconds(info.pid) - before
            rows.append([delay, f"{used / (time.monotonic() - started) * 100:.1f}%"])
            processes.stop(conveyor.children.pop())
    print(f"Idle worker CPU by poll delay, {args.seconds:.0f} s each; {machine()}.\n")
    print(table(["poll delay (s)", "CPU of one core"], rows))


if __name__ == "__main__":
    main()
