"""Fixtures of the app's unit tests, shared by ``test_app_security.py`` and the bad-input catalogue
(``test_bad_inputs.py``): one populated cache root per module, the Dash app on it and a test client. Requested
lazily there (``request.getfixturevalue``) so that tests without the app never build it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def app_cache(tmp_path_factory):
    """A cache root with every result kind, a run, a tiny model and a safety result (``tests.browser.fixture_cache``);
    ``dict(root, run_id, model_dir)``."""
    from app import data
    from tests.browser.fixture_cache import populate

    root = tmp_path_factory.mktemp("app-cache")
    info = populate(root, tiny_model=True, safety=True)
    yield dict(root=root, **info)
    data.clear_caches()


@pytest.fixture(scope="module")
def dash_app(app_cache, tmp_path_factory):
    from app import create_app

    return create_app(app_cache["root"], jobs_dir=tmp_path_factory.mktemp("app-jobs"))


@pytest.fixture
def client(dash_app, app_cache):
    """A Flask test client of :func:`dash_app`, with the app's data root set back to the fixture cache."""
    from app import data

    data.set_root(app_cache["root"])
    return dash_app.server.test_client()
