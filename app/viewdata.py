"""File access for the example-level views (tokens, latents, attention): latent-statistics folders, SAE folders,
saved direction vectors, forward results of typed text, and the per-token quantities the token view colours by.

Every path goes through :func:`app.security.safe_path`; parsed files are memoised by path and mtime
(:func:`app.data.memo`), so after the first view of a file each request only slices arrays.

Layout under the cache root::

    results/latents/<name>/latents.json + latents.safetensors (+ tokens.json)   # probekit.latents
    results/forward/<id>/forward.json + forward.safetensors                    # app.forward_worker
    saes/<name>/, results/dark-matter/<model>/saes/<name>/                     # SAELens-format SAE folders
    vectors/*.safetensors, results/safety/<model>/*.safetensors                # 1-D direction vectors
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from . import data
from .security import UnsafePathError, check_name, safe_path

FORWARD_ID_RE = re.compile(r"^[0-9a-f]{16}$")
QUANTITIES = {"norm": "‖x‖", "neuron": "neuron", "direction": "direction (x · v)", "latent": "SAE latent"}


def _stamp(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------- latents


def list_latent_results(root: Path | None = None) -> list[str]:
    """Names of folders ``results/latents/<name>/`` holding a complete ``latents.json``."""
    root = root or data.get_root()
    base = safe_path(root, "results", "latents")
    if not base.is_dir():
        return []
    out = []
    for p in sorted(base.iterdir()):
        try:
            check_name(p.name)
            if safe_path(root, "results", "latents", p.name, "latents.json").is_file():
                out.append(p.name)
        except UnsafePathError:
            continue
    return out


def latents_folder(name: str, root: Path | None = None) -> Path:
    return safe_path(root or data.get_root(), "results", "latents", check_name(name, "latent result"))


def latents_stamp(name: str, root: Path | None = None) -> tuple:
    """``(path, mtime, size)`` of ``latents.json``: identifies one version of a latent-statistics folder."""
    return _stamp(latents_folder(name, root) / "latents.json")


def load_latents(name: str, root: Path | None = None) -> tuple[dict, dict, dict]:
    """``(index, arrays, token_names)`` of ``results/latents/<name>`` (memoised by the index file's stamp)."""
    from probekit.latents import ARRAYS_FILE, INDEX_FILE, load_latent_stats

    folder = latents_folder(name, root)
    idx = folder / INDEX_FILE
    if not idx.is_file():
        raise FileNotFoundError(f"results/latents/{name} has no {INDEX_FILE}")
    safe_path(root or data.get_root(), "results", "latents", name, ARRAYS_FILE)  # refuse a symlinked arrays file
    return data.memo(("latents", _stamp(idx)), lambda: load_latent_stats(folder))


def token_name(names: dict, t: int) -> str:
    return names.get(str(int(t)), f"#{int(t)}") if t >= 0 else ""


def latent_table(name: str, sort: str = "rate", limit: int = 200) -> list[dict]:
    """Rows ``{latent, firing_rate, max_act, top_token}`` sorted by ``rate`` (desc), ``max`` or ``id``."""
    index, a, names = load_latents(name)
    n = max(int(index["n_rows"]), 1)
    rate = a["firing_count"] / n
    ids = np.arange(len(rate))
    order = {"rate": np.lexsort((ids, -rate)), "max": np.lexsort((ids, -a["max_act"]))}.get(sort, ids)
    rows = []
    for i in order[:limit]:
        t = int(a["top_ctx_tokens"][i, 0, int(index["config"]["context"])]) if a["top_row"][i, 0] >= 0 else -1
        rows.append(dict(latent=int(i), firing_rate=float(rate[i]), max_act=float(a["max_act"][i]),
                         top_token=token_name(names, t)))
    return rows


def search_token(name: str, query: str, limit: int = 20) -> list[dict]:
    """Latents that fire most on tokens whose decoded text equals ``query`` (whitespace-stripped match, so
    ``def`` finds both ``def`` and `` def``): ``{latent, token, mean_act, count}`` by mean activation."""
    index, a, names = load_latents(name)
    q = (query or "").strip()
    if not q:
        return []
    hits = []
    for j, t in enumerate(a["token_ids"]):
        if token_name(names, int(t)).strip() != q:
            continue
        for lat, m in zip(a["token_top_latents"][j], a["token_top_mean"][j]):
            if lat >= 0:
                hits.append(dict(latent=int(lat), token=token_name(names, int(t)), mean_act=float(m),
                                 count=int(a["token_count"][j])))
    hits.sort(key=lambda h: (-h["mean_act"], h["latent"]))
    return hits[:limit]


# --------------------------------------------------------------------------------------------- SAEs, vectors


def list_sae_folders(root: Path | None = None) -> list[str]:
    """SAE folders (``cfg.json`` + ``sae_weights.safetensors``) under ``saes/`` and ``results/dark-matter/*/saes/``,
    as paths relative to the root."""
    root = Path(root or data.get_root())
    out = []
    for pattern in ("saes/*", "results/dark-matter/*/saes/*"):
        for p in sorted(root.glob(pattern)):
            rel = str(p.relative_to(root))
            try:
                if (safe_path(root, rel, "cfg.json").is_file()
                        and safe_path(root, rel, "sae_weights.safetensors").is_file()):
                    out.append(rel)
            except UnsafePathError:
                continue
    return out


def load_sae_folder(rel: str, root: Path | None = None):
    """The SAE of a folder from :func:`list_sae_folders` (memoised by its weights' stamp)."""
    from probekit.probes.sae import load_sae

    root = Path(root or data.get_root())
    if rel not in list_sae_folders(root):
        raise ValueError(f"{rel[:80]!r} is not an SAE folder of this cache (saes/<name> or "
                         "results/dark-matter/<model>/saes/<name>)")
    folder = safe_path(root, rel)
    return data.memo(("sae", _stamp(folder / "sae_weights.safetensors")), lambda: load_sae(folder))


def list_vectors(root: Path | None = None, d: int | None = None) -> list[dict]:
    """1-D vectors in ``vectors/*.safetensors`` and ``results/safety/*/*.safetensors``: ``{"value": "file::key",
    "label", "dim"}``; only those of length ``d`` when given."""
    from safetensors import safe_open

    root = Path(root or data.get_root())
    out = []
    for pattern in ("vectors/*.safetensors", "results/safety/*/*.safetensors"):
        for p in sorted(root.glob(pattern)):
            rel = str(p.relative_to(root))
            try:
                full = safe_path(root, rel)
                with safe_open(str(full), "numpy") as f:
                    for k in f.keys():
                        shape = f.get_slice(k).get_shape()
                        if len(shape) == 1 and (d is None or shape[0] == d):
                            out.append(dict(value=f"{rel}::{k}", label=f"{rel} · {k}", dim=int(shape[0])))
            except Exception:  # an unreadable file is not offered
                continue
    return out


def load_vector(value: str, root: Path | None = None) -> np.ndarray:
    """The vector ``file::key`` (a value of :func:`list_vectors`) as float32 ``(d,)``."""
    from safetensors import safe_open

    root = Path(root or data.get_root())
    if not isinstance(value, str) or "::" not in value:
        raise ValueError(f"not a vector reference: {str(value)[:60]!r} (expected file.safetensors::key)")
    rel, key = value.rsplit("::", 1)
    if not rel.endswith(".safetensors") or not (rel.startswith("vectors/") or rel.startswith("results/safety/")):
        raise UnsafePathError(f"vectors are read from vectors/ or results/safety/ only, not {rel[:60]!r}")
    full = safe_path(root, rel)
    if not full.is_file():
        raise FileNotFoundError(f"{rel} does not exist")

    def load():
        with safe_open(str(full), "numpy") as f:
            if key not in f.keys():
                raise KeyError(f"{rel} holds no tensor {key!r}")
            return np.asarray(f.get_tensor(key), np.float32).reshape(-1)

    return data.memo(("vector", _stamp(full), key), load)


# --------------------------------------------------------------------------------------------- token sources


def forward_id(model: str, text: str | None, token_ids: list[int] | None, hooks: list[str], attention: bool) -> str:
    """Content id of a forward request: the same request reuses the same result folder."""
    blob = json.dumps(dict(model=model, text=text, ids=token_ids, hooks=sorted(hooks), attention=attention),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def forward_folder(fid: str, root: Path | None = None) -> Path:
    if not isinstance(fid, str) or not FORWARD_ID_RE.match(fid):
        raise UnsafePathError(f"not a forward-result id: {str(fid)[:40]!r}")
    return safe_path(root or data.get_root(), "results", "forward", fid)


def load_forward(fid: str, root: Path | None = None) -> tuple[dict, dict]:
    """``(info, arrays)`` of a forward result written by ``app.forward_worker`` (memoised)."""
    from safetensors.numpy import load_file

    folder = forward_folder(fid, root)
    meta = folder / "forward.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no forward result {fid} (run the forward first)")
    return data.memo(("forward", _stamp(meta)),
                     lambda: (json.loads(meta.read_text()), load_file(str(folder / "forward.safetensors"))))


def doc_activations(run_id: str, hook: str, doc: int) -> dict:
    """A cached document: ``{"tokens", "token_ids", "positions", "x" (n, d) float32, "decoded", "model"}``."""
    return data.document_activations(run_id, hook, doc)


def forward_activations(fid: str, hook: str) -> dict:
    """Typed text: the same dict as :func:`doc_activations` from a forward result."""
    info, arrays = load_forward(fid)
    key = f"acts.{hook}"
    if key not in arrays:
        raise ValueError(f"the forward result {fid} has no hook {hook!r} (it has "
                         f"{', '.join(k[5:] for k in arrays if k.startswith('acts.')) or 'none'}); run it again")
    return dict(tokens=info["tokens"], token_ids=info["token_ids"], positions=list(range(len(info["tokens"]))),
                x=arrays[key].reshape(len(info["tokens"]), -1), decoded=True, model=info.get("model", ""))


def quantity(x: np.ndarray, kind: str, *, neuron: int | None = None, vector: str | None = None,
             sae: str | None = None, latent: int | None = None) -> tuple[np.ndarray, str]:
    """Per-token values ``(n,)`` of ``x`` ``(n, d)`` and their label.

    ``norm``: ‖x‖₂; ``neuron``: ``x[:, neuron]``; ``direction``: ``x · v`` for the saved vector ``v`` (not
    normalised: a unit vector gives the projection length); ``latent``: the SAE's ``encode(x)[:, latent]``.
    """
    d = x.shape[1]
    if kind == "norm":
        return np.linalg.norm(x, axis=1), "‖x‖"
    if kind == "neuron":
        if neuron is None or not 0 <= int(neuron) < d:
            raise ValueError(f"choose a neuron index in 0..{d - 1}")
        return x[:, int(neuron)], f"neuron {int(neuron)}"
    if kind == "direction":
        if not vector:
            raise ValueError("choose a saved vector (vectors/*.safetensors or a safety result's directions)")
        v = load_vector(vector)
        if v.shape[0] != d:
            raise ValueError(f"the vector {vector} has {v.shape[0]} entries but this hook has {d}")
        return x @ v, f"x · {vector.rsplit('::', 1)[-1]}"
    if kind == "latent":
        import torch

        if not sae:
            raise ValueError("choose an SAE folder")
        model = load_sae_folder(sae)
        if int(model.cfg.d_in) != d:
            raise ValueError(f"the SAE {sae} reads {model.cfg.d_in} features but this hook has {d}")
        if latent is None or not 0 <= int(latent) < int(model.cfg.d_sae):
            raise ValueError(f"choose a latent index in 0..{int(model.cfg.d_sae) - 1}")
        with torch.inference_mode():
            f = model.encode(torch.from_numpy(np.ascontiguousarray(x)))[:, int(latent)]
        return f.float().numpy(), f"latent {int(latent)}"
    raise ValueError(f"unknown quantity {kind!r}: one of {', '.join(QUANTITIES)}")
