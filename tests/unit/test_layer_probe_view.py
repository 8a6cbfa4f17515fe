"""Saved layer probes (safetensors round trip) and the Layers page's "probe of one layer" view: predictions on
typed text, the confusion matrix and the misclassified test tokens, checked against independent computations
(the fitted probe's own ``predict``, scikit-learn's ``confusion_matrix``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from probekit.probes.layer_probe_files import load_layer_probe, load_test_predictions
from probekit.probes.linear import LinearProbe, fit_layer_probes, load_probe, save_probe


def _data(n=120, d=7, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 50, d).astype(np.float32) + 3.0
    y = (X[:, 0] / 50 + rng.standard_normal(n) * 0.5 > 0).astype(int) + (X[:, 1] > 3).astype(int) * (k > 2)
    return X, y


@pytest.mark.parametrize("case", ["multiclass", "binary", "strings", "ridge", "no-standardize"])
def test_saved_probe_predicts_exactly_as_the_fitted_one(tmp_path, case):
    X, y = _data(k=2 if case == "binary" else 3)
    if case == "strings":
        y = np.array(["cat", "dog", "emu"])[y]
    kw = dict(kind="ridge") if case == "ridge" else dict(standardize=False) if case == "no-standardize" else {}
    target = X[:, 2] * 0.3 + y if case == "ridge" else y
    probe = LinearProbe(alpha=0.5, **kw).fit(X, target)
    save_probe(probe, tmp_path / "p.safetensors")
    back = load_probe(tmp_path / "p.safetensors")
    assert back.get_params() == probe.get_params()
    for a in ("coef_", "intercept_", "mean_", "scale_"):
        assert np.array_equal(getattr(back, a), getattr(probe, a)), a
    Xn = X[::-1] * 1.1
    assert np.array_equal(back.decision_function(Xn), probe.decision_function(Xn))
    assert np.array_equal(back.predict(Xn), probe.predict(Xn))
    if case != "ridge":
        assert np.array_equal(back.classes_, probe.classes_)
        assert np.array_equal(back.predict_proba(Xn), probe.predict_proba(Xn))
    # safetensors only: the file is a safetensors header, no pickle opcode stream
    raw = (tmp_path / "p.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "probekit.LinearProbe/1"


def test_load_probe_refuses_other_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is not a saved LinearProbe"):
        load_probe(tmp_path / "other.safetensors")


def test_fit_layer_probes_keeps_probes_and_test_predictions():
    X, y = _data(n=200)
    groups = np.arange(200) // 10
    feats = {"a": X, "b": X[:, ::-1] * 2}
    res = fit_layer_probes(feats, y, groups, seed=1, progress=False, keep_probes=True)
    assert "probes_" not in res.to_dict()
    for i, layer in enumerate(res.layers):
        Xt = feats[layer][res.test_index_]
        assert np.array_equal(res.test_pred_[layer], res.probes_[layer].predict(Xt))
        assert np.mean(res.test_pred_[layer] == y[res.test_index_]) == res.test_score[i]
    plain = fit_layer_probes(feats, y, groups, seed=1, progress=False)
    assert not hasattr(plain, "probes_") and plain.test_score == res.test_score


# --------------------------------------------------------------------------------------------- the app view


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    from app import data
    from tests.browser.fixture_cache import populate, write_probe_files, write_views

    root = tmp_path_factory.mktemp("probe-cache")
    populate(root, tiny_model=True)
    write_views(root)
    info = write_probe_files(root)
    data.set_root(root)
    yield dict(root=root, **info)
    data.clear_caches()


def _write_forward(root, fid: str, hooks: dict, X: dict, n: int) -> None:
    """A forward result as ``app.forward_worker`` writes it (``forward.safetensors`` + ``forward.json``)."""
    from safetensors.numpy import save_file

    folder = root / "results" / "forward" / fid
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"acts.{hooks[k]}": np.ascontiguousarray(X[k][:n]) for k in hooks}, str(folder / "forward.safetensors"))
    (folder / "forward.json").write_text(json.dumps(dict(model="models/tiny-llama", tokens=[f"t{i}" for i in range(n)],
                                                         token_ids=list(range(n)), hooks=list(hooks.values()))))


def test_typed_text_predictions_equal_probe_predict(probe_cache):
    from app import data, probeview

    data.set_root(probe_cache["root"])
    feats = probe_cache["probe_features"]
    hooks = {"embed": "hook_embed", "0": "blocks.0.hook_resid_post", "1": "blocks.1.hook_resid_post"}
    fid = "0123456789abcdef"
    _write_forward(probe_cache["root"], fid, hooks, feats, 20)
    y, test = probe_cache["probe_labels"], probe_cache["probe_test"]
    for layer in hooks:
        r = probeview.typed_predictions("tiny-llama", layer, fid)
        # an independent probe: refit exactly as the fixture did and predict the same rows
        ref = LinearProbe(alpha=0.1).fit(feats[layer][~test], y[~test])
        assert np.array_equal(r["pred"], ref.predict(feats[layer][:20]))
        p = ref.predict_proba(feats[layer][:20])
        assert np.allclose(r["proba"], p[np.arange(20), r["pred"]], rtol=0, atol=1e-12)
        assert r["hook"] == hooks[layer]
    assert len(set(probeview.typed_predictions("tiny-llama", "1", fid)["pred"].tolist())) >= 2


def test_confusion_matrix_equals_sklearn(probe_cache):
    from app import probeview

    t = load_test_predictions(probe_cache["probe_dir"])
    for layer in ("embed", "0", "1"):
        c, labels = probeview.confusion("tiny-llama", layer)
        assert labels == ["letter", "space", "punct"]
        assert np.array_equal(c, confusion_matrix(t["y_true"], t[f"pred.{layer}"], labels=[0, 1, 2]))
        fig = probeview.confusion_figure(c, labels, layer, "tiny-llama")
        z = np.asarray(fig["data"][0]["z"])
        assert np.allclose(z.sum(axis=1), 1.0)  # rows normalised (every class occurs in this fixture)
        assert fig["layout"]["xaxis"]["title"]["text"] and fig["layout"]["yaxis"]["title"]["text"]
        assert fig["data"][0]["colorbar"]["title"]["text"] and fig["layout"]["height"] >= 250


def test_misclassified_rows_are_the_wrong_test_tokens(probe_cache):
    from app import probeview

    t = load_test_predictions(probe_cache["probe_dir"])
    names = ["letter", "space", "punct"]
    probe = load_layer_probe(probe_cache["probe_dir"], "embed")
    assert probe.n_features_in_ == probe_cache["probe_features"]["embed"].shape[1]
    rows = probeview.misclassified("tiny-llama", "embed", context=3)
    wrong = np.flatnonzero(t["y_true"] != t["pred.embed"])
    assert len(rows) == len(wrong) > 0
    for r, i in zip(rows, wrong):
        assert (r["doc"], r["position"]) == (int(t["doc"][i]), int(t["position"][i]))
        assert (r["true"], r["pred"]) == (names[t["y_true"][i]], names[t["pred.embed"][i]]) and r["true"] != r["pred"]
        assert r["token"]  # decoded by the fixture model's tokenizer


HOSTILE = [None, "", "../../etc/passwd", "x" * 5000, {"a": 1}, ["1"], 10**30, float("nan"), "0123456789abcdeg",
           "report:../../x", "/etc"]


def test_probe_views_refuse_hostile_values(probe_cache):
    from app.pages import layers

    for bad in HOSTILE:
        assert layers.probe_layer_choices(bad, "1") == ([], None)
        for args in ((bad, "1", "0123456789abcdef"), ("tiny-llama", bad, "0123456789abcdef"),
                     ("tiny-llama", "1", bad)):
            out = layers.probe_text_view(*args)
            assert isinstance(out, list) and "Traceback" not in str(out)
        for args in ((bad, "1"), ("tiny-llama", bad)):
            fig, msg = layers.probe_test_view(*args)
            assert fig["data"] == [] or bad == "1", args
    assert layers.probe_layer_choices("tiny-llama", "zzz") == ([{"label": v, "value": v} for v in
                                                                 ("embed", "0", "1")], "1")
    fig, msg = layers.probe_test_view("tiny-llama", "../1")
    assert fig["data"] == [] and "no test predictions" in str(msg)


def test_demo_saves_probes_that_reproduce_its_test_predictions(tmp_path, monkeypatch):
    """The demo on a tiny random model: the saved probes, applied to the cached activations of the saved test
    tokens at the saved hooks, give the saved predictions, whose accuracy is the reported test score."""
    from probekit.cache import ActivationCache
    from probekit.demo import DemoConfig, run_demo
    from probekit.probes.layer_probe_files import load_probe_index
    from probekit.testing import make_tiny_model

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path))
    mdir = tmp_path / "models" / "tiny"
    make_tiny_model(mdir, arch="llama", n_layers=2, d_model=32)
    out = run_demo(DemoConfig(model=str(mdir), n_functions=12, max_length=48, max_iter=20,
                              out=str(tmp_path / "out"), progress=False))
    res, folder = out["result"]["result"], tmp_path / "out"
    idx, t = load_probe_index(folder), load_test_predictions(folder)
    assert list(idx["layers"]) == res["layers"] and idx["labels"] == out["result"]["labels"]
    assert len(t["y_true"]) == res["n_test"]
    run = ActivationCache(tmp_path).open(out["result"]["capture"]["run"])
    meta = run.meta_tensors(["doc_index", "position"])
    where = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(meta["doc_index"].numpy(), meta["position"].numpy()))}
    rows = np.array([where[(int(d), int(p))] for d, p in zip(t["doc"], t["position"])])
    ctx = set(zip(t["ctx.doc"].tolist(), t["ctx.position"].tolist()))
    assert set(zip(t["doc"].tolist(), t["position"].tolist())) <= ctx
    for layer, score in zip(res["layers"], res["test_score"]):
        probe = load_layer_probe(folder, layer)
        x = run.load(idx["layers"][layer]["hook"], rows).float().numpy()
        assert np.array_equal(probe.predict(x), t[f"pred.{layer}"])
        assert np.mean(t[f"pred.{layer}"] == t["y_true"]) == score
