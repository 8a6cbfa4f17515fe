"""Fixtures of the tutorial tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def chromium_for_figures():
    """The Chromium that draws the figures' PNGs, found as the browser tests find theirs, handed to the kernels."""
    from tests.browser.conftest import chromium_path

    path = chromium_path()
    old = os.environ.get("PROBEKIT_CHROMIUM")
    os.environ["PROBEKIT_CHROMIUM"] = path
    yield path
    if old is None:
        os.environ.pop("PROBEKIT_CHROMIUM", None)
    else:
        os.environ["PROBEKIT_CHROMIUM"] = old
