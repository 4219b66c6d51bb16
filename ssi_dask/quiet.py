"""Keep the command line's stderr to ssi-dask's own lines.

Libraries the command uses (tifffile, torch, numpy, zarr, dask, ngff-zarr, ome-zarr) report
through Python warnings and logging; with no handler configured, both end up on stderr and
break the promise that a bad input gets exactly one line there. While :func:`quiet_libraries`
is active:

* a warning ssi-dask gives on purpose (a plain ``UserWarning`` raised in its own code, or a
  :class:`SsiDaskWarning` from anywhere) and a record of its ``ssi_dask`` loggers are printed
  as one ``ssi-dask: warning: ...`` line each;
* any other warning (a library's, or a by-product such as numpy's ``RuntimeWarning`` or a
  ``FutureWarning`` attributed to ssi-dask's line that called the library) and any other
  module's log record is not shown;
* ``SSI_DASK_DEBUG=1`` in the environment, or Python's own ``-W``/``PYTHONWARNINGS``
  options for warnings, show them as Python normally does.

Standard library only: imported by the command line and by the local cluster's workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

#: Folder of this package: warnings raised from files below it are ssi-dask's own.
PACKAGE_DIR = str(Path(__file__).resolve().parent)
#: Environment variable that shows every library warning and log record again.
DEBUG_VARIABLE = "SSI_DASK_DEBUG"


class SsiDaskWarning(UserWarning):
    """A warning ssi-dask gives the user on purpose (shown as one line by the command)."""


def _is_ours(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(PACKAGE_DIR + os.sep)
    except (OSError, ValueError):
        return False


def one_line(message: object) -> str:
    """The first non-empty line of ``message``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else ""


class _OwnRecordsOnly(logging.Handler):
    """Root handler: ssi-dask's records as one ``ssi-dask: warning:`` line, others dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "ssi_dask" or record.name.startswith("ssi_dask."):
            try:
                print(f"ssi-dask: warning: {one_line(record.getMessage())}", file=sys.stderr)
            except Exception:  # noqa: BLE001  (never fail a run for a message)
                self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SsiDaskWarning) or (category is UserWarning and _is_ours(filename)):
        print(f"ssi-dask: warning: {one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, route warnings and log records as the module docstring says;
    the previous ``warnings.showwarning`` and root handlers are restored on exit."""
    if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
        yield
        return
    handler = _OwnRecordsOnly(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)  # a root handler also stops logging's last-resort stderr output
    saved = warnings.showwarning
    if not sys.warnoptions:  # -W or PYTHONWARNINGS given: the user asked to see them
        warnings.showwarning = _show_warning
    try:
        yield
    finally:
        warnings.showwarning = saved
        root.removeHandler(handler)


_INSTALLED: list[contextlib.AbstractContextManager] = []


def install_quiet_libraries() -> None:
    """:func:`quiet_libraries` for the rest of this process (a local cluster's worker)."""
    if not _INSTALLED:
        context = quiet_libraries()
        context.__enter__()
        _INSTALLED.append(context)  # kept: collecting it would close the block
