"""``--cuda_graphs``: a whole training step (forward, backward, clipping, optimizer step) replayed as one CUDA graph.

On a GPU a small adapter's step waits for the host: every layer queues its kernels one by one from Python. A CUDA
graph records the kernels of one step once and replays them with one launch, so the host cost of a step no longer
grows with the number of layers or adapters. What a graph needs, and how the trainer provides it:

- **Static tensors.** A replay reads its inputs from, and writes its outputs to, the tensors of the capture. Each
  batch is copied into the captured batch (``copy_batch``: same keys, shapes and dtypes, or a clear error), the
  loader drops a last partial batch, and the loss and logs come back in the same tensors every step.
- **Nothing that waits for the host.** No ``.item()``, no host-to-device copies of pageable memory, no Python
  decisions on tensor values inside the step. The optimizer is torch's AdamW with ``capturable=True`` and each
  group's learning rate a device tensor the schedule fills in place (``capturable_lr``), so the schedule still
  applies; the finite-loss check reads the loss after the replay, outside the graph.
- **Randomness that advances.** The noise, timesteps and latent samples come from the run's CUDA generator,
  registered with the graph: each replay draws new numbers, as an eager step would.
- **Warm-up off the record.** Capture needs the lazily built state (optimizer moments, cuBLAS workspaces, the
  scheduler's tables on the device) to exist, so ``CapturedStep`` runs a few eager steps on a side stream first, then
  puts the trained tensors, the optimizer state and the generator back as they were: the captured run trains the same
  steps on the same batches as the eager one.

Validation, checkpoints and logging run between replays, outside the graph, on the tensors the replays update in
place. What cannot be captured is refused before the model loads (``RunConfig.validate``, ``Task.capture_refusal``,
the trainer's device check), with the flag to drop; nothing falls back to eager silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["CaptureError", "CapturedStep", "capturable_lr", "copy_batch"]

FLAG = "--cuda_graphs"


class CaptureError(RuntimeError):
    """A step could not be captured or replayed; the message says what to drop."""


def copy_batch(static: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    """Copy ``batch`` into the captured ``static`` batch; a batch of other keys, shapes or dtypes is refused (a
    graph replays one shape)."""
    if static.keys() != batch.keys():
        raise CaptureError(
            f"{FLAG}: a batch brought the fields {sorted(batch)} but the step was captured with {sorted(static)}; "
            f"drop {FLAG} for data whose batches differ"
        )
    for key, value in batch.items():
        target = static[key]
        if value.shape != target.shape or value.dtype != target.dtype:
            raise CaptureError(
                f"{FLAG}: the batch's '{key}' is {tuple(value.shape)} {value.dtype}, but the step was captured with "
                f"{tuple(target.shape)} {target.dtype}; a graph replays one shape, so every batch must be alike "
                f"(one resolution, full batches). Drop {FLAG} to train on batches of different shapes"
            )
        target.copy_(value, non_blocking=True)


def capturable_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every group's learning rate a tensor on ``device`` (a captured optimizer step reads it there, so the
    schedule's in-place updates reach the replays) and record its float as ``initial_lr`` (the schedule computes from
    it without reading the device). Also after loading a checkpoint, which may bring the rates back on the CPU."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr)
        group.setdefault("initial_lr", value)
        if isinstance(group["initial_lr"], torch.Tensor):
            group["initial_lr"] = float(group["initial_lr"])
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)


def _tensor_state(optimizer: torch.optim.Optimizer) -> dict:
    return {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in optimizer.state.items()}


def _restore_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put the optimizer's tensors back as ``saved`` holds them; state built since (a fresh run's first steps) goes
    back to AdamW's zeros, in place, so the capture finds it allocated."""
    for param, state in optimizer.state.items():
        before = saved.get(param, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in before:
                value.copy_(before[key])
            else:
                value.zero_()


class CapturedStep:
    """``body(batch)`` (one training step: loss, backward, clipping, optimizer step; returns tensors) captured as a
    CUDA graph on its first call and replayed on the next ones.

    ``params`` are the trained tensors and ``generators`` the CUDA generators the step draws from: both are put back
    after the ``warmup`` eager steps, so the first call trains exactly one step. The gradients stay allocated between
    replays (the graph writes them): do not set them to None while it lives."""

    def __init__(
        self,
        body: Callable[[dict], object],
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor],
        generators: Iterable[torch.Generator] = (),
        warmup: int = 3,
    ):
        self.body, self.optimizer, self.warmup = body, optimizer, warmup
        self.params, self.generators = list(params), list(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.outputs = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: dict[str, torch.Tensor]):
        if self.graph is None:
            self._capture(batch)
        else:
            copy_batch(self.static, batch)
        self.graph.replay()
        return self.outputs

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
                raise CaptureError(f"{FLAG}: the batch's '{key}' is not a CUDA tensor; drop {FLAG}")
        params = [p.detach().clone() for p in self.params]
        optimizer_state = _tensor_state(self.optimizer)
        rng = [g.get_state() for g in self.generators]
        self.static = {key: value.clone() for key, value in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: builds the lazy state the capture needs, then is undone
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.body(self.static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for param, value in zip(self.params, params):
                param.copy_(value)
        _restore_state(self.optimizer, optimizer_state)
        for generator, state in zip(self.generators, rng):
            generator.set_state(state)
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.body(self.static)
        except Exception as err:
            graph.reset()
            raise CaptureError(
                f"{FLAG}: the training step could not be captured as a CUDA graph ({type(err).__name__}: {err}). "
                f"Something in the step waits for the host or changes shape; drop {FLAG} to train eagerly"
            ) from err
        self.graph = graph
