"""Safety analysis in weight space: alignment/fine-tuning updates, their projections, and update-space overlap.

Implements the weight-space part of ``shared/METHODS.md`` §2 for three checkpoints of one architecture
(base, aligned, fine-tuned), one weight matrix at a time.

Definitions
-----------
For each 2-D floating weight ``W (m, n)`` present with the same shape in all three (``(out, in)`` in PyTorch's
layout; embeddings and the LM head are skipped by default):

- ``V = W_aligned - W_base`` (alignment update), ``U = W_finetuned - W_aligned`` (fine-tuning update);
- ``L (m, k)``: an orthonormal basis of ``k = rank_fraction_k((m, n), f)`` directions of the output space
  (:func:`probekit.subspace.rank_fraction_k`: ``round(f * min(m, n))``, at least 1), one of

  ``svd``     the top-``k`` left singular vectors of ``V`` (:func:`probekit.subspace.rank_fraction_basis`;
              randomized range finder for large matrices at small ``k``),
  ``random``  the top-``k`` left singular vectors of a Gaussian matrix of shape ``(m, n)`` (a uniformly random
              ``k``-dimensional subspace),
  ``randomk`` ``k`` left singular vectors of ``V`` drawn uniformly without replacement from all ``min(m, n)``
              (exact SVD). Bases for several fractions are nested: one permutation, its first ``k`` indices;

- ``U_par = L L^T U``; variants ``same = W_aligned + U_par``, ``opp = W_aligned - U_par``,
  ``orth = W_aligned + (U - U_par)`` (and ``full = W_finetuned``, ``none = W_aligned`` for reference);
- diagnostics: energy kept ``||U_par||_F^2 / ||U||_F^2``; ``cos(U, U_par) = <U, U_par>_F / (||U||_F ||U_par||_F)``
  (equal to ``sqrt(energy kept)``, since ``<U, U_par> = ||U_par||^2``); ``cos(U, V) = <U, V>_F / (||U||_F ||V||_F)``
  — both norms in the denominator, each the Frobenius norm of its own matrix;
- update-space overlap of two updates ``dA = A_after - A_before`` and ``dB`` of the same matrix: MSO of their
  top-``k`` left singular subspaces at rank fraction ``f``, random baseline ``k / m``; per layer, the mean over
  the layer's matrices of both.

Random draws are seeded per matrix by ``seed`` and a CRC32 of the key, so a result does not depend on the order
in which matrices are visited or on the global RNG. Linear algebra runs in float64; projected weights come back
in the checkpoint's dtype.

Memory: checkpoints are read lazily (a ``safetensors`` file or folder is opened with ``safe_open`` and read one
tensor at a time; a module's ``state_dict()`` shares its storage), and every function walks the keys, holding at
most the handful of ``(m, n)`` matrices of the current key.

Public API
----------
StateSource, TensorStore, open_state
matrix_keys, layer_of, module_of
BASIS_KINDS, VARIANTS
update_bases, project_update, frob_cos, update_diagnostics, projected_weight
iter_projected, projected_state_dict, project_into
WeightSpaceConfig, WeightSpaceResult, weight_space_analysis
UpdateOverlapResult, update_space_overlap
match_equal_task_loss, compare_at_equal_task_loss (svd vs random projection at equal task loss, paired over
prompts)

Example
-------
>>> res = weight_space_analysis("ckpt/base", "ckpt/aligned", "ckpt/useful", WeightSpaceConfig())   # doctest: +SKIP
>>> sd = projected_state_dict("ckpt/base", "ckpt/aligned", "ckpt/useful", fraction=0.25, variant="orth")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..subspace import mso, rank_fraction_basis, rank_fraction_k
from ..jsonsafe import json_safe

__all__ = [
    "StateSource",
    "TensorStore",
    "open_state",
    "matrix_keys",
    "layer_of",
    "module_of",
    "BASIS_KINDS",
    "VARIANTS",
    "DEFAULT_FRACTIONS",
    "update_bases",
    "project_update",
    "frob_cos",
    "update_diagnostics",
    "projected_weight",
    "iter_projected",
    "projected_state_dict",
    "project_into",
    "WeightSpaceConfig",
    "WeightSpaceResult",
    "weight_space_analysis",
    "UpdateOverlapResult",
    "update_space_overlap",
    "match_equal_task_loss",
    "compare_at_equal_task_loss",
]

BASIS_KINDS = ("svd", "random", "randomk")
VARIANTS = ("same", "opp", "orth", "full", "none")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.25, 0.5, 0.75, 0.99)

# Token embeddings, position embeddings and (often tied) LM heads: vocab-sized matrices whose "left singular
# vectors" live in token space, not the model's hidden space; skipped unless asked for.
_EMBED_RE = re.compile(r"(embed|wte|wpe|lm_head|word_embeddings|position_embeddings|token_type_embeddings)")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


# ------------------------------------------------------------------------------------------- lazy state


class TensorStore:
    """Read-only, lazy access to a checkpoint's tensors by key.

    Parameters
    ----------
    source : mapping str -> tensor, ``nn.Module``, or path
        A path is a ``.safetensors`` file or a folder holding ``model.safetensors`` or a sharded set with
        ``model.safetensors.index.json`` (as ``save_pretrained`` writes). Files are opened with ``safe_open``
        and each ``get`` reads one tensor.
    """

    def __init__(self, source: "StateSource"):
        self._map: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        self.name = type(source).__name__
        if isinstance(source, TensorStore):
            self._map, self._files, self.name = source._map, source._files, source.name
        elif isinstance(source, torch.nn.Module):
            self._map = source.state_dict()  # shares storage: no copy
        elif isinstance(source, Mapping):
            self._map = source
        elif isinstance(source, (str, os.PathLike)):
            self._files = _safetensors_index(Path(source))
            self.name = str(source)
        else:
            raise TypeError(f"cannot read weights from {type(source).__name__}; pass a state dict, a module or a "
                            "safetensors file/folder.")

    def keys(self) -> list[str]:
        return list(self._map.keys()) if self._map is not None else list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in (self._map if self._map is not None else self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._map is not None:
            return tuple(self._map[key].shape)
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def is_float(self, key: str) -> bool:
        if self._map is not None:
            return bool(self._map[key].is_floating_point())
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_slice(key).get_dtype() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a view of the mapping's tensor, or freshly read from disk)."""
        if self._map is not None:
            return self._map[key]
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)


