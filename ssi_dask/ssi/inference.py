"""The inference copy of an SSI network: same outputs (to float rounding), less compute.

:func:`inference_network` returns an eval-mode copy of a trained :class:`~ssi_dask.ssi.UNet`
(or ensemble) in which

- each BatchNorm is folded into the convolution before it (``fuse_conv_bn_eval``);
- on the CPU, every convolution calls oneDNN directly in the channels-last memory format
  (:class:`_InferenceConv`): PyTorch's own choice between oneDNN and its reference kernel is
  tuned on 2D sizes and takes the slow reference kernel for 3D inputs with few channels and a
  batch of one;
- on the CPU, each decoder's first convolution, ``conv(cat([skip, upsample(coarse)]))``, is
  computed as ``conv_skip(skip) + conv_up(upsample(coarse))`` with the second term evaluated on
  the coarse grid, one small kernel per output parity (:class:`_UpConcatConv`): nearest
  up-sampling repeats each coarse value 2x(2x2), so a 3-tap kernel on the fine grid is a 2-tap
  kernel on the coarse grid for each parity, 8/27 of the multiply-adds in 3D, and neither the
  up-sampled tensor nor the concatenation is built.

All three are exact rewrites (the same sums in another order). The trained network is never
changed (training and checkpoints keep its weights); the copy is cached per network and rebuilt
when the network's weights or device change.
"""

from __future__ import annotations

import copy
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .forward import lucy_richardson_prior

__all__ = ["cpu_fast_convolutions", "inference_network", "memory_format"]

# network -> (key of its weights and device, the inference copy); entries go with the network
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_CONVS = (nn.Conv2d, nn.Conv3d)


def cpu_fast_convolutions() -> bool:
    """Whether this torch has oneDNN convolutions on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")


def memory_format(ndim: int, dev: torch.device) -> torch.memory_format:
    """The memory format the inference copy wants its input in."""
    if dev.type == "cpu" and cpu_fast_convolutions():
        return torch.channels_last if ndim == 2 else torch.channels_last_3d
    return torch.contiguous_format


def _convolve(x, weight, bias, padding) -> torch.Tensor:
    ones = (1,) * (x.ndim - 2)
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_fast_convolutions():
        return torch.mkldnn_convolution(x, weight, bias, padding, ones, ones, 1)
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    return conv(x, weight, bias, 1, padding)


class _InferenceConv(nn.Module):
    """A stride-1 convolution (BatchNorm folded in) run by oneDNN on the CPU."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.padding = tuple(conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _convolve(x, self.weight, self.bias, self.padding)


