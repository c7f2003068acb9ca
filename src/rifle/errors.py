"""Errors that mean "bad input or settings": the CLI prints their message without a traceback."""

from __future__ import annotations

from .train.checkpoint import CheckpointError
from .train.outputs import RunDirError
from .train.trainer import TrainingError

# ConfigError, DataError and ModelError derive from ValueError; so do the core's schedule errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    CheckpointError,
    RunDirError,
    TrainingError,
)
