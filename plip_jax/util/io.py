"""Writing result files."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
