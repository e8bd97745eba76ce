"""Paged decode attention: one new query per sequence, keys and values read from the
paged KV cache through the sequence's block table.

    program (b, kv_head, split): the G = H / KVH query heads that share kv_head read each
    key block once; the sequence's visible keys [kv_start, kv_start + kv_len) are cut
    into NUM_SPLITS runs of whole blocks (flash-decoding), each run reduced with an
    online softmax into (acc, max, sum); the wrapper merges the runs.

`kv_start` is what makes the same kernel serve both Llama 4 layer kinds: 0 for the
global layers, the start of the query's chunk for the chunked-local ones, whose
block-table entries before it may be released (-1): they are never read.

Bytes per step: q, plus K and V of every visible key once per KV head (GQA-shared), plus
the partials: the ceiling is the copy bandwidth on those bytes (bench/kernels.py).
The engine's `TritonOps` runs every decode row of a CUDA step through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_block(q, k_ptr, v_ptr, table_ptr, b, kvh, blk, hi, start, length, m_i, l_i, acc,
                  stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
                  D: tl.constexpr, BS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold logical block `blk` (skipped when blk >= hi) into the online softmax state."""
    t = tl.arange(0, BS)
    d = tl.arange(0, D)
    inside = blk < hi
    phys = tl.load(table_ptr + b * stride_tb + blk, mask=inside, other=0).to(tl.int64)
    # One unsigned comparison for start <= pos < start + length (and nothing past hi):
    # Triton 3.9's interpreter turns `a & b` of masks into int32, which loads reject.
    visible = tl.where(inside, length, 0).to(tl.uint32)
    valid = (blk * BS + t - start).to(tl.uint32) < visible
    k = tl.load(k_ptr + phys * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                mask=valid[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, BS], fp32 accumulate
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps its
    # alpha and p at exp(-inf) = 0 rather than exp(-inf - -inf) = nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + phys * stride_vb + t[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                mask=valid[:, None], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,  # [num_blocks, block_size, KVH, D]
    table_ptr,  # [B, W] int32 physical block of each logical block (-1: released)
    start_ptr,  # [B] int32 first visible key position
    len_ptr,  # [B] int32 visible keys (>= 1)
    acc_ptr,  # [B, S, H, D] fp32 partial outputs (unnormalised)
    m_ptr,  # [B, S, H] fp32 partial row maxima
    l_ptr,  # [B, S, H] fp32 partial sums of exp
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # G padded for tl.dot (>= 16)
    D: tl.constexpr,
    BS: tl.constexpr,  # cache block size
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,  # CPU interpreter: fp32 dot operands (its bf16 dot is wrong)
    INTERP_BLOCKS: tl.constexpr,  # interpreter only: most blocks in a split (0 on GPU: no recompiles)
    PRECISION: tl.constexpr,  # tl.dot of fp32 caches: "ieee" (TF32 would cost fp32 parity); unused for 16-bit
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    H = G * tl.num_programs(1)
    start = tl.load(start_ptr + b)
    length = tl.load(len_ptr + b)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    q = (q.to(tl.float32) * scale).to(tl.float32 if UPCAST else k_ptr.dtype.element_ty)

    # Each sequence cuts its own blocks into NUM_SPLITS runs, so nothing about the lengths
    # is baked into the launch (a CUDA graph replays it for any lengths).
    first = start // BS
    last = (start + length - 1) // BS  # inclusive
    per_split = (last - first + NUM_SPLITS) // NUM_SPLITS
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, last + 1)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if UPCAST:
        # In the interpreter, program ids and scalar arguments are 1-element arrays, not
        # ints, so they cannot bound a loop: walk a constexpr width and mask the rest.
        for i in range(0, INTERP_BLOCKS):
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, table_ptr, b, kvh, lo + i, hi, start, length,
                                          m_i, l_i, acc, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                          stride_vh, stride_tb, D, BS, UPCAST, PRECISION)
    else:
        for blk in range(lo, hi):
            m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, table_ptr, b, kvh, blk, hi, start, length,
                                          m_i, l_i, acc, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                          stride_vh, stride_tb, D, BS, UPCAST, PRECISION)

    part = (b * NUM_SPLITS + split) * H + heads  # [BLOCK_G] rows of the partial tensors
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(m_ptr + part, m_i, mask=gmask)
    tl.store(l_ptr + part, l_i, mask=gmask)


