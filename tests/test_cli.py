"""The `tandem generate` command, run as a user would: a real subprocess."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.main", "--log-level", "WARNING", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_generate_json_on_a_folder_without_tokenizer(tiny_llama4_dir, tmp_path):
    d = tmp_path / "no-tok"
    d.mkdir()
    for f in Path(tiny_llama4_dir).iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, d / f.name)
    r = tandem("generate", "--model", str(d), "--prompt-ids", "200000,1,2,3", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length" and out["text"] == ""

    from engine.llm import LLM
    from engine.sampling import SamplingParams

    ref = LLM(d, num_blocks=16, max_model_len=256).generate([200000, 1, 2, 3], SamplingParams(max_tokens=5, temperature=0))
    assert out["token_ids"] == ref[0].token_ids


def test_generate_rejects_bad_values_by_name(tiny_llama4_dir):
    r = tandem("generate", "--model", str(tiny_llama4_dir), "--prompt", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr and "Traceback" not in r.stderr
    r = tandem("generate", "--model", str(tiny_llama4_dir), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "prompt-ids" in r.stderr
    r = tandem("generate", "--model", str(tiny_llama4_dir), "--prompt-ids", "1,999999999")
    assert r.returncode == 2 and "prompt_token_ids" in r.stderr


@pytest.mark.slow
def test_chat_with_smollm2_answers_sensibly(smollm2_dir):
    r = tandem("generate", "--model", str(smollm2_dir), "--chat", "What is the capital of France?",
               "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    print(f"\nSmolLM2 chat: {r.stdout.strip()!r}")
    assert "Paris" in r.stdout


def test_missing_model_folder_is_a_clear_error(tmp_path):
    r = tandem("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1,2")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
