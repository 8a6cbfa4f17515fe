"""A small image-to-image ReLU CNN (Gaussian denoising) on scikit-learn's sample images, for LinearScope.

Clean patches are the HR patches of :func:`probekit.sr_cnn.sr_patches` (same photographs, same disjoint
train/test column bands, same texture filter); the input adds seeded Gaussian noise of standard deviation
``sigma``. Network (:class:`DenoiseCNN`, DnCNN-like): ``f(x) = x − body(x)``, ``body`` = Conv(1→16) → ReLU →
Conv(16→16) → ReLU → Conv(16→1), 3×3, zero padding, last conv starting at zero. ``load_denoise_cnn`` trains it
seeded in seconds and caches it as safetensors under ``<cache root>/models/denoise-cnn/`` (never pickle).

Example
-------
>>> from probekit.denoise_cnn import load_denoise_cnn, denoise_patches
>>> net = load_denoise_cnn()                                   # doctest: +SKIP
>>> noisy, clean = denoise_patches("test", 64, seed=0)         # (64, 1, 16, 16) each
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .paths import models_dir
from .sr_cnn import psnr, sr_patches

__all__ = ["DenoiseCNN", "denoise_patches", "train_denoise_cnn", "load_denoise_cnn", "denoise_cnn_path"]

MODEL_NAME = "denoise-cnn"
SIGMA = 0.1


class DenoiseCNN(nn.Module):
    """``f(x) = x − body(x)``; input and output ``(N, 1, h, w)``. 2,625 parameters with ``width=16``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(self.body[4].weight)
        nn.init.zeros_(self.body[4].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def denoise_patches(split: str, n: int, *, size: int = 16, sigma: float = SIGMA,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (noisy, clean) pairs of ``size × size`` patches, seeded; both ``(n, 1, size, size)`` float32."""
    if size % 2 or size < 4:
        raise ValueError(f"size must be even and ≥ 4, got {size}")
    if sigma < 0:
        raise ValueError(f"sigma must be ≥ 0, got {sigma}")
    _, clean = sr_patches(split, n, lr_size=size // 2, seed=seed)
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    return clean + sigma * torch.randn(clean.shape, generator=g), clean


def train_denoise_cnn(seed: int = 0, steps: int = 1500, *, n_train: int = 4096, sigma: float = SIGMA,
                      width: int = 16) -> tuple[DenoiseCNN, dict]:
    """Train :class:`DenoiseCNN` (Adam 2e-3 with cosine decay, MSE, batches of 64, fresh noise each step; seeded).

    Returns the model (eval mode) and the mean PSNR (dB) of its output and of the noisy input on 256 test patches.
    """
    _, clean = sr_patches("train", n_train, lr_size=8, seed=seed)
    clean = torch.cat([clean, clean.flip(-1), clean.transpose(-1, -2)])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenoiseCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with torch.inference_mode(False), torch.enable_grad():
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(clean), (64,), generator=g)
            y = clean[idx]
            x = y + sigma * torch.randn(y.shape, generator=g)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    noisy, clean_te = denoise_patches("test", 256, sigma=sigma, seed=seed + 1)
    with torch.no_grad():
        info = {"psnr_net": float(psnr(model(noisy).clamp(0, 1), clean_te).mean()),
                "psnr_noisy": float(psnr(noisy.clamp(0, 1), clean_te).mean())}
    return model, info


def denoise_cnn_path() -> Path:
    """``<cache root>/models/denoise-cnn/model.safetensors`` (may not exist yet)."""
    return models_dir() / MODEL_NAME / "model.safetensors"


def load_denoise_cnn(cache: bool = True, *, seed: int = 0, steps: int = 1500, width: int = 16) -> DenoiseCNN:
    """The trained denoiser (eval mode, float32): loaded from the cache if trained with the same settings, else
    trained and saved (temporary file + rename). ``model.train_info`` holds the quick test PSNRs."""
    from safetensors.torch import load_file, safe_open, save_file

    if not cache:
        model, info = train_denoise_cnn(seed, steps, width=width)
        model.train_info = info  # type: ignore[attr-defined]
        return model
    path = denoise_cnn_path()
    want = {"seed": str(seed), "steps": str(steps), "width": str(width), "sigma": repr(SIGMA)}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in want.items()):
            model = DenoiseCNN(width)
            model.load_state_dict(load_file(str(path)))
            model.eval()
            model.train_info = json.loads(meta.get("train_info", "{}"))  # type: ignore[attr-defined]
            return model
    model, info = train_denoise_cnn(seed, steps, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={**want, "train_info": json.dumps(info)})
    os.replace(tmp, path)
    model.train_info = info  # type: ignore[attr-defined]
    return model
