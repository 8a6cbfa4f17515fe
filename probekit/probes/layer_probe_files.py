"""Files of a per-layer probe sweep beside its result JSON: the fitted probes and their test predictions.

Layout under the result folder ``out``:

* ``probes/<layer>.safetensors``: each layer's fitted :class:`~probekit.probes.linear.LinearProbe` with its
  standardisation (:func:`~probekit.probes.linear.save_probe`);
* ``probes.json``: ``{"labels": [name of class id 0, 1, …], "layers": {layer: {"file", "hook"}}}``;
* ``test_predictions.safetensors``: per test token (int64, shape (n_test,)) ``doc``, ``position``, ``token_id``,
  ``y_true`` (class id) and ``pred.<layer>`` (predicted class id) per layer; and the tokens of every test document,
  ``ctx.doc``, ``ctx.position``, ``ctx.token_id`` (shape (n_ctx,)), so a view can show a token in its context
  without the activation cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .linear import LinearProbe, load_probe, save_probe

__all__ = ["load_layer_probe", "load_probe_index", "load_test_predictions", "save_layer_probes"]

_LAYER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _check_layer(layer: str) -> str:
    if not isinstance(layer, str) or not _LAYER_RE.match(layer) or layer.startswith("."):
        raise ValueError(f"not a layer name: {str(layer)[:40]!r} (letters, digits, '.', '_', '-')")
    return layer


def save_layer_probes(out: Path, probes: dict[str, LinearProbe], *, labels: list[str], hooks: dict[str, str],
                      test: dict[str, np.ndarray], test_pred: dict[str, np.ndarray],
                      context: dict[str, np.ndarray]) -> None:
    """Write the files of the module docstring.

    Parameters
    ----------
    probes : layer -> fitted probe (class ids as labels).
    labels : class names, indexed by class id.
    hooks : layer -> hook name its activations come from (e.g. ``blocks.3.hook_resid_post``).
    test : ``doc``, ``position``, ``token_id``, ``y_true`` arrays of shape (n_test,).
    test_pred : layer -> predicted class ids (n_test,).
    context : ``doc``, ``position``, ``token_id`` of every token of the test documents (n_ctx,).
    """
    from safetensors.numpy import save_file

    out = Path(out)
    (out / "probes").mkdir(parents=True, exist_ok=True)
    index = {}
    for layer, probe in probes.items():
        rel = f"probes/{_check_layer(layer)}.safetensors"
        save_probe(probe, out / rel)
        index[layer] = {"file": rel, "hook": hooks[layer]}
    tensors = {k: np.ascontiguousarray(test[k], dtype=np.int64) for k in ("doc", "position", "token_id", "y_true")}
    tensors.update({f"pred.{l}": np.ascontiguousarray(p, dtype=np.int64) for l, p in test_pred.items()})
    tensors.update({f"ctx.{k}": np.ascontiguousarray(context[k], dtype=np.int64)
                    for k in ("doc", "position", "token_id")})
    save_file(tensors, str(out / "test_predictions.safetensors"))
    (out / "probes.json").write_text(json.dumps({"labels": [str(x) for x in labels], "layers": index}, indent=1))


def load_probe_index(out: Path) -> dict[str, Any]:
    """``probes.json`` of a result folder; ``FileNotFoundError`` naming it when absent."""
    path = Path(out) / "probes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this result was written without its probes; run the demo again "
                                "(probekit demo) to save them.")
    obj = json.loads(path.read_text())
    if not isinstance(obj, dict) or not isinstance(obj.get("layers"), dict) or not isinstance(obj.get("labels"), list):
        raise ValueError(f"{path} is not a probe index (needs 'labels' and 'layers').")
    return obj


def load_layer_probe(out: Path, layer: str) -> LinearProbe:
    """The saved probe of ``layer`` (a key of ``probes.json``)."""
    index = load_probe_index(out)
    if layer not in index["layers"]:
        raise ValueError(f"no saved probe for layer {str(layer)[:40]!r}; saved: {', '.join(index['layers'])}")
    return load_probe(Path(out) / "probes" / f"{_check_layer(layer)}.safetensors")


def load_test_predictions(out: Path) -> dict[str, np.ndarray]:
    """The arrays of ``test_predictions.safetensors`` (see the module docstring)."""
    from safetensors.numpy import load_file

    path = Path(out) / "test_predictions.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the demo again (probekit demo) to write it.")
    return load_file(str(path))
