"""Benchmark and demo code, off the runtime import path: synthetic data and the SSI paper's
degradation protocol, image-quality metrics, figures and ``ssi-dask demo``.

Needs the ``bench`` extra (matplotlib, scikit-image) and, for SSI, the ``ssi`` extra (torch):
``pip install 'ssi-dask[ssi,bench]'``. Nothing in the LR pipeline imports this package.
"""
