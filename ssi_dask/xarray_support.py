"""``xarray.DataArray`` in, ``DataArray`` out: dims, coords and attrs kept, provenance added.

Dimensions are named like OME-Zarr axes: the spatial ones ``z``, ``y``, ``x`` (or ``y``, ``x``)
last, optionally preceded by ``t`` and/or ``c``; every (t, c) volume is deconvolved on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InputError, PSFError

SPATIAL_DIMS = ("z", "y", "x")
LEAD_DIMS = ("t", "c")


def is_dataarray(obj: Any) -> bool:
    """True for an ``xarray.DataArray`` (without importing xarray for other inputs)."""
    return type(obj).__name__ == "DataArray" and type(obj).__module__.startswith("xarray")


def _check_dims(dims: tuple[str, ...]) -> int:
    """Number of spatial dims; refuse dims not named ``[t][c](z)yx``."""
    n_spatial = 3 if len(dims) >= 3 and tuple(dims[-3:]) == SPATIAL_DIMS else 2
    lead = tuple(dims[: len(dims) - n_spatial])
    if tuple(dims[-n_spatial:]) != SPATIAL_DIMS[-n_spatial:] or lead not in (
        (),
        ("t",),
        ("c",),
        ("t", "c"),
    ):
        raise InputError(
            f"DataArray dims {tuple(dims)} are not OME-like; name them [t] [c] then z, y, x "
            "(or y, x) in that order, e.g. with .rename() and .transpose()"
        )
    return n_spatial


def deconvolve_dataarray(
    array: Any,
    psf: np.ndarray | Sequence[np.ndarray] | Mapping[Any, np.ndarray],
    method: str = "lr",
    *,
    deconvolve: Callable[..., Any],
    resolve_model: Callable[[Any, int], Any],
    **options: Any,
) -> Any:
    """Deconvolve a DataArray; returns a lazy (Dask-backed) DataArray like the input.

    Parameters
    ----------
    array : xarray.DataArray
        Dims ``[t] [c] (z) y x``; NumPy- or Dask-backed.
    psf : numpy.ndarray, sequence or mapping of numpy.ndarray
        One PSF for every volume, one per channel in order, or a mapping from the ``c``
        coordinate's values to PSFs.
    method : {"lr", "ssi"}
        As for :func:`ssi_dask.deconvolve`.
    deconvolve, resolve_model : callable
        :func:`ssi_dask.blockwise.deconvolve` (one volume) and the model check
        (``resolve_model(model, ndim)``), passed by the caller so that this module does not
        import :mod:`ssi_dask.blockwise` back (no import cycle).
    **options
        ``num_iter``, ``chunks``, ``depth``, ``model``, ``device``... (see
        :func:`ssi_dask.deconvolve`).

    Returns
    -------
    xarray.DataArray
        float32, same dims, coords, name and attrs, plus ``attrs["ssi_dask"]`` (method,
        parameters, PSF summary, model hash, package version).
    """
    import dask.array as da  # noqa: PLC0415
    import xarray as xr  # noqa: PLC0415

    from ._version import __version__  # noqa: PLC0415
    from .multivolume import deconvolve_stack  # noqa: PLC0415
    from .psf import describe_psf  # noqa: PLC0415

    dims = tuple(str(d) for d in array.dims)
    n_spatial = _check_dims(dims)
    n_lead = len(dims) - n_spatial
    data = array.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(1,) * n_lead + tuple(array.shape[n_lead:]))
    channel_axis = dims.index("c") if "c" in dims else None
    psfs: Any = psf
    if isinstance(psf, Mapping):
        if channel_axis is None:
            raise PSFError("a PSF per channel was given but the DataArray has no 'c' dim")
        keys = (
            array.coords["c"].values.tolist()
            if "c" in array.coords
            else list(range(data.shape[channel_axis]))
        )
        missing = [k for k in keys if k not in psf]
        if missing:
            raise PSFError(f"no PSF for channel(s) {missing}; give one for every 'c' value {keys}")
        psfs = [np.asarray(psf[k]) for k in keys]
    elif not isinstance(psf, np.ndarray):
        psfs = [np.asarray(p) for p in psf]
    if method == "ssi":
        options["model"] = resolve_model(options.get("model"), n_spatial)
    result = deconvolve_stack(
        data,
        n_spatial,
        psfs,
        deconvolve=deconvolve,
        channel_axis=channel_axis,
        method=method,
        **options,
    )
    provenance: dict[str, Any] = {
        "version": __version__,
        "method": method,
        "psf": describe_psf(psfs)
        if isinstance(psfs, np.ndarray)
        else [describe_psf(p) for p in psfs],
    }
    if method == "ssi":
        from .ssi import model_hash  # noqa: PLC0415

        model = options["model"]
        provenance["model"] = {
            "sha256": model_hash(model),
            "halo": model.halo,
        }
    else:
        choices = getattr(result, "auto_choices", None)
        if choices:  # num_iter="auto": chosen per volume
            provenance["iterations"] = [choice.num_iter for choice in choices]
            provenance["auto_iterations"] = [choice.as_dict() for choice in choices]
        else:
            provenance["iterations"] = int(options["num_iter"])
    return xr.DataArray(
        result,
        dims=dims,
        coords=array.coords,
        name=array.name,
        attrs={**dict(array.attrs), "ssi_dask": provenance},
    )


def dataarray_image(array: Any, voxel_size: Sequence[float] | None = None) -> Any:
    """A DataArray with dims ``[t] [c] (z) y x`` seen as a one-level image for
    :func:`ssi_dask.run` (NumPy or Dask backed; channel names from the ``c`` coordinate)."""
    from .ome import OmeImage  # noqa: PLC0415

    dims = tuple(str(d) for d in array.dims)
    n_spatial = _check_dims(dims)
    kinds = {"t": "time", "c": "channel"}
    unit = {"unit": "micrometer"} if voxel_size else {}
    axes = [
        {"name": d, "type": kinds[d]} if d in kinds else {"name": d, "type": "space", **unit}
        for d in dims
    ]
    spatial = [float(v) for v in (voxel_size or (1.0,) * n_spatial)]
    attrs = {}
    if "c" in dims and "c" in array.coords:
        attrs["omero"] = {"channels": [{"label": str(v)} for v in array.coords["c"].values]}
    return OmeImage(
        path=None,
        version="0.5",
        axes=axes,
        level=0,
        level_path="",
        scale=[1.0] * (len(dims) - n_spatial) + spatial,
        translation=[0.0] * len(dims),
        array=array.data,
        n_levels=1,
        level_shapes=[tuple(int(s) for s in array.shape)],
        attrs=attrs,
        is_ome=False,
    )
