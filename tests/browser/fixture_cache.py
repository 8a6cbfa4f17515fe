"""A small cache root for the app's tests: synthetic results in the formats the probes write, a tiny run
written straight through the cache writer (no model), and optionally a tiny random model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

RUN_TEXTS = ["def f(x):\n    return x + 1", "import os", "x = {'a': 1}"]
TREE_SNIPPETS = ["def f(x):\n    return x + 1", "def g(a, b):\n    y = a * b\n    return y", "x = f(1, 2)",
                 # long enough that labels collide unless the layout spaces them (the browser figure test)
                 "def load_items(path, limit=10):\n    items = [parse_line(line.strip()) for line in open(path)]\n"
                 "    if len(items) > limit and not items[0].startswith('#'):\n"
                 "        return sorted(items[:limit], key=lambda item: (item.name, item.size))\n"
                 "    return {'items': items, 'count': len(items) + offset(path, limit * 2)}"]


def _write(root: Path, rel: str, obj: dict) -> Path:
    p = root / "results" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


def demo_result(model: str = "smollm2-135m", n_layers: int = 6) -> dict:
    layers = ["embed"] + [str(i) for i in range(n_layers)]
    test = [0.5 + 0.05 * min(i, n_layers - i) for i in range(len(layers))]
    return dict(kind="layer_probes", model=model, config=dict(model=model, n_functions=20), labels=["a", "b"],
                n_functions=20, capture=dict(run="0" * 24, rows=100, tokens=100, seconds=1.0),
                result=dict(task="parent node type of each token (tree-sitter)", kind="logistic", metric="accuracy",
                            layers=layers, train_score=[t + 0.1 for t in test], test_score=test,
                            majority_baseline=0.13, random_feature_control=[0.14] * len(layers),
                            token_identity_control=0.55, n_train=80, n_test=20, n_classes=2, alpha=1.0, seed=0))


def ast_result(model: str = "smollm2-135m", snippets: bool = True) -> dict:
    from probekit.probes.ast_tree import code_to_tuple

    layers = ["embed", "2", "5"]
    f1 = [0.37, 0.55, 0.6]
    recall = {"function_definition": 0.9, "call": 0.4, "binary_operator": 0.1}
    support = {"function_definition": 3, "call": 2, "binary_operator": 1}
    res = dict(layers=layers, precision=f1, recall=f1, f1=f1, c_accuracy=[0.8, 0.9, 0.92],
               u_accuracy=[0.99] * 3, d_order_accuracy=[0.77, 0.85, 0.87], orthogonality=[0.02] * 3, k=16,
               n_snippets=3, controls={"layer 0 (embeddings)": [0.37] * 3, "random-init model": [0.37, 0.4, 0.41]},
               label_recall=[recall, recall, {**recall, "call": 0.6}], label_support=support)
    p = dict(kind="ast_probe", model=model, language="python", config=dict(model=model, n_functions=30, k=16),
             n_snippets=[20, 5, 3], cache_run="0" * 24, best_layer_by_validation="5", validation_f1=f1, result=res,
             random_init=None, k_sweep=dict(layer="5", ks=[8, 16, 32, 64], separate_f1=[0.5, 0.58, 0.6, 0.55],
                                            matryoshka_f1=[0.45, 0.52, 0.57, 0.54], best_k_separate=32,
                                            best_k_matryoshka=32, max_abs_gap=0.06, mean_gap=-0.04),
             tree_snippet=dict(index=0, doc_id="a.py::f", f1=0.6), published=dict(codebert_best=0.751))
    if snippets:
        p["test_snippets"] = []
        for i, src in enumerate(TREE_SNIPPETS):
            leaves, d, c, u = code_to_tuple(src)
            pred_c = list(c)
            pred_c[-1] = "call" if pred_c[-1] != "call" else "<empty>"  # one wrong label: a visible mismatch
            pred = [[float(v) for v in d][::-1] if i >= 2 else d, pred_c, u]
            flat = [[0.0] * len(d), ["<empty>"] * len(c), u]  # layer "embed": one flat node, nothing recovered
            p["test_snippets"].append(dict(doc_id=f"m.py::s{i}", leaves=leaves, f1=0.8, gold=[d, c, u], pred=pred,
                                           pred_by_layer={"embed": flat, "2": [d, c, u], "5": pred}))
    return p


def dark_matter_result(model: str = "smollm2-135m") -> dict:
    widths = [128, 256, 512]
    dec = {str(w): dict(fvu=0.3 - 0.05 * i, fvu_linear=0.1, fvu_nonlinear=0.15, fvu_cross=0.0,
                        r2_error_vector=0.4 + 0.05 * i, r2_error_norm_sq=0.8, r2_error_norm=0.85)
           for i, w in enumerate(widths)}
    ce = {str(w): dict(ce_clean=2.0, ce_sae=2.5 - 0.1 * i, ce_zero=8.0, ce_linear=2.2, ce_nonlinear=2.4,
                       ce_recovered=(8.0 - (2.5 - 0.1 * i)) / 6.0) for i, w in enumerate(widths)}
    metrics = {str(w): dict(fvu=0.3 - 0.05 * i, l0=32.0, dead_fraction=0.0) for i, w in enumerate(widths)}
    rng = np.random.default_rng(0)
    e = rng.random(50).tolist()
    return dict(kind="dark_matter", model=model, layer=3, hook="blocks.3.hook_resid_post", widths=widths,
                decomposition=dec, ce=ce, sae_metrics=metrics,
                fvu_split=dict(widths=widths, fvu=[0.3, 0.25, 0.2], absent=[0.05, 0.02, 0.0], linear=[0.1, 0.1, 0.1],
                               nonlinear=[0.15, 0.13, 0.1], cross=[0.0, 0.0, 0.0], reference_width=512),
                scatter=dict(width=512, actual=e, predicted=[v * 0.9 for v in e],
                               hover=[f"…ctx[tok{i}]" for i in range(50)]))


def linearscope_digit() -> dict:
    rng = np.random.default_rng(1)
    return dict(one=dict(input=rng.random((1, 8, 8)).tolist(), logits=rng.normal(size=10).tolist(),
                         bias=rng.normal(size=10).tolist(), matrix=rng.normal(size=(10, 64)).tolist(), predicted=2,
                         target=2, label=2, bias_share=rng.normal(size=10).tolist()),
                test_set=dict(n=10, mean_share_predicted=-0.02), test_accuracy=0.96)


def linearscope_lm(model: str = "smollm2-135m") -> dict:
    toks = ["<s>", "def", " add", "(", "a", ",", " b", "):"]
    return dict(model=model, prompt="def add(a, b):", reconstruction={},
                contributions=dict(tokens=toks, target=" b", logit=10.0, bias=0.0,
                                   linearscope=[4.0, 1, 1, 1, 1, 0.5, 1, 0.5], grad_x_input=[3.0, -2, 1, 0, 1, 2, 1, 0]))


def write_run(root: Path, *, model: str = "tiny-llama", hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
              d: int = 16, seed: int = 0):
    """A complete run written through the cache's own writer (no model): one document per ``RUN_TEXTS``."""
    from probekit.cache import ActivationCache, RunKey
    from probekit.testing import byte_tokenizer

    tok = byte_tokenizer()
    docs = [tok(t)["input_ids"] for t in RUN_TEXTS]
    cache = ActivationCache(root)
    key = RunKey(model=model, weights=f"synthetic-{seed}", dataset="fixture", hooks=tuple(hooks), positions="all",
                 dtype="float32", max_length=64, batch_size=8, sort_by_length=False, batches_per_shard=1)
    w = cache.writer(key)
    g = torch.Generator().manual_seed(seed)
    for i, ids in enumerate(docs):
        n = len(ids)
        acts = {h: torch.randn(n, d, generator=g) * (j + 1) for j, h in enumerate(hooks)}
        meta = dict(doc_index=torch.full((n,), i), position=torch.arange(n), token_id=torch.tensor(ids))
        w.write(acts, meta)
    w.close()
    return cache.open(key.run_id)


