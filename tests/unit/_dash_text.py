"""Shared by the app's unit tests: a Dash component tree as one JSON string, to search for ids, values and text."""

from __future__ import annotations

import json


def dash_text(component) -> str:
    """``component.to_plotly_json()`` serialised, nested components included (other objects as ``str``)."""
    return json.dumps(component.to_plotly_json(),
                      default=lambda o: o.to_plotly_json() if hasattr(o, "to_plotly_json") else str(o))
