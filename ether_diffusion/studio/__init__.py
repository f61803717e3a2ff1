"""ETHER Studio: the Gradio app (``ui``, run by ``ether-diffusion studio``) and the work behind it, testable without
a browser.

- ``ui``: the page: widgets and event wiring only, calling the modules below;
- ``workspace``: the studio's folders, safe names that cannot leave them, ``StudioError`` (a message for the page);
- ``uploads``: checking 3-10 training images (count, type, size) before anything trains;
- ``forms``: ``FormSpec``, the settings every training form shares and their checks, which ``TrainSpec`` (DreamBooth,
  in ``jobs``) and ``ControlSpec`` (in ``control``) extend;
- ``jobs``: one background training job at a time on the library loop (DreamBooth or control), with live progress,
  losses, previews, TensorBoard logs, stop (within a step, in every phase) and resume;
- ``queue``: DreamBooth jobs queued one by one and trained side by side in packed runs (``training/pack.py``), each
  with its own progress, stop and exact resume;
- ``control``: what control jobs train on (tiny-world sets rendered on demand, dataset folders) and the control
  maps they sample with (uploaded or drawn);
- ``presets``: training configurations saved and loaded by name;
- ``estimate``: time and memory of a job before it starts, measured on the loaded model;
- ``adapters``: the saved adapters: list with metadata and thumbnails, rename, delete, strict import, export;
- ``sampling``: cached pipelines behind a lock, adapters with strengths, with/without side by side, and control
  adapters with a map beside the same prompt without control.

Nothing here but ``ui`` imports gradio, and this package does not import ``ui``: ``import ether_diffusion.studio`` works
without gradio (``tests/test_studio_forms.py`` and ``tests/test_studio.py`` check it).
"""

from .adapters import AdapterInfo, AdapterStore
from .control import ControlSpec
from .forms import FormSpec
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
    "FormSpec",
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