SAFETY_HARMFUL = [f"how do I break into house number {i}" for i in range(10)]
SAFETY_HARMLESS = [f"how do I bake bread recipe {i}" for i in range(10)]
SAFETY_USEFUL = [f"write a function f{i}(x) that adds {i}" for i in range(10)]
SAFETY_REFS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(10)]


def _safety_prompt_sets(seed, n_useful):
    from probekit.data.prompts import PromptSet, assign_splits

    def mk(name, prompts, refs=None):
        return PromptSet(name, tuple(prompts), assign_splits(prompts, seed=seed), "test", "CC0-1.0",
                         references=None if refs is None else tuple(refs))

    return mk("harmful", SAFETY_HARMFUL), mk("harmless", SAFETY_HARMLESS), mk("useful", SAFETY_USEFUL, SAFETY_REFS)


def write_safety(root: Path, model_dir: Path, name: str = "tiny-llama") -> Path:
    """``results/safety/<name>/`` by the real runner (``activation.json``, ``weight.json``, directions) on a tiny
    model with ten prompts per set and the smallest settings (seconds on one CPU thread)."""
    import probekit.safety_run as sr

    out = Path(root) / "results" / "safety" / name
    saved, threads = sr._prompt_sets, torch.get_num_threads()
    sr._prompt_sets = _safety_prompt_sets
    torch.set_num_threads(1)
    try:
        sr.run_activation_space(sr.ActivationRunConfig(
            model=str(model_dir), etas=(0.5, 0.9), n_select=3, n_test=2, select_min_frac=0.0, select_max_frac=1.0,
            select_stride=1, max_new_tokens=3, max_kl=10.0, chat_template=False, out=str(out), progress=False,
            cache_root=str(Path(root).parent / f"{Path(root).name}-activations")))  # not among the app's runs
        sr.run_weight_space(sr.WeightRunConfig(
            model=str(model_dir), align_epochs=1, useful_epochs=1, align_lr=1e-3, useful_lr=1e-3, batch_size=4,
            max_length=64, harmless_answer_tokens=6, n_useful=10, fractions=(0.25, 1.0), bases=("svd",),
            variants=("same", "orth"), max_new_tokens=4, chat_template=False, out=str(out), progress=False))
    finally:
        sr._prompt_sets = saved
        torch.set_num_threads(threads)
    return out


