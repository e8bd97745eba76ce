"""The gRPC client against a small in-process tandem.api.v1.Tandem servicer."""

import asyncio

import grpc

from loadtest.clients import ClientConfig, GrpcClient, grpc_target
from loadtest.workloads import RequestSpec
from protos import api_pb2, api_pb2_grpc


class FakeTandem(api_pb2_grpc.TandemServicer):
    """Streams one token per message; the model name picks a misbehaviour."""

    def __init__(self):
        self.requests = []

    async def ListModels(self, request, context):
        return api_pb2.ListModelsResponse(models=[api_pb2.Model(id="fake-model", max_model_len=128)])

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.model == "overloaded":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        n = request.sampling.max_tokens
        prompt_len = len(request.token_ids.ids) if request.HasField("token_ids") else len(request.text.split())
        for i in range(n):
            await asyncio.sleep(0.001)
            last = i == n - 1
            if last and request.model == "cut":
                return  # the stream ends without a finished message
            resp = api_pb2.GenerateResponse(request_id="r", token_ids=[1000 + i], text=f"t{i} ", finished=last)
            if last:
                resp.finish_reason = "length"
                resp.usage.CopyFrom(api_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=n, cached_tokens=2))
            yield resp


def run(model, spec):
    async def main():
        server = grpc.aio.server()
        servicer = FakeTandem()
        api_pb2_grpc.add_TandemServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with GrpcClient(ClientConfig(backend="grpc", base_url=f"grpc://127.0.0.1:{port}")) as client:
                return (await client.send(spec, model), await client.list_models(), await client.ready(),
                        servicer.requests)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_generate_stream_is_timed_and_counted():
    rec, models, ready, reqs = run("fake-model", RequestSpec((7, 8, 9), 5, session_id="s1"))
    assert models == ["fake-model"] and ready
    assert rec.success and rec.output_tokens == 5 and rec.prompt_len == 3 and rec.cached_tokens == 2
    assert len(rec.itl) == 4 and 0 < rec.ttft < rec.latency and rec.generated_text == "t0 t1 t2 t3 t4 "
    req = reqs[0]
    assert list(req.token_ids.ids) == [7, 8, 9] and req.session_id == "s1"
    assert req.sampling.max_tokens == 5 and req.sampling.ignore_eos


def test_text_prompts_and_failures():
    rec, *_, reqs = run("fake-model", RequestSpec("a b c d", 2))
    assert rec.success and rec.prompt_len == 4 and reqs[0].text == "a b c d"
    rec, *_ = run("overloaded", RequestSpec((1,), 2))
    assert not rec.success and rec.error == "grpc_RESOURCE_EXHAUSTED" and rec.error_message == "queue full"
    rec, *_ = run("cut", RequestSpec((1,), 3))
    assert not rec.success and rec.error == "incomplete_stream"


def test_grpc_targets():
    assert grpc_target("grpc://127.0.0.1:50051") == "127.0.0.1:50051"
    assert grpc_target("http://[::1]:9000/") == "[::1]:9000"
    assert grpc_target("localhost:1") == "localhost:1"
