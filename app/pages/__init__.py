"""One module per page. Each has ``PATH``, ``TITLE``, ``SCHEMA`` (its URL query state), ``layout(params)``
and ``register(app)``; the pure view functions its callbacks call are module-level and unit-tested."""

from . import ast_probe, capture, dark_matter, home, layers, linearscope, safety

PAGES = [home, capture, layers, ast_probe, dark_matter, linearscope, safety]
