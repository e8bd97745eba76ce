"""The edge between protobuf and the engine's dataclasses (used by the services).

`SamplingParams` travels as `common_pb2.SamplingParams`; proto3 has no "unset" for
scalars, so 0 means "default" for max_tokens and top_p, and the optional fields carry
presence. Validation stays in the engine's dataclass: a bad value raises ValueError
naming the field, which servicers map to INVALID_ARGUMENT.

Token ids travel packed where prompts are long (`packed_prompt_token_ids`: 4 bytes an
id, uint32 little-endian). On this side they are an `array("I")`: bytes in and out with
one copy, and the engine checks an array's ids at C speed (LLMEngine.validate_prompt).
"""

from __future__ import annotations

import sys
from array import array

from protos import common_pb2

if array("I").itemsize != 4:  # C unsigned int is 4 bytes on every platform we run on
    raise ImportError("protos.convert: array('I') must hold 4-byte items")


def sampling_to_pb(p) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, min_p=p.min_p,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output, skip_special_tokens=p.skip_special_tokens,
    )
    if p.top_k is not None:
        msg.top_k = p.top_k
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_pb(msg: common_pb2.SamplingParams):
    from engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=msg.max_tokens or 16,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
    )


def logprobs_to_pb(entries, out) -> None:
    """Fill a `repeated Logprobs` field from the engine's (chosen, [(id, logprob), ...]) pairs."""
    for chosen, top in entries:
        lp = out.add(chosen=chosen)
        lp.top.extend(common_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in top)


def pack_token_ids(ids: array) -> bytes:
    """An array("I") of token ids as a packed_prompt_token_ids field."""
    if sys.byteorder == "little":
        return ids.tobytes()
    swapped = array("I", ids)
    swapped.byteswap()
    return swapped.tobytes()


def unpack_token_ids(data: bytes, field: str = "packed_prompt_token_ids") -> array:
    """A packed_prompt_token_ids field as an array("I"); ValueError naming `field` when
    its length is not whole ids."""
    if len(data) % 4:
        raise ValueError(f"{field}: {len(data)} bytes is not a whole number of 4-byte token ids")
    ids = array("I", data)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


def prompt_from_pb(msg) -> array:
    """A request's prompt (a message with `prompt_token_ids` and `packed_prompt_token_ids`)
    as an array("I"), from whichever form it came in; ValueError when both are set."""
    if msg.packed_prompt_token_ids:
        if len(msg.prompt_token_ids):
            raise ValueError("prompt_token_ids: set it or packed_prompt_token_ids, not both")
        return unpack_token_ids(msg.packed_prompt_token_ids)
    # [:] builds the list in one C call (list() iterates, ~40% slower); array() then copies it
    return array("I", msg.prompt_token_ids[:])


# Decode's block tables can hold released blocks (the chunked-local layers' blocks behind
# the current chunk); on the wire they are this id, which no pool ever hands out.
NO_BLOCK = 0xFFFFFFFF


def blocks_to_pb(tables: dict[str, list[int | None]], out) -> None:
    """Fill a `map<string, BlockIds>` field from block tables. (A table without released
    blocks, the usual case, is copied in one C call rather than id by id.)"""
    for g, table in tables.items():
        out[g].ids.extend(table if None not in table else [NO_BLOCK if b is None else b for b in table])


def blocks_from_pb(blocks) -> dict[str, list[int | None]]:
    out = {}
    for g, v in blocks.items():
        table = v.ids[:]
        out[g] = table if NO_BLOCK not in table else [None if b == NO_BLOCK else b for b in table]
    return out


def static_info(role: str, engine, layout, kv_transport: str, kv_address: str = "") -> common_pb2.InfoResponse:
    """The InfoResponse fields fixed at start-up; `fill_info` adds the live counters."""
    cfg = engine.config
    info = common_pb2.InfoResponse(role=role, model=cfg.model_dir, max_model_len=engine.max_model_len,
                                   vocab_size=cfg.model.vocab_size, kv_transport=kv_transport, kv_address=kv_address)
    info.layout.CopyFrom(common_pb2.CacheLayout(**layout.to_dict()))
    return info


def fill_info(base: common_pb2.InfoResponse, engine) -> common_pb2.InfoResponse:
    """`base` (static fields) plus the engine's live counters; call under the loop lock."""
    info = common_pb2.InfoResponse()
    info.CopyFrom(base)
    for g, s in engine.kv.stats().items():
        info.total_blocks[g] = s.total
        info.free_blocks[g] = s.cached + s.free
    try:
        engine.check_integrity()
    except AssertionError as e:  # reported, not raised: Info must answer even then
        info.integrity_error = str(e) or "integrity check failed"
    info.running = len(engine.scheduler.running)
    info.waiting = len(engine.scheduler.waiting) + len(engine.scheduler.transferring)
    return info
