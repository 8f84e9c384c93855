"""The one root of the errors meant for a user: :class:`LggsegError`.

Stage scripts and the ``lggseg`` commands catch ``LggsegError`` (nothing else) and turn it into one
line on stderr and exit status 2. Every error that carries a message for the user derives from it:
a bad parameter (:class:`ConfigError`), bad input data, a failed download, a bad model directory,
training that cannot go on, and an output that cannot be written (:class:`OutputError`: full disk,
permissions). This module imports nothing of the package, so every layer can raise these.
"""

from __future__ import annotations


class LggsegError(Exception):
    """Base of the errors that carry a message meant for the user."""


class ConfigError(LggsegError, ValueError):
    """A parameter makes no sense; raised before any work starts (also a ``ValueError``)."""


class OutputError(LggsegError, OSError):
    """An output could not be written (full disk, permissions, ...); also an ``OSError``."""


class DataError(LggsegError):
    """Input data is malformed: the message names the file and the problem."""


class FetchError(LggsegError):
    """The dataset could not be obtained (credentials, network, bad archive)."""


class ModelError(LggsegError):
    """A model directory or weights file is missing, mismatched or unreadable."""


class TrainingError(LggsegError):
    """Training cannot go on as configured (e.g. the loss diverged)."""
