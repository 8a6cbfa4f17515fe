"""probekit: hook-based activation capture, an activation cache, and subspace probes for PyTorch models."""

__version__ = "0.1.0"

from .capture import CaptureConfig, capture  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["CaptureConfig", "capture", "load_model", "__version__"]
