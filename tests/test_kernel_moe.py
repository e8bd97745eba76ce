"""The fused top-1 MoE kernels (tandem_kernels/moe.py) against the pure-torch reference and the
engine's torch path, in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET).
Shapes stay tiny: the interpreter is slow."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from engine.ops import TorchOps  # noqa: E402
from tandem_kernels.moe import GemmTiles, MoeTiles, choose_tiles, fused_moe, fused_moe_reference  # noqa: E402


def _weights(gen, e, h, i, dtype):
    """Router, gate_up, down scaled so activations stay O(1)."""
    router = torch.randn(e, h, generator=gen) / h**0.5
    gate_up = torch.randn(e, h, 2 * i, generator=gen) / h**0.5
    down = torch.randn(e, i, h, generator=gen) / i**0.5
    return router.to(dtype), gate_up.to(dtype), down.to(dtype)


def _random_case(seed, t, h, i, e, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    return (x.to(dtype), *_weights(gen, e, h, i, dtype))


def _routed_case(seed, experts, h, i, e, dtype):
    """Token j goes to experts[j]: the router reads the first E features, and x carries a
    large spike at feature experts[j] over small noise (needs H >= E)."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.tensor(experts)
    x = 0.1 * torch.randn(len(experts), h, generator=gen)
    x[torch.arange(len(experts)), experts] += 4.0
    _, gate_up, down = _weights(gen, e, h, i, dtype)
    router = torch.eye(e, h)
    return x.to(dtype), router.to(dtype), gate_up, down


def _assert_matches(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:  # the bar: relative error <= 1e-2 on the output
        rel = (out.float() - ref.float()).norm() / ref.float().norm()
        assert rel <= 1e-2, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,i,e", [(1, 32, 16, 4), (5, 64, 48, 16), (37, 64, 48, 4), (37, 32, 16, 1)])
def test_fused_moe_matches_reference(dtype, t, h, i, e):
    x, router, gate_up, down = _random_case(t * 1000 + h + i + e, t, h, i, e, dtype)
    _assert_matches(fused_moe(x, router, gate_up, down), fused_moe_reference(x, router, gate_up, down), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_engine_torch_path(dtype):
    x, router, gate_up, down = _random_case(7, 12, 64, 48, 16, dtype)
    out, torch_path = fused_moe(x, router, gate_up, down), TorchOps().moe(x, router, gate_up, down)
    _assert_matches(out, torch_path, dtype)
    if dtype == torch.bfloat16:  # same rounding points: nearly every element is the same bf16
        assert (out == torch_path).float().mean() >= 0.99


# Tile shapes the default heuristic never picks for these tiny shapes: several K steps
# and N-tiles, split-K (with a last split shorter than the rest), 32-row M-tiles, and
# group sizes that leave a ragged last group.
FORCED = {
    "16x16x16": MoeTiles(GemmTiles(16, 16, 16), GemmTiles(16, 16, 16)),
    "split3": MoeTiles(GemmTiles(16, 32, 16), GemmTiles(16, 32, 16, split_k=3)),
    "m32-group1": MoeTiles(GemmTiles(32, 16, 32, group_m=1), GemmTiles(32, 16, 16, split_k=2, group_m=1)),
    "group3": MoeTiles(GemmTiles(16, 16, 16, group_m=3), GemmTiles(16, 16, 32, group_m=3)),
}


@pytest.mark.parametrize("name", sorted(FORCED))
def test_fused_moe_tile_shapes(name):
    x, router, gate_up, down = _random_case(11, 21, 32, 48, 4, torch.float32)
    out = fused_moe(x, router, gate_up, down, tiles=FORCED[name])
    _assert_matches(out, fused_moe_reference(x, router, gate_up, down), torch.float32)


@pytest.mark.parametrize("experts", [
    [2] * 37,  # every token to one expert: three full-ish tiles, the other experts empty
    [0, 1, 2] + [3] * 34,  # 1 + 1 + 1 + 3 tiles: exactly the grid's M-tile bound
    [3, 0, 3, 3, 0, 3],  # interleaved tokens, experts 1 and 2 empty
])
def test_fused_moe_skewed_routing(experts):
    x, router, gate_up, down = _routed_case(len(experts), experts, 32, 16, 4, torch.float32)
    assert torch.equal(torch.nn.functional.linear(x, router).argmax(-1), torch.tensor(experts))
    out = fused_moe(x, router, gate_up, down, tiles=FORCED["16x16x16"])
    _assert_matches(out, fused_moe_reference(x, router, gate_up, down), torch.float32)


def test_fused_moe_is_deterministic():
    x, router, gate_up, down = _random_case(3, 9, 32, 16, 4, torch.bfloat16)
    first = fused_moe(x, router, gate_up, down, tiles=FORCED["split3"])
    assert torch.equal(first, fused_moe(x, router, gate_up, down, tiles=FORCED["split3"]))


def test_fused_moe_no_tokens():
    _, router, gate_up, down = _random_case(0, 1, 32, 16, 4, torch.bfloat16)
    out = fused_moe(torch.empty(0, 32, dtype=torch.bfloat16), router, gate_up, down)
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


def test_fused_moe_rejects_bad_inputs():
    x, router, gate_up, down = _random_case(0, 3, 32, 16, 4, torch.float32)
    bad = [
        ("x", (x[None], router, gate_up, down)),
        ("x", (x.t(), router, gate_up, down)),
        ("x", (x.double(), router, gate_up, down)),
        ("router", (x, router[:, :16], gate_up, down)),
        ("gate_up", (x, router, gate_up[:, :, :31], down)),
        ("gate_up", (x, router, gate_up[:3], down)),
        ("down", (x, router, gate_up, down[:, :8])),
        ("router", (x, router.bfloat16(), gate_up, down)),
        ("down", (x, router, gate_up, down.bfloat16())),
        ("gate_up", (x, router, gate_up.transpose(1, 2).contiguous().transpose(1, 2), down)),
    ]
    for name, args in bad:
        with pytest.raises(ValueError, match=name):
            fused_moe(*args)
    with pytest.raises(ValueError, match="block_n"):
        GemmTiles(16, 48, 16)
    with pytest.raises(ValueError, match="gate_up"):
        MoeTiles(GemmTiles(16, 16, 16, split_k=2), GemmTiles(16, 16, 16))


def test_choose_tiles_fills_the_gpu_at_decode_and_uses_big_tiles_at_prefill():
    h, i, e, sms = 5120, 8192, 16, 132  # Scout on an H100
    one = choose_tiles(1, e, h, i, sms)
    assert one.gate_up.block_m == one.down.block_m == 16
    assert i // one.gate_up.block_n >= 0.9 * sms  # one expert's gate/up columns cover the SMs
    assert (h // one.down.block_n) * one.down.split_k >= 0.9 * sms  # down needs split-K to do so
    assert one.down.split_k > 1
    assert choose_tiles(64, e, h, i, sms).down.split_k == 1
    big = choose_tiles(8192, e, h, i, sms)
    assert big.gate_up.block_m == big.down.block_m == 128 and big.down.split_k == 1
