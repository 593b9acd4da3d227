from __future__ import annotations

import contextlib
import signal

import pytest

from launcher import up


def test_one_ctrl_c_delivered_twice_is_one_stop_and_a_later_press_ends_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 100.01, 101.5])
    monkeypatch.setattr(up.time, "monotonic", lambda: next(clock))
    handler = up._StopSignals()
    with pytest.raises(up.Stop):
        handler(signal.SIGINT, None)  # from the terminal
    handler(signal.SIGINT, None)  # the same press forwarded by uv/make: ignored
    with pytest.raises(up.Stop):
        handler(signal.SIGINT, None)  # a real second press: stop waiting


def test_a_stop_passes_code_that_catches_errors() -> None:
    """asyncio's socket writes and the supervisor's round catch ``Exception``: a signal arriving there must still stop
    ``conveyor up``."""
    with pytest.raises(up.Stop), contextlib.suppress(Exception):  # as asyncio's transport treats a send's error
        up._StopSignals()(signal.SIGTERM, None)
