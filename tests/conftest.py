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


# ----------------------------------------------------------------------------- capability records
# Tests declare which (family, capability) cell of the README architecture table they prove; the outcome of the
# test (pass/fail) fills the cell, and the session merges the cells into tests/capabilities.json, from which
# `python -m probekit.archtable` renders the table. Cells of tests that did not run keep their old value.
CAPABILITIES_JSON = os.path.join(os.path.dirname(__file__), "capabilities.json")
_CAPABILITIES: dict[str, dict[str, dict]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or rep.failed:  # keep the call report, or the setup/teardown report that failed
        item._probekit_report = rep


@pytest.fixture
def record_capability(request):
    """``record_capability(family, capability, status=None, note="")`` declares the table cell this test
    proves (several tests may prove one cell: a failure in any of them sticks). The test's outcome decides: a
    failed test records "fail" whatever ``status`` says; a passing one
    records ``status`` ("pass" by default; "n/a" where the family has no such site, "refused" where a clear
    error is the documented behaviour). ``note`` is shown beside the mark (e.g. the capture mechanism)."""
    declared: list[tuple[str, str, str | None, str]] = []

    def record(family: str, capability: str, status: str | None = None, note: str = "") -> None:
        declared.append((family, capability, status, note))

    yield record
    rep = getattr(request.node, "_probekit_report", None)
    failed = rep is None or rep.failed
    skipped = rep is not None and rep.skipped
    for family, capability, status, note in declared:
        cell = dict(status="fail" if failed else "skipped" if skipped else (status or "pass"), note=note)
        row = _CAPABILITIES.setdefault(family, {})
        old = row.get(capability)
        if old is not None:  # several tests prove one cell: any failure sticks; a note is kept
            if old["status"] == "fail" or cell["status"] == "skipped":
                cell["status"] = old["status"]
            cell["note"] = cell["note"] or old["note"]
        row[capability] = cell


def pytest_sessionfinish(session, exitstatus):
    if not _CAPABILITIES:
        return
    from probekit.archtable import merge_records

    merge_records(CAPABILITIES_JSON, _CAPABILITIES)
