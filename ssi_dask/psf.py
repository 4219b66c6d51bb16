"""Point spread functions: load, validate, normalise, crop, and generate from optics.

A PSF here is a NumPy float32 array with the same number of dimensions as the image it
applies to, non-negative, finite, summing to 1. Axis order follows the image (``z, y, x`` in 3D).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .config import PSF_ENERGY_FRACTION
from .errors import ParameterError, PSFError

PSF_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")
PROTOCOL_PSF_FILE = "protocol_psf_17.npy"


def validate_psf(psf: np.ndarray, ndim: int | None = None, *, name: str = "PSF") -> None:
    """Check that ``psf`` can be used as a convolution kernel.

    Parameters
    ----------
    psf : numpy.ndarray
        Candidate kernel.
    ndim : int, optional
        Required number of dimensions (that of the image).
    name : str
        How to call the PSF in error messages (e.g. its file name).

    Raises
    ------
    PSFError
        When the PSF is empty, has NaN/Inf, negative values, a zero sum, or the wrong
        number of dimensions.
    """
    psf = np.asarray(psf)
    if psf.size == 0 or psf.ndim == 0:
        raise PSFError(f"{name} is empty; give a 2D or 3D kernel array")
    if not np.issubdtype(psf.dtype, np.number) or np.iscomplexobj(psf):
        raise PSFError(f"{name} has dtype {psf.dtype}; a PSF must hold real numbers")
    if not np.all(np.isfinite(psf)):
        raise PSFError(f"{name} contains NaN or Inf values; fix or regenerate the PSF")
    if np.any(psf < 0):
        raise PSFError(
            f"{name} has negative values (min {float(psf.min()):.3g}); "
            "subtract the background and clip at 0 before using it"
        )
    if float(psf.sum()) <= 0:
        raise PSFError(f"{name} sums to zero; it must contain a non-zero kernel")
    if ndim is not None and psf.ndim != ndim:
        raise PSFError(
            f"{name} has {psf.ndim} dimensions but the image has {ndim}; "
            f"give a {ndim}D PSF (e.g. `ssi-dask psf --shape` with {ndim} sizes)"
        )


def normalize_psf(psf: np.ndarray) -> np.ndarray:
    """Return ``psf`` as float32 scaled to sum to 1 (validated first)."""
    validate_psf(psf)
    psf64 = np.asarray(psf, dtype=np.float64)
    return (psf64 / psf64.sum()).astype(np.float32)


def crop_psf(psf: np.ndarray, threshold: float = 1e-4, *, keep_odd: bool = True) -> np.ndarray:
    """Crop a PSF to its support, keeping it centred on its brightest voxel.

    The support is the bounding box of voxels above ``threshold * psf.max()``; it is made
    symmetric about the peak so that the kernel's centre does not move, and (with
    ``keep_odd``) every side has odd length.

    Parameters
    ----------
    psf : numpy.ndarray
        Non-negative kernel.
    threshold : float
        Relative level below which voxels count as outside the support.
    keep_odd : bool
        Make every side odd so the centre is a voxel.

    Returns
    -------
    numpy.ndarray
        The cropped kernel (not renormalised).
    """
    psf = np.asarray(psf)
    validate_psf(psf)
    peak = np.unravel_index(int(np.argmax(psf)), psf.shape)
    support = psf > threshold * psf.max()
    slices = []
    for axis, centre in enumerate(peak):
        other_axes = tuple(a for a in range(psf.ndim) if a != axis)
        inside = np.flatnonzero(support.any(axis=other_axes))
        radius = int(max(centre - inside.min(), inside.max() - centre))
        low, high = centre - radius, centre + radius + 1
        if low < 0 or high > psf.shape[axis]:
            # The peak is off-centre in the array: keep what exists on that axis.
            low, high = max(low, 0), min(high, psf.shape[axis])
        if not keep_odd:
            low, high = int(inside.min()), int(inside.max()) + 1
        slices.append(slice(low, high))
    return psf[tuple(slices)]


def load_psf(path: str | os.PathLike, ndim: int | None = None, *, crop: bool = True) -> np.ndarray:
    """Load a PSF from ``.tif``/``.tiff``/``.npy``/``.zarr``, validate and normalise it.

    Parameters
    ----------
    path : str or path-like
        File (or Zarr array directory) holding the kernel.
    ndim : int, optional
        Number of dimensions the image has; singleton axes are squeezed to match.
    crop : bool
        Crop to the support (see :func:`crop_psf`).

    Returns
    -------
    numpy.ndarray
        float32 kernel summing to 1.
    """
    path = Path(path)
    name = f"PSF file {str(path)!r}"
    if not path.exists():
        raise PSFError(f"{name} does not exist; check the path given to psf=")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile  # noqa: PLC0415

            psf = tifffile.imread(path)
        elif suffix == ".npy":
            psf = np.load(path, allow_pickle=False)
        elif suffix == ".zarr" or (path / ".zarray").exists() or (path / "zarr.json").exists():
            import zarr  # noqa: PLC0415

            node = zarr.open(str(path), mode="r")
            if not hasattr(node, "shape"):
                raise PSFError(f"{name} is a Zarr group, not an array; point psf= at the array")
            psf = np.asarray(node[...])
        else:
            raise PSFError(
                f"{name} has unsupported type {suffix!r}; use one of {', '.join(PSF_SUFFIXES)}"
            )
    except PSFError:
        raise
    except Exception as exc:  # unreadable or corrupt file
        raise PSFError(f"{name} could not be read ({type(exc).__name__}: {exc})") from None
    psf = np.asarray(psf)
    if ndim is not None and psf.ndim > ndim:
        squeezed = np.squeeze(psf)
        if squeezed.ndim == ndim:
            psf = squeezed
    validate_psf(psf, ndim, name=name)
    if crop:
        psf = crop_psf(psf)
    return normalize_psf(psf)


def save_psf(path: str | os.PathLike, psf: np.ndarray, voxel_size: Sequence[float] | None = None):
    """Write a PSF to ``.tif``/``.tiff`` (with voxel size metadata) or ``.npy``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile  # noqa: PLC0415

        metadata = {"axes": "ZYX"[-psf.ndim :], "written_by": "ssi-dask"}
        if voxel_size is not None:
            metadata["voxel_size_um"] = [float(v) for v in voxel_size]
        tifffile.imwrite(path, np.asarray(psf, dtype=np.float32), metadata=metadata)
    elif suffix == ".npy":
        np.save(path, np.asarray(psf, dtype=np.float32))
    else:
        raise PSFError(f"cannot write a PSF to {suffix!r}; use .tif, .tiff or .npy")


