"""Test-only faults in decode's view of its KV transfers (`--test-kv-delay`,
`--test-kv-fail`). On CPU the last layers of a short prompt usually land before
prefill's answer does, so the window between a request's first token reaching the
client and its KV being usable is too short to act in. These make it wide and
deterministic for the integration tests (tests/services/test_first_token.py); never
use them in a deployment.
"""

from __future__ import annotations

import threading
import time

from kv_transfer.base import KVReceiver, TransferStatus


class LateReceiver:
    """A KVReceiver whose transfers look unfinished to `wait()` until `delay` seconds
    after their `expect()`; with `fail`, a transfer then looks FAILED instead of DONE
    (decode's view only: the bytes did arrive, and decode recomputes anyway). Every
    other call goes to the wrapped receiver."""

    def __init__(self, inner: KVReceiver, delay: float, fail: bool = False):
        self._inner = inner
        self._delay = delay
        self._fail = fail
        self._due: dict[str, float] = {}  # transfer id -> monotonic time its end may be seen
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def expect(self, transfer_id: str, layers: dict[int, list[int]]) -> None:
        self._inner.expect(transfer_id, layers)
        with self._lock:
            self._due[transfer_id] = time.monotonic() + self._delay

    def wait(self, transfer_id: str, timeout: float) -> TransferStatus:
        end = time.monotonic() + timeout
        status = self._inner.wait(transfer_id, timeout)
        if not status.terminal:
            return status
        with self._lock:
            due = self._due.get(transfer_id, 0.0)
        if time.monotonic() < due:
            time.sleep(max(0.0, min(due, end) - time.monotonic()))
            if time.monotonic() < due:
                return TransferStatus.TRANSFERRING
        return TransferStatus.FAILED if self._fail else status

    def reason(self, transfer_id: str) -> str:
        return "failed by --test-kv-fail" if self._fail else self._inner.reason(transfer_id)

    def release(self, transfer_id: str) -> None:
        with self._lock:
            self._due.pop(transfer_id, None)
        self._inner.release(transfer_id)
