"""Page state in the URL query string, so that a link reproduces a view (``/ast-probe?model=m&layer=17``).

Values are parsed against a small schema: a wrong or hostile value is dropped (the page falls back to its
default), never evaluated.

>>> parse_query("?model=smollm2-135m&layer=17&x=1", {"model": str, "layer": int})
{'model': 'smollm2-135m', 'layer': 17}
>>> encode_query({"model": "smollm2-135m", "layer": 17, "snippet": None})
'?model=smollm2-135m&layer=17'
"""

from __future__ import annotations

from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, urlencode

MAX_VALUE_CHARS = 300


def _as_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


_PARSERS: dict[Any, Callable[[str], Any]] = {str: str, int: int, float: float, bool: _as_bool}


def parse_query(search: str | None, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Parse ``search`` (``"?a=1&b=x"``) keeping only keys of ``schema`` whose value parses.

    Parameters
    ----------
    search : str or None
        The query string, with or without its leading ``?``.
    schema : mapping of str -> type or callable
        ``str``, ``int``, ``float``, ``bool``, or a callable that returns the value or raises ``ValueError``;
        ``list`` makes a comma-separated list of strings.

    Returns
    -------
    dict
        Parsed values; unknown keys, over-long values and values that fail to parse are left out.
    """
    out: dict[str, Any] = {}
    for k, v in parse_qsl((search or "").lstrip("?"), keep_blank_values=False):
        if k not in schema or len(v) > MAX_VALUE_CHARS:
            continue
        kind = schema[k]
        try:
            if kind is list:
                out[k] = [x for x in v.split(",") if x]
            else:
                out[k] = _PARSERS.get(kind, kind)(v)
        except (ValueError, TypeError):
            continue
    return out


def encode_query(state: Mapping[str, Any]) -> str:
    """``?k=v&…`` for the non-empty values of ``state`` (lists comma-joined, booleans as 1/0)."""
    items = []
    for k, v in state.items():
        if v is None or v == "" or v == []:
            continue
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        items.append((k, v))
    return "?" + urlencode(items) if items else ""
