"""A small CNN on scikit-learn's 8x8 digits, for LinearScope demos, tests and benchmarks.

``train_digits_cnn`` trains it deterministically in a few seconds on CPU (1,797 images, fixed seeded split);
``load_digits_cnn`` caches the weights as safetensors under ``<cache root>/models/digits-cnn/`` (written to a
temporary file and renamed, loaded with safetensors, never pickle).

Example
-------
>>> from probekit.digits_cnn import load_digits_cnn, digits_split
>>> model = load_digits_cnn()                       # doctest: +SKIP
>>> X_tr, X_te, y_tr, y_te = digits_split()         # X: (n, 1, 8, 8) float32 in [0, 1]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .paths import models_dir

__all__ = ["DigitsCNN", "digits_split", "train_digits_cnn", "load_digits_cnn", "digits_cnn_path"]

MODEL_NAME = "digits-cnn"
WEIGHTS_FILE = "model.safetensors"


class DigitsCNN(nn.Sequential):
    """Conv(1→8) → ReLU → MaxPool2 → Conv(8→16) → ReLU → MaxPool2 → Flatten → Linear(64→10).

    Input ``(N, 1, 8, 8)`` in [0, 1]; output ``(N, 10)`` logits. 1,962 parameters.
    """

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 10),
        )


def digits_split(
    seed: int = 0, test_size: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, seeded train/test split of ``sklearn.datasets.load_digits``.

    Returns
    -------
    X_train, X_test : torch.Tensor of shape (n, 1, 8, 8), float32, pixel values / 16 in [0, 1]
    y_train, y_test : torch.Tensor of shape (n,), int64
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (X_tr, X_te, y_tr, y_te))  # type: ignore[return-value]


def train_digits_cnn(seed: int = 0, epochs: int = 15, *, verbose: bool = False) -> tuple[DigitsCNN, float]:
    """Train :class:`DigitsCNN` on the digits split of ``seed``; deterministic for a given seed.

    Adam (lr 1e-2), minibatches of 64 in a seeded order, ``epochs`` passes. Takes a few seconds on CPU.

    Returns
    -------
    model : DigitsCNN
        In eval mode, float32.
    test_accuracy : float
        Accuracy on the held-out 25 % (450 images); 0.967 for seed 0, 15 epochs.
    """
    X_tr, X_te, y_tr, y_te = digits_split(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    with torch.inference_mode(False), torch.enable_grad():
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(len(X_tr), generator=g)
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = loss_fn(model(X_tr[idx]), y_tr[idx])
                loss.backward()
                opt.step()
            sched.step()
            if verbose:
                print(f"epoch {ep + 1}/{epochs} loss {float(loss):.4f}")
    model.eval()
    with torch.no_grad():
        acc = float((model(X_te).argmax(1) == y_te).float().mean())
    return model, acc


def digits_cnn_path() -> Path:
    """``<cache root>/models/digits-cnn/model.safetensors`` (may not exist yet)."""
    return models_dir() / MODEL_NAME / WEIGHTS_FILE


def load_digits_cnn(cache: bool = True, *, seed: int = 0, epochs: int = 15) -> DigitsCNN:
    """Return the trained digits CNN (eval mode, float32), training and caching it on first use.

    Parameters
    ----------
    cache : bool, default=True
        Load the weights from ``digits_cnn_path()`` if present, else train and save them there (temporary
        file + rename, so a crash never leaves a half-written file). ``False`` trains without touching disk.
    seed, epochs
        Passed to :func:`train_digits_cnn` when training. A cached file trained with other values is retrained.

    The test accuracy is stored in the safetensors metadata and set as ``model.test_accuracy``.
    """
    from safetensors.torch import load_file, safe_open, save_file

    if not cache:
        model, acc = train_digits_cnn(seed, epochs)
        model.test_accuracy = acc  # type: ignore[attr-defined]
        return model
    path = digits_cnn_path()
    want = {"seed": str(seed), "epochs": str(epochs)}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in want.items()):
            model = DigitsCNN()
            model.load_state_dict(load_file(str(path)))
            model.eval()
            model.test_accuracy = float(meta.get("test_accuracy", "nan"))  # type: ignore[attr-defined]
            return model
    model, acc = train_digits_cnn(seed, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={**want, "test_accuracy": repr(acc), "arch": json.dumps("DigitsCNN")})
    os.replace(tmp, path)
    model.test_accuracy = acc  # type: ignore[attr-defined]
    return model
