"""The engine with an fp8 KV cache (`kv_cache_dtype="fp8"`, `--kv-cache-dtype fp8`).

The cache holds e4m3 (float8_e4m3fn) read and written with the runner's [2] fp32 (K, V)
scales, 1.0 each. What must hold:
  - config: "auto" and "fp8" only; the caches are fp8 and a byte budget buys twice the
    blocks it buys in bf16;
  - wiring, exactly: every layer writes and reads with the scales, so the fp8 engine's
    logits and tokens equal those of the unquantised engine made to round K and V to
    e4m3 before writing them (e4m3 values are exact in bf16 and fp32 and a 1.0 scale
    multiplies exactly, so nothing else may differ);
  - quality: against the plain unquantised engine the logits move by a few percent
    (e4m3's rounding), and greedy text on the real SmolLM2 is unchanged;
  - the other decode paths (the CUDA-graph static buffers run eagerly; TritonOps' kernels
    in Triton's interpreter) give the eager torch fp8 engine's tokens.
"""

import argparse
import functools

import pytest
import torch

from engine.args import add_engine_arguments, engine_config
from engine.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from engine.llm import LLM
from engine.ops import TorchOps
from engine.runner import plan_cache_blocks
from engine.sampling import SamplingParams

FP8 = torch.float8_e4m3fn
PROMPTS = [list(range(100, 100 + n)) for n in (5, 30, 47, 3)]  # 47 crosses tiny-llama4's 32-token chunk


@pytest.fixture(scope="module")
def tiny(tiny_llama4_dir, tmp_path_factory):
    """tiny-llama4 without its tokenizer (these tests prompt with token ids): loading Llama
    4's 200k-entry tokenizer is most of an engine's start-up on these machines."""
    d = tmp_path_factory.mktemp("tiny-llama4-ids-only")
    for f in tiny_llama4_dir.iterdir():
        if f.name != "tokenizer.json":
            (d / f.name).symlink_to(f)
    return d


def _llm(path, **kw) -> LLM:
    return LLM(path, num_blocks=64, max_model_len=256, max_num_seqs=8, check_integrity=True, **kw)


def _greedy(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))]


def _round_kv_to_e4m3(llm: LLM) -> LLM:
    """From now on the unquantised engine `llm` rounds K and V to e4m3 (what an fp8 cache
    with scale 1.0 stores) before writing them into its cache. Blocks it cached before
    still hold unrounded values: turn prefix caching off if it has run."""
    ops = llm.engine.runner.model.ops

    def write_kv(kv_cache, k, v, slots, kv_scale=None):
        assert kv_scale is None and kv_cache.dtype != FP8
        rounded = [x.float().clamp(-448, 448).to(FP8).to(x.dtype) for x in (k, v)]
        TorchOps.write_kv(ops, kv_cache, *rounded, slots)

    ops.write_kv = write_kv
    return llm


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """[T]: each position's largest |logit difference| over its largest |logit|."""
    return (got - want).abs().amax(-1) / want.abs().amax(-1)


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["fp16", "float8_e4m3fn", "FP8", "", None])
def test_bad_kv_cache_dtype_is_a_value_error_naming_the_field(value):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype=value)


def test_llm_and_cli_take_the_setting(tiny_llama4_dir, capsys):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny_llama4_dir, num_blocks=8, kv_cache_dtype="int8")
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert engine_config(p.parse_args(["--model", str(tiny_llama4_dir)])).kv_cache_dtype_name == "float32"
    cfg = engine_config(p.parse_args(["--model", str(tiny_llama4_dir), "--kv-cache-dtype", "fp8", "--dtype", "bfloat16"]))
    assert cfg.cache.kv_cache_dtype == "fp8" and cfg.kv_cache_dtype_name == "float8_e4m3fn"
    assert cfg.device.torch_dtype_name == "bfloat16"  # the weights keep theirs
    with pytest.raises(SystemExit):
        p.parse_args(["--model", str(tiny_llama4_dir), "--kv-cache-dtype", "int8"])
    assert "--kv-cache-dtype" in capsys.readouterr().err


def _plan(model: ModelConfig, kv_cache_dtype: str, budget: int, **cache) -> tuple[int, int | None]:
    cfg = EngineConfig(model_dir="unused", model=model, device=DeviceConfig(dtype="bfloat16"),
                       cache=CacheConfig(kv_cache_dtype=kv_cache_dtype, **cache))
    return plan_cache_blocks(cfg, budget)


def test_a_byte_budget_holds_twice_the_bf16_blocks(tiny_llama4_dir):
    budget = 3 << 20
    dense = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
                                 "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "intermediate_size": 128})
    bf16_block = 2 * 16 * 2 * 16 * 2  # K and V x 16 tokens x 2 heads x 16 dims x 2 bytes, per layer
    bf16, fp8 = _plan(dense, "auto", budget)[0], _plan(dense, "fp8", budget)[0]
    assert bf16 == budget // (3 * bf16_block) and fp8 == 2 * bf16
    # Llama 4: the local pool keeps its count in half the bytes, so the global pool gets
    # the rest: more than twice its bf16 blocks, within the same budget.
    m = ModelConfig.from_dir(tiny_llama4_dir)
    (g16, l16), (g8, l8) = _plan(m, "auto", budget, num_local_blocks=40), _plan(m, "fp8", budget, num_local_blocks=40)
    assert l16 == l8 == 40 and g8 > 2 * g16
    fp8_block = 2 * 16 * m.num_kv_heads * m.head_dim
    assert budget - fp8_block * len(m.global_layers) < (g8 * len(m.global_layers) + l8 * len(m.local_layers)) * fp8_block <= budget


