"""Regenerate the Python stubs: `python -m protos.generate` (tests check the committed
stubs equal a fresh generation)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["protos/common.proto", "protos/prefill.proto", "protos/decode.proto", "protos/api.proto"]


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(ROOT / p) for p in PROTOS]) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
