"""The OpenAI request bodies we accept, as pydantic models (they also make the served
OpenAPI spec). Types are strict: "5" is not a number. Fields OpenAI defines that we do
not implement are accepted only at their neutral value (n=1, echo=false, penalties 0,
no tools), so a client never silently gets something other than it asked for. Unknown
fields are ignored, as OpenAI's own API does. vLLM's common extensions (top_k, min_p,
ignore_eos, stop_token_ids, ...) are accepted too, and `session_id` is ours.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos import common_pb2

MAX_LOGPROBS = 20  # the engine's bound (engine.sampling.MAX_LOGPROBS)
U32 = 2**32 - 1  # counts and ids travel as uint32: a larger value must be a 400, not an overflow
TokenId = Annotated[int, Field(ge=0, le=U32)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="the served model id (see /v1/models); default: the only one")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=U32, description="vLLM extension; -1 or null: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0")
    repetition_penalty: float = Field(1.0, ge=1.0, le=1.0, description="not supported: only 1")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported")
    user: str | None = None
    session_id: str | None = Field(None, min_length=1, max_length=256,
                                   description="continue a conversation: only the new part is sent")

    def sampling_pb(self, max_tokens: int | None, logprobs: int | None) -> common_pb2.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        pb = common_pb2.SamplingParams(
            max_tokens=max_tokens or 0, temperature=self.temperature, top_p=self.top_p, min_p=self.min_p,
            stop=stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens)
        if self.top_k is not None and self.top_k > 0:
            pb.top_k = self.top_k
        if self.seed is not None:
            pb.seed = self.seed
        if logprobs is not None:
            pb.logprobs = logprobs
        return pb

    @model_validator(mode="after")
    def _check(self):
        if any(s == "" for s in ([self.stop] if isinstance(self.stop, str) else self.stop or [])):
            raise ValueError("stop: a stop string must not be empty")
        if self.top_k == 0:
            raise ValueError("top_k: must be >= 1, or -1 / null for off")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        ..., description="text, token ids, or a batch of either")
    max_tokens: int | None = Field(16, ge=1, le=U32)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="not supported: only false")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: only 1")
    suffix: str | None = Field(None, max_length=0, description="not supported")

    @model_validator(mode="after")
    def _check_prompt(self):
        if self.echo:
            raise ValueError("echo: not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        if self.session_id and len(self.prompts()) > 1:
            raise ValueError("session_id: a session takes one prompt at a time, not a batch")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"] = Field("text", description="only text is supported")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=U32, description="default: until a stop or the context is full")
    max_completion_tokens: int | None = Field(None, ge=1, le=U32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = Field(None, max_length=0, description="not supported")
    tool_choice: Literal["none"] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
