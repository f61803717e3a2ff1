"""Speed and memory of ETHER against the frozen-model floor and its peers, measured side by side in one process.

    python scripts/bench_speed.py                 # CPU, fp32: SD-1.5 UNet, latents 16² and 32², batch 1 and 4
    python scripts/bench_speed.py --full          # adds 64² latents
    python scripts/bench_speed.py --device cuda   # every row of issue 18, bf16 autocast (scripts/gpu_speed.sh)
    python scripts/bench_speed.py --quick         # tiny UNets, the same rows: a smoke test (CI), not a measurement

Variants are interleaved: every round visits every variant once (set it up, warm up, time, take it down), the order
rotated by one each round, so that the machine's drift over minutes falls on all of them alike. A time is the median
over rounds with its range; a ratio is taken within each round (variant / floor of the same round) and reported as
the median and range of those per-round ratios. Peak memory is what a training step adds on top of the loaded model
(CPU: peak resident set after resetting the kernel's high-water mark; GPU: ``max_memory_allocated``).

``--profile cuda`` (the default on a GPU) measures issue 18's table: the SD-1.5 UNet at 64² latents, batch 1 and 4
(floor, ETHER n=1, ETHER+ two-sided n=1, PEFT LoRA r=4), the SDXL UNet at 128² with gradient checkpointing, 25-step
sampling unfused and fused against the base model, and a host-sync check of every adapted layer's forward and
backward under ``torch.cuda.set_sync_debug_mode("error")``. The models are the real architectures built from their
configs (below) with random weights: nothing is downloaded. Writes a markdown report and a JSON file after each
section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ether_diffusion import (
    EtherConfig,
    adapter_parameters,
    count_parameters,
    eject,
    inject,
    load_adapter,
    mark_only_adapters_trainable,
    merge_adapters,
    mixed_batch,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from ether_diffusion.architectures import SD15_UNET, SDXL_UNET
from ether_diffusion.config import TARGET_PRESETS
from ether_diffusion.layers import EtherLayer

TARGETS = list(TARGET_PRESETS["unet-attention"])

# --- the models: configs of the published UNets (random weights), and tiny ones for --quick ---------------------

TINY_SD15_UNET = dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_SDXL_UNET = dict(  # SDXL's structure (text_time conditioning, linear projections) at toy widths
    sample_size=8,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=1,
)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with device:  # initialised where it runs: SDXL's 2.6 B weights are drawn on the GPU, not copied there
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype)


def conditioning(unet, batch: int, generator: torch.Generator, device, dtype) -> tuple[torch.Tensor, dict]:
    """Text context (B, 77, C), and for SDXL's text_time UNet the pooled text embedding and the six size/crop ids."""
    config = unet.config
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype)
    if config.addition_embed_type != "text_time":
        return context, {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
    added = {"text_embeds": torch.randn(batch, pooled, generator=generator), "time_ids": ids}
    return context, {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in added.items()}}


def autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --- measuring ------------------------------------------------------------------------------------------------


class Meter:
    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device = device
        # "cpu" counts the process's CPU time: on a machine shared with other work, time spent waiting for a core
        # is not counted (use with --threads 1, where it equals the work done)
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the current footprint in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, so RSS tracks live tensors
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def seconds_per_call(self, fn, calls: int) -> float:
        self.sync()
        start = self.clock()
        for _ in range(calls):
            fn()
        self.sync()
        return (self.clock() - start) / calls


def interleaved(names: list[str], rounds: int, visit: Callable[[str], object]) -> dict[str, list]:
    """``visit(name)`` for every name once per round, the order rotated by one each round; results per name, in
    round order (so that index r of two names pairs results of the same round)."""
    results = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(visit(name))
    return results


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of ``values`` (quartiles equal the median for fewer than two values)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return dict(median=statistics.median(ordered), min=ordered[0], max=ordered[-1], q1=q1, q3=q3)


def timings(times: list[float], floor: list[float]) -> dict:
    """A variant's per-round times, their spread, and the spread of its per-round ratios to the floor's."""
    return dict(times=times, time=spread(times), ratio=spread([t / f for t, f in zip(times, floor)]))


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """On CUDA every operation that makes the host wait for the device raises inside this block
    (``torch.cuda.set_sync_debug_mode("error")``); yields whether anything is checked (nothing on a CPU)."""
    if device.type != "cuda":
        yield False
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield True
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# --- the variants -------------------------------------------------------------------------------------------


