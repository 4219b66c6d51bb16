"""Deconvolve an image with time and/or channel axes one 2D/3D volume at a time.

The leading (non-spatial) axes are looped over; each volume is deconvolved by the function
the caller passes (:func:`ssi_dask.blockwise.deconvolve`) with its channel's PSF and the
results are stacked back lazily, so the output has the input's axes and every task still covers
one spatial chunk of one volume. The function is passed in, not imported, so that the imports
point one way (``blockwise -> xarray_support -> multivolume``). ``ssi_dask.pipeline`` builds
its own stack, with one plan for every volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np

from .errors import PSFError


def deconvolve_stack(
    data: da.Array,
    n_spatial: int,
    psfs: np.ndarray | Sequence[np.ndarray],
    *,
    deconvolve: Callable[..., da.Array],
    channel_axis: int | None = None,
    **options: Any,
) -> da.Array:
    """Deconvolve every spatial volume of ``data`` and stack the results.

    Parameters
    ----------
    data : dask.array.Array
        Image whose last ``n_spatial`` axes are space (``z, y, x`` or ``y, x``); the axes
        before them (time, channel) are looped over.
    n_spatial : {2, 3}
        Number of spatial axes.
    psfs : numpy.ndarray or sequence of numpy.ndarray
        One PSF for every volume, or one per index along ``channel_axis``.
    deconvolve : callable
        The per-volume deconvolution, :func:`ssi_dask.blockwise.deconvolve`
        (``deconvolve(volume, psf, **options)``).
    channel_axis : int, optional
        Position of the channel axis among the leading axes when ``psfs`` is a sequence.
    **options
        Passed to ``deconvolve`` (``method``, ``num_iter``,
        ``chunks``, ``depth``, ``model``, ``device``...).

    Returns
    -------
    dask.array.Array
        float32, same shape as ``data``; chunk size 1 along the leading axes.
    """
    lead_shape = tuple(int(s) for s in data.shape[: data.ndim - n_spatial])
    per_channel = not isinstance(psfs, np.ndarray)
    if per_channel:
        psfs = list(psfs)
        n_channels = lead_shape[channel_axis] if channel_axis is not None else 1
        if len(psfs) == 1:
            psfs = psfs * n_channels
        if channel_axis is None or len(psfs) != n_channels:
            raise PSFError(
                f"got {len(psfs)} PSFs for {n_channels} channels; give one PSF, or one per "
                "channel in channel order"
            )
    if not lead_shape:
        single = deconvolve(data, psfs[0] if per_channel else psfs, **options)
        if getattr(single, "auto_choice", None) is not None:
            single.auto_choices = [single.auto_choice]
        return single
    volumes = {}
    for index in itertools.product(*(range(n) for n in lead_shape)):
        psf = psfs[index[channel_axis]] if per_channel else psfs
        volumes[index] = deconvolve(data[index], psf, **options)
    stacked = _stack_nested(volumes, lead_shape)
    choices = [getattr(v, "auto_choice", None) for v in volumes.values()]
    if any(choice is not None for choice in choices):  # num_iter="auto", in C order of volumes
        stacked.auto_choices = choices
    return stacked


def _stack_nested(volumes: dict, lead_shape: tuple[int, ...], prefix: tuple = ()) -> da.Array:
    if len(prefix) == len(lead_shape):
        return volumes[prefix]
    return da.stack(
        [_stack_nested(volumes, lead_shape, (*prefix, i)) for i in range(lead_shape[len(prefix)])],
        axis=0,
    )
