"""A kv_transfer peer in its own process, driven by the tests.

    python -m tests.kv_transfer.peer receiver DTYPE PLAN_JSON OUT_FILE [BACKEND]
        poisoned caches; expect("t", plan); print "ADDRESS host:port"; wait for the
        transfer; save the caches to OUT_FILE; print "STATUS n"
    python -m tests.kv_transfer.peer sender DTYPE SEED PLAN_JSON ADDRESS N [BACKEND [MIN_DIRECT_BLOCKS]]
        random caches (SEED); send the plan's first N layers of transfer "t"; print "SENT"
        once they are acked; then sleep until killed
BACKEND: a key of helpers.BACKENDS, "tcp" (default) or "gloo" (the NCCL control flow on CPU).
MIN_DIRECT_BLOCKS: the sender's option (default: its own, far above these tiny plans).
"""

import sys
import time

import torch

from tests.kv_transfer.helpers import BACKENDS, dst_of, layout_of, make_caches, plan_from_json


def receiver(dtype: str, plan_json: str, out_file: str, backend: str = "tcp") -> None:
    caches = make_caches(getattr(torch, dtype), seed=None)
    rx = BACKENDS[backend][1](layout_of(caches), caches)
    rx.expect("t", dst_of(plan_from_json(plan_json)))
    print("ADDRESS", rx.address, flush=True)
    status = rx.wait("t", timeout=60)
    torch.save(caches, out_file)
    print("STATUS", int(status), flush=True)
    rx.close()


def sender(dtype: str, seed: str, plan_json: str, address: str, n: str, backend: str = "tcp",
           min_direct_blocks: str | None = None) -> None:
    caches = make_caches(getattr(torch, dtype), seed=int(seed))
    tx = BACKENDS[backend][0](layout_of(caches), caches,
                              min_direct_blocks=None if min_direct_blocks is None else int(min_direct_blocks))
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
