"""TIFF input is read lazily through tifffile's Zarr interface, one region at a time."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import tifffile

from ssi_dask.io import TiffArray, open_volume


def test_tiff_region_is_read_without_loading_the_stack(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((48, 256, 256), dtype=np.float32)  # 12.6 MB
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, tile=(64, 64))
    volume = open_volume(path)
    assert volume.shape == data.shape and volume.data.dtype == np.float32
    assert volume.store_chunks == (1, 64, 64)  # one tile of one page per Dask chunk
    assert volume.data.npartitions == 48 * 4 * 4
    volume.data[0, :64, :64].compute(scheduler="synchronous")  # imports happen here, untraced
    tracemalloc.start()
    try:
        region = volume.data[10:12, 64:128, :64].compute(scheduler="synchronous")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(region, data[10:12, 64:128, :64])
    # two 16 KiB tiles were needed; the whole stack would be 12.6 MB
    assert peak < data.nbytes / 20, peak


def test_tiff_array_pickles_by_path_and_reads_the_same(tmp_path):
    data = np.arange(5 * 40 * 30, dtype=np.uint16).reshape(5, 40, 30)
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, data)
    array = TiffArray(path)
    np.testing.assert_array_equal(array[2:4, 5:9], data[2:4, 5:9])  # opens the store
    payload = pickle.dumps(array)
    assert len(payload) < 1000  # the open store is not shipped to workers
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[1], data[1])
    assert clone.shape == data.shape and clone.dtype == data.dtype
