"""Engine flags shared by every command that runs an engine (`tandem generate`, the
prefill and decode services): one place that turns argv into an EngineConfig."""

from __future__ import annotations

import argparse

from engine.config import KV_CACHE_DTYPES, CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="HF model folder (config.json + *.safetensors)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype, and the KV cache's unless --kv-cache-dtype fp8 "
                        "(default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence, prompt plus output (default: the model's, lowered to fit the cache)")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks for the global layers (default: sized from memory)")
    g.add_argument("--num-local-blocks", type=int, default=None,
                   help="KV blocks for chunked-local layers (default: a chunk per running request)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch (default 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prefills are chunked (default 2048)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="share of free GPU memory the KV cache may take (default 0.85)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_CACHE_DTYPES),
                   help="auto (default): the KV cache holds the model's dtype. fp8: e4m3 (float8_e4m3fn), "
                        "one byte an element: against bf16, twice the blocks in the same memory and half the "
                        "bytes decode attention reads; the price is e4m3's 3 mantissa bits: each K and V entry "
                        "is off by 2.6%% RMS, each attention output by ~3-4%% (more where attention is sharp). "
                        "Scales are fixed at 1.0 for K and V (uncalibrated: no checkpoint scales are read yet), "
                        "so entries beyond +-448 saturate and those below 2^-6 lose precision. A prefill and a "
                        "decode service must use the same setting")
    g.add_argument("--ops", default="auto", choices=["auto", "torch", "triton"],
                   help="math backend: plain torch, or Triton kernels (CUDA only; CPU tensors keep torch); "
                        "auto (default) is triton on CUDA when triton is installed, else torch")
    g.add_argument("--enforce-eager", action="store_true",
                   help="launch every step's kernels from Python; by default, with --ops triton on CUDA, "
                        "all-decode steps replay CUDA graphs captured at start-up (one per padded batch size)")
    g.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's sampled tokens before scheduling the next; by default, on CUDA, "
                        "the next step is scheduled and launched while the GPU runs this one (its stop checks "
                        "then happen one step late, and a request that stops computes one token it discards)")
    g.add_argument("--global-seed", type=int, default=0,
                   help="seed of the engine's RNG, used by requests that bring no seed of their own (default 0)")


def engine_config(args) -> EngineConfig:
    return EngineConfig(
        model_dir=str(args.model),
        model=ModelConfig.from_dir(args.model),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          num_local_blocks=args.num_local_blocks, enable_prefix_caching=not args.no_prefix_caching,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
        device=DeviceConfig(device=args.device, dtype=args.dtype, cuda_graphs=not args.enforce_eager,
                            async_scheduling=False if args.no_async_scheduling else None),
        seed=args.global_seed,
    )