StateSource = Union[Mapping[str, torch.Tensor], torch.nn.Module, str, os.PathLike, TensorStore]


def _safetensors_index(path: Path) -> dict[str, Path]:
    """key -> file for a safetensors file or an HF folder (single or sharded)."""
    from safetensors import safe_open

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            return {k: path / v for k, v in wm.items()}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}.")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist.")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def open_state(source: StateSource) -> TensorStore:
    """Wrap ``source`` in a :class:`TensorStore` (a no-op for a store)."""
    return source if isinstance(source, TensorStore) else TensorStore(source)


# ------------------------------------------------------------------------------------------- keys


def layer_of(key: str) -> int | None:
    """Block index in a parameter name (``model.layers.3.mlp.up_proj.weight`` -> 3), or None."""
    m = _LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def module_of(key: str) -> str:
    """The name with the block prefix and ``.weight`` removed (``model.layers.3.mlp.up_proj.weight`` ->
    ``mlp.up_proj``): what a matrix is, whatever its layer."""
    m = _LAYER_RE.search(key)
    rest = key[m.end():] if m else key
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


def matrix_keys(*sources: StateSource, skip_embeddings: bool = True, include: str | None = None,
                exclude: str | None = None) -> list[str]:
    """Keys of 2-D floating tensors present with one shape in every source, in the first source's order.

    Parameters
    ----------
    *sources : StateSource
        Two or more checkpoints.
    skip_embeddings : bool
        Drop embeddings and the LM head (names matching ``embed``, ``wte``, ``wpe``, ``lm_head``, …).
    include, exclude : str or None
        Regular expressions searched in each key (keep matches / drop matches).
    """
    if not sources:
        raise ValueError("no checkpoints given.")
    stores = [open_state(s) for s in sources]
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out = []
    for k in stores[0].keys():
        if skip_embeddings and _EMBED_RE.search(k):
            continue
        if (inc and not inc.search(k)) or (exc and exc.search(k)):
            continue
        if not all(k in s for s in stores[1:]):
            continue
        shape = stores[0].shape(k)
        if len(shape) != 2 or not stores[0].is_float(k) or any(s.shape(k) != shape for s in stores[1:]):
            continue
        out.append(k)
    return out


