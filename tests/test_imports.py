"""What a Lucy-Richardson worker imports: no torch (its import costs seconds and ~180 MiB)."""

from __future__ import annotations

import subprocess
import sys


def test_lr_path_does_not_import_torch():
    code = (
        "import sys, ssi_dask, ssi_dask.blockwise, ssi_dask.store, ssi_dask.cli, ssi_dask.lr; "
        "print('torch' in sys.modules); ssi_dask.train; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]  # torch only once train is asked for
