"""A small 2D/3D UNet for SSI, and its exact receptive field.

Design (chosen for CPU speed and an affordable chunk halo):

- ``levels`` resolution levels, each with two 3x3(x3) convolutions (+ optional BatchNorm, ReLU);
- down-sampling by 2x2(x2) *average* pooling, up-sampling by nearest neighbour, skip connections by
  concatenation, a 1x1 output convolution with no activation;
- average pooling (not max pooling) keeps the network's dependence on every input pixel of its
  receptive field, so the gradient-based test of :func:`receptive_field_radius` is exact.

The network is not shift-equivariant for shifts that are not multiples of ``2 ** (levels - 1)``
(the pooling grid): tiled or chunked application must start tiles on that grid (see
:attr:`UNet.alignment`) and pad each tile's end up to a multiple of it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..errors import ParameterError
from ..lr import _check_acceleration, lr_default_depth
from .forward import lucy_richardson_prior

__all__ = ["EnsembleUNet", "UNet", "build_network", "receptive_field_radius"]


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(ndim: int):
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


class _DoubleConv(nn.Sequential):
    def __init__(self, ndim: int, cin: int, cout: int, batch_norm: bool, kernel_size: int):
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            layers.append(
                _conv(ndim)(c_in, cout, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
            )
            if batch_norm:
                layers.append(_norm(ndim)(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """UNet for 2D or 3D single-channel images.

    Parameters
    ----------
    ndim : {2, 3}
        Number of spatial dimensions.
    levels : int
        Number of resolution levels (1 = no down-sampling). Checkpoints written before the
        name was ``levels`` call it ``depth`` (:func:`build_network` reads both).
    base_channels : int
        Channels at the finest level; doubled at each coarser level up to ``max_channels``.
    max_channels : int
        Cap on the number of channels.
    batch_norm : bool
        BatchNorm after each convolution (folded into an affine map in eval mode).
    kernel_size : int
        Odd convolution kernel size (3 by default).
    prior_iterations : int
        Lucy-Richardson iterations of the prior channel (0: no prior; see ``lr_prior`` of
        :class:`~ssi_dask.config.TrainingRecipe`).
    prior_psf_shape : tuple of int
        Shape of the prior's PSF (held in the ``prior_psf`` buffer).
    prior_background : float
        The data's zero for the prior, in normalised units: the prior is the Lucy-Richardson
        restoration of the input minus this level, plus it.
    prior_acceleration : {"none", "nesterov"}
        The prior's iterations (``acceleration`` of :meth:`ssi_dask.lr.RLPlan.deconvolve`).
    """

    def __init__(
        self,
        ndim: int = 2,
        levels: int = 3,
        base_channels: int = 16,
        max_channels: int = 64,
        batch_norm: bool = True,
        kernel_size: int = 3,
        prior_iterations: int = 0,
        prior_psf_shape=None,
        prior_background: float = 0.0,
        prior_acceleration: str = "none",
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ParameterError(f"ndim must be 2 or 3, got {ndim}")
        if levels < 1 or base_channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ParameterError(
                "levels and base_channels must be >= 1 and kernel_size odd, got "
                f"levels={levels}, base_channels={base_channels}, kernel_size={kernel_size}"
            )
        self.config = dict(
            ndim=int(ndim),
            levels=int(levels),
            base_channels=int(base_channels),
            max_channels=int(max_channels),
            batch_norm=bool(batch_norm),
            kernel_size=int(kernel_size),
        )
        self.prior_iterations = int(prior_iterations)
        self.prior_background = float(prior_background)
        self.prior_acceleration = _check_acceleration(prior_acceleration)
        self._prior = None
        if self.prior_iterations:
            # recorded only when used: older models' configs stay as they were
            shape = tuple(int(s) for s in prior_psf_shape)
            self.config.update(prior_iterations=self.prior_iterations, prior_psf_shape=shape)
            if self.prior_background:
                self.config["prior_background"] = self.prior_background
            if self.prior_acceleration != "none":
                self.config["prior_acceleration"] = self.prior_acceleration
            self.register_buffer("prior_psf", torch.zeros(shape))
        chans = [min(base_channels * 2**i, max_channels) for i in range(levels)]
        self.encoders = nn.ModuleList()
        cin = 2 if self.prior_iterations else 1
        for c in chans:
            self.encoders.append(_DoubleConv(ndim, cin, c, batch_norm, kernel_size))
            cin = c
        self.decoders = nn.ModuleList()
        for level in range(levels - 2, -1, -1):
            self.decoders.append(
                _DoubleConv(
                    ndim, chans[level] + chans[level + 1], chans[level], batch_norm, kernel_size
                )
            )
        self.head = _conv(ndim)(chans[0], 1, 1)
        if self.prior_iterations:  # the correction starts at zero: the output at the prior
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.pool = nn.AvgPool2d(2) if ndim == 2 else nn.AvgPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    @property
    def ndim(self) -> int:
        return self.config["ndim"]

    @property
    def alignment(self) -> int:
        """Tiles must start on multiples of this and have sizes that are multiples of it."""
        return 2 ** (self.config["levels"] - 1)

    @property
    def receptive_field_radius(self) -> int:
        """Exact one-sided receptive-field radius in pixels (worst case over positions)."""
        return receptive_field_radius(self)

    @property
    def halo(self) -> int:
        """Chunk halo that makes chunked application equal whole-image application.

        The receptive-field radius rounded up to a multiple of :attr:`alignment`; with a
        Lucy-Richardson prior, plus :attr:`prior_margin` (chunked application then agrees with
        whole-image application to that halo's tolerance, not exactly).
        """
        a = self.alignment
        return -(-(self.receptive_field_radius + self.prior_margin) // a) * a

    @property
    def edge_halo(self) -> int:
        """The halo an axis held in one chunk needs: the network's alone (rounded up to
        :attr:`alignment`). There the halo only mirrors the volume's edges, and a
        Lucy-Richardson prior is computed on the volume's part of a block, so its margin is
        needed only between chunks."""
        a = self.alignment
        return -(-self.receptive_field_radius // a) * a

    @property
    def prior_margin(self) -> int:
        """Context the Lucy-Richardson prior needs around a block (0 without a prior): the
        Lucy-Richardson chunk halo of :func:`ssi_dask.lr.lr_default_depth`."""
        if not self.prior_iterations:
            return 0
        return max(
            lr_default_depth(
                self.config["prior_psf_shape"],
                self.prior_iterations,
                acceleration=self.prior_acceleration,
            )
        )

    def prior(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """The Lucy-Richardson prior channel of a batch (None without ``prior_iterations``);
        ``hidden`` pixels count as not measured (a training step's masked pixels)."""
        return lucy_richardson_prior(self, x, hidden)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior_iterations:
            prior = self.prior(x) if prior is None else prior
            return prior + self._unet(torch.cat([x, prior.to(x.dtype)], dim=1))
        return self._unet(x)

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for dec in self.decoders:
            x = dec(torch.cat([skips.pop(), self.up(x)], dim=1))
        return self.head(x)


class EnsembleUNet(nn.Module):
    """Mean of the outputs of several :class:`UNet` of the same architecture.

    Independently trained SSI networks agree on what the PSF transmits (the data fix it) and
    disagree, noise-like, on what it barely transmits (only the penalties constrain it), so their
    mean keeps the first and attenuates the second. Same receptive field, halo and alignment as
    one member; ``members`` times the inference compute.

    Parameters
    ----------
    members : int
        Number of networks.
    **config
        :class:`UNet` architecture shared by the members.
    """

    def __init__(self, members: int = 2, **config):
        super().__init__()
        if int(members) < 1:
            raise ParameterError(f"an ensemble needs at least one member, got {members}")
        self.members = nn.ModuleList(UNet(**config) for _ in range(int(members)))
        self.config = dict(self.members[0].config, members=int(members))

    ndim = UNet.ndim
    alignment = UNet.alignment
    receptive_field_radius = UNet.receptive_field_radius
    halo = UNet.halo
    edge_halo = UNet.edge_halo
    prior_margin = UNet.prior_margin

    @property
    def prior_iterations(self) -> int:
        return self.members[0].prior_iterations

    @property
    def prior_background(self) -> float:
        return self.members[0].prior_background

    @property
    def prior_acceleration(self) -> str:
        return self.members[0].prior_acceleration

    def prior(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """The Lucy-Richardson prior channel (the members share it)."""
        return lucy_richardson_prior(self, x, hidden)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior_iterations and prior is None:
            prior = self.prior(x)
        total = None
        for member in self.members:
            y = member(x, prior=prior)
            total = y if total is None else total + y
        return total / len(self.members)


def build_network(config: dict) -> nn.Module:
    """The network a config describes: a :class:`UNet`, or an :class:`EnsembleUNet` when the
    config has ``members`` (> 1)."""
    config = dict(config)
    if "depth" in config:  # checkpoints written before the UNet's levels were named so
        config["levels"] = config.pop("depth")
    members = int(config.pop("members", 1))
    return EnsembleUNet(members, **config) if members > 1 else UNet(**config)


@lru_cache(maxsize=64)
def _radius(levels: int, kernel_size: int) -> int:
    """Exact receptive-field radius of the UNet above, by interval propagation in 1D.

    Separable structure: the dependence along each axis is an interval [lo(i), hi(i)] of input
    positions for output position i; it is periodic in i with period 2 ** (levels - 1).
    """
    k = kernel_size // 2  # radius of one convolution
    conv2 = 2 * k  # two convolutions per block

    def interval(level: int, i: int) -> tuple[int, int]:
        # Sub-network from `level` downwards: input and output at that level's resolution.
        if level == levels - 1:  # bottom: one double conv
            return i - conv2, i + conv2
        lo, hi = None, None
        for j in range(i - conv2, i + conv2 + 1):  # decoder double conv
            a, b = j - conv2, j + conv2  # skip branch: encoder double conv
            sa, sb = interval(level + 1, j // 2)  # coarse branch at j // 2 (nearest up-sampling)
            # coarse positions [sa, sb] <- pooled encoder output <- encoder at [2sa, 2sb + 1]
            a = min(a, 2 * sa - conv2)
            b = max(b, 2 * sb + 1 + conv2)
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
        return lo, hi

    period = 2 ** (levels - 1)
    radius = 0
    for i in range(period, 2 * period):
        lo, hi = interval(0, i)
        radius = max(radius, i - lo, hi - i)
    return radius


def receptive_field_radius(model) -> int:
    """Exact receptive-field radius (pixels, one side) of a :class:`UNet` or an SSI model."""
    net = getattr(model, "network", model)
    cfg = net.config
    return _radius(cfg["levels"], cfg["kernel_size"])


class SSIModel:
    """A trained SSI network with everything needed to apply it.

    Attributes
    ----------
    network : UNet or EnsembleUNet
        The network (kept on the CPU between uses; moved to the inference device on demand).
    normalisation : dict
        ``offset`` and ``scale`` (network input = (image - offset) / scale) and ``output_range``
        (the clip range of the output, in normalised units).
    psf : numpy.ndarray
        The PSF the model was trained for.
    training : dict
        The training settings.
    log : list of dict
        Training history (one entry per evaluation) and the run summaries.
    """

    def __init__(
        self,
        network: UNet,
        normalisation: dict,
        psf,
        training: dict | None = None,
        log: list | None = None,
    ):
        import numpy as np  # noqa: PLC0415

        self.network = network
        self.normalisation = {
            "offset": float(normalisation["offset"]),
            "scale": float(normalisation["scale"]),
            "output_range": tuple(float(v) for v in normalisation.get("output_range", (0.0, 1.0))),
        }
        self.psf = np.asarray(psf, dtype=np.float32)
        self.training = dict(training or {})
        self.log = list(log or [])

    @property
    def config(self) -> dict:
        return dict(self.network.config)

    @property
    def ndim(self) -> int:
        return self.network.ndim

    @property
    def receptive_field_radius(self) -> int:
        return receptive_field_radius(self.network)

    @property
    def halo(self) -> int:
        return self.network.halo

    @property
    def edge_halo(self) -> int:
        return self.network.edge_halo

    @property
    def alignment(self) -> int:
        return self.network.alignment

    @property
    def symmetries(self) -> list:
        """PSF symmetries (flip axes, swap) averaged at inference."""
        sym = self.training.get("symmetries")
        return [((), False)] if not sym else [(tuple(f), bool(w)) for f, w in sym]

    @property
    def edge_fill(self) -> float | None:
        """What the volume holds past its edges at inference, in image units: the background
        level (the normalisation's offset) for a model trained with ``edges="background"``,
        None for one trained inside the volume (the volume is mirrored there)."""
        edges = self.training.get("edges")
        if isinstance(edges, dict) and edges.get("mode") == "background":
            return float(self.normalisation["offset"])
        return None

    @property
    def value_range(self) -> tuple[float, float]:
        """Clip range of the output in image units."""
        lo, hi = self.normalisation["output_range"]
        o, s = self.normalisation["offset"], self.normalisation["scale"]
        return lo * s + o, hi * s + o

    def predict(self, image, **kwargs):
        """Restore ``image`` (see :func:`ssi_dask.ssi.predict`)."""
        from .predict import predict  # noqa: PLC0415

        return predict(self, image, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        members = f" x{c['members']}" if c.get("members", 1) > 1 else ""
        return (
            f"SSIModel({c['ndim']}D UNet{members} levels={c['levels']} "
            f"base_channels={c['base_channels']}, halo={self.halo}, psf={tuple(self.psf.shape)})"
        )


def _register_sizeof() -> None:
    """Tell Dask how big a model is (weights + PSF), for its memory and transfer accounting."""
    from dask.sizeof import sizeof  # noqa: PLC0415

    @sizeof.register(SSIModel)
    def _sizeof_model(model: SSIModel) -> int:
        weights = sum(t.numel() * t.element_size() for t in model.network.state_dict().values())
        return int(weights + model.psf.nbytes + 1024)


_register_sizeof()
