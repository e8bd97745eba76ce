"""Small file helpers the model writers share."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def clear_weights(out: Path) -> None:
    """Removes weight files a previous make-model left in `out` (they would mix with ours)."""
    stale = [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / "tokenizer.model"]
    for f in stale:
        if f.is_file():
            log.info("removing old %s", f)
            f.unlink()


def chmod_default(path: Path) -> None:
    """safetensors writes files 0600; give them the usual umask-based mode (other users, containers)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
