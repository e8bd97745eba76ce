"""DecodeService: owns each request from arrival to its last token.

Lifecycle of one Generate RPC (with a prefill_address):
  1. validate (INVALID_ARGUMENT naming the field); reserve blocks: the prefix-cache hit
     plus the rest of the prompt (for chunked-local layers only the current chunk);
  2. uncached suffix <= --local-prefill-threshold: give the reservation back and
     prefill here (no transfer). Otherwise tell the KV receiver which blocks to expect
     and call PrefillService.Prefill with the destination blocks;
  3. Prefill returns once the KV arrived (receiver DONE) with the first token: the
     request joins the continuous batch and tokens stream back;
  4. failure (prefill unreachable or dead, transfer failed or timed out): abort the
     transfer FIRST (no late byte lands in blocks about to be freed), then recompute
     the prompt here (--on-transfer-failure recompute, default) or end the RPC with
     UNAVAILABLE (fail);
  5. client cancel or Abort at any point: the prefill RPC is cancelled, the transfer
     aborted, the request aborted; its blocks are freed exactly once (by the engine).
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
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.convert import blocks_to_pb, fill_info, logprobs_to_pb, sampling_from_pb, sampling_to_pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillStats:
    """How a request's prompt reached decode's cache (reported on every response)."""

    cached: int = 0  # prompt tokens decode already held
    sent: int = 0  # prompt tokens prefill pushed
    bytes: int = 0
    seconds: float = 0.0  # remote prefill + transfer, as decode waited for it


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, loop: EngineLoop, receiver, info: common_pb2.InfoResponse, *,
                 local_prefill_threshold: int, on_transfer_failure: str, prefill_timeout: float):
        self.loop = loop
        self.receiver = receiver
        self.info = info
        self.threshold = local_prefill_threshold
        self.recompute = on_transfer_failure == "recompute"
        self.prefill_timeout = prefill_timeout
        eng = loop.engine
        self.layer_group = eng.runner.layer_group
        self.block_size = eng.config.cache.block_size
        self.chunk = eng.config.model.attention_chunk_size
        self._channels: dict[str, prefill_pb2_grpc.PrefillServiceStub] = {}
        self._channels_lock = threading.Lock()
        self.transfers: dict[str, str] = {}  # request id -> transfer id, while transferring

    # -- the RPCs ------------------------------------------------------------------------
    def Generate(self, request, context):
        rid = request.request_id or uuid.uuid4().hex
        try:
            params = sampling_from_pb(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ids = list(request.prompt_token_ids)
        if request.prefill_address:
            stream, meta = self._disaggregated(rid, ids, params, request.prefill_address, context)
        else:
            stream, meta = self._local(rid, ids, params, context), PrefillStats()
        yield from self._stream(rid, stream, context, len(ids), meta)

    def Abort(self, request, context):
        self._drop_transfer(request.request_id)  # before the engine frees the blocks it writes
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

    def _disaggregated(self, rid, ids, params, prefill_address, context):
        loop, eng = self.loop, self.loop.engine
        t_in = time.perf_counter()
        with loop.lock:
            try:
                req = eng.reserve(ids, params, rid)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if req is None:  # no room to reserve now: queue it here; it prefills when admitted
                return self._local(rid, ids, params, context), PrefillStats()
            cached = req.num_cached_tokens
            stream = loop.open_stream(rid)
            if len(ids) - cached <= self.threshold:
                eng.fail_transfer(rid)  # give the reservation back; prefilled here
                loop.wake.notify_all()
                return stream, PrefillStats(cached)
            tid = f"{rid}/{uuid.uuid4().hex[:8]}"
            self.receiver.expect(tid, self._expected_layers(req))
            self.transfers[rid] = tid
            preq = prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                              sampling=sampling_to_pb(params))
            preq.destination.address = self.receiver.address
            preq.destination.transfer_id = tid
            preq.destination.num_cached_tokens = cached
            blocks_to_pb(req.block_tables, preq.destination.blocks)
        t0 = time.perf_counter()
        future = self._stub(prefill_address).Prefill.future(preq, timeout=self.prefill_timeout)
        error = None
        while True:
            try:
                resp = future.result(timeout=0.2)
                break
            except grpc.FutureTimeoutError:
                if not context.is_active() or rid not in self.transfers:  # client gone / aborted
                    future.cancel()
                    self._drop_transfer(rid)
                    with loop.lock:
                        loop.abort(rid)
                    return stream, PrefillStats(cached)
            except grpc.RpcError as e:
                error = e
                break
        t_answer = time.perf_counter()
        if error is None:
            status = self.receiver.wait(tid, 5.0)  # prefill answered after our ack: DONE already
            error = None if status.name == "DONE" else f"transfer {tid} ended {status.name}"
        self._drop_transfer(rid)
        t_done = time.perf_counter()
        with loop.lock:
            if rid not in eng.scheduler.transferring:  # aborted meanwhile
                return stream, PrefillStats(cached)
            if error is None:
                lp = None
                if resp.HasField("first_logprobs"):
                    lp = (resp.first_logprobs.chosen, [(t.token_id, t.logprob) for t in resp.first_logprobs.top])
                loop.publish(eng.complete_transfer(rid, resp.first_token_id, lp))
                loop.wake.notify_all()
                t_out = time.perf_counter()
                log.info("request %s: %d prompt tokens (%d cached); reserve + request %.1f ms, Prefill RPC %.1f ms, "
                         "transfer close %.1f ms, first token out %.1f ms", rid, len(ids), cached,
                         1e3 * (t0 - t_in), 1e3 * (t_answer - t0), 1e3 * (t_done - t_answer), 1e3 * (t_out - t_done))
                return stream, PrefillStats(cached, len(ids) - cached, resp.bytes_sent, t_out - t0)
            msg = error.details() if isinstance(error, grpc.RpcError) else error
            if self.recompute:
                log.warning("request %s: prefill at %s failed (%s); recomputing here", rid, prefill_address, msg)
                eng.fail_transfer(rid)
                loop.wake.notify_all()
                return stream, PrefillStats(cached)
            loop.abort(rid)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill at {prefill_address} failed: {msg}")

    def _drop_transfer(self, rid: str) -> None:
        tid = self.transfers.pop(rid, None)
        if tid is not None:
            self.receiver.abort(tid)  # no-op after DONE; stops late writes otherwise
            self.receiver.release(tid)

    def _expected_layers(self, req) -> dict[int, list[int]]:
        """The blocks prefill will push, per layer (the same `pushed_blocks` prefill uses)."""
        ranges = pushed_blocks(req.num_tokens, req.num_cached_tokens, self.block_size, self.chunk,
                               set(self.layer_group))
        out = {}
        for layer, g in enumerate(self.layer_group):
            blocks = req.block_tables[g][ranges[g].start : ranges[g].stop]
            if blocks:
                out[layer] = blocks
        return out

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillServiceStub:
        with self._channels_lock:
            if address not in self._channels:
                self._channels[address] = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(address))
            return self._channels[address]

    # -- streaming -----------------------------------------------------------------------
    def _stream(self, rid, stream: queue.Queue, context, num_prompt, meta: PrefillStats):
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
                yield resp
                if finished:
                    return
        finally:
            if not finished:  # client cancelled or the stream broke: abort everywhere
                self._drop_transfer(rid)
                self.loop.abort(rid)
