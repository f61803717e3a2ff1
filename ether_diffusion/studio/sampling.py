"""Sampling for the studio: pipelines loaded once, shared by every client behind a lock.

Adapters are loaded from the store under their own names the first time they are asked for, and reloaded when
their file changes (a finished training job republishes it). A request names adapters with strengths; with
``compare`` each seed is also drawn by the base model (adapters switched off), so the pair differs only by the
adapter.

Control adapters (a condition encoder with its ETHER vectors) sample in a second pipeline, an
``EtherControlPipeline``: a ``ControlRequest`` gives the control map, and with ``compare`` each seed is also drawn
from the same prompt without control (encoder and adapter off: the base model).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EtherConfig
from ..control.encoder import ConditionMismatchError, attach_condition_encoder, detach_condition_encoder
from ..control.pipeline import EtherControlPipeline
from ..inject import plan_injection
from ..io import AdapterFileError, AdapterMismatchError, read_adapter_file
from ..models import ModelLoadError, load_pipeline
from ..pipeline import delete_ether_adapters, enable_ether, load_ether_weights, set_ether_adapters
from ..sampling import sample_images
from ..training.config import TaskKind
from .adapters import AdapterStore
from .control import control_map
from .workspace import StudioError, Workspace, check_name

__all__ = ["ControlRequest", "SampleRequest", "SampleResult", "Sampler", "parse_seeds"]

MAX_IMAGES_PER_REQUEST = 32


def parse_seeds(text: str | int | None) -> list[int]:
    """``"1, 2, 5-7"`` → ``[1, 2, 5, 6, 7]``; empty → ``[0]``."""
    if text is None or str(text).strip() == "":
        return [0]
    seeds = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            if dash and first:
                low, high = int(first), int(last)
                if high < low or high - low >= MAX_IMAGES_PER_REQUEST:
                    raise ValueError
                seeds.extend(range(low, high + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise StudioError(f"seeds: {part!r} is not a whole number or a range like 3-6") from None
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise StudioError("seeds must be between 0 and 2^63-1")
    return seeds


@dataclass
class SampleRequest:
    prompt: str
    adapters: list[tuple[str, float]] = field(default_factory=list)  # (name, strength)
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float = 5.0
    compare: bool = True  # also the base model, same seed

    def validated(self) -> SampleRequest:
        if not self.prompt or not self.prompt.strip():
            raise StudioError("the prompt is empty; describe the image, e.g. 'a sks star on a blue background'")
        if not 1 <= int(self.steps) <= 200:
            raise StudioError("steps must be between 1 and 200")
        if not 0 <= float(self.guidance_scale) <= 30:
            raise StudioError("guidance must be between 0 and 30")
        if not self.seeds:
            raise StudioError("give at least one seed")
        runs = len(self.seeds) * (2 if self.compare and self.adapters else 1)
        if runs > MAX_IMAGES_PER_REQUEST:
            raise StudioError(f"{runs} images asked for; at most {MAX_IMAGES_PER_REQUEST} per request")
        names = [check_name(n) for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise StudioError("an adapter is listed twice; give each adapter once with its strength")
        for name, strength in self.adapters:
            if not -2.0 <= float(strength) <= 2.0:
                raise StudioError(f"strength of {name!r} is {strength}; use a value between -2 and 2")
        return self


@dataclass
class ControlRequest:
    adapter: str  # a control adapter of the store
    control: object  # the control map: a PIL image or uint8 array (uploaded or drawn), made square by control_map
    prompt: str
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float = 5.0
    compare: bool = True  # also the same prompt and seed without control

    def validated(self) -> ControlRequest:
        SampleRequest(self.prompt, [(self.adapter, 1.0)], self.negative_prompt, self.seeds, self.steps,
                      self.guidance_scale, self.compare).validated()  # fmt: skip  # the same rules
        return self


@dataclass
class SampleResult:
    images: list  # PIL images
    captions: list[str]
    paths: list[Path]
    seconds: float
    note: str = ""  # what was done to the input to make it fit (a control map resized), if anything


class Sampler:
    def __init__(self, model: str | Path, workspace: Workspace, store: AdapterStore | None = None,
                 model_config: str | None = None):  # fmt: skip
        self.model = str(model)
        self.model_config = model_config
        self.workspace = workspace
        self.store = store or AdapterStore(workspace)
        self.lock = threading.Lock()  # the pipeline's adapters and modules are shared state
        self._pipe = None
        self._loaded: dict[str, tuple[float, int]] = {}  # adapter name -> (mtime, size) of the file loaded
        self._control_pipe = None
        self._control_loaded: tuple[str, tuple[float, int]] | None = None  # (name, file stamp) in the control pipe

    # --- the pipeline ------------------------------------------------------------------------------------------
    def _load(self, pipeline_class):
        try:
            pipe = load_pipeline(self.model, pipeline_class, config=self.model_config)
        except ModelLoadError as err:
            raise StudioError(f"{err}. Start the studio with --model pointing at a diffusers folder") from err
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _pipeline(self):
        """The text-to-image pipeline of the model's family (SD, SDXL, SD3 or Flux: diffusers' own class, used
        through the ``pipeline`` module's functions)."""
        if self._pipe is None:
            self._pipe = self._load(None)
        return self._pipe

    def _control_pipeline(self, name: str | None):
        """The control pipeline with control adapter ``name`` loaded (reloaded if its file changed)."""
        if self._control_pipe is None:
            self._control_pipe = self._load(EtherControlPipeline)
        pipe = self._control_pipe
        if name is None:
            return pipe
        path = self.store.require(name)
        stamp = (path.stat().st_mtime, path.stat().st_size)
        if self._control_loaded != (name, stamp):
            if self._control_loaded is not None:
                pipe.unload_control_weights()
                self._control_loaded = None
            self._load_control(pipe, path, name)
            self._control_loaded = (name, stamp)
        return pipe

    @staticmethod
    def _load_control(pipe, path: Path, name: str) -> None:
        try:
            pipe.load_control_weights(path, adapter_name=name)
        except AdapterFileError as err:
            raise StudioError(f"{name!r} is not a control adapter: {err}") from err
        except (AdapterMismatchError, ConditionMismatchError) as err:
            raise StudioError(f"control adapter {name!r} does not fit the base model: {err}") from err

    def _sync_adapter(self, pipe, name: str) -> None:
        """Load ``name`` from the store, or reload it if its file changed since."""
        path = self.store.require(name)
        stamp = (path.stat().st_mtime, path.stat().st_size)
        if self._loaded.get(name) == stamp:
            return
        if self.store.info(name).task is TaskKind.CONTROL:
            raise StudioError(f"{name!r} is a control adapter: sample it with a control map on the Control tab")
        if name in self._loaded:
            delete_ether_adapters(pipe, name)
            del self._loaded[name]
        try:
            load_ether_weights(pipe, path, name)
        except AdapterMismatchError as err:
            raise StudioError(f"adapter {name!r} does not fit the base model: {err}") from err
        self._loaded[name] = stamp

    def _forget_missing(self, pipe) -> None:
        """Drop adapters whose files were renamed or deleted (the names could come back with other content)."""
        for name in list(self._loaded):
            if not self.store.exists(name):
                delete_ether_adapters(pipe, name)
                del self._loaded[name]

    def check_fits(self, path: Path) -> None:
        """Load ``path`` into the base model under a scratch name and remove it: raises AdapterMismatchError. A
        control file is tried in the control pipeline (encoder and adapter)."""
        name = "studio-import-check"
        with self.lock:
            if read_adapter_file(path).extra.get("task") != TaskKind.CONTROL:
                pipe = self._pipeline()
                load_ether_weights(pipe, path, name)
                delete_ether_adapters(pipe, name)
                return
            pipe = self._control_pipeline(None)
            if self._control_loaded is not None:
                pipe.unload_control_weights()
                self._control_loaded = None
            try:
                pipe.load_control_weights(path, adapter_name=name)
            except ConditionMismatchError as err:
                raise AdapterMismatchError(str(err)) from err
            pipe.unload_control_weights()

    def check_adapter_config(self, config: EtherConfig) -> None:
        """Whether an adapter of ``config`` fits the model's denoiser (``inject``'s checks, nothing added): a
        StudioError naming the width ``n_blocks`` does not divide, and the values that do, else nothing."""
        with self.lock:
            pipe = self._pipeline()
            denoiser = getattr(pipe, "unet", None) or pipe.transformer
            try:
                plan_injection(denoiser, config, "studio-blocks-check", activate=False)
            except ValueError as err:
                raise StudioError(f"Blocks = {config.n_blocks} does not fit this model: {err}") from None

    # --- sampling ---------------------------------------------------------------------------------------------
    def sample(self, request: SampleRequest, save: bool = True, on_step=None) -> SampleResult:
        """``on_step(done, total)`` hears of each denoising step (the page's progress bar)."""
        request = request.validated()
        started = time.time()
        with self.lock:
            pipe = self._pipeline()
            self._forget_missing(pipe)
            names = [check_name(n) for n, _ in request.adapters]
            for name in names:
                self._sync_adapter(pipe, name)
            if names:
                enable_ether(pipe)
                set_ether_adapters(pipe, names, [float(w) for _, w in request.adapters])
            variants = ("adapted", "base") if names and request.compare else ("adapted" if names else "base",)
            samples = sample_images(
                pipe,
                [request.prompt],
                request.seeds,
                variants=variants,
                num_inference_steps=int(request.steps),
                guidance_scale=float(request.guidance_scale),
                negative_prompt=request.negative_prompt or None,
                on_step=on_step,
            )
        label = " + ".join(f"{n}×{w:g}" for n, w in request.adapters)
        images = [s.image for s in samples]
        captions = [f"seed {s.seed} · {label if s.variant == 'adapted' else 'base model'}" for s in samples]
        paths = self._save(images, captions) if save else []
        return SampleResult(images, captions, paths, time.time() - started)

    def sample_control(self, request: ControlRequest, save: bool = True) -> SampleResult:
        """The control map, then per seed the image with control and (``compare``) the same prompt and seed
        without it. ``result.note`` says how the map was made to fit (cropped, resized), if it was."""
        request = request.validated()
        name = check_name(request.adapter)
        info = self.store.info(name)
        if info.error is not None or info.task is not TaskKind.CONTROL:
            raise StudioError(f"{name!r} is not a control adapter; train one on the Control tab or pick another")
        started = time.time()
        with self.lock:
            pipe = self._control_pipeline(name)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            control, note = control_map(request.control, size)
            options = dict(num_inference_steps=int(request.steps), guidance_scale=float(request.guidance_scale),
                           negative_prompt=request.negative_prompt or None)  # fmt: skip
            controlled = sample_images(pipe, [request.prompt], request.seeds, image=control, **options)
            plain = []
            if request.compare:  # the base model: no encoder, no adapter
                encoder = detach_condition_encoder(pipe.unet)
                pipe.disable_ether()
                try:
                    plain = sample_images(pipe, [request.prompt], request.seeds, **options)
                finally:
                    pipe.enable_ether()
                    attach_condition_encoder(pipe.unet, encoder)
        images, captions = [control], [f"control map{' (' + note + ')' if note else ''}"]
        for i, sample in enumerate(controlled):
            images.append(sample.image)
            captions.append(f"seed {sample.seed} · with control ({name})")
            if plain:
                images.append(plain[i].image)
                captions.append(f"seed {sample.seed} · without control (base model)")
        paths = self._save(images, captions) if save else []
        return SampleResult(images, captions, paths, time.time() - started, note)

    def _save(self, images, captions) -> list[Path]:
        """Write the images under ``samples/<time>/`` as ``00_seed3_adapted.png``, ``01_seed3_base.png``, ..."""
        folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=self.workspace.samples))
        paths = []
        for i, (image, caption) in enumerate(zip(images, captions)):
            if caption.startswith("control map"):
                stem = "control-map"
            else:
                kind = "base" if "base model" in caption else "control" if "with control" in caption else "adapted"
                stem = f"{caption.split(' · ')[0].replace(' ', '')}_{kind}"
            paths.append(folder / f"{i:02d}_{stem}.png")
            image.save(paths[-1])
        return paths

    def thumbnail(self, name: str, prompt: str | None = None, steps: int = 20):
        """One image of adapter ``name`` (its instance prompt by default), for the Adapters tab."""
        info = self.store.info(name)
        request = SampleRequest(prompt or info.instance_prompt or "a photo", [(name, 1.0)], steps=steps, compare=False)
        return self.sample(request, save=False).images[0]
