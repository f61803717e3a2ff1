"""ETHER Studio: the work behind the Gradio app (``app/app.py``), testable without a browser.

- ``workspace``: the studio's folders, safe names that cannot leave them, ``StudioError`` (a message for the page);
- ``uploads``: checking 3-10 training images (count, type, size) before anything trains;
- ``jobs``: one background training job at a time on the library loop, with live progress, previews, stop, resume;
- ``adapters``: the saved adapters: list with metadata and thumbnails, rename, delete, strict import, export;
- ``sampling``: one cached pipeline behind a lock, adapters with strengths, with/without side by side.

Nothing here imports gradio: the app only lays out widgets and calls these functions.
"""

from .adapters import AdapterInfo, AdapterStore
from .jobs import JobManager, TrainSpec
from .sampling import Sampler, SampleRequest
from .uploads import check_uploads
from .workspace import StudioError, Workspace, check_name

__all__ = [
    "AdapterInfo",
    "AdapterStore",
    "JobManager",
    "SampleRequest",
    "Sampler",
    "StudioError",
    "TrainSpec",
    "Workspace",
    "check_name",
    "check_uploads",
]