# -- tiny-llama4: wiring, quality, the other decode paths -------------------------------------

@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["fp32", "bf16"])
def test_fp8_engine_is_the_engine_on_e4m3_rounded_kv(tiny, dtype):
    fp8 = _llm(tiny, dtype=dtype, kv_cache_dtype="fp8")
    runner = fp8.engine.runner
    assert {c.dtype for c in runner.kv_caches} == {FP8} and runner.dtype == (torch.bfloat16 if dtype else torch.float32)
    assert runner.kv_scale.dtype == torch.float32 and runner.kv_scale.tolist() == [1.0, 1.0]
    ref = _round_kv_to_e4m3(_llm(tiny, dtype=dtype))
    prompt = list(range(7, 77))  # three chunks of the local layers
    assert torch.equal(fp8.engine.prompt_logits(prompt), ref.engine.prompt_logits(prompt))
    if dtype is None:  # decode steps read the cache through their own path
        assert _greedy(fp8, PROMPTS, 6) == _greedy(ref, PROMPTS, 6)
    fp8.engine.check_integrity()


def test_fp8_logits_move_by_e4m3_rounding(tiny):
    """e4m3 keeps 3 mantissa bits: each stored K or V is off by at most 2^-4 of itself
    (2.6% RMS here, as for any value spread over many binades), and the logits inherit an
    error of that order. tiny-llama4 is random and top-1 routed: where the error tips a
    token to another expert its logits move by far more, so the bound is on the median
    position (measured: 3-4%; up to 0.5 where routing flips)."""
    prompt = list(range(7, 77))
    got = _llm(tiny, kv_cache_dtype="fp8").engine.prompt_logits(prompt)
    err = _relative_error(got, _llm(tiny).engine.prompt_logits(prompt))
    assert 0 < err.median() < 0.06  # not zero: the cache really is fp8


def test_static_buffer_graph_path_on_fp8_gives_the_eager_tokens(tiny):
    want = _greedy(_llm(tiny, kv_cache_dtype="fp8"), PROMPTS, 6)
    llm = _llm(tiny, kv_cache_dtype="fp8")
    runner = llm.engine.runner
    runner.enable_decode_graphs(capture=False)
    served, prepare = [], runner.graphs.prepare
    runner.graphs.prepare = lambda *a: served.append(prepare(*a)) or served[-1]
    # A captured graph reads the scales from the memory it was captured with: the runner's tensor.
    assert all(runner.graphs._meta(g, 1).kv_scale is runner.kv_scale for g in runner.graphs.groups)
    assert _greedy(llm, PROMPTS, 6) == want
    assert len(served) >= 5 and None not in served  # every decode step ran from the static buffers


def test_triton_kernels_on_the_fp8_cache_match_torch(tiny):
    """TritonOps' fp8 KV write and paged decode attention (and its norms and RoPE), in
    Triton's interpreter. The MoE stays torch: it does not touch the cache, is covered by
    test_decode_paths, and is the interpreter's slowest kernel."""
    prompts = [PROMPTS[2]]  # 47 tokens: decode reads a local chunk that starts at 32
    want = _greedy(_llm(tiny, kv_cache_dtype="fp8"), prompts, 3)
    llm = _llm(tiny, kv_cache_dtype="fp8", ops="triton")
    ops = llm.engine.runner.model.ops
    ops.on_cpu = True
    ops.moe = functools.partial(TorchOps.moe, ops)
    calls = []
    for name in ("_write_kv", "_paged_decode"):
        kernel = getattr(ops, name)
        setattr(ops, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    assert _greedy(llm, prompts, 3) == want
    assert {"_write_kv", "_paged_decode"} <= set(calls)


# -- SmolLM2 (a real model, dense) ------------------------------------------------------------

def test_smollm2_on_fp8(smollm2_dir):
    fp8, plain = _llm(smollm2_dir, kv_cache_dtype="fp8"), _llm(smollm2_dir, enable_prefix_caching=False)
    assert {c.dtype for c in fp8.engine.runner.kv_caches} == {FP8}
    ids = fp8.tokenizer.encode("The capital of France is Paris. It is known for the Eiffel Tower and the Louvre.")
    got, want = fp8.engine.prompt_logits(ids), plain.engine.prompt_logits(ids)
    # Quality: every position within 10% of its largest logit (measured: median 4%, max 6.5%),
    # the same argmax everywhere, and the same greedy continuation.
    err = _relative_error(got, want)
    assert 0 < err.median() < 0.06 and err.max() < 0.10
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    params = SamplingParams(max_tokens=4, temperature=0)
    out, ref = (llm.generate(["The capital of France is"], params)[0] for llm in (fp8, plain))
    assert out.text.startswith(" Paris.") and out.token_ids == ref.token_ids
    # Wiring (the dense model's layers): exactly the engine on e4m3-rounded K and V.
    assert torch.equal(got, _round_kv_to_e4m3(plain).engine.prompt_logits(ids))