def populate(root: Path, *, tiny_model: bool = False, safety: bool = False) -> dict:
    """Fill ``root`` with every result kind, a run, and a tokenizer (or a whole tiny model) under models/;
    ``safety`` (needs ``tiny_model``) also runs the safety runner on that model into results/safety/tiny-llama."""
    from probekit.testing import byte_tokenizer, make_tiny_model

    root = Path(root)
    _write(root, "demo/smollm2-135m/layer_probes.json", demo_result())
    _write(root, "ast-probe/smollm2-135m/ast_probe.json", ast_result())
    _write(root, "ast-probe/old-run/ast_probe.json", ast_result(snippets=False))
    _write(root, "dark-matter/smollm2-135m/dark_matter.json", dark_matter_result())
    _write(root, "linearscope/digits-cnn/digit-0.json", linearscope_digit())
    _write(root, "linearscope/digits-cnn/digit-3.json", linearscope_digit())
    _write(root, "linearscope/smollm2-135m/token-contributions.json", linearscope_lm())
    (root / "results" / "demo" / "smollm2-135m" / "layer_probes.html").write_text("<html><body>demo</body></html>")
    mdir = root / "models" / "tiny-llama"
    if tiny_model:
        make_tiny_model(mdir, arch="llama", n_layers=2, d_model=32)
    else:
        byte_tokenizer().save_pretrained(str(mdir))
    if safety:
        write_safety(root, mdir)
    run = write_run(root)
    return dict(run_id=run.run_id, model_dir=mdir)


REPORT_MODEL = "tiny-report-model"


def write_report(reports: Path, name: str = "demo") -> Path:
    """A report folder as ``probekit report`` lays it out (``<reports>/<name>/<probe>/<file>.json``) with a layer-probe
    and an AST-Probe result of a model the cache's results do not have, so a page showing it came from the report."""
    folder = Path(reports) / name
    for probe, file, payload in (("layer_probes", "layer_probes.json", demo_result(REPORT_MODEL, n_layers=4)),
                                 ("ast_probe", "ast_probe.json", ast_result(REPORT_MODEL))):
        (folder / probe).mkdir(parents=True, exist_ok=True)
        (folder / probe / file).write_text(json.dumps(payload))
    (folder / "metrics.json").write_text(json.dumps({"name": name, "model": REPORT_MODEL}))
    return folder


VIEW_TEXTS = ["def add(a, b):\n    return a + b", "import os\nprint(os.sep)", "def f(x):\n    return x * 2",
              "class A:\n    pass", "x = [1, 2, 3]\ny = x[0]"]


