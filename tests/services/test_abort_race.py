"""decode's Abort against a reservation in progress, interleaved on purpose (in one
process: the servicer, a real engine loop and a real tcp receiver, no prefill).

A reservation holds the engine lock from taking the blocks to registering their
transfer with the receiver. An Abort that ran in between used to find no transfer to
abort, then free the blocks once the reservation let go of the lock, leaving the
receiver ready to write prefill's KV into blocks other requests would be given
(test_chaos.py found it). Abort now takes the same lock for both steps."""

import threading
import time
from array import array

from decode_service.server import DecodeServicer
from engine.llm import LLM
from engine.loop import EngineLoop
from kv_transfer import CacheLayout, make_receiver
from protos import common_pb2
from tests.services.helpers import params


class Alive:
    """The part of a gRPC context _reserve uses."""

    def abort(self, code, details):
        raise AssertionError(f"{code}: {details}")


def test_an_abort_cannot_fall_between_a_reservation_and_its_transfer(tiny_llama4_dir):
    eng = LLM(tiny_llama4_dir, num_blocks=96, max_model_len=512).engine
    layout = CacheLayout.from_caches(eng.config.model.fingerprint, eng.runner.kv_caches)
    receiver = make_receiver("tcp", layout, eng.runner.kv_caches)
    loop = EngineLoop(eng).start()
    servicer = DecodeServicer(loop, receiver, common_pb2.InfoResponse(), local_prefill_threshold=0,
                              on_transfer_failure="recompute", prefill_timeout=10)
    try:
        used = eng.kv.stats()["global"].used
        aborted = {}
        with loop.lock:  # a reservation in progress: the Abort comes now
            t = threading.Thread(target=lambda: aborted.update(
                r=servicer.Abort(common_pb2.AbortRequest(request_id="r"), None)))
            t.start()
            time.sleep(0.2)
            _, _, dest = servicer._reserve("r", array("I", range(1, 100)), params(4), Alive(), "r/1")
            assert dest is not None and receiver.wait("r/1", 0).name == "WAITING"
        t.join(timeout=10)
        assert aborted["r"].found  # it saw the request, hence its transfer too
        try:
            status = receiver.wait("r/1", 0)
        except KeyError:  # aborted and released: nothing of it can land any more
            status = None
        assert status is None, f"the transfer is still {status.name} while its blocks are free"
        assert eng.kv.stats()["global"].used == used and "r" not in eng.scheduler.requests
    finally:
        loop.stop()
        receiver.close()
