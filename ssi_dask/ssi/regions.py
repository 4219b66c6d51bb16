"""Training regions sampled from a large image, held in memory, and patches drawn from them.

A :class:`RegionPool` is what SSI trains on when the image is larger than memory: a few regions
read from anywhere in the volume (see :func:`ssi_dask.training.sample_regions`), each with its
global origin. Patches are drawn inside one region at a time, and their origins are reported in
the *global* coordinates of the volume, so the deterministic validation pixels
(:func:`ssi_dask.ssi.masking.validation_mask`) are the same as when training on the whole image.

Pure in-memory code: no Dask, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ParameterError
from .sampler import read_padded

__all__ = ["RegionPool", "RegionPatchSampler", "background_scores"]


def background_scores(regions: Sequence[np.ndarray], percentile: float = 99.0) -> np.ndarray:
    """Intensity score of each region: its ``percentile``-th percentile (bright content)."""
    return np.array([float(np.percentile(r, percentile)) for r in regions], dtype=np.float64)


class RegionPool:
    """Regions of one image with their global origins, ready for patch sampling.

    Parameters
    ----------
    regions : sequence of numpy.ndarray
        The regions (all with the same shape), as read from the image.
    origins : sequence of sequence of int
        Global origin (first voxel) of each region in the image.
    image_shape : sequence of int
        Shape of the whole image the regions come from.
    statistics_values : numpy.ndarray, optional
        Values from which the normalisation percentiles are computed (default: all voxels of
        the regions). :func:`ssi_dask.training.sample_regions` passes the voxels of every
        candidate region, background ones included, so the statistics describe the volume.
    info : dict, optional
        How the regions were sampled (stored in the checkpoint's training record).

    Attributes
    ----------
    shape : tuple of int
        The shape of each region: the largest patch that can be drawn. SSI training reads
        ``len(pool.shape)`` as the image dimensionality and clips its patch size to it.
    """

    def __init__(
        self,
        regions: Sequence[np.ndarray],
        origins: Sequence[Sequence[int]],
        image_shape: Sequence[int],
        statistics_values: np.ndarray | None = None,
        info: dict | None = None,
    ):
        if len(regions) == 0:
            raise ParameterError("a region pool needs at least one region")
        if len(regions) != len(origins):
            raise ParameterError(f"{len(regions)} regions but {len(origins)} origins")
        shapes = {tuple(r.shape) for r in regions}
        if len(shapes) != 1:
            raise ParameterError(f"all regions must have the same shape, got {sorted(shapes)}")
        self.regions = [np.ascontiguousarray(r, dtype=np.float32) for r in regions]
        self.origins = np.asarray(origins, dtype=np.int64).reshape(len(regions), -1)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.shape = tuple(int(s) for s in self.regions[0].shape)
        if self.origins.shape[1] != len(self.shape) or len(self.image_shape) != len(self.shape):
            raise ParameterError(
                f"origins/image shape {self.image_shape} do not match {len(self.shape)}D regions"
            )
        for o in self.origins:
            if any(
                int(v) < 0 or int(v) + s > n for v, s, n in zip(o, self.shape, self.image_shape)
            ):
                raise ParameterError(f"region at {tuple(o)} lies outside the image")
        self._stat_values = statistics_values
        self.info = dict(info or {})

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def sample_values(self) -> np.ndarray:
        """The finite values the pool's statistics come from (global samples, or the regions)."""
        values = self._stat_values
        if values is None:
            values = np.concatenate([r.ravel() for r in self.regions])
        values = np.asarray(values, dtype=np.float32).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ParameterError("the sampled regions have no finite values to normalise with")
        return values

    def statistics(self, percentiles=(0.1, 99.9)) -> tuple[float, float]:
        """Low/high percentiles used to normalise the network's input (global, from samples)."""
        lo, hi = np.percentile(self.sample_values(), percentiles)
        return float(lo), float(hi)

    def patch_sampler(
        self, patch_shape: Sequence[int], seed: int = 0, overhang=None, fill: float = 0.0
    ) -> RegionPatchSampler:
        """A sampler of random patches of ``patch_shape`` from these regions (``overhang``,
        ``fill``: past the volume's edges, as in :class:`~ssi_dask.ssi.sampler.PatchSampler`)."""
        return RegionPatchSampler(self, patch_shape, seed=seed, overhang=overhang, fill=fill)


class RegionPatchSampler:
    """Random patches from a :class:`RegionPool`; same interface as ``PatchSampler``.

    Each patch lies inside one region (chosen uniformly); :meth:`batch` returns the patches and
    their global origins. With ``overhang``, a patch of a region that touches the volume's edge
    may reach past that edge by up to ``overhang`` voxels (never past a region's inner side),
    and holds ``fill`` there.
    """

    def __init__(
        self,
        pool: RegionPool,
        patch_shape: Sequence[int],
        seed: int = 0,
        overhang=None,
        fill: float = 0.0,
    ):
        if len(patch_shape) != pool.ndim:
            raise ParameterError(
                f"patch shape {tuple(patch_shape)} does not match {pool.ndim}D regions"
            )
        self.pool = pool
        self.patch_shape = tuple(min(int(p), s) for p, s in zip(patch_shape, pool.shape))
        overhang = (0,) * pool.ndim if overhang is None else tuple(overhang)
        self.overhang = tuple(max(0, int(h)) for h in overhang)
        self.fill = float(fill)
        self.rng = np.random.default_rng(seed)

    def _local_range(self, region: int, axis: int) -> tuple[int, int]:
        """Lowest and one past the highest local origin of a patch of ``region`` on ``axis``."""
        start = int(self.pool.origins[region][axis])
        size, patch = self.pool.shape[axis], self.patch_shape[axis]
        h = self.overhang[axis]
        low = -h if start == 0 else 0
        high = size - patch + 1 + (h if start + size == self.pool.image_shape[axis] else 0)
        return low, high

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random patches, shape ``(n, *patch_shape)``, and their global origins."""
        which = self.rng.integers(0, len(self.pool), size=n)
        if any(self.overhang):
            local = np.array(
                [
                    [
                        self.rng.integers(*self._local_range(int(i), a))
                        for a in range(self.pool.ndim)
                    ]
                    for i in which
                ],
                dtype=np.int64,
            ).reshape(n, self.pool.ndim)
            patches = np.stack(
                [
                    read_padded(self.pool.regions[i], loc, self.patch_shape, self.fill)
                    for i, loc in zip(which, local)
                ]
            )
            return patches, self.pool.origins[which] + local
        highs = [s - p + 1 for s, p in zip(self.pool.shape, self.patch_shape)]
        local = np.stack([self.rng.integers(0, h, size=n) for h in highs], axis=1)
        patches = np.stack(
            [
                self.pool.regions[i][
                    tuple(slice(int(o), int(o) + p) for o, p in zip(loc, self.patch_shape))
                ]
                for i, loc in zip(which, local)
            ]
        )
        return patches, self.pool.origins[which] + local