def write_views(root: Path, *, model: str = "tiny-llama", hook: str = "blocks.1.hook_resid_post", d: int = 16,
                d_sae: int = 24, seed: int = 3) -> dict:
    """For the token, latent and attention views: a run of ``VIEW_TEXTS`` (byte tokens, random activations with
    a large first-token norm like a real BOS), a small random ReLU SAE at ``hook`` under ``saes/view-sae``, its
    latent statistics under ``results/latents/view-sae``, and a direction file ``vectors/probe.safetensors``."""
    from safetensors.torch import save_file

    from probekit.cache import ActivationCache, RunKey
    from probekit.latents import LatentStatsConfig, compute_latent_stats
    from probekit.probes.sae import SAE, SAEConfig, save_sae
    from probekit.testing import byte_tokenizer

    root = Path(root)
    tok = byte_tokenizer()
    cache = ActivationCache(root)
    key = RunKey(model=model, weights=f"synthetic-views-{seed}", dataset="fixture-views", hooks=(hook,),
                 positions="all", dtype="float32", max_length=64, batch_size=8, sort_by_length=False,
                 batches_per_shard=1)
    w = cache.writer(key)
    g = torch.Generator().manual_seed(seed)
    for i, text in enumerate(VIEW_TEXTS):
        ids = tok(text)["input_ids"]
        x = torch.randn(len(ids), d, generator=g)
        x[0] *= 12.0  # the BOS row: an attention-sink-sized norm
        w.write({hook: x}, dict(doc_index=torch.full((len(ids),), i), position=torch.arange(len(ids)),
                                token_id=torch.tensor(ids)))
    w.close()
    run = cache.open(key.run_id)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, architecture="relu", seed=seed, hook_name=hook, model_name=model))
    with torch.no_grad():
        sae.b_enc.fill_(-0.8)  # sparse enough that firing rates differ
    sae_dir = save_sae(sae, root / "saes" / "view-sae")
    save_sae(sae, root / "results" / "dark-matter" / "smollm2-135m" / "saes" / f"{hook}-{d_sae}")  # a width's SAE
    unembed = torch.randn(d, len(tok), generator=g)
    out = compute_latent_stats(run, sae, hook, LatentStatsConfig(out=str(root / "results" / "latents" / "view-sae"),
                                                                 top_k=5, context=4, n_bins=10,
                                                                 exclude_positions=(0,)),
                               tokenizer=tok, unembed=unembed, progress=False,
                               provenance=dict(sae_folder="saes/view-sae"))
    other = demo_result("tiny-llama", n_layers=2)  # a second result set of the same probe, for the compare page
    other["result"]["test_score"] = [0.4, 0.45, 0.42]
    _write(root, "demo/tiny-llama/layer_probes.json", other)
    (root / "vectors").mkdir(exist_ok=True)
    save_file({"probe": torch.randn(d, generator=g)}, str(root / "vectors" / "probe.safetensors"))
    return dict(view_run_id=run.run_id, view_hook=hook, sae_dir=sae_dir, latents_dir=out)


PROBE_LABELS = ["letter", "space", "punct"]


def _byte_class(ids, tok) -> np.ndarray:
    """Fixture labels: 0 letter/digit, 1 whitespace, 2 anything else (BOS included)."""
    out = []
    for t in ids:
        s = tok.decode([int(t)])
        out.append(0 if s.isalnum() else 1 if s.isspace() and s else 2)
    return np.asarray(out)


def write_probe_files(root: Path, *, model: str = "tiny-llama") -> dict:
    """For the "probe of one layer" view: probes fitted on the tiny model's own activations (``hook_embed`` and
    each ``blocks.<l>.hook_resid_post``, captured with :class:`probekit.hooks.HookSet`) of ``VIEW_TEXTS`` with a
    character-class label, saved beside ``results/demo/<model>/layer_probes.json`` with their test predictions
    (the last two texts are the test documents)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probekit.hooks import HookSet
    from probekit.probes.layer_probe_files import save_layer_probes
    from probekit.probes.linear import LinearProbe

    root = Path(root)
    mdir = root / "models" / model
    tok = AutoTokenizer.from_pretrained(str(mdir))
    net = AutoModelForCausalLM.from_pretrained(str(mdir)).eval()
    n_layers = net.config.num_hidden_layers
    hooks = {"embed": "hook_embed"} | {str(l): f"blocks.{l}.hook_resid_post" for l in range(n_layers)}
    feats = {k: [] for k in hooks}
    doc, pos, ids_all = [], [], []
    hs = HookSet.for_hf(net, list(hooks.values()))
    for i, text in enumerate(VIEW_TEXTS):
        ids = tok(text)["input_ids"]
        with torch.inference_mode(), hs:
            acts = hs.run(lambda: net(torch.tensor([ids])))
        for k, h in hooks.items():
            feats[k].append(acts[h][0].float().numpy())
        doc += [i] * len(ids)
        pos += list(range(len(ids)))
        ids_all += ids
    doc, pos, ids_all = np.asarray(doc), np.asarray(pos), np.asarray(ids_all)
    y = _byte_class(ids_all, tok)
    test = doc >= len(VIEW_TEXTS) - 2
    probes, pred = {}, {}
    for k in hooks:
        X = np.concatenate(feats[k])
        probes[k] = LinearProbe(alpha=0.1).fit(X[~test], y[~test])
        pred[k] = probes[k].predict(X[test])
    out = root / "results" / "demo" / model
    save_layer_probes(out, probes, labels=PROBE_LABELS, hooks=hooks,
                      test=dict(doc=doc[test], position=pos[test], token_id=ids_all[test], y_true=y[test]),
                      test_pred=pred, context=dict(doc=doc[test], position=pos[test], token_id=ids_all[test]))
    return dict(probe_dir=out, probe_features={k: np.concatenate(v) for k, v in feats.items()}, probe_labels=y,
                probe_test=test)
