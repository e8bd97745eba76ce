"""`tandem generate`: offline generation from a model folder, streaming text to stdout
(or one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.args import add_engine_arguments

    src = p.add_argument_group("prompt").add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text prompt (the tokenizer adds BOS as the model expects)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as comma-separated token ids; needs no tokenizer")
    src.add_argument("--chat", help="one user message, wrapped in the model's chat template")
    g = p.add_argument_group("sampling and output")
    g.add_argument("--system", help="system message for --chat")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches P (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below MIN_P x the top probability")
    g.add_argument("--seed", type=int, default=None, help="sampling seed of this request (reproducible sampling)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--json", action="store_true",
                   help='print one JSON object {"token_ids", "text", "finish_reason"} instead of streaming text')
    add_engine_arguments(p)


def run(args) -> int:
    from engine.args import engine_config
    from engine.llm import LLMEngine
    from engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine(engine_config(args), ops=args.ops)
    if args.chat is not None:
        if engine.tokenizer is None:
            raise ValueError("chat: this model folder has no tokenizer")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        prompt = engine.tokenizer.encode_chat(messages)
    elif args.prompt_ids is not None:
        prompt = args.prompt_ids
    else:
        prompt = args.prompt
    rid = engine.add_request(prompt, params)
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if not args.json and out.new_text:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                final = out
    if args.json:
        print(json.dumps({"token_ids": final.token_ids, "text": final.text, "finish_reason": final.finish_reason}))
    else:
        sys.stdout.write("\n")
    return 0
