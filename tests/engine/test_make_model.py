"""launcher.make_model: presets load in transformers with transformers' own names and
shapes, the same seed writes the same bytes, SmolLM2 is the real model.
"""

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Llama4ForCausalLM, Llama4TextConfig

from launcher import make_model as mm
from launcher.make_model import make_model, plan_model


def _transformers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of Llama4ForCausalLM's state_dict for `config`, built on meta."""
    cfg = Llama4TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _file_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _sha(d: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(d).glob("*.safetensors")))).hexdigest()


@pytest.fixture(params=["tiny_llama4_dir", "tiny_maverick_dir"])
def tiny_dir(request) -> Path:
    return Path(request.getfixturevalue(request.param))


def test_tiny_preset_loads_in_transformers_with_its_own_names(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    files = _file_tensors(tiny_dir)
    assert {k: tuple(v.shape) for k, v in files.items()} == _transformers_shapes(config)
    assert all(v.dtype == torch.bfloat16 for v in files.values())

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert type(model) is Llama4ForCausalLM
    # Every parameter came from the file (none left at transformers' random init).
    for name, p in model.state_dict().items():
        if name in files:
            assert torch.equal(p, files[name].float()), name
    assert set(files) == set(model.state_dict())

    c = model.config
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 16.0
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.rope_parameters["high_freq_factor"] == 4.0
    assert c.rope_parameters["original_max_position_embeddings"] == 8192
    assert c.no_rope_layers == [1, 1, 1, 0]  # 1: this layer uses RoPE
    assert c.attention_chunk_size == 32 and c.floor_scale == 8 and c.attn_temperature_tuning
    assert c.eos_token_id == [200001, 200007, 200008] and c.bos_token_id == 200000 and c.pad_token_id == 200018
    assert c.vocab_size == 202048 and not c.tie_word_embeddings
    maverick = "maverick" in tiny_dir.name
    assert c.moe_layers == ([1, 3] if maverick else [0, 1, 2, 3])
    assert c.use_qk_norm is (not maverick) and c.num_local_experts == (8 if maverick else 4)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200001, 200007, 200008]


def test_tiny_logits_are_well_spread(tiny_llama4_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama4_dir, dtype=torch.float32)
    ids = torch.tensor([[200000, 9906, 1917, 0, 11, 374, 264, 1296, 13]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.std(-1).min() > 2.0
    top2 = logits.topk(2, -1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # no near-ties for greedy


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_llama4_dir):
    a = make_model("tiny-llama4", tmp_path / "a", seed=0, layers=2)
    b = make_model("tiny-llama4", tmp_path / "b", seed=0, layers=2)
    c = make_model("tiny-llama4", tmp_path / "c", seed=1, layers=2)
    assert _sha(a) == _sha(b) != _sha(c)
    assert json.loads((a / "config.json").read_text())["num_hidden_layers"] == 2
    # A tensor's draw depends on (seed, name) only: layer 0 is the same at 2 and 4 layers.
    small, full = load_file(a / "model.safetensors"), load_file(Path(tiny_llama4_dir) / "model.safetensors")
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.feed_forward.experts.gate_up_proj"]:
        assert torch.equal(small[name], full[name])


def test_layers_and_float32(tmp_path):
    d = make_model("tiny-llama4", tmp_path / "m", seed=3, layers=5, dtype="float32")
    config = transformers.AutoConfig.from_pretrained(d)
    assert config.num_hidden_layers == 5 and config.no_rope_layers == [1, 1, 1, 0, 1]
    with safe_open(d / "model.safetensors", "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float32"


def test_sharded_layout_loads(tmp_path):
    """scout-slice's file layout (a shard per layer + index) at tiny size."""
    spec = dataclasses.replace(mm._tiny_llama4(2), shard_per_layer=True)
    plan = mm.plan_llama4(spec, "bfloat16")
    assert list(plan.files) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    (tmp_path / "config.json").write_text(json.dumps(plan.config))
    mm.write_random_weights(plan, tmp_path, seed=0, dtype="bfloat16", device="cpu")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.total_bytes("bfloat16")
    assert index["weight_map"]["model.layers.1.self_attn.q_proj.weight"] == "model-00003-of-00004.safetensors"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert set(model.state_dict()) == set(index["weight_map"])


def test_scout_slice_plan_has_scouts_dimensions():
    plan = plan_model("scout-slice", layers=1)
    c = plan.config
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (5120, 40, 8, 128)
    assert (c["num_local_experts"], c["intermediate_size"], c["intermediate_size_mlp"]) == (16, 8192, 16384)
    assert c["attention_chunk_size"] == 8192 and c["floor_scale"] == 8192 and c["max_position_embeddings"] == 131072
    assert c["rope_scaling"]["factor"] == 16.0 and c["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert plan.shapes == _transformers_shapes(c)
    assert len(plan.files) == 3  # embeddings, the layer, norm + lm_head
    # The default 4 layers are ~22 GB in bf16.
    assert 21e9 < plan_model("scout-slice").total_bytes("bfloat16") < 23e9
    # Scout's rope has high_freq_factor == low_freq_factor == 1: transformers must still give finite freqs.
    cfg = Llama4TextConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.isfinite(inv_freq).all()


def test_bad_arguments_are_value_errors_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        make_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        make_model("tiny-llama4", tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="layers"):
        make_model("tiny-llama4", tmp_path, layers=0)
    with pytest.raises(ValueError, match="layers"):
        make_model("smollm2-135m", tmp_path, layers=2)
    with pytest.raises(ValueError, match="preset"):
        plan_model("smollm2-135m")


def test_cli_help_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tandem make-model")
    mm.add_arguments(parser)
    help_text = parser.format_help()
    for flag in ["--preset", "--out", "--seed", "--layers", "--dtype", *mm.PRESETS]:
        assert flag in help_text
    args = parser.parse_args(["--preset", "tiny-llama4", "--out", str(tmp_path / "cli"), "--layers", "1"])
    assert mm.run(args) == 0
    assert str((tmp_path / "cli").resolve()) in capsys.readouterr().out
    assert (tmp_path / "cli" / "tokenizer.json").is_file() and (tmp_path / "cli" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "nope", "--out", "x"])


@pytest.mark.slow
def test_smollm2_is_the_real_model(smollm2_dir):
    d = Path(smollm2_dir)
    assert not (d / "tokenizer.model").exists() and (d / "tokenizer.json").is_file()
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 2
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((d / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert all(v.dtype == torch.bfloat16 for v in _file_tensors(d).values())

    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.eos_token_id == 2
    text = "The capital of France is"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
