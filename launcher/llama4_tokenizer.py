"""The Llama 4 tokenizer, built at run time from the `llama-models` package (Meta's
tiktoken file plus its special tokens) with transformers' TikTokenConverter, checked
against tiktoken, and cached under the user cache folder. Meta's tokenizer files are
written only into model folders, never into this repository."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from launcher.model_files import write_json

log = logging.getLogger(__name__)

# Ids fixed by llama_models/llama4/tokenizer.py
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
    write_json(out / "tokenizer_config.json", tcfg)