def target_modules(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    config = EtherConfig(target_modules=TARGETS)
    return [(n, m) for n, m in unet.named_modules() if n and config.is_target(n) and isinstance(m, nn.Linear)]


def _set(model: nn.Module, path: str, module: nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def floor_variant(unet):
    """The frozen UNet with one trainable scalar scaling each targeted layer's output: the whole backward runs."""
    unet.requires_grad_(False)
    scales, handles = [], []
    for _, module in target_modules(unet):
        scale = nn.Parameter(torch.ones((), device=module.weight.device))
        scales.append(scale)
        handles.append(module.register_forward_hook(lambda m, i, out, s=scale: out * s.to(out.dtype)))
    try:
        yield scales
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def ether_variant(unet, method: str, n_blocks: int):
    inject(unet, EtherConfig(method=method, n_blocks=n_blocks, target_modules=TARGETS), "bench")
    params = mark_only_adapters_trainable(unet)
    for p in params:
        p.data = p.data.float()  # trainables in fp32 when the frozen model runs in low precision
    try:
        yield params
    finally:
        eject(unet)


class DenseEtherLinear(nn.Module):
    """ETHER as the official code computes it: dense (n, b, b) reflections and a rebuilt weight every forward."""

    def __init__(self, base: nn.Linear, n_blocks: int):
        super().__init__()
        self.base = base
        self.n_blocks = n_blocks
        self.u = nn.Parameter(torch.randn(n_blocks, base.in_features // n_blocks, device=base.weight.device))

    def forward(self, x):
        n, b = self.u.shape
        u = self.u / self.u.norm(dim=-1, keepdim=True)
        eye = torch.eye(b, device=u.device, dtype=u.dtype)
        reflections = eye - 2 * torch.einsum("ni,nj->nij", u, u)  # (n, b, b)
        weight = self.base.weight.view(-1, n, b).to(u.dtype)
        new_weight = torch.einsum("onb,nbc->onc", weight, reflections).reshape(self.base.weight.shape)
        return F.linear(x, new_weight.to(x.dtype), self.base.bias)


@contextlib.contextmanager
def dense_ether_variant(unet, n_blocks: int = 1):
    originals = target_modules(unet)
    unet.requires_grad_(False)
    wrappers = [DenseEtherLinear(m, n_blocks) for _, m in originals]
    for (path, _), wrapper in zip(originals, wrappers):
        _set(unet, path, wrapper)
    try:
        yield [w.u for w in wrappers]
    finally:
        for path, module in originals:
            _set(unet, path, module)


@contextlib.contextmanager
def peft_variant(unet, kind: str):
    import peft

    configs = {
        "hra": lambda: peft.HRAConfig(r=1, target_modules=TARGETS, init_weights=False),
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"),
        "oft": lambda: peft.OFTConfig(target_modules=TARGETS),
        "boft": lambda: peft.BOFTConfig(target_modules=TARGETS),
    }
    originals = dict(target_modules(unet))
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(configs[kind](), unet, adapter_name="bench")
    params = [p for n, p in unet.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    try:
        yield params
    finally:
        for path, module in originals.items():
            _set(unet, path, module)


class Variant(NamedTuple):
    label: str
    make: Callable  # unet -> a context manager that yields the trainable parameters
    peer: bool = False  # another library's method


VARIANTS: dict[str, Variant] = {
    "floor": Variant("floor (frozen + 1 scalar/layer)", floor_variant),
    "ether1": Variant("ETHER n=1", lambda u: ether_variant(u, "ether", 1)),
    "ether4": Variant("ETHER n=4", lambda u: ether_variant(u, "ether", 4)),
    "ether16": Variant("ETHER n=16", lambda u: ether_variant(u, "ether", 16)),
    "etherplus1": Variant("ETHER+ two-sided n=1", lambda u: ether_variant(u, "ether_plus", 1)),
    "etherplus4": Variant("ETHER+ two-sided n=4", lambda u: ether_variant(u, "ether_plus", 4)),
    "dense": Variant("official-style dense ETHER n=1", lambda u: dense_ether_variant(u, 1)),
    "hra": Variant("PEFT HRA r=1", lambda u: peft_variant(u, "hra"), peer=True),
    "lora": Variant("PEFT LoRA r=4", lambda u: peft_variant(u, "lora"), peer=True),
    "oft": Variant("PEFT OFT (default)", lambda u: peft_variant(u, "oft"), peer=True),
    "boft": Variant("PEFT BOFT (default)", lambda u: peft_variant(u, "boft"), peer=True),
}
#: issue 18's rows: the floor, ETHER, ETHER+ two-sided and the LoRA they are held against
ISSUE_VARIANTS = ["floor", "ether1", "etherplus1", "lora"]


# --- the measurements ---------------------------------------------------------------------------------------


def training_inputs(unet, size: int, batch: int, device, dtype):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    target = torch.randn(batch, 4, size, size, generator=generator).to(device)
    context, extra = conditioning(unet, batch, generator, device, dtype)
    return latents, timesteps, context, extra, target


def training_step(unet, inputs, optimizer, device, dtype):
    latents, timesteps, context, extra, target = inputs

    def step():
        with autocast(device, dtype):
            prediction = unet(latents, timesteps, context, **extra).sample
        F.mse_loss(prediction.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(unet, model: str, sizes, batches, keys, args, meter, device, dtype, checkpointing=False):
    """Training step (forward, backward, AdamW step) of every variant in ``keys``, interleaved per size and batch."""
    rows = []
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for size in sizes:
        for batch in batches:
            inputs = training_inputs(unet, size, batch, device, dtype)

            def visit(key, inputs=inputs):
                with VARIANTS[key].make(unet) as params:
                    step = training_step(unet, inputs, torch.optim.AdamW(params, lr=1e-4), device, dtype)
                    for _ in range(args.warmup):  # also creates the optimizer state
                        step()
                    base_memory = meter.reset_peak()
                    seconds = meter.seconds_per_call(step, args.steps_per_visit)
                    peak = (meter.peak() - base_memory) / 2**20
                    return seconds, peak, sum(p.numel() for p in params)

            visits = interleaved(keys, args.rounds, visit)
            floor = [seconds for seconds, _, _ in visits["floor"]]
            for key in keys:
                times = [seconds for seconds, _, _ in visits[key]]
                row = dict(
                    model=model,
                    size=size,
                    batch=batch,
                    checkpointing=checkpointing,
                    variant=VARIANTS[key].label,
                    key=key,
                    **timings(times, floor),
                    peak_extra_mb=spread([peak for _, peak, _ in visits[key]]),
                    trainable=visits[key][0][2],
                )
                rows.append(row)
                print(
                    f"  train {model} {size}² b{batch} {row['variant']:<32} {row['time']['median'] * 1e3:9.1f} ms "
                    f"({row['time']['min'] * 1e3:.1f}-{row['time']['max'] * 1e3:.1f})  ×floor "
                    f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.3f}-{row['ratio']['max']:.3f})  "
                    f"+{row['peak_extra_mb']['median']:7.0f} MB  {row['trainable']:>10,} params",
                    flush=True,
                )
    if checkpointing:
        unet.disable_gradient_checkpointing()
    return rows


def adapted_layer_inputs(unet, inputs, device, dtype) -> tuple[list[EtherLayer], dict]:
    """The UNet's adapted layers and the input each sees in one no-grad forward of ``inputs``."""
    latents, timesteps, context, extra, _ = inputs
    layers = [m for m in unet.modules() if isinstance(m, EtherLayer)]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0].detach())) for m in layers]
    with torch.no_grad(), autocast(device, dtype):
        unet(latents, timesteps, context, **extra)
    for hook in hooks:
        hook.remove()
    return layers, seen


