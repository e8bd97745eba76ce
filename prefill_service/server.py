"""PrefillService: the engine in the prefill role, pushing KV to decode.

Lifecycle of one Prefill RPC:
  1. validate (INVALID_ARGUMENT naming the field), connect to decode's KV receiver
     (handshake: a layout mismatch is FAILED_PRECONDITION);
  2. queue the prompt with max_tokens=1 and register its destination with the pusher;
     the engine loop batches it with other prefills (chunked under the token budget);
     each step's on_layer hook sends the layer's finished blocks right away;
  3. when the first token is sampled, tell the receiver the transfer is complete and
     wait for its acknowledgement (DONE), then answer with the first token.
Blocks: the sender gathers each layer's blocks into its own buffer before this step's
next layer runs, so the request's blocks are released by the engine as soon as the
request finishes (step 3 waits only on buffers, not on cache blocks).
Cancel / Abort / failure at any point: the request is aborted in the engine (blocks
freed once), the transfer aborted, and the RPC ends with the matching status.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from dataclasses import replace

import grpc

from engine.loop import EngineLoop
from kv_transfer.base import LayoutMismatch, TransferError, TransferStatus
from prefill_service.push import Destination, KVPusher
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import blocks_from_pb, fill_info, sampling_from_pb

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, loop: EngineLoop, sender, pusher: KVPusher, info: common_pb2.InfoResponse,
                 transfer_timeout: float):
        self.loop = loop
        self.sender = sender
        self.pusher = pusher
        self.info = info
        self.transfer_timeout = transfer_timeout

    def Prefill(self, request, context):
        rid = request.request_id or uuid.uuid4().hex
        dest_pb = request.destination
        try:
            params = sampling_from_pb(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not dest_pb.address or not dest_pb.transfer_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "destination: address and transfer_id are required")
        try:
            self.sender.connect(dest_pb.address)
        except LayoutMismatch as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch with {dest_pb.address}: {e}")
        except (TransferError, OSError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach decode's KV receiver {dest_pb.address}: {e}")
        dest = Destination(dest_pb.address, dest_pb.transfer_id, dest_pb.num_cached_tokens,
                           blocks_from_pb(dest_pb.blocks))
        ids = list(request.prompt_token_ids)
        # Prefill samples the first token only; decode applies every stop rule to it.
        first_params = replace(params, max_tokens=1, stop=(), stop_token_ids=(), ignore_eos=True)
        t0 = time.monotonic()
        try:
            with self.loop.lock:
                self.pusher.add(rid, dest, len(ids))
                try:
                    stream = self.loop.add_request(ids, first_params, rid)
                except ValueError:
                    self.pusher.remove(rid)
                    raise
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.add_callback(lambda: self._cancel(rid, dest.transfer_id))
        out = self._wait_output(stream, context)
        with self.loop.lock:
            d = self.pusher.remove(rid)
        if out is None or out.finish_reason == "abort" or not out.token_ids or d is None:
            self.sender.abort(dest.transfer_id)
            context.abort(grpc.StatusCode.CANCELLED, f"request {rid} aborted")
        if d.error is not None:
            self.sender.abort(dest.transfer_id)
            context.abort(grpc.StatusCode.INTERNAL, f"KV push failed: {d.error}")
        self.sender.finish(dest.address, dest.transfer_id, d.layers_sent)
        status = self.sender.wait(dest.transfer_id, self.transfer_timeout)
        self.sender.release(dest.transfer_id)
        if status != TransferStatus.DONE:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer {dest.transfer_id} ended {status.name}")
        log.info("prefill %s: %d tokens (%d cached here), pushed from position %d in %.1f ms", rid, len(ids),
                 out.num_cached_tokens, dest.num_cached_tokens, 1e3 * (time.monotonic() - t0))
        resp = prefill_pb2.PrefillResponse(
            request_id=rid, first_token_id=out.token_ids[0],
            num_prefilled_tokens=len(ids) - out.num_cached_tokens,
            num_sent_tokens=len(ids) - dest.num_cached_tokens, bytes_sent=d.bytes_sent,
        )
        if out.logprobs:
            chosen, top = out.logprobs[0]
            resp.first_logprobs.chosen = chosen
            resp.first_logprobs.top.extend(common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top)
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

    def _cancel(self, rid: str, transfer_id: str) -> None:
        # Runs when the RPC ends for any reason; harmless after a normal finish.
        with self.loop.lock:
            if rid in self.loop.engine.scheduler.requests:
                self.loop.abort(rid)
                self.pusher.remove(rid)
                self.sender.abort(transfer_id)

    def Abort(self, request, context):
        with self.loop.lock:
            found = self.loop.abort(request.request_id)
            d = self.pusher.remove(request.request_id)
        if d is not None:
            self.sender.abort(d.transfer_id)
        return common_pb2.AbortResponse(found=found)

    def Info(self, request, context):
        with self.loop.lock:
            return fill_info(self.info, self.loop.engine)
