"""One error type for everything a client can get wrong or the cluster can refuse, with
its HTTP status, OpenAI error type/code and gRPC status side by side, so the REST shim
and the gRPC API answer the same failure the same way."""

from __future__ import annotations

import grpc

_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         409: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error", 500: "server_error", 503: "server_error",
         504: "server_error"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC.get(self.status, grpc.StatusCode.UNKNOWN)

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if param else None)


def from_value_error(e: ValueError) -> GatewayError:
    """The engine's and tokenizer's ValueErrors start with the field: 'max_tokens: ...'."""
    msg = str(e)
    field, sep, _ = msg.partition(":")
    return bad_request(msg, field.strip() if sep and " " not in field.strip() else None)
