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


class PageState:
    """Two-way binding between a page's controls and the query string.

    ``controls`` lists the ``(component id, property)`` pairs in a fixed order; ``from_query(params)`` gives their
    values for parsed query ``params`` (defaults for missing keys, the same function the page's layout uses), and
    ``to_query(*values)`` gives the query dict for the controls' values. :meth:`register` adds one callback that
    writes the query string when a control changes and sets every control when the query string changes (back,
    forward, a pasted link): a single callback, because Dash allows a cycle only inside one callback. It listens
    to the page's own ``dcc.Location`` (:meth:`location`, put in the page's layout), so it exists only while its
    page is shown; every ``dcc.Location`` of the document follows the browser's URL.

    ``settle=True`` (for pages whose controls are all choices): when a control moves, the controls are also passed
    through ``from_query(to_query(...))`` and any that the page's defaults change are set in the same callback, so
    a change that implies others (Compare's probe switch resets A and B) writes one history entry, not two. Off by
    default: a free-text control longer than the URL keeps would be reset by it.
    """

    def __init__(self, path: str, schema: Mapping[str, Any], controls: list[tuple[str, str]],
                 from_query: Callable[[dict], list], to_query: Callable[..., dict], *, settle: bool = False):
        self.path, self.schema, self.controls, self.settle = path, schema, controls, settle
        self.from_query, self.to_query = from_query, to_query
        self.id = "url" + path.replace("/", "-").rstrip("-")

    def location(self):
        """The page's own ``dcc.Location`` (it follows the browser's URL; no reload on change)."""
        from dash import dcc

        return dcc.Location(id=self.id, refresh=False)

    def sync(self, triggered: str | None, pathname: str | None, search: str | None, values: list) -> list:
        """Outputs of the callback: ``[search, *control values]`` (``dash.no_update`` where nothing changes)."""
        from dash import no_update

        n = len(self.controls)
        if pathname != self.path:
            return [no_update] * (n + 1)
        if triggered == self.id:  # the query string moved (history, link): it drives the controls
            want = self.from_query(parse_query(search, self.schema))
            return [no_update] + [w if w != v else no_update for w, v in zip(want, values)]
        if not self.settle:
            query = encode_query(self.to_query(*values))
            return [query if query != (search or "") else no_update] + [no_update] * n
        # a control moved and the page's defaults settle what it implies (a probe switch picks that probe's runs
        # for A and B): the URL and every implied control change in this one callback, so one history entry
        want = self.from_query(parse_query(encode_query(self.to_query(*values)), self.schema))
        query = encode_query(self.to_query(*want))
        return ([query if query != (search or "") else no_update]
                + [w if w != v else no_update for w, v in zip(want, values)])

    def register(self, app) -> None:
        from dash import Input, Output, State, callback_context

        outs = [Output(self.id, "search")] + [Output(c, p, allow_duplicate=True) for c, p in self.controls]
        ins = [Input(self.id, "search")] + [Input(c, p) for c, p in self.controls]

        def _sync(search, *rest):
            *values, pathname = rest
            trig = callback_context.triggered_id
            return self.sync(trig if isinstance(trig, str) else None, pathname, search, list(values))

        app.callback(*outs, *ins, State(self.id, "pathname"), prevent_initial_call=True)(_sync)
