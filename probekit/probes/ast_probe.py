"""AST-Probe: a low-dimensional syntactic subspace read out as ``(d, c, u)``.

Hernández López et al. (ASE 2022); see METHODS.md §1. With ``h_i`` the leaf
vector at one layer and ``t_i = Pᵀ h_i`` (``P`` of shape ``(D, k)``)::

    d̂_i = ‖t_{i+1} − t_i‖²
    ĉ_i = softmax(V_cᵀ (t_{i+1} − t_i))
    û_j = softmax(V_uᵀ t_j)
    loss = L_d + L_c + L_u + λ ‖PᵀP − I‖²_F

``L_d`` is the mean, over pairs ``(i, j)`` of boundaries of the same snippet
with ``d_i > d_j``, of ``max(0, 1 − (d̂_i − d̂_j))``; ``L_c``, ``L_u`` are
cross-entropies.

:class:`ASTProbe` fits one probe per layer, all layers at once as one batched
model (``P`` of shape ``(L, D, k)``): each mini-batch updates every layer, the
loss is the sum of the per-layer losses, and every layer has its own Adam
parameter group, learning-rate schedule and early stopping; every layer starts
from the same initial draw, so the result equals separate per-layer fits with
the same seed (tested).

Data format
-----------
``X``: list of snippets, snippet ``s`` a tensor / array of shape
``(n_layers, n_s, D)`` (leaf vectors, already standardised).
``y``: list of gold tuples ``(d, c, u)`` with ``d`` of shape ``(n_s − 1,)``
(int), ``c`` of shape ``(n_s − 1,)`` and ``u`` of shape ``(n_s,)`` (labels,
strings, :data:`~probekit.probes.ast_tree.EMPTY` included).

Public API
----------
ASTProbe
ASTProbeResult
pairwise_rank_loss
score_ast_predictions
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from probekit.probes.ast_figures import AST_METRICS
from probekit.probes.ast_tree import constituents, tree_f1, tuple_to_tree
from probekit.jsonsafe import json_safe

__all__ = ["ASTProbe", "ASTProbeResult", "PackedLeaves", "pairwise_rank_loss", "per_label_recall", "score_ast_predictions"]

UNK = "<unk>"
_IGNORE = -100


# ---------------------------------------------------------------------------
# loss pieces
# ---------------------------------------------------------------------------


def pairwise_rank_loss(d_hat: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L_d``: mean hinge over pairs of boundaries of one snippet with ``d_i > d_j``.

    Parameters
    ----------
    d_hat : Tensor of shape (..., B, M)
        Predicted distances (any leading batch dims, e.g. layers).
    d : Tensor of shape (B, M)
        Gold distances (padding values arbitrary).
    mask : bool Tensor of shape (B, M)
        Valid boundaries.

    Returns
    -------
    Tensor of shape (...)
        ``mean over (b, i, j) with mask, d[b,i] > d[b,j] of
        max(0, 1 − (d_hat[b,i] − d_hat[b,j]))``; pairs are pooled over the
        batch (ties ignored). 0 when no pair exists.
    """
    pair = (d[:, :, None] > d[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    diff = d_hat[..., :, :, None] - d_hat[..., :, None, :]
    hinge = torch.relu(1.0 - diff) * pair
    n = pair.sum().clamp_min(1)
    return hinge.sum(dim=(-3, -2, -1)) / n


def _layer_losses(
    P: torch.Tensor,
    Vc: torch.Tensor,
    Vu: torch.Tensor,
    bc: torch.Tensor | None,
    bu: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """Per-layer loss, shape (L,).

    ``P`` (L, D, k), ``Vc`` (L, k, n_c), ``Vu`` (L, k, n_u), biases ``bc`` (L, n_c) and ``bu`` (L, n_u) or
    ``None`` (the published, bias-free heads).
    """
    T = torch.einsum("lbnd,ldk->lbnk", batch["H"], P)
    diff = T[:, :, 1:] - T[:, :, :-1]
    d_hat = diff.pow(2).sum(-1)
    L = P.shape[0]
    l_d = pairwise_rank_loss(d_hat, batch["d"], batch["bmask"])
    logit_c = torch.einsum("lbik,lkc->lbic", diff, Vc)
    logit_u = torch.einsum("lbnk,lkc->lbnc", T, Vu)
    if bc is not None:
        logit_c = logit_c + bc[:, None, None, :]
    if bu is not None:
        logit_u = logit_u + bu[:, None, None, :]
    c_t = batch["c"].expand(L, *batch["c"].shape)
    u_t = batch["u"].expand(L, *batch["u"].shape)
    l_c = _masked_ce(logit_c, c_t)
    l_u = _masked_ce(logit_u, u_t)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    orth = (P.transpose(1, 2) @ P - eye).pow(2).sum(dim=(1, 2))
    return l_d + l_c + l_u + lam * orth


def _masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per layer: logits (L, B, N, C), target (L, B, N) with -100 = ignore."""
    L = logits.shape[0]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=_IGNORE, reduction="none"
    ).reshape(L, -1)
    n = (target[0] != _IGNORE).sum().clamp_min(1)
    return ce.sum(1) / n


# ---------------------------------------------------------------------------
# data handling
# ---------------------------------------------------------------------------


@dataclass
class PackedLeaves:
    """Leaf vectors of many snippets in one tensor, so batches are gathered where the data lives.

    Attributes
    ----------
    H : Tensor of shape (n_layers, n_leaves_total, D)
        Float32 leaf vectors of every snippet, concatenated along dim 1, on any device (e.g. built on the GPU
        from a :class:`~probekit.device_cache.DeviceCache`).
    lengths : ndarray of shape (n_snippets,)
        Leaves per snippet (host memory: batch shapes are known without a device sync).

    Snippet ``s`` is ``H[:, offsets[s]:offsets[s + 1]]`` with ``offsets = [0, cumsum(lengths)]``.
    """

    H: torch.Tensor
    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64).reshape(-1)
        if self.H.ndim != 3:
            raise ValueError(f"H must have shape (n_layers, n_leaves_total, D); got {tuple(self.H.shape)}.")
        if len(self.lengths) == 0:
            raise ValueError("need at least one snippet.")
        if (self.lengths < 1).any():
            raise ValueError(f"snippet {int(np.argmin(self.lengths))} has no leaves.")
        if int(self.lengths.sum()) != self.H.shape[1]:
            raise ValueError(f"lengths sum to {int(self.lengths.sum())} but H holds {self.H.shape[1]} leaves.")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_layers(self) -> int:
        return int(self.H.shape[0])

    @property
    def dim(self) -> int:
        return int(self.H.shape[2])

    def snippet(self, s: int) -> torch.Tensor:
        """Leaf vectors of snippet ``s``, shape (n_layers, n_s, D) (a view)."""
        return self.H[:, self.offsets[s] : self.offsets[s + 1]]

    def layers(self, sel: slice | Sequence[int]) -> PackedLeaves:
        """The same snippets restricted to some layers (a view for a slice)."""
        H = self.H[sel] if isinstance(sel, slice) else self.H[list(sel)]
        return PackedLeaves(H, self.lengths)

    def snippets(self, start: int, stop: int) -> PackedLeaves:
        """Snippets ``start:stop`` (a view: e.g. the train split of a corpus packed in split order)."""
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"need 0 <= start < stop <= {len(self)}; got {start}, {stop}.")
        return PackedLeaves(self.H[:, self.offsets[start] : self.offsets[stop]], self.lengths[start:stop])

    def to(self, device: str | torch.device) -> PackedLeaves:
        return PackedLeaves(self.H.to(device, torch.float32), self.lengths)

    @classmethod
    def from_list(cls, X: Sequence[Any], device: str | torch.device = "cpu") -> PackedLeaves:
        """Pack a list of ``(n_layers, n_s, D)`` tensors / arrays (checks that shapes agree)."""
        if len(X) == 0:
            raise ValueError("need at least one snippet.")
        ts = [_as_tensor(x) for x in X]
        L, _, D = ts[0].shape
        for i, t in enumerate(ts):
            if t.shape[0] != L or t.shape[2] != D:
                raise ValueError(f"snippet {i} has shape {tuple(t.shape)}; expected ({L}, n, {D}).")
            if t.shape[1] < 1:
                raise ValueError(f"snippet {i} has no leaves.")
        return cls(torch.cat(ts, 1).to(device), np.array([t.shape[1] for t in ts]))


def _as_tensor(x: Any) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to("cpu", torch.float32)
    if t.ndim != 3:
        raise ValueError(f"each snippet must have shape (n_layers, n_leaves, D); got {tuple(t.shape)}.")
    return t


def _as_packed(X: PackedLeaves | Sequence[Any], device: torch.device) -> PackedLeaves:
    if isinstance(X, PackedLeaves):
        return X if X.H.device == device and X.H.dtype == torch.float32 else X.to(device)
    return PackedLeaves.from_list(X, device)


def _check_gold(y: Sequence[Any], lengths: np.ndarray) -> list[tuple[np.ndarray, list[str], list[str]]]:
    if len(y) != len(lengths):
        raise ValueError(f"{len(y)} gold tuples for {len(lengths)} snippets.")
    out = []
    for i, (g, n) in enumerate(zip(y, lengths)):
        d, c, u = g[0], g[1], g[2]
        d = np.asarray(d, dtype=np.float64).reshape(-1)
        c, u = [str(v) for v in c], [str(v) for v in u]
        if len(d) != n - 1 or len(c) != n - 1 or len(u) != n:
            raise ValueError(
                f"snippet {i}: {n} leaves need len(d) == len(c) == {n - 1} and len(u) == {n}; "
                f"got {len(d)}, {len(c)}, {len(u)}."
            )
        out.append((d, c, u))
    return out


class _Batches:
    """Gathers padded mini-batches from packed leaves (and packed gold) on the data's device.

    A batch is a dict: ``H`` (L, B, N, D) with zeros past each snippet's end, ``lens`` (B,) on the host;
    with gold also ``d``, ``bmask`` (B, N − 1) and ``c`` (B, N − 1), ``u`` (B, N) label indices with -100
    past the end.
    """

    def __init__(
        self,
        X: PackedLeaves,
        gold: list[tuple[np.ndarray, list[str], list[str]]] | None = None,
        c_index: dict[str, int] | None = None,
        u_index: dict[str, int] | None = None,
    ) -> None:
        self.X = X
        dev = X.H.device
        self.off = torch.as_tensor(X.offsets, device=dev)
        self.gold = gold is not None
        if gold is not None:
            assert c_index is not None and u_index is not None
            # boundaries of snippet s start at offsets[s] - s in the packed d / c arrays
            self.boff = torch.as_tensor(X.offsets - np.arange(len(X) + 1), device=dev)
            self.d = torch.as_tensor(np.concatenate([g[0] for g in gold]), dtype=torch.float32, device=dev)
            self.c = torch.as_tensor([c_index.get(v, 0) for g in gold for v in g[1]], dtype=torch.long, device=dev)
            self.u = torch.as_tensor([u_index.get(v, 0) for g in gold for v in g[2]], dtype=torch.long, device=dev)

    def __call__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx_np = np.asarray(idx, dtype=np.int64)
        lens_np = self.X.lengths[idx_np]
        N = int(lens_np.max())
        dev = self.X.H.device
        idx_t = torch.as_tensor(idx_np, device=dev)
        lens = torch.as_tensor(lens_np, device=dev)
        ar = torch.arange(N, device=dev)
        valid = ar[None, :] < lens[:, None]  # (B, N)
        pos = torch.where(valid, self.off[idx_t, None] + ar[None, :], 0)
        H = self.X.H[:, pos] * valid[None, :, :, None]
        out = {"H": H, "lens": torch.as_tensor(lens_np)}
        if self.gold:
            M = max(N - 1, 1)
            arm = torch.arange(M, device=dev)
            bmask = arm[None, :] < (lens - 1)[:, None]
            bpos = torch.where(bmask, self.boff[idx_t, None] + arm[None, :], 0)
            if self.d.numel() == 0:  # every snippet has a single leaf: no boundary at all
                d = torch.zeros(len(idx_np), M, device=dev)
                c = torch.full((len(idx_np), M), _IGNORE, dtype=torch.long, device=dev)
            else:
                d = torch.where(bmask, self.d[bpos], 0.0)
                c = torch.where(bmask, self.c[bpos], _IGNORE)
            u = torch.where(valid, self.u[pos], _IGNORE)
            out.update(d=d, bmask=bmask, c=c, u=u)
        return out


def _collate(
    X: Sequence[Any],
    gold: list[tuple[np.ndarray, list[str], list[str]]] | None,
    idx: Sequence[int],
    c_index: dict[str, int] | None,
    u_index: dict[str, int] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One padded batch of snippets ``idx`` from a list (see :class:`_Batches` for the format)."""
    Xp = _as_packed(X, device)
    return _Batches(Xp, gold, c_index, u_index)(idx)


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------


def score_ast_predictions(
    preds: Sequence[tuple[Any, Sequence[str], Sequence[str]]],
    golds: Sequence[tuple[Any, Sequence[str], Sequence[str]]],
) -> dict[str, float]:
    """Score predicted tuples of one layer against gold tuples.

    Parameters
    ----------
    preds, golds : sequence of (d, c, u)
        One per snippet; ``d`` of shape (n − 1,) (predicted distances or gold
        heights), ``c`` (n − 1,) and ``u`` (n,) labels.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``: constituent scores of the tree
        rebuilt with :func:`tuple_to_tree`, averaged over snippets;
        ``c_accuracy``, ``u_accuracy``: label accuracy pooled over all
        boundaries / leaves; ``d_order_accuracy``: pooled over pairs of
        boundaries of one snippet with ``d_i ≠ d_j`` (gold), the fraction
        where ``sign(d̂_i − d̂_j) == sign(d_i − d_j)`` (NaN if no such pair).
    """
    return _score(preds, golds)[0]


def per_label_recall(
    preds: Sequence[tuple[Any, Sequence[str], Sequence[str]]],
    golds: Sequence[tuple[Any, Sequence[str], Sequence[str]]],
) -> tuple[dict[str, float], dict[str, int]]:
    """Recall of gold constituents per non-terminal label.

    Parameters
    ----------
    preds, golds : sequence of (d, c, u)
        As :func:`score_ast_predictions`.

    Returns
    -------
    recall : dict of str -> float
        For each label, the fraction of gold constituents ``(label, leaf set)`` (unary chains above a single
        leaf included, as in :func:`~probekit.probes.ast_tree.constituents`) that the predicted tree also has.
    support : dict of str -> int
        Number of gold constituents per label, summed over snippets.
    """
    _, hit, sup = _score(preds, golds)
    return {k: hit[k] / sup[k] for k in sorted(sup, key=lambda k: (-sup[k], k))}, dict(sup)


def _score(preds, golds) -> tuple[dict[str, float], Counter, Counter]:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold tuples.")
    label_hit: Counter = Counter()
    label_n: Counter = Counter()
    prec, rec, f1s = [], [], []
    c_hit = c_n = u_hit = u_n = 0
    o_hit = o_n = 0
    for (pd, pc, pu), (gd, gc, gu) in zip(preds, golds):
        pd = np.asarray(pd, dtype=np.float64).reshape(-1)
        gd = np.asarray(gd, dtype=np.float64).reshape(-1)
        pc, pu = [str(v) for v in pc], [str(v) for v in pu]
        gc, gu = [str(v) for v in gc], [str(v) for v in gu]
        leaves = [str(j) for j in range(len(gu))]
        pt, gt = tuple_to_tree(pd, pc, pu, leaves), tuple_to_tree(gd, gc, gu, leaves)
        p, r, f = tree_f1(pt, gt)
        g_set, p_set = constituents(gt), constituents(pt)
        label_n.update(lab for lab, _ in g_set)
        label_hit.update(lab for lab, _ in g_set & p_set)
        prec.append(p)
        rec.append(r)
        f1s.append(f)
        c_hit += sum(a == b for a, b in zip(pc, gc))
        c_n += len(gc)
        u_hit += sum(a == b for a, b in zip(pu, gu))
        u_n += len(gu)
        if len(gd) > 1:
            sg = np.sign(gd[:, None] - gd[None, :])
            sp = np.sign(pd[:, None] - pd[None, :])
            upper = np.triu(np.ones_like(sg, dtype=bool), 1) & (sg != 0)
            o_hit += int((sg[upper] == sp[upper]).sum())
            o_n += int(upper.sum())
    nan = float("nan")
    scores = {
        "precision": float(np.mean(prec)) if prec else nan,
        "recall": float(np.mean(rec)) if rec else nan,
        "f1": float(np.mean(f1s)) if f1s else nan,
        "c_accuracy": c_hit / c_n if c_n else nan,
        "u_accuracy": u_hit / u_n if u_n else nan,
        "d_order_accuracy": o_hit / o_n if o_n else nan,
    }
    return scores, label_hit, label_n


@dataclass
class ASTProbeResult:
    """AST-Probe scores per layer.

    Attributes
    ----------
    layers : list of str, length n_layers
    precision, recall, f1 : list of float, length n_layers
        Constituent scores averaged over snippets.
    c_accuracy, u_accuracy : list of float
        Label accuracy of ``c`` / ``u`` (pooled; unseen gold labels count as wrong).
    d_order_accuracy : list of float
        Pairwise order accuracy of ``d̂`` over pairs with ``d_i ≠ d_j``.
    orthogonality : list of float
        ``‖PᵀP − I‖_F`` of the evaluated (prefix of the) probe, per layer.
    k : int
        Subspace size evaluated.
    n_snippets : int
    controls : dict of str -> list of float
        Optional control F1 curves (e.g. ``"random-init model"``), per layer.
    label_recall : list of dict of str -> float
        Per layer, recall of gold constituents per non-terminal label (:func:`per_label_recall`).
    label_support : dict of str -> int
        Gold constituents per label on the scored snippets.
    """

    layers: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    c_accuracy: list[float]
    u_accuracy: list[float]
    d_order_accuracy: list[float]
    orthogonality: list[float]
    k: int
    n_snippets: int
    controls: dict[str, list[float]] = field(default_factory=dict)
    label_recall: list[dict[str, float]] = field(default_factory=list)
    label_support: dict[str, int] = field(default_factory=dict)

    @property
    def best_layer(self) -> str:
        return self.layers[int(np.nanargmax(self.f1))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN stays a float NaN)."""
        return json_safe(asdict(self))

    def __repr__(self) -> str:
        return (f"ASTProbeResult(k={self.k}, n_snippets={self.n_snippets}, best_layer={self.best_layer!r}, "
                f"best_f1={float(np.nanmax(self.f1)):.3f}, layers={self.layers})")

    def _repr_html_(self) -> str:
        from probekit.html_page import html_table

        rows = [{"layer": l, "F1": f, "precision": p, "recall": r, "c acc": c, "u acc": u, "d order acc": d,
                 "‖PᵀP−I‖_F": o, **{k: v[i] for k, v in self.controls.items()}}
                for i, (l, f, p, r, c, u, d, o) in enumerate(zip(self.layers, self.f1, self.precision, self.recall,
                                                                  self.c_accuracy, self.u_accuracy,
                                                                  self.d_order_accuracy, self.orthogonality))]
        return html_table(rows, caption=f"AST-Probe, k={self.k}, {self.n_snippets} snippets")

    def figures(self, controls: dict[str, Sequence[float]] | None = None, *, metric: str = "f1",
                show_controls: bool = True, published: Mapping[str, float] | None = None,
                best_layer: str | None = None) -> list[Any]:
        """One plotly figure: one score per layer, with the F1 control curves and published references.

        Reads ``layers``, the list named by ``metric``, ``controls``, ``k`` and ``n_snippets``.

        Parameters
        ----------
        controls : dict of str -> sequence of float, optional
            Extra curves (length n_layers, or length 1 drawn as a constant),
            added to ``self.controls``.
        metric : str
            Which score (a key of :data:`AST_METRICS`).
        show_controls : bool
            Draw the control F1 curves (dashed); only with ``metric="f1"``, the controls being F1 values.
        published : mapping of str -> float, optional
            Published F1 numbers, drawn as dotted horizontal lines; only with ``metric="f1"``.
        best_layer : str, optional
            The layer chosen on validation data, named in the title.

        Returns
        -------
        list of plotly.graph_objects.Figure
        """
        import plotly.graph_objects as go

        labels = dict(AST_METRICS)
        if metric not in labels:
            raise ValueError(f"metric must be one of {list(labels)}, not {metric!r}")
        label = labels[metric]
        x = [str(l) for l in self.layers]
        fig = go.Figure(go.Scatter(x=x, y=list(getattr(self, metric)), mode="lines+markers",
                                   name=f"AST-Probe {label}"))
        if show_controls and metric == "f1":
            for name, ys in {**self.controls, **(controls or {})}.items():
                ys = list(ys) * (len(x) if len(ys) == 1 else 1)  # one value: a constant control
                fig.add_trace(go.Scatter(x=x, y=ys, mode="lines", name=name, line={"dash": "dash"}))
        if published and metric == "f1":
            # as legend entries, not line annotations: two close published values would print on each other
            for name, v in published.items():
                fig.add_trace(go.Scatter(x=x, y=[float(v)] * len(x), mode="lines", name=f"published {name}",
                                         line={"dash": "dot", "color": "grey"}))
        extra = "" if best_layer is None else f"; best by validation: {best_layer}"
        fig.update_layout(title=f"AST-Probe {label} per layer (k={self.k}, n={self.n_snippets}{extra})",
                          xaxis_title="layer", yaxis_title=label, template="plotly_white")
        fig.update_xaxes(type="category")
        fig.update_yaxes(range=[0, 1.02])
        return [fig]


# ---------------------------------------------------------------------------
# estimator
# ---------------------------------------------------------------------------


class ASTProbe(BaseEstimator):
    """AST-Probe, one probe per layer, all layers trained together.

    Parameters
    ----------
    k : int, default=128
        Subspace size.
    lam : float, default=5.0
        Weight λ of the orthogonality penalty ``‖PᵀP − I‖²_F``.
    lr : float, default=1e-3
        Adam learning rate.
    epochs : int, default=20
        Maximum passes over the training snippets.
    patience : int, default=5
        Early stopping: a layer stops after this many epochs without a lower
        validation loss; its best-epoch parameters are restored.
    lr_patience : int, default=0
        Epochs without improvement before a layer's learning rate is divided
        by 10 (ReduceLROnPlateau with factor 0.1; METHODS.md gives no value).
    batch_size : int, default=32
        Snippets per mini-batch.
    bias : bool, default=True
        Deviation from the paper, stated: the heads are ``softmax(V_cᵀ(t_{i+1} − t_i) + b_c)`` and
        ``softmax(V_uᵀ t_j + b_u)`` with learned biases. The published heads have no bias; with
        standardised (hence centred) leaf vectors a bias-free head cannot express a label prior, and
        the unary label is ∅ for ~99% of Python leaves, so it predicts spurious unary constituents.
        ``bias=False`` is the published probe exactly. The biases do not touch ``d̂`` or ``P``.
    seed : int, default=0
        Seeds the initialisation and the batch order.
    device : str, default="cpu"
        Where the probe trains; list inputs are packed onto it once, a :class:`PackedLeaves`
        already there is used in place (no per-batch host round trip).
    matryoshka_ks : sequence of int or None, default=None
        Beyond the paper: if given, the loss is the sum over these nested
        prefixes ``P[:, :, :k']`` (with ``V_c``, ``V_u`` cut to their first
        ``k'`` rows, biases shared), each with its own orthogonality term;
        every value must be ≤ ``k`` (include ``k`` itself to train the full
        probe). ``evaluate(..., k=k')`` scores a prefix.
    progress : bool, default=True
        tqdm bar over epochs.

    Attributes
    ----------
    P_ : ndarray of shape (n_layers, D, k)
    Vc_ : ndarray of shape (n_layers, k, n_c)
    Vu_ : ndarray of shape (n_layers, k, n_u)
    bc_ : ndarray of shape (n_layers, n_c)
    bu_ : ndarray of shape (n_layers, n_u)
        Head biases (zeros when ``bias=False``).
    c_labels_, u_labels_ : list of str
        Vocabularies; index 0 is ``"<unk>"`` (labels unseen in training).
    history_ : dict
        ``train_loss``, ``val_loss`` (lists over epochs of per-layer lists),
        ``lr`` (per epoch, per layer), ``best_epoch`` and ``stopped_epoch``
        per layer, ``seconds`` of training.
    orthogonality_ : ndarray of shape (n_layers,)
        ``‖PᵀP − I‖_F`` per layer.
    n_layers_, n_features_in_ : int
    """

    def __init__(
        self,
        *,
        k: int = 128,
        lam: float = 5.0,
        lr: float = 1e-3,
        epochs: int = 20,
        patience: int = 5,
        lr_patience: int = 0,
        batch_size: int = 32,
        bias: bool = True,
        seed: int = 0,
        device: str = "cpu",
        matryoshka_ks: Sequence[int] | None = None,
        progress: bool = True,
    ) -> None:
        self.k = k
        self.lam = lam
        self.lr = lr
        self.epochs = epochs
        self.patience = patience
        self.lr_patience = lr_patience
        self.batch_size = batch_size
        self.bias = bias
        self.seed = seed
        self.device = device
        self.matryoshka_ks = matryoshka_ks
        self.progress = progress

    # -- helpers -----------------------------------------------------------

    def _prefixes(self) -> list[int]:
        if self.matryoshka_ks is None:
            return [int(self.k)]
        ks = sorted({int(v) for v in self.matryoshka_ks})
        if not ks or ks[0] < 1 or ks[-1] > self.k:
            raise ValueError(f"matryoshka_ks must lie in [1, k={self.k}]; got {self.matryoshka_ks!r}.")
        return ks

    def _loss(self, P, Vc, Vu, batch, bc=None, bu=None) -> torch.Tensor:
        total = 0.0
        for kk in self._prefixes():
            total = total + _layer_losses(P[:, :, :kk], Vc[:, :kk], Vu[:, :kk], bc, bu, batch, self.lam)
        return total

    # -- fitting -----------------------------------------------------------

    def fit(
        self,
        X: PackedLeaves | Sequence[Any],
        y: Sequence[Any],
        X_val: PackedLeaves | Sequence[Any],
        y_val: Sequence[Any],
    ) -> ASTProbe:
        """Fit all layers' probes.

        Parameters
        ----------
        X : PackedLeaves, or list of Tensor / array of shape (n_layers, n_s, D)
            Training snippets' leaf vectors.
        y : list of (d, c, u)
            Gold tuples: d (n_s − 1,) int, c (n_s − 1,) labels, u (n_s,) labels.
        X_val, y_val
            Validation snippets (learning-rate schedule and early stopping).

        Returns
        -------
        self
        """
        import time

        from tqdm.auto import tqdm

        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        self._prefixes()
        dev = torch.device(self.device)
        Xp = _as_packed(X, dev)
        Xv = _as_packed(X_val, dev)
        gold = _check_gold(y, Xp.lengths)
        gold_v = _check_gold(y_val, Xv.lengths)
        L, D = Xp.n_layers, Xp.dim
        if Xv.n_layers != L or Xv.dim != D:
            raise ValueError("validation snippets must have the training snippets' n_layers and D.")
        if self.k > D:
            raise ValueError(f"k={self.k} exceeds the feature dimension D={D}.")
        t0 = time.perf_counter()
        c_labels = [UNK] + sorted({v for _, c, _ in gold for v in c})
        u_labels = [UNK] + sorted({v for _, _, u in gold for v in u})
        c_index = {v: i for i, v in enumerate(c_labels)}
        u_index = {v: i for i, v in enumerate(u_labels)}
        gen = torch.Generator().manual_seed(int(self.seed))
        rng = np.random.default_rng(self.seed)
        train_batch = _Batches(Xp, gold, c_index, u_index)
        val_batch = _Batches(Xv, gold_v, c_index, u_index)

        # Orthonormal start (orthogonality term 0); classifiers small uniform; biases 0. Every layer starts
        # from the same draw, so a layer's fit does not depend on which other layers share the batch.
        P0 = torch.linalg.qr(torch.randn(D, self.k, generator=gen))[0]
        Vc0 = (torch.rand(self.k, len(c_labels), generator=gen) - 0.5) * 0.1
        Vu0 = (torch.rand(self.k, len(u_labels), generator=gen) - 0.5) * 0.1

        def param(t):
            return torch.nn.Parameter(t.clone().to(dev))

        Ps = [param(P0) for _ in range(L)]
        Vcs = [param(Vc0) for _ in range(L)]
        Vus = [param(Vu0) for _ in range(L)]
        bcs = [torch.nn.Parameter(torch.zeros(len(c_labels), device=dev)) for _ in range(L)]
        bus = [torch.nn.Parameter(torch.zeros(len(u_labels), device=dev)) for _ in range(L)]
        groups = [[Ps[l], Vcs[l], Vus[l]] + ([bcs[l], bus[l]] if self.bias else []) for l in range(L)]
        # One parameter group per layer: per-layer LR schedule and stopping
        # (lr = 0 freezes a stopped layer exactly under Adam).
        opt = torch.optim.Adam([{"params": g, "lr": self.lr} for g in groups])

        val_idx = [list(range(i, min(i + self.batch_size, len(Xv)))) for i in range(0, len(Xv), self.batch_size)]
        best = np.full(L, np.inf)
        best_state: list[Any] = [None] * L
        bad = np.zeros(L, dtype=int)
        lr_bad = np.zeros(L, dtype=int)
        active = np.ones(L, dtype=bool)
        best_epoch = np.full(L, -1)
        stopped = np.full(L, -1)
        hist: dict[str, Any] = {"train_loss": [], "val_loss": [], "lr": []}

        def stack():
            b = (torch.stack(bcs), torch.stack(bus)) if self.bias else (None, None)
            return torch.stack(Ps), torch.stack(Vcs), torch.stack(Vus), *b

        with torch.inference_mode(False), torch.enable_grad():
            bar = tqdm(range(int(self.epochs)), desc="AST-Probe", disable=not self.progress)
            for epoch in bar:
                order = rng.permutation(len(Xp))
                tr_sum = torch.zeros(L, device=dev)
                n_b = 0
                for i in range(0, len(order), self.batch_size):
                    batch = train_batch(order[i : i + self.batch_size])
                    P, Vc, Vu, bc, bu = stack()
                    per_layer = self._loss(P, Vc, Vu, batch, bc, bu)
                    opt.zero_grad(set_to_none=True)
                    per_layer.sum().backward()
                    opt.step()
                    tr_sum += per_layer.detach()
                    n_b += 1
                with torch.no_grad():
                    P, Vc, Vu, bc, bu = stack()
                    vl = torch.zeros(L, device=dev)
                    for idx in val_idx:
                        vl += self._loss(P, Vc, Vu, val_batch(idx), bc, bu) * len(idx)
                    vl = (vl / len(Xv)).cpu().numpy()
                hist["train_loss"].append((tr_sum / max(n_b, 1)).cpu().tolist())
                hist["val_loss"].append(vl.tolist())
                hist["lr"].append([g["lr"] for g in opt.param_groups])
                for l in range(L):
                    if not active[l]:
                        continue
                    if vl[l] < best[l]:
                        best[l] = vl[l]
                        best_epoch[l] = epoch
                        bad[l] = lr_bad[l] = 0
                        best_state[l] = [t.detach().clone() for t in (Ps[l], Vcs[l], Vus[l], bcs[l], bus[l])]
                    else:
                        bad[l] += 1
                        lr_bad[l] += 1
                        if bad[l] >= self.patience:
                            active[l] = False
                            stopped[l] = epoch
                            opt.param_groups[l]["lr"] = 0.0
                        elif lr_bad[l] > self.lr_patience:
                            opt.param_groups[l]["lr"] *= 0.1
                            lr_bad[l] = 0
                bar.set_postfix(val=float(np.mean(vl)), active=int(active.sum()))
                if not active.any():
                    break

        with torch.no_grad():
            for l in range(L):
                if best_state[l] is not None:
                    for t, b in zip((Ps[l], Vcs[l], Vus[l], bcs[l], bus[l]), best_state[l]):
                        t.copy_(b)

        def host(ts):
            return torch.stack(ts).detach().cpu().numpy().astype(np.float32)

        self.P_, self.Vc_, self.Vu_ = host(Ps), host(Vcs), host(Vus)
        self.bc_, self.bu_ = host(bcs), host(bus)
        self.c_labels_ = c_labels
        self.u_labels_ = u_labels
        hist["best_epoch"] = best_epoch.tolist()
        hist["stopped_epoch"] = stopped.tolist()
        hist["seconds"] = time.perf_counter() - t0
        self.history_ = hist
        self.orthogonality_ = _orthogonality(self.P_)
        self.n_layers_ = int(L)
        self.n_features_in_ = int(D)
        return self

    # -- inference ---------------------------------------------------------

    def predict(
        self, X: PackedLeaves | Sequence[Any], *, k: int | None = None
    ) -> list[list[tuple[np.ndarray, list[str], list[str]]]]:
        """Predicted tuples.

        Parameters
        ----------
        X : PackedLeaves, or list of Tensor / array of shape (n_layers, n_s, D)
        k : int, optional
            Use the prefix ``P[:, :, :k]`` (and the first ``k`` rows of the
            classifiers); default the full probe.

        Returns
        -------
        list (n_layers) of list (n_snippets) of (d̂, c, u)
            ``d̂`` ndarray of shape (n_s − 1,), ``c`` list of n_s − 1 labels
            (argmax ĉ), ``u`` list of n_s labels (argmax û).
        """
        check_is_fitted(self, "P_")
        kk = self._check_k(k)
        Xp = _as_packed(X, torch.device(self.device))
        if Xp.n_layers != self.n_layers_ or Xp.dim != self.n_features_in_:
            raise ValueError(
                f"snippets must have shape ({self.n_layers_}, n, {self.n_features_in_}); "
                f"got ({Xp.n_layers}, n, {Xp.dim})."
            )
        dev = Xp.H.device
        P = torch.from_numpy(self.P_[:, :, :kk]).to(dev)
        Vc = torch.from_numpy(self.Vc_[:, :kk]).to(dev)
        Vu = torch.from_numpy(self.Vu_[:, :kk]).to(dev)
        bc = torch.from_numpy(getattr(self, "bc_", np.zeros(self.Vc_.shape[::2], np.float32))).to(dev)
        bu = torch.from_numpy(getattr(self, "bu_", np.zeros(self.Vu_.shape[::2], np.float32))).to(dev)
        batcher = _Batches(Xp)
        out: list[list[Any]] = [[] for _ in range(self.n_layers_)]
        bs = max(int(self.batch_size), 1)
        with torch.no_grad():
            for i in range(0, len(Xp), bs):
                idx = list(range(i, min(i + bs, len(Xp))))
                batch = batcher(idx)
                T = torch.einsum("lbnd,ldk->lbnk", batch["H"], P)
                diff = T[:, :, 1:] - T[:, :, :-1]
                d_hat = diff.pow(2).sum(-1).cpu().numpy().astype(np.float64)
                ci = (torch.einsum("lbik,lkc->lbic", diff, Vc) + bc[:, None, None]).argmax(-1).cpu().numpy()
                ui = (torch.einsum("lbnk,lkc->lbnc", T, Vu) + bu[:, None, None]).argmax(-1).cpu().numpy()
                for b, n in enumerate(batch["lens"].tolist()):
                    for l in range(self.n_layers_):
                        out[l].append(
                            (
                                d_hat[l, b, : n - 1],
                                [self.c_labels_[j] for j in ci[l, b, : n - 1]],
                                [self.u_labels_[j] for j in ui[l, b, :n]],
                            )
                        )
        return out

    def _check_k(self, k: int | None) -> int:
        full = self.P_.shape[2]
        if k is None:
            return full
        if not 1 <= int(k) <= full:
            raise ValueError(f"k must lie in [1, {full}], got {k}.")
        return int(k)

    def evaluate(
        self,
        X: PackedLeaves | Sequence[Any],
        y: Sequence[Any],
        *,
        k: int | None = None,
        layer_names: Sequence[str] | None = None,
        controls: dict[str, Sequence[float]] | None = None,
    ) -> ASTProbeResult:
        """Score every layer's probe on snippets with gold tuples.

        Parameters
        ----------
        X : PackedLeaves, or list of Tensor / array of shape (n_layers, n_s, D)
        y : list of gold (d, c, u)
        k : int, optional
            Evaluate the prefix ``P[:, :, :k]`` (meaningful for a Matryoshka fit).
        layer_names : sequence of str, optional
            Default ``"0", "1", ...``.
        controls : dict of str -> sequence of float, optional
            Control F1 curves stored in the result (for its figure).

        Returns
        -------
        ASTProbeResult
        """
        check_is_fitted(self, "P_")
        kk = self._check_k(k)
        Xp = _as_packed(X, torch.device(self.device))
        gold = _check_gold(y, Xp.lengths)
        preds = self.predict(Xp, k=kk)
        scored = [_score(p, gold) for p in preds]
        scores = [s[0] for s in scored]
        names = [str(v) for v in layer_names] if layer_names is not None else [str(l) for l in range(len(preds))]
        if len(names) != len(preds):
            raise ValueError(f"{len(names)} layer names for {len(preds)} layers.")
        support = scored[0][2] if scored else Counter()
        order = sorted(support, key=lambda lab: (-support[lab], lab))
        return ASTProbeResult(
            layers=names,
            precision=[s["precision"] for s in scores],
            recall=[s["recall"] for s in scores],
            f1=[s["f1"] for s in scores],
            c_accuracy=[s["c_accuracy"] for s in scores],
            u_accuracy=[s["u_accuracy"] for s in scores],
            d_order_accuracy=[s["d_order_accuracy"] for s in scores],
            orthogonality=_orthogonality(self.P_[:, :, :kk]).tolist(),
            k=kk,
            n_snippets=len(Xp),
            controls={str(a): [float(v) for v in b] for a, b in (controls or {}).items()},
            label_recall=[{lab: hit[lab] / support[lab] for lab in order} for _, hit, _ in scored],
            label_support={lab: int(support[lab]) for lab in order},
        )


def _orthogonality(P: np.ndarray) -> np.ndarray:
    """``‖PᵀP − I‖_F`` per layer for ``P`` of shape (L, D, k)."""
    P64 = P.astype(np.float64)
    G = np.einsum("ldk,ldj->lkj", P64, P64) - np.eye(P.shape[2])
    return np.sqrt((G**2).sum(axis=(1, 2)))
