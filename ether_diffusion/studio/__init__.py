"""ETHER Studio: the work behind the Gradio app (``app/app.py``), testable without a browser.

- ``workspace``: the studio's folders, safe names that cannot leave them, ``StudioError`` (a message for the page);
- ``uploads``: checking 3-10 training images (count, type, size) before anything trains;
- ``jobs``: one background training job at a time on the library loop (DreamBooth or control), with live progress,
  losses, previews, TensorBoard logs, stop (within a step, in every phase) and resume;
- ``control``: what control jobs train on (tiny-world sets rendered on demand, dataset folders) and the control
  maps they sample with (uploaded or drawn);
- ``presets``: training configurations saved and loaded by name;
- ``estimate``: time and memory of a job before it starts, measured on the loaded model;
- ``adapters``: the saved adapters: list with metadata and thumbnails, rename, delete, strict import, export;
- ``sampling``: cached pipelines behind a lock, adapters with strengths, with/without side by side, and control
  adapters with a map beside the same prompt without control.

Nothing here imports gradio: the app only lays out widgets and calls these functions.
"""

from .adapters import AdapterInfo, AdapterStore
from .control import ControlSpec
from .jobs import JobManager, TrainSpec
from .presets import PresetStore
from .sampling import ControlRequest, Sampler, SampleRequest
from .uploads import check_uploads
from .workspace import StudioError, Workspace, check_name

__all__ = [
    "AdapterInfo",
    "AdapterStore",
    "ControlRequest",
    "ControlSpec",
    "JobManager",
    "PresetStore",
    "SampleRequest",
    "Sampler",
    "StudioError",
    "TrainSpec",
    "Workspace",
    "check_name",
    "check_uploads",
]
