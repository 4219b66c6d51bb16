"""Exception types for errors a user can cause.

Every exception here carries a one-line message that says what is wrong and how to fix it;
the command line prints that line and exits non-zero without a traceback.
"""

from __future__ import annotations


class SsiDaskError(Exception):
    """Base class of all errors caused by user input or environment."""

    exit_code = 2


class InputError(SsiDaskError):
    """The input image or array is missing, unreadable or unusable."""


class PSFError(SsiDaskError):
    """The point spread function is missing, invalid or does not match the image."""


class OutputError(SsiDaskError):
    """The output cannot be written (exists, equals the input, read-only, misaligned)."""


class SchedulerError(SsiDaskError):
    """The Dask scheduler cannot be reached or was lost."""


class ParameterError(SsiDaskError):
    """An option or parameter has an invalid value."""


class CheckpointError(SsiDaskError):
    """A trained-model checkpoint is missing, corrupt or does not match the data."""


class DeviceError(SsiDaskError):
    """A requested compute device (e.g. a CUDA GPU) is not available."""


class RunError(SsiDaskError):
    """A run could not finish (a chunk failed); the chunks already written are kept."""


class NonFiniteResultError(RunError):
    """A chunk's result holds NaN or Inf; it was not written and the run stops."""


class MissingExtraError(SsiDaskError):
    """An optional dependency (an extra such as ``ssi-dask[ssi]``) is not installed."""
