"""Loading HF checkpoints (safetensors, sharded or not) into our models.

Our parameter names are the HF names with the architecture prefix stripped, so most
tensors copy straight across. Two layouts need translating:
  - experts split per index (`experts.{e}.gate_proj/up_proj/down_proj.weight`, as in
    some quantized Llama 4 exports) go into the fused `gate_up_proj` [E, H, 2I] and
    `down_proj` [E, I, H];
  - the multimodal checkpoint keeps the text model under `language_model.`; its vision
    tensors are skipped (one log line) until multimodal lands.
Every mismatch is an error naming the file, the tensor and both shapes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.config import ModelConfig
from engine.models import MODELS
from engine.models.layers import fuse_projections

log = logging.getLogger(__name__)

_SPLIT_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shard(s) that do not exist: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def load_model(cfg: ModelConfig, model_dir: str | Path, device: str, dtype: str, ops) -> torch.nn.Module:
    """Build the model for `cfg` on `device` in `dtype` and fill it from the checkpoint."""
    with torch.device(device), _default_dtype(DTYPES[dtype]):
        model = MODELS[cfg.family](cfg, ops)
    load_weights(model, cfg, model_dir)
    fuse_projections(model)
    return model.eval()


def load_weights(model: torch.nn.Module, cfg: ModelConfig, model_dir: str | Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, str]]] = {}
    skipped_vision = 0
    files = checkpoint_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < (1 << 29))
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for raw_name in f.keys():
                    name = raw_name
                    if cfg.weight_prefix:
                        if raw_name.startswith(_VISION_PREFIXES):
                            skipped_vision += 1
                            continue
                        if not raw_name.startswith(cfg.weight_prefix):
                            raise ValueError(f"{file}: tensor {raw_name} is outside {cfg.weight_prefix!r}")
                        name = raw_name[len(cfg.weight_prefix) :]
                    tensor = f.get_tensor(raw_name)
                    bar.update(tensor.numel() * tensor.element_size())
                    if _IGNORED.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue
                    m = _SPLIT_EXPERT.match(name)
                    if m:
                        _load_split_expert(params, m, tensor, file, raw_name, expert_parts)
                        continue
                    if name not in params:
                        raise ValueError(f"{file}: unexpected tensor {raw_name} (no such parameter in {cfg.architecture})")
                    p = params[name]
                    if tuple(tensor.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{file}: tensor {raw_name} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)}"
                        )
                    p.copy_(tensor)
                    loaded.add(name)
    bar.close()
    if skipped_vision:
        log.info("skipped %d vision tensors (text-only serving)", skipped_vision)
    for prefix, parts in expert_parts.items():
        if len(parts) == cfg.num_experts * 3:
            loaded.update({f"{prefix}.gate_up_proj", f"{prefix}.down_proj"})
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")


def _load_split_expert(params, m, tensor, file, raw_name, expert_parts) -> None:
    prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
    gate_up, down = params.get(f"{prefix}.gate_up_proj"), params.get(f"{prefix}.down_proj")
    if gate_up is None or down is None:
        raise ValueError(f"{file}: unexpected tensor {raw_name} (this layer has no experts)")
    num_experts, hidden, two_i = gate_up.shape
    inter = two_i // 2
    if e >= num_experts:
        raise ValueError(f"{file}: tensor {raw_name} names expert {e}, the model has {num_experts}")
    expected = (hidden, inter) if part == "down_proj" else (inter, hidden)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{file}: tensor {raw_name} has shape {tuple(tensor.shape)}, expected {expected}")
    if part == "gate_proj":
        gate_up[e, :, :inter].copy_(tensor.t())
    elif part == "up_proj":
        gate_up[e, :, inter:].copy_(tensor.t())
    else:
        down[e].copy_(tensor.t())
    expert_parts.setdefault(prefix, set()).add((e, part))
