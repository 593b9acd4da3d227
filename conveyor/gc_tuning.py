"""The garbage collector set for a long-running server, once its start-up is done (gateway and worker alike).

Two changes, each measured (docs/performance-log.md, "The garbage collector, and engines' answers written in C"):

- ``gc.freeze()``: everything start-up built (FastAPI's routes, pydantic's schemas, the engine and its model) moves to
  a permanent generation that collections no longer walk. vLLM's own API server does the same after its warm-up.
- A young generation of 5,000 container objects instead of CPython's 700: a request allocates a few hundred, most of
  them freed by reference counting before a collection would have walked them. The older generations keep CPython's
  ratios: cyclic garbage is still collected, in larger rounds (memory stays flat over 100,000 requests:
  ``bench.memory``).
"""

from __future__ import annotations

import gc

#: container objects allocated (net of those freed) before a young collection; CPython's default is 700
YOUNG_THRESHOLD = 5_000


def settle() -> None:
    """Call once, when start-up is done and before serving: collect what start-up left, freeze the rest, and set the
    young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
