"""Array-module dispatch: the same kernel code runs on NumPy (CPU) and CuPy (GPU) arrays."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def cupy_or_none() -> ModuleType | None:
    """Return the ``cupy`` module when it imports and sees a device, else ``None``."""
    try:
        import cupy  # noqa: PLC0415

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, or CUDA driver/runtime errors without a GPU
        return None


def get_array_module(array: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy`` according to the type of ``array``."""
    module_name = type(array).__module__.split(".")[0]
    if module_name == "cupy":
        import cupy  # noqa: PLC0415

        return cupy
    return np


def get_fft_module(xp: ModuleType) -> Any:
    """Return an FFT namespace with ``rfftn``/``irfftn``/``next_fast_len`` for ``xp``.

    NumPy arrays use :mod:`scipy.fft` (multithreaded via ``workers``, fast for float32);
    CuPy arrays use :mod:`cupyx.scipy.fft` (cuFFT).
    """
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft
    import cupyx.scipy.fft  # noqa: PLC0415

    return cupyx.scipy.fft
