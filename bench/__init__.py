"""GPU benchmarks, one device call each; their results go into BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path


def scout_slice(model: str | None = None, layers: int = 4) -> str:
    """`model` if given; else scout-slice --layers N (random weights at Scout's real
    dimensions) in /tmp, written the first time a benchmark on this machine asks."""
    if model is not None:
        return model
    path = f"/tmp/scout-slice-L{layers}"
    if not (Path(path) / "config.json").is_file():
        from launcher.make_model import make_model

        t0 = time.perf_counter()
        make_model("scout-slice", path, seed=0, layers=layers)
        print(f"wrote scout-slice --layers {layers} to {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path
