"""Triton kernels against their pure-torch references, on fresh random inputs, run by
Triton's interpreter on the CPU (TRITON_INTERPRET=1 is set before triton is imported).
Shapes stay small: the interpreter is slow."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (3, 5, 576), (2, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    got = rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    else:  # two bf16 roundings (normalised value, then times the weight): <= 2 ulps apart
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 * 2**-7, atol=1e-3)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-5)