# ------------------------------------------------------------------------------------------- per matrix


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def update_bases(V: torch.Tensor, fractions: Sequence[float], kind: str = "svd", *, seed: int = 0, key: str = "",
                 method: str = "auto") -> dict[float, torch.Tensor]:
    """Orthonormal bases ``L (m, k_f)`` of the output space for each rank fraction ``f``.

    Parameters
    ----------
    V : torch.Tensor
        Shape ``(m, n)``: the alignment update.
    fractions : sequence of float
        Rank fractions in ``(0, 1]``; ``k_f = rank_fraction_k((m, n), f)``.
    kind : {"svd", "random", "randomk"}
        See the module docstring.
    seed : int
    key : str
        Parameter name, mixed into the seed so every matrix gets its own draw.
    method : {"auto", "exact", "randomized"}
        SVD method for ``svd`` and ``random`` (see :func:`probekit.subspace.rank_fraction_basis`). One
        decomposition at the largest fraction serves all: its first ``k_f`` columns are the top ``k_f``.

    Returns
    -------
    dict float -> torch.Tensor
        ``f -> (m, k_f)`` float64, on ``V``'s device.
    """
    if kind not in BASIS_KINDS:
        raise ValueError(f"kind must be one of {BASIS_KINDS}, got {kind!r}.")
    fractions = [float(f) for f in fractions]
    if not fractions:
        raise ValueError("fractions is empty.")
    ks = {f: rank_fraction_k(V.shape, f) for f in fractions}
    fmax = max(fractions)
    gen = _generator(seed, key, V.device)
    if kind == "svd":
        L = rank_fraction_basis(V.double(), fmax, method=method, seed=seed).basis
    elif kind == "random":
        G = torch.randn(V.shape, generator=gen, dtype=torch.float64, device=V.device)
        L = rank_fraction_basis(G, fmax, method=method, seed=seed).basis
    else:
        Uall, _, _ = torch.linalg.svd(V.double(), full_matrices=False)
        perm = torch.randperm(Uall.shape[1], generator=gen, device=V.device)
        L = Uall[:, perm[: ks[fmax]]]
    return {f: L[:, : ks[f]] for f in fractions}


def _banked_bases(bank: Mapping[str, Mapping[float, torch.Tensor]], key: str, shape: Sequence[int],
                  fractions: Sequence[float], what: str) -> Mapping[float, torch.Tensor]:
    """``bank[key]`` checked against the matrix it should span: every fraction present, each ``L (m, k_f)``.

    Parameters
    ----------
    bank : mapping key -> (fraction -> L)
        Precomputed :func:`update_bases` output per matrix.
    key : str
        The matrix.
    shape : (m, n)
        The matrix's shape.
    fractions : sequence of float
    what : str
        Name of the bank in error messages.

    Returns
    -------
    mapping float -> torch.Tensor
        ``bank[key]``, unchanged.

    Raises
    ------
    ValueError
        Naming ``key`` when it is missing, lacks a fraction or holds a basis of the wrong shape (a bank built for
        other matrices or other fractions would otherwise give silently wrong numbers).
    """
    if key not in bank:
        raise ValueError(f"{what} has no bases for matrix {key!r} (a bank built for other matrices?).")
    Ls = bank[key]
    m = int(shape[0])
    for f in fractions:
        if f not in Ls:
            raise ValueError(f"{what}[{key!r}] has no basis for rank fraction {f} (has {sorted(Ls)}).")
        want = (m, rank_fraction_k(tuple(shape), f))
        got = tuple(Ls[f].shape)
        if got != want:
            raise ValueError(f"{what}[{key!r}][{f}] has shape {got}; the {tuple(shape)} matrix {key!r} needs "
                             f"{want} at rank fraction {f}.")
    return Ls


