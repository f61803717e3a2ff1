"""Training: one loop (``trainer``) that every task plugs into (``task``), typed run configurations (``config``),
callbacks with named events (``callbacks``), and the pieces tasks share (data, noise and loss, class images,
checkpoints, artifacts). DreamBooth is ``dreambooth.DreamBoothTask``; controllable synthesis is
``ether_diffusion.control.train.ControlTask``."""

from .callbacks import Callback, Preparation, ValidationEvent
from .config import ConfigError, RunConfig
from .task import Run, Samples, Task
from .trainer import ResumeMismatchError, Trainer, TrainingDivergedError, TrainResult

__all__ = [
    "Callback",
    "ConfigError",
    "Preparation",
    "ResumeMismatchError",
    "Run",
    "RunConfig",
    "Samples",
    "Task",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "ValidationEvent",
]
