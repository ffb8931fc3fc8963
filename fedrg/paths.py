"""Well-known locations (cache for built-in models and synthetic cohorts)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root cache directory: ``$FEDRG_CACHE`` or ``~/.cache/fedrg`` (created on demand)."""
    root = Path(os.environ.get("FEDRG_CACHE") or Path.home() / ".cache" / "fedrg")
    root.mkdir(parents=True, exist_ok=True)
    return root
