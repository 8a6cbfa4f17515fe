"""One module per page. Each has ``PATH``, ``TITLE``, ``SCHEMA`` (its URL query state), ``layout(params)``
and ``register(app)``; the pure view functions its callbacks call are module-level and unit-tested."""

from . import ast_probe, attention, capture, compare, dark_matter, home, latents, layers, linearscope, safety, tokens

PAGES = [home, capture, layers, ast_probe, dark_matter, linearscope, safety, tokens, latents, attention, compare]
