"""DecodeService: owns each request from arrival to its last token.

Lifecycle of one Generate RPC (with a prefill_address):
  1. validate (INVALID_ARGUMENT naming the field); reserve blocks: the prefix-cache hit
     plus the rest of the prompt (for chunked-local layers only the current chunk);
  2. uncached suffix <= --local-prefill-threshold: give the reservation back and
     prefill here (no transfer). Otherwise tell the KV receiver which blocks to expect
     and call PrefillService.Prefill with the destination blocks. A prompt of at least
     --early-prefill-tokens goes to prefill BEFORE step 1 (`destination_follows`), and
     its blocks follow in SetDestination once reserved: the 1-2 ms of reservation
     overlap prefill's compute, and no KV byte moves before the blocks are known. If
     the reservation then says "prefill here", that Prefill is cancelled;
  3. Prefill answers with the first token as soon as it is sampled; the token goes to
     the client at once, while the request stays transferring (blocks held, not
     scheduled) and the last layers may still be arriving;
  4. the receiver reports the transfer DONE: the request joins the continuous batch and
     the rest of its tokens stream back. A first token that ends the request (a stop
     id, max_tokens=1) ends the RPC; its transfer is aborted, then its blocks freed;
  5. failure (prefill unreachable or dead, transfer failed or timed out), before or
     after the first token: abort the transfer FIRST (no late byte lands in blocks about
     to be freed), then recompute here (--on-transfer-failure recompute, default: the
     prompt, and the first token if the client has it, so it never sees that token
     twice or a different one) or end the RPC with UNAVAILABLE (fail);
  6. client cancel or Abort at any point: the prefill RPC is cancelled, the transfer
     aborted, the request aborted; its blocks are freed exactly once (by the engine).
The receiver's record of a transfer is released when the RPC ends, not at DONE:
prefill's `finish` for it is still on the way then, and the receiver answers a
finish for a forgotten transfer with FAILED.

Why a unary Prefill with decode waiting on its own receiver, rather than a streaming
Prefill (message 1: the first token, message 2: the transfer's result): the receiver
learns first-hand when the last block has landed, while prefill learns it only from
the receiver's answer to its `finish`, a round trip later, and its second message would
add another hop. The stream would also keep an RPC open per transfer just to carry
news decode already has. What prefill still knows first, a push that failed before the
answer, it reports as the RPC's error; failures after it reach the receiver on their
own (the sender's abort, a dropped connection) or end in the timeout.

One INFO line per request whose KV arrived: `reserve + request` (Generate entered ->
Prefill RPC sent), `Prefill RPC` (-> its answer), `transfer close` (the receiver's DONE
-> in the batch), `first token out` (answer -> the first token handed to gRPC), then
`KV DONE X ms after the first token` (how much longer the KV took; 0 when it was
already here), and the RPC's sent and answer stamps on CLOCK_MONOTONIC (perf_counter on
Linux), which prefill's line also uses: bench/disagg.py takes the one-way hops from them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from engine.kv_cache import pushed_blocks
from engine.loop import EngineLoop
from kv_transfer.base import TransferStatus
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.convert import (blocks_to_pb, fill_info, logprobs_to_pb, pack_token_ids, prompt_from_pb,
                            sampling_from_pb, sampling_to_pb)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillStats:
    """How a request's prompt reached decode's cache (reported on every response)."""

    cached: int = 0  # prompt tokens decode already held
    sent: int = 0  # prompt tokens prefill pushed
    bytes: int = 0
    seconds: float = 0.0  # Prefill RPC sent -> first token published


@dataclass(frozen=True)
class Handoff:
    """A request whose first token came from prefill and whose KV may still be arriving
    (steps 3-4), with the perf_counter() stamps of its way there."""

    transfer_id: str
    prefill_address: str
    deadline: float  # the KV must be here by then (--prefill-timeout after the RPC was sent)
    num_prompt: int
    cached: int
    t_in: float  # Generate entered
    t_sent: float  # Prefill RPC sent
    t_answer: float  # its answer received
    t_dest: float | None = None  # SetDestination sent (the blocks followed the prompt)


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, loop: EngineLoop, receiver, info: common_pb2.InfoResponse, *,
                 local_prefill_threshold: int, on_transfer_failure: str, prefill_timeout: float,
                 early_prefill_tokens: int = 0, destination_delay: float = 0.0):
        """destination_delay: test-only (--test-destination-delay), seconds between the
        reservation and SetDestination."""
        self.loop = loop
        self.receiver = receiver
        self.info = info
        self.threshold = local_prefill_threshold
        self.recompute = on_transfer_failure == "recompute"
        self.prefill_timeout = prefill_timeout
        self.early_tokens = early_prefill_tokens
        self.destination_delay = destination_delay
        eng = loop.engine
        self.layer_group = eng.runner.layer_group
        self.block_size = eng.config.cache.block_size
        self.chunk = eng.config.model.attention_chunk_size
        self._channels: dict[str, prefill_pb2_grpc.PrefillServiceStub] = {}
        self._channels_lock = threading.Lock()
        self.transfers: dict[str, str] = {}  # request id -> transfer id, until the RPC ends or is aborted

    # -- the RPCs ------------------------------------------------------------------------
    def Generate(self, request, context):
        t_in = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        try:
            params = sampling_from_pb(request.sampling)
            ids = prompt_from_pb(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.prefill_address:
            yield from self._disaggregated(rid, ids, params, request.prefill_address, context, t_in)
        else:
            yield from self._stream(rid, self._local(rid, ids, params, context), context, len(ids), PrefillStats())

    def Abort(self, request, context):
        # The transfer is aborted before the engine frees the blocks it writes, both under
        # the engine's lock, which a reservation holds from taking the blocks to registering
        # their transfer. Without it, an Abort could look for the transfer just before a
        # reservation registered it, then free the blocks just after: prefill's KV for the
        # aborted request then landed in blocks that other requests were given.
        with self.loop.lock:
            self._drop_transfer(request.request_id)
            return common_pb2.AbortResponse(found=self.loop.abort(request.request_id))

    def Info(self, request, context):
        with self.loop.lock:
            return fill_info(self.info, self.loop.engine)

    # -- prefill paths -------------------------------------------------------------------
    def _local(self, rid, ids, params, context) -> queue.Queue:
        try:
            stream = self.loop.add_request(ids, params, rid)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return stream

    def _disaggregated(self, rid, ids, params, prefill_address, context, t_in):
        """Steps 1-5; yields the GenerateResponses."""
        tid = f"{rid}/{uuid.uuid4().hex[:8]}"
        stub = self._stub(prefill_address)
        early = 0 < self.early_tokens <= len(ids)
        future = t_dest = None
        why: list[str] = []  # why SetDestination failed, if it did (the Prefill is cancelled then)
        if early:  # the prompt first: prefill computes while the blocks are reserved here
            preq = self._prefill_request(rid, ids, params, tid)
            preq.destination_follows = True
            future = stub.Prefill.future(preq, timeout=self.prefill_timeout)
            t_sent = time.perf_counter()
        try:
            stream, cached, dest = self._reserve(rid, ids, params, context, tid)
        except BaseException:  # a bad request (INVALID_ARGUMENT): prefill's copy goes too
            if future is not None:
                future.cancel()
            raise
        if dest is None:  # prefilled here
            if future is not None:
                future.cancel()  # prefill aborts its copy
            yield from self._stream(rid, stream, context, len(ids), PrefillStats(cached))
            return
        if early:
            if self.destination_delay:
                time.sleep(self.destination_delay)
            t_dest = time.perf_counter()
            call = stub.SetDestination.future(prefill_pb2.SetDestinationRequest(request_id=rid, destination=dest),
                                              timeout=self.prefill_timeout)
            call.add_done_callback(lambda c: self._destination_sent(rid, prefill_address, c, future, why))
        else:
            preq = self._prefill_request(rid, ids, params, tid)
            preq.destination.CopyFrom(dest)
            future = stub.Prefill.future(preq, timeout=self.prefill_timeout)
            t_sent = time.perf_counter()
        resp, error = self._await_prefill(rid, future, context, why)
        t_answer = time.perf_counter()
        out = None
        if resp is not None:
            out, error = self._publish_first_token(rid, resp)
        if out is None:  # the client left, Abort came, or prefill failed
            if error is not None:
                self._transfer_failed(rid, prefill_address, error, context)
            yield from self._stream(rid, stream, context, len(ids), PrefillStats(cached))
            return
        t_first = time.perf_counter()
        handoff = Handoff(tid, prefill_address, t_sent + self.prefill_timeout, len(ids), cached, t_in, t_sent,
                          t_answer, t_dest)
        stats = PrefillStats(cached, len(ids) - cached, resp.bytes_sent, t_first - t_sent)
        yield from self._stream(rid, stream, context, len(ids), stats, handoff)

    def _reserve(self, rid, ids, params, context, tid: str) -> tuple[queue.Queue, int, common_pb2.KVDestination | None]:
        """Steps 1-2: (the output stream, the prefix hit, the destination to send, or None
        when the prompt is prefilled here)."""
        loop, eng = self.loop, self.loop.engine
        with loop.lock:
            try:
                req = eng.reserve(ids, params, rid)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if req is None:  # no room to reserve now: queue it here; it prefills when admitted
                return self._local(rid, ids, params, context), 0, None
            stream = loop.open_stream(rid)
            cached = req.num_cached_tokens
            if len(ids) - cached <= self.threshold:
                eng.fail_transfer(rid)  # give the reservation back; prefilled here
                loop.wake.notify_all()
                return stream, cached, None
            self.receiver.expect(tid, self._expected_layers(req))
            self.transfers[rid] = tid
            dest = common_pb2.KVDestination(address=self.receiver.address, transfer_id=tid, num_cached_tokens=cached)
            blocks_to_pb(req.block_tables, dest.blocks)
            return stream, cached, dest

    def _prefill_request(self, rid, ids, params, tid: str) -> prefill_pb2.PrefillRequest:
        preq = prefill_pb2.PrefillRequest(request_id=rid, packed_prompt_token_ids=pack_token_ids(ids),
                                          sampling=sampling_to_pb(params))
        preq.destination.address = self.receiver.address
        preq.destination.transfer_id = tid
        return preq

    @staticmethod
    def _destination_sent(rid: str, address: str, call, prefill, why: list[str]) -> None:
        """SetDestination's end (a gRPC thread). If prefill did not take the blocks, its
        Prefill can only fail: cancel it now, with the reason for _await_prefill."""
        if call.cancelled():
            return
        try:
            if call.result().found:
                return
            why.append(f"prefill at {address} had no Prefill for the destination")
        except grpc.RpcError as e:
            why.append(f"SetDestination to {address} failed: {e.details()}")
        log.warning("request %s: %s; cancelling its Prefill", rid, why[-1])
        prefill.cancel()

    def _await_prefill(self, rid, future, context, why: list[str]):
        """(the answer, None), (None, why it failed), or (None, None) when the client left
        or Abort came first (then the request is aborted here)."""
        while True:
            try:
                return future.result(timeout=0.2), None
            except grpc.FutureCancelledError:  # by _destination_sent
                return None, why[0] if why else "the Prefill call was cancelled"
            except grpc.FutureTimeoutError:
                if not context.is_active() or rid not in self.transfers:  # client gone / aborted
                    future.cancel()
                    self._drop_transfer(rid)
                    self.loop.abort(rid)
                    return None, None
            except grpc.RpcError as e:
                return None, e.details()

    def _publish_first_token(self, rid, resp):
        """Step 3: (its output, None) once published; (None, why) for an answer the engine
        refuses; (None, None) when the request was aborted meanwhile."""
        lp = None
        if resp.HasField("first_logprobs"):
            lp = (resp.first_logprobs.chosen, [(t.token_id, t.logprob) for t in resp.first_logprobs.top])
        with self.loop.lock:
            if rid not in self.loop.engine.scheduler.transferring:
                return None, None
            try:
                out = self.loop.engine.first_token(rid, resp.first_token_id, lp)
            except ValueError as e:
                return None, f"bad answer: {e}"
            self.loop.publish(out)
            return out, None

    def _close_transfer(self, rid: str, h: Handoff, t_out: float, ended: bool, context) -> None:
        """Step 4, once the first token is out (handed to gRPC at `t_out`): wait for the
        KV, then join the batch."""
        loop, eng = self.loop, self.loop.engine
        if ended:  # the first token ended it: its KV is not needed
            self._drop_transfer(rid)  # abort: no byte lands in the blocks from here
            with loop.lock:
                if rid in eng.scheduler.transferring:
                    eng.fail_transfer(rid)  # a finished request: its blocks go back
            return
        status = self._await_kv(rid, h, context)
        t_kv = time.perf_counter()
        if status is None:  # client gone or aborted: the stream ends it
            return
        if status != TransferStatus.DONE:
            why = (f"ended {status.name}: {self.receiver.reason(h.transfer_id)}" if status.terminal
                   else f"not done within --prefill-timeout {self.prefill_timeout:g} s")
            self._transfer_failed(rid, h.prefill_address, f"KV transfer {h.transfer_id} {why}", context)
            return
        with loop.lock:
            if rid not in eng.scheduler.transferring:  # aborted meanwhile
                return
            eng.complete_transfer(rid)
            loop.wake.notify_all()
        t_joined = time.perf_counter()
        follows = "" if h.t_dest is None else f" (blocks reserved and sent {1e3 * (h.t_dest - h.t_sent):.2f} ms after it)"
        log.info("request %s: %d prompt tokens (%d cached); reserve + request %.2f ms, Prefill RPC %.1f ms%s, "
                 "transfer close %.2f ms, first token out %.2f ms; KV DONE %.1f ms after the first token "
                 "(CLOCK_MONOTONIC: sent %.6f, answer %.6f)", rid,
                 h.num_prompt, h.cached, 1e3 * (h.t_sent - h.t_in), 1e3 * (h.t_answer - h.t_sent), follows,
                 1e3 * (t_joined - t_kv), 1e3 * (t_out - h.t_answer), 1e3 * (t_kv - t_out), h.t_sent, h.t_answer)

    def _await_kv(self, rid: str, h: Handoff, context) -> TransferStatus | None:
        """The receiver's status once it is terminal or the deadline passed; None when the
        client left or the request was aborted."""
        while True:
            left = h.deadline - time.perf_counter()
            try:
                status = self.receiver.wait(h.transfer_id, min(0.2, max(0.0, left)))
            except KeyError:  # released by an Abort
                return None
            if status.terminal or left <= 0:
                return status
            if not context.is_active() or rid not in self.transfers:
                return None

    def _transfer_failed(self, rid: str, prefill_address: str, msg: str, context) -> None:
        """Step 5. Returns when the request recomputes here (or was aborted meanwhile);
        ends the RPC with UNAVAILABLE under --on-transfer-failure fail."""
        loop, eng = self.loop, self.loop.engine
        self._drop_transfer(rid)  # first: no byte lands in the blocks about to be freed
        with loop.lock:
            if rid not in eng.scheduler.transferring:  # aborted meanwhile
                return
            if self.recompute:
                log.warning("request %s: prefill at %s failed (%s); recomputing here", rid, prefill_address, msg)
                eng.fail_transfer(rid)
                loop.wake.notify_all()
                return
            loop.abort(rid)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill at {prefill_address} failed: {msg}")

    def _drop_transfer(self, rid: str) -> None:
        tid = self.transfers.pop(rid, None)
        if tid is not None:
            self.receiver.abort(tid)  # no-op after DONE; stops late writes otherwise
            self.receiver.release(tid)

    def _expected_layers(self, req) -> dict[int, list[int]]:
        """The blocks prefill will push, per layer (the same `pushed_blocks` prefill uses).
        The layers of a group share one list, which the receiver then checks once."""
        ranges = pushed_blocks(req.num_tokens, req.num_cached_tokens, self.block_size, self.chunk,
                               set(self.layer_group))
        blocks = {g: req.block_tables[g][r.start : r.stop] for g, r in ranges.items()}
        return {layer: blocks[g] for layer, g in enumerate(self.layer_group) if blocks[g]}

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillServiceStub:
        with self._channels_lock:
            if address not in self._channels:
                self._channels[address] = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(address))
            return self._channels[address]

    # -- streaming -----------------------------------------------------------------------
    def _stream(self, rid, stream: queue.Queue, context, num_prompt, meta: PrefillStats,
                handoff: Handoff | None = None):
        """Yield the request's outputs as they come. With a `handoff`, the first one is the
        first token from prefill, and the KV is waited for right after it went out."""
        finished = False
        try:
            while True:
                try:
                    out = stream.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                resp = decode_pb2.GenerateResponse(
                    request_id=rid, token_ids=out.new_token_ids, text=out.new_text, finished=out.finished,
                    finish_reason=out.finish_reason or "", num_prompt_tokens=num_prompt,
                    num_cached_tokens=max(meta.cached, out.num_cached_tokens), num_transferred_tokens=meta.sent,
                    bytes_transferred=meta.bytes, prefill_seconds=meta.seconds)
                if out.logprobs is not None and out.new_token_ids:
                    logprobs_to_pb(out.logprobs[len(out.token_ids) - len(out.new_token_ids):], resp.logprobs)
                finished = out.finished
                t_out = time.perf_counter()
                yield resp
                if handoff is not None:
                    self._close_transfer(rid, handoff, t_out, finished, context)
                    handoff = None
                if finished:
                    return
        finally:
            self._drop_transfer(rid)  # the receiver's record lives as long as the RPC
            if not finished:  # client cancelled or the stream broke: abort everywhere
                self.loop.abort(rid)
