"""Save and load trained SSI models.

A checkpoint is a ``torch.save`` archive of plain types and tensors (loaded with
``weights_only=True``: no pickled code): format tag and version, architecture config, weights,
normalisation, the PSF, training settings, the training log (JSON text), and a sha256 content hash
of the config and weights that is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .model import SSIModel, build_network

__all__ = ["save_checkpoint", "load_checkpoint", "content_hash"]

FORMAT = "ssi-dask/ssi-checkpoint"
VERSION = 1


def content_hash(config: dict, state_dict: dict) -> str:
    """sha256 of the JSON config and the float32 weights (sorted by name)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(obj):
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def save_checkpoint(model: SSIModel, path: str | os.PathLike) -> str:
    """Write ``model`` to ``path``; returns the content hash."""
    state = {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()}
    config = dict(model.network.config)
    digest = content_hash(config, state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(config, sort_keys=True),
        "state_dict": state,
        "normalisation": json.dumps(model.normalisation),
        "psf": torch.from_numpy(np.ascontiguousarray(model.psf, dtype=np.float32)),
        "training": json.dumps(_jsonable(model.training)),
        "log": json.dumps(_jsonable(model.log)),
        "sha256": digest,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return digest


def load_checkpoint(path: str | os.PathLike) -> SSIModel:
    """Load a model saved by :func:`save_checkpoint` (on the CPU, in eval mode).

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable, not an SSI checkpoint, of an unknown version, or
        its content hash does not match (corrupted or edited).
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist; train a model first (ssi-dask train)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{where} is unreadable or corrupt ({type(exc).__name__}); retrain or re-copy it"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an ssi-dask SSI checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{where} has format version {payload.get('version')}, this ssi-dask reads {VERSION}"
        )
    try:
        config = json.loads(payload["config"])
        state = payload["state_dict"]
        normalisation = json.loads(payload["normalisation"])
        psf = payload["psf"].numpy()
        training = json.loads(payload["training"])
        log = json.loads(payload["log"])
        digest = payload["sha256"]
    except Exception as exc:
        raise CheckpointError(f"{where} is incomplete ({type(exc).__name__}: {exc})") from None
    if content_hash(config, state) != digest:
        raise CheckpointError(
            f"{where} failed its content check (sha256 mismatch): the file is corrupted or edited"
        )
    try:
        net = build_network(config)
        net.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(
            f"{where} does not match the UNet architecture ({type(exc).__name__})"
        ) from None
    net.eval()
    model = SSIModel(net, normalisation, psf, training, log)
    model.training["sha256"] = digest
    return model
