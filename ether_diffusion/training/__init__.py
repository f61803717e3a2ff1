"""Training: one loop (``trainer``) that every task plugs into (``task``), typed run configurations (``config``),
callbacks with named events (``callbacks``), and the pieces tasks share (data, noise and loss, class images,
checkpoints, artifacts). DreamBooth is ``dreambooth.DreamBoothTask``; controllable synthesis is
``ether_diffusion.control.train.ControlTask``."""

import importlib

#: the names this package gives and their modules, loaded on first use (PEP 562): ``training.config`` (the run
#: configurations the command line parses) does not bring the loop, the tasks and diffusers with it
_EXPORTS = {
    **dict.fromkeys(("Callback", "Preparation", "ValidationEvent"), ".callbacks"),
    **dict.fromkeys(("ConfigError", "RunConfig"), ".config"),
    **dict.fromkeys(("Run", "Samples", "Task"), ".task"),
    **dict.fromkeys(("ResumeMismatchError", "Trainer", "TrainingDivergedError", "TrainResult"), ".trainer"),
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})


__all__ = sorted(_EXPORTS)
