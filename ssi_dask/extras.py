"""Optional dependencies (pip extras) and the one-line error when one is missing.

The core install (``pip install ssi-dask``) runs Lucy-Richardson Zarr to Zarr on a CPU cluster
and never imports torch, matplotlib or scikit-image. SSI needs PyTorch (``ssi-dask[ssi]``); the
demo, protocol, metrics and figures in :mod:`ssi_dask.bench` need matplotlib and scikit-image
(``ssi-dask[bench]``).
"""

from __future__ import annotations

import importlib

from .errors import MissingExtraError

# module -> (what it is called, the extra that installs it)
EXTRAS = {
    "torch": ("PyTorch", "ssi"),
    "matplotlib": ("matplotlib", "bench"),
    "skimage": ("scikit-image", "bench"),
}


def require(what: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra(s) to install when one of ``modules``
    cannot be imported: ``"<what> needs PyTorch: pip install 'ssi-dask[ssi]'"``."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        names = " and ".join(EXTRAS[m][0] for m in missing)
        extras = ",".join(dict.fromkeys(EXTRAS[m][1] for m in missing))
        raise MissingExtraError(f"{what} needs {names}: pip install 'ssi-dask[{extras}]'")
