"""One prefill and one decode service for the whole session (each takes seconds to start),
shared by the services tests, and the offline engine their output must equal."""

import signal

import grpc
import pytest

from engine.llm import LLM
from protos import decode_pb2_grpc
from tests.services.helpers import DEVICE, Service


@pytest.fixture(scope="session")
def stack(tiny_llama4_dir):
    p = Service("prefill_service", tiny_llama4_dir)
    d = Service("decode_service", tiny_llama4_dir)
    ch = grpc.insecure_channel(d.address)
    yield p, d, decode_pb2_grpc.DecodeServiceStub(ch)
    ch.close()
    for s in (d, p):
        s.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def offline(tiny_llama4_dir):
    return LLM(tiny_llama4_dir, num_blocks=96, max_model_len=512, device=DEVICE, dtype="float32")
