"""Speed and memory of ETHER against the frozen-model floor and its peers, measured side by side in one process.

    ether-diffusion bench speed                 # CPU, fp32: SD-1.5 UNet, latents 16² and 32², batch 1 and 4
    ether-diffusion bench speed --full          # adds 64² latents
    ether-diffusion bench speed --device cuda   # the GPU table of docs/performance.md, bf16 autocast
    ether-diffusion bench speed --quick         # tiny UNets, the same rows: a smoke test (CI), not a measurement

Variants (``speed_variants``) are interleaved (``timing``): every round visits every variant once (set it up, warm up,
time, take it down), the order rotated by one each round, so that the machine's drift over minutes falls on all of
them alike. A time is the median over rounds with its range; a ratio is taken within each round (variant / floor of
the same round) and reported as the median and range of those per-round ratios. Peak memory is what a training step
adds on top of the loaded model (CPU: peak resident set after resetting the kernel's high-water mark; GPU:
``max_memory_allocated``).

``--profile cuda`` (the default on a GPU) measures the GPU table of docs/performance.md: the SD-1.5 UNet at 64² latents,
batch 1 and 4 (floor, ETHER n=1, ETHER+ two-sided n=1, PEFT LoRA r=4), the SDXL UNet at 128² with gradient
checkpointing, 25-step sampling unfused and fused against the base model, and a host-sync check of every adapted layer's
forward and backward under ``torch.cuda.set_sync_debug_mode("error")``. The models are the real architectures built from
their configs with random weights: nothing is downloaded. Writes ``speed_<device>.md`` (``speed_report``) and
``speed_<device>.json`` into ``--output_dir`` after each section, so a run cut short keeps what it measured: by default
``docs/benchmarks``, and for ``--quick`` a new temporary folder (the run prints where), so a smoke test never writes
into a checkout."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..architectures import SD15_UNET, SDXL_UNET
from ..config import DTYPES, TARGET_PRESETS, EtherConfig
from ..inject import (
    adapter_layers,
    adapter_parameters,
    count_parameters,
    eject,
    inject,
    merge_adapters,
    mixed_batch,
    set_active_adapters,
    unmerge_adapters,
)
from ..io import load_adapter, save_adapter
from ..layers import EtherLayer
from ..slots import SlotPlan, SlotRoute
from ..training.graphs import CapturedStep, capturable_lr
from .speed_report import markdown
from .speed_variants import (
    ISSUE_VARIANTS,
    TARGETS,
    TINY_SD15_UNET,
    TINY_SDXL_UNET,
    VARIANTS,
    autocast,
    build_unet,
    conditioning,
)
from .timing import Meter, interleaved, machine_description, no_host_sync, spread, timings

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


def timed_visit(steps: dict, key: str, first_s: dict, meter, args) -> float:
    """One interleaved visit of ``steps[key]``: its first call timed alone into ``first_s`` on the first visit (a
    compile or a capture), then ``--warmup`` untimed calls and the timed ones."""
    if key not in first_s:
        started = time.perf_counter()
        steps[key]()
        meter.sync()
        first_s[key] = time.perf_counter() - started
    for _ in range(args.warmup):
        steps[key]()
    return meter.seconds_per_call(steps[key], args.steps_per_visit)


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

        visits = interleaved(keys, args.rounds, lambda key: timed_visit(steps, key, compile_s, meter, args))
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


PACK_SAMPLES = 2  # per run and step: one instance and one class image (DreamBooth with prior preservation)


@contextlib.contextmanager
def packed_runs(unet, count: int, device):
    """``count`` ETHER+ adapters (``pack0``...) on the UNet's attention (the default DreamBooth targets), each run's
    samples routed to its own (``slots.SlotRoute`` and its ``SlotPlan``) as a packed step does; one adapter alone is
    a solo run's step. Yields the runs' parameter lists and the plan to prepare before each forward (None alone)."""
    config = EtherConfig(method="ether_plus", n_blocks=1, target_modules=TARGET_PRESETS["unet-attention-image"])
    names = [f"pack{k}" for k in range(count)]
    runs = []
    for name in names:
        inject(unet, config, name, activate=False)
        params = adapter_parameters(unet, name)
        for p in params:
            p.data = p.data.float()  # trainables in fp32 when the frozen model runs in low precision
            p.requires_grad_(True)
        runs.append(params)
    route = SlotRoute(names)
    if count > 1:  # as the packed trainer routes: every layer's rows made in one batch per step (prepare)
        route.assign([PACK_SAMPLES] * count, device)
        layers = [layer for _, layer in adapter_layers(unet)]
        for layer in layers:
            layer.route_slots(route)
        route.plan = SlotPlan(layers, names)
    else:
        set_active_adapters(unet, names)
    try:
        yield runs, route.plan
    finally:
        for _, layer in adapter_layers(unet):
            layer.route_slots(None)
        eject(unet)


def bench_pack(unet, args, meter, device, dtype):
    """Adapters trained per hour when K DreamBooth runs share a step (``train --jobs``): the UNet's training step
    (forward, backward, each run's own AdamW step) on K × 2 samples (instance + class image per run) with K ETHER+
    adapters routed per sample, against one run's step (K = 1, its adapter alone, 2 samples), at the first of
    ``--sizes`` (64² latents = 512 px on the GPU profile). The VAE and text-encoder passes, shared by a pack as by a
    run, are left out. Adapters per hour = K × 3600 / step; the ratio to K = 1 is taken within each round."""
    size = args.sizes[0]
    packs = [1, *args.pack_sizes]
    names = [f"K={k}" for k in packs]

    def visit(name):
        count = int(name[2:])
        inputs = training_inputs(unet, size, count * PACK_SAMPLES, device, dtype)
        latents, timesteps, context, extra, target = inputs
        with packed_runs(unet, count, device) as (runs, plan):
            optimizers = [torch.optim.AdamW(params, lr=1e-4, foreach=True) for params in runs]

            def step():
                if plan is not None:
                    plan.prepare()
                with autocast(device, dtype):
                    prediction = unet(latents, timesteps, context, **extra).sample
                losses = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
                losses.view(count, PACK_SAMPLES).mean(dim=1).sum().backward()  # each run's own mean
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            for _ in range(args.warmup):
                step()
            base_memory = meter.reset_peak()
            seconds = meter.seconds_per_call(step, args.steps_per_visit)
            return seconds, (meter.peak() - base_memory) / 2**20

    visits = interleaved(names, args.rounds, visit)
    solo = [seconds for seconds, _ in visits["K=1"]]
    rows = []
    for k, name in zip(packs, names):
        times = [seconds for seconds, _ in visits[name]]
        row = dict(model="SD-1.5 UNet" + (" (tiny)" if args.quick else ""), size=size, pack=k,
                   batch=k * PACK_SAMPLES, time=spread(times), times=times,
                   per_hour=k * 3600 / statistics.median(times),
                   ratio=spread([k * s / t for t, s in zip(times, solo)]),
                   peak_extra_mb=spread([peak for _, peak in visits[name]]))  # fmt: skip
        rows.append(row)
        print(f"  pack {size}² K={k:<2} (batch {row['batch']:>2}) {row['time']['median'] * 1e3:9.1f} ms "
              f"({row['time']['min'] * 1e3:.1f}-{row['time']['max'] * 1e3:.1f})  adapters/hour {row['per_hour']:,.0f} "
              f" ×K=1 {row['ratio']['median']:.2f} ({row['ratio']['min']:.2f}-{row['ratio']['max']:.2f})  "
              f"+{row['peak_extra_mb']['median']:.0f} MB", flush=True)  # fmt: skip
    return rows


def captured_training_step(unet, inputs, params, device, dtype) -> CapturedStep:
    """``training_step``'s work (forward, backward, AdamW step) as ``--cuda_graphs`` runs it: captured on the first
    call, replayed on the next ones (AdamW capturable, its learning rate on the device)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=True, foreach=True)
    capturable_lr(optimizer, device)
    latents, timesteps, context, extra, target = inputs

    def body(_batch):
        with autocast(device, dtype):
            prediction = unet(latents, timesteps, context, **extra).sample
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return CapturedStep(body, optimizer, params)