def project_update(U: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``U_par = L (L^T U)``: the part of ``U (m, n)`` in the span of the orthonormal ``L (m, k)``; float64."""
    Ud = U.double()
    Ld = L.to(device=Ud.device, dtype=torch.float64)
    return Ld @ (Ld.T @ Ud)


def frob_cos(A: torch.Tensor, B: torch.Tensor) -> float:
    """Frobenius cosine ``<A, B>_F / (||A||_F ||B||_F)``; NaN when either is zero.

    This is ``cos(U, V)`` of the diagnostics with the right denominator: each matrix's own Frobenius norm.
    """
    a, b = A.double(), B.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float((a * b).sum()) / (na * nb)


def update_diagnostics(U: torch.Tensor, U_par: torch.Tensor) -> dict[str, float]:
    """``energy_kept = ||U_par||^2 / ||U||^2`` and ``cos_u_upar = cos(U, U_par)`` (NaN for a zero update)."""
    nu = float(U.double().norm()) ** 2
    npar = float(U_par.double().norm()) ** 2
    return dict(energy_kept=(npar / nu) if nu > 0 else float("nan"), cos_u_upar=frob_cos(U, U_par))


def projected_weight(W_aligned: torch.Tensor, U: torch.Tensor, U_par: torch.Tensor, variant: str) -> torch.Tensor:
    """One variant's weight, float64: ``same``/``opp``/``orth``/``full``/``none`` (see the module docstring)."""
    Wa = W_aligned.double()
    if variant == "same":
        return Wa + U_par
    if variant == "opp":
        return Wa - U_par
    if variant == "orth":
        return Wa + (U.double() - U_par)
    if variant == "full":
        return Wa + U.double()
    if variant == "none":
        return Wa.clone()
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")


def _load3(stores, key: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_aligned, V, U) for one key, float64 on ``device``."""
    Wb = stores[0].get(key).to(device=device, dtype=torch.float64)
    Wa = stores[1].get(key).to(device=device, dtype=torch.float64)
    V = Wa - Wb
    del Wb
    U = stores[2].get(key).to(device=device, dtype=torch.float64) - Wa
    return Wa, V, U


# ------------------------------------------------------------------------------------------- projected models


def iter_projected(base: StateSource, aligned: StateSource, finetuned: StateSource, *, fraction: float,
                   variant: str, basis: str = "svd", keys: Sequence[str] | None = None, others: str = "finetuned",
                   skip_embeddings: bool = True, seed: int = 0, method: str = "auto", device: str | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for every tensor of ``finetuned``: projected for the analysed matrices.

    Parameters
    ----------
    base, aligned, finetuned : StateSource
    fraction : float
        Rank fraction ``f`` of the basis.
    variant : {"same", "opp", "orth", "full", "none"}
    basis : {"svd", "random", "randomk"}
    keys : sequence of str or None
        Matrices to project (default :func:`matrix_keys` of the three).
    others : {"finetuned", "aligned"}
        Where every other tensor (norms, biases, skipped embeddings) comes from. Default ``finetuned``: the
        variants differ from the fine-tuned model only in the projected matrices.
    skip_embeddings, seed, method
    device : str or None
        Where the float64 maths runs (default: the tensor's own device).

    Yields
    ------
    (str, torch.Tensor)
        In ``finetuned``'s key order, each tensor in ``finetuned``'s dtype.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if others not in ("finetuned", "aligned"):
        raise ValueError(f"others must be 'finetuned' or 'aligned', got {others!r}.")
    stores = [open_state(s) for s in (base, aligned, finetuned)]
    proj = set(matrix_keys(*stores, skip_embeddings=skip_embeddings) if keys is None else keys)
    src_other = stores[2] if others == "finetuned" else stores[1]
    for k in stores[2].keys():
        ref = stores[2].get(k)
        if k not in proj:
            yield k, (src_other.get(k) if k in src_other else ref)
            continue
        dev = torch.device(device) if device else ref.device
        Wa, V, U = _load3(stores, k, dev)
        L = update_bases(V, [fraction], basis, seed=seed, key=k, method=method)[float(fraction)]
        W = projected_weight(Wa, U, project_update(U, L), variant)
        yield k, W.to(dtype=ref.dtype, device=ref.device)


def projected_state_dict(base: StateSource, aligned: StateSource, finetuned: StateSource, *, fraction: float,
                         variant: str, basis: str = "svd", **kwargs: Any) -> dict[str, torch.Tensor]:
    """The whole projected checkpoint as a state dict (one model's worth of memory); see :func:`iter_projected`.

    Save it with ``safetensors.torch.save_file`` or load it with ``model.load_state_dict``.
    """
    return dict(iter_projected(base, aligned, finetuned, fraction=fraction, variant=variant, basis=basis, **kwargs))


@torch.no_grad()
def project_into(model: torch.nn.Module, base: StateSource, aligned: StateSource, finetuned: StateSource, *,
                 fraction: float, variant: str, basis: str = "svd", **kwargs: Any) -> torch.nn.Module:
    """Write a projected checkpoint into ``model``'s parameters in place, one tensor at a time.

    ``model`` must have the checkpoints' architecture (e.g. a loaded copy of the aligned model; it must not share
    storage with a source that is still to be read). Returns ``model``, ready to evaluate.
    """
    own = model.state_dict()
    missing = []
    for k, t in iter_projected(base, aligned, finetuned, fraction=fraction, variant=variant, basis=basis,
                               **kwargs):
        if k in own:
            own[k].copy_(t)
        else:
            missing.append(k)
    if missing:
        raise KeyError(f"model has no parameters {missing[:5]}{' …' if len(missing) > 5 else ''}.")
    return model


# ------------------------------------------------------------------------------------------- analysis


@dataclass
class WeightSpaceConfig:
    """What :func:`weight_space_analysis` computes.

    fractions : rank fractions ``f`` in ``(0, 1]``.
    bases : subset of :data:`BASIS_KINDS`.
    skip_embeddings, include, exclude : key selection (see :func:`matrix_keys`).
    method : SVD method for the ``svd``/``random`` bases.
    seed : seeds the random bases.
    device : where the float64 maths runs (None: where the tensors are).
    progress : tqdm bar over matrices.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    bases: tuple[str, ...] = BASIS_KINDS
    skip_embeddings: bool = True
    include: str | None = None
    exclude: str | None = None
    method: str = "auto"
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.fractions = tuple(float(f) for f in self.fractions)
        self.bases = tuple(self.bases)
        if not self.fractions or any(not (0.0 < f <= 1.0) for f in self.fractions):
            raise ValueError(f"fractions must be a non-empty tuple in (0, 1], got {self.fractions}.")
        bad = [b for b in self.bases if b not in BASIS_KINDS]
        if bad or not self.bases:
            raise ValueError(f"bases must be a non-empty subset of {BASIS_KINDS}, got {self.bases}.")
        if self.method not in ("auto", "exact", "randomized"):
            raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {self.method!r}.")


@dataclass
class WeightSpaceResult:
    """Per-matrix update diagnostics.

    Attributes
    ----------
    matrices : list of dict
        One per matrix: ``key``, ``layer`` (int or None), ``module``, ``shape``, ``norm_u``, ``norm_v``,
        ``cos_uv`` (``<U, V>_F / (||U||_F ||V||_F)``).
    projections : list of dict
        One per (matrix, basis, fraction): ``key``, ``basis``, ``fraction``, ``k``, ``energy_kept``,
        ``cos_u_upar``, ``sq_norm_upar`` (``||U_par||_F^2``).
    config : dict
    """

    matrices: list[dict]
    projections: list[dict]
    config: dict = field(default_factory=dict)

    def energy_kept(self, basis: str = "svd") -> dict[float, float]:
        """Pooled energy kept per fraction: ``sum ||U_par||^2 / sum ||U||^2`` over matrices."""
        total = sum(m["norm_u"] ** 2 for m in self.matrices)
        out: dict[float, float] = {}
        for p in self.projections:
            if p["basis"] == basis:
                out[p["fraction"]] = out.get(p["fraction"], 0.0) + p["sq_norm_upar"]
        return {f: (v / total if total > 0 else float("nan")) for f, v in sorted(out.items())}

    def __repr__(self) -> str:
        ek = self.energy_kept("svd") if any(p["basis"] == "svd" for p in self.projections) else {}
        kept = ", ".join(f"f={f}: {v:.3f}" for f, v in ek.items())
        return f"WeightSpaceResult({len(self.matrices)} matrices; energy of U kept in V's subspace: {kept or 'n/a'})"

    def _repr_html_(self) -> str:
        from ..html_page import html_table

        bases = list(dict.fromkeys(p["basis"] for p in self.projections))
        kept = {b: self.energy_kept(b) for b in bases}
        fr = sorted({p["fraction"] for p in self.projections})
        rows = [{"rank fraction f": f, **{f"energy kept ({b})": kept[b].get(f) for b in bases}} for f in fr]
        return html_table(rows, caption=f"Σ‖U∥‖² / Σ‖U‖² over {len(self.matrices)} matrices")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "weight_space"
        d["pooled_energy_kept"] = {b: {str(f): v for f, v in self.energy_kept(b).items()}
                                   for b in self.config.get("bases", BASIS_KINDS)}
        return json_safe(d, nonfinite="null")

    def figures(self) -> list[Any]:
        """(1) pooled energy kept against rank fraction per basis; (2) cos(U, V) per layer and module."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for b in self.config.get("bases", BASIS_KINDS):
            ek = self.energy_kept(b)
            fig.add_trace(go.Scatter(x=list(ek), y=list(ek.values()), mode="lines+markers", name=b))
        fig.update_layout(title="Energy of the fine-tuning update U kept in the alignment-update subspace",
                          xaxis_title="rank fraction f", yaxis_title="Σ‖U∥‖² / Σ‖U‖²", template="plotly_white")
        fig.update_yaxes(range=[0, 1.02])
        cos = go.Figure()
        for mod in sorted({m["module"] for m in self.matrices}):
            rows = [m for m in self.matrices if m["module"] == mod]
            cos.add_trace(go.Bar(x=[str(m["layer"]) for m in rows], y=[m["cos_uv"] for m in rows], name=mod))
        cos.update_layout(barmode="group", title="cos(U, V) = ⟨U, V⟩_F / (‖U‖_F ‖V‖_F) per matrix",
                          xaxis_title="layer", yaxis_title="cos(U, V)", template="plotly_white")
        cos.update_xaxes(type="category")
        return [fig, cos]


def weight_space_analysis(base: StateSource, aligned: StateSource, finetuned: StateSource,
                          config: WeightSpaceConfig | None = None, *,
                          bases: Mapping[str, Mapping[str, Mapping[float, torch.Tensor]]] | None = None
                          ) -> WeightSpaceResult:
    """Diagnostics of the fine-tuning update against the alignment update, per matrix, basis and fraction.

    Parameters
    ----------
    base, aligned, finetuned : StateSource
        Same architecture; read one matrix at a time.
    config : WeightSpaceConfig or None
    bases : mapping or None
        Precomputed ``bases[kind][key][fraction] -> L (m, k)`` (as :func:`update_bases` returns them for
        ``config.fractions``), e.g. shared with the projected models of the same run; None computes them here.

    Returns
    -------
    WeightSpaceResult
    """
    from tqdm.auto import tqdm

    cfg = config or WeightSpaceConfig()
    stores = [open_state(s) for s in (base, aligned, finetuned)]
    keys = matrix_keys(*stores, skip_embeddings=cfg.skip_embeddings, include=cfg.include, exclude=cfg.exclude)
    if not keys:
        raise ValueError("no 2-D weight matrix is shared by the three checkpoints (check the keys and shapes).")
    missing = [b for b in cfg.bases if bases is not None and b not in bases]
    if missing:
        raise ValueError(f"bases has no {missing[0]!r} kind (has {list(bases)}).")
    mats, projs = [], []
    for k in tqdm(keys, desc="weight space", disable=not cfg.progress):
        dev = torch.device(cfg.device) if cfg.device else stores[1].get(k).device
        _, V, U = _load3(stores, k, dev)
        mats.append(dict(key=k, layer=layer_of(k), module=module_of(k), shape=list(V.shape),
                         norm_u=float(U.norm()), norm_v=float(V.norm()), cos_uv=frob_cos(U, V)))
        for b in cfg.bases:
            if bases is None:
                Ls = update_bases(V, cfg.fractions, b, seed=cfg.seed, key=k, method=cfg.method)
            else:
                Ls = _banked_bases(bases[b], k, V.shape, cfg.fractions, f"bases[{b!r}]")
            for f in cfg.fractions:
                L = Ls[f]
                Up = project_update(U, L)
                projs.append(dict(key=k, basis=b, fraction=f, k=int(L.shape[1]), **update_diagnostics(U, Up),
                                  sq_norm_upar=float(Up.norm()) ** 2))
        del V, U
    return WeightSpaceResult(mats, projs, asdict(cfg))


# ------------------------------------------------------------------------------------------- update overlap


@dataclass
class UpdateOverlapResult:
    """MSO between two updates' top-``k`` left singular subspaces, per matrix and per layer.

    Attributes
    ----------
    fractions : list of float
        Shape ``(F,)``.
    keys : list of str
        Shape ``(K,)``.
    layers_of_keys : list of int or None
        Shape ``(K,)``.
    mso : list of list of float
        Shape ``(K, F)``.
    baseline : list of list of float
        ``k / m``, shape ``(K, F)``.
    layers : list of int
        Layers with at least one matrix, ascending, shape ``(Ly,)``.
    layer_mso, layer_baseline : list of list of float
        Means over each layer's matrices, shape ``(Ly, F)``.
    names : (str, str)
    """

    fractions: list[float]
    keys: list[str]
    layers_of_keys: list[int | None]
    mso: list[list[float]]
    baseline: list[list[float]]
    layers: list[int]
    layer_mso: list[list[float]]
    layer_baseline: list[list[float]]
    names: tuple[str, str] = ("a", "b")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "update_overlap"
        return json_safe(d, nonfinite="null")

    def figures(self) -> list[Any]:
        """Heatmap layer × rank fraction of mean MSO − baseline, MSO and baseline in the hover."""
        import plotly.graph_objects as go

        m = np.asarray(self.layer_mso, dtype=float)
        b = np.asarray(self.layer_baseline, dtype=float)
        fig = go.Figure(go.Heatmap(
            z=m - b, x=[str(f) for f in self.fractions], y=[str(l) for l in self.layers],
            customdata=np.stack([m, b], -1), colorscale="RdBu_r", zmid=0, colorbar={"title": "MSO − baseline"},
            hovertemplate="layer %{y}, f=%{x}<br>MSO %{customdata[0]:.3f}<br>baseline %{customdata[1]:.3f}"
                          "<extra></extra>",
        ))
        a, bn = self.names
        fig.update_layout(title=f"Update-space overlap: ΔW {a} vs ΔW {bn} (mean over each layer's matrices)",
                          xaxis_title="rank fraction f", yaxis_title="layer", template="plotly_white")
        fig.update_xaxes(type="category")
        fig.update_yaxes(type="category")
        return [fig]


def update_space_overlap(pair_a: tuple[StateSource, StateSource], pair_b: tuple[StateSource, StateSource], *,
                         fractions: Sequence[float] = DEFAULT_FRACTIONS, keys: Sequence[str] | None = None,
                         skip_embeddings: bool = True, method: str = "auto", seed: int = 0,
                         names: tuple[str, str] = ("a", "b"), device: str | None = None, progress: bool = True,
                         bases_a: Mapping[str, Mapping[float, torch.Tensor]] | None = None,
                         bases_b: Mapping[str, Mapping[float, torch.Tensor]] | None = None
                         ) -> UpdateOverlapResult:
    """MSO between the update subspaces of two fine-tunes, per matrix and per layer, with the random baseline.

    Parameters
    ----------
    pair_a, pair_b : (before, after)
        ``dA = after_a - before_a`` and ``dB = after_b - before_b`` (e.g. aligned -> useful fine-tune and
        aligned -> harmful fine-tune).
    fractions : sequence of float
        Rank fractions: each update's subspace is its top ``k = rank_fraction_k((m, n), f)`` left singular
        vectors; both have the same ``k``, so the baseline is ``k / m``.
    keys : sequence of str or None
        Default: :func:`matrix_keys` of the four checkpoints.
    skip_embeddings, method, seed, names, device, progress
    bases_a, bases_b : mapping or None
        Precomputed ``svd`` bases of ``dA`` / ``dB``: ``bases[key][fraction] -> L (m, k)`` as
        :func:`update_bases` returns them with ``kind="svd"`` and the same ``seed`` and ``method`` (e.g.
        ``bank["svd"]`` of the safety run, whose alignment update is ``dA``); each must cover every key and
        fraction with the right shape (``ValueError`` naming the matrix otherwise). None computes them here.
        A bank replaces that update's difference and SVD; the MSO is the same as without it.

    Returns
    -------
    UpdateOverlapResult
    """
    from tqdm.auto import tqdm

    stores = [open_state(s) for s in (*pair_a, *pair_b)]
    fractions = [float(f) for f in fractions]
    keys = list(matrix_keys(*stores, skip_embeddings=skip_embeddings) if keys is None else keys)
    if not keys:
        raise ValueError("no 2-D weight matrix is shared by the checkpoints.")

    def bases_of(k, dev, bank, before, after, what):
        if bank is not None:
            Ls = _banked_bases(bank, k, before.shape(k), fractions, what)
            return {f: Ls[f].to(dev, torch.float64) for f in fractions}
        d = after.get(k).to(dev, torch.float64) - before.get(k).to(dev, torch.float64)
        return update_bases(d, fractions, "svd", seed=seed, key=k, method=method)

    M, BL, LK = [], [], []
    for k in tqdm(keys, desc="update overlap", disable=not progress):
        dev = torch.device(device) if device else stores[0].get(k).device
        La = bases_of(k, dev, bases_a, stores[0], stores[1], "bases_a")
        Lb = bases_of(k, dev, bases_b, stores[2], stores[3], "bases_b")
        m = La[fractions[0]].shape[0]
        M.append([float(mso(La[f], Lb[f])) for f in fractions])
        BL.append([max(La[f].shape[1], Lb[f].shape[1]) / m for f in fractions])
        LK.append(layer_of(k))
    layers = sorted({l for l in LK if l is not None})
    Marr, Barr = np.asarray(M), np.asarray(BL)
    lm = [Marr[[i for i, l in enumerate(LK) if l == ly]].mean(0).tolist() for ly in layers]
    lb = [Barr[[i for i, l in enumerate(LK) if l == ly]].mean(0).tolist() for ly in layers]
    return UpdateOverlapResult(fractions, keys, LK, M, BL, layers, lm, lb, tuple(names))


# ------------------------------------------------------------------------- svd vs random at equal task loss


def match_equal_task_loss(rows: Sequence[Mapping[str, Any]], *, basis: str = "svd",
                          control: str = "random") -> list[dict[str, Any]]:
    """Pair each ``basis`` projection with the ``control`` projection of the same variant at the nearest task loss.

    The paper's question (METHODS.md §2) is whether projecting the fine-tuning update onto V's top singular
    subspace keeps refusal better than a random subspace *that costs the task as much*; comparing at equal rank
    fraction would confound the subspace with how much of U it keeps. Rule: among the ``control`` rows of the same
    variant (any fraction), the one whose pooled task loss is nearest (smallest ``|Δ task loss|``); a tie goes to
    the control row at the same fraction, then to the smaller fraction. Only evaluated models are paired — no
    interpolation between the two control fractions that bracket the loss, because the paired bootstrap needs
    each prompt's outcome under one real model — so the task-loss gap that remains is reported with the pair.

    Parameters
    ----------
    rows : sequence of dict
        Projection rows of a ``safety_weight`` payload (``basis``, ``fraction``, ``variant``, ``task_loss``, …).
    basis, control : str
        The two basis kinds compared (:data:`BASIS_KINDS`).

    Returns
    -------
    list of dict
        One per ``basis`` row that has a control of its variant, in row order: ``variant``, ``fraction``,
        ``control_fraction``, ``row``, ``control`` (the two rows) and ``task_loss_gap`` (basis − control, pooled).
    """
    for b in (basis, control):
        if b not in BASIS_KINDS:
            raise ValueError(f"basis kinds must be among {BASIS_KINDS}, got {b!r}")
    out = []
    for r in rows:
        if r["basis"] != basis:
            continue
        cands = [c for c in rows if c["basis"] == control and c["variant"] == r["variant"]]
        if not cands:
            continue
        c = min(cands, key=lambda c: (abs(c["task_loss"] - r["task_loss"]), c["fraction"] != r["fraction"],
                                      c["fraction"]))
        out.append(dict(variant=r["variant"], fraction=r["fraction"], control_fraction=c["fraction"], row=r,
                        control=c, task_loss_gap=float(r["task_loss"] - c["task_loss"])))
    return out


def _pooled_loss(v: np.ndarray) -> float:
    """Pooled task loss of rows ``[Σ nll, tokens]`` (one per useful prompt): a ratio of sums."""
    return float(v[:, 0].sum() / v[:, 1].sum())


def compare_at_equal_task_loss(rows: Sequence[Mapping[str, Any]], *, basis: str = "svd", control: str = "random",
                               seed: int = 0) -> list[dict[str, Any]]:
    """Paired comparisons of each :func:`match_equal_task_loss` pair over the same prompts (METHODS.md §5).

    Per pair: ``refusal`` — refusal rate (basis) − refusal rate (control) on the same harmful test prompts, a
    paired percentile bootstrap over prompts (:func:`probekit.stats.paired_difference`); ``task_loss_gap`` —
    pooled task loss (basis) − (control), paired bootstrap of the ratio of sums over useful prompts; and each
    model's refusal rate with its Wilson interval (``refusal_basis``, ``refusal_control``). Estimates are
    :class:`~probekit.stats.Estimate` s.

    Raises
    ------
    ValueError
        When a matched row has no ``per_prompt`` outcomes (a payload written before they were kept) or the two
        rows were evaluated on different numbers of prompts.
    """
    from ..stats import paired_difference, proportion

    out = []
    for m in match_equal_task_loss(rows, basis=basis, control=control):
        pa, pb = m["row"].get("per_prompt"), m["control"].get("per_prompt")
        if not pa or not pb:
            raise ValueError(f"projection rows {basis}/{m['fraction']}/{m['variant']} and "
                             f"{control}/{m['control_fraction']}/{m['variant']} hold no per_prompt outcomes; rerun "
                             "the weight-space experiment with this version")
        for k in ("harmful_refused", "useful_nll"):
            if len(pa[k]) != len(pb[k]):
                raise ValueError(f"paired rows disagree on the number of prompts in {k}: {len(pa[k])} vs "
                                 f"{len(pb[k])}")
        la = np.column_stack([pa["useful_nll"], pa["useful_tokens"]]).astype(np.float64)
        lb = np.column_stack([pb["useful_nll"], pb["useful_tokens"]]).astype(np.float64)
        out.append(dict(
            variant=m["variant"], fraction=m["fraction"], control_fraction=m["control_fraction"],
            refusal=paired_difference(pa["harmful_refused"], pb["harmful_refused"], seed=seed,
                                      unit="harmful prompts"),
            task_loss_gap=paired_difference(la, lb, _pooled_loss, seed=seed, unit="useful prompts"),
            refusal_basis=proportion(pa["harmful_refused"], unit="harmful prompts"),
            refusal_control=proportion(pb["harmful_refused"], unit="harmful prompts")))
    return out
