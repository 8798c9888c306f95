"""The errors of loading weights that the launchers report in one line, without a traceback."""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint file cannot be read, or its content does not fit the requested backbone."""


class DownloadError(RuntimeError):
    """Released weights could not be downloaded or failed verification; the message names the URL, the
    cache path where the file can be placed by hand, and what to do."""
