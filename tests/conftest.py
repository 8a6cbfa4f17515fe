"""Shared fixtures: tiny random-init models saved as real HF folders (unit), the real SmolLM2 (integration)."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing in the tests may reach the Hub; fail fast instead of retrying a dead network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (far faster than 2 threads on a shared, busy 2-core box);
    the setting is restored after. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from probekit.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2", "bert")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    from probekit.models import load_model

    return load_model(str(tiny_dir["llama"]))


@pytest.fixture(scope="session")
def tiny_bert(tiny_dir):
    from probekit.models import load_model

    return load_model(str(tiny_dir["bert"]))


TEXTS = [
    "def f(x):\n    return x + 1",
    "import os",
    "class A:\n    def g(self, y):\n        return [y] * 2  # héllo",
    "x = {'a': 1}",
]
