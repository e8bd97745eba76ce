"""Tokenizer, chat template and incremental detokenizer for an HF model folder.

Imports neither torch nor transformers: the gateway uses this module directly. It reads
what transformers' `save_pretrained` writes:

    tokenizer.json          the `tokenizers` pipeline (required)
    tokenizer_config.json   bos/eos/pad token strings, add_bos_token, chat_template
    chat_template.jinja     the chat template (wins over tokenizer_config's, as in HF)
    generation_config.json  eos_token_id (int or list): the ids that end generation
    config.json             eos_token_id, used only when generation_config.json has none

`IncrementalDetokenizer` turns a stream of generated ids into text deltas. Its
invariant, for byte-level BPE tokenizers (Llama 3/4, SmolLM2, GPT-2 style):
``"".join(deltas) + flush() == tokenizer.decode(output_ids)``, and no delta holds
U+FFFD unless the full decode does at that place. For sentencepiece-style decoders the
only difference is a leading space the decoder would strip at the start of a sequence:
the output is decoded in the context of the prompt, so that space is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode writes for an incomplete character

# How many prompt tokens the detokenizer decodes before the first generated token, so a
# leading space or a character spanning tokens comes out as it would in context.
_INITIAL_PREFIX_TOKENS = 5


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _raise_exception(message: str) -> None:
    # Called by templates on input they cannot render; the caller's input is at fault.
    raise ValueError(f"messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's templates call tojson with these keywords; jinja's own filter HTML-escapes.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    # Settings as in transformers' chat template rendering: sandboxed, trim/lstrip blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _normalize_messages(messages: Any) -> list[dict]:
    """Checks the OpenAI-shaped message list; text-part lists become one string.

    Raises ValueError naming `messages` (and the index) for anything else.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role: must be a non-empty string")
        if "content" not in m:
            raise ValueError(f"messages[{i}].content: missing")
        content = m["content"]
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: only {{type: text, text: str}} parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


class Tokenizer:
    """A model folder's tokenizer: encode/decode, special ids, chat template."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        generation_eos_ids: Sequence[int] = (),
    ):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None

        self.bos_token_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        self.pad_token_id: int | None = tokenizer.token_to_id(pad_token) if pad_token else None
        eos_ids = list(generation_eos_ids)
        tok_eos = tokenizer.token_to_id(eos_token) if eos_token else None
        if tok_eos is not None:
            eos_ids.append(tok_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

        # Does the post-processor put BOS in front? Decide once; `add_bos_token` in the
        # config overrides it either way, as transformers' Llama tokenizers do.
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        pp_adds_bos = self.bos_token_id is not None and len(probe) > 1 and probe[0] == self.bos_token_id
        self._pp_adds_bos = pp_adds_bos
        self.adds_bos = pp_adds_bos if add_bos_token is None else (bool(add_bos_token) and self.bos_token_id is not None)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json in this folder")
        tok = _HFTokenizer.from_file(str(tok_file))
        tcfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        eos_ids = _as_id_list(gen.get("eos_token_id"))
        if not eos_ids:
            eos_ids = _as_id_list(_read_json(d / "config.json").get("eos_token_id"))
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(tcfg.get("chat_template"), str):
            template = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):  # [{name, template}, ...]: take "default"
            named = {t.get("name"): t.get("template") for t in tcfg["chat_template"] if isinstance(t, dict)}
            template = named.get("default")
        add_bos = tcfg.get("add_bos_token")
        return cls(
            tok,
            bos_token=_token_str(tcfg.get("bos_token")),
            eos_token=_token_str(tcfg.get("eos_token")),
            pad_token=_token_str(tcfg.get("pad_token")),
            unk_token=_token_str(tcfg.get("unk_token")),
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            chat_template=template,
            generation_eos_ids=eos_ids,
        )

    # -- ids <-> text ----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.adds_bos != self._pp_adds_bos:
            if self.adds_bos:
                ids.insert(0, self.bos_token_id)
            elif ids and ids[0] == self.bos_token_id:
                ids.pop(0)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    # -- chat ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        msgs = _normalize_messages(messages)
        specials = {
            k: v
            for k, v in (
                ("bos_token", self.bos_token), ("eos_token", self.eos_token),
                ("pad_token", self.pad_token), ("unk_token", self.unk_token),
            )
            if v is not None
        }
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **specials)
        except ValueError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"messages: the chat template could not render them: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Template text, then ids; BOS is added only if the template did not write it."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids


class IncrementalDetokenizer:
    """Streams text for generated tokens.

    Keeps every id (prompt tail + output) and two offsets into them, as vLLM's
    `detokenize_incrementally` does: `prefix` .. `read` is text already emitted and kept
    as left context, `read` .. end is not emitted yet. Each token decodes the window
    `prefix..end` and emits what it adds to `decode(prefix..read)`, unless the window's
    text ends in U+FFFD (a character whose bytes are not all here yet): then it waits.
    Every `read` is a point where a UTF-8 decoder has just finished a character, so
    decoding from it agrees with decoding from the start. Work per token is O(window),
    and the window is the tokens since the last emission plus their left context.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tail = [int(i) for i in prompt_ids[-_INITIAL_PREFIX_TOKENS:]]
        # A prompt cut inside a character would leave a U+FFFD at the window's end and
        # misalign the first delta: start without left context then.
        if tail and self._decode(tail).endswith(REPLACEMENT_CHAR):
            tail = []
        self._ids: list[int] = tail
        self._prefix = 0
        self._read = len(tail)
        self._text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        # Ids before the window are never read again: drop them so memory stays O(window).
        if self._prefix > 64:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Appends one generated id; returns the newly finalized text (may be "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """At finish: emits whatever was held back (an incomplete character as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return self._text
