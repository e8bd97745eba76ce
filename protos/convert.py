"""The edge between protobuf and the engine's dataclasses (used by the services).

`SamplingParams` travels as `common_pb2.SamplingParams`; proto3 has no "unset" for
scalars, so 0 means "default" for max_tokens and top_p, and the optional fields carry
presence. Validation stays in the engine's dataclass: a bad value raises ValueError
naming the field, which servicers map to INVALID_ARGUMENT.
"""

from __future__ import annotations

from protos import common_pb2


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


# Decode's block tables can hold released blocks (the chunked-local layers' blocks behind
# the current chunk); on the wire they are this id, which no pool ever hands out.
NO_BLOCK = 0xFFFFFFFF


def blocks_to_pb(tables: dict[str, list[int | None]], out) -> None:
    """Fill a `map<string, BlockIds>` field from block tables."""
    for g, table in tables.items():
        out[g].ids.extend(NO_BLOCK if b is None else b for b in table)


def blocks_from_pb(blocks) -> dict[str, list[int | None]]:
    return {g: [None if b == NO_BLOCK else b for b in v.ids] for g, v in blocks.items()}


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