def bench_sync(unet, model: str, args, device, dtype):
    """Every adapted layer's training forward + backward and its sampling forward under ``no_host_sync``, fed the
    activations it sees in the UNet; then the whole training step (UNet, loss, AdamW), which tells whether the model
    and optimizer around the adapters are sync-free too (the floor's row)."""
    rows = []
    inputs = training_inputs(unet, args.sizes[0], 1, device, dtype)
    for key in ("ether1", "etherplus1"):
        with VARIANTS[key].make(unet):
            layers, seen = adapted_layer_inputs(unet, inputs, device, dtype)
            for check, training in (("training forward + backward", True), ("sampling forward", False)):
                rows.append(dict(variant=VARIANTS[key].label, check=f"{len(layers)} layers, {check}"))
                try:
                    with no_host_sync(device) as checked:
                        for layer in layers:
                            x = seen[layer].clone().requires_grad_(training)
                            with torch.set_grad_enabled(training), autocast(device, dtype):
                                y = layer(x)
                            if training:
                                y.backward(torch.ones_like(y))
                    rows[-1]["result"] = "no host sync" if checked else f"not checkable on {device.type}"
                except RuntimeError as error:
                    rows[-1]["result"] = "SYNC: " + str(error).strip().splitlines()[0]
                print(f"  sync {model} {rows[-1]['variant']:<24} {rows[-1]['check']:<40} {rows[-1]['result']}")
    for key in ("floor", "ether1", "etherplus1"):
        with VARIANTS[key].make(unet) as params:
            step = training_step(unet, inputs, torch.optim.AdamW(params, lr=1e-4), device, dtype)
            step()
            rows.append(dict(variant=VARIANTS[key].label, check="whole training step (UNet, loss, AdamW)"))
            try:
                with no_host_sync(device) as checked:
                    step()
                rows[-1]["result"] = "no host sync" if checked else f"not checkable on {device.type}"
            except RuntimeError as error:
                rows[-1]["result"] = "SYNC: " + str(error).strip().splitlines()[0]
            print(f"  sync {model} {rows[-1]['variant']:<24} {rows[-1]['check']:<40} {rows[-1]['result']}")
    return rows


