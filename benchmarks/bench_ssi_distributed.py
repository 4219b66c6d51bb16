"""Distributed SSI benchmark: training on sampled regions, model shipping, inference throughput.

On one synthetic 3D volume (binary blobs, smoothed, degraded with the protocol's noise chain and
a widefield PSF), in one run:

1. training: SSI trained on regions sampled through Dask (``ssi_dask.train``) vs SSI trained on
   the whole in-memory volume (``train_ssi``) with the same settings: time to the best
   validation loss ("convergence") and to the end of the schedule;
2. quality: PSNR / SSIM against the ground truth of both models and of the best Lucy-Richardson
   iteration count (2, 5, 10, 20);
3. inference on a LocalCluster (1 and 2 single-threaded workers): voxels per second per worker,
   against the in-process application of the same model (``predict``, 1 torch thread);
4. model shipping: bytes of the model's graph key moved to each worker (the workers' transfer
   logs), against the pickled model and against embedding it in every task.

Usage::

    python benchmarks/bench_ssi_distributed.py [--shape 32,128,128] [--steps 120] [--json out]
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import ssi_dask
from ssi_dask.bench.metrics import psnr, ssim
from ssi_dask.bench.synthetic import degrade, ground_truth_3d
from ssi_dask.lr import richardson_lucy
from ssi_dask.psf import widefield_psf
from ssi_dask.ssi import predict, save_checkpoint, train_ssi


def _convergence(model) -> dict:
    """Time and step of the best validation loss, and the total, from the training log."""
    entries = [e for e in model.log if "val_loss" in e and "step" in e]
    best = min(entries, key=lambda e: e["val_loss"])
    return {
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "time_to_best_s": best["elapsed_s"],
        "total_s": entries[-1]["elapsed_s"],
        "steps_run": entries[-1]["step"],
    }


def _model_transfers(client, key_prefix: str) -> dict:
    def collect(dask_worker):
        return [
            nbytes
            for t in dask_worker.transfer_incoming_log
            for key, nbytes in t["keys"].items()
            if str(key).startswith(key_prefix)
        ]

    return client.run(collect)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,128,128")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.set_num_threads(1)
    figures: dict = {"shape": shape, "steps": args.steps}

    truth = ground_truth_3d(shape, seed=1, smooth=True)
    psf = widefield_psf((9, 11, 11), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
    degraded = degrade(truth, psf, seed=args.seed)
    settings = dict(
        steps=args.steps,
        patch_size=32,
        batch_size=4,
        levels=2,
        base_channels=8,
        eval_every=10,
        restarts=0,
        seed=args.seed,
        device="cpu",
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-ssi-"))
    path = workdir / "volume.zarr"
    zarr.create_array(store=str(path), shape=shape, chunks=(shape[0], 64, 64), dtype="float32")[
        ...
    ] = degraded

    # 1. training: sampled regions vs the whole volume
    started = time.perf_counter()
    sampled = ssi_dask.train(
        str(path), psf, n_regions=args.regions, region_shape=(shape[0], 64, 64), **settings
    )
    sampled_wall = time.perf_counter() - started
    started = time.perf_counter()
    whole_model = train_ssi(degraded, psf, **settings)
    whole_wall = time.perf_counter() - started
    info = sampled.training["sampling"]
    figures["training"] = {
        "sampled": {**_convergence(sampled), "wall_s": sampled_wall},
        "whole": {**_convergence(whole_model), "wall_s": whole_wall},
        "sampled_fraction": info["sampled_fraction"],
        "regions_kept": info["kept"],
        "rejected_as_background": info["rejected_as_background"],
        "region_read_s": info["read_seconds"],
    }
    print("training", json.dumps(figures["training"], indent=1))

    # 2. quality
    quality = {}
    for name, model in (("ssi-sampled", sampled), ("ssi-whole", whole_model)):
        restored = np.clip(predict(model, degraded, device="cpu"), 0, 1)
        quality[name] = {"psnr": psnr(truth, restored), "ssim": ssim(truth, restored)}
    best = None
    for n in (2, 5, 10, 20):
        restored = np.clip(richardson_lucy(degraded, psf, num_iter=n), 0, 1)
        score = {"psnr": psnr(truth, restored), "ssim": ssim(truth, restored), "n": n}
        if best is None or score["psnr"] > best["psnr"]:
            best = score
    quality["best-lr"] = best
    quality["input"] = {"psnr": psnr(truth, degraded), "ssim": ssim(truth, degraded)}
    figures["quality"] = quality
    print("quality", json.dumps(quality, indent=1))

    # 3 and 4. inference throughput and model shipping on a LocalCluster
    from distributed import Client, LocalCluster

    checkpoint = workdir / "model.pt"
    save_checkpoint(sampled, checkpoint)
    model = ssi_dask.ssi.load_checkpoint(checkpoint)
    voxels = int(np.prod(shape))
    started = time.perf_counter()
    reference = predict(model, degraded, device="cpu")
    in_process = voxels / (time.perf_counter() - started)
    throughput = {"in_process_voxels_per_s": in_process}
    shipping = {"pickled_model_bytes": len(pickle.dumps(model))}
    for n_workers in (1, 2):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            lazy = ssi_dask.deconvolve(
                str(path), psf, method="ssi", model=model, chunks=(shape[0], 64, 64)
            )
            started = time.perf_counter()
            result = client.compute(lazy).result()
            elapsed = time.perf_counter() - started
            assert np.abs(result - reference).max() <= 1e-3 * float(np.ptp(reference))
            per_worker = voxels / elapsed / n_workers
            throughput[f"{n_workers}_workers_voxels_per_s_per_worker"] = per_worker
            throughput[f"{n_workers}_workers_ratio_to_in_process"] = per_worker / in_process
            if n_workers == 2:
                key = next(
                    str(k) for k in lazy.__dask_graph__() if str(k).startswith("shared-model-")
                )
                moved = _model_transfers(client, key)
                shipping["chunks"] = int(np.prod(lazy.numblocks))
                shipping["transfers_per_worker"] = [len(v) for v in moved.values()]
                shipping["bytes_per_worker"] = [int(sum(v)) for v in moved.values()]
                shipping["embedded_in_every_task_bytes"] = (
                    shipping["chunks"] * shipping["pickled_model_bytes"]
                )
    figures["throughput"] = throughput
    figures["shipping"] = shipping
    print("throughput", json.dumps(throughput, indent=1))
    print("shipping", json.dumps(shipping, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))


if __name__ == "__main__":
    main()
