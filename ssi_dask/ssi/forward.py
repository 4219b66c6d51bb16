"""The PSF forward operators of SSI training in torch (FFT-based, 2D and 3D).

``PSFOperator`` (``forward="valid"``): in training, the network sees a patch of side P; its
prediction is blurred with the PSF and compared to the measurement only where the blur has full
context: the *valid* part of the linear convolution, i.e. the patch interior cropped by the PSF
radius on each side. A circular FFT convolution of size P is exact there (the wrap-around only
reaches the cropped border), so no padding is needed and the cost is one rFFT pair per patch.

``SamePSFOperator`` (``forward="same"``) is for PSFs as large as the patches or the whole
volume (widefield PSFs whose tails reach across it), where no patch has a valid interior. The
estimate on the patch is convolved with the PSF by a *linear* FFT convolution (zero-extended,
no wrap-around), and the light the patch's surroundings would add is modelled by the patch's
mean intensity: predicted measurement ``h * (1_P f) + (1 - c) mean(f)``, with ``c = h * 1_P``
the share of each pixel's PSF that lies inside the patch. The loss is scored on the central
box where at least ``1 - tail`` of each axis's marginal PSF energy lies inside the patch
(never less than the central half of each side). Only the PSF's central ``2 P - 1`` voxels per
axis can reach a patch of side ``P``, so a larger PSF is cropped to that, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "LucyRichardsonPrior",
    "PSFOperator",
    "SamePSFOperator",
    "fits_valid",
    "forward_operator",
    "lucy_richardson_prior",
]


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
        self._flipped: PSFOperator | None = None

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
        # a circular convolution of any size F >= P is exact on the valid part: sizes with
        # large prime factors (a patch padded by the PSF, e.g. 94 = 2 x 47) are zero-extended
        # to the next 2^a 3^b 5^c, several times faster; other sizes are used as they are
        size = tuple(_fast_size(s) for s in spatial)
        f = torch.fft.rfftn(x, s=size, dim=dims) * self._otf(size)
        y = torch.fft.irfftn(f, s=size, dim=dims)
        # circular result index n = linear index n; valid linear indices are K-1 .. P-1
        sl = tuple(slice(k - 1, s) for k, s in zip(self.psf.shape, spatial))
        return y[(Ellipsis, *sl)]

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """Full linear convolution of ``x`` (``(..., *spatial)``) with the PSF: ``P + K - 1``
        per axis, output ``i`` holding input position ``i - (K - 1)``.

        Equal to :meth:`valid` of ``x`` zero-padded by ``K - 1`` on each side, at a third to
        a half of the FFT work: a circular convolution of size ``F >= P + K - 1`` has no
        wrap-around, so the FFTs run at ``P + K - 1`` (rounded up to a fast size) instead of
        ``P + 2 (K - 1)``.
        """
        x = x.float()
        spatial = x.shape[-self.ndim :]
        dims = tuple(range(-self.ndim, 0))
        out = tuple(s + k - 1 for s, k in zip(spatial, self.psf.shape))
        size = tuple(_fast_size(s) for s in out)
        y = torch.fft.irfftn(
            torch.fft.rfftn(x, s=size, dim=dims) * self._otf(size), s=size, dim=dims
        )
        return y[(Ellipsis, *(slice(0, s) for s in out))]

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
        if self._flipped is None:  # kept: its transforms are cached per size
            self._flipped = PSFOperator(np.flip(self.psf).copy(), self.device)
        return self._flipped.same(x, mode)


def fits_valid(patch_shape: Sequence[int], psf_shape: Sequence[int]) -> bool:
    """True when patches have a valid interior for the PSF (``P >= K + 4`` per axis)."""
    return all(int(p) >= int(k) + 4 for p, k in zip(patch_shape, psf_shape))


def _fast_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (a fast FFT size)."""
    best = None
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            size = p35
            while size < n:
                size *= 2
            best = size if best is None else min(best, size)
            p35 *= 3
        p5 *= 5
    return int(best)