def bench_compiled_training(unet, args, meter, device, dtype):
    """The training step with the UNet's transformer blocks under ``torch.compile(fullgraph=True)``: diffusers'
    regional compilation (``compile_repeated_blocks``), which compiles one graph per block shape instead of the whole
    UNet (a whole-UNet compile did not finish its first step within six minutes on an H200). One copy of the UNet per
    variant (floor, ETHER, ETHER+), each compiled in its first visit, then interleaved rounds."""
    import copy

    keys = [key for key in ("floor", "ether1", "etherplus1") if key in args.variants]
    size, batch = args.sizes[0], args.batches[0]
    inputs = training_inputs(unet, size, batch, device, dtype)
    steps, trainable, compile_s = {}, {}, {}
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        # every block shape of every variant is its own graph: more than dynamo's default of 8 per function
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=64))
        for key in keys:
            model = copy.deepcopy(unet)
            params = stack.enter_context(VARIANTS[key].make(model))
            trainable[key] = sum(p.numel() for p in params)
            model.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
            steps[key] = training_step(model, inputs, torch.optim.AdamW(params, lr=1e-4), device, dtype)

        def visit(key):
            if key not in compile_s:
                started = time.perf_counter()
                steps[key]()
                meter.sync()
                compile_s[key] = time.perf_counter() - started
            for _ in range(args.warmup):
                steps[key]()
            return meter.seconds_per_call(steps[key], args.steps_per_visit)

        visits = interleaved(keys, args.rounds, visit)
    torch._dynamo.reset()
    rows = []
    for key in keys:
        row = dict(
            model="SD-1.5 UNet" + (" (tiny)" if args.quick else "") + ", blocks compiled",
            size=size,
            batch=batch,
            variant=VARIANTS[key].label,
            key=key,
            **timings(visits[key], visits["floor"]),
            trainable=trainable[key],
            compile_s=compile_s[key],
        )
        rows.append(row)
        print(
            f"  compiled {size}² b{batch} {row['variant']:<32} {row['time']['median'] * 1e3:9.1f} ms  ×floor "
            f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.3f}-{row['ratio']['max']:.3f})  "
            f"first step {compile_s[key]:.0f} s",
            flush=True,
        )
    return rows