def _phase_taps(radius: int, parity: int) -> tuple[int, torch.Tensor]:
    """For a kernel of offsets ``-radius..radius`` applied to a nearest-2x-up-sampled signal at
    fine positions ``2m + parity``: the first coarse offset and the matrix that sums the kernel's
    taps falling on the same coarse sample (coarse taps x fine taps)."""
    lo, hi = (parity - radius) // 2, (parity + radius) // 2
    combine = torch.zeros(hi - lo + 1, 2 * radius + 1, dtype=torch.float64)
    for offset in range(-radius, radius + 1):
        combine[(parity + offset) // 2 - lo, offset + radius] = 1.0
    return lo, combine


class _UpConcatConv(nn.Module):
    """``conv(cat([skip, upsample2(coarse)]))`` without the up-sampling or the concatenation.

    The skip part is an ordinary convolution on the fine grid; the up-sampled part is, for each
    output parity, a small convolution of the coarse tensor (padded by ``pad``) whose result
    fills every second voxel along each axis.
    """

    def __init__(self, conv: nn.Module, skip_channels: int, layout: torch.memory_format):
        super().__init__()
        weight = conv.weight.detach().double()
        ndim = weight.ndim - 2
        radius = weight.shape[-1] // 2
        if (
            any(s != weight.shape[-1] for s in weight.shape[2:])
            or tuple(conv.padding) != (radius,) * ndim
        ):
            raise ValueError("_UpConcatConv needs a cubic kernel with 'same' padding")
        self.ndim = ndim
        self.pad = -(-radius // 2)
        self.padding = tuple(conv.padding)
        skip = weight[:, :skip_channels].float().contiguous(memory_format=layout)
        self.skip_weight = nn.Parameter(skip, requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        coarse = weight[:, skip_channels:]
        # one convolution for all parities: their kernels have radius + 1 taps per axis each
        # and start at different coarse offsets (``starts``), which become output offsets
        self.parities = list(itertools.product((0, 1), repeat=ndim))
        self.starts = []
        kernels = []
        for parity in self.parities:
            w, starts = coarse, []
            for axis, p in enumerate(parity):
                lo, combine = _phase_taps(radius, p)
                w = torch.movedim(torch.tensordot(w, combine, dims=([2 + axis], [1])), -1, 2 + axis)
                starts.append(self.pad + lo)
            kernels.append(w)
            self.starts.append(tuple(starts))
        joined = torch.cat(kernels).float().contiguous(memory_format=layout)
        self.parity_weight = nn.Parameter(joined, requires_grad=False)
        self.out_channels = weight.shape[0]

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        out = _convolve(skip, self.skip_weight, self.bias, self.padding)
        padded = F.pad(coarse, (self.pad,) * (2 * self.ndim))
        phases = _convolve(padded, self.parity_weight, None, (0,) * self.ndim)
        sizes, c = coarse.shape[2:], self.out_channels
        for i, (parity, starts) in enumerate(zip(self.parities, self.starts)):
            part = phases[(slice(None), slice(i * c, (i + 1) * c))]
            part = part[
                (slice(None), slice(None), *(slice(s, s + m) for s, m in zip(starts, sizes)))
            ]
            out[(slice(None), slice(None), *(slice(p, None, 2) for p in parity))] += part
        return out


class _SumPool(nn.Module):
    """2x(2x2) average pooling as a sum of strided views: keeps the channels-last layout, which
    ``avg_pool3d`` would copy to the default layout first."""

    def __init__(self, ndim: int):
        super().__init__()
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [s - s % 2 for s in x.shape[2:]]
        total = None
        for offsets in itertools.product((0, 1), repeat=self.ndim):
            view = x[(slice(None), slice(None), *(slice(o, n, 2) for o, n in zip(offsets, sizes)))]
            total = view.clone() if total is None else total.add_(view)
        return total.mul_(0.5**self.ndim)


class _InferenceUNet(nn.Module):
    """:class:`~ssi_dask.ssi.UNet`'s forward pass on an inference copy of its layers."""

    def __init__(self, net: nn.Module, layout: torch.memory_format):
        super().__init__()
        self.encoders = net.encoders
        self.prior_iterations = getattr(net, "prior_iterations", 0)
        self.prior_background = getattr(net, "prior_background", 0.0)
        self.prior_acceleration = getattr(net, "prior_acceleration", "none")
        self._prior = None
        if self.prior_iterations:
            self.register_buffer("prior_psf", net.prior_psf)
        self.pool = _SumPool(net.config["ndim"])
        self.head = net.head
        self.joins = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for dec in net.decoders:
            first = dec[0]
            skip_channels = first.weight.shape[1] - self._coarse_channels(net, len(self.joins))
            self.joins.append(_UpConcatConv(first, skip_channels, layout))
            self.decoders.append(nn.Sequential(*list(dec)[1:]))

    @staticmethod
    def _coarse_channels(net: nn.Module, index: int) -> int:
        # decoder `index` joins the skip of level L - 2 - index with the output one level down:
        # the bottom encoder's for the first decoder, the previous decoder's afterwards
        below = net.encoders[-1] if index == 0 else net.decoders[index - 1]
        return [m for m in below if isinstance(m, (*_CONVS, _InferenceConv))][-1].weight.shape[0]

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if self.prior_iterations:
            prior = lucy_richardson_prior(self, x) if prior is None else prior
            return prior + self._unet(torch.cat([x, prior.to(x.dtype)], dim=1))
        return self._unet(x)

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for join, dec in zip(self.joins, self.decoders):
            x = dec(join(skips.pop(), x))
        return self.head(x)


def _fold_batch_norms(net: nn.Module) -> None:
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], _CONVS) and isinstance(
                seq[i + 1], nn.modules.batchnorm._BatchNorm
            ):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()


def _cpu_rewrite(net: nn.Module, layout: torch.memory_format) -> nn.Module:
    """oneDNN convolutions and parity-split decoder joins (a UNet or each ensemble member)."""
    if hasattr(net, "members"):
        for i, member in enumerate(net.members):
            net.members[i] = _cpu_rewrite(member, layout)
        return net
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _CONVS):
                setattr(parent, name, _InferenceConv(child))
    net = net.to(memory_format=layout)
    return _InferenceUNet(net, layout) if len(net.decoders) else net


def inference_network(network: nn.Module, dev: torch.device) -> nn.Module:
    """The inference copy of ``network`` for device ``dev`` (see the module docstring).

    Cached per network: rebuilt when a weight or buffer of ``network`` changed in place (an
    optimiser step, ``load_state_dict``) or moved. On other devices than the CPU only the
    BatchNorm folding applies.
    """
    state = network.state_dict()
    key = (str(dev), tuple((t.data_ptr(), t._version) for t in state.values()))
    cached = _COPIES.get(network)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        fast = copy.deepcopy(network).eval()
        _fold_batch_norms(fast)
        layout = memory_format(network.config["ndim"], dev)
        if layout != torch.contiguous_format:
            fast = _cpu_rewrite(fast, layout)
        fast = fast.to(dev).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    _COPIES[network] = (key, fast)
    return fast
