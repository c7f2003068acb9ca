"""Training loop, checkpoints and run outputs."""

from .checkpoint import CheckpointError
from .outputs import RunDir, RunDirError
from .trainer import Trainer, TrainingError, summarize

__all__ = ["Trainer", "TrainingError", "summarize", "RunDir", "RunDirError", "CheckpointError"]