def bench_compile(unet, args, device, dtype):
    """Every adapted layer of the UNet (ETHER and ETHER+ n=1), fed the activations it sees at ``--sizes[0]``,
    compiled with ``torch.compile(fullgraph=True)`` (inductor: Triton kernels on a GPU; any graph break raises):
    forward and backward compared with eager under the run's autocast."""
    rows = []
    inputs = training_inputs(unet, args.sizes[0], 1, device, dtype)
    for key in ("ether1", "etherplus1"):
        with VARIANTS[key].make(unet):
            layers, seen = adapted_layer_inputs(unet, inputs, device, dtype)
            # one layer per (input shape, dtype, weight shape): the rest would only recompile the same graph
            signatures = {}
            for layer in layers:
                signatures.setdefault(
                    (tuple(seen[layer].shape), seen[layer].dtype, layer.in_features, layer.out_features), layer
                )
            layers = list(signatures.values())
            row = dict(variant=VARIANTS[key].label, backend=args.compile_backend, layers=len(layers), max_error="")
            started = time.perf_counter()
            try:
                worst = 0.0
                for layer in layers:
                    torch._dynamo.reset()
                    x = seen[layer].clone().requires_grad_(True)
                    outputs = []
                    for fn in (layer, torch.compile(layer, fullgraph=True, backend=args.compile_backend)):
                        x.grad = None
                        with autocast(device, dtype):
                            y = fn(x)
                        y.float().square().mean().backward()
                        outputs += [y.float(), x.grad.float()]
                    for eager, compiled in ((outputs[0], outputs[2]), (outputs[1], outputs[3])):
                        scale = max(eager.abs().max().item(), 1e-12)
                        worst = max(worst, (eager - compiled).abs().max().item() / scale)
                row["max_error"] = f"{worst:.1e} of the largest value (output, input gradient)"
                row["result"] = f"compiled, no graph break ({time.perf_counter() - started:.0f} s)"
            except Exception as error:
                row["result"] = "FAILED: " + f"{type(error).__name__}: {error}".strip().splitlines()[0][:200]
            print(f"  compile {row['variant']:<24} {row['layers']} layer shapes {row['max_error']} {row['result']}")
            rows.append(row)
    torch._dynamo.reset()
    return rows


def sample_loop(unet, latents, context, steps, device, dtype):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    uncond = torch.zeros_like(context)
    x = latents
    with torch.no_grad(), autocast(device, dtype):
        for t in scheduler.timesteps:
            noise = unet(torch.cat([x, x]), t, torch.cat([uncond, context])).sample
            noise_uncond, noise_cond = noise.chunk(2)
            x = scheduler.step(noise_uncond + 7.5 * (noise_cond - noise_uncond), t, x).prev_sample
    return x


def randomized(unet, name, method, seed):
    inject(unet, EtherConfig(method=method, target_modules=TARGETS), name, activate=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, name):
            p.copy_(torch.randn(p.shape, generator=generator).to(p))


@contextlib.contextmanager
def sampling_state(unet, method: str | None, fused: bool):
    """The base UNet (``method=None``), or one random adapter of ``method``, unfused or merged into the weights."""
    if method is None:
        yield
        return
    randomized(unet, "one", method, 1)
    set_active_adapters(unet, ["one"])
    if fused:
        merge_adapters(unet)
    try:
        yield
    finally:
        if fused:
            unmerge_adapters(unet)
        eject(unet)


def sampling_rows(name_of, visits, reference, label, **fields):
    rows = []
    for key, times in visits.items():
        ratio = spread([t / r for t, r in zip(times, visits[reference])])
        rows.append(dict(variant=name_of[key], times=times, time=spread(times), ratio=ratio, ratio_to=label, **fields))
        print(
            f"  sample {name_of[key]:<40} {rows[-1]['time']['median']:8.3f} s "
            f"({rows[-1]['time']['min']:.3f}-{rows[-1]['time']['max']:.3f})  {ratio['median']:.3f} {label} "
            f"({ratio['min']:.3f}-{ratio['max']:.3f})",
            flush=True,
        )
    return rows


