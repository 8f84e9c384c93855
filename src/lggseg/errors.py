"""Exception types that stage scripts and the CLI turn into one clear message and a non-zero exit."""

from __future__ import annotations

from lggseg.config import ConfigError


class LggsegError(Exception):
    """Base of the errors that carry a message meant for the user."""


class DataError(LggsegError):
    """Input data is malformed: the message names the file and the problem."""


class FetchError(LggsegError):
    """The dataset could not be obtained (credentials, network, bad archive)."""


class ModelError(LggsegError):
    """A model directory or weights file is missing, mismatched or unreadable."""


class TrainingError(LggsegError):
    """Training cannot go on as configured (e.g. the loss diverged)."""


USER_ERRORS = (LggsegError, ConfigError)
