"""Safety: placeholder until the safety probe (MSO heatmap, refusal rates, projections) exists."""

from __future__ import annotations

from dash import html

from .. import data
from ..components import missing

PATH = "/safety"
TITLE = "Safety"
SCHEMA = {"model": str}


def safety_message(model: str | None = None) -> html.Div:
    """The page body: the safety runner is not available yet; the command it will have."""
    model = model or data.DEFAULT_MODEL
    return missing("safety result", data.cli_command(f"probekit safety run --model {model}"),
                   "Not available yet: the safety probe (MSO heatmap layer × η, refusal rates with and without "
                   "ablation, projection curves) has not been built. This page will read "
                   "results/safety/<model>/safety.json once `probekit safety run` exists.")


def layout(params: dict) -> html.Div:
    return html.Div([html.H2("Safety"), safety_message(params.get("model"))])


def register(app) -> None:
    """No callbacks yet."""
