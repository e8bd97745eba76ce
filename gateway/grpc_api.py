"""The public gRPC API (`tandem.api.v1.Tandem`, protos/api.proto) over the same pipeline
as the REST shim, with standard health checking and server reflection. Errors map to
status codes (INVALID_ARGUMENT naming the field, NOT_FOUND for an unknown model,
UNAUTHENTICATED, RESOURCE_EXHAUSTED with a retry-after trailer); a cancelled call
aborts its request everywhere."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.core import Gateway
from gateway.errors import GatewayError, bad_request
from protos import api_pb2, api_pb2_grpc, common_pb2

SERVICE = "tandem.api.v1.Tandem"


class TandemServicer(api_pb2_grpc.TandemServicer):
    def __init__(self, gw: Gateway):
        self.gw = gw

    async def _check(self, context, model: str | None) -> None:
        try:
            self.gw.check_api_key(dict(context.invocation_metadata() or ()).get("authorization", ""))
            self.gw.check_model(model or None)
        except GatewayError as e:
            await _abort(context, e)

    async def _stream(self, job, context):
        gen = self.gw.run(job)
        try:
            async for c in gen:
                resp = api_pb2.GenerateResponse(request_id=job.request_id, token_ids=c.token_ids, text=c.text,
                                                finished=c.finished, finish_reason=c.finish_reason or "",
                                                logprobs=c.logprobs)
                if c.usage:
                    resp.usage.CopyFrom(api_pb2.Usage(prompt_tokens=c.usage.prompt_tokens,
                                                      completion_tokens=c.usage.completion_tokens,
                                                      cached_tokens=c.usage.cached_tokens))
                yield resp
        except GatewayError as e:
            await _abort(context, e)
        finally:
            await gen.aclose()

    async def Generate(self, request, context):
        await self._check(context, request.model)
        which = request.WhichOneof("prompt")
        if which is None:
            await _abort(context, bad_request("prompt: set text or token_ids", "prompt"))
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        async for r in self._run(self.gw.prepare_completion, prompt, request, context):
            yield r

    async def Chat(self, request, context):
        await self._check(context, request.model)
        if not request.messages:
            await _abort(context, bad_request("messages: must not be empty", "messages"))
        roles = {"system", "developer", "user", "assistant", "tool"}
        for i, m in enumerate(request.messages):
            if m.role not in roles:
                await _abort(context, bad_request(f"messages[{i}].role: must be one of {sorted(roles)}, "
                                                  f"got {m.role!r}", f"messages[{i}].role"))
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in request.messages]
        async for r in self._run(self.gw.prepare_chat, msgs, request, context):
            yield r

    async def _run(self, prepare, prompt, request, context):
        """prepare_completion / prepare_chat with the request's common fields, then stream."""
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)  # the gateway fills in defaults: not the caller's message
        try:
            job = await prepare(prompt, sampling, request_id=request.request_id or None,
                                session_id=request.session_id or None)
        except GatewayError as e:
            await _abort(context, e)
        async for r in self._stream(job, context):
            yield r

    async def Abort(self, request, context):
        await self._check(context, None)
        try:
            return common_pb2.AbortResponse(found=await self.gw.abort(request.request_id))
        except GatewayError as e:
            await _abort(context, e)

    async def ListModels(self, request, context):
        await self._check(context, None)
        gw = self.gw
        return api_pb2.ListModelsResponse(models=[api_pb2.Model(
            id=gw.cfg.served_model_name, max_model_len=gw.max_model_len, created=gw.created, owned_by="tandem")])


async def _abort(context, e: GatewayError):
    if e.retry_after:
        context.set_trailing_metadata((("retry-after", str(max(1, round(e.retry_after)))),))
    await context.abort(e.grpc_code, e.message)


async def start_server(gw: Gateway, host: str, port: int) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    api_pb2_grpc.add_TandemServicer_to_server(TandemServicer(gw), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = (api_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, hs
