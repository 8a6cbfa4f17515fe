"""Plain-JSON conversion of nested results (numpy, torch, tuples → dicts, lists, floats, ints, str, None).

Every probe's ``to_dict()`` goes through :func:`json_safe`, so results files written by different probes read
back the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["json_safe"]


def json_safe(obj: Any, *, nonfinite: str = "keep") -> Any:
    """Plain JSON types (dicts, lists, float, int, bool, str, None) from nested results.

    ``nonfinite="keep"`` leaves NaN/inf floats as they are (Python's json writes them as NaN/Infinity);
    ``"null"`` turns them into None, for strict JSON readers. Dict keys become strings, tuples and arrays
    lists, anything else unknown its ``str``.
    """
    if nonfinite not in ("keep", "null"):
        raise ValueError(f"nonfinite must be 'keep' or 'null', got {nonfinite!r}")
    if isinstance(obj, dict):
        return {str(k): json_safe(v, nonfinite=nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, nonfinite=nonfinite) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return json_safe(obj.tolist(), nonfinite=nonfinite)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return None if nonfinite == "null" and not math.isfinite(x) else x
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
