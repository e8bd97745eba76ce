"""Configuration: one frozen dataclass per concern, composed into `EngineConfig`.

`ModelConfig` is read from an HF folder's config.json (and generation_config.json);
the others come from CLI flags or `LLM(...)` keywords. Each validates itself in
`__post_init__` and raises ValueError naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# HF architecture name -> our model family. The family picks the model class
# (engine/models/__init__.py) and the weight-name prefix to strip.
ARCHITECTURES = {
    "Llama4ForConditionalGeneration": ("llama4", "language_model."),
    "Llama4ForCausalLM": ("llama4", ""),
    "LlamaForCausalLM": ("llama", ""),
}


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1+, Llama 4 Scout)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # "llama4" | "llama"
    weight_prefix: str  # stripped from checkpoint names ("language_model." for multimodal)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP (llama) / each expert and the shared expert (llama4)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Llama 4 only.
    intermediate_size_mlp: int = 0  # dense layers of interleaved (Maverick) models
    num_experts: int = 0
    moe_layers: tuple[int, ...] = ()
    rope_layers: tuple[bool, ...] = ()  # True: RoPE + chunked local attention; False: NoPE global
    attention_chunk_size: int | None = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError(f"config.json: attention_chunk_size must be >= 1, got {self.attention_chunk_size}")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ValueError(f"config.json: moe_layers {list(self.moe_layers)} outside [0, {self.num_layers})")
        if self.family == "llama4":
            if self.num_experts < 1:
                raise ValueError(f"config.json: num_local_experts must be >= 1, got {self.num_experts}")
            if len(self.moe_layers) < self.num_layers and self.intermediate_size_mlp < 1:
                raise ValueError("config.json: intermediate_size_mlp is required when some layers are dense")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads {self.num_kv_heads} must divide num_attention_heads {self.num_heads}")
        if self.family == "llama4" and len(self.rope_layers) != self.num_layers:
            raise ValueError(f"no_rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")

    @property
    def fingerprint(self) -> str:
        """Names the architecture and every shape-relevant setting: two processes may
        exchange KV only if their fingerprints (and cache layouts) match."""
        import hashlib

        digest = hashlib.sha256(repr(sorted(self.__dict__.items())).encode()).hexdigest()[:12]
        return f"{self.architecture}/{digest}"

    def is_local_layer(self, i: int) -> bool:
        """Chunked local attention: Llama 4's RoPE layers when a chunk size is set."""
        return self.family == "llama4" and self.attention_chunk_size is not None and self.rope_layers[i]

    def uses_rope(self, i: int) -> bool:
        return self.family != "llama4" or self.rope_layers[i]

    @property
    def local_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_local_layer(i))

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_local_layer(i))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (is this an HF model folder?)")
        raw = json.loads(path.read_text())
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf(raw, gen, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict, gen: dict | None = None, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{source}: architectures {archs} not supported; tandem serves {sorted(ARCHITECTURES)}"
            )
        family, prefix = ARCHITECTURES[arch]
        text = raw.get("text_config", raw) if arch == "Llama4ForConditionalGeneration" else raw
        gen = gen or {}

        def need(key):
            if key not in text:
                raise ValueError(f"{source}: missing field {key!r}")
            return text[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        layers = need("num_hidden_layers")
        rope_theta, scaling = _rope(text)
        eos = gen.get("eos_token_id", text.get("eos_token_id", raw.get("eos_token_id")))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        common = dict(
            architecture=arch,
            family=family,
            weight_prefix=prefix,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or hidden // heads,
            intermediate_size=need("intermediate_size"),
            rms_norm_eps=text.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=text.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            eos_token_ids=eos_ids,
            bos_token_id=gen.get("bos_token_id", text.get("bos_token_id")),
        )
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not supported")
        if family == "llama":
            return cls(**common)

        if text.get("num_experts_per_tok", 1) != 1:
            raise ValueError(f"{source}: num_experts_per_tok must be 1 (Llama 4 routes top-1)")
        step = text.get("interleave_moe_layer_step", 1)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"{source}: interleave_moe_layer_step must be a non-negative integer, got {step!r}")
        moe_layers = text.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, layers, step)) if step > 0 else []
        no_rope = text.get("no_rope_layers")
        if not no_rope:  # HF: 1 means "this layer uses RoPE" despite the name
            interval = text.get("no_rope_layer_interval", 4)
            no_rope = [int((i + 1) % interval != 0) for i in range(layers)]
        return cls(
            **common,
            intermediate_size_mlp=text.get("intermediate_size_mlp", 0),
            num_experts=need("num_local_experts"),
            moe_layers=tuple(moe_layers),
            rope_layers=tuple(bool(x) for x in no_rope),
            attention_chunk_size=text.get("attention_chunk_size"),
            use_qk_norm=bool(text.get("use_qk_norm", False)),
            attn_temperature_tuning=bool(text.get("attn_temperature_tuning", False)),
            floor_scale=float(text.get("floor_scale", 8192)),
            attn_scale=float(text.get("attn_scale", 0.1)),
        )


def _rope(text: dict) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either the classic (`rope_theta` + `rope_scaling`) or the
    transformers-5 (`rope_parameters`) spelling."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or params
    theta = float(text.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} not supported (llama3 or none)")
    if "factor" not in scaling:
        raise ValueError("rope_scaling: llama3 scaling needs 'factor'")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


# --kv-cache-dtype -> the cache's torch dtype name (None: the model's dtype, DeviceConfig).
# fp8 is e4m3 (float8_e4m3fn) with one fp32 scale for all K and one for all V of the
# cache (tandem_kernels/kv_write.py): 1 byte an element, so twice the blocks of a 16-bit cache.
KV_CACHE_DTYPES: dict[str, str | None] = {"auto": None, "fp8": "float8_e4m3fn"}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache. Block counts are per layer group: every layer of a group shares
    one block table per request (global layers; chunked-local layers)."""

    block_size: int = 16
    num_blocks: int | None = None  # global group; None: sized from memory at start
    num_local_blocks: int | None = None  # chunked-local group; None: sized from the chunk
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.85  # share of free GPU memory the cache may take
    cpu_cache_gib: float = 1.0  # cache size on CPU when num_blocks is not given
    kv_cache_dtype: str = "auto"  # a KV_CACHE_DTYPES key: "auto" (the model's dtype) or "fp8"

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("num_blocks", "num_local_blocks"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in the running batch
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs where the ops allow it
    # Schedule and launch step N+1 while the GPU runs step N (engine/llm.py). None: on for
    # CUDA; True also on CPU (where nothing overlaps: tests use it to check the bookkeeping).
    async_scheduling: bool | None = None

    def __post_init__(self):
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def torch_dtype_name(self) -> str:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    seed: int = 0

    def __post_init__(self):
        c = self.model.attention_chunk_size
        if c is not None and self.model.local_layers and c % self.cache.block_size:
            raise ValueError(f"block_size {self.cache.block_size} must divide attention_chunk_size {c}")

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model.max_position_embeddings

    @property
    def kv_cache_dtype_name(self) -> str:
        """The KV cache's torch dtype name: "float8_e4m3fn" for fp8, else the model's."""
        return KV_CACHE_DTYPES[self.cache.kv_cache_dtype] or self.device.torch_dtype_name


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def llama3_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None):
    """Inverse RoPE frequencies, with llama3 smoothing between the low/high wavelengths."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
