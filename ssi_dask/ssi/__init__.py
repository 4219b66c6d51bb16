"""Self-Supervised Inversion (SSI, Kobayashi et al. 2020): training, inference, checkpoints.

Public API::

    model = train_ssi(image, psf, seed=0)          # -> SSIModel (the tuned recipe)
    model = train_ssi(image, psf, TrainingRecipe(steps=200), seed=0, restarts=0)
    restored = predict(model, image, tta=2)        # 2 test-time transforms
    restored = predict(model, image)               # or model.predict(image)
    save_checkpoint(model, "model.pt"); model = load_checkpoint("model.pt")
    predict_block(model, block)                     # pure per-chunk kernel (halo = model.halo)
    predict_chunk(model, block)                     # the same in batched, memory-sized tiles
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # the core install (LR only) has no torch
    raise ImportError("ssi_dask.ssi needs PyTorch: pip install 'ssi-dask[ssi]'") from exc

from .checkpoint import content_hash, load_checkpoint, model_hash, save_checkpoint
from .device import resolve_device
from .forward import PSFOperator
from .masking import bernoulli_mask, mask_input, rho_schedule, validation_mask
from .model import EnsembleUNet, SSIModel, UNet, build_network, receptive_field_radius
from .predict import predict, predict_block
from .regions import RegionPool
from .sampler import PatchSampler, sample_statistics
from .sensor import ClippedSensor, detect_clip_bounds, estimate_noise_model
from .tiling import choose_tile, predict_chunk, tile_budget
from .train import DEFAULTS, describe_runs, train_ssi

__all__ = [
    "ClippedSensor",
    "DEFAULTS",
    "EnsembleUNet",
    "PSFOperator",
    "PatchSampler",
    "RegionPool",
    "SSIModel",
    "UNet",
    "bernoulli_mask",
    "build_network",
    "choose_tile",
    "content_hash",
    "describe_runs",
    "model_hash",
    "detect_clip_bounds",
    "estimate_noise_model",
    "load_checkpoint",
    "mask_input",
    "predict",
    "predict_block",
    "predict_chunk",
    "receptive_field_radius",
    "resolve_device",
    "rho_schedule",
    "sample_statistics",
    "save_checkpoint",
    "tile_budget",
    "train_ssi",
    "validation_mask",
]
