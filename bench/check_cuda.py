"""The CUDA path's exactness, on one GPU: the engine against transformers on the tiny
Llama 4 presets, in fp32 (logits, as the CPU tests do) and bf16 (greedy agreement).

    python bench/check_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import argparse

    import transformers

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ops", default="torch", help="engine ops backend to check (torch | triton)")
    ops = ap.parse_args().ops

    from engine.llm import LLM
    from engine.sampling import SamplingParams
    from launcher.make_model import make_model

    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    for preset in ("tiny-llama4", "tiny-llama4-maverick"):
        d = make_model(preset, f"/tmp/{preset}", seed=0, dtype="float32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
        ids = torch.randint(0, 200000, (150,), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = hf(ids[None].cuda()).logits[0].float()
        for budget in (4096, 37, 1):
            llm = LLM(d, device="cuda", dtype="float32", num_blocks=64, max_num_batched_tokens=budget, max_model_len=1024,
                      ops=ops)
            got = llm.engine.prompt_logits(ids.tolist())
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            ok &= rel <= 1e-4
            print(f"{preset} fp32 cuda ops={ops} budget {budget}: max|dlogit|/max|logit| = {rel:.2e}")
        prompts = [torch.randint(0, 200000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 45, 90)]
        for dtype in ("float32", "bfloat16"):
            hf = hf.to(getattr(torch, dtype))
            llm = LLM(d, device="cuda", dtype=dtype, num_blocks=64, max_model_len=1024, ops=ops)
            outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
            for p, o in zip(prompts, outs):
                with torch.no_grad():
                    g = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist()
                same = next((k for k, (x, y) in enumerate(zip(g, o.token_ids)) if x != y), 64)
                if dtype == "float32":
                    ok &= same == 64
                print(f"{preset} {dtype} cuda greedy, prompt of {len(p)}: {same}/64 tokens identical")
    print("CUDA CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
