"""Checkpoint loading: the layouts we accept and the errors for the ones we don't."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.llm import LLM
from engine.loader import checkpoint_files
from tests.engine.test_parity import engine_logits


def read_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(d):
        out.update(load_file(str(f)))
    return out


def clone(src: Path, dst: Path, tensors: dict | None = None, config_edit=None) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file(tensors if tensors is not None else read_all(src), str(dst / "model.safetensors"))
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config_edit(cfg)))
    return dst


IDS = list(range(500, 560))


@pytest.fixture(scope="module")
def reference_logits(tiny_llama4_dir):
    return engine_logits(LLM(tiny_llama4_dir, num_blocks=16, max_model_len=256), IDS)


def test_unknown_architecture_is_named(tiny_llama4_dir, tmp_path):
    d = clone(tiny_llama4_dir, tmp_path / "m", config_edit=lambda c: {**c, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(d, num_blocks=16)


def test_missing_tensor_is_named(tiny_llama4_dir, tmp_path):
    t = read_all(tiny_llama4_dir)
    del t["model.layers.1.self_attn.k_proj.weight"]
    d = clone(tiny_llama4_dir, tmp_path / "m", t)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(d, num_blocks=16)


def test_misshapen_tensor_names_file_tensor_and_shapes(tiny_llama4_dir, tmp_path):
    t = read_all(tiny_llama4_dir)
    w = t["model.layers.0.self_attn.o_proj.weight"]
    t["model.layers.0.self_attn.o_proj.weight"] = w[:, :-1].contiguous()
    d = clone(tiny_llama4_dir, tmp_path / "m", t)
    with pytest.raises(ValueError) as e:
        LLM(d, num_blocks=16)
    msg = str(e.value)
    assert "model.safetensors" in msg and "o_proj" in msg
    assert str(tuple(w.shape)) in msg and str((w.shape[0], w.shape[1] - 1)) in msg


def test_split_experts_load_like_fused(tiny_llama4_dir, tmp_path, reference_logits):
    t = read_all(tiny_llama4_dir)
    for name in [n for n in t if n.endswith("experts.gate_up_proj")]:
        prefix = name[: -len(".gate_up_proj")]
        gate_up, down = t.pop(name), t.pop(prefix + ".down_proj")
        inter = gate_up.shape[-1] // 2
        for e in range(gate_up.shape[0]):
            t[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :, :inter].t().contiguous()
            t[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, :, inter:].t().contiguous()
            t[f"{prefix}.{e}.down_proj.weight"] = down[e].t().contiguous()
    d = clone(tiny_llama4_dir, tmp_path / "m", t)
    got = engine_logits(LLM(d, num_blocks=16, max_model_len=256), IDS)
    assert torch.equal(got, reference_logits)


def test_multimodal_checkpoint_loads_text_and_skips_vision(tiny_llama4_dir, tmp_path, reference_logits, caplog):
    t = {f"language_model.{k}": v for k, v in read_all(tiny_llama4_dir).items()}
    t["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 8)
    t["multi_modal_projector.linear_1.weight"] = torch.zeros(8, 8)

    def to_multimodal(c):
        return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                "text_config": {k: v for k, v in c.items() if k != "architectures"}, "vision_config": {}}

    d = clone(tiny_llama4_dir, tmp_path / "m", t, config_edit=to_multimodal)
    with caplog.at_level(logging.INFO, logger="engine.loader"):
        llm = LLM(d, num_blocks=16, max_model_len=256)
    assert any("skipped 2 vision tensors" in r.message for r in caplog.records)
    assert torch.equal(engine_logits(llm, IDS), reference_logits)


def test_no_weights_is_a_clear_error(tmp_path, tiny_llama4_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny_llama4_dir) / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(d, num_blocks=16)
