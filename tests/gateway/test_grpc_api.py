"""A gRPC client built from our protos against the gateway: streams (same text as the
offline engine), chats, aborts mid-stream, lists models; health and reflection answer;
bad requests get the right status codes."""

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.sampling import SamplingParams
from protos import api_pb2, api_pb2_grpc, common_pb2

from .conftest import API_KEY

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return api_pb2_grpc.TandemStub(channel)


def greedy(n, **kw):
    return common_pb2.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_generate_streams_offline_text(stub, offline, model_name):
    prompt = "Once upon a time in a land far away"
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    resps = list(stub.Generate(api_pb2.GenerateRequest(model=model_name, text=prompt, sampling=greedy(10)),
                               metadata=AUTH, timeout=60))
    assert len(resps) >= 2, "tokens come in several messages"
    assert "".join(r.text for r in resps) == ref.text
    assert [t for r in resps for t in r.token_ids] == ref.token_ids
    last = resps[-1]
    assert last.finished and last.finish_reason == "length"
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids) and last.usage.completion_tokens == 10
    assert len({r.request_id for r in resps}) == 1


def test_chat_and_token_ids(stub, offline, model_name):
    msgs = [{"role": "user", "content": "Say hello."}]
    ref = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    resps = list(stub.Chat(api_pb2.ChatRequest(model=model_name, messages=[api_pb2.ChatMessage(**m) for m in msgs],
                                               sampling=greedy(6)), metadata=AUTH, timeout=60))
    assert "".join(r.text for r in resps) == ref.text
    ids = ref.prompt_token_ids
    resps = list(stub.Generate(api_pb2.GenerateRequest(model=model_name, token_ids=api_pb2.TokenIds(ids=ids),
                                                       sampling=greedy(6)), metadata=AUTH, timeout=60))
    assert [t for r in resps for t in r.token_ids] == ref.token_ids


def test_abort_mid_stream(stub, model_name, channel):
    """Abort by id from a second call: the stream ends with finish_reason 'abort' long
    before max_tokens; aborting again finds nothing."""
    call = stub.Generate(api_pb2.GenerateRequest(model=model_name, request_id="grpc-abort-1", text="count: 1 2 3",
                                                 sampling=greedy(400)), metadata=AUTH, timeout=120)
    got = []
    first = threading.Event()

    def read():
        for r in call:
            got.append(r)
            first.set()

    t = threading.Thread(target=read)
    t.start()
    assert first.wait(60)
    assert stub.Abort(common_pb2.AbortRequest(request_id="grpc-abort-1"), metadata=AUTH, timeout=10).found
    t.join(60)
    assert got[-1].finished and got[-1].finish_reason == "abort"
    assert sum(len(r.token_ids) for r in got) < 400
    assert not stub.Abort(common_pb2.AbortRequest(request_id="grpc-abort-1"), metadata=AUTH, timeout=10).found


def test_list_models_health_reflection(stub, channel, model_name):
    models = stub.ListModels(api_pb2.ListModelsRequest(), metadata=AUTH, timeout=10).models
    assert [m.id for m in models] == [model_name] and models[0].max_model_len == 512
    hs = health_pb2_grpc.HealthStub(channel)
    for name in ("", "tandem.api.v1.Tandem"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tandem.api.v1.Tandem", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("make, code, field", [
    (lambda m: api_pb2.GenerateRequest(model=m, sampling=greedy(4)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (lambda m: api_pb2.GenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "nope"),
    (lambda m: api_pb2.GenerateRequest(model=m, text="hi", sampling=common_pb2.SamplingParams(top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (lambda m: api_pb2.GenerateRequest(model=m, token_ids=api_pb2.TokenIds(ids=[10**9])),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (lambda m: api_pb2.GenerateRequest(model=m, text="x " * 600), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
])
def test_bad_requests(stub, model_name, make, code, field):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(make(model_name), metadata=AUTH, timeout=30))
    assert e.value.code() == code and field in e.value.details()


def test_needs_api_key(stub, model_name):
    for md in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(api_pb2.ListModelsRequest(), metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Chat(api_pb2.ChatRequest(model=model_name, messages=[api_pb2.ChatMessage(role="user", content="x")]),
                       timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