def psf_written_by_ssi_dask(path: str | os.PathLike) -> bool:
    """True for a TIFF that :func:`save_psf` wrote (its metadata says so)."""
    import tifffile  # noqa: PLC0415

    try:
        with tifffile.TiffFile(path) as tif:
            metadata = tif.shaped_metadata or ()
    except Exception:
        return False
    return any(isinstance(m, dict) and m.get("written_by") == "ssi-dask" for m in metadata)


def widefield_psf(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    *,
    na: float,
    wavelength: float,
    refractive_index: float = 1.33,
    sample_index: float | None = None,
    z_offset: float = 0.0,
    model: str = "scalar",
) -> np.ndarray:
    """Widefield PSF from optics (Gibson-Lanni model through ``psfmodels``).

    Parameters
    ----------
    shape : sequence of int
        ``(nz, ny, nx)`` for a 3D stack, or ``(ny, nx)`` for a single 2D plane at
        ``z_offset`` from focus. Lateral sizes must be equal and odd.
    voxel_size : sequence of float
        ``(dz, dy, dx)`` (3D) or ``(dy, dx)`` (2D) in micrometres; ``dy`` must equal ``dx``.
    na : float
        Numerical aperture of the objective.
    wavelength : float
        Emission wavelength in micrometres.
    refractive_index : float
        Immersion medium refractive index (the design value as well).
    sample_index : float, optional
        Sample refractive index; defaults to ``refractive_index`` (no aberration).
    z_offset : float
        For 2D: defocus of the plane in micrometres.
    model : {"scalar", "vectorial", "gaussian"}
        ``"scalar"`` is Gibson-Lanni; ``"vectorial"`` is Richards-Wolf with Gibson-Lanni
        aberrations; ``"gaussian"`` is a Gaussian approximation.

    Returns
    -------
    numpy.ndarray
        float32 kernel summing to 1.
    """
    import psfmodels  # noqa: PLC0415

    shape = tuple(int(s) for s in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(shape) not in (2, 3) or len(voxel_size) != len(shape):
        raise PSFError("give 2 or 3 sizes for --shape and as many for --voxel-size")
    if shape[-1] != shape[-2] or shape[-1] % 2 == 0:
        raise PSFError(f"lateral PSF sizes must be equal and odd, got {shape[-2:]}")
    if voxel_size[-1] != voxel_size[-2]:
        raise PSFError(f"lateral voxel sizes must be equal, got {voxel_size[-2:]}")
    if not 0 < na < refractive_index:
        raise PSFError(
            f"NA {na} must be positive and below the refractive index {refractive_index}"
        )
    if wavelength <= 0 or min(voxel_size) <= 0:
        raise PSFError("wavelength and voxel sizes must be positive")
    ns = refractive_index if sample_index is None else sample_index
    optics = dict(NA=na, wvl=wavelength, ni=refractive_index, ni0=refractive_index, ns=ns)
    if len(shape) == 3:
        stack = psfmodels.make_psf(
            shape[0], shape[-1], dxy=voxel_size[-1], dz=voxel_size[0], model=model, **optics
        )
    else:
        stack = psfmodels.make_psf(
            [z_offset], shape[-1], dxy=voxel_size[-1], model=model, **optics
        )[0]
    return normalize_psf(np.clip(stack, 0, None))


# PSF_ENERGY_FRACTION (config): the share of a PSF's energy the default PSF shape holds.


def axial_extent(
    voxel_size: Sequence[float], na: float, wavelength: float, refractive_index: float = 1.33
) -> int:
    """Planes of a default 3D widefield PSF: +-3 n lambda / NA^2 (the main lobe and its first
    side lobes), odd, at least 3.

    A widefield PSF's energy is the same in every plane (out-of-focus light spreads, it does
    not vanish), so no finite z range holds 99 % of it; the axial size is this optical rule,
    and the energy criterion applies to the planes it keeps.
    """
    half = int(np.ceil(3.0 * refractive_index * wavelength / na**2 / float(voxel_size[0])))
    return max(2 * half + 1, 3)


def _reference_grid(
    voxel_size: Sequence[float], na: float, wavelength: float, refractive_index: float, nz: int
) -> int:
    """A lateral size large enough that a widefield PSF of ``nz`` planes keeps all but a
    negligible part of its energy on it: twice the widest defocus disc plus 3 lambda/NA."""
    z_max = (nz // 2) * float(voxel_size[0]) if len(voxel_size) == 3 else 0.0
    angle = np.arcsin(min(na / refractive_index, 0.999))
    radius = z_max * np.tan(angle) + 3.0 * wavelength / na
    return min(2 * int(np.ceil(2.0 * radius / float(voxel_size[-1]))) + 1, 1025)


def _box_energy(psf: np.ndarray) -> np.ndarray:
    """Energy inside centred lateral squares of half-size 0, 1, 2, ... (cumulative)."""
    plane = psf.sum(axis=0) if psf.ndim == 3 else psf
    c = plane.shape[-1] // 2
    yy, xx = np.indices(plane.shape)
    cheb = np.maximum(np.abs(yy - c), np.abs(xx - c))
    return np.cumsum(np.bincount(cheb.ravel(), weights=plane.ravel().astype(np.float64)))


def energy_psf_shape(
    voxel_size: Sequence[float],
    na: float,
    wavelength: float,
    refractive_index: float = 1.33,
    *,
    fraction: float = PSF_ENERGY_FRACTION,
    **optics,
) -> tuple[tuple[int, ...], float]:
    """The smallest odd lateral PSF size holding ``fraction`` of the energy, and that share.

    The PSF is computed on a large grid (:func:`widefield_psf`, ``optics`` passed on:
    ``sample_index``, ``z_offset``, ``model``); the lateral size is the smallest odd square
    that holds ``fraction`` of the energy of the planes kept (:func:`axial_extent` in 3D).

    Returns
    -------
    shape : tuple of int
        ``(nz, n, n)`` or ``(n, n)``.
    held : float
        The share of the large grid's energy the shape holds.
    """
    ndim = len(voxel_size)
    nz = axial_extent(voxel_size, na, wavelength, refractive_index) if ndim == 3 else 1
    side = _reference_grid(voxel_size, na, wavelength, refractive_index, nz)
    shape = (nz, side, side) if ndim == 3 else (side, side)
    big = widefield_psf(
        shape, voxel_size, na=na, wavelength=wavelength, refractive_index=refractive_index,
        **optics,
    )  # fmt: skip
    energy = _box_energy(big)
    half = int(np.searchsorted(energy, fraction * energy[-1]))
    half = max(min(half, side // 2), 1)
    lateral = 2 * half + 1
    return (*shape[:-2], lateral, lateral), float(energy[half] / energy[-1])


def energy_held(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    na: float,
    wavelength: float,
    refractive_index: float = 1.33,
    **optics,
) -> float:
    """The share of a widefield PSF's energy that a PSF of ``shape`` holds, measured against
    a large grid with at least the default planes (:func:`energy_psf_shape`)."""
    shape = tuple(int(s) for s in shape)
    nz = shape[0] if len(shape) == 3 else 1
    if len(shape) == 3:
        nz = max(nz, axial_extent(voxel_size, na, wavelength, refractive_index))
        nz += 1 - nz % 2
    side = max(_reference_grid(voxel_size, na, wavelength, refractive_index, nz), shape[-1])
    side += 1 - side % 2
    big_shape = (nz, side, side) if len(shape) == 3 else (side, side)
    big = widefield_psf(
        big_shape, voxel_size, na=na, wavelength=wavelength, refractive_index=refractive_index,
        **optics,
    )  # fmt: skip
    box = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(big_shape, shape))
    return float(big[box].sum() / big.sum())


def protocol_psf(ndim: int = 2) -> np.ndarray:
    """PSF of the benchmark protocol (METHOD.md section 4).

    Gibson-Lanni widefield model, NA 0.8, refractive index 1.33, wavelength 0.6 um,
    0.406 um voxels, a 17x17x17 stack. In 2D, plane 0 of that stack (about 3.2 um out of
    focus, a ring), normalised to sum 1; in 3D, the whole stack.

    The stack ships with the package (computed once with :func:`widefield_psf` and these
    optics; ``tests/test_psf.py`` checks it against a fresh computation), so benchmarks are
    reproducible across psfmodels versions and run where psfmodels is not installed.
    """
    stack = np.load(Path(__file__).with_name("data") / PROTOCOL_PSF_FILE)
    if ndim == 3:
        return stack
    if ndim == 2:
        return normalize_psf(stack[0])
    raise PSFError(f"protocol PSF exists in 2D and 3D, not {ndim}D")


def describe_psf(psf: np.ndarray) -> dict:
    """Short summary of a PSF for provenance: shape, peak position, a content hash."""
    import hashlib  # noqa: PLC0415

    psf32 = np.ascontiguousarray(psf, dtype=np.float32)
    return {
        "shape": list(psf32.shape),
        "sum": float(psf32.sum()),
        "peak_index": [int(i) for i in np.unravel_index(int(np.argmax(psf32)), psf32.shape)],
        "sha256": hashlib.sha256(psf32.tobytes()).hexdigest()[:16],
    }


def blur(image: ArrayLike, psf: ArrayLike) -> NDArray[np.float32]:
    """Convolve ``image`` with ``psf``: linear convolution, zero padding, 'same' output size.

    Computed with :func:`scipy.signal.fftconvolve` (``mode="same"``) in float64 and cast to
    float32. The PSF is used as given (normalise it to unit sum beforehand to preserve flux).
    For an odd-sized PSF the output pixel ``i`` is centred on PSF element ``psf.shape // 2``.

    Parameters
    ----------
    image : array_like
        Image or volume (2D or 3D).
    psf : array_like
        Point spread function with the same number of dimensions as ``image``.

    Returns
    -------
    numpy.ndarray
        Blurred image, float32, same shape as ``image``.

    Raises
    ------
    ParameterError
        If ``image`` and ``psf`` differ in dimensionality or the PSF is empty.
    """
    import scipy.signal  # noqa: PLC0415

    img = np.asarray(image, dtype=np.float64)
    kernel = np.asarray(psf, dtype=np.float64)
    if img.ndim != kernel.ndim:
        raise ParameterError(f"image is {img.ndim}D but the PSF is {kernel.ndim}D; they must match")
    if kernel.size == 0:
        raise ParameterError("the PSF is empty")
    return scipy.signal.fftconvolve(img, kernel, mode="same").astype(np.float32)
