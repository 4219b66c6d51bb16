"""Random patches from any array-like (NumPy, Zarr, Dask), reading only what is needed.

The sampler never loads the whole image: each patch is read with a tuple of slices and converted
with ``np.asarray`` (which computes a Dask slice or reads the Zarr chunks it touches).
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError

__all__ = [
    "PatchSampler",
    "inside_mask",
    "read_padded",
    "read_region",
    "sample_statistics",
    "sample_values",
]


def read_region(array, origin, shape) -> np.ndarray:
    """Read ``array[origin : origin + shape]`` as float32 NumPy."""
    sl = tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, shape))
    return np.asarray(array[sl], dtype=np.float32)


def read_padded(array, origin, shape, fill: float) -> np.ndarray:
    """Like :func:`read_region`, for a region that may reach past the array's edges: the part
    outside holds ``fill``."""
    size = array.shape
    lo = [min(max(int(o), 0), n) for o, n in zip(origin, size)]
    hi = [max(min(int(o) + int(p), n), low) for o, p, n, low in zip(origin, shape, size, lo)]
    inner = read_region(array, lo, [h - low for low, h in zip(lo, hi)])
    pad = [(low - int(o), int(o) + int(p) - h) for low, h, o, p in zip(lo, hi, origin, shape)]
    if not any(a or b for a, b in pad):
        return inner
    return np.pad(inner, pad, mode="constant", constant_values=np.float32(fill))


def inside_mask(origin, shape, image_shape) -> np.ndarray:
    """Boolean mask of the positions of a patch at ``origin`` that lie inside the image."""
    axes = [
        (np.arange(int(o), int(o) + int(p)) >= 0) & (np.arange(int(o), int(o) + int(p)) < int(n))
        for o, p, n in zip(origin, shape, image_shape)
    ]
    mask = np.ones(tuple(int(p) for p in shape), dtype=bool)
    for axis, keep in enumerate(axes):
        mask &= keep.reshape([-1 if a == axis else 1 for a in range(len(axes))])
    return mask


class PatchSampler:
    """Draws random patch origins uniformly over the image and reads the patches.

    Parameters
    ----------
    array : array-like
        Anything with ``.shape`` and NumPy-style slice indexing.
    patch_shape : sequence of int
        Patch size per axis (clipped to the image size).
    seed : int
        Seed of the origin generator.
    overhang : sequence of int, optional
        How far a patch may reach past the image's edges, per axis; the part outside holds
        ``fill``. Default: none, every patch lies inside the image.
    fill : float
        The value outside the image.
    """

    def __init__(self, array, patch_shape, seed: int = 0, overhang=None, fill: float = 0.0):
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        if len(patch_shape) != len(self.shape):
            raise ParameterError(
                f"patch shape {tuple(patch_shape)} does not match image shape {self.shape}"
            )
        self.patch_shape = tuple(min(int(p), s) for p, s in zip(patch_shape, self.shape))
        overhang = (0,) * len(self.shape) if overhang is None else tuple(overhang)
        self.overhang = tuple(max(0, int(h)) for h in overhang)
        self.fill = float(fill)
        self.rng = np.random.default_rng(seed)

    def origins(self, n: int) -> np.ndarray:
        return np.stack(
            [
                self.rng.integers(-h, s - p + 1 + h, size=n)
                for s, p, h in zip(self.shape, self.patch_shape, self.overhang)
            ],
            axis=1,
        )

    def read(self, origin) -> np.ndarray:
        if not any(self.overhang):
            return read_region(self.array, origin, self.patch_shape)
        return read_padded(self.array, origin, self.patch_shape, self.fill)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random patches, shape ``(n, *patch_shape)``, and their origins."""
        origins = self.origins(n)
        return np.stack([self.read(o) for o in origins]), origins


def sample_values(array, n_patches: int = 64, patch_side: int = 64, seed: int = 0) -> np.ndarray:
    """Finite values of the image from ``n_patches`` random patches (all of it when smaller)."""
    ndim = len(array.shape)
    n_total = int(np.prod(array.shape))
    if n_total <= n_patches * patch_side**ndim:
        values = np.asarray(array, dtype=np.float32).ravel()
    else:
        sampler = PatchSampler(array, (patch_side,) * ndim, seed=seed)
        values, _ = sampler.batch(n_patches)
        values = values.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ParameterError("the image has no finite values to normalise with")
    return values


def sample_statistics(
    array, percentiles=(0.1, 99.9), n_patches: int = 64, patch_side: int = 64, seed: int = 0
) -> tuple[float, float]:
    """Robust low/high percentiles of the image from ``n_patches`` random patches."""
    values = sample_values(array, n_patches, patch_side, seed)
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi)