class SamePSFOperator:
    """Linear ('same') convolution of a patch with a PSF as large as the patch or larger.

    Same interface as :class:`PSFOperator` as training uses it: :meth:`valid` gives the
    predicted measurement on the scored box and :meth:`crop` cuts the data to that box.

    Parameters
    ----------
    psf : array-like
        Kernel with ``ndim`` dimensions, any size (cropped to ``2 * patch - 1`` per axis).
    patch_shape : sequence of int
        Size of the training patches.
    device : torch.device or str
        Where the transforms live.
    tail : float
        Marginal PSF energy per axis allowed outside the patch at a scored pixel.
    """

    def __init__(self, psf, patch_shape: Sequence[int], device="cpu", tail: float = 0.05):
        psf = np.asarray(psf, dtype=np.float32)
        patch_shape = tuple(int(p) for p in patch_shape)
        self.ndim = psf.ndim
        self.patch_shape = patch_shape
        pad = [(0, 1 - s % 2) for s in psf.shape]
        if any(p[1] for p in pad):
            psf = np.pad(psf, pad)
        # only offsets up to P - 1 from the centre reach a patch of side P
        sl = tuple(
            slice(max(k // 2 - (p - 1), 0), k // 2 + min(p - 1, k // 2) + 1)
            for k, p in zip(psf.shape, patch_shape)
        )
        self.psf = np.ascontiguousarray(psf[sl])
        self.device = torch.device(device)
        self.radius = tuple(k // 2 for k in self.psf.shape)
        self._fft_shape = tuple(_fast_size(p + k - 1) for p, k in zip(patch_shape, self.psf.shape))
        self._dims = tuple(range(-self.ndim, 0))
        kernel = torch.from_numpy(self.psf).to(self.device)
        self._kernel_otf = torch.fft.rfftn(kernel, s=self._fft_shape, dim=self._dims)
        self._flipped_otf = torch.fft.rfftn(
            torch.flip(kernel, dims=self._dims), s=self._fft_shape, dim=self._dims
        )
        self._otf_cache: dict[tuple[int, ...], torch.Tensor] = {}
        # scored box: per axis, the margin beyond which the marginal PSF's one-sided tail
        # outside the patch is below `tail` (at most a quarter of the side)
        margins = []
        for ax, p in enumerate(patch_shape):
            other = tuple(i for i in range(self.ndim) if i != ax)
            marginal = self.psf.sum(axis=other) if other else self.psf
            marginal = marginal / marginal.sum()
            r = len(marginal) // 2
            m = 0
            while m < p // 4:
                # a pixel m from the patch edge misses the PSF beyond m on that side
                beyond = max(marginal[: max(r - m, 0)].sum(), marginal[r + m + 1 :].sum())
                if beyond <= tail:
                    break
                m += 1
            margins.append(m)
        self.margins = tuple(margins)
        ones = torch.ones((1, 1, *patch_shape), device=self.device)
        self.coverage = self._conv(ones, self._kernel_otf)[0, 0]

    def _conv(self, x: torch.Tensor, otf: torch.Tensor) -> torch.Tensor:
        """Linear convolution of ``x`` (``(..., *patch)``) with the kernel of ``otf``, 'same'."""
        spatial = x.shape[-self.ndim :]
        y = torch.fft.irfftn(
            torch.fft.rfftn(x.float(), s=self._fft_shape, dim=self._dims) * otf,
            s=self._fft_shape,
            dim=self._dims,
        )
        sl = tuple(slice(r, r + s) for r, s in zip(self.radius, spatial))
        return y[(Ellipsis, *sl)]

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-self.ndim :]) != self.patch_shape:
            raise ValueError(
                f"the operator is built for patches {self.patch_shape}, got {tuple(x.shape)}"
            )

    def same(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Predicted measurement on the whole patch: the blurred patch plus the mean's share."""
        self._check(x)
        blurred = self._conv(x, self._kernel_otf)
        mean = x.float().mean(dim=self._dims, keepdim=True)
        return blurred + (1 - self.coverage) * mean

    def same_transpose(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Correlation with the PSF on the patch, normalised by its response to ones."""
        self._check(x)
        return self._conv(x, self._flipped_otf) / self._conv(
            torch.ones_like(x), self._flipped_otf
        ).clamp_min(1e-6)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted measurement on the scored box (aligned with :meth:`crop`)."""
        return self.crop(self.same(x))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Crop ``x`` to the scored box."""
        sl = tuple(slice(m, s - m) for m, s in zip(self.margins, x.shape[-self.ndim :]))
        return x[(Ellipsis, *sl)]

    def _otf(self, shape: Sequence[int]) -> torch.Tensor:
        """The OTF on a ``shape`` grid of the PSF cropped to it (its modulus is what is used)."""
        shape = tuple(int(s) for s in shape)
        otf = self._otf_cache.get(shape)
        if otf is None:
            sl = tuple(
                slice(max(k // 2 - s // 2, 0), max(k // 2 - s // 2, 0) + min(s, k))
                for k, s in zip(self.psf.shape, shape)
            )
            kernel = torch.from_numpy(np.ascontiguousarray(self.psf[sl])).to(self.device)
            otf = torch.fft.rfftn(kernel, s=shape, dim=self._dims)
            self._otf_cache[shape] = otf
        return otf


def forward_operator(psf, patch_shape: Sequence[int], device="cpu", mode: str = "auto"):
    """The forward operator of SSI training for ``mode`` (``"auto"``, ``"valid"``, ``"same"``).

    ``"auto"`` is ``"valid"`` when the patches are larger than the PSF (:func:`fits_valid`),
    else ``"same"``. Returns ``(operator, resolved mode)``.
    """
    psf = np.asarray(psf, dtype=np.float32)
    if mode == "auto":
        mode = "valid" if fits_valid(patch_shape, psf.shape) else "same"
    if mode == "valid":
        return PSFOperator(psf, device), mode
    if mode == "same":
        return SamePSFOperator(psf, patch_shape, device), mode
    raise ValueError(f"forward must be 'auto', 'valid' or 'same', got {mode!r}")


class LucyRichardsonPrior:
    """Lucy-Richardson estimates of a normalised batch, the prior channel of an SSI network.

    The network of a model trained with ``lr_prior`` sees, besides its (masked) input, the
    Lucy-Richardson restoration of that input after ``iterations`` steps, and predicts a
    correction to it. As in :func:`ssi_dask.lr.richardson_lucy`, the estimate lives on the
    block extended by the PSF's radius, the data term covers the block only, and the update is
    divided by the Bertero-Boccacci edge weights ``h^T 1_block``, so a block's border (a patch's,
    a chunk's halo's or the volume's) is treated as unknown object rather than mirrored.
    Computed without gradients, in float32.

    Parameters
    ----------
    psf : array-like
        The PSF (``ndim`` dimensions, normalised to sum 1 here).
    iterations : int
        Lucy-Richardson iterations (>= 1).
    device : torch.device or str
        Where the PSF's transforms live.
    edge_threshold : float
        Edge weights below this share of their maximum count as no data (estimate 0 there).
    background : float
        The data's zero level (the background): the estimate is that of ``x - background``
        (negative values clipped at 0), plus ``background``.
    acceleration : {"none", "nesterov"}
        As ``acceleration`` of :meth:`ssi_dask.lr.RLPlan.deconvolve`: iteration ``n`` starts
        from ``max(x + (n - 2) / (n + 1) * (x - x_previous), 0)``.
    """

    def __init__(
        self,
        psf,
        iterations: int,
        device="cpu",
        edge_threshold: float = 1e-3,
        background: float = 0.0,
        acceleration: str = "none",
    ):
        self.background = float(background)
        self.acceleration = acceleration
        psf = np.asarray(psf, dtype=np.float32)
        self.op = PSFOperator(psf / psf.sum(), device)
        self.flipped = PSFOperator(np.flip(self.op.psf).copy(), device)
        self.iterations = int(iterations)
        self.edge_threshold = float(edge_threshold)

    def _back_project(self, ratio: torch.Tensor) -> torch.Tensor:
        # the adjoint of `valid`: a full correlation, from the block to the extended block
        return self.flipped.full(ratio)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The prior of the batch ``x`` (``(N, 1, *spatial)``).

        ``hidden`` (boolean, ``x``'s shape): pixels that count as not measured, as the masked
        pixels of a training step. They get no weight in the data term (their ratio is not
        formed and the edge weights become ``h^T 1_visible``), so the prior does not depend
        on their values at all, and it is not biased by a guess put in their place.
        """
        eps = 1e-6
        nd = self.op.ndim
        dims = tuple(range(-nd, 0))
        y = (x.float() - self.background).clamp_min(0) + eps
        weights = self._back_project(torch.ones_like(y[:1]))
        floor = self.edge_threshold * weights.amax()
        valid = weights > floor
        visible = None
        if hidden is not None:
            visible = (~hidden).to(y.dtype)
            y = y * visible
            weights = self._back_project(visible)  # per sample: h^T 1_visible
        weights = torch.where(valid, weights.clamp_min(floor), torch.ones_like(weights))
        ext = [s + k - 1 for s, k in zip(y.shape[-nd:], self.op.psf.shape)]
        if visible is None:
            start = y.mean(dim=dims, keepdim=True)
        else:
            start = y.sum(dim=dims, keepdim=True) / visible.sum(dim=dims, keepdim=True).clamp_min(1)
        est = start.expand(*y.shape[:-nd], *ext) * valid
        previous = None
        for n in range(1, self.iterations + 1):
            point = est
            if previous is not None and self.acceleration == "nesterov" and n > 2:
                point = (est + (n - 2) / (n + 1) * (est - previous)).clamp_min(0)
            ratio = y / self.op.valid(point).clamp_min(eps)  # 0 at hidden pixels: y is 0 there
            previous, est = est, point * self._back_project(ratio) / weights
        return self.op.crop(est) + self.background


def prior_network(net: torch.nn.Module) -> torch.nn.Module:
    """The network that holds the prior's settings: ``net``, or an ensemble's first member
    (its members share the prior)."""
    members = getattr(net, "members", None)
    return net if members is None else members[0]


def lucy_richardson_prior(
    net: torch.nn.Module, x: torch.Tensor, hidden: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The prior channel of ``net`` (a UNet, an ensemble of them, or an inference copy) for
    the batch ``x`` (``hidden``: pixels that count as not measured, see
    :class:`LucyRichardsonPrior`); None for a network without a prior."""
    net = prior_network(net)
    iterations = getattr(net, "prior_iterations", 0)
    if not iterations:
        return None
    psf = net.prior_psf
    background = float(getattr(net, "prior_background", 0.0))
    acceleration = getattr(net, "prior_acceleration", "none")
    # rebuilt when the buffer moved or changed (load_state_dict copies into it in place)
    version = 0 if psf.is_inference() else psf._version
    key = (str(psf.device), psf.data_ptr(), version, background, acceleration)
    cached = net._prior
    if cached is None or cached[0] != key:
        prior = LucyRichardsonPrior(
            psf.detach().cpu().numpy(),
            iterations,
            psf.device,
            background=background,
            acceleration=acceleration,
        )
        cached = (key, prior)
        net._prior = cached
    return cached[1](x, hidden)
