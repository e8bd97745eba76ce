"""Shared by the services tests: the services as real processes, and what the tests ask
of them (a generation, whole block pools)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

from engine.sampling import SamplingParams
from protos import common_pb2, decode_pb2
from protos.convert import pack_token_ids, sampling_to_pb
from protos.grpc_server import wait_healthy

ROOT = Path(__file__).resolve().parents[2]
# TANDEM_TEST_DEVICE=cuda runs the services (and the offline reference, conftest.py) on the
# GPU in float32, KV still over tcp: the same tests then cover the CUDA data path (pinned
# staging, the receiver's own stream). CI runs them on the CPU.
DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
ENGINE_FLAGS = ["--num-blocks", "96", "--max-model-len", "512", "--max-num-batched-tokens", "64",
                "--device", DEVICE, "--dtype", "float32"]  # float32: the CPU's default anyway


class Service:
    """`python -m module --model model ...` on a free port, its output kept in `log`."""

    def __init__(self, module: str, model, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--model", str(model), "--port", "0", "--log-level", "WARNING",
             *ENGINE_FLAGS, *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        self.log = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{module} exited: {''.join(self.log)}")
            self.log.append(line)
            m = re.search(r"listening on (\S+?):(\d+)", line)
            if m:
                self.address = f"{m.group(1)}:{m.group(2)}"
                break
            if time.monotonic() > deadline:
                raise TimeoutError(module)
        threading.Thread(target=self._drain, daemon=True).start()
        wait_healthy(self.address)

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def params(n=16, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def generate_request(prompt, prefill_address, n=16, rid="", sampling=None, packed=False):
    req = decode_pb2.GenerateRequest(request_id=rid, sampling=sampling_to_pb(sampling or params(n)),
                                     prefill_address=prefill_address)
    if packed:
        req.packed_prompt_token_ids = pack_token_ids(array("I", prompt))
    else:
        req.prompt_token_ids.extend(prompt)
    return req


def generate(stub, prompt, prefill_address, n=16, rid="", sampling=None, packed=False):
    """(all tokens, the last response) of one Generate call, which must finish."""
    req = generate_request(prompt, prefill_address, n, rid, sampling, packed)
    tokens, last = [], None
    for r in stub.Generate(req, timeout=300):
        tokens.extend(r.token_ids)
        last = r
    assert last.finished
    return tokens, last


def concurrently(fn, n):
    """[fn(0), ..., fn(n - 1)], each called on its own thread, all at once."""
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def prefix_hit_moves_only_the_rest(stub, prefill_address: str, offline, seed: int) -> None:
    """Two prompts sharing 96 tokens (6 blocks) through decode `stub`: the second finds
    them in decode's cache, so prefill sends only the rest, and the tokens equal offline."""
    rng = random.Random(seed)
    shared = [rng.randrange(202048) for _ in range(96)]
    a, b = shared + [rng.randrange(202048) for _ in range(40)], shared + [rng.randrange(202048) for _ in range(50)]
    generate(stub, a, prefill_address)
    tokens, last = generate(stub, b, prefill_address)
    assert tokens == offline.generate(b, params())[0].token_ids
    assert last.num_cached_tokens == 96 and last.num_transferred_tokens == len(b) - 96


def pools_whole(stub, timeout=10.0):
    """Wait until the service's block pools are all free and pass its integrity check."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.Info(common_pb2.InfoRequest())
        assert info.integrity_error == "", info.integrity_error
        if all(info.free_blocks[g] == info.total_blocks[g] for g in info.total_blocks) and not info.running \
                and not info.waiting:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks not returned: {info}")
        time.sleep(0.1)
