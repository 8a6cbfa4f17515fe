"""Where probekit keeps things on disk.

Everything probekit writes (fetched models, activation runs, probe results) lives under one *cache root*:
``$PROBEKIT_CACHE`` if set, else ``cache/`` in the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PROBEKIT_CACHE"


def cache_root() -> Path:
    """Return the cache root directory (created if missing)."""
    root = Path(os.environ.get(ENV_VAR) or "cache").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Directory holding fetched and converted models: ``<cache root>/models``."""
    d = cache_root() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def results_dir() -> Path:
    """Directory holding probe results (JSON + HTML): ``<cache root>/results``."""
    d = cache_root() / "results"
    d.mkdir(parents=True, exist_ok=True)
    return d
