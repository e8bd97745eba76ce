"""TritonOps runs a step's prefill segments through the paged prefill kernel
(tandem_kernels/prefill_attention.py) from build_metadata's PrefillBatch, in one launch beside
the decode rows; it must attend exactly like TorchOps' per-segment SDPA. One small step
as the engine builds it: decode rows, a chunk after a cached prefix, a fresh prefill, a
prefill cut at a local-chunk boundary; global and chunked-local layers (released blocks
are -1); the prefill rows back to back or split by a decode row. Kernels run in
Triton's interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.attention import SeqSpan, build_metadata  # noqa: E402
from engine.ops import TorchOps  # noqa: E402

BS, KVH, G, D, NUM_BLOCKS = 16, 2, 3, 16, 12
CHUNK = 32


def _spans(split: bool) -> list[SeqSpan]:
    """A decode at 40, a 12-token chunk after a 20-token prefix, (split: a decode at 3),
    a fresh 5-token prefill, and 10 tokens from 27 (cut at 32 on the local layers)."""
    spans = [SeqSpan(0, 40, 1, (5, 2, 9)), SeqSpan(1, 20, 12, (7, 1))]
    row = 13
    if split:
        spans.append(SeqSpan(row, 3, 1, (4,)))
        row += 1
    return spans + [SeqSpan(row, 0, 5, (8,)), SeqSpan(row + 5, 27, 10, (3, 10, 11))]


def _local(spans: list[SeqSpan]) -> list[SeqSpan]:
    """The chunked-local layers' view: blocks before each request's chunk are released."""
    out = []
    for s in spans:
        first = (s.q_start // CHUNK) * CHUNK // BS
        out.append(SeqSpan(s.batch_start, s.q_start, s.num_tokens,
                           tuple(None if j < first else b for j, b in enumerate(s.block_table))))
    return out


@pytest.mark.parametrize("split", [False, True], ids=["back-to-back", "split-by-a-decode-row"])
@pytest.mark.parametrize("chunk", [None, CHUNK], ids=["global", "local"])
def test_triton_prefill_kernel_attends_like_torch_sdpa(split, chunk):
    from engine.ops import TritonOps

    spans = _spans(split) if chunk is None else _local(_spans(split))
    meta = build_metadata(spans, BS, chunk, torch.device("cpu"))
    pb = meta.prefill_batch
    assert isinstance(pb.rows, slice) != split  # the rows tensor path when a decode row splits them
    assert pb.num_tokens == sum(s.num_tokens for s in spans if s.num_tokens > 1)
    assert len(pb.kv_start) == len(meta.prefills) == (4 if chunk else 3)  # 27..37 cut at 32 on local layers
    gen = torch.Generator().manual_seed(7 + split + 2 * (chunk is None))
    cache = torch.randn(2, NUM_BLOCKS, BS, KVH, D, generator=gen)
    q = torch.randn(len(meta.slot_mapping), KVH * G, D, generator=gen)
    want = TorchOps().attention(q, cache, meta, 0.25)
    ops = TritonOps()
    ops.on_cpu = ops.prefill_on_cpu = True
    got = ops.attention(q, cache, meta, 0.25)
    assert pb.plan is not None  # built by this first layer, kept for the others
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert torch.equal(ops.attention(q, cache, meta, 0.25), got)  # a second layer, on the kept plan


def test_a_step_without_prefill_has_no_prefill_batch():
    meta = build_metadata([SeqSpan(0, 40, 1, (5, 2, 9))], BS, None, torch.device("cpu"))
    assert meta.prefill_batch is None and not meta.prefills
