"""A kv_transfer peer in its own process, driven by the tests.

    python -m tests.kv_transfer.peer receiver DTYPE PLAN_JSON OUT_FILE
        poisoned caches; expect("t", plan); print "ADDRESS host:port"; wait for the
        transfer; save the caches to OUT_FILE; print "STATUS n"
    python -m tests.kv_transfer.peer sender DTYPE SEED PLAN_JSON ADDRESS N
        random caches (SEED); send the plan's first N layers of transfer "t"; print "SENT";
        then sleep until killed
"""

import sys
import time

import torch

from kv_transfer import TcpReceiver, TcpSender
from tests.kv_transfer.helpers import dst_of, layout_of, make_caches, plan_from_json


def receiver(dtype: str, plan_json: str, out_file: str) -> None:
    caches = make_caches(getattr(torch, dtype), seed=None)
    rx = TcpReceiver(layout_of(caches), caches)
    rx.expect("t", dst_of(plan_from_json(plan_json)))
    print("ADDRESS", rx.address, flush=True)
    status = rx.wait("t", timeout=60)
    torch.save(caches, out_file)
    print("STATUS", int(status), flush=True)
    rx.close()


def sender(dtype: str, seed: str, plan_json: str, address: str, n: str) -> None:
    caches = make_caches(getattr(torch, dtype), seed=int(seed))
    tx = TcpSender(layout_of(caches), caches)
    plan = plan_from_json(plan_json)
    for layer in sorted(plan)[: int(n)]:
        src, dst = plan[layer]
        tx.send_layer(address, "t", layer, src, dst)
    while tx.stats()["layers_acked"] < int(n):
        time.sleep(0.01)
    print("SENT", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    {"receiver": receiver, "sender": sender}[sys.argv[1]](*sys.argv[2:])
