"""SSI inference: a pure per-array kernel and tiled whole-image prediction.

``predict_block`` is the per-chunk kernel (array in, array out). Used inside
``dask.array.map_overlap`` it needs ``depth = model.halo`` and chunk sizes that are multiples of
``model.alignment`` so that every block starts on the network's pooling grid; then the chunked
result equals the whole-image result (up to float rounding).

``predict`` restores an in-memory image: it pads the image by the halo (reflect, or the
background level for a model trained with ``edges="background"``), cuts tiles on
the pooling grid, runs each tile with its halo, and keeps the tile centres. Because the halo is at
least the receptive-field radius, tiling changes nothing.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..errors import ParameterError
from .device import resolve_device
from .forward import lucy_richardson_prior
from .inference import inference_network, memory_format
from .symmetry import apply as apply_transform
from .symmetry import invert as invert_transform
from .symmetry import resolve_tta, tta_transforms

__all__ = ["predict", "predict_block", "run_network"]

#: Run inference on the network's inference copy (:func:`~ssi_dask.ssi.inference.
#: inference_network`: BatchNorm folded, oneDNN convolutions and parity-split decoder joins on
#: the CPU); False runs the network as trained (benchmarks and tests compare the two).
FAST_INFERENCE = True


def _autocast(dev: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and amp)


@torch.inference_mode()
def run_network(
    network,
    blocks: np.ndarray,
    dev: torch.device,
    amp: bool = False,
    transforms=None,
    priors: np.ndarray | None = None,
) -> np.ndarray:
    """Run the network on a batch of normalised blocks ``(N, *spatial)``.

    With ``transforms`` (PSF symmetries), the result is the average over the transforms of the
    network applied to the transformed block, transformed back (test-time averaging).

    Each spatial size is padded at its *end* (reflect) up to a multiple of the network's
    alignment, which keeps the pooling grid anchored at the block origin; the padding is cropped.

    A network in eval mode runs as its inference copy
    (:func:`~ssi_dask.ssi.inference.inference_network`; equal outputs to float rounding)
    unless :data:`FAST_INFERENCE` is False.

    A network with a Lucy-Richardson prior (``lr_prior``) computes it on each block, unless
    ``priors`` (same shape as ``blocks``) gives it, e.g. computed on a larger region.
    """
    a = network.alignment
    spatial = blocks.shape[1:]
    pad = [(0, 0)] + [(0, (-s) % a) for s in spatial]
    if any(p[1] for p in pad):
        mode = "reflect" if all(s > p[1] for s, p in zip(spatial, pad[1:])) else "edge"
        blocks = np.pad(blocks, pad, mode=mode)
        priors = None if priors is None else np.pad(priors, pad, mode=mode)
    x = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))[:, None].to(dev)
    prior = None
    if priors is not None:
        prior = torch.from_numpy(np.ascontiguousarray(priors, dtype=np.float32))[:, None]
        prior = prior.to(dev)
    transforms = transforms or [((), False)]
    fast = FAST_INFERENCE and not network.training
    if fast:
        network = inference_network(network, dev)
    layout = memory_format(x.ndim - 2, dev) if fast else torch.contiguous_format
    acc = None
    for t in transforms:
        with _autocast(dev, amp):
            xt = apply_transform(x, t).contiguous(memory_format=layout)
            if prior is None:
                y = network(xt)
            else:
                y = network(xt, prior=apply_transform(prior, t).contiguous(memory_format=layout))
            y = invert_transform(y, t).float()
        acc = y if acc is None else acc + y
    y = (acc / len(transforms))[:, 0].cpu().numpy()
    return y[(slice(None), *[slice(0, s) for s in spatial])]


def _prepare(model, device):
    dev = resolve_device(device)
    net = model.network
    if next(net.parameters()).device != dev:
        net = net.to(dev)
        model.network = net
    net.eval()
    return net, dev


def _normalise(model, x):
    n = model.normalisation
    return (np.asarray(x, dtype=np.float32) - np.float32(n["offset"])) / np.float32(n["scale"])


def _denormalise(model, y):
    n = model.normalisation
    lo, hi = n["output_range"]
    y = np.clip(y, lo, hi)
    return (y * np.float32(n["scale"]) + np.float32(n["offset"])).astype(np.float32)


def test_time_transforms(model, tta) -> list:
    """The PSF symmetries averaged at inference for ``tta`` (see :func:`predict`)."""
    return tta_transforms(model.symmetries, resolve_tta(tta, model.ndim), model.ndim)


def predict_block(model, block, device="auto", amp: bool = False, tta=None) -> np.ndarray:
    """Apply a trained model to one block (e.g. a chunk with its halo); same shape out.

    Normalises with the stored statistics, runs the network, undoes the normalisation and clips
    to the model's value range. Pure: no I/O, no global state.
    """
    net, dev = _prepare(model, device)
    x = _normalise(model, block)
    transforms = test_time_transforms(model, tta)
    return _denormalise(model, run_network(net, x[None], dev, amp, transforms)[0])


def predict(
    model,
    image,
    tile_shape=None,
    device="auto",
    batch_size: int = 1,
    amp: bool = False,
    tta: int | bool | None = None,
) -> np.ndarray:
    """Restore an in-memory 2D/3D image with a trained SSI model.

    Parameters
    ----------
    model : SSIModel
        Trained model (see :func:`train_ssi`, :func:`load_checkpoint`).
    image : array-like
        Image with the model's number of dimensions.
    tile_shape : int or sequence of int, optional
        Size of the kept part of each tile (rounded up to the alignment); the network runs on
        ``tile + 2 * halo``. Default: the whole image in one tile.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    batch_size : int
        Tiles per network call.
    amp : bool
        bfloat16 autocast on CUDA (faster, agrees with float32 to about 1e-2).
    tta : int, bool or None
        Test-time transforms: the network's outputs on 1, 2, 4, 8 or 16 of the PSF's
        symmetries (flips / axis swaps, a subgroup: :func:`~ssi_dask.ssi.symmetry.tta_transforms`)
        are averaged, at that many times the compute; fewer when the PSF has fewer
        symmetries. Averaging reduces null-space artefacts. None: the default per
        dimensionality (:data:`ssi_dask.config.SSI_TTA_DEFAULTS`, chosen by
        ``benchmarks/ssi_tta.py``); True: all (16); False: 1.

    Returns
    -------
    numpy.ndarray
        float32 restoration, clipped to ``model.value_range``.
    """
    image = np.asarray(image)
    if image.ndim != model.ndim:
        raise ParameterError(f"the model is {model.ndim}D but the image has shape {image.shape}")
    net, dev = _prepare(model, device)
    # the tiles need the network's halo only: a Lucy-Richardson prior is computed below on the
    # whole image, whose edges are the volume's (model.halo adds its margin for chunks)
    a, halo = model.alignment, model.edge_halo
    shape = image.shape
    if tile_shape is None:
        tile = tuple(-(-s // a) * a for s in shape)
    else:
        tile = (int(tile_shape),) * image.ndim if np.isscalar(tile_shape) else tuple(tile_shape)
        if len(tile) != image.ndim or min(tile) < 1:
            raise ParameterError(f"tile_shape {tile_shape} does not fit a {image.ndim}D image")
        tile = tuple(-(-min(t, s) // a) * a for t, s in zip(tile, shape))
    counts = [-(-s // t) for s, t in zip(shape, tile)]
    # pad: halo before, halo + the remainder of the last tile after
    pad = [(halo, halo + c * t - s) for s, t, c in zip(shape, tile, counts)]
    x = _normalise(model, image)
    if model.edge_fill is not None:
        # trained with the background past the volume's edges (normalised: 0)
        pad_args = dict(mode="constant", constant_values=np.float32(0))
    else:
        # "symmetric" (the edge pixel repeated) is what dask's map_overlap(boundary="reflect")
        # does, so a chunked application on a cluster equals this whole-image one everywhere.
        mode = "symmetric" if all(s >= max(p) for s, p in zip(shape, pad)) else "edge"
        pad_args = dict(mode=mode)
    xp = np.pad(x, pad, **pad_args)
    # a Lucy-Richardson prior is computed on the whole image (its edges are the volume's)
    prior = lucy_richardson_prior(net, torch.from_numpy(x)[None, None].to(dev))
    pp = None
    if prior is not None:  # past the edges: the prior of the background is its zero level
        prior_pad = dict(pad_args)
        if model.edge_fill is not None:
            prior_pad["constant_values"] = np.float32(getattr(net, "prior_background", 0.0))
        pp = np.pad(prior[0, 0].cpu().numpy(), pad, **prior_pad)
    out = np.empty(tuple(c * t for c, t in zip(counts, tile)), dtype=np.float32)
    transforms = test_time_transforms(model, tta)
    corners = list(itertools.product(*[range(0, c * t, t) for c, t in zip(counts, tile)]))
    for i in range(0, len(corners), max(int(batch_size), 1)):
        group = corners[i : i + batch_size]
        blocks = np.stack(
            [xp[tuple(slice(c, c + t + 2 * halo) for c, t in zip(cor, tile))] for cor in group]
        )
        priors = None
        if pp is not None:
            priors = np.stack(
                [pp[tuple(slice(c, c + t + 2 * halo) for c, t in zip(cor, tile))] for cor in group]
            )
        res = run_network(net, blocks, dev, amp, transforms, priors)
        for cor, r in zip(group, res):
            out[tuple(slice(c, c + t) for c, t in zip(cor, tile))] = r[
                tuple(slice(halo, halo + t) for t in tile)
            ]
    out = out[tuple(slice(0, s) for s in shape)]
    return _denormalise(model, out)
