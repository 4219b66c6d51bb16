"""The README's notebook workflow, run exactly as written (issue 14, item 7)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    """The Python block that follows ``<!-- readme-test: NAME -->`` in the README."""
    text = README.read_text()
    match = re.search(
        rf"<!-- readme-test: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL
    )
    assert match, f"no block marked {name!r} in the README"
    return match.group(1)


@pytest.mark.slow
def test_notebook_workflow_runs_as_written(tmp_path, monkeypatch, capsys):
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.ssi import predict

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(readme_block("notebook"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "complete: 1 of 1 chunks recorded as written" in out
    volume = np.asarray(zarr.open_array(str(tmp_path / "example" / "volume.zarr"))[...])
    psf = namespace["psf"]
    lr = zarr.open_array(str(tmp_path / "example" / "lr.zarr"))
    assert lr.attrs["ssi_dask"]["complete"] is True and lr.attrs["ssi_dask"]["iterations"] == 10
    reference = richardson_lucy(volume.astype(np.float32), psf, num_iter=10)
    np.testing.assert_allclose(lr[...], reference, rtol=1e-4, atol=1e-4 * reference.max())
    ssi = zarr.open_array(str(tmp_path / "example" / "ssi.zarr"))
    assert ssi.attrs["ssi_dask"]["complete"] is True
    expected = predict(namespace["model"], volume.astype(np.float32))
    np.testing.assert_allclose(ssi[...], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