def choose_num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Flash-decoding splits: about two programs per SM, but no split shorter than 8
    blocks (shorter runs cost more in partials and merging than they win)."""
    want = -(-2 * num_sms // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_blocks // 8), 32))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor,
                           scale: float, num_splits: int = 1, validate: bool = True) -> torch.Tensor:
    """q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] (a layer's
    kv_cache[0] and [1]); block_tables: [B, W] int32; kv_start, kv_len: [B] int32. Query b
    sees keys at positions [kv_start[b], kv_start[b] + kv_len[b]). Returns [B, H, D] in q's
    dtype. num_splits > 1 spreads one long sequence over more programs.

    validate=False skips the checks that read the index tensors' values (each one a
    device-to-host sync): the engine passes it for metadata it built itself, and a CUDA
    graph must, since a capture cannot sync."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q: [B, H, D] and caches [blocks, block_size, KVH, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, h, d = q.shape
    _, bs, kvh, dk = k_cache.shape
    if dk != d or h % kvh:
        raise ValueError(f"q: {h} heads of {d} do not fit {kvh} KV heads of {dk}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q and caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or kv_start.dtype != torch.int32 or kv_len.dtype != torch.int32:
        raise ValueError("block_tables, kv_start, kv_len: must be int32")
    if block_tables.shape[0] != b or kv_start.shape != (b,) or kv_len.shape != (b,):
        raise ValueError(f"block_tables / kv_start / kv_len: one row per query ({b}) expected")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, caches and block_tables: last dimension must be contiguous")
    if d < 16 or d & (d - 1) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"head_dim ({d}) and block_size ({bs}) must be powers of two >= 16")
    if num_splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {num_splits}")
    if validate and b and (int(kv_len.min()) < 1 or int(kv_start.min()) < 0):
        raise ValueError("kv_len: every query sees at least one key; kv_start: >= 0")
    if validate and b and int(((kv_start + kv_len - 1) // bs).max()) >= block_tables.shape[1]:
        raise ValueError("block_tables: too few columns for kv_start + kv_len")
    g = h // kvh
    interp_blocks = 0
    if q.device.type == "cpu" and b:  # the interpreter's loop needs a constant trip count
        blocks = int(((kv_start + kv_len - 1) // bs - kv_start // bs).max()) + 1
        interp_blocks = triton.cdiv(blocks, num_splits)
    acc = torch.empty(b, num_splits, h, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, num_splits, h, device=q.device, dtype=torch.float32)
    l = torch.empty(b, num_splits, h, device=q.device, dtype=torch.float32)
    if b:
        _paged_decode_kernel[(b, kvh, num_splits)](
            q, k_cache, v_cache, block_tables, kv_start, kv_len, acc, m, l, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BS=bs, NUM_SPLITS=num_splits,
            UPCAST=q.device.type == "cpu", INTERP_BLOCKS=interp_blocks,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
    # Merge the splits: an empty split has m = -inf and weighs nothing.
    w = torch.exp(m - m.amax(1, keepdim=True))  # [B, S, H]
    out = (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None]
    return out.to(q.dtype)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv_start, kv_len, scale) -> torch.Tensor:
    """Plain torch, one sequence at a time, in fp32."""
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        pos = torch.arange(int(kv_start[i]), int(kv_start[i] + kv_len[i]), device=q.device)
        blocks = block_tables[i, pos // bs].long()
        k = k_cache[blocks, pos % bs].float()  # [L, KVH, D]
        v = v_cache[blocks, pos % bs].float()
        k, v = (x.repeat_interleave(h // kvh, dim=1).transpose(0, 1) for x in (k, v))  # [H, L, D]
        p = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2))[:, 0] * scale, dim=-1)  # [H, L]
        out[i] = (p[:, None, :] @ v)[:, 0]
    return out.to(q.dtype)
