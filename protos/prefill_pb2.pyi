from protos import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "sampling", "destination", "packed_prompt_token_ids", "destination_follows")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PACKED_PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sampling: _common_pb2.SamplingParams
    destination: _common_pb2.KVDestination
    packed_prompt_token_ids: bytes
    destination_follows: bool
    def __init__(self, request_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., destination: _Optional[_Union[_common_pb2.KVDestination, _Mapping]] = ..., packed_prompt_token_ids: _Optional[bytes] = ..., destination_follows: _Optional[bool] = ...) -> None: ...

class SetDestinationRequest(_message.Message):
    __slots__ = ("request_id", "destination")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    destination: _common_pb2.KVDestination
    def __init__(self, request_id: _Optional[str] = ..., destination: _Optional[_Union[_common_pb2.KVDestination, _Mapping]] = ...) -> None: ...

class SetDestinationResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_logprobs", "num_prefilled_tokens", "num_sent_tokens", "bytes_sent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_logprobs: _common_pb2.Logprobs
    num_prefilled_tokens: int
    num_sent_tokens: int
    bytes_sent: int
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[_common_pb2.Logprobs, _Mapping]] = ..., num_prefilled_tokens: _Optional[int] = ..., num_sent_tokens: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...
