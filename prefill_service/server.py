"""PrefillService: the engine in the prefill role, pushing KV to decode.

Lifecycle of one Prefill RPC:
  1. validate (INVALID_ARGUMENT naming the field), connect to decode's KV receiver
     (handshake: a layout mismatch is FAILED_PRECONDITION);
  2. queue the prompt with max_tokens=1 and register its destination with the pusher;
     the engine loop batches it with other prefills (chunked under the token budget);
     each step's on_layer hook sends the layer's finished blocks right away. With
     `destination_follows`, decode reserves its blocks while the engine already
     computes, and SetDestination brings them (it may overtake the Prefill: it waits
     up to DESTINATION_WAIT for it); layers computed before then go out once they are
     known, from the engine thread or, after the prompt's last step, from this handler
     (their source blocks pinned meanwhile: prefill_service/push.py);
  3. when the first token is sampled, queue the transfer's end-of-stream marker
     (`finish`) and answer with the first token at once: the last layers may still be
     on the wire. Decode's receiver knows when they all landed before we could tell it
     (our DONE is its acknowledgement of `finish`, one more round trip), so decode waits
     for its own receiver, and the first token does not wait for the KV;
  4. in the background (a small thread pool, `_close`): wait for the transfer's DONE or
     FAILED, release its record, log the request's timings. Nothing else waits for it.
Blocks: the sender gathers a layer's staged blocks before the next layer runs, and the
pusher fences the sender before the next step's forward (direct runs still queued are
copied, posted sends waited for on the stream), so the engine frees the request's
blocks as soon as it finishes, before the transfer is acknowledged.
Cancel / Abort / failure before the answer: the request is aborted in the engine (blocks
freed once), the transfer aborted, and the RPC ends with the matching status. The RPC's
cancel callback runs on gRPC's one event thread, so it only flags the destination and
leaves the abort, which takes the engine's lock, to a pool thread.

One INFO line per request, once its transfer ended: where its time went, from the RPC's
entry (request in -> queued -> first token -> answer) and `pushed from position N in
X ms` (request in -> the transfer acknowledged DONE).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc

from engine.loop import EngineLoop
from kv_transfer.base import LayoutMismatch, TransferError, TransferStatus
from prefill_service.push import DESTINATION_WAIT, DecodeBlocks, Destination, KVPusher
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import blocks_from_pb, fill_info, sampling_from_pb, unpack_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    """perf_counter() stamps of one Prefill RPC."""

    request_in: float
    queued: float  # the engine has it (add_request returned)
    first_token: float  # the handler holds the sampled first token
    answer: float  # the response is built and returned to gRPC


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, loop: EngineLoop, sender, pusher: KVPusher, info: common_pb2.InfoResponse,
                 transfer_timeout: float):
        self.loop = loop
        self.sender = sender
        self.pusher = pusher
        self.info = info
        self.transfer_timeout = transfer_timeout
        # Waits for answered transfers to end (step 4); a few threads, as most end within
        # milliseconds of the answer.
        self._closer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-close")
        # Work that takes the engine's lock off threads that must not wait for a step: the
        # abort of a cancelled Prefill (gRPC's event thread), the fence and unpin after a
        # Prefill handler sent late layers (its answer should not wait). Apart from the
        # closer, whose threads may each wait a transfer_timeout.
        self._engine_chores = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefill-chores")
        # Prefills whose destination follows, until SetDestination fills it in or the RPC ends.
        self._following: dict[str, Destination] = {}
        self._following_cond = threading.Condition()

    def close(self) -> None:
        """At shutdown, after the sender is closed (which ends every wait)."""
        self._closer.shutdown(wait=False, cancel_futures=True)
        self._engine_chores.shutdown(wait=False, cancel_futures=True)

    def Prefill(self, request, context):
        t_in = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        dest_pb = request.destination
        try:
            params = sampling_from_pb(request.sampling)
            ids = unpack_token_ids(request.packed_prompt_token_ids)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not dest_pb.address or not dest_pb.transfer_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination: address and transfer_id are required")
        follows = request.destination_follows
        dest = (Destination(dest_pb.address, dest_pb.transfer_id, prompt_len=len(ids)) if follows else
                Destination(dest_pb.address, dest_pb.transfer_id,
                            DecodeBlocks(dest_pb.num_cached_tokens, blocks_from_pb(dest_pb.blocks))))
        if follows:  # from here SetDestination finds it (before the connect and the engine's lock)
            with self._following_cond:
                self._following[dest.transfer_id] = dest
                self._following_cond.notify_all()
        try:
            return self._prefill(rid, ids, params, dest, context, t_in)
        finally:
            if follows:
                with self._following_cond:
                    if self._following.get(dest.transfer_id) is dest:
                        del self._following[dest.transfer_id]
            if dest.pinned:  # late layers sent (or never to be): the blocks go back after a fence
                self._engine_chores.submit(self._fence_and_unpin, dest)

    def _prefill(self, rid, ids, params, dest: Destination, context, t_in: float):
        try:
            self.sender.connect(dest.address)
        except LayoutMismatch as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch with {dest.address}: {e}")
        except (TransferError, OSError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach decode's KV receiver {dest.address}: {e}")
        # Prefill samples the first token only; decode applies every stop rule to it.
        first_params = replace(params, max_tokens=1, stop=(), stop_token_ids=(), ignore_eos=True)
        try:
            with self.loop.lock:
                if rid in self.pusher.dest:
                    raise ValueError(f"request_id: {rid!r} is already in use")
                self.pusher.add(rid, dest, len(ids))
                try:
                    stream = self.loop.add_request(ids, first_params, rid)
                except ValueError:
                    self.pusher.remove(rid)
                    raise
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        t_queued = time.perf_counter()
        answered = False  # from then on the RPC's end has nothing to undo
        if not context.add_callback(lambda: answered or self._cancel(rid, dest)):
            self._cancel(rid, dest)  # the RPC ended already (decode cancelled it): no callback would run
            context.abort(grpc.StatusCode.CANCELLED, f"request {rid} cancelled")
        out = self._wait_output(stream, context)
        t_first = time.perf_counter()
        if out is None or out.finish_reason == "abort" or not out.token_ids:
            dest.cancel("aborted")
            self._abort_cancelled(rid, dest)
            context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
        if dest.deferred:  # layers computed before the blocks came: they go out from here
            if not dest.known.wait(DESTINATION_WAIT):
                dest.cancel(f"the destination blocks did not come within {DESTINATION_WAIT:g} s")
            if dest.error is None:
                self.pusher.send_deferred(dest)  # their blocks go back after a fence (the finally)
        # The step that sampled the token pushed the prompt's last blocks, and the pusher
        # dropped the destination then: its counters are final, read without the lock.
        if dest.error is not None:
            self.sender.abort(dest.transfer_id)
            context.abort(grpc.StatusCode.INTERNAL, f"KV push failed: {dest.error}")
        self.sender.finish(dest.address, dest.transfer_id, dest.layers_sent)
        resp = prefill_pb2.PrefillResponse(
            request_id=rid, first_token_id=out.token_ids[0],
            num_prefilled_tokens=len(ids) - out.num_cached_tokens,
            num_sent_tokens=len(ids) - dest.blocks.num_cached_tokens, bytes_sent=dest.bytes_sent,
        )
        if out.logprobs:
            chosen, top = out.logprobs[0]
            resp.first_logprobs.chosen = chosen
            resp.first_logprobs.top.extend(common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top)
        answered = True
        timings = Timings(t_in, t_queued, t_first, time.perf_counter())
        self._closer.submit(self._close, rid, dest, len(ids), out.num_cached_tokens, timings)
        return resp

    def _wait_output(self, stream: queue.Queue, context):
        while True:
            try:
                out = stream.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return None
                continue
            if out.finished:
                return out

    def _close(self, rid: str, dest: Destination, num_tokens: int, cached_here: int, t: Timings) -> None:
        """Step 4: the transfer's end, after the answer went out."""
        try:
            self._close_transfer(rid, dest, num_tokens, cached_here, t)
        except Exception:  # a thread of the pool: nobody else would see it
            log.exception("prefill %s: closing transfer %s failed", rid, dest.transfer_id)

    def _close_transfer(self, rid: str, dest: Destination, num_tokens: int, cached_here: int, t: Timings) -> None:
        tid = dest.transfer_id
        status = self.sender.wait(tid, self.transfer_timeout)
        t_end = time.perf_counter()
        if not status.terminal:
            self.sender.abort(tid)
        reason = self.sender.reason(tid)
        self.sender.release(tid)
        first_step = "" if dest.t_first_step is None else (
            f" (its first step began after {1e3 * (dest.t_first_step - t.queued):.2f} ms; the KV push took "
            f"{1e3 * dest.push_seconds:.2f} ms of the engine thread)")
        split = (f"request in -> queued {1e3 * (t.queued - t.request_in):.2f} ms, queued -> first token "
                 f"{1e3 * (t.first_token - t.queued):.1f} ms{first_step}, first token -> answer "
                 f"{1e3 * (t.answer - t.first_token):.2f} ms (CLOCK_MONOTONIC: in {t.request_in:.6f}, "
                 f"answer {t.answer:.6f})")
        if status == TransferStatus.DONE:
            log.info("prefill %s: %d tokens (%d cached here), pushed from position %d in %.1f ms; %s, "
                     "answer -> transfer DONE %.1f ms", rid, num_tokens, cached_here, dest.blocks.num_cached_tokens,
                     1e3 * (t_end - t.request_in), split, 1e3 * (t_end - t.answer))
        else:  # decode recomputes, or aborted it itself (a first token that ended the request)
            log.info("prefill %s: %d tokens (%d cached here); %s; transfer %s ended %s %.1f ms after the answer: "
                     "%s", rid, num_tokens, cached_here, split, tid, status.name if status.terminal else "TIMED OUT",
                     1e3 * (t_end - t.answer), reason or "no answer from decode")

    def _cancel(self, rid: str, dest: Destination) -> None:
        """An unanswered RPC ended (cancelled, aborted, failed). This runs on gRPC's one
        event thread, which must not wait for the engine's lock (a whole step): the
        destination is cancelled here, the request aborted by a pool thread."""
        dest.cancel("the Prefill RPC ended")
        self._engine_chores.submit(self._abort_cancelled, rid, dest)

    def _fence_and_unpin(self, dest: Destination) -> None:
        """After a Prefill handler sent its late layers: the stream the engine writes on
        waits for those sends (fence), then the engine may reuse the pinned blocks."""
        try:
            self.sender.fence()
        finally:
            with self.loop.lock:
                self.pusher.unpin(dest)

    def _abort_cancelled(self, rid: str, dest: Destination) -> None:
        with self.loop.lock:
            if self.pusher.dest.get(rid) is dest:  # not yet answered, and still this request
                if rid in self.loop.engine.scheduler.requests:
                    self.loop.abort(rid)
                self.pusher.remove(rid)
        self.sender.abort(dest.transfer_id)

    def SetDestination(self, request, context):
        d = request.destination
        deadline = time.monotonic() + DESTINATION_WAIT
        with self._following_cond:  # the Prefill may not be here yet: the two calls can overtake each other
            while (dest := self._following.pop(d.transfer_id, None)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    return prefill_pb2.SetDestinationResponse(found=False)
                self._following_cond.wait(left)
        try:
            self.pusher.set_blocks(dest, DecodeBlocks(d.num_cached_tokens, blocks_from_pb(d.blocks)))
        except ValueError as e:  # the destination failed with it: the Prefill reports it too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return prefill_pb2.SetDestinationResponse(found=True)

    def Abort(self, request, context):
        d = self.pusher.dest.get(request.request_id)
        if d is not None:  # first, without the lock: wakes its handler if it waits for late blocks
            d.cancel("aborted")
        with self.loop.lock:
            found = self.loop.abort(request.request_id)
            d = self.pusher.remove(request.request_id)
        if d is not None:
            self.sender.abort(d.transfer_id)
        return common_pb2.AbortResponse(found=found)

    def Info(self, request, context):
        with self.loop.lock:
            return fill_info(self.info, self.loop.engine)
