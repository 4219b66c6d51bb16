"""J-invariant pixel masking.

Each training step hides a random pixel set J (Bernoulli with density ``rho``). Hidden pixels are
replaced by the mean of their *visible* neighbours (normalised convolution with a ring kernel that
excludes the centre), so the masked input holds no information about the value of any pixel of J
(neighbours that are also hidden do not contribute), while the input statistics stay close to
those of the unmasked image seen at inference (unlike zero filling).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["bernoulli_mask", "mask_input", "rho_schedule", "validation_mask"]


def bernoulli_mask(shape, rho: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Boolean tensor of ``shape`` with each element True with probability ``rho``."""
    u = torch.rand(shape, generator=generator, device="cpu")
    return (u < rho).to(device)


def mask_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the pixels of ``x`` where ``mask`` is True by the mean of visible neighbours.

    ``x`` and ``mask`` have shape ``(N, 1, *spatial)``; 2D uses the 8-neighbourhood, 3D the
    26-neighbourhood. Where every neighbour is hidden too, the value is 0.
    """
    ndim = x.dim() - 2
    keep = (~mask).to(x.dtype)
    kernel = torch.ones((1, 1) + (3,) * ndim, dtype=x.dtype, device=x.device)
    kernel[(0, 0) + (1,) * ndim] = 0
    conv = F.conv2d if ndim == 2 else F.conv3d
    num = conv(x * keep, kernel, padding=1)
    den = conv(keep, kernel, padding=1)
    fill = num / den.clamp_min(1e-6) * (den > 0)
    return torch.where(mask, fill, x)


def rho_schedule(
    step: int,
    total_steps: int,
    start: float = 0.5,
    target: float = 0.1,
    decay_fraction: float = 0.3,
) -> float:
    """Masking density: exponential decay from ``start`` to ``target``.

    The density reaches ``target`` (to 1 %) after ``decay_fraction`` of the steps. The reference
    code decays by ``rho <- 0.005 target + 0.995 rho`` per step, which with a fixed step budget
    is the same law with a time constant of 200 steps.
    """
    if start <= target or decay_fraction <= 0:
        return target
    tau = max(decay_fraction * total_steps / math.log(100.0), 1e-9)
    return target + (start - target) * math.exp(-step / tau)


_PRIMES = (np.uint64(73856093), np.uint64(19349663), np.uint64(83492791))


def validation_mask(origin, shape, density: float, seed: int) -> np.ndarray:
    """Deterministic held-out pixel set, a function of global coordinates only.

    Any patch anywhere in the image gets the same validation pixels whatever the order or size
    of reads, without ever storing an image-sized mask.
    """
    # int64 first: a patch reaching past the image's edge has negative coordinates there
    grids = np.meshgrid(
        *[
            np.arange(int(o), int(o) + s, dtype=np.int64).astype(np.uint64)
            for o, s in zip(origin, shape)
        ],
        indexing="ij",
    )
    h = np.full(tuple(shape), np.uint64(seed * 2654435761 + 12345) & np.uint64(2**32 - 1))
    with np.errstate(over="ignore"):
        for g, p in zip(grids, _PRIMES[-len(shape) :]):
            h = (h ^ (g * p)) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
    return (h % np.uint64(1_000_000)).astype(np.float64) < density * 1_000_000
