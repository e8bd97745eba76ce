"""Running an engine behind a server: one thread steps the engine; request handlers
(gRPC threads) talk to it through `EngineLoop` and read their outputs from a queue.

Every engine call from a handler happens under `lock`, which the loop thread holds
while it steps, so the engine itself stays single-threaded. The loop sleeps on a
condition when there is nothing to schedule and wakes when a handler adds work.

The lock is fair to handlers: a thread lock is not, and a loop that releases and
re-takes it between steps starves every handler waiting for it until the batch drains
(measured: an add_request waited 8 s behind two long requests, so nothing joined the
continuous batch). Between steps the loop therefore waits, briefly, until the handlers
that queued for the lock have had it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from engine.llm import LLMEngine
from engine.output import RequestOutput

log = logging.getLogger(__name__)


class HandlerFirstLock:
    """A re-entrant lock that counts the handler threads waiting for it, so the loop
    thread can step aside for them between steps. Works under threading.Condition."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self.waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        with self._count:
            self.waiting += 1
        try:
            return self._lock.acquire(timeout=timeout)
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self._lock.release()

    # what threading.Condition uses to wait on a re-entrant lock
    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    def _release_save(self):
        return self._lock._release_save()

    def _acquire_restore(self, state) -> None:
        self._lock._acquire_restore(state)


HANDOFF_MAX_WAIT = 0.005  # seconds the loop waits, between steps, for handlers to take the lock


class EngineLoop:
    def __init__(self, engine: LLMEngine, hook=None):
        self.engine = engine
        self.hook = hook  # passed to engine.step (the prefill role's KV pusher)
        self.lock = HandlerFirstLock()
        self.wake = threading.Condition(self.lock)
        self.streams: dict[str, queue.Queue[RequestOutput]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._last_load: dict = {}
        self.load()

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.wake.notify_all()
        self._thread.join(timeout=30)

    def open_stream(self, request_id: str) -> queue.Queue:
        with self.lock:
            q: queue.Queue[RequestOutput] = queue.Queue()
            self.streams[request_id] = q
            return q

    def add_request(self, prompt, params, request_id: str) -> queue.Queue:
        """Queue a request; its outputs arrive on the returned queue, the last one
        with finished=True. ValueError (bad input) is raised here, nothing queued."""
        with self.lock:
            self.engine.add_request(prompt, params, request_id)
            q = self.open_stream(request_id)
            self.wake.notify_all()
            return q

    def publish(self, out: RequestOutput) -> None:
        with self.lock:
            q = self.streams.get(out.request_id)
            if q is not None:
                q.put(out)
                if out.finished:
                    del self.streams[out.request_id]

    def abort(self, request_id: str) -> bool:
        """Abort wherever the request is; its stream gets a final 'abort' output."""
        with self.lock:
            found = self.engine.abort(request_id)
            q = self.streams.pop(request_id, None)
            if q is not None:
                q.put(RequestOutput(request_id, [], [], "", finished=True, finish_reason="abort"))
            return found

    def load(self) -> dict:
        """What a router needs to know about this engine now (the registry heartbeat).
        Never waits behind a long step: then the figures of the last one are reported."""
        if not self.lock.acquire(timeout=0.05):
            return self._last_load
        try:
            eng = self.engine
            pool = eng.kv.pools["global"]
            sched = eng.scheduler
            queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
            queued += sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in sched.running)
            self._last_load = dict(block_size=eng.config.cache.block_size, max_model_len=eng.max_model_len,
                                   total_blocks=pool.num_blocks, free_blocks=pool.num_free,
                                   running=len(sched.running), waiting=len(sched.waiting) + len(sched.transferring),
                                   queued_prefill_tokens=queued)
            return self._last_load
        finally:
            self.lock.release()

    def _let_handlers_in(self) -> None:
        deadline = time.monotonic() + HANDOFF_MAX_WAIT
        while self.lock.waiting and time.monotonic() < deadline:
            time.sleep(0.0001)

    def _run(self) -> None:
        try:
            while True:
                self._let_handlers_in()
                with self.lock:
                    while not self._stop and not self.engine.has_work:
                        self.wake.wait(timeout=1.0)
                    if self._stop:
                        return
                    outs = self.engine.step(self.hook)
                    for o in outs:
                        self.publish(o)
        except BaseException:  # a broken engine must not leave handlers waiting forever
            log.exception("engine loop died")
            with self.lock:
                for rid, q in list(self.streams.items()):
                    q.put(RequestOutput(rid, [], [], "", finished=True, finish_reason="abort"))
                self.streams.clear()
