"""A small ×2 super-resolution ReLU CNN on scikit-learn's sample images, for LinearScope on image-to-image networks.

Data: the two photographs bundled with scikit-learn (``load_sample_images``: china, flower; 427×640 RGB) are
converted to luminance in [0, 1] (ITU-R BT.601 weights) and 2×2-averaged once to 213×320, the *high-resolution*
(HR) images. A HR patch of ``2s × 2s`` pixels is degraded to its ``s × s`` low-resolution (LR) input by 2×2
averaging (area downsampling, a linear map). Each image is cut into vertical bands of 64 columns; in every run
of four bands the first three are training region and the fourth is test region, and a patch lies wholly inside
one band run of its split, so no test pixel is ever in a training patch while both splits see both photographs
from left to right (one block of columns at the right held out would test on other content than was trained).

Network (:class:`SRCNN`, ESPCN-like): bilinear ×2 upsampling of the LR input plus a learned residual computed at
LR by Conv(1→32) → ReLU → Conv(32→32) → ReLU → Conv(32→4) (3×3, zero padding) → PixelShuffle(2). A ReLU network,
so LinearScope's ``A(x)`` is its Jacobian and ``b(x)`` FullGrad's bias term.

``train_sr_cnn`` trains it deterministically in seconds on CPU; ``load_sr_cnn`` caches the weights as
safetensors under ``<cache root>/models/sr-cnn/`` (temporary file + rename; never pickle).

Example
-------
>>> from probekit.sr_cnn import load_sr_cnn, sr_patches
>>> model = load_sr_cnn()                                    # doctest: +SKIP
>>> lr, hr = sr_patches("test", n=64, seed=0)                # (64, 1, 8, 8), (64, 1, 16, 16) in [0, 1]
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .paths import models_dir

__all__ = ["SRCNN", "hr_images", "degrade", "sr_patches", "psnr", "upsample_baseline", "train_sr_cnn",
           "load_sr_cnn", "sr_cnn_path"]

MODEL_NAME = "sr-cnn"
WEIGHTS_FILE = "model.safetensors"
SCALE = 2
#: Column bands: in each run of ``BANDS_PER_RUN`` bands of ``BAND`` columns the last one is test region.
BAND = 64
BANDS_PER_RUN = 4
#: Patches flatter than this (HR pixel standard deviation) are not drawn; see :func:`sr_patches`.
MIN_STD = 0.05


class SRCNN(nn.Module):
    """×2 super-resolution: ``f(x) = up(x) + body(x)``, ``up`` bilinear (align_corners=False), ``body`` three 3×3
    convolutions with ReLUs at LR ending in a pixel shuffle.

    Input ``(N, 1, s, s)`` LR patch in [0, 1]; output ``(N, 1, 2s, 2s)``. 10,852 parameters with ``width=32``.
    The last convolution starts at zero, so training starts from plain bilinear upsampling.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=SCALE, mode="bilinear", align_corners=False)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, SCALE * SCALE, 3, padding=1),
            nn.PixelShuffle(SCALE),
        )
        nn.init.zeros_(self.body[4].weight)
        nn.init.zeros_(self.body[4].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x) + self.body(x)


