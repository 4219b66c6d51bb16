"""Save and load trained SSI models.

A checkpoint is a ``torch.save`` archive of plain types and tensors (loaded with
``weights_only=True``: no pickled code): format tag and version, architecture config, weights,
normalisation, the PSF, training settings, the training log (JSON text), and a sha256 content hash
checked on load. The hash (:func:`model_hash`) covers everything that changes the model's output:
the architecture, the weights, the normalisation (offset, scale, output clip range), the PSF and
the training settings (which hold the inference-time symmetries and the sensor/clipping model);
only the training log (history) is outside it. Format 1 checkpoints hashed the config and weights
only, so an edited normalisation went unnoticed: they are refused with a request to retrain.
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

__all__ = ["save_checkpoint", "load_checkpoint", "content_hash", "model_hash"]

FORMAT = "ssi-dask/ssi-checkpoint"
VERSION = 2

#: Entries of ``SSIModel.training`` that describe a loaded file, not the model.
UNHASHED_TRAINING_KEYS = frozenset({"sha256"})


def content_hash(
    config: dict,
    state_dict: dict,
    normalisation: dict,
    psf: np.ndarray,
    training: dict,
) -> str:
    """sha256 of everything that changes a model's output.

    Parameters
    ----------
    config : dict
        Architecture (JSON).
    state_dict : dict
        Weights, hashed as float32 bytes sorted by name with their dtype and shape.
    normalisation : dict
        ``offset``, ``scale`` and ``output_range``.
    psf : numpy.ndarray
        The PSF the model was trained for (float32 bytes and shape).
    training : dict
        Training settings (symmetries used at inference, sensor model, clipping, seed...);
        the ``sha256`` entry a loaded model carries is left out.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256(b"ssi-dask model v2\0")
    h.update(json.dumps(_hashed_config(config), sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    h.update(_canonical(normalisation).encode())
    psf32 = np.ascontiguousarray(psf, dtype=np.float32)
    h.update(str(psf32.shape).encode())
    h.update(psf32.tobytes())
    settings = {k: v for k, v in training.items() if k not in UNHASHED_TRAINING_KEYS}
    h.update(_canonical(settings).encode())
    return h.hexdigest()


def _hashed_config(config: dict) -> dict:
    """The architecture as the hash spells it: the UNet's ``levels`` under their first name,
    ``depth``, so a model hashes the same whichever name its checkpoint used."""
    config = dict(config)
    if "levels" in config:
        config["depth"] = config.pop("levels")
    return config


def model_hash(model: SSIModel) -> str:
    """The :func:`content_hash` of a model (what checkpoints store and provenance records)."""
    return content_hash(
        model.config,
        model.network.state_dict(),
        model.normalisation,
        model.psf,
        model.training,
    )


def _canonical(value) -> str:
    """Canonical JSON (sorted keys, tuples as lists) of plain values for hashing."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))


def _jsonable(obj):
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def save_checkpoint(model: SSIModel, path: str | os.PathLike) -> str:
    """Write ``model`` to ``path``; returns the content hash."""
    state = {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()}
    config = dict(model.network.config)
    digest = model_hash(model)
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
    if payload.get("version") == 1:
        raise CheckpointError(
            f"{where} was saved by an older ssi-dask (format 1) whose content hash does not cover "
            "the normalisation and PSF, so it cannot be verified; retrain it (ssi-dask train)"
        )
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
    try:
        net = build_network(config)
        net.load_state_dict(state)
        model = SSIModel(net, normalisation, psf, training, log)
    except Exception as exc:
        raise CheckpointError(
            f"{where} does not match the UNet architecture ({type(exc).__name__})"
        ) from None
    # Hash what was stored (the model's own normalisation is the stored one, as floats).
    stored = content_hash(config, state, normalisation, psf, training)
    if stored != digest or model_hash(model) != digest:
        raise CheckpointError(
            f"{where} failed its content check (sha256 mismatch): the file is corrupted or edited"
        )
    net.eval()
    model.training["sha256"] = digest
    return model
