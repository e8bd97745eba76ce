"""`tandem`: one command, a subcommand per job. Each subcommand lives in its own module
with `add_arguments(parser)` and `run(args) -> int`; this file only registers them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Modules import lazily: `tandem --help` stays fast.
SUBCOMMANDS = {
    "generate": ("launcher.generate", "generate text offline from a model folder"),
    "make-model": ("launcher.make_model", "write a model folder (tiny test models, scout-slice, SmolLM2)"),
    "prefill": ("prefill_service.__main__", "run a prefill service (gRPC): computes KV, pushes it to decode"),
    "decode": ("decode_service.__main__", "run a decode service (gRPC): continuous batching, streams tokens"),
    "gateway": ("gateway.__main__", "run a gateway: OpenAI REST shim + public gRPC API, routing over Redis"),
    "serve": ("launcher.serve", "start the whole stack (gateway, prefill, decode, Redis)"),
    "bench": ("loadtest.cli", "load-test a server: one run (bench serve) or rates x configurations (bench sweep)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="tandem: disaggregated prefill/decode serving for Llama 4 and Llama 3-family models.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity on stderr (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say which field, no traceback
        print(f"tandem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