def bench_inference(unet, args, meter, device, dtype):
    """``--steps`` DDIM steps with classifier-free guidance: base, ETHER and ETHER+ unfused and fused, interleaved;
    then a batch of 8 prompts with 8 different ETHER+ adapters against the same batch with one."""
    unet.requires_grad_(False)
    size = args.sizes[0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator).to(device, dtype)
    context, _ = conditioning(unet, 1, generator, device, dtype)
    states = {
        "base": (None, False),
        "ETHER unfused": ("ether", False),
        "ETHER fused": ("ether", True),
        "ETHER+ two-sided unfused": ("ether_plus", False),
        "ETHER+ two-sided fused": ("ether_plus", True),
    }

    def visit(name):
        with sampling_state(unet, *states[name]):
            sample_loop(unet, latents, context, 1, device, dtype)  # warm-up: factors, kernels, allocator
            return meter.seconds_per_call(lambda: sample_loop(unet, latents, context, args.steps, device, dtype), 1)

    visits = interleaved(list(states), args.rounds, visit)
    rows = sampling_rows({n: n for n in states}, visits, "base", "× base", steps=args.steps, batch=1, size=size)

    batch = 8
    names = [f"user{i}" for i in range(batch)]
    for i, name in enumerate(names):
        randomized(unet, name, "ether_plus", 10 + i)
    latents8 = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    context8, _ = conditioning(unet, batch, generator, device, dtype)
    set_active_adapters(unet, [names[0]])

    def visit_mixed(name):
        with mixed_batch(unet, names) if name == "mixed" else contextlib.nullcontext():
            sample_loop(unet, latents8, context8, 1, device, dtype)
            return meter.seconds_per_call(
                lambda: sample_loop(unet, latents8, context8, args.mixed_steps, device, dtype), 1
            )

    visits = interleaved(["one", "mixed"], args.rounds, visit_mixed)
    labels = {"one": f"batch {batch}, one adapter", "mixed": f"batch {batch}, {batch} different adapters"}
    rows += sampling_rows(labels, visits, "one", "× one adapter", steps=args.mixed_steps, batch=batch, size=size)
    eject(unet)
    return rows


def bench_adapters(unet, args, meter):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method, label in (("ether", "ETHER"), ("ether_plus", "ETHER+ two-sided")):
            randomized(unet, "a", method, 1)
            path = save_adapter(Path(folder) / f"{method}.safetensors", {"unet": unet}, "a")
            params = count_parameters(unet, "a")
            eject(unet)
            load_times = []
            for _ in range(args.rounds * 2):
                start = time.perf_counter()
                load_adapter(path, {"unet": unet}, "loaded")  # read, validate, inject, copy, activate
                load_times.append(time.perf_counter() - start)
                eject(unet)
            load_adapter(path, {"unet": unet}, "x")
            load_adapter(path, {"unet": unet}, "y")
            switch_times = []
            for i in range(args.rounds * 2):
                start = time.perf_counter()
                set_active_adapters(unet, ["x" if i % 2 else "y"])
                switch_times.append(time.perf_counter() - start)
            eject(unet)
            rows.append(
                dict(
                    method=label,
                    parameters=params,
                    file_bytes=path.stat().st_size,
                    load_ms=statistics.median(load_times) * 1e3,
                    switch_ms=statistics.median(switch_times) * 1e3,
                )
            )
            print(
                f"  adapter {label:<18} {path.stat().st_size / 1024:8.0f} KiB  load {rows[-1]['load_ms']:.1f} ms  "
                f"switch {rows[-1]['switch_ms']:.2f} ms",
                flush=True,
            )
    return rows


# --- report -------------------------------------------------------------------------------------------------


# --- report -------------------------------------------------------------------------------------------------


