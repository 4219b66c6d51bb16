"""A napari widget that deconvolves an image layer with Lucy-Richardson or SSI.

The work is :func:`deconvolve_layer` (no Qt: testable headless); the widget is a magicgui
``magic_factory`` around it that runs in a background thread (the viewer stays responsive)
and adds the result as a new layer when done. It computes in this process (Dask's threads)
or on a running Dask scheduler (``tcp://host:8786``), reporting chunks done as a napari
progress bar.
"""

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari

Progress = Callable[[int, int], None]
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssi-dask-napari")


def _compute(lazy: Any, scheduler: str | None, progress: Progress | None) -> np.ndarray:
    """Compute a lazy Dask array, calling ``progress(chunks_done, chunks_total)``."""
    import math  # noqa: PLC0415

    total = math.prod(lazy.numblocks)
    if progress is not None:
        progress(0, total)
    if scheduler:
        from distributed import Client, as_completed, futures_of  # noqa: PLC0415

        with Client(scheduler, timeout=10) as client:
            persisted = client.persist(lazy)
            for done, _ in enumerate(as_completed(futures_of(persisted)), 1):
                if progress is not None:
                    progress(done, total)
            return np.asarray(persisted.compute())
    # in this process: block by block (each on Dask's threads), so that progress counts chunks
    out = np.empty(lazy.shape, dtype=lazy.dtype)
    starts = [np.cumsum((0, *sizes)) for sizes in lazy.chunks]
    for done, index in enumerate(np.ndindex(*lazy.numblocks), 1):
        region = tuple(slice(s[i], s[i + 1]) for s, i in zip(starts, index))
        out[region] = lazy.blocks[index].compute(scheduler="threads")
        if progress is not None:
            progress(done, total)
    return out


def deconvolve_layer(
    data: Any,
    *,
    method: str = "lr",
    psf: str | os.PathLike | None = None,
    iterations: int = 10,
    model: str | os.PathLike | None = None,
    scheduler: str | None = None,
    name: str = "image",
    scale: Any = None,
    progress: Progress | None = None,
) -> tuple:
    """Deconvolve an image layer's data; returns napari layer data ``(data, kwargs, "image")``.

    Parameters
    ----------
    data : array-like
        The layer's 2D or 3D data.
    method : {"lr", "ssi"}
        Lucy-Richardson, or a trained SSI network.
    psf : path, optional
        PSF file (needed for ``lr``; for ``ssi`` the checkpoint's PSF is used without one).
    iterations : int
        Lucy-Richardson iterations.
    model : path, optional
        SSI checkpoint (``ssi-dask train``); without one, a network is trained on the layer.
    scheduler : str, optional
        Address of a Dask scheduler; computed in this process without one.
    name, scale :
        The source layer's name and scale (the new layer keeps the scale).
    progress : callable, optional
        ``progress(chunks_done, chunks_total)``.
    """
    import ssi_dask  # noqa: PLC0415
    from ssi_dask.errors import ParameterError  # noqa: PLC0415

    image = np.asarray(data, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ParameterError(f"the layer must be 2D or 3D, got shape {image.shape}")
    checkpoint = None
    if method == "ssi" and model:
        from ssi_dask.ssi import load_checkpoint  # noqa: PLC0415

        checkpoint = load_checkpoint(model)
    if psf:
        kernel = ssi_dask.load_psf(psf, ndim=image.ndim)
    elif checkpoint is not None:
        kernel = checkpoint.psf
    else:
        raise ParameterError("give a PSF file (psf=) for this method")
    if method == "lr":
        lazy = ssi_dask.deconvolve(image, kernel, method="lr", num_iter=int(iterations))
        what = f"LR {int(iterations)}"
    elif method == "ssi":
        if checkpoint is None:
            checkpoint = ssi_dask.train(image, kernel, seed=0)
        lazy = ssi_dask.deconvolve(image, kernel, method="ssi", model=checkpoint)
        what = "SSI"
    else:
        raise ParameterError(f"method must be 'lr' or 'ssi', got {method!r}")
    result = _compute(lazy, scheduler or None, progress)
    metadata = {"ssi_dask": dict(getattr(lazy, "ssi_dask_provenance", {}) or {})}
    metadata["ssi_dask"].update(method=method, source_layer=name, scheduler=scheduler or None)
    kwargs: dict[str, Any] = {"name": f"{name} ({what})", "metadata": metadata}
    if scale is not None:
        kwargs["scale"] = scale
    return result, kwargs, "image"


def _run_in_background(layer: "napari.layers.Image", **options: Any) -> Future:
    from napari.utils import progress as napari_progress  # noqa: PLC0415

    def work():
        bar = napari_progress(total=0, desc=f"ssi-dask {options['method']}")
        try:

            def report(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            return deconvolve_layer(
                layer.data, name=layer.name, scale=tuple(layer.scale), progress=report, **options
            )
        finally:
            bar.close()

    return _POOL.submit(work)


def _factory():
    import napari  # noqa: PLC0415  (the annotations below are evaluated here)
    from magicgui import magic_factory  # noqa: PLC0415

    @magic_factory(
        call_button="Deconvolve",
        method={"choices": ["lr", "ssi"]},
        psf={"label": "PSF file", "mode": "r"},
        model={"label": "SSI model (optional)", "mode": "r"},
        iterations={"min": 0, "max": 1000},
        scheduler={"label": "Dask scheduler (empty: here)"},
    )
    def deconvolve_widget(
        layer: napari.layers.Image,
        method: str = "lr",
        psf: Path = Path(),
        iterations: int = 10,
        model: Path = Path(),
        scheduler: str = "",
    ) -> Future[napari.types.LayerDataTuple]:
        return _run_in_background(
            layer,
            method=method,
            psf=psf if str(psf) not in ("", ".") else None,
            iterations=iterations,
            model=model if str(model) not in ("", ".") else None,
            scheduler=scheduler.strip() or None,
        )

    return deconvolve_widget


def __getattr__(name: str) -> Any:
    # the magicgui factory is built on first use, so that importing this module (and testing
    # deconvolve_layer) needs neither magicgui nor napari
    if name == "deconvolve_widget":
        return _factory()
    raise AttributeError(name)