CAPTURED = {  # what the captured section times: (variant, captured or eager)
    "eager floor": ("floor", False),
    "captured floor": ("floor", True),
    "captured ETHER n=1": ("ether1", True),
    "captured ETHER+ two-sided n=1": ("etherplus1", True),
}


def bench_captured_training(unet, args, meter, device, dtype):
    """The training step replayed as a CUDA graph (``--cuda_graphs``) against the eager floor, at ``--sizes[0]``
    latents and batch 1 (the issue's SD-1.5 512 px row): one UNet copy per row, captured in its first visit, then
    interleaved rounds. Then the adapter check: ETHER n=1 trained ``--captured_check_steps`` steps eagerly and
    captured from the same start, the largest difference of their vectors against the largest change training made."""
    import copy

    if device.type != "cuda":
        raise RuntimeError("the captured step is a CUDA graph: this section needs --device cuda")
    size = args.sizes[0]
    inputs = training_inputs(unet, size, 1, device, dtype)
    steps, trainable, first_s = {}, {}, {}
    with contextlib.ExitStack() as stack:
        for name, (key, captured) in CAPTURED.items():
            model = copy.deepcopy(unet)
            torch.manual_seed(0)
            params = stack.enter_context(VARIANTS[key].make(model))
            trainable[name] = sum(p.numel() for p in params)
            if captured:
                step = captured_training_step(model, inputs, params, device, dtype)
                steps[name] = lambda step=step: step({})
            else:
                steps[name] = training_step(model, inputs, torch.optim.AdamW(params, lr=1e-4), device, dtype)

        # the first visit times the capture (after its warm-up steps) or the eager first step
        visits = interleaved(list(CAPTURED), args.rounds, lambda name: timed_visit(steps, name, first_s, meter, args))
    rows = []
    for name in CAPTURED:
        row = dict(
            model="SD-1.5 UNet" + (" (tiny)" if args.quick else ""),
            size=size,
            batch=1,
            variant=name,
            **timings(visits[name], visits["eager floor"]),
            trainable=trainable[name],
            first_s=first_s[name],
        )
        rows.append(row)
        print(
            f"  {size}² b1 {name:<32} {row['time']['median'] * 1e3:9.1f} ms  ×eager floor "
            f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.3f}-{row['ratio']['max']:.3f})  "
            f"first step {first_s[name]:.1f} s",
            flush=True,
        )
    vectors = {}
    for captured in (False, True):
        model = copy.deepcopy(unet)
        torch.manual_seed(0)
        with VARIANTS["ether1"].make(model) as params:
            start = [p.detach().float().clone() for p in params]
            if captured:
                step = captured_training_step(model, inputs, params, device, dtype)
                run = lambda step=step: step({})  # noqa: E731
            else:
                run = training_step(model, inputs, torch.optim.AdamW(params, lr=1e-4), device, dtype)
            for _ in range(args.captured_check_steps):
                run()
            vectors[captured] = [p.detach().float().clone() for p in params]
        del model
    difference = max((a - b).abs().max().item() for a, b in zip(vectors[False], vectors[True]))
    change = max((a - s).abs().max().item() for a, s in zip(vectors[False], start))
    rows.append(dict(check=f"ETHER n=1 after {args.captured_check_steps} steps, captured vs eager",
                     max_difference=difference, max_change=change))  # fmt: skip
    print(f"  adapter after {args.captured_check_steps} steps: captured vs eager max |Δ| {difference:.2e} "
          f"(training moved the vectors by up to {change:.2e})", flush=True)  # fmt: skip
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


