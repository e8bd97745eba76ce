"""engine.tokenizer: the real Llama 4 and SmolLM2 tokenizers, chat templates, streaming.

The Llama 4 tokenizer comes from a tiny-llama4 folder (converted from llama-models'
tiktoken file) and must agree with tiktoken itself; the detokenizer's invariant is
checked on random id sequences full of characters split across tokens.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers

from engine.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "",
    " ",
    "   three leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nand more\n",
    "I'm sure they'll say it's fine; DON'T YOU'VE seen THEY'RE?",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 and 2025-11-26",
    "emoji 😀🎉🫠 and ZWJ 👩‍👩‍👧 and flags 🇺🇳🇫🇷",
    "CJK 你好，世界！日本語のテキスト 한국어 텍스트",
    "accents Ünïcödé ñ façade naïve Ελληνικά русский العربية हिन्दी",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "MixedCASEWordsLikeThisOne and snake_case_names and URLs https://example.com/a?b=c",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫√∞ and ꙮ",
]


@pytest.fixture(scope="module")
def llama4(tiny_llama4_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama4_dir)


@pytest.fixture(scope="module")
def tiktoken_ref():
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


# --- Llama 4: encode / decode / special tokens ----------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_llama4_encode_matches_tiktoken(llama4, tiktoken_ref, text):
    ours = llama4.encode(text, add_special_tokens=False)
    assert ours == tiktoken_ref.encode(text, bos=False, eos=False)
    assert llama4.encode(text) == [200000] + ours  # BOS from the post-processor
    assert llama4.decode(ours) == text


def test_llama4_special_tokens_have_metas_ids(llama4, tiktoken_ref):
    assert llama4.vocab_size == 202048
    assert llama4.bos_token_id == 200000
    assert llama4.eos_token_ids == (200001, 200007, 200008)
    assert llama4.pad_token_id == 200018
    for name in ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>",
                 "<|eot|>", "<|finetune_right_pad|>", "<|image|>", "<|reasoning_thinking_end|>",
                 "<|reserved_special_token_0|>"]:
        assert llama4.token_to_id(name) == tiktoken_ref.special_tokens[name], name
        assert llama4.is_special(tiktoken_ref.special_tokens[name])
    user, hi = (tiktoken_ref.encode(w, bos=False, eos=False) for w in ("user", "hi"))
    assert llama4.encode("<|header_start|>user<|header_end|>hi<|eot|>", add_special_tokens=False) == [
        200005, *user, 200006, *hi, 200008]
    assert llama4.id_to_token(200008) == "<|eot|>"
    assert not llama4.is_special(user[0])
    assert llama4.decode([200000, *hi, 200008]) == "hi"
    assert llama4.decode([200000, *hi, 200008], skip_special_tokens=False) == "<|begin_of_text|>hi<|eot|>"


def test_llama4_agrees_with_transformers_autotokenizer(llama4, tiny_llama4_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_llama4_dir)
    assert hf.eos_token_id == 200008 and hf.bos_token_id == 200000 and len(hf) == 202048
    for text in TEXTS:
        assert hf(text).input_ids == llama4.encode(text)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == llama4.apply_chat_template(conv)


# --- chat template ----------------------------------------------------------------------


def test_llama4_chat_template_renders_exactly(llama4):
    conv = [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "What is 2+2?"}]
    assert llama4.apply_chat_template(conv) == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert llama4.apply_chat_template(conv, add_generation_prompt=False).endswith("What is 2+2?<|eot|>")
    # A list of text parts is the same as their concatenation.
    parts = [conv[0], {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    assert llama4.apply_chat_template(parts) == llama4.apply_chat_template(conv)


def test_encode_chat_has_exactly_one_bos(llama4):
    conv = [{"role": "user", "content": "hi"}]
    ids = llama4.encode_chat(conv)
    assert ids[0] == 200000 and ids.count(200000) == 1
    assert ids == llama4.encode(llama4.apply_chat_template(conv), add_special_tokens=False)
    assert llama4.decode(ids, skip_special_tokens=False) == llama4.apply_chat_template(conv)


BAD_MESSAGES = [
    None,
    "hello",
    {"role": "user", "content": "hi"},
    [],
    ["hi"],
    [{"content": "no role"}],
    [{"role": "", "content": "empty role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
]


@pytest.mark.parametrize("messages", BAD_MESSAGES, ids=[repr(m)[:40] for m in BAD_MESSAGES])
def test_bad_messages_raise_value_error_naming_messages(llama4, messages):
    with pytest.raises(ValueError, match="messages"):
        llama4.apply_chat_template(messages)
    with pytest.raises(ValueError, match="messages"):
        llama4.encode_chat(messages)


def _toy_tokenizer(**kwargs) -> Tokenizer:
    hf = HFTokenizer(tk_models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    return Tokenizer(hf, **kwargs)


def test_no_chat_template_is_a_value_error():
    with pytest.raises(ValueError, match="chat template"):
        _toy_tokenizer().apply_chat_template([{"role": "user", "content": "a"}])


def test_template_raise_exception_becomes_value_error():
    tok = _toy_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="messages: roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_from_dir_without_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def _toy_dir(d: Path, tokenizer_config: dict) -> Path:
    """A 4-token tokenizer.json ("[UNK]" 0, "a" 1, "<s>" 2, "</s>" 3) without a BOS post-processor."""
    hf = HFTokenizer(tk_models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


def test_from_dir_reads_eos_from_generation_config_then_config(tmp_path):
    d = _toy_dir(tmp_path, {"eos_token": "</s>", "bos_token": {"content": "<s>", "special": True}})
    assert Tokenizer.from_dir(d).eos_token_ids == (3,)
    (d / "config.json").write_text('{"eos_token_id": 7}')
    assert Tokenizer.from_dir(d).eos_token_ids == (7, 3)
    (d / "generation_config.json").write_text('{"eos_token_id": [5, 3]}')
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == (5, 3) and tok.bos_token_id == 2 and tok.vocab_size == 4
    assert tok.encode("a a") == [1, 1]  # neither the post-processor nor the config adds BOS


def test_add_bos_token_in_config_and_chat_template_file(tmp_path):
    d = _toy_dir(tmp_path, {"bos_token": "<s>", "add_bos_token": True, "chat_template": "ignored"})
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    tok = Tokenizer.from_dir(d)
    assert tok.encode("a") == [2, 1] and tok.encode("a", add_special_tokens=False) == [1]
    # chat_template.jinja wins over tokenizer_config's; BOS is added once by encode_chat.
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "a "
    assert tok.encode_chat([{"role": "user", "content": "a"}]) == [2, 1]


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, engine.tokenizer; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    assert smollm2.eos_token_ids == (2,)
    assert smollm2.bos_token_id == 1 and smollm2.vocab_size == 49152 and not smollm2.adds_bos
    for text in TEXTS:
        assert smollm2.decode(smollm2.encode(text)) == text
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.encode_chat([{"role": "user", "content": "Hi"}])[0] == 1  # <|im_start|>, no extra BOS


# --- IncrementalDetokenizer -------------------------------------------------------------


def _stream(tok, prompt, output, skip=True):
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [d.add(t) for t in output]
    deltas.append(d.flush())
    assert d.text == "".join(deltas)
    return deltas


def _check_invariant(tok, prompt, output, skip):
    deltas = _stream(tok, prompt, output, skip)
    full = tok.decode(output, skip_special_tokens=skip)
    assert "".join(deltas) == full, (prompt, output)
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in x for x in deltas)


def _id_pool(tok, rng):
    """Ids that split characters across tokens, ordinary words, specials and random ids."""
    pool = []
    for text in TEXTS:
        pool += tok.encode(text, add_special_tokens=False)
    pool += sorted(tok._special_ids)[:8]
    pool += [rng.randrange(tok.vocab_size) for _ in range(50)]
    return pool


def _random_sequences(tok, seed, n=150):
    rng = random.Random(seed)
    pool = _id_pool(tok, rng)
    texts_ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS if t]
    for _ in range(n):
        if rng.random() < 0.5:  # a run of real text, cut anywhere (mid-character too)
            ids = rng.choice(texts_ids)
            a = rng.randrange(len(ids))
            b = rng.randrange(a, len(ids) + 1)
            seq = ids[a:b] + [rng.choice(pool) for _ in range(rng.randrange(4))]
        else:
            seq = [rng.choice(pool) for _ in range(rng.randrange(1, 30))]
        k = rng.randrange(len(seq) + 1)
        yield seq[:k], seq[k:]


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_invariant_llama4(llama4, skip):
    for prompt, output in _random_sequences(llama4, seed=1 + skip):
        _check_invariant(llama4, prompt, output, skip)


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_invariant_smollm2(smollm2, skip):
    for prompt, output in _random_sequences(smollm2, seed=3 + skip):
        _check_invariant(smollm2, prompt, output, skip)


def test_detokenizer_holds_back_split_characters(llama4):
    prompt = llama4.encode("Say it:")
    out = llama4.encode(" 😀 你好 🫠!", add_special_tokens=False)
    deltas = _stream(llama4, prompt, out)
    assert "".join(deltas) == " 😀 你好 🫠!"
    assert not any(REPLACEMENT_CHAR in x for x in deltas)
    assert "" in deltas  # some token ended mid-character and was held back
    # '😀' is two tokens here: nothing after the first, the whole character after the second.
    smile = llama4.encode("😀", add_special_tokens=False)
    assert len(smile) == 2
    d = IncrementalDetokenizer(llama4, prompt)
    assert (d.add(smile[0]), d.add(smile[1])) == ("", "😀")


def test_detokenizer_flush_emits_an_unfinished_character(llama4):
    first_byte = llama4.encode("🫠", add_special_tokens=False)[0]
    d = IncrementalDetokenizer(llama4, llama4.encode("x"))
    assert d.add(llama4.encode(" ok", add_special_tokens=False)[0]) == " ok"
    assert d.add(first_byte) == ""
    assert d.flush() == REPLACEMENT_CHAR
    assert d.text == " ok" + REPLACEMENT_CHAR and d.flush() == ""


def test_detokenizer_keeps_leading_space_and_skips_specials(llama4):
    prompt = llama4.encode_chat([{"role": "user", "content": "hi"}])
    out = llama4.encode("Hello there", add_special_tokens=False) + [200008]
    assert "".join(_stream(llama4, prompt, out)) == "Hello there"
    assert "".join(_stream(llama4, prompt, out, skip=False)) == "Hello there<|eot|>"


class _SpyTokenizer:
    """Wraps a Tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens)


def test_detokenizer_work_per_token_is_bounded(llama4):
    spy = _SpyTokenizer(llama4)
    words = llama4.encode(" ".join(TEXTS) * 8, add_special_tokens=False)
    assert len(words) > 1500
    d = IncrementalDetokenizer(spy, llama4.encode("prompt " * 500))
    for t in words:
        d.add(t)
    d.flush()
    assert d.text == llama4.decode(words)
    assert spy.longest <= 16  # a window of recent tokens, never the whole sequence