@lru_cache(maxsize=1)
def _hr_images_np() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    try:
        images = load_sample_images().images
    except ImportError as e:  # sklearn needs Pillow to read its bundled JPEGs
        raise ImportError(f"reading scikit-learn's sample images needs Pillow: pip install pillow ({e})") from e
    out = []
    for rgb in images:
        y = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0
        h, w = (y.shape[0] // 2) * 2, (y.shape[1] // 2) * 2
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        out.append(np.ascontiguousarray(y, dtype=np.float32))
    return tuple(out)


def hr_images() -> list[torch.Tensor]:
    """The high-resolution images: luminance of china and flower, 2×2-averaged, each ``(213, 320)`` float32."""
    return [torch.from_numpy(a.copy()) for a in _hr_images_np()]


def degrade(hr: torch.Tensor) -> torch.Tensor:
    """LR input of a HR batch by 2×2 averaging: ``(N, 1, 2s, 2s) -> (N, 1, s, s)``."""
    return F.avg_pool2d(hr, SCALE)


def _band_starts(split: str, width: int, p: int) -> list[int]:
    """Left columns ``c`` of every ``p``-wide patch lying wholly inside the ``split`` bands of an image."""
    run = BAND * BANDS_PER_RUN
    out = []
    for r0 in range(0, width, run):
        lo, hi = (r0, r0 + run - BAND) if split == "train" else (r0 + run - BAND, r0 + run)
        hi = min(hi, width)
        out += range(lo, hi - p + 1)
    return out


def sr_patches(split: str, n: int, *, lr_size: int = 8, seed: int = 0,
               min_std: float = MIN_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random (LR, HR) patch pairs from the ``"train"`` or ``"test"`` region, seeded.

    Patches are drawn uniformly over both images' region (the image first, then the top-left corner); test
    patches are kept apart from the training region by one patch width (see the module docstring). A drawn
    HR patch whose pixel standard deviation is below ``min_std`` is rejected and another drawn: flat sky and
    blur (36% of china's 16×16 patches, 65% of flower's at 0.05) leave nothing to super-resolve (every upsampler is exact on a
    constant) and nothing for the analysis to read. ``min_std=0`` keeps every patch.

    Returns
    -------
    lr : Tensor of shape (n, 1, lr_size, lr_size), float32
    hr : Tensor of shape (n, 1, 2 lr_size, 2 lr_size), float32
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1 or lr_size < 2:
        raise ValueError(f"need n >= 1 and lr_size >= 2, got n={n}, lr_size={lr_size}")
    p = SCALE * lr_size
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    imgs = _hr_images_np()
    out = np.empty((n, 1, p, p), dtype=np.float32)
    i = tries = 0
    while i < n:
        tries += 1
        if tries > 1000 * n:
            raise ValueError(f"fewer than 1 in 1000 {split} patches have a standard deviation ≥ min_std={min_std}")
        img = imgs[int(rng.integers(len(imgs)))]
        h, w = img.shape
        starts = _band_starts(split, w, p)
        if not starts or h < p:
            raise ValueError(f"lr_size={lr_size} is too large for the {split} bands of a {h}×{w} image")
        r, c = int(rng.integers(0, h - p + 1)), starts[int(rng.integers(len(starts)))]
        patch = img[r : r + p, c : c + p]
        if patch.std() >= min_std:
            out[i, 0] = patch
            i += 1
    hr = torch.from_numpy(out)
    return degrade(hr), hr


def psnr(pred: torch.Tensor, target: torch.Tensor, peak: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB, ``10 log10(peak² / MSE)``; ``pred``, ``target`` of shape (N, ...). Returns (N,)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(peak * peak / mse.clamp_min(1e-20))).numpy()


def upsample_baseline(lr: torch.Tensor, mode: str) -> torch.Tensor:
    """×2 upsampling without learning: ``"nearest"``, ``"bilinear"`` or ``"bicubic"`` (clamped to [0, 1])."""
    if mode not in ("nearest", "bilinear", "bicubic"):
        raise ValueError(f"mode must be 'nearest', 'bilinear' or 'bicubic', got {mode!r}")
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(lr, scale_factor=SCALE, mode=mode, **kw).clamp(0, 1)


def train_sr_cnn(seed: int = 0, steps: int = 3000, *, n_train: int = 8192, lr_size: int = 8, width: int = 32,
                 verbose: bool = False) -> tuple[SRCNN, dict]:
    """Train :class:`SRCNN` on ``n_train`` training patches and their flips/transposes; deterministic per seed.

    Adam (lr 2e-3, cosine decay to 0), MSE, ``steps`` minibatches of 64 drawn with a seeded generator from the
    ``4 n_train`` augmented patches. About 10–20 s on one CPU core.

    Returns
    -------
    model : SRCNN
        In eval mode, float32.
    info : dict
        Mean per-patch PSNR (dB) of the network (output clamped to [0, 1]), bilinear and bicubic upsampling on
        512 test patches (seed ``seed + 1``): a quick check that it learned something; the analysis reports CIs.
    """
    _, hr = sr_patches("train", n_train, lr_size=lr_size, seed=seed)
    hr = torch.cat([hr, hr.flip(-1), hr.flip(-2), hr.transpose(-1, -2)])  # the degradation commutes with these
    lr = degrade(hr)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SRCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with torch.inference_mode(False), torch.enable_grad():
        model.train()
        for step in range(steps):
            idx = torch.randint(0, len(hr), (64,), generator=g)
            opt.zero_grad()
            loss = F.mse_loss(model(lr[idx]), hr[idx])
            loss.backward()
            opt.step()
            sched.step()
            if verbose and (step + 1) % 500 == 0:
                mse = float(loss.detach())
                print(f"step {step + 1}/{steps} mse {mse:.2e} ({-10 * math.log10(mse):.2f} dB)")
    model.eval()
    lr_te, hr_te = sr_patches("test", 512, lr_size=lr_size, seed=seed + 1)
    with torch.no_grad():
        info = {"psnr_net": float(psnr(model(lr_te).clamp(0, 1), hr_te).mean()),
                "psnr_bilinear": float(psnr(upsample_baseline(lr_te, "bilinear"), hr_te).mean()),
                "psnr_bicubic": float(psnr(upsample_baseline(lr_te, "bicubic"), hr_te).mean())}
    return model, info


def sr_cnn_path() -> Path:
    """``<cache root>/models/sr-cnn/model.safetensors`` (may not exist yet)."""
    return models_dir() / MODEL_NAME / WEIGHTS_FILE


def load_sr_cnn(cache: bool = True, *, seed: int = 0, steps: int = 3000, width: int = 32) -> SRCNN:
    """Return the trained SR CNN (eval mode, float32), training and caching it on first use.

    Parameters
    ----------
    cache : bool, default=True
        Load the weights from ``sr_cnn_path()`` if they were trained with the same ``seed``, ``steps`` and
        ``width``; else train and save them there (temporary file + rename). ``False`` trains without touching disk.
    seed, steps, width
        Passed to :func:`train_sr_cnn`.

    The quick held-out PSNRs of :func:`train_sr_cnn` are kept in the safetensors metadata and set as
    ``model.train_info``.
    """
    from safetensors.torch import load_file, safe_open, save_file

    if not cache:
        model, info = train_sr_cnn(seed, steps, width=width)
        model.train_info = info  # type: ignore[attr-defined]
        return model
    path = sr_cnn_path()
    want = {"seed": str(seed), "steps": str(steps), "width": str(width)}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in want.items()):
            model = SRCNN(width)
            model.load_state_dict(load_file(str(path)))
            model.eval()
            model.train_info = json.loads(meta.get("train_info", "{}"))  # type: ignore[attr-defined]
            return model
    model, info = train_sr_cnn(seed, steps, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={**want, "train_info": json.dumps(info), "arch": json.dumps("SRCNN")})
    os.replace(tmp, path)
    model.train_info = info  # type: ignore[attr-defined]
    return model