def machine_description(device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def _range(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stats['min'] * scale:.{digits}f}–{stats['max'] * scale:.{digits}f}"


def markdown(result) -> str:
    lines = [
        f"# Speed benchmark ({result['device']}, {result['dtype']})",
        "",
        f"Machine: {result['machine']}  ",
        f"Command: `{result['command']}`  ",
        f"{result['date']}; {result['rounds']} interleaved rounds (every round runs every variant once, the order "
        f"rotated), {result['steps_per_visit']} timed step(s) per visit after {result['warmup']} warm-up step(s); "
        f"clock: {result['clock']}; medians with min–max over rounds; a ratio is taken within each round. "
        f"Total {result.get('elapsed_s', 0):.0f} s.",
        "",
    ]
    train = [row for section in ("training", "sdxl") for row in result.get(section, [])]
    if train:
        lines += [
            "## Training step (forward, backward, AdamW step)",
            "",
            "| model | latents | batch | variant | trainable | median ms | min–max ms | × floor | × floor min–max "
            "| peak extra MB | × floor mem |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in train:
            floor = next(
                r
                for r in train
                if (r["model"], r["size"], r["batch"], r["key"]) == (row["model"], row["size"], row["batch"], "floor")
            )
            floor_mb = floor["peak_extra_mb"]["median"]
            mem = row["peak_extra_mb"]["median"] / floor_mb if floor_mb > 0 else float("nan")
            model = row["model"] + (" (gradient checkpointing)" if row["checkpointing"] else "")
            lines.append(
                f"| {model} | {row['size']}² | {row['batch']} | {row['variant']} | {row['trainable']:,} | "
                f"{row['time']['median'] * 1e3:.1f} | {_range(row['time'], 1e3)} | {row['ratio']['median']:.3f} | "
                f"{_range(row['ratio'], digits=3)} | {row['peak_extra_mb']['median']:.0f} | {mem:.2f} |"
            )
    sync = result.get("sync", [])
    if sync:
        lines += ["", "## Host-device synchronisation", "", "| variant | what ran | result |", "|---|---|---|"]
        lines += [f"| {row['variant']} | {row['check']} | {row['result']} |" for row in sync]
    infer = result.get("inference", [])
    if infer:
        lines += [
            "",
            "## Sampling (DDIM, classifier-free guidance)",
            "",
            "| variant | latents | prompts | steps | median s | min–max s | ratio | ratio min–max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in infer:
            lines.append(
                f"| {row['variant']} | {row['size']}² | {row['batch']} | {row['steps']} | {row['time']['median']:.3f} "
                f"| {_range(row['time'], digits=3)} | {row['ratio']['median']:.3f} {row['ratio_to']} | "
                f"{_range(row['ratio'], digits=3)} |"
            )
    whole = result.get("compiled", [])
    if whole:
        lines += ["", "## Training step with the transformer blocks under torch.compile (fullgraph)", ""]
        lines += [
            "| model | latents | batch | variant | median ms | min–max ms | × floor | × floor min–max | first step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['model']} | {row['size']}² | {row['batch']} | {row['variant']} "
            f"| {row['time']['median'] * 1e3:.1f} "
            f"| {_range(row['time'], 1e3)} | {row['ratio']['median']:.3f} | {_range(row['ratio'], digits=3)} "
            f"| {row['compile_s']:.0f} |"
            for row in whole
        ]
    compiled = result.get("compile", [])
    if compiled:
        lines += ["", "## torch.compile(fullgraph=True) of the adapted layers", ""]
        lines += [
            "| variant | backend | distinct layer shapes | forward + backward vs eager | result |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['variant']} | {row['backend']} | {row['layers']} | {row['max_error']} | {row['result']} |"
            for row in compiled
        ]
    errors = result.get("errors", {})
    if errors:
        lines += ["", "## Sections that failed", ""] + [f"- {name}: `{text}`" for name, text in errors.items()]
    adapters = result.get("adapters", [])
    if adapters:
        lines += [
            "",
            "## Adapter files",
            "",
            "| method | parameters | file KiB | load + activate ms | switch ms |",
            "|---|---|---|---|---|",
        ]
        for row in adapters:
            lines.append(
                f"| {row['method']} | {row['parameters']:,} | {row['file_bytes'] / 1024:.0f} | "
                f"{row['load_ms']:.1f} | {row['switch_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


SECTIONS = ("training", "sync", "sdxl", "inference", "compiled", "compile", "adapters")
PROFILES = {  # what a plain run measures, per device kind
    "cpu": dict(sections=["training", "inference", "adapters"], variants=list(VARIANTS), sizes=[16, 32]),
    "cuda": dict(
        sections=["training", "sync", "sdxl", "inference", "compiled", "compile"], variants=ISSUE_VARIANTS, sizes=[64]
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny UNets, two rounds, small sizes: a smoke test")
    parser.add_argument("--full", action="store_true", help="also measure 64×64 latents (CPU profile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default=None, help="which rows (default: the device's kind)"
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: fp32 on CPU, bf16 autocast on GPU"
    )
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None, help="default 5 (CPU 3)")
    parser.add_argument("--steps_per_visit", type=int, default=None, help="timed steps per visit (CPU 1, GPU 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per visit (CPU 1, GPU 2)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="SD-1.5 latent sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sdxl_size", type=int, default=128, help="SDXL latent size (batch 1)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps for base/unfused/fused")
    parser.add_argument("--mixed_steps", type=int, default=5, help="sampling steps for the batch-of-8 comparison")
    parser.add_argument("--sections", nargs="+", default=None, choices=SECTIONS, help="default: the profile's")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: the profile's")
    parser.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend of the compile sections (tests: aot_eager)"
    )
    parser.add_argument("--skip_peers", action="store_true", help="skip the PEFT variants")
    parser.add_argument("--output_dir", default="docs/benchmarks", help="where speed_<device>.md/.json go")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.profile = args.profile or ("cuda" if gpu else "cpu")
    profile = PROFILES[args.profile]
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    if args.sizes is None:
        args.sizes = profile["sizes"] + ([64] if args.full and 64 not in profile["sizes"] else [])
    args.sections = args.sections or (list(SECTIONS) if args.quick else profile["sections"])
    args.variants = args.variants or profile["variants"]
    if args.skip_peers:
        args.variants = [key for key in args.variants if not VARIANTS[key].peer]
    args.variants = ["floor"] + [key for key in args.variants if key != "floor"]  # every ratio needs the floor
    args.rounds = args.rounds or (3 if not gpu else 5)
    args.steps_per_visit = args.steps_per_visit or (5 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.quick:
        args.rounds, args.steps_per_visit, args.warmup = 2, 1, 1
        args.sizes, args.batches, args.sdxl_size, args.steps, args.mixed_steps = [8], [1], 8, 2, 2
    for name in ("rounds", "steps_per_visit"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(args) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    # on a GPU the frozen weights are cast to the low-precision dtype, the trainables kept in fp32 (diffusers' way)
    weights = torch.float32 if device.type == "cpu" else dtype
    meter = Meter(device, args.clock)
    result = dict(
        device=str(device),
        dtype=args.dtype,
        profile=args.profile,
        machine=machine_description(device),
        command="python " + " ".join([sys.argv[0], *sys.argv[1:]]) if sys.argv else "",
        rounds=args.rounds,
        steps_per_visit=args.steps_per_visit,
        warmup=args.warmup,
        clock=args.clock,
        date=time.strftime("%Y-%m-%d %H:%M"),
        variants=[VARIANTS[key].label for key in args.variants],
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{device.type}" + ("_quick" if args.quick else "")
    sd15 = build_unet(TINY_SD15_UNET if args.quick else SD15_UNET, device, weights)
    sd15_name = "SD-1.5 UNet" + (" (tiny)" if args.quick else "")
    sections = {
        "training": lambda: bench_training(
            sd15, sd15_name, args.sizes, args.batches, args.variants, args, meter, device, dtype
        ),
        "sync": lambda: bench_sync(sd15, sd15_name, args, device, dtype),
        "sdxl": lambda: bench_sdxl(args, meter, device, dtype, weights),
        "inference": lambda: bench_inference(sd15, args, meter, device, dtype),
        "compiled": lambda: bench_compiled_training(sd15, args, meter, device, dtype),
        "compile": lambda: bench_compile(sd15, args, device, dtype),
        "adapters": lambda: bench_adapters(sd15, args, meter),
    }
    for name in [s for s in SECTIONS if s in args.sections]:
        section_start = time.perf_counter()
        print(f"{name} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        try:
            result[name] = sections[name]()
        except Exception as error:  # a device run is one shot: a failing section is reported, the next ones still run
            if args.quick:
                raise
            result.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"  {name} failed: {result['errors'][name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result.setdefault("section_s", {})[name] = time.perf_counter() - section_start
        result["elapsed_s"] = time.perf_counter() - started
        # the report is rewritten after each section: a run cut short keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def bench_sdxl(args, meter, device, dtype, weights):
    """The SDXL UNet's training step at ``--sdxl_size``, batch 1, gradient checkpointing on (issue 18's rows)."""
    unet = build_unet(TINY_SDXL_UNET if args.quick else SDXL_UNET, device, weights)
    keys = [key for key in ISSUE_VARIANTS if key in args.variants]
    name = "SDXL UNet" + (" (tiny)" if args.quick else "")
    rows = bench_training(unet, name, [args.sdxl_size], [1], keys, args, meter, device, dtype, checkpointing=True)
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main(parse_args())
