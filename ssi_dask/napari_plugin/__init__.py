"""napari plugin of ssi-dask (``pip install 'ssi-dask[napari]'``).

* a reader (:mod:`.reader`) that opens ssi-dask outputs (OME-Zarr groups with their pyramid,
  or plain Zarr arrays) as image layers with their physical scale and the run's provenance in
  ``layer.metadata["ssi_dask"]``;
* a widget (:mod:`.widget`) that runs Lucy-Richardson or SSI on an image layer, in this
  process or on a Dask scheduler, with progress.

The manifest is ``napari.yaml`` (npe2), declared as the ``napari.manifest`` entry point.
Nothing in the rest of the package imports this module.
"""
