"""The PSF forward operator in torch (FFT-based, 2D and 3D).

In training, the network sees a patch of side P; its prediction is blurred with the PSF and
compared to the measurement only where the blur has full context: the *valid* part of the linear
convolution, i.e. the patch interior cropped by the PSF radius on each side. A circular FFT
convolution of size P is exact there (the wrap-around only reaches the cropped border), so no
padding is needed and the cost is one rFFT pair per patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PSFOperator"]


class PSFOperator:
    """Convolution with a fixed PSF, evaluated on the valid interior of a patch.

    Parameters
    ----------
    psf : array-like
        Kernel with ``ndim`` dimensions (odd sides; an even side is padded by one zero).
    device : torch.device or str
        Where the kernel's transforms live.
    """

    def __init__(self, psf, device="cpu"):
        psf = np.asarray(psf, dtype=np.float32)
        pad = [(0, 1 - s % 2) for s in psf.shape]
        if any(p[1] for p in pad):
            psf = np.pad(psf, pad)
        self.psf = psf
        self.ndim = psf.ndim
        self.radius = tuple(s // 2 for s in psf.shape)
        self.device = torch.device(device)
        self._kernel = torch.from_numpy(psf).to(self.device)
        self._otf_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _otf(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        otf = self._otf_cache.get(shape)
        if otf is None:
            if any(s < k for s, k in zip(shape, self.psf.shape)):
                raise ValueError(f"patch {shape} is smaller than the PSF {self.psf.shape}")
            dims = tuple(range(-self.ndim, 0))
            otf = torch.fft.rfftn(self._kernel, s=shape, dim=dims)
            self._otf_cache[shape] = otf
        return otf

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """Linear convolution of ``x`` (``(..., *spatial)``) with the PSF, valid part only.

        Output spatial size is ``P - K + 1`` per axis, aligned with the input cropped by the
        PSF radius (the input position ``i + radius`` for output ``i``).
        """
        x = x.float()
        spatial = x.shape[-self.ndim :]
        dims = tuple(range(-self.ndim, 0))
        y = torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * self._otf(spatial), s=spatial, dim=dims)
        # circular result index n = linear index n; valid linear indices are K-1 .. P-1
        sl = tuple(slice(k - 1, s) for k, s in zip(self.psf.shape, spatial))
        return y[(Ellipsis, *sl)]

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Crop ``x`` by the PSF radius on each side: the region that :meth:`valid` covers."""
        sl = tuple(
            slice(r, s - (k - 1 - r))
            for r, k, s in zip(self.radius, self.psf.shape, x.shape[-self.ndim :])
        )
        return x[(Ellipsis, *sl)]

    def same(self, x: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
        """'Same'-size convolution with ``mode`` padding (used by the J-invariant LR baseline)."""
        pad = []
        for r, k in zip(reversed(self.radius), reversed(self.psf.shape)):
            pad += [r, k - 1 - r]
        shape = x.shape
        lead = shape[: -self.ndim]
        x4 = x.reshape(-1, 1, *shape[-self.ndim :])
        xp = torch.nn.functional.pad(x4.float(), pad, mode=mode if mode != "zeros" else "constant")
        return self.valid(xp).reshape(*lead, *shape[-self.ndim :])

    def same_transpose(self, x: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
        """'Same'-size correlation with the PSF (the adjoint, up to boundary handling)."""
        flipped = PSFOperator(np.flip(self.psf).copy(), self.device)
        return flipped.same(x, mode)