SECTIONS = ("training", "sync", "sdxl", "inference", "compiled", "compile", "pack", "captured", "adapters")
PROFILES = {  # what a plain run measures, per device kind
    "cpu": dict(sections=["training", "inference", "adapters"], variants=list(VARIANTS), sizes=[16, 32]),
    "cuda": dict(
        sections=["training", "sync", "sdxl", "inference", "compiled", "compile", "pack", "captured"],
        variants=ISSUE_VARIANTS,
        sizes=[64],
    ),
}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument(
        "--captured_check_steps", type=int, default=100, help="steps of the captured section's eager/captured check"
    )
    parser.add_argument("--pack_sizes", type=int, nargs="+", default=[8], help="K of the pack section (beside 1)")
    parser.add_argument("--skip_peers", action="store_true", help="skip the PEFT variants")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where speed_<device>.md/.json go (default: docs/benchmarks; --quick: a new temporary folder)",
    )
    args = parser.parse_args(argv)
    args.command = shlex.join([*parser.prog.split(), *argv])
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


def output_folder(args: argparse.Namespace) -> Path:
    """``--output_dir``, created; without it ``docs/benchmarks`` for a measurement and a new temporary folder for a
    ``--quick`` smoke test, which measures nothing worth keeping and must not write into a checkout."""
    if args.output_dir is None and args.quick:
        return Path(tempfile.mkdtemp(prefix="ether-diffusion-speed-quick-"))
    out = Path(args.output_dir or "docs/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
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
        command=args.command,
        rounds=args.rounds,
        steps_per_visit=args.steps_per_visit,
        warmup=args.warmup,
        clock=args.clock,
        date=time.strftime("%Y-%m-%d %H:%M"),
        variants=[VARIANTS[key].label for key in args.variants],
    )
    out = output_folder(args)
    result["output_dir"] = str(out)
    print(f"writing the report into {out}", flush=True)
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
        "captured": lambda: bench_captured_training(sd15, args, meter, device, dtype),
        "pack": lambda: bench_pack(sd15, args, meter, device, dtype),
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
    """The SDXL UNet's training step at ``--sdxl_size``, batch 1, gradient checkpointing on (the GPU table's SDXL
    rows)."""
    unet = build_unet(TINY_SDXL_UNET if args.quick else SDXL_UNET, device, weights)
    keys = [key for key in ISSUE_VARIANTS if key in args.variants]
    name = "SDXL UNet" + (" (tiny)" if args.quick else "")
    rows = bench_training(unet, name, [args.sdxl_size], [1], keys, args, meter, device, dtype, checkpointing=True)
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
