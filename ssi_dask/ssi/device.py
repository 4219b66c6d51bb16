"""Device selection for SSI training and inference."""

from __future__ import annotations

import torch

from ..errors import DeviceError

__all__ = ["resolve_device"]


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"``/``"cuda:N"``/``"cpu"`` checked
    (``"gpu"`` is an alias of ``"cuda"``, as in :func:`ssi_dask.deconvolve`)."""
    if isinstance(device, torch.device):
        device = str(device)
    device = "auto" if device is None else str(device)
    if device == "gpu":  # the alias deconvolve(device=) accepts too: one vocabulary
        device = "cuda"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but torch sees no CUDA GPU; "
                "use device='cpu' or 'auto'"
            )
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)"
            )
        return dev
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
